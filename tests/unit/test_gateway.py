"""A gateway host (host.role: gateway): its IPs are usable whether or not it holds
their addresses, its egress addresses are in gw_egress4/6, and keepalived's notify
(`egress-agent gateway`) runs conntrackd's commands around the gate in order."""

from __future__ import annotations

import subprocess

import pytest

from egress_agent import names
from egress_agent.alloc import Allocations, allocate
from egress_agent.config import parse
from egress_agent.gateway import gate_batch, read_role, set_role
from egress_agent.hoststate import HostFacts, HostState, usable_from
from egress_agent.plan import build

CONFIG = """version: 1
host: {{name: g1, region: lab{role}}}
state_dir: {state}
egress_ips:
  - {{id: app-ip, app: app, ipv4: 203.0.113.140, ipv6: "2001:db8:140::/64"}}
workloads:
  - {{id: m1, app: app, source: [10.1.1.2], interface: w1}}
  - {{id: m2, app: app, source: [10.1.2.2, "fd00:2::2"], interface: w2}}
managed_sources: [10.1.0.0/16, "fd00::/16"]
"""


def cfg(tmp_path, role=", role: gateway"):
    return parse(CONFIG.format(role=role, state=tmp_path / "state"), "g1.yaml").config


def test_a_gateways_ips_are_usable_without_their_addresses_and_nothing_answers_on_them(tmp_path):
    bare = HostState(addresses=frozenset(), links_up=frozenset())
    for c, usable in ((cfg(tmp_path), True), (cfg(tmp_path, ""), False)):
        u = usable_from(c, bare)
        assert (u.ok(c.ip("app-ip"), 4), u.ok(c.ip("app-ip"), 6)) == (usable, usable)
        a, _ = allocate(c, Allocations(), u)
        el = build(c, a, HostFacts(usable=u)).desired.elements
        gw = (el[names.GATEWAY_SET[4]], el[names.GATEWAY_SET[6]])
        assert bool(gw[0]) == bool(gw[1]) == usable, gw


def test_the_gate_closed_drops_new_connections_of_workloads_and_open_is_no_table():
    closed = gate_batch(closed=True)
    assert closed.startswith("add table inet egress_agent_gate\ndelete table inet egress_agent_gate\n")
    assert "priority mangle + 5;" in closed  # after the agent's classification (mangle)
    assert "ct state new meta mark & 0x000fffff != 0 counter drop" in closed
    assert gate_batch(closed=False) == (
        "add table inet egress_agent_gate\ndelete table inet egress_agent_gate\n")


@pytest.mark.parametrize("role, order", [
    ("primary", ["-c", "nft open", "-f", "-R", "-B"]),
    ("backup", ["nft closed", "-n"]),
    ("fault", ["nft closed", "-n"]),
])
def test_conntrackd_commands_go_around_the_gate_in_order(tmp_path, role, order):
    seen: list[str] = []

    def run(cmd, **kw):
        assert cmd[:3] == ["conntrackd", "-C", "/etc/ctd.conf"]
        seen.append(cmd[3])
        return subprocess.CompletedProcess(cmd, 1 if cmd[3] == "-B" else 0, "", "no peer")

    def nft(batch):
        seen.append("nft closed" if "drop" in batch else "nft open")

    problems = set_role(str(tmp_path / "state"), role, nft, "/etc/ctd.conf", run=run)
    assert seen == order
    assert problems == (["conntrackd -C /etc/ctd.conf -B exited 1: no peer"]
                        if role == "primary" else [])
    assert read_role(str(tmp_path / "state"))["role"] == role


def test_without_conntrackd_only_the_gate_changes(tmp_path):
    batches: list[str] = []
    assert set_role(str(tmp_path / "state"), "backup", batches.append, None,
                    run=lambda *a, **k: pytest.fail("conntrackd ran")) == []
    assert len(batches) == 1 and "drop" in batches[0]


def test_the_gateway_command_refuses_a_host_that_is_no_gateway(tmp_path, capsys):
    from egress_agent import cli
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(role="", state=tmp_path / "state"))
    args = cli.parser().parse_args(["gateway", "primary", "-c", str(path)])
    assert cli.cmd_gateway(args) == cli.Exit.INVALID
    assert "host.role is 'workload', not 'gateway'" in capsys.readouterr().err


