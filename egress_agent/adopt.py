"""Rebuild allocations from the live kernel maps when the store is lost.

Pure. The maps hold everything needed: sources and cgroups give workload ids,
the SNAT maps give each lease's address, port block and IPv6 address, the
assign maps give each workload's app IP. What the config no longer names is
left out; the next sync removes it from the kernel.
"""

from __future__ import annotations

import ipaddress

from . import names
from .alloc import Allocations, Lease
from .config import Config
from .model import Observed
from .programmed import raw


def adopt(cfg: Config, observed: Observed) -> Allocations:
    maps = raw(observed.elements)
    by_source = {addr: wid for wid, found in maps.sources.items() for addr, _ in found}
    by_cgroup = {path: wid for wid, paths in maps.cgroups.items() for path in paths}

    wids: dict[str, int] = {}
    for w in cfg.workloads:
        found = {by_source[s] for s in w.source if s in by_source}
        if w.cgroup in by_cgroup:
            found.add(by_cgroup[w.cgroup])
        if len(found) == 1:
            wids[w.id] = found.pop()
    workload_of = {wid: w for w, wid in wids.items()}

    ip_of_v4 = {ip.ipv4: ip.id for ip in cfg.ips_here() if ip.ipv4}
    ranges = [(ipaddress.ip_network(ip.ipv6), ip.id) for ip in cfg.ips_here() if ip.ipv6]
    eids: dict[str, int] = {}
    v4, v6 = maps.v4, maps.v6
    for mark, (addr, _) in v4.items():
        if addr in ip_of_v4:
            eids.setdefault(ip_of_v4[addr], names.split_mark(mark)[1])
    for mark, addr in v6.items():
        for net, ip_id in ranges:
            if ipaddress.ip_address(addr) in net:
                eids.setdefault(ip_id, names.split_mark(mark)[1])
    ip_of_eid = {e: i for i, e in eids.items()}

    leases: dict[tuple[str, str], Lease] = {}
    for mark in set(v4) | set(v6):
        wid, eid = names.split_mark(mark)
        w, ip_id = workload_of.get(wid), ip_of_eid.get(eid)
        if w is None or ip_id is None:
            continue
        addr4, ports = v4.get(mark, (None, None))
        leases[(w, ip_id)] = Lease(w, ip_id, addr4, ports, v6.get(mark))

    app_choice: dict[str, str] = {}
    app_choice6: dict[str, str] = {}
    for fam in (4, 6):
        for wid, mark in maps.assign[fam].items():
            w = workload_of.get(wid)
            ip_id = ip_of_eid.get(names.split_mark(mark)[1])
            if w and ip_id and cfg.ip(ip_id).app is not None:
                home = app_choice.setdefault(w, ip_id)
                if fam == 6 and home != ip_id and not cfg.ip(home).ipv6:
                    app_choice6[w] = ip_id  # IPv6 from another IP of the app
    return Allocations(wids, eids, app_choice, leases, app_choice6)
