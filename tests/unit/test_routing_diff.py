"""diff_routes (pure), FakeRouting (the in-memory kernel), RoutingError text,
and the HostState value the planner reads."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent import names
from egress_agent.hoststate import HostState
from egress_agent.model import Route, RouteOp, Rule
from egress_agent.routing import RoutingError, RoutingPort, diff_routes, split_ops
from egress_agent.routing.fake import FakeRouting


def route(eid: int, family: int = 4, dev: str = "up1", gw: str | None = "auto") -> Route:
    if gw == "auto":
        gw = "203.0.113.129" if family == 4 else "2001:db8:1::1"
    return Route(family, names.route_table(eid), dev, gw)


def rule(eid: int, family: int = 4) -> Rule:
    mark, mask = names.rule_fwmark(eid)
    return Rule(family, names.rule_priority(eid), mark, mask, names.route_table(eid))


def path(eid: int, family: int = 4, **kw) -> tuple[Route, Rule]:
    return route(eid, family, **kw), rule(eid, family)


def add(obj) -> RouteOp:
    return RouteOp("add", obj)


def delete(obj) -> RouteOp:
    return RouteOp("delete", obj)


# --- diff_routes ------------------------------------------------------------------

def test_nothing_to_do_when_equal():
    routes = {route(1), route(1, 6), route(2, dev="up2", gw=None)}
    rules = {rule(1), rule(1, 6), rule(2)}
    assert diff_routes(routes, rules, set(routes), set(rules)) == []
    assert diff_routes(set(), set(), set(), set()) == []


def test_adds_routes_before_rules():
    r1, u1 = path(1)
    r2, u2 = path(2, 6)
    assert diff_routes({r1, r2}, {u1, u2}, set(), set()) == [
        add(r1), add(r2), add(u1), add(u2)]


def test_deletes_rules_before_routes():
    r1, u1 = path(1)
    r2, u2 = path(2, 6)
    assert diff_routes(set(), set(), {r1, r2}, {u1, u2}) == [
        delete(u1), delete(u2), delete(r1), delete(r2)]


@pytest.mark.parametrize("changed", [
    route(1, gw="203.0.113.130"),          # gateway
    route(1, dev="up2"),                   # dev
    route(1, gw=None),                     # to on-link
])
def test_changed_route_is_delete_then_add_of_the_same_table(changed):
    old, u1 = path(1)
    ops = diff_routes({changed}, {u1}, {old}, {u1})
    assert ops == [delete(old), add(changed)]


def test_replacement_comes_before_new_rules_and_removals():
    old1, u1 = path(1)
    new1 = route(1, gw="203.0.113.131")
    r2, u2 = path(2)       # new eid
    r3, u3 = path(3, 6)    # removed eid
    ops = diff_routes({new1, r2}, {u1, u2}, {old1, r3}, {u1, u3})
    assert ops == [delete(old1), add(new1), add(r2), add(u2), delete(u3), delete(r3)]
    before, after = split_ops(ops)
    assert before == [delete(old1), add(new1), add(r2), add(u2)]
    assert after == [delete(u3), delete(r3)]


def test_split_ops_edges():
    r1, u1 = path(1)
    assert split_ops([]) == ([], [])
    assert split_ops([delete(u1), delete(r1)]) == ([], [delete(u1), delete(r1)])
    assert split_ops([add(r1), add(u1)]) == ([add(r1), add(u1)], [])


def test_two_observed_routes_in_one_table_are_both_replaced():
    # e.g. an IPv6 multipath route, which the adapter reports once per nexthop
    a, b = route(1, 6), route(1, 6, gw="2001:db8:1::5")
    want = route(1, 6, gw="2001:db8:1::9")
    assert diff_routes({want}, set(), {a, b}, set()) == [delete(a), delete(b), add(want)]
    assert diff_routes({a}, set(), {a, b}, set()) == [delete(b)]


def test_gateway_spelling_is_canonical():
    observed = route(1, 6, gw="2001:db8:1::1")
    assert diff_routes({route(1, 6, gw="2001:DB8:1:0:0::1")}, set(), {observed}, set()) == []


@pytest.mark.parametrize("bad, words", [
    (Route(4, 254, "up1", "203.0.113.1"), "table 254 is outside the reserved range 7101..7355"),
    (Route(4, 100, "up1", None), "outside the reserved range"),
    (Rule(4, 5000, 0x100000, names.EID_MASK, 7101), "priority 5000 is outside"),
    (Rule(4, 7101, 0x100000, names.EID_MASK, 254), "table 254 is outside"),
    (Route(5, 7101, "up1", None), "family must be 4 or 6"),
    (Route(6, 7101, "up1", "203.0.113.1"), "gateway is not an IPv6 address"),
])
def test_desired_outside_reserved_ranges_is_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        if isinstance(bad, Route):
            diff_routes({bad}, set(), set(), set())
        else:
            diff_routes(set(), {bad}, set(), set())


def test_two_desired_routes_for_one_table_is_a_bug():
    with pytest.raises(ValueError, match="two default routes wanted in one table"):
        diff_routes({route(1), route(1, gw="203.0.113.130")}, set(), set(), set())


# --- property: diff + fake converge, in an order that is always harmless --------------

EIDS = st.integers(min_value=1, max_value=6)
GWS = {4: st.sampled_from(["203.0.113.129", "203.0.113.140", None]),
       6: st.sampled_from(["2001:db8:1::1", "fe80::1", None])}


@st.composite
def path_sets(draw, drift: bool):
    routes, rules = set(), set()
    for eid in draw(st.sets(EIDS, max_size=4)):
        for family in draw(st.sets(st.sampled_from([4, 6]), min_size=1)):
            dev = draw(st.sampled_from(["up1", "up2"]))
            routes.add(Route(family, names.route_table(eid), dev, draw(GWS[family])))
            if not drift or draw(st.booleans()):
                rules.add(rule(eid, family))
    # drift (observed only): a rule without its route, a route without its rule
    if drift and draw(st.booleans()):
        rules.add(rule(draw(EIDS), draw(st.sampled_from([4, 6]))))
    return routes, rules


@settings(max_examples=300, deadline=None)
@given(path_sets(drift=False), path_sets(drift=True))
def test_diff_applied_to_fake_reaches_desired_and_is_idempotent(want, have):
    fake = FakeRouting(links={"up1", "up2"}, routes=have[0], rules=have[1])
    ops = diff_routes(*want, *fake.dump())
    trace = _harmless_order(ops, have, want)
    fake.apply(ops)
    assert fake.dump() == (frozenset(want[0]), frozenset(want[1]))
    assert diff_routes(*want, *fake.dump()) == []
    assert trace


def _harmless_order(ops, have, want) -> bool:
    """No rule is added before its table holds the wanted route, no wanted route
    is deleted except right before its replacement, no route of a table is
    deleted while a stale rule still points at it, and no op repeats."""
    routes, rules = set(have[0]), set(have[1])
    assert len(ops) == len(set(ops))
    for i, op in enumerate(ops):
        obj = op.obj
        if isinstance(obj, Rule) and op.op == "add":
            assert any(r.table == obj.table and r.family == obj.family and r in want[0]
                       for r in routes), f"rule added before its route: {op.describe()}"
        if isinstance(obj, Route) and op.op == "delete":
            replaced = any(o.op == "add" and isinstance(o.obj, Route)
                           and (o.obj.family, o.obj.table) == (obj.family, obj.table)
                           for o in ops[i + 1:])
            if not replaced:
                assert not any(u.table == obj.table and u.family == obj.family
                               and u not in want[1] for u in rules), \
                    f"route deleted while a stale rule points at it: {op.describe()}"
        held = routes if isinstance(obj, Route) else rules
        (held.add if op.op == "add" else held.discard)(obj)
    return True


# --- FakeRouting --------------------------------------------------------------------

def test_fake_is_a_routing_port():
    assert isinstance(FakeRouting(), RoutingPort)


def test_fake_tolerates_repeated_adds_and_missing_deletes():
    r1, u1 = path(1)
    fake = FakeRouting()
    fake.apply([add(r1), add(u1)])
    fake.apply([add(r1), add(u1)])
    assert fake.dump() == (frozenset({r1}), frozenset({u1}))
    fake.apply([delete(u1), delete(r1), delete(u1), delete(r1)])
    assert fake.dump() == (frozenset(), frozenset())
    assert fake.applied == [add(r1), add(u1)] * 2 + [delete(u1), delete(r1)] * 2


def test_fake_refuses_unknown_dev_like_enodev():
    fake = FakeRouting(links={"up1"})
    good, bad = route(1), route(2, dev="eth9")
    with pytest.raises(RoutingError) as e:
        fake.apply([add(good), add(bad), add(rule(2))])
    assert e.value.errno == errno.ENODEV
    assert e.value.op == add(bad)
    assert str(e.value) == ("add route -4 default via 203.0.113.129 dev eth9 table 7102: "
                            "No such device (ENODEV): there is no link named eth9: fix "
                            "via.dev in the config or create the link")
    # ops before the failure stay applied, the ones after never ran
    assert fake.dump() == (frozenset({good}), frozenset())
    assert fake.applied == [add(good)]
    fake.apply([delete(bad)])  # a route through a missing link is already gone


def test_fake_refuses_a_second_default_route_in_a_table():
    fake = FakeRouting(routes={route(1)})
    with pytest.raises(RoutingError) as e:
        fake.apply([add(route(1, gw="203.0.113.130"))])
    assert e.value.errno == errno.EEXIST
    assert "table 7101 already holds another default route" in str(e.value)


def test_fake_remove_link_drops_its_routes_like_the_kernel():
    fake = FakeRouting(links={"up1", "up2"}, routes={route(1), route(2, dev="up2")})
    fake.remove_link("up1")
    assert fake.dump()[0] == {route(2, dev="up2")}
    with pytest.raises(RoutingError, match="ENODEV"):
        fake.apply([add(route(1))])


def test_fake_injected_failure_fires_once():
    r1 = route(1)
    fake = FakeRouting()
    fake.fail(r1, errno.ENETUNREACH)
    with pytest.raises(RoutingError) as e:
        fake.apply([add(r1)])
    assert str(e.value) == ("add route -4 default via 203.0.113.129 dev up1 table 7101: "
                            "Network is unreachable (ENETUNREACH): is dev up1 up and the "
                            "gateway on-link?")
    fake.apply([add(r1)])
    assert fake.dump()[0] == {r1}


def test_fake_dump_shows_only_reserved_ranges_and_writes_only_there():
    foreign_route = Route(4, 100, "up1", "203.0.113.129")
    foreign_rule = Rule(4, 5000, 0x5, 0xFFFFFFFF, 100)
    fake = FakeRouting(routes={foreign_route, route(1)}, rules={foreign_rule})
    assert fake.dump() == (frozenset({route(1)}), frozenset())
    with pytest.raises(ValueError, match="outside the reserved range"):
        fake.apply([delete(foreign_route)])
    assert foreign_route in fake.routes


def test_fake_after_close():
    fake = FakeRouting()
    fake.close()
    with pytest.raises(RuntimeError):
        fake.dump()


def test_routing_error_text_with_kernel_message():
    op = add(Route(6, 7101, "up1", "2001:db8:9::1"))
    e = RoutingError.from_errno(op, errno.EHOSTUNREACH, "No route to host")
    assert str(e) == ("add route -6 default via 2001:db8:9::1 dev up1 table 7101: No route "
                      "to host (EHOSTUNREACH): is dev up1 up and the gateway on-link?")
    e = RoutingError.from_errno(add(route(1)), errno.EINVAL, "Nexthop has invalid gateway")
    assert "(EINVAL; kernel: Nexthop has invalid gateway)" in str(e)
    e = RoutingError.from_errno(delete(rule(1)), errno.EPERM)
    assert str(e).endswith("(EPERM): changing routes and ip rules needs CAP_NET_ADMIN (run as root)")
    assert e.errno_name == "EPERM"


# --- HostState (pure) ------------------------------------------------------------------

def test_host_state_normalises_and_answers():
    host = HostState(frozenset({"203.0.113.10", "2001:DB8:10:0::1"}), frozenset({"up1"}))
    assert host.addresses == {"203.0.113.10", "2001:db8:10::1"}
    assert host.has_address("2001:db8:10::0:1")
    assert host.has_address("203.0.113.10")
    assert not host.has_address("203.0.113.11")
    assert host.has_address_in("2001:db8:10::/64")
    assert not host.has_address_in("2001:db8:11::/64")
    assert not host.has_address_in("203.0.113.0/30")
    assert host.has_address_in("203.0.113.8/29")
    assert host.link_up("up1") and not host.link_up("up2")
    assert HostState() == HostState(frozenset(), frozenset())
