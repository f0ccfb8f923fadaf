"""Prometheus metrics of the daemon (text format over HTTP, loopback by default).

The exposition is prometheus_client's; the values come from the daemon's last
sync and last usage snapshot, so a scrape never dumps conntrack itself.
"""

from __future__ import annotations

import bisect
import ipaddress
import platform
import threading
import time
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import __version__
from .argtypes import endpoint

def parse_listen(text: str, nonlocal_: bool = False) -> tuple[str, int]:
    """ADDR:PORT or [IPv6]:PORT on loopback (127.0.0.0/8, ::1). The metrics name every
    workload, its addresses and its usage, so any other address must be named by the
    operator with --metrics-nonlocal, and never as "every address" (0.0.0.0, ::)."""
    shown = text if text.isprintable() else repr(text)  # the message stays one line
    try:
        host, port = endpoint(text)
    except ValueError as e:
        raise ValueError(f"--metrics {shown}: {e}; write 127.0.0.1:9469 or [::1]:9469") from None
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        raise ValueError(f"--metrics {shown}: refusing every address; name one (loopback, "
                         "or another with --metrics-nonlocal)")
    if not addr.is_loopback and not nonlocal_:
        raise ValueError(f"--metrics {shown}: refusing a non-loopback address (the metrics name "
                         "every workload); use 127.0.0.1 or ::1, or add --metrics-nonlocal to "
                         "serve on this address on purpose")
    return str(addr), port


# sync durations: from a one-workload sync (ms) to a full sync of 100k workloads (s)
SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
FAMILIES = {4: "ipv4", 6: "ipv6"}


class State:
    """What the daemon knows, updated under a lock, read by the collector."""

    def __init__(self, detail: bool = False) -> None:
        self.lock = threading.Lock()
        self.detail = detail  # per-workload and per-destination series (--metrics-detail)
        self.syncs: dict[tuple[str, str], int] = {}
        # trigger -> [count per bucket (not cumulative), sum]
        self.sync_hist: dict[str, list] = {}
        self.last_sync_duration = 0.0
        self.last_sync_success: Optional[float] = None  # unix time
        self.config_ok: Optional[bool] = None  # the last load or reload
        self.config_ok_time: Optional[float] = None  # the last successful one
        self.failovers: dict[tuple[str, str], int] = {}  # (egress IP, family)
        self.store_write_failures = 0
        self.translation_overruns = 0
        self.snapshot = None
        self.usable: dict[tuple[str, str], bool] = {}  # (egress IP, family)
        self.ip_info: list[tuple[str, str, str, str, str]] = []  # id, ipv4, ipv6, app, state
        self.watcher_errors: dict[str, int] = {}  # by watcher thread name
        self.events_lost: dict[str, int] = {}     # ENOBUFS, IN_Q_OVERFLOW: a full resync each
        self.drift: dict[str, int] = {}  # drift repairs by kind (drift.py)

    def record_sync(self, trigger: str, ok: bool, seconds: float) -> None:
        with self.lock:
            key = (trigger, "ok" if ok else "error")
            self.syncs[key] = self.syncs.get(key, 0) + 1
            h = self.sync_hist.setdefault(trigger, [[0] * (len(SYNC_BUCKETS) + 1), 0.0])
            h[0][bisect.bisect_left(SYNC_BUCKETS, seconds)] += 1
            h[1] += seconds
            self.last_sync_duration = seconds
            if ok:
                self.last_sync_success = time.time()

    def record_reload(self, ok: bool, now: float) -> None:
        with self.lock:
            self.config_ok = ok
            if ok:
                self.config_ok_time = now

    def record_drift(self, kinds) -> None:
        """One repair counts once per kind of what it found."""
        with self.lock:
            for kind in set(kinds):
                self.drift[kind] = self.drift.get(kind, 0) + 1


def _counter(name: str, help_: str, label: str, counts: dict):
    c = CounterMetricFamily(name, help_, labels=[label])
    for key, n in sorted(counts.items()):
        c.add_metric([key], n)
    return c


