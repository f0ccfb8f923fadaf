"""Drift: the skeleton's shape (shape.py), what a full sync finds (drift.py) and
repairs (Reconciler on fakes), and the netlink events that trigger it
(nftwatch.py, parsed from messages captured on Linux 6.x / nft 1.0.6)."""

from __future__ import annotations

import copy
import errno
import json
import os
import socket
import threading
from importlib import resources
from pathlib import Path

import pytest

from egress_agent import nftwatch, shape
from egress_agent.config import parse
from egress_agent.hoststate import HostState
from egress_agent.model import Route, Rule
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler
from egress_agent.nft.diff import transaction
from egress_agent.nft.listing import observed_from_json
from egress_agent.nft.text import skeleton_shape
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
T = "inet egress_agent"


def kernel_listing() -> dict:
    """`nft -j -t list table inet egress_agent` of fixtures/skeleton-nft-1.0.6.nft."""
    return json.loads((FIXTURES / "skeleton-nft-1.0.6.json").read_text())


def without_rules(doc: dict, chain: str, keep=lambda i, rule: False) -> dict:
    doc = copy.deepcopy(doc)
    rules = [i for i, x in enumerate(doc["nftables"]) if x.get("rule", {}).get("chain") == chain]
    doc["nftables"] = [x for i, x in enumerate(doc["nftables"])
                       if i not in rules or keep(rules.index(i), x["rule"])]
    return doc


# --- shape ------------------------------------------------------------------------------

def test_source_and_kernel_listing_have_one_shape():
    src = (FIXTURES / "skeleton-nft-1.0.6.nft").read_text()
    assert shape.from_source(src) == shape.from_json(kernel_listing())
    assert shape.differences(shape.from_source(src), shape.from_json(kernel_listing())) == []


def test_flushed_chain_deleted_rule_and_missing_set_are_named():
    want = shape.from_json(kernel_listing())
    n = len(want.chain("postrouting")[1])
    flushed = shape.from_json(without_rules(kernel_listing(), "postrouting"))
    assert shape.differences(want, flushed) == [f"chain postrouting: 0 of {n} skeleton rules"]
    one_gone = shape.from_json(without_rules(kernel_listing(), "postrouting",
                                             keep=lambda i, r: i != 0))
    assert shape.differences(want, one_gone) == [f"chain postrouting: {n - 1} of {n} skeleton rules"]
    doc = kernel_listing()
    doc["nftables"] = [x for x in doc["nftables"] if x.get("map", {}).get("name") != "snat4"]
    assert shape.differences(want, shape.from_json(doc)) == ["map snat4 missing"]


def test_a_foreign_rule_and_a_changed_hook_are_named():
    want = shape.from_json(kernel_listing())
    doc = kernel_listing()
    doc["nftables"].append({"rule": {"family": "inet", "table": "egress_agent",
                                     "chain": "postrouting", "expr": [{"accept": None}]}})
    for x in doc["nftables"]:
        if x.get("chain", {}).get("name") == "prerouting":
            x["chain"]["prio"] = 0
    diffs = shape.differences(want, shape.from_json(doc))
    n = len(want.chain("postrouting")[1])
    assert diffs[0] == f"chain postrouting: {n} of {n} skeleton rules, 1 foreign"
    assert diffs[1].startswith("chain prerouting: hook ('filter', 'prerouting', 0, 'accept')")


def test_rule_tokens_survive_nfts_rewriting():
    # nft lists `meta mark & 0x80000000 == 0x80000000` as a prefix match: the
    # shape keeps only what survives (statements, verdicts, sets, comment)
    body = 'meta mark & 0x80000000 == 0x80000000 counter drop comment "egress unavailable: drop"'
    assert shape.rule_from_text(body) == ("egress unavailable: drop", ("counter", "drop"))
    assert shape.rule_from_text("meta mark set ip saddr map @source4 goto decide") == \
        (None, ("@source4", "goto decide"))


# --- what a full sync finds and repairs -------------------------------------------------

