"""Usage against limits on the real kernel: counts equal conntrack-tools',
a full port block refuses the next connection at once and counts it, and the
daemon's metrics endpoint answers in the Prometheus text format."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from agent_helpers import agent, agent_json, app_lease, apply, demo_config, edited, status, write_variant
from daemon_helpers import Agent, wait_until

ECHO4, ECHO6, PARTNER = "192.0.2.10", "2001:db8:ff::10", "198.51.100.10"


def conntrack_groups(lab) -> dict[tuple, int]:
    """conntrack-tools' view of our flows: (mark, proto, dst, dport, reply dst) -> count."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{lab.ns('host')}", "conntrack", "-L",
                          "-m", "0x40000000/0x40000000", "-o", "extended"],
                         capture_output=True, text=True, check=True).stdout
    groups: dict[tuple, int] = {}
    for line in out.splitlines():
        proto = line.split()[2]
        kv = re.findall(r"(\w+)=(\S+)", line)
        dst = [v for k, v in kv if k == "dst"]
        dport = [v for k, v in kv if k == "dport"]
        mark = int(dict(kv)["mark"])
        key = (mark, proto, dst[0], int(dport[0]) if dport else 0, dst[1])
        groups[key] = groups.get(key, 0) + 1
    return groups


def usage_groups(usage: dict) -> dict[tuple, int]:
    """The same grouping from `usage --json` rows (per workload rows only)."""
    return {(r["workload"], r["protocol"], r["destination"], r["port"], r["egress_address"]):
            r["connections"] for r in usage["rows"] if r["workload"] != "*"}


def test_usage_counts_equal_conntrack_tools(lab):
    config = demo_config(lab)
    apply(lab, config)
    held = [lab.hold_many("m42", ECHO4, 8080, 37), lab.hold_many("m43", ECHO4, 8080, 11),
            lab.hold_many("m44", PARTNER, 8080, 5), lab.hold_many("m42", PARTNER, 8080, 3),
            lab.hold_many("m42", ECHO6, 8080, 4)]
    try:
        for _ in range(6):  # UDP flows: each probe is a new conntrack entry
            assert lab.probe("m44", ECHO4, 8081, proto="udp")
        usage = agent_json(lab, "usage", "-c", config)
        theirs = conntrack_groups(lab)
        ours = usage_groups(usage)
        # the same numbers, keyed the same way: map conntrack's mark to the workload
        # through the lease addresses (mark -> workload is the agent's business)
        assert sum(ours.values()) == sum(theirs.values()) == 37 + 11 + 5 + 3 + 4 + 6
        by_dst_ours, by_dst_theirs = {}, {}
        for (w, proto, dst, port, egress), n in ours.items():
            by_dst_ours[(proto, dst, port, egress)] = by_dst_ours.get((proto, dst, port, egress), 0) + n
        for (mark, proto, dst, port, egress), n in theirs.items():
            by_dst_theirs[(proto, dst, port, egress)] = by_dst_theirs.get((proto, dst, port, egress), 0) + n
        assert by_dst_ours == by_dst_theirs
        row = next(r for r in usage["rows"] if r["workload"] == "m42" and r["port"] == 8080
                   and r["destination"] == ECHO4)
        assert (row["connections"], row["limit"], row["limit_kind"]) == (37, 1024, "port_block")
        assert abs(row["ratio"] - 37 / 1024) < 1e-4
        # connections_per_destination of billing-1 (40000): all its workloads to one origin
        star = [r for r in usage["rows"] if r["workload"] == "*" and r["destination"] == ECHO4
                and r["protocol"] == "tcp"]
        assert star and star[0]["limit"] == 40000
        assert usage["conntrack"]["count"] >= sum(theirs.values())
        assert usage["conntrack"]["max"] > 0
        human = agent(lab, "usage", "-c", config, "--top", "3").stdout
        assert "conntrack:" in human and "m42" in human
    finally:
        for h in held:
            h.close()


