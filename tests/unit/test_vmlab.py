"""The pure parts of the VM pair lab (egress_agent/lab/vmlab.py): names, MACs and
qemu's command line, the choice of accelerator, and the guest agent's protocol
against a fake agent. The VMs themselves run in `egress-agent lab vm-pair` (not
in CI: it boots five guests)."""

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from egress_agent.lab import vmlab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_nic_has_its_own_mac_and_tap_and_provision_finds_it_by_that_mac():
    macs, taps = set(), set()
    for h in vmlab.HOSTS:
        argv = vmlab.provision_argv(h, "/lab")
        assert argv[:3] == ["/egress-agent/vagrant/pair/provision.sh", h, "/lab"]
        assert argv[3:] == [f"{vmlab.IFNAMES[s]}={vmlab.mac(h, s)}" for s in vmlab.NICS[h]]
        for s in vmlab.NICS[h]:
            macs.add(vmlab.mac(h, s))
            taps.add(vmlab.tap("vmlab", h, s))
    n = sum(len(v) for v in vmlab.NICS.values())
    assert len(macs) == len(taps) == n == 7
    assert all(re.fullmatch(r"52:54:00:ea:0[12]:0[1-5]", m) for m in macs)
    assert all(len(t) <= 15 for t in taps)


def test_a_prefix_too_long_for_interface_names_is_refused():
    assert vmlab.tap("a" * 11, "g1", "fab") == "a" * 11 + "-g1f"
    with pytest.raises(ValueError, match="too long"):
        vmlab.tap("a" * 12, "origin", "inet")


def test_qemu_gets_taps_and_nothing_that_reaches_the_host_network():
    argv = vmlab.qemu_argv("vmlab", "g1", "/img", "/run/x", "/src", accel="tcg")
    joined = " ".join(argv)
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs == ["tap,id=n0,ifname=vmlab-g1f,script=no,downscript=no",
                       "tap,id=n1,ifname=vmlab-g1i,script=no,downscript=no"]
    assert "user" not in joined.split("-netdev")[1:] and "hostfwd" not in joined
    assert "-nodefaults" in argv and "-accel tcg,tb-size=256" in joined and "-cpu max" in joined
    assert "mac=52:54:00:ea:01:03" in joined and "mac=52:54:00:ea:02:03" in joined
    assert "local,path=/src,mount_tag=egress-agent,security_model=none,readonly=on" in argv
    assert "systemd.hostname=g1" in joined and "-daemonize" in argv
    kvm = vmlab.qemu_argv("vmlab", "w1", "/img", "/run/x", "/src")
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"
    assert sum(a == "-netdev" for a in kvm) == 1


def test_kvm_only_with_hardware_virtualization():
    assert vmlab.default_accel("processor: 0\nflags\t\t: fpu vme vmx sse\n") == "kvm"
    assert vmlab.default_accel("flags\t\t: fpu svm\n") == "kvm"
    # a /dev/kvm of kvm_pvm (no vmx in the flags) runs no stock kernel: tcg
    assert vmlab.default_accel("flags\t\t: fpu sse2 hypervisor avx2\n") == "tcg"
    assert vmlab.default_accel("") == "tcg"


def test_the_vagrantfile_has_the_same_hosts_nics_and_macs():
    text = open(f"{REPO}/vagrant/pair/Vagrantfile").read()
    assert "HOSTS = %w[" + " ".join(vmlab.HOSTS) + "]" in text
    for h, segs in vmlab.NICS.items():
        assert f'"{h}" => %w[{" ".join(segs)}]' in text
    assert 'format("52:54:00:ea:%02x:%02x", %w[fab inet].index(seg) + 1, HOSTS.index(host) + 1)' \
        in text and vmlab.SEGMENTS == ("fab", "inet")
    assert 'path: "provision.sh"' in text


