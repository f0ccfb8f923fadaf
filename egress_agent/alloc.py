"""Allocations: workload ids, egress ids, and leases (port block + IPv6 address).

Pure: `allocate(config, previous, usable)` returns the next allocations and
the events (assign/release) that the store appends to its history once the
kernel has accepted the sync. Stability is the point: anything that still fits
is kept, so adding or removing one workload moves no other workload, and a
workload that falls back while its IP is away gets the same block back.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

from . import names
from .config import Config, EgressIP, Policy, PolicyEgress, Workload

Ports = tuple[int, int]


@dataclass(frozen=True)
class Lease:
    """Workload `workload` may leave via egress IP `ip` with these addresses."""

    workload: str
    ip: str
    ipv4: Optional[str] = None
    ports: Optional[Ports] = None
    ipv6: Optional[str] = None
    temporary: bool = False  # a failover block, released when the IP comes back

    def to_json(self) -> dict:
        return {"workload": self.workload, "ip": self.ip, "ipv4": self.ipv4,
                "ports": list(self.ports) if self.ports else None, "ipv6": self.ipv6,
                "temporary": self.temporary}

    @staticmethod
    def from_json(d: dict) -> "Lease":
        return Lease(d["workload"], d["ip"], d.get("ipv4"),
                     tuple(d["ports"]) if d.get("ports") else None,  # type: ignore[arg-type]
                     d.get("ipv6"), bool(d.get("temporary")))


@dataclass(frozen=True)
class Allocations:
    wids: dict[str, int] = field(default_factory=dict)     # workload id -> wid
    eids: dict[str, int] = field(default_factory=dict)     # egress IP id -> eid
    app_choice: dict[str, str] = field(default_factory=dict)  # workload -> app IP id
    leases: dict[tuple[str, str], Lease] = field(default_factory=dict)  # (workload, ip)
    # workload -> the app IP that serves its IPv6 when its app IP has no IPv6
    # range but another IP of the app has one (its lease there is IPv6 only)
    app_choice6: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": 1, "wids": self.wids, "eids": self.eids,
                "app_choice": self.app_choice, "app_choice6": self.app_choice6,
                "leases": [l.to_json() for l in sorted(self.leases.values(),
                                                        key=lambda l: (l.workload, l.ip))]}

    @staticmethod
    def from_json(d: dict) -> "Allocations":
        leases = [Lease.from_json(x) for x in d.get("leases", [])]
        return Allocations(dict(d.get("wids", {})), dict(d.get("eids", {})),
                           dict(d.get("app_choice", {})),
                           {(l.workload, l.ip): l for l in leases},
                           dict(d.get("app_choice6", {})))

    def lease(self, workload: str, ip: str) -> Optional[Lease]:
        return self.leases.get((workload, ip))

    def family_choice(self, workload: str, fam: int) -> Optional[str]:
        """The app IP that serves `workload`'s traffic of family `fam` (4 or 6)."""
        if fam == 6 and workload in self.app_choice6:
            return self.app_choice6[workload]
        return self.app_choice.get(workload)


@dataclass(frozen=True)
class Event:
    kind: str  # "assign" | "release"
    lease: Lease


class CapacityError(Exception):
    """A workload needs a lease on an IP that has no room left."""

    def __init__(self, workload: str, ip: str, reason: str):
        self.workload, self.ip, self.reason = workload, ip, reason
        super().__init__(f"workload {workload!r} needs a port block on egress IP {ip!r}: {reason}")


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


def policy_matches(policy: Policy, w: Workload) -> bool:
    m = policy.match
    if not m.workloads and not m.apps:
        return True
    return w.id in m.workloads or (w.app is not None and w.app in m.apps)


def policy_ips(policy: Policy, cfg: Config) -> list[str]:
    """The egress IPs a policy may send a workload to (each needs a lease)."""
    e = policy.egress
    if not isinstance(e, PolicyEgress):
        return []
    # with ipv6 unset, the ipv4 IP's own range serves IPv6: it is in the list already
    out = [x for x in (e.ipv4, e.ipv4_fallback, e.ipv6) if x and x not in ("default", "drop")]
    return list(dict.fromkeys(out))


def own_ips(cfg: Config, w: Workload) -> list[EgressIP]:
    return cfg.own_ips(w.id)


def app_ips(cfg: Config, w: Workload) -> list[EgressIP]:
    return cfg.app_ips(w.app)


