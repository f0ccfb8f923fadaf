#!/usr/bin/env python3
"""Failover latency of `egress-agent run`, measured in a namespace lab.

    sudo .venv/bin/python bench/failover.py --runs 10 [--poll-runs 3]
    sudo .venv/bin/python bench/failover.py --idle 0,10000 --runs 10

Builds one lab (prefix eabench<hex>, torn down in `finally`), starts the
daemon in its host namespace, and runs one long-lived prober inside m42's
namespace: a NEW UDP socket every 2 ms to the origin's echo server
(192.0.2.10:8081), one JSON line per answer with the source address the
server saw (same clock: time.time() in both processes).

Each run:
  1. removes the IPv4 of m42's app IP (billing-1, 203.0.113.10) from the host
     with one netlink call; "failover" is the time from just before that call
     to the first answer that came back from the fallback address;
  2. adds it back; "return" is the time to the first answer from the original
     address again.
Every measurement gives up after --timeout seconds (default 5). Each change
waits until the daemon has logged the sync of the previous one, plus a random
delay (up to 0.1 s; up to the polling interval for the poll-only daemon).

The naive alternative is a daemon that only polls. `egress-agent run` cannot
turn its netlink watch off, so the poll-only daemon is the same Daemon class
started with watch_netlink=False and resync_interval=--poll-resync (5 s):
its failover time is up to one polling interval. --poll-runs 0 skips it.

With --idle 0,10000 (one invocation): for each count, the lab config plus that many
idle machine workloads of their own app (sources in 10.128.0.0/16, from which
nothing sends; their egress IPs on a veth in the lab's host namespace), a fresh
daemon, the failover and return runs above, then config edits: m43's entry
removed (by rename, as an editor writes) -> the last answer to m43's prober from
billing's pool, and written back -> the first answer from the pool. Medians, p90
and p99 per count, the ratios of each count to the first, the daemon's sync
durations by trigger, and the load average. The poll-only daemon is not run.

Only the lab's namespaces are touched; every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import random
import secrets
import signal
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from egress_agent.lab.cli import write_demo_config  # noqa: E402
from egress_agent.lab.netns import ns_exec  # noqa: E402
from egress_agent.lab.topology import HOST_ADDRESSES, Lab  # noqa: E402

from daemon_helpers import (  # noqa: E402
    LEGACY_POLICY, M43_WORKLOAD, Agent, Prober, demo_text, flush_conntrack, host, wait_until,
    write_by_rename,
)

ECHO, ECHO_UDP_PORT = "192.0.2.10", 8081

POLL_ONLY = r"""
import sys
from egress_agent import log, wiring
log.configure("json")
sys.exit(wiring.daemon(sys.argv[1], resync_interval=float(sys.argv[2]), watch_netlink=False,
                       collect_usage=None).run())
