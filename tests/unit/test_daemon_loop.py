"""The daemon's loop on fakes: watchers that fail, lost events, signal storms,
events and damage arriving during a sync, a batch the kernel refuses.

The Daemon runs with FakeNft, FakeRouting, a real Store in a temporary
directory and a fake host (`Host`: the addresses and links `read_host`
answers). Watchers are thread bodies handed to the Daemon; the periodic
resync is an hour away and the netlink watch is off, so every sync seen here
was caused by the test. Nothing needs root.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import signal
import socket
import threading
import time
from importlib import resources
from typing import Callable, Optional

import pytest
from structlog.testing import capture_logs

from egress_agent import log as logmod
from egress_agent import names
from egress_agent.daemon import EXIT_WATCHER_FAILED, Daemon
from egress_agent.hoststate import HostState
from egress_agent.inbox import Trigger
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler, SyncResult
from egress_agent.nft.listing import observed_from_json
from egress_agent.nft.text import skeleton_shape
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store
from egress_agent.watchers import RTM_NEWADDR, RTM_NEWLINK, watch_config, watch_links
from tracer import trace

ADDRESSES = {"203.0.113.2", "203.0.113.10", "203.0.113.11", "203.0.113.20", "203.0.113.130",
             "203.0.113.140", "2001:db8:10::1", "2001:db8:11::1"}
BILLING_1, BILLING_2 = "203.0.113.10", "203.0.113.11"
M43 = "  - {id: m43, app: billing, source: [10.0.1.3], interface: vm-m43}\n"
LEGACY_POLICY = ("  - name: legacy-udp\n"
                 "    match: {workloads: [m43], protocols: [udp]}\n"
                 "    egress: {ipv4: legacy, ipv4_fallback: drop}\n")
TIMEOUT = 20.0  # for conditions that take milliseconds; only a hang reaches it


def demo_text() -> str:
    return resources.files("egress_agent").joinpath("lab/demo.yaml").read_text().replace(
        "@PREFIX@", "unit")


class Host:
    """The host as `read_host` sees it; `fail_next` makes the next read raise."""

    def __init__(self) -> None:
        self.addresses = set(ADDRESSES)
        self.fail_next: Optional[Exception] = None

    def remove(self, address: str) -> None:
        self.addresses.discard(address)

    def __call__(self) -> HostState:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        return HostState(addresses=frozenset(self.addresses), links_up=frozenset({"up0", "up1"}))


class Lab:
    """A Daemon on fakes; `syncs` holds every successful SyncResult in order."""

    def __init__(self, tmp_path, nft: Optional[FakeNft] = None, **kw) -> None:
        self.config = str(tmp_path / "config.yaml")
        with open(self.config, "w") as f:
            f.write(demo_text())
        self.host = Host()
        self.nft = nft or FakeNft()
        state = str(tmp_path / "state")
        self.daemon = Daemon(
            self.config, lambda cfg: Reconciler(self.nft, FakeRouting(), Store(cfg.state_dir),
                                                self.host),
            resync_interval=3600, watch_netlink=False, state_dir=state, **kw)
        self.daemon.watcher_backoff = (0.01, 0.05)
        self.syncs: list[SyncResult] = []
        self.daemon.on_sync.append(self.syncs.append)
        self.rc: Optional[int] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Lab":
        """`run` in a thread (no signal handlers: those need the main thread)."""
        def run() -> None:
            self.rc = self.daemon.run()
        self._thread = threading.Thread(target=run, name="daemon-under-test", daemon=True)
        self._thread.start()
        return self

    def join(self) -> Optional[int]:
        assert self._thread is not None
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the daemon did not stop"
        return self.rc

    def stop(self) -> Optional[int]:
        self.daemon.stop()
        return self.join()

    def sync(self, pred: Callable[[SyncResult], bool], what: str) -> SyncResult:
        def found():
            if self._thread is not None and not self._thread.is_alive():
                raise AssertionError(f"the daemon stopped ({self.rc}) waiting for {what}")
            return next((r for r in list(self.syncs) if pred(r)), None)
        return wait_until(found, what)


def wait_until(fn: Callable[[], object], what: str):
    deadline = time.monotonic() + TIMEOUT
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return value


def events(logs: list[dict], event: str, **match) -> list[dict]:
    return [r for r in logs if r["event"] == event and all(r.get(k) == v for k, v in match.items())]


def exposition(d: Daemon) -> str:
    """The daemon's Prometheus metrics, as a scrape would see them."""
    from prometheus_client import CollectorRegistry, generate_latest

    from egress_agent.metrics import Collector
    registry = CollectorRegistry()
    registry.register(Collector(d.metrics))
    return generate_latest(registry).decode()