class Collector:
    def __init__(self, state: State):
        self.state = state

    def collect(self):
        s = self.state
        with s.lock:
            yield from self._daemon(s)
            snap, detail = s.snapshot, s.detail
        if snap is not None:
            yield from _snapshot_metrics(snap, detail)

    @staticmethod
    def _daemon(s: State):
        info = GaugeMetricFamily("egress_agent_build_info", "The agent's version, value 1",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        c = CounterMetricFamily("egress_agent_syncs", "Syncs by trigger and result",
                                labels=["trigger", "result"])
        for (trigger, result), n in sorted(s.syncs.items()):
            c.add_metric([trigger, result], n)
        yield c
        h = HistogramMetricFamily("egress_agent_sync_duration_seconds", "Duration of syncs "
                                  "(plan, nft batch, routes, store), ok or failed",
                                  labels=["trigger"])
        for trigger, (counts, total) in sorted(s.sync_hist.items()):
            cum, buckets = 0, []
            for le, n in zip([*map(str, SYNC_BUCKETS), "+Inf"], counts):
                cum += n
                buckets.append((le, cum))
            h.add_metric([trigger], buckets, total)
        yield h
        yield GaugeMetricFamily("egress_agent_last_sync_duration_seconds",
                                "Duration of the last sync", value=s.last_sync_duration)
        if s.last_sync_success is not None:
            yield GaugeMetricFamily("egress_agent_last_sync_success_timestamp_seconds",
                                    "When the kernel last took a sync (unix time)",
                                    value=s.last_sync_success)
        if s.config_ok is not None:
            yield GaugeMetricFamily("egress_agent_config_last_reload_successful",
                                    "1 if the last config load or reload was valid (an invalid "
                                    "one leaves the last good state applied)",
                                    value=1 if s.config_ok else 0)
        if s.config_ok_time is not None:
            yield GaugeMetricFamily("egress_agent_config_last_reload_success_timestamp_seconds",
                                    "When a valid config was last loaded (unix time)",
                                    value=s.config_ok_time)
        yield _counter("egress_agent_drift_repairs", "Syncs that found and repaired foreign "
                       "changes to the agent's table, ip rules or routes", "kind", s.drift)
        c = CounterMetricFamily("egress_agent_failovers", "Times an active egress IP became "
                                "unusable for a family (address gone or link down)",
                                labels=["egress_ip", "family"])
        for (ip, fam), n in sorted(s.failovers.items()):
            c.add_metric([ip, fam], n)
        yield c
        yield CounterMetricFamily("egress_agent_store_write_failures",
                                  "Writes of the allocation store that failed (each is "
                                  "retried; the kernel kept the change)",
                                  value=s.store_write_failures)
        yield CounterMetricFamily("egress_agent_translation_log_overruns",
                                  "Times the kernel dropped conntrack events meant for the "
                                  "translation log (lines are missing)",
                                  value=s.translation_overruns)
        g = GaugeMetricFamily("egress_agent_egress_ip_usable", "1 if the egress IP can take "
                              "new connections of that family", labels=["egress_ip", "family"])
        for (ip, fam), ok in sorted(s.usable.items()):
            g.add_metric([ip, fam], 1 if ok else 0)
        yield g
        g = GaugeMetricFamily("egress_agent_egress_ip_info", "Each egress IP of this host, "
                              "value 1", labels=["egress_ip", "ipv4", "ipv6", "app", "state"])
        for row in s.ip_info:
            g.add_metric(list(row), 1)
        yield g
        yield _counter("egress_agent_watcher_errors", "Errors of a watcher thread (each "
                       "followed by a restart and a full resync)", "watcher", s.watcher_errors)
        yield _counter("egress_agent_watcher_events_lost", "Times the kernel dropped events for "
                       "a watcher (each followed by a full resync)", "watcher", s.events_lost)


def _snapshot_metrics(snap, detail: bool):
    ct = snap.conntrack
    if ct.get("count") is not None:
        yield GaugeMetricFamily("egress_agent_conntrack_entries", "Conntrack entries (host)",
                                value=ct["count"])
    if ct.get("max") is not None:
        yield GaugeMetricFamily("egress_agent_conntrack_max", "nf_conntrack_max", value=ct["max"])
    for name in ("insert_failed", "drop", "early_drop"):
        if name in ct.get("stats", {}):
            yield CounterMetricFamily(f"egress_agent_conntrack_{name}",
                                      f"Kernel conntrack {name} (summed over CPUs)",
                                      value=ct["stats"][name])
    # by egress IP: bounded by the config's egress IPs, whatever the workloads do
    conns = GaugeMetricFamily("egress_agent_egress_ip_connections", "Connections leaving "
                              "through the egress IP", labels=["egress_ip", "protocol"])
    worst = GaugeMetricFamily("egress_agent_egress_ip_usage_ratio_max", "Highest usage ratio "
                              "of one workload's port block to one destination on the egress IP",
                              labels=["egress_ip"])
    ref = CounterMetricFamily("egress_agent_egress_ip_refused", "New connections refused "
                              "because a workload's port block to that destination was full",
                              labels=["egress_ip", "protocol", "reason"])
    per_ip: dict[tuple, int] = {}
    best: dict[str, float] = {}
    refused: dict[tuple, int] = {}
    for r in snap.rows:
        if r.workload == "*":
            continue
        ip = r.egress_ip or ""
        per_ip[ip, r.protocol] = per_ip.get((ip, r.protocol), 0) + r.connections
        if r.ratio is not None:
            best[ip] = max(best.get(ip, 0.0), r.ratio)
    for r in snap.refused:
        k = (r["egress_ip"] or "", r["protocol"], r["reason"])
        refused[k] = refused.get(k, 0) + r["refused"]
    for k, n in sorted(per_ip.items()):
        conns.add_metric(list(k), n)
    for ip, ratio in sorted(best.items()):
        worst.add_metric([ip], ratio)
    for k, n in sorted(refused.items()):
        ref.add_metric(list(k), n)
    yield conns
    yield worst
    yield ref
    if detail:
        yield from _detail_metrics(snap)
    cap = GaugeMetricFamily("egress_agent_egress_ip_workloads", "Workloads holding a lease on "
                            "the egress IP", labels=["egress_ip"])
    mx = GaugeMetricFamily("egress_agent_egress_ip_max_workloads", "limits.max_workloads",
                           labels=["egress_ip"])
    free = GaugeMetricFamily("egress_agent_egress_ip_free_port_blocks", "Port blocks left",
                             labels=["egress_ip"])
    linger = GaugeMetricFamily("egress_agent_egress_ip_lingering_port_blocks", "Released port "
                               "blocks not reused yet: conntrack still has their connections",
                               labels=["egress_ip"])
    for ip in snap.ips:
        cap.add_metric([ip["egress_ip"]], ip["workloads"])
        if ip.get("lingering_port_blocks") is not None:
            linger.add_metric([ip["egress_ip"]], ip["lingering_port_blocks"])
        if ip["max_workloads"]:
            mx.add_metric([ip["egress_ip"]], ip["max_workloads"])
        if ip["free_port_blocks"] is not None:
            free.add_metric([ip["egress_ip"]], ip["free_port_blocks"])
    yield cap
    yield mx
    yield free
    yield linger


def _detail_metrics(snap):
    """Per workload and per destination (--metrics-detail): a series per workload,
    IPv6 address and origin port. Off by default: unbounded on a big host."""
    conns = GaugeMetricFamily("egress_agent_connections", "Connections per workload and egress "
                              "address", labels=["workload", "egress_address", "protocol"])
    worst = GaugeMetricFamily("egress_agent_usage_ratio_max", "Highest usage ratio of a workload "
                              "over its destinations (port block)", labels=["workload"])
    per_w: dict[tuple, int] = {}
    best: dict[str, float] = {}
    for r in snap.rows:
        if r.workload == "*":
            continue
        k = (r.workload, r.egress_address, r.protocol)
        per_w[k] = per_w.get(k, 0) + r.connections
        if r.ratio is not None:
            best[r.workload] = max(best.get(r.workload, 0.0), r.ratio)
    for k, n in sorted(per_w.items()):
        conns.add_metric(list(k), n)
    for w, ratio in sorted(best.items()):
        worst.add_metric([w], ratio)
    yield conns
    yield worst
    dest = GaugeMetricFamily("egress_agent_destination_usage_ratio", "Connections of one egress "
                             "address to one origin ip:port against connections_per_destination",
                             labels=["egress_address", "destination", "port", "protocol"])
    for r in snap.rows:
        if r.workload == "*" and r.ratio is not None:
            dest.add_metric([r.egress_address, r.destination, str(r.port), r.protocol], r.ratio)
    yield dest
    ref = CounterMetricFamily("egress_agent_refused", "New connections refused because the "
                              "workload's port block to that destination was full",
                              labels=["workload", "egress_address", "protocol", "reason"])
    for r in snap.refused:
        ref.add_metric([r["workload"], r["egress_address"] or "", r["protocol"], r["reason"]],
                       r["refused"])
    yield ref


def serve(listen: str, state: State, nonlocal_: bool = False) -> Optional[object]:
    from prometheus_client import (CollectorRegistry, PlatformCollector, ProcessCollector,
                                   start_http_server)
    host, port = parse_listen(listen, nonlocal_)
    registry = CollectorRegistry()
    registry.register(Collector(state))
    # the standard process_* and python_info series
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return start_http_server(port, addr=host, registry=registry)