"""


class PollOnlyAgent(Agent):
    """The Daemon class without its netlink watch: only periodic full resyncs."""

    def __init__(self, lab: Lab, config: str, resync: float):
        import subprocess
        import threading
        from egress_agent.lab.echo import child_env
        self.lab, self.config = lab, config
        env = child_env()
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        cmd = lab.agent_prefix() + [sys.executable, "-c", POLL_ONLY, config, str(resync)]
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        self.log = []
        self._reader = threading.Thread(target=self._read, name="agent-stderr", daemon=True)
        self._reader.start()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min_ms": round(min(values), 1),
            "median_ms": round(statistics.median(values), 1),
            "p90_ms": round(pct(values, 0.9), 1), "p99_ms": round(pct(values, 0.99), 1),
            "max_ms": round(max(values), 1)}


def measure(lab: Lab, agent: Agent, ipr, ifindex: int, pr: Prober, original: str,
            fallback: str, prefixlen: int, timeout: float, jitter: float) -> tuple[float | None, float | None, float]:
    """One removal and one re-add; (failover ms, return ms, netlink call ms)."""
    flush_conntrack(lab)  # forget the previous run's flows (and their NAT bindings)
    pr.wait_first(lambda a: a["src"] == original, after=time.time(), timeout=timeout,
                  what=f"answers from {original} before the run")
    # a random phase: a poll-only daemon's latency depends on where in its
    # interval the change falls
    t_wait = time.time() + random.uniform(0, jitter)
    wait_until(lambda: time.time() >= t_wait, jitter + 1, interval=0.005)
    t0 = time.time()
    ipr.addr("del", index=ifindex, address=original, prefixlen=prefixlen)
    call_ms = (time.time() - t0) * 1000
    fail_ms = back_ms = None
    try:
        a = pr.wait_first(lambda a: a["src"] == fallback, after=t0, timeout=timeout)
        fail_ms = (a["recv"] - t0) * 1000
    except AssertionError:
        pass
    # The next change waits until the daemon has finished (logged) the sync
    # that made the switch: a change during a sync's tail can be lost (see the
    # xfail tests in tests/integration/test_daemon.py); this bench measures the
    # latency of one change at a time.
    settle(agent, t0, timeout)
    t_wait = time.time() + random.uniform(0, jitter)
    wait_until(lambda: time.time() >= t_wait, jitter + 1, interval=0.005)
    t1 = time.time()
    ipr.addr("add", index=ifindex, address=original, prefixlen=prefixlen)
    try:
        b = pr.wait_first(lambda a: a["src"] == original, after=t1, timeout=timeout)
        back_ms = (b["recv"] - t1) * 1000
    except AssertionError:
        pass
    settle(agent, t1, timeout)
    return fail_ms, back_ms, call_ms


def settle(agent: Agent, since: float, timeout: float) -> None:
    """Wait for a changing sync logged after `since`, then 50 ms more."""
    try:
        wait_until(lambda: [1 for t, r in agent.timed_syncs() if t >= since and r["changed"]],
                   timeout, interval=0.005)
    except AssertionError:
        pass
    t = time.time()
    wait_until(lambda: time.time() > t + 0.05, 1)


def window(pr: Prober, agent: Agent, since: float) -> dict:
    """What the prober and the daemon saw since `since` (for runs that timed out)."""
    by_src: dict[str, int] = {}
    for a in list(pr.answers):
        if a["sent"] >= since:
            by_src[a["src"]] = by_src.get(a["src"], 0) + 1
    syncs = [(round(t - since, 3), r.get("trigger"), r.get("changed"))
             for t, r in agent.timed_syncs() if t >= since]
    return {"answers_by_source": by_src, "syncs": syncs,
            "errors": [r for t, r in list(agent.log) if t >= since and r.get("level") == "error"]}


def series(lab: Lab, agent: Agent, runs: int, timeout: float, label: str,
           jitter: float = 0.1) -> dict:
    from pyroute2 import IPRoute
    billing = {"203.0.113.10", "203.0.113.11"}
    results = []
    ipr = IPRoute(netns=lab.host, flags=0)
    try:
        with Prober(lab, "m42", ECHO, ECHO_UDP_PORT, proto="udp", interval=0.002,
                    max_duration=60.0 + runs * (4 * timeout + 2 * jitter + 2)) as pr:
            # m42's app IP, as the echo server sees it (`status` would tell too, but
            # takes minutes at 10k workloads)
            original = pr.wait_first(lambda a: a["src"] in billing, timeout=timeout,
                                     what="m42's first answer from billing's IPs")["src"]
            fallback = (billing - {original}).pop()
            dev, cidr = HOST_ADDRESSES[original]
            prefixlen = int(cidr.split("/")[1])
            ifindex = ipr.link_lookup(ifname=dev)[0]
            for i in range(runs):
                t_run = time.time()
                fail_ms, back_ms, call_ms = measure(lab, agent, ipr, ifindex, pr, original,
                                                   fallback, prefixlen, timeout, jitter)
                results.append({"run": i + 1, "failover_ms": fail_ms, "return_ms": back_ms,
                                "netlink_call_ms": round(call_ms, 2)})
                if fail_ms is None or back_ms is None:
                    results[-1]["detail"] = window(pr, agent, t_run)
                    print(f"  timed out: {results[-1]['detail']}", file=sys.stderr)
                print(f"{label} run {i + 1}/{runs}: failover "
                      f"{'timeout' if fail_ms is None else f'{fail_ms:.1f} ms'}, return "
                      f"{'timeout' if back_ms is None else f'{back_ms:.1f} ms'}",
                      file=sys.stderr, flush=True)
                agent.check_alive()
            summary = pr.stop() or {}
    finally:
        ipr.close()
    fail = [r["failover_ms"] for r in results if r["failover_ms"] is not None]
    back = [r["return_ms"] for r in results if r["return_ms"] is not None]
    return {"label": label, "original": original, "fallback": fallback,
            "failover": stats(fail), "return": stats(back),
            "timeouts": sum(r["failover_ms"] is None for r in results)
            + sum(r["return_ms"] is None for r in results),
            "probes_sent": summary.get("sent"), "probes_answered": summary.get("answers"),
            "runs": results}


# --- --idle: the same lab with idle machine workloads beside its own ---------------

IDLE_DEV = "idle0"  # a link in the lab's host namespace carrying the idle app's IPs
IDLE_BLOCKS_PER_IP = (65535 - 1024 + 1) // 1024  # the lab's port_range / ports_per_workload
EDIT_MACHINE, EDIT_POOL = "m43", frozenset({"203.0.113.10", "203.0.113.11"})  # billing's IPs
PARTNER_MATCH = "    match: {destinations: [198.51.100.10/32]}\n"
PARTNER_MATCH_LAB = "    match: {apps: [billing, web], destinations: [198.51.100.10/32]}\n"
QUIET = 0.6  # > the prober's reply timeout (0.5 s): every probe sent before it has ended


def idle_addresses(n_workloads: int) -> list[str]:
    """Egress IPs for the idle app: 10% spare blocks, as bench/gen_config.py. Only the
    upper halves of 198.51.100/24 and 192.0.2/24: the origin's addresses (.10, .53) and
    the lab's uplinks stay clear of them."""
    if n_workloads == 0:
        return []
    n = math.ceil(n_workloads / IDLE_BLOCKS_PER_IP * 1.1)
    pool = [str(a) for net in ("198.51.100.128/25", "192.0.2.128/25")
            for a in ipaddress.ip_network(net).hosts()]
    if n > len(pool):
        raise SystemExit(f"--idle {n_workloads}: needs {n} egress IPs, the idle ranges hold "
                         f"{len(pool)} ({len(pool) * IDLE_BLOCKS_PER_IP} workloads at most)")
    return pool[:n]


