"""Helpers for the daemon tests (test_daemon.py) and bench/failover.py.

- `Notify`: an AF_UNIX datagram socket standing in for systemd's
  $NOTIFY_SOCKET; every datagram is kept with the time it arrived.
- `Agent`: `egress-agent run` in a lab's host namespace, its JSON log lines
  (stderr) collected by a thread; always stopped by pid (SIGTERM, then SIGKILL).
- `Prober`: ONE long-running process inside a machine namespace that opens a
  NEW UDP socket (or TCP connection) every few milliseconds towards an echo
  server and prints one JSON line per answer: when it was sent, when the answer
  came back (time.time(), the same clock as this process) and which source
  address and port the echo server saw.
- `OriginCounters`: named nft counters in a table of our own in the lab's
  ORIGIN namespace (prerouting, priority raw: before rp_filter and sockets).

Nothing here touches anything outside the lab's namespaces, except a temporary
directory for the notify socket.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Union

from egress_agent.lab.cli import demo_config_text
from egress_agent.lab.echo import Seen, child_env
from egress_agent.lab.netns import ns_exec, nsenter_prefix
from egress_agent.lab.topology import Lab

# one copy of what the apply tests need too
from agent_helpers import OriginCounters, in_block, line_of, status  # noqa: F401 (re-exported)
from agent_helpers import edited as demo_text  # noqa: F401


def drop_counters(lab: Lab) -> dict[str, int]:
    """Packets counted by the commented rules of our whole table (every chain, policies
    included), by comment, both families summed."""
    data = json.loads(ns_exec(lab.host, ["nft", "-j", "list", "table", "inet", "egress_agent"]).stdout)
    out: dict[str, int] = {}
    for item in data["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            for e in rule["expr"]:
                if "counter" in e:
                    out[rule["comment"]] = out.get(rule["comment"], 0) + e["counter"]["packets"]
    return out

TABLE = "inet egress_agent"


def wait_until(fn: Callable[[], Any], timeout: float, interval: float = 0.02,
               what: Union[str, Callable[[], str]] = "condition") -> Any:
    """Poll `fn` until it returns something truthy; that value. AssertionError
    after `timeout` seconds, saying `what` (called then, if callable: a log's tail
    as it is at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)


# --- systemd notify socket ---------------------------------------------------------