def lab_config(tmp_path):
    text = resources.files("egress_agent").joinpath("lab/demo.yaml").read_text()
    cfg = parse(text.replace("@PREFIX@", "t"), "demo.yaml").config
    return cfg.model_copy(update={"state_dir": str(tmp_path)})


HOST = HostState(addresses=frozenset({"203.0.113.10", "203.0.113.11", "203.0.113.20",
                                      "203.0.113.140", "2001:db8:10::1"}),
                 links_up=frozenset({"up0", "up1"}))


@pytest.fixture
def synced(tmp_path):
    cfg = lab_config(tmp_path)
    nft, routing = FakeNft(), FakeRouting()
    rec = Reconciler(nft, routing, Store(tmp_path), lambda: HOST, cgroup_root=str(tmp_path))
    first = rec.sync(cfg, "start", full=True)
    assert first.drift == [] and rec.sync(cfg, "resync", full=True).changed is False
    return cfg, nft, routing, rec


def repaired(cfg, nft, rec, trigger="drift"):
    """A full sync after damage; then the kernel is whole: the next one finds nothing."""
    r = rec.sync(cfg, trigger, full=True)
    again = rec.sync(cfg, "resync", full=True)
    assert not again.changed and again.drift == [], again
    assert observed_from_json(nft.list_table()).shape == skeleton_shape()
    return r


def test_flushed_skeleton_chain_is_rewritten_in_place_and_plan_sees_it(synced):
    cfg, nft, _, rec = synced
    n = len(skeleton_shape().chain("postrouting")[1])
    nft.run(f"flush chain {T} postrouting")
    # `plan --against-running` diffs the same observation: not "no change"
    p, _, _, _ = rec.plan(cfg, rec.observe())
    tx = transaction(p.desired, rec.observe())
    assert not tx.full and tx.repaired == ["postrouting"] and tx.added == 0
    assert tx.lines[0] == f"flush chain {T} postrouting" and tx.lines[1] == f"table {T} {{"
    r = repaired(cfg, nft, rec)
    assert [str(f) for f in r.drift] == [f"chain postrouting: 0 of {n} skeleton rules"]
    assert r.skeleton_replaced and {f.kind for f in r.drift} == {"skeleton"}


def test_a_missing_set_or_a_moved_hook_replaces_the_table(synced):
    cfg, nft, _, rec = synced
    del nft.table.sets["snat4"]
    nft.gen += 1  # a commit by another process: nftables' generation moves
    p, _, _, _ = rec.plan(cfg, rec.observe())
    assert transaction(p.desired, rec.observe()).full
    r = repaired(cfg, nft, rec)
    assert [str(f) for f in r.drift][0] == "map snat4 missing"
    hook = nft.table.chains["prerouting"].hook
    nft.table.chains["prerouting"].hook = hook[:2] + (0,) + hook[3:]
    nft.gen += 1
    assert transaction(p.desired, rec.observe()).full
    repaired(cfg, nft, rec)


def test_a_deleted_skeleton_chain_is_declared_again(synced):
    cfg, nft, _, rec = synced
    del nft.table.chains["refuse"]
    nft.gen += 1  # a commit by another process: nftables' generation moves
    p, _, _, _ = rec.plan(cfg, rec.observe())
    tx = transaction(p.desired, rec.observe())
    assert tx.repaired == ["refuse"] and f"flush chain {T} refuse" not in tx.lines
    r = repaired(cfg, nft, rec)
    assert [str(f) for f in r.drift] == ["chain refuse missing"]


def test_deleted_table_is_named_and_rewritten_whole(synced):
    cfg, nft, _, rec = synced
    elements = {k: dict(v.elements) for k, v in nft.table.sets.items()}
    nft.run(f"delete table {T}")
    r = repaired(cfg, nft, rec)
    assert [str(f) for f in r.drift] == [f"table {T} missing"]
    assert {k: v.elements for k, v in nft.table.sets.items()} == elements


