"""Allocations: blocks never overlap, unrelated changes move nothing, history answers who."""

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from egress_agent.alloc import Allocations, CapacityError, Lease, allocate, drain
from egress_agent.hoststate import Usable
from egress_agent.config import parse
from egress_agent.store import Store, who


def cfg_with(workloads, ips=None, extra="", ports_per_workload=1024, port_range="1024-65535",
             blocks=None):
    """`blocks`: workload -> its fixed blocks as written, like "{a1: 1024-2047}"."""
    ips = ips if ips is not None else [
        "  - {id: a1, app: app, ipv4: 203.0.113.10, ipv6: '2001:db8:10::/64'}",
        "  - {id: a2, app: app, ipv4: 203.0.113.11}",
    ]
    blocks = blocks or {}
    wl = [f"  - {{id: {w}, app: app, source: [10.0.{i // 250}.{i % 250 + 1}]"
          + (f", blocks: {blocks[w]}" if w in blocks else "") + "}"
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


def assert_both_families(a):
    """cfg_with's app: a1 has IPv4 and IPv6, a2 IPv4 only. Every workload gets
    both families; one on a2 takes its IPv6 from a1, with no block there."""
    for w, ip in a.app_choice.items():
        v6_ip = a.app_choice6.get(w, ip)
        assert v6_ip == "a1" and a.leases[(w, "a1")].ipv6, (w, a)
        if ip == "a2":
            assert a.leases[(w, "a1")].ports is None and a.leases[(w, "a1")].ipv4 is None


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
        assert_both_families(b)
        for other in order:
            if other != w and other in a.wids:
                assert b.wids[other] == a.wids[other]
                assert b.app_choice.get(other) == a.app_choice.get(other)
                assert b.app_choice6.get(other) == a.app_choice6.get(other)
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
    old = {(l.lease.ipv4, l.lease.ports) for l in b.lingering.values() if l.lease.ports}
    assert old == {(l.ipv4, l.ports) for l in a.leases.values() if l.ports}
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


def test_ipv6_comes_from_any_ip_of_the_app_with_a_range():
    a, _ = allocate(cfg_with([f"w{i}" for i in range(6)]), Allocations())
    assert set(a.app_choice.values()) == {"a1", "a2"}
    assert_both_families(a)
    assert set(a.app_choice6) == {w for w, ip in a.app_choice.items() if ip == "a2"}
    again, events = allocate(cfg_with([f"w{i}" for i in range(6)]), a)
    assert again == a and events == []
    # an app whose IPv6 lives on an IP without IPv4: the app IP is an IPv4 one
    ips = ["  - {id: v6only, app: app, ipv6: '2001:db8:10::/64'}",
           "  - {id: v4only, app: app, ipv4: 203.0.113.11}"]
    b, _ = allocate(cfg_with(["w0", "w1"], ips), Allocations())
    assert b.app_choice == {"w0": "v4only", "w1": "v4only"}
    assert b.app_choice6 == {"w0": "v6only", "w1": "v6only"}


def test_ipv4_failover_widens_the_ipv6_lease_and_keeps_the_block():
    cfg = cfg_with(["w0", "w1"])
    a, _ = allocate(cfg, Allocations())
    w = next(w for w, ip in a.app_choice.items() if ip == "a2")
    down = Usable(v4=frozenset({"a1"}), v6=frozenset({"a1"}))
    b, _ = allocate(cfg, a, down)
    widened = b.leases[(w, "a1")]
    assert widened.ipv6 == a.leases[(w, "a1")].ipv6 and widened.ports  # same IPv6, a block
    assert_no_overlap(b)
    c, _ = allocate(cfg, b, Usable())
    assert c.app_choice[w] == "a2" and c.leases[(w, "a2")] == a.leases[(w, "a2")]
    d, _ = allocate(cfg, c, down)
    assert d.leases[(w, "a1")] == widened  # the same block the next time


def test_app_choice6_survives_the_store(tmp_path):
    s = Store(tmp_path)
    a, ev = allocate(cfg_with(["w0", "w1"]), Allocations())
    assert a.app_choice6
    s.save(a, ev, at="2026-11-23T10:00:00+00:00")
    assert s.load() == a


IP_KINDS = {"dual": "ipv4: 203.0.113.{n}, ipv6: '2001:db8:{n}::/64'", "v4": "ipv4: 203.0.113.{n}",
            "v6": "ipv6: '2001:db8:{n}::/64'"}


@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(IP_KINDS)), min_size=1, max_size=4),
       count=st.integers(1, 8), down4=st.sets(st.integers(0, 3)), down6=st.sets(st.integers(0, 3)))
