"""Hear foreign changes to what the agent owns, as the kernel announces them.

Two netlink sockets, read by one thread:
- NETLINK_NETFILTER, group NFNLGRP_NFTABLES: every nftables commit is announced
  object by object (NEWTABLE, DELRULE, NEWSETELEM, ...; each names its table in
  attribute 1) and closed by one NFT_MSG_NEWGEN carrying NFTA_GEN_PROC_PID, the
  thread that committed it. A generation that touched `table inet
  egress_agent` and was committed by another process is drift: `nft flush
  ruleset`, `nft delete table`, a flushed chain or map, a deleted rule.
- NETLINK_ROUTE, the IPv4/IPv6 rule and route groups: an ip rule or a route in
  the agent's reserved priorities or tables (names.py) was added or deleted.
  A notification carries the port id of the socket that asked for the change:
  the agent's own sockets (found in /proc/self/net/netlink by the inodes of
  its file descriptors) are ignored. And the address groups: a
  host address added or deleted inside a managed_sources prefix changes the
  guard's exemptions (names.py), so it is checked like a rule.
Each finding calls `on_drift(kind, reason)`, kind "nft" or "routes"; the
daemon then syncs, reading that part of the kernel, naming what differs and
repairing it in one batch.

A full receive buffer loses events (ENOBUFS): that is kind "lost", and the
daemon runs a full sync that reads everything afresh; the thread goes on.

The parsing is pure (bytes in, facts out) and tested on captured messages;
raw sockets instead of pyroute2's NFTSocket, which (0.9.x) parses every set
element of every commit into objects, the agent's own large batches included.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from . import names

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4

# NFT_MSG_* (linux/netfilter/nf_tables.h)
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_TABLE_NAME = 1  # and NFTA_{CHAIN,RULE,SET,SET_ELEM_LIST,OBJ,FLOWTABLE}_TABLE: all 1
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3

# rtnetlink
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
RTA_TABLE = FRA_TABLE = 15
FRA_PRIORITY = 6
RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x40, 0x400
RTMGRP_IPV4_RULE, RTMGRP_IPV6_RULE = 0x80, 0x40000

RCVBUF = 8 << 20  # one full replace of a large table announces ~100k elements

_NLMSGHDR = struct.Struct("=IHHII")


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(nlmsg_type, payload) of each netlink message in one datagram."""
    for mtype, payload, _ in messages_from(data):
        yield mtype, payload


