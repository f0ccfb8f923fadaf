"""IPRouteRouting and read_host_state against a real kernel, in a fresh netns.

Every test gets its own namespace `eart<hex>` holding two veth pairs (up1 with
203.0.113.130/25 + 2001:db8:1::2/64, up2 with 198.51.100.2/24 +
2001:db8:2::2/64) and someone else's objects: a rule at priority 5000, a route
in table 100, a rule in our priority range with a selector we do not model.
Nothing is done outside that namespace, which is deleted even on failure.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from egress_agent import names
from egress_agent.hoststate import read_host_state
from egress_agent.model import Route, RouteOp, Rule
from egress_agent.routing import RoutingError, RoutingPort, diff_routes, split_ops


@pytest.fixture(autouse=True)
def root_required():
    if os.geteuid() != 0:
        reason = "needs root for network namespaces"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: a skip would be a failure)")
        pytest.skip(reason)


def ip(ns: str, *args: str, check: bool = True) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=check, capture_output=True,
                          text=True).stdout


@pytest.fixture
def netns():
    name = os.environ.get("EGRESS_TEST_NS_PREFIX", "eart") + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for dev, v4, v6 in (("up1", "203.0.113.130/25", "2001:db8:1::2/64"),
                            ("up2", "198.51.100.2/24", "2001:db8:2::2/64")):
            ip(name, "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
            ip(name, "link", "set", dev + "p", "up")
            ip(name, "link", "set", dev, "up")
            ip(name, "addr", "add", v4, "dev", dev)
            ip(name, "-6", "addr", "add", v6, "dev", dev, "nodad")
        # someone else's policy routing, which must stay exactly as it is
        ip(name, "rule", "add", "priority", "5000", "fwmark", "0x5", "lookup", "100")
        ip(name, "-6", "rule", "add", "priority", "5000", "fwmark", "0x5", "lookup", "100")
        ip(name, "route", "add", "default", "via", "203.0.113.129", "dev", "up1", "table", "100")
        ip(name, "route", "add", "10.9.0.0/16", "via", "198.51.100.1", "table", "100")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout


@pytest.fixture
def routing(netns):
    from egress_agent.routing.iproute import IPRouteRouting
    r = IPRouteRouting(netns=netns)
    try:
        yield r
    finally:
        r.close()


def foreign(ns: str) -> str:
    """Everything of ours filtered out; byte-for-byte what someone else owns."""
    def not_ours(text: str) -> str:
        return "".join(line + "\n" for line in text.splitlines()
                       if not names.is_our_priority(int(line.split(":")[0])))
    return (not_ours(ip(ns, "rule", "show")) + not_ours(ip(ns, "-6", "rule", "show"))
            + ip(ns, "route", "show", "table", "100")
            + ip(ns, "route", "show", "table", "main")
            + ip(ns, "-6", "route", "show", "table", "main"))


def desired() -> tuple[frozenset[Route], frozenset[Rule]]:
    """eid 1: v4 + v6 gateway on up1; eid 2: v4 gateway and v6 on-link on up2."""
    routes = {Route(4, 7101, "up1", "203.0.113.129"), Route(6, 7101, "up1", "2001:db8:1::1"),
              Route(4, 7102, "up2", "198.51.100.1"), Route(6, 7102, "up2", None)}
    rules = set()
    for eid in (1, 2):
        mark, mask = names.rule_fwmark(eid)
        for family in (4, 6):
            rules.add(Rule(family, names.rule_priority(eid), mark, mask, names.route_table(eid)))
    return frozenset(routes), frozenset(rules)


def test_apply_dump_idempotent_and_foreign_untouched(netns, routing):
    assert isinstance(routing, RoutingPort)
    before_rules = ip(netns, "rule", "show") + ip(netns, "-6", "rule", "show")
    before_100 = ip(netns, "route", "show", "table", "100")
    before = foreign(netns)
    assert routing.dump() == (frozenset(), frozenset())

    want_routes, want_rules = desired()
    ops = diff_routes(want_routes, want_rules, *routing.dump())
    assert len(ops) == 8
    routing.apply(ops)
    assert routing.dump() == (want_routes, want_rules)
    assert routing.unmodeled == ()
    # the kernel's own words, as an operator sees them
    assert "7101:\tfrom all fwmark 0x100000/0xff00000 lookup 7101" in ip(netns, "rule", "show")
    assert "7102:\tfrom all fwmark 0x200000/0xff00000 lookup 7102" in ip(netns, "-6", "rule", "show")
    assert ip(netns, "route", "show", "table", "7101").startswith(
        "default via 203.0.113.129 dev up1")
    assert ip(netns, "route", "show", "table", "7102").startswith("default via 198.51.100.1 dev up2")
    assert ip(netns, "-6", "route", "show", "table", "7102").startswith("default dev up2")
    assert foreign(netns) == before

    # the second pass changes nothing, and the same ops again are harmless
    assert diff_routes(want_routes, want_rules, *routing.dump()) == []
    routing.apply(ops)
    assert routing.dump() == (want_routes, want_rules)

    # remove everything of ours: rules first, then routes
    ops = diff_routes(frozenset(), frozenset(), *routing.dump())
    assert [op.op for op in ops] == ["delete"] * 8
    assert all(isinstance(op.obj, Rule) for op in ops[:4])
    routing.apply(ops)
    assert routing.dump() == (frozenset(), frozenset())
    routing.apply(ops)  # deleting what is gone is tolerated
    assert ip(netns, "rule", "show") + ip(netns, "-6", "rule", "show") == before_rules
    assert ip(netns, "route", "show", "table", "100") == before_100
    assert foreign(netns) == before


def test_changed_gateway_and_dev_are_replaced(netns, routing):
    want_routes, want_rules = desired()
    routing.apply(diff_routes(want_routes, want_rules, frozenset(), frozenset()))
    moved = {Route(4, 7101, "up1", "203.0.113.140"),      # gateway changed
             Route(6, 7101, "up2", "2001:db8:2::1"),      # dev and gateway changed
             Route(4, 7102, "up2", None),                 # to on-link
             Route(6, 7102, "up2", None)}
    ops = diff_routes(moved, want_rules, *routing.dump())
    assert [op.op for op in ops] == ["delete", "add"] * 3
    before, after = split_ops(ops)
    assert (before, after) == (ops, [])
    routing.apply(ops)
    assert routing.dump() == (frozenset(moved), want_rules)
    assert diff_routes(moved, want_rules, *routing.dump()) == []


def test_errors_name_the_op_and_what_to_check(netns, routing):
    off_link = Route(4, 7103, "up1", "192.0.2.1")
    with pytest.raises(RoutingError) as e:
        routing.apply([RouteOp("add", off_link)])
    assert e.value.errno == errno.ENETUNREACH
    assert e.value.op == RouteOp("add", off_link)
    assert str(e.value).startswith("add route -4 default via 192.0.2.1 dev up1 table 7103: "
                                   "Network is unreachable (ENETUNREACH")
    assert str(e.value).endswith(": is dev up1 up and the gateway on-link?")

    with pytest.raises(RoutingError) as e:
        routing.apply([RouteOp("add", Route(6, 7103, "up1", "2001:db8:9::1"))])
    assert e.value.errno == errno.EHOSTUNREACH
    assert "gateway on-link?" in str(e.value)

    with pytest.raises(RoutingError) as e:
        routing.apply([RouteOp("add", Route(4, 7103, "eth9", "203.0.113.129"))])
    assert e.value.errno == errno.ENODEV
    assert "there is no link named eth9" in str(e.value)

    ip(netns, "link", "set", "up2", "down")
    with pytest.raises(RoutingError) as e:
        routing.apply([RouteOp("add", Route(4, 7103, "up2", "198.51.100.1"))])
    assert e.value.errno in (errno.ENETDOWN, errno.ENETUNREACH)
    assert "up2" in str(e.value)

    # a different default route already in one of our tables: EEXIST is not
    # harmless there, and the operator is told which table to look at
    ip(netns, "route", "add", "default", "via", "203.0.113.140", "dev", "up1", "table", "7104")
    with pytest.raises(RoutingError) as e:
        routing.apply([RouteOp("add", Route(4, 7104, "up1", "203.0.113.129"))])
    assert e.value.errno == errno.EEXIST
    assert "table 7104 already holds another default route" in str(e.value)

    # deletes of what is not there are tolerated, whatever is missing
    routing.apply([RouteOp("delete", Route(4, 7105, "up1", "203.0.113.129")),
                   RouteOp("delete", Route(6, 7105, "up1", None)),
                   RouteOp("delete", Route(4, 7105, "eth9", None)),
                   RouteOp("delete", Rule(4, 7105, 0x500000, names.EID_MASK, 7105)),
                   RouteOp("delete", Rule(6, 7105, 0x500000, names.EID_MASK, 7105))])
    with pytest.raises(ValueError, match="outside the reserved range"):
        routing.apply([RouteOp("delete", Route(4, 100, "up1", "203.0.113.129"))])


def test_dump_ignores_foreign_and_reports_unmodeled(netns, routing):
    before = foreign(netns)
    # inside our ranges, but not expressible by the model: left alone, reported
    ip(netns, "rule", "add", "priority", "7110", "from", "10.0.0.0/8", "fwmark",
       "0xa00000/0xff00000", "lookup", "7110")
    ip(netns, "rule", "add", "priority", "7111", "fwmark", "0x1", "blackhole")
    ip(netns, "route", "add", "10.7.0.0/16", "via", "203.0.113.129", "table", "7110")
    # inside our ranges and expressible: ours (adopted, diffed like the rest)
    ip(netns, "rule", "add", "priority", "7112", "fwmark", "0xc00000/0xff00000", "lookup", "7112")
    ip(netns, "route", "add", "default", "via", "203.0.113.129", "dev", "up1", "table", "7112")
    routes, rules = routing.dump()
    assert routes == {Route(4, 7112, "up1", "203.0.113.129")}
    assert rules == {Rule(4, 7112, 0xC00000, names.EID_MASK, 7112)}
    assert len(routing.unmodeled) == 3
    assert any("priority 7110" in u and "FRA_SRC" in u for u in routing.unmodeled)
    routing.apply(diff_routes(frozenset(), frozenset(), routes, rules))
    assert routing.dump() == (frozenset(), frozenset())
    assert "7110:" in ip(netns, "rule", "show")
    assert foreign(netns) == before


def test_missing_netns_is_not_created(netns):
    from egress_agent.routing.iproute import IPRouteRouting
    missing = netns + "x"
    with pytest.raises(OSError):
        IPRouteRouting(netns=missing)
    assert missing not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout


def test_apply_of_ten_ops_is_fast(netns, routing):
    want_routes, want_rules = desired()
    extra = {Route(4, 7103, "up1", "203.0.113.129"), Route(6, 7103, "up2", None)}
    ops = diff_routes(want_routes | extra, want_rules, frozenset(), frozenset())
    assert len(ops) == 10
    t0 = time.perf_counter()
    routing.apply(ops)
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    routing.dump()
    dumped = time.perf_counter() - t0
    print(f"apply of 10 ops: {took * 1000:.1f} ms, dump: {dumped * 1000:.1f} ms")
    assert took < 1.0


def _eventually(check, timeout: float = 3.0):
    """Kernel changes become visible with a delay: poll, don't sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_read_host_state_sees_addresses_and_link_state(netns):
    from pyroute2 import IPRoute
    with IPRoute(netns=netns, flags=0) as ipr:
        host = read_host_state(ipr)
        assert {"203.0.113.130", "2001:db8:1::2", "198.51.100.2", "2001:db8:2::2"} <= host.addresses
        assert host.links_up >= {"up1", "up2", "up1p", "up2p"}
        assert host.has_address_in("2001:db8:1::/64")
        assert "lo" not in host.links_up  # a new namespace's lo is down

        ip(netns, "link", "set", "dev", "up1", "down")
        assert _eventually(lambda: not read_host_state(ipr).link_up("up1"))
        host = read_host_state(ipr)
        assert not host.link_up("up1")
        assert not host.has_address("203.0.113.130")
        assert not host.has_address("2001:db8:1::2")
        assert host.has_address("198.51.100.2")

        # IFF_UP alone is not enough: with its peer down, up2 carries nothing
        ip(netns, "link", "set", "dev", "up2p", "down")
        host = read_host_state(ipr)
        assert not host.link_up("up2") and not host.has_address("198.51.100.2")
        ip(netns, "link", "set", "dev", "up2p", "up")
        assert _eventually(lambda: read_host_state(ipr).has_address("198.51.100.2"))

        # back up: the IPv4 address returns; the IPv6 one was flushed by the
        # kernel on down (keep_addr_on_down=0), and provisioning must re-add it
        ip(netns, "link", "set", "dev", "up1", "up")
        assert _eventually(lambda: read_host_state(ipr).has_address("203.0.113.130"))
        host = read_host_state(ipr)
        assert host.link_up("up1")
        assert not host.has_address("2001:db8:1::2")
        ip(netns, "-6", "addr", "add", "2001:db8:1::2/64", "dev", "up1", "nodad")
        assert _eventually(lambda: read_host_state(ipr).has_address("2001:db8:1::2"))

        # a tentative (DAD still running) address is not usable yet
        ip(netns, "-6", "addr", "add", "2001:db8:1::7/64", "dev", "up1")
        assert not read_host_state(ipr).has_address("2001:db8:1::7")


