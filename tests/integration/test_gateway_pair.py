"""A gateway pair keeps held connections across a failover (issue 13, first step).

Real keepalived and conntrackd run with the files egress_agent.pair renders, in
namespaces: two workload hosts send their machines' traffic untranslated over
VXLAN to the pair's fabric address; the active gateway translates each machine
to its fixed port block on the app IP. The echo server at the origin judges:
every held connection goes on from the same address and port after the active
gateway fails, and no packet reaches the origin from any other source.

The lab is egress_agent/lab/pairlab.py. Each gateway runs the agent with
`host.role: gateway` (`GATEWAY_CONFIG`): the
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
import subprocess
import sys
import time

import pytest

from egress_agent.lab.netns import ip, link_up, ns_exec
from egress_agent.lab.pairlab import APP_IP, HOSTS, MACHINES, PairLab, in_block

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pair_lab():
    subprocess.run([os.path.join(ROOT, "scripts", "install-deps"), "keepalived", "conntrackd"],
                   check=True)
    lab = PairLab("gp" + secrets.token_hex(2), "/run/egress-agent-test")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def fail_over(lab: PairLab, fail, restore) -> None:
    """Hold an IPv4 and an IPv6 connection from each workload host, fail the active
    gateway, and check that all go on from the same address and port through the other."""
    active = "g1" if lab.holds_app_ip("g1") else "g2"
    other = "g2" if active == "g1" else "g1"
    assert lab.gate_open(active) and not lab.gate_open(other), lab.transitions()
    held = {(k, fam): lab.hold(k, family=fam) for k in MACHINES for fam in (4, 6)}
    try:
        for (k, fam), h in held.items():
            assert in_block(lab, h.first, k, fam), (fam, h.first)
            assert h.ping() == h.first
        fail(active)
        lab.wait_active(other)
        for h in held.values():
            assert h.ping() == h.first, f"a held connection broke in the failover\n" \
                                        f"{lab.transitions()}"
        for k in MACHINES:  # a new connection through the new active gateway: the same block
            with lab.hold(k) as h:
                assert in_block(lab, h.first, k), h.first
        restore(active)
        time.sleep(1.0)  # the returning gateway resyncs; it does not take the IP back
        assert lab.holds_app_ip(other) and not lab.holds_app_ip(active), lab.transitions()
        assert not lab.gate_open(active), "the returning standby's gate is open"
        for g, role in ((other, "primary"), (active, "backup")):  # as status tells it
            st = json.loads(lab.agent(g, "status", "-c", f"{lab.run_dir}/{g}/config.yaml",
                                      "--json"))
            assert st["gateway"]["role"] == role, (g, st["gateway"], lab.transitions())
        for h in held.values():
            assert h.ping() == h.first, f"broke when {active} returned\n{lab.transitions()}"
    finally:
        for h in held.values():
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

    def reason() -> str:
        st = json.loads(lab.agent("w1", "status", "-c", config, "--json"))
        ip = next(i for i in st["egress_ips"] if i["id"] == "app-ip")
        return next(c for c in ip["conditions"] if c["type"] == "IPv4Usable")["reason"]

    for h in HOSTS:  # the rendered set-up runs again (at boot, after a render) unharmed
        ns_exec(lab.ns(h), ["sh", f"{lab.run_dir}/{h}/tunnels.sh"])
    lab.start_daemon("w1")
    try:
        lab.wait_usable("w1", True)
        leaked = lab.leaked()
        for g in ("g1", "g2"):
            ip(lab.ns(g), "link", "set", "fabr0", "down")
        lab.wait_usable("w1", False, timeout=5.0)  # 0.6 s of probes and a sync (bench/gateway.py)
        assert reason() == "GatewayUnreachable", reason()
        with pytest.raises(ConnectionError):  # dropped on the workload host
            lab.hold(1, timeout=1.0)
        for g in ("g1", "g2"):
            link_up(lab.ns(g), "fabr0")
        lab.wait_usable("w1", True, timeout=15.0)
        active = next(g for g in ("g1", "g2") if lab.holds_app_ip(g))
        lab.wait_active(active)
        with lab.hold(1) as h:
            assert in_block(lab, h.first, 1), h.first
        assert lab.leaked() == leaked
    finally:
        lab.stop("w1-agent")


def test_lab_pair_demo_matches_the_fleets_blocks_across_a_failover() -> None:
    """`egress-agent lab pair`: expected against observed, as a new user runs it; with
    --keep the lab stays up and works, and --down removes it and its processes."""
    prefix = "gd" + secrets.token_hex(2)

    def lab(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "egress_agent.cli", "lab", "pair", "--prefix",
                               prefix, *args], capture_output=True, text=True, timeout=180, cwd="/")

    p = lab("--json", "--keep")
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        rows = json.loads(p.stdout)
        assert len(rows) == 14 and all(r["ok"] for r in rows), rows
        assert sum("IPv6" in r["check"] for r in rows) == 4
        assert sum("policy" in r["check"] for r in rows) == 2
        kept = PairLab(prefix)
        assert kept.holds_app_ip("g1") != kept.holds_app_ip("g2")
        with kept.hold(1) as h:  # still serving, from the app IP
            assert h.first.address == APP_IP, h.first
        assert lab("--json").returncode == 2  # it refuses to build over a lab that is up
    finally:
        down = lab("--down")
    assert down.returncode == 0, down.stderr
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-")]
    left = subprocess.run(["pgrep", "-f", prefix], capture_output=True, text=True).stdout.split()
    assert left == [], left  # keepalived, conntrackd, the echo server and the daemon: gone
