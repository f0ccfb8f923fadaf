#!/usr/bin/env python3
"""Usage reading cost: grouping 100k and 1M conntrack entries, ours vs the naive ways.

    sudo .venv/bin/python bench/conntrack_read.py [--sizes 100000,1000000] [--runs 3]

In a scratch network namespace (deleted at the end, whatever happens) it
creates the entries over ctnetlink (no packets), 90% of them carrying
OURS_FLAG, spread over 1000 workloads, 50 destinations and 10 egress
addresses, 5% UDP. nf_conntrack_max is global: it is raised for the run
and restored; the hash size is left alone unless --buckets is given
(resizing rehashes every namespace's table). For each size, median of
--runs runs, each reader in a fresh process so its peak RSS is its own:

  ours       egress_agent.conntrack.dump_groups() (kernel mark filter, fixed-offset
             parser; threaded = reader thread + recvmmsg, sync = one thread)
  tools      `conntrack -L --mark 0x40000000/0x40000000 | awk` counting the same groups
  pyroute2   Conntrack().dump_entries() and NFCTSocket.dump() grouping the same way, on
             the smallest size only, each bounded by --pyroute2-timeout (rate extrapolated)
  [kernel]   the same dump received by our reader and not parsed: the kernel's share
  [list]     `conntrack -L --mark ...` into /dev/null: the listing without the counting

Each run checks that ours and conntrack-tools found exactly the same groups
and counts. Prints a table with ratios and, last, one JSON line. Bounded:
stops starting new measurements after --budget seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the conntrack filler is a test helper, not part of the agent
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from egress_agent import conntrack, names  # noqa: E402
from conntrack_insert import (generate, insert, raised_conntrack_max,  # noqa: E402
                              read_sysctl, scratch_netns)

MARK = f"0x{names.OURS_FLAG:08x}/0x{names.OURS_FLAG:08x}"

CHILD_OURS = r"""
import hashlib, json, resource, sys, time
t0 = time.perf_counter()
from egress_agent import conntrack
ns, mode = sys.argv[1], sys.argv[2]
st = conntrack.DumpStats()
t = time.perf_counter()
if mode == "raw":      # the kernel's share: receive the same dump, parse nothing
    sock = conntrack.open_socket(ns)
    req = conntrack.dump_request(7, mark=conntrack.names.OURS_FLAG, mask=conntrack.names.OURS_FLAG)
    chunks = conntrack._chunks(sock, req, st, threaded=False)
    for buf, segs in chunks:
        if conntrack._ends_dump(buf, *segs[-1], 7, sock.getsockname()[0]):
            break
    chunks.close()
    groups = {}
else:
    groups = conntrack.dump_groups(netns=ns, stats=st, threaded=mode == "threaded")
dt = time.perf_counter() - t
lines = sorted(f"{n} {g.mark} {g.protocol} {g.destination} {g.port} {g.egress_address}"
               for g, n in groups.items())
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": dt, "process_seconds": time.perf_counter() - t0,
                  "rss_mb": int(hwm) / 1024,
                  "entries": sum(groups.values()), "groups": len(groups),
                  "digest": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
                  "stats": st.as_dict()}))
"""

# The same grouping as dump_groups() from `conntrack -L` lines: mark, protocol
# number, first dst= (original), first dport= (0 without ports), second dst= (reply).
AWK = r"""
{ d = ""; r = ""; p = "0"; m = "0"; seen = 0
  for (i = 3; i <= NF; i++) {
    f = $i
    if (substr(f, 1, 4) == "dst=") { if (d == "") d = substr(f, 5); else if (r == "") r = substr(f, 5) }
    else if (substr(f, 1, 6) == "dport=") { if (!seen) { p = substr(f, 7); seen = 1 } }
    else if (substr(f, 1, 5) == "mark=") m = substr(f, 6)
  }
  c[m " " $2 " " d " " p " " r]++
}
END { for (k in c) print c[k], k
      while ((getline line < "/proc/self/status") > 0)
        if (substr(line, 1, 6) == "VmHWM:") { split(line, a, " "); print a[2] > "/dev/stderr" } }
