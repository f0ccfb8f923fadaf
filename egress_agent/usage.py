"""Usage against limits: conntrack groups -> rows with limit, ratio, headroom.

Pure: `rows()` takes the groups a conntrack dump produced (see conntrack.py)
and the allocations, and says, for each workload and destination, how close it
is to the limits that apply:
- its port block: the concurrent connections one workload can have to one
  destination ip:port from one IPv4 (a full block refuses the next one);
- `connections_per_destination` of the egress IP: all workloads on that IP
  to one origin ip:port;
- `max_workloads` of the egress IP (in `ip_rows`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

from . import names
from .alloc import Allocations
from .config import Config, port_bounds

PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp"}


class Group(NamedTuple):
    """Connections that share these, counted by a conntrack dump."""

    mark: int
    protocol: int
    destination: str
    port: int
    egress_address: str


@dataclass(frozen=True)
class Row:
    workload: str  # "*": all workloads on the egress address
    egress_ip: Optional[str]
    egress_address: str
    protocol: str
    destination: str
    port: int
    connections: int
    limit: Optional[int]
    limit_kind: str  # port_block | connections_per_destination | none
    warn_at: float

    @property
    def ratio(self) -> Optional[float]:
        return self.connections / self.limit if self.limit else None

    @property
    def headroom(self) -> Optional[int]:
        return self.limit - self.connections if self.limit else None

    @property
    def warning(self) -> bool:
        return self.ratio is not None and self.ratio >= self.warn_at

    def to_json(self) -> dict:
        r = self.ratio
        return {"workload": self.workload, "egress_ip": self.egress_ip,
                "egress_address": self.egress_address, "protocol": self.protocol,
                "destination": self.destination, "port": self.port,
                "connections": self.connections, "limit": self.limit,
                "limit_kind": self.limit_kind, "ratio": None if r is None else round(r, 4),
                "headroom": self.headroom, "warning": self.warning}


def rows(cfg: Config, alloc: Allocations, groups: dict[Group, int]) -> list[Row]:
    """Rows sorted by saturation, most saturated first."""
    workload_of = alloc.workloads_by_wid()
    ip_of = {eid: ip for ip, eid in alloc.eids.items()}
    ips = {ip.id: ip for ip in cfg.egress_ips}
    lo, hi = port_bounds(cfg.defaults.port_range)
    warn = cfg.defaults.warn_at
    out: list[Row] = []
    per_ip: dict[tuple[str, str, str, int, Optional[str]], int] = {}
    for g, n in groups.items():
        wid, eid = names.split_mark(g.mark)
        if eid == 0:
            continue  # host default egress: no dedicated limits
        proto = PROTOCOLS.get(g.protocol, str(g.protocol))
        w = workload_of.get(wid, f"wid-{wid}")
        ip_id = ip_of.get(eid)
        lease = alloc.lease(w, ip_id) if ip_id else None
        if ipaddress.ip_address(g.egress_address).version == 4:
            limit = (lease.ports[1] - lease.ports[0] + 1) if lease and lease.ports else None
        else:
            limit = hi - lo + 1  # one IPv6 address per workload: the whole port range
        if proto not in ("tcp", "udp"):
            limit = None
        out.append(Row(w, ip_id, g.egress_address, proto, g.destination, g.port, n, limit,
                       "port_block" if limit else "none", warn))
        if ipaddress.ip_address(g.egress_address).version == 4:  # IPv6: an address per workload
            key = (g.egress_address, proto, g.destination, g.port, ip_id)
            per_ip[key] = per_ip.get(key, 0) + n
    for (addr, proto, dst, port, ip_id), n in per_ip.items():
        limit = ips[ip_id].limits.connections_per_destination if ip_id in ips else None
        if limit:
            out.append(Row("*", ip_id, addr, proto, dst, port, n, limit,
                           "connections_per_destination", warn))
    out.sort(key=lambda r: (-(r.ratio or 0), -r.connections, r.workload, r.destination, r.port))
    return out


def ip_rows(cfg: Config, alloc: Allocations) -> list[dict]:
    """Workloads per egress IP against max_workloads, and free port blocks.

    A released block whose connections still live (alloc.Lingering) is not free."""
    out = []
    size = cfg.defaults.ports_per_workload
    by_ip: dict[str, list] = {}  # one pass over the leases, not one per IP (100k: 200k × IPs)
    for (_, i), lease in alloc.leases.items():
        by_ip.setdefault(i, []).append(lease)
    for ip in cfg.ips_here():
        leases = by_ip.get(ip.id, [])
        n = len({l.workload for l in leases})
        lo, hi = cfg.ip_ports(ip)
        blocks = (hi - lo + 1) // size if ip.ipv4 else None
        lingering = lingering_blocks(alloc, ip.ipv4, lo, hi)
        out.append({"egress_ip": ip.id, "ipv4": ip.ipv4, "workloads": n,
                    "max_workloads": ip.limits.max_workloads,
                    "ratio": round(n / ip.limits.max_workloads, 4) if ip.limits.max_workloads else None,
                    "port_blocks": blocks,
                    "lingering_port_blocks": None if blocks is None else lingering,
                    "free_port_blocks": None if blocks is None else max(0, blocks - sum(
                        1 for l in leases if l.ports) - lingering)})
    return out


def lingering_blocks(alloc: Allocations, ipv4: Optional[str], lo: int, hi: int) -> int:
    """Released blocks of this address and range still in use by their connections."""
    return sum(1 for l in alloc.lingering.values()
               if ipv4 and l.lease.ipv4 == ipv4 and l.lease.ports
               and l.lease.ports[1] >= lo and l.lease.ports[0] <= hi)


def refusals(cfg: Config, alloc: Allocations, elements: Iterable[tuple[int, str, int]]) -> list[dict]:
    """(lease mark, protocol, packets) from @refused_ports -> per workload and IP."""
    workload_of = alloc.workloads_by_wid()
    ip_of = {eid: ip for ip, eid in alloc.eids.items()}
    out = []
    for mark, proto, count in elements:
        wid, eid = names.split_mark(mark)
        ip_id = ip_of.get(eid)
        lease = alloc.lease(workload_of.get(wid, ""), ip_id) if ip_id else None
        out.append({"workload": workload_of.get(wid, f"wid-{wid}"), "egress_ip": ip_id,
                    "egress_address": lease.ipv4 if lease else None, "protocol": proto,
                    "reason": "port_block_full", "refused": count})
    return sorted(out, key=lambda r: -r["refused"])
