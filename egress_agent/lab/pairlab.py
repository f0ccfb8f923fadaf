r"""A gateway pair in network namespaces (issue 13): two workload hosts, two
gateway hosts and an origin, with the agent on all four, keepalived and
conntrackd on the gateways (docs/gateway.md). tests/integration/test_gateway_pair.py
and bench/gateway.py build it.

  m1 - w1 ==VXLAN 101==\                       /== g1 (active) ==\
                        fabric 10.200.0.0/24       inet 203.0.113.0/24 - o (origin)
  m2 - w2 ==VXLAN 102==/                       \== g2 (standby) =/

The workload hosts send their machine's traffic for the app IP untranslated into
a VXLAN tunnel to the pair's fabric address (an egress IP with `remote: true`);
the active gateway translates each machine to its block on the app IP.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from .echo import HeldConnection, Seen
from .netns import addr_add, ip, link_up, ns_add, ns_del, ns_exec, nsenter_prefix, route_add, \
    veth

APP_IP, APP_RANGE, ORIGIN, ORIGIN6, PORT = (
    "203.0.113.140", "2001:db8:140::/64", "203.0.113.10", "2001:db8:f::10", 7000)
# a policy sends the machines' TCP to port POLICY_PORT out of the pair's other IP
PARTNER_IP, POLICY_PORT = "203.0.113.141", 7001
VIP6 = "2001:db8:f::1"  # the pair's on the uplink: the origin routes APP_RANGE there
MACHINES = {1: ("10.1.1.2", "fd00:1::2"), 2: ("10.1.2.2", "fd00:2::2")}  # m{k} on w{k}
HOSTS = ("w1", "w2", "g1", "g2")
NAMESPACES = ("fab", "inet", "o", *HOSTS, "m1", "m2")
PIDS = "pids.json"  # in the lab's run dir: what `down` stops

# The whole lab's egress, as a fleet file: `egress-agent fleet render` writes each
# host's files from it (its allocation gives the blocks, the same on g1 and g2).
FLEET = """version: 1
defaults: {ports_per_workload: 1024, unavailable: drop}
pairs:
  - id: app
    region: lab
    vrid: 51
    fabric: 10.200.0.0/24
    vip: 10.200.0.100
    tunnels: 10.250.0.0/16
    tunnels6: "fd00:250::/64"
    vip6: "2001:db8:f::1/64"
    gateways:
      - {host: g1, fabric_dev: fabr0, fabric_addr: 10.200.0.2, priority: 150, uplink: up0}
      - {host: g2, fabric_dev: fabr0, fabric_addr: 10.200.0.3, priority: 100, uplink: up0}
hosts:
  - {name: w1, region: lab, fabric_dev: fabr0, fabric_addr: 10.200.0.11, vni: 101}
  - {name: w2, region: lab, fabric_dev: fabr0, fabric_addr: 10.200.0.12, vni: 102}
egress_ips:
  - {id: app-ip, app: app, ipv4: 203.0.113.140, ipv6: "2001:db8:140::/64", pair: app}
  - {id: partner-ip, app: partners, ipv4: 203.0.113.141, pair: app}
workloads:
  - {id: m1, app: app, host: w1, source: [10.1.1.2, "fd00:1::2"], interface: m1}
  - {id: m2, app: app, host: w2, source: [10.1.2.2, "fd00:2::2"], interface: m2}
policies:
  - name: to-partner
    match: {ports: [7001], protocols: [tcp]}
    egress: {ipv4: partner-ip, ipv4_fallback: drop}
