"""The state store cannot wedge or lie (issue 10), on the fakes.

- a corrupt or invalid allocations.json is moved aside and the live maps adopted;
- memory follows the kernel: a failed store write leaves the agent believing
  what the kernel took, the fail-back is not an empty diff, the write is retried;
- history appends survive a torn tail; readers skip what is not an event;
- adoption writes history, so `who` answers for adopted leases;
- one lock per network namespace.
"""

from __future__ import annotations

import json
import os
import time
import shutil

import pytest
from structlog.testing import capture_logs

from egress_agent import names, nslock
from egress_agent.alloc import Allocations, allocate
from egress_agent.config import parse
from egress_agent.hoststate import HostState
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import HISTORY, Store, StoreCorrupt, validate, who

A1, A2 = "203.0.113.10", "203.0.113.11"
CONFIG = f"""version: 1
host: {{name: h, region: ams}}
defaults: {{ports_per_workload: 1024, port_range: 1024-65535}}
egress_ips:
  - {{id: a1, app: app, ipv4: {A1}, ipv6: '2001:db8:10::/64'}}
  - {{id: a2, app: app, ipv4: {A2}}}
workloads:
  - {{id: w0, app: app, source: [10.0.0.1]}}
  - {{id: w1, app: app, source: [10.0.0.2]}}
  - {{id: w2, app: app, source: [10.0.0.3]}}
"""
BOTH = HostState(frozenset({A1, A2, "2001:db8:10::1"}))
ONLY_A2 = HostState(frozenset({A2}))


class Host:
    """The host's addresses, changed by the test (a failover)."""

    def __init__(self) -> None:
        self.state = BOTH

    def __call__(self) -> HostState:
        return self.state


@pytest.fixture
def cfg(tmp_path):
    return parse(CONFIG.replace("version: 1\n", f"version: 1\nstate_dir: {tmp_path / 'state'}\n")).config


def reconciler(cfg, nft=None, host=None) -> Reconciler:
    # conntrack as the fakes have it: empty, so a released block is free at once
    return Reconciler(nft or FakeNft(), FakeRouting(), Store(cfg.state_dir), host or Host(),
                      live_leases=lambda marks: frozenset())


def snat4(nft: FakeNft) -> dict:
    return dict(nft.elements(names.SNAT4_PORTS_MAP))


def lease_of(rec: Reconciler, workload: str, ip: str | None = None):
    a = rec.alloc
    return a.leases[(workload, ip or a.app_choice[workload])]


# --- 1. validation and quarantine ------------------------------------------------

def valid_doc(cfg) -> dict:
    a, _ = allocate(cfg, Allocations())
    return json.loads(json.dumps(a.to_json()))


def test_a_valid_store_round_trips(cfg):
    a, _ = allocate(cfg, Allocations())
    assert validate(a.to_json(), "x") == a


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.pop("eids"), "keys"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(version=True), "version"),
    (lambda d: d["wids"].update(w0="1"), "wids.w0"),
    (lambda d: d["wids"].update(w0=0), "wids.w0"),
    (lambda d: d["wids"].update(w0=names.WID_MAX + 1), "wids.w0"),
    (lambda d: d["wids"].update(w1=d["wids"]["w0"]), "share the number"),
    (lambda d: d["wids"].update({"bad id!": 9}), "not an id"),
    (lambda d: d["eids"].update(a1=10 ** 30), "eids.a1"),
    (lambda d: d["app_choice"].update(w0="nope"), "app_choice.w0"),
    (lambda d: d.update(leases={}), "leases: expected a list"),
    (lambda d: d["leases"][0].update(ports=[2000, 1000]), "ports"),
    (lambda d: d["leases"][0].update(ports=[1024, 70000]), "ports"),
    (lambda d: d["leases"][0].update(ports=[1024.0, 2047]), "ports"),
    (lambda d: d["leases"][0].update(ipv4="2001:db8::1"), "is not an IPv4 address"),
    (lambda d: d["leases"][0].update(ipv4="203.0.113.300"), "is not an IPv4 address"),
    (lambda d: d["leases"][0].update(ipv4=None), "port block"),
    (lambda d: d["leases"][0].update(temporary="no"), "temporary"),
    (lambda d: d["leases"][0].update(extra=1), "expected an object with keys"),
    (lambda d: d["leases"][0].update(workload="ghost"), "no workload number"),
    (lambda d: d["leases"].append(dict(d["leases"][0])), "a second lease"),
    (lambda d: d["leases"][1].update(ports=[d["leases"][0]["ports"][0] + 1,
                                            d["leases"][0]["ports"][0] + 1024],
                                     ipv4=d["leases"][0]["ipv4"]), "overlap"),
    (lambda d: d["leases"][1].update(ipv6=d["leases"][0]["ipv6"] or "2001:db8:10::100"),
     "leased to"),
])
def test_validation_is_as_strict_as_the_config(cfg, mutate, reason):
    d = valid_doc(cfg)
    d["leases"].sort(key=lambda l: l["ipv6"] is None)  # leases[0] has an IPv6 address
    mutate(d)
    with pytest.raises(StoreCorrupt) as e:
        validate(d, "/s/allocations.json")
    assert e.value.path == "/s/allocations.json" and reason in e.value.reason, e.value.reason


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "not utf-8": lambda p: p.write_bytes(b"\xff" + p.read_bytes()),
    "nested": lambda p: p.write_bytes(b"[" * 100000),
    "overlapping blocks": lambda p: p.write_text(json.dumps(_overlapping(json.loads(p.read_text())))),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
    "a fifo": lambda p: (p.unlink(), os.mkfifo(p)),
}


