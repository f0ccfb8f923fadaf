"""From the routes and ip rules we want and those the kernel holds, the ops.

Pure: imports neither pyroute2 nor anything that does (the planner and
`egress-agent plan` use it without root).

Order of the ops (every prefix of the list is a harmless state):
  1. replacements: a table whose default route changed gateway or dev gets
     `delete old` immediately followed by `add new` (an IPv4 table holds one
     default route per metric, so the add would fail with EEXIST first);
  2. route adds, then 3. rule adds: a rule never points at an empty table it
     is about to use;
  4. rule deletes, then 5. route deletes: traffic stops being sent to a table
     before the table is emptied.
Every add precedes every pure removal, so `split_ops` can cut the list where
the reconciler runs the nft batch (docs/design.md, "Apply order").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Union

from egress_agent import names
from egress_agent.model import Route, RouteOp, Rule

__all__ = ["check_reserved", "diff_routes", "split_ops"]


def check_reserved(obj: Union[Route, Rule]) -> None:
    """Refuse to touch anything outside our table ids and rule priorities.

    A ValueError here is a bug in the caller, never a kernel condition.
    """
    if obj.family not in (4, 6):
        raise ValueError(f"{obj.describe()}: family must be 4 or 6")
    if isinstance(obj, Rule) and obj.action != "lookup":
        where = {"prohibit": (names.GUARD_PRIORITY, 0), "nop": (names.ANCHOR_PRIORITY, 0),
                 "goto": (names.EXEMPT_PRIORITY, names.ANCHOR_PRIORITY)}.get(obj.action)
        if where != (obj.priority, obj.target):
            raise ValueError(f"{obj.describe()}: not one of the guard's rules (prohibit at "
                             f"{names.GUARD_PRIORITY}, goto {names.ANCHOR_PRIORITY} at "
                             f"{names.EXEMPT_PRIORITY}, nop at {names.ANCHOR_PRIORITY})")
        return
    if not names.is_our_table(obj.table):
        raise ValueError(f"{obj.describe()}: table {obj.table} is outside the "
                         f"reserved range {names.ROUTE_TABLE_BASE + 1}.."
                         f"{names.ROUTE_TABLE_BASE + names.EID_MAX}")
    if isinstance(obj, Rule) and not names.is_our_priority(obj.priority):
        raise ValueError(f"{obj.describe()}: priority {obj.priority} is outside "
                         f"the reserved range {names.RULE_PRIORITY_BASE + 1}.."
                         f"{names.RULE_PRIORITY_BASE + names.EID_MAX}")


def _canonical(route: Route) -> Route:
    """The spelling the kernel dumps: `2001:DB8::0001` compares as `2001:db8::1`."""
    if route.gateway is None:
        return route
    gw = ipaddress.ip_address(route.gateway)
    if gw.version != route.family:
        raise ValueError(f"{route.describe()}: gateway is not an IPv{route.family} address")
    if gw.compressed == route.gateway:
        return route
    return Route(route.family, route.table, route.dev, gw.compressed)


def diff_routes(desired_routes: Iterable[Route], desired_rules: Iterable[Rule],
                observed_routes: Iterable[Route],
                observed_rules: Iterable[Rule]) -> list[RouteOp]:
    """The ops that turn `observed` into `desired`, in a safe order (module doc)."""
    want_routes = {_canonical(r) for r in desired_routes}
    want_rules = set(desired_rules)
    for obj in (*want_routes, *want_rules):
        check_reserved(obj)
    keys: dict[tuple[int, int], Route] = {}
    for r in want_routes:
        other = keys.setdefault((r.family, r.table), r)
        if other != r:
            raise ValueError(f"two default routes wanted in one table: "
                             f"{other.describe()} and {r.describe()}")

    have_routes = set(observed_routes)
    have_rules = set(observed_rules)
    stale_routes = have_routes - want_routes
    new_routes = want_routes - have_routes

    ops: list[RouteOp] = []
    # 1. replacements, each delete right before the add of the same table
    replaced: set[Route] = set()
    for new in sorted(new_routes):
        old = sorted(r for r in stale_routes
                     if (r.family, r.table) == (new.family, new.table))
        if old:
            ops += [RouteOp("delete", r) for r in old]
            ops.append(RouteOp("add", new))
            replaced.add(new)
            stale_routes.difference_update(old)
    # 2. + 3. adds: routes, then the rules that point at them
    ops += [RouteOp("add", r) for r in sorted(new_routes - replaced)]
    ops += [RouteOp("add", r) for r in sorted(want_rules - have_rules)]
    # 4. + 5. removals: rules, then the routes they pointed at
    ops += [RouteOp("delete", r) for r in sorted(have_rules - want_rules)]
    ops += [RouteOp("delete", r) for r in sorted(stale_routes)]
    return ops


def _guard(op: RouteOp) -> bool:
    return isinstance(op.obj, Rule) and op.obj.action == "prohibit"


def split_ops(ops: Sequence[RouteOp]) -> tuple[list[RouteOp], list[RouteOp]]:
    """(before, after) the nft batch: everything up to the last add, then the
    pure removals. Works on the output of `diff_routes`, whose adds all come
    before its pure removals.

    The guard rules go the other way: they prohibit what the table has not
    marked as seen, so a guard is added after the batch that creates the
    marking chain and deleted before a batch that could remove it."""
    rest = [op for op in ops if not _guard(op)]
    last_add = max((i for i, op in enumerate(rest) if op.op == "add"), default=-1)
    guard_deletes = [op for op in ops if _guard(op) and op.op == "delete"]
    guard_adds = [op for op in ops if _guard(op) and op.op == "add"]
    return guard_deletes + rest[:last_add + 1], rest[last_add + 1:] + guard_adds
