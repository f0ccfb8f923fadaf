"""Allocations: workload ids, egress ids, and leases (port block + IPv6 address).

Pure: `allocate(config, previous, usable)` returns the next allocations and
the events (assign/release/linger) that the store appends to its history once
the kernel has accepted the sync. Stability is the point: anything that still
fits is kept, so adding or removing one workload moves no other workload, and a
workload that falls back while its IP is away gets the same block back.

A released lease lingers: conntrack keeps the NAT binding of every connection
translated into its block until that connection ends, so the block (and its
IPv6 address, workload id and egress id) is handed to nobody else, and not
counted free, until `drain(allocations, live)` finds no connection left in it.
Otherwise two workloads would leave from one address:port and `who` could not
tell them apart.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import itertools
from dataclasses import dataclass, field, replace
from collections.abc import Mapping
from typing import Iterable, Iterator, Optional

from . import names
from .config import Config, EgressIP, Workload, policy_ips, policy_matches
from .hoststate import Usable

Ports = tuple[int, int]


@dataclass(frozen=True, slots=True)
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


BlockKey = tuple[str, str, Optional[str], Optional[Ports], Optional[str]]


def block_key(lease: Lease) -> BlockKey:
    """What identifies a lease in the history: workload, IP and the addresses it gave."""
    return (lease.workload, lease.ip, lease.ipv4, lease.ports, lease.ipv6)


def lingering_order(k: BlockKey) -> tuple:
    """A sort key for lingering keys (some of their parts are None)."""
    return (k[0], k[1], k[2] or "", k[3] or (0, 0), k[4] or "")


@dataclass(frozen=True, slots=True)
class Lingering:
    """A released lease whose connections may still live in conntrack.

    `mark` is the lease mark (names.lease_mark(wid, eid)) in the conntrack mark
    of its connections. While a lease lingers its wid and eid are given to
    nobody else, so (mark, the lease's address) found in a conntrack dump
    means: a connection the origin sees from this lease's block.
    """

    lease: Lease
    mark: int

    @property
    def wid(self) -> int:
        return names.split_mark(self.mark)[0]

    @property
    def eid(self) -> int:
        return names.split_mark(self.mark)[1]

    def rest(self, now: Optional[Lease]) -> Optional[Lease]:
        """What of it is not held again by `now`, its workload's lease on the same IP
        (a lease that shrank to one family leaves the other lingering); None: nothing."""
        if now is None:
            return self.lease
        v4 = self.lease.ports is not None and (now.ipv4, now.ports) != (self.lease.ipv4,
                                                                         self.lease.ports)
        v6 = self.lease.ipv6 is not None and now.ipv6 != self.lease.ipv6
        if not (v4 or v6):
            return None
        return replace(self.lease, ipv4=self.lease.ipv4 if v4 else None,
                       ports=self.lease.ports if v4 else None,
                       ipv6=self.lease.ipv6 if v6 else None)

    def in_use(self, live: "Live", now: Optional[Lease] = None) -> bool:
        """Does conntrack (`live`) have a connection in what of it is not held again?"""
        rest = self.rest(now)
        return rest is not None and any((self.mark, a) in live for a in (rest.ipv4, rest.ipv6) if a)

    def to_json(self) -> dict:
        return {**self.lease.to_json(), "mark": self.mark}

    @staticmethod
    def from_json(d: dict) -> "Lingering":
        return Lingering(Lease.from_json(d), int(d["mark"]))


# (lease mark, egress address) of every connection in conntrack (conntrack.live_leases)
Live = frozenset[tuple[int, str]]


@dataclass(frozen=True)
class Allocations:
    wids: dict[str, int] = field(default_factory=dict)     # workload id -> wid
    eids: dict[str, int] = field(default_factory=dict)     # egress IP id -> eid
    app_choice: dict[str, str] = field(default_factory=dict)  # workload -> app IP id
    leases: dict[tuple[str, str], Lease] = field(default_factory=dict)  # (workload, ip)
    # workload -> the app IP that serves its IPv6 when its app IP has no IPv6
    # range but another IP of the app has one (its lease there is IPv6 only)
    app_choice6: dict[str, str] = field(default_factory=dict)
    lingering: dict[BlockKey, Lingering] = field(default_factory=dict)  # released, still in use

    def to_json(self, leases: bool = True) -> dict:
        d = {"version": 1, "wids": self.wids, "eids": self.eids,
             "app_choice": self.app_choice, "app_choice6": self.app_choice6}
        if leases:  # (store.allocations_text writes them itself)
            d["leases"] = [self.leases[k].to_json() for k in sorted(self.leases)]
        if self.lingering:  # absent when empty: older readers see the file they know
            d["lingering"] = [self.lingering[k].to_json()
                              for k in sorted(self.lingering, key=lingering_order)]
        return d

    @staticmethod
    def from_json(d: dict) -> "Allocations":
        leases = [Lease.from_json(x) for x in d.get("leases", [])]
        lingering = [Lingering.from_json(x) for x in d.get("lingering", [])]
        return Allocations(dict(d.get("wids", {})), dict(d.get("eids", {})),
                           dict(d.get("app_choice", {})),
                           {(l.workload, l.ip): l for l in leases},
                           dict(d.get("app_choice6", {})),
                           {block_key(l.lease): l for l in lingering})

    def lease(self, workload: str, ip: str) -> Optional[Lease]:
        return self.leases.get((workload, ip))

    def family_choice(self, workload: str, fam: int) -> Optional[str]:
        """The app IP that serves `workload`'s traffic of family `fam` (4 or 6)."""
        if fam == 6 and workload in self.app_choice6:
            return self.app_choice6[workload]
        return self.app_choice.get(workload)

    def copy(self) -> "Allocations":
        """A copy whose dicts are its own (leases are immutable): what another thread
        reads while syncs change these in place (AllocChange.apply)."""
        return Allocations(dict(self.wids), dict(self.eids), dict(self.app_choice),
                           dict(self.leases), dict(self.app_choice6), dict(self.lingering))

    def workloads_by_wid(self) -> dict[int, str]:
        """wid -> workload, for the wids in conntrack marks: a removed workload whose
        connections still linger keeps its name (its wid goes to nobody else)."""
        out = {l.wid: l.lease.workload for l in self.lingering.values()}
        out.update((wid, w) for w, wid in self.wids.items())
        return out


# "linger": the block just released stays taken, its connections may live;
# "drained": a lingering block's last connection is gone, the block is free
EVENT_KINDS = ("assign", "release", "linger", "drained")


@dataclass(frozen=True)
class Event:
    kind: str  # one of EVENT_KINDS
    lease: Lease


class CapacityError(Exception):
    """A workload needs a lease on an IP that has no room left."""

    def __init__(self, workload: str, ip: str, reason: str):
        self.workload, self.ip, self.reason = workload, ip, reason
        super().__init__(f"workload {workload!r} needs a port block on egress IP {ip!r}: {reason}")


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
        # workload -> its fixed block (config `blocks:`), taken from the start: a
        # kept lease that overlaps one moves, and no new block is cut from one
        self.fixed: dict[str, Ports] = cfg.fixed_blocks.get(ip.id, {})
        # sorted block starts; every block has self.size ports (config checks fixed ones)
        self.starts: list[int] = sorted(lo for lo, _ in self.fixed.values())
        self.v6_used: set[int] = set()
        self.workloads: set[str] = set()
        self.next_start = self.lo
        self.odd: list[Ports] = []  # reserved blocks of another size (ports_per_workload changed)
        self.held: dict[str, list[Lease]] = {}  # reserved for this workload to take again
        self.reserved = 0  # blocks of released leases whose connections still live
        if ip.ipv6:
            net = ipaddress.IPv6Network(ip.ipv6)
            self.net6 = net
            self.net6_base = int(net.network_address)
            # low offsets are left to the host and the gateway of the range
            self.v6_next = 0x100 if net.num_addresses > 0x200 else 2
        # a fixed block fixes the workload's IPv6 address too: the range's address at
        # offset LO (the block's first port; blocks are disjoint, so are these), so
        # both gateways of a pair give it the same one (docs/gateway.md)
        self.fixed6: dict[str, int] = {
            w: lo for w, (lo, _) in self.fixed.items()
            if ip.ipv6 and lo < ipaddress.IPv6Network(ip.ipv6).num_addresses}
        self.v6_fixed = set(self.fixed6.values())

    def _overlaps(self, lo: int, hi: Optional[int] = None) -> bool:
        hi = lo + self.size - 1 if hi is None else hi
        i = bisect.bisect_left(self.starts, lo)
        return ((i < len(self.starts) and self.starts[i] <= hi)
                or (i > 0 and self.starts[i - 1] + self.size > lo)
                or bool(self.odd) and any(a <= hi and lo <= b for a, b in self.odd))

    def reserve(self, lease: Lease, retake: bool) -> None:
        """Keep what `lease` gave (a block still in use) from everyone; with `retake`,
        its own workload may take it again (new_lease)."""
        alone = True  # nothing else has any of it: its workload may have it back
        if lease.ports and lease.ipv4 == self.ip.ipv4:
            lo, hi = lease.ports
            alone = not self._overlaps(lo, hi)
            # a block that overlaps another only in part (a fixed block need not be
            # aligned with the others) keeps the rest of it taken as well
            if hi - lo + 1 != self.size or not alone:
                self.odd.append((lo, hi))
            else:
                bisect.insort(self.starts, lo)
            self.reserved += 1
        if lease.ipv6 and self.ip.ipv6 and ipaddress.IPv6Address(lease.ipv6) in self.net6:
            offset = self._offset(lease.ipv6)
            # not its own to take back where another's fixed block fixes that address
            alone = alone and offset not in self.v6_used and (
                offset not in self.v6_fixed or self.fixed6.get(lease.workload) == offset)
            self.v6_used.add(offset)
        if retake and alone and lease.ip == self.ip.id and self._shaped(lease):
            self.held.setdefault(lease.workload, []).append(lease)

    def _shaped(self, lease: Lease) -> bool:
        """Could a new lease on this IP (of some of its families) look like `lease`?"""
        if lease.ports:
            lo, hi = lease.ports
            if lease.ipv4 != self.ip.ipv4 or hi - lo + 1 != self.size or lo < self.lo or hi > self.hi:
                return False
        elif lease.ipv4:
            return False
        if lease.ipv6 and not (self.ip.ipv6 and ipaddress.IPv6Address(lease.ipv6) in self.net6):
            return False
        return bool(lease.ports or lease.ipv6)

    def fits(self, lease: Lease) -> bool:
        fixed = self.fixed.get(lease.workload)
        if fixed is not None and lease.ports != fixed:
            return False  # its block here is fixed now, and this is not it
        if self.ip.ipv4 and lease.ports:
            lo, hi = lease.ports
            if hi - lo + 1 != self.size or lo < self.lo or hi > self.hi or lease.ipv4 != self.ip.ipv4:
                return False
            if fixed is None and self._overlaps(lo):
                return False
        elif self.ip.ipv4 and (lease.ipv4 or not lease.ipv6):
            return False  # an IPv6-only lease holds no block of a dual IP
        if self.ip.ipv6 and not lease.ipv6:
            # a block borrowed for IPv4 alone (step 4) is kept as it is: released here
            # and taken back in step 4, it would not count in the load of step 2, as
            # it does where an incremental allocation keeps it
            return lease.temporary and lease.ports is not None
        if self.ip.ipv6:
            if ipaddress.IPv6Address(lease.ipv6) not in self.net6:
                return False
            offset = self._offset(lease.ipv6)
            if offset in self.v6_used:
                return False
            own6 = self.fixed6.get(lease.workload)
            if offset != own6 if own6 is not None else offset in self.v6_fixed:
                return False  # not its fixed address, or another's
        elif lease.ipv6:
            return False
        return True

    def _offset(self, addr: str) -> int:
        return int(ipaddress.IPv6Address(addr)) - self.net6_base

    def take(self, lease: Lease) -> None:
        self.workloads.add(lease.workload)
        if lease.ports and lease.ports != self.fixed.get(lease.workload):  # fixed: there already
            bisect.insort(self.starts, lease.ports[0])
        if lease.ipv6:
            self.v6_used.add(self._offset(lease.ipv6))

    def new_lease(self, workload: str, temporary: bool, families: tuple[int, ...] = (4, 6)) -> Lease:
        """A lease for the `families` this IP has; `(6,)`: an IPv6 address, no port block."""
        if self.max is not None and workload not in self.workloads and len(self.workloads) >= self.max:
            raise CapacityError(workload, self.ip.id,
                                f"max_workloads {self.max} reached; add an egress IP to the "
                                "app or raise limits.max_workloads")
        fixed = self.fixed.get(workload)
        if fixed is not None:
            families = (4, *families)  # a lease here always holds the fixed block
        want = (bool(self.ip.ipv4 and 4 in families), bool(self.ip.ipv6 and 6 in families))
        # its own block, still reserved: the same source again, nobody else's (a
        # failover block borrowed for one family and widened to both is taken whole);
        # not where its block is fixed, nor one that a block released since reaches
        # into (fixed blocks need not be aligned with the others)
        held = self.held.get(workload)
        if held:  # most workloads of a full allocation have none: a new lease
            own = [old for old in held if fixed is None and not (old.ports and any(
                a <= old.ports[1] and old.ports[0] <= b for a, b in self.odd))]
            shapes = [(bool(old.ports), bool(old.ipv6)) for old in own]
            i = next((i for i, s in enumerate(shapes) if s == want), None)
            if i is None:
                i = next((i for i, s in enumerate(shapes) if s[0] >= want[0] and s[1] >= want[1]),
                         None)
            if i is not None:
                self.workloads.add(workload)
                self.reserved -= 1 if own[i].ports else 0
                held.remove(own[i])
                return replace(own[i], temporary=temporary)
        ports = None
        ipv4 = self.ip.ipv4 if 4 in families else None
        if ipv4 and fixed is not None:
            ports = fixed
        elif ipv4:
            start = self.next_start
            while start + self.size - 1 <= self.hi and self._overlaps(start):
                start += self.size
            self.next_start = start
            if start + self.size - 1 > self.hi:
                waiting = (f" ({self.reserved} released blocks are reused when their "
                           "connections close)" if self.reserved else "")
                raise CapacityError(workload, self.ip.id,
                                    f"no free block of {self.size} ports left in "
                                    f"{self.lo}-{self.hi}{waiting}; lower "
                                    "defaults.ports_per_workload, widen the port range or add "
                                    "an egress IP")
            ports = (start, start + self.size - 1)
        ipv6 = None
        if self.ip.ipv6 and 6 in families and workload in self.fixed6:
            ipv6 = str(ipaddress.IPv6Address(self.net6_base + self.fixed6[workload]))
        elif self.ip.ipv6 and 6 in families:
            while self.v6_next in self.v6_used or self.v6_next in self.v6_fixed:
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


def needed_ips(cfg: Config, w: Workload, by_policy: Optional[list] = None) -> list[str]:
    """Every egress IP this workload may leave from, by policy or assignment, and
    those where its block is fixed (held whether or not it is its app choice now).
    `by_policy`: (policy, policy_ips) of the policies with IPs, worked out once
    for many workloads (policies_with_ips)."""
    out: list[str] = [ip.id for ip in own_ips(cfg, w)]
    for p, ips in (policies_with_ips(cfg) if by_policy is None else by_policy):
        if policy_matches(p, w):
            out += ips
    if not out and not w.blocks:
        return []
    return list(dict.fromkeys([*out, *w.blocks]))


def policies_with_ips(cfg: Config) -> list:
    """(policy, its IPs) of the policies that send some workloads to egress IPs."""
    return [(p, ips) for p in cfg.policies if (ips := policy_ips(p, cfg))]


def allocate(cfg: Config, prev: Allocations, usable: Usable = Usable(),
             full: Optional[list[CapacityError]] = None) -> tuple[Allocations, list[Event]]:
    """The leases of every workload, keeping `prev` where it still fits.

    A workload that does not fit raises CapacityError, or with `full` (for `check`,
    which reports every one) is appended to it and left without that lease."""

    def no_room(e: CapacityError) -> None:
        if full is None:
            raise e
        full.append(e)

    here = {ip.id: ip for ip in cfg.ips_here()}
    workloads = {w.id: w for w in cfg.workloads}

    # the ids in the marks of lingering connections stay theirs: a workload or IP
    # that comes back gets its own again, and nobody else gets them meanwhile
    linger_wid = {l.lease.workload: l.wid for l in prev.lingering.values()}
    linger_eid = {l.lease.ip: l.eid for l in prev.lingering.values()}
    wids = {w: i for w, i in prev.wids.items() if w in workloads}
    for w in workloads:
        if w not in wids and w in linger_wid and linger_wid[w] not in wids.values():
            wids[w] = linger_wid[w]
    # a wid given up in this allocation goes to nobody else in it: its released
    # blocks linger from now on with the wid in their mark
    free_wids = _FreeIds([*wids.values(), *linger_wid.values(), *prev.wids.values()])
    for w in workloads:
        if w not in wids:
            wids[w] = free_wids.take()
            if wids[w] > names.WID_MAX:
                raise CapacityError(w, "-", f"more than {names.WID_MAX} workloads")
    eids = {ip: i for ip, i in prev.eids.items() if ip in here}
    for ip in here:
        if ip not in eids and ip in linger_eid and linger_eid[ip] not in eids.values():
            eids[ip] = linger_eid[ip]
    for ip in here:
        if ip not in eids:
            eids[ip] = _lowest_free([*eids.values(), *linger_eid.values(), *prev.eids.values()])
            if eids[ip] > names.EID_MAX:
                raise CapacityError("-", ip, f"more than {names.EID_MAX} egress IPs on one host")

    rooms = {ip_id: _Room(cfg, ip) for ip_id, ip in here.items()}

    def load(ip_id: str) -> int:
        return len(rooms[ip_id].workloads)
    by_v4 = {ip.ipv4: rooms[ip.id] for ip in here.values() if ip.ipv4}
    v6_rooms = [r for r in rooms.values() if r.ip.ipv6]

    def reserve(lease: Lease) -> None:
        """Its block and IPv6 address stay taken, on whichever IP has them now."""
        for room in {id(r): r for r in [by_v4.get(lease.ipv4), *(
                r for r in v6_rooms if lease.ipv6 and ipaddress.IPv6Address(lease.ipv6) in r.net6)]
                if r is not None}.values():
            room.reserve(lease, retake=lease.workload in workloads)

    for l in prev.lingering.values():
        rest = l.rest(prev.leases.get((l.lease.workload, l.lease.ip)))
        if rest is not None:
            reserve(rest)
    leases: dict[tuple[str, str], Lease] = {}

    # What each workload needs, before any new allocation.
    by_policy = policies_with_ips(cfg)
    need: dict[str, list[str]] = {w.id: needed_ips(cfg, w, by_policy) for w in cfg.workloads}

    # 1. keep what still fits (previous leases, in a stable order)
    for key in sorted(prev.leases):
        lease = prev.leases[key]
        w, ip_id = key
        if w not in workloads or ip_id not in here:
            continue
        room = rooms[ip_id]
        if _keeps(cfg, prev, workloads[w], lease, need[w], here[ip_id]) and room.fits(lease) \
                and (room.max is None or len(room.workloads) < room.max):
            room.take(lease)
            leases[key] = lease
    # what is released now lingers from now on: nobody else gets it in this allocation
    for key in prev.leases.keys() - leases.keys():
        reserve(prev.leases[key])

    app_choice, app_choice6 = _place(cfg, cfg.workloads, prev, here, usable, rooms,
                                     leases, need, load, no_room, {}, {})

    lingering, events = _outcome(prev, sorted(prev.leases), leases, leases)
    return Allocations(wids, eids, app_choice, leases, app_choice6, lingering), events


def _outcome(prev: Allocations, keys: list, now: dict, held: dict
             ) -> tuple[dict[BlockKey, Lingering], list[Event]]:
    """The lingering blocks and the events once `now` replaced the previous leases
    `keys` (sorted); `held`: every lease after the change."""
    # A released lease lingers unless its workload holds all of it again.
    lingering = {k: l for k, l in prev.lingering.items()
                 if l.rest(held.get((l.lease.workload, l.lease.ip))) is not None}
    events = []
    for k in keys:
        l = prev.leases[k]
        if now.get(k) != l:
            events.append(Event("release", l))
            wid, eid = prev.wids.get(l.workload), prev.eids.get(l.ip)
            gone = Lingering(replace(l, temporary=False), names.lease_mark(wid, eid)) \
                if wid and eid else None
            if gone and gone.rest(now.get(k)) is not None:
                lingering[block_key(l)] = gone
                events.append(Event("linger", l))
    events += [Event("assign", l) for k, l in sorted(now.items()) if prev.leases.get(k) != l]
    return lingering, events


def drain(a: Allocations, live: Live) -> tuple[Allocations, list[Event]]:
    """Free the lingering blocks that no connection in `live` uses any more.

    `live` must be read after the kernel stopped giving out the released
    blocks (after the sync that released them), or a connection made in
    between would be missed."""
    busy = {k for k, l in a.lingering.items()
            if l.in_use(live, a.leases.get((l.lease.workload, l.lease.ip)))}
    gone = sorted(a.lingering.keys() - busy, key=lingering_order)
    if not gone:
        return a, []
    left = {k: l for k, l in a.lingering.items() if k in busy}
    return replace(a, lingering=left), [Event("drained", a.lingering[k].lease) for k in gone]


def _keeps(cfg: Config, prev: Allocations, w: Workload, lease: Lease, need: list[str],
           ip: EgressIP) -> bool:
    """Does `w` keep its previous `lease` on `ip`: the IP is needed (own, policy or a
    fixed block), a failover block (step 4 decides), or its app choice, while active
    and of its app (a workload moved to another app releases the old app's block at
    once), and while no fixed block pins its choice elsewhere (_pinned)."""
    return (ip.id in need or lease.temporary
            or (ip.state == "active" and ip.app is not None and ip.app == w.app
                and (ip.id == prev.app_choice6.get(w.id)
                     or ip.id == prev.app_choice.get(w.id) and not _pinned(cfg, w))))


def _pinned(cfg: Config, w: Workload) -> list[EgressIP]:
    """The app IPs where `w`'s block is fixed: its app choice is one of them, since both
    gateways of a pair must send it from the same IP, not each from its least loaded."""
    return [ip for ip in _first_family_ips(app_ips(cfg, w)) if ip.id in w.blocks] if w.blocks else []


def _app_heap(ips: list[EgressIP], load) -> list[tuple[int, str]]:
    """The app's active IPs (all of them when none is active) by workload count."""
    active = [ip for ip in ips if ip.state == "active"] or ips
    heap = [(load(ip.id), ip.id) for ip in active]
    heapq.heapify(heap)
    return heap


def _least_loaded(heap: list[tuple[int, str]], rooms: dict, leases: dict, workload: str,
                  families: tuple[int, ...]) -> tuple[Optional[str], list[str]]:
    """Pop IPs of an app, least loaded first, until one has (or gives) `workload` a
    lease for `families`; that IP goes back on the heap with its new load. A full IP
    (CapacityError) leaves the heap; with every IP full: None and their reasons."""
    reasons = []
    while heap:
        _, ip_id = heapq.heappop(heap)
        try:
            leases[(workload, ip_id)] = (leases.get((workload, ip_id))
                                         or rooms[ip_id].new_lease(workload, False, families))
        except CapacityError as e:
            reasons.append(f"{ip_id}: {e.reason}")
            continue
        heapq.heappush(heap, (len(rooms[ip_id].workloads), ip_id))
        return ip_id, reasons
    return None, reasons


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



# --- incremental allocation (docs/design.md, "Incremental syncs") ---------------------

@dataclass
class Holders:
    """Who holds what, kept beside the allocations the kernel took, so that a change
    looks workloads up instead of scanning all of them."""

    by_ip: dict[str, set[str]] = field(default_factory=dict)  # ip id -> workloads with a lease on it
    wids: set[int] = field(default_factory=set)  # the wids of the workloads
    temporary: set[str] = field(default_factory=set)  # workloads holding a failover block
    # the wids below `top` that no workload has, ascending; every wid from top up is free
    free: list[int] = field(default_factory=list)
    top: int = 1

    @staticmethod
    def of(a: Allocations) -> "Holders":
        h = Holders(wids=set(a.wids.values()))
        for (w, ip), lease in a.leases.items():
            h.by_ip.setdefault(ip, set()).add(w)
            if lease.temporary:
                h.temporary.add(w)
        h.top = max(h.wids, default=0) + 1
        h.free = sorted(set(range(1, h.top)) - h.wids)
        return h

    def free_wids(self) -> Iterator[int]:
        """The wids no workload has, ascending (endless)."""
        yield from self.free
        yield from itertools.count(self.top)

    def update(self, change: "AllocChange") -> None:
        """Once `change` was applied."""
        moved = [(change.before_wids[w], now) for w, now in change.wids.items()]
        for was, now in moved:  # every wid given up before any is taken: two may swap
            if was is not None and was != now:
                self.wids.discard(was)
                bisect.insort(self.free, was)
        for was, now in moved:
            if now is not None and now != was:
                self.wids.add(now)
                if now >= self.top:
                    self.free.extend(range(self.top, now))
                    self.top = now + 1
                elif (i := bisect.bisect_left(self.free, now)) < len(self.free) and self.free[i] == now:
                    del self.free[i]
        self.temporary -= change.wids.keys()
        for (w, ip), lease in change.before_leases.items():
            if lease is not None:
                self.by_ip[ip].discard(w)
        for (w, ip), lease in change.leases.items():
            if lease is not None:
                self.by_ip.setdefault(ip, set()).add(w)
                if lease.temporary:
                    self.temporary.add(w)

    def with_ips(self, ips: Iterable[str]) -> None:
        for ip in ips:
            self.by_ip.setdefault(ip, set())


def displaced(cfg: Config, prev: Allocations, changed: set[str], holders: Holders) -> set[str]:
    """The workloads not in `changed` whose lease overlaps a fixed block of one in
    `changed` (set or moved by this config): they move too, as allocate() moves them,
    where an incremental allocation would otherwise keep their lease unseen."""
    fixed: dict[str, list[Ports]] = {}  # ip id -> the changed workloads' fixed blocks there
    for w in changed:
        for ip_id, block in cfg.fixed_blocks_of(w).items():
            fixed.setdefault(ip_id, []).append(block)
    out = set()
    for ip_id, blocks in fixed.items():
        blocks.sort()  # disjoint (config checks it): the block starting last below a lease's
        starts = [lo for lo, _ in blocks]  # end is the only one that may reach into it
        ip = cfg.ip(ip_id)
        # the IPv6 addresses those blocks fix (_Room.fixed6)
        fixed6 = {str(ipaddress.IPv6Network(ip.ipv6)[lo]) for lo in starts
                  if lo < ipaddress.IPv6Network(ip.ipv6).num_addresses} if ip.ipv6 else set()
        for w in holders.by_ip.get(ip_id, ()):
            lease = prev.leases[(w, ip_id)]
            ports = lease.ports
            i = bisect.bisect_right(starts, ports[1]) - 1 if ports else -1
            if w not in changed and (i >= 0 and blocks[i][1] >= ports[0]
                                     or lease.ipv6 in fixed6):
                out.add(w)
    return out


class NeedsFullAllocation(Exception):
    """The change is not one the incremental allocation covers (the egress IPs changed)."""


def allocate_changed(cfg: Config, prev: Allocations, usable: Usable, changed: set[str],
                     holders: Holders) -> tuple[Allocations, list[Event]]:
    """`allocate(cfg, prev, usable)` for a config in which only the workloads in
    `changed` (added, removed or edited) differ from the one `prev` was made for, or
    whose egress IPs changed usability, or that a fixed block displaces (displaced());
    every other workload keeps what it holds.

    The work is the changed workloads' and the rooms (port blocks) of the egress IPs
    they touch, not the host's: the full allocate() is the oracle it must equal
    (tests/unit/test_incremental.py)."""
    here = {ip.id: ip for ip in cfg.ips_here()}
    if set(prev.eids) != set(here):
        raise NeedsFullAllocation("egress IPs changed")
    by_id = cfg.workloads_by_id  # the workloads of the new config
    present = cfg.in_order(changed)
    ws = [by_id[w] for w in present]

    linger_wid = {l.lease.workload: l.wid for l in prev.lingering.values()}
    wids = {w: prev.wids[w] for w in present if w in prev.wids}  # of the changed workloads
    taken: set[int] = set()
    for w in present:
        if w not in wids and w in linger_wid and linger_wid[w] not in holders.wids \
                and linger_wid[w] not in taken:
            wids[w] = linger_wid[w]
            taken.add(wids[w])
    lingering_wids = set(linger_wid.values())
    free = holders.free_wids()  # as _FreeIds takes them in allocate(), without a scan
    for w in present:
        if w not in wids:
            cursor = next(c for c in free if c not in lingering_wids and c not in taken)
            wids[w] = cursor
            taken.add(cursor)
            if cursor > names.WID_MAX:
                raise CapacityError(w, "-", f"more than {names.WID_MAX} workloads")

    rests = [(l, r) for l in prev.lingering.values()
             if (r := l.rest(prev.leases.get((l.lease.workload, l.lease.ip)))) is not None]
    rooms = _Rooms(cfg, here, prev, holders, changed, rests)
    by_v4 = {ip.ipv4: ip.id for ip in here.values() if ip.ipv4}
    v6_ips = [(ipaddress.IPv6Network(ip.ipv6), ip.id) for ip in here.values() if ip.ipv6]

    def load(ip_id: str) -> int:
        return len(rooms[ip_id].workloads) if ip_id in rooms else len(holders.by_ip.get(ip_id, ()))

    # 1. the changed workloads keep what still fits
    prev_keys = sorted(k for w in changed for k in _keys_of(prev.leases, w, here))
    need = {w.id: needed_ips(cfg, w) for w in ws}
    leases: dict[tuple[str, str], Lease] = {}
    for key in prev_keys:
        lease = prev.leases[key]
        w, ip_id = key
        if w not in by_id:
            continue
        room = rooms[ip_id]
        if _keeps(cfg, prev, by_id[w], lease, need[w], here[ip_id]) and room.fits(lease) \
                and (room.max is None or len(room.workloads) < room.max):
            room.take(lease)
            leases[key] = lease
    for key in prev_keys:
        if key not in leases:
            lease = prev.leases[key]
            hit = {by_v4.get(lease.ipv4)} if lease.ipv4 else set()
            if lease.ipv6:
                a = ipaddress.IPv6Address(lease.ipv6)
                hit |= {ip_id for net, ip_id in v6_ips if a in net}
            for ip_id in sorted(i for i in hit if i is not None):
                rooms[ip_id].reserve(lease, retake=lease.workload in by_id)

    # 2-4. as allocate() does, for the changed workloads alone
    def no_room(e: CapacityError) -> None:
        raise e
    app_choice, app_choice6 = _place(
        cfg, ws, prev, here, usable, rooms, leases, need, load, no_room, {}, {})

    updates = {**dict.fromkeys(prev_keys), **leases}
    lingering, events = _outcome(prev, prev_keys, leases, _Over(prev.leases, updates))
    return AllocChange(prev, {w: wids.get(w) for w in changed},
                       {w: app_choice.get(w) for w in changed},
                       {w: app_choice6.get(w) for w in changed}, updates, lingering), events


class _Over(Mapping):
    """`base` read with `top` over it (a key whose value there is None is gone):
    the new allocations of an incremental one, before they are written into the old."""

    __slots__ = ("base", "top")

    def __init__(self, base: dict, top: dict) -> None:
        self.base, self.top = base, top

    def __getitem__(self, key):
        v = self.top[key] if key in self.top else self.base[key]
        if v is None:
            raise KeyError(key)
        return v

    def __contains__(self, key) -> bool:
        return self.top[key] is not None if key in self.top else key in self.base

    def __iter__(self):
        yield from (k for k, v in self.top.items() if v is not None)
        yield from (k for k in self.base if k not in self.top)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class AllocChange:
    """What an incremental allocation changes in `prev`: the new value of each key of
    the changed workloads (None: it goes) and the lingering blocks after it. `view`
    reads as the new allocations (to plan those workloads); `apply` writes the change
    into prev's dicts in place, once the kernel took the plan: a 100k-workload host's
    dicts are not copied per sync. `before` keeps what the keys held (Holders)."""

    def __init__(self, prev: Allocations, wids: dict, app_choice: dict, app_choice6: dict,
                 leases: dict, lingering: dict) -> None:
        self.prev = prev
        self.wids, self.app_choice, self.app_choice6, self.leases = wids, app_choice, app_choice6, leases
        self.lingering: dict[BlockKey, Lingering] = lingering
        self.before_wids = {w: prev.wids.get(w) for w in wids}
        self.before_leases = {k: prev.leases.get(k) for k in leases}
        self.view = Allocations(_Over(prev.wids, wids), prev.eids,  # type: ignore[arg-type]
                                _Over(prev.app_choice, app_choice), _Over(prev.leases, leases),
                                _Over(prev.app_choice6, app_choice6), self.lingering)

    def apply(self) -> Allocations:
        """The new allocations, written into prev's dicts (prev is the old no more)."""
        p = self.prev
        for d, top in ((p.wids, self.wids), (p.app_choice, self.app_choice),
                       (p.app_choice6, self.app_choice6), (p.leases, self.leases)):
            for k, v in top.items():
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v
        return Allocations(p.wids, p.eids, p.app_choice, p.leases, p.app_choice6, self.lingering)


def _place(cfg: Config, ws: Iterable[Workload], prev: Allocations, here: dict[str, EgressIP],
           usable: Usable, rooms, leases: dict, need: dict[str, list[str]], load, no_room,
           app_choice: dict[str, str], app_choice6: dict[str, str]
           ) -> tuple[dict[str, str], dict[str, str]]:
    """Steps 2-5 of an allocation, for the workloads `ws` in config order, once every
    lease that still fits was kept (step 1): the fixed blocks, the app choice, the app's
    IPv6 when the choice has none, the policy and machine-scoped IPs, failover blocks,
    and `leases` left with those alone. Returns the app choices (`app_choice`,
    `app_choice6` extended)."""
    ws = list(ws)

    def lease_on(w: Workload, ip_ids: Iterable[str]) -> None:
        """A lease of every family on each of `ip_ids`, which `w` needs whatever else
        happens: a failover block it holds there becomes its own (released with the
        failover, the IP would be left without a lease that nothing gives back)."""
        for ip_id in ip_ids:
            lease = leases.get((w.id, ip_id))
            if ip_id not in here or lease is not None and not lease.temporary:
                continue
            try:
                if lease is None:
                    leases[(w.id, ip_id)] = rooms[ip_id].new_lease(w.id, False)
                    continue
                for fam in (4, 6):
                    if _family_wanted(here[ip_id], fam) and not (lease.ports if fam == 4 else lease.ipv6):
                        lease = rooms[ip_id].widen(lease, fam)
                leases[(w.id, ip_id)] = replace(lease, temporary=False)
            except CapacityError as e:
                no_room(e)

    # 1b. fixed blocks, before any other new lease: they are the config's, not a choice
    for w in ws:
        if w.blocks:
            lease_on(w, w.blocks)

    # 2. app choice: keep it while it is in the app; else least loaded active IP
    # the app IP serves IPv4 when the app has any IPv4 (step 2b adds IPv6 if it lacks it)
    active_ids = {app: {ip.id for ip in _first_family_ips(cfg.app_ips(app)) if ip.state == "active"}
                  for app in {w.app for w in ws if w.app}}
    # least loaded first: a heap of (workloads on it, id) per app, built when first needed
    heaps: dict[str, list[tuple[int, str]]] = {}
    for w in ws:
        candidates = app_ips(cfg, w)
        if not candidates or _own_covers_both(cfg, w):
            continue
        pinned = _pinned(cfg, w)
        allowed = active_ids[w.app] if not pinned else {ip.id for ip in pinned
                                                         if ip.state == "active"}
        prev_choice = prev.app_choice.get(w.id)
        if prev_choice in allowed and (w.id, prev_choice) in leases:
            app_choice[w.id] = prev_choice
            continue
        heap = _app_heap(pinned, load) if pinned else heaps.get(w.app)
        if heap is None:
            heap = heaps[w.app] = _app_heap(_first_family_ips(candidates), load)
        ip_id, reasons = _least_loaded(heap, rooms, leases, w.id, (4, 6))
        if ip_id is not None:
            app_choice[w.id] = ip_id
        else:
            no_room(CapacityError(w.id, ",".join(ip.id for ip in candidates),
                                  f"every egress IP of app {w.app!r} is full ({'; '.join(reasons)})"))

    # 2b. IPv6 from another IP of the app when the app IP has no IPv6 range
    heaps6: dict[str, list[tuple[int, str]]] = {}
    with_v6: dict[Optional[str], list[EgressIP]] = {}  # app -> its IPs with an IPv6 range
    for w in ws:
        choice = app_choice.get(w.id)
        if choice is None or here[choice].ipv6:
            continue
        candidates = with_v6.get(w.app)
        if candidates is None:
            candidates = with_v6[w.app] = [ip for ip in app_ips(cfg, w) if ip.ipv6]
        if not candidates:
            continue  # the app has no IPv6: defaults.unavailable
        prev6 = prev.app_choice6.get(w.id)
        if (prev6 in {ip.id for ip in candidates if ip.state == "active"}
                and (w.id, prev6) in leases):
            app_choice6[w.id] = prev6
            continue
        heap = heaps6.get(w.app)
        if heap is None:
            heap = heaps6[w.app] = _app_heap(candidates, load)
        ip_id, reasons = _least_loaded(heap, rooms, leases, w.id, (6,))
        if ip_id is not None:
            app_choice6[w.id] = ip_id
        else:
            no_room(CapacityError(w.id, ",".join(ip.id for ip in candidates),
                                  f"every IPv6 range of app {w.app!r} is full ({'; '.join(reasons)})"))

    # 3. the IPs named by policies and machine-scoped IPs
    for w in ws:
        lease_on(w, need[w.id])

    # 4. failover: an app choice that cannot carry new traffic borrows a block
    #    on another usable IP of the same app; the original lease is kept, and
    #    the borrowed block is kept while the failover lasts, then released.
    #    A borrowed lease has only the family it is borrowed for (a second family
    #    widens it): the next allocation then finds the same blocks in use.
    borrowed: set[tuple[str, str]] = set()
    for w in ws:
        for fam in (4, 6):
            choice = (app_choice6 if fam == 6 and w.id in app_choice6 else app_choice).get(w.id)
            if choice is None or not _family_wanted(here[choice], fam) or usable.ok(here[choice], fam):
                continue
            alt_id = failover_target(cfg, w, here[choice], fam, usable, leases)
            if alt_id is None:
                for alt in sorted(app_ips(cfg, w), key=lambda ip: (load(ip.id), ip.id)):
                    if alt.id != choice and usable.ok(alt, fam):
                        held = leases.get((w.id, alt.id))
                        try:
                            # an IPv6-only lease on alt grows a block: kept, the same next time
                            leases[(w.id, alt.id)] = (rooms[alt.id].widen(held, fam) if held
                                                      else rooms[alt.id].new_lease(w.id, True, (fam,)))
                            alt_id = alt.id
                            break
                        except CapacityError:
                            continue
            if alt_id is not None:
                borrowed.add((w.id, alt_id))

    # 5. a kept lease that none of this uses goes now, not one allocation later (an
    #    incremental one would not look at the workload again): a failover block no
    #    longer borrowed, or the old choice of a workload whose choice moved (its
    #    block there did not fit any more, or a fixed block pinned it elsewhere)
    for key in [k for k, l in leases.items() if not (
            k in borrowed if l.temporary else
            k[1] in need[k[0]] or k[1] in (app_choice.get(k[0]), app_choice6.get(k[0])))]:
        del leases[key]
    return app_choice, app_choice6


def _keys_of(leases: dict, w: str, ips) -> list[tuple[str, str]]:
    return [(w, ip) for ip in ips if (w, ip) in leases]


class _Rooms(dict):
    """The rooms of the egress IPs an incremental allocation touches, each built on
    first use as allocate() has it when its step 2 begins: the lingering blocks, then
    the leases of every workload that did not change."""

    def __init__(self, cfg, here, prev, holders, changed, rests):
        super().__init__()
        self.args = (cfg, here, prev, holders, changed, rests)

    def __missing__(self, ip_id: str) -> _Room:
        cfg, here, prev, holders, changed, rests = self.args
        by_id = cfg.workloads_by_id
        room = self[ip_id] = _Room(cfg, here[ip_id])
        for _, rest in rests:
            if (rest.ipv4 and rest.ipv4 == room.ip.ipv4) or (
                    rest.ipv6 and room.ip.ipv6 and ipaddress.IPv6Address(rest.ipv6) in room.net6):
                room.reserve(rest, retake=rest.workload in by_id)
        for w in holders.by_ip.get(ip_id, ()):
            if w not in changed:
                room.take(prev.leases[(w, ip_id)])
        return room