def test_teardown_removes_the_gate_with_the_table(tmp_path):
    from egress_agent.nft.fake import FakeNft
    from egress_agent.reconcile import Reconciler
    from egress_agent.routing.fake import FakeRouting
    from egress_agent.store import Store
    c, nft = cfg(tmp_path), FakeNft()
    rec = Reconciler(nft, FakeRouting(), Store(c.state_dir),
                     lambda: HostState(addresses=frozenset(), links_up=frozenset()))
    rec.sync(c, full=True)
    set_role(c.state_dir, "backup", nft.run)
    assert nft.table is not None and "drop" in nft.gate
    rec.teardown()
    assert nft.table is None and nft.gate is None
    rec.teardown()  # nothing left: still fine


def test_a_remote_ip_is_routed_to_its_gateway_untranslated(tmp_path):
    text = CONFIG.format(role="", state=tmp_path / "state").replace(
        'ipv6: "2001:db8:140::/64"}', 'ipv6: "2001:db8:140::/64", remote: true, '
        'via: {dev: gw0, gateway: 10.250.1.2}}')
    c = parse(text, "w1.yaml").config
    up = HostState(addresses=frozenset(), links_up=frozenset({"gw0"}))
    u = usable_from(c, up)
    assert u.ok(c.ip("app-ip"), 4) and u.ok(c.ip("app-ip"), 6)  # no address here: the pair's
    assert not usable_from(c, HostState(addresses=frozenset(), links_up=frozenset())).ok(
        c.ip("app-ip"), 4)  # its tunnel down
    a, _ = allocate(c, Allocations(), u)
    d = build(c, a, HostFacts(usable=u)).desired
    assert d.elements[names.UNTRANSLATED_SET] == {(a.eids["app-ip"] << names.EID_SHIFT, None)}
    assert {(r.family, r.dev, r.gateway) for r in d.routes} == {(4, "gw0", "10.250.1.2"),
                                                                 (6, "gw0", None)}


@pytest.mark.parametrize("edit, message", [
    (", remote: true}", "egress_ips[0].remote: a remote IP is reached through its gateway"),
    (", remote: true, via: {dev: gw0, gateway: 10.250.1.2}}",
     "egress_ips[0].remote: a gateway host translates its IPs itself"),
])
def test_remote_needs_via_and_a_workload_host(tmp_path, edit, message):
    from egress_agent.config import ConfigError
    text = CONFIG.format(role=", role: gateway", state=tmp_path / "s").replace(
        '"2001:db8:140::/64"}', '"2001:db8:140::/64"' + edit)
    with pytest.raises(ConfigError) as e:
        parse(text, "w1.yaml")
    assert any(message in str(p) for p in e.value.problems), e.value.problems


def test_the_notify_script_does_what_set_role_does_in_the_same_order(tmp_path):
    """Run the script with `nft` and `conntrackd` stand-ins on PATH that log their
    calls: the order of set_role, the same batches, the role file."""
    import os
    from egress_agent.gateway import notify_script
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("nft", "conntrackd"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n'
                                    f'[ "{tool}" = nft ] && cat >> {log}.batch\n'
                                    f'[ "$3" = "-B" ] && exit 1\nexit 0\n')
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "notify"
    script.write_text(notify_script(str(tmp_path / "state"), "/etc/ctd.conf"))
    script.chmod(0o755)
    (tmp_path / "state").mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for role, calls, rc in (
            ("primary", ["conntrackd -C /etc/ctd.conf -c", "nft -f -", "conntrackd -C /etc/ctd.conf -f",
                         "conntrackd -C /etc/ctd.conf -R", "conntrackd -C /etc/ctd.conf -B"], 1),
            ("fault", ["nft -f -", "conntrackd -C /etc/ctd.conf -n"], 0)):
        for f in (log, tmp_path / "calls.batch"):
            f.unlink(missing_ok=True)
        p = subprocess.run([str(script), role], env=env, capture_output=True, text=True)
        assert p.returncode == rc, p.stderr
        assert log.read_text().splitlines() == calls
        assert (tmp_path / "calls.batch").read_text() == gate_batch(closed=role != "primary")
        assert read_role(str(tmp_path / "state"))["role"] == role
    assert subprocess.run([str(script), "master"], env=env, capture_output=True).returncode == 2
