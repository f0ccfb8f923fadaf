"""The routing port: our policy routes and ip rules, and nothing else.

`RoutingPort` is what the reconciler talks to; `iproute.IPRouteRouting` is
the kernel (pyroute2), `fake.FakeRouting` the in-memory stand-in for tests.
This module and `diff` import no pyroute2, so the pure stages may use them.

Kernel errors are translated here, at the boundary, into one domain error:
EEXIST on add and ENOENT/ESRCH on delete mean the kernel already holds what
we asked for and are tolerated (applying twice changes nothing); anything
else raises `RoutingError` naming the op and what to check next.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence
from typing import Optional, Protocol, runtime_checkable

from egress_agent.model import Route, RouteOp, Rule
from egress_agent.routing.diff import check_reserved, diff_routes, split_ops

__all__ = ["RoutingError", "RoutingPort", "check_reserved", "diff_routes",
           "is_tolerated", "split_ops"]


@runtime_checkable
class RoutingPort(Protocol):
    def dump(self) -> tuple[frozenset[Route], frozenset[Rule]]:
        """Our routes (tables in names' reserved range) and our rules (reserved
        priorities), IPv4 and IPv6, exactly as the model spells them."""
        ...

    def apply(self, ops: Sequence[RouteOp]) -> None:
        """Apply `ops` in order; stop at the first one the kernel refuses
        (RoutingError). The ops before it stay applied: netlink has no
        transactions, so the caller re-dumps before the next diff."""
        ...

    def close(self) -> None:
        ...


def is_tolerated(op: RouteOp, code: int) -> bool:
    """The kernel already holds (add) or already lacks (delete) the object.

    ENODEV on a route delete: the link is gone, and the kernel removed every
    route through it along with it.
    """
    if op.op == "add":
        return code == _errno.EEXIST
    gone = {_errno.ENOENT, _errno.ESRCH}
    if isinstance(op.obj, Route):
        gone.add(_errno.ENODEV)
    return code in gone


def _hint(op: RouteOp, code: Optional[int]) -> Optional[str]:
    obj = op.obj
    if code in (_errno.EPERM, _errno.EACCES):
        return "changing routes and ip rules needs CAP_NET_ADMIN (run as root)"
    if code == _errno.EAFNOSUPPORT:
        return "is IPv6 disabled on this host (net.ipv6.conf.all.disable_ipv6)?"
    if not isinstance(obj, Route):
        return None
    if code == _errno.ENODEV:
        return f"there is no link named {obj.dev}: fix via.dev in the config or create the link"
    if code == _errno.ENETDOWN:
        return f"dev {obj.dev} is down: bring it up (ip link set dev {obj.dev} up)"
    if op.op == "add" and code in (_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EINVAL):
        if obj.gateway:
            return f"is dev {obj.dev} up and the gateway on-link?"
        return f"is dev {obj.dev} up?"
    if op.op == "add" and code == _errno.EEXIST:
        return (f"table {obj.table} already holds another default route "
                f"(ip -{obj.family} route show table {obj.table}); the table "
                f"is reserved for egress-agent, remove that route")
    return None


class RoutingError(Exception):
    """The kernel refused `op`. `errno` is the kernel's errno (None when the
    refusal did not come from the kernel), `kernel_message` its extended ack
    text when it differs from strerror."""

    def __init__(self, op: RouteOp, errno: Optional[int], reason: str,
                 kernel_message: Optional[str] = None, hint: Optional[str] = None):
        self.op = op
        self.errno = errno
        self.reason = reason
        self.kernel_message = kernel_message
        self.hint = hint
        super().__init__(self._render())

    @classmethod
    def from_errno(cls, op: RouteOp, code: int,
                   kernel_message: Optional[str] = None) -> "RoutingError":
        reason = os.strerror(code)
        if kernel_message == reason:
            kernel_message = None
        return cls(op, code, reason, kernel_message, _hint(op, code))

    @property
    def errno_name(self) -> Optional[str]:
        return _errno.errorcode.get(self.errno) if self.errno is not None else None

    def _render(self) -> str:
        detail = [self.errno_name] if self.errno_name else []
        if self.kernel_message:
            detail.append(f"kernel: {self.kernel_message}")
        text = f"{self.op.describe()}: {self.reason}"
        if detail:
            text += f" ({'; '.join(detail)})"
        if self.hint:
            text += f": {self.hint}"
        return text
