"""The nft diff: one transaction that turns what the kernel holds into what is wanted.

Pure. It compares a `Desired` with an `Observed` and writes one nft batch
(all of it or none of it): a whole table when the skeleton is missing or
outdated, a chain rewritten in place when only skeleton rules were lost, and
otherwise only the elements and generated chains that differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import names, shape
from ..model import Desired, Observed
from .text import comments, element_writer, kinds_of, skeleton_digest, skeleton_shape, skeleton_text

T = names.TABLE
CHUNK = 2000  # elements per `add element` statement
PART_ELEMENTS = 25_000  # elements per batch of a table made from nothing (Transaction.parts)

_CLASSIFY = {*names.SOURCE_MAP.values(), *names.SOURCE_IF_MAP.values(), *names.BOUND_SET.values(),
             *(names.cgroup_map(level) for level in names.CGROUP_LEVELS)}
_SNAT = {names.SNAT4_PORTS_MAP, names.SNAT4_ADDR_MAP, names.SNAT6_MAP}


def _part_rank(name: str) -> int:
    """Which batch of Transaction.parts a set's elements go in, in order: 0 the
    shared sets (with the skeleton), 1 SNAT, 2 assignments and policy sets, 3
    classification."""
    if name in _CLASSIFY:
        return 3
    if name in names.ASSIGN_MAP.values() or names.is_policy_set(name):
        return 2
    return 1 if name in _SNAT else 0


@dataclass
class Transaction:
    """One nft batch: all of it or none of it. `text` is what `nft -f` would read."""

    lines: list[str] = field(default_factory=list)
    added: int = 0
    removed: int = 0
    full: bool = False
    policies_changed: bool = False
    repaired: list[str] = field(default_factory=list)  # skeleton chains rewritten in place
    # the `add element` statements: where they are in `lines`, and (set, elements) of each
    adds_at: tuple[int, int] = (0, 0)
    add_sizes: list[tuple[str, int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + ("\n" if self.lines else "")

    def parts(self, limit: Optional[int] = None) -> list[str]:
        """The batch as several, for a table made from nothing (docs/design.md, "Apply
        order"): the skeleton with the shared sets and the policy rules first, then the
        workloads' elements, at most `limit` per batch, in the order in which a packet
        would use them: SNAT, then assignments and policy sets, and classification
        last. Until a workload is classified, its traffic meets the skeleton's drops
        (a managed source) or leaves as it did with no table at all (a cgroup), and it
        finds every element it needs once it is.

        Why: one transaction of 500k elements costs the kernel superlinearly more than
        five of 100k (2-10 s against 0.3-0.5 s each on the bench machine, rising with
        load: bench/README.md). Any failure leaves a partial table that the next sync
        (a full one) reads and completes. At most `limit` elements in all: one batch."""
        limit = limit or PART_ELEMENTS
        if self.added <= limit:
            return [self.text]
        start, end = self.adds_at
        head = self.lines[:start] + self.lines[end:]
        ranked = sorted(zip(self.lines[start:end], self.add_sizes),
                        key=lambda item: _part_rank(item[1][0]))
        out = [head + [line for line, (name, _) in ranked if _part_rank(name) == 0]]
        part: list[str] = []
        n = 0
        for line, (name, size) in ranked:
            if _part_rank(name) == 0:
                continue
            if part and n + size > limit:
                out.append(part)
                part, n = [], 0
            part.append(line)
            n += size
        if part:
            out.append(part)
        return ["\n".join(p) + "\n" for p in out if p]

    @property
    def empty(self) -> bool:
        return not self.lines


# Elements are written sorted, so that a batch reads the same every time (plan --nft,
# the sync log, golden files); past this many in one map they are written in the
# set's own order: sorting 400k element strings is a quarter of a second of a
# 100k-workload full sync, for a batch nobody reads.
SORTED_UP_TO = 10_000


def _chunks(items: list[str]):
    if len(items) <= SORTED_UP_TO:
        items.sort()
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def _set_decl(name: str) -> str:
    return f"add set {T} {name} {{ type mark; }}"


def skeleton_whole(observed: Observed, expected: Optional[shape.Shape] = None) -> bool:
    """Our table exists, holds this skeleton version, and (when it was read from
    the kernel) every skeleton chain, rule and set declaration of it."""
    return (observed.table and observed.skeleton == skeleton_digest()
            and (observed.shape is None or observed.shape == (expected or skeleton_shape())))


def _damaged_chains(observed: Observed, expected: Optional[shape.Shape]):
    """Skeleton chains to rewrite in place, or None (whole, or only a table replace helps)."""
    if not observed.table or observed.skeleton != skeleton_digest() or observed.shape is None:
        return None
    want = expected or skeleton_shape()
    if observed.shape == want:
        return None
    return shape.damaged_chains(want, observed.shape) or None


def transaction(desired: Desired, observed: Observed,
                expected: Optional[shape.Shape] = None) -> Transaction:
    """The batch that turns `observed` into `desired` (empty when equal).

    `expected`: the skeleton's shape as this kernel lists it, when that differs
    from what shape.py reads from the source (another nft version)."""
    tx = Transaction()
    damaged = _damaged_chains(observed, expected)
    if damaged:
        # Only skeleton chains lost rules (flushed, a rule deleted): rewrite them
        # in place in this batch, and keep the table and its elements (a full
        # replace rewrites every element: seconds for 100k workloads).
        src = skeleton_text()
        blocks = shape.chain_blocks(src)
        tx.repaired = [name for name, _ in damaged]
        tx.lines += [f"flush chain {T} {name}" for name, exists in damaged if exists]
        tx.lines += [f"table {T} {{"] + [blocks[name] for name, _ in damaged] + ["}"]
        observed = Observed(True, observed.skeleton, observed.elements, observed.chains,
                            observed.routes, observed.rules, None)
    elif not skeleton_whole(observed, expected):
        # A new, outdated or damaged skeleton: replace the table in one batch.
        # NAT bindings and marks live in conntrack, so open connections survive.
        tx.full = True
        tx.lines += [f"add table {T}", f"delete table {T}", skeleton_text().rstrip()]
        observed = Observed(table=True, skeleton=skeleton_digest())

    changed_chains = [c for c in names.GENERATED_CHAINS
                      if comments(desired.chains.get(c, ())) != observed.chains.get(c, ())]
    tx.policies_changed = bool(changed_chains)
    for chain in changed_chains:
        tx.lines.append(f"flush chain {T} {chain}")

    dynamic_want = {n for n in desired.elements if names.is_policy_set(n)}
    dynamic_have = {n for n in observed.elements if names.is_policy_set(n)}
    for name in sorted(dynamic_want - dynamic_have):
        tx.lines.append(_set_decl(name))

    adds: list[str] = []
    for name in sorted(set(desired.elements) | set(observed.elements)):
        if name in dynamic_have - dynamic_want:
            continue
        want = desired.elements.get(name, frozenset())
        have = observed.elements.get(name, frozenset())
        kk, vk = kinds_of(name)
        if kk == ("cgroup",) and any(_stale_cgroup(k) for k, _ in have - want):
            # A cgroup that was removed is listed by its id, and nft 1.0.6 cannot
            # delete an element by that id: flush the map and add back what we want.
            tx.lines.append(f"flush map {T} {name}")
            tx.removed += len(have)
            have = frozenset()
        if not have:  # a full sync, a new map: no comparison
            gone, new = frozenset(), want
        elif vk is None:
            gone, new = have - want, want - have
        else:
            want_map = dict(want)
            have_map = dict(have)
            gone = {e for e in have if want_map.get(e[0], _MISSING) != e[1]}
            new = {e for e in want if have_map.get(e[0], _MISSING) != e[1]}
        if gone:
            tx.removed += len(gone)
            for chunk in _chunks(list(map(element_writer(name, False), gone))):
                tx.lines.append(f"delete element {T} {name} {{ {', '.join(chunk)} }}")
        if new:
            tx.added += len(new)
            for chunk in _chunks(list(map(element_writer(name), new))):
                adds.append(f"add element {T} {name} {{ {', '.join(chunk)} }}")
                tx.add_sizes.append((name, len(chunk)))
    tx.adds_at = (len(tx.lines), len(tx.lines) + len(adds))
    tx.lines += adds
    for chain in changed_chains:
        tx.lines += [f"add rule {T} {chain} {r}" for r in desired.chains.get(chain, ())]
    for name in sorted(dynamic_have - dynamic_want):
        tx.lines.append(f"delete set {T} {name}")
    return tx


_MISSING = object()


def _stale_cgroup(key) -> bool:
    """An element of a vanished cgroup: nft shows its id (a number) instead of a path."""
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())