def _overlapping(d: dict) -> dict:
    v4 = [l for l in d["leases"] if l["ipv4"]]
    v4[1].update(ipv4=v4[0]["ipv4"], ports=v4[0]["ports"])
    return d


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_corrupt_store_is_quarantined_and_the_kernel_adopted(cfg, corrupt):
    nft = FakeNft()
    first = reconciler(cfg, nft)
    first.sync(cfg)
    table, alloc = snat4(nft), first.alloc
    store = Store(cfg.state_dir)
    CORRUPTIONS[corrupt](store.allocations_path)

    with pytest.raises(StoreCorrupt):  # load raises that and nothing else
        store.load()
    rec = reconciler(cfg, nft)  # a restart
    with capture_logs() as logs:
        r = rec.sync(cfg, trigger="start")
    assert r.adopted and not r.changed and snat4(nft) == table, r
    warn = [l for l in logs if l["log_level"] == "warning"]
    assert len(warn) == 1 and warn[0]["path"] == str(store.allocations_path), logs
    assert warn[0]["moved_to"] == r.quarantined and warn[0]["reason"]
    moved = [n for n in os.listdir(cfg.state_dir) if n.startswith("allocations.json.corrupt-")]
    assert [os.path.join(cfg.state_dir, n) for n in moved] == [r.quarantined]
    # rebuilt: the same leases, and every later sync works from the store
    assert store.load() == rec.alloc and rec.alloc.leases == alloc.leases
    assert reconciler(cfg, nft).sync(cfg).changed is False


def test_plan_against_running_moves_nothing(cfg):
    nft = FakeNft()
    reconciler(cfg, nft).sync(cfg)
    store = Store(cfg.state_dir)
    store.allocations_path.write_text("{")
    rec = reconciler(cfg, nft)
    rec.quarantine = False
    with capture_logs():
        _, _, adopted, _ = rec.plan(cfg, rec.observe())
    assert adopted and store.allocations_path.read_text() == "{"


# --- 2. memory follows the kernel; failed writes are retried -----------------------

def block(state_dir: str) -> None:
    """Make every write under state_dir fail for real: the directory becomes a file."""
    os.rename(state_dir, state_dir + ".away")
    with open(state_dir, "w") as f:
        f.write("not a directory\n")


def unblock(state_dir: str) -> None:
    os.unlink(state_dir)
    os.rename(state_dir + ".away", state_dir)