def idle_config(lab: Lab, n: int) -> tuple[str, str]:
    """(the lab config with `n` idle workloads, the same without EDIT_MACHINE's entry).

    The idle workloads are machine workloads of an app of their own, with sources in
    10.128.0.0/16, from which nothing sends. The policy that sends m43's UDP to the
    unprovisioned `legacy` IP (and drops it) is left out, so that m43's UDP probes
    leave from billing's pool. The policy via partner-link is kept to the lab's apps:
    every workload it matches needs a port block on that one IP (63 of them)."""
    ips = "".join(f"  - {{id: idle-ip{j}, app: idle, ipv4: {a}}}\n"
                  for j, a in enumerate(idle_addresses(n)))
    base = ipaddress.IPv4Address("10.128.0.0")
    workloads = "".join(f"  - {{id: idle{i}, app: idle, source: [{base + i}]}}\n" for i in range(n))
    with_m43 = demo_text(lab, (LEGACY_POLICY, ""), (PARTNER_MATCH, PARTNER_MATCH_LAB),
                         ("\nworkloads:\n", ips + "\nworkloads:\n"),
                         ("\nmanaged_sources:", workloads + "\nmanaged_sources:"))
    assert with_m43.count(M43_WORKLOAD) == 1
    return with_m43, with_m43.replace(M43_WORKLOAD, "")


def add_idle_addresses(lab: Lab, addresses: list[str]) -> None:
    from pyroute2 import IPRoute
    with IPRoute(netns=lab.host, flags=0) as ipr:
        # a veth pair with both ends here: the dummy module may be missing (containers)
        ipr.link("add", ifname=IDLE_DEV, kind="veth", peer=IDLE_DEV + "p")
        idx = ipr.link_lookup(ifname=IDLE_DEV)[0]
        for a in addresses:
            ipr.addr("add", index=idx, address=a, prefixlen=32)
        for dev in (IDLE_DEV, IDLE_DEV + "p"):
            ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")


