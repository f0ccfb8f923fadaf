#!/usr/bin/env python3
"""Config change to kernel: how long after a config file is written is the change live?

    sudo .venv/bin/python bench/config_latency.py              # 1k and 10k, 30 changes each: ~1.5 min
    sudo .venv/bin/python bench/config_latency.py --sizes 10000 --changes 100 --budget 400
                                                               # the full measurement: ~4 min
    sudo .venv/bin/python bench/config_latency.py --sizes 10000 --changes 10 --profile

For each size, in a fresh network namespace (eacl<hex>, deleted in `finally`),
this script runs itself again inside the namespace (`ip netns exec NS python
bench/config_latency.py --inner N ...`), which:

1. writes bench/gen_config.py's config of N workloads (--ipv6: with quoted
   IPv6 ranges and sources) and adds its egress addresses to the namespace's
   `lo` (so every egress IP is usable; an address in each IPv6 range);
2. starts the daemon as operators do, but as this checkout's module, with its
   own state dir:
       python -m egress_agent.cli run -c CFG --resync 3600 --metrics off \\
           --log-format json --state-dir DIR
   and waits for its first sync (the JSON line with "event": "sync");
3. makes --changes changes, one at a time. Change 2k adds workload lat<k>
   with a source address of its own (10.128.x.x); change 2k+1 removes it
   again. Each writes the whole file to a temporary name in the same
   directory and renames it over the config (like an editor). The clock starts
   just before the rename. The change is live when the kernel answers a
   lookup of that address in `map source4` (present for an add, gone for a
   removal; one atomic nft batch carries the workload's source4, assign4 and
   snat4 elements): polled every 1 ms with NFT_MSG_GETSETELEM on a netlink
   socket (the kernel looks up the one key). Once live, a long-lived
   `nftables.Nftables()` confirms it with `get element inet egress_agent
   source4 { ADDR }`. (libnftables is not the poller: each *failed* `get
   element` makes it drop and refill its cache, about 0.3 s at 10k
   workloads, so it cannot poll a missing element every millisecond.)
4. after each change, waits for the daemon's `sync` log line of that change
   and keeps its `duration_ms` (reconcile: plan + nft batch + state save),
   then waits a random 20-80 ms before the next change.

Latency splits into: the debounce (egress_agent.daemon.CONFIG_DEBOUNCE, the
daemon waits that long after the first inotify event), config load (timed
separately: egress_agent.config.load() of the same file in this process, median
of 3), and the sync itself (duration_ms; the nft batch is committed before the
state is saved, so an element is live slightly before the sync ends).
"before sync" = log line arrival - write - duration_ms (inotify + debounce + load).

--profile runs the daemon of the largest size under cProfile
(`python -m cProfile -o FILE -m egress_agent.cli run ...`) and prints the
functions with the highest cumulative time below Daemon.load_config and
Reconciler.sync, over the start sync and every change.

Prints, per size, median/p90/p99/max of the latency (all changes, adds,
removals), of duration_ms and of "before sync", the load average, and one
JSON line last. Bounded: every wait has a timeout (--timeout per change), no
change starts after --budget seconds of a size, and the daemon (the only
process started in the namespace) is stopped by pid; the namespace is deleted
whatever happens.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

# The daemon runs as `python -m egress_agent.cli` from ROOT, so it is this checkout's
# code even where the venv's egress-agent is an editable install of another tree
# (a git worktree); the interpreter is the one running this script.
PYTHON = sys.executable
TABLE, SOURCE_MAP = "egress_agent", "source4"
NEW_SOURCES = ipaddress.IPv4Address("10.128.0.0")  # above every generated source (10.0.1.0 + N)


# --- one element lookup over netlink ----------------------------------------------------

NETLINK_NETFILTER = 12
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR, NLM_F_REQUEST, NLA_F_NESTED = 2, 1, 0x8000
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 1, 1, 1


def _nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


class ElementProbe:
    """Is ADDR a key of `map inet TABLE SET`? One NFT_MSG_GETSETELEM request:
    the kernel looks up that key and answers with the element or ENOENT."""

    def __init__(self, table: str = TABLE, set_name: str = SOURCE_MAP):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(2.0)
        self.seq = int(time.time()) & 0xFFFF
        self.prefix = (struct.pack("=BBH", NFPROTO_INET, 0, 0)
                       + _nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                       + _nla(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))

    def has(self, addr: str) -> bool:
        self.seq += 1
        key = _nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _nla(NFTA_DATA_VALUE, socket.inet_aton(addr)))
        body = self.prefix + _nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                                  _nla(NFTA_LIST_ELEM | NLA_F_NESTED, key))
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
        self.sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if seq == self.seq:
                    if mtype == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err == 2:  # ENOENT: no such element (or no such table yet)
                            return False
                        raise OSError(err, f"GETSETELEM {addr}: {os.strerror(err)}")
                    if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                        return True
                off += (length + 3) & ~3
                if length == 0:
                    break


# --- inside the namespace ------------------------------------------------------------

def daemon_rss(pid: int) -> dict:
    """The daemon's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return {"rss": round(int(st["VmRSS"].split()[0]) / 1024), "peak": round(int(st["VmHWM"].split()[0]) / 1024)}


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "median": statistics.median(xs) if xs else None,
            "p90": percentile(xs, 90), "p99": percentile(xs, 99), "max": max(xs) if xs else None}


