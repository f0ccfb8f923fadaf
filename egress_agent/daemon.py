"""`egress-agent run`: keep the kernel equal to the desired state.

One loop, one sync at a time. Triggers arrive in an inbox (inbox.py):
- the config file changed (inotify on its directory, so editors that replace
  the file are seen; debounced), or SIGHUP: reload, then sync;
- netlink: an address or link changed; if that changes which egress IPs are
  usable, sync at once (failover is a netlink event, not a poll);
- the periodic full resync, which re-reads the kernel and repairs drift;
- nftwatch: a foreign nftables commit that touched our table ("drift"), or an
  ip rule or route changed in our reserved ranges ("drift-routes"): a sync at
  once that reads that part of the kernel, logs a warning naming what it found
  and repairs it in one batch (merged with any other trigger: a full sync);
- a watcher that lost events or failed: a full resync (and a reload);
- SIGTERM/SIGINT: stop, leaving the kernel state in place.
An invalid config is logged with file, line and reason; the last good state
stays applied and the daemon waits for the next version.

Signal handlers only set a flag; the C-level handler writes to the inbox's
pipe (signal.set_wakeup_fd), which wakes the loop. A storm of SIGHUPs is one
reload per pass of the loop, and SIGTERM is seen at the next pass.

Each watcher thread runs under `start_watcher`: an error is logged, counted
and followed by a full resync and a restart with back-off; a watcher that
fails `watcher_retries` times in a row stops the daemon with EXIT_WATCHER_FAILED
so that systemd (Restart=on-failure) starts a fresh one.
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import os
import signal
import threading
import time
import traceback
from typing import Callable, Optional

from . import health, probe
from . import log as logmod
from . import metrics as metrics_mod
from .config import Config, ConfigError, Reader
from .inbox import Inbox, Trigger
from .nft import NftError
from .hoststate import usable_from
from .reconcile import Reconciler, SyncResult, trim_heap
from .routing import RoutingError
from .sdnotify import Notifier
from .watchers import watch_config, watch_links

__all__ = ["Daemon", "Trigger", "EXIT_WATCHER_FAILED"]

CONFIG_DEBOUNCE = 0.02  # editors write in several steps (create, write, close, rename: microseconds apart)
NETLINK_DEBOUNCE = 0.005
STORE_RETRY = (0.5, 30.0)  # first and longest delay before retrying a failed store write
# `run` exits with this when a watcher cannot recover (or the loop itself
# fails): not 0, so that systemd's Restart=on-failure starts the daemon again,
# and apart from the CLI's 1-6.
EXIT_WATCHER_FAILED = 7
# how a merged trigger is named in the sync line: the first of these it holds,
# then any other kind (a watcher's own), then resync, then netlink
_KIND_ORDER = ("start", "sighup", "config", "watcher")
_KIND_LAST = ("resync", "netlink")


def conntrack_numbers() -> tuple[Optional[int], Optional[int]]:
    out = []
    for name in ("nf_conntrack_count", "nf_conntrack_max"):
        try:
            with open(f"/proc/sys/net/netfilter/{name}") as f:
                out.append(int(f.read()))
        except OSError:
            out.append(None)
    return out[0], out[1]


def _freeze() -> None:
    """Keep what was just built (a config, a whole plan's allocations) out of the
    collector's full passes: at 100,000 workloads one pass over those millions of
    objects stalls a sync for about a second. They are still freed by reference
    counting; they hold no cycles. The young generations are collected first (cheap),
    so that garbage just made is not kept for good."""
    gc.collect(1)
    gc.freeze()


class Daemon:
    # watcher supervision; a run that lasted `watcher_healthy` seconds resets the count
    watcher_retries = 5
    watcher_backoff = (0.1, 5.0)  # first and longest pause before a restart
    watcher_healthy = 60.0

    def __init__(self, config_path: str, make_reconciler: Callable[[Config], Reconciler],
                 resync_interval: float = 60.0, notify: Optional[Notifier] = None,
                 watch_netlink: bool = True, state_dir: Optional[str] = None,
                 metrics: Optional[metrics_mod.State] = None,
                 usage_interval: Optional[float] = None,
                 collect_usage: Optional[Callable[..., object]] = None,
                 translation_log: Optional[str] = None,
                 watchers: Optional[dict[str, Callable[[], None]]] = None,
                 prober: Optional[probe.Prober] = None):
        self.config_path = os.path.abspath(config_path)
        self.make_reconciler = make_reconciler
        self.resync_interval = resync_interval
        self.notify = notify or Notifier()
        self.watch_netlink = watch_netlink
        self.state_dir = state_dir
        self.prober = prober  # its reachability reaches the plans through read_host (wiring)
        self.inbox = Inbox()
        self.log = logmod.get()
        self.cfg: Optional[Config] = None
        self.reader = Reader()  # a reload parses only changed files, validates only changed entries
        self.rec: Optional[Reconciler] = None
        self.stopping = threading.Event()  # tells the watcher threads to end
        self.last_usable = None
        self.syncs = 0
        self.failures = 0
        self.last_result: Optional[SyncResult] = None
        self.on_sync: list[Callable[[SyncResult], None]] = []
        self.metrics = metrics or metrics_mod.State()
        self.usage_interval = usage_interval
        self.collect_usage = collect_usage
        self.warned: set = set()
        self.noted: set[str] = set()  # the notes the log has said (_sync)
        self.translation_log = translation_log
        self.store_retry: Optional[threading.Timer] = None
        self.store_retry_delay = 0.0
        self.extra_watchers = dict(watchers or {})
        # written by signal handlers and read by the loop: plain attributes, no lock
        self._stop_requested = False
        self._hups = 0
        self._hups_seen = 0
        self.fatal: Optional[str] = None  # why the daemon gave up
        # for `status` (health.py): its own state, and when each condition last changed
        self.tracker = health.Tracker()
        self.state = {"pid": os.getpid(), "started": time.time(), "config": self.config_path,
                      "config_load": None, "last_sync": None, "last_error": None}
        self._state_write_error: Optional[str] = None

    # --- config ----------------------------------------------------------------
    def load_config(self) -> bool:
        try:
            cfg = self.reader.load(self.config_path).config
        except ConfigError as e:
            self._config_loaded(False, [str(p) for p in e.problems])
            # true at start too: nothing of this run was applied yet, and whatever a
            # previous run left in the kernel stays until a valid config replaces it
            keeping = ("config invalid, keeping the last good state" if self.cfg is not None
                       else "config invalid: nothing applied; the kernel keeps what it has "
                            "(a previous run's state, or none); waiting for a valid config")
            for p in e.problems:
                self.log.error(keeping, problem=str(p),
                               file=p.file, line=p.line, field=p.path, reason=p.message)
            return False
        self._config_loaded(True, [])
        if self.state_dir:
            cfg = cfg.model_copy(update={"state_dir": self.state_dir})
        if self.rec is None:
            self.rec = self.make_reconciler(cfg)
        self.cfg = cfg
        _freeze()
        return True

    # --- the loop ---------------------------------------------------------------
    def post(self, t: Trigger) -> None:
        """Hand a trigger to the loop; safe from any thread, takes no lock."""
        self.inbox.post(t)

    def stop(self) -> None:
        """Ask the loop to stop (from any thread)."""
        self._stop_requested = True
        self.inbox.wake()

    def run(self) -> int:
        """The daemon until SIGTERM/SIGINT (0), or a watcher that cannot recover
        or an unexpected error in the loop (EXIT_WATCHER_FAILED). Signal handlers
        are installed when called from the main thread, and the previous ones
        restored on return."""
        in_main = threading.current_thread() is threading.main_thread()
        restore = self._signals() if in_main else None
        try:
            for name, body in self.watchers().items():
                self.start_watcher(name, body)
            self.post(Trigger("start", full=True, reload=True))
            self._loop()
        except Exception as e:  # a bug: say so in the log, and let systemd restart us
            self.fatal = f"the loop: {type(e).__name__}: {e}"
            self.log.error("the daemon's loop failed", error=self.fatal,
                           traceback=traceback.format_exc())
        finally:
            self.stopping.set()
            if restore:
                restore()
        self.notify("STOPPING=1")
        if self.fatal:
            self.log.error("stopped: cannot go on; exiting non-zero so that systemd restarts "
                           "the agent; kernel state left in place",
                           reason=self.fatal, exit_status=EXIT_WATCHER_FAILED)
            return EXIT_WATCHER_FAILED
        self.log.info("stopped; kernel state left in place")
        return 0

    def _loop(self) -> None:
        watchdog = self.notify.watchdog_interval()
        next_resync = time.monotonic() + self.resync_interval
        ready = False
        while True:
            if watchdog:
                self.notify("WATCHDOG=1")
            got = self._take()
            if self._stop_requested:
                return
            if not got:
                left = next_resync - time.monotonic()
                if left > 0:
                    self.inbox.wait(min(left, watchdog) if watchdog else left)
                    continue
                got = [Trigger("resync", full=True)]
            t = self._coalesce(got)
            if t is None:
                return
            if t.reload:
                if t.kind == "sighup":
                    self.notify("RELOADING=1")
                if not self.load_config():
                    status = ("STATUS=waiting for a valid config: " + self.config_path
                              if self.cfg is None else "STATUS=config invalid, last good state kept")
                    # READY=1 once at start, and once after each RELOADING=1
                    self.notify(*(["READY=1"] if not ready or t.kind == "sighup" else []), status)
                    ready = True
                    if not t.full or self.cfg is None:
                        continue
            if t.kind == "netlink" and not t.force and not self._usable_changed():
                continue
            if self.cfg is None:  # no valid config yet: nothing to sync, wait for one
                next_resync = time.monotonic() + self.resync_interval
                continue
            self._sync(t)
            if t.full:
                next_resync = time.monotonic() + self.resync_interval
            if not ready or t.kind == "sighup":
                self.notify("READY=1")
                ready = True

    def _take(self) -> list[Trigger]:
        """What was posted, and one sighup trigger for any number of SIGHUPs."""
        got = self.inbox.take()
        hups = self._hups  # read once: a SIGHUP after this read is seen next time
        if hups != self._hups_seen:
            self._hups_seen = hups
            got.append(Trigger("sighup", full=True, reload=True))
        return got

    def _coalesce(self, got: list[Trigger]) -> Optional[Trigger]:
        """Merge the triggers that arrive within the debounce window; None: stop."""
        window = CONFIG_DEBOUNCE if any(t.kind in ("config", "start") for t in got) \
            else NETLINK_DEBOUNCE
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            self.inbox.wait(left)
            if self._stop_requested:
                return None
            got += self._take()
        if self._stop_requested:
            return None
        kinds = [t.kind for t in got]
        kind = next((k for k in _KIND_ORDER if k in kinds), None) \
            or next((k for k in kinds if k not in _KIND_LAST), None) \
            or ("resync" if "resync" in kinds else "netlink")
        # only address events alone may be skipped when usability did not change
        force = any(t.force or t.kind != "netlink" for t in got)
        # a drift check reads only what its event was about: merged with
        # anything else, read everything
        full = any(t.full for t in got) or (len(set(kinds)) > 1
                                             and bool({"drift", "drift-routes"} & set(kinds)))
        return Trigger(kind, full, any(t.reload for t in got), force)

    def _usable_changed(self) -> bool:
        if self.cfg is None or self.rec is None:
            return False
        try:
            usable = usable_from(self.cfg, self.rec.read_host())
        except Exception as e:  # cannot tell: sync, which reads the host again
            self.log.warning("reading the host's addresses failed; syncing anyway",
                             error=f"{type(e).__name__}: {e}")
            return True
        return usable != self.last_usable

    def _sync(self, t: Trigger) -> None:
        assert self.cfg is not None and self.rec is not None
        t0 = time.perf_counter()
        try:
            r = self.rec.sync(self.cfg, trigger=t.kind, full=t.full)
        except (NftError, RoutingError, OSError) as e:
            self.metrics.record_sync(t.kind, False, time.perf_counter() - t0)
            self.failures += 1
            detail = e.excerpt() if isinstance(e, NftError) else ""
            self.log.error("sync failed; the next sync is a full one", trigger=t.kind,
                           error=str(e), batch_excerpt=detail or None)
            self.notify(f"STATUS=sync failed: {str(e).splitlines()[0][:200]}")
            self._synced(t.kind, None, str(e))
            return
        except Exception as e:  # a capacity error or a bug: keep the last good state
            self.metrics.record_sync(t.kind, False, time.perf_counter() - t0)
            self.failures += 1
            self.log.error("sync failed; the kernel keeps the last good state", trigger=t.kind,
                           error=f"{type(e).__name__}: {e}")
            self.notify(f"STATUS=sync failed: {e}")
            self._synced(t.kind, None, f"{type(e).__name__}: {e}")
            return
        self.syncs += 1
        if r.mode != "incremental":
            _freeze()
        self.last_result = r
        self.metrics.record_sync(t.kind, True, r.duration_ms / 1000)
        self._store_retry(r)
        before = self.last_usable
        # what the plan used, read before the commit: an address that changes while
        # the sync runs still counts as a change when its netlink event is handled
        self.last_usable = r.usable
        self._record_usable(before, self.last_usable)
        if r.drift:
            self.log.warning("drift repaired", trigger=r.trigger,
                             found=[str(f) for f in r.drift])
            self.metrics.record_drift(f.kind for f in r.drift)
        count, cmax = conntrack_numbers()
        # a note (a cgroup not there yet) is said once, not at every full sync
        notes = [n for n in r.notes if n not in self.noted]
        self.noted = set(r.notes) if r.mode == "full" else self.noted | set(notes)
        more = r.workloads_touched - len(r.workloads)
        self.log.info("sync", trigger=r.trigger, mode=r.mode, changed=r.changed,
                      **({"workloads": list(r.workloads)} if r.workloads else {}),
                      **({"workloads_more": more} if more else {}),
                      elements_added=r.added, elements_removed=r.removed,
                      route_ops=len(r.route_ops), policies_changed=r.policies_changed,
                      adopted=r.adopted, duration_ms=round(r.duration_ms, 2),
                      conntrack_count=count, conntrack_max=cmax,
                      **({"notes": notes} if notes else {}),
                      **({"store_error": r.store_error} if r.store_error else {}),
                      **({"quarantined": r.quarantined} if r.quarantined else {}))
        n_ips = len(self.cfg.ips_here())
        usable = sum(1 for ip in self.cfg.ips_here()
                     if self.last_usable.ok(ip, 4) or self.last_usable.ok(ip, 6))
        self.notify(f"STATUS={len(self.cfg.workloads)} workloads, {usable}/{n_ips} egress IPs "
                    f"usable, last sync {r.trigger} {r.duration_ms:.0f} ms")
        self._synced(t.kind, r, None)
        for fn in self.on_sync:
            fn(r)

    # --- what `status` reads (health.py) -------------------------------------------
    def _config_loaded(self, ok: bool, problems: list[str]) -> None:
        prev = self.state["config_load"] or {}
        now = time.time()
        self.metrics.record_reload(ok, now)
        self.state["config_load"] = {"ok": ok, "time": now, "problems": problems[:20],
                                     "last_ok_time": now if ok else prev.get("last_ok_time")}
        if not ok:
            self.state["last_error"] = {"time": now, "message": "config invalid: "
                                        + (problems[0] if problems else "?")}
        self._write_state()

    def _synced(self, trigger: str, r: Optional[SyncResult], error: Optional[str]) -> None:
        now = time.time()
        if self.prober is not None:  # what `status` cannot probe itself
            self.state["unreachable"] = sorted(self.prober.unreachable())
        self.state["last_sync"] = {"time": now, "trigger": trigger, "ok": error is None,
                                   "mode": r.mode if r else None,
                                   "duration_ms": round(r.duration_ms, 2) if r else None,
                                   "error": error}
        if error:
            self.state["last_error"] = {"time": now, "message": f"sync failed: {error}"}
        if r is not None and self.cfg is not None:
            self.tracker.observe("egress_ip", health.ip_conditions(self.cfg, r.usable), now)
            missing = self.rec.index.missing_cgroups if self.rec and self.rec.index else ()
            self.tracker.observe("workload", {w: [health.condition(
                "CgroupPresent", False, "CgroupMissing", "")] for w in missing}, now)
        self._write_state()

    def _write_state(self) -> None:
        state_dir = self.state_dir or (self.cfg.state_dir if self.cfg else None)
        if not state_dir:
            return
        try:
            os.makedirs(state_dir, exist_ok=True)
            health.write(state_dir, self.state, self.tracker)
            self._state_write_error = None
        except OSError as e:
            if self._state_write_error != str(e):  # once per distinct error
                self.log.warning("cannot write status.json; `status` will not show the "
                                 "daemon's state", error=str(e))
            self._state_write_error = str(e)

    def _store_retry(self, r: SyncResult) -> None:
        """The kernel took the sync but the store write failed: retry it with a full
        sync after a backoff (0.5 s doubling to 30 s), one timer at a time."""
        with self.metrics.lock:
            self.metrics.store_write_failures = self.rec.store_write_failures if self.rec else 0
        if r.store_error is None:
            self.store_retry_delay = 0.0
            return
        if self.store_retry is not None and self.store_retry.is_alive():
            return
        lo, hi = STORE_RETRY
        self.store_retry_delay = min(hi, max(lo, self.store_retry_delay * 2))
        self.store_retry = threading.Timer(
            self.store_retry_delay, lambda: self.post(Trigger("store-retry", full=True)))
        self.store_retry.daemon = True
        self.store_retry.start()


    # --- signals ------------------------------------------------------------------
    def _signals(self) -> Callable[[], None]:
        """Handlers that only set a flag; the wake-up goes through the inbox's pipe.
        Returns what restores the previous handlers."""
        def on_stop(signum, frame):
            self._stop_requested = True

        def on_hup(signum, frame):
            self._hups += 1

        old = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_stop),
                                                   (signal.SIGINT, on_stop),
                                                   (signal.SIGHUP, on_hup))}
        # a full pipe drops the byte, which is fine: the loop is woken already
        old_fd = signal.set_wakeup_fd(self.inbox.wakeup_fd, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                # the process is on its way out: a SIGHUP of a reload loop that
                # arrives now must not turn a clean exit into death by signal
                signal.signal(s, signal.SIG_IGN if h == signal.SIG_DFL else h)
        return restore

    # --- watchers -------------------------------------------------------------------
    def watchers(self) -> dict[str, Callable[[], None]]:
        """The thread bodies `run` starts, by name. Each runs until `stopping`.
        A new event source is one entry: a body that hands triggers to
        `self.post`, reports dropped events to `self.events_lost` and raises
        when it cannot go on (`start_watcher` does the rest)."""
        out: dict[str, Callable[[], None]] = {
            "inotify": lambda: watch_config(self.config_path, self.stopping, self.post,
                                            self.events_lost, self.log)}
        if self.watch_netlink:
            out["netlink"] = lambda: watch_links(self.stopping, self.post, self.events_lost)
            out["nftwatch"] = self._watch_drift
        if self.usage_interval and self.collect_usage:
            out["usage"] = self._watch_usage
        if self.translation_log:
            out["translations"] = self._translations
        if self.prober is not None:  # remote IPs' gateways (probe.py)
            out["probe"] = lambda: self.prober.run(
                self.stopping, lambda: probe.targets(self.cfg) if self.cfg else frozenset(),
                lambda: self.post(Trigger("probe", force=True)),
                lambda msg: self.log.error(msg))
        return {**out, **self.extra_watchers}

    def start_watcher(self, name: str, body: Callable[[], None]) -> threading.Thread:
        """Run `body` in a thread that survives its errors (see `_supervise`)."""
        th = threading.Thread(target=self._supervise, args=(name, body), name=name, daemon=True)
        th.start()
        return th

    def _supervise(self, name: str, body: Callable[[], None]) -> None:
        """Restart `body` after an error, with a full resync: whatever it missed
        while down is read from the kernel again. ENOBUFS raised by a netlink
        body is lost events, not a failure. `watcher_retries` failures in a
        row (runs shorter than `watcher_healthy`) stop the daemon."""
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                body()
                if self.stopping.is_set():
                    return
                raise RuntimeError("the watcher returned while the daemon runs")
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    error: Exception = e
                else:
                    self.events_lost(name)
                    continue
            except Exception as e:
                error = e
            if self.stopping.is_set():
                return
            failures = 1 if time.monotonic() - started >= self.watcher_healthy else failures + 1
            with self.metrics.lock:
                self.metrics.watcher_errors[name] = self.metrics.watcher_errors.get(name, 0) + 1
            what = f"{type(error).__name__}: {error}"
            if failures >= self.watcher_retries:
                self.log.error("watcher cannot recover: stopping the daemon", watcher=name,
                               failures_in_a_row=failures, error=what)
                self.fatal = f"watcher {name}: {failures} failures in a row, last {what}"
                self.stop()
                return
            delay = min(self.watcher_backoff[0] * 2 ** (failures - 1), self.watcher_backoff[1])
            self.log.error("watcher failed; restarting it, then a full resync", watcher=name,
                           error=what, failures_in_a_row=failures, restart_in_s=delay)
            if self.stopping.wait(delay):
                return
            # queued before the restart: the body is listening again long
            # before the loop's debounce window ends and the sync reads the kernel
            self.post(Trigger("watcher", full=True, reload=True, force=True))

    def events_lost(self, watcher: str) -> None:
        """The kernel dropped events for `watcher` (ENOBUFS, IN_Q_OVERFLOW):
        a full resync reads the truth again."""
        with self.metrics.lock:
            self.metrics.events_lost[watcher] = self.metrics.events_lost.get(watcher, 0) + 1
        self.log.warning("events lost; resyncing from a fresh dump", watcher=watcher)
        self.post(Trigger("watcher", full=True, reload=True, force=True))

    def _watch_drift(self) -> None:
        from .nftwatch import Watch
        kinds = {"nft": Trigger("drift", force=True), "routes": Trigger("drift-routes", force=True),
                 "lost": Trigger("drift", full=True, force=True)}
        Watch(lambda kind, why: self.post(kinds[kind]), lambda msg: self.log.error(msg),
              lambda: [ipaddress.ip_network(str(n), strict=False)
                       for n in (self.cfg.managed_sources if self.cfg else [])]).run(self.stopping)

    def _translations(self) -> None:
        from .translog import TranslationLog, workload_lookup
        while self.rec is None:  # the store is known once a config was loaded
            if self.stopping.wait(0.1):
                return
        rec = self.rec
        # what the kernel holds (memory), not the disk, which may be behind or corrupt
        log = TranslationLog(self.translation_log,
                             workload_lookup(lambda: rec.allocations() or rec.store.load()))
        self.log.info("translation log", path=self.translation_log)
        def overrun(msg: str, n: int) -> None:
            with self.metrics.lock:
                self.metrics.translation_overruns = n
            self.log.warning(msg, overruns=n)
        log.run(self.stopping, overrun)

    # --- usage and metrics ---------------------------------------------------------
    def _record_usable(self, before, after) -> None:
        """Per egress IP and family: usable or not, a failover counted and logged at
        warning when an active IP loses a family, a note when it comes back."""
        assert self.cfg is not None
        now: dict[tuple[str, str], bool] = {}
        info = []
        with self.metrics.lock:
            was = self.metrics.usable
            for ip in self.cfg.ips_here():
                info.append((ip.id, ip.ipv4 or "", ip.ipv6 or "", ip.app or "", ip.state))
                for fam, name in metrics_mod.FAMILIES.items():
                    if (ip.ipv4 if fam == 4 else ip.ipv6) is None:
                        continue
                    key = (ip.id, name)
                    ok = now[key] = after.ok(ip, fam)
                    if before is None or ip.state != "active" or was.get(key) is None:
                        continue
                    if was[key] and not ok:
                        self.metrics.failovers[key] = self.metrics.failovers.get(key, 0) + 1
                        self.log.warning("egress IP unusable for new connections: its "
                                         "workloads follow their fallback",
                                         egress_ip=ip.id, family=name)
                    elif not was[key] and ok:
                        self.log.info("egress IP usable again: workloads return to it",
                                      egress_ip=ip.id, family=name)
            self.metrics.usable = now
            self.metrics.ip_info = info

    def _watch_usage(self) -> None:
        while not self.stopping.wait(self.usage_interval):
            cfg = self.cfg
            if cfg is None:
                continue
            try:
                # what the kernel holds (memory), as the translation log reads it
                snap = self.collect_usage(cfg, self.rec.allocations() if self.rec else None)
            except Exception as e:
                self.log.error("usage collection failed", error=f"{type(e).__name__}: {e}")
                continue
            with self.metrics.lock:
                self.metrics.snapshot = snap
            # the collection's garbage (conntrack's dump, the rows before) back to the
            # system, in this thread (ctypes lets go of the GIL): at 100k workloads the
            # daemon's RSS after 40 config changes, 344 -> 292 MB (bench/README.md)
            trim_heap()
            self._warn(snap)
            # a released block whose last connection is gone: the sync frees it
            # (after its own conntrack read; this dump may predate a release)
            alloc = self.rec.alloc if self.rec else None
            if alloc and any(not l.in_use(snap.live) for l in alloc.lingering.values()):
                self.post(Trigger("drained"))

    def _warn(self, snap) -> None:
        """One warning when a ratio crosses warn_at, one note when it falls back below."""
        above = {(r.workload, r.egress_address, r.protocol, r.destination, r.port): r
                 for r in snap.rows if r.warning}
        for key in above.keys() - self.warned:
            r = above[key]
            self.log.warning("usage above warn_at", workload=r.workload,
                             egress_address=r.egress_address, protocol=r.protocol,
                             destination=r.destination, port=r.port, connections=r.connections,
                             limit=r.limit, limit_kind=r.limit_kind, ratio=round(r.ratio, 3))
        for key in self.warned - above.keys():
            self.log.info("usage back below warn_at", workload=key[0], egress_address=key[1],
                          protocol=key[2], destination=key[3], port=key[4])
        self.warned = set(above)