def test_flushed_map_is_refilled_without_replacing_the_table(synced):
    cfg, nft, _, rec = synced
    n = len(nft.elements("snat4"))
    assert n
    nft.run(f"flush map {T} snat4")
    r = repaired(cfg, nft, rec)
    assert [str(f).split(" (")[0] for f in r.drift] == [f"map snat4: {n} elements missing, 0 foreign"]
    assert not r.skeleton_replaced and r.added == n


def test_foreign_element_and_deleted_ip_rule_are_named(synced):
    cfg, nft, routing, rec = synced
    nft.elements("snat6")[0x12345] = "2001:db8:10::99"
    nft.gen += 1  # a commit by another process: nftables' generation moves
    rule = next(iter(routing.rules))
    routing.rules.discard(rule)
    r = repaired(cfg, nft, rec)
    found = [str(f) for f in r.drift]
    assert found[0].startswith("map snat6: 0 elements missing, 1 foreign"), found
    assert found[1] == f"{rule.describe()} missing"


def test_a_config_change_is_not_drift(synced, tmp_path):
    cfg, nft, _, rec = synced
    fewer = cfg.model_copy(update={"workloads": cfg.workloads[:1]})
    r = rec.sync(fewer, "config", full=True)
    assert r.changed and r.drift == []


@pytest.mark.parametrize("trigger,full", [("resync", True), ("drift-routes", False)])
def test_a_route_the_kernel_dropped_with_its_link_is_not_drift(synced, trigger, full):
    cfg, nft, routing, rec = synced
    route = next(iter(routing.routes))
    routing.remove_link(route.dev)
    rec.read_host = lambda: HostState(HOST.addresses, HOST.links_up - {route.dev})
    r = rec.sync(cfg, trigger, full=full)
    assert r.drift == [], r.drift


class OtherNft(FakeNft):
    """A kernel whose nft lists one skeleton rule otherwise (another nft version)."""

    def list_table(self, terse: bool = False) -> dict:
        doc = super().list_table(terse)
        for x in doc["nftables"]:
            if x.get("rule", {}).get("chain") == "refuse":
                x["rule"]["expr"].append({"counter": None})
        return doc


def test_a_kernel_that_lists_the_skeleton_otherwise_is_learnt_once_not_repaired_forever(tmp_path):
    cfg = lab_config(tmp_path)
    nft = OtherNft()
    rec = Reconciler(nft, FakeRouting(), Store(tmp_path), lambda: HOST, cgroup_root=str(tmp_path))
    first = rec.sync(cfg, "start", full=True)
    assert any("otherwise than expected" in n for n in first.notes), first.notes
    assert rec.expected_shape is not None
    again = rec.sync(cfg, "resync", full=True)
    assert not again.changed and again.drift == []
    nft.run(f"flush chain {T} postrouting")  # real drift is still seen
    r = rec.sync(cfg, "drift", full=True)
    assert r.skeleton_replaced and r.drift
    # a new process on a table this kernel already holds: the first repair in
    # place teaches it too
    rec2 = Reconciler(nft, FakeRouting(), Store(tmp_path), lambda: HOST, cgroup_root=str(tmp_path))
    first = rec2.sync(cfg, "start", full=True)
    assert any("otherwise than expected" in n for n in first.notes), first.notes
    assert not rec2.sync(cfg, "resync", full=True).changed


def test_drift_triggers_read_only_what_their_event_is_about(synced):
    """An nft event reads the table, a rule/route event the routes; neither reads
    the host (addresses and links have their own events), except to tell whether
    a missing route's link is up."""
    cfg, nft, routing, rec = synced
    reads = []
    rec.read_host = lambda: (reads.append(1), HOST)[1]
    n = len(skeleton_shape().chain("postrouting")[1])
    nft.run(f"flush chain {T} postrouting")
    r = rec.sync(cfg, "drift")
    assert r.mode == "drift" and r.skeleton_replaced
    assert [str(f) for f in r.drift] == [f"chain postrouting: 0 of {n} skeleton rules"]
    rule = next(r for r in routing.rules if r.action == "lookup")
    routing.rules.discard(rule)
    r = rec.sync(cfg, "drift-routes")
    assert r.mode == "incremental" and [str(f) for f in r.drift] == [f"{rule.describe()} missing"]
    assert rule in routing.rules and reads == []
    route = next(iter(routing.routes))
    routing.routes.discard(route)
    r = rec.sync(cfg, "drift-routes")
    assert [str(f) for f in r.drift] == [f"{route.describe()} missing"] and reads == [1]
    assert not rec.sync(cfg, "resync", full=True).changed and reads == [1, 1]


