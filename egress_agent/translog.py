"""The translation log: which workload used which outside address:port, when.

For abuse reports ("who sent this from 203.0.113.10:1503 at 10:02?") beyond
what the allocation history answers (`who`: which workload held the block).
A listener on conntrack's NEW and DESTROY events writes one JSON line per
event of the agent's own connections (conntrack mark bit 30):

  {"event": "start", "at": "...", "id": 123, "protocol": "tcp", "workload": "m42",
   "inside": "10.0.1.2:43122", "outside": "203.0.113.10:1503", "destination": "192.0.2.10:8080"}

"end" lines carry the same id. Files rotate by size (RotatingFileHandler).
Events the kernel could not deliver (socket buffer overrun) are counted and
logged, never silently lost.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import socket
import struct
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Optional

from . import names
from .argtypes import endpoint_text
from .conntrack import AF_NETLINK, NETLINK_NETFILTER, parse_entry

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
MSG_NEW = (1 << 8) | 0     # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
MSG_DELETE = (1 << 8) | 2  # ... | IPCTNL_MSG_CT_DELETE (a DESTROY event)
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}


def _endpoint(addr: Optional[str], port: Optional[int]) -> Optional[str]:
    if addr is None:
        return None
    return endpoint_text(addr, port) if port else addr


def line(kind: str, e: dict, workload_of: Callable[[int], Optional[str]]) -> dict:
    """One log record from a parsed conntrack event (see conntrack.parse_entry)."""
    o, r = e["orig"], e["reply"]
    return {"event": kind, "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "id": e["id"], "protocol": PROTOCOLS.get(e["protocol"], str(e["protocol"])),
            "workload": workload_of(e["mark"] & names.WID_MASK),
            "inside": _endpoint(o.get("src"), o.get("sport")),
            # the reply goes to the translated source: that is the outside address
            "outside": _endpoint(r.get("dst"), r.get("dport")),
            "destination": _endpoint(o.get("dst"), o.get("dport"))}


class TranslationLog:
    def __init__(self, path: str, workload_of: Callable[[int], Optional[str]],
                 max_bytes: int = 64 << 20, backups: int = 5):
        self.workload_of = workload_of
        self.logger = logging.Logger("egress-agent.translations")
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes,
                                                       backupCount=backups)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        self.lost = 0
        self.written = 0

    def open(self) -> socket.socket:
        sock = socket.socket(AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        except OSError:
            pass
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        sock.bind((0, groups))
        sock.settimeout(1.0)
        return sock

    def handle(self, buf: bytes) -> None:
        off = 0
        while off + 16 <= len(buf):
            length, mtype = struct.unpack_from("=IH", buf, off)
            if length < 16:
                break
            if mtype in (MSG_NEW, MSG_DELETE):
                e = parse_entry(buf, off, off + length)
                if e["mark"] & names.OURS_FLAG:
                    rec = line("start" if mtype == MSG_NEW else "end", e, self.workload_of)
                    self.logger.info(json.dumps(rec))
                    self.written += 1
            off += (length + 3) & ~3

    def run(self, stopping: threading.Event, warn: Callable[[str, int], None]) -> None:
        sock = self.open()
        try:
            while not stopping.is_set():
                try:
                    buf = sock.recv(1 << 20)
                except socket.timeout:
                    continue
                except OSError as e:
                    if e.errno == 105:  # ENOBUFS: the kernel dropped events
                        self.lost += 1
                        warn("translation log: the kernel dropped conntrack events "
                             "(socket buffer overrun)", self.lost)
                        continue
                    raise
                self.handle(buf)
        finally:
            sock.close()


def workload_lookup(load_alloc: Callable[[], object], refresh: float = 5.0):
    """wid -> workload id, from the allocation store, re-read at most every `refresh` s."""
    cache: dict = {"at": 0.0, "by_wid": {}}

    def lookup(wid: int) -> Optional[str]:
        now = time.monotonic()
        stale = now - cache["at"]
        if stale > refresh or (wid not in cache["by_wid"] and stale > 0.5):
            alloc = load_alloc()
            cache["by_wid"] = alloc.workloads_by_wid()
            cache["at"] = now
        return cache["by_wid"].get(wid)
    return lookup