def remove_idle_addresses(lab: Lab) -> None:
    host(lab, "ip", "link", "del", IDLE_DEV, check=False)  # its peer and addresses with it


def edit_run(agent: Agent, pr: Prober, path: str, with_m43: str, without: str,
             timeout: float, jitter: float) -> dict:
    """Remove m43's entry, then write it back (both by rename, as an editor does).

    remove: from the write to the last answer from billing's pool (m43's source is
    then unknown in a managed network: dropped, no answer), or to the first answer
    from another address if one comes; add: from the write to the first answer from
    the pool."""
    out: dict = {"remove_ms": None, "add_ms": None}
    pr.wait_first(lambda a: a["src"] in EDIT_POOL, after=time.time(), timeout=timeout,
                  what=f"{EDIT_MACHINE} answers from {sorted(EDIT_POOL)} before the run")
    t_wait = time.time() + random.uniform(0, jitter)
    wait_until(lambda: time.time() >= t_wait, jitter + 1, interval=0.005)
    t0 = time.time()
    write_by_rename(path, without)
    synced = changed_sync_after(agent, t0, timeout)
    t = time.time()
    wait_until(lambda: time.time() > t + QUIET, QUIET + 1)
    after = [a for a in list(pr.answers) if a["sent"] >= t0]
    other = next((a for a in after if a["src"] not in EDIT_POOL), None)
    pooled = [a for a in after if a["src"] in EDIT_POOL]
    if synced is None:
        out["remove_error"] = "no changed sync"
    elif other is not None:
        out["remove_ms"] = (other["recv"] - t0) * 1000
    elif pooled and pooled[-1]["sent"] > synced + 0.1:
        late = pooled[-1]["sent"] - synced
        out["remove_error"] = f"answers from the pool {late:.3f} s after the sync"
    elif pooled:
        out["remove_ms"] = (pooled[-1]["recv"] - t0) * 1000
    else:  # faster than one probe interval; cannot be told apart from 0
        out["remove_ms"] = 0.0
    t_wait = time.time() + random.uniform(0, jitter)
    wait_until(lambda: time.time() >= t_wait, jitter + 1, interval=0.005)
    t1 = time.time()
    write_by_rename(path, with_m43)
    try:
        a = pr.wait_first(lambda a: a["src"] in EDIT_POOL, after=t1, timeout=timeout)
        out["add_ms"] = (a["recv"] - t1) * 1000
    except AssertionError:
        out["add_error"] = "no answer from the pool"
    settle(agent, t1, timeout)
    out["window"] = (t0, time.time())
    return out


def changed_sync_after(agent: Agent, since: float, timeout: float) -> float | None:
    """Arrival time of the first changing sync line after `since`; None on timeout."""
    try:
        return wait_until(lambda: next((t for t, r in agent.timed_syncs()
                                        if t >= since and r["changed"]), None),
                          timeout, interval=0.005)
    except AssertionError:
        return None


def edit_series(lab: Lab, agent: Agent, path: str, with_m43: str, without: str, runs: int,
                timeout: float, label: str, jitter: float = 0.1) -> dict:
    results = []
    with Prober(lab, EDIT_MACHINE, ECHO, ECHO_UDP_PORT, proto="udp", interval=0.002,
                max_duration=60.0 + runs * (3 * timeout + 2 * QUIET + 2 * jitter + 2)) as pr:
        for i in range(runs):
            r = edit_run(agent, pr, path, with_m43, without, timeout, jitter)
            t0, t1 = r.pop("window")
            if r["remove_ms"] is None or r["add_ms"] is None:
                r["detail"] = window(pr, agent, t0)
                print(f"  failed: {r}", file=sys.stderr)
            results.append({"run": i + 1, **r})
            fmt = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731
            print(f"{label} edit run {i + 1}/{runs}: remove {fmt(r['remove_ms'])}, "
                  f"add {fmt(r['add_ms'])}", file=sys.stderr, flush=True)
            agent.check_alive()
        summary = pr.stop() or {}
    rem = [r["remove_ms"] for r in results if r["remove_ms"] is not None]
    add = [r["add_ms"] for r in results if r["add_ms"] is not None]
    return {"machine": EDIT_MACHINE, "pool": sorted(EDIT_POOL), "add": stats(add),
            "remove": stats(rem),
            "failures": sum(r["remove_ms"] is None for r in results)
            + sum(r["add_ms"] is None for r in results),
            "probes_sent": summary.get("sent"), "probes_answered": summary.get("answers"),
            "runs": results}


