"""The kernel adapter of the routing port, on one long-lived pyroute2 IPRoute.

Verified with pyroute2 0.9.7 on Linux 6.x:
- `IPRoute(netns=NAME)` runs the socket in a named namespace (0.9.1 folded
  `NetNS` into IPRoute); its default `flags=os.O_CREAT` silently *creates* a
  missing namespace, so we pass `flags=0` and a typo fails (FileNotFoundError).
- The sync IPRoute drives its own asyncio loop: it cannot be called from a
  thread whose event loop is running (RuntimeError).
- Dumps are filtered in Python, not by the kernel: `route("dump", table=T)`
  costs a full dump, so `dump()` does one dump per family and filters itself
  (measured ~70-100 us per route: 5,000 routes in main cost ~0.4 s).
- Tables above 255 come back as header `table` 252 (RT_TABLE_COMPAT) with the
  real id in RTA_TABLE / FRA_TABLE.
- Rules: FRA_FWMARK and FRA_FWMASK (the kernel fills the mask with 0xffffffff
  when only a mark was given); FRA_PRIORITY is absent for priority 0.
- `route("del")` sends scope 0 (universe) unless told otherwise, and the IPv4
  FIB matches the scope on delete: a `scope link` route is then "not found".
  We send RT_SCOPE_NOWHERE (255), which matches any scope, as ip-route does.
- `dst="default"` without `family` is sent as AF_UNSPEC and refused with
  EOPNOTSUPP; we always pass family and an explicit 0.0.0.0/0 or ::/0.
- `ext_ack=True` replaces strerror by the kernel's own text in NetlinkError
  ("Nexthop has invalid gateway"); RoutingError keeps both.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egress_agent import names
from egress_agent.model import Route, RouteOp, Rule
from egress_agent.routing import RoutingError, is_tolerated
from egress_agent.routing.diff import check_reserved

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_ANY = {4: "0.0.0.0/0", 6: "::/0"}
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
FR_ACT_NOP = 3
FR_ACT_PROHIBIT = 8
_NO_LIMIT = 0xFFFFFFFF  # FRA_SUPPRESS_PREFIXLEN / _IFGROUP when unset
# Rule selectors the model has no words for; a rule carrying one is not ours
# to compare (it would look identical to our plain fwmark rule).
_RULE_SELECTORS = ("FRA_IIFNAME", "FRA_OIFNAME", "FRA_SRC", "FRA_DST", "FRA_GOTO",
                   "FRA_FLOW", "FRA_TUN_ID", "FRA_L3MDEV", "FRA_UID_RANGE",
                   "FRA_IP_PROTO", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE",
                   "FRA_DSCP", "FRA_FLOWLABEL")


class IPRouteRouting:
    """`RoutingPort` on the kernel. `netns`: operate in that named network
    namespace (/run/netns/NAME), which must exist. `unmodeled` lists, after each
    `dump()`, the objects found inside our ranges that the model cannot express
    (they are left alone; the daemon should log them)."""

    def __init__(self, netns: Optional[str] = None, ipr: Optional[Any] = None):
        # this process's own namespace: route dumps are read raw (_our_route_msgs)
        self._raw = netns is None and ipr is None
        if ipr is None:
            ipr = (IPRoute(netns=netns, flags=0, ext_ack=True) if netns
                   else IPRoute(ext_ack=True))
        self.ipr = ipr
        self.unmodeled: tuple[str, ...] = ()

    # --- RoutingPort ------------------------------------------------------------
    def dump(self) -> tuple[frozenset[Route], frozenset[Rule]]:
        unmodeled: list[str] = []
        ifnames = {link["index"]: link.get_attr("IFLA_IFNAME")
                   for link in self.ipr.link("dump")}
        routes: set[Route] = set()
        rules: set[Rule] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._routes(family):
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                if names.is_our_table(table):
                    routes.update(_parse_route(msg, table, ifnames, unmodeled))
            for msg in self._dump("rule", family):
                priority = msg.get_attr("FRA_PRIORITY") or 0
                if names.is_our_priority(priority):
                    rule = _parse_rule(msg, priority, unmodeled)
                    if rule is not None:
                        rules.add(rule)
        self.unmodeled = tuple(unmodeled)
        return frozenset(routes), frozenset(rules)

    def apply(self, ops: Sequence[RouteOp]) -> None:
        ifindex: dict[str, int] = {}  # one RTM_GETLINK per dev per apply
        for op in ops:
            if op.op not in ("add", "delete"):
                raise ValueError(f"unknown op {op.op!r} in {op.describe()}")
            check_reserved(op.obj)
            try:
                self._apply_one(op, ifindex)
            except NetlinkError as e:
                if not is_tolerated(op, e.code):
                    raise RoutingError.from_errno(op, e.code, _kernel_text(e)) from e
                if op.op == "add" and isinstance(op.obj, Route):
                    self._check_route_held(op, e)

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "IPRouteRouting":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------
    def _routes(self, family: int) -> Sequence[Any]:
        """The route messages of `family` that may be in our tables. pyroute2 decodes
        every route of every table (~60 us each: the local table alone holds one per
        host address, hundreds with many egress IPs); read raw, only a route whose
        table is ours or above 255 (its header then says RT_TABLE_COMPAT, the real
        id is in RTA_TABLE) is decoded, by pyroute2's own message class."""
        if self._raw:
            try:
                return _our_route_msgs(family)
            except OSError as e:
                if e.errno == errno.EAFNOSUPPORT and family == socket.AF_INET6:
                    return ()
                # anything else: pyroute2's dump, which raises in its own words
        return self._dump("route", family)

    def _dump(self, kind: str, family: int) -> Sequence[Any]:
        try:
            return getattr(self.ipr, kind)("dump", family=family)
        except NetlinkError as e:
            if e.code == errno.EAFNOSUPPORT and family == socket.AF_INET6:  # IPv6 off
                return ()
            raise

    def _link_index(self, dev: str, cache: dict[str, int]) -> int:
        if dev not in cache:
            # RTM_GETLINK by name: one message, not a dump of every link.
            cache[dev] = self.ipr.link("get", ifname=dev)[0]["index"]
        return cache[dev]

    def _apply_one(self, op: RouteOp, ifindex: dict[str, int]) -> None:
        obj = op.obj
        if isinstance(obj, Rule) and obj.action != "lookup":  # the guard's (names.py)
            spec: dict[str, Any] = dict(family=_FAMILY[obj.family], priority=obj.priority,
                                        action=f"FR_ACT_{obj.action.upper()}")
            if obj.src:
                net = ipaddress.ip_network(obj.src)
                spec.update(src=str(net.network_address), src_len=net.prefixlen)
            if obj.mask:
                spec.update(fwmark=obj.fwmark, fwmask=obj.mask)
            if obj.action == "goto":
                spec["goto"] = obj.target
            self.ipr.rule("add" if op.op == "add" else "del", **spec)
            return
        if isinstance(obj, Rule):
            self.ipr.rule("add" if op.op == "add" else "del",
                          family=_FAMILY[obj.family], priority=obj.priority,
                          fwmark=obj.fwmark, fwmask=obj.mask, table=obj.table,
                          action="to_tbl")
            return
        spec: dict[str, Any] = dict(family=_FAMILY[obj.family], dst=_ANY[obj.family],
                                    table=obj.table, oif=self._link_index(obj.dev, ifindex))
        if obj.gateway:
            spec["gateway"] = obj.gateway
        if op.op == "add":
            # like `ip route add default dev X`: a gateway-less route is on-link
            spec["scope"] = RT_SCOPE_UNIVERSE if obj.gateway else RT_SCOPE_LINK
            self.ipr.route("add", **spec)
        else:
            self.ipr.route("del", scope=RT_SCOPE_NOWHERE, **spec)

    def _check_route_held(self, op: RouteOp, error: NetlinkError) -> None:
        """EEXIST on a route add is only harmless if *this* route is there: the
        kernel says the same for a different default route in the table."""
        routes, _ = self.dump()
        if op.obj not in routes:
            raise RoutingError.from_errno(op, error.code, _kernel_text(error)) from error


