"""Sources are bound in both families (issue 10), judged by the origin.

- No workload sends with an egress address, its own untranslated or another
  workload's, on the host or not: the origin sees none of it.
- Packets conntrack marks INVALID (TCP null, SYN+FIN, a bad UDP checksum) from
  workloads, managed networks and wrong interfaces never leave raw.
- IPv4 and IPv6 are assigned per family: IPv6 from any IP of the app with a
  range; with none, defaults.unavailable, never the host's address silently.

Counters in the origin namespace (OriginCounters) see every packet that
arrives there, before anything could discard it.
"""

from __future__ import annotations

import json
import os
import sys

import rawpkt
from agent_helpers import (
    HOST_DEFAULT6, OriginCounters, app_lease, apply, delta, demo_config, edited, explain,
    host, in_block, leases, ping, status, write_variant,
)

from egress_agent import names
from egress_agent.lab.netns import ns_exec, nsenter_prefix, run
from egress_agent.lab.topology import Lab

SYN = "tcp flags & (syn | ack) == syn"
RAWPKT = rawpkt.__file__
LEGACY = "203.0.113.50"  # an egress address of the lab config that is not on the host


def rule_counters(lab: Lab, chain: str) -> dict[str, int]:
    """Packets counted by the rules of one of our chains, summed by comment."""
    data = json.loads(host(lab, "nft", "-j", "list", "chain", "inet", names.TABLE_NAME, chain))
    out: dict[str, int] = {}
    for item in data["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            n = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
            out[rule["comment"]] = out.get(rule["comment"], 0) + n
    return out


def send_invalid(prefix: list[str], kind: str, src: str, dst: str, port: int) -> bool:
    """True: sent; False: dropped by the sending namespace's own firewall on the way out."""
    p = run(prefix + [sys.executable, RAWPKT, kind, src, dst, str(port)], check=False)
    assert p.returncode in (0, rawpkt.DROPPED), p.stderr
    return p.returncode == 0


def give_ipv6(lab: Lab, machine: str, address: str) -> None:
    """`machine` (no IPv6 in the lab) uses `address` with the host as its IPv6 router."""
    ns = lab.ns(machine)
    ns_exec(lab.host, ["ip", "-6", "addr", "add", "fd00:1::1/128", "dev", f"vm-{machine}", "nodad"])
    ns_exec(ns, ["ip", "-6", "addr", "add", f"{address}/128", "dev", "eth0", "nodad"])
    ns_exec(ns, ["ip", "-6", "route", "add", "fd00:1::1", "dev", "eth0"])
    ns_exec(ns, ["ip", "-6", "route", "add", "default", "via", "fd00:1::1", "dev", "eth0"])


def test_no_workload_sends_with_an_egress_address_present_or_not(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    m42_v6 = app_lease(st, "m42")["ipv6"]
    # m43 takes m42's assigned IPv6 egress address, and legacy's IPv4 (configured,
    # not on the host), as its own sources
    give_ipv6(lab, "m43", m42_v6)
    ns_exec(lab.ns("m43"), ["ip", "addr", "add", f"{LEGACY}/32", "dev", "eth0"])
    origin = OriginCounters(lab, m42v6=f"ip6 saddr {m42_v6}", legacy=f"ip saddr {LEGACY}")
    seen = lab.probe("m42", "2001:db8:ff::10", 8080)  # the counters count
    assert seen is not None and seen.address == m42_v6, (seen, lab.last_result)
    assert origin.read()["m42v6"] >= 1

    for src, dst in ((m42_v6, "2001:db8:ff::10"), (LEGACY, "192.0.2.10")):
        e = explain(lab, config, src, dst, 8080, "tcp", "vm-m43")
        assert e["action"] == "drop" and "egress IP" in e["reason"], e
    before, drops_before = origin.read(), rule_counters(lab, "prerouting")
    for src, dst in ((m42_v6, "2001:db8:ff::10"), (LEGACY, "192.0.2.10")):
        assert lab.probe("m43", dst, 8080, source=src, timeout=1) is None
        assert lab.probe("m43", dst, 8081, "udp", source=src, timeout=1) is None
    # excluded traffic (DNS, ICMP) is no way around it
    assert lab.probe("m43", "192.0.2.53", 53, "udp", source=LEGACY, timeout=1) is None
    assert not ping(lab, "m43", "192.0.2.10", source=LEGACY, wait=1)
    assert not ping(lab, "m43", "2001:db8:ff::10", source=m42_v6, wait=1)
    assert delta(before, origin.read()) == {"m42v6": 0, "legacy": 0}
    drops = delta(drops_before, rule_counters(lab, "prerouting"))
    assert drops["egress address as source"] >= 6, drops
    # m43's own traffic still leaves with its app IP
    assert in_block(lab.probe("m43", "192.0.2.10", 8080), app_lease(st, "m43")), lab.last_result

    # a neighbour with an address inside a range (a gateway there) still resolves
    # the host; only what it sends with that source is dropped
    ns_exec(lab.origin, ["ip", "-6", "addr", "add", "2001:db8:10::fe/128", "dev", "o0", "nodad"])
    ns_exec(lab.origin, ["ip", "-6", "route", "add", "2001:db8:10::1/128", "dev", "o0"])
    assert not ping(lab, "origin", "2001:db8:10::1", source="2001:db8:10::fe", wait=1)
    neigh = ns_exec(lab.origin, ["ip", "-6", "neigh", "show", "2001:db8:10::1", "dev", "o0"]).stdout
    assert "lladdr" in neigh, neigh


def test_a_workload_process_never_leaves_with_another_workloads_address(lab: Lab) -> None:
    """batch (a cgroup workload) binds m43's egress address, which is on the host:
    translated traffic leaves with batch's own lease, untranslated (DNS is
    excluded) is dropped instead of leaving with m43's address."""
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    own = app_lease(st, "batch")
    other = app_lease(st, "m43")["ipv4"]
    assert other != own["ipv4"], st  # balanced: batch and m43 are on different IPs
    origin = OriginCounters(lab, other=f"ip saddr {other} udp dport 53",
                            dns="ip daddr 192.0.2.53 udp dport 53")
    seen = lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080, source=other)
    assert in_block(seen, own), (seen, lab.last_result)
    assert lab.probe_cgroup(lab.cgroup, "192.0.2.53", 53, "udp", source=other, timeout=1) is None
    assert origin.read() == {"other": 0, "dns": 0}
    # the host picks the source: excluded DNS leaves with the host's address
    assert lab.probe_cgroup(lab.cgroup, "192.0.2.53", 53, "udp") is not None, lab.last_result
    assert origin.read() == {"other": 0, "dns": 1}


def test_invalid_packets_never_leave_raw(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    origin = OriginCounters(
        lab, raw4="ip saddr 10.0.0.0/8", raw6="ip6 saddr fd00::/8",
        null="tcp dport 8080 tcp flags == 0x0",
        synfin="tcp dport 8080 tcp flags & (syn | fin) == syn | fin",
        badsum="udp dport 8081 udp sport 40404",
        host_null="tcp dport 9999 tcp flags == 0x0")
    fwd_before = rule_counters(lab, "invalid_forward")
    local_before = rule_counters(lab, "invalid_local")
    # a workload, an unknown source of a managed network, and a workload's
    # source on the wrong interface
    senders = [("m42", "10.0.1.2", "192.0.2.10"), ("spoof", "10.0.1.66", "192.0.2.10"),
               ("spoof", "10.0.1.2", "192.0.2.10"), ("m42", "fd00:1::2", "2001:db8:ff::10")]
    for machine, src, dst in senders:
        for kind, port in (("tcp-null", 8080), ("tcp-synfin", 8080), ("udp-badsum", 8081)):
            assert send_invalid(nsenter_prefix(lab.ns(machine)), kind, src, dst, port)
    # a local process of the cgroup workload: dropped in output
    assert not send_invalid(lab.cgroup_prefix(lab.cgroup), "tcp-null", "203.0.113.2",
                            "192.0.2.10", 8080)
    # the host's own invalid packet is not ours to judge: it arrives (and shows
    # that crafted packets do reach the origin when nothing drops them)
    assert send_invalid(nsenter_prefix(lab.host), "tcp-null", "203.0.113.2", "192.0.2.10", 9999)

    counts = origin.read()
    assert counts == {"raw4": 0, "raw6": 0, "null": 0, "synfin": 0, "badsum": 0,
                      "host_null": 1}, counts
    fwd = delta(fwd_before, rule_counters(lab, "invalid_forward"))
    assert sum(fwd.values()) == 12, fwd
    assert sum(delta(local_before, rule_counters(lab, "invalid_local")).values()) == 1

    # ordinary traffic, both families, is untouched
    lease = app_lease(st, "m42")
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), lease), lab.last_result
    assert in_block(lab.probe("m42", "192.0.2.10", 8081, "udp"), lease), lab.last_result
    seen = lab.probe("m42", "2001:db8:ff::10", 8080)
    assert seen is not None and seen.address == lease["ipv6"], (seen, lab.last_result)
    assert in_block(lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080), app_lease(st, "batch"))
    assert ping(lab, "m42", "192.0.2.10")
    assert origin.read()["raw4"] == 0


