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
from .config import Config, Workload, workload_changes
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

    def elements_of(self, w: Workload) -> list[Placed]:
        """What this workload (of `cfg`) put in the kernel with the last plan."""
        facts = HostFacts(self.facts.usable, frozenset() if w.id in self.missing_cgroups
                          else None, self.facts.addresses)
        return workload_elements(self.cfg, self.alloc, w, leases_of(self.alloc, w.id), facts)[0]

    def desired(self) -> Desired:
        """The whole plan again (O(workloads): for a full comparison with the kernel)."""
        return Desired(_elements(self.shared, map(self.elements_of, self.cfg.workloads)),
                       self.shared.chains, self.shared.routes, self.shared.rules)


def leases_of(alloc: alloc_mod.Allocations, workload: str) -> list[alloc_mod.Lease]:
    return [l for ip in alloc.eids if (l := alloc.leases.get((workload, ip)))]


@dataclass
class Change:
    """The plan for what changed: the new allocations and events, the changed
    workloads' elements before and after, the new shared part."""

    cfg: Config
    alloc: alloc_mod.Allocations  # the new allocations (AllocChange.view until applied)
    commit: Optional[alloc_mod.AllocChange]  # what `apply` writes once the kernel took it
    events: list[alloc_mod.Event]
    facts: HostFacts
    workloads: set[str]  # every workload whose elements were planned again (or removed)
    old: dict[str, Workload]  # those of them in the applied config, as it has them
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
        old = map(applied.elements_of, self.old.values())
        return Observed(True, skeleton_digest(), _elements(applied.shared, old),
                        {c: comments(r) for c, r in applied.shared.chains.items()},
                        frozenset(routes), frozenset(rules))

    def apply(self, applied: Applied) -> alloc_mod.Allocations:
        """The new allocations, written into the applied ones (once the kernel took
        this change: `applied` is then the old no more)."""
        if self.commit is None:
            return applied.alloc
        applied.holders.update(self.commit)
        return self.commit.apply()

    def applied(self, applied: Applied, alloc: alloc_mod.Allocations) -> Applied:
        """`applied` with this change (and `alloc`, what apply() gave) in it."""
        return Applied(self.cfg, alloc, HostFacts(self.facts.usable, None, self.facts.addresses),
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
    changes = workload_changes(old, new)
    if changes is None:
        return None
    added, removed = changes
    gone = {w.id: w for w in removed}
    out = set()
    for w in added:
        was = gone.pop(w.id, None)
        # the fields as the models hold them (a Workload's are plain values): a dict
        # comparison in C, where pydantic's __eq__ costs ten times more
        if was is None or was.__dict__ != w.__dict__:
            out.add(w.id)
    return out | gone.keys()


def old_versions(old: Config, new: Config, ids: set[str]) -> dict[str, Workload]:
    """The workloads of `ids` that `old` has, as it has them, found through `new`'s
    index and the changes between them when `new` knows those."""
    changes = ([], []) if old is new else new.changes_since(old)
    if changes is None:
        by_id = old.workloads_by_id
        return {w: by_id[w] for w in ids if w in by_id}
    added, removed = changes
    was = {w.id: w for w in removed}
    fresh = {w.id for w in added}
    by_id = new.workloads_by_id
    out = {}
    for w in ids:
        x = was.get(w) or (by_id.get(w) if w not in fresh else None)
        if x is not None:
            out[w] = x
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
    by_id = cfg.workloads_by_id
    look = ({w.id for w in cfg.workloads if w.cgroup} if all_cgroups
            else {w for w in applied.missing_cgroups | changed if w in by_id})
    existing = frozenset(by_id[w].cgroup for w in look
                         if by_id[w].cgroup and cgroup_exists(by_id[w].cgroup))
    changed |= {w for w in look if (w in applied.missing_cgroups) == (by_id[w].cgroup in existing)}
    new_alloc, commit, events = applied.alloc, None, []
    if changed:  # else nothing to allocate: the allocations stay the same object
        try:
            commit, events = alloc_mod.allocate_changed(cfg, applied.alloc, usable, changed,
                                                        applied.holders)
        except alloc_mod.NeedsFullAllocation:
            return None
        new_alloc = commit.view
    facts = HostFacts(usable, existing, addresses)
    placed, missing, notes = {}, set(), []
    for w in cfg.in_order(changed):
        placed[w], note = workload_elements(cfg, new_alloc, by_id[w], leases_of(new_alloc, w), facts)
        if note:
            missing.add(w)
            notes.append(note)
    shared = build_shared(cfg, new_alloc, HostFacts(usable, None, addresses))
    old = old_versions(applied.cfg, cfg, changed)
    return Change(cfg, new_alloc, commit, events, facts, changed, old, placed, shared, missing, notes)
