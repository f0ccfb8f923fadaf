"""One sync: observe, plan, diff, apply, remember. Effects, kept thin.

Apply order keeps every intermediate state harmless (docs/design.md, "Apply
order"): routes and ip rules are added before the nft batch that marks traffic
for them, and removed after the batch that stops marking; the guard rules go
the other way round. What was applied is remembered only after
the kernel said yes; any failure makes the next sync a full one (read the
kernel again instead of trusting memory).

Memory follows the kernel, not the disk: once the nft batch is accepted, the
new allocations are what the agent believes, whether or not the store write
that follows succeeds. A failed write (read-only or full state dir) is logged,
counted, kept pending (its history events keep the time the kernel took them)
and retried by every later sync; `SyncResult.store_error` tells the daemon to
schedule one soon. A store that does not validate is moved aside and the
kernel's live maps are adopted (adopt.py), with history for what was adopted.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import gc
import heapq
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from . import alloc as alloc_mod
from . import names
from . import log as logmod
from . import shape as shape_mod
from .adopt import adopt
from .applied import Applied, Change, plan_change
from .config import Config
from .drift import Finding, findings
from .gateway import gate_batch
from .hoststate import (HostFacts, HostState, Usable, cgroup_exists, existing_cgroups,
                        usable_from)
from .model import Desired, Observed
from .nft import NftPort
from .plan import Plan, build
from .nft.diff import transaction
from .nft.text import skeleton_shape
from .routing import RoutingPort, diff_routes, split_ops
from .store import Store, StoreCorrupt, event_record, lease_key, now_iso, open_assigns


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
    usable: Usable = field(default_factory=Usable)  # what the plan used
    quarantined: Optional[str] = None  # where a corrupt allocations.json was moved
    store_error: Optional[str] = None  # the kernel took the change, the store write failed
    drift: list[Finding] = field(default_factory=list)  # what the kernel lost or gained
    replanned: int = 0  # workloads allocated and planned again: what the sync cost
    # the workloads it touched, by name, sorted and at most NAMED of them (the log's
    # sync line): re-planned by an incremental sync, given or losing a block by a full one
    workloads: tuple[str, ...] = ()
    workloads_touched: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.route_ops or self.policies_changed
                    or self.skeleton_replaced)

    def to_json(self) -> dict:
        return {"trigger": self.trigger, "mode": self.mode, "changed": self.changed,
                "elements_added": self.added, "elements_removed": self.removed,
                "route_ops": self.route_ops, "policies_changed": self.policies_changed,
                "skeleton_replaced": self.skeleton_replaced, "adopted": self.adopted,
                "quarantined": self.quarantined, "store_error": self.store_error,
                "duration_ms": round(self.duration_ms, 2), "notes": self.notes,
                "drift": [str(f) for f in self.drift], "workloads_replanned": self.replanned,
                "workloads": list(self.workloads), "workloads_touched": self.workloads_touched}


# Triggers of a drift check (nftwatch.py), each reading only what it is about:
# a foreign nft commit on our table reads the table, a rule or route event in
# our ranges reads the routes. Both plan with the host facts of the last sync
# (addresses and links have their own events); a route found missing reads the
# host before it is called drift (a link that went down takes its routes with
# it). A full sync reads everything.
DRIFT_NFT, DRIFT_ROUTES = "drift", "drift-routes"
# The periodic resync: when nftables' generation is the one our last batch left,
# nothing was committed since, and memory is compared with the kernel's routes
# only; otherwise the whole table is read and compared.
RESYNC = "resync"
NAMED = 20  # workloads a sync result names (SyncResult.workloads)
# elements in a batch past which SyncResult keeps only a summary of it, and the
# memory the sync used is given back (trim_heap)
BIG_BATCH = 10_000


def _gc_paused(fn):
    """Run `fn` with Python's cyclic garbage collector paused. A full sync at 100k
    workloads allocates millions of tuples and strings, and the collector would walk
    the growing heap again and again: a quarter of the sync's CPU (bench/README.md).
    Reference counting frees them meanwhile; cycles wait for the next collection."""
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return paused


class Reconciler:
    def __init__(self, nft: NftPort, routing: RoutingPort, store: Store,
                 read_host: Callable[[], HostState], cgroup_root: str = "/sys/fs/cgroup",
                 live_leases: Optional[Callable[[list[int]], alloc_mod.Live]] = None):
        self.nft = nft
        self.routing = routing
        self.store = store
        self.read_host = read_host
        self.cgroup_root = cgroup_root
        # which of these lease marks conntrack still has connections of
        # (conntrack.live_leases);
        # None: unknown, released blocks linger until a reconciler that can tell
        self.live_leases = live_leases
        self.index: Optional[Applied] = None  # what the kernel accepted last, per workload
        self.alloc: Optional[alloc_mod.Allocations] = None  # the allocations it accepted with it
        # held while an incremental sync writes the new allocations into self.alloc's
        # dicts (AllocChange.apply): other threads read them through allocations()
        self.alloc_lock = threading.Lock()
        self.generation: Optional[int] = None  # nftables' generation after our last batch
        self.trusted = False  # memory is what the kernel held at that generation
        self._gen_start: Optional[int] = None
        self._after_ops: list = []
        self._batches = 1  # nft batches (commits) the last sync sent
        self.full_next = True
        self.quarantine = True  # move a corrupt store aside (False: plan only, touch nothing)
        self.unsaved: list[str] = []  # history lines the kernel took and the disk has not
        self.store_dirty = False  # allocations.json is older than self.alloc
        # the workloads whose allocations changed since the last write (journaled);
        # None: write allocations.json whole
        self.pending: Optional[set[str]] = None
        self.store_write_failures = 0
        self.log = logmod.get()
        self._quarantined: Optional[str] = None
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
        return replace(self.nft.read_table(), routes=routes, rules=rules)

    def plan(self, cfg: Config, observed: Observed, reuse_facts: bool = False
             ) -> tuple[Plan, list[alloc_mod.Event], bool, HostFacts]:
        prev, adopted_events, adopted = self.previous(cfg, observed)
        facts = self.facts(cfg, reuse_facts)
        new_alloc, events = alloc_mod.allocate(cfg, prev, facts.usable)
        return build(cfg, new_alloc, facts), adopted_events + events, adopted, facts

    def previous(self, cfg: Config, observed: Observed
                 ) -> tuple[alloc_mod.Allocations, list[alloc_mod.Event], bool]:
        """The allocations the kernel holds now: those of the last sync it accepted,
        else the store, else (store lost or corrupt) adopted from the live maps, with
        the history events that make `who` answer for what was adopted."""
        if self.alloc is not None:
            return self.alloc, [], False
        try:
            if self.store.exists():
                return self.store.load(), [], False
        except StoreCorrupt as e:
            moved = None
            if self.quarantine:
                try:
                    moved = self._quarantined = str(self.store.quarantine())
                except OSError as err:  # read-only too: adopt anyway; the next write replaces it
                    self.log.error("cannot move the corrupt allocation store aside", path=e.path,
                                   error=err.strerror or str(err))
            self.log.warning("allocation store corrupt: adopting the kernel's live state",
                             path=e.path, reason=e.reason, moved_to=moved)
        if not observed.table:
            return alloc_mod.Allocations(), [], False
        prev = adopt(cfg, observed)
        return prev, self._adoption_events(prev), True

    def _adoption_events(self, prev: alloc_mod.Allocations) -> list[alloc_mod.Event]:
        """Releases for what the history holds open and the kernel no longer has;
        assigns (marked adopted) for what the kernel has and the history does not."""
        try:
            open_ = open_assigns(self.store.history())
        except (OSError, StoreCorrupt):
            open_ = {}
        live = {lease_key(l): l for l in prev.leases.values()}
        events = [alloc_mod.Event("release", alloc_mod.Lease.from_json(ev))
                  for key, ev in open_.items() if key not in live]
        events += [_Adopted("assign", l) for key, l in sorted(live.items(), key=lambda kv: str(kv[0]))
                   if key not in open_]
        return events

    @_gc_paused
    def sync(self, cfg: Config, trigger: str = "manual", full: bool = False) -> SyncResult:
        t0 = time.perf_counter()
        self._quarantined = None
        self._gen_start = self._generation()
        # The periodic resync, or events the drift watch lost (a big batch of our own
        # overflows its socket): if nothing was committed to nftables since our last
        # batch, memory is the kernel, and only routes and host facts are read.
        unchanged = trigger in (RESYNC, DRIFT_NFT) and self._nft_unchanged()
        if unchanged:
            full = False
        mode = "full" if (full or self.full_next or self.index is None) else "incremental"
        if mode == "incremental" and (trigger != DRIFT_NFT or unchanged):
            # nft state from memory (the kernel said yes to it); routes are read
            # every time: the kernel drops them when a link goes down.
            routes, rules = self.routing.dump()
            reuse = trigger == DRIFT_ROUTES
            if not reuse or self.host is None:
                self.host = self.read_host()
            assert self.index is not None
            change = plan_change(self.index, cfg, usable_from(cfg, self.host), self.host.addresses,
                                 cgroup_exists(self.cgroup_root), all_cgroups=trigger == RESYNC)
            if change is not None:
                return self._apply_change(change, trigger, routes, rules, reuse, t0)
            applied = self.applied  # more than workloads changed: plan the whole host
            observed = replace(applied, routes=routes, rules=rules)
        elif mode == "incremental":
            # a foreign commit touched our table: read it (the routes have their own events)
            assert self.index is not None
            mode = "drift"
            applied = self.applied
            observed = replace(self.nft.read_table(), routes=applied.routes, rules=applied.rules)
        else:
            observed = self.observe()
            applied = self.applied if self.index is not None else None
        try:
            reuse = mode == "drift" or (mode == "incremental" and trigger == DRIFT_ROUTES)
            if mode == "drift" and self.index is not None and self.index.cfg is cfg:
                # the same config and host facts: what was applied is the plan again
                plan, events, adopted, facts = self._replay(), [], False, self.index.facts
            else:
                plan, events, adopted, facts = self.plan(cfg, observed, reuse_facts=reuse)
            d = plan.desired
            drift, ops, tx = self._commit(applied, d, observed, reuse)
        except Exception:
            self.full_next = True
            raise
        # The kernel took the batch: memory follows it, whatever the disk does next.
        self.alloc = self._drain(plan.alloc, events, plan.notes)
        self.index = Applied.of(cfg, replace(plan, alloc=self.alloc), facts)
        r = self._after(trigger, mode, ops, tx, plan.notes, plan.usable, events, adopted,
                        bool(tx.full and observed.table), drift, t0, len(cfg.workloads))
        if tx.added + tx.removed > BIG_BATCH or len(cfg.workloads) > BIG_BATCH:
            # a big batch, or a whole plan of a big host (and the table read from the
            # kernel for it): garbage now, 120 MB at 100k that glibc would keep
            del plan, d, observed, applied, tx
            trim_heap()
        return r

    def _apply_change(self, change: Change, trigger: str, routes, rules, reuse: bool,
                      t0: float) -> SyncResult:
        """An incremental sync: only what `change` re-planned is compared and sent."""
        assert self.index is not None
        try:
            d = change.desired()
            observed = change.before(self.index, routes, rules)
            applied = replace(observed, routes=self.index.shared.routes,
                              rules=self.index.shared.rules)
            drift, ops, tx = self._commit(applied, d, observed, reuse)
        except Exception:
            self.full_next = True
            raise
        with self.alloc_lock:  # another thread may be copying them (allocations())
            self.alloc = change.apply(self.index)
        self.alloc = self._drain(self.alloc, change.events, change.notes)
        self.index = change.applied(self.index, self.alloc)
        return self._after(trigger, "incremental", ops, tx, change.notes, change.facts.usable,
                           change.events, False, False, drift, t0, len(change.workloads),
                           change.workloads)

    def _commit(self, applied: Optional[Observed], d: Desired, observed: Observed, reuse: bool):
        """What drifted, the route ops and the batch that turn `observed` into `d`;
        the routes and rules the batch will mark for go in first, then the batch (the
        rest of the route ops go after it: _after)."""
        drift = (findings(applied, d, observed, self.expected_shape, self._link_up(fresh=reuse))
                 if applied is not None else [])
        ops = diff_routes(d.routes, d.rules, observed.routes, observed.rules)
        tx = transaction(d, observed, self.expected_shape)
        before, self._after_ops = split_ops(ops)
        self.routing.apply(before)
        if tx.full and not observed.table:
            # a table made from nothing: in several batches (Transaction.parts)
            batches = tx.parts()
            self._batches = len(batches)  # commits: _learn_generation
            for part in batches:
                self.nft.run(part)
        else:
            self._batches = 1
            self.nft.run(tx.text)
        return drift, ops, tx

    def _after(self, trigger, mode, ops, tx, notes, usable, events, adopted, replaced, drift,
               t0, replanned, changed: Optional[set[str]] = None) -> SyncResult:
        """Once the kernel took the batch: the routes that go after it, the history
        and the store, the generation that says nothing changed since."""
        at = now_iso()
        self.unsaved += [event_record(at, e, isinstance(e, _Adopted)) for e in events]
        if changed is None:
            self.pending, self.store_dirty = None, True
        elif changed or events:
            if self.pending is not None:
                self.pending |= changed
            self.store_dirty = True
        try:
            self.routing.apply(self._after_ops)
            if (tx.full or tx.repaired) and not self.shape_checked:
                self._learn_shape(notes)
            self._learn_generation(mode, not tx.empty)
        except Exception:
            self.full_next = True
            raise
        finally:
            store_error = self.persist()
        self.full_next = store_error is not None
        touched = changed if changed is not None else {e.lease.workload for e in events}
        return SyncResult(trigger, mode, tx.added, tx.removed, [op.describe() for op in ops],
                          tx.policies_changed and not tx.full, replaced or bool(tx.repaired),
                          adopted, (time.perf_counter() - t0) * 1000, notes,
                          tx.text if tx.added + tx.removed <= BIG_BATCH else
                          f"# {len(tx.lines)} statements ({tx.added} elements added, "
                          f"{tx.removed} removed): not kept\n",
                          usable, self._quarantined, store_error, drift, replanned,
                          tuple(heapq.nsmallest(NAMED, touched)), len(touched))

    def _replay(self) -> Plan:
        """The last applied plan, whole, without allocating or planning again."""
        assert self.index is not None
        i = self.index
        return Plan(i.desired(), i.alloc, [], i.facts.usable, set(i.missing_cgroups), i.shared)

    def _generation(self) -> Optional[int]:
        try:
            return self.nft.generation()
        except OSError:
            return None

    def _learn_generation(self, mode: str, sent: bool) -> None:
        """After a batch: nftables' generation now, and whether memory is known to be
        what the kernel holds at it. It is when this sync read the kernel (full, drift)
        or started from such a state, and no other commit came between the sync's
        start and now (ours adds exactly one, or none for an empty batch)."""
        g0, g1 = self._gen_start, self._generation()
        before = mode != "incremental" or (self.trusted and g0 == self.generation)
        step = self._batches if sent else 0
        self.trusted = (before and g0 is not None and g1 is not None
                        and g1 == (g0 + step) % (1 << 32))
        self.generation = g1

    def _nft_unchanged(self) -> bool:
        """Is nftables as this process left it (trusted, its generation number the same)?"""
        return (self.index is not None and not self.full_next and self.trusted
                and self.generation is not None and self._gen_start == self.generation)

    def allocations(self) -> Optional[alloc_mod.Allocations]:
        """What the kernel holds, for another thread than the syncs': a copy."""
        with self.alloc_lock:
            return self.alloc.copy() if self.alloc is not None else None

    @property
    def applied(self) -> Observed:
        """What the kernel took last, whole (an O(workloads) copy: for comparisons)."""
        assert self.index is not None
        return _as_observed(self.index.desired())

    def persist(self) -> Optional[str]:
        """Write what the kernel holds to the store: pending history first, then
        allocations.json (never the other way round: a new allocations.json with its
        events lost would leave `who` without them for good). None, or the error."""
        if self.alloc is None or not (self.unsaved or self.store_dirty):
            return None
        try:
            self.store.append_history(self.unsaved)
            self.unsaved = []
            if not self.store_dirty:
                pass
            elif self.pending is None or not self.store.append_allocations(self.alloc, self.pending):
                self.store.write_allocations(self.alloc)
            self.store_dirty, self.pending = False, set()
            return None
        except OSError as e:
            self.store_write_failures += 1
            path = e.filename or str(self.store.dir)
            reason = e.strerror or str(e)
            self.log.error("allocation store write failed; the kernel has the change, the "
                           "write is retried", path=path, error=reason,
                           errno=errno_mod.errorcode.get(e.errno or 0), failures=self.store_write_failures,
                           pending_history_events=len(self.unsaved))
            return f"{path}: {reason}"

    def _drain(self, alloc: alloc_mod.Allocations, events: list[alloc_mod.Event],
               notes: list[str]) -> alloc_mod.Allocations:
        """Free the lingering blocks with no connection left (appends `drained` events).

        Read after the kernel took the batch: from then on no new connection
        can get a released block, so none is missed between dump and commit."""
        if not alloc.lingering or self.live_leases is None:
            return alloc
        try:
            live = self.live_leases(sorted({l.mark for l in alloc.lingering.values()}))
        except OSError as e:  # not fatal: they linger until a check can read conntrack
            notes.append(f"released port blocks kept until conntrack can be read: {e}")
            return alloc
        alloc, drained = alloc_mod.drain(alloc, live)
        events += drained
        if drained:
            notes.append("released blocks free again, no connection left: " + ", ".join(
                f"{e.lease.workload} {e.lease.ipv4 or e.lease.ipv6}"
                + (f" {e.lease.ports[0]}-{e.lease.ports[1]}" if e.lease.ports else "")
                for e in drained))
        return alloc

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
        # the gate of a gateway host goes too, whether or not it is there
        self.nft.run((f"delete table {names.TABLE}\n" if observed.table else "")
                     + gate_batch(closed=False))
        self.routing.apply(after)
        removed = sum(len(v) for v in observed.elements.values())
        self.index, self.alloc, self.full_next = None, None, True
        return SyncResult("teardown", "full", 0, removed, [op.describe() for op in ops],
                          duration_ms=(time.perf_counter() - t0) * 1000)


def trim_heap() -> None:
    """Give the memory a whole plan and its batch used back to the system: glibc
    keeps freed heap (libnftables parses the batch in C), and the daemon's RSS would
    stay at the peak of its last full sync (bench/README.md, "Memory")."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


class _Adopted(alloc_mod.Event):
    """An assign learnt from the kernel's live maps (history marks it adopted)."""


def _as_observed(d: Desired) -> Observed:
    from .nft.text import comments, skeleton_digest
    return Observed(True, skeleton_digest(), dict(d.elements),
                    {c: comments(r) for c, r in d.chains.items()}, d.routes, d.rules)