"""


class PairLab:
    def __init__(self, prefix: str, run_root: str = "/run/egress-agent-lab"):
        self.prefix = prefix
        self.run_dir = f"{run_root}/{prefix}"
        self.table = f"{prefix}_origin"
        self.procs: dict[str, subprocess.Popen] = {}
        # (machine k, egress IP id) -> its block there, from the fleet's allocation
        self.blocks: dict[tuple[int, str], tuple[int, int]] = {}

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def up(self) -> None:
        os.makedirs(self.run_dir, mode=0o755)
        for n in NAMESPACES:
            ns_add(self.ns(n))
        for seg in ("fab", "inet"):
            ip(self.ns(seg), "link", "add", "br0", "type", "bridge")
            link_up(self.ns(seg), "br0")

        def plug(seg: str, host: str, dev: str, cidr: str) -> None:
            veth(self.ns(host), dev, self.ns(seg), host)
            ip(self.ns(seg), "link", "set", host, "master", "br0")
            addr_add(self.ns(host), dev, cidr)

        for host, a in (("w1", ".11"), ("w2", ".12"), ("g1", ".2"), ("g2", ".3")):
            plug("fab", host, "fabr0", f"10.200.0{a}/24")
        for host, a in (("o", "10"), ("g1", "2"), ("g2", "3")):
            plug("inet", host, "up0", f"203.0.113.{a}/24")
            addr_add(self.ns(host), "up0", f"2001:db8:f::{a}/64")
        route_add(self.ns("o"), APP_RANGE, VIP6)
        for k, (src, src6) in MACHINES.items():
            w, m = self.ns(f"w{k}"), self.ns(f"m{k}")
            veth(m, "eth0", w, f"m{k}")
            addr_add(m, "eth0", f"{src}/24")
            addr_add(m, "eth0", f"{src6}/64")
            route_add(m, "default", f"10.1.{k}.1")
            route_add(m, "default", f"fd00:{k}::1")
            addr_add(w, f"m{k}", f"10.1.{k}.1/24")
            addr_add(w, f"m{k}", f"fd00:{k}::1/64")
        # every host's files from the fleet file, as a fleet would ship them
        with open(f"{self.run_dir}/fleet.yaml", "w") as f:
            f.write(FLEET)
        r = self.agent(None, "fleet", "render", "-f", f"{self.run_dir}/fleet.yaml", "-o",
                       self.run_dir, "--state", f"{self.run_dir}/fleet-state", "--layout-root",
                       self.run_dir, "--json")
        for key, block in json.loads(r)["blocks"]["app"].items():
            w, ip_id = key.split()
            self.blocks[(int(w[1:]), ip_id)] = tuple(map(int, block.split("-")))  # type: ignore
        for h in HOSTS:  # the rendered set-up: forwarding, tunnels, conntrack's settings
            ns_exec(self.ns(h), ["sh", f"{self.run_dir}/{h}/tunnels.sh"])
            self.agent(h, "apply", "-c", f"{self.run_dir}/{h}/config.yaml")
        for g in ("g1", "g2"):
            # the gate is closed until keepalived says this host is the active one; the
            # lab's notify logs each transition, then runs the rendered one
            self.agent(g, "gateway", "backup", "-c", f"{self.run_dir}/{g}/config.yaml")
            d = f"{self.run_dir}/{g}"
            os.rename(f"{d}/notify", f"{d}/notify.rendered")
            with open(f"{d}/notify", "w") as f:
                f.write(f'#!/bin/sh\necho "$(date +%s.%N) {g} $1" >> {self.run_dir}/transitions\n'
                        f'exec {d}/notify.rendered "$@"\n')
            os.chmod(f"{d}/notify", 0o755)
        self._spawn("echo",
            nsenter_prefix(self.ns("o")) + [sys.executable, "-m", "egress_agent.lab.echo", "--tcp",
                                             f"{ORIGIN}:{PORT}", "--udp", f"{ORIGIN}:{PORT}",
                                             "--tcp", f"[{ORIGIN6}]:{PORT}",
                                             "--tcp", f"{ORIGIN}:{POLICY_PORT}"],
            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.procs["echo"].stdout.readline().strip() == "ready"
        # the origin counts what reaches the echo port from anyone but the app IP
        ns_exec(self.ns("o"), ["nft", "-f", "-"], input=(
            f"table inet {self.table} {{\n  counter leaked {{\n  }}\n"
            f"  chain input {{\n    type filter hook input priority 0;\n"
            f"    tcp dport {PORT} ip saddr != {APP_IP} counter name \"leaked\"\n"
            f"    tcp dport {PORT} ip6 saddr != {APP_RANGE} counter name \"leaked\"\n"
            f"    tcp dport {POLICY_PORT} ip saddr != {PARTNER_IP} counter name \"leaked\"\n"
            f"  }}\n}}\n"))
        for g in ("g1", "g2"):
            self.start_conntrackd(g)
        for g in ("g1", "g2"):
            self.start_keepalived(g)
        self.wait_any_active()

    def wait_any_active(self, timeout: float = 15.0) -> str:
        """The gateway that holds the app IP with its gate open, once one does
        (nopreempt: whichever times out first, g1 usually: its higher priority
        shortens its wait)."""
        deadline = time.monotonic() + timeout
        while True:
            for g in ("g1", "g2"):
                if self.holds_app_ip(g) and self.gate_open(g):
                    return g
            assert time.monotonic() < deadline, self.transitions()
            time.sleep(0.05)

    def agent(self, g: str | None, *args: str) -> str:
        """`egress-agent ARGS` in host `g`'s namespace (None: here)."""
        p = subprocess.run((nsenter_prefix(self.ns(g)) if g else []) + [
            sys.executable, "-m", "egress_agent.cli", *args],
            capture_output=True, text=True, timeout=60, cwd="/")
        assert p.returncode == 0, f"egress-agent {' '.join(args)} in {g}: {p.stdout}{p.stderr}"
        return p.stdout

    def gate_open(self, g: str) -> bool:
        return ns_exec(self.ns(g), ["nft", "list", "table", "inet", "egress_agent_gate"],
                       check=False).returncode != 0

    def start_conntrackd(self, g: str) -> None:
        d = f"{self.run_dir}/{g}"
        self._spawn(f"{g}-ct",
            nsenter_prefix(self.ns(g)) + ["conntrackd", "-C", f"{d}/conntrackd.conf"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{d}/conntrackd.ctl"):
            assert time.monotonic() < deadline, open(f"{d}/conntrackd.log").read()
            time.sleep(0.05)

    def start_keepalived(self, g: str) -> None:
        d = f"{self.run_dir}/{g}"
        self._spawn(f"{g}-ka",
            nsenter_prefix(self.ns(g)) + [
                "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
                "-f", f"{d}/keepalived.conf", "-p", f"{d}/keepalived.pid",
                "-r", f"{d}/vrrp.pid"],
            stdout=open(f"{d}/keepalived.log", "a"), stderr=subprocess.STDOUT)

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        """Start `cmd`, and note its pid in PIDS: a lab kept up (`lab pair --keep`) is
        taken down later by another process, which stops these and nothing else."""
        self.procs[name] = p = subprocess.Popen(cmd, **kw)
        pids = self._pids()
        pids[name] = p.pid
        with open(f"{self.run_dir}/{PIDS}", "w") as f:
            json.dump(pids, f)
        return p

    def _pids(self) -> dict[str, int]:
        return read_pids(self.run_dir)

    def start_daemon(self, h: str) -> None:
        """`egress-agent run` on host `h` (its probe watches the pair)."""
        self._spawn(f"{h}-agent",
            nsenter_prefix(self.ns(h)) + [sys.executable, "-m", "egress_agent.cli", "run", "-c",
                                          f"{self.run_dir}/{h}/config.yaml", "--metrics", "off",
                                          "--log-format", "json"],
            cwd="/", stdout=subprocess.DEVNULL, stderr=open(f"{self.run_dir}/{h}/agent.log", "w"))

    def app_ip_usable(self, h: str, ip_id: str = "app-ip") -> bool | None:
        """IPv4Usable of `ip_id` as the daemon on `h` last synced it (its status.json);
        None before its first sync."""
        try:
            with open(f"{self.run_dir}/{h}/state/status.json") as f:
                c = json.load(f)["conditions"].get(f"egress_ip/{ip_id}/IPv4Usable")
        except (OSError, ValueError, KeyError):
            return None
        return None if c is None else c["status"]

    def wait_usable(self, h: str, want: bool, timeout: float = 10.0) -> float:
        """Seconds until the daemon on `h` has the app IP usable (or not)."""
        t0 = time.monotonic()
        while self.app_ip_usable(h) is not want:
            assert time.monotonic() - t0 < timeout, \
                f"the daemon on {h} did not see the app IP usable={want}\n{self.transitions()}"
            time.sleep(0.01)
        return time.monotonic() - t0

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def holds_app_ip(self, g: str) -> bool:
        return APP_IP in ip(self.ns(g), "-4", "addr", "show", "dev", "up0").stdout

    def wait_active(self, g: str, timeout: float = 15.0) -> None:
        """`g` holds the app IP and its notify script has opened the gate."""
        deadline = time.monotonic() + timeout
        while True:
            if self.holds_app_ip(g) and self.gate_open(g):
                return
            assert time.monotonic() < deadline, self.transitions()
            time.sleep(0.05)

    def transitions(self) -> str:
        try:
            return open(f"{self.run_dir}/transitions").read()
        except FileNotFoundError:
            return ""

    def leaked(self) -> int:
        out = ns_exec(self.ns("o"), ["nft", "list", "counter", "inet", self.table, "leaked"]).stdout
        return int(out.split("packets")[1].split()[0])

    def hold(self, k: int, timeout: float = 5.0, family: int = 4,
             port: int = PORT) -> HeldConnection:
        return HeldConnection(ORIGIN6 if family == 6 else ORIGIN, port, timeout=timeout,
                              prefix=nsenter_prefix(self.ns(f"m{k}")))

    def expected(self, k: int, family: int = 4, ip_id: str = "app-ip") -> str:
        """What the origin should see of machine k: the IP and its block, or the
        IPv6 address its block fixes (the range's address at offset LO)."""
        lo, hi = self.blocks[(k, ip_id)]
        if family == 6:
            return str(ipaddress.IPv6Network(APP_RANGE)[lo])
        return f"{PARTNER_IP if ip_id == 'partner-ip' else APP_IP}:{lo}-{hi}"

    def down(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        # a lab another process kept up: its processes by their recorded pids, each
        # only while it still runs in one of this lab's namespaces (a pid reused since
        # is somebody else's)
        ours = {self._netns_id(n) for n in NAMESPACES} - {None}

        def running() -> list[int]:
            out = []
            for pid in self._pids().values():
                try:
                    if os.stat(f"/proc/{pid}/ns/net").st_ino in ours:
                        out.append(pid)
                except OSError:
                    pass
            return out

        for pid in running():
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (left := running()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for n in NAMESPACES:
            if os.path.exists(f"/run/netns/{self.ns(n)}"):
                ns_del(self.ns(n))
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _netns_id(self, n: str) -> int | None:
        try:
            return os.stat(f"/run/netns/{self.ns(n)}").st_ino
        except OSError:
            return None


def read_pids(run_dir: str) -> dict[str, int]:
    """What a lab noted in its run dir's PIDS: name -> pid ({} if nothing)."""
    try:
        with open(f"{run_dir}/{PIDS}") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def demo(prefix: str, say=print, keep: bool = False) -> list[dict]:
    """`egress-agent lab pair`: build the pair lab, compare what the origin sees of
    each machine with the fleet's blocks, stop the active gateway's keepalived with
    a connection held from each machine, compare again through the other gateway,
    cut both gateways off (the daemon on w1 drops m1's traffic), bring them back,
    and remove the lab (with `keep`, leave it up). One row per check: what,
    expected, observed, ok."""
    lab = PairLab(prefix)
    rows: list[dict] = []
    if os.path.exists(lab.run_dir) or os.path.exists(f"/run/netns/{lab.ns('o')}"):
        raise FileExistsError(f"a lab named {prefix!r} is up ({lab.run_dir}): give another "
                              f"--prefix, or remove it (egress-agent lab pair --down --prefix {prefix})")

    def row(what: str, k: int, fam: int, seen: Seen | None, held: Seen | None = None,
            ip_id: str = "app-ip") -> None:
        ok = seen is not None and in_block(lab, seen, k, fam, ip_id) and (held is None or seen == held)
        rows.append({"check": what, "expected": lab.expected(k, fam, ip_id)
                     + (f" (= port {held.port})" if held else ""),
                     "observed": (f"[{seen.address}]:{seen.port}" if ":" in seen.address
                                  else f"{seen.address}:{seen.port}") if seen else "no answer",
                     "ok": ok})
        say(f"{what:44} {rows[-1]['expected']:40} {rows[-1]['observed']:28} "
            f"{'yes' if ok else 'NO'}")

    say(f"building the pair lab {prefix} (namespaces {prefix}-*) from its fleet file ...")
    try:
        lab.up()
        active = "g1" if lab.holds_app_ip("g1") else "g2"
        other = "g2" if active == "g1" else "g1"
        say(f"{'CHECK':44} {'EXPECTED (the fleet blocks)':40} {'OBSERVED':28} MATCH")
        held = {(k, fam): lab.hold(k, family=fam) for k in MACHINES for fam in (4, 6)}
        for (k, fam), h in held.items():
            row(f"m{k} on w{k}, tcp IPv{fam}, through {active}", k, fam, h.first)
        lab.stop(f"{active}-ka")
        lab.wait_active(other)
        for (k, fam), h in held.items():
            row(f"m{k} held IPv{fam}, after {active} stopped", k, fam, h.ping(), h.first)
            h.close()
        lab.start_keepalived(active)  # it rejoins as the standby (nopreempt)
        for k in MACHINES:
            with lab.hold(k) as h:
                row(f"m{k} on w{k}, new tcp IPv4, through {other}", k, 4, h.first)
            with lab.hold(k, port=POLICY_PORT) as h:
                row(f"m{k} tcp :{POLICY_PORT} (policy to-partner)", k, 4, h.first,
                    ip_id="partner-ip")
        # both gateways cut off: w1's daemon finds the pair unreachable (its probe) and
        # m1 falls back to `unavailable: drop`: nothing leaves
        lab.start_daemon("w1")
        lab.wait_usable("w1", True)
        for g in ("g1", "g2"):
            ip(lab.ns(g), "link", "set", "fabr0", "down")
        took = lab.wait_usable("w1", False)
        try:
            lab.hold(1, timeout=1.0).close()
            seen = "an answer"
        except ConnectionError:
            seen = "no answer"
        for g in ("g1", "g2"):
            link_up(lab.ns(g), "fabr0")
        rows.append({"check": "m1, both gateways cut off (drop fallback)",
                     "expected": "no answer (dropped on w1)",
                     "observed": f"{seen} (unusable after {took * 1000:.0f} ms)",
                     "ok": seen == "no answer"})
        say(f"{rows[-1]['check']:44} {rows[-1]['expected']:40} {rows[-1]['observed']:28} "
            f"{'yes' if rows[-1]['ok'] else 'NO'}")
        leaked = lab.leaked()
        rows.append({"check": "packets at the origin from another source",
                     "expected": "0", "observed": str(leaked), "ok": leaked == 0})
        say(f"{rows[-1]['check']:44} {'0':40} {rows[-1]['observed']:28} "
            f"{'yes' if rows[-1]['ok'] else 'NO'}")
        if keep:
            lab.wait_any_active()  # VRRP elects again after the cut
            say(f"\nthe lab stays up: namespaces {prefix}-*, files in {lab.run_dir}; "
                f"egress-agent lab pair --down --prefix {prefix} removes it")
    except BaseException:
        keep = False
        raise
    finally:
        if not keep:
            lab.down()
    return rows


def in_block(lab: PairLab, seen: Seen, k: int, family: int = 4, ip_id: str = "app-ip") -> bool:
    if family == 6:
        return seen.address == lab.expected(k, 6)
    lo, hi = lab.blocks[(k, ip_id)]
    return seen.address == (PARTNER_IP if ip_id == "partner-ip" else APP_IP) \
        and lo <= seen.port <= hi
