#!/usr/bin/env python3
"""The usage watcher's per-IP rows (usage.ip_rows) at N workloads, against the
naive per-IP scan of every lease it replaced, in the same run.

    .venv/bin/python bench/usage_rows.py            # 100,000 workloads (110 egress IPs)
    .venv/bin/python bench/usage_rows.py --workloads 10000

The daemon computes these rows every --usage-interval (15 s) in a thread of its
own; while it runs it holds the GIL, so every config change waits for it. No
kernel is touched: the allocation is planned in memory."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gen_config import config_text  # noqa: E402

from egress_agent import usage  # noqa: E402
from egress_agent.alloc import Allocations, allocate  # noqa: E402
from egress_agent.config import parse  # noqa: E402


def naive(cfg, alloc) -> list[int]:
    """The old loop, counting only: every lease once per egress IP."""
    return [len({l.workload for (_, i), l in alloc.leases.items() if i == ip.id})
            for ip in cfg.ips_here()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    n = ap.parse_args()
    cfg = parse(config_text(n.workloads)).config
    alloc, _ = allocate(cfg, Allocations())
    rows = usage.ip_rows(cfg, alloc)
    assert [r["workloads"] for r in rows] == naive(cfg, alloc)
    best = {}
    for name, fn in (("naive per-IP scan", naive), ("usage.ip_rows", usage.ip_rows)):
        ts = []
        for _ in range(n.runs):
            t = time.perf_counter()
            fn(cfg, alloc)
            ts.append(time.perf_counter() - t)
        best[name] = min(ts)
        print(f"{name:20} {best[name] * 1000:8.1f} ms (best of {n.runs})")
    print(f"{len(cfg.ips_here())} egress IPs, {len(alloc.leases)} leases: "
          f"{best['naive per-IP scan'] / best['usage.ip_rows']:.0f}x")


if __name__ == "__main__":
    main()