def fake_agent(path: str, stale: list[int], exits: dict) -> threading.Thread:
    """A guest agent that first answers syncs sent before it was up (stale ids),
    then each command; guest-exec-status reports a run after one poll."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        f = c.makefile("rwb")
        polls = 0
        for line in f:
            req = json.loads(line)
            cmd, args = req["execute"], req.get("arguments", {})
            if cmd == "guest-sync":
                out = [{"return": i} for i in stale] + [{"return": args["id"]}]
                stale.clear()
            elif cmd == "guest-exec":
                exits["script"] = args["arg"][1]
                out = [{"return": {"pid": 42}}]
            else:
                polls += 1
                out = [{"return": {"exited": False}}] if polls == 1 else [{"return": {
                    "exited": True, "exitcode": 3,
                    "out-data": base64.b64encode(b"out\n").decode(),
                    "err-data": base64.b64encode(b"err\n").decode()}}]
            for o in out:
                f.write(b"\xff" + json.dumps(o).encode() + b"\n")
            f.flush()
        c.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_guest_agent_skips_answers_to_old_syncs_and_runs_a_script(tmp_path):
    exits: dict = {}
    fake_agent(str(tmp_path / "qga"), stale=[1, 2, 3], exits=exits)
    a = vmlab.GuestAgent(str(tmp_path / "qga"))
    a.n = 3  # three syncs went unanswered while the guest booted
    a.connect(timeout=5)
    assert a.run("echo out; echo err >&2; exit 3", timeout=5) == (3, "out\n", "err\n")
    assert exits["script"] == "echo out; echo err >&2; exit 3"
    a.close()


class _Lab:
    """A VM pair lab whose m1 loses the pair after the failover (the fault of run 2
    in README "A gateway pair in VMs"): every other answer is in its block."""

    def __init__(self):
        self.diagnosed, self.cut = 0, set()

    def holds_app_ip(self, g):
        return g == "g1"

    def hold(self, k, fam):
        return f"hold{k}{fam}"

    def held(self, k, name, pings, timeout=15.0):
        if k == 1 and pings == 1:
            return {"ok": False, "error": "timed out"}
        return {"ok": True, "source_address": "203.0.113.140", "source_port": 1100 * k}

    def probe(self, k, port=None, timeout=2.0):
        if self.cut == {"g1", "g2"}:  # both gateways cut off: w1 drops m1's traffic
            return {"ok": False, "error": "timed out"}
        return {"ok": True, "source_address": "203.0.113.140", "source_port": 1100 * k}

    def in_block(self, result, k, fam=4, ip_id="app-ip"):
        return bool(result and result.get("ok"))

    def expected(self, k, fam=4, ip_id="app-ip"):
        return "203.0.113.140:1024-4095"

    def sh(self, host, script, timeout=60.0, check=True):
        if "fabr0 down" in script:
            self.cut.add(host)
        elif "fabr0 up" in script:
            self.cut.discard(host)
        return ""

    def wait_active(self, g, timeout=30.0):
        pass

    def neighbours(self, host):
        return "10.200.0.100 lladdr 52:54:00:ea:01:04 DELAY"

    def ping(self, k, name):
        pass

    def wait_usable(self, h, want, timeout=60.0):
        return 0.5

    def wait_any_active(self, timeout=30.0):
        return "g1"

    def usable(self, h):
        return True

    def leaked(self):
        return 0

    def diagnose(self, say=print):
        self.diagnosed += 1
        return "/tmp/diagnostics"


def test_checks_keep_what_the_hosts_knew_at_the_first_failure_and_show_the_neighbours():
    lab, said = _Lab(), []
    rows = vmlab.checks(lab, said.append)
    failed = [r["check"] for r in rows if not r["ok"]]
    assert failed == ["m1 held IPv4, after g1 stopped", "m1 held IPv6, after g1 stopped"]
    assert lab.diagnosed == 1  # once, at the first failure, while the fault lasts
    assert "  w1: the pair's address 10.200.0.100 is 10.200.0.100 lladdr 52:54:00:ea:01:04 DELAY" \
        in said


def test_each_kernel_has_its_image_and_run_dir_and_stable_is_the_default():
    lab = vmlab.VmPairLab("vmt", accel="tcg")
    assert lab.kernel == "stable" and lab.image_dir == f"{REPO}/build/vm-stable"
    assert lab.run_dir == f"{REPO}/build/vm-stable/run-vmt"
    other = vmlab.VmPairLab("vmt", accel="tcg", kernel="backports")
    assert other.run_dir == f"{REPO}/build/vm-backports/run-vmt"
    with pytest.raises(ValueError, match="one of stable, backports"):
        vmlab.VmPairLab("vmt", accel="tcg", kernel="6.1")


def test_the_vagrantfiles_segments_carry_no_address_of_the_host_and_no_route_out():
    text = open(f"{REPO}/vagrant/pair/Vagrantfile").read()
    net = text[text.index('vm.vm.network "private_network"'):text.index("vm.vm.provision")]
    assert "ip:" not in net  # an ip would give the host's bridge an address there
    assert 'libvirt__forward_mode: "veryisolated"' in net and "auto_config: false" in net
    assert 'lv.management_network_mode = "none"' in text  # SSH from the host, no NAT


def test_the_vagrant_lab_keeps_vagrants_files_in_build_and_its_run_in_the_box_dir():
    lab = vmlab.VagrantPairLab("vgt", accel="tcg")
    assert lab.run_dir == f"{REPO}/build/box-stable/run-vgt"
    env = lab.env()
    assert env["VAGRANT_HOME"] == f"{REPO}/build/vagrant"
    assert env["VAGRANT_DOTFILE_PATH"] == f"{lab.run_dir}/.vagrant"
    assert (env["EGRESS_BOX"], env["EGRESS_PREFIX"], env["EGRESS_ACCEL"], env["EGRESS_POOL"]) \
        == ("egress-lab-stable", "vgt", "tcg", "vgt")


def test_the_vagrant_lab_stops_only_its_own_libvirt_qemu():
    """down() stops leftover qemu by its domain name (PREFIX-HOST): another lab's
    qemu, or any other process, is not this lab's."""
    lab = vmlab.VagrantPairLab("vgt", accel="tcg")
    procs = {name: subprocess.Popen(
        ["bash", "-c", f'exec -a /usr/bin/qemu-system-x86_64 {sys.executable} '
                       f'-c "import time; time.sleep(30)" -name guest={name},debug-threads=on'])
        for name in ("vgt-w1", "vgtx-w1")}
    try:
        deadline = time.monotonic() + 5
        while not all(open(f"/proc/{p.pid}/cmdline").read().startswith("/usr/bin/qemu")
                      for p in procs.values()):  # bash has exec'd
            assert time.monotonic() < deadline
        assert lab._ours(procs["vgt-w1"].pid)
        assert not lab._ours(procs["vgtx-w1"].pid)
        assert not lab._ours(os.getpid())
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