def test_failover_with_an_unwritable_store_still_fails_back(cfg):
    nft, host = FakeNft(), Host()
    rec = reconciler(cfg, nft, host)
    rec.sync(cfg, trigger="start")
    before = snat4(nft)
    home = lease_of(rec, "w0")
    assert home.ip == "a1"  # w0 is on a1 (the first app IP)

    block(cfg.state_dir)
    host.state = ONLY_A2
    with capture_logs() as logs:
        r = rec.sync(cfg, trigger="netlink")
    assert r.changed and r.store_error and cfg.state_dir in r.store_error, r
    assert rec.full_next and rec.store_write_failures == 1
    err = [l for l in logs if l["log_level"] == "error"]
    assert err and err[0]["errno"] in ("ENOTDIR", "EEXIST") and cfg.state_dir in err[0]["path"]
    borrowed = lease_of(rec, "w0", "a2")
    assert borrowed.temporary  # memory has the failover the kernel took
    failed_over = snat4(nft)
    assert failed_over != before

    host.state = BOTH
    with capture_logs():
        r = rec.sync(cfg, trigger="netlink")
    assert r.changed and r.store_error, r  # not an empty diff: the kernel returns
    assert snat4(nft) == before
    assert ("w0", "a2") not in rec.alloc.leases or not lease_of(rec, "w0", "a2").temporary

    unblock(cfg.state_dir)
    r = rec.sync(cfg, trigger="store-retry", full=True)
    assert r.store_error is None and not r.changed and not rec.full_next
    store = Store(cfg.state_dir)
    assert store.load() == rec.alloc
    # the history has the failover with the times the kernel took it
    events = list(store.history())
    temp = [e for e in events if e["ip"] == "a2" and e["workload"] == "w0"
            and e["ports"] == list(borrowed.ports)]
    assert [e["event"] for e in temp] == ["assign", "release", "linger", "drained"], events
    held = who(iter(events), A2, borrowed.ports[0], at=temp[0]["at"])
    assert [h.workload for h in held] == ["w0"]
    assert who(iter(events), A2, borrowed.ports[0]) == []


def test_temp_files_are_unique_per_writer(cfg):
    a, _ = allocate(cfg, Allocations())
    s1, s2 = Store(cfg.state_dir), Store(cfg.state_dir)
    s1.write_allocations(a)
    s2.write_allocations(a)
    assert os.listdir(cfg.state_dir) == ["allocations.json"]  # no shared .tmp left behind
    assert Store(cfg.state_dir).load() == a


# --- 3. torn history -----------------------------------------------------------------

def test_a_torn_tail_is_skipped_and_ended_by_the_next_append(cfg):
    rec = reconciler(cfg)
    rec.sync(cfg)
    store = Store(cfg.state_dir)
    lease = lease_of(rec, "w0")
    good = store.history_path.read_bytes()
    with open(store.history_path, "ab") as f:
        f.write(b'{"at":"2026-11-23T10:00:00+00:00","event":"rel')  # ENOSPC mid-append
    held = who(store.history(), lease.ipv4, lease.ports[0])
    assert [h.workload for h in held] == ["w0"] and store.skipped_lines == 1

    cfg2 = cfg.model_copy(update={"workloads": [w for w in cfg.workloads if w.id != "w0"]})
    rec.sync(cfg2)  # releases w0: appended after the torn line, not glued to it
    raw = store.history_path.read_bytes()
    assert raw.startswith(good) and raw.endswith(b"\n")
    assert raw.count(b'"event":"rel\n') == 1
    events = list(store.history())
    assert store.skipped_lines == 1 and events[-1]["event"] in ("release", "assign", "drained")
    assert who(store.history(), lease.ipv4, lease.ports[0]) == []


@pytest.mark.parametrize("line", [
    b"\xff\xfe garbage", b"[1, 2]", b'{"event": "assign"}', b"null",
    b'{"at":"yesterday","event":"assign","workload":"w","ip":"a1","ipv4":"203.0.113.10","ports":[1,2]}',
    b'{"at":"2026-01-01T00:00:00Z","event":"assign","workload":"w","ip":"a1","ipv4":"x","ports":[1,2]}',
    b'{"at":"2026-01-01T00:00:00Z","event":"assign","workload":"w","ip":"a1","ipv4":"203.0.113.10","ports":"1-2"}',
    b'{"at":"2026-01-01T00:00:00Z","event":"assign","workload":"w","ip":"a1","ipv4":"203.0.113.10","ports":[1e999,2]}',
    b"1" * 5000,
])
def test_who_skips_lines_that_are_not_events(tmp_path, line):
    store = Store(tmp_path)
    store.history_path.write_bytes(line + b"\n")
    assert who(store.history(), "203.0.113.10", 1) == [] and store.skipped_lines == 1


# --- 4. adoption writes history ---------------------------------------------------------

