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

import os
import shutil
import signal
import subprocess
import sys
import time

from .echo import HeldConnection, Seen
from .netns import addr_add, ip, link_up, ns_add, ns_del, ns_exec, ns_sysctl, nsenter_prefix, \
    route_add, veth
from ..pair import Member, Pair, conntrackd_conf, keepalived_conf

APP_IP, FABRIC_VIP, ORIGIN, PORT = "203.0.113.140", "10.200.0.100", "203.0.113.10", 7000
# machine k on workload host wk: source, VNI, fixed block on the app IP
MACHINES = {1: ("10.1.1.2", 101, (20480, 21503)), 2: ("10.1.2.2", 102, (12288, 13311))}

# No learning: a frame from the standby (its IPv6 link-local traffic when its
# link returns) would teach the workload host's VXLAN to send to the standby's
# own address instead of the pair's. No IPv6 link-local address: nothing to send.
QUIET = ("nolearning",)

# the same on both gateways but the host's name and state dir: the blocks are
# fixed (MACHINES), as the fleet's allocation would write them into both
GATEWAY_CONFIG = """version: 1
host: {{name: {g}, region: lab, role: gateway}}
state_dir: {run}/{g}/state
defaults: {{ports_per_workload: 1024, unavailable: drop}}
egress_ips:
  - {{id: app-ip, app: app, ipv4: {app}}}
workloads:
  - {{id: m1, app: app, source: [{s1}], interface: w1, blocks: {{app-ip: "{b1}"}}}}
  - {{id: m2, app: app, source: [{s2}], interface: w2, blocks: {{app-ip: "{b2}"}}}}
managed_sources: [10.1.0.0/16]
"""

# a workload host: its machine leaves through the pair, translated there
WORKLOAD_CONFIG = """version: 1
host: {{name: w{k}, region: lab}}
state_dir: {run}/w{k}/state
defaults: {{unavailable: drop}}
egress_ips:
  - {{id: app-ip, app: app, ipv4: {app}, remote: true, via: {{dev: gw0, gateway: 10.250.{k}.2}}}}
workloads:
  - {{id: m{k}, app: app, source: [{src}], interface: m{k}}}
managed_sources: [10.1.{k}.0/24]
"""