# --- watchers ----------------------------------------------------------------------

def test_a_watcher_that_fails_once_is_restarted_and_what_it_missed_is_synced(tmp_path):
    runs: list[float] = []

    def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            lab.sync(lambda r: r.trigger == "start", "the first sync")
            # billing-1 goes away while the watcher is broken: nobody hears it
            lab.host.remove(BILLING_1)
            raise ConnectionResetError(errno.ECONNRESET, "socket reset")
        lab.daemon.stopping.wait()

    lab = Lab(tmp_path, watchers={"flaky": flaky})
    with capture_logs() as logs:
        lab.start()
        r = lab.sync(lambda r: r.trigger == "watcher", "the resync after the failure")
        assert r.mode == "full"
        assert "billing-1" not in r.usable.v4, "the change the watcher missed was not synced"
        assert r.changed, r.to_json()
        assert lab.stop() == 0
    assert len(runs) == 2, "the watcher was not restarted exactly once"
    failed = events(logs, "watcher failed; restarting it, then a full resync", watcher="flaky")
    assert len(failed) == 1 and failed[0]["log_level"] == "error", logs
    assert failed[0]["error"] == "ConnectionResetError: [Errno 104] socket reset", failed
    assert not events(logs, "watcher cannot recover: stopping the daemon")
    assert 'egress_agent_watcher_errors_total{watcher="flaky"} 1.0' in exposition(lab.daemon)


def test_the_config_watcher_restarted_after_an_error_hears_edits_again(tmp_path):
    """The real inotify watcher, failing once as when the host is out of
    inotify instances: the restart's resync reloads the config, and an edit
    after the restart is heard."""
    runs: list[float] = []

    def inotify_failing_once() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        d = lab.daemon
        watch_config(d.config_path, d.stopping, d.post, d.events_lost, d.log)

    lab = Lab(tmp_path, watchers={"inotify": inotify_failing_once})
    lab.start()
    try:
        wait_until(lambda: len(runs) == 2, "the restart")
        # the restart's resync (merged with the start's when it fails that early)
        lab.sync(lambda r: r.mode == "full", "the resync after the restart")
        with open(lab.config + ".tmp", "w") as f:
            f.write(demo_text().replace(M43, "").replace(LEGACY_POLICY, ""))
        os.rename(lab.config + ".tmp", lab.config)
        r = lab.sync(lambda r: r.trigger == "config", "the sync after the edit")
        assert r.removed, r.to_json()
        assert "m43" not in {w.id for w in lab.daemon.cfg.workloads}
    finally:
        assert lab.stop() == 0
    assert lab.daemon.metrics.watcher_errors == {"inotify": 1}


@pytest.mark.parametrize("how", ["raises", "returns"])
def test_a_watcher_that_cannot_recover_stops_the_daemon_non_zero(tmp_path, how):
    def broken() -> None:
        if how == "raises":
            raise PermissionError(errno.EPERM, "Operation not permitted")

    lab = Lab(tmp_path, watchers={"broken": broken})
    lab.daemon.watcher_retries = 3
    with capture_logs() as logs:
        rc = lab.start().join()
    assert rc == EXIT_WATCHER_FAILED != 0
    why = {"raises": "PermissionError: [Errno 1] Operation not permitted",
           "returns": "RuntimeError: the watcher returned while the daemon runs"}[how]
    assert len(events(logs, "watcher failed; restarting it, then a full resync")) == 2, logs
    fatal = events(logs, "watcher cannot recover: stopping the daemon", watcher="broken")
    assert fatal and fatal[0]["error"] == why and fatal[0]["failures_in_a_row"] == 3, logs
    last = logs[-1]
    assert last["log_level"] == "error" and last["exit_status"] == EXIT_WATCHER_FAILED, last
    assert "systemd restarts" in last["event"] and "broken" in last["reason"], last
    assert lab.daemon.metrics.watcher_errors == {"broken": 3}