def _lowest_free(taken: Iterable[int], start: int = 1) -> int:
    return _FreeIds(taken, start).take()


class _FreeIds:
    """Lowest free ids, in increasing order (ids are only taken while it lives)."""

    def __init__(self, taken: Iterable[int], start: int = 1):
        self.used = set(taken)
        self.next = start

    def take(self) -> int:
        while self.next in self.used:
            self.next += 1
        self.used.add(self.next)
        return self.next


class _Room:
    """Free port blocks, IPv6 addresses and workload slots of one egress IP.

    Blocks are kept sorted (bisect), and within one allocation the lowest free
    block and IPv6 offset only move up, so each is found by a cursor: the
    whole allocation stays O(n log n) at 100k workloads.
    """

    def __init__(self, cfg: Config, ip: EgressIP):
        self.ip = ip
        self.lo, self.hi = cfg.ip_ports(ip)
        self.size = cfg.defaults.ports_per_workload
        self.max = ip.limits.max_workloads
        self.starts: list[int] = []  # sorted block starts; every block has self.size ports
        self.v6_used: set[int] = set()
        self.workloads: set[str] = set()
        self.next_start = self.lo
        if ip.ipv6:
            net = ipaddress.IPv6Network(ip.ipv6)
            self.net6 = net
            self.net6_base = int(net.network_address)
            # low offsets are left to the host and the gateway of the range
            self.v6_next = 0x100 if net.num_addresses > 0x200 else 2

    def _overlaps(self, lo: int) -> bool:
        i = bisect.bisect_left(self.starts, lo)
        return ((i < len(self.starts) and self.starts[i] < lo + self.size)
                or (i > 0 and self.starts[i - 1] + self.size > lo))

    def fits(self, lease: Lease) -> bool:
        if self.ip.ipv4 and lease.ports:
            lo, hi = lease.ports
            if hi - lo + 1 != self.size or lo < self.lo or hi > self.hi or lease.ipv4 != self.ip.ipv4:
                return False
            if self._overlaps(lo):
                return False
        elif self.ip.ipv4 and (lease.ipv4 or not lease.ipv6):
            return False  # an IPv6-only lease holds no block of a dual IP
        if self.ip.ipv6:
            if not lease.ipv6 or ipaddress.IPv6Address(lease.ipv6) not in self.net6:
                return False
            if self._offset(lease.ipv6) in self.v6_used:
                return False
        elif lease.ipv6:
            return False
        return True

    def _offset(self, addr: str) -> int:
        return int(ipaddress.IPv6Address(addr)) - self.net6_base

    def take(self, lease: Lease) -> None:
        self.workloads.add(lease.workload)
        if lease.ports:
            bisect.insort(self.starts, lease.ports[0])
        if lease.ipv6:
            self.v6_used.add(self._offset(lease.ipv6))

    def new_lease(self, workload: str, temporary: bool, families: tuple[int, ...] = (4, 6)) -> Lease:
        """A lease for the `families` this IP has; `(6,)`: an IPv6 address, no port block."""
        if self.max is not None and workload not in self.workloads and len(self.workloads) >= self.max:
            raise CapacityError(workload, self.ip.id,
                                f"max_workloads {self.max} reached; add an egress IP to the "
                                "app or raise limits.max_workloads")
        ports = None
        ipv4 = self.ip.ipv4 if 4 in families else None
        if ipv4:
            start = self.next_start
            while start + self.size - 1 <= self.hi and self._overlaps(start):
                start += self.size
            self.next_start = start
            if start + self.size - 1 > self.hi:
                raise CapacityError(workload, self.ip.id,
                                    f"no free block of {self.size} ports left in "
                                    f"{self.lo}-{self.hi}; lower defaults.ports_per_workload, "
                                    "widen the port range or add an egress IP")
            ports = (start, start + self.size - 1)
        ipv6 = None
        if self.ip.ipv6 and 6 in families:
            while self.v6_next in self.v6_used:
                self.v6_next += 1
            if self.v6_next >= self.net6.num_addresses:
                raise CapacityError(workload, self.ip.id, f"range {self.ip.ipv6} is full")
            ipv6 = str(ipaddress.IPv6Address(self.net6_base + self.v6_next))
        lease = Lease(workload, self.ip.id, ipv4, ports, ipv6, temporary)
        self.take(lease)
        return lease

    def widen(self, lease: Lease, fam: int) -> Lease:
        """`lease` (IPv6 only) plus what this IP gives family `fam`, kept from now on."""
        more = self.new_lease(lease.workload, lease.temporary, (fam,))
        return replace(lease, ipv4=lease.ipv4 or more.ipv4, ports=lease.ports or more.ports,
                       ipv6=lease.ipv6 or more.ipv6)


