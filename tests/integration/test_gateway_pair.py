"""A gateway pair keeps held connections across a failover (issue 13, first step).

Real keepalived and conntrackd run with the files egress_agent.pair renders, in
namespaces: two workload hosts send their machines' traffic untranslated over
VXLAN to the pair's fabric address; the active gateway translates each machine
to its fixed port block on the app IP. The echo server at the origin judges:
every held connection goes on from the same address and port after the active
gateway fails, and no packet reaches the origin from any other source.

Each gateway runs the agent with `host.role: gateway` (`GATEWAY_CONFIG`): the
machines are remote workloads bound to their tunnel's interface, translated to
the same blocks on both gateways, and keepalived's notify is `egress-agent
gateway primary|backup|fault`, which commits conntrackd's replica and opens or
closes the gate. Each workload host runs the agent too (`WORKLOAD_CONFIG`): the
app IP is `remote`, so its machine's traffic is marked and routed, untranslated,
into the tunnel to the pair (the IP's `via`). The tunnels themselves are the
test's (the hosts' network set-up, as an operator's would be).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import shutil
import signal
import subprocess
import time

import pytest

from egress_agent.lab.echo import HeldConnection, Seen
from egress_agent.lab.netns import (
    addr_add, ip, link_up, ns_add, ns_del, ns_exec, ns_sysctl, nsenter_prefix, route_add, veth,
)
from egress_agent.pair import Member, Pair, conntrackd_conf, keepalived_conf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP_IP, FABRIC_VIP, ORIGIN, PORT = "203.0.113.140", "10.200.0.100", "203.0.113.10", 7000
# machine k on workload host wk: source, VNI, fixed block on the app IP
MACHINES = {1: ("10.1.1.2", 101, (10240, 11263)), 2: ("10.1.2.2", 102, (11264, 12287))}

# No learning: a frame from the standby (its IPv6 link-local traffic when its
# link returns) would teach the workload host's VXLAN to send to the standby's
# own address instead of the pair's. No IPv6 link-local address: nothing to send.
QUIET = ("nolearning",)

# the same on both gateways but the host's name and state dir; the blocks follow
# from the order of the workloads and the port range (MACHINES)
GATEWAY_CONFIG = """version: 1
host: {{name: {g}, region: lab, role: gateway}}
state_dir: {run}/{g}/state
defaults: {{port_range: 10240-65535, ports_per_workload: 1024, unavailable: drop}}
egress_ips:
  - {{id: app-ip, app: app, ipv4: {app}}}
workloads:
  - {{id: m1, app: app, source: [{s1}], interface: w1}}
  - {{id: m2, app: app, source: [{s2}], interface: w2}}
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

# keepalived's notify: the agent takes the role; the log says when
NOTIFY = """#!/bin/sh
echo "$(date +%s.%N) $1 $2" >> {run}/transitions
exec {python} -m egress_agent.cli gateway "$2" -c {run}/$1/config.yaml \\
  --conntrackd-config {run}/$1/conntrackd.conf >> {run}/$1/notify.log 2>&1
"""