_BOTH_READS = """
import json
from pyroute2 import IPRoute
from egress_agent.hoststate import _read_raw, read_host_state
with IPRoute() as ipr:
    ref = read_host_state(ipr)
raw, default = _read_raw(), read_host_state()
print(json.dumps([sorted(h.addresses) for h in (ref, raw, default)]
                 + [sorted(h.links_up) for h in (ref, raw, default)]))
"""


def test_the_raw_host_read_equals_pyroute2s_in_every_state(netns):
    """read_host_state() without an IPRoute parses the netlink dumps itself: the
    same addresses and links as pyroute2's decoding, whatever their state (a link
    down, a peer down, tentative and point-to-point addresses, many of them)."""
    def both() -> list:
        out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _BOTH_READS],
                             check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        ref, raw, default, lref, lraw, ldefault = json.loads(out.stdout)
        assert ref == raw == default and lref == lraw == ldefault
        return ref
    subprocess.run(["ip", "-n", netns, "-batch", "-"], check=True, text=True,
                   input="".join(f"addr add 192.0.2.{j}/32 dev up1\n" for j in range(1, 201)))
    ip(netns, "addr", "add", "203.0.113.5", "peer", "203.0.113.6", "dev", "up2")
    ip(netns, "-6", "addr", "add", "2001:db8:1::7/64", "dev", "up1")  # tentative
    ip(netns, "link", "set", "lo", "up")
    seen = both()
    assert {"192.0.2.200", "203.0.113.5", "2001:db8:1::2", "127.0.0.1"} <= set(seen)
    assert "203.0.113.6" not in seen and "2001:db8:1::7" not in seen
    ip(netns, "link", "set", "up2p", "down")
    assert "198.51.100.2" not in both()
    ip(netns, "link", "set", "up1", "down")
    assert "192.0.2.1" not in both()


