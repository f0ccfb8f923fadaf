"""Attribution has no holes: a released block lingers while conntrack has its
connections, nobody else gets it, and `who` names its holder until it drains.

Pure parts only: history replay on hand-made histories, the allocator and
drain(), the reconciler on fakes. The kernel test is
tests/integration/test_attribution_kernel.py.
"""

import json
from dataclasses import replace

from hypothesis import given, settings, strategies as st

from egress_agent import names
from egress_agent.alloc import (Allocations, CapacityError, allocate, block_key, drain,
                                 lingering_order)
from egress_agent.hoststate import HostState, Usable
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store, who
from egress_agent.usage import ip_rows

from test_alloc import cfg_with

A = "203.0.113.10"
T0, T1, T2, T3 = ("2026-11-23T10:00:00+00:00", "2026-11-23T11:00:00+00:00",
                  "2026-11-23T12:00:00+00:00", "2026-11-23T13:00:00+00:00")


def ev(kind, at, workload="m42", ports=(1024, 2047), ip="billing-1", ipv6=None):
    return {"at": at, "event": kind, "workload": workload, "ip": ip, "ipv4": A,
            "ports": list(ports), "ipv6": ipv6, "temporary": False}


# --- who: history replay ---------------------------------------------------------------

def test_a_lingering_block_is_named_with_its_open_connections():
    h = [ev("assign", T0), ev("release", T1), ev("linger", T1),
         ev("assign", T1, workload="m77", ports=(2048, 3071))]
    [now] = who(iter(h), A, 1500)
    assert (now.workload, now.state, now.since, now.until, now.drained) == \
        ("m42", "lingering", T0, T1, None)
    assert now.describe() == (f"m42: {A} ports 1024-2047 via billing-1, since {T0}, released "
                              f"{T1}, connections still open (block not reused until they close)")
    j = now.to_json()
    assert (j["state"], j["released"], j["drained"], j["connections_open"]) == \
        ("lingering", T1, None, True)
    [past] = who(iter(h), A, 1500, "2026-11-23T11:30:00Z")
    assert past == now
    assert [x.workload for x in who(iter(h), A, 2100)] == ["m77"]


def test_a_drained_block_answers_for_the_past_only():
    h = [ev("assign", T0), ev("release", T1), ev("linger", T1), ev("drained", T2)]
    assert who(iter(h), A, 1500) == []
    [h1] = who(iter(h), A, 1500, "2026-11-23T11:59:59Z")
    assert (h1.state, h1.until, h1.drained) == ("drained", T1, T2)
    assert h1.describe().endswith(f"released {T1}, last connection closed by {T2}")
    assert not h1.to_json()["connections_open"]
    assert who(iter(h), A, 1500, "2026-11-23T12:00:00Z") == []  # drained at T2: free from then
    assert [x.workload for x in who(iter(h), A, 1500, "2026-11-23T10:30:00Z")] == ["m42"]


def test_a_history_from_before_lingering_ends_at_the_release():
    h = [ev("assign", T0), ev("release", T1)]
    assert who(iter(h), A, 1500) == []
    [h1] = who(iter(h), A, 1500, "2026-11-23T10:30:00Z")
    assert (h1.state, h1.describe()) == ("released", f"m42: {A} ports 1024-2047 via billing-1, "
                                                     f"since {T0} until {T1}")
    assert who(iter(h), A, 1500, "2026-11-23T11:30:00Z") == []


def test_taking_its_lingering_block_again_is_one_hold():
    h = [ev("assign", T0), ev("release", T1), ev("linger", T1), ev("assign", T2),
         ev("release", T3), ev("linger", T3)]
    holders = who(iter(h), A, 1500, "2026-11-23T12:30:00Z")
    assert [(x.since, x.until, x.state) for x in holders] == [(T0, T3, "lingering")]
    # a drained block assigned again (to anyone) is a new hold
    h2 = [ev("assign", T0), ev("release", T1), ev("linger", T1), ev("drained", T2),
          ev("assign", T3, workload="m77")]
    assert [(x.workload, x.since) for x in who(iter(h2), A, 1500)] == [("m77", T3)]


