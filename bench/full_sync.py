"""The full sync from empty alone, with its parts timed, optionally profiled.

    sudo .venv/bin/python bench/full_sync.py [--size 100000] [--profile out.prof]

In a fresh network namespace (deleted afterwards) and a fresh process: load the
config (not timed in the sync), then one `Reconciler.sync(full=True)` against an
empty kernel, as bench/sync.py's "full sync from empty". Prints the sync's time,
the time spent in its parts (allocate, build, the diff's transaction, libnftables'
`cmd` with the batch, the store's history and allocations, ...), and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def measure(n: int, profile: str | None, part: int | None = None) -> dict:
    from gen_config import config_text
    from egress_agent import hoststate
    from egress_agent.alloc import Usable
    from egress_agent.config import Reader
    from egress_agent.hoststate import HostState
    from egress_agent.nft.libnft import Libnft
    from egress_agent.reconcile import Reconciler
    from egress_agent.routing.fake import FakeRouting
    from egress_agent.store import Store
    import egress_agent.reconcile as rmod
    if part:
        from egress_agent.nft import diff
        diff.PART_ELEMENTS = part

    state = f"/tmp/egress-bench-{os.getpid()}"
    os.makedirs(state)
    path = os.path.join(state, "bench.yaml")
    with open(path, "w") as f:
        f.write(config_text(n, state))
    cfg = Reader().load(path).config
    rmod.usable_from = hoststate.usable_from = lambda cfg, host: Usable()
    host = HostState(frozenset(), frozenset())
    nft = Libnft()
    store = Store(state)
    spent = {"nft_s": 0.0, "store_s": 0.0}

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper
    spent.update(allocate_s=0.0, build_s=0.0, transaction_s=0.0, persist_s=0.0,
                 learn_shape_s=0.0, applied_s=0.0)
    nft.run = timed("nft_s", nft.run)
    store.write_allocations = timed("store_s", store.write_allocations)
    rmod.alloc_mod.allocate = timed("allocate_s", rmod.alloc_mod.allocate)
    rmod.build = timed("build_s", rmod.build)
    rmod.transaction = timed("transaction_s", rmod.transaction)
    rmod.Applied.of = timed("applied_s", rmod.Applied.of)
    rec = Reconciler(nft, FakeRouting(), store, lambda: host)
    rec.persist = timed("persist_s", rec.persist)
    rec._learn_shape = timed("learn_shape_s", rec._learn_shape)
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t, c = time.perf_counter(), time.process_time()
    r = rec.sync(cfg, "start", full=True)
    out = {"workloads": n, "full_sync_s": time.perf_counter() - t,
           "cpu_s": time.process_time() - c, "elements": r.added, **spent}
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    out["load"] = os.getloadavg()[0]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nft.run("delete table inet egress_agent\n")
    subprocess.run(["rm", "-rf", state])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--profile", help="write a cProfile of the sync here")
    ap.add_argument("--part-elements", type=int, help="elements per batch of a table made "
                    "from nothing (nft.diff.PART_ELEMENTS)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.size, args.profile, args.part_elements)))
        return
    ns = f"eafullsync{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, __file__, "--one", "--size", str(args.size)]
        if args.profile:
            cmd += ["--profile", os.path.abspath(args.profile)]
        if args.part_elements:
            cmd += ["--part-elements", str(args.part_elements)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        print(p.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    main()