class Notify:
    """A datagram socket at a temporary path; `messages` holds (time, text)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="eanotify")
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            self.messages.append((time.time(), data.decode(errors="replace")))

    def lines(self) -> list[tuple[float, str]]:
        """Every `KEY=value` line received, with its arrival time, in order."""
        return [(t, line) for t, m in list(self.messages) for line in m.split("\n") if line]

    def count(self, line: str) -> int:
        return sum(1 for _, l in self.lines() if l == line)

    def wait_for(self, line: str, n: int = 1, timeout: float = 15.0) -> float:
        """Wait until `line` has arrived `n` times; arrival time of the n-th."""
        def nth():
            hits = [t for t, l in self.lines() if l == line]
            return hits[n - 1] if len(hits) >= n else None
        return wait_until(nth, timeout, what=f"{line!r} #{n} on the notify socket "
                                             f"(got {[l for _, l in self.lines()]})")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the daemon ------------------------------------------------------------------------

class Agent:
    """`egress-agent run -c CONFIG --resync R --log-format json` in the lab's host
    namespace. `log` holds (arrival time, parsed JSON) per stderr line; lines
    that are not JSON are kept as {"event": "<raw>", "raw": True}."""

    def __init__(self, lab: Lab, config: str, resync: float = 1.0,
                 notify: Optional[Notify] = None, extra: tuple[str, ...] = ()):
        self.lab, self.config = lab, config
        env = child_env()
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        env.pop("NOTIFY_SOCKET", None)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.path
        cmd = lab.agent_prefix() + [sys.executable, "-m", "egress_agent.cli", "run", "-c", config,
                                    "--resync", str(resync), "--log-format", "json", *extra]
        self.started = time.time()
        # nsenter/unshare/sh all exec: self.proc.pid is the daemon itself
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        self.log: list[tuple[float, dict]] = []
        self._reader = threading.Thread(target=self._read, name="agent-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                rec = {"event": line, "raw": True}
            self.log.append((time.time(), rec))

    # log queries

    def records(self, event: Optional[str] = None, **match: Any) -> list[dict]:
        return [r for _, r in list(self.log) if (event is None or r.get("event") == event)
                and all(r.get(k) == v for k, v in match.items())]

    def syncs(self, **match: Any) -> list[dict]:
        return self.records("sync", **match)

    def timed_syncs(self, **match: Any) -> list[tuple[float, dict]]:
        return [(t, r) for t, r in list(self.log) if r.get("event") == "sync"
                and all(r.get(k) == v for k, v in match.items())]

    def errors(self) -> list[dict]:
        return [r for _, r in list(self.log) if r.get("level") == "error"]

    def wait_syncs(self, n: int, timeout: float = 15.0, **match: Any) -> dict:
        """Wait until there are at least `n` sync lines matching `match`; the n-th."""
        def nth():
            self.check_alive()
            s = self.syncs(**match)
            return s[n - 1] if len(s) >= n else None
        return wait_until(nth, timeout, what=lambda: f"sync #{n} {match} (log: {self.tail()})")

    def wait_next_sync(self, timeout: float = 15.0, **match: Any) -> dict:
        """The next sync line matching `match` after now."""
        return self.wait_syncs(len(self.syncs(**match)) + 1, timeout, **match)

    def tail(self, n: int = 8) -> list[dict]:
        return [r for _, r in self.log[-n:]]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self._reader.join(timeout=2)
            raise AssertionError(f"the daemon exited with {self.proc.returncode}; "
                                 f"last log lines: {self.tail(20)}")

    # signals, by pid (the pid is our own child)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, then SIGKILL; the exit status (negative: killed by a signal)."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)
        return self.proc.returncode

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- configs ---------------------------------------------------------------------------

M43_WORKLOAD = "  - {id: m43, app: billing, source: [10.0.1.3], interface: vm-m43}\n"
LEGACY_POLICY = ("  - name: legacy-udp\n"
                 "    match: {workloads: [m43], protocols: [udp]}\n"
                 "    egress: {ipv4: legacy, ipv4_fallback: drop}\n")
PARTNER_EGRESS = "    egress: {ipv4: partner-link, ipv4_fallback: drop}\n"


def started(lab: Lab, config: str, **kw) -> Agent:
    """A daemon that has done its first sync (stopped if it never gets there)."""
    ag = Agent(lab, config, **kw)
    try:
        ag.wait_syncs(1, trigger="start")
    except BaseException:
        ag.stop()
        raise
    return ag


def without_m43(lab: Lab) -> str:
    """The demo config without workload m43 (and the policy that names it)."""
    return demo_text(lab, (M43_WORKLOAD, ""), (LEGACY_POLICY, ""))


def write_in_place(path: str, text: str) -> None:
    """Truncate and rewrite the same inode (what `echo > file` does)."""
    with open(path, "w") as f:
        f.write(text)


def write_by_rename(path: str, text: str) -> None:
    """Write a temporary file next to `path` and rename it over `path` (editors)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(3)}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


# --- the lab's host namespace ---------------------------------------------------------

