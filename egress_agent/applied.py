"""What the kernel accepted last, kept per workload, and the change to it.

Pure. An incremental sync (docs/design.md, "Incremental syncs") costs what
changed: the config is compared with the last applied one by workload id, an
address or link event names the egress IPs whose usability changed, and only
the workloads those touch are allocated (alloc.allocate_changed) and planned
again (plan.workload_elements). Their old elements are planned again from the
last applied config, allocations and host facts (a pure function of them:
nothing per workload is kept beyond what the allocations hold), so the nft
batch is the difference of those few. A change to anything but the
workloads (egress IPs, policies, defaults, ...) re-plans the whole host, from
memory; `plan.build` over everything is the oracle both must equal
(tests/unit/test_incremental.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from . import alloc as alloc_mod
from .config import Config
from .hoststate import HostFacts
from .model import Desired, Element, Observed
from .plan import Placed, Plan, build_shared, workload_elements


@dataclass
class Applied:
    """The last plan the kernel took: its config, allocations and host facts (from
    which any workload's elements follow), the shared part, who holds what."""

    cfg: Config
    alloc: alloc_mod.Allocations
    facts: HostFacts  # usable and addresses (cgroups: see missing_cgroups)
    shared: Desired
    missing_cgroups: set[str] = field(default_factory=set)  # workloads whose cgroup was absent
    holders: alloc_mod.Holders = field(default_factory=alloc_mod.Holders)

    @staticmethod
    def of(cfg: Config, plan: Plan, facts: HostFacts) -> "Applied":
        """Index a whole plan (after a full sync)."""
        holders = alloc_mod.Holders.of(plan.alloc)
        holders.with_ips(plan.alloc.eids)
        return Applied(cfg, plan.alloc, HostFacts(facts.usable, None, facts.addresses),
                       plan.shared, set(plan.missing_cgroups), holders)

    def elements_of(self, workload: str) -> list[Placed]:
        """What this workload put in the kernel with the last plan."""
        w = self.cfg.workloads[self.cfg.workload_positions[workload]]
        facts = HostFacts(self.facts.usable, frozenset() if workload in self.missing_cgroups
                          else None, self.facts.addresses)
        return workload_elements(self.cfg, self.alloc, w, leases_of(self.alloc, workload), facts)[0]

    def desired(self) -> Desired:
        """The whole plan again (O(workloads): for a full comparison with the kernel)."""
        return Desired(_elements(self.shared, (self.elements_of(w.id) for w in self.cfg.workloads)),
                       self.shared.chains, self.shared.routes, self.shared.rules)


def leases_of(alloc: alloc_mod.Allocations, workload: str) -> list[alloc_mod.Lease]:
    return [l for ip in alloc.eids if (l := alloc.leases.get((workload, ip)))]


@dataclass
class Change:
    """The plan for what changed: the new allocations and events, the changed
    workloads' elements before and after, the new shared part."""

    cfg: Config
    alloc: alloc_mod.Allocations
    events: list[alloc_mod.Event]
    facts: HostFacts
    workloads: set[str]  # every workload whose elements were planned again (or removed)
    placed: dict[str, list[Placed]]  # their new elements (removed workloads: absent)
    shared: Desired
    missing_cgroups: set[str]
    notes: list[str]

    def desired(self) -> Desired:
        """The part of the new plan that can differ from `applied`: its elements
        of the changed workloads, every shared element, chains, routes and rules."""
        return Desired(_elements(self.shared, self.placed.values()), self.shared.chains,
                       self.shared.routes, self.shared.rules)

    def before(self, applied: Applied, routes, rules) -> Observed:
        """The same part of what the kernel holds (it took `applied`); `routes` and
        `rules` as read from the kernel now."""
        from .nft.text import comments, skeleton_digest
        old = [applied.elements_of(w) for w in self.workloads
               if w in applied.cfg.workload_positions]
        return Observed(True, skeleton_digest(), _elements(applied.shared, old),
                        {c: comments(r) for c, r in applied.shared.chains.items()},
                        frozenset(routes), frozenset(rules))

    def applied(self, applied: Applied) -> Applied:
        """`applied` with this change in it (called once the kernel took it)."""
        applied.holders.update(applied.alloc, self.alloc, self.workloads)
        return Applied(self.cfg, self.alloc, HostFacts(self.facts.usable, None, self.facts.addresses),
                       self.shared,
                       (applied.missing_cgroups - self.workloads) | self.missing_cgroups,
                       applied.holders)


def _elements(shared: Desired, placed) -> dict[str, frozenset[Element]]:
    el: dict[str, set[Element]] = {n: set(v) for n, v in shared.elements.items()}
    for p in placed:
        for name, e in p:
            el[name].add(e)
    return {k: frozenset(v) for k, v in el.items()}


def changed_workloads(old: Config, new: Config) -> Optional[set[str]]:
    """The ids of the workloads added, removed or edited from `old` to `new`; None
    when anything else changed too (the whole host is planned again)."""
    if old is new:
        return set()
    for name in type(new).model_fields:
        if name != "workloads" and getattr(old, name) != getattr(new, name):
            return None
    # An entry the config reader did not change is the same object (config.Reader
    # keeps them): the objects are told apart by identity in C (set operations on
    # their ids), and only the others are compared, by id and then by value.
    before_objs, after_objs = old.workloads_by_object, new.workloads_by_object
    fresh = after_objs.keys() - before_objs.keys()
    if not fresh and len(after_objs) == len(before_objs):
        return set()
    gone = before_objs.keys() - after_objs.keys()
    before, after = old.workload_positions, new.workload_positions
    out = {w.id for w in map(before_objs.__getitem__, gone) if w.id not in after}
    for w in map(after_objs.__getitem__, fresh):
        j = before.get(w.id)
        # the fields as the models hold them (a Workload's are plain values): a dict
        # comparison in C, where pydantic's __eq__ costs ten times more
        if j is None or old.workloads[j].__dict__ != w.__dict__:
            out.add(w.id)
    return out


def usability_changed(applied: Applied, usable: alloc_mod.Usable) -> set[str]:
    """The workloads whose egress may change with `usable`: when some egress IP's
    usability changed, those holding a lease on an IP that is or was unusable
    (they fail over, back, or elsewhere), the owners of such IPs, and those
    holding a failover block."""
    before = applied.facts.usable
    ips = applied.cfg.ips_here()

    def fams(ip):
        return [f for f in (4, 6) if (ip.ipv4 if f == 4 else ip.ipv6)]
    if all(before.ok(ip, f) == usable.ok(ip, f) for ip in ips for f in fams(ip)):
        return set()
    out = set(applied.holders.temporary)
    for ip in ips:
        if any(not before.ok(ip, f) or not usable.ok(ip, f) for f in fams(ip)):
            out |= applied.holders.by_ip.get(ip.id, set())
            if ip.workload:
                out.add(ip.workload)
    return out


def plan_change(applied: Applied, cfg: Config, usable: alloc_mod.Usable,
                addresses: frozenset[str], cgroup_exists: Callable[[str], bool],
                all_cgroups: bool = False) -> Optional[Change]:
    """The plan of what changed since `applied`, or None: more than workloads and
    usability changed (plan the whole host).

    Cgroups: a missing one may have appeared, and the changed workloads' are looked
    at anew; with `all_cgroups` (the periodic resync) every workload's, so that one
    that vanished leaves the kernel too."""
    changed = changed_workloads(applied.cfg, cfg)
    if changed is None:
        return None
    changed |= usability_changed(applied, usable)
    # before the cgroups are looked at: a displaced workload's elements are planned anew
    changed |= alloc_mod.displaced(cfg, applied.alloc, changed, applied.holders)
    positions = cfg.workload_positions
    look = ({w.id for w in cfg.workloads if w.cgroup} if all_cgroups
            else {w for w in applied.missing_cgroups | changed if w in positions})
    existing = frozenset(cfg.workloads[positions[w]].cgroup for w in look
                         if cfg.workloads[positions[w]].cgroup
                         and cgroup_exists(cfg.workloads[positions[w]].cgroup))
    changed |= {w for w in look if (w in applied.missing_cgroups)
                == (cfg.workloads[positions[w]].cgroup in existing)}
    if not changed:  # nothing to allocate: the allocations stay the same object
        new_alloc, events = applied.alloc, []
    else:
        try:
            new_alloc, events = alloc_mod.allocate_changed(cfg, applied.alloc, usable, changed,
                                                           applied.holders, positions)
        except alloc_mod.NeedsFullAllocation:
            return None
    facts = HostFacts(usable, existing, addresses)
    placed, missing, notes = {}, set(), []
    for w in sorted((w for w in changed if w in positions), key=positions.__getitem__):
        wl = cfg.workloads[positions[w]]
        placed[w], note = workload_elements(cfg, new_alloc, wl, leases_of(new_alloc, w), facts)
        if note:
            missing.add(w)
            notes.append(note)
    shared = build_shared(cfg, new_alloc, HostFacts(usable, None, addresses))
    return Change(cfg, new_alloc, events, facts, changed, placed, shared, missing, notes)