def _kernel_text(e: NetlinkError) -> Optional[str]:
    return e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else None


def _parse_route(msg: Any, table: int, ifnames: dict[int, str],
                 unmodeled: list[str]) -> list[Route]:
    family = _VERSION[msg["family"]]
    if (msg["type"] != RTN_UNICAST or msg["dst_len"] or msg["src_len"] or msg["tos"]
            or msg.get_attr("RTA_VIA") or msg.get_attr("RTA_NH_ID")):
        unmodeled.append(f"route -{family} table {table}: type {msg['type']} "
                         f"dst {msg.get_attr('RTA_DST')}/{msg['dst_len']}")
        return []
    hops = msg.get_attr("RTA_MULTIPATH")
    if hops:
        # one Route per nexthop: deleting one IPv6 nexthop removes just that one
        pairs = [(nh["oif"], nh.get_attr("RTA_GATEWAY")) for nh in hops]
    else:
        pairs = [(msg.get_attr("RTA_OIF"), msg.get_attr("RTA_GATEWAY"))]
    routes = []
    for oif, gateway in pairs:
        dev = ifnames.get(oif)
        if dev is None:
            unmodeled.append(f"route -{family} table {table}: nexthop without a link")
            continue
        routes.append(Route(family, table, dev, gateway))
    return routes