class PairLab:
    def __init__(self, prefix: str, run_root: str = "/run/egress-agent-lab"):
        self.prefix = prefix
        self.run_dir = f"{run_root}/{prefix}"
        self.table = f"{prefix}_origin"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pair = Pair(
            id="app", vrid=51, fabric="10.200.0.0/24",
            members=(Member("g1", "fabr0", "10.200.0.2", 150),
                     Member("g2", "fabr0", "10.200.0.3", 100)),
            vips=((f"{FABRIC_VIP}/24", "fabr0"), (f"{APP_IP}/24", "up0")), track=("up0",))

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def up(self) -> None:
        os.makedirs(self.run_dir, mode=0o755)
        for n in ("fab", "inet", "o", "w1", "w2", "g1", "g2", "m1", "m2"):
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
        for host, a in (("o", ".10"), ("g1", ".2"), ("g2", ".3")):
            plug("inet", host, "up0", f"203.0.113{a}/24")
        for k, (src, vni, _) in MACHINES.items():
            w, m = self.ns(f"w{k}"), self.ns(f"m{k}")
            veth(m, "eth0", w, f"m{k}")
            addr_add(m, "eth0", f"{src}/24")
            route_add(m, "default", f"10.1.{k}.1")
            addr_add(w, f"m{k}", f"10.1.{k}.1/24")
            ns_sysctl(w, "net.ipv4.ip_forward", 1)
            # the machine's traffic goes, untranslated, to the pair's fabric address
            ip(w, "link", "add", "gw0", "type", "vxlan", "id", str(vni), "remote", FABRIC_VIP,
               "local", f"10.200.0.1{k}", "dstport", "4789", "dev", "fabr0", *QUIET)
            ip(w, "link", "set", "gw0", "addrgenmode", "none")
            link_up(w, "gw0")
            addr_add(w, "gw0", f"10.250.{k}.1/30")
            d = f"{self.run_dir}/w{k}"
            os.makedirs(d, mode=0o755)
            with open(f"{d}/config.yaml", "w") as f:
                f.write(WORKLOAD_CONFIG.format(k=k, run=self.run_dir, app=APP_IP, src=src))
            self.agent(f"w{k}", "apply", "-c", f"{d}/config.yaml")
        for g in ("g1", "g2"):
            self._gateway(g)
        self.procs["echo"] = subprocess.Popen(
            nsenter_prefix(self.ns("o")) + [sys.executable, "-m", "egress_agent.lab.echo", "--tcp",
                                             f"{ORIGIN}:{PORT}", "--udp", f"{ORIGIN}:{PORT}"],
            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.procs["echo"].stdout.readline().strip() == "ready"
        # the origin counts what reaches the echo port from anyone but the app IP
        ns_exec(self.ns("o"), ["nft", "-f", "-"], input=(
            f"table ip {self.table} {{\n  counter leaked {{\n  }}\n"
            f"  chain input {{\n    type filter hook input priority 0;\n"
            f"    tcp dport {PORT} ip saddr != {APP_IP} counter name \"leaked\"\n  }}\n}}\n"))
        for g in ("g1", "g2"):
            self.start_conntrackd(g)
        for g in ("g1", "g2"):
            self.start_keepalived(g)
        # nopreempt: whichever times out first becomes active (g1 usually: its higher
        # priority shortens its wait)
        deadline = time.monotonic() + 15
        while not any(self.holds_app_ip(g) and self.gate_open(g) for g in ("g1", "g2")):
            assert time.monotonic() < deadline, self.transitions()
            time.sleep(0.05)

    def _gateway(self, g: str) -> None:
        ns = self.ns(g)
        ns_sysctl(ns, "net.ipv4.ip_forward", 1)
        for k, (src, vni, _) in MACHINES.items():
            dev = f"w{k}"
            ip(ns, "link", "add", dev, "type", "vxlan", "id", str(vni), "remote",
               f"10.200.0.1{k}", "dstport", "4789", "dev", "fabr0", *QUIET)
            # the same MAC on both gateways: the workload host's neighbour entry
            # for the tunnel's next hop stays right across a failover
            ip(ns, "link", "set", dev, "address", f"02:ea:00:00:00:0{k}", "addrgenmode", "none")
            link_up(ns, dev)
            addr_add(ns, dev, f"10.250.{k}.2/30")
            route_add(ns, f"10.1.{k}.0/24", f"10.250.{k}.1", dev)
        # a mid-stream packet before the replica is committed is INVALID, not new
        ns_sysctl(ns, "net.netfilter.nf_conntrack_tcp_loose", 0)
        d = f"{self.run_dir}/{g}"
        os.makedirs(d, mode=0o755)
        with open(f"{d}/config.yaml", "w") as f:
            f.write(GATEWAY_CONFIG.format(
                g=g, run=self.run_dir, app=APP_IP, s1=MACHINES[1][0], s2=MACHINES[2][0],
                **{f"b{k}": "%d-%d" % MACHINES[k][2] for k in MACHINES}))
        # the gate is closed until keepalived says this host is the active one
        self.agent(g, "apply", "-c", f"{d}/config.yaml")
        self.agent(g, "gateway", "backup", "-c", f"{d}/config.yaml")
        # keepalived's notify: the agent's script, and a line in `transitions` each time
        script = self.agent(g, "gateway", "script", "-c", f"{d}/config.yaml",
                            "--conntrackd-config", f"{d}/conntrackd.conf")
        notify = f"{d}/notify"
        with open(notify, "w") as f:
            f.write(script.replace("rc=0\n", f'rc=0\necho "$(date +%s.%N) {g} $1" >> '
                                              f'{self.run_dir}/transitions\n', 1))
        os.chmod(notify, 0o755)
        with open(f"{d}/conntrackd.conf", "w") as f:
            f.write(conntrackd_conf(self.pair, g, d))
        with open(f"{d}/keepalived.conf", "w") as f:
            f.write(keepalived_conf(self.pair, g, notify))

    def agent(self, g: str, *args: str) -> str:
        p = subprocess.run(nsenter_prefix(self.ns(g)) + [sys.executable, "-m", "egress_agent.cli",
                                                         *args],
                           capture_output=True, text=True, timeout=60, cwd="/")
        assert p.returncode == 0, f"egress-agent {' '.join(args)} in {g}: {p.stdout}{p.stderr}"
        return p.stdout

    def gate_open(self, g: str) -> bool:
        return ns_exec(self.ns(g), ["nft", "list", "table", "inet", "egress_agent_gate"],
                       check=False).returncode != 0

    def start_conntrackd(self, g: str) -> None:
        d = f"{self.run_dir}/{g}"
        self.procs[f"{g}-ct"] = subprocess.Popen(
            nsenter_prefix(self.ns(g)) + ["conntrackd", "-C", f"{d}/conntrackd.conf"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{d}/conntrackd.ctl"):
            assert time.monotonic() < deadline, open(f"{d}/conntrackd.log").read()
            time.sleep(0.05)

    def start_keepalived(self, g: str) -> None:
        d = f"{self.run_dir}/{g}"
        self.procs[f"{g}-ka"] = subprocess.Popen(
            nsenter_prefix(self.ns(g)) + [
                "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
                "-f", f"{d}/keepalived.conf", "-p", f"{d}/keepalived.pid",
                "-r", f"{d}/vrrp.pid"],
            stdout=open(f"{d}/keepalived.log", "a"), stderr=subprocess.STDOUT)

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
        out = ns_exec(self.ns("o"), ["nft", "list", "counter", "ip", self.table, "leaked"]).stdout
        return int(out.split("packets")[1].split()[0])

    def hold(self, k: int, timeout: float = 5.0) -> HeldConnection:
        return HeldConnection(ORIGIN, PORT, timeout=timeout, prefix=nsenter_prefix(self.ns(f"m{k}")))

    def down(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for n in ("fab", "inet", "o", "w1", "w2", "g1", "g2", "m1", "m2"):
            ns_del(self.ns(n))
        shutil.rmtree(self.run_dir, ignore_errors=True)


def in_block(seen: Seen, k: int) -> bool:
    lo, hi = MACHINES[k][2]
    return seen.address == APP_IP and lo <= seen.port <= hi