"""

CHILD_PYROUTE2 = r"""
import socket, sys, time
from pyroute2 import Conntrack, NFCTSocket
ns, api, mark = sys.argv[1], sys.argv[2], int(sys.argv[3])
counts = {}
n = 0
t = time.perf_counter()
if api == "Conntrack":
    c = Conntrack(netns=ns, nfgen_family=socket.AF_UNSPEC)
    it = c.dump_entries(mark=mark, mark_mask=mark)
    def key(e):
        o, r = e.tuple_orig, e.tuple_reply
        return (e.mark, o.proto, o.daddr, o.dport or 0, r.daddr)
else:
    c = NFCTSocket(netns=ns, nfgen_family=socket.AF_UNSPEC)
    it = c.dump(mark=mark, mark_mask=mark)
    def key(m):
        ip = ("CTA_IP_V4_DST", "CTA_IP_V6_DST")
        o = m.get_attr("CTA_TUPLE_ORIG")
        r = m.get_attr("CTA_TUPLE_REPLY")
        oip, rip, op = o.get_attr("CTA_TUPLE_IP"), r.get_attr("CTA_TUPLE_IP"), o.get_attr("CTA_TUPLE_PROTO")
        return (m.get_attr("CTA_MARK"), op.get_attr("CTA_PROTO_NUM"),
                oip.get_attr(ip[0]) or oip.get_attr(ip[1]), op.get_attr("CTA_PROTO_DST_PORT") or 0,
                rip.get_attr(ip[0]) or rip.get_attr(ip[1]))
for e in it:
    k = key(e)
    counts[k] = counts.get(k, 0) + 1
    n += 1
    if n % 2000 == 0:
        print("progress", n, time.perf_counter() - t, flush=True)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
