"""The Reconciler on the fakes, through its public API only: `sync(cfg, trigger,
full)` and the SyncResult it returns, judged by what the fake kernel holds
after (its listing, its traces, the order of its ops), never by timings.

- the first sync is full; later ones are incremental and leave the kernel as
  a fresh agent's full sync would (the oracle: a new Reconciler on the same
  kernel and store finds nothing to change);
- a batch the kernel refuses changes nothing, is not remembered, and makes the
  next sync a full one;
- routes and lookup rules go in before the batch that marks traffic for them
  and out after the batch that stops marking; the guard rules the other way;
- a lost or corrupt store is rebuilt from the live maps (adoption);
- drift (a flushed chain, deleted elements, a deleted table, a foreign rule)
  is repaired to exactly what was there.
"""

from __future__ import annotations

from importlib import resources
from typing import Optional

import pytest

from egress_agent import names
from egress_agent.config import Config, parse
from egress_agent.hoststate import HostState
from egress_agent.model import Route, RouteOp, Rule
from egress_agent.nft import NftError
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler, SyncResult
from egress_agent.nft.diff import T
from egress_agent.nft.listing import observed_from_json
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store
from tracer import trace

ADDRESSES = frozenset({"203.0.113.10", "203.0.113.11", "203.0.113.20", "203.0.113.140",
                       "2001:db8:10::1", "2001:db8:11::1"})
M42 = ("10.0.1.2", "192.0.2.10", "tcp", 8080)
M43 = "  - {id: m43, app: billing, source: [10.0.1.3], interface: vm-m43}\n"
LEGACY_POLICY = ("  - name: legacy-udp\n"
                 "    match: {workloads: [m43], protocols: [udp]}\n"
                 "    egress: {ipv4: legacy, ipv4_fallback: drop}\n")
PARTNER_POLICY = ("  - name: partner-via-link\n"
                  "    match: {destinations: [198.51.100.10/32]}\n"
                  "    egress: {ipv4: partner-link, ipv4_fallback: drop}\n")
PARTNER_IP = ("  - id: partner-link\n    app: partners\n    ipv4: 203.0.113.140\n"
              "    via: {dev: up1, gateway: 203.0.113.129}\n")


def demo() -> str:
    return resources.files("egress_agent").joinpath("lab/demo.yaml").read_text().replace(
        "@PREFIX@", "t")


class Host:
    """What `read_host` answers; the test changes it (a failover)."""

    def __init__(self) -> None:
        self.addresses = set(ADDRESSES)

    def __call__(self) -> HostState:
        return HostState(frozenset(self.addresses), links_up=frozenset({"up0", "up1"}))


class Agent:
    """A Reconciler on fakes that share one journal of nft batches and route ops."""

    def __init__(self, tmp_path, nft: Optional[FakeNft] = None,
                 routing: Optional[FakeRouting] = None, host: Optional[Host] = None):
        self.tmp = tmp_path
        self.journal: list = []
        self.nft = nft or FakeNft()
        self.routing = routing or FakeRouting()
        self.nft.journal = self.routing.journal = self.journal
        self.host = host or Host()
        self.rec = self.fresh()

    def fresh(self) -> Reconciler:
        """A new agent process on the same kernel, store and host."""
        return Reconciler(self.nft, self.routing, Store(self.tmp / "state"), self.host,
                          cgroup_root=str(self.tmp), live_leases=lambda marks: frozenset())

    def cfg(self, text: str) -> Config:
        c = parse(text, "config.yaml").config
        return c.model_copy(update={"state_dir": str(self.tmp / "state")})

    def sync(self, text: str, trigger: str = "config", full: bool = False) -> SyncResult:
        return self.rec.sync(self.cfg(text), trigger, full)

    def held(self):
        """What the kernel holds: elements, generated chains, skeleton, routes, rules."""
        o = observed_from_json(self.nft.list_table())
        return ({k: v for k, v in o.elements.items() if v}, o.chains, o.skeleton, o.shape,
                frozenset(self.routing.routes), frozenset(self.routing.rules))

    def assert_as_a_full_sync_would_leave_it(self, text: str) -> None:
        """The oracle: a new agent, planning everything from the store and the
        kernel, finds nothing to change and no drift."""
        r = self.fresh().sync(self.cfg(text), "start", full=True)
        assert r.mode == "full" and not r.changed and r.drift == [] and not r.adopted, r.to_json()


@pytest.fixture
def agent(tmp_path) -> Agent:
    a = Agent(tmp_path)
    first = a.sync(demo(), "start")
    assert first.mode == "full" and first.added and not first.skeleton_replaced, first.to_json()
    return a


# --- full and incremental ------------------------------------------------------------