def idle_bench(lab: Lab, counts: list[int], runs: int, timeout: float, resync: float,
               start_timeout: float) -> dict:
    """For each idle count: its config, a fresh daemon, failover + return, then edits."""
    path = write_demo_config(lab)  # the path, and the cgroup of the lab's `batch` workload
    out: dict = {}
    for n in counts:
        with_m43, without = idle_config(lab, n)
        addresses = idle_addresses(n)
        load_before = os.getloadavg()
        try:
            if addresses:
                add_idle_addresses(lab, addresses)
            write_by_rename(path, with_m43)
            print(f"idle {n}: {len(addresses)} idle egress IPs; starting the daemon",
                  file=sys.stderr, flush=True)
            with Agent(lab, path, resync=resync) as agent:
                try:
                    start = agent.wait_syncs(1, timeout=start_timeout, trigger="start")
                except AssertionError as e:
                    agent.proc.send_signal(signal.SIGUSR1)  # its threads' stacks (faulthandler)
                    time.sleep(1.0)
                    stacks = [r["event"] for r in agent.records() if r.get("raw")]
                    raise AssertionError(f"idle {n}: no first sync; errors: {agent.errors()}; "
                                         f"its stacks:\n" + "\n".join(stacks[-80:])) from e
                fo = series(lab, agent, runs, timeout, f"idle {n}")
                ed = edit_series(lab, agent, path, with_m43, without, runs, timeout, f"idle {n}")
                # the daemon's own share: sync durations by trigger/mode (config: after
                # the debounce and the reload)
                by_trigger: dict[str, list[float]] = {}
                for _, r in agent.timed_syncs(changed=True):
                    if r.get("trigger") != "start":
                        by_trigger.setdefault(f"{r.get('trigger')}/{r.get('mode')}",
                                              []).append(r["duration_ms"])
        finally:
            remove_idle_addresses(lab)
        out[str(n)] = {"idle_workloads": n, "idle_ips": len(addresses),
                       "start_sync_ms": start.get("duration_ms"),
                       "loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "failover": fo["failover"], "return": fo["return"],
                       "failover_timeouts": fo["timeouts"],
                       "edit_add": ed["add"], "edit_remove": ed["remove"],
                       "edit_failures": ed["failures"],
                       "daemon_sync_ms": {k: stats(v) for k, v in by_trigger.items()},
                       "runs": {"failover": fo["runs"], "edit": ed["runs"]}}
    return out


def idle_ratios(by_count: dict) -> dict:
    """Each count against the first (e.g. 10000 / 0): medians and p99s, same run."""
    keys = list(by_count)
    base = by_count[keys[0]]
    out = {}
    for k in keys[1:]:
        r = {}
        for m in ("failover", "return", "edit_add", "edit_remove"):
            for q in ("median_ms", "p99_ms"):
                a, b = by_count[k][m].get(q), base[m].get(q)
                r[f"{m}_{q[:-3]}"] = round(a / b, 2) if a is not None and b else None
        out[f"{k}/{keys[0]}"] = r
    return out


