"""Drift: what the kernel lost or gained of ours since the agent's last sync.

Pure. Drift is what differs between the kernel (`observed`) and what the
kernel accepted from the agent last (`applied`) and the agent still wants
(`desired`): a config edit or a failover that changes `desired` is a change,
not drift; a route the kernel dropped with its link is not drift either when
the plan no longer wants it. Each finding names what was found, for the
warning log line, and has a `kind` for the metric
egress_agent_drift_repairs_total{kind}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import names, shape
from .model import Desired, Observed, Route
from .nft.text import comments, element_text, skeleton_digest, skeleton_shape


@dataclass(frozen=True)
class Finding:
    kind: str  # table | skeleton | chain | elements | routes
    what: str

    def __str__(self) -> str:
        return self.what


def findings(applied: Observed, desired: Desired, observed: Observed,
             expected: Optional[shape.Shape] = None,
             link_up: Callable[[str], bool] = lambda dev: True) -> list[Finding]:
    """`link_up(dev)`: the kernel drops the routes of a link that goes down; their
    absence is the link's doing, not drift."""
    if not applied.table:
        return []
    out: list[Finding] = []
    if not observed.table:
        out.append(Finding("table", f"table {names.TABLE} missing"))
    else:
        if observed.skeleton != skeleton_digest():
            out.append(Finding("skeleton", f"skeleton version {observed.skeleton!r} instead of "
                                           f"{skeleton_digest()!r}"))
        if observed.shape is not None:
            out += [Finding("skeleton", d) for d in
                    shape.differences(expected or skeleton_shape(), observed.shape)]
        for chain in names.GENERATED_CHAINS:
            want = comments(desired.chains.get(chain, ()))
            if applied.chains.get(chain, ()) == want and observed.chains.get(chain, ()) != want:
                out.append(Finding("chain", f"chain {chain}: {len(observed.chains.get(chain, ()))} "
                                            f"rules instead of {len(want)}"))
        for name in sorted(set(applied.elements) | set(observed.elements)):
            a = applied.elements.get(name, frozenset())
            d = desired.elements.get(name, frozenset())
            o = observed.elements.get(name, frozenset())
            missing, foreign = (a & d) - o, o - a - d
            if missing or foreign:
                kind = "map" if any(v is not None for _, v in a | o) else "set"
                out.append(Finding("elements", f"{kind} {name}: {len(missing)} elements missing, "
                                               f"{len(foreign)} foreign"
                                   + _example(name, missing, foreign)))
    for what, a, d, o in (("route", applied.routes, desired.routes, observed.routes),
                          ("rule", applied.rules, desired.rules, observed.rules)):
        for obj in sorted((a & d) - o):
            if isinstance(obj, Route) and not link_up(obj.dev):
                continue
            out.append(Finding("routes", f"{obj.describe()} missing"))
        for obj in sorted(o - a - d):
            out.append(Finding("routes", f"{obj.describe()} foreign"))
    return out


def _example(name: str, missing, foreign) -> str:
    """One element, for the log line (any one: sorting 100k would cost a repair's time)."""
    e = next(iter(missing), None) or next(iter(foreign), None)
    try:
        return f" (e.g. {element_text(name, e)})" if e is not None else ""
    except (KeyError, TypeError, ValueError):
        return ""