def test_the_first_sync_is_full_and_the_kernel_then_does_what_the_config_says(agent):
    assert agent.nft.batches and agent.nft.batches[0].startswith(f"add table {T}\n")
    v = trace(agent.nft, *M42, iif="vm-m42")
    assert v.action == "snat" and v.address in ("203.0.113.10", "203.0.113.11")
    assert trace(agent.nft, "10.0.1.4", "192.0.2.10", "tcp", 443, iif="vm-m44").address == \
        "203.0.113.20"
    partner = trace(agent.nft, "10.0.1.3", "198.51.100.10", "tcp", 8080, iif="vm-m43")
    assert partner.address == "203.0.113.140"
    assert agent.routing.routes == {Route(4, names.route_table(partner.eid), "up1", "203.0.113.129")}
    agent.assert_as_a_full_sync_would_leave_it(demo())


def test_a_sync_with_nothing_changed_sends_nothing(agent):
    sent = len(agent.journal)
    r = agent.sync(demo(), "config")
    assert r.mode == "incremental" and not r.changed and r.batch == ""
    assert len(agent.journal) == sent


EDITS = {
    "remove a workload": lambda t: t.replace(M43, "").replace(LEGACY_POLICY, ""),
    "add a workload": lambda t: t.replace(
        M43, M43 + "  - {id: m45, app: billing, source: [10.0.1.5], interface: vm-m45}\n"),
    "move a workload to another app": lambda t: t.replace(
        "{id: m44, app: web,", "{id: m44, app: billing,").replace(
        "  - {id: m44-ip, workload: m44, ipv4: 203.0.113.20}\n", ""),
    # billing-2 drains while a new workload arrives in its app
    "drain an egress IP": lambda t: EDITS["add a workload"](t).replace(
        "ipv4: 203.0.113.11, ipv6: \"2001:db8:11::/64\"}",
        "ipv4: 203.0.113.11, ipv6: \"2001:db8:11::/64\", state: draining}"),
    "remove a policy": lambda t: t.replace(LEGACY_POLICY, ""),
    "remove an egress IP with its route": lambda t: t.replace(PARTNER_IP, "").replace(
        PARTNER_POLICY, ""),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_incremental_sync_leaves_the_kernel_as_a_full_sync_would(agent, edit):
    text = EDITS[edit](demo())
    assert text != demo(), "the edit changed nothing: the demo config changed"
    r = agent.sync(text, "config")
    assert r.mode == "incremental" and r.changed, r.to_json()
    agent.assert_as_a_full_sync_would_leave_it(text)
    # and back again
    r = agent.sync(demo(), "config")
    assert r.mode == "incremental" and r.changed, r.to_json()
    agent.assert_as_a_full_sync_would_leave_it(demo())


def test_a_failover_moves_traffic_and_back(agent):
    before = trace(agent.nft, *M42, iif="vm-m42")
    agent.host.addresses.discard(before.address)
    r = agent.sync(demo(), "netlink")
    assert r.mode == "incremental" and r.changed
    after = trace(agent.nft, *M42, iif="vm-m42")
    assert after.action == "snat" and after.address not in (before.address, None)
    agent.assert_as_a_full_sync_would_leave_it(demo())
    agent.host.addresses.add(before.address)
    agent.sync(demo(), "netlink")
    agent.assert_as_a_full_sync_would_leave_it(demo())


def test_a_workload_removed_leaves_nothing_of_it_in_the_kernel(agent):
    mark = trace(agent.nft, "10.0.1.3", "192.0.2.10", "tcp", 8080, iif="vm-m43").workload_mark
    agent.sync(EDITS["remove a workload"](demo()))
    elements = agent.held()[0]
    assert all(mark not in (k if isinstance(k, tuple) else (k,)) and v != mark
               for es in elements.values() for k, v in es), "an element of m43 is left"
    assert all(names.split_mark(k)[0] != mark
               for m in (names.SNAT4_PORTS_MAP, names.SNAT4_ADDR_MAP, names.SNAT6_MAP)
               for k, _ in elements.get(m, ()))
    # its source is still managed: unknown now, so dropped
    assert trace(agent.nft, "10.0.1.3", "192.0.2.10", "tcp", 8080, iif="vm-m43").action == "drop"


# --- the kernel refuses a batch -----------------------------------------------------------

def test_a_refused_batch_changes_nothing_is_not_remembered_and_the_next_sync_is_full(agent):
    held, saved = agent.held(), Store(agent.tmp / "state").load()
    text = EDITS["remove a workload"](demo())
    agent.nft.refuse_next()
    with pytest.raises(NftError, match="Cannot allocate memory"):
        agent.sync(text, "config")
    assert agent.held() == held
    assert Store(agent.tmp / "state").load() == saved, "the store remembered a refused sync"
    r = agent.sync(text, "config")  # not asked to be full: the failure made it so
    assert r.mode == "full" and r.changed and r.drift == []
    agent.assert_as_a_full_sync_would_leave_it(text)


def test_a_refused_batch_that_added_routes_first_leaves_only_harmless_routes(agent):
    """The route for a new egress IP goes in before the batch; when the batch is
    refused, that route stays (nothing marks traffic for it) and the next, full
    sync completes the change."""
    without = EDITS["remove an egress IP with its route"](demo())
    agent.sync(without)
    assert not agent.routing.routes
    agent.nft.refuse_next()
    with pytest.raises(NftError):
        agent.sync(demo())
    assert agent.routing.routes, "the route was not added before the batch"
    assert trace(agent.nft, "10.0.1.3", "198.51.100.10", "tcp", 8080, iif="vm-m43").address != \
        "203.0.113.140"
    r = agent.sync(demo())
    assert r.mode == "full" and r.changed
    assert trace(agent.nft, "10.0.1.3", "198.51.100.10", "tcp", 8080, iif="vm-m43").address == \
        "203.0.113.140"
    agent.assert_as_a_full_sync_would_leave_it(demo())


def test_an_incremental_sync_trusts_memory_and_a_refusal_sends_it_back_to_the_kernel(agent):
    """Unseen damage (no drift event): the incremental sync does not read the
    table (its cost does not grow with it) and sends a batch that deletes an
    element the kernel no longer has; the kernel refuses all of it (ENOENT),
    and the next sync reads the kernel, repairs and applies the edit."""
    agent.nft.run(f"flush map {T} {names.SNAT4_PORTS_MAP}")
    damaged = agent.held()
    reads: list = []
    listing = agent.nft.list_table
    agent.nft.list_table = lambda terse=False: (reads.append(terse), listing(terse))[1]
    text = EDITS["remove a workload"](demo())
    with pytest.raises(NftError, match="No such file or directory"):
        agent.sync(text)
    assert reads == []
    assert agent.held() == damaged
    reads.clear()
    r = agent.sync(text)
    assert r.mode == "full" and reads, r.to_json()
    assert [f.kind for f in r.drift] == ["elements"], r.drift
    agent.nft.list_table = listing
    agent.assert_as_a_full_sync_would_leave_it(text)


# --- the order of route ops and the nft batch ---------------------------------------------

def order(journal: list) -> list[str]:
    """The journal as words: nft, or the op and the kind of object."""
    out = []
    for what, x in journal:
        if what == "nft":
            out.append("nft")
        else:
            # the guard proper (prohibit); its exemptions (goto, nop) are ordinary rules
            kind = "route" if isinstance(x.obj, Route) else {
                "prohibit": "guard", "lookup": "lookup"}.get(x.obj.action, "exempt")
            out.append(f"{x.op} {kind}")
    return out


def test_routes_go_in_before_the_batch_that_marks_for_them_and_out_after(agent):
    without = EDITS["remove an egress IP with its route"](demo())
    agent.journal.clear()
    agent.sync(without)
    got = order(agent.journal)
    assert got[0] == "nft" and set(got[1:]) == {"delete route", "delete lookup"}, got
    agent.journal.clear()
    agent.sync(demo())
    got = order(agent.journal)
    assert got[-1] == "nft" and {"add route", "add lookup"} == set(got[:-1]), got


def test_the_guard_goes_in_after_the_first_batch_and_out_before_the_batch_that_unmarks(tmp_path):
    a = Agent(tmp_path)
    a.sync(demo(), "start")
    got = order(a.journal)
    n = got.index("nft")
    assert "add guard" not in got[:n] and "add guard" in got[n:], got
    assert "add lookup" in got[:n] and "add route" in got[:n], got
    # one managed prefix fewer: its guard goes before the batch that stops marking it
    fewer = demo().replace('managed_sources: [10.0.1.0/24, "fd00:1::/64"]',
                           "managed_sources: [10.0.1.0/24]")
    assert fewer != demo()
    a.journal.clear()
    a.sync(fewer)
    got = order(a.journal)
    assert got.index("delete guard") < got.index("nft"), got
    gone = [x.obj for w, x in a.journal if w == "route" and x.op == "delete"]
    assert any(isinstance(r, Rule) and r.src == "fd00:1::/64" for r in gone), gone
    a.assert_as_a_full_sync_would_leave_it(fewer)


def test_teardown_takes_the_guard_out_before_the_table_and_routes_after(agent):
    agent.journal.clear()
    r = agent.rec.teardown()
    got = order(agent.journal)
    n = got.index("nft")
    assert set(got[:n]) == {"delete guard"}, got
    assert set(got[n + 1:]) == {"delete route", "delete lookup", "delete exempt"}, got
    assert agent.nft.table is None and not agent.routing.routes and not agent.routing.rules
    assert r.removed


# --- adoption -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["lost", "corrupt"])
def test_a_lost_or_corrupt_store_is_adopted_from_the_live_maps(agent, how):
    held = agent.held()
    store = Store(agent.tmp / "state")
    alloc = store.load()
    if how == "lost":
        store.allocations_path.unlink()
    else:
        store.allocations_path.write_text('{"version": 1, "wids": ')
    r = agent.fresh().sync(agent.cfg(demo()), "start")
    assert r.adopted and not r.changed, r.to_json()
    assert (r.quarantined is not None) == (how == "corrupt")
    assert agent.held() == held
    assert store.load() == alloc
    again = agent.fresh().sync(agent.cfg(demo()), "start")  # the adoption was written down
    assert not again.adopted and not again.changed and again.quarantined is None


def test_adoption_with_a_config_edit_keeps_the_others_blocks(agent):
    ports = {w: trace(agent.nft, src, "192.0.2.10", "tcp", 8080, iif=iif).ports
             for w, src, iif in (("m42", "10.0.1.2", "vm-m42"), ("m44", "10.0.1.4", "vm-m44"))}
    Store(agent.tmp / "state").allocations_path.unlink()
    text = EDITS["remove a workload"](demo())
    rec = agent.fresh()
    r = rec.sync(agent.cfg(text), "start")
    assert r.adopted and r.removed and not r.added, r.to_json()
    assert {w: trace(agent.nft, src, "192.0.2.10", "tcp", 8080, iif=iif).ports
            for w, src, iif in (("m42", "10.0.1.2", "vm-m42"),
                                ("m44", "10.0.1.4", "vm-m44"))} == ports
    agent.assert_as_a_full_sync_would_leave_it(text)


# --- drift ---------------------------------------------------------------------------------

DAMAGE = {
    "flush chain postrouting": f"flush chain {T} postrouting",
    "flush chain policies": f"flush chain {T} policies",
    "flush map snat4": f"flush map {T} {names.SNAT4_PORTS_MAP}",
    "delete an element": None,  # one snat4 element, read from the kernel
    "delete the table": f"delete table {T}",
    "a foreign rule": f"add rule {T} prerouting accept",
    "a foreign element": f"add element {T} {names.SNAT6_MAP} {{ 0x00012345 : 2001:db8:10::99 }}",
}


@pytest.mark.parametrize("trigger,full", [("resync", True), ("drift", False)])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_drift_is_repaired_to_exactly_what_was_there(agent, damage, trigger, full):
    held = agent.held()
    whole = trace(agent.nft, *M42, iif="vm-m42")
    batch = DAMAGE[damage]
    if batch is None:
        key = next(iter(agent.nft.elements(names.SNAT4_PORTS_MAP)))
        batch = f"delete element {T} {names.SNAT4_PORTS_MAP} {{ 0x{key:08x} }}"
    agent.nft.run(batch)
    assert agent.held() != held
    r = agent.rec.sync(agent.cfg(demo()), trigger, full)
    assert r.drift and r.changed, r.to_json()
    assert agent.held() == held
    assert trace(agent.nft, *M42, iif="vm-m42") == whole
    again = agent.rec.sync(agent.cfg(demo()), "resync", full=True)
    assert not again.changed and again.drift == []


def test_a_deleted_route_and_lookup_rule_are_repaired(agent):
    held = agent.held()
    route = next(iter(agent.routing.routes))
    rule = next(r for r in agent.routing.rules if r.action == "lookup")
    agent.routing.apply([RouteOp("delete", route), RouteOp("delete", rule)])
    r = agent.rec.sync(agent.cfg(demo()), "resync", full=True)
    assert {str(f) for f in r.drift} == {f"{route.describe()} missing", f"{rule.describe()} missing"}
    assert agent.held() == held


def test_a_draining_ip_takes_no_new_connection_of_its_workloads_or_new_ones(agent):
    """billing-2 (203.0.113.11) drains while m45 arrives in its app (README,
    "Draining": its workloads move to the app's other IPs; open connections
    keep their translation in conntrack)."""
    def address(src, iif):
        return trace(agent.nft, src, "192.0.2.10", "tcp", 8080, iif=iif).address
    who = (("10.0.1.2", "vm-m42"), ("10.0.1.3", "vm-m43"))
    assert "203.0.113.11" in {address(*w) for w in who}
    r = agent.sync(EDITS["drain an egress IP"](demo()))
    assert r.mode == "incremental" and r.added
    assert {address(*w) for w in who + (("10.0.1.5", "vm-m45"),)} == {"203.0.113.10"}