def print_idle(by_count: dict, ratios: dict) -> None:
    names = {"failover": "failover (address removed -> first answer from the other IP)",
             "return": "return (address added back -> first answer from it)",
             "edit_add": "config edit, add m43 -> first answer from a pool IP",
             "edit_remove": "config edit, remove m43 -> last answer from a pool IP"}
    for m, title in names.items():
        print(title)
        for k, r in by_count.items():
            s = r[m]
            print(f"  idle {k:>6}: " + ("no successful measurement" if not s.get("n") else
                  f"median {s['median_ms']:7.1f} ms  p90 {s['p90_ms']:7.1f} ms  "
                  f"p99 {s['p99_ms']:7.1f} ms  max {s['max_ms']:7.1f} ms  (n={s['n']})"))
    print("the daemon's changing syncs (duration_ms), by trigger/mode")
    for k, r in by_count.items():
        for trig, st in r["daemon_sync_ms"].items():
            print(f"  idle {k:>6} {trig:>20}: median {st['median_ms']:7.1f} ms  "
                  f"p90 {st['p90_ms']:7.1f} ms  max {st['max_ms']:7.1f} ms  (n={st['n']})")
    for k, r in ratios.items():
        print(f"ratio {k}: " + ", ".join(f"{m} {v}" for m, v in r.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0, help="per measurement (s)")
    p.add_argument("--resync", type=float, default=60.0,
                   help="resync interval of the real daemon (default 60, its default)")
    p.add_argument("--poll-runs", type=int, default=3,
                   help="runs against a poll-only daemon (0: skip)")
    p.add_argument("--poll-resync", type=float, default=5.0)
    p.add_argument("--idle", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   metavar="N,N,...",
                   help="instead: for each count, a daemon with that many idle machine "
                        "workloads beside the lab's; failover, return and config edits "
                        "(add/remove m43), and the ratios against the first count")
    p.add_argument("--start-timeout", type=float, default=120.0,
                   help="--idle: wait this long for the daemon's first sync (s)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.idle is not None:
        return main_idle(args)
    lab = Lab(os.environ.get("EGRESS_BENCH_PREFIX", "eabench") + secrets.token_hex(2))
    out: dict = {"bench": "failover", "runs": args.runs, "resync_s": args.resync}
    t_start = time.monotonic()
    try:
        lab.up()
        # Probe flows are one datagram each way: forget them after 1 s instead of
        # 30 s, so that 500 new flows a second never fill a 1024-port block
        # (only in the lab's host namespace).
        ns_exec(lab.host, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=1",
                           "net.netfilter.nf_conntrack_udp_timeout_stream=1"])
        cfg = write_demo_config(lab)
        with Agent(lab, cfg, resync=args.resync) as agent:
            agent.wait_syncs(1, trigger="start")
            out["netlink_daemon"] = series(lab, agent, args.runs, args.timeout, "netlink")
        if args.poll_runs > 0:
            timeout = args.poll_resync + args.timeout
            with PollOnlyAgent(lab, cfg, args.poll_resync) as agent:
                agent.wait_syncs(1, trigger="start")
                out["poll_only_daemon"] = {"resync_s": args.poll_resync, **series(
                    lab, agent, args.poll_runs, timeout, f"poll-only({args.poll_resync:g}s)",
                    jitter=args.poll_resync)}
    finally:
        lab.down()
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)

    def line(name: str, s: dict) -> str:
        if not s.get("n"):
            return f"  {name:9} no successful measurement"
        return (f"  {name:9} median {s['median_ms']:8.1f} ms   p90 {s['p90_ms']:8.1f} ms   "
                f"max {s['max_ms']:8.1f} ms   (n={s['n']})")

    for key in ("netlink_daemon", "poll_only_daemon"):
        if key not in out:
            continue
        r = out[key]
        print(f"{key}: {r['original']} removed -> first answer from {r['fallback']}, and back"
              f" ({r['timeouts']} timeouts)")
        print(line("failover", r["failover"]))
        print(line("return", r["return"]))
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "runs"}
                          if isinstance(v, dict) else v) for k, v in out.items()}))
    return 0


def main_idle(args) -> int:
    for n in args.idle:
        idle_addresses(n)  # refuse a count that does not fit before building anything
    lab = Lab(os.environ.get("EGRESS_BENCH_PREFIX", "eabench") + secrets.token_hex(2))
    out: dict = {"bench": "failover_idle", "runs": args.runs, "resync_s": args.resync,
                 "idle": args.idle, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    t_start = time.monotonic()
    try:
        lab.up()
        ns_exec(lab.host, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=1",
                           "net.netfilter.nf_conntrack_udp_timeout_stream=1"])
        by_count = idle_bench(lab, args.idle, args.runs, args.timeout, args.resync,
                              args.start_timeout)
    finally:
        lab.down()
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    ratios = idle_ratios(by_count)
    print_idle(by_count, ratios)
    out["by_idle"] = {k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                      for k, v in by_count.items()}
    out["ratios"] = ratios
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
