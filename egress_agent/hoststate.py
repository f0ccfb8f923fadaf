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


def _canonical(ip: str) -> str:
    return ipaddress.ip_address(ip).compressed


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
        return any(ipaddress.ip_address(a) in net for a in self.addresses
                   if ipaddress.ip_address(a).version == net.version)

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
    """Observe the host (or the namespace of `ipr`, a pyroute2 IPRoute)."""
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