class PairLab:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.run_dir = f"/run/egress-agent-test/{prefix}"
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
            nsenter_prefix(self.ns("o")) + ["python3", "-m", "egress_agent.lab.echo", "--tcp",
                                             f"{ORIGIN}:{PORT}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
            f.write(GATEWAY_CONFIG.format(g=g, run=self.run_dir, app=APP_IP, s1=MACHINES[1][0],
                                          s2=MACHINES[2][0]))
        # the gate is closed until keepalived says this host is the active one
        self.agent(g, "apply", "-c", f"{d}/config.yaml")
        self.agent(g, "gateway", "backup", "-c", f"{d}/config.yaml")
        notify = f"{self.run_dir}/notify"
        if not os.path.exists(notify):
            with open(notify, "w") as f:
                f.write(NOTIFY.format(run=self.run_dir, python=sys.executable))
            os.chmod(notify, 0o755)
        with open(f"{d}/conntrackd.conf", "w") as f:
            f.write(conntrackd_conf(self.pair, g, d))
        with open(f"{d}/keepalived.conf", "w") as f:
            f.write(keepalived_conf(self.pair, g, f"{notify} {g}"))

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


@pytest.fixture(scope="module")
def pair_lab():
    subprocess.run([os.path.join(ROOT, "scripts", "install-deps"), "keepalived", "conntrackd"],
                   check=True)
    lab = PairLab("gp" + secrets.token_hex(2))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def in_block(seen: Seen, k: int) -> bool:
    lo, hi = MACHINES[k][2]
    return seen.address == APP_IP and lo <= seen.port <= hi


def fail_over(lab: PairLab, fail, restore) -> None:
    """Hold one connection from each workload host, fail the active gateway,
    and check that both go on from the same address and port through the other."""
    active = "g1" if lab.holds_app_ip("g1") else "g2"
    other = "g2" if active == "g1" else "g1"
    assert lab.gate_open(active) and not lab.gate_open(other), lab.transitions()
    held = [lab.hold(1), lab.hold(2)]
    try:
        for k, h in enumerate(held, 1):
            assert in_block(h.first, k), h.first
            assert h.ping() == h.first
        fail(active)
        lab.wait_active(other)
        for h in held:
            assert h.ping() == h.first, f"a held connection broke in the failover\n" \
                                        f"{lab.transitions()}"
        for k in MACHINES:  # a new connection through the new active gateway: the same block
            with lab.hold(k) as h:
                assert in_block(h.first, k), h.first
        restore(active)
        time.sleep(1.0)  # the returning gateway resyncs; it does not take the IP back
        assert lab.holds_app_ip(other) and not lab.holds_app_ip(active), lab.transitions()
        assert not lab.gate_open(active), "the returning standby's gate is open"
        for h in held:
            assert h.ping() == h.first, f"broke when {active} returned\n{lab.transitions()}"
    finally:
        for h in held:
            h.close()
    assert lab.leaked() == 0, "a packet reached the origin from another source"


def test_links_down_on_the_active_gateway(pair_lab: PairLab) -> None:
    def fail(g):
        ip(pair_lab.ns(g), "link", "set", "fabr0", "down")
        ip(pair_lab.ns(g), "link", "set", "up0", "down")

    def restore(g):
        link_up(pair_lab.ns(g), "fabr0")
        link_up(pair_lab.ns(g), "up0")

    fail_over(pair_lab, fail, restore)


def test_keepalived_stopped_on_the_active_gateway(pair_lab: PairLab) -> None:
    for _ in range(2):  # both directions: g1 → g2 and back
        fail_over(pair_lab, lambda g: pair_lab.stop(f"{g}-ka"), pair_lab.start_keepalived)


def test_both_gateways_unreachable_make_the_ip_unusable_and_one_back_restores_it(
        pair_lab: PairLab) -> None:
    """The daemon on a workload host probes its pair (probe.py): with both gateways
    cut off the app IP is unusable within a second (status: GatewayUnreachable) and
    its machine's traffic is dropped there (`unavailable: drop`); one gateway back
    and the IP is usable again, new connections get their block."""
    lab, config = pair_lab, f"{pair_lab.run_dir}/w1/config.yaml"

    def usable() -> dict:
        st = json.loads(lab.agent("w1", "status", "-c", config, "--json"))
        ip = next(i for i in st["egress_ips"] if i["id"] == "app-ip")
        return next(c for c in ip["conditions"] if c["type"] == "IPv4Usable")

    def wait(want: bool, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        while usable()["status"] is not want:
            assert time.monotonic() - t0 < timeout, (usable(), lab.transitions())
            time.sleep(0.05)
        return time.monotonic() - t0

    daemon = subprocess.Popen(
        nsenter_prefix(lab.ns("w1")) + [sys.executable, "-m", "egress_agent.cli", "run", "-c",
                                        config, "--metrics", "off", "--log-format", "json"],
        cwd="/", stdout=subprocess.DEVNULL, stderr=open(f"{lab.run_dir}/w1/agent.log", "w"))
    try:
        wait(True)
        leaked = lab.leaked()
        for g in ("g1", "g2"):
            ip(lab.ns(g), "link", "set", "fabr0", "down")
        wait(False)  # 0.6 s of probes and a sync (bench/gateway.py measures it)
        assert usable()["reason"] == "GatewayUnreachable", usable()
        with pytest.raises(ConnectionError):  # dropped on the workload host
            lab.hold(1, timeout=1.0)
        for g in ("g1", "g2"):
            link_up(lab.ns(g), "fabr0")
        wait(True, timeout=15.0)
        active = next(g for g in ("g1", "g2") if lab.holds_app_ip(g))
        lab.wait_active(active)
        with lab.hold(1) as h:
            assert in_block(h.first, 1), h.first
        assert lab.leaked() == leaked
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
