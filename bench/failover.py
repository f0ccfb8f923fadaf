#!/usr/bin/env python3
"""Failover latency of `egress-agent run`, measured in a namespace lab.

    sudo .venv/bin/python bench/failover.py --runs 10 [--poll-runs 3]

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

Only the lab's namespaces are touched; every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from egress_agent.lab.cli import write_demo_config  # noqa: E402
from egress_agent.lab.netns import ns_exec  # noqa: E402
from egress_agent.lab.topology import HOST_ADDRESSES, Lab  # noqa: E402

from daemon_helpers import Agent, Prober, flush_conntrack, lease, status, wait_until  # noqa: E402

ECHO, ECHO_UDP_PORT = "192.0.2.10", 8081

POLL_ONLY = r"""
import sys
from egress_agent import log, wiring
log.configure(json_lines=True)
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
            "p90_ms": round(pct(values, 0.9), 1), "max_ms": round(max(values), 1)}


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
    cfg = agent.config
    st = status(lab, cfg)
    m42 = lease(st, "m42")
    original = m42["ipv4"]
    others = [l for w in st["workloads"] if w["id"] == "m42" for l in w["leases"]]
    dev, cidr = HOST_ADDRESSES[original]
    prefixlen = int(cidr.split("/")[1])
    billing = {"203.0.113.10", "203.0.113.11"}
    fallback = (billing - {original}).pop()
    results = []
    ipr = IPRoute(netns=lab.host, flags=0)
    try:
        ifindex = ipr.link_lookup(ifname=dev)[0]
        with Prober(lab, "m42", ECHO, ECHO_UDP_PORT, proto="udp", interval=0.002,
                    max_duration=60.0 + runs * (4 * timeout + 2 * jitter + 2)) as pr:
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
            "leases_m42": others, "failover": stats(fail), "return": stats(back),
            "timeouts": sum(r["failover_ms"] is None for r in results)
            + sum(r["return_ms"] is None for r in results),
            "probes_sent": summary.get("sent"), "probes_answered": summary.get("answers"),
            "runs": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0, help="per measurement (s)")
    p.add_argument("--resync", type=float, default=60.0,
                   help="resync interval of the real daemon (default 60, its default)")
    p.add_argument("--poll-runs", type=int, default=3,
                   help="runs against a poll-only daemon (0: skip)")
    p.add_argument("--poll-resync", type=float, default=5.0)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    lab = Lab("eabench" + secrets.token_hex(2))
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


if __name__ == "__main__":
    sys.exit(main())