def host(lab: Lab, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ns_exec(lab.host, list(cmd), check=check)


def our_table(lab: Lab) -> Optional[str]:
    """`nft list table inet egress_agent` in the host namespace, None if absent."""
    proc = host(lab, "nft", "list", "table", *TABLE.split(), check=False)
    return proc.stdout if proc.returncode == 0 else None


def without_counters(nft_text: str) -> str:
    return re.sub(r"counter packets \d+ bytes \d+", "counter", nft_text)


def ip_rule_priorities(lab: Lab) -> list[int]:
    out = host(lab, "ip", "rule", "show").stdout
    return [int(line.split(":")[0]) for line in out.splitlines() if line.strip()]


def lease(st: dict, workload: str, ip: Optional[str] = None) -> dict:
    """The lease of `workload` on egress IP `ip` (default: its app IP)."""
    w = next(w for w in st["workloads"] if w["id"] == workload)
    ip = ip or w["app_ip"]
    found = [l for l in w["leases"] if l["ip"] == ip]
    assert found, f"{workload} has no lease on {ip}: {w}"
    return found[0]


# --- the prober ------------------------------------------------------------------------

# Stdlib only; runs inside a machine namespace as `python -c PROBER ...`.
# argv: proto dst port interval_s reply_timeout_s max_duration_s
# Every `interval` a NEW socket (UDP: connect + one datagram; TCP: a
# non-blocking connect, closed with RST after the answer so that no TIME_WAIT
# holds a port of the SNAT block). Source ports are taken in sequence from
# 20000-59999 (starting at a random one): a new socket never reuses the source
# port of a recent probe, whose conntrack entry (UDP: 30 s) would carry the
# OLD NAT binding and make the probe look like it left from the old address.
# One JSON line per answer:
#   {"seq": N, "sent": t, "recv": t, "src": "203.0.113.10", "sport": 1234}
# A first line {"started": t} and a last line {"summary": ..., "sent": N,
# "answers": M}. Stops on EOF on stdin or after max_duration.
PROBER = r'''
import errno, json, os, random, selectors, socket, struct, sys, time
proto, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
LO, HI = 20000, 60000
sport = random.randrange(LO, HI)
def bound(kind):
    global sport
    for _ in range(100):
        sport = LO + (sport + 1 - LO) % (HI - LO)
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("0.0.0.0", sport))
            return s
        except OSError:
            s.close()
    raise OSError("no free source port")
interval, reply_timeout, max_duration = map(float, sys.argv[4:7])
out = sys.stdout
def emit(d):
    out.write(json.dumps(d) + "\n"); out.flush()
sel = selectors.DefaultSelector()
os.set_blocking(0, False)
sel.register(0, selectors.EVENT_READ, None)
pending = {}
seq = answers = 0
start = time.time()
emit({"started": start})
next_send = start
stop = False
def close(s):
    pending.pop(s, None)
    try: sel.unregister(s)
    except (KeyError, ValueError): pass
    s.close()
while not stop and time.time() - start < max_duration:
    now = time.time()
    if now >= next_send:
        seq += 1
        next_send = max(next_send + interval, now)
        if proto == "udp":
            s = bound(socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                s.connect((dst, port)); s.send(b"probe\n")
            except OSError:
                s.close(); s = None
            if s: sel.register(s, selectors.EVENT_READ, "r")
        else:
            s = bound(socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            err = s.connect_ex((dst, port))
            if err not in (0, errno.EINPROGRESS):
                s.close(); s = None
            if s: sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, "c")
        if s: pending[s] = (seq, now)
    timeout = max(0.0, next_send - time.time())
    for key, ev in sel.select(timeout):
        if key.data is None:
            try:
                if not os.read(0, 4096): stop = True
            except BlockingIOError:
                pass
            continue
        s = key.fileobj
        if s not in pending: continue
        n, sent = pending[s]
        if key.data == "c" and ev & selectors.EVENT_WRITE:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                close(s); continue
            sel.modify(s, selectors.EVENT_READ, "r")
            if not ev & selectors.EVENT_READ: continue
        try:
            data = s.recv(256)
        except BlockingIOError:
            continue
        except OSError:
            close(s); continue
        recv = time.time()
        close(s)
        try:
            a, p = data.decode().split()
        except ValueError:
            continue
        answers += 1
        emit({"seq": n, "sent": sent, "recv": recv, "src": a, "sport": int(p)})
    now = time.time()
    for s, (n, sent) in list(pending.items()):
        if now - sent > reply_timeout: close(s)
emit({"summary": True, "sent": seq, "answers": answers, "end": time.time()})
'''


class Prober:
    """PROBER in `machine`'s namespace. `answers` fills as answers arrive."""

    def __init__(self, lab: Lab, machine: str, dst: str, port: int, proto: str = "udp",
                 interval: float = 0.002, reply_timeout: float = 0.5,
                 max_duration: float = 60.0):
        cmd = nsenter_prefix(lab.ns(machine)) + [
            sys.executable, "-c", PROBER, proto, dst, str(port), str(interval),
            str(reply_timeout), str(max_duration)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env(), cwd="/")
        self.answers: list[dict] = []
        self.summary: Optional[dict] = None
        self.started: Optional[float] = None
        self._reader = threading.Thread(target=self._read, name="prober", daemon=True)
        self._reader.start()
        wait_until(lambda: self.started or self.proc.poll() is not None, 15, what="prober start")
        if self.started is None:
            raise AssertionError(f"prober did not start: {self.proc.stderr.read()}")

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            d = json.loads(line)
            if "started" in d:
                self.started = d["started"]
            elif d.get("summary"):
                self.summary = d
            else:
                self.answers.append(d)

    def first(self, pred: Callable[[dict], bool], after: float = 0.0) -> Optional[dict]:
        """The first answer (in arrival order) to a probe sent at or after
        `after` that satisfies `pred`."""
        return next((a for a in list(self.answers) if a["sent"] >= after and pred(a)), None)

    def wait_first(self, pred: Callable[[dict], bool], after: float = 0.0,
                   timeout: float = 5.0, what: str = "answer") -> dict:
        return wait_until(lambda: self.first(pred, after), timeout, interval=0.005, what=what)

    def stop(self) -> Optional[dict]:
        """Close its stdin (it prints a summary and exits); kill it if it does not."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)
        return self.summary

    def __enter__(self) -> "Prober":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flush_conntrack(lab: Lab, proto: str = "udp") -> None:
    """Forget the host namespace's conntrack entries of `proto` (frees the
    SNAT ports that finished probes still hold: UDP entries live 30 s)."""
    host(lab, "conntrack", "-D", "-p", proto, check=False)
