"""Send packets that conntrack marks INVALID, with any source address: TCP with
no flags or with SYN+FIN, and UDP with a wrong checksum. Raw sockets with the
IP header included (scapy is not installed; struct is enough).

    python3 rawpkt.py KIND SRC DST PORT     KIND: tcp-null | tcp-synfin | udp-badsum

Run inside a namespace (Lab: nsenter prefix); exits 0 once the packet is sent,
3 when the local firewall dropped it on its way out (sendto gets EPERM).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

KINDS = ("tcp-null", "tcp-synfin", "udp-badsum")
SPORT = 40404
SYN, FIN = 0x02, 0x01


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _checksum(src: str, dst: str, proto: int, l4: bytes) -> int:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 4:
        pseudo = a.packed + b.packed + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = a.packed + b.packed + struct.pack("!I3xB", len(l4), proto)
    return ~_sum16(pseudo + l4) & 0xFFFF


def l4_segment(kind: str, src: str, dst: str, port: int) -> tuple[int, bytes]:
    """(IP protocol, the TCP or UDP header and payload with its checksum)."""
    if kind.startswith("tcp"):
        flags = 0 if kind == "tcp-null" else SYN | FIN
        hdr = struct.pack("!HHIIBBHHH", SPORT, port, 1000, 0, 5 << 4, flags, 8192, 0, 0)
        csum = _checksum(src, dst, socket.IPPROTO_TCP, hdr)
        return socket.IPPROTO_TCP, hdr[:16] + struct.pack("!H", csum) + hdr[18:]
    payload = b"invalid\n"
    hdr = struct.pack("!HHHH", SPORT, port, 8 + len(payload), 0)
    good = _checksum(src, dst, socket.IPPROTO_UDP, hdr + payload)
    bad = (good ^ 0x5A5A) or 1  # wrong, and never 0 ("no checksum" in IPv4)
    return socket.IPPROTO_UDP, struct.pack("!HHHH", SPORT, port, 8 + len(payload), bad) + payload


def packet(kind: str, src: str, dst: str, port: int) -> bytes:
    proto, l4 = l4_segment(kind, src, dst, port)
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 4:
        # total length and header checksum are filled in by the kernel (IP_HDRINCL)
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                           a.packed, b.packed) + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, a.packed, b.packed) + l4


def send(kind: str, src: str, dst: str, port: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    fam = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(packet(kind, src, dst, port), (dst, 0))


DROPPED = 3

if __name__ == "__main__":
    try:
        send(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    except PermissionError:  # we are root: netfilter dropped it in output
        sys.exit(DROPPED)
