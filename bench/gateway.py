#!/usr/bin/env python3
"""Gateway pairs (issue 13): failover time, held connections, the gateway hop's
extra round trip, and new connections per second through the pair.

    sudo .venv/bin/python bench/gateway.py                  # 20 failovers, ~2 min
    sudo .venv/bin/python bench/gateway.py --runs 6 --held 3

The lab is egress_agent/lab/pairlab.py (prefix eabg<hex>, removed at the end):
two workload hosts whose machines m1, m2 leave through the pair g1/g2 (the agent
on all four, keepalived, conntrackd), judged by the origin's echo server.

Each failover run, alternately by kind:
  keepalived   SIGTERM to the active gateway's keepalived (it says goodbye: priority 0)
  links        the active gateway's fabric and uplink set down (silence: the
               standby waits out VRRP's master-down interval, 3 x 100 ms + skew)
- m1 sends a UDP datagram to the origin's echo every 5 ms on one socket (one flow,
  replicated by conntrackd); the failover time is the longest silence between two
  answers from the fault on: the last answer through the old active gateway to the
  first through the new one (5 ms when nothing was lost);
- --held TCP connections per machine, opened before the fault, are pinged after
  it: a survivor answers from the same address and port as at its start;
- the failed gateway is restored and rejoins as standby (nopreempt) before the
  next run.

Then: the round trip m1 -> origin through the pair against the active gateway's
own round trip to the origin (the hop's extra time), median of 200 UDP pings
each; and bench/datapath_client's connect rate from m1 through the pair against
the single-host agent (bench/datapath.py's "maps" host, 10 workloads), same run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from egress_agent.lab.netns import ip, link_up, nsenter_prefix  # noqa: E402
from egress_agent.lab.pairlab import APP_IP, ORIGIN, PORT, PairLab  # noqa: E402

# one UDP flow, a datagram every `gap` seconds for `seconds`; prints
# "<send time> <receive time> <addr> <port>" for every answer
STREAM = r"""
import socket, sys, time
dst, port, seconds, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port)); s.settimeout(gap)
end, sent = time.time() + seconds, {}
seq = 0
while time.time() < end:
    t = time.time()
    try:
        s.send(b"%d" % seq)
    except OSError:
        pass
    seq += 1
    try:
        while True:
            data = s.recv(200)
            print(f"{t:.6f} {time.time():.6f} {data.decode().strip()}", flush=True)
            s.settimeout(max(0.0005, t + gap - time.time()))
    except (socket.timeout, OSError):
        pass
    s.settimeout(max(0.0005, t + gap - time.time()))
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def stream(lab: PairLab, ns: str, seconds: float, gap: float = 0.005) -> subprocess.Popen:
    """STREAM in the lab's namespace `ns` (a machine, or a gateway host)."""
    return subprocess.Popen(nsenter_prefix(lab.ns(ns)) + [
        sys.executable, "-c", STREAM, ORIGIN, str(PORT), str(seconds), str(gap)],
        stdout=subprocess.PIPE, text=True)


def answers(p: subprocess.Popen) -> list[tuple[float, float, str]]:
    out, _ = p.communicate(timeout=60)
    rows = []
    for line in out.splitlines():
        sent, got, addr, port = line.split()
        rows.append((float(sent), float(got), f"{addr}:{port}"))
    return rows


def failover_run(lab: PairLab, kind: str, held_per_machine: int) -> dict:
    active = "g1" if lab.holds_app_ip("g1") else "g2"
    other = "g2" if active == "g1" else "g1"
    held = [lab.hold(k) for k in (1, 2) for _ in range(held_per_machine)]
    s = stream(lab, "m1", 2.5)
    time.sleep(0.5)
    t_fault = time.time()
    if kind == "keepalived":
        lab.stop(f"{active}-ka")
    else:
        ip(lab.ns(active), "link", "set", "fabr0", "down")
        ip(lab.ns(active), "link", "set", "up0", "down")
    rows = answers(s)
    lab.wait_active(other)
    survived = sum(1 for h in held if h.ping() == h.first)
    for h in held:
        h.close()
    after = [r for r in rows if r[1] > t_fault]
    before = {r[2] for r in rows if r[1] <= t_fault}
    # the outage: the longest silence between two answers from just before the fault on
    # (a datagram in flight at the fault may still come back through the old gateway)
    got = [r[1] for r in rows if r[1] > t_fault - 0.05]
    gap = max((b - a for a, b in zip(got, got[1:])), default=None)
    if kind == "keepalived":
        lab.start_keepalived(active)
    else:
        link_up(lab.ns(active), "fabr0")
        link_up(lab.ns(active), "up0")
    time.sleep(1.0)  # the returning gateway rejoins as standby and resyncs
    return {"kind": kind, "gap_ms": gap * 1000 if gap is not None and after else None,
            "udp_same_mapping": bool(after) and {r[2] for r in after} <= before,
            "survived": survived, "held": len(held)}


def detection_ms(lab: PairLab, runs: int) -> list[float]:
    """Both gateways cut off from the fabric -> the daemon on w1 has synced the app
    IP as unusable (its status.json, polled every 10 ms), `runs` times."""
    out = []
    lab.start_daemon("w1")
    try:
        lab.wait_usable("w1", True)
        for _ in range(runs):
            t0 = time.monotonic()
            for g in ("g1", "g2"):
                ip(lab.ns(g), "link", "set", "fabr0", "down")
            lab.wait_usable("w1", False)
            out.append((time.monotonic() - t0) * 1000)
            for g in ("g1", "g2"):
                link_up(lab.ns(g), "fabr0")
            lab.wait_usable("w1", True, 20.0)
            lab.wait_active("g1" if lab.holds_app_ip("g1") else "g2", 20.0)
    finally:
        lab.stop("w1-agent")
    return out


