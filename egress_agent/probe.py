"""Is a remote IP's gateway pair reachable? ICMP echo to each one's `via.gateway`.

A workload host sends a remote IP's traffic into its tunnel untranslated
(docs/gateway.md); the tunnel's link stays up when both gateways of the pair are
gone, so the link alone cannot tell. The daemon's `probe` watcher sends one
echo request to every remote IP's peer each `interval` (200 ms) and calls a
peer unreachable when `misses` intervals (3) pass without a reply: within a
second the IP is unusable and its workloads follow their fallback (another IP
of the app, `drop` or the host's default), and back when a reply comes.

The socket is an unprivileged ICMP datagram socket where the service's group is
in net.ipv4.ping_group_range (systemd's default for the host), else a raw one
(root, CAP_NET_RAW: tests and labs in fresh namespaces).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from typing import Callable, Iterable, Optional

ECHO_REQUEST, ECHO_REPLY = 8, 0


def targets(cfg) -> frozenset[str]:
    """The peers to probe: each remote IP's IPv4 next hop into its tunnel."""
    return frozenset(ip.via.gateway for ip in cfg.ips_here()
                     if ip.remote and ip.via is not None and ip.via.gateway)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo(ident: int, seq: int) -> bytes:
    body = struct.pack("!HH", ident, seq) + b"egress-agent probe"
    head = struct.pack("!BBH", ECHO_REQUEST, 0, 0) + body
    return struct.pack("!BBH", ECHO_REQUEST, 0, _checksum(head)) + body


def open_socket() -> tuple[socket.socket, bool]:
    """(socket, raw): a ping socket if allowed, else a raw ICMP socket."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False
    except PermissionError:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True


class Prober:
    def __init__(self, interval: float = 0.2, misses: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.misses, self.clock = interval, misses, clock
        self.heard: dict[str, float] = {}  # peer -> when it last answered (or was first asked)
        self._down: frozenset[str] = frozenset()

    def unreachable(self) -> frozenset[str]:
        """The peers that stopped answering (read by the reconciler's host reads)."""
        return self._down

    def observe(self, peers: Iterable[str], answered: Iterable[str]) -> bool:
        """One round's outcome; True when the set of unreachable peers changed. A
        peer is reachable until `misses` intervals pass without an answer (from
        its first round on: a daemon that starts does not see every pair down)."""
        now = self.clock()
        peers = frozenset(peers)
        self.heard = {p: self.heard.get(p, now) for p in peers}
        for p in answered:
            if p in self.heard:
                self.heard[p] = now
        down = frozenset(p for p, t in self.heard.items()
                         if now - t > self.misses * self.interval)
        changed, self._down = down != self._down, down
        return changed

    def run(self, stopping: threading.Event, peers: Callable[[], frozenset[str]],
            on_change: Callable[[], None], warn: Callable[[str], None] = print) -> None:
        """The watcher's body: a round every `interval` until `stopping`. Without
        the right to send ICMP it says so once and probes nothing: the tunnel's
        link alone decides (a watcher that failed over and over would stop the
        daemon for want of a probe)."""
        sock: Optional[socket.socket] = None
        blind = False
        ident, seq = os.getpid() & 0xFFFF, 0
        try:
            while not stopping.is_set():
                round_end = self.clock() + self.interval
                want = peers()
                if not want or blind:  # nothing to probe, or no right to
                    self.observe(want, want)
                    stopping.wait(self.interval)
                    continue
                try:
                    if sock is None:
                        sock, raw = open_socket()
                    seq = (seq + 1) & 0xFFFF
                    for p in want:
                        try:
                            sock.sendto(echo(ident, seq), (p, 0))
                        except PermissionError:
                            raise
                        except OSError:  # no route now: it does not answer either
                            pass
                except PermissionError as e:  # no ping group, no CAP_NET_RAW, IPAddressDeny
                    warn(f"cannot probe the gateways of remote IPs ({e}): put the service's "
                         f"group in net.ipv4.ping_group_range (or grant CAP_NET_RAW), and "
                         f"allow the peers in the unit (IPAddressAllow=); until then only "
                         f"their tunnel's link counts")
                    blind = True
                    continue
                answered = set()
                while (left := round_end - self.clock()) > 0:
                    ready, _, _ = select.select([sock], [], [], left)
                    if not ready:
                        break
                    data, (addr, _) = sock.recvfrom(2048)
                    if _is_reply(data, raw, ident):
                        answered.add(addr)
                if self.observe(want, answered):
                    on_change()
        finally:
            if sock is not None:
                sock.close()


def _is_reply(data: bytes, raw: bool, ident: int) -> bool:
    if raw:  # the IP header first; every ICMP packet of the namespace arrives here
        data = data[(data[0] & 0x0F) * 4:]
        return len(data) >= 8 and data[0] == ECHO_REPLY and \
            struct.unpack("!H", data[4:6])[0] == ident
    return len(data) >= 8 and data[0] == ECHO_REPLY  # the kernel matched it to this socket


def with_unreachable(read_host: Callable, prober: Optional[Prober]) -> Callable:
    """`read_host` with the prober's unreachable peers in the HostState."""
    if prober is None:
        return read_host
    from dataclasses import replace
    return lambda: replace(read_host(), unreachable=prober.unreachable())