def test_who_matches_the_ipv6_address_of_a_lingering_lease():
    v6 = "2001:db8:10::100"
    h = [ev("assign", T0, ipv6=v6), ev("release", T1, ipv6=v6), ev("linger", T1, ipv6=v6)]
    [x] = who(iter(h), "2001:db8:10:0::100")
    assert (x.workload, x.ports, x.state) == ("m42", None, "lingering")


def test_drained_without_a_linger_or_for_another_block_changes_nothing():
    h = [ev("assign", T0), ev("release", T1), ev("drained", T2),
         ev("assign", T0, workload="m77", ports=(2048, 3071)),
         ev("release", T1, workload="m77", ports=(2048, 3071)),
         ev("linger", T1, workload="m77", ports=(2048, 3071)),
         ev("drained", T2, workload="m77", ports=(4096, 5119))]
    assert who(iter(h), A, 1500, "2026-11-23T11:30:00Z") == []
    assert [x.state for x in who(iter(h), A, 2100)] == ["lingering"]


# --- the allocator -----------------------------------------------------------------

IPS = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ipv6: '2001:db8:10::/64'}",
       "  - {id: a2, app: app, ipv4: 203.0.113.11, ipv6: '2001:db8:11::/64'}"]


def draining(ips, which="a1"):
    return [l.replace("}", ", state: draining}") if f"id: {which}," in l else l for l in ips]


def test_a_drained_ips_block_lingers_and_nobody_else_gets_it_until_empty():
    a, _ = allocate(cfg_with(["w0", "w1"], IPS), Allocations())
    on_a1 = next(w for w, ip in a.app_choice.items() if ip == "a1")
    old = a.leases[(on_a1, "a1")]
    b, events = allocate(cfg_with(["w0", "w1"], draining(IPS)), a)
    assert [e.kind for e in events if e.lease == old] == ["release", "linger"]
    [l] = b.lingering.values()
    assert l.lease == old and l.mark == names.lease_mark(a.wids[on_a1], a.eids["a1"])
    # a1 active again, a new workload placed there: not in the lingering block
    c, _ = allocate(cfg_with(["w0", "w1", "w2", "w3"], IPS), b)
    assert c.lingering == b.lingering
    for lease in c.leases.values():
        assert lease.ipv6 != old.ipv6
        if lease.ipv4 == old.ipv4:
            assert lease.ports != old.ports
    # conntrack still has it (mark and address): kept; then empty: freed, once
    live = frozenset({(l.mark, old.ipv4)})
    assert drain(c, live) == (c, [])
    d, gone = drain(c, frozenset({(l.mark, "203.0.113.11"), (l.mark + 1, old.ipv4)}))
    assert [(e.kind, e.lease) for e in gone] == [("drained", old)] and not d.lingering
    e, _ = allocate(cfg_with(["w0", "w1", "w2", "w3", "w4"], IPS), d)
    assert any(x.ports == old.ports for x in e.leases.values() if x.ipv4 == old.ipv4)


def test_a_removed_workloads_id_and_block_wait_and_come_back_to_it():
    a, _ = allocate(cfg_with(["w0", "w1"], IPS), Allocations())
    gone = a.leases[("w0", a.app_choice["w0"])]
    b, _ = allocate(cfg_with(["w1"], IPS), a)
    assert "w0" not in b.wids and {block_key(gone)} == set(b.lingering)
    c, _ = allocate(cfg_with(["w1", "new"], IPS), b)
    assert c.wids["new"] != a.wids["w0"]  # its id is in the marks of w0's connections
    assert all(l.ports != gone.ports for l in c.leases.values() if l.ipv4 == gone.ipv4)
    assert c.workloads_by_wid()[a.wids["w0"]] == "w0"  # usage and the translation log
    from egress_agent.usage import Group, rows
    mark = names.lease_mark(a.wids["w0"], a.eids[gone.ip])
    [r] = rows(cfg_with(["w1", "new"], IPS), c, {Group(mark, 6, "192.0.2.10", 443, gone.ipv4): 3})
    assert (r.workload, r.egress_ip, r.connections) == ("w0", gone.ip, 3)
    d, events = allocate(cfg_with(["w1", "new", "w0"], IPS), c)
    assert d.wids["w0"] == a.wids["w0"] and d.leases[("w0", gone.ip)] == gone
    assert not d.lingering and [e.kind for e in events] == ["assign"]