def test_drift_repairs_are_counted_by_kind_in_the_metrics():
    from prometheus_client import CollectorRegistry, generate_latest
    from egress_agent import metrics
    state = metrics.State()
    state.record_drift(["skeleton", "skeleton", "elements"])
    state.record_drift(["table"])
    reg = CollectorRegistry()
    reg.register(metrics.Collector(state))
    text = generate_latest(reg).decode()
    assert 'egress_agent_drift_repairs_total{kind="skeleton"} 1.0' in text
    assert 'egress_agent_drift_repairs_total{kind="elements"} 1.0' in text
    assert 'egress_agent_drift_repairs_total{kind="table"} 1.0' in text


# --- netlink events ---------------------------------------------------------------------

CAPTURED = json.loads((FIXTURES / "netlink_events.json").read_text())


def replay(case: str) -> list:
    """What the captured datagrams of `case` yield: Generations and route findings."""
    events, out = nftwatch.NftEvents(), []
    for source, hexdata in CAPTURED[case]:
        for mtype, payload in nftwatch.messages(bytes.fromhex(hexdata)):
            if source == "nft":
                g = events.feed(mtype, payload)
                if g is not None:
                    out.append(g)
            elif (what := nftwatch.route_event_ours(mtype, payload)):
                out.append(what)
    return out


@pytest.mark.parametrize("case,what", [
    ("flush_ruleset", {"DELTABLE", "DELCHAIN", "DELRULE", "DELSET"}),
    ("flush_chain_postrouting", {"DELRULE"}),
    ("delete_rule", {"DELRULE"}),
    ("flush_map_snat4", {"DELSETELEM"}),
])
def test_foreign_commits_touching_our_table_are_seen(case, what):
    gens = replay(case)
    assert len(gens) == 1 and gens[0].ours_touched and what <= set(gens[0].what), gens
    assert gens[0].proc == "nft" and gens[0].pid > 0


def test_commits_to_other_tables_are_not_ours():
    gens = replay("other_table")
    assert gens and not any(g.ours_touched for g in gens)


def test_rules_and_routes_in_our_ranges_only():
    assert replay("ip_rule_ours") == ["rule -4 priority 7101 added", "rule -4 priority 7101 deleted"]
    assert replay("route_ours") == ["route -4 table 7102 added", "route -4 table 7102 deleted"]
    assert replay("ip_rule_foreign") == [] and replay("route_foreign") == []


def test_truncated_datagram_yields_no_message():
    data = bytes.fromhex(CAPTURED["delete_rule"][0][1])
    assert list(nftwatch.messages(data[:10])) == []
    assert len(list(nftwatch.messages(data[:-1]))) < len(list(nftwatch.messages(data)))


def test_own_commits_are_recognised_by_thread_id():
    # NFTA_GEN_PROC_PID is the committing thread's id: a sync in any thread is ours
    assert nftwatch.is_own(os.getpid())
    seen = {}
    t = threading.Thread(target=lambda: seen.setdefault("own", nftwatch.is_own(threading.get_native_id())))
    t.start()
    t.join()
    assert seen["own"] is True
    assert not nftwatch.is_own(1)  # pid 1 is never a thread of the test process


class LossyWatch(nftwatch.Watch):
    """A Watch on socket pairs: the first read fails with ENOBUFS, then the
    captured `flush_ruleset` datagrams arrive."""

    def open(self):
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
        nft, rt = self.pairs[0][0], self.pairs[1][0]
        lossy = Lossy(nft.fileno())
        for _, hexdata in CAPTURED["flush_ruleset"]:
            self.pairs[0][1].send(bytes.fromhex(hexdata))
        return lossy, rt


