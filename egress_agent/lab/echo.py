"""Echo endpoint that tells a client which source address and port it saw.

This is the lab's ground truth: every assertion about egress IPs ends in
"the origin saw X". The server answers each TCP connection (at once, and again
for every line the client sends, e.g. `ping`) and each UDP datagram with one
line `"<peer_ip> <peer_port>\\n"`. Stdlib only, one thread, `selectors`, so a
single process serves thousands of long-lived connections.

Server:   python -m egress_agent.lab.echo --tcp 192.0.2.10:8080 --udp [2001:db8::1]:53
          (prints `ready` once every socket is bound)
Probe:    python -m egress_agent.lab.echo probe --tcp 192.0.2.10 8080 --json
Hold:     python -m egress_agent.lab.echo hold 192.0.2.10 8080 [--count N]
          (stdin `ping` lines -> one JSON answer per line; used by HeldConnection
          and HeldGroup to keep flows open from inside another namespace or cgroup)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import select
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

from ..argtypes import endpoint


class Seen(NamedTuple):
    """What the echo server saw: the client's address and port after NAT."""

    address: str
    port: int


# --- server ----------------------------------------------------------------------

def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _peer_line(peer: tuple) -> bytes:
    return f"{peer[0]} {peer[1]}\n".encode()


def _bind(addr: str, port: int, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(_family(addr), kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


class _Conn:
    """One accepted TCP connection: what it has to say back, what it sent."""

    __slots__ = ("sock", "line", "inbuf", "outbuf")

    def __init__(self, sock: socket.socket, peer: tuple):
        self.sock = sock
        self.line = _peer_line(peer)
        self.inbuf = b""
        self.outbuf = self.line


class EchoServer:
    """Single-threaded TCP+UDP echo of the peer address (see module docstring)."""

    def __init__(self, tcp: Sequence[tuple[str, int]] = (), udp: Sequence[tuple[str, int]] = ()):
        self.sel = selectors.DefaultSelector()
        for addr, port in tcp:
            self.sel.register(_bind(addr, port, socket.SOCK_STREAM), selectors.EVENT_READ, "listen")
        for addr, port in udp:
            self.sel.register(_bind(addr, port, socket.SOCK_DGRAM), selectors.EVENT_READ, "udp")

    def serve_forever(self) -> None:
        while True:
            for key, events in self.sel.select():
                try:
                    self._handle(key, events)
                except OSError:
                    if isinstance(key.data, _Conn):
                        self._close(key.data)

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        sock, data = key.fileobj, key.data
        if data == "listen":
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            conn.setblocking(False)
            c = _Conn(conn, peer)
            self.sel.register(conn, selectors.EVENT_READ, c)
            self._flush(c)
        elif data == "udp":
            try:
                _, peer = sock.recvfrom(2048)
            except BlockingIOError:
                return
            sock.sendto(_peer_line(peer), peer)
        else:
            if events & selectors.EVENT_READ:
                chunk = sock.recv(4096)
                if not chunk:
                    self._close(data)
                    return
                data.inbuf += chunk
                lines = data.inbuf.count(b"\n")
                data.inbuf = data.inbuf.rpartition(b"\n")[2][-4096:]
                data.outbuf += data.line * lines
            self._flush(data)

    def _flush(self, c: _Conn) -> None:
        if c.outbuf:
            try:
                sent = c.sock.send(c.outbuf)
                c.outbuf = c.outbuf[sent:]
            except BlockingIOError:
                pass
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.outbuf else 0)
        self.sel.modify(c.sock, want, c)

    def _close(self, c: _Conn) -> None:
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()


# --- client side -----------------------------------------------------------------

def _parse_answer(line: bytes) -> Seen:
    addr, port = line.decode().split()
    return Seen(addr, int(port))


def _connect(dst: str, port: int, timeout: float, source: str | None) -> socket.socket:
    sock = socket.socket(_family(dst), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((dst, port))
        return sock
    except BaseException:
        sock.close()
        raise


def _readline(sock: socket.socket, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk
    return buf


def probe_tcp_result(dst: str, port: int, timeout: float = 2.0,
                     source: str | None = None) -> dict:
    """Connect, read the server's line, close. Returns the JSON-able result."""
    deadline = time.monotonic() + timeout
    try:
        with _connect(dst, port, timeout, source) as sock:
            seen = _parse_answer(_readline(sock, deadline))
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "source_address": seen.address, "source_port": seen.port}


def probe_udp_result(dst: str, port: int, timeout: float = 2.0,
                     source: str | None = None) -> dict:
    """Send a datagram (re-sent a few times within `timeout`), read the answer."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
            if source:
                sock.bind((source, 0))
            sock.connect((dst, port))
            while True:
                sock.send(b"probe\n")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer")
                sock.settimeout(min(left, timeout / 3))
                try:
                    seen = _parse_answer(sock.recv(2048))
                    break
                except TimeoutError:
                    continue
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "source_address": seen.address, "source_port": seen.port}


def result_to_seen(result: dict) -> Seen | None:
    return Seen(result["source_address"], result["source_port"]) if result.get("ok") else None


def probe_tcp(dst: str, port: int, timeout: float = 2.0, source: str | None = None) -> Seen | None:
    """(address, port) the server saw, or None if refused, dropped or timed out."""
    return result_to_seen(probe_tcp_result(dst, port, timeout, source))


def probe_udp(dst: str, port: int, timeout: float = 2.0, source: str | None = None) -> Seen | None:
    """(address, port) the server saw, or None if nothing came back in time."""
    return result_to_seen(probe_udp_result(dst, port, timeout, source))


class HeldConnection:
    """A long-lived TCP flow to an echo server, for tests about existing flows.

    With no `prefix` the socket lives in this process. With a command prefix
    (e.g. `nsenter --net=/run/netns/X --`, see `Lab.hold`) a child process
    holds it inside that namespace/cgroup and relays pings over a pipe.
    The constructor raises ConnectionError if the flow cannot be set up;
    `.first` is what the server saw at connect time.
    """

    def __init__(self, dst: str, port: int, *, timeout: float = 2.0,
                 source: str | None = None, prefix: Sequence[str] = ()):
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[str] | None = None
        if not prefix:
            try:
                self.sock = _connect(dst, port, timeout, source)
                self.first = _parse_answer(_readline(self.sock, time.monotonic() + timeout))
            except (OSError, ValueError) as exc:
                self.close()
                raise ConnectionError(f"hold {dst}:{port}: {exc}") from exc
            return
        cmd = [*prefix, sys.executable, "-m", "egress_agent.lab.echo", "hold", dst, str(port),
               "--timeout", str(timeout)] + (["--source", source] if source else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     env=child_env())
        first = self._read_result(timeout + 5.0)
        if first is None:
            err = self._last_error
            self.close()
            raise ConnectionError(f"hold {dst}:{port}: {err}")
        self.first = first

    def _read_result(self, timeout: float) -> Seen | None:
        assert self.proc and self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self._last_error = "no answer from holder process"
            return None
        result = json.loads(line)
        self._last_error = result.get("error")
        return result_to_seen(result)

    def ping(self) -> Seen | None:
        """Send `ping` on the held flow; what the server saw, or None if it is dead."""
        try:
            if self.sock is not None:
                self.sock.sendall(b"ping\n")
                return _parse_answer(_readline(self.sock, time.monotonic() + self.timeout))
            if self.proc is not None and self.proc.poll() is None:
                assert self.proc.stdin
                self.proc.stdin.write("ping\n")
                self.proc.stdin.flush()
                return self._read_result(self.timeout + 2.0)
        except (OSError, ValueError):
            pass
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            _stop_holder(self.proc)
            self.proc = None

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeldGroup:
    """Up to `count` long-lived TCP flows held by one child process (behind
    `prefix`, e.g. from `Lab.hold_many`), for tests about port blocks and
    connection limits. Opening stops at the first flow that fails (a full SNAT
    port block drops the SYN, so each failure costs `timeout`): `.seen` lists
    what the server saw for each open flow, `.error` why opening stopped."""

    def __init__(self, dst: str, port: int, count: int, *, prefix: Sequence[str],
                 timeout: float = 2.0, source: str | None = None):
        self.timeout = timeout
        cmd = [*prefix, sys.executable, "-m", "egress_agent.lab.echo", "hold", dst, str(port),
               "--count", str(count), "--timeout", str(timeout)]
        cmd += ["--source", source] if source else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     env=child_env())
        first = self._read(timeout + 30.0 + count * 0.01)
        self.seen = [Seen(a, p) for a, p in first.get("seen", [])]
        self.error = first.get("error")

    def _read(self, timeout: float) -> dict:
        assert self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else {"seen": [], "error": "no answer from holder process"}

    def ping(self) -> list[Seen | None]:
        """Ping every open flow; per flow what the server saw, None if dead."""
        try:
            assert self.proc.stdin
            self.proc.stdin.write("ping\n")
            self.proc.stdin.flush()
            result = self._read(self.timeout * 2 + 10.0)
        except (OSError, ValueError):
            return [None] * len(self.seen)
        return [Seen(*s) if s else None for s in result.get("seen", [None] * len(self.seen))]

    def close(self) -> None:
        _stop_holder(self.proc)

    def __enter__(self) -> HeldGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_holder(proc: subprocess.Popen) -> None:
    """Closing its stdin makes a holder close its flows and exit."""
    for f in (proc.stdin, proc.stdout):
        try:
            if f:
                f.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _raise_fd_limit() -> None:
    """Thousands of held flows need more than the usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def child_env() -> dict[str, str]:
    """Environment for child Pythons: make this package importable from any cwd."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# --- command line ----------------------------------------------------------------

def _hold_main(args: argparse.Namespace) -> int:
    """Relay for HeldConnection/HeldGroup: one JSON line once the flows are
    open, then one per stdin line (a ping on every flow)."""
    def emit(result: dict) -> None:
        print(json.dumps(result), flush=True)

    def seen_of(sock: socket.socket) -> Seen:
        return _parse_answer(_readline(sock, time.monotonic() + args.timeout))

    _raise_fd_limit()
    socks, seen, error = [], [], None
    for _ in range(args.count):
        try:
            sock = _connect(args.dst, args.port, args.timeout, args.source)
            socks.append(sock)
            seen.append(seen_of(sock))
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
    if args.count == 1:
        emit({"ok": True, "source_address": seen[0].address, "source_port": seen[0].port}
             if seen else {"ok": False, "error": error})
    else:
        emit({"ok": error is None, "seen": seen, "error": error})
    for _ in sys.stdin:
        answers = []
        for sock in socks:
            try:
                sock.sendall(b"ping\n")
                answers.append(seen_of(sock))
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                answers.append(None)
        if args.count == 1:
            emit({"ok": True, "source_address": answers[0].address, "source_port": answers[0].port}
                 if answers and answers[0] else {"ok": False, "error": error})
        else:
            emit({"ok": all(answers), "seen": answers, "error": error})
    for sock in socks:
        sock.close()
    return 0 if seen else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["probe"], ["hold"]):
        p = argparse.ArgumentParser(prog=f"egress_agent.lab.echo {argv[0]}")
        if argv[0] == "probe":
            proto = p.add_mutually_exclusive_group(required=True)
            proto.add_argument("--tcp", dest="proto", action="store_const", const="tcp")
            proto.add_argument("--udp", dest="proto", action="store_const", const="udp")
            p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("dst")
        p.add_argument("port", type=int)
        p.add_argument("--source", help="bind this source address first")
        p.add_argument("--timeout", type=float, default=2.0)
        if argv[0] == "hold":
            p.add_argument("--count", type=int, default=1, help="flows to hold (default 1)")
        args = p.parse_args(argv[1:])
        if argv[0] == "hold":
            return _hold_main(args)
        fn = probe_tcp_result if args.proto == "tcp" else probe_udp_result
        result = fn(args.dst, args.port, args.timeout, args.source)
        if args.json:
            print(json.dumps(result))
        elif result["ok"]:
            print(result["source_address"], result["source_port"])
        else:
            print("error:", result["error"])
        return 0 if result["ok"] else 1

    p = argparse.ArgumentParser(prog="egress_agent.lab.echo",
                                description="echo the peer address (see module docstring)")
    p.add_argument("--tcp", action="append", default=[], type=endpoint, metavar="ADDR:PORT")
    p.add_argument("--udp", action="append", default=[], type=endpoint, metavar="ADDR:PORT")
    args = p.parse_args(argv)
    if not args.tcp and not args.udp:
        p.error("nothing to serve: give --tcp and/or --udp")
    _raise_fd_limit()
    server = EchoServer(args.tcp, args.udp)
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
