"""Sync cost vs size: the agent against one linear nft rule per workload.

    sudo .venv/bin/python bench/sync.py [--sizes 1000,10000,100000] [--runs 3]

For each size, in a fresh network namespace (deleted afterwards) and a fresh
process (so peak RSS is its own):
- agent: full sync of N workloads from an empty kernel (load config + plan +
  one nft batch), a no-op full resync, and incremental syncs inside the agent
  for: add one workload, remove one, move one (new source address), add one
  egress IP; steady-state RSS after the syncs, peak RSS of the process;
- naive: one `ip saddr X snat to ADDR:PORTS` rule per workload, loaded with
  one nft transaction, and one rule added to it (same long-lived libnftables).
Medians over --runs. Only namespaces this script creates are touched.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(n: int) -> dict:
    """Runs inside the bench namespace, in its own process."""
    from gen_config import FRAGMENT, config_text, fragments, source
    from egress_agent import hoststate
    from egress_agent.alloc import Usable
    from egress_agent.config import Reader
    from egress_agent.hoststate import HostState
    from egress_agent.nft.libnft import Libnft
    from egress_agent.reconcile import Reconciler
    from egress_agent.routing.fake import FakeRouting
    from egress_agent.store import Store

    state = f"/tmp/egress-bench-{os.getpid()}"
    os.makedirs(state)
    path = os.path.join(state, "bench.yaml")
    text = config_text(n, state)
    host = HostState(frozenset(), frozenset())  # no egress address present: plan as usable
    out: dict = {"workloads": n}
    nft = Libnft()
    reader = Reader()  # as the daemon reloads: unchanged entries are the same objects

    def write(t: str) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(t)
        os.replace(path + ".tmp", path)

    write(text)
    t = time.perf_counter()
    cfg = reader.load(path).config
    out["load_s"] = time.perf_counter() - t
    import egress_agent.reconcile as rmod
    rmod.usable_from = hoststate.usable_from = lambda cfg, host: Usable()  # no addresses here
    rec = Reconciler(nft, FakeRouting(), Store(state), lambda: host)
    t = time.perf_counter()
    r = rec.sync(cfg, "start", full=True)
    out["full_sync_s"] = time.perf_counter() - t
    out["full_sync_elements"] = r.added
    gc.collect()
    out["after_full_rss_mb"] = rss_mb()
    t = time.perf_counter()
    r = rec.sync(cfg, "resync", full=True)  # the periodic resync: nftables' generation unchanged
    out["noop_resync_s"] = time.perf_counter() - t
    assert not r.changed and r.mode == "incremental", r.to_json()
    t = time.perf_counter()
    rec.generation = None  # as after a foreign commit: the table is read and compared
    r = rec.sync(cfg, "resync", full=True)
    out["resync_read_kernel_s"] = time.perf_counter() - t
    assert not r.changed and r.mode == "full", r.to_json()
    del cfg  # the reconciler holds the config it applied; the bench holds none
    gc.collect()
    out["after_read_rss_mb"] = rss_mb()

    def reload_and_sync(name):
        """The daemon's path after a write: reload (timed apart), then the sync."""
        t0 = time.perf_counter()
        c = reader.load(path).config
        t1 = time.perf_counter()
        res = rec.sync(c, "config")
        out[f"{name}_reload_s"], out[f"{name}_s"] = t1 - t0, time.perf_counter() - t1
        out[f"{name}_replanned"] = res.replanned
        return res

    def incremental(name, new_text):
        write(new_text)
        res = reload_and_sync(name)
        assert res.changed and res.mode == "incremental", (name, res.to_json())
        return new_text

    lines = text.splitlines()
    wl_at = lines.index("workloads:") + 1
    # the first batch after a full sync of a big table waits for the kernel to free
    # that transaction (about a second at 100k): measured on its own, once
    warm = lines[:wl_at] + [f"  - {{id: warm, app: app, source: [{source(n + 3)}]}}"] + lines[wl_at:]
    text = incremental("first_after_full", "\n".join(warm) + "\n")
    lines = text.splitlines()
    # one file: every entry of a changed file over 1 MiB is validated anew, so the
    # sync compares every workload by value
    added = lines[:wl_at] + [f"  - {{id: extra, app: app, source: [{source(n + 5)}]}}"] + lines[wl_at:]
    text = incremental("one_file_add", "\n".join(added) + "\n")

    # the same workloads in include: fragments of 1,000 (what a big host should use):
    # an edit re-reads one fragment and the others' entries stay the same objects
    main, frags = fragments(text, state)
    del text, lines, warm, added  # the bench's copies of the file: not the agent's memory
    path = main
    c = reader.load(path).config
    r = rec.sync(c, "config")
    assert not r.changed, r.to_json()  # the same config, laid out otherwise

    def frag_edit(name, k, old, new):
        with open(frags[k]) as f:
            t = f.read()
        assert old in t, (old, frags[k])
        with open(frags[k] + ".tmp", "w") as f:
            f.write(t.replace(old, new, 1))
        os.replace(frags[k] + ".tmp", frags[k])
        res = reload_and_sync(name)
        assert res.changed and res.mode == "incremental", (name, res.to_json())

    mid = len(frags) // 2
    with open(frags[mid]) as f:
        first, nxt = f.read().splitlines()[1:3]
    frag_edit("add_one_workload", mid, first + "\n", first + "\n"
              + f"  - {{id: extra2, app: app, source: [{source(n + 9)}]}}\n")
    frag_edit("remove_one_workload", mid, first + "\n", "")
    addr = nxt.split("source: [")[1].split("]")[0]
    frag_edit("move_one_workload", mid, nxt, nxt.replace(addr, source(n + 11)))
    with open(main) as f:
        t = f.read()
    with open(main, "w") as f:  # a whole plan, from memory
        f.write(t.replace("egress_ips:\n", "egress_ips:\n  - {id: other-ip, app: other, "
                          "ipv4: 192.0.2.250}\n  - {id: w-ip, workload: w3, ipv4: 192.0.2.251}\n"))
    reload_and_sync("add_one_egress_ip")
    gc.collect()
    out["steady_rss_mb"] = rss_mb()

    # naive: one linear rule per workload
    rules = [f"add table ip naive_{os.getpid()}",
             f"add chain ip naive_{os.getpid()} post {{ type nat hook postrouting priority srcnat; }}"]
    for i in range(n):  # two plain rules per workload (an anonymous set per rule is far slower)
        for proto in ("tcp", "udp"):
            rules.append(f"add rule ip naive_{os.getpid()} post ip saddr {source(i)} ip protocol {proto} "
                         f"snat to 203.0.113.{1 + i % 200}:{1024 + (i % 1000) * 64}-{1024 + (i % 1000) * 64 + 63}")
    t = time.perf_counter()
    nft.run("\n".join(rules) + "\n")
    out["naive_full_load_s"] = time.perf_counter() - t
    nft.run(f"add rule ip naive_{os.getpid()} post ip saddr 10.255.0.2 ip protocol tcp snat to 203.0.113.1:1024-1087\n")
    t = time.perf_counter()
    nft.run(f"add rule ip naive_{os.getpid()} post ip saddr 10.255.0.1 ip protocol tcp snat to 203.0.113.1:1024-1087\n")
    out["naive_add_one_rule_s"] = time.perf_counter() - t
    nft.run(f"delete table ip naive_{os.getpid()}\ndelete table inet egress_agent\n")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    subprocess.run(["rm", "-rf", state])
    return out


