"""Create conntrack entries fast over ctnetlink: a helper for tests and benchmarks.

Not part of the agent, so it lives beside the kernel tests' other helpers
(tests import it as `conntrack_insert`, bench/ puts tests/integration on
sys.path as it does for daemon_helpers): it writes the global
`nf_conntrack_max` (`raised_conntrack_max`), which the product must never do.

Everything here must run inside a network namespace that the caller created
for the purpose (`scratch_netns()` makes one and always deletes it);
`insert()` refuses to run in the namespace it was imported in unless told
otherwise, so a test can never fill the host's table.

Speed: IPCTNL_MSG_CT_NEW messages are packed with one precompiled Struct per
layout into ~200 kB buffers and sent with one sendmsg each, without
NLM_F_ACK, so the kernel answers only failures; those are drained without
blocking after every send and counted at the end. 1M entries take a few
seconds, most of it in the kernel.

    with scratch_netns() as ns, raised_conntrack_max(1_200_000):
        insert(generate(100_000), netns=ns)
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from egress_agent import names
from egress_agent.conntrack import (AF_NETLINK, CTA_MARK, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
                                    CTA_PROTOINFO_TCP_STATE, CTA_STATUS, CTA_TIMEOUT, CTA_TUPLE_IP,
                                    CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, CTA_ZONE, CT_NEW,
                                    NETLINK_NETFILTER, NLA_F_NESTED, NLM_F_CREATE, NLM_F_EXCL,
                                    NLM_F_REQUEST, NLMSG_ERROR, SOL_NETLINK, NETLINK_EXT_ACK, in_netns,
                                    read_counts)

SYSCTL_DIR = "/proc/sys/net/netfilter"

# status bits (linux/netfilter/nf_conntrack_common.h)
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_SRC_NAT_DONE = 1 << 7
DEFAULT_STATUS = IPS_CONFIRMED | IPS_ASSURED | IPS_SEEN_REPLY   # NAT bits are not settable
TCP_ESTABLISHED = 3


class Entry(NamedTuple):
    """One connection: original tuple src->dst, reply tuple dst->egress (SNAT)."""

    protocol: int          # 6 tcp, 17 udp (fast path); 1 icmp, 58 icmpv6 (echo; sport = id)
    source: str            # workload address (original source)
    sport: int
    destination: str
    dport: int             # ignored for icmp
    egress_address: str    # reply destination: the SNAT address
    egress_port: int       # reply destination port: the SNAT port from the block (icmp: id)
    mark: int = 0
    timeout: int = 600
    zone: int = 0          # conntrack zone (CTA_ZONE); 0 is the default zone


# --- message building ------------------------------------------------------------

def _attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n & 3)


def _nest(atype: int, *parts: bytes) -> bytes:
    return _attr(atype | NLA_F_NESTED, b"".join(parts))


def _tuple(atype: int, family: int, src: bytes, dst: bytes, proto: int, sport: int,
           dport: int, icmp_type: int = 8) -> bytes:
    a_src, a_dst = (1, 2) if family == socket.AF_INET else (3, 4)
    if proto in (1, 58):   # CTA_PROTO_ICMP_ID/TYPE/CODE (4,5,6) or the ICMPV6_ ones (7,8,9)
        b = 4 if proto == 1 else 7
        p = (_attr(b, struct.pack("!H", sport)), _attr(b + 1, bytes([icmp_type])),
             _attr(b + 2, b"\0"))
    else:
        p = (_attr(2, struct.pack("!H", sport)), _attr(3, struct.pack("!H", dport)))
    return _nest(atype,
                 _nest(CTA_TUPLE_IP, _attr(a_src, src), _attr(a_dst, dst)),
                 _nest(CTA_TUPLE_PROTO, _attr(1, bytes([proto])), *p))


def build_new(e: Entry, seq: int = 0, status: int = DEFAULT_STATUS,
              flags: int = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL) -> bytes:
    """One IPCTNL_MSG_CT_NEW message for `e` (generic, any family/protocol)."""
    src, dst = ipaddress.ip_address(e.source), ipaddress.ip_address(e.destination)
    egr = ipaddress.ip_address(e.egress_address)
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    echo, reply = (8, 0) if e.protocol == 1 else (128, 129)
    body = (_tuple(CTA_TUPLE_ORIG, family, src.packed, dst.packed, e.protocol, e.sport, e.dport,
                   echo)
            + _tuple(CTA_TUPLE_REPLY, family, dst.packed, egr.packed, e.protocol,
                     e.egress_port if e.protocol in (1, 58) else e.dport, e.egress_port, reply)
            + (_attr(CTA_ZONE, struct.pack("!H", e.zone)) if e.zone else b"")
            + _attr(CTA_STATUS, struct.pack("!I", status))
            + _attr(CTA_TIMEOUT, struct.pack("!I", e.timeout))
            + _attr(CTA_MARK, struct.pack("!I", e.mark)))
    if e.protocol == socket.IPPROTO_TCP:
        body += _nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_TCP,
                                           _attr(CTA_PROTOINFO_TCP_STATE, bytes([TCP_ESTABLISHED]))))
    return struct.pack("=IHHIIBBH", 16 + 4 + len(body), CT_NEW, flags, seq, 0, family, 0, 0) + body


class _Template:
    """A precompiled Struct for one (family, protocol) layout: pack_into per entry."""

    def __init__(self, family: int, protocol: int, status: int, flags: int):
        alen = 4 if family == socket.AF_INET else 16
        ex = Entry(protocol, "0.0.0.0" if alen == 4 else "::", 0,
                   "0.0.0.0" if alen == 4 else "::", 0, "0.0.0.0" if alen == 4 else "::", 0)
        proto = build_new(ex, 0, status, flags)
        self.size = len(proto)
        # The variable fields, located in the prototype, become struct fields.
        a = f"{alen}s"
        fmt = ["=", "8x", "I", "4x"]              # len/type/flags, seq, pid
        # nfgenmsg(4) orig-hdr(4) ip-hdr(4) src-hdr(4)
        fmt += ["16x", a, "4x", a]                # orig src, orig dst
        fmt += ["16x", "H2x", "4x", "H2x"]        # proto hdr+num, sport, dport (big-endian raw)
        fmt += ["12x", a, "4x", a]                # reply src, reply dst
        fmt += ["16x", "H2x", "4x", "H2x"]        # reply sport, dport
        fmt += ["4x", "4x", "4x", "I", "4x", "I"]  # status, timeout, mark
        # struct pads ("x") would write zeros, so the constant stretches of the
        # prototype become "Ns" fields filled from it.
        out, args, slots, pos = ["="], [], [], 0
        for f in fmt[1:]:
            if f.endswith("x") and f[:-1].isdigit():
                n = int(f[:-1])
                out.append(f"{n}s")
                args.append(proto[pos:pos + n])
                pos += n
            else:
                out.append(f)
                slots.append(len(args))
                args.append(None)
                pos += struct.calcsize("=" + f)
        self.struct = struct.Struct("".join(out))
        assert self.struct.size == pos <= self.size, (self.struct.size, pos, self.size)
        self.args = args
        self.slots = slots
        self.proto = proto

    def pack_into(self, buf: bytearray, off: int, e: Entry, seq: int, src: bytes, dst: bytes,
                  egr: bytes) -> None:
        buf[off:off + self.size] = self.proto
        args = self.args.copy()
        for i, v in zip(self.slots, (seq, src, dst, _be16(e.sport), _be16(e.dport), dst, egr,
                                     _be16(e.dport), _be16(e.egress_port), _be32(e.timeout),
                                     _be32(e.mark))):
            args[i] = v
        self.struct.pack_into(buf, off, *args)


def _be16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def _be32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "big"), "little")


# --- namespaces and sysctls ------------------------------------------------------

@contextlib.contextmanager
def scratch_netns(prefix: str = "eact") -> Iterator[str]:
    """A fresh named network namespace, deleted on exit whatever happens.

    Deleting it also frees its conntrack entries (asynchronously, in the kernel);
    they are flushed first so a large table does not linger.
    """
    name = prefix + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            flush(netns=name)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def read_sysctl(name: str) -> int:
    with open(os.path.join(SYSCTL_DIR, name)) as f:
        return int(f.read().split()[0])


def write_sysctl(name: str, value: int) -> None:
    with open(os.path.join(SYSCTL_DIR, name), "w") as f:
        f.write(str(value))


@contextlib.contextmanager
def raised_conntrack_max(at_least: int, buckets: int | None = None) -> Iterator[int]:
    """Raise the global nf_conntrack_max (and optionally the hash size) for a while.

    nf_conntrack_max can only be written in the initial namespace but the limit
    applies to each namespace's own count, so raising it lets a scratch
    namespace hold `at_least` entries without changing what the host may hold
    beyond that. The old values are restored on exit. Resizing the hash
    (`buckets`) rehashes every namespace's table, so it is off by default.
    """
    old_max = read_sysctl("nf_conntrack_max")
    old_buckets = read_sysctl("nf_conntrack_buckets")
    try:
        if at_least > old_max:
            write_sysctl("nf_conntrack_max", at_least)
        if buckets and buckets != old_buckets:
            write_sysctl("nf_conntrack_buckets", buckets)
        yield max(old_max, at_least)
    finally:
        if read_sysctl("nf_conntrack_max") != old_max:
            write_sysctl("nf_conntrack_max", old_max)
        if read_sysctl("nf_conntrack_buckets") != old_buckets:
            write_sysctl("nf_conntrack_buckets", old_buckets)


# --- inserting -------------------------------------------------------------------

class InsertError(OSError):
    pass


def _drain_errors(sock: socket.socket, errors: dict[int, int], first: list) -> None:
    """Read every pending NLMSG_ERROR without blocking; count them by errno."""
    while True:
        try:
            data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:   # too many errors to keep: count that too
                errors[errno.ENOBUFS] = errors.get(errno.ENOBUFS, 0) + 1
                continue
            raise
        off = 0
        while off + 16 <= len(data):
            ln, typ = struct.unpack_from("=IH", data, off)
            if ln < 16:
                break
            if typ == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, off + 16)[0]
                if err:
                    errors[err] = errors.get(err, 0) + 1
                    if not first:
                        seq = struct.unpack_from("=I", data, off + 16 + 4 + 8)[0]
                        first.append((err, seq))
            off += (ln + 3) & ~3


def insert(entries: Iterable[Entry], *, netns: str | None = None, batch_bytes: int = 200_000,
           status: int = DEFAULT_STATUS, allow_current_netns: bool = False,
           verify: bool = True) -> int:
    """Create every entry in `entries`; return how many were sent.

    Raises InsertError (errno of the first failure) if any was refused, e.g.
    EEXIST for a clash with an existing tuple, or (verify) if the namespace's
    nf_conntrack_count did not grow by exactly that many. Runs in namespace `netns`.
    """
    if netns is None and not allow_current_netns:
        raise ValueError("insert() needs netns= (a scratch namespace), or allow_current_netns=True")
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    before = read_counts(netns)["count"] if verify else None
    templates: dict[tuple[int, int], _Template] = {}
    with in_netns(netns):
        sock = socket.socket(AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        for opt, size in ((33, 1 << 22), (32, 1 << 22)):   # SO_RCVBUFFORCE, SO_SNDBUFFORCE
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        buf = bytearray(batch_bytes + 4096)
        off = 0
        sent = 0
        errors: dict[int, int] = {}
        first: list = []
        addr_cache: dict[str, bytes] = {}

        def packed(a: str) -> bytes:
            b = addr_cache.get(a)
            if b is None:
                b = addr_cache[a] = ipaddress.ip_address(a).packed
                if len(addr_cache) > 100_000:
                    addr_cache.clear()
            return b

        def flush_buf() -> None:
            nonlocal off
            if off:
                sock.sendto(memoryview(buf)[:off], (0, 0))
                off = 0
                _drain_errors(sock, errors, first)

        for e in entries:
            src, dst, egr = packed(e.source), packed(e.destination), packed(e.egress_address)
            family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
            if e.zone or e.protocol not in (6, 17):
                m = build_new(e, sent + 1, status, flags)
                if off + len(m) > batch_bytes:
                    flush_buf()
                sent += 1
                buf[off:off + len(m)] = m
                off += len(m)
                continue
            t = templates.get((family, e.protocol))
            if t is None:
                t = templates[(family, e.protocol)] = _Template(family, e.protocol, status, flags)
            if off + t.size > batch_bytes:
                flush_buf()
            sent += 1
            t.pack_into(buf, off, e, sent, src, dst, egr)
            off += t.size
        flush_buf()
        # nfnetlink handles a sendmsg synchronously: every error of every batch
        # is queued on this socket by the time the last send returned.
    finally:
        sock.close()
    if errors:
        err, seq = first[0] if first else (next(iter(errors)), 0)
        detail = ", ".join(f"{errno.errorcode.get(k, k)}x{v}" for k, v in sorted(errors.items()))
        raise InsertError(err, f"{sum(errors.values())} of {sent} entries refused ({detail}); "
                               f"first at message {seq}")
    if verify:
        after = read_counts(netns)["count"]
        if before is not None and after is not None and after - before != sent:
            raise InsertError(errno.EIO, f"sent {sent} entries but the namespace's count went "
                                         f"from {before} to {after}")
    return sent


def flush(netns: str) -> None:
    """Delete every conntrack entry of namespace `netns` (IPCTNL_MSG_CT_DELETE, no tuple)."""
    with in_netns(netns):
        sock = socket.socket(AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(60)
        sock.sendto(struct.pack("=IHHIIBBH", 20, (1 << 8) | 2, NLM_F_REQUEST | 4, 1, 0,
                                socket.AF_UNSPEC, 0, 0), (0, 0))
        data = sock.recv(65536)
        err = -struct.unpack_from("=i", data, 16)[0]
        if err:
            raise OSError(err, os.strerror(err))
    finally:
        sock.close()


# --- generated workloads -----------------------------------------------------------

def generate(n: int, workloads: int = 1000, destinations: int = 50, egress_ips: int = 10,
             ours_share: float = 0.9, udp_share: float = 0.05, ipv6_share: float = 0.0,
             timeout: int = 600) -> Iterator[Entry]:
    """`n` distinct SNAT'd connections spread over workloads and destinations.

    Workload w (1-based) has source 10.x.y.z (fd00::w for IPv6), egress address
    192.0.2.(1+w%egress_ips) (2001:db8::...) and a port block of 64 ports at
    1024 + 64*(w // egress_ips); destinations are 203.0.113.d / 198.51.100.d port 443
    (TCP) or 53 (UDP). Entry i is "ours" (OURS_FLAG in the mark) unless
    i % round(1/(1-ours_share)) == 1.
    """
    step_not_ours = round(1 / (1 - ours_share)) if ours_share < 1 else 0
    step_udp = round(1 / udp_share) if udp_share > 0 else 0
    step_v6 = round(1 / ipv6_share) if ipv6_share > 0 else 0
    dests4 = [f"{203 if d % 2 == 0 else 198}.{0 if d % 2 == 0 else 51}."
              f"{113 if d % 2 == 0 else 100}.{1 + d // 2}" for d in range(destinations)]
    dests6 = [f"2001:db8:d::{d + 1:x}" for d in range(destinations)]
    block = 64
    for i in range(n):
        w = i % workloads
        k = i // workloads           # k-th connection of workload w
        d = k % destinations
        slot = k // destinations     # connections of w to d so far: the port in the block
        if slot >= block:
            raise ValueError("too many connections per workload and destination for the blocks; "
                             "raise workloads or destinations")
        wid = w + 1
        eid = 1 + w % egress_ips
        mark = names.lease_mark(wid, eid)
        if not (step_not_ours and i % step_not_ours == 1):
            mark |= names.OURS_FLAG
        proto = 17 if step_udp and i % step_udp == 3 else 6
        v6 = bool(step_v6 and i % step_v6 == 5)
        if v6:
            src = f"fd00::{wid:x}"
            dst = dests6[d]
            egr = f"2001:db8:e::{eid:x}"
        else:
            src = f"10.{wid >> 16 & 255}.{wid >> 8 & 255}.{wid & 255}"
            dst = dests4[d]
            egr = f"192.0.2.{eid}"
        sport = 10000 + slot
        port = 1024 + block * (w // egress_ips) + slot
        yield Entry(proto, src, sport, dst, 53 if proto == 17 else 443, egr, port, mark, timeout)