class Lossy(socket.socket):
    def __init__(self, fd):
        super().__init__(fileno=os.dup(fd))
        self.failed = False

    def recv(self, n):
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return super().recv(n)


def test_enobufs_is_drift_and_the_watch_goes_on():
    reasons: list[str] = []
    stop = threading.Event()

    def on_drift(kind, why):
        reasons.append(f"{kind}: {why}")
        if len(reasons) >= 2:
            stop.set()
    w = LossyWatch(on_drift)
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert reasons[0] == "lost: nft events lost (ENOBUFS)"
    assert reasons[1].startswith("nft: nft generation")
    assert "DELTABLE" in reasons[1] and "table inet egress_agent" in reasons[1], reasons


# --- the guard ip rules (names.GUARD_PRIORITY) --------------------------------------------

def guard(src="10.0.1.0/24", family=4):
    from egress_agent import names
    return Rule(family, names.GUARD_PRIORITY, 0, names.SEEN_FLAG, 0, src, "prohibit")


def test_plan_guards_every_managed_source_prefix(tmp_path):
    from egress_agent.alloc import Allocations, allocate
    from egress_agent.hoststate import HostFacts, Usable
    from egress_agent.plan import build
    cfg = lab_config(tmp_path)
    a, _ = allocate(cfg, Allocations(), Usable())
    rules = build(cfg, a, HostFacts(usable=Usable(), addresses=frozenset(
        {"10.0.1.1", "fd00:1::1", "203.0.113.2"}))).desired.rules
    assert {r for r in rules if r.action != "lookup"} == {
        guard(), guard("fd00:1::/64", 6),
        # the host's own addresses inside managed prefixes skip the guard
        Rule(4, 7099, 0, 0, 0, "10.0.1.1/32", "goto", 7101),
        Rule(6, 7099, 0, 0, 0, "fd00:1::1/128", "goto", 7101),
        Rule(4, 7101, 0, 0, 0, "", "nop"), Rule(6, 7101, 0, 0, 0, "", "nop")}
    assert guard().describe() == "rule -4 priority 7100 from 10.0.1.0/24 fwmark 0x0/0x20000000 prohibit"
    assert Rule(4, 7099, 0, 0, 0, "10.0.1.1/32", "goto", 7101).describe() == \
        "rule -4 priority 7099 from 10.0.1.1/32 goto 7101"


def test_guard_is_added_after_the_batch_and_deleted_before_it():
    """It prohibits what the table did not mark: it must never exist without the
    table's marking chain (first start, teardown)."""
    from egress_agent.model import RouteOp
    from egress_agent.routing.diff import diff_routes, split_ops
    lookup = Rule(4, 7101, 0x100000, 0xff00000, 7101)
    before, after = split_ops(diff_routes(set(), {guard(), lookup}, set(), set()))
    assert before == [RouteOp("add", lookup)] and after == [RouteOp("add", guard())]
    before, after = split_ops(diff_routes(set(), set(), set(), {guard(), lookup}))
    assert before == [RouteOp("delete", guard())] and after == [RouteOp("delete", lookup)]


def test_a_prohibit_rule_outside_the_guard_priority_is_refused():
    from egress_agent.routing.diff import check_reserved
    check_reserved(guard())
    with pytest.raises(ValueError, match="not one of the guard's rules"):
        check_reserved(Rule(4, 7101, 0, 0x20000000, 0, "10.0.1.0/24", "prohibit"))
    with pytest.raises(ValueError, match="not one of the guard's rules"):
        check_reserved(Rule(4, 7099, 0, 0, 0, "10.0.1.1/32", "goto", 32766))


def test_teardown_removes_the_guard_before_the_table(synced):
    cfg, nft, routing, rec = synced
    assert guard() in routing.rules
    order = []
    real_run, real_apply = nft.run, routing.apply
    nft.run = lambda batch: (order.append("nft"), real_run(batch))[1]
    routing.apply = lambda ops: (order.extend(str(o.obj.action) for o in ops
                                              if isinstance(o.obj, Rule)), real_apply(ops))[1]
    rec.teardown()
    assert order.index("prohibit") < order.index("nft"), order
    assert not routing.rules and nft.table is None