def needed_ips(cfg: Config, w: Workload) -> list[str]:
    """Every egress IP this workload may leave from, by policy or assignment."""
    out: list[str] = [ip.id for ip in own_ips(cfg, w)]
    for p in cfg.policies:
        if policy_matches(p, w):
            out += policy_ips(p, cfg)
    return list(dict.fromkeys(out))


def allocate(cfg: Config, prev: Allocations, usable: Usable = Usable()) -> tuple[Allocations, list[Event]]:
    here = {ip.id: ip for ip in cfg.ips_here()}
    workloads = {w.id: w for w in cfg.workloads}

    wids = {w: i for w, i in prev.wids.items() if w in workloads}
    free_wids = _FreeIds(wids.values())
    for w in workloads:
        if w not in wids:
            wids[w] = free_wids.take()
            if wids[w] > names.WID_MAX:
                raise CapacityError(w, "-", f"more than {names.WID_MAX} workloads")
    eids = {ip: i for ip, i in prev.eids.items() if ip in here}
    for ip in here:
        if ip not in eids:
            eids[ip] = _lowest_free(eids.values())
            if eids[ip] > names.EID_MAX:
                raise CapacityError("-", ip, f"more than {names.EID_MAX} egress IPs on one host")

    rooms = {ip_id: _Room(cfg, ip) for ip_id, ip in here.items()}
    leases: dict[tuple[str, str], Lease] = {}

    # What each workload needs, before any new allocation.
    need: dict[str, list[str]] = {w.id: needed_ips(cfg, w) for w in cfg.workloads}

    # 1. keep what still fits (previous leases, in a stable order)
    for key in sorted(prev.leases):
        lease = prev.leases[key]
        w, ip_id = key
        if w not in workloads or ip_id not in here:
            continue
        room = rooms[ip_id]
        keep = (ip_id in need[w] or lease.temporary
                or (ip_id in (prev.app_choice.get(w), prev.app_choice6.get(w))
                    and here[ip_id].state == "active"))
        if keep and room.fits(lease) and (room.max is None or len(room.workloads) < room.max):
            room.take(lease)
            leases[key] = lease

    # 2. app choice: keep it while it is in the app; else least loaded active IP
    app_choice: dict[str, str] = {}
    # the app IP serves IPv4 when the app has any IPv4 (step 2b adds IPv6 if it lacks it)
    active_ids = {app: {ip.id for ip in _first_family_ips(cfg.app_ips(app)) if ip.state == "active"}
                  for app in {w.app for w in cfg.workloads if w.app}}
    # least loaded first: a heap of (workloads on it, id) per app, built when first needed
    heaps: dict[str, list[tuple[int, str]]] = {}
    for w in cfg.workloads:
        candidates = app_ips(cfg, w)
        if not candidates or _own_covers_both(cfg, w):
            continue
        prev_choice = prev.app_choice.get(w.id)
        if prev_choice in active_ids[w.app] and (w.id, prev_choice) in leases:
            app_choice[w.id] = prev_choice
            continue
        heap = heaps.get(w.app)
        if heap is None:
            candidates = _first_family_ips(candidates)
            active = [ip for ip in candidates if ip.state == "active"] or candidates
            heap = heaps[w.app] = [(len(rooms[ip.id].workloads), ip.id) for ip in active]
            heapq.heapify(heap)
        reasons = []
        while heap:
            _, ip_id = heapq.heappop(heap)
            try:
                leases[(w.id, ip_id)] = leases.get((w.id, ip_id)) or rooms[ip_id].new_lease(w.id, False)
            except CapacityError as e:
                reasons.append(f"{ip_id}: {e.reason}")  # full: leaves the heap
                continue
            app_choice[w.id] = ip_id
            heapq.heappush(heap, (len(rooms[ip_id].workloads), ip_id))
            break
        else:
            raise CapacityError(w.id, ",".join(ip.id for ip in candidates),
                                f"every egress IP of app {w.app!r} is full ({'; '.join(reasons)})")

    # 2b. IPv6 from another IP of the app when the app IP has no IPv6 range
    app_choice6: dict[str, str] = {}
    heaps6: dict[str, list[tuple[int, str]]] = {}
    for w in cfg.workloads:
        choice = app_choice.get(w.id)
        if choice is None or here[choice].ipv6:
            continue
        candidates = [ip for ip in app_ips(cfg, w) if ip.ipv6]
        if not candidates:
            continue  # the app has no IPv6: defaults.unavailable
        prev6 = prev.app_choice6.get(w.id)
        if (prev6 in {ip.id for ip in candidates if ip.state == "active"}
                and (w.id, prev6) in leases):
            app_choice6[w.id] = prev6
            continue
        heap = heaps6.get(w.app)
        if heap is None:
            active = [ip for ip in candidates if ip.state == "active"] or candidates
            heap = heaps6[w.app] = [(len(rooms[ip.id].workloads), ip.id) for ip in active]
            heapq.heapify(heap)
        reasons = []
        while heap:
            _, ip_id = heapq.heappop(heap)
            try:
                leases[(w.id, ip_id)] = (leases.get((w.id, ip_id))
                                         or rooms[ip_id].new_lease(w.id, False, (6,)))
            except CapacityError as e:
                reasons.append(f"{ip_id}: {e.reason}")
                continue
            app_choice6[w.id] = ip_id
            heapq.heappush(heap, (len(rooms[ip_id].workloads), ip_id))
            break
        else:
            raise CapacityError(w.id, ",".join(ip.id for ip in candidates),
                                f"every IPv6 range of app {w.app!r} is full ({'; '.join(reasons)})")

    # 3. the IPs named by policies and machine-scoped IPs
    for w in cfg.workloads:
        for ip_id in need[w.id]:
            if (w.id, ip_id) not in leases and ip_id in here:
                leases[(w.id, ip_id)] = rooms[ip_id].new_lease(w.id, False)

    # 4. failover: an app choice that cannot carry new traffic borrows a block
    #    on another usable IP of the same app; the original lease is kept, and
    #    the borrowed block is kept while the failover lasts, then released.
    borrowed: set[tuple[str, str]] = set()
    for w in cfg.workloads:
        for fam in (4, 6):
            choice = (app_choice6 if fam == 6 and w.id in app_choice6 else app_choice).get(w.id)
            if choice is None or not _family_wanted(here[choice], fam) or usable.ok(here[choice], fam):
                continue
            alt_id = failover_target(cfg, w, here[choice], fam, usable, leases)
            if alt_id is None:
                for alt in sorted(app_ips(cfg, w), key=lambda ip: (len(rooms[ip.id].workloads), ip.id)):
                    if alt.id != choice and usable.ok(alt, fam):
                        held = leases.get((w.id, alt.id))
                        try:
                            # an IPv6-only lease on alt grows a block: kept, the same next time
                            leases[(w.id, alt.id)] = (rooms[alt.id].widen(held, fam) if held
                                                      else rooms[alt.id].new_lease(w.id, True))
                            alt_id = alt.id
                            break
                        except CapacityError:
                            continue
            if alt_id is not None:
                borrowed.add((w.id, alt_id))
    leases = {k: l for k, l in leases.items() if not l.temporary or k in borrowed}

    events = [Event("release", l) for k, l in sorted(prev.leases.items()) if leases.get(k) != l]
    events += [Event("assign", l) for k, l in sorted(leases.items()) if prev.leases.get(k) != l]
    return Allocations(wids, eids, app_choice, leases, app_choice6), events


def _family_wanted(ip: EgressIP, fam: int) -> bool:
    return (ip.ipv4 if fam == 4 else ip.ipv6) is not None


def _first_family_ips(ips: list[EgressIP]) -> list[EgressIP]:
    """The IPs an app choice is made from: those with IPv4 if the app has any."""
    return [ip for ip in ips if ip.ipv4] or ips


def _own_covers_both(cfg: Config, w: Workload) -> bool:
    own = own_ips(cfg, w)
    return any(ip.ipv4 for ip in own) and (any(ip.ipv6 for ip in own) or not any(
        ip.ipv6 for ip in app_ips(cfg, w)))


def failover_target(cfg: Config, w: Workload, ip: EgressIP, fam: int, usable: Usable,
                    leases: dict[tuple[str, str], Lease]) -> Optional[str]:
    """Another usable IP of the same app on which `w` already holds a lease for `fam`."""
    for alt in app_ips(cfg, w):
        held = leases.get((w.id, alt.id))
        if alt.id != ip.id and usable.ok(alt, fam) and held and (held.ipv4 if fam == 4 else held.ipv6):
            return alt.id
    return None