def test_a_block_released_and_wanted_in_the_same_change_goes_to_nobody_else():
    a, _ = allocate(cfg_with(["w0", "w1"], IPS), Allocations())
    gone = a.leases[("w0", a.app_choice["w0"])]
    b, _ = allocate(cfg_with(["w1", "new"], IPS), a)
    assert set(b.lingering) == {block_key(gone)}
    assert all(l.ports != gone.ports for l in b.leases.values() if l.ipv4 == gone.ipv4)
    assert all(l.ipv6 != gone.ipv6 for l in b.leases.values() if gone.ipv6)


def test_a_failover_block_lingers_after_the_way_back():
    cfg = cfg_with(["w0"], IPS)
    a, _ = allocate(cfg, Allocations())
    home = a.app_choice["w0"]
    other = "a2" if home == "a1" else "a1"
    b, _ = allocate(cfg, a, Usable(v4=frozenset({other}), v6=frozenset({other})))
    borrowed = b.leases[("w0", other)]
    c, events = allocate(cfg, b, Usable())
    assert ("w0", other) not in c.leases
    assert [l.lease.ports for l in c.lingering.values()] == [borrowed.ports]
    # the next failover, before it drained: the same block again
    d, _ = allocate(cfg, c, Usable(v4=frozenset({other}), v6=frozenset({other})))
    assert d.leases[("w0", other)] == borrowed and not d.lingering


def test_allocations_json_keeps_lingering_and_reads_older_files(tmp_path):
    a, _ = allocate(cfg_with(["w0", "w1"], IPS), Allocations())
    b, ev_ = allocate(cfg_with(["w1"], IPS), a)
    s = Store(tmp_path)
    s.save(b, ev_)
    assert s.load() == b and b.lingering
    old = json.loads((tmp_path / "allocations.json").read_text())
    del old["lingering"]
    assert Allocations.from_json(old).lingering == {}
    c, _ = drain(b, frozenset())
    assert "lingering" not in c.to_json()


def test_free_blocks_do_not_count_lingering_ones_and_capacity_says_why():
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ports: 10000-12047}"]
    a, _ = allocate(cfg_with(["w0", "w1"], ips), Allocations())
    b, _ = allocate(cfg_with(["w1"], ips), a)
    [row] = ip_rows(cfg_with(["w1"], ips), b)
    assert (row["port_blocks"], row["free_port_blocks"], row["lingering_port_blocks"]) == (2, 0, 1)
    try:
        allocate(cfg_with(["w1", "w2"], ips), b)
        raise AssertionError("the lingering block was handed out")
    except CapacityError as e:
        assert "1 released blocks are reused when their connections close" in str(e)
    c, _ = drain(b, frozenset())
    [row] = ip_rows(cfg_with(["w1"], ips), c)
    assert (row["free_port_blocks"], row["lingering_port_blocks"]) == (1, 0)
    assert allocate(cfg_with(["w1", "w2"], ips), c)[0].leases[("w2", "a1")].ports == \
        a.leases[("w0", "a1")].ports


# --- the property ------------------------------------------------------------------

POOL = [f"w{i}" for i in range(12)]
step = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(POOL)),
    st.tuples(st.just("remove"), st.sampled_from(POOL)),
    st.tuples(st.just("drain_ip"), st.sampled_from(["a1", "a2"])),
    st.tuples(st.just("activate"), st.sampled_from(["a1", "a2"])),
    st.tuples(st.just("conntrack"), st.sets(st.integers(0, 30), max_size=8)),
)


@settings(max_examples=150, deadline=None)
@given(first=st.lists(st.sampled_from(POOL), unique=True, max_size=6),
       steps=st.lists(step, max_size=20))