def test_each_family_gets_an_address_of_that_family_or_follows_unavailable(kinds, count, down4, down6):
    """Whatever families the app's IPs have and whichever are unusable: a workload's
    traffic of a family leaves with an address of that family from a usable IP of
    its app holding its lease, or follows defaults.unavailable (here: drop)."""
    from egress_agent.plan import assignment
    ips = [f"  - {{id: i{n}, app: app, {IP_KINDS[k].format(n=n + 10)}}}" for n, k in enumerate(kinds)]
    cfg = cfg_with([f"w{i}" for i in range(count)], ips)
    cfg = cfg.model_copy(update={"defaults": cfg.defaults.model_copy(update={"unavailable": "drop"})})
    a, _ = allocate(cfg, Allocations())
    usable = Usable(v4=frozenset(f"i{n}" for n in range(len(kinds)) if n not in down4),
                    v6=frozenset(f"i{n}" for n in range(len(kinds)) if n not in down6))
    b, _ = allocate(cfg, a, usable)
    assert_no_overlap(b)
    for w in cfg.workloads:
        for fam, addr in ((4, "ipv4"), (6, "ipv6")):
            has = [ip for ip in cfg.app_ips("app") if getattr(ip, addr)]
            c = assignment(cfg, b, w, fam, usable)
            can = any(usable.ok(ip, fam) for ip in has)
            assert c.action == ("snat" if can else "drop"), (w.id, fam, c, b)
            if c.action == "snat":
                assert usable.ok(cfg.ip(c.ip), fam)
                assert getattr(b.leases[(w.id, c.ip)], addr), (w.id, fam, c, b)


def test_full_ipv6_ranges_are_named_in_the_error():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ipv6: '2001:db8:10::/64', "
           "limits: {max_workloads: 1}}", "  - {id: a2, app: app, ipv4: 203.0.113.11}"]
    with pytest.raises(CapacityError, match="every IPv6 range of app 'app' is full.*max_workloads 1"):
        allocate(cfg_with(["w0", "w1"], ips), Allocations())


def test_an_ipv4_failover_that_finds_no_block_follows_unavailable():
    from egress_agent.plan import assignment
    cfg = cfg_with(["w0", "w1"], ports_per_workload=1024, port_range="1024-2047")
    a, _ = allocate(cfg, Allocations())
    w = next(w for w, ip in a.app_choice.items() if ip == "a2")
    down = Usable(v4=frozenset({"a1"}), v6=frozenset({"a1"}))
    b, _ = allocate(cfg, a, down)  # a1's only block is taken: no widening
    assert b.leases[(w, "a1")] == a.leases[(w, "a1")] and b.leases[(w, "a1")].ports is None
    c = assignment(cfg, b, cfg.workloads[int(w[1:])], 4, down)
    assert c.action == "default" and "no usable egress IP" in c.reason, c


# --- fixed blocks (a workload's `blocks:`, from a fleet-wide allocation) ---------------

def test_a_fixed_block_is_taken_as_given_whatever_the_history():
    """Two gateways of a pair with different histories give a remote workload the same
    block; the others are placed around it."""
    cfg = cfg_with(["w0", "w1", "w2"], blocks={"w1": "{a1: 1536-2559}"})
    fresh, _ = allocate(cfg, Allocations())
    other, _ = allocate(cfg, allocate(cfg_with(["w2", "w0", "w1"]), Allocations())[0])
    for a in (fresh, other):
        assert a.leases[("w1", "a1")].ports == (1536, 2559) and a.app_choice["w1"] == "a1"
        # the block fixes the IPv6 address too: the range's address at offset LO
        assert a.leases[("w1", "a1")].ipv6 == "2001:db8:10::600"  # 1536 = 0x600
        assert_no_overlap(a)
    # free blocks step by 1024 from 1024; 1024-2047 and 2048-3071 reach into it
    assert fresh.app_choice["w2"] == "a1" and fresh.leases[("w2", "a1")].ports == (3072, 4095)