print("done", n, time.perf_counter() - t, len(counts), int(hwm) / 1024, flush=True)
"""


# Peak RSS: getrusage()/wait4() are useless here, because a child forked from
# this process starts with its ru_maxrss at this process's peak (Linux keeps the
# high-water mark of the mm replaced by exec). So each reader's own VmHWM is
# read instead: Python children and awk report theirs at the end;
# conntrack's is sampled from /proc while it runs (it streams, so its RSS is
# flat after start-up).

def vm_hwm_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def run_ours(ns: str, mode: str) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD_OURS, ns, mode],
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))})
    out = p.stdout.read()
    if p.wait() != 0:
        raise RuntimeError(f"dump_groups child exited {p.returncode}")
    r = json.loads(out)
    r.update(wall=time.perf_counter() - t)
    return r


def run_list_only(ns: str) -> dict:
    """`conntrack -L --mark ...` into /dev/null: the listing alone, without the counting."""
    t = time.perf_counter()
    lister = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--", "conntrack", "-L",
                               "--mark", MARK], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    rss = 0.0
    while lister.poll() is None:
        rss = max(rss, vm_hwm_mb(lister.pid) or 0.0)
        time.sleep(0.005)
    return {"seconds": time.perf_counter() - t, "rss_mb": rss, "groups": 0, "entries": 0}


def run_tools(ns: str) -> dict:
    t = time.perf_counter()
    lister = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "--", "conntrack", "-L",
                               "--mark", MARK], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    counter = subprocess.Popen(["awk", AWK], stdin=lister.stdout, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lister.stdout.close()
    rss1 = 0.0
    chunks: list[str] = []
    fd = counter.stdout.fileno()
    while True:                       # read awk's output, sample conntrack's VmHWM
        ready, _, _ = select.select([fd], [], [], 0.005)
        if lister.poll() is None:
            rss1 = max(rss1, vm_hwm_mb(lister.pid) or 0.0)
        if ready:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            chunks.append(data.decode())
    out = "".join(chunks)
    rss2 = float(counter.stderr.read().split()[0]) / 1024
    rc1, rc2 = lister.wait(), counter.wait()
    wall = time.perf_counter() - t
    if rc1 != 0 or rc2 != 0:
        raise RuntimeError(f"conntrack|awk exited {rc1}/{rc2}")
    lines = sorted(ln for ln in out.splitlines() if ln.strip())
    return {"seconds": wall, "wall": wall, "rss_mb": rss1 + rss2, "rss_conntrack_mb": rss1,
            "rss_awk_mb": rss2, "entries": sum(int(ln.split()[0]) for ln in lines),
            "groups": len(lines),
            "digest": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def run_pyroute2(ns: str, api: str, size: int, timeout: float) -> dict:
    p = subprocess.Popen([sys.executable, "-c", CHILD_PYROUTE2, ns, api, str(names.OURS_FLAG)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    last = (0, 0.0)
    done = False
    rss = 0.0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = p.stdout.readline()
            if not line:
                break
            parts = line.split()
            last = (int(parts[1]), float(parts[2]))
            rss = max(rss, vm_hwm_mb(p.pid) or 0.0)
            if parts[0] == "done":
                rss = max(rss, float(parts[4]))
                done = True
                break
    finally:
        if p.poll() is None and not done:
            rss = max(rss, vm_hwm_mb(p.pid) or 0.0)
            p.send_signal(signal.SIGKILL)          # our own child, by pid
        p.wait()
    n, secs = last
    rate = n / secs if secs else 0.0
    return {"api": api, "entries": n, "seconds": secs, "complete": done, "rate": rate,
            "rss_mb": rss, "extrapolated_seconds": (size * 0.9 / rate) if rate else None}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pyroute2-timeout", type=float, default=20.0)
    ap.add_argument("--no-pyroute2", action="store_true")
    ap.add_argument("--no-sync", action="store_true", help="skip the single-threaded reader")
    ap.add_argument("--no-extra", action="store_true",
                    help="skip the reference rows (kernel only, conntrack -L > /dev/null)")
    ap.add_argument("--buckets", type=int, default=None, help="set nf_conntrack_buckets too")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds after which no new measurement starts")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, ctnetlink)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so the finally blocks run
    sizes = sorted(int(s) for s in args.sizes.split(","))
    start = time.monotonic()
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(),
               "python": platform.python_version(),
               "conntrack_tools": subprocess.run(["conntrack", "--version"], capture_output=True,
                                                 text=True).stdout.strip(),
               "nf_conntrack_buckets": read_sysctl("nf_conntrack_buckets"),
               "loadavg_start": open("/proc/loadavg").read().split()[0]}
    results: dict[int, dict] = {}
    skipped: list[str] = []
    with raised_conntrack_max(max(sizes) + 50_000, args.buckets), scratch_netns("eact") as ns:
        machine["nf_conntrack_buckets"] = read_sysctl("nf_conntrack_buckets")
        machine["nf_conntrack_max_during"] = read_sysctl("nf_conntrack_max")
        entries = generate(max(sizes))
        have = 0
        for size in sizes:
            t = time.perf_counter()
            have += insert(itertools.islice(entries, size - have), netns=ns)
            res: dict = {"insert_seconds": time.perf_counter() - t,
                         "count": conntrack.read_counts(ns)["count"]}
            modes = [("ours", "threaded")] + ([] if args.no_sync else [("ours_sync", "sync")])
            if not args.no_extra:
                modes.append(("kernel", "raw"))
            for name, _ in modes + [("tools", None), ("list_only", None)]:
                res[name] = []
            for _run in range(args.runs):
                if time.monotonic() - start > args.budget:
                    skipped.append(f"{size}: run {_run + 1} (budget)")
                    break
                for name, mode in modes:
                    res[name].append(run_ours(ns, mode))
                res["tools"].append(run_tools(ns))
                if not args.no_extra:
                    res["list_only"].append(run_list_only(ns))
                if res["ours"][-1]["digest"] != res["tools"][-1]["digest"]:
                    raise SystemExit(f"MISMATCH at {size}: ours and conntrack-tools disagree")
            if size == sizes[0] and not args.no_pyroute2:
                for api in ("NFCTSocket", "Conntrack"):
                    if time.monotonic() - start > args.budget:
                        skipped.append(f"pyroute2 {api} (budget)")
                        continue
                    res[f"pyroute2_{api}"] = run_pyroute2(ns, api, size, args.pyroute2_timeout)
            results[size] = res
    machine["loadavg_end"] = open("/proc/loadavg").read().split()[0]
    machine["seconds_total"] = round(time.monotonic() - start, 1)
    report(results, machine, skipped)
    return 0


def report(results: dict[int, dict], machine: dict, skipped: list[str]) -> None:
    print(f"# machine: {machine['cpus']} CPUs, kernel {machine['kernel']}, Python "
          f"{machine['python']}, {machine['conntrack_tools']}, buckets "
          f"{machine['nf_conntrack_buckets']}, load average {machine['loadavg_start']} -> "
          f"{machine['loadavg_end']}, total {machine['seconds_total']} s")
    print(f"{'size':>8} {'reader':<28} {'time s':>8} {'entries/s':>10} {'peak RSS MB':>12} "
          f"{'vs tools':>9}")
    summary: dict = {"machine": machine, "skipped": skipped, "sizes": {}}
    for size, res in results.items():
        row: dict = {"created": res["count"], "insert_seconds": round(res["insert_seconds"], 2)}
        if not res["tools"]:
            continue
        tools_t = median_of(res["tools"], "seconds")
        matched = res["tools"][0]["entries"]
        for name, label in (("ours", "ours threaded (dump_groups)"),
                            ("ours_sync", "ours sync (dump_groups)"),
                            ("tools", "conntrack -L | awk"),
                            ("kernel", "[kernel only: recv, no parse]"),
                            ("list_only", "[conntrack -L > /dev/null]")):
            runs = res.get(name) or []
            if not runs:
                continue
            t = median_of(runs, "seconds")
            rss = median_of(runs, "rss_mb")
            ratio = tools_t / t
            print(f"{size:>8} {label:<28} {t:>8.3f} {matched / t:>10.0f} {rss:>12.1f} "
                  f"{ratio:>8.2f}x")
            entry = {"seconds": round(t, 3), "runs": [round(r["seconds"], 3) for r in runs],
                     "entries_per_s": round(matched / t), "peak_rss_mb": round(rss, 1),
                     "speedup_vs_tools": round(ratio, 2), "groups": runs[0]["groups"],
                     "entries": runs[0]["entries"]}
            if name.startswith("ours") or name == "kernel":
                entry["process_seconds"] = round(median_of(runs, "process_seconds"), 3)
                entry["stats"] = runs[0]["stats"]
            elif name == "tools":
                entry["rss_conntrack_mb"] = round(median_of(runs, "rss_conntrack_mb"), 1)
                entry["rss_awk_mb"] = round(median_of(runs, "rss_awk_mb"), 1)
            row[name] = entry
        for api in ("NFCTSocket", "Conntrack"):
            p = res.get(f"pyroute2_{api}")
            if not p:
                continue
            est = p["extrapolated_seconds"]
            label = f"pyroute2 {api}" + ("" if p["complete"] else " (timeout)")
            print(f"{size:>8} {label:<28} {(est or 0):>8.1f} {p['rate']:>10.0f} "
                  f"{p['rss_mb']:>12.1f} {(tools_t / est if est else 0):>8.2f}x"
                  + ("" if p["complete"] else f"   [{p['entries']} entries in "
                                                  f"{p['seconds']:.1f} s, time extrapolated]"))
            row[f"pyroute2_{api}"] = {k: (round(v, 3) if isinstance(v, float) else v)
                                      for k, v in p.items()}
        summary["sizes"][str(size)] = row
    for s in skipped:
        print(f"# skipped: {s}")
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    sys.exit(main())