def test_full_port_block_refuses_the_next_connection_at_once(lab):
    config = write_variant(lab, "small.yaml", edited(
        lab, ("ports_per_workload: 1024", "ports_per_workload: 4")))
    apply(lab, config)
    group = lab.hold_many("m42", ECHO4, 8080, 4)
    try:
        assert group.error is None and len({s.port for s in group.seen}) == 4
        t = time.monotonic()
        assert lab.probe("m42", ECHO4, 8080, timeout=5) is None
        assert "refused" in lab.last_result["error"].lower()  # a reset, not a timeout
        assert time.monotonic() - t < 3
        # UDP: 4 flows (each probe a new source port, kept 30 s by conntrack) fill the
        # block; the 5th is refused with ICMP admin-prohibited, not dropped silently
        for _ in range(4):
            assert lab.probe("m42", ECHO4, 8081, proto="udp") is not None
        t = time.monotonic()
        assert lab.probe("m42", ECHO4, 8081, proto="udp", timeout=5) is None
        assert time.monotonic() - t < 3, lab.last_result
        # another destination still works
        assert lab.probe("m42", PARTNER, 8080) is not None
        usage = agent_json(lab, "usage", "-c", config)
        refused = {(r["workload"], r["protocol"]): r["refused"] for r in usage["refused"]}
        assert refused.get(("m42", "tcp"), 0) >= 1 and refused.get(("m42", "udp"), 0) >= 1
        full = next(r for r in usage["rows"] if r["workload"] == "m42" and r["destination"] == ECHO4)
        assert (full["connections"], full["limit"], full["ratio"], full["warning"]) == (4, 4, 1.0, True)
    finally:
        group.close()
    # freed ports are usable again
    assert wait_until(lambda: lab.probe("m42", ECHO4, 8080), timeout=5, what="a free port")


def test_metrics_endpoint_is_scraped_and_parsed(lab):
    config = demo_config(lab)
    port = 19000 + int(lab.prefix[-3:], 16) % 1000
    with Agent(lab, config, extra=("--metrics", f"127.0.0.1:{port}", "--metrics-detail",
                                   "--usage-interval", "0.5")) as a:
        a.wait_syncs(1)
        held = lab.hold_many("m42", ECHO4, 8080, 9)
        try:
            def scrape():
                cmd = ["nsenter", f"--net=/run/netns/{lab.ns('host')}", sys.executable, "-c",
                       "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                       f"'http://127.0.0.1:{port}/metrics', timeout=2).read().decode())"]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    return None
                fams = {f.name: f for f in text_string_to_metric_families(p.stdout)}
                conns = fams.get("egress_agent_connections")
                if not conns or not any(s.labels.get("workload") == "m42" and s.value == 9
                                        for s in conns.samples):
                    return None
                return fams
            fams = wait_until(scrape, timeout=10, what="metrics with m42's 9 connections")
        finally:
            held.close()
    assert any(s.labels == {"trigger": "start", "result": "ok"} and s.value == 1
               for s in fams["egress_agent_syncs"].samples)
    assert fams["egress_agent_conntrack_max"].samples[0].value > 0
    assert {s.labels["egress_ip"] for s in fams["egress_agent_egress_ip_usable"].samples} >= \
        {"billing-1", "billing-2", "m44-ip", "partner-link", "legacy"}
    usable = {(s.labels["egress_ip"], s.labels["family"]): s.value
              for s in fams["egress_agent_egress_ip_usable"].samples}
    assert usable["legacy", "ipv4"] == 0 and usable["billing-1", "ipv4"] == 1
    assert usable["billing-1", "ipv6"] == 1
    # per egress IP too (the default; --metrics-detail adds the per-workload series)
    ip_conns = {(s.labels["egress_ip"], s.labels["protocol"]): s.value
                for s in fams["egress_agent_egress_ip_connections"].samples}
    assert ip_conns[app_lease(status(lab, config), "m42")["ip"], "tcp"] >= 9


def test_translation_log_names_workload_inside_and_outside(lab):
    import json as _json
    import os as _os
    config = demo_config(lab)
    path = _os.path.join(lab.state_dir, "translations.jsonl")
    with Agent(lab, config, extra=("--translation-log", path, "--metrics", "off")) as a:
        a.wait_syncs(1)
        time.sleep(0.3)  # the listener subscribes after the first sync
        seen = lab.probe("m42", ECHO4, 8080)
        lease = app_lease(status(lab, config), "m42")
        assert seen and seen.address == lease["ipv4"]
        subprocess.run(["nsenter", f"--net=/run/netns/{lab.ns('host')}", "conntrack", "-F"],
                       capture_output=True)

        def lines():
            try:
                return [_json.loads(l) for l in open(path)]
            except FileNotFoundError:
                return []
        want = f"{seen.address}:{seen.port}"
        recs = wait_until(lambda: [r for r in lines() if r["outside"] == want and r["event"] == "end"]
                          and lines(), timeout=10, what="start and end lines of m42's connection")
    mine = [r for r in recs if r["outside"] == want]
    assert {r["event"] for r in mine} == {"start", "end"}
    start = next(r for r in mine if r["event"] == "start")
    assert start["workload"] == "m42" and start["protocol"] == "tcp"
    assert start["inside"].startswith("10.0.1.2:") and start["destination"] == f"{ECHO4}:8080"
    assert len({r["id"] for r in mine}) == 1
