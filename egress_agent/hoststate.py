"""What the host offers the planner: usable addresses, links that are up, cgroups.

An egress IP is usable while its address is present on a link that is up
(docs/design.md, "Pipeline"). "Up" means IFF_UP is set and the operational
state is not DOWN, LOWERLAYERDOWN or NOTPRESENT: a veth whose peer is down, or a NIC
without carrier, keeps IFF_UP but carries nothing. UNKNOWN counts as up
(loopback, tun and many virtual links never report a state).

`HostState` is what `read_host_state` observes; `usable_from` turns it into
the `Usable` egress IPs allocation and planning take, and `HostFacts` is all
the planner knows of the host (usable IPs, existing cgroups, own addresses).
These are plain values the pure planner imports; pyroute2 is imported only
inside `read_host_state`, which needs no privileges (link and address dumps
are readable by anyone).

Seen on Linux 6.x with the default net.ipv6.conf.*.keep_addr_on_down=0:
`ip link set dev X down` removes every IPv6 address of X (and every route
through X, ours included), and `up` does not bring them back; provisioning
must re-add them. IPv4 addresses stay.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # attributes only: the host facts need no config parser
    from .config import Config, EgressIP

IFF_UP = 0x1
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
_DOWN_STATES = frozenset({"DOWN", "LOWERLAYERDOWN", "NOTPRESENT"})


@functools.lru_cache(maxsize=1 << 14)
def _canonical(ip: str) -> str:
    # cached: every sync reads the same addresses again (hundreds, with many egress IPs)
    return ipaddress.ip_address(ip).compressed


@functools.lru_cache(maxsize=1 << 14)
def _as_int(ip: str) -> tuple[int, int]:
    a = ipaddress.ip_address(ip)
    return a.version, int(a)


@dataclass(frozen=True)
class HostState:
    """Usable addresses (compressed strings, any spelling accepted on input)
    and the names of the links that are up."""

    addresses: frozenset[str] = field(default_factory=frozenset)
    links_up: frozenset[str] = field(default_factory=frozenset)
    # remote IPs' gateway peers that stopped answering the probe (probe.py)
    unreachable: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses",
                           frozenset(_canonical(a) for a in self.addresses))
        object.__setattr__(self, "links_up", frozenset(self.links_up))

    def has_address(self, ip: str) -> bool:
        return _canonical(ip) in self.addresses

    def has_address_in(self, prefix: str) -> bool:
        """Some usable address lies inside `prefix` (an IPv6 egress range)."""
        net = ipaddress.ip_network(prefix, strict=False)
        lo, hi = int(net.network_address), int(net.broadcast_address)
        return any(lo <= a <= hi for a in self._ints[net.version])

    @functools.cached_property
    def _ints(self) -> dict[int, list[int]]:
        """The addresses as integers, by IP version (parsed once per read)."""
        out: dict[int, list[int]] = {4: [], 6: []}
        for a in self.addresses:
            version, n = _as_int(a)
            out[version].append(n)
        return out

    def link_up(self, name: str) -> bool:
        return name in self.links_up

    def reaches(self, ip) -> bool:
        """A remote IP's gateway answers (any other IP: no probe, True)."""
        return not (ip.remote and ip.via is not None and ip.via.gateway in self.unreachable)


@dataclass(frozen=True)
class Usable:
    """Which egress IPs can carry new traffic now, per family (None: all)."""

    v4: Optional[frozenset[str]] = None
    v6: Optional[frozenset[str]] = None

    def ok(self, ip: EgressIP, family: int) -> bool:
        if ip.state != "active":
            return False
        if family == 4:
            return ip.ipv4 is not None and (self.v4 is None or ip.id in self.v4)
        return ip.ipv6 is not None and (self.v6 is None or ip.id in self.v6)


def usable_from(cfg: Config, host: HostState) -> Usable:
    """An egress IP is usable while its address is on the host and its link is up
    (an IPv6 range: while some address of it is). On a gateway host the address is
    the pair's to move (keepalived): both hosts translate alike, held or not."""
    gateway = cfg.host.role == "gateway"  # a remote IP: its gateway's to hold

    def usable(ip: EgressIP, addr: Optional[str], held: Callable[[str], bool]) -> bool:
        return bool(addr) and (gateway or ip.remote or held(addr)) \
            and (ip.via is None or host.link_up(ip.via.dev)) and host.reaches(ip)

    ips = cfg.ips_here()
    return Usable(frozenset(ip.id for ip in ips if usable(ip, ip.ipv4, host.has_address)),
                  frozenset(ip.id for ip in ips if usable(ip, ip.ipv6, host.has_address_in)))


def cgroup_exists(root: str) -> Callable[[str], bool]:
    """Whether a cgroup path exists now under `root` (cgroupfs.VIEW on a host:
    libnftables resolves `socket cgroupv2` paths there)."""
    return lambda path: os.path.isdir(os.path.join(root, path))


def existing_cgroups(cfg: Config, root: str) -> frozenset[str]:
    """The configured cgroup paths that exist now under `root`."""
    exists = cgroup_exists(root)
    return frozenset(w.cgroup for w in cfg.workloads if w.cgroup and exists(w.cgroup))


