#!/usr/bin/env python3
"""Data path: new TCP connections per second (and one stream's throughput)
through a forwarding host, with no NAT, the agent's maps, and linear rules.

    sudo .venv/bin/python bench/datapath.py                 # full: ~2.5 min
    sudo .venv/bin/python bench/datapath.py --quick         # fewer sizes, ~1 min
    sudo .venv/bin/python bench/datapath.py --runs 3 --duration 5 --maps 10,100000 \\
        --linear 1000,10000 --inflight 64 --threads 2

Needs root and gcc: bench/datapath_client.c is compiled into a temp dir.

For each host configuration this script builds its own three network
namespaces (names eadp<hex>-<k>-{c,h,s}, all deleted in `finally`):

    client 10.0.1.5 ── c0 ═ h-c ── host (forwards) ── h-s 198.51.100.1 ═ s0 ── server 192.0.2.10
                           10.200.0.1                                  198.51.100.2

  no NAT        plain forwarding; the host has no nftables rules (no conntrack)
  conntrack     one `type nat hook postrouting` chain holding `ct state new counter`:
                conntrack and the NAT core run for every connection, nothing is
                translated (an empty nat chain would not even turn conntrack on)
  maps N        the agent's design: bench/gen_config.py's config for N workloads
                (10.0.1.5 is workload w5), egress IPs added to h-s, and
                `ip netns exec HOST .venv/bin/egress-agent apply -c CFG --state-dir DIR`
                (the real skeleton and N elements per map); only w5 sends
  linear N      `table ip naive`, one nat postrouting chain of N rules
                `ip saddr X ip protocol tcp snat to ADDR:PORTS`, the client's rule
                LAST (the worst case of a linear chain)

Before measuring, one probe through the echo server (egress_agent.lab.echo)
checks what the server sees: 10.0.1.5 without NAT, an egress IP of the config
with maps, 203.0.113.1:1024-1087 with linear rules.

Each run: `datapath_client connect 192.0.2.10 8080 DST_PORTS DURATION INFLIGHT
THREADS` in the client namespace against `datapath_client server 8080
DST_PORTS ...` in the server namespace: open a connection, close it with
SO_LINGER 0 (RST) as soon as the handshake completes, INFLIGHT at a time,
destination ports 8080..8080+DST_PORTS-1 in turn (--dst-ports, default 64).
After an uncounted --warmup run per configuration, runs are interleaved
round-robin over the configurations (run 1 of every
configuration, then run 2, ...); the median of --runs is reported, with the
client's errors (refused/reset connects) and timeouts (connects abandoned
after 1 s) and the host's conntrack entry count after each run.

Why 64 destination ports: with every connection going to one ip:port, the
agent's `ct count over 64` rule (chain limits, one 64-port block per
workload here) refuses connections although at most INFLIGHT are open: the
kernel's connection count for one key lags at these rates (closed entries
are collected lazily, a few per jiffy). The extra row "maps 10 (1 dst port)"
(--no-one-port-row skips it) shows that case; its errors are those refusals.
--diagnose adds "maps SMALLEST (no limits rule)": the agent's table with
chain limits flushed after the apply. The kernel's conntrack timeouts are left alone (--ct-close-timeout sets
nf_conntrack_tcp_timeout_close in the host namespaces only).

Throughput (--stream-seconds, 0 to skip): one TCP stream, `datapath_client
send` for that long into `datapath_client sink`, for no NAT and the largest
maps size, median of --runs.

Prints a table with ratios against "no NAT" and against "maps 10", the load
average before and after, and one JSON line last. Bounded: each client runs
DURATION seconds, every subprocess has a timeout, and no new measurement is
started after --budget seconds. Only namespaces this script creates are
touched; only processes it starts are stopped, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from gen_config import config_text, source  # noqa: E402

AGENT = os.path.join(ROOT, ".venv", "bin", "egress-agent")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
C_SOURCE = os.path.join(HERE, "datapath_client.c")

CLIENT_INDEX = 5                     # the client is workload w5 of the generated config
CLIENT = source(CLIENT_INDEX)        # 10.0.1.5
CLIENT_GW = "10.200.0.1"             # outside every generated source (10.0.1.0 + 100k)
HOST_UP, SERVER_UP = "198.51.100.1", "198.51.100.2"
SERVER = "192.0.2.10"
PORT, ECHO_PORT, SINK_PORT = 8080, 7070, 9000  # server: PORT..PORT+dst_ports-1
LINEAR_TARGET = ("203.0.113.1", 1024, 1087)
NO_LIMITS = " (no limits rule)"


def sh(cmd: list[str], timeout: float = 120, input: str | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def nsx(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def human(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


class Topology:
    """client ─ host ─ server, three namespaces of our own."""

    def __init__(self, prefix: str, kind: str, n: int, nports: int, tmp: str,
                 ct_close: int | None, note: str = ""):
        self.kind, self.n, self.nports, self.tmp, self.note = kind, n, nports, tmp, note
        self.c, self.h, self.s = f"{prefix}-c", f"{prefix}-h", f"{prefix}-s"
        self.ct_close = ct_close
        self.procs: list[subprocess.Popen] = []
        self.setup_s = 0.0
        self.apply_s = 0.0
        self.expected = ""
        self.refused_seen = 0

    @property
    def name(self) -> str:
        return {"plain": "no NAT", "ct": "conntrack, no rule"}.get(
            self.kind, f"{self.kind} {human(self.n)}") + self.note

    def up(self) -> None:
        t0 = time.perf_counter()
        for ns in (self.c, self.h, self.s):
            sh(["ip", "netns", "add", ns])
        batch = {
            self.c: ["link set lo up"],
            self.h: ["link set lo up",
                     f"link add h-c type veth peer name c0 netns {self.c}",
                     f"link add h-s type veth peer name s0 netns {self.s}",
                     "link set h-c up", "link set h-s up",
                     f"addr add {CLIENT_GW}/32 dev h-c",
                     f"route add {CLIENT}/32 dev h-c",
                     f"addr add {HOST_UP}/24 dev h-s",
                     f"route add 192.0.2.0/24 via {SERVER_UP} dev h-s"],
            self.s: ["link set lo up", "link set s0 up",
                     f"addr add {SERVER_UP}/24 dev s0",
                     f"addr add {SERVER}/32 dev lo",
                     f"route add 10.0.0.0/8 via {HOST_UP} dev s0",
                     f"route add 203.0.113.0/24 via {HOST_UP} dev s0"],
        }
        batch[self.c] += ["link set c0 up", f"addr add {CLIENT}/32 dev c0",
                          f"route add {CLIENT_GW}/32 dev c0 scope link",
                          f"route add default via {CLIENT_GW} dev c0 src {CLIENT}"]
        for ns in (self.h, self.c, self.s):  # host first: it creates the veths
            sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch[ns]) + "\n")
        sh(nsx(self.h) + ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        getattr(self, f"_rules_{self.kind}")()
        self.apply_s = time.perf_counter() - t0
        if self.kind != "plain" and self.ct_close is not None:
            # per-namespace sysctls; the nat chain has loaded conntrack by now
            sh(nsx(self.h) + ["sysctl", "-q", "-w",
                              f"net.netfilter.nf_conntrack_tcp_timeout_close={self.ct_close}"])

    def _rules_plain(self) -> None:
        self.expected = f"{CLIENT} any port"

    def _rules_ct(self) -> None:
        sh(nsx(self.h) + ["nft", "-f", "-"], input=(
            "table ip dp_ct {\n chain post { type nat hook postrouting priority srcnat; policy accept;\n"
            "  ct state new counter\n }\n}\n"))  # a ct expression turns conntrack on
        self.expected = f"{CLIENT} any port"

    def _rules_maps(self) -> None:
        state = os.path.join(self.tmp, f"state-{self.h}")
        cfg = os.path.join(self.tmp, f"config-{self.h}.yaml")
        text = config_text(self.n, state)
        with open(cfg, "w") as f:
            f.write(text)
        self.egress = [line.split("ipv4: ")[1].rstrip("}") for line in text.splitlines()
                       if "ipv4: " in line]
        sh(["ip", "-n", self.h, "-batch", "-"],
           input="".join(f"addr add {a}/32 dev h-s\n" for a in self.egress))
        t0 = time.perf_counter()
        p = sh(nsx(self.h) + [AGENT, "apply", "-c", cfg, "--state-dir", state, "--json"], timeout=300)
        self.agent_apply_s = time.perf_counter() - t0
        r = json.loads(p.stdout)
        self.elements = r.get("elements_added", r.get("added"))
        if self.note == NO_LIMITS:  # diagnosis: the agent's rules without the `ct count` rule
            sh(nsx(self.h) + ["nft", "flush", "chain", "inet", "egress_agent", "limits"])
        self.expected = f"one of {len(self.egress)} egress IPs"

    def _rules_linear(self) -> None:
        others = (source(i) for i in range(self.n + 1) if i != CLIENT_INDEX)
        lines = ["table ip naive {", " chain post {",
                 "  type nat hook postrouting priority srcnat; policy accept;"]
        for i in range(self.n - 1):
            lo = 1024 + (i % 1000) * 64
            lines.append(f"  ip saddr {next(others)} ip protocol tcp "
                         f"snat to 203.0.113.{2 + i % 200}:{lo}-{lo + 63}")
        a, lo, hi = LINEAR_TARGET
        lines.append(f"  ip saddr {CLIENT} ip protocol tcp snat to {a}:{lo}-{hi}")
        lines += [" }", "}"]
        sh(nsx(self.h) + ["nft", "-f", "-"], input="\n".join(lines) + "\n", timeout=300)
        n_rules = sh(nsx(self.h) + ["nft", "-a", "list", "chain", "ip", "naive", "post"],
                     timeout=120).stdout.count("snat to")
        if n_rules != self.n:
            raise RuntimeError(f"linear {self.n}: {n_rules} rules in the kernel")
        self.expected = f"{a}:{lo}-{hi}"

    def check_path(self) -> str:
        """One probe through the echo server: what did the server see?"""
        echo = self.spawn(self.s, [PYTHON, "-m", "egress_agent.lab.echo",
                                   "--tcp", f"{SERVER}:{ECHO_PORT}"], cwd=ROOT)
        try:
            self._wait_ready(echo, "echo server")
            p = sh(nsx(self.c) + [PYTHON, "-m", "egress_agent.lab.echo", "probe", "--tcp",
                                  SERVER, str(ECHO_PORT), "--json", "--timeout", "3"], timeout=30)
            r = json.loads(p.stdout)
        finally:
            self.stop(echo)
        if not r.get("ok"):
            raise RuntimeError(f"{self.name}: no answer through the host: {r}")
        addr, port = r["source_address"], r["source_port"]
        if self.kind in ("plain", "ct"):
            good = addr == CLIENT
        elif self.kind == "maps":
            good = addr in self.egress and 1024 <= port <= 65535
        else:
            good = addr == LINEAR_TARGET[0] and LINEAR_TARGET[1] <= port <= LINEAR_TARGET[2]
        if not good:
            raise RuntimeError(f"{self.name}: server saw {addr}:{port}, expected {self.expected}")
        return f"{addr}:{port}"

    def spawn(self, ns: str, cmd: list[str], cwd: str = "/") -> subprocess.Popen:
        p = subprocess.Popen(nsx(ns) + cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def _wait_ready(p: subprocess.Popen, what: str, timeout: float = 15) -> None:
        import select
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise RuntimeError(f"{what} did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}")

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        for f in (p.stdout, p.stderr):
            if f:
                f.close()
        if p in self.procs:
            self.procs.remove(p)

    def start_server(self, binary: str, seconds: float, threads: int) -> None:
        self.server = self.spawn(self.s, [binary, "server", str(PORT), str(self.nports),
                                          str(seconds), str(threads)])
        self._wait_ready(self.server, "server")

    def down(self) -> None:
        for p in list(self.procs):
            try:
                self.stop(p)
            except Exception:
                pass
        for ns in (self.c, self.h, self.s):
            # anything still inside our namespaces was started by this script
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if os.path.exists(f"/run/netns/{ns}"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def connect_run(t: Topology, binary: str, args, seconds: float | None = None) -> dict:
    seconds = args.duration if seconds is None else seconds
    p = sh(nsx(t.c) + [binary, "connect", SERVER, str(PORT), str(t.nports), str(seconds),
                       str(args.inflight), str(args.threads)], timeout=seconds + 30)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    ct = subprocess.run(nsx(t.h) + ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
                        capture_output=True, text=True).stdout.strip()
    r["conntrack_count"] = int(ct) if ct.isdigit() else None  # host namespace, after the run
    if t.kind == "maps":  # the agent's own count of refused connections (@refused_ports)
        total = refused_total(t)
        r["refused"] = total - t.refused_seen
        t.refused_seen = total
    return r


def refused_total(t: Topology) -> int:
    out = sh(nsx(t.h) + ["nft", "-j", "list", "set", "inet", "egress_agent", "refused_ports"]).stdout

    def walk(x) -> int:
        if isinstance(x, dict):
            c = x.get("counter")
            own = c.get("packets", 0) if isinstance(c, dict) else 0
            return own + sum(walk(v) for k, v in x.items() if k != "counter")
        if isinstance(x, list):
            return sum(walk(v) for v in x)
        return 0
    return walk(json.loads(out))


def stream_run(t: Topology, binary: str, seconds: float) -> dict:
    sink = t.spawn(t.s, [binary, "sink", str(SINK_PORT), str(seconds + 10)])
    try:
        t._wait_ready(sink, "sink")
        sh(nsx(t.c) + [binary, "send", SERVER, str(SINK_PORT), str(seconds)], timeout=seconds + 30)
        out, _ = sink.communicate(timeout=seconds + 15)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        t.stop(sink)


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.splitlines()[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (median; default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--maps", default="10,100000", help="workload counts for the agent's maps")
    ap.add_argument("--linear", default="1000,10000", help="rule counts for linear rules")
    ap.add_argument("--no-conntrack-row", action="store_true",
                    help="skip the 'conntrack, no rule' configuration")
    ap.add_argument("--quick", action="store_true",
                    help="maps 10,10000, linear 1000, 3 s runs, 2 s stream")
    ap.add_argument("--inflight", type=int, default=64, help="connections in flight (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="client threads (default 2)")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--stream-seconds", type=float, default=3.0,
                    help="one-stream throughput per run, no NAT vs largest maps (0: skip)")
    ap.add_argument("--dst-ports", type=int, default=64,
                    help="server ports the client cycles through (default 64)")
    ap.add_argument("--no-one-port-row", action="store_true",
                    help="skip 'maps SMALLEST (1 dst port)': every connection to one ip:port")
    ap.add_argument("--diagnose", action="store_true",
                    help="add 'maps SMALLEST (no limits rule)': the agent's table with chain "
                         "limits flushed, to split the cost of `ct count` from the rest")
    ap.add_argument("--ct-close-timeout", type=int, default=None,
                    help="set nf_conntrack_tcp_timeout_close in the host namespaces "
                         "(default: the kernel's, 10 s)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of an uncounted first run per configuration (default 1)")
    ap.add_argument("--budget", type=float, default=155,
                    help="start no connection run after this many seconds, no stream run "
                         "15 s later (default 155)")
    args = ap.parse_args()
    if args.quick:
        args.maps, args.linear, args.duration = "10,10000", "1000", 3.0
        args.stream_seconds = min(args.stream_seconds, 2.0)
    if os.geteuid() != 0:
        print("datapath.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    if not shutil.which("gcc"):
        print("datapath.py: gcc is needed to build bench/datapath_client.c", file=sys.stderr)
        return 2
    maps = [int(x) for x in args.maps.split(",") if x]
    linear = [int(x) for x in args.linear.split(",") if x]
    P = args.dst_ports
    kinds = [("plain", 0, P, "")] + ([] if args.no_conntrack_row else [("ct", 0, P, "")]) \
        + [("maps", n, P, "") for n in maps] \
        + [("linear", n, P, "") for n in linear] \
        + ([("maps", maps[0], P, NO_LIMITS)] if args.diagnose and maps else []) \
        + ([] if args.no_one_port_row or not maps or P == 1 else [("maps", maps[0], 1, " (1 dst port)")])

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up in `finally`
    started = time.monotonic()
    load_before = loadavg()
    tmp = tempfile.mkdtemp(prefix="eadp-")
    prefix = f"eadp{secrets.token_hex(3)}"
    topos: list[Topology] = []
    try:
        binary = os.path.join(tmp, "datapath_client")
        sh(["gcc", "-O2", "-Wall", "-pthread", "-o", binary, C_SOURCE])
        for k, (kind, n, nports, note) in enumerate(kinds):
            t = Topology(f"{prefix}-{k}", kind, n, nports, tmp, args.ct_close_timeout, note)
            topos.append(t)
            t.up()
            seen = t.check_path()
            extra = f", agent apply {t.agent_apply_s:.2f}s" if kind == "maps" else ""
            print(f"{t.name:26} ready in {t.setup_s + t.apply_s:.2f}s (rules {t.apply_s:.2f}s{extra}); "
                  f"server saw {seen}", file=sys.stderr, flush=True)
            t.start_server(binary, args.budget + 120, args.server_threads)

        for t in topos:  # warm-up, not counted: neighbours, routes, conntrack hash
            connect_run(t, binary, args, seconds=args.warmup)
        runs: dict[str, list[dict]] = {t.name: [] for t in topos}
        for r in range(args.runs):
            for t in topos:
                if time.monotonic() - started > args.budget:
                    print("budget spent: no new runs", file=sys.stderr)
                    break
                res = connect_run(t, binary, args)
                runs[t.name].append(res)
                print(f"run {r + 1}/{args.runs} {t.name:26} {res['conn_per_s']:>9.0f} conn/s "
                      f"(errors {res['errors']}, timeouts {res['timeouts']}, "
                      f"conntrack entries {res['conntrack_count']}"
                      + (f", refused by the agent {res['refused']}" if "refused" in res else "") + ")",
                      file=sys.stderr, flush=True)

        stream: dict[str, list[dict]] = {}
        if args.stream_seconds > 0:
            plain_maps = [t for t in topos if t.kind == "maps" and not t.note]
            pair = [topos[0]] + ([max(plain_maps, key=lambda t: t.n)] if plain_maps else [])
            for r in range(args.runs):
                for t in pair:
                    if time.monotonic() - started > args.budget + 15:
                        break
                    res = stream_run(t, binary, args.stream_seconds)
                    stream.setdefault(t.name, []).append(res)
                    print(f"stream {r + 1}/{args.runs} {t.name:26} {res['gbit_per_s']:.2f} Gbit/s",
                          file=sys.stderr, flush=True)
    finally:
        for t in topos:
            t.down()
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = loadavg()
    results = []
    for t in topos:
        rs = runs[t.name]
        if not rs:
            continue
        med = statistics.median(x["conn_per_s"] for x in rs)
        results.append({"config": t.name, "kind": t.kind, "size": t.n, "dst_ports": t.nports,
                        "conn_per_s": med,
                        "runs": [x["conn_per_s"] for x in rs],
                        "errors": sum(x["errors"] for x in rs),
                        "timeouts": sum(x["timeouts"] for x in rs),
                        "conntrack_count": [x["conntrack_count"] for x in rs],
                        "refused_by_agent": sum(x["refused"] for x in rs) if t.kind == "maps" else None,
                        "rules_load_s": round(t.apply_s, 3)})
    base = next((r["conn_per_s"] for r in results if r["kind"] == "plain"), None)
    maps10 = next((r["conn_per_s"] for r in results if r["kind"] == "maps" and r["size"] == 10
                   and r["dst_ports"] == args.dst_ports), None)
    for r in results:
        r["vs_no_nat"] = round(r["conn_per_s"] / base, 3) if base else None
        r["vs_maps_10"] = round(r["conn_per_s"] / maps10, 3) if maps10 else None

    print()
    print(f"new TCP connections/s through the host: {args.inflight} in flight, {args.threads} client "
          f"thread(s), {args.duration:g} s per run, median of {args.runs} (interleaved)")
    print(f"{'CONFIG':26} {'CONN/S':>9} {'VS NO NAT':>10} {'VS MAPS 10':>11}   "
          f"{'RUNS':28} {'ERR':>5} {'T/O':>5}")
    for r in results:
        runs_s = " ".join(f"{x / 1000:.1f}k" for x in r["runs"])
        vs1 = f"{r['vs_no_nat']:.2f}" if r["vs_no_nat"] is not None else "-"
        vs2 = f"{r['vs_maps_10']:.2f}" if r["vs_maps_10"] is not None else "-"
        print(f"{r['config']:26} {r['conn_per_s']:>9.0f} {vs1:>10} {vs2:>11}   "
              f"{runs_s:28} {r['errors']:>5} {r['timeouts']:>5}")
    stream_res = []
    if stream:
        print()
        print(f"one TCP stream, {args.stream_seconds:g} s per run, median of {args.runs}")
        print(f"{'CONFIG':26} {'GBIT/S':>9}   RUNS")
        for name, rs in stream.items():
            med = statistics.median(x["gbit_per_s"] for x in rs)
            stream_res.append({"config": name, "gbit_per_s": med, "runs": [x["gbit_per_s"] for x in rs]})
            print(f"{name:26} {med:>9.2f}   " + " ".join(f"{x['gbit_per_s']:.2f}" for x in rs))
        if len(stream_res) == 2:
            print(f"ratio {stream_res[1]['config']} / {stream_res[0]['config']}: "
                  f"{stream_res[1]['gbit_per_s'] / stream_res[0]['gbit_per_s']:.3f}")
    elapsed = time.monotonic() - started
    print()
    print(f"load average before: {load_before}, after: {load_after}; {os.cpu_count()} CPUs; "
          f"kernel {os.uname().release}; total {elapsed:.0f} s")
    print(json.dumps({"bench": "datapath", "runs": args.runs, "duration_s": args.duration,
                      "inflight": args.inflight, "threads": args.threads,
                      "ct_close_timeout": args.ct_close_timeout,
                      "loadavg_before": load_before, "loadavg_after": load_after,
                      "kernel": os.uname().release, "elapsed_s": round(elapsed, 1),
                      "results": results, "stream": stream_res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
