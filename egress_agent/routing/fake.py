"""In-memory `RoutingPort` that answers like the kernel does.

- add of an object already there: tolerated (the kernel's EEXIST);
- add of a default route into a table that holds a different one: EEXIST
  that is not tolerated, as IPv4 and IPv6 both refuse it with NLM_F_EXCL;
- delete of a missing object: tolerated (ENOENT/ESRCH);
- a route through a link not in `links`: ENODEV (`links` None: every name
  exists); `remove_link` drops the routes through it, as the kernel does;
- `fail(obj, errno)`: the next op on `obj` is refused with that errno.
`applied` lists the ops the fake accepted, in order (and `journal`, when
shared with FakeNft, the order of route ops and nft batches); `dump` filters
to the reserved ranges like the real adapter, so foreign objects can be seeded.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from typing import Optional, Union

from egress_agent import names
from egress_agent.model import Route, RouteOp, Rule
from egress_agent.routing import RoutingError, is_tolerated
from egress_agent.routing.diff import check_reserved


class FakeRouting:
    def __init__(self, links: Optional[Iterable[str]] = None,
                 routes: Iterable[Route] = (), rules: Iterable[Rule] = (),
                 journal: Optional[list] = None):
        self.links: Optional[set[str]] = None if links is None else set(links)
        self.routes: set[Route] = set(routes)
        self.rules: set[Rule] = set(rules)
        self.applied: list[RouteOp] = []
        self.failures: dict[Union[Route, Rule], int] = {}
        self.journal = journal
        self.closed = False

    # --- RoutingPort ------------------------------------------------------------
    def dump(self) -> tuple[frozenset[Route], frozenset[Rule]]:
        self._check_open()
        return (frozenset(r for r in self.routes if names.is_our_table(r.table)),
                frozenset(r for r in self.rules if names.is_our_priority(r.priority)
                          and (r.action != "lookup" or names.is_our_table(r.table))))

    def apply(self, ops: Sequence[RouteOp]) -> None:
        self._check_open()
        for op in ops:
            self._apply_one(op)
            self.applied.append(op)
            if self.journal is not None:
                self.journal.append(("route", op))

    def close(self) -> None:
        self.closed = True

    # --- test controls ------------------------------------------------------------
    def fail(self, obj: Union[Route, Rule], code: int) -> None:
        """Refuse the next op on `obj` with `code` (once)."""
        self.failures[obj] = code

    def remove_link(self, name: str) -> None:
        if self.links is not None:
            self.links.discard(name)
        self.routes = {r for r in self.routes if r.dev != name}

    # --- internals ------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("FakeRouting used after close()")

    def _refuse(self, op: RouteOp, code: int) -> None:
        if not is_tolerated(op, code):
            raise RoutingError.from_errno(op, code)

    def _apply_one(self, op: RouteOp) -> None:
        if op.op not in ("add", "delete"):
            raise ValueError(f"unknown op {op.op!r} in {op.describe()}")
        obj = op.obj
        check_reserved(obj)
        if obj in self.failures:
            raise RoutingError.from_errno(op, self.failures.pop(obj))
        held = self.routes if isinstance(obj, Route) else self.rules
        if op.op == "delete":
            if obj in held:
                held.discard(obj)  # type: ignore[arg-type]
            else:
                self._refuse(op, errno.ESRCH if isinstance(obj, Route) else errno.ENOENT)
            return
        if isinstance(obj, Route):
            if self.links is not None and obj.dev not in self.links:
                raise RoutingError.from_errno(op, errno.ENODEV)
            if obj not in held and any((r.family, r.table) == (obj.family, obj.table)
                                       for r in self.routes):
                raise RoutingError.from_errno(op, errno.EEXIST)
        if obj in held:
            self._refuse(op, errno.EEXIST)
            return
        held.add(obj)  # type: ignore[arg-type]
