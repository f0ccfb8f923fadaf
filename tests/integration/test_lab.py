"""The lab's own truth, with no agent running.

Every scenario test later asserts "the origin saw X"; these tests pin down
what the origin sees when nothing but the lab's own NAT (`lab_nat`) is in
place, and that the origin can tell which uplink a packet used.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from egress_agent.lab.echo import child_env
from egress_agent.lab.netns import ip, list_namespaces, ns_add, ns_del, ns_exec
from egress_agent.lab.topology import Lab, LabError, cgroup2_root


def _origin_counter(lab: Lab, name: str) -> int:
    """A TcpExt counter of the origin namespace (e.g. IPReversePathFilter)."""
    lines = ns_exec(lab.origin, ["cat", "/proc/net/netstat"]).stdout.splitlines()
    for header, values in zip(lines[::2], lines[1::2]):
        names = header.split()
        if name in names:
            return int(values.split()[names.index(name)])
    raise KeyError(name)


def test_machines_leave_through_host_masquerade(lab: Lab) -> None:
    for machine in ("m42", "m43", "m44"):
        seen = lab.probe(machine, "192.0.2.10", 8080, "tcp", 4)
        assert seen is not None, lab.last_result
        assert seen.address == "203.0.113.2"
    assert lab.probe("m42", "198.51.100.10", 8080).address == "203.0.113.2"
    assert lab.probe("m42", "10.99.0.10", 8080).address == "203.0.113.2"  # internal, via up0


def test_ipv6_leaves_from_uplink_address(lab: Lab) -> None:
    seen = lab.probe("m42", "2001:db8:ff::10", 8080, "tcp", 6)
    assert seen is not None, lab.last_result
    assert seen.address == "2001:db8:a::2"
    # Re-adding an egress address must not make it the host's v6 source
    # (the kernel prefers the newest address on a longest-prefix tie).
    lab.address_del("2001:db8:10::1")
    lab.address_add("2001:db8:10::1")
    assert lab.probe("m42", "2001:db8:ff::10", 8080).address == "2001:db8:a::2"


def test_udp_and_dns(lab: Lab) -> None:
    assert lab.probe("m42", "192.0.2.10", 8081, "udp").address == "203.0.113.2"
    assert lab.probe("m42", "2001:db8:ff::10", 8081, "udp").address == "2001:db8:a::2"
    assert lab.probe("m43", "192.0.2.53", 53, "udp").address == "203.0.113.2"
    assert lab.probe("m43", "192.0.2.53", 53, "tcp").address == "203.0.113.2"


def test_cgroup_probe_runs_in_cgroup_and_host_namespace(lab: Lab) -> None:
    seen = lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080)
    assert seen is not None, lab.last_result
    assert seen.address == "203.0.113.2"
    out = subprocess.run(lab.cgroup_prefix(lab.cgroup) + ["cat", "/proc/self/cgroup"],
                         capture_output=True, text=True, check=True).stdout
    assert f"0::/{lab.cgroup}\n" in out
    assert os.path.isdir(os.path.join(cgroup2_root(), lab.cgroup))


def test_agent_prefix_sees_cgroup2_at_sys_fs_cgroup(lab: Lab) -> None:
    out = subprocess.run(lab.agent_prefix() + ["sh", "-c", f"test -d /sys/fs/cgroup/{lab.cgroup} && ip -br link show up0"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("up0")


def test_spoofed_source_is_recorded(lab: Lab, record_property) -> None:
    """Without the agent, nothing stops spoof from using m42's address; the
    reply is routed to m42, so spoof usually sees nothing. Only recorded."""
    seen = lab.probe("spoof", "192.0.2.10", 8080, source="10.0.1.2", timeout=1.0)
    record_property("spoof_as_m42", repr(seen))
    print("spoof with source 10.0.1.2:", seen, lab.last_result)
    assert lab.probe("spoof", "192.0.2.10", 8080).address == "203.0.113.2"


def test_origin_tells_which_uplink_was_used(lab: Lab) -> None:
    """203.0.113.140 belongs to up1: sent out of up0 the origin's strict
    rp_filter drops it, sent out of up1 it is answered."""
    # Resolve the gateway first: an ARP request from 203.0.113.140 would itself
    # fail the origin's rp_filter, and the SYN would never be sent.
    assert lab.probe("host", "192.0.2.10", 8080) is not None
    before = _origin_counter(lab, "IPReversePathFilter")
    assert lab.probe("host", "192.0.2.10", 8080, source="203.0.113.140", timeout=1.0) is None
    assert _origin_counter(lab, "IPReversePathFilter") > before
    ip(lab.host, "route", "add", "default", "via", "203.0.113.129", "dev", "up1", "table", "100")
    ip(lab.host, "rule", "add", "from", "203.0.113.140", "lookup", "100", "priority", "1000")
    seen = lab.probe("host", "192.0.2.10", 8080, source="203.0.113.140")
    assert seen is not None, lab.last_result
    assert seen.address == "203.0.113.140"


def test_held_connection_keeps_its_flow(lab: Lab) -> None:
    with lab.hold("m42", "192.0.2.10", 8080) as held:
        assert held.first.address == "203.0.113.2"
        assert held.ping() == held.first
        assert held.ping() == held.first
    with lab.hold_cgroup(lab.cgroup, "2001:db8:ff::10", 8080) as held:
        assert held.ping() == held.first
        assert held.first.address == "2001:db8:a::2"


def test_link_flap_restores_routes(lab: Lab) -> None:
    lab.link_set("up0", False)
    assert lab.probe("m42", "192.0.2.10", 8080, timeout=0.5) is None
    lab.link_set("up0", True)
    assert lab.probe("m42", "192.0.2.10", 8080).address == "203.0.113.2"
    assert lab.probe("m42", "2001:db8:ff::10", 8080).address == "2001:db8:a::2"


def test_describe_is_json(lab: Lab) -> None:
    d = json.loads(json.dumps(lab.describe()))
    assert d["namespaces"]["host"] == f"{lab.prefix}-host"
    assert d["machines"]["m42"] == {"namespace": f"{lab.prefix}-m42", "interface": "vm-m42",
                                    "ipv4": "10.0.1.2", "ipv6": "fd00:1::2", "extra_ipv4": []}


def _echo_pids(lab: Lab) -> list[int]:
    with open(os.path.join(lab.state_dir, "state.json")) as f:
        return [e["pid"] for e in json.load(f)["echo"]]


def test_down_removes_everything(lab: Lab) -> None:
    pids = _echo_pids(lab)
    assert pids and all(os.path.exists(f"/proc/{p}") for p in pids)
    held = lab.hold("m43", "192.0.2.10", 8080)  # a stray process inside the lab
    lab.down()
    assert list_namespaces(lab.prefix + "-") == []
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not os.path.exists(lab.state_dir)
    assert not os.path.exists(os.path.join(cgroup2_root(), f"egress-lab-{lab.prefix}"))
    held.close()


def test_down_from_a_fresh_process(lab: Lab) -> None:
    pids = _echo_pids(lab)
    subprocess.run([sys.executable, "-c", "import sys; from egress_agent.lab.topology import Lab; "
                    "Lab(sys.argv[1]).down()", lab.prefix], check=True, env=child_env())
    assert list_namespaces(lab.prefix + "-") == []
    lab.down()  # reaps our child, if the echo server was one
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not os.path.exists(lab.state_dir)


def test_up_refuses_an_existing_lab_and_replaces_it_when_asked(lab: Lab) -> None:
    old = _echo_pids(lab)
    with pytest.raises(LabError, match="is up already"):
        lab.up()
    assert _echo_pids(lab) == old
    lab.up(replace=True)
    assert _echo_pids(lab) != old
    assert lab.probe("m42", "192.0.2.10", 8080).address == "203.0.113.2"


def test_hold_many_flows(lab: Lab) -> None:
    """More flows than the default 1024 descriptors, on both ends."""
    with lab.hold_many("m42", "192.0.2.10", 8080, count=1500) as group:
        assert group.error is None
        assert len(group.seen) == 1500
        assert {s.address for s in group.seen} == {"203.0.113.2"}
        assert len({s.port for s in group.seen}) == 1500
        assert group.ping() == group.seen


def test_up_refuses_namespaces_no_lab_built() -> None:
    """Someone else's `<prefix>-host` on a shared machine: neither used nor removed."""
    other = Lab("eaf" + secrets.token_hex(2))
    ns_add(other.host)
    try:
        with pytest.raises(LabError, match="not ours"):
            other.up()
        assert list_namespaces(other.prefix + "-") == [other.host]
    finally:
        ns_del(other.host)