class BrokenOnceWatch(nftwatch.Watch):
    """The first pair of sockets fails with EIO on the first read; the second works."""

    opened = 0

    def open(self):
        self.opened += 1
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.keep = (b, d)
        b.send(b"x")
        if self.opened == 1:
            return Failing(a.fileno()), c
        for _, hexdata in CAPTURED["flush_chain_postrouting"]:
            b.send(bytes.fromhex(hexdata))
        return a, c


class Failing(socket.socket):
    def __init__(self, fd):
        super().__init__(fileno=os.dup(fd))

    def recv(self, n):
        raise OSError(errno.EIO, "Input/output error")


def test_a_socket_error_reopens_the_watch_and_asks_for_a_full_check():
    reasons, errors = [], []
    stop = threading.Event()

    def on_drift(kind, why):
        reasons.append(kind)
        if kind == "nft":
            stop.set()
    w = BrokenOnceWatch(on_drift, errors.append)
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and w.opened == 2
    assert reasons[0] == "lost" and "nft" in reasons, reasons
    assert "reopening (1 of 5)" in errors[0]


def test_a_watch_that_keeps_failing_gives_up_loudly():
    class AlwaysBroken(BrokenOnceWatch):
        def open(self):
            self.opened = 0  # every pair fails
            return super().open()
    errors = []
    with pytest.raises(OSError):
        AlwaysBroken(lambda k, w: None, errors.append).run(threading.Event(), retries=2)
    assert len(errors) == 2


@pytest.mark.parametrize("case,address", [("address_managed", "10.0.1.254"),
                                          ("address6_managed", "fd00:1::fe")])
def test_a_host_address_in_managed_sources_is_checked_like_a_rule(case, address):
    """It changes the guard's exemptions (names.EXEMPT_PRIORITY)."""
    import ipaddress
    heard = []
    managed = [ipaddress.ip_network("10.0.1.0/24"), ipaddress.ip_network("fd00:1::/64")]
    w = nftwatch.Watch(lambda kind, why: heard.append((kind, why)), guarded=lambda: managed)
    for source, hexdata in CAPTURED[case]:
        w._handle(source, bytes.fromhex(hexdata), nftwatch.NftEvents())
    assert ("routes", f"host address {address} added in managed_sources") in heard
    assert ("routes", f"host address {address} deleted in managed_sources") in heard
    heard.clear()
    managed = []  # not in a managed prefix: nothing to check
    for source, hexdata in CAPTURED[case]:
        w._handle(source, bytes.fromhex(hexdata), nftwatch.NftEvents())
    assert heard == []


def test_a_foreign_rule_in_our_priorities_to_a_table_not_ours_is_left_alone(synced):
    cfg, nft, routing, rec = synced
    foreign = Rule(4, 7200, 1, 0xFFFFFFFF, 254)
    routing.rules.add(foreign)
    r = rec.sync(cfg, "drift-routes")
    assert not r.changed and r.drift == [] and foreign in routing.rules


def test_route_events_caused_by_our_own_sockets_are_ignored():
    """The agent's own rule/route changes come back as notifications carrying
    the port id of its socket: no check for them."""
    import struct as st
    heard = []
    w = nftwatch.Watch(lambda kind, why: heard.append(why))
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nftwatch.NETLINK_ROUTE)
    s.bind((0, 0))
    ours = s.getsockname()[0]
    try:
        for source, hexdata in CAPTURED["ip_rule_ours"]:
            data = bytearray(bytes.fromhex(hexdata))
            w._handle(source, bytes(data), nftwatch.NftEvents())  # as captured: `ip rule`
            st.pack_into("=I", data, 12, ours)  # nlmsg_pid: as if we had asked
            w._handle(source, bytes(data), nftwatch.NftEvents())
    finally:
        s.close()
    assert heard == ["rule -4 priority 7101 added", "rule -4 priority 7101 deleted"]
