"""Usage rows against limits, and the Prometheus exposition of a snapshot."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from egress_agent import __version__, names
from egress_agent.alloc import Allocations, allocate
from egress_agent.config import parse
from egress_agent.metrics import Collector, State, parse_listen
from egress_agent.report import Snapshot
from egress_agent.usage import Group, ip_rows, refusals, rows

import pytest

CFG = parse("""
version: 1
host: {name: h, region: r}
defaults: {ports_per_workload: 100, port_range: 1000-1999, warn_at: 0.5}
egress_ips:
  - {id: a, app: x, ipv4: 203.0.113.10, ipv6: "2001:db8:10::/64",
     limits: {connections_per_destination: 120, max_workloads: 4}}
workloads:
  - {id: w1, app: x, source: [10.0.0.1]}
  - {id: w2, app: x, source: [10.0.0.2]}
""").config


def setup():
    a, _ = allocate(CFG, Allocations())
    m1 = names.lease_mark(a.wids["w1"], a.eids["a"])
    m2 = names.lease_mark(a.wids["w2"], a.eids["a"])
    groups = {Group(m1, 6, "192.0.2.1", 443, "203.0.113.10"): 60,
              Group(m2, 6, "192.0.2.1", 443, "203.0.113.10"): 30,
              Group(m1, 17, "192.0.2.9", 53, "203.0.113.10"): 1,
              Group(m1, 6, "2001:db8:ff::1", 443, "2001:db8:10::100"): 7,
              Group(a.wids["w2"], 6, "192.0.2.1", 80, "198.51.100.2"): 99}  # host default: skipped
    return a, m1, groups


def test_rows_limits_ratios_and_order():
    a, m1, groups = setup()
    rs = rows(CFG, a, groups)
    first = rs[0]
    assert (first.workload, first.limit_kind, first.connections, first.limit) == \
        ("*", "connections_per_destination", 90, 120)
    w1 = next(r for r in rs if r.workload == "w1" and r.port == 443 and r.protocol == "tcp"
              and r.egress_address == "203.0.113.10")
    assert (w1.limit, w1.ratio, w1.headroom, w1.warning) == (100, 0.6, 40, True)
    w2 = next(r for r in rs if r.workload == "w2")
    assert w2.ratio == 0.3 and not w2.warning
    v6 = [r for r in rs if r.egress_address == "2001:db8:10::100"]
    assert [(r.workload, r.limit) for r in v6] == [("w1", 1000)]  # one address per workload: the whole port range
    assert all(r.egress_address != "198.51.100.2" for r in rs)
    j = w1.to_json()
    assert set(j) >= {"workload", "egress_address", "protocol", "destination", "port",
                      "connections", "limit", "ratio"}


def test_ip_rows_and_refusals():
    a, m1, _ = setup()
    ip = ip_rows(CFG, a)[0]
    assert (ip["workloads"], ip["max_workloads"], ip["port_blocks"], ip["free_port_blocks"]) == \
        (2, 4, 10, 8)
    r = refusals(CFG, a, [(m1, "tcp", 5)])
    assert r == [{"workload": "w1", "egress_ip": "a", "egress_address": "203.0.113.10",
                  "protocol": "tcp", "reason": "port_block_full", "refused": 5}]


def _scrape(state):
    reg = CollectorRegistry()
    reg.register(Collector(state))
    text = generate_latest(reg).decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def _snapshot():
    a, m1, groups = setup()
    return Snapshot(rows(CFG, a, groups), ip_rows(CFG, a), refusals(CFG, a, [(m1, "tcp", 5)]),
                    {"count": 98, "max": 1000, "ratio": 0.098,
                     "stats": {"insert_failed": 2, "drop": 1}})


def test_metrics_exposition():
    state = State()
    state.record_sync("start", True, 0.02)
    state.record_sync("netlink", False, 0.004)
    state.record_sync("netlink", True, 0.3)
    state.record_reload(False, 1.8e9)
    state.usable = {("a", "ipv4"): True, ("a", "ipv6"): False}
    state.failovers = {("a", "ipv6"): 1}
    state.ip_info = [("a", "203.0.113.10", "", "billing", "active")]
    state.snapshot = _snapshot()
    text, fams = _scrape(state)
    val = lambda fam, **labels: next(s.value for s in fams[fam].samples
                                     if all(s.labels.get(k) == v for k, v in labels.items()))
    assert val("egress_agent_syncs", trigger="start", result="ok") == 1
    assert val("egress_agent_syncs", trigger="netlink", result="error") == 1
    # a histogram by trigger: 0.004 s and 0.3 s fall in their buckets, the sum adds up
    assert val("egress_agent_sync_duration_seconds", trigger="netlink", le="0.005") == 1
    assert val("egress_agent_sync_duration_seconds", trigger="netlink", le="0.25") == 1
    assert val("egress_agent_sync_duration_seconds", trigger="netlink", le="0.5") == 2
    assert val("egress_agent_sync_duration_seconds", trigger="netlink", le="+Inf") == 2
    assert abs(next(s.value for s in fams["egress_agent_sync_duration_seconds"].samples
                    if s.name.endswith("_sum") and s.labels["trigger"] == "netlink") - 0.304) < 1e-9
    assert val("egress_agent_last_sync_success_timestamp_seconds") > 1.7e9
    assert val("egress_agent_config_last_reload_successful") == 0
    assert "egress_agent_config_last_reload_success_timestamp_seconds" not in fams  # never ok
    assert val("egress_agent_egress_ip_usable", egress_ip="a", family="ipv4") == 1
    assert val("egress_agent_egress_ip_usable", egress_ip="a", family="ipv6") == 0
    assert val("egress_agent_failovers", egress_ip="a", family="ipv6") == 1
    assert val("egress_agent_egress_ip_info", egress_ip="a", app="billing", state="active") == 1
    assert val("egress_agent_build_info", version=__version__) == 1
    assert val("egress_agent_conntrack_entries") == 98
    assert val("egress_agent_conntrack_insert_failed") == 2
    # by default, per egress IP only: bounded whatever the workloads and destinations
    # w1's 60 and w2's 30 on its IPv4, w1's 7 on its IPv6 address in a's range
    assert val("egress_agent_egress_ip_connections", egress_ip="a", protocol="tcp") == 60 + 30 + 7
    assert val("egress_agent_egress_ip_connections", egress_ip="a", protocol="udp") == 1
    assert val("egress_agent_egress_ip_usage_ratio_max", egress_ip="a") == 0.6
    assert val("egress_agent_egress_ip_refused", egress_ip="a", reason="port_block_full") == 5
    assert val("egress_agent_egress_ip_free_port_blocks", egress_ip="a") == 8
    assert "workload=" not in text and "destination=" not in text


def test_metrics_detail_adds_per_workload_and_destination_series():
    state = State(detail=True)
    state.snapshot = _snapshot()
    _, fams = _scrape(state)
    val = lambda fam, **labels: next(s.value for s in fams[fam].samples
                                     if all(s.labels.get(k) == v for k, v in labels.items()))
    assert val("egress_agent_refused", workload="w1", reason="port_block_full") == 5
    assert val("egress_agent_usage_ratio_max", workload="w1") == 0.6
    assert val("egress_agent_connections", workload="w1", egress_address="203.0.113.10",
               protocol="tcp") == 60
    assert val("egress_agent_destination_usage_ratio", destination="192.0.2.1") == 0.75


@pytest.mark.parametrize("listen, expect", [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)),
    ("127.3.0.9:9469", ("127.3.0.9", 9469)),
    ("[::1]:9469", ("::1", 9469)),
])
def test_metrics_listen_on_loopback(listen, expect):
    assert parse_listen(listen) == expect


@pytest.mark.parametrize("listen", ["0.0.0.0:9469", "[::]:9469", "169.254.1.1:9469",
                                    "[fe80::1]:9469", "192.0.2.1:9469", "[2001:db8::1]:9469",
                                    "10.0.0.1:9469", "8.8.8.8:9469", "[::ffff:127.0.0.1]:9469"])
def test_metrics_refuse_every_other_address_without_the_flag(listen):
    with pytest.raises(ValueError, match="refusing"):
        parse_listen(listen)


def test_metrics_nonlocal_takes_a_named_address_but_never_every_address():
    assert parse_listen("10.0.0.1:9469", nonlocal_=True) == ("10.0.0.1", 9469)
    assert parse_listen("[2001:db8::1]:9469", nonlocal_=True) == ("2001:db8::1", 9469)
    for everything in ("0.0.0.0:9469", "[::]:9469"):
        with pytest.raises(ValueError, match="refusing every address"):
            parse_listen(everything, nonlocal_=True)


@pytest.mark.parametrize("listen, words", [("localhost:9469", "not an IP address"),
                                           ("127.0.0.1:0", "not a port"),
                                           ("127.0.0.1:x", "not a port")])
def test_metrics_listen_syntax(listen, words):
    with pytest.raises(ValueError, match=words):
        parse_listen(listen)
