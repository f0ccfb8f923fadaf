r"""The gateway pair lab as five KVM guests (issue 13): `egress-agent lab vm-pair`.

The hosts of `egress-agent lab pair` (pairlab.py) as VMs booted with plain qemu,
from an image built here (vagrant/vm-image: mmdebstrap, no box or ISO downloaded),
each provisioned by vagrant/pair/provision.sh, the script vagrant/pair/Vagrantfile
runs in boxes. The machines m1 and m2 are network namespaces inside w1 and w2.

  m1 in w1 --\                        /-- g1 --\
              fab (w1 w2 g1 g2)                  inet (g1 g2 origin)
  m2 in w2 --/                        \-- g2 --/

Network: each segment is a bridge in a network namespace of the lab's own
(PREFIX-hub), with one tap per guest NIC; qemu runs in that namespace, so the
guests reach each other and nothing else. No guest has a route to the host and
the host has no address on any segment. The guests are driven through
qemu-guest-agent on a virtio-serial port (a unix socket here), not SSH: the
checkout is shared read-only with 9p at /egress-agent (tag egress-agent), the
rendered files at /lab (tag lab).

`--vagrant` (VagrantPairLab) boots the same hosts from vagrant/pair/Vagrantfile
with vagrant-libvirt instead, and runs the same checks over SSH.
"""

from __future__ import annotations

import base64
import glob
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from ..names import GATE_TABLE
from .pairlab import (APP_IP, APP_RANGE, FLEET, ORIGIN, ORIGIN6, PARTNER_IP, PIDS, POLICY_PORT,
                      PORT, read_pids)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PREFIX = "vmlab"
HOSTS = ("w1", "w2", "g1", "g2", "origin")
# each guest's NICs, in order: the segment and the name provision.sh gives it
NICS = {"w1": ("fab",), "w2": ("fab",), "g1": ("fab", "inet"), "g2": ("fab", "inet"),
        "origin": ("inet",)}
IFNAMES = {"fab": "fabr0", "inet": "up0"}
SEGMENTS = ("fab", "inet")
MEMORY_MB = 640
# PIDS in the run dir: qemu's pid per guest, what `--down` stops


def mac(host: str, seg: str) -> str:
    """A fixed, locally administered MAC per guest NIC (provision.sh finds the NIC
    by it): 52:54:00:ea:SEGMENT:HOST."""
    return f"52:54:00:ea:{SEGMENTS.index(seg) + 1:02x}:{HOSTS.index(host) + 1:02x}"


def tap(prefix: str, host: str, seg: str) -> str:
    """The tap of a guest NIC in the hub namespace: PREFIX-HOST-SEG, in 15 bytes."""
    if len(prefix.encode()) > 11:
        raise ValueError(f"prefix {prefix!r} too long for interface names (at most 11 bytes)")
    return f"{prefix}-{'o' if host == 'origin' else host}{seg[0]}"
    return name


def provision_argv(host: str, rendered: str) -> list[str]:
    """provision.sh's command line for `host` (the same as the Vagrantfile's)."""
    return ["/egress-agent/vagrant/pair/provision.sh", host, rendered,
            *(f"{IFNAMES[s]}={mac(host, s)}" for s in NICS[host])]