def _parse_rule(msg: Any, priority: int, unmodeled: list[str]) -> Optional[Rule]:
    family = _VERSION[msg["family"]]
    selectors = [a for a in _RULE_SELECTORS if msg.get_attr(a) is not None]
    guard = {(FR_ACT_PROHIBIT, names.GUARD_PRIORITY): "prohibit",
             (FR_ACT_GOTO, names.EXEMPT_PRIORITY): "goto",
             (FR_ACT_NOP, names.ANCHOR_PRIORITY): "nop"}.get((msg["action"], priority))
    if (guard and set(selectors) <= {"FRA_SRC", "FRA_GOTO"}
            and not (msg["flags"] or msg["tos"] or msg["dst_len"])):
        src = (ipaddress.ip_network(f"{msg.get_attr('FRA_SRC')}/{msg['src_len']}",
                                    strict=False).with_prefixlen if msg["src_len"] else "")
        rule = Rule(family, priority, msg.get_attr("FRA_FWMARK") or 0,
                    msg.get_attr("FRA_FWMASK") or 0, 0, src, guard, msg.get_attr("FRA_GOTO") or 0)
        try:
            check_reserved(rule)
            return rule
        except ValueError:
            pass  # in our priorities, but not a rule the agent writes: left alone
    if (msg["action"] != FR_ACT_TO_TBL or msg["flags"] or msg["tos"]
            or msg["src_len"] or msg["dst_len"] or selectors
            or msg.get_attr("FRA_SUPPRESS_PREFIXLEN") not in (None, _NO_LIMIT)
            or msg.get_attr("FRA_SUPPRESS_IFGROUP") not in (None, _NO_LIMIT)):
        unmodeled.append(f"rule -{family} priority {priority}: action {msg['action']} "
                         f"flags {msg['flags']:#x} selectors {selectors or '-'}")
        return None
    fwmark = msg.get_attr("FRA_FWMARK") or 0
    mask = msg.get_attr("FRA_FWMASK")
    if mask is None:
        mask = 0xFFFFFFFF if fwmark else 0
    table = msg.get_attr("FRA_TABLE") or msg["table"]
    if not names.is_our_table(table):
        # someone else's rule in our priorities, pointing at a table not ours:
        # the agent may not touch it (check_reserved), so it is not modelled
        unmodeled.append(f"rule -{family} priority {priority}: lookup {table}")
        return None
    return Rule(family, priority, fwmark, mask, table)


_RTM_GETROUTE, _RT_TABLE_COMPAT = 26, 252


def _our_route_msgs(family: int) -> list[Any]:
    import struct

    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    from egress_agent.hoststate import _dump as netlink_dump
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(5.0)
        sock.bind((0, 0))
        for mtype, buf, body, end in netlink_dump(sock, 1, _RTM_GETROUTE,
                                                   struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)):
            table = buf[body + 4]
            if mtype != 24 or (table != _RT_TABLE_COMPAT and not names.is_our_table(table)):
                continue  # RTM_NEWROUTE only, of a table that may be ours
            msg = rtmsg(buf[body - 16:end])
            msg.decode()
            out.append(msg)
    return out