class _Flipping(_Lab):
    """A pair that fails over for real: the active gateway is whichever was not cut
    last; m1's held connection is lost in round `lose` (None: never)."""

    def __init__(self, lose=None):
        super().__init__()
        self.active, self.round, self.lose, self.scripts = "g1", 0, lose, []

    def holds_app_ip(self, g):
        return g == self.active

    def sh(self, host, script, timeout=60.0, check=True):
        self.scripts.append((host, script))
        if script in (cut for cut, _ in vmlab.CUTS.values()):
            self.active, self.round = ("g2" if host == "g1" else "g1"), self.round + 1
        return ""

    def held(self, k, name, pings, timeout=15.0):
        if k == 1 and pings == 1 and self.round == self.lose:
            return {"ok": False, "error": "timed out"}
        return {"ok": True, "source_address": "203.0.113.140", "source_port": 1100 * k}


def test_failover_rounds_take_turns_cutting_the_active_gateway_and_give_it_back():
    lab, said = _Flipping(), []
    rows = vmlab.failovers(lab, 4, said.append)
    assert [r["check"] for r in rows] == [
        "failover 1: keepalived stopped on g1", "failover 2: fabric link down on g2",
        "failover 3: keepalived stopped on g1", "failover 4: fabric link down on g2"]
    assert all(r["ok"] for r in rows) and lab.diagnosed == 0
    cuts = [(h, s) for h, s in lab.scripts if "keepalived" in s or "fabr0" in s]
    assert cuts == [("g1", "systemctl stop keepalived.service"),
                    ("g1", "systemctl start keepalived.service"),
                    ("g2", "ip link set fabr0 down"), ("g2", "ip link set fabr0 up"),
                    ("g1", "systemctl stop keepalived.service"),
                    ("g1", "systemctl start keepalived.service"),
                    ("g2", "ip link set fabr0 down"), ("g2", "ip link set fabr0 up")]


def test_a_failover_round_that_loses_a_held_connection_fails_and_is_diagnosed_once():
    lab = _Flipping(lose=2)
    rows = vmlab.failovers(lab, 3, lambda s: None)
    assert [r["ok"] for r in rows] == [True, False, True]
    assert rows[1]["observed"].endswith("held 1/2, new 2/2") and lab.diagnosed == 1
