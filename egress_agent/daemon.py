"""`egress-agent run`: keep the kernel equal to the desired state.

One loop, one sync at a time. Triggers arrive on a queue:
- the config file changed (inotify on its directory, so editors that replace
  the file are seen; debounced), or SIGHUP: reload, then sync;
- netlink: an address or link changed; if that changes which egress IPs are
  usable, sync at once (failover is a netlink event, not a poll);
- nftwatch: a foreign nftables commit that touched our table ("drift"), or an
  ip rule or route changed in our reserved ranges ("drift-routes"): a sync at
  once that reads that part of the kernel, logs a warning naming what it found
  and repairs it in one batch (merged with any other trigger: a full sync);
- the periodic full resync, which re-reads the kernel and repairs drift too;
- SIGTERM/SIGINT: stop, leaving the kernel state in place.
An invalid config is logged with file, line and reason; the last good state
stays applied and the daemon waits for the next version.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import log as logmod
from . import metrics as metrics_mod
from .config import Config, ConfigError, load, watched_paths
from .nft import NftError
from .reconcile import Reconciler, SyncResult, usable_from
from .routing import RoutingError
from .sdnotify import Notifier

CONFIG_DEBOUNCE = 0.1  # editors write in several steps
NETLINK_DEBOUNCE = 0.005


@dataclass(frozen=True)
class Trigger:
    kind: str  # config | sighup | netlink | drift | drift-routes | resync | stop | start
    full: bool = False    # re-read the kernel instead of trusting memory
    reload: bool = False  # re-read the config file
    force: bool = False   # sync even if no egress IP changed usability


def conntrack_numbers() -> tuple[Optional[int], Optional[int]]:
    out = []
    for name in ("nf_conntrack_count", "nf_conntrack_max"):
        try:
            with open(f"/proc/sys/net/netfilter/{name}") as f:
                out.append(int(f.read()))
        except OSError:
            out.append(None)
    return out[0], out[1]


class Daemon:
    def __init__(self, config_path: str, make_reconciler: Callable[[Config], Reconciler],
                 resync_interval: float = 60.0, notify: Optional[Notifier] = None,
                 watch_netlink: bool = True, state_dir: Optional[str] = None,
                 metrics: Optional[metrics_mod.State] = None,
                 usage_interval: Optional[float] = None,
                 collect_usage: Optional[Callable[[Config], object]] = None,
                 translation_log: Optional[str] = None):
        self.config_path = os.path.abspath(config_path)
        self.make_reconciler = make_reconciler
        self.resync_interval = resync_interval
        self.notify = notify or Notifier()
        self.watch_netlink = watch_netlink
        self.state_dir = state_dir
        self.queue: "queue.Queue[Trigger]" = queue.Queue()
        self.log = logmod.get()
        self.cfg: Optional[Config] = None
        self.rec: Optional[Reconciler] = None
        self.stopping = threading.Event()
        self.last_usable = None
        self.syncs = 0
        self.failures = 0
        self.last_result: Optional[SyncResult] = None
        self.on_sync: list[Callable[[SyncResult], None]] = []
        self.metrics = metrics or metrics_mod.State()
        self.usage_interval = usage_interval
        self.collect_usage = collect_usage
        self.warned: set = set()
        self.translation_log = translation_log

    # --- config ----------------------------------------------------------------
    def load_config(self) -> bool:
        try:
            cfg = load(self.config_path).config
        except ConfigError as e:
            for p in e.problems:
                self.log.error("config invalid, keeping the last good state", problem=str(p),
                               file=p.file, line=p.line, field=p.path, reason=p.message)
            return False
        if self.state_dir:
            cfg = cfg.model_copy(update={"state_dir": self.state_dir})
        if self.rec is None:
            self.rec = self.make_reconciler(cfg)
        self.cfg = cfg
        return True

    # --- the loop ---------------------------------------------------------------
    def run(self) -> int:
        self._signals()
        threading.Thread(target=self._watch_config, name="inotify", daemon=True).start()
        if self.watch_netlink:
            threading.Thread(target=self._watch_netlink, name="netlink", daemon=True).start()
            threading.Thread(target=self._watch_drift, name="nftwatch", daemon=True).start()
        if self.usage_interval and self.collect_usage:
            threading.Thread(target=self._watch_usage, name="usage", daemon=True).start()
        if self.translation_log:
            threading.Thread(target=self._translations, name="translations", daemon=True).start()
        self.queue.put(Trigger("start", full=True, reload=True))
        watchdog = self.notify.watchdog_interval()
        next_resync = time.monotonic() + self.resync_interval
        ready = False
        while not self.stopping.is_set():
            timeout = max(0.0, next_resync - time.monotonic())
            if watchdog:
                timeout = min(timeout, watchdog)
                self.notify("WATCHDOG=1")
            try:
                t = self.queue.get(timeout=timeout)
            except queue.Empty:
                if time.monotonic() >= next_resync:
                    t = Trigger("resync", full=True)
                else:
                    continue
            if t.kind == "stop":
                break
            t = self._coalesce(t)
            if t.kind == "stop":
                break
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
        self.notify("STOPPING=1")
        self.log.info("stopped; kernel state left in place")
        return 0

    def _coalesce(self, first: Trigger) -> Trigger:
        """Merge the triggers that arrive within the debounce window."""
        window = CONFIG_DEBOUNCE if first.kind in ("config", "start") else NETLINK_DEBOUNCE
        kinds, full, reload, force = [first.kind], first.full, first.reload, first.force
        deadline = time.monotonic() + window
        while True:
            left = deadline - time.monotonic()
            try:
                t = self.queue.get(timeout=max(0.0, left)) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if t.kind == "stop":
                return t
            kinds.append(t.kind)
            full, reload, force = full or t.full, reload or t.reload, force or t.force
        kind = next((k for k in ("start", "sighup", "config", "resync", "netlink", "drift",
                                 "drift-routes") if k in kinds), first.kind)
        # a drift check reads only what its event was about: merged with
        # anything else, read everything
        full = full or (len(set(kinds)) > 1 and bool({"drift", "drift-routes"} & set(kinds)))
        return Trigger(kind, full, reload, force)

    def _usable_changed(self) -> bool:
        if self.cfg is None or self.rec is None:
            return False
        usable = usable_from(self.cfg, self.rec.read_host())
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
            return
        except Exception as e:  # a capacity error or a bug: keep the last good state
            self.metrics.record_sync(t.kind, False, time.perf_counter() - t0)
            self.failures += 1
            self.log.error("sync failed; the kernel keeps the last good state", trigger=t.kind,
                           error=f"{type(e).__name__}: {e}")
            self.notify(f"STATUS=sync failed: {e}")
            return
        self.syncs += 1
        self.last_result = r
        self.metrics.record_sync(t.kind, True, r.duration_ms / 1000)
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
        self.log.info("sync", trigger=r.trigger, mode=r.mode, changed=r.changed,
                      elements_added=r.added, elements_removed=r.removed,
                      route_ops=len(r.route_ops), policies_changed=r.policies_changed,
                      adopted=r.adopted, duration_ms=round(r.duration_ms, 2),
                      conntrack_count=count, conntrack_max=cmax,
                      **({"notes": r.notes} if r.notes else {}))
        n_ips = len(self.cfg.ips_here())
        usable = sum(1 for ip in self.cfg.ips_here()
                     if self.last_usable.ok(ip, 4) or self.last_usable.ok(ip, 6))
        self.notify(f"STATUS={len(self.cfg.workloads)} workloads, {usable}/{n_ips} egress IPs "
                    f"usable, last sync {r.trigger} {r.duration_ms:.0f} ms")
        for fn in self.on_sync:
            fn(r)

    # --- event sources ------------------------------------------------------------
    def _signals(self) -> None:
        def stop(signum, frame):
            self.stopping.set()
            self.queue.put(Trigger("stop"))
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda s, f: self.queue.put(Trigger("sighup", full=True, reload=True)))

    def _watch_config(self) -> None:
        """inotify on the config's directory and on the directories of its includes.

        Watching directories, not files, sees editors that write a new file and
        rename it over the old one. Directories of includes added later are
        watched from the next start."""
        from inotify_simple import INotify, flags
        ino = INotify()
        wanted: dict[int, Optional[str]] = {}

        def watch(paths: dict[str, Optional[str]]) -> None:
            for directory, name in paths.items():
                try:
                    wd = ino.add_watch(directory, flags.CLOSE_WRITE | flags.MOVED_TO
                                       | flags.CREATE | flags.DELETE | flags.MOVED_FROM)
                    wanted[wd] = name
                except OSError as e:
                    self.log.warning("cannot watch for config changes", directory=directory,
                                     error=str(e))

        # a config that is a symlink: also watch the file it resolves to
        target = os.path.realpath(self.config_path)
        watch({**watched_paths(self.config_path),
               os.path.dirname(target): os.path.basename(target)})
        while not self.stopping.is_set():
            events = ino.read(timeout=1000)
            now = os.path.realpath(self.config_path) if events else target
            if now != target:  # a symlink on the way now points elsewhere (..data swap)
                target = now
                watch({os.path.dirname(target): os.path.basename(target)})
                self.queue.put(Trigger("config", reload=True))
                continue
            for ev in events:
                name = wanted.get(ev.wd)
                if ev.name == name or (name is None and ev.name.endswith((".yaml", ".yml"))):
                    self.queue.put(Trigger("config", reload=True))

    def _watch_netlink(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            while not self.stopping.is_set():
                for msg in ipr.get():
                    # a link that comes back has lost its routes: a link event
                    # always syncs (which re-reads our routes); an address
                    # event only when it changes which egress IPs are usable.
                    self.queue.put(Trigger("netlink", force=msg["event"] == "RTM_NEWLINK"))

    def _watch_drift(self) -> None:
        from .nftwatch import Watch
        kinds = {"nft": Trigger("drift", force=True), "routes": Trigger("drift-routes", force=True),
                 "lost": Trigger("drift", full=True, force=True)}
        try:
            Watch(lambda kind, why: self.queue.put(kinds[kind]), lambda msg: self.log.error(msg),
                  lambda: [ipaddress.ip_network(str(n), strict=False)
                           for n in (self.cfg.managed_sources if self.cfg else [])]).run(self.stopping)
        except OSError as e:
            self.log.error("drift watch stopped: drift waits for the periodic resync",
                           error=f"{type(e).__name__}: {e}")

    def _translations(self) -> None:
        from .translog import TranslationLog, workload_lookup
        wait_until = time.monotonic() + 30
        while self.rec is None and time.monotonic() < wait_until and not self.stopping.is_set():
            time.sleep(0.1)
        if self.rec is None:
            return
        store = self.rec.store
        log = TranslationLog(self.translation_log, workload_lookup(store.load))
        self.log.info("translation log", path=self.translation_log)
        try:
            log.run(self.stopping, lambda msg, n: self.log.warning(msg, overruns=n))
        except Exception as e:
            self.log.error("translation log stopped", error=f"{type(e).__name__}: {e}")

    # --- usage and metrics ---------------------------------------------------------
    def _record_usable(self, before, after) -> None:
        assert self.cfg is not None
        now = {ip.id: after.ok(ip, 4) or after.ok(ip, 6) for ip in self.cfg.ips_here()}
        with self.metrics.lock:
            for ip, ok in now.items():
                if before is not None and self.metrics.usable.get(ip) and not ok:
                    self.metrics.failovers += 1
                    self.log.warning("egress IP unusable: its workloads follow their fallback",
                                     egress_ip=ip)
                elif before is not None and self.metrics.usable.get(ip) is False and ok:
                    self.log.info("egress IP usable again: workloads return to it", egress_ip=ip)
            self.metrics.usable = now

    def _watch_usage(self) -> None:
        while not self.stopping.wait(self.usage_interval):
            cfg = self.cfg
            if cfg is None:
                continue
            try:
                snap = self.collect_usage(cfg)
            except Exception as e:
                self.log.error("usage collection failed", error=f"{type(e).__name__}: {e}")
                continue
            with self.metrics.lock:
                self.metrics.snapshot = snap
            self._warn(snap)

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
