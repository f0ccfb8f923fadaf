"""Allocations: blocks never overlap, unrelated changes move nothing, history answers who."""

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from egress_agent.alloc import Allocations, CapacityError, Usable, allocate, drain
from egress_agent.config import parse
from egress_agent.store import Store, who


def cfg_with(workloads, ips=None, extra="", ports_per_workload=1024, port_range="1024-65535"):
    ips = ips if ips is not None else [
        "  - {id: a1, app: app, ipv4: 203.0.113.10, ipv6: '2001:db8:10::/64'}",
        "  - {id: a2, app: app, ipv4: 203.0.113.11}",
    ]
    wl = [f"  - {{id: {w}, app: app, source: [10.0.{i // 250}.{i % 250 + 1}]}}"
          for i, w in enumerate(workloads)]
    text = (f"version: 1\nhost: {{name: h, region: ams}}\n"
            f"defaults: {{ports_per_workload: {ports_per_workload}, port_range: {port_range}}}\n"
            "egress_ips:\n" + "\n".join(ips) + "\n"
            + ("workloads:\n" + "\n".join(wl) + "\n" if wl else "") + extra)
    return parse(text).config


def blocks_by_ip(a):
    out = {}
    for l in a.leases.values():
        if l.ports:
            out.setdefault(l.ipv4, []).append(l.ports)
    return out


def assert_no_overlap(a):
    for addr, blocks in blocks_by_ip(a).items():
        blocks.sort()
        for (a1, b1), (a2, b2) in zip(blocks, blocks[1:]):
            assert b1 < a2, f"{addr}: {a1}-{b1} overlaps {a2}-{b2}"
    v6 = [l.ipv6 for l in a.leases.values() if l.ipv6]
    assert len(v6) == len(set(v6))


names_st = st.lists(st.sampled_from([f"w{i}" for i in range(40)]), unique=True, max_size=30)


@settings(max_examples=60, deadline=None)
@given(first=names_st, ops=st.lists(st.tuples(st.booleans(), st.sampled_from(
    [f"w{i}" for i in range(40)])), max_size=15))
def test_blocks_never_overlap_and_unrelated_workloads_keep_their_leases(first, ops):
    order = list(first)
    a, _ = allocate(cfg_with(order), Allocations())
    assert_no_overlap(a)
    for add, w in ops:
        if add and w not in order:
            order.append(w)
        elif not add and w in order:
            order.remove(w)
        else:
            continue
        b, _ = allocate(cfg_with(order), a)
        assert_no_overlap(b)
        for other in order:
            if other != w and other in a.wids:
                assert b.wids[other] == a.wids[other]
                assert b.app_choice.get(other) == a.app_choice.get(other)
                for key, lease in a.leases.items():
                    if key[0] == other:
                        assert b.leases[key] == lease, f"{other} moved when {w} changed"
        a = b


def test_app_workloads_are_balanced_across_the_apps_ips():
    a, _ = allocate(cfg_with([f"w{i}" for i in range(10)]), Allocations())
    counts = {}
    for w, ip in a.app_choice.items():
        counts[ip] = counts.get(ip, 0) + 1
    assert counts == {"a1": 5, "a2": 5}


def test_block_layout_and_ipv6_inside_the_range():
    a, _ = allocate(cfg_with(["w0", "w1", "w2"]), Allocations())
    l = a.leases[("w0", "a1")]
    assert l.ports == (1024, 2047) and l.ipv4 == "203.0.113.10"
    assert ipaddress.ip_address(l.ipv6) in ipaddress.ip_network("2001:db8:10::/64")
    assert a.leases[("w2", "a1")].ports == (2048, 3071)


def test_reorder_of_config_moves_nothing():
    a, _ = allocate(cfg_with(["x", "y", "z"]), Allocations())
    b, events = allocate(cfg_with(["z", "x", "y"]), a)
    assert b == a and events == []


def test_max_workloads_is_enforced_across_ips_and_named_in_the_error():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, limits: {max_workloads: 2}}"]
    allocate(cfg_with(["w0", "w1"], ips), Allocations())
    with pytest.raises(CapacityError) as e:
        allocate(cfg_with(["w0", "w1", "w2"], ips), Allocations())
    assert "w2" in str(e.value) and "full" in str(e.value)