def test_a_lingering_block_is_never_given_to_another_and_freed_exactly_when_empty(first, steps):
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ipv6: '2001:db8:10::/64', "
           "ports: 10000-19999}",
           "  - {id: a2, app: app, ipv4: 203.0.113.11, ports: 10000-19999}"]
    order, drained = list(first), set()
    cfg = lambda: cfg_with(order, [l.replace("}", ", state: draining}")
                                   if any(f"id: {d}," in l for d in drained) else l for l in ips],
                           ports_per_workload=1000)
    a, _ = allocate(cfg(), Allocations())
    for op, arg in steps:
        before = a
        if op == "conntrack":
            # conntrack still has connections of these lingering leases (by index)
            ling = sorted(a.lingering, key=lingering_order)
            busy = {ling[i] for i in arg if i < len(ling)}
            live = frozenset((a.lingering[k].mark, addr) for k in busy
                             for addr in (a.lingering[k].lease.ipv4, a.lingering[k].lease.ipv6))
            a, events = drain(a, live)
            assert set(a.lingering) == busy  # freed exactly the empty ones
            assert {block_key(e.lease) for e in events} == set(before.lingering) - busy
            assert a.leases == before.leases and a.wids == before.wids
            continue
        if op == "add" and arg not in order:
            order.append(arg)
        elif op == "remove" and arg in order:
            order.remove(arg)
        elif op == "drain_ip":
            drained.add(arg)
        elif op == "activate":
            drained.discard(arg)
        try:
            a, _ = allocate(cfg(), before)
        except CapacityError:
            a = before
            continue
        # nothing lingering is dropped by an allocation: only drain() or its own
        # workload taking the very same block again ends it
        for k, l in before.lingering.items():
            assert k in a.lingering or a.leases.get((l.lease.workload, l.lease.ip)) is not None \
                and block_key(a.leases[(l.lease.workload, l.lease.ip)]) == k
        for k, l in a.lingering.items():
            wid, _eid = names.split_mark(l.mark)
            for w, i in a.wids.items():
                assert i != wid or w == l.lease.workload, f"{w} got lingering {k}'s id {wid}"
            for lease in a.leases.values():
                if lease.ipv4 == l.lease.ipv4 and lease.ports and l.lease.ports:
                    lo, hi = l.lease.ports
                    assert lease.ports[1] < lo or hi < lease.ports[0], f"{lease} in lingering {k}"
                assert not (l.lease.ipv6 and lease.ipv6 == l.lease.ipv6), f"{lease} has {k}'s IPv6"


# --- the reconciler on fakes ----------------------------------------------------------

def reconciler(tmp_path, live):
    host = HostState(frozenset({"203.0.113.10", "203.0.113.11", "2001:db8:10::1"}))
    return Reconciler(FakeNft(), FakeRouting(), Store(tmp_path), lambda: host,
                      live_leases=live)


def test_the_sync_after_the_commit_frees_what_conntrack_no_longer_has(tmp_path):
    conns: set = set()
    calls = []

    def live(marks):
        calls.append((len(rec.nft.batches), marks))  # read after this sync's batch went in
        return frozenset(conns)

    rec = reconciler(tmp_path, live)
    rec.sync(cfg_with(["w0", "w1"], IPS))
    assert calls == []  # nothing lingers: no conntrack read at all
    gone = rec.alloc.leases[("w0", rec.alloc.app_choice["w0"])]
    mark = names.lease_mark(rec.alloc.wids["w0"], rec.alloc.eids[gone.ip])
    conns.add((mark, gone.ipv4))
    rec.sync(cfg_with(["w1"], IPS))
    assert calls == [(len(rec.nft.batches), [mark])]
    assert list(rec.alloc.lingering) == [block_key(gone)]
    assert Store(tmp_path).load() == rec.alloc
    [h] = who(Store(tmp_path).history(), gone.ipv4, gone.ports[0])
    assert (h.workload, h.state) == ("w0", "lingering")
    conns.clear()
    r = rec.sync(cfg_with(["w1"], IPS), trigger="drained")
    assert not rec.alloc.lingering and not Store(tmp_path).load().lingering and not r.changed
    assert f"w0 {gone.ipv4} {gone.ports[0]}-{gone.ports[1]}" in " ".join(r.notes)
    assert who(Store(tmp_path).history(), gone.ipv4, gone.ports[0]) == []
    [h] = who(Store(tmp_path).history(), gone.ipv4, gone.ports[0], h.until)
    assert h.state == "drained"


def test_an_unreadable_conntrack_keeps_the_blocks_and_says_so(tmp_path):
    def live(marks):
        raise PermissionError(1, "Operation not permitted")

    rec = reconciler(tmp_path, live)
    rec.sync(cfg_with(["w0", "w1"], IPS))
    r = rec.sync(cfg_with(["w1"], IPS))
    assert len(rec.alloc.lingering) == 1 and Store(tmp_path).load().lingering
    assert any("released port blocks kept until conntrack can be read" in n for n in r.notes)


