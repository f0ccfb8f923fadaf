"""What the kernel's maps hold, by workload and egress IP, in names.

Pure. The maps key everything by marks: a workload id (wid) and an egress id
(eid) packed in one integer (names.lease_mark). `decode` turns the elements of
one table (read from the kernel, or planned) into one `Programmed` per
workload: its sources and cgroups, and each lease's address, port block and
IPv6 address, flagged when it is the workload's default route (the assign
maps). `egress-agent list` prints that for the running kernel (what `cilium-dbg
bpf egress list` is to Cilium); `plan` compares the running kernel's with the
planned one, workload by workload (`changes`).

`adopt.py` rebuilds allocations from the same decoding, knowing the workloads
by their configured sources; here they are known by the ids the store gave
them, since a config edit not applied yet must not rename what the kernel holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from . import names
from .model import Element


@dataclass
class Raw:
    """The maps of one table, decoded by wid and lease mark."""

    # wid -> (source address, the interface it is bound to or None)
    sources: dict[int, list[tuple[str, Optional[str]]]] = field(default_factory=dict)
    cgroups: dict[int, list[str]] = field(default_factory=dict)
    v4: dict[int, tuple[str, Optional[tuple[int, int]]]] = field(default_factory=dict)
    v6: dict[int, str] = field(default_factory=dict)
    assign: dict[int, dict[int, int]] = field(default_factory=dict)  # family -> wid -> mark


def raw(elements: Mapping[str, Iterable[Element]]) -> Raw:
    r = Raw()
    for fam in (4, 6):
        for key, wid in elements.get(names.SOURCE_MAP[fam], ()):
            r.sources.setdefault(wid, []).append((key, None))
        for (addr, ifname), wid in elements.get(names.SOURCE_IF_MAP[fam], ()):
            r.sources.setdefault(wid, []).append((addr, ifname))
        r.assign[fam] = dict(elements.get(names.ASSIGN_MAP[fam], ()))
    for level in names.CGROUP_LEVELS:
        for path, wid in elements.get(names.cgroup_map(level), ()):
            if isinstance(path, str):
                r.cgroups.setdefault(wid, []).append(path)
    for mark, addr in elements.get(names.SNAT4_ADDR_MAP, ()):
        r.v4[mark] = (addr, None)
    for mark, (addr, ports) in elements.get(names.SNAT4_PORTS_MAP, ()):
        r.v4[mark] = (addr, tuple(ports))
    r.v6 = dict(elements.get(names.SNAT6_MAP, ()))
    return r


@dataclass(frozen=True)
class Lease:
    ip: str  # the egress IP's id, or "eid N" when nothing names it
    ipv4: Optional[str]
    ports: Optional[tuple[int, int]]
    ipv6: Optional[str]
    default: bool  # the workload's default route (not only a policy's)

    def v4_text(self) -> Optional[str]:
        """`203.0.113.10:1024-2047`, the address alone without a block, or None."""
        if not self.ipv4:
            return None
        return f"{self.ipv4}:{self.ports[0]}-{self.ports[1]}" if self.ports else self.ipv4

    def text(self) -> str:
        return " ".join(x for x in (self.ip, self.v4_text(), self.ipv6) if x) \
            + ("" if self.default else " (policy)")

    def to_json(self) -> dict:
        return {"ip": self.ip, "ipv4": self.ipv4, "ports": list(self.ports) if self.ports else None,
                "ipv6": self.ipv6, "default": self.default}


@dataclass(frozen=True)
class Programmed:
    workload: str  # its id, or "wid N" when the store does not name it
    sources: tuple[tuple[str, Optional[str]], ...]  # (address, interface bound to or None)
    cgroups: tuple[str, ...]
    leases: tuple[Lease, ...]

    def leases_text(self) -> str:
        return ", ".join(x.text() for x in self.leases) or "no lease"

    def from_text(self) -> str:
        """`10.0.1.2 on vm-m42, fd00:1::2 on vm-m42`, `cgroup app.slice/x.service`"""
        return ", ".join([f"{a} on {i}" if i else a for a, i in self.sources]
                         + [f"cgroup {c}" for c in self.cgroups]) or "nothing"

    def to_json(self) -> dict:
        return {"workload": self.workload,
                "sources": [{"address": a, "interface": i} for a, i in self.sources],
                "cgroups": list(self.cgroups), "leases": [x.to_json() for x in self.leases]}


def decode(elements: Mapping[str, Iterable[Element]], wids: Mapping[str, int],
           eids: Mapping[str, int]) -> dict[str, Programmed]:
    """Every workload the maps hold, by name (`wids`, `eids`: the ids the store
    gave workloads and egress IPs), sorted by name."""
    r = raw(elements)
    workload_of = {wid: w for w, wid in wids.items()}
    ip_of = {eid: i for i, eid in eids.items()}
    defaults = {m for fam in (4, 6) for m in r.assign[fam].values()}
    leases: dict[int, list[Lease]] = {}
    for mark in set(r.v4) | set(r.v6):
        wid, eid = names.split_mark(mark)
        addr4, ports = r.v4.get(mark, (None, None))
        leases.setdefault(wid, []).append(
            Lease(ip_of.get(eid, f"eid {eid}"), addr4, ports, r.v6.get(mark), mark in defaults))
    out = {}
    for wid in set(r.sources) | set(r.cgroups) | set(leases):
        name = workload_of.get(wid, f"wid {wid}")
        out[name] = Programmed(name, tuple(sorted(r.sources.get(wid, ()))),
                               tuple(sorted(r.cgroups.get(wid, ()))),
                               tuple(sorted(leases.get(wid, ()), key=lambda x: (not x.default, x.ip))))
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Change:
    kind: str  # "+" new, "-" gone, "~" changed
    workload: str
    before: Optional[Programmed]
    after: Optional[Programmed]

    def text(self) -> str:
        """`+ m45: billing-1 203.0.113.10:3072-4095 2001:db8:10::102; from 10.0.1.5 on vm-m45`,
        `~ m43: billing-2 203.0.113.11:1024-2047 → partner-link 203.0.113.140:2048-3071`"""
        b, a = self.before, self.after
        if b is None or a is None:
            p = a or b
            assert p is not None
            return f"{self.kind} {self.workload}: {p.leases_text()}; from {p.from_text()}"
        parts = []
        was, now = _by_role(b), _by_role(a)
        if was[True] != now[True]:  # the default route moved
            parts.append(f"{_texts(was[True])} → {_texts(now[True])}")
        # a policy's lease that came or went (one that became the default was said above)
        ids = {_plain(x) for x in was[True] | now[True]}
        parts += [f"{sign}{x.text()}" for sign, old, new in (("-", was, now), ("+", now, was))
                  for x in sorted(old[False] - new[False], key=_plain) if _plain(x) not in ids]
        if (b.sources, b.cgroups) != (a.sources, a.cgroups):
            parts.append(f"from {b.from_text()} → {a.from_text()}")
        return f"~ {self.workload}: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {"change": self.kind, "workload": self.workload,
                "before": self.before.to_json() if self.before else None,
                "after": self.after.to_json() if self.after else None}


def _plain(x: Lease) -> tuple:
    return (x.ip, x.ipv4, x.ports, x.ipv6)


def _by_role(p: Programmed) -> dict[bool, set[Lease]]:
    """The leases that are the default route (True) and the policies' (False)."""
    return {role: {x for x in p.leases if x.default == role} for role in (True, False)}


def _texts(leases: set[Lease]) -> str:
    return ", ".join(x.text() for x in sorted(leases, key=_plain)) or "nothing"


def changes(before: Mapping[str, Programmed], after: Mapping[str, Programmed]) -> list[Change]:
    """Workload by workload, what differs between two decodings, sorted by name."""
    out = []
    for w in sorted(set(before) | set(after)):
        b, a = before.get(w), after.get(w)
        if b != a:
            out.append(Change("+" if b is None else "-" if a is None else "~", w, b, a))
    return out
