"""A lean ctnetlink reader: conntrack counts and per-group connection counts.

Two costs, kept apart:

- `read_counts()`: O(1) numbers from /proc (count and max of conntrack
  entries, the kernel's per-CPU statistics summed).
- `dump_groups()`: one IPCTNL_MSG_CT_GET dump over a raw NETLINK_NETFILTER
  socket, filtered BY THE KERNEL to the agent's flows (CTA_MARK/CTA_MARK_MASK
  on names.OURS_FLAG), counted per Group. The common message layouts (IPv4
  and IPv6 TCP/UDP, default zone) are read at fixed offsets; anything else
  (ICMP, zones, other attribute orders) goes through a generic attribute
  walker, so the result never depends on the fast path recognising a layout.

pyroute2 stays for what it does well (routes, rules, links); its conntrack
dump decodes every attribute of every entry into objects and manages 1.5-4k
entries/s, which is unusable for a full table.

Measured with bench/conntrack_read.py on a 2-core VM (kernel 6.18): 1M
entries (900k of them ours, 45k groups) grouped in ~1.9 s with 41 MB peak
RSS, of which ~1.8 s is the kernel producing the dump; `conntrack -L | awk`
takes ~6.3 s.

`dump_entries()` is the slow generic reader (one dict per entry) for tests,
debugging and a translation log.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import mmap
import os
import queue
import re
import select
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from . import names

# --- netlink / ctnetlink constants (linux/netlink.h, linux/netfilter/nfnetlink*.h) --
AF_NETLINK = socket.AF_NETLINK if hasattr(socket, "AF_NETLINK") else 16
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CT_NEW = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_ZONE = 18
CTA_MARK_MASK = 21
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
# Protocols whose tuple carries CTA_PROTO_SRC_PORT/DST_PORT: tcp, udp, dccp, sctp, udplite.
PORT_PROTOCOLS = frozenset((6, 17, 33, 132, 136))

PROC_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"
PROC_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
PROC_STAT = "/proc/net/stat/nf_conntrack"
# /proc/net follows the thread group leader's namespace; this one follows the
# calling thread's (which in_netns() switches).
PROC_STAT_THREAD = "/proc/thread-self/net/stat/nf_conntrack"

RECV_BUFFER = 1 << 20        # receive buffer without recvmmsg (a dump chunk is ~32 kB on 6.x)
RECV_SLOT = 256 << 10        # one chunk's slot in a recvmmsg batch (8x what 6.x sends)
SOCKET_RCVBUF = 8 << 20      # SO_RCVBUF(FORCE): room for the kernel to run ahead


class Group(NamedTuple):
    """Connections that share these, counted by `dump_groups()`.

    destination/port: the ORIGINAL tuple's destination address and port (0 for
    protocols without ports); egress_address: the REPLY tuple's destination,
    i.e. the source address the kernel chose by SNAT.
    """

    mark: int
    protocol: int
    destination: str
    port: int
    egress_address: str


class DumpStats:
    """What one dump cost and how it was read (for logs, tests and benchmarks)."""

    __slots__ = ("messages", "fast", "slow", "recvs", "bytes", "enobufs_retries",
                 "kernel_filtered")

    def __init__(self) -> None:
        self.messages = self.fast = self.slow = self.recvs = self.bytes = 0
        self.enobufs_retries = 0
        self.kernel_filtered = False     # the kernel flagged its answer NLM_F_DUMP_FILTERED

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return f"DumpStats({self.as_dict()})"


class DumpInterrupted(OSError):
    """The kernel dropped dump messages (ENOBUFS) twice in a row."""


# --- namespaces ----------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = None


def _setns(fd: int) -> None:
    global _libc
    if hasattr(os, "setns"):                 # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body in network namespace /run/netns/NAME (this thread only), then return.

    Sockets opened inside stay in that namespace after the switch back. None:
    stay where we are.
    """
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join("/run/netns", name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


# --- O(1) numbers ------------------------------------------------------------------------

def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_stats(path: str = PROC_STAT) -> dict[str, int]:
    """The per-CPU lines of /proc/net/stat/nf_conntrack (hex), summed per column.

    `entries` is the same table-wide number on every CPU line, so it is taken
    once, not summed. A missing or unreadable file gives {}.
    """
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError:
        return {}
    header = lines[0].split() if lines else []
    totals = dict.fromkeys(header, 0)
    first = True
    for line in lines[1:]:
        cols = line.split()
        if len(cols) != len(header):
            continue
        for name, value in zip(header, cols):
            try:
                v = int(value, 16)
            except ValueError:
                continue
            if name == "entries":
                if first:
                    totals[name] = v
            else:
                totals[name] += v
        first = False
    return totals


def read_counts(netns: str | None = None) -> dict:
    """{"count", "max", "stats"} in O(1): no dump.

    count is the calling namespace's number of entries (each namespace has its
    own count, checked against the one global nf_conntrack_max); stats are the
    kernel's counters (insert_failed, drop, early_drop, ...) summed over CPUs.
    """
    with in_netns(netns):
        stats = read_stats(PROC_STAT_THREAD if os.path.exists(PROC_STAT_THREAD) else PROC_STAT)
        return {"count": _read_int(PROC_COUNT), "max": _read_int(PROC_MAX), "stats": stats}


# --- the socket and the request -----------------------------------------------------------

def open_socket(netns: str | None = None, rcvbuf: int = SOCKET_RCVBUF) -> socket.socket:
    """A bound NETLINK_NETFILTER socket with a large receive buffer."""
    with in_netns(netns):
        sock = socket.socket(AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)       # SO_RCVBUFFORCE (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # capped by rmem_max
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def dump_request(seq: int, family: int = socket.AF_UNSPEC, mark: int | None = None,
                 mask: int | None = None) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP, optionally filtered by the kernel on the mark."""
    attrs = b""
    if mark is not None:
        attrs += struct.pack("=HH", 8, CTA_MARK) + struct.pack("!I", mark & 0xFFFFFFFF)
        attrs += struct.pack("=HH", 8, CTA_MARK_MASK) + struct.pack(
            "!I", 0xFFFFFFFF if mask is None else mask & 0xFFFFFFFF)
    return struct.pack("=IHHIIBBH", 20 + len(attrs), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
                       family, 0, 0) + attrs


# --- the generic attribute walker (slow path) --------------------------------------------

def _attrs(buf, off: int, end: int) -> dict[int, tuple[int, int]]:
    """{type: (payload start, payload end)} of the attributes in buf[off:end]."""
    out = {}
    unpack = struct.unpack_from
    while off + 4 <= end:
        ln, typ = unpack("=HH", buf, off)
        if ln < 4 or off + ln > end:
            break
        out[typ & NLA_TYPE_MASK] = (off + 4, off + ln)
        off += (ln + 3) & ~3
    return out


def _parse_tuple(buf, start: int, end: int) -> dict:
    """A CTA_TUPLE_* nest: {src, dst (raw bytes), protocol, sport, dport, icmp_*, zone}."""
    t = {"src": None, "dst": None, "protocol": None, "sport": 0, "dport": 0}
    a = _attrs(buf, start, end)
    if CTA_TUPLE_IP in a:
        ip = _attrs(buf, *a[CTA_TUPLE_IP])
        for src_t, dst_t in ((CTA_IP_V4_SRC, CTA_IP_V4_DST), (CTA_IP_V6_SRC, CTA_IP_V6_DST)):
            if src_t in ip:
                t["src"] = bytes(buf[ip[src_t][0]:ip[src_t][1]])
            if dst_t in ip:
                t["dst"] = bytes(buf[ip[dst_t][0]:ip[dst_t][1]])
    if CTA_TUPLE_PROTO in a:
        p = _attrs(buf, *a[CTA_TUPLE_PROTO])
        if CTA_PROTO_NUM in p:
            t["protocol"] = buf[p[CTA_PROTO_NUM][0]]
        if CTA_PROTO_SRC_PORT in p:
            t["sport"] = struct.unpack_from("!H", buf, p[CTA_PROTO_SRC_PORT][0])[0]
        if CTA_PROTO_DST_PORT in p:
            t["dport"] = struct.unpack_from("!H", buf, p[CTA_PROTO_DST_PORT][0])[0]
        for name, (i, t6) in {"icmp_id": (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID),
                              "icmp_type": (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE),
                              "icmp_code": (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE)}.items():
            for at in (i, t6):
                if at in p:
                    s, e = p[at]
                    t[name] = int.from_bytes(buf[s:e], "big")
    if CTA_TUPLE_ZONE in a:
        t["zone"] = struct.unpack_from("!H", buf, a[CTA_TUPLE_ZONE][0])[0]
    return t


def _u32(buf, a: dict, typ: int) -> int | None:
    return struct.unpack_from("!I", buf, a[typ][0])[0] if typ in a else None


def parse_entry(buf, off: int, end: int) -> dict:
    """One IPCTNL_MSG_CT_NEW message at buf[off:end] as a dict (addresses as strings)."""
    family = buf[off + 16]
    a = _attrs(buf, off + 20, end)
    orig = _parse_tuple(buf, *a[CTA_TUPLE_ORIG]) if CTA_TUPLE_ORIG in a else {}
    reply = _parse_tuple(buf, *a[CTA_TUPLE_REPLY]) if CTA_TUPLE_REPLY in a else {}
    for t in (orig, reply):
        for k in ("src", "dst"):
            if t.get(k) is not None:
                t[k] = str(ipaddress.ip_address(t[k]))
    state = None
    if CTA_PROTOINFO in a:
        pi = _attrs(buf, *a[CTA_PROTOINFO])
        if CTA_PROTOINFO_TCP in pi:
            tcp = _attrs(buf, *pi[CTA_PROTOINFO_TCP])
            if CTA_PROTOINFO_TCP_STATE in tcp:
                s = buf[tcp[CTA_PROTOINFO_TCP_STATE][0]]
                state = TCP_STATES[s] if s < len(TCP_STATES) else str(s)
    zone = struct.unpack_from("!H", buf, a[CTA_ZONE][0])[0] if CTA_ZONE in a else 0
    return {"family": family, "protocol": orig.get("protocol"), "orig": orig, "reply": reply,
            "mark": _u32(buf, a, CTA_MARK) or 0, "status": _u32(buf, a, CTA_STATUS),
            "timeout": _u32(buf, a, CTA_TIMEOUT), "id": _u32(buf, a, CTA_ID), "zone": zone,
            "state": state}


def _slow_key(buf, off: int, end: int) -> tuple:
    """(mark, protocol, orig dst bytes, orig dport, reply dst bytes) of any entry message."""
    a = _attrs(buf, off + 20, end)
    orig = _parse_tuple(buf, *a[CTA_TUPLE_ORIG]) if CTA_TUPLE_ORIG in a else {}
    reply = _parse_tuple(buf, *a[CTA_TUPLE_REPLY]) if CTA_TUPLE_REPLY in a else {}
    return (_u32(buf, a, CTA_MARK) or 0, orig.get("protocol") or 0, orig.get("dst") or b"",
            orig.get("dport", 0), reply.get("dst") or b"")


# --- receiving a dump ------------------------------------------------------------------------
#
# Each recvmsg on a dumping netlink socket returns one chunk (one skb, at most
# ~32 kB on kernel 6.x, ~150 entries) and, before returning, makes the kernel
# fill the next one: the dump work happens inside our receive calls. Two
# things keep that cheap from Python: recvmmsg(2) (through ctypes, which
# releases the GIL) takes up to RECV_BATCH chunks per call, and in threaded
# mode a reader thread keeps receiving into the next buffer while the caller
# parses the previous one, so kernel and parser run on two cores.

_NLMSGHDR = struct.Struct("=IHHII")
_I32 = struct.Struct("=i")
RECV_SLACK = 4096            # fixed-offset reads past the last message stay inside the buffer
RECV_BATCH = 64              # chunks per recvmmsg call
RECV_BUFFERS = 3             # batches in flight in threaded mode
POLL_MS = 500


class _MMsg:
    """ctypes binding of recvmmsg(2): struct iovec / msghdr / mmsghdr."""

    def __init__(self) -> None:
        c = ctypes

        class iovec(c.Structure):
            _fields_ = [("iov_base", c.c_void_p), ("iov_len", c.c_size_t)]

        class msghdr(c.Structure):
            _fields_ = [("msg_name", c.c_void_p), ("msg_namelen", c.c_uint32),
                        ("msg_iov", c.POINTER(iovec)), ("msg_iovlen", c.c_size_t),
                        ("msg_control", c.c_void_p), ("msg_controllen", c.c_size_t),
                        ("msg_flags", c.c_int)]

        class mmsghdr(c.Structure):
            _fields_ = [("msg_hdr", msghdr), ("msg_len", c.c_uint)]

        self.iovec, self.mmsghdr = iovec, mmsghdr
        libc = c.CDLL(None, use_errno=True)
        self.recvmmsg = libc.recvmmsg
        self.recvmmsg.argtypes = [c.c_int, c.POINTER(mmsghdr), c.c_uint, c.c_int, c.c_void_p]
        self.recvmmsg.restype = c.c_int


_mmsg: _MMsg | None | bool = None


def _get_mmsg() -> _MMsg | None:
    global _mmsg
    if _mmsg is None:
        try:
            _mmsg = _MMsg()
        except (OSError, AttributeError):
            _mmsg = False
    return _mmsg or None


class _Buffer:
    """Receive slots in one anonymous mapping: RECV_BATCH slots of RECV_SLOT bytes for
    recvmmsg, else one of RECV_BUFFER bytes for recv_into.

    The mapping is virtual until written, so the slots cost only the pages a
    chunk actually fills (~32 kB each).
    """

    def __init__(self, sock: socket.socket, batch: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.mm = _get_mmsg()
        self.batch = batch if self.mm else 1
        self.slot = RECV_SLOT if self.mm else RECV_BUFFER
        self.mem = mmap.mmap(-1, self.batch * self.slot + RECV_SLACK)
        if self.mm:
            base = ctypes.addressof((ctypes.c_char * len(self.mem)).from_buffer(self.mem))
            self._iov = (self.mm.iovec * self.batch)(
                *[self.mm.iovec(base + i * self.slot, self.slot) for i in range(self.batch)])
            self._msgs = (self.mm.mmsghdr * self.batch)()
            for i in range(self.batch):
                self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
                self._msgs[i].msg_hdr.msg_iovlen = 1

    def close(self) -> None:
        if self.mm:
            del self._iov, self._msgs              # release the exported buffer first
        with contextlib.suppress(BufferError):
            self.mem.close()

    def fill(self) -> list[tuple[int, int]]:
        """Receive what is queued without blocking: [(start, end)] per chunk; [] if none.

        MSG_TRUNC makes the kernel report a chunk's real size, so one that did
        not fit is an error instead of silently cut messages.
        """
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        if self.mm:
            k = self.mm.recvmmsg(self.fd, self._msgs, self.batch, flags, None)
            if k < 0:
                e = ctypes.get_errno()
                if e in (errno.EAGAIN, errno.EINTR):
                    return []
                raise OSError(e, f"ctnetlink dump: {os.strerror(e)}")
            sizes = [self._msgs[i].msg_len for i in range(k)]
        else:
            try:
                sizes = [self.sock.recv_into(self.mem, self.slot, flags)]
            except (BlockingIOError, InterruptedError):
                return []
        out = []
        slot = self.slot
        for i, n in enumerate(sizes):
            if n > slot:
                raise OSError(errno.EMSGSIZE, f"ctnetlink dump: a {n}-byte chunk exceeds the "
                                              f"{slot}-byte receive slot")
            out.append((i * slot, i * slot + n))
        return out


def _ends_dump(buf, start: int, end: int, seq: int, pid: int) -> bool:
    """Does this chunk end the dump? NLMSG_DONE is the last message of its chunk;
    a failing dump answers with an NLMSG_ERROR."""
    if end - start >= 16 and _NLMSGHDR.unpack_from(buf, start)[1] == NLMSG_ERROR:
        return True
    if end - start >= 20:
        ln, typ, _flags, s, p = _NLMSGHDR.unpack_from(buf, end - 20)
        return ln == 20 and typ == NLMSG_DONE and s == seq and p == pid
    return False


def _chunks(sock: socket.socket, request: bytes, stats: DumpStats,
            threaded: bool) -> Iterator[tuple[object, list[tuple[int, int]]]]:
    """Send one dump request; yield (buffer, [(start, end), ...]) per batch of chunks.

    A chunk holds whole netlink messages (the kernel never splits one); the
    consumer stops iterating when it has seen NLMSG_DONE. A buffer stays
    valid until the next iteration. threaded: receive in a reader thread,
    RECV_BUFFERS batches ahead of the consumer.
    """
    seq = struct.unpack_from("=I", request, 8)[0]
    pid = sock.getsockname()[0]
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    sock.send(request)

    def receive(b: _Buffer, stop: threading.Event | None) -> list[tuple[int, int]] | None:
        waited = 0
        while True:
            segs = b.fill()
            if segs:
                return segs
            if stop is not None and stop.is_set():
                return None
            if waited >= 30_000:
                raise OSError(errno.ETIMEDOUT, "ctnetlink dump: no answer from the kernel")
            poller.poll(POLL_MS)
            waited += POLL_MS

    if not threaded:
        b = _Buffer(sock, RECV_BATCH)
        try:
            while True:
                segs = receive(b, None)
                stats.recvs += len(segs)
                stats.bytes += sum(e - s for s, e in segs)
                yield b.mem, segs
        finally:
            b.close()
        return

    free: queue.SimpleQueue = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    buffers = [_Buffer(sock, RECV_BATCH) for _ in range(RECV_BUFFERS)]
    for b in buffers:
        free.put(b)
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                try:
                    b = free.get(timeout=POLL_MS / 1000)
                except queue.Empty:
                    continue
                segs = receive(b, stop)
                if segs is None:
                    return
                full.put((b, segs))
                s, e = segs[-1]
                if _ends_dump(b.mem, s, e, seq, pid):
                    break
            full.put((None, None))       # the end, if the consumer asks for more
        except BaseException as exc:     # handed to the consumer
            full.put((None, exc))

    t = threading.Thread(target=reader, name="ctnetlink-dump", daemon=True)
    t.start()
    try:
        while True:
            b, segs = full.get()
            if b is None:
                if segs is None:
                    return
                raise segs
            stats.recvs += len(segs)
            stats.bytes += sum(e - s for s, e in segs)
            yield b.mem, segs
            free.put(b)
    finally:
        stop.set()
        t.join(2 * POLL_MS / 1000 + 1)
        if not t.is_alive():
            for b in buffers:
                b.close()


def _control(buf, off: int, ln: int, typ: int) -> bool:
    """Handle a non-entry message: True at NLMSG_DONE, raise on errors."""
    if typ == NLMSG_DONE:
        if ln >= 20:
            err = _I32.unpack_from(buf, off + 16)[0]
            if err < 0:
                raise OSError(-err, f"ctnetlink dump ended with: {os.strerror(-err)}")
        return True
    if typ == NLMSG_ERROR:
        err = -_I32.unpack_from(buf, off + 16)[0] if ln >= 20 else errno.EPROTO
        if err:
            raise OSError(err, f"ctnetlink dump: {os.strerror(err)}")
        return False
    if typ == NLMSG_OVERRUN:
        raise OSError(errno.ENOBUFS, "ctnetlink dump: overrun")
    return False


# --- fixed layouts -----------------------------------------------------------------------------
#
# What kernel 6.x sends for an IPv4 TCP/UDP entry in the default zone (byte
# offsets; every attribute header is 4 bytes, payloads padded to 4):
#
#   0 nlmsghdr  16 nfgenmsg (family)  20 CTA_TUPLE_ORIG(52)  24 CTA_TUPLE_IP(20)
#  28 V4_SRC    32 src   36 V4_DST   40 dst   44 CTA_TUPLE_PROTO(28)  48 PROTO_NUM
#  52 proto     56 SRC_PORT  60 sport  64 DST_PORT  68 dport
#  72 CTA_TUPLE_REPLY(52) ... 92 reply dst ... 120 reply dport
# 124 CTA_STATUS  128 status  132 CTA_MARK  136 mark  140 CTA_ID, CTA_USE,
#     CTA_TIMEOUT, CTA_PROTOINFO (tcp), ...
#
# The hot loop unpacks, with one precompiled Struct, a tuple that is itself
# the dictionary key: (message length and type, family, length of CTA_TUPLE_ORIG, and
# three byte strings [dst attr .. sport header], [dport attr .. reply dport
# header], [status attr .. mark]) - everything from the original
# destination to the mark except the fields that differ between connections
# of one group (source address and port, reply/SNAT port). The strings hold
# every attribute header in between, so the layout is checked once per
# distinct key, the first time it is seen, not once per message; a key whose
# headers are not the expected ones never enters the dictionary and each of
# its messages goes through the generic walker instead. IPv6 is the same
# with 16-byte addresses.


def _hdr(length: int, atype: int) -> bytes:
    return struct.pack("=HH", length, atype)


# key = (length, type, family, CTA_TUPLE_ORIG length, P1 string, P2 string, P3 string)
P1, P2, P3 = 4, 5, 6


class _Layout:
    """One fixed message layout: its Struct and how to check and decode a key."""

    def __init__(self, family: int, alen: int):
        a = 4 + alen                                # an address attribute, padded
        ip = 4 + 2 * a                              # CTA_TUPLE_IP nest
        proto = 4 + 3 * 8                           # CTA_TUPLE_PROTO: num, sport, dport
        tup = 4 + ip + proto                        # CTA_TUPLE_ORIG / REPLY
        o_orig = 20
        o_dst = o_orig + 8 + a + 4                  # payload offsets
        o_proto = o_orig + 4 + ip                   # header offsets
        o_sport = o_proto + 4 + 8 + 4             # source port payload
        o_dport = o_sport + 8
        o_reply = o_orig + tup
        o_rdst = o_reply + 8 + a + 4
        o_rdport = o_reply + 4 + ip + 4 + 8 + 8 + 4
        o_status = o_reply + tup
        o_mark = o_status + 8
        self.family, self.tup, self.alen = family, tup, alen
        self.min_len = o_mark + 8
        p1, p2, p3 = o_dst - 4, o_sport + 4, o_rdport + 4
        self.struct = struct.Struct(f"=IH10xB3xH{p1 - 22}x{o_sport - p1}s4x{o_rdport - p2}s4x"
                                    f"{self.min_len - p3}s")
        src_t, dst_t = ((CTA_IP_V4_SRC, CTA_IP_V4_DST) if alen == 4
                        else (CTA_IP_V6_SRC, CTA_IP_V6_DST))
        # (key index, offset in that string, expected bytes)
        self.checks = [
            (P1, 0, _hdr(a, dst_t)),
            (P1, o_proto - p1, _hdr(proto, NLA_F_NESTED | CTA_TUPLE_PROTO) + _hdr(5, CTA_PROTO_NUM)),
            (P1, o_proto + 9 - p1, b"\0\0\0" + _hdr(6, CTA_PROTO_SRC_PORT)),
            (P2, 0, _hdr(6, CTA_PROTO_DST_PORT)),
            (P2, o_reply - p2, _hdr(tup, NLA_F_NESTED | CTA_TUPLE_REPLY)
             + _hdr(ip, NLA_F_NESTED | CTA_TUPLE_IP) + _hdr(a, src_t)),
            (P2, o_rdst - 4 - p2, _hdr(a, dst_t)),
            (P2, o_reply + 4 + ip - p2, _hdr(proto, NLA_F_NESTED | CTA_TUPLE_PROTO)
             + _hdr(5, CTA_PROTO_NUM)),
            (P2, o_reply + 4 + ip + 9 - p2, b"\0\0\0" + _hdr(6, CTA_PROTO_SRC_PORT)),
            (P2, o_rdport - 4 - p2, _hdr(6, CTA_PROTO_DST_PORT)),
            (P3, 0, _hdr(8, CTA_STATUS)),
            (P3, o_mark - p3, _hdr(8, CTA_MARK)),
        ]
        # One regex per key string: the expected bytes at their offsets, any byte
        # elsewhere. Checking a new key is then three C calls.
        sizes = {P1: o_sport - p1, P2: o_rdport - p2, P3: self.min_len - p3}
        self.patterns = []
        for part, size in sizes.items():
            fixed = sorted((off, want) for q, off, want in self.checks if q == part)
            pat, pos = b"", 0
            for off, want in fixed:
                pat += b"." * (off - pos) + re.escape(want)
                pos = off + len(want)
            self.patterns.append((part, re.compile(pat + b"." * (size - pos), re.DOTALL)))
        # the values of a valid key
        self.proto_at = (P1, o_proto + 8 - p1)
        self.rproto_at = (P2, o_reply + 4 + ip + 8 - p2)
        self.d1 = struct.Struct(f"={o_dst - p1}x{alen}s{o_proto + 8 - o_dst - alen}xB")
        self.d2 = struct.Struct(f"!{o_dport - p2}xH{o_rdst - o_dport - 2}x{alen}s")
        self.d3 = struct.Struct(f"!{o_mark + 4 - p3}xI")

    def valid(self, key: tuple) -> bool:
        if (key[0] < self.min_len or key[1] != CT_NEW or key[2] != self.family
                or key[3] != self.tup):
            return False
        for part, pat in self.patterns:
            if pat.fullmatch(key[part]) is None:
                return False
        s, o = self.proto_at
        r, ro = self.rproto_at
        return key[s][o] in PORT_PROTOCOLS and key[s][o] == key[r][ro]

    def decode(self, key: tuple) -> tuple[int, int, bytes, int, bytes]:
        """(mark, protocol, orig dst, orig dport, reply dst) of a valid key."""
        dst, proto = self.d1.unpack_from(key[P1])
        dport, rdst = self.d2.unpack_from(key[P2])
        return self.d3.unpack_from(key[P3])[0], proto, dst, dport, rdst


V4 = _Layout(socket.AF_INET, 4)
V6 = _Layout(socket.AF_INET6, 16)


class _Counts:
    """Per-dump state of dump_groups() outside the hot loop.

    counts[layout] maps raw keys of that layout to counts; the primary layout
    (IPv4 unless the dump is IPv6-only) is the one the hot loop tries first.
    """

    def __init__(self, primary: _Layout) -> None:
        self.primary = primary
        self.counts: dict[_Layout, dict[tuple, int]] = {V4: {}, V6: {}}
        self.slow: dict[tuple, int] = {}
        self.filtered = False

    def miss(self, buf, off: int, n: int, key: tuple) -> int:
        """A message whose primary-layout key is not (yet) known: count it, return its
        aligned length, or -1 at NLMSG_DONE."""
        ln, typ, flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if ln < 16 or off + ln > n:
            raise OSError(errno.EPROTO, f"ctnetlink dump: malformed message at {off} ({ln} bytes)")
        if typ != CT_NEW:
            return -1 if _control(buf, off, ln, typ) else (ln + 3) & ~3
        if flags & 0x20:                             # NLM_F_DUMP_FILTERED
            self.filtered = True
        family = buf[off + 16]
        layout = V4 if family == socket.AF_INET else V6 if family == socket.AF_INET6 else None
        if layout is None:
            self._slow(buf, off, ln)
        elif layout is self.primary:
            if layout.valid(key):
                self.counts[layout][key] = 1
            else:
                self._slow(buf, off, ln)
        else:
            k = layout.struct.unpack_from(buf, off)
            counts = self.counts[layout]
            c = counts.get(k)
            if c is not None:
                counts[k] = c + 1
            elif layout.valid(k):
                counts[k] = 1
            else:
                self._slow(buf, off, ln)
        return (ln + 3) & ~3

    def _slow(self, buf, off: int, ln: int) -> None:
        k = _slow_key(buf, off, off + ln)
        self.slow[k] = self.slow.get(k, 0) + 1


_ADDR_CACHE: dict[bytes, str] = {}


def _addr(raw: bytes) -> str:
    s = _ADDR_CACHE.get(raw)
    if s is None:
        if len(_ADDR_CACHE) > 65536:
            _ADDR_CACHE.clear()
        s = _ADDR_CACHE[raw] = (socket.inet_ntop(socket.AF_INET, raw) if len(raw) == 4
                                else socket.inet_ntop(socket.AF_INET6, raw) if len(raw) == 16
                                else raw.hex())
    return s


def _dump_once(netns: str | None, request: bytes, stats: DumpStats, threaded: bool,
               primary: _Layout) -> _Counts:
    st = _Counts(primary)
    sock = open_socket(netns)
    chunks = _chunks(sock, request, stats, threaded)
    try:
        unpack = primary.struct.unpack_from
        fast = st.counts[primary]
        get = fast.get
        miss = st.miss
        done = False
        for buf, segments in chunks:
            for off, n in segments:
                # The hot loop: one unpack, one dict lookup and store per message.
                while off < n:
                    key = unpack(buf, off)
                    c = get(key)
                    if c is not None:
                        fast[key] = c + 1
                        off += key[0]
                    else:
                        step = miss(buf, off, n, key)
                        if step < 0:
                            done = True
                            break
                        off += step
            if done:
                break
    finally:
        chunks.close()                               # stops the reader thread first
        sock.close()
    return st


def dump_groups(mark: int | None = names.OURS_FLAG, mask: int | None = names.OURS_FLAG,
                family: int = socket.AF_UNSPEC, *, netns: str | None = None,
                stats: DumpStats | None = None, threaded: bool = True) -> dict[Group, int]:
    """Count conntrack entries per Group, from one kernel-filtered ctnetlink dump.

    Only entries with (ctmark & mask) == (mark & mask) are dumped (the kernel
    filters with CTA_MARK/CTA_MARK_MASK; the result is filtered again here, so
    an old kernel that ignores the filter gives the same answer, only slower).
    mark=None dumps everything. family: AF_UNSPEC, AF_INET or AF_INET6.
    Protocols without ports (ICMP, ...) count with port 0. netns: read that
    named namespace's table instead of the caller's. An ENOBUFS from the socket
    restarts the dump once (stats.enobufs_retries) and raises DumpInterrupted
    the second time.
    """
    stats = stats if stats is not None else DumpStats()
    want = None if mark is None else (mark & (0xFFFFFFFF if mask is None else mask))
    fmask = 0xFFFFFFFF if mask is None else mask
    seq = int.from_bytes(os.urandom(4), "little") or 1
    request = dump_request(seq, family, want, None if mark is None else fmask)
    primary = V6 if family == socket.AF_INET6 else V4
    for attempt in (0, 1):
        try:
            st = _dump_once(netns, request, stats, threaded, primary)
            break
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            if attempt:
                raise DumpInterrupted(errno.ENOBUFS, "ctnetlink dump lost messages twice "
                                                     "(ENOBUFS); not counting a partial table")
            stats.enobufs_retries += 1
            _log_warning("conntrack dump lost messages (ENOBUFS), dumping again")
    stats.kernel_filtered = st.filtered
    # Raw keys to Groups, addresses to strings once per group. popitem() frees
    # the raw keys while the result grows, which keeps the peak lower.
    out: dict[Group, int] = {}

    def add(m: int, proto: int, dst: bytes, dport: int, rdst: bytes, c: int) -> None:
        if want is not None and (m & fmask) != want:
            return                                   # the kernel did not filter
        g = Group(m, proto, _addr(dst) if dst else "", dport, _addr(rdst) if rdst else "")
        out[g] = out.get(g, 0) + c

    for layout, counts in st.counts.items():
        decode = layout.decode
        while counts:
            key, c = counts.popitem()
            add(*decode(key), c)
            stats.fast += c
    while st.slow:
        key, c = st.slow.popitem()
        add(*key, c)
        stats.slow += c
    stats.messages = stats.fast + stats.slow
    return out


LEASE_BITS = names.WID_MASK | names.EID_MASK


def lease_addresses(groups: Iterable[Group]) -> frozenset[tuple[int, str]]:
    """(lease mark, egress address) of the groups: the leases whose blocks carry them.

    The egress address is the REPLY tuple's destination, i.e. the source the
    origin sees; the conntrack mark names the lease that translated it."""
    return frozenset((g.mark & LEASE_BITS, g.egress_address) for g in groups)


def lease_filter(marks: Iterable[int]) -> tuple[int, int]:
    """(mark, mask) for a kernel-filtered dump that keeps every connection of
    these leases and as few others as one filter can: the agent's flag plus
    the lease bits on which all of them agree (one lease: its exact mark; the
    blocks of one drained IP: that egress id)."""
    marks = list(marks)
    mask = LEASE_BITS
    for m in marks[1:]:
        mask &= ~(m ^ marks[0])
    first = marks[0] if marks else 0
    mask = (mask if marks else 0) | names.OURS_FLAG
    return (first | names.OURS_FLAG) & mask, mask


def live_leases(marks: Iterable[int] = (), *, netns: str | None = None,
                stats: DumpStats | None = None) -> frozenset[tuple[int, str]]:
    """Which of these leases (released ones included) still have connections.

    One dump, filtered by the kernel (lease_filter); with no marks, every
    lease the agent's flows carry. See alloc.drain."""
    mark, mask = lease_filter(marks)
    return lease_addresses(dump_groups(mark, mask, netns=netns, stats=stats))


def _log_warning(msg: str) -> None:
    try:
        from . import log
        log.get().warning(msg)
    except Exception:                                # logging must never break a dump
        pass


def dump_entries(mark: int | None = None, mask: int | None = None,
                 family: int = socket.AF_UNSPEC, *, netns: str | None = None) -> Iterator[dict]:
    """Every entry (optionally kernel-filtered by mark/mask) as a dict: generic and slow.

    Keys: family, protocol, orig/reply ({src, dst, protocol, sport, dport,
    icmp_* for ICMP, zone}), mark, status, timeout, id, zone, state (TCP).
    """
    stats = DumpStats()
    fmask = 0xFFFFFFFF if mask is None else mask
    want = None if mark is None else mark & fmask
    seq = int.from_bytes(os.urandom(4), "little") or 1
    request = dump_request(seq, family, want, None if mark is None else fmask)
    sock = open_socket(netns)
    chunks = _chunks(sock, request, stats, threaded=False)
    try:
        for buf, segments in chunks:
            for off, n in segments:
                while off + 16 <= n:
                    ln, typ = struct.unpack_from("=IH", buf, off)
                    if ln < 16 or off + ln > n:
                        raise OSError(errno.EPROTO, "ctnetlink dump: malformed message")
                    if typ == CT_NEW:
                        e = parse_entry(buf, off, off + ln)
                        if want is None or (e["mark"] & fmask) == want:   # old kernels
                            stats.messages += 1
                            yield e
                    elif _control(buf, off, ln, typ):
                        return
                    off += (ln + 3) & ~3
    finally:
        chunks.close()
        sock.close()
