"""A table made from nothing goes to the kernel in several batches (Transaction.parts):
every statement once, workloads' elements in the order a packet uses them
(classification last), and the kernel ends as one batch would leave it."""

from __future__ import annotations

from collections import Counter

import pytest

from egress_agent.nft import diff
from egress_agent.nft.diff import T, transaction, _part_rank
from egress_agent.nft.fake import FakeNft
from egress_agent.model import Observed
from test_reconcile import M42, Agent, demo
from tracer import trace

LIMIT = 5  # elements per batch here; the demo's first batch has a few dozen


def first_transaction(tmp_path):
    a = Agent(tmp_path)
    plan, _, _, _ = a.rec.plan(a.cfg(demo()), Observed())
    return transaction(plan.desired, Observed())


def statements(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip()]


def test_parts_hold_every_statement_once_in_the_order_a_packet_uses_them(tmp_path):
    tx = first_transaction(tmp_path)
    assert tx.full and tx.added > LIMIT
    parts = tx.parts(LIMIT)
    assert len(parts) > 2
    assert Counter(l for p in parts for l in statements(p)) == Counter(statements(tx.text))
    assert parts[0].startswith(f"add table {T}\ndelete table {T}\n")
    ranks = []
    for p in parts[1:]:
        adds = statements(p)
        assert all(l.startswith(f"add element {T} ") for l in adds), p
        sizes = [s for line, s in zip(tx.lines[tx.adds_at[0]:tx.adds_at[1]], tx.add_sizes)
                 if line in adds]
        # a statement is never cut: one over the limit makes a batch of its own
        assert sum(n for _, n in sizes) <= LIMIT or len(sizes) == 1, sizes
        ranks += [_part_rank(name) for name, _ in sizes]
    assert ranks == sorted(ranks) and ranks[-1] == 3 and 0 not in ranks, ranks
    # the shared sets (managed sources: what drops an unclassified workload) come first
    assert "add element inet egress_agent managed4 " in parts[0]


def test_a_small_table_is_one_batch(tmp_path):
    tx = first_transaction(tmp_path)
    assert tx.parts(tx.added) == [tx.text]


def test_the_parts_leave_the_kernel_as_one_batch_does(tmp_path):
    tx = first_transaction(tmp_path)
    one, several = FakeNft(), FakeNft()
    one.run(tx.text)
    for p in tx.parts(LIMIT):
        several.run(p)
    assert several.list_table() == one.list_table()


def test_a_full_sync_from_nothing_sends_parts_and_trusts_the_kernel_after(tmp_path, monkeypatch):
    monkeypatch.setattr(diff, "PART_ELEMENTS", LIMIT)
    a = Agent(tmp_path)
    r = a.sync(demo(), "start")
    assert r.mode == "full" and r.changed
    assert len(a.nft.batches) > 2 and a.nft.batches[0].startswith(f"add table {T}\n")
    assert a.rec.trusted and a.rec.generation == a.nft.gen == len(a.nft.batches)
    # the periodic resync: nothing committed since our last part, so nothing is read
    r = a.rec.sync(a.cfg(demo()), "resync", full=True)
    assert r.mode == "incremental" and not r.changed, r.to_json()
    v = trace(a.nft, *M42, iif="vm-m42")
    assert v.action == "snat" and v.address in ("203.0.113.10", "203.0.113.11")
    a.assert_as_a_full_sync_would_leave_it(demo())


def test_a_part_refused_leaves_a_table_the_next_sync_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(diff, "PART_ELEMENTS", LIMIT)
    a = Agent(tmp_path)
    run = a.nft.run
    sent: list[str] = []

    def refuse_the_third(batch: str) -> None:
        sent.append(batch)
        if len(sent) == 3:
            a.nft.refuse_next()
        run(batch)
    a.nft.run = refuse_the_third
    with pytest.raises(Exception, match="Cannot allocate memory"):
        a.sync(demo(), "start")
    assert a.nft.table is not None and a.rec.full_next
    # nothing classified yet: the managed source is dropped, never sent raw
    assert trace(a.nft, *M42, iif="vm-m42").action == "drop"
    a.nft.run = run
    r = a.sync(demo(), "start")
    assert r.mode == "full" and r.changed and not r.skeleton_replaced, r.to_json()
    a.assert_as_a_full_sync_would_leave_it(demo())