def test_conntrack_groups_name_the_lease_by_mark_and_the_source_the_origin_saw():
    from egress_agent.conntrack import Group, lease_addresses
    m = names.lease_mark(7, 2)
    groups = [Group(m | names.OURS_FLAG, 6, "192.0.2.10", 8080, A),
              Group(m | names.OURS_FLAG, 17, "192.0.2.53", 53, A),
              Group(names.lease_mark(8, 2) | names.OURS_FLAG, 6, "192.0.2.10", 8080, "2001:db8:10::100")]
    assert lease_addresses(groups) == {(m, A), (names.lease_mark(8, 2), "2001:db8:10::100")}


def test_one_kernel_filter_keeps_every_connection_of_the_lingering_leases():
    from egress_agent.conntrack import lease_filter
    one = names.lease_mark(7, 2)
    assert lease_filter([one]) == (one | names.OURS_FLAG, names.OURS_FLAG | names.WID_MASK
                                   | names.EID_MASK)
    same_ip = [names.lease_mark(w, 3) for w in (5, 9, 1000)]
    mark, mask = lease_filter(same_ip)
    assert mask & names.EID_MASK == names.EID_MASK  # only egress id 3's connections
    assert lease_filter([]) == (names.OURS_FLAG, names.OURS_FLAG)
    marks = [names.lease_mark(w, e) for w, e in ((1, 1), (2, 7), (300, 200), (77, 3))]
    for ms in (marks, same_ip, [one]):
        mark, mask = lease_filter(ms)
        for m in ms:
            assert ((m | names.OURS_FLAG) & mask) == mark, (hex(m), hex(mark), hex(mask))
        other = names.lease_mark(8, 2) | names.OURS_FLAG
        if ms == [one]:
            assert other & mask != mark


def test_the_metrics_count_lingering_blocks_apart_from_free_ones():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from egress_agent.metrics import Collector, State
    from egress_agent.report import Snapshot
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ports: 10000-13071}"]
    a, _ = allocate(cfg_with(["w0", "w1"], ips), Allocations())
    cfg = cfg_with(["w1"], ips)
    b, _ = allocate(cfg, a)
    state = State()
    state.snapshot = Snapshot([], ip_rows(cfg, b), [], {"count": 0, "max": 10, "ratio": 0.0,
                                                        "stats": {}})
    reg = CollectorRegistry()
    reg.register(Collector(state))
    got = {(s.name, s.labels.get("egress_ip")): s.value
           for f in text_string_to_metric_families(generate_latest(reg).decode())
           for s in f.samples if "port_blocks" in s.name}
    assert got == {("egress_agent_egress_ip_free_port_blocks", "a1"): 1,
                   ("egress_agent_egress_ip_lingering_port_blocks", "a1"): 1}


def test_a_lease_widened_to_both_families_leaves_nothing_lingering():
    """IPv4 failover widens the IPv6-only lease on the app's IPv6 IP: the old lease is
    released, but all of it (its IPv6 address) is held again, so nothing lingers."""
    ips = ["  - {id: a1, app: app, ipv4: 203.0.113.10, ipv6: '2001:db8:10::/64'}",
           "  - {id: a2, app: app, ipv4: 203.0.113.11}"]
    cfg = cfg_with(["w0", "w1"], ips)
    a, _ = allocate(cfg, Allocations())
    w = next(w for w, ip in a.app_choice.items() if ip == "a2")  # its IPv6 comes from a1
    down = Usable(v4=frozenset({"a1"}), v6=frozenset({"a1"}))
    b, events = allocate(cfg, a, down)
    widened = b.leases[(w, "a1")]
    assert widened.ipv6 == a.leases[(w, "a1")].ipv6 and widened.ports
    assert [e.kind for e in events] == ["release", "assign"] and not b.lingering
    # a record of the old lease would linger in nothing but what is held again
    from egress_agent.alloc import Lingering
    old = Lingering(a.leases[(w, "a1")], names.lease_mark(a.wids[w], a.eids["a1"]))
    assert old.rest(widened) is None and not old.in_use(frozenset({(old.mark, widened.ipv6)}),
                                                        widened)
    assert old.rest(replace(widened, ipv6="2001:db8:10::999")) == old.lease
