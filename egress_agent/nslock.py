"""One agent per network namespace: a lock held by the daemon for its life and by
`apply`/`teardown` for their duration.

The lock is a listening abstract unix socket named after the network namespace.
Abstract socket names are per network namespace and vanish with the process that
holds them (no stale lock file after a crash or SIGKILL); binding is atomic, so
exactly one process gets it. A refused process learns who holds it from the
kernel: SO_PEERCRED on a connection to the socket names the holder's pid.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from typing import Optional

from . import names


def netns() -> str:
    """The network namespace of this process, as `ls -l /proc/self/ns/net` names it."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "net:[?]"


def _name() -> bytes:
    return names.lock_socket(netns())


class Busy(Exception):
    """Another egress-agent holds this network namespace."""

    def __init__(self, pid: Optional[int]):
        self.pid = pid
        self.cmdline = _cmdline(pid) if pid else None
        who = (f"pid {pid}" + (f" ({self.cmdline})" if self.cmdline else "")) if pid else "a process"
        super().__init__(f"another egress-agent holds network namespace {netns()}: {who}")


class NetnsLock:
    def __init__(self, sock: socket.socket, server: Optional[threading.Thread] = None):
        self.sock = sock
        self.server = server

    def release(self) -> None:
        # shutdown first, and wait for the server thread: close() alone does not
        # wake a thread blocked in accept(), and the name stays bound until that
        # accept() returns
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.server is not None:
            self.server.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> "NetnsLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(serve: bool = False) -> NetnsLock:
    """The lock of this network namespace, or Busy. `serve`: accept (and close) the
    connections of refused processes in a thread, for a holder that lives long (the
    daemon), so that they never fill the listen backlog."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # non-inheritable (PEP 446)
    try:
        s.bind(_name())
        s.listen(socket.SOMAXCONN)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise Busy(holder()) from None
        raise
    server = None
    if serve:
        server = threading.Thread(target=_serve, args=(s,), name="netns-lock", daemon=True)
        server.start()
    return NetnsLock(s, server)


def _serve(s: socket.socket) -> None:
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return  # closed: released
        c.close()


def holder() -> Optional[int]:
    """The pid that holds the lock, if it can be asked."""
    for _ in range(20):  # a full backlog (EAGAIN) drains as the holder accepts
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(_name())
            pid, _, _ = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
            return pid or None
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            return None
        finally:
            c.close()
    return None


def _cmdline(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in args if a]
    # `python -m egress_agent.cli run ...` reads better as `egress-agent run ...`
    for i, a in enumerate(args):
        if a in ("egress_agent.cli", "egress_agent") or a.endswith("/egress-agent"):
            args = ["egress-agent"] + args[i + 1:]
            break
    return " ".join(args)[:200] or None