@dataclass(frozen=True)
class HostFacts:
    """What the planner needs to know about the host (all None: assume present)."""

    usable: Usable = Usable()
    cgroups: Optional[frozenset[str]] = None  # cgroup paths that exist now
    # the host's own addresses: the guard ip rules leave them out (names.py)
    addresses: frozenset[str] = frozenset()


def read_host_state(ipr: Optional[Any] = None) -> HostState:
    """Observe the host (or the namespace of `ipr`, a pyroute2 IPRoute).

    The host's own read (no `ipr`, the daemon's every sync) dumps links and
    addresses on a netlink socket of its own and reads the few fields it needs
    with struct: pyroute2 decodes every attribute of every message, ~40 us an
    address (7 ms with the 176 egress IPs of 10,000 workloads, on each failover)."""
    if ipr is None:
        try:
            return _read_raw()
        except OSError:
            pass  # whatever the raw read cannot do, pyroute2 says in its own words below
    own = ipr is None
    if own:
        from pyroute2 import IPRoute  # not at module level: the planner imports us
        ipr = IPRoute()
    try:
        up: dict[int, str] = {}
        for link in ipr.link("dump"):
            name = link.get_attr("IFLA_IFNAME")
            state = link.get_attr("IFLA_OPERSTATE") or "UNKNOWN"
            if link["flags"] & IFF_UP and state not in _DOWN_STATES:
                up[link["index"]] = name
        addresses = set()
        for addr in ipr.addr("dump"):
            if addr["index"] not in up:
                continue
            flags = addr.get_attr("IFA_FLAGS")
            if flags is None:
                flags = addr["flags"]
            # a tentative IPv6 address answers no neighbour solicitation yet,
            # a dadfailed one never will: neither can carry return traffic
            if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            # IFA_LOCAL is the local end on point-to-point links, where
            # IFA_ADDRESS is the peer; elsewhere only IFA_ADDRESS may be set
            local = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
            if local:
                addresses.add(local)
        return HostState(frozenset(addresses), frozenset(up.values()))
    finally:
        if own:
            ipr.close()


# --- the raw read: RTM_GETLINK and RTM_GETADDR dumps, the fields read_host_state reads

_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWLINK, _RTM_GETLINK, _RTM_NEWADDR, _RTM_GETADDR = 16, 18, 20, 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFLA_IFNAME, _IFLA_OPERSTATE = 3, 16
_IFA_ADDRESS, _IFA_LOCAL, _IFA_FLAGS = 1, 2, 8
_OPER_DOWN = frozenset({1, 2, 3})  # IF_OPER_NOTPRESENT, DOWN, LOWERLAYERDOWN (_DOWN_STATES)


def _attrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    import struct
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = buf[start + 4:start + length]  # NLA_F_NESTED/NET_BYTEORDER off
        start += (length + 3) & ~3
    return out


def _dump(sock, seq: int, kind: int, body: bytes):
    """The messages of one dump request: (type, bytes, offset of the body, end)."""
    import struct
    sock.send(struct.pack("=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body)
    while True:
        buf = sock.recv(1 << 20)
        off = 0
        while off + 16 <= len(buf):
            length, mtype, _, mseq, _ = struct.unpack_from("=IHHII", buf, off)
            if length < 16:
                raise OSError("malformed netlink message")
            if mseq == seq:
                if mtype == _NLMSG_DONE:
                    return
                if mtype == _NLMSG_ERROR:
                    err = struct.unpack_from("=i", buf, off + 16)[0]
                    if err:
                        raise OSError(-err, os.strerror(-err))
                else:
                    yield mtype, buf, off + 16, off + length
            off += (length + 3) & ~3


def _read_raw() -> HostState:
    import socket
    import struct
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(5.0)  # a dump that never ends: pyroute2's read instead (OSError)
        sock.bind((0, 0))
        up: dict[int, str] = {}
        for mtype, buf, body, end in _dump(sock, 1, _RTM_GETLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0)):
            if mtype != _RTM_NEWLINK:
                continue
            _, _, index, flags, _ = struct.unpack_from("=BxHiII", buf, body)
            attrs = _attrs(buf, body + 16, end)
            state = attrs.get(_IFLA_OPERSTATE, b"\0")[0]
            name = attrs.get(_IFLA_IFNAME, b"").split(b"\0")[0].decode("utf-8", "surrogateescape")
            if flags & IFF_UP and state not in _OPER_DOWN:
                up[index] = name
        addresses = set()
        for mtype, buf, body, end in _dump(sock, 2, _RTM_GETADDR, struct.pack("=BBBBI", 0, 0, 0, 0, 0)):
            if mtype != _RTM_NEWADDR:
                continue
            family, _, flags, _, index = struct.unpack_from("=BBBBI", buf, body)
            if index not in up:
                continue
            attrs = _attrs(buf, body + 8, end)
            if _IFA_FLAGS in attrs:
                flags = struct.unpack("=I", attrs[_IFA_FLAGS][:4])[0]
            if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            local = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if local and family in (socket.AF_INET, socket.AF_INET6):
                addresses.add(socket.inet_ntop(family, local))
        return HostState(frozenset(addresses), frozenset(up.values()))
