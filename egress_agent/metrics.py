"""Prometheus metrics of the daemon (text format over HTTP, loopback by default).

The exposition is prometheus_client's; the values come from the daemon's last
sync and last usage snapshot, so a scrape never dumps conntrack itself.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class State:
    """What the daemon knows, updated under a lock, read by the collector."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.syncs: dict[tuple[str, str], int] = {}
        self.sync_seconds: dict[str, float] = {}
        self.last_sync_duration = 0.0
        self.failovers = 0
        self.store_write_failures = 0
        self.snapshot = None
        self.usable: dict[str, bool] = {}
        self.watcher_errors: dict[str, int] = {}  # by watcher thread name
        self.events_lost: dict[str, int] = {}     # ENOBUFS, IN_Q_OVERFLOW: a full resync each
        self.drift: dict[str, int] = {}  # drift repairs by kind (drift.py)

    def record_sync(self, trigger: str, ok: bool, seconds: float) -> None:
        with self.lock:
            key = (trigger, "ok" if ok else "error")
            self.syncs[key] = self.syncs.get(key, 0) + 1
            self.sync_seconds[trigger] = self.sync_seconds.get(trigger, 0.0) + seconds
            self.last_sync_duration = seconds


    def record_drift(self, kinds) -> None:
        """One repair counts once per kind of what it found."""
        with self.lock:
            for kind in set(kinds):
                self.drift[kind] = self.drift.get(kind, 0) + 1


class Collector:
    def __init__(self, state: State):
        self.state = state

    def collect(self):
        s = self.state
        with s.lock:
            c = CounterMetricFamily("egress_agent_syncs", "Syncs by trigger and result",
                                    labels=["trigger", "result"])
            for (trigger, result), n in sorted(s.syncs.items()):
                c.add_metric([trigger, result], n)
            yield c
            c = CounterMetricFamily("egress_agent_sync_seconds", "Time spent in syncs",
                                    labels=["trigger"])
            for trigger, sec in sorted(s.sync_seconds.items()):
                c.add_metric([trigger], sec)
            yield c
            yield GaugeMetricFamily("egress_agent_last_sync_duration_seconds",
                                    "Duration of the last sync", value=s.last_sync_duration)
            c = CounterMetricFamily("egress_agent_drift_repairs", "Syncs that found and repaired "
                                    "foreign changes to the agent's table, ip rules or routes",
                                    labels=["kind"])
            for kind, n in sorted(s.drift.items()):
                c.add_metric([kind], n)
            yield c
            yield CounterMetricFamily("egress_agent_failovers", "Egress IPs that became unusable",
                                      value=s.failovers)
            yield CounterMetricFamily("egress_agent_store_write_failures",
                                      "Writes of the allocation store that failed (each is "
                                      "retried; the kernel kept the change)",
                                      value=s.store_write_failures)
            g = GaugeMetricFamily("egress_agent_egress_ip_usable", "1 if the egress IP can take "
                                  "new connections", labels=["egress_ip"])
            for ip, ok in sorted(s.usable.items()):
                g.add_metric([ip], 1 if ok else 0)
            yield g
            for name, help_, counts in (
                    ("egress_agent_watcher_errors", "Errors of a watcher thread (each followed "
                     "by a restart and a full resync)", s.watcher_errors),
                    ("egress_agent_watcher_events_lost", "Times the kernel dropped events for a "
                     "watcher (each followed by a full resync)", s.events_lost)):
                c = CounterMetricFamily(name, help_, labels=["watcher"])
                for watcher, n in sorted(counts.items()):
                    c.add_metric([watcher], n)
                yield c
            snap = s.snapshot
        if snap is None:
            return
        yield from _snapshot_metrics(snap)


def _snapshot_metrics(snap):
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


def serve(listen: str, state: State, nonlocal_: bool = False) -> Optional[object]:
    from prometheus_client import CollectorRegistry, start_http_server
    host, port = parse_listen(listen, nonlocal_)
    registry = CollectorRegistry()
    registry.register(Collector(state))
    return start_http_server(port, addr=host, registry=registry)