_BOTH_DUMPS = """
import json
from pyroute2 import IPRoute
from egress_agent.routing.iproute import IPRouteRouting
raw = IPRouteRouting()
ref = IPRouteRouting(ipr=IPRoute(ext_ack=True))
assert raw._raw and not ref._raw
a, b = raw.dump(), ref.dump()
print(json.dumps([a == b, raw.unmodeled == ref.unmodeled, sorted(map(str, a[0])), list(raw.unmodeled)]))
"""


def test_the_raw_route_dump_equals_pyroute2s(netns):
    """IPRouteRouting in its own namespace reads the route dump raw and decodes only
    the routes of tables that may be ours: the same routes, rules and unmodeled
    objects as pyroute2's whole dump, among hundreds of local routes."""
    subprocess.run(["ip", "-n", netns, "-batch", "-"], check=True, text=True,
                   input="".join(f"addr add 192.0.2.{j}/32 dev up1\n" for j in range(1, 201)))
    t1, t2 = names.route_table(1), names.route_table(2)
    ip(netns, "route", "add", "default", "via", "203.0.113.129", "dev", "up1", "table", str(t1))
    ip(netns, "-6", "route", "add", "default", "dev", "up2", "table", str(t1))
    ip(netns, "route", "add", "10.7.0.0/16", "dev", "up2", "table", str(t2))  # not a default: unmodeled
    ip(netns, "route", "add", "default", "via", "198.51.100.1", "table", "300")  # not ours
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _BOTH_DUMPS],
                         check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    same, same_unmodeled, routes, unmodeled = json.loads(out.stdout)
    assert same and same_unmodeled
    assert len(routes) == 2 and unmodeled, (routes, unmodeled)