def run_size(n: int) -> dict:
    ns = f"eabench{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--one", str(n)],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"size {n} failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    results = []
    for n in map(int, args.sizes.split(",")):
        runs = []
        for i in range(args.runs):
            print(f"size {n}: run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
            runs.append(run_size(n))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results.append(med)
    keys = [("load_s", "config load (s)"), ("full_sync_s", "full sync from empty (s)"),
            ("noop_resync_s", "no-op resync (s)"), ("resync_read_kernel_s", "resync, table read (s)"),
            ("first_after_full_s", "1st sync after full (s)"),
            ("one_file_add_s", "one file: add 1 (s)"), ("one_file_add_reload_s", "one file: reload (s)"),
            ("add_one_workload_s", "add 1 workload (s)"), ("remove_one_workload_s", "remove 1 (s)"),
            ("move_one_workload_s", "move 1 (s)"), ("add_one_workload_reload_s", "reload for add 1 (s)"),
            ("add_one_egress_ip_s", "add 1 egress IP (s)"),
            ("after_full_rss_mb", "RSS after full (MB)"),
            ("after_read_rss_mb", "RSS after table read (MB)"), ("steady_rss_mb", "steady RSS (MB)"),
            ("peak_rss_mb", "peak RSS (MB)"), ("naive_full_load_s", "naive: load N rules (s)"),
            ("naive_add_one_rule_s", "naive: add 1 rule (s)")]
    print(f"{'':26}" + "".join(f"{r['workloads']:>12,}" for r in results))
    for k, label in keys:
        print(f"{label:26}" + "".join(f"{r[k]:>12.4f}" for r in results))
    print("ratio full sync / naive load " + "  ".join(
        f"{r['workloads']}: {r['full_sync_s'] / r['naive_full_load_s']:.2f}" for r in results))
    for k in ("add_one_workload_s", "remove_one_workload_s", "move_one_workload_s"):
        print(f"ratio naive add 1 rule / {k} " + "  ".join(
            f"{r['workloads']}: {r['naive_add_one_rule_s'] / r[k]:.1f}x" for r in results))
    print(json.dumps({"bench": "sync", "runs": args.runs, "results": results}))


if __name__ == "__main__":
    main()