def test_failures_far_apart_are_not_in_a_row(tmp_path):
    """A watcher that runs for `watcher_healthy` seconds before each failure is
    restarted every time: only quick failures in a row stop the daemon."""
    runs: list[float] = []

    def fails_now_and_then() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 4:
            if lab.daemon.stopping.wait(0.1):  # a healthy run (> watcher_healthy)
                return
            raise ConnectionResetError(errno.ECONNRESET, "socket reset")
        lab.daemon.stopping.wait()

    lab = Lab(tmp_path, watchers={"rare": fails_now_and_then})
    lab.daemon.watcher_retries, lab.daemon.watcher_healthy = 2, 0.05
    with capture_logs() as logs:
        lab.start()
        wait_until(lambda: len(runs) == 5, "the fifth run")
        assert lab.stop() == 0
    failed = events(logs, "watcher failed; restarting it, then a full resync", watcher="rare")
    assert [r["failures_in_a_row"] for r in failed] == [1, 1, 1, 1], failed
    assert not events(logs, "watcher cannot recover: stopping the daemon"), logs
    assert lab.daemon.metrics.watcher_errors == {"rare": 4}


def test_inotify_overflow_is_lost_events_and_the_watcher_goes_on(tmp_path):
    """The real inotify watcher, stalled while more events than the kernel
    queues (fs.inotify.max_queued_events) happen in the config's directory:
    it reports lost events (IN_Q_OVERFLOW), then still hears the next edit."""
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        queue_max = int(f.read())
    config = tmp_path / "config.yaml"
    config.write_text(demo_text())
    stopping, release = threading.Event(), threading.Event()
    heard: list[str] = []

    def post(t: Trigger) -> None:
        heard.append(t.kind)
        release.wait(TIMEOUT)  # the first one stalls the watcher

    th = threading.Thread(target=watch_config, args=(str(config), stopping, post, heard.append,
                                                     logmod.get()), daemon=True)
    th.start()
    try:
        # the watcher is listening once an edit is heard
        wait_until(lambda: (config.write_text(demo_text()), heard)[1], "the first edit")
        a, b = tmp_path / "noise-a", tmp_path / "noise-b"
        a.touch()
        for _ in range(queue_max // 4 + 100):  # IN_MOVED_FROM and IN_MOVED_TO, twice
            a.rename(b)
            b.rename(a)
        release.set()
        wait_until(lambda: "inotify" in heard, "the lost-events report")
        n = len(heard)
        config.write_text(demo_text())
        wait_until(lambda: "config" in heard[n:], "an edit after the overflow")
    finally:
        release.set()
        stopping.set()
        th.join(TIMEOUT)
    assert heard.count("inotify") == 1, heard


def test_an_error_in_the_loop_itself_is_logged_and_exits_non_zero(tmp_path):
    def broken_hook(r: SyncResult) -> None:
        raise KeyError("no such egress IP")

    lab = Lab(tmp_path)
    lab.daemon.on_sync.append(broken_hook)
    with capture_logs() as logs:
        rc = lab.start().join()
    assert rc == EXIT_WATCHER_FAILED
    failed = events(logs, "the daemon's loop failed")
    assert failed and failed[0]["error"] == "the loop: KeyError: 'no such egress IP'", logs
    assert "broken_hook" in failed[0]["traceback"]
    assert logs[-1]["exit_status"] == EXIT_WATCHER_FAILED, logs[-1]


def test_enobufs_is_lost_events_and_a_full_resync_not_a_failure(tmp_path):
    runs: list[float] = []

    def overrun() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            lab.sync(lambda r: r.trigger == "start", "the first sync")
            lab.host.remove(BILLING_1)  # its event is among those the kernel dropped
            raise OSError(errno.ENOBUFS, "No buffer space available")
        lab.daemon.stopping.wait()

    lab = Lab(tmp_path, watchers={"nl": overrun})
    lab.daemon.watcher_retries = 1  # a failure would be fatal at once
    with capture_logs() as logs:
        lab.start()
        r = lab.sync(lambda r: r.trigger == "watcher", "the resync after ENOBUFS")
        assert r.mode == "full" and "billing-1" not in r.usable.v4, r.to_json()
        assert lab.stop() == 0
    lost = events(logs, "events lost; resyncing from a fresh dump", watcher="nl")
    assert len(lost) == 1 and lost[0]["log_level"] == "warning", logs
    assert not [r for r in logs if r["log_level"] == "error"], logs
    text = exposition(lab.daemon)
    assert 'egress_agent_watcher_events_lost_total{watcher="nl"} 1.0' in text
    assert "egress_agent_watcher_errors_total{" not in text
    assert len(runs) == 2


class ScriptedSocket:
    """Stands in for the rtnetlink socket: recv() answers from a script (bytes,
    or an exception to raise), then sets `stopping` and times out."""

    def __init__(self, script: list, stopping: threading.Event) -> None:
        self.script, self.stopping = list(script), stopping

    def recv(self, n: int) -> bytes:
        if not self.script:
            self.stopping.set()
            raise TimeoutError
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def nlmsg(kind: int, payload: bytes = b"\0" * 16) -> bytes:
    import struct
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload


def test_watch_links_goes_on_reading_after_enobufs_and_raises_other_errors():
    stopping = threading.Event()
    posted: list[Trigger] = []
    lost: list[str] = []
    script = [nlmsg(RTM_NEWADDR), OSError(errno.ENOBUFS, "No buffer space available"),
              nlmsg(RTM_NEWADDR) + nlmsg(RTM_NEWLINK), b"", TimeoutError()]
    watch_links(stopping, posted.append, lost.append,
                open_socket=lambda: ScriptedSocket(script, stopping))
    assert lost == ["netlink"]
    assert posted == [Trigger("netlink", force=False), Trigger("netlink", force=True)]

    stopping.clear()
    with pytest.raises(OSError) as e:
        watch_links(stopping, posted.append, lost.append, open_socket=lambda: ScriptedSocket(
            [OSError(errno.EBADF, "Bad file descriptor")], stopping))
    assert e.value.errno == errno.EBADF  # for the supervisor: an error, not lost events


def test_the_real_rtnetlink_socket_opens_without_privileges():
    """The socket the netlink watcher reads: bound to link and address groups,
    with a receive buffer larger than the default even without CAP_NET_ADMIN."""
    from egress_agent.watchers import open_rtnetlink
    with open_rtnetlink() as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 212992
        assert sock.gettimeout() == 1.0


# --- the loop ------------------------------------------------------------------------

class DuringSync(FakeNft):
    """A kernel that runs `during` (once) right after it took a batch: what
    happens while the sync that sent it is still running."""

    during: Optional[Callable[[], None]] = None

    def run(self, batch: str) -> None:
        super().run(batch)
        if self.during is not None:
            fn, self.during = self.during, None
            fn()


def test_an_address_removed_during_a_sync_is_synced_next(tmp_path):
    def remove_billing_2() -> None:
        """The kernel took the batch; meanwhile billing-2 goes away and its
        netlink event arrives while the sync still runs."""
        lab.host.remove(BILLING_2)
        lab.daemon.post(Trigger("netlink"))

    lab = Lab(tmp_path, nft=DuringSync())
    lab.start()
    try:
        lab.sync(lambda r: r.trigger == "start", "the first sync")
        lab.nft.during = remove_billing_2
        lab.host.remove(BILLING_1)
        lab.daemon.post(Trigger("netlink"))
        first = lab.sync(lambda r: r.trigger == "netlink", "the sync for billing-1")
        assert "billing-1" not in first.usable.v4 and "billing-2" in first.usable.v4
        r = lab.sync(lambda r: r.trigger == "netlink" and "billing-2" not in r.usable.v4,
                     "a sync for billing-2, removed during the first one")
        assert r.changed
    finally:
        assert lab.stop() == 0


def test_a_config_edit_during_a_sync_is_applied_by_the_next(tmp_path):
    def edit() -> None:
        with open(lab.config + ".tmp", "w") as f:
            f.write(demo_text().replace(M43, "").replace(LEGACY_POLICY, ""))
        os.rename(lab.config + ".tmp", lab.config)
        lab.daemon.post(Trigger("config", reload=True))

    lab = Lab(tmp_path, nft=DuringSync())
    lab.start()
    try:
        lab.sync(lambda r: r.trigger == "start", "the first sync")
        assert trace(lab.nft, "10.0.1.3", "192.0.2.10", "tcp", 8080, iif="vm-m43").action == "snat"
        lab.nft.during = edit
        lab.host.remove(BILLING_1)
        lab.daemon.post(Trigger("netlink"))
        lab.sync(lambda r: r.trigger == "netlink", "the sync the edit arrived during")
        r = lab.sync(lambda r: r.trigger == "config", "the sync of the edit")
        assert r.removed and "m43" not in {w.id for w in lab.daemon.cfg.workloads}
    finally:
        assert lab.stop() == 0
    # m43 is unknown now: its source is managed, so its traffic is dropped
    assert trace(lab.nft, "10.0.1.3", "192.0.2.10", "tcp", 8080, iif="vm-m43").action == "drop"
    assert trace(lab.nft, "10.0.1.2", "192.0.2.10", "tcp", 8080, iif="vm-m42").address == BILLING_2


def test_drift_during_a_sync_is_repaired_by_the_next(tmp_path):
    def damage() -> None:  # a foreign `nft flush chain`, heard by nftwatch
        FakeNft.run(lab.nft, f"flush chain {names.TABLE} postrouting")
        lab.daemon.post(Trigger("drift", force=True))

    lab = Lab(tmp_path, nft=DuringSync())
    lab.start()
    try:
        lab.sync(lambda r: r.trigger == "start", "the first sync")
        whole = observed_from_json(lab.nft.list_table())
        lab.nft.during = damage
        lab.host.remove(BILLING_1)
        lab.daemon.post(Trigger("netlink"))
        lab.sync(lambda r: r.trigger == "netlink", "the sync the damage happened during")
        r = lab.sync(lambda r: r.trigger == "drift", "the drift repair")
        assert [f.kind for f in r.drift] == ["skeleton"] and r.skeleton_replaced, r.to_json()
    finally:
        assert lab.stop() == 0
    assert observed_from_json(lab.nft.list_table()).shape == whole.shape == skeleton_shape()


def test_a_batch_the_kernel_refuses_keeps_the_daemon_and_the_next_sync_is_full(tmp_path):
    lab = Lab(tmp_path)
    with capture_logs() as logs:
        lab.start()
        try:
            lab.sync(lambda r: r.trigger == "start", "the first sync")
            held = lab.nft.list_table()
            lab.nft.refuse_next()
            lab.host.remove(BILLING_1)
            lab.daemon.post(Trigger("netlink"))
            wait_until(lambda: events(logs, "sync failed; the next sync is a full one"),
                       "the failed sync")
            assert lab.nft.list_table() == held and lab.daemon.failures == 1
            assert [r.trigger for r in lab.syncs] == ["start"]
            lab.daemon.post(Trigger("netlink"))  # usability still differs from the last sync's
            r = lab.sync(lambda r: r.trigger == "netlink", "the sync after the failure")
            assert r.mode == "full" and r.changed and "billing-1" not in r.usable.v4
        finally:
            assert lab.stop() == 0
    failed = events(logs, "sync failed; the next sync is a full one")
    assert "Cannot allocate memory" in failed[0]["error"], failed
    assert trace(lab.nft, "10.0.1.2", "192.0.2.10", "tcp", 8080, iif="vm-m42").address == BILLING_2


def test_a_watchers_own_trigger_merged_with_an_address_event_still_syncs(tmp_path):
    """An address event that changes no usability is skipped; another kind
    (here a drift watcher's) merged with it in one debounce window is not."""
    lab = Lab(tmp_path)
    lab.start()
    try:
        lab.sync(lambda r: r.trigger == "start", "the first sync")
        lab.daemon.post(Trigger("netlink"))
        lab.daemon.post(Trigger("drift", full=True))
        r = lab.sync(lambda r: r.trigger == "drift", "the merged drift trigger's sync")
        # nothing was committed to nftables since the agent's batch: no table read
        assert r.mode == "incremental" and not r.changed
    finally:
        assert lab.stop() == 0
    assert [r.trigger for r in lab.syncs] == ["start", "drift"]


def test_a_failed_host_read_on_an_event_syncs_instead_of_dying(tmp_path):
    lab = Lab(tmp_path)
    with capture_logs() as logs:
        lab.start()
        try:
            lab.sync(lambda r: r.trigger == "start", "the first sync")
            lab.host.remove(BILLING_1)
            lab.host.fail_next = OSError(errno.ENOBUFS, "No buffer space available")
            lab.daemon.post(Trigger("netlink"))
            r = lab.sync(lambda r: r.trigger == "netlink", "a sync despite the failed read")
            assert "billing-1" not in r.usable.v4
        finally:
            assert lab.stop() == 0
    assert events(logs, "reading the host's addresses failed; syncing anyway",
                  error="OSError: [Errno 105] No buffer space available"), logs


def test_sighup_storm_coalesces_and_sigterm_still_stops(tmp_path):
    """The daemon in the main thread (signal handlers live there), signals sent
    with os.kill to this process from another thread: a burst of 5,000, then
    SIGHUPs 2 ms apart around a config edit, then SIGTERM amid SIGHUPs.
    Before issue 10, the first burst deadlocked the handler on the queue lock.
    The config watcher is off: the edit can only be heard through SIGHUP."""
    lab = Lab(tmp_path, watchers={"inotify": lambda: lab.daemon.stopping.wait()})
    d = lab.daemon
    sent = {"hup": 0}
    edited = threading.Event()
    done = threading.Event()

    def storm() -> None:
        try:
            lab.sync(lambda r: r.trigger == "start", "the first sync")
            for _ in range(5000):
                os.kill(os.getpid(), signal.SIGHUP)
                sent["hup"] += 1
            text = demo_text().replace(M43, "").replace(LEGACY_POLICY, "")
            for i in range(300):
                if i == 100:
                    with open(lab.config + ".tmp", "w") as f:
                        f.write(text)
                    os.rename(lab.config + ".tmp", lab.config)
                    edited.set()
                os.kill(os.getpid(), signal.SIGHUP)
                sent["hup"] += 1
                time.sleep(0.002)
            wait_until(lambda: d.cfg and "m43" not in {w.id for w in d.cfg.workloads},
                       "the edited config")
            for i in range(2000):
                os.kill(os.getpid(), signal.SIGHUP)
                if i == 1000:
                    os.kill(os.getpid(), signal.SIGTERM)
        finally:
            done.set()

    # stray signals after `run` restored the handlers land here, not in pytest
    strays: list[int] = []

    def stray(signum, frame) -> None:
        strays.append(signum)
    before = {s: signal.signal(s, stray) for s in (signal.SIGHUP, signal.SIGTERM)}
    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock must not hang the suite
    try:
        th = threading.Thread(target=storm, name="storm", daemon=True)
        th.start()
        with capture_logs() as logs:
            rc = d.run()
        done.wait(TIMEOUT)
        th.join(TIMEOUT)
        handlers_after = {s: signal.getsignal(s) for s in before}
    finally:
        faulthandler.cancel_dump_traceback_later()
        for s, h in before.items():
            signal.signal(s, h)
    assert rc == 0
    assert done.is_set() and edited.is_set()
    assert signal.SIGTERM not in strays, "SIGTERM arrived after the daemon had stopped"
    reloads = [r for r in lab.syncs if r.trigger == "sighup"]
    print(f"{sent['hup']} SIGHUPs sent, {len(reloads)} reloads")
    assert 1 <= len(reloads) < sent["hup"] / 10, (len(reloads), sent)
    assert "m43" not in {w.id for w in d.cfg.workloads}
    assert not [r for r in logs if r["log_level"] == "error"], logs
    assert events(logs, "stopped; kernel state left in place")
    assert handlers_after == {s: stray for s in before}, "`run` did not restore the handlers"


def test_the_log_names_what_a_sync_changed_says_a_note_once_and_an_invalid_start_truly(tmp_path):
    """The journal an operator reads: a start on an invalid config does not claim a
    last good state; a sync line names the workloads it touched; the note about a
    cgroup that is not there yet comes once, not at every full sync."""
    lab = Lab(tmp_path)
    good = demo_text()
    with open(lab.config, "w") as f:
        f.write("version: 1\nworkloads: [\n")
    with capture_logs() as logs:
        lab.start()
        try:
            wait_until(lambda: events(logs, "config invalid: nothing applied; the kernel keeps "
                                      "what it has (a previous run's state, or none); waiting "
                                      "for a valid config"), "the invalid start's error")
            assert not [r for r in logs if "last good state" in r["event"]], logs
            with open(lab.config + ".tmp", "w") as f:
                f.write(good.replace(M43, "").replace(LEGACY_POLICY, ""))
            os.rename(lab.config + ".tmp", lab.config)
            lab.daemon.post(Trigger("config", reload=True))
            lab.sync(lambda r: r.trigger == "config", "the sync of the valid config")
            lab.daemon.post(Trigger("sighup", full=True, reload=True))
            lab.sync(lambda r: r.trigger == "sighup", "a full sync (systemctl reload)")
            with open(lab.config + ".tmp", "w") as f:
                f.write(good)
            os.rename(lab.config + ".tmp", lab.config)
            lab.daemon.post(Trigger("config", reload=True))
            r = lab.sync(lambda r: r.trigger == "config" and r.mode == "incremental",
                         "the sync that adds m43")
        finally:
            assert lab.stop() == 0
    first, resync, add = events(logs, "sync", trigger="config")[0], \
        events(logs, "sync", trigger="sighup")[0], events(logs, "sync", trigger="config")[1]
    assert first["mode"] == "full" and "m42" in first["workloads"], first
    assert any("cgroup" in n for n in first["notes"]), first  # demo's `batch` has no cgroup here
    assert resync["mode"] == "full" and "notes" not in resync, resync
    assert add["workloads"] == ["m43"] == list(r.workloads) and "workloads_more" not in add, add


def test_a_sync_names_at_most_twenty_workloads_and_counts_the_rest(tmp_path):
    lab = Lab(tmp_path)
    extra = "".join(f"  - {{id: x{i:03}, app: billing, source: [10.9.{i // 200}.{i % 200 + 2}], "
                    f"interface: vm-m43}}\n" for i in range(30))
    lab.start()
    try:
        lab.sync(lambda r: r.trigger == "start", "the first sync")
        with open(lab.config + ".tmp", "w") as f:
            f.write(demo_text().replace(M43, M43 + extra))
        os.rename(lab.config + ".tmp", lab.config)
        lab.daemon.post(Trigger("config", reload=True))
        r = lab.sync(lambda r: r.trigger == "config", "the sync that adds 30 workloads")
    finally:
        assert lab.stop() == 0
    assert r.workloads == tuple(f"x{i:03}" for i in range(20)) and r.workloads_touched == 30
