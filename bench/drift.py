#!/usr/bin/env python3
"""Drift repair time of `egress-agent run`, measured in a namespace lab.

    sudo .venv/bin/python bench/drift.py [--runs 20]

Builds one lab (prefix eabench<hex>, torn down in `finally`), starts the daemon
in its host namespace with the demo config (resync 600 s: only the event
watcher can repair), and runs a measuring process in the same namespace. For
each fault, --runs times:
  1. the fault is committed in-process (libnftables for nft faults, pyroute2
     for ip rules and routes), so "the foreign command returned" is exact;
  2. the clock stops when the kernel announces the agent's repair: the
     agent's own NFT_MSG_NEWGEN (its pid is known) after which our table
     equals what it was before the fault (elements, skeleton chains and rules,
     generated chains, read back as the agent reads it), or the RTM_NEWRULE /
     RTM_NEWROUTE that puts the deleted rule or route back.
Prints median and p99 (nearest rank: with 20 runs, the slowest) per fault, in
milliseconds. Runs are spaced by 50-150 ms (random) so that each starts from a
settled daemon.

Only the lab's namespaces are touched; every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from egress_agent.lab.cli import write_demo_config  # noqa: E402
from egress_agent.lab.echo import child_env  # noqa: E402
from egress_agent.lab.netns import nsenter_prefix  # noqa: E402
from egress_agent.lab.topology import Lab  # noqa: E402

from daemon_helpers import Agent  # noqa: E402

# Runs inside the lab's host namespace: argv = agent pid, runs.
MEASURE = r'''
import json, os, random, select, socket, sys, time
import nftables
from pyroute2 import IPRoute
from egress_agent import nftwatch
from egress_agent.lab.topology import LAB_NAT
from egress_agent.nft.listing import observed_from_json

agent, runs = int(sys.argv[1]), int(sys.argv[2])
T = "inet egress_agent"
nft = nftables.Nftables()
ipr = IPRoute()
w = nftwatch.Watch(lambda why: None)
nsock, rsock = w.open()

def cmd(text):
    rc, out, err = nft.cmd(text)
    if rc:
        raise SystemExit(f"{text}: {err}")
    return out

def state():
    nft.set_json_output(True)
    try:
        rc, out, err = nft.cmd(f"list table {T}")
    finally:
        nft.set_json_output(False)
    return observed_from_json(json.loads(out)) if rc == 0 else None

def snat4_rule_handle():
    nft.set_json_output(True); nft.set_handle_output(True)
    try:
        doc = json.loads(nft.cmd(f"list chain {T} postrouting")[1])
    finally:
        nft.set_json_output(False); nft.set_handle_output(False)
    return next(r["rule"]["handle"] for r in doc["nftables"]
                if "rule" in r and "@snat4" in json.dumps(r["rule"]["expr"]))

def drain():
    while select.select([nsock, rsock], [], [], 0)[0]:
        for s in select.select([nsock, rsock], [], [], 0)[0]:
            s.recv(1 << 20)

def agents_gen(deadline):
    """Wait for a NEWGEN committed by the agent; its time, or None."""
    ev = nftwatch.NftEvents()
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        if not select.select([nsock], [], [], left)[0]:
            return None
        data = nsock.recv(1 << 20)
        t = time.perf_counter()
        for mtype, payload in nftwatch.messages(data):
            g = ev.feed(mtype, payload)
            if g and os.path.exists(f"/proc/{agent}/task/{g.pid}"):
                return t

def route_back(pred, deadline):
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not select.select([rsock], [], [], left)[0]:
            return None
        data = rsock.recv(1 << 20)
        t = time.perf_counter()
        for mtype, payload in nftwatch.messages(data):
            if pred(mtype, payload):
                return t

def rule_added(prio):
    return lambda m, p: m == nftwatch.RTM_NEWRULE and nftwatch.route_event_ours(m, p) \
        and f"priority {prio} added" in nftwatch.route_event_ours(m, p)

def route_added(table):
    return lambda m, p: m == nftwatch.RTM_NEWROUTE and nftwatch.route_event_ours(m, p) \
        == f"route -4 table {table} added"

before = state()
NFT_FAULTS = {
    "nft flush ruleset": lambda: cmd("flush ruleset"),
    "nft delete table inet egress_agent": lambda: cmd(f"delete table {T}"),
    "nft flush chain inet egress_agent postrouting": lambda: cmd(f"flush chain {T} postrouting"),
    "nft delete rule (postrouting, the snat4 rule)":
        lambda: cmd(f"delete rule {T} postrouting handle {snat4_rule_handle()}"),
    "nft flush map inet egress_agent snat4": lambda: cmd(f"flush map {T} snat4"),
}
ROUTE_FAULTS = {
    "ip rule del priority 7104": (
        lambda: ipr.rule("del", family=socket.AF_INET, priority=7104, fwmark=0x400000,
                         fwmask=0xff00000, table=7104), rule_added(7104)),
    "ip rule del priority 7100 (the guard)": (
        lambda: ipr.rule("del", family=socket.AF_INET, priority=7100, fwmark=0,
                         fwmask=0x20000000, src="10.0.1.0", src_len=24,
                         action="FR_ACT_PROHIBIT"), rule_added(7100)),
    "ip route del default table 7104": (
        lambda: ipr.route("del", family=socket.AF_INET, dst="0.0.0.0/0", table=7104),
        route_added(7104)),
}
results = {}
for name, fault in NFT_FAULTS.items():
    times = []
    for _ in range(runs):
        time.sleep(random.uniform(0.05, 0.15))
        drain()
        fault()
        t0 = time.perf_counter()
        deadline = t0 + 5
        while True:
            t1 = agents_gen(deadline)
            if t1 is None:
                raise SystemExit(f"{name}: not repaired within 5 s")
            if state() == before:
                break
        times.append((t1 - t0) * 1000)
        if name == "nft flush ruleset":
            cmd(LAB_NAT)  # the lab's own NAT went with it
    results[name] = times
for name, (fault, back) in ROUTE_FAULTS.items():
    times = []
    for _ in range(runs):
        time.sleep(random.uniform(0.05, 0.15))
        drain()
        fault()
        t0 = time.perf_counter()
        t1 = route_back(back, t0 + 5)
        if t1 is None:
            raise SystemExit(f"{name}: not repaired within 5 s")
        times.append((t1 - t0) * 1000)
    results[name] = times
print(json.dumps(results))
'''


def p99(values: list[float]) -> float:
    """Nearest rank: with 20 values, the largest."""
    s = sorted(values)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    lab = Lab("eabench" + secrets.token_hex(2))
    try:
        lab.up()
        cfg = write_demo_config(lab)
        with Agent(lab, cfg, resync=600.0) as ag:
            ag.wait_syncs(1, trigger="start")
            proc = subprocess.run(nsenter_prefix(lab.host) + [sys.executable, "-c", MEASURE,
                                                              str(ag.proc.pid), str(args.runs)],
                                  capture_output=True, text=True, env=child_env(), cwd=ROOT,
                                  timeout=900)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return 1
            results = json.loads(proc.stdout.strip().splitlines()[-1])
            ag.check_alive()
            warnings = len(ag.records("drift repaired"))
            errors = ag.errors()
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(f"load average after the runs: {load}")
        print(f"drift repair, {args.runs} runs per fault (ms from the foreign command's "
              f"return to the agent's repair in the kernel)")
        print(f"{'fault':48} {'median':>8} {'p99':>8} {'min':>8}")
        for name, times in results.items():
            print(f"{name:48} {statistics.median(times):8.1f} {p99(times):8.1f} {min(times):8.1f}")
        print(f"daemon: {warnings} 'drift repaired' warnings, {len(errors)} errors")
        return 0
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
