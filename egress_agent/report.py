"""Collect a usage snapshot from the kernel: conntrack groups, counts, refusals.

Effects (root: ctnetlink dumps need CAP_NET_ADMIN); the arithmetic is in usage.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import names, usage
from .alloc import Allocations
from .config import Config


@dataclass
class Snapshot:
    rows: list[usage.Row]
    ips: list[dict]
    refused: list[dict]
    conntrack: dict
    taken_at: float = field(default_factory=time.time)
    duration_ms: float = 0.0
    live: frozenset = frozenset()  # (lease mark, egress address) with connections

    def to_json(self, top: int | None = None) -> dict:
        rows = self.rows[:top] if top else self.rows
        return {"rows": [r.to_json() for r in rows], "egress_ips": self.ips,
                "refused": self.refused, "conntrack": self.conntrack,
                "duration_ms": round(self.duration_ms, 1)}


def collect(cfg: Config, alloc: Allocations, nft) -> Snapshot:
    from . import conntrack
    from .nft.libnft import refused_elements
    t0 = time.perf_counter()
    raw = conntrack.dump_groups()
    groups = {usage.Group(*g): n for g, n in raw.items()}
    counts = conntrack.read_counts()
    ct = {"count": counts.get("count"), "max": counts.get("max"),
          "ratio": round(counts["count"] / counts["max"], 4) if counts.get("max") else None,
          "stats": counts.get("stats", {})}
    refused = usage.refusals(cfg, alloc, refused_elements(nft.list_set(names.REFUSED_SET)))
    return Snapshot(usage.rows(cfg, alloc, groups), usage.ip_rows(cfg, alloc), refused, ct,
                    duration_ms=(time.perf_counter() - t0) * 1000,
                    live=conntrack.lease_addresses(raw))