class DaemonLog:
    """Reads the daemon's JSON log lines, stamping each with its arrival time."""

    def __init__(self, stream):
        self.lines: list[tuple[float, dict]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            t = time.perf_counter()
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                obj = {"event": "non-json", "text": raw.rstrip()}
            with self.cond:
                self.lines.append((t, obj))
                self.cond.notify_all()

    def syncs(self) -> list[tuple[float, dict]]:
        with self.cond:
            return [(t, o) for t, o in self.lines if o.get("event") == "sync"]

    def wait_sync(self, after: int, timeout: float) -> tuple[float, dict] | None:
        """The first sync line after the first `after` ones."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                s = [(t, o) for t, o in self.lines if o.get("event") == "sync"]
                if len(s) > after:
                    return s[after]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def problems(self) -> list[dict]:
        with self.cond:
            return [o for _, o in self.lines if o.get("level") in ("error", "critical")]


def inner(args) -> int:
    import nftables
    from gen_config import config_text, fragments
    from egress_agent.config import load
    from egress_agent.daemon import CONFIG_DEBOUNCE

    n = args.inner
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="eacl-")
    proc = None
    try:
        etc, state = os.path.join(tmp, "etc"), os.path.join(tmp, "state")
        os.mkdir(etc)
        cfg = os.path.join(etc, "config.yaml")
        text = config_text(n, state, ipv6=args.ipv6)
        with open(cfg, "w") as f:
            f.write(text)
        frags: list[str] = []
        if args.include:  # the workloads in include: fragments of 1,000
            cfg, frags = fragments(text, etc)
        egress = re.findall(r"ipv4: ([0-9.]+)", text)
        # an IPv6 range is usable when an address in it is on the host
        egress6 = [f"{prefix}1/64 nodad" for prefix in re.findall(r'ipv6: "([0-9a-f:]+::)/64"', text)]
        subprocess.run(["ip", "-batch", "-"], check=True, text=True, input="link set lo up\n"
                       + "".join(f"addr add {a}/32 dev lo\n" for a in egress)
                       + "".join(f"addr add {a} dev lo\n" for a in egress6))

        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        run = ["run", "-c", cfg, "--resync", "3600", "--metrics", "off", "--log-format", "json",
               "--state-dir", state]
        prof_file = os.path.join(tmp, "daemon.prof")
        cmd = ([PYTHON, "-m", "cProfile", "-o", prof_file] if args.profile else [PYTHON]) \
            + ["-m", "egress_agent.cli"] + run
        t_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        log = DaemonLog(proc.stderr)
        first = log.wait_sync(0, args.start_timeout)
        if first is None:
            raise RuntimeError(f"no first sync within {args.start_timeout}s: {log.lines[-5:]}")
        start = {"first_sync_s": round(first[0] - t_start, 3), **{k: first[1].get(k) for k in (
            "trigger", "mode", "elements_added", "duration_ms")}, "rss_mb": daemon_rss(proc.pid)}
        print(f"  {n} workloads: daemon's first sync after {start['first_sync_s']:.2f}s "
              f"(duration_ms {start['duration_ms']})", file=sys.stderr, flush=True)

        # config load alone, same file, this process (the daemon's load_config does this + a copy)
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            load(cfg)
            loads.append((time.perf_counter() - t) * 1000)
        load_ms = statistics.median(loads)

        probe = ElementProbe()
        nft = nftables.Nftables()
        if not probe.has(str(ipaddress.IPv4Address("10.0.1.0") + 256)):
            raise RuntimeError("probe does not see workload w0's element after the first sync")

        target = cfg
        if frags:  # edit the middle fragment
            target = frags[len(frags) // 2]
            with open(target) as f:
                text = f.read()
        lines = text.splitlines(keepends=True)
        at = lines.index("workloads:\n") + 1
        samples = []
        t_budget = time.monotonic() + args.budget
        added_line = None
        for i in range(args.changes):
            if time.monotonic() > t_budget:
                print(f"  budget spent after {i} changes", file=sys.stderr)
                break
            k = i // 2
            addr = str(NEW_SOURCES + k)
            adding = i % 2 == 0
            if adding:
                added_line = f"  - {{id: lat{k}, app: app, source: [{addr}]}}\n"
                body = lines[:at] + [added_line] + lines[at:]
            else:
                body = lines
            tmpname = os.path.join(os.path.dirname(target), ".config.yaml.new")
            with open(tmpname, "w") as f:
                f.write("".join(body))
            before = len(log.syncs())
            t0 = time.perf_counter()
            os.rename(tmpname, target)
            live = None
            deadline = t0 + args.timeout
            polls = 0
            while time.perf_counter() < deadline:
                polls += 1
                if probe.has(addr) == adding:
                    live = time.perf_counter()
                    break
                time.sleep(0.001)
            rc, _, _ = nft.cmd(f"get element inet {TABLE} {SOURCE_MAP} {{ {addr} }}")
            confirmed = (rc == 0) == adding
            s = log.wait_sync(before, max(1.0, deadline - time.perf_counter()))
            sample = {"change": i, "kind": "add" if adding else "remove", "address": addr,
                      "latency_ms": round((live - t0) * 1000, 2) if live else None,
                      "confirmed_by_nft": confirmed, "polls": polls}
            if s:
                t_log, o = s
                sample.update({"sync_trigger": o.get("trigger"), "sync_mode": o.get("mode"),
                               "duration_ms": o.get("duration_ms"),
                               "elements_added": o.get("elements_added"),
                               "elements_removed": o.get("elements_removed"),
                               "log_after_write_ms": round((t_log - t0) * 1000, 2)})
                sample["before_sync_ms"] = round(sample["log_after_write_ms"] - o.get("duration_ms", 0), 2)
            samples.append(sample)
            lat = sample["latency_ms"]
            print(f"  change {i + 1:3}/{args.changes} {sample['kind']:6} {addr:15} "
                  f"live after {lat if lat is not None else 'TIMEOUT':>8} ms, sync duration_ms "
                  f"{sample.get('duration_ms')}, logged after {sample.get('log_after_write_ms')} ms",
                  file=sys.stderr, flush=True)
            time.sleep(rng.uniform(0.02, 0.08))
        time.sleep(1.0)  # the last sync's garbage goes before the reading
        result = {"workloads": n, "start": start, "config_load_ms": round(load_ms, 2),
                  "rss_mb_after": daemon_rss(proc.pid),
                  "debounce_ms": CONFIG_DEBOUNCE * 1000, "samples": samples,
                  "daemon_errors": log.problems()[:10]}
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # stops; kernel state stays (the netns goes)
            try:
                proc.wait(timeout=60 if args.profile else 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    if args.profile and os.path.exists(prof_file):
        result["profile"] = profile_text(prof_file)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0


def profile_text(path: str) -> str:
    import io
    import pstats
    out = io.StringIO()
    st = pstats.Stats(path, stream=out)
    st.sort_stats("cumulative")
    st.print_callees(r"daemon.py:\d+\(_sync\)|daemon.py:\d+\(load_config\)|reconcile.py:\d+\(sync\)"
                     r"|reconcile.py:\d+\(plan\)")
    st.print_stats(r"egress_agent|yaml|nftables|json", 30)
    return out.getvalue()


# --- outside: one namespace per size ----------------------------------------------------

def run_size(n: int, args) -> dict:
    ns = os.environ.get("EGRESS_BENCH_PREFIX", "eacl") + secrets.token_hex(3)  # a helper's own prefix
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, PYTHON, os.path.abspath(__file__), "--inner", str(n),
               "--changes", str(args.changes), "--timeout", str(args.timeout),
               "--budget", str(args.budget), "--seed", str(args.seed),
               "--start-timeout", str(args.start_timeout)] + (["--profile"] if args.profile else []) \
            + (["--include"] if args.include else []) + (["--ipv6"] if args.ipv6 else [])
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                           timeout=args.start_timeout + args.budget + args.timeout + 120)
        if p.returncode != 0:
            raise SystemExit(f"size {n} failed (exit {p.returncode})")
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        # only the daemon was started in there; anything left is ours
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--sizes", default="1000,10000", help="workload counts (default 1000,10000)")
    ap.add_argument("--changes", type=int, default=30, help="config changes per size (default 30)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one change")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="start no change after this many seconds of a size (default 200)")
    ap.add_argument("--start-timeout", type=float, default=120.0,
                    help="seconds to wait for the daemon's first sync")
    ap.add_argument("--seed", type=int, default=7, help="seed of the gaps between changes")
    ap.add_argument("--profile", action="store_true",
                    help="run the daemon of the largest size under cProfile and print the hot spots")
    ap.add_argument("--include", action="store_true",
                    help="the workloads in include: fragments of 1,000; each change edits one")
    ap.add_argument("--ipv6", action="store_true",
                    help="gen_config.py's quoted IPv6 too: a range per egress IP, a source per workload")
    ap.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("config_latency.py: run as root (it creates a network namespace)", file=sys.stderr)
        return 2
    if args.inner:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the daemon in `finally`
        return inner(args)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up in `finally`
    sizes = [int(x) for x in args.sizes.split(",") if x]
    started = time.monotonic()
    load_before = loadavg()
    results = []
    for n in sizes:
        print(f"size {n}: {args.changes} changes", file=sys.stderr, flush=True)
        a = argparse.Namespace(**vars(args))
        a.profile = args.profile and n == max(sizes)
        results.append(run_size(n, a))
    load_after = loadavg()

    summary = []
    print()
    print(f"config write (rename) -> element live in the kernel, {args.changes} changes per size "
          f"(adds and removals alternate); ms")
    print(f"{'WORKLOADS':>9} {'WHAT':22} {'N':>4} {'MEDIAN':>8} {'P90':>8} {'P99':>8} {'MAX':>8}")
    for r in results:
        smp = r["samples"]
        lat = [s["latency_ms"] for s in smp if s["latency_ms"] is not None]
        rows = {
            "latency, all": lat,
            "latency, adds": [s["latency_ms"] for s in smp if s["kind"] == "add" and s["latency_ms"] is not None],
            "latency, removals": [s["latency_ms"] for s in smp if s["kind"] == "remove" and s["latency_ms"] is not None],
            "sync duration_ms": [s["duration_ms"] for s in smp if s.get("duration_ms") is not None],
            "before sync": [s["before_sync_ms"] for s in smp if s.get("before_sync_ms") is not None],
            "log line after write": [s["log_after_write_ms"] for s in smp if s.get("log_after_write_ms") is not None],
        }
        st = {k: stats(v) for k, v in rows.items()}
        for k, v in st.items():
            print(f"{r['workloads']:>9} {k:22} {v['n']:>4} {fmt(v['median']):>8} {fmt(v['p90']):>8} "
                  f"{fmt(v['p99']):>8} {fmt(v['max']):>8}")
        timeouts = sum(1 for s in smp if s["latency_ms"] is None)
        unconfirmed = sum(1 for s in smp if not s["confirmed_by_nft"])
        modes = sorted({s.get("sync_mode") for s in smp if s.get("sync_mode")})
        print(f"{'':>9} debounce {r['debounce_ms']:.0f} ms; config load alone {r['config_load_ms']:.1f} ms; "
              f"first sync {r['start']['first_sync_s']:.2f}s ({r['start']['duration_ms']} ms); "
              f"sync modes {','.join(modes)}; timeouts {timeouts}; not confirmed by nft {unconfirmed}; "
              f"daemon errors {len(r['daemon_errors'])}")
        print(f"{'':>9} daemon RSS after its first sync {r['start']['rss_mb']['rss']} MB, after the "
              f"changes {r['rss_mb_after']['rss']} MB (peak {r['rss_mb_after']['peak']} MB)")
        p99 = st["latency, all"]["p99"]
        summary.append({"workloads": r["workloads"], "changes": len(smp), "timeouts": timeouts,
                        "unconfirmed_by_nft": unconfirmed, "debounce_ms": r["debounce_ms"],
                        "config_load_ms": r["config_load_ms"], "start": r["start"],
                        "rss_mb_after": r["rss_mb_after"],
                        **{k.replace(" ", "_").replace(",", ""): v for k, v in st.items()},
                        "target_p99_ms": 100, "target_met": p99 is not None and p99 < 100 and not timeouts,
                        "daemon_errors": r["daemon_errors"], "samples": smp})
    print()
    for r in results:
        if r.get("profile"):
            print(f"cProfile of the daemon at {r['workloads']} workloads (start sync + every change):")
            print(r["profile"])
    elapsed = time.monotonic() - started
    print(f"load average before: {load_before}, after: {load_after}; {os.cpu_count()} CPUs; "
          f"kernel {os.uname().release}; total {elapsed:.0f} s")
    print(json.dumps({"bench": "config_latency", "changes": args.changes, "ipv6": args.ipv6,
                      "loadavg_before": load_before, "loadavg_after": load_after,
                      "kernel": os.uname().release, "elapsed_s": round(elapsed, 1),
                      "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