def test_a_lease_that_a_new_fixed_block_covers_moves_and_the_rest_of_it_stays_taken():
    a, _ = allocate(cfg_with(["w0", "w1", "w2"]), Allocations())
    assert [a.leases[(w, "a1")].ports for w in ("w0", "w2")] == [(1024, 2047), (2048, 3071)]
    # w1 (on a2) is fixed across both blocks of a1: both move, and are events
    cfg = cfg_with(["w0", "w1", "w2", "w3"], blocks={"w1": "{a1: 1536-2559}"})
    b, events = allocate(cfg, a)
    assert b.leases[("w1", "a1")].ports == (1536, 2559) and b.app_choice["w1"] == "a1"
    assert ("w1", "a2") not in b.leases  # its old app choice is released at once
    moved = {(e.kind, e.lease.workload, e.lease.ip) for e in events}
    assert {("release", "w0", "a1"), ("linger", "w0", "a1"), ("assign", "w0", "a1"),
            ("release", "w2", "a1"), ("assign", "w2", "a1"), ("release", "w1", "a2")} <= moved
    assert_no_overlap(b)
    # the moved blocks linger: what the fixed block does not cover is nobody else's
    for l in b.leases.values():
        if l.ipv4 == "203.0.113.10" and l.workload != "w1":
            assert l.ports[0] > 3071, l
    again, events = allocate(cfg, b)
    assert again == b and events == []


def test_a_fixed_block_takes_its_ipv6_address_from_whoever_had_it_and_nobody_else_gets_one():
    # w0 holds a block far from w9's fixed one, but the IPv6 address w9's block fixes
    # (offset 256 = 0x100 in a1's range): w0 moves, w9 gets it, nobody shares one
    prev = Allocations({"w0": 1}, {"a1": 1, "a2": 2}, {"w0": "a1"}, {
        ("w0", "a1"): Lease("w0", "a1", "203.0.113.10", (5120, 6143), "2001:db8:10::100")})
    cfg = cfg_with(["w0", "w1", "w9"], port_range="256-65535", blocks={"w9": "{a1: 256-1279}"})
    b, events = allocate(cfg, prev)
    assert b.leases[("w9", "a1")].ipv6 == "2001:db8:10::100"
    assert ("release", "w0", "a1") in {(e.kind, e.lease.workload, e.lease.ip) for e in events}
    addresses = [l.ipv6 for l in b.leases.values() if l.ipv6]
    assert len(addresses) == len(set(addresses)), b.leases
    again, events = allocate(cfg, b)
    assert again == b and events == []


def test_a_cleared_fixed_block_is_kept_as_an_ordinary_lease():
    cfg = cfg_with(["w0", "w1"], blocks={"w1": "{a1: 5120-6143}"})
    a, _ = allocate(cfg, Allocations())
    b, events = allocate(cfg_with(["w0", "w1"]), a)
    assert b == a and events == []


def test_a_fixed_block_on_a_policy_ip_leaves_the_app_choice_free():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10}", "  - {id: a2, app: app, ipv4: 203.0.113.11}",
           "  - {id: p1, app: other, ipv4: 203.0.113.20}"]
    policy = "policies:\n  - {name: p, match: {workloads: [w0]}, egress: {ipv4: p1}}\n"
    a, _ = allocate(cfg_with(["w0", "w1"], ips, extra=policy, blocks={"w0": "{p1: 9216-10239}"}),
                    Allocations())
    assert a.leases[("w0", "p1")].ports == (9216, 10239) and a.app_choice["w0"] in ("a1", "a2")


def test_fixed_blocks_leave_no_room_for_a_free_workload():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ports: 10000-12047}"]
    cfg = cfg_with(["w0", "w1", "w2"], ips,
                   blocks={"w1": "{a1: 10000-11023}", "w2": "{a1: 11024-12047}"})
    with pytest.raises(CapacityError) as e:
        allocate(cfg, Allocations())
    assert e.value.workload == "w0" and "no free block" in e.value.reason