B1 = ('    ipv6: "2001:db8:10::/64"\n', "")  # billing-1 is written in block style
B2 = ('ipv4: 203.0.113.11, ipv6: "2001:db8:11::/64"}', "ipv4: 203.0.113.11}")


def test_each_family_is_assigned_on_its_own(lab: Lab) -> None:
    """m42's app IP billing-1 loses its IPv6 range: its IPv6 comes from billing-2.
    With no range in the app at all, IPv6 follows defaults.unavailable."""
    demo_config(lab)  # creates the cgroup workload's cgroup
    config = write_variant(lab, "v6-elsewhere.yaml", edited(lab, B1))
    apply(lab, config)
    st = status(lab, config)
    m42 = next(w for w in st["workloads"] if w["id"] == "m42")
    assert (m42["app_ip"], m42["app_ip6"]) == ("billing-1", "billing-2"), m42
    v6 = leases(st)[("m42", "billing-2")]
    assert v6["ports"] is None and v6["ipv6"].startswith("2001:db8:11::"), v6
    e = explain(lab, config, "fd00:1::2", "2001:db8:ff::10", 8080, "tcp", "vm-m42")
    assert (e["action"], e["source_address"]) == ("snat", v6["ipv6"]), e
    seen = lab.probe("m42", "2001:db8:ff::10", 8080)
    assert seen is not None and seen.address == v6["ipv6"], (seen, lab.last_result)
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), leases(st)[("m42", "billing-1")])

    origin = OriginCounters(lab, syn6=f"ip6 daddr 2001:db8:ff::10 tcp dport 8080 {SYN}")
    config = write_variant(lab, "no-v6-drop.yaml",
                           edited(lab, B1, B2, ("unavailable: default", "unavailable: drop")))
    apply(lab, config)
    e = explain(lab, config, "fd00:1::2", "2001:db8:ff::10", 8080, "tcp", "vm-m42")
    assert e["action"] == "drop" and "defaults.unavailable" in e["reason"], e
    before = origin.read()
    assert lab.probe("m42", "2001:db8:ff::10", 8080, timeout=1) is None
    assert delta(before, origin.read()) == {"syn6": 0}

    config = write_variant(lab, "no-v6-default.yaml", edited(lab, B1, B2))
    apply(lab, config)
    e = explain(lab, config, "fd00:1::2", "2001:db8:ff::10", 8080, "tcp", "vm-m42")
    assert e["action"] == "default" and "defaults.unavailable" in e["reason"], e
    seen = lab.probe("m42", "2001:db8:ff::10", 8080)
    assert seen is not None and seen.address == HOST_DEFAULT6, (seen, lab.last_result)