def messages_from(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(nlmsg_type, payload, nlmsg_pid): the pid is the port id of the socket
    whose request caused a notification (0: the kernel's own doing)."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            return  # truncated: the caller treats a short datagram as lost events
        yield mtype, data[off + _NLMSGHDR.size:off + length], pid
        off += (length + 3) & ~3


def netlink_socket(proto: int) -> socket.socket:
    """A raw netlink socket with a receive buffer for storms (ENOBUFS still
    happens under one; it then costs one full resync)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE: past rmem_max (CAP_NET_ADMIN)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return s


def generation_socket() -> socket.socket:
    """A socket for generation(); keep it: closing a netlink socket costs ~6 ms."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    s.settimeout(5)
    return s


def generation(s: Optional[socket.socket] = None) -> int:
    """The nftables generation now (NFT_MSG_GETGEN): every commit, to any table,
    increments it, so an unchanged number means nothing in nftables changed."""
    if s is None:
        with generation_socket() as own:
            return generation(own)
    nfgenmsg = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(nfgenmsg),
                          (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, 1, 1, 0) + nfgenmsg)
    for mtype, payload in messages(s.recv(65536)):
        if mtype == NLMSG_ERROR:
            err = -struct.unpack_from("=i", payload)[0]
            raise OSError(err, f"NFT_MSG_GETGEN: {os.strerror(err)}")
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            return struct.unpack(">I", attrs(payload, 4)[NFTA_GEN_ID])[0]
    raise OSError("NFT_MSG_GETGEN: no generation in the answer")


def own_route_ports() -> set[int]:
    """Port ids of this process's NETLINK_ROUTE sockets: /proc/self/net/netlink
    lists every netlink socket of the namespace; ours are those whose inode one
    of our file descriptors points at."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    out = set()
    with open("/proc/self/net/netlink") as f:
        next(f, None)
        for line in f:
            cols = line.split()
            if len(cols) >= 10 and cols[1] == str(NETLINK_ROUTE) and int(cols[9]) in inodes:
                out.add(int(cols[2]))
    return out


def attrs(payload: bytes, start: int) -> dict[int, bytes]:
    """Netlink attributes from `start` on, by type (the nested flag cleared)."""
    out: dict[int, bytes] = {}
    off = start
    while off + 4 <= len(payload):
        length, atype = struct.unpack_from("=HH", payload, off)
        if length < 4:
            break
        out.setdefault(atype & 0x3FFF, payload[off + 4:off + length])
        off += (length + 3) & ~3
    return out


def _cstr(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else b.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Generation:
    """One nftables commit: who committed it and whether it touched our table."""

    gen_id: int
    pid: int
    proc: str
    ours_touched: bool
    what: tuple[str, ...]  # e.g. ("DELTABLE",) or ("DELRULE",) for the log


_MSG_NAMES = {0: "NEWTABLE", 2: "DELTABLE", 3: "NEWCHAIN", 5: "DELCHAIN", 6: "NEWRULE",
              8: "DELRULE", 9: "NEWSET", 11: "DELSET", 12: "NEWSETELEM", 14: "DELSETELEM",
              18: "NEWOBJ", 20: "DELOBJ", 22: "NEWFLOWTABLE", 24: "DELFLOWTABLE",
              26: "DESTROYTABLE", 27: "DESTROYCHAIN", 28: "DESTROYRULE", 29: "DESTROYSET",
              30: "DESTROYSETELEM", 31: "DESTROYOBJ", 32: "DESTROYFLOWTABLE"}


class NftEvents:
    """Folds the messages of NFNLGRP_NFTABLES into generations."""

    def __init__(self) -> None:
        self._touched: set[str] = set()

    def feed(self, mtype: int, payload: bytes) -> Optional[Generation]:
        """A Generation when `mtype` closes one (NEWGEN), else None."""
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES or len(payload) < 4:
            return None
        msg = mtype & 0xFF
        family = payload[0]
        a = attrs(payload, 4)  # after struct nfgenmsg
        if msg == NFT_MSG_NEWGEN:
            pid = struct.unpack(">I", a[NFTA_GEN_PROC_PID])[0] if NFTA_GEN_PROC_PID in a else 0
            gid = struct.unpack(">I", a[NFTA_GEN_ID])[0] if NFTA_GEN_ID in a else 0
            g = Generation(gid, pid, _cstr(a.get(NFTA_GEN_PROC_NAME)) or "",
                           bool(self._touched), tuple(sorted(self._touched)))
            self._touched = set()
            return g
        if family == NFPROTO_INET and _cstr(a.get(NFTA_TABLE_NAME)) == names.TABLE_NAME:
            self._touched.add(_MSG_NAMES.get(msg, str(msg)))
        return None


def route_event_ours(mtype: int, payload: bytes) -> Optional[str]:
    """What an rtnetlink rule/route message changed in our reserved ranges, or None."""
    if mtype not in (RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE) or len(payload) < 12:
        return None
    family = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(payload[0], 0)
    a = attrs(payload, 12)  # after struct rtmsg / struct fib_rule_hdr (both 12 bytes)
    table = struct.unpack("=I", a[RTA_TABLE])[0] if RTA_TABLE in a else payload[4]
    verb = "added" if mtype in (RTM_NEWROUTE, RTM_NEWRULE) else "deleted"
    if mtype in (RTM_NEWRULE, RTM_DELRULE):
        prio = struct.unpack("=I", a[FRA_PRIORITY])[0] if FRA_PRIORITY in a else 0
        if names.is_our_priority(prio) or names.is_our_table(table):
            return f"rule -{family} priority {prio} {verb}"
        return None
    if names.is_our_table(table):
        return f"route -{family} table {table} {verb}"
    return None


def address_event(mtype: int, payload: bytes) -> Optional[tuple[str, str]]:
    """("added"|"deleted", address) of an RTM_NEWADDR/RTM_DELADDR, else None."""
    if mtype not in (RTM_NEWADDR, RTM_DELADDR) or len(payload) < 8:
        return None
    family = payload[0]
    a = attrs(payload, 8)  # after struct ifaddrmsg
    raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return ("added" if mtype == RTM_NEWADDR else "deleted"), socket.inet_ntop(family, raw)


def is_own(pid: int, self_pid: Optional[int] = None) -> bool:
    """Committed by a thread of this process. NFTA_GEN_PROC_PID is the committing
    thread's id (task_pid_nr), not the process id: look it up among our tasks."""
    if pid == (self_pid or os.getpid()):
        return True
    return self_pid is None and pid > 0 and os.path.exists(f"/proc/self/task/{pid}")


class Watch:
    """The thread body: `run(stopping)` until `stopping` is set."""

    def __init__(self, on_drift: Callable[[str, str], None],
                 on_error: Callable[[str], None] = lambda msg: None,
                 guarded: Callable[[], list] = lambda: []) -> None:
        """`guarded()`: the managed_sources prefixes (ipaddress networks) now."""
        self.on_drift = on_drift
        self.on_error = on_error
        self.guarded = guarded
        self.own_ports: set[int] = set()
        self.foreign_ports: set[int] = {0}  # 0: the kernel (a link down drops its routes)

    def is_own_port(self, port: int) -> bool:
        if port in self.foreign_ports:
            return False
        if port not in self.own_ports:
            self.own_ports = own_route_ports()
            if port not in self.own_ports:
                if len(self.foreign_ports) > 4096:  # each `ip` command has its own port
                    self.foreign_ports = {0}
                self.foreign_ports.add(port)
                return False
        return True

    def open(self) -> tuple[socket.socket, socket.socket]:
        nft = netlink_socket(NETLINK_NETFILTER)
        nft.bind((0, 0))
        nft.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        rt = netlink_socket(NETLINK_ROUTE)
        rt.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE
                    | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        return nft, rt

    def run(self, stopping: threading.Event, retries: int = 5) -> None:
        """Until `stopping` is set. A socket error other than ENOBUFS reopens both
        sockets and asks for a full check (events may be lost meanwhile); after
        `retries` such errors in a row, each a second apart, it is raised: the
        daemon cannot hear drift any more and must say so."""
        failures = 0
        while not stopping.is_set():
            try:
                self._listen(stopping)
                return
            except OSError as e:
                failures += 1
                self.on_error(f"drift watch: {type(e).__name__}: {e}; reopening "
                              f"({failures} of {retries})")
                if failures >= retries:
                    raise
                self.on_drift("lost", f"drift watch reopened after {e}")
                stopping.wait(1.0)

    def _listen(self, stopping: threading.Event) -> None:
        nft, rt = self.open()
        events = NftEvents()
        sel = selectors.DefaultSelector()
        sel.register(nft, selectors.EVENT_READ, "nft")
        sel.register(rt, selectors.EVENT_READ, "rt")
        try:
            while not stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    try:
                        data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                    except OSError as e:
                        if e.errno == errno.ENOBUFS:
                            events = NftEvents()  # a generation's messages may be lost
                            self.on_drift("lost", f"{key.data} events lost (ENOBUFS)")
                            continue
                        raise
                    try:
                        self._handle(key.data, data, events)
                    except (struct.error, KeyError, ValueError) as e:  # a message we misread
                        self.on_error(f"{key.data} event unreadable: {type(e).__name__}: {e}")
                        self.on_drift("lost", f"{key.data} event unreadable")
        finally:
            sel.close()
            nft.close()
            rt.close()

    def _handle(self, source: str, data: bytes, events: NftEvents) -> None:
        for mtype, payload, port in messages_from(data):
            if mtype == NLMSG_OVERRUN:
                self.on_drift("lost", f"{source} events lost (overrun)")
            elif source == "nft":
                g = events.feed(mtype, payload)
                if g is not None and g.ours_touched and not is_own(g.pid):
                    self.on_drift("nft", f"nft generation {g.gen_id} by pid {g.pid} ({g.proc}): "
                                  f"{', '.join(g.what)} in table {names.TABLE}")
            elif (addr := address_event(mtype, payload)) is not None:
                ip = ipaddress.ip_address(addr[1])
                if any(ip.version == n.version and ip in n for n in self.guarded()):
                    self.on_drift("routes", f"host address {addr[1]} {addr[0]} in managed_sources")
            else:
                what = route_event_ours(mtype, payload)
                if what and not self.is_own_port(port):
                    self.on_drift("routes", what)
