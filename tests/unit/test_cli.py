"""The command line without root: exit codes, FILE:LINE errors, JSON shapes."""

import json
from pathlib import Path

import pytest

from egress_agent.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture
def design(tmp_path):
    text = (CONFIGS / "design.yaml").read_text().replace(
        "/var/lib/egress-agent", str(tmp_path / "state"))
    p = tmp_path / "design.yaml"
    p.write_text(text)
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_ok_and_broken(capsys, design, tmp_path):
    code, out, _ = run(capsys, "check", "-c", design)
    assert code == 0 and "ok (2 egress IPs, 2 workloads, 2 policies)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(design.read_text().replace("ipv4: 203.0.113.20", "ipv4: 2001:db8::20"))
    code, out, err = run(capsys, "check", "-c", bad)
    line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if "2001:db8::20" in l)
    assert code == 1
    assert err.startswith(f"{bad}:{line}: egress_ips[1].ipv4: '2001:db8::20' is an IPv6 address")


def test_check_reports_capacity(capsys, tmp_path, design):
    p = tmp_path / "full.yaml"
    p.write_text(design.read_text().replace("max_workloads: 64", "max_workloads: 1"))
    code, _, err = run(capsys, "check", "-c", p)
    line = next(i for i, l in enumerate(p.read_text().splitlines(), 1) if "id: cron" in l)
    assert code == 1 and err.startswith(f"{p}:{line}: workloads: capacity: workload 'cron'")
    assert "max_workloads 1 reached" in err


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "check", "-c", tmp_path / "nope.yaml")
    assert code == 1 and "cannot read" in err


def test_plan_json(capsys, design):
    code, out, _ = run(capsys, "plan", "-c", design, "--json")
    d = json.loads(out)
    assert code == 0 and "add element inet egress_agent snat4" in d["nft"]
    # ams-1 has via and an IPv6 range but no gateway6: an on-link IPv6 default route
    assert d["route_ops"] == ["add route -4 default via 203.0.113.1 dev eth1 table 7101",
                              "add route -6 default dev eth1 table 7101",
                              "add rule -4 priority 7101 fwmark 0x100000/0xff00000 lookup 7101",
                              "add rule -6 priority 7101 fwmark 0x100000/0xff00000 lookup 7101"]
    assert d["allocations"]["wids"] == {"m-42": 1, "cron": 2}


@pytest.mark.parametrize("argv, expect", [
    (["10.0.1.2", "192.0.2.7:443/tcp", "--iif", "vm-m42"],
     {"workload": "m-42", "policy": "finance-static", "action": "snat",
      "source_address": "203.0.113.10", "route_table": 7101}),
    (["10.0.1.2", "192.0.2.7", "--port", "80", "--iif", "vm-m42"],
     {"workload": "m-42", "policy": None, "action": "snat", "source_address": "203.0.113.20"}),
    (["10.0.1.2", "198.51.100.9:443/tcp"], {"policy": "partner-direct", "action": "default"}),
    (["10.0.1.2", "192.0.2.7:53/udp"], {"action": "default", "reason": "excluded: DNS"}),
    (["system.slice/cron.service/child", "192.0.2.7:443/tcp"],
     {"workload": "cron", "policy": "finance-static", "source_address": "203.0.113.10"}),
    (["10.0.1.2", "192.0.2.7:443/tcp", "--iif", "eth9"], {"workload": None, "action": "drop"}),
])
def test_explain_json(capsys, design, argv, expect):
    code, out, _ = run(capsys, "explain", "-c", design, *argv, "--json", "--assume-usable")
    d = json.loads(out)
    assert code == 0
    assert set(d) >= {"workload", "policy", "action", "source_address", "ports", "route_table"}
    for k, v in expect.items():
        assert d[k] == v, (k, d)


def test_schema_and_help(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out)["title"].startswith("egress-agent config")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "Exit status" in capsys.readouterr().out


def test_who_from_history(capsys, tmp_path):
    from egress_agent.alloc import Allocations, Lease
    from egress_agent.alloc import Event
    from egress_agent.store import Store
    s = Store(tmp_path)
    l = Lease("m42", "ip1", "203.0.113.10", (2048, 3071), "2001:db8:10::100")
    s.save(Allocations(), [Event("assign", l)], at="2026-11-23T10:00:00+00:00")
    s.save(Allocations(), [Event("release", l)], at="2026-11-23T12:00:00+00:00")
    code, out, _ = run(capsys, "who", "203.0.113.10:2500", "--at", "2026-11-23T11:00:00Z",
                       "--state-dir", tmp_path, "--json")
    assert code == 0 and json.loads(out)[0]["workload"] == "m42"
    code, out, _ = run(capsys, "who", "203.0.113.10:1000", "--at", "2026-11-23T11:00:00Z",
                       "--state-dir", tmp_path)
    assert code == 1 and "nobody held" in out
    code, out, _ = run(capsys, "who", "[2001:db8:10::100]:443", "--at", "2026-11-23T11:30:00Z",
                       "--state-dir", tmp_path)
    assert code == 0 and out.startswith("m42:")


def test_apply_refused_route_is_one_message_and_exit_3(capsys, design, monkeypatch):
    """A route op the kernel refuses is the kernel refusing the change (exit 3, one
    message naming the op), not a traceback."""
    import contextlib
    import errno

    from egress_agent import cli, log, nslock, wiring
    from egress_agent.hoststate import HostState
    from egress_agent.nft.fake import FakeNft
    from egress_agent.reconcile import Reconciler
    from egress_agent.routing.fake import FakeRouting
    from egress_agent.store import Store

    class Refusing(FakeRouting):
        def apply(self, ops):
            if ops:
                from egress_agent.routing import RoutingError
                raise RoutingError.from_errno(ops[0], errno.ENETUNREACH)
            return super().apply(ops)

    host = HostState(frozenset({"203.0.113.10", "203.0.113.20", "2001:db8:10::1"}),
                     frozenset({"eth1"}))
    monkeypatch.setattr(cli, "has_net_admin", lambda: True)
    monkeypatch.setattr(log, "configure", lambda *a, **kw: None)  # global: keep the suite's
    monkeypatch.setattr(nslock, "acquire", contextlib.nullcontext)
    monkeypatch.setattr(wiring, "reconciler", lambda cfg: Reconciler(
        FakeNft(), Refusing(), Store(cfg.state_dir), lambda: host))
    code, out, err = run(capsys, "apply", "-c", design)
    assert code == 3, (out, err)
    assert "the kernel refused a route change" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "ENETUNREACH" in err, err