def test_port_capacity():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ports: 10000-12047}"]
    allocate(cfg_with(["w0", "w1"], ips), Allocations())
    with pytest.raises(CapacityError):
        allocate(cfg_with(["w0", "w1", "w2"], ips), Allocations())


def test_smaller_block_size_reallocates_to_fit():
    a, _ = allocate(cfg_with(["w0", "w1"]), Allocations())
    b, events = allocate(cfg_with(["w0", "w1"], ports_per_workload=512), a)
    assert_no_overlap(b)
    assert all(l.ports[1] - l.ports[0] + 1 == 512 for l in b.leases.values() if l.ports)
    assert {e.kind for e in events} == {"assign", "release", "linger"}
    # the old blocks may still carry connections: the new ones stay clear of them
    old = {(l.lease.ipv4, l.lease.ports) for l in b.lingering.values()}
    assert old == {(l.ipv4, l.ports) for l in a.leases.values()}
    for addr, (lo, hi) in old:
        for l in b.leases.values():
            if l.ipv4 == addr:
                assert l.ports[1] < lo or hi < l.ports[0], (l.ports, (lo, hi))


def test_failover_borrows_a_block_and_returns_to_the_same_one():
    cfg = cfg_with(["w0", "w1"])
    a, _ = allocate(cfg, Allocations())
    home = a.app_choice["w0"]
    other = "a2" if home == "a1" else "a1"
    down = Usable(v4=frozenset({other}), v6=frozenset())
    b, _ = allocate(cfg, a, down)
    assert b.leases[("w0", other)].temporary
    assert b.leases[("w0", home)] == a.leases[("w0", home)]  # kept for the way back
    c, events = allocate(cfg, b, Usable())
    assert ("w0", other) not in c.leases or not c.leases[("w0", other)].temporary
    assert c.leases[("w0", home)] == a.leases[("w0", home)]


def test_store_roundtrip_and_who(tmp_path):
    s = Store(tmp_path)
    a, ev = allocate(cfg_with(["w0", "w1"]), Allocations())
    s.save(a, ev, at="2026-11-23T10:00:00+00:00")
    assert s.load() == a
    b, ev2 = allocate(cfg_with(["w1"]), a)
    s.save(b, ev2, at="2026-11-23T11:00:00+00:00")
    l0 = a.leases[("w0", a.app_choice["w0"])]
    port = l0.ports[0] + 5
    at10 = who(s.history(), l0.ipv4, port, "2026-11-23T10:30:00Z")
    assert [h.workload for h in at10] == ["w0"]
    # released at 11:00 while its connections may live: still w0's until drained
    [h] = who(s.history(), l0.ipv4, port)
    assert (h.workload, h.state, h.until) == ("w0", "lingering", "2026-11-23T11:00:00+00:00")
    c, ev3 = drain(b, frozenset())
    s.save(c, ev3, at="2026-11-23T11:10:00+00:00")
    assert s.load() == c and not c.lingering
    [h] = who(s.history(), l0.ipv4, port, "2026-11-23T11:05:00Z")
    assert (h.state, h.drained) == ("drained", "2026-11-23T11:10:00+00:00")
    assert who(s.history(), l0.ipv4, port, "2026-11-23T11:30:00Z") == []
    assert who(s.history(), l0.ipv4, port) == []  # nobody now
    assert who(s.history(), l0.ipv4, port, "2026-11-23T09:00:00Z") == []


def test_draining_ip_takes_no_new_workloads_and_hands_over_its_own():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10}", "  - {id: a2, app: app, ipv4: 203.0.113.11}"]
    a, _ = allocate(cfg_with(["w0", "w1"], ips), Allocations())
    on_a1 = [w for w, ip in a.app_choice.items() if ip == "a1"]
    ips[0] = "  - {id: a1, app: app, ipv4: 203.0.113.10, state: draining}"
    b, events = allocate(cfg_with(["w0", "w1", "w2"], ips), a)
    assert set(b.app_choice.values()) == {"a2"}
    assert all(("a1" != k[1]) for k in b.leases)
    assert {e.lease.workload for e in events if e.kind == "release"} == set(on_a1)