def test_adoption_writes_history_so_who_answers(cfg):
    nft = FakeNft()
    rec = reconciler(cfg, nft)
    rec.sync(cfg)
    lease = next(l for l in rec.alloc.leases.values() if l.ipv6)
    shutil.rmtree(cfg.state_dir)  # state_dir lost; the kernel keeps the maps

    rec = reconciler(cfg, nft)
    r = rec.sync(cfg, trigger="start")
    assert r.adopted and not r.changed
    store = Store(cfg.state_dir)
    events = list(store.history())
    assert events and all(e["event"] == "assign" and e.get("adopted") for e in events)
    assert len(events) == len(rec.alloc.leases)
    held = [h.workload for h in who(store.history(), lease.ipv4, lease.ports[1])]
    assert held == [lease.workload]
    assert [h.workload for h in who(store.history(), lease.ipv6)] == [lease.workload]


def test_adoption_closes_what_history_holds_and_the_kernel_does_not(cfg):
    nft = FakeNft()
    rec = reconciler(cfg, nft)
    rec.sync(cfg)
    store = Store(cfg.state_dir)
    lease = lease_of(rec, "w0")
    n_before = len(list(store.history()))
    # the kernel lost w0 behind the store's back; then the store is lost too
    cfg2 = cfg.model_copy(update={"workloads": [w for w in cfg.workloads if w.id != "w0"]})
    other = reconciler(cfg2, nft)
    other.store = Store(str(cfg.state_dir) + "-elsewhere")
    other.sync(cfg2)
    store.allocations_path.unlink()

    rec = reconciler(cfg2, nft)
    r = rec.sync(cfg2, trigger="start")
    assert r.adopted
    new = list(store.history())[n_before:]
    # what the history already held open and the kernel still has is not re-stated
    assert [(e["event"], e["workload"]) for e in new if e["workload"] == "w0"] == [("release", "w0")]
    assert not [e for e in new if e["event"] == "assign"]
    assert who(store.history(), lease.ipv4, lease.ports[0]) == []


# --- 5. one agent per network namespace ------------------------------------------------

def test_a_second_lock_in_the_namespace_is_refused_naming_the_holder():
    with nslock.acquire(serve=True):
        for _ in range(100):  # a refused process never fills the holder's backlog
            with pytest.raises(nslock.Busy) as e:
                nslock.acquire()
            assert e.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(e.value) and nslock.netns() in str(e.value)
    with nslock.acquire():  # released with the holder
        pass