def rtt_ms(lab: PairLab, ns: str, n: int = 200) -> float:
    """Median round trip of `n` datagrams, one every 10 ms, from namespace `ns`."""
    return statistics.median((got - sent) * 1000
                             for sent, got, _ in answers(stream(lab, ns, n * 0.01, 0.01)))


def connect_rate(binary: str, client_ns: str, server: str, seconds: float) -> float:
    import json
    p = subprocess.run(nsenter_prefix(client_ns) + [binary, "connect", server, str(PORT + 100), "64",
                                                    str(seconds), "64", "2"],
                       capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])["conn_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--runs", type=int, default=20, help="failovers (alternating kinds; default 20)")
    ap.add_argument("--held", type=int, default=5, help="TCP connections held per machine (default 5)")
    ap.add_argument("--detection-runs", type=int, default=5,
                    help="times both gateways are cut off to time the probe (default 5)")
    ap.add_argument("--rate-seconds", type=float, default=3.0,
                    help="seconds per connect-rate measurement (default 3; 0 skips it)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("gateway.py: run as root (network namespaces, keepalived, conntrackd)", file=sys.stderr)
        return 2
    for tool in ("keepalived", "conntrackd"):
        if not shutil.which(tool):
            print(f"gateway.py: {tool} is needed (./run venv installs it)", file=sys.stderr)
            return 2
    lab = PairLab("eabg" + secrets.token_hex(2))
    tmp = tempfile.mkdtemp(prefix="eabg-")
    results = []
    try:
        t0 = time.monotonic()
        lab.up()
        print(f"lab up in {time.monotonic() - t0:.1f} s; load {os.getloadavg()[0]:.2f}",
              file=sys.stderr)
        for i in range(args.runs):
            r = failover_run(lab, ("keepalived", "links")[i % 2], args.held)
            results.append(r)
            print(f"run {i + 1}/{args.runs} {r['kind']:10} longest silence "
                  f"{r['gap_ms']:.0f} ms, UDP flow kept its mapping: {r['udp_same_mapping']}, "
                  f"held {r['survived']}/{r['held']}", file=sys.stderr, flush=True)
        print("\n| fault | runs | failover ms, median | p99 | max | UDP flow same mapping | "
              "TCP held survived |\n|---|---|---|---|---|---|---|")
        for kind in ("keepalived", "links", "all"):
            rs = [r for r in results if kind in ("all", r["kind"])]
            gaps = [r["gap_ms"] for r in rs if r["gap_ms"] is not None]
            if not rs or not gaps:
                continue
            print(f"| {kind} | {len(rs)} | {statistics.median(gaps):.0f} | {pct(gaps, 99):.0f} | "
                  f"{max(gaps):.0f} | {sum(r['udp_same_mapping'] for r in rs)}/{len(rs)} | "
                  f"{sum(r['survived'] for r in rs)}/{sum(r['held'] for r in rs)} |")
        if args.detection_runs:
            d = detection_ms(lab, args.detection_runs)
            print(f"\nboth gateways cut off -> the workload host's daemon has the app IP "
                  f"unusable (probe every 200 ms, 3 missed), {len(d)} runs: median "
                  f"{statistics.median(d):.0f} ms, max {max(d):.0f} ms")
        active = "g1" if lab.holds_app_ip("g1") else "g2"
        through, direct = rtt_ms(lab, "m1"), rtt_ms(lab, active)
        print(f"\nround trip to the origin, median of 200 UDP pings: m1 through the pair "
              f"{through:.3f} ms, the active gateway itself {direct:.3f} ms: the hop adds "
              f"{through - direct:.3f} ms")
        if args.rate_seconds > 0 and shutil.which("gcc"):
            import datapath
            binary = os.path.join(tmp, "datapath_client")
            subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", binary, datapath.C_SOURCE],
                           check=True)
            server = subprocess.Popen(nsenter_prefix(lab.ns("o")) + [
                binary, "server", str(PORT + 100), "64", "300", "1"], stdout=subprocess.PIPE, text=True)
            single = datapath.Topology(f"{lab.prefix}s", "maps", 10, 64, tmp, None)
            try:
                server.stdout.readline()
                single.up()
                single.start_server(binary, 300, 1)
                connect_rate(binary, lab.ns("m1"), ORIGIN, 1.0)  # warm-up
                pair_rate = connect_rate(binary, lab.ns("m1"), ORIGIN, args.rate_seconds)
                single_args = argparse.Namespace(duration=args.rate_seconds, inflight=64, threads=2)
                datapath.connect_run(single, binary, single_args, 1.0)
                single_rate = datapath.connect_run(single, binary, single_args)["conn_per_s"]
                print(f"new TCP connections per second (64 in flight, 2 threads): through the "
                      f"pair {pair_rate:.0f}, through a single-host agent {single_rate:.0f} "
                      f"(ratio {pair_rate / single_rate:.2f})")
            finally:
                server.terminate()
                server.wait(timeout=10)
                single.down()
        print(f"\nload {os.getloadavg()[0]:.2f}; app IP {APP_IP}; {time.monotonic() - t0:.0f} s")
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
