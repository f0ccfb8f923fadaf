"""One sync: observe, plan, diff, apply, remember. Effects, kept thin.

Apply order keeps every intermediate state harmless (DESIGN.md): routes and ip
rules are added before the nft batch that marks traffic for them, and removed
after the batch that stops marking. What was applied is remembered only after
the kernel said yes; any failure makes the next sync a full one (read the
kernel again instead of trusting memory).
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from . import alloc as alloc_mod
from . import shape as shape_mod
from .adopt import adopt
from .config import Config
from .drift import Finding, findings
from .hoststate import HostState
from .model import Desired, Observed
from .nft import NftPort
from .plan import HostFacts, Plan, build
from .render import observed_from_json, skeleton_shape, transaction
from .routing import RoutingPort, diff_routes, split_ops
from .store import Store


@dataclass
class SyncResult:
    trigger: str
    mode: str  # "full" | "incremental"
    added: int = 0
    removed: int = 0
    route_ops: list[str] = field(default_factory=list)
    policies_changed: bool = False
    skeleton_replaced: bool = False
    adopted: bool = False
    duration_ms: float = 0.0
    notes: list[str] = field(default_factory=list)
    batch: str = ""
    usable: alloc_mod.Usable = field(default_factory=alloc_mod.Usable)  # what the plan used
    drift: list[Finding] = field(default_factory=list)  # what the kernel lost or gained

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.route_ops or self.policies_changed
                    or self.skeleton_replaced)

    def to_json(self) -> dict:
        return {"trigger": self.trigger, "mode": self.mode, "changed": self.changed,
                "elements_added": self.added, "elements_removed": self.removed,
                "route_ops": self.route_ops, "policies_changed": self.policies_changed,
                "skeleton_replaced": self.skeleton_replaced, "adopted": self.adopted,
                "duration_ms": round(self.duration_ms, 2), "notes": self.notes,
                "drift": [str(f) for f in self.drift]}


def usable_from(cfg: Config, host: HostState) -> alloc_mod.Usable:
    """An egress IP is usable while its address is on the host and its link is up."""
    v4 = frozenset(ip.id for ip in cfg.ips_here() if ip.ipv4 and host.has_address(ip.ipv4)
                   and (ip.via is None or host.link_up(ip.via.dev)))
    v6 = set()
    for ip in cfg.ips_here():
        if not ip.ipv6 or (ip.via and not host.link_up(ip.via.dev)):
            continue
        net = ipaddress.ip_network(ip.ipv6)
        if any(ipaddress.ip_address(a) in net for a in host.addresses if ":" in a):
            v6.add(ip.id)
    return alloc_mod.Usable(v4, frozenset(v6))


def existing_cgroups(cfg: Config, root: str = "/sys/fs/cgroup") -> frozenset[str]:
    """The configured cgroup paths that exist now (libnftables resolves them there)."""
    return frozenset(w.cgroup for w in cfg.workloads
                     if w.cgroup and os.path.isdir(os.path.join(root, w.cgroup)))


# Triggers of a drift check (nftwatch.py), each reading only what it is about:
# a foreign nft commit on our table reads the table, a rule or route event in
# our ranges reads the routes. Both plan with the host facts of the last sync
# (addresses and links have their own events); a route found missing reads the
# host before it is called drift (a link that went down takes its routes with
# it). A full sync reads everything.
DRIFT_NFT, DRIFT_ROUTES = "drift", "drift-routes"


class Reconciler:
    def __init__(self, nft: NftPort, routing: RoutingPort, store: Store,
                 read_host: Callable[[], HostState], cgroup_root: str = "/sys/fs/cgroup"):
        self.nft = nft
        self.routing = routing
        self.store = store
        self.read_host = read_host
        self.cgroup_root = cgroup_root
        self.applied: Optional[Observed] = None  # what the kernel accepted last
        self.alloc: Optional[alloc_mod.Allocations] = None  # stored with it
        self.full_next = True
        # The skeleton's shape as this kernel lists it; None: as shape.py reads the
        # source. Set once, after this process first wrote the skeleton, if the
        # kernel's listing differs (another nft version): comparing with the
        # pure shape then would see drift after every repair, forever.
        self.expected_shape: Optional[shape_mod.Shape] = None
        self.shape_checked = False
        self.host: Optional[HostState] = None  # read by the last plan

    def facts(self, cfg: Config, reuse: bool = False) -> HostFacts:
        if not reuse or self.host is None:
            self.host = self.read_host()
        return HostFacts(usable_from(cfg, self.host), existing_cgroups(cfg, self.cgroup_root),
                         self.host.addresses)

    def observe(self) -> Observed:
        routes, rules = self.routing.dump()
        return observed_from_json(self.nft.list_table(), routes, rules)

    def plan(self, cfg: Config, observed: Observed,
             reuse_facts: bool = False) -> tuple[Plan, list[alloc_mod.Event], bool]:
        # the allocations committed with the last sync; the store after a failure or at start
        prev = self.alloc if self.alloc is not None and not self.full_next else self.store.load()
        adopted = False
        if not self.store.exists() and observed.table:
            prev, adopted = adopt(cfg, observed), True
        facts = self.facts(cfg, reuse_facts)
        new_alloc, events = alloc_mod.allocate(cfg, prev, facts.usable)
        return build(cfg, new_alloc, facts), events, adopted

    def sync(self, cfg: Config, trigger: str = "manual", full: bool = False) -> SyncResult:
        t0 = time.perf_counter()
        mode = "full" if (full or self.full_next or self.applied is None) else "incremental"
        if mode == "full":
            observed = self.observe()
        elif trigger == DRIFT_NFT:
            # a foreign commit touched our table: read it (the routes have their own events)
            assert self.applied is not None
            mode = "drift"
            observed = replace(observed_from_json(self.nft.list_table()),
                               routes=self.applied.routes, rules=self.applied.rules)
        else:
            # nft state from memory (the kernel said yes to it); routes are read
            # every time: the kernel drops them when a link goes down.
            assert self.applied is not None
            routes, rules = self.routing.dump()
            observed = replace(self.applied, routes=routes, rules=rules)
        try:
            reuse = mode == "drift" or (mode == "incremental" and trigger == DRIFT_ROUTES)
            plan, events, adopted = self.plan(cfg, observed, reuse_facts=reuse)
            d = plan.desired
            drift = (findings(self.applied, d, observed, self.expected_shape,
                              self._link_up(fresh=reuse))
                     if self.applied is not None else [])
            ops = diff_routes(d.routes, d.rules, observed.routes, observed.rules)
            tx = transaction(d, observed, self.expected_shape)
            before, after = split_ops(ops)
            self.routing.apply(before)
            self.nft.run(tx.text)
            self.routing.apply(after)
            if (tx.full or tx.repaired) and not self.shape_checked:
                self._learn_shape(plan.notes)
        except Exception:
            self.full_next = True
            raise
        self.store.save(plan.alloc, events)
        self.alloc = plan.alloc
        self.applied = _as_observed(d)
        self.full_next = False
        return SyncResult(trigger, mode, tx.added, tx.removed, [op.describe() for op in ops],
                          tx.policies_changed and not tx.full,
                          bool((tx.full and observed.table) or tx.repaired),
                          adopted, (time.perf_counter() - t0) * 1000, plan.notes, tx.text,
                          plan.usable, drift)

    def _link_up(self, fresh: bool) -> Callable[[str], bool]:
        """Whether a link is up, for the routes found missing; `fresh`: the host
        facts the plan used may be old, read the host (once) if it comes to that."""
        host = None if fresh else self.host

        def up(dev: str) -> bool:
            nonlocal host
            if host is None:
                host = self.read_host()
            return host.link_up(dev)
        return up

    def _learn_shape(self, notes: list[str]) -> None:
        """Right after this process first wrote (some of) the skeleton: does the kernel list
        it as shape.py expects? If not, compare with the kernel's listing from now on."""
        self.shape_checked = True
        got = shape_mod.from_json(self.nft.list_table(terse=True))
        want = skeleton_shape()
        if got != want:
            self.expected_shape = got
            notes.append("the kernel lists the skeleton otherwise than expected ("
                         + "; ".join(shape_mod.differences(want, got)[:3])
                         + "); drift is compared with the kernel's own listing from now on")

    def teardown(self) -> SyncResult:
        t0 = time.perf_counter()
        observed = self.observe()
        ops = diff_routes(frozenset(), frozenset(), observed.routes, observed.rules)
        before, after = split_ops(ops)  # the guard rules go before the table
        self.routing.apply(before)
        if observed.table:
            self.nft.run("delete table inet egress_agent\n")
        self.routing.apply(after)
        removed = sum(len(v) for v in observed.elements.values())
        self.applied, self.alloc, self.full_next = None, None, True
        return SyncResult("teardown", "full", 0, removed, [op.describe() for op in ops],
                          duration_ms=(time.perf_counter() - t0) * 1000)


def _as_observed(d: Desired) -> Observed:
    from .render import comments, skeleton_digest
    return Observed(True, skeleton_digest(), dict(d.elements),
                    {c: comments(r) for c, r in d.chains.items()}, d.routes, d.rules)