def test_read_only_commands_report_a_corrupt_store_in_one_line(cfg, tmp_path, capsys):
    from egress_agent.cli import main
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.replace("version: 1\n", f"version: 1\nstate_dir: {cfg.state_dir}\n"))
    os.makedirs(cfg.state_dir)
    Store(cfg.state_dir).allocations_path.write_bytes(b'{"version": 1, "leases": [')
    assert main(["status", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "allocations.json: not JSON" in err, err
    assert "moves it aside" in err


def test_the_daemon_retries_a_failed_store_write_with_a_full_sync(cfg, tmp_path):
    from egress_agent.daemon import Daemon, Trigger
    from egress_agent.sdnotify import Notifier
    nft, host = FakeNft(), Host()
    d = Daemon(str(tmp_path / "unused.yaml"), lambda c: reconciler(c, nft, host),
               notify=Notifier(""), watch_netlink=False)
    d.cfg, d.rec = cfg, reconciler(cfg, nft, host)
    with capture_logs():
        d._sync(Trigger("start", full=True))
        block(cfg.state_dir)
        host.state = ONLY_A2
        d._sync(Trigger("netlink", force=True))
    assert d.last_result.store_error and d.metrics.store_write_failures == 1
    t = next_trigger(d, 5)  # the retry, after the first backoff
    assert (t.kind, t.full) == ("store-retry", True)
    with capture_logs():
        d._sync(t)  # still unwritable: the next retry waits longer
    assert d.store_retry_delay == 2 * 0.5 and d.metrics.store_write_failures == 2
    unblock(cfg.state_dir)
    d._sync(next_trigger(d, 5))
    assert d.last_result.store_error is None and d.store_retry_delay == 0
    assert Store(cfg.state_dir).load() == d.rec.alloc
    assert next_trigger(d, 1.5) is None  # nothing more to retry


def next_trigger(d, timeout: float):
    """The first trigger posted to the daemon's inbox within `timeout`, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d.inbox.wait(deadline - time.monotonic())
        got = d.inbox.take()
        if got:
            return got[0]
    return None


def test_a_corrupt_store_in_an_unwritable_dir_is_still_adopted(cfg, monkeypatch):
    nft = FakeNft()
    reconciler(cfg, nft).sync(cfg)
    table = snat4(nft)
    Store(cfg.state_dir).allocations_path.write_text("[")
    rec = reconciler(cfg, nft)

    def refuse():  # what os.rename says on a read-only filesystem
        raise OSError(30, "Read-only file system", str(rec.store.allocations_path))
    monkeypatch.setattr(rec.store, "quarantine", refuse)
    with capture_logs() as logs:
        r = rec.sync(cfg, trigger="start")
    assert r.adopted and not r.changed and snat4(nft) == table and r.quarantined is None
    assert [l["event"] for l in logs if l["log_level"] == "error"] == [
        "cannot move the corrupt allocation store aside"]
    assert Store(cfg.state_dir).load() == rec.alloc  # the next write replaced it


def test_allocations_json_mode_follows_the_umask(cfg):
    a, _ = allocate(cfg, Allocations())
    old = os.umask(0o027)  # the unit's UMask=
    try:
        Store(cfg.state_dir).write_allocations(a)
    finally:
        os.umask(old)
    assert os.stat(Store(cfg.state_dir).allocations_path).st_mode & 0o777 == 0o640


# --- the journal: an incremental sync writes what changed, not the whole file ------------

def _journaled(tmp_path):
    from test_alloc import cfg_with
    from egress_agent.alloc import allocate
    a, _ = allocate(cfg_with(["w0", "w1", "w2"]), Allocations())
    b, _ = allocate(cfg_with(["w1", "w2", "w3"]), a)
    s = Store(tmp_path)
    s.write_allocations(a)
    assert s.append_allocations(b, {"w0", "w3"})
    return a, b, s


def test_a_journal_record_replays_onto_allocations_json(tmp_path):
    a, b, s = _journaled(tmp_path)
    snapshot = (tmp_path / "allocations.json").read_bytes()
    assert Store(tmp_path).load() == b
    assert (tmp_path / "allocations.json").read_bytes() == snapshot  # not rewritten
    s.write_allocations(b)  # a whole write ends the journal
    assert not (tmp_path / "allocations.journal").exists() and Store(tmp_path).load() == b


def test_a_torn_last_journal_line_is_skipped_and_a_bad_middle_one_is_corrupt(tmp_path):
    a, b, s = _journaled(tmp_path)
    j = tmp_path / "allocations.journal"
    good = j.read_bytes()
    j.write_bytes(good + b'{"base": "x", "workl')
    assert Store(tmp_path).load() == b
    j.write_bytes(b'{"base": 1}\n' + good)
    with pytest.raises(StoreCorrupt, match="allocations.journal line 1"):
        Store(tmp_path).load()


def test_journal_records_of_an_older_allocations_json_are_skipped(tmp_path):
    # a crash between writing allocations.json and removing the journal
    a, b, s = _journaled(tmp_path)
    old = (tmp_path / "allocations.journal").read_bytes()
    s.write_allocations(a)
    (tmp_path / "allocations.journal").write_bytes(old)
    assert Store(tmp_path).load() == a


def test_a_long_journal_asks_for_a_whole_write(tmp_path, monkeypatch):
    import egress_agent.store as store_mod
    a, b, s = _journaled(tmp_path)
    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 2)
    assert s.append_allocations(b, {"w1"})
    assert not s.append_allocations(b, {"w1"})
    assert not Store(tmp_path).append_allocations(b, {"w1"})  # nothing read yet: no token


def test_incremental_syncs_append_and_a_full_one_rewrites(tmp_path):
    from test_alloc import cfg_with
    rec = Reconciler(FakeNft(), FakeRouting(), Store(tmp_path), lambda: HostState(frozenset()))
    rec.sync(cfg_with(["w0", "w1"]))
    inode = (tmp_path / "allocations.json").stat().st_ino
    rec.sync(cfg_with(["w0", "w1", "w2"]))
    rec.sync(cfg_with(["w1", "w2"]))
    assert (tmp_path / "allocations.json").stat().st_ino == inode
    assert len((tmp_path / "allocations.journal").read_text().splitlines()) == 2
    assert Store(tmp_path).load() == rec.alloc
    rec.sync(cfg_with(["w1", "w2"]), full=True)
    assert not (tmp_path / "allocations.journal").exists() and Store(tmp_path).load() == rec.alloc