def default_accel(cpuinfo: str) -> str:
    """kvm when the CPU offers hardware virtualization (vmx or svm), else tcg.
    A /dev/kvm without it (e.g. PVM, kvm_pvm, as in the Firecracker VM this lab was
    first run in) runs only kernels built as its guests: a stock Debian kernel stops
    there with a KVM "emulation failure" early in boot."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "kvm" if {"vmx", "svm"} & set(line.split(":", 1)[1].split()) else "tcg"
    return "tcg"


def qemu_argv(prefix: str, host: str, image_dir: str, run_dir: str, share: str,
              accel: str = "kvm") -> list[str]:
    """qemu for one guest: KVM (or TCG, qemu's own emulation), 1 vCPU, direct kernel boot from the image's own
    kernel, a copy-on-write disk over the image, the checkout and the lab's files
    by 9p, qemu-guest-agent's port, and one tap NIC per segment. No user-mode
    network, no display; the console goes to RUN/HOST.console."""
    argv = ["qemu-system-x86_64", "-name", f"{prefix}-{host}", "-machine", "q35",
            # TCG's translation cache is 1 GiB by default: 256 MiB per guest is plenty
            "-accel", "kvm" if accel == "kvm" else "tcg,tb-size=256",
            "-cpu", "host" if accel == "kvm" else "max", "-smp", "1", "-m", str(MEMORY_MB), "-nodefaults", "-display", "none",
            "-kernel", f"{image_dir}/vmlinuz", "-initrd", f"{image_dir}/initrd.img",
            "-append", f"root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname={host}",
            "-drive", f"file={run_dir}/{host}.qcow2,if=virtio,format=qcow2",
            "-serial", f"file:{run_dir}/{host}.console",
            "-virtfs", f"local,path={share},mount_tag=egress-agent,security_model=none,readonly=on",
            "-virtfs", f"local,path={run_dir}/lab,mount_tag=lab,security_model=none,readonly=on",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=qga,path={run_dir}/{host}.qga,server=on,wait=off",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            "-pidfile", f"{run_dir}/{host}.pid", "-daemonize"]
    for i, seg in enumerate(NICS[host]):
        argv += ["-netdev", f"tap,id=n{i},ifname={tap(prefix, host, seg)},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n{i},mac={mac(host, seg)}"]
    return argv


class GuestAgent:
    """A client of qemu-guest-agent (its JSON protocol on the port's unix socket):
    guest-sync once the guest is up, then guest-exec and guest-exec-status."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.n = 0

    def _call(self, cmd: str, args: dict | None = None, timeout: float = 10.0) -> object:
        """Send `cmd`, return its answer. Answers to earlier guest-syncs that went
        unanswered while the guest booted (an int each) are skipped: no other
        command used here answers with an int."""
        assert self.sock is not None
        self.sock.sendall(json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
                          .encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                line = line.strip(b"\xff \r")
                if not line:
                    continue
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"guest agent {cmd}: {reply['error']}")
                r = reply.get("return")
                if isinstance(r, int) and (cmd != "guest-sync" or r != args["id"]):
                    continue
                return r
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest agent {cmd}: no answer in {timeout:.0f} s")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"guest agent {self.path}: closed")
            self.buf += data

    def connect(self, timeout: float = 120.0) -> float:
        """Wait until the agent in the guest answers (the guest has booted);
        seconds waited."""
        t0 = time.monotonic()
        while True:
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.connect(self.path)
                self.n += 1
                self._call("guest-sync", {"id": self.n}, timeout=2.0)
                return time.monotonic() - t0
            except (OSError, TimeoutError, ValueError):
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"the guest agent at {self.path} did not answer in "
                                       f"{timeout:.0f} s")
                time.sleep(0.5)

    def run(self, script: str, timeout: float = 120.0) -> tuple[int, str, str]:
        """`sh -c script` in the guest as root: (exit status, stdout, stderr)."""
        pid = self._call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                        "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self._call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return (st.get("exitcode", st.get("signal", -1)),
                        base64.b64decode(st.get("out-data", "")).decode(errors="replace"),
                        base64.b64decode(st.get("err-data", "")).decode(errors="replace"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest: `{script}` still running after {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


PAIR_VIP = re.search(r"^    vip: (\S+)$", FLEET, re.M).group(1)  # type: ignore[union-attr]
# the guests' kernel: Debian 12's own (6.1, what a Debian 12 host runs) or
# bookworm-backports' (6.12); its image is in build/vm-KERNEL, as vagrant/vm-image has it
KERNELS = ("stable", "backports")


class VmPairLab:
    def __init__(self, prefix: str = DEFAULT_PREFIX, image_dir: str | None = None,
                 share: str = REPO, accel: str | None = None, kernel: str = "stable"):
        tap(prefix, "origin", "inet")  # refuses a prefix too long
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r}: one of {', '.join(KERNELS)}")
        self.prefix = prefix
        self.kernel = kernel
        self.image_dir = image_dir or f"{REPO}/build/vm-{kernel}"
        self.run_dir = f"{self.image_dir}/run-{prefix}"
        self.share = share
        self.hub = f"{prefix}-hub"
        if accel is None:
            with open("/proc/cpuinfo") as f:
                accel = default_accel(f.read())
        self.accel = accel
        self.agents: dict[str, GuestAgent] = {}
        self.blocks: dict[tuple[int, str], tuple[int, int]] = {}
        self.timings: dict[str, float] = {}

    # --- building ---------------------------------------------------------------

    def image(self, say=print) -> None:
        """Build the image when it is missing (vagrant/vm-image, cached), and the
        package the guests install (packaging/build-deb) when dist/ has none."""
        if not os.path.exists(f"{self.image_dir}/rootfs.qcow2"):
            say(f"building the guest image in {self.image_dir} (vagrant/vm-image) ...")
            t0 = time.monotonic()
            subprocess.run([f"{REPO}/vagrant/vm-image", self.image_dir], check=True,
                           stdout=subprocess.DEVNULL,
                           env={**os.environ, "EGRESS_VM_KERNEL": self.kernel})
            self.timings["image"] = time.monotonic() - t0
        self.package(say)

    def package(self, say=print) -> None:
        dist = f"{self.share}/dist"
        if not (os.path.isdir(dist) and any(f.endswith(".deb") for f in os.listdir(dist))):
            say("building the package the guests install (packaging/build-deb) ...")
            subprocess.run([f"{REPO}/packaging/build-deb"], check=True, stdout=subprocess.DEVNULL)
        deb = sorted(f for f in os.listdir(dist) if f.endswith(".deb"))[-1]
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.stat(f"{dist}/{deb}").st_mtime))
        say(f"the guests install dist/{deb} (built {built}; packaging/build-deb makes it anew)")

    def render(self, out: str) -> dict:
        """The lab's fleet file and every host's files from `egress-agent fleet
        render`, with the default (real hosts') paths; the blocks it allocated."""
        os.makedirs(out, exist_ok=True)
        with open(f"{out}/fleet.yaml", "w") as f:
            f.write(FLEET)
        p = subprocess.run([sys.executable, "-m", "egress_agent.cli", "fleet", "render", "-f",
                            f"{out}/fleet.yaml", "-o", out, "--state", f"{out}/fleet-state",
                            "--json"], capture_output=True, text=True, cwd="/",
                           env={**os.environ, "PYTHONPATH": REPO})
        if p.returncode != 0:
            raise RuntimeError(f"fleet render: {p.stdout}{p.stderr}")
        r = json.loads(p.stdout)
        for key, block in r["blocks"]["app"].items():
            w, ip_id = key.split()
            self.blocks[(int(w[1:]), ip_id)] = tuple(map(int, block.split("-")))  # type: ignore
        return r

    def _hub(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.hub, *args], check=True, capture_output=True)

    def boot(self) -> None:
        os.makedirs(self.run_dir)
        self.render(f"{self.run_dir}/lab")
        subprocess.run(["ip", "netns", "add", self.hub], check=True)
        for seg in SEGMENTS:
            # a bridge that forwards multicast (VRRP's adverts are unicast here, but
            # IPv6 neighbour discovery is not) and carries no address of the host
            self._hub("link", "add", f"{self.prefix}-{seg[0]}", "type", "bridge",
                      "mcast_snooping", "0")
            self._hub("link", "set", f"{self.prefix}-{seg[0]}", "up")
        for h in HOSTS:
            for seg in NICS[h]:
                t = tap(self.prefix, h, seg)
                self._hub("tuntap", "add", t, "mode", "tap")
                self._hub("link", "set", t, "master", f"{self.prefix}-{seg[0]}")
                self._hub("link", "set", t, "up")
        pids = {}
        t0 = time.monotonic()
        for h in HOSTS:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            f"{self.image_dir}/rootfs.qcow2", f"{self.run_dir}/{h}.qcow2"],
                           check=True)
            subprocess.run(["ip", "netns", "exec", self.hub,
                            *qemu_argv(self.prefix, h, self.image_dir, self.run_dir, self.share,
                                      self.accel)],
                           check=True)
            with open(f"{self.run_dir}/{h}.pid") as f:
                pids[h] = int(f.read())
            with open(f"{self.run_dir}/{PIDS}", "w") as f:
                json.dump(pids, f)
        for h in HOSTS:
            self.agents[h] = GuestAgent(f"{self.run_dir}/{h}.qga")
            self.agents[h].connect(timeout=120 if self.accel == "kvm" else 600)
        self.timings["boot"] = time.monotonic() - t0

    def provision(self) -> None:
        """provision.sh in all five guests at once."""
        t0 = time.monotonic()
        errors: dict[str, BaseException] = {}

        def one(h: str) -> None:
            try:
                self.provision_one(h)
            except BaseException as e:  # noqa: B036 - reported below, for every guest
                errors[h] = e

        threads = [threading.Thread(target=one, args=(h,)) for h in HOSTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError("provisioning failed: " + "; ".join(
                f"{h}: {e}" for h, e in errors.items()))
        self.timings["provision"] = time.monotonic() - t0

    def provision_one(self, host: str) -> None:
        self.sh(host, "mountpoint -q /egress-agent && mountpoint -q /lab")
        self.sh(host, " ".join(provision_argv(host, "/lab")), timeout=900)

    def up(self, say=print) -> None:
        self.image(say)
        say(f"booting 5 VMs ({self.accel}, {MEMORY_MB} MB, 1 vCPU each; files in "
            f"{self.run_dir}) ...")
        self.boot()
        say(f"  booted in {self.timings['boot']:.0f} s; provisioning (vagrant/pair/provision.sh) ...")
        self.provision()
        say(f"  provisioned in {self.timings['provision']:.0f} s")
        self.wait_any_active()

    # --- in the guests ----------------------------------------------------------

    def run(self, host: str, script: str, timeout: float = 10.0) -> tuple[int, str, str]:
        """`sh -c script` as root in the guest: exit code, stdout, stderr."""
        return self.agents[host].run(script, timeout)

    def sh(self, host: str, script: str, timeout: float = 60.0, check: bool = True) -> str:
        rc, out, err = self.run(host, script, timeout)
        if check and rc != 0:
            raise RuntimeError(f"{host}: `{script}` exited {rc}\n{out}{err}")
        return out

    def holds_app_ip(self, g: str) -> bool:
        return APP_IP in self.sh(g, "ip -4 addr show dev up0")

    def gate_open(self, g: str) -> bool:
        return self.run(g, f"nft list table {GATE_TABLE}")[0] != 0

    def wait_active(self, g: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.holds_app_ip(g) and self.gate_open(g)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{g} did not become the active gateway\n{self.journal(g)}")
            time.sleep(0.1)

    def wait_any_active(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for g in ("g1", "g2"):
                if self.holds_app_ip(g) and self.gate_open(g):
                    return g
            if time.monotonic() > deadline:
                raise TimeoutError(f"no gateway became active\n{self.journal('g1')}")
            time.sleep(0.1)

    def journal(self, g: str) -> str:
        return self.sh(g, "journalctl -q --no-pager -n 30 -u keepalived -u conntrackd "
                          "-u egress-agent", check=False)

    def neighbours(self, host: str) -> str:
        """The host's neighbour entry for the pair's fabric address (its tunnel's
        remote): whose MAC, in what state."""
        return self.sh(host, f"ip neigh show dev fabr0 to {PAIR_VIP}", check=False).strip() \
            or "none"

    def diagnose(self, say=print) -> str:
        """What the hosts knew when a check failed, into a file that outlives the lab
        (its run dir goes with it): neighbours, tunnels, the daemons' conditions and
        journals. Its path."""
        path = f"{os.path.dirname(self.run_dir)}/diagnostics-{self.prefix}-{int(time.time())}.txt"
        steps = {"w": ["ip -s neigh show dev fabr0", "ip -d link show type vxlan",
                       "cat /var/lib/egress-agent/status.json",
                       "journalctl -q --no-pager -n 80 -u egress-agent"],
                 "g": ["ip -s neigh show dev fabr0", "ip -4 addr show",
                       "journalctl -q --no-pager -n 80 -u keepalived -u conntrackd -u egress-agent"]}
        with open(path, "w") as f:
            for h in ("w1", "w2", "g1", "g2"):
                for cmd in steps[h[0]]:
                    f.write(f"### {h}: {cmd}\n{self.sh(h, cmd, check=False)}\n")
        say(f"  a check failed: what the hosts knew is in {path}")
        return path

    def probe(self, k: int, dst: str = ORIGIN, port: int = PORT, timeout: float = 2.0) -> dict:
        out = self.sh(f"w{k}", f"PYTHONPATH=/usr/lib/egress-agent ip netns exec m{k} python3 -m "
                               f"egress_agent.lab.echo probe --tcp {dst} {port} --json "
                               f"--timeout {timeout}", check=False)
        return json.loads(out)

    def hold(self, k: int, family: int) -> str:
        """A TCP connection held from machine k (egress_agent.lab.echo hold, a unit
        of its own in w{k}), pinged through a FIFO; its name."""
        name = f"lab-hold{family}"
        dst = ORIGIN6 if family == 6 else ORIGIN
        self.sh(f"w{k}", f"""set -e
rm -f /run/{name}.in /run/{name}.out; mkfifo /run/{name}.in; : > /run/{name}.out
systemd-run -q --unit {name} --setenv=PYTHONPATH=/usr/lib/egress-agent sh -c \
  'exec ip netns exec m{k} python3 -m egress_agent.lab.echo hold {dst} {PORT} --timeout 5 \
   < /run/{name}.in >> /run/{name}.out'
systemd-run -q --unit {name}-pipe sh -c 'exec sleep infinity > /run/{name}.in'""")
        return name

    def held(self, k: int, name: str, pings: int, timeout: float = 15.0) -> dict | None:
        """The answer to ping number `pings` (0: the connect) of a held connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.sh(f"w{k}", f"cat /run/{name}.out").splitlines()
            if len(lines) > pings:
                return json.loads(lines[pings])
            time.sleep(0.1)
        return None

    def ping(self, k: int, name: str) -> None:
        self.sh(f"w{k}", f"echo ping > /run/{name}.in")

    def usable(self, h: str) -> bool | None:
        out = self.sh(h, "cat /var/lib/egress-agent/status.json", check=False)
        try:
            c = json.loads(out)["conditions"].get("egress_ip/app-ip/IPv4Usable")
        except (ValueError, KeyError):
            return None
        return None if c is None else c["status"]

    def wait_usable(self, h: str, want: bool, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while self.usable(h) is not want:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the daemon on {h} did not see the app IP usable={want}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def leaked(self) -> int:
        out = self.sh("origin", "nft list counter inet lab_origin leaked")
        return int(out.split("packets")[1].split()[0])

    def expected(self, k: int, family: int = 4, ip_id: str = "app-ip") -> str:
        lo, hi = self.blocks[(k, ip_id)]
        if family == 6:
            return str(ipaddress.IPv6Network(APP_RANGE)[lo])
        return f"{PARTNER_IP if ip_id == 'partner-ip' else APP_IP}:{lo}-{hi}"

    def in_block(self, result: dict | None, k: int, family: int = 4,
                 ip_id: str = "app-ip") -> bool:
        if not result or not result.get("ok"):
            return False
        if family == 6:
            return result["source_address"] == self.expected(k, 6)
        lo, hi = self.blocks[(k, ip_id)]
        return result["source_address"] == (PARTNER_IP if ip_id == "partner-ip" else APP_IP) \
            and lo <= result["source_port"] <= hi

    # --- taking it down -----------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        return read_pids(self.run_dir)

    def _ours(self, pid: int) -> bool:
        """The pid is still one of this lab's qemu (a pid reused since is not)."""
        argv = _argv(pid)
        return argv[0].endswith(b"qemu-system-x86_64") and \
            f"{self.run_dir}/".encode() in b" ".join(argv)

    def _stop(self, pids: list[int]) -> None:
        """SIGTERM (qemu powers the guest off at once), SIGKILL after 10 s."""
        pids = [p for p in pids if self._ours(p)]
        for p in pids:
            os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (left := [p for p in pids if self._ours(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in left:
            os.kill(p, signal.SIGKILL)

    def down(self) -> None:
        for a in self.agents.values():
            a.close()
        self._stop(list(self._pids().values()))
        if os.path.exists(f"/run/netns/{self.hub}"):
            subprocess.run(["ip", "netns", "del", self.hub], check=True)
        subprocess.run(["rm", "-rf", "--one-file-system", self.run_dir], check=True)


class VagrantPairLab(VmPairLab):
    """The same lab from vagrant/pair/Vagrantfile, with vagrant-libvirt: the box
    vagrant/box makes (the lab's image with sshd and the user vagrant), `vagrant up`
    (which runs provision.sh in each box), and the checks over SSH with the config
    `vagrant ssh-config` prints. Vagrant, libvirtd, virtlogd and so every qemu run
    in the lab's own network namespace (PREFIX-hub): the management network
    (192.168.121.0/24, SSH from Vagrant) and the two veryisolated segments are
    bridges there, with no route out. Vagrant's files (VAGRANT_HOME, with the box)
    and the storage pool (the box's volume, the domains' disks) are in build/vagrant;
    a run's own files in build/box-KERNEL/run-PREFIX."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, accel: str | None = None,
                 kernel: str = "stable"):
        super().__init__(prefix, image_dir=f"{REPO}/build/box-{kernel}", accel=accel,
                         kernel=kernel)
        self.box = f"egress-lab-{kernel}"
        self.rendered = f"{REPO}/vagrant/pair/rendered"
        self.ssh_config = f"{self.run_dir}/ssh_config"
        # the storage pool outlives a run: the box's volume (800 MB) is uploaded into
        # it once, not at every run; the domains' disks are copy-on-write over it
        self.pool = f"{REPO}/build/vagrant/pool"

    def env(self) -> dict[str, str]:
        return {**os.environ, "VAGRANT_HOME": f"{REPO}/build/vagrant",
                "VAGRANT_DOTFILE_PATH": f"{self.run_dir}/.vagrant",
                "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_CHECKPOINT_DISABLE": "1",
                "EGRESS_BOX": self.box, "EGRESS_PREFIX": self.prefix,
                "EGRESS_ACCEL": self.accel, "EGRESS_POOL": self.prefix,
                "EGRESS_VM_KERNEL": self.kernel}

    def vagrant(self, *args: str, timeout: float = 1800) -> str:
        p = subprocess.run(["ip", "netns", "exec", self.hub, "vagrant", *args],
                           cwd=f"{REPO}/vagrant/pair", env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        with open(f"{self.run_dir}/vagrant.log", "a") as log:
            log.write(f"$ vagrant {' '.join(args)}\n{p.stdout}{p.stderr}")
        if p.returncode != 0:  # the error first, then Ruby's backtrace
            raise RuntimeError(f"vagrant {' '.join(args)} exited {p.returncode} (whole output "
                               f"in {self.run_dir}/vagrant.log):\n{p.stderr[:2000]}")
        return p.stdout

    def image(self, say=print) -> None:
        """The box (vagrant/box: builds its image when missing, cached) and the package."""
        t0 = time.monotonic()
        subprocess.run([f"{REPO}/vagrant/box"], check=True, stdout=subprocess.DEVNULL,
                       env=self.env())
        self.timings["box"] = time.monotonic() - t0
        self.package(say)

    def boot(self) -> None:
        if subprocess.run(["virsh", "-q", "version"], capture_output=True).returncode == 0:
            raise RuntimeError("a libvirtd runs already: this lab starts its own in its "
                               "namespace (or run vagrant/pair/Vagrantfile with yours)")
        os.makedirs(self.run_dir)
        os.makedirs(self.pool, exist_ok=True)
        self.render(self.rendered)
        subprocess.run(["ip", "netns", "add", self.hub], check=True)
        self._hub("link", "set", "lo", "up")
        pids = {}
        # `ip netns exec` gives the daemons a mount namespace of their own. Under TCG
        # /dev/kvm is hidden there: a /dev/kvm without vmx/svm (PVM) made libvirtd
        # probe qemu anew at every domain start (a minute each)
        hide = "mount --bind /dev/null /dev/kvm && " \
            if self.accel == "tcg" and os.path.exists("/dev/kvm") else ""
        for d in ("virtlogd", "libvirtd"):
            with open(f"{self.run_dir}/{d}.log", "w") as log:
                pids[d] = subprocess.Popen(
                    ["ip", "netns", "exec", self.hub, "sh", "-c",
                     f'{hide}exec {d} --pid-file "$0"', f"{self.run_dir}/{d}.pid"],
                    stdout=log, stderr=log, start_new_session=True).pid
            with open(f"{self.run_dir}/{PIDS}", "w") as f:
                json.dump(pids, f)
        t0 = time.monotonic()
        while subprocess.run(["virsh", "-q", "version"], capture_output=True).returncode != 0:
            if time.monotonic() - t0 > 30:
                raise TimeoutError(f"libvirtd did not answer: {self.run_dir}/libvirtd.log")
            time.sleep(0.2)
        p = subprocess.run(["virsh", "-q", "pool-create-as", self.prefix, "dir", "--target",
                            self.pool], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"virsh pool-create-as {self.prefix}: {p.stderr.strip()}")
        t0 = time.monotonic()
        self.vagrant("up", "--no-provision")
        self.timings["boot"] = time.monotonic() - t0
        with open(self.ssh_config, "w") as f:
            f.write(self.vagrant("ssh-config"))

    def provision_one(self, host: str) -> None:
        """The Vagrantfile's provisioner (provision.sh) in one box."""
        self.vagrant("provision", host)

    def run(self, host: str, script: str, timeout: float = 10.0) -> tuple[int, str, str]:
        p = subprocess.run(
            ["ip", "netns", "exec", self.hub, "ssh", "-F", self.ssh_config,
             "-o", "ControlMaster=auto", "-o", f"ControlPath={self.run_dir}/ssh-%h",
             "-o", "ControlPersist=600", host, "sudo sh -c " + shlex.quote(script)],
            capture_output=True, text=True, timeout=timeout + 30)
        return p.returncode, p.stdout, p.stderr

    def down(self) -> None:
        """`vagrant destroy`, then whatever of the lab libvirtd still holds (a run
        that failed half-way): its domains, networks and pool; libvirtd keeps
        them in /run/libvirt across its own restart."""
        if any(self._ours(p) for p in self._pids().values()):
            if os.path.exists(f"{self.run_dir}/.vagrant"):
                try:
                    self.vagrant("destroy", "-f", timeout=300)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
            for kind, stop, drop in (("", "destroy", "undefine"),
                                     ("net-", "net-destroy", "net-undefine")):
                names = subprocess.run(["virsh", "-q", f"{kind}list", "--all", "--name"],
                                       capture_output=True, text=True).stdout.split()
                for n in names:
                    if n.startswith(f"{self.prefix}-"):
                        subprocess.run(["virsh", "-q", stop, n], capture_output=True)
                        subprocess.run(["virsh", "-q", drop, n], capture_output=True)
            subprocess.run(["virsh", "-q", "pool-destroy", self.prefix], capture_output=True)
        qemu = [int(p) for p in subprocess.run(["pgrep", "-f", f"guest={self.prefix}-"],
                                               capture_output=True, text=True).stdout.split()]
        self._stop(qemu)
        super().down()
        # what libvirtd leaves of the lab's domains and networks once stopped
        for path in (glob.glob(f"/run/libvirt/network/{self.prefix}-*")
                     + glob.glob(f"/var/log/libvirt/qemu/{self.prefix}-*.log")):
            subprocess.run(["rm", "-rf", "--one-file-system", path], check=True)

    def _ours(self, pid: int) -> bool:
        """libvirtd and virtlogd name the run dir (their pid files); libvirt's qemu
        names its domain, PREFIX-HOST."""
        argv = _argv(pid)
        if argv[0].endswith((b"libvirtd", b"virtlogd")):
            return f"{self.run_dir}/".encode() in b" ".join(argv)
        return argv[0].endswith(b"qemu-system-x86_64") and \
            any(a.startswith(f"guest={self.prefix}-".encode()) for a in argv)


def _argv(pid: int) -> list[bytes]:
    """A process's command line ([b""] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return [b""]


def demo(lab: VmPairLab, say=print, keep: bool = False, rounds: int = 0) -> list[dict]:
    """`egress-agent lab vm-pair`: the checks of `lab pair`, in VMs. One row per
    check: what, expected, observed, ok."""
    prefix = lab.prefix
    if os.path.exists(lab.run_dir) or os.path.exists(f"/run/netns/{lab.hub}"):
        raise FileExistsError(f"a VM lab named {prefix!r} is up ({lab.run_dir}): give another "
                              f"--prefix, or remove it (egress-agent lab vm-pair --down "
                              f"--prefix {prefix})")
    t0 = time.monotonic()
    rows: list[dict] = []
    try:
        lab.up(say)
        t1 = time.monotonic()
        rows = checks(lab, say, rounds)
        lab.timings["checks"] = time.monotonic() - t1
        if keep:
            lab.wait_any_active()
            say(f"\nthe VMs stay up: files in {lab.run_dir}, qemu pids in {lab.run_dir}/{PIDS}; "
                f"egress-agent lab vm-pair --down --prefix {prefix} removes them")
    except BaseException:
        keep = False
        raise
    finally:
        if not keep:
            lab.down()
    say(f"\ntook {time.monotonic() - t0:.0f} s: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in lab.timings.items()))
    return rows


def checks(lab: VmPairLab, say=print, rounds: int = 0) -> list[dict]:
    """The checks of `lab pair` in a VM lab that is up: what the origin sees of
    each machine against the fleet's blocks, held connections across a failover
    (keepalived stopped on the active gateway), new connections and the policy
    through the other, the drop fallback with both gateways cut off, `rounds` more
    failovers (`failovers`), and the origin's count of packets from any other
    source."""
    rows: list[dict] = []

    def show(r: dict) -> None:
        rows.append(r)
        say(f"{r['check']:44} {r['expected']:40} {r['observed']:28} {'yes' if r['ok'] else 'NO'}")
        if not r["ok"] and sum(not x["ok"] for x in rows) == 1:
            lab.diagnose(say)  # at the first failure, while the fault lasts

    def seen(result: dict | None) -> str:
        if not result or not result.get("ok"):
            return "no answer" + (f" ({result['error']})" if result and result.get("error") else "")
        a = result["source_address"]
        return f"[{a}]:{result['source_port']}" if ":" in a else f"{a}:{result['source_port']}"

    def row(what: str, k: int, fam: int, result: dict | None, first: dict | None = None,
            ip_id: str = "app-ip") -> None:
        ok = lab.in_block(result, k, fam, ip_id) and (
            first is None or (result or {}).get("source_port") == first.get("source_port"))
        show({"check": what, "expected": lab.expected(k, fam, ip_id)
              + (f" (= port {first['source_port']})" if first and first.get("ok") else ""),
              "observed": seen(result), "ok": ok})


    active = "g1" if lab.holds_app_ip("g1") else "g2"
    other = "g2" if active == "g1" else "g1"
    say(f"{'CHECK':44} {'EXPECTED (the fleet blocks)':40} {'OBSERVED':28} MATCH")
    names = {(k, fam): lab.hold(k, fam) for k in (1, 2) for fam in (4, 6)}
    first = {key: lab.held(key[0], n, 0) for key, n in names.items()}
    for (k, fam), r in first.items():
        row(f"m{k} on w{k}, tcp IPv{fam}, through {active}", k, fam, r)
    t_fail = time.monotonic()
    lab.sh(active, "systemctl stop keepalived.service")
    lab.wait_active(other)
    took = time.monotonic() - t_fail
    say(f"  keepalived stopped on {active}: {other} active after {took:.1f} s "
        f"(as the lab polled it)")
    for w in ("w1", "w2"):  # the pair's fabric address must point at the new active one
        say(f"  {w}: the pair's address {PAIR_VIP} is {lab.neighbours(w)}")
    for (k, fam), n in names.items():
        lab.ping(k, n)
        row(f"m{k} held IPv{fam}, after {active} stopped", k, fam, lab.held(k, n, 1),
            first[(k, fam)])
        lab.sh(f"w{k}", f"systemctl stop {n}-pipe {n}", check=False)
    lab.sh(active, "systemctl start keepalived.service")  # the standby now (nopreempt)
    for k in (1, 2):
        row(f"m{k} on w{k}, new tcp IPv4, through {other}", k, 4, lab.probe(k))
        row(f"m{k} tcp :{POLICY_PORT} (policy to-partner)", k, 4,
            lab.probe(k, port=POLICY_PORT), ip_id="partner-ip")
    # both gateways cut off: w1's daemon finds the pair unreachable (its probe)
    # and m1 falls back to `unavailable: drop`: nothing leaves
    lab.wait_usable("w1", True)
    for g in ("g1", "g2"):
        lab.sh(g, "ip link set fabr0 down")
    took = lab.wait_usable("w1", False)
    r = lab.probe(1, timeout=1.0)
    for g in ("g1", "g2"):
        lab.sh(g, "ip link set fabr0 up")
    show({"check": "m1, both gateways cut off (drop fallback)",
          "expected": "no answer (dropped on w1)",
          "observed": f"{'an answer' if r.get('ok') else 'no answer'} "
                      f"(unusable after {took * 1000:.0f} ms)",
          "ok": not r.get("ok")})
    rows += failovers(lab, rounds, say, diagnose=not any(not r["ok"] for r in rows))
    leaked = lab.leaked()
    show({"check": "packets at the origin from another source", "expected": "0",
          "observed": str(leaked), "ok": leaked == 0})
    return rows


# how a round of `failovers` takes the active gateway away, and gives it back
CUTS = {"keepalived stopped": ("systemctl stop keepalived.service",
                               "systemctl start keepalived.service"),
        "fabric link down": ("ip link set fabr0 down", "ip link set fabr0 up")}


def failovers(lab: VmPairLab, rounds: int, say=print, diagnose: bool = True) -> list[dict]:
    """`rounds` more failovers, keepalived stopped and the fabric link down in turn
    (the two of the issue), each while m1 and m2 hold a TCP connection over IPv4:
    both must answer again from the same port, a new connection from each must
    leave in its block, and neither workload host may find the pair unusable (its
    probe) for long. One row per round; the first failed round is diagnosed."""
    rows: list[dict] = []
    for i in range(rounds):
        how = list(CUTS)[i % len(CUTS)]
        cut, restore = CUTS[how]
        lab.wait_any_active()
        for w in ("w1", "w2"):
            lab.wait_usable(w, True)
        active = "g1" if lab.holds_app_ip("g1") else "g2"
        other = "g2" if active == "g1" else "g1"
        names = {k: lab.hold(k, 4) for k in (1, 2)}
        first = {k: lab.held(k, n, 0) for k, n in names.items()}
        t0 = time.monotonic()
        lab.sh(active, cut)
        lab.wait_active(other)
        took = time.monotonic() - t0
        held = {}
        for k, n in names.items():
            lab.ping(k, n)
            r = lab.held(k, n, 1)
            held[k] = lab.in_block(r, k) and bool(first[k]) and \
                (r or {}).get("source_port") == first[k].get("source_port")
            lab.sh(f"w{k}", f"systemctl stop {n}-pipe {n}", check=False)
        new = {k: lab.in_block(lab.probe(k), k) for k in (1, 2)}
        usable = {w: lab.usable(w) for w in ("w1", "w2")}
        ok = all(held.values()) and all(new.values()) and all(usable.values())
        r = {"check": f"failover {i + 1}: {how} on {active}",
             "expected": f"{other} active, m1 m2 held and new",
             "observed": f"{other} after {took:.1f} s; held "
                         f"{sum(held.values())}/2, new {sum(new.values())}/2"
                         + "".join(f", {w} unusable" for w, u in usable.items() if not u),
             "ok": ok}
        rows.append(r)
        say(f"{r['check']:44} {r['expected']:40} {r['observed']:28} {'yes' if ok else 'NO'}")
        if not ok and diagnose:
            lab.diagnose(say)
            diagnose = False
        lab.sh(active, restore)
    if rounds:
        lab.wait_any_active()
    return rows
