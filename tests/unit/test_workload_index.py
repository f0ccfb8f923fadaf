"""What an edit of one workload costs: the Reader hands the next config the workload
index of the last one with what changed (Config.changes_since), and an incremental
sync writes its allocations into the applied ones in place (alloc.AllocChange), so
that neither builds anything of the host's size. The partial == full property
(test_incremental.py) checks that the results are right; this checks that the
O(workloads) paths are not taken, and what other threads see meanwhile."""

from __future__ import annotations

import threading

from egress_agent.alloc import Allocations
from egress_agent.config import Reader, parse
from egress_agent.hoststate import HostState
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store

N = 300
MAIN = """version: 1
host: {name: h, region: r}
defaults: {ports_per_workload: 64}
egress_ips:
  - {id: ip1, app: web, ipv4: 203.0.113.10}
  - {id: ip2, app: web, ipv4: 203.0.113.11}
managed_sources: [10.0.0.0/16]
include: [conf.d/*.yaml]
"""


def fragment(k: int, extra: str = "", skip: int = -1) -> str:
    lines = [f"  - {{id: w{k}-{i}, app: web, source: [10.0.{k}.{i + 1}]}}\n"
             for i in range(N // 3) if i != skip]
    return "workloads:\n" + "".join(lines) + extra


def tree(tmp_path):
    (tmp_path / "conf.d").mkdir()
    for k in range(3):
        (tmp_path / "conf.d" / f"{k}.yaml").write_text(fragment(k))
    (tmp_path / "main.yaml").write_text(MAIN)
    return tmp_path / "main.yaml"


def test_the_next_config_takes_the_index_over_with_what_changed(tmp_path):
    path = tree(tmp_path)
    reader = Reader()
    first = reader.load(path).config
    by_id = first.workloads_by_id
    assert len(by_id) == N
    (tmp_path / "conf.d" / "1.yaml").write_text(
        fragment(1, "  - {id: new, app: web, source: [10.0.9.9]}\n", skip=5))
    second = reader.load(path).config
    added, removed = second.changes_since(first)
    assert [w.id for w in added] == ["new"] and [w.id for w in removed] == ["w1-5"]
    assert second.workloads_by_id is by_id  # taken over, not built again
    assert by_id == {w.id: w for w in second.workloads}
    assert first._index.by_id is None  # the old config would build its own if asked
    assert first.workloads_by_id == {w.id: w for w in first.workloads}
    assert second._index.positions is None  # no ordering was needed
    # a copy (the daemon's, with its state_dir) shares the index; one with other
    # workloads does not, and knows nothing of the Reader's changes
    copy = second.model_copy(update={"state_dir": str(tmp_path)})
    assert copy.changes_since(first) == (added, removed)
    fewer = second.model_copy(update={"workloads": second.workloads[1:]})
    assert fewer.changes_since(first) is None
    assert len(fewer.workloads_by_id) == N - 1 and len(second.workloads_by_id) == N
    # a config parsed on its own: nothing known, everything compared
    assert parse(MAIN.replace("include: [conf.d/*.yaml]\n", "")).config.changes_since(first) is None


def test_the_fixed_blocks_follow_the_changes(tmp_path):
    path = tree(tmp_path)
    reader = Reader()
    reader.load(path)
    (tmp_path / "conf.d" / "2.yaml").write_text(fragment(
        2, "  - {id: pinned, app: web, source: [10.0.9.9], blocks: {ip2: 2048-2111}}\n"))
    cfg = reader.load(path).config
    assert cfg.fixed_blocks == {"ip2": {"pinned": (2048, 2111)}}
    (tmp_path / "conf.d" / "2.yaml").write_text(fragment(2))
    assert reader.load(path).config.fixed_blocks == {}


def test_a_one_workload_sync_copies_nothing_of_the_hosts_size(tmp_path):
    path = tree(tmp_path)
    reader = Reader()
    host = HostState(frozenset({"203.0.113.10", "203.0.113.11"}))
    rec = Reconciler(FakeNft(), FakeRouting(), Store(tmp_path / "state"), lambda: host)
    rec.sync(reader.load(path).config, "start", full=True)
    before = rec.alloc
    dicts = [before.wids, before.app_choice, before.leases]
    seen = rec.allocations()  # another thread's copy
    assert seen == before and seen.leases is not before.leases
    (tmp_path / "conf.d" / "0.yaml").write_text(
        fragment(0, "  - {id: new, app: web, source: [10.0.9.9]}\n"))
    cfg = reader.load(path).config
    r = rec.sync(cfg, "config")
    assert r.mode == "incremental" and r.replanned == 1 and r.added > 0, r.to_json()
    assert [rec.alloc.wids, rec.alloc.app_choice, rec.alloc.leases] == dicts
    assert all(a is b for a, b in zip([rec.alloc.wids, rec.alloc.app_choice, rec.alloc.leases],
                                      dicts))  # written in place
    assert "new" in rec.alloc.wids and "new" not in seen.wids  # the copy did not move
    assert cfg._index.positions is None
    assert rec.index.holders.free == [] and rec.index.holders.top == N + 2


def test_another_thread_copying_the_allocations_never_sees_half_a_change(tmp_path):
    """The usage and translation-log threads copy the allocations while syncs write
    into them: every copy is the state before some sync or after it, whole."""
    path = tree(tmp_path)
    reader = Reader()
    host = HostState(frozenset({"203.0.113.10", "203.0.113.11"}))
    rec = Reconciler(FakeNft(), FakeRouting(), Store(tmp_path / "state"), lambda: host)
    rec.sync(reader.load(path).config, "start", full=True)
    copies: list[Allocations] = []
    done = threading.Event()

    def copy_often():
        while not done.is_set():
            copies.append(rec.allocations())
    t = threading.Thread(target=copy_often)
    t.start()
    try:
        for i in range(30):
            extra = "".join(f"  - {{id: n{i}-{j}, app: web, source: [10.0.{10 + i}.{j + 1}]}}\n"
                            for j in range(5))
            (tmp_path / "conf.d" / "0.yaml").write_text(fragment(0, extra))
            assert rec.sync(reader.load(path).config, "config").mode == "incremental"
    finally:
        done.set()
        t.join()
    assert len(copies) > 30
    for a in copies:  # each workload with a wid has its lease and app choice, and no other
        assert set(a.wids) == set(a.app_choice) == {w for w, _ in a.leases}
        assert len(a.wids) in (N, N + 5)
