"""The agent end to end: `egress-agent apply` in the lab's host namespace, and
what the origin's echo server saw from every workload.

Each test gets a fresh lab (conftest `lab`: unique prefix, always torn down)
and applies lab/demo.yaml or a variant of it. Expected addresses and port
blocks come from the config and `status --json` (the leases), sometimes
cross-checked with `explain`; observations come from the echo server
(Lab.probe / Lab.hold) and from counters in the origin namespace, which see
every packet that reaches the origin before anything there can drop it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil

from agent_helpers import (
    agent,
    HOST_DEFAULT4, HOST_DEFAULT6, SPOOF_DROP, UNKNOWN_DROP, OriginCounters, agent,
    agent_json, app_lease, apply, delta, demo_config, drop_counters, edited, explain,
    has_our_table, host, in_block, ip_rules, leases, line_of, our_route_lines,
    our_rule_lines, our_table, ping, status, without_our_rules, write_variant,
)

from egress_agent.config import load
from egress_agent.lab.netns import ns_exec
from egress_agent.lab.topology import Lab

SYN = "tcp flags & (syn | ack) == syn"  # one per new connection, retransmits aside


def store_dir(config: str) -> str:
    """The allocation store (state_dir) of `config`."""
    return load(config).config.state_dir


def store_files(config: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(store_dir(config))):
        with open(os.path.join(store_dir(config), name), "rb") as f:
            out[name] = f.read()
    return out


def assert_blocks_disjoint(st: dict) -> None:
    """Port blocks never overlap on one IPv4."""
    by_addr: dict[str, list[tuple[int, int]]] = {}
    for lease in leases(st).values():
        if lease["ipv4"] and lease["ports"]:
            by_addr.setdefault(lease["ipv4"], []).append(tuple(lease["ports"]))
    for addr, blocks in by_addr.items():
        blocks.sort()
        for (_, hi), (lo, _) in zip(blocks, blocks[1:]):
            assert hi < lo, f"overlapping port blocks on {addr}: {blocks}"


# --- 1. one apply: what the origin sees ----------------------------------------------

def test_workloads_leave_with_their_address_and_port_block(lab: Lab) -> None:
    config = demo_config(lab)
    result = apply(lab, config)
    assert result["changed"] and not result["adopted"], result
    st = status(lab, config)

    # billing's workloads share its two IPs, balanced; m44 has its own IP
    app_ip = {w["id"]: w["app_ip"] for w in st["workloads"]}
    billing = [app_ip[w] for w in ("m42", "m43", "batch")]
    assert set(billing) <= {"billing-1", "billing-2"}, app_ip
    assert abs(billing.count("billing-1") - billing.count("billing-2")) <= 1, app_ip
    assert app_ip["m44"] is None
    assert_blocks_disjoint(st)

    for machine in ("m42", "m43"):
        seen = lab.probe(machine, "192.0.2.10", 8080)
        assert in_block(seen, app_lease(st, machine)), (machine, seen, lab.last_result)
    seen = lab.probe("m42", "192.0.2.10", 8081, "udp")
    assert in_block(seen, app_lease(st, "m42")), (seen, lab.last_result)

    m44 = leases(st)[("m44", "m44-ip")]
    assert m44["ipv4"] == "203.0.113.20"
    seen = lab.probe("m44", "192.0.2.10", 8080)
    assert in_block(seen, m44), (seen, lab.last_result)

    # IPv6: m42's own address inside its app IP's range
    lease = app_lease(st, "m42")
    v6_range = next(i["ipv6"] for i in st["egress_ips"] if i["id"] == app_ip["m42"])
    assert ipaddress.ip_address(lease["ipv6"]) in ipaddress.ip_network(v6_range)
    seen = lab.probe("m42", "2001:db8:ff::10", 8080)
    assert seen is not None and seen.address == lease["ipv6"], (seen, lab.last_result)

    # the cgroup workload: a local process of the host
    seen = lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080)
    assert in_block(seen, app_lease(st, "batch")), (seen, lab.last_result)

    # the destination policy: 203.0.113.140 through up1. The origin's strict
    # rp_filter would drop that source on o0; the counters show the link.
    origin = OriginCounters(
        lab, via_up1=f'iifname "o1" ip saddr 203.0.113.140 ip daddr 198.51.100.10 {SYN}',
        via_up0=f'iifname "o0" ip daddr 198.51.100.10 {SYN}')
    partner = leases(st)[("m42", "partner-link")]
    e = explain(lab, config, "10.0.1.2", "198.51.100.10", 8080, "tcp", "vm-m42")
    assert (e["policy"], e["action"], e["source_address"], e["ports"]) == (
        "partner-via-link", "snat", partner["ipv4"], partner["ports"]), e
    assert partner["ipv4"] == "203.0.113.140"
    seen = lab.probe("m42", "198.51.100.10", 8080)
    assert in_block(seen, partner), (seen, lab.last_result)
    counts = origin.read()
    assert counts["via_up1"] >= 1 and counts["via_up0"] == 0, counts
    assert host(lab, "ip", "route", "show", "table", str(e["route_table"])).startswith(
        "default via 203.0.113.129 dev up1")


def test_excluded_traffic_leaves_with_the_host_default(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    for proto in ("udp", "tcp"):
        e = explain(lab, config, "10.0.1.2", "192.0.2.53", 53, proto, "vm-m42")
        assert e["action"] == "default", e
        seen = lab.probe("m42", "192.0.2.53", 53, proto)
        assert seen is not None and seen.address == HOST_DEFAULT4, (proto, seen, lab.last_result)
    seen = lab.probe("m42", "10.99.0.10", 8080)
    assert seen is not None and seen.address == HOST_DEFAULT4, (seen, lab.last_result)
    seen = lab.probe_cgroup(lab.cgroup, "192.0.2.53", 53, "udp")
    assert seen is not None and seen.address == HOST_DEFAULT4, (seen, lab.last_result)

    origin = OriginCounters(lab, echo_any="icmp type echo-request",
                            echo_default=f"ip saddr {HOST_DEFAULT4} icmp type echo-request")
    assert ping(lab, "m42", "192.0.2.10")
    counts = origin.read()
    assert counts["echo_default"] >= 1 and counts["echo_default"] == counts["echo_any"], counts


def test_spoofed_and_dropped_traffic_never_reaches_the_origin(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    origin = OriginCounters(
        lab, syn8080=f"ip daddr 192.0.2.10 tcp dport 8080 {SYN}",
        udp8081="ip daddr 192.0.2.10 udp dport 8081",
        dns="ip daddr 192.0.2.53 udp dport 53", echo="icmp type echo-request")
    # the counters count: what a workload sends arrives
    assert lab.probe("m42", "192.0.2.10", 8080) is not None, lab.last_result
    assert lab.probe("m42", "192.0.2.10", 8081, "udp") is not None, lab.last_result
    counts = origin.read()
    assert counts["syn8080"] >= 1 and counts["udp8081"] >= 1, counts

    # spoof borrows m42's address (wrong interface) or uses its own unknown one
    for src in ("10.0.1.2", "10.0.1.66"):
        e = explain(lab, config, src, "192.0.2.10", 8080, "tcp", "vm-spoof")
        assert e["action"] == "drop", e
    before, drops_before = origin.read(), drop_counters(lab)
    assert lab.probe("spoof", "192.0.2.10", 8080, source="10.0.1.2", timeout=1) is None
    assert lab.probe("spoof", "192.0.2.10", 8080, timeout=1) is None
    # excluded traffic (DNS, ICMP) is no way around it
    assert lab.probe("spoof", "192.0.2.53", 53, "udp", source="10.0.1.2", timeout=1) is None
    assert lab.probe("spoof", "192.0.2.53", 53, "udp", timeout=1) is None
    assert not ping(lab, "spoof", "192.0.2.10", source="10.0.1.2", wait=1)
    assert not ping(lab, "spoof", "192.0.2.10", wait=1)
    assert delta(before, origin.read()) == {"syn8080": 0, "udp8081": 0, "dns": 0, "echo": 0}
    drops = delta(drops_before, drop_counters(lab))
    assert drops[SPOOF_DROP] >= 3 and drops[UNKNOWN_DROP] >= 3, drops

    # the `legacy` IP is not on the host: m43's UDP falls back to drop
    e = explain(lab, config, "10.0.1.3", "192.0.2.10", 8081, "udp", "vm-m43")
    assert (e["policy"], e["action"]) == ("legacy-udp", "drop"), e
    before = origin.read()
    assert lab.probe("m43", "192.0.2.10", 8081, "udp", timeout=1) is None
    assert delta(before, origin.read())["udp8081"] == 0
    # ... and only its UDP: its TCP still leaves with its app IP
    assert in_block(lab.probe("m43", "192.0.2.10", 8080), app_lease(status(lab, config), "m43"))


def test_ipv6_spoofing_is_dropped(lab: Lab) -> None:
    """spoof borrows m42's IPv6 address, or uses an unknown one of the managed
    network: nothing of it reaches the origin."""
    config = demo_config(lab)
    apply(lab, config)
    spoof = lab.ns("spoof")
    ns_exec(lab.host, ["ip", "-6", "addr", "add", "fd00:1::1/128", "dev", "vm-spoof", "nodad"])
    for cidr in ("fd00:1::2/128", "fd00:1::66/128"):
        ns_exec(spoof, ["ip", "-6", "addr", "add", cidr, "dev", "eth0", "nodad"])
    ns_exec(spoof, ["ip", "-6", "route", "add", "fd00:1::1", "dev", "eth0"])
    ns_exec(spoof, ["ip", "-6", "route", "add", "default", "via", "fd00:1::1", "dev", "eth0"])
    origin = OriginCounters(lab, syn6=f"ip6 daddr 2001:db8:ff::10 tcp dport 8080 {SYN}",
                            udp6="ip6 daddr 2001:db8:ff::10 udp dport 8081")
    seen = lab.probe("m42", "2001:db8:ff::10", 8080)  # the counters count
    assert seen is not None and seen.address == app_lease(status(lab, config), "m42")["ipv6"]
    assert origin.read()["syn6"] >= 1

    before, drops_before = origin.read(), drop_counters(lab, "ip6")
    for src in ("fd00:1::2", "fd00:1::66"):
        e = explain(lab, config, src, "2001:db8:ff::10", 8080, "tcp", "vm-spoof")
        assert e["action"] == "drop", e
        assert lab.probe("spoof", "2001:db8:ff::10", 8080, source=src, timeout=1) is None
        assert lab.probe("spoof", "2001:db8:ff::10", 8081, "udp", source=src, timeout=1) is None
    assert delta(before, origin.read()) == {"syn6": 0, "udp6": 0}
    drops = delta(drops_before, drop_counters(lab, "ip6"))
    assert drops[SPOOF_DROP] >= 2 and drops[UNKNOWN_DROP] >= 2, drops


# --- 2, 3. re-apply and restart ----------------------------------------------------

def test_second_apply_changes_nothing(lab: Lab) -> None:
    config = demo_config(lab)
    assert apply(lab, config)["changed"]
    table, rules, routes = our_table(lab), ip_rules(lab), our_route_lines(lab)
    store = store_files(config)
    assert our_rule_lines(rules) and routes

    result = apply(lab, config)
    assert result["changed"] is False, result
    assert (result["elements_added"], result["elements_removed"], result["route_ops"]) == (0, 0, [])
    assert our_table(lab) == table
    assert ip_rules(lab) == rules and our_route_lines(lab) == routes
    assert store_files(config)["history.jsonl"] == store["history.jsonl"]  # no new events

    # live traffic leaves state in the table (flow counts, counters): not drift
    st = status(lab, config)
    own = {"m42": app_lease(st, "m42"), "m43": app_lease(st, "m43"),
           "m44": leases(st)[("m44", "m44-ip")]}
    for machine, lease in own.items():
        assert in_block(lab.probe(machine, "192.0.2.10", 8080), lease), lab.last_result
        lab.probe(machine, "192.0.2.10", 8081, "udp", timeout=1)  # m43's is dropped
    lab.probe("spoof", "192.0.2.10", 8080, timeout=0.5)
    result = apply(lab, config)
    assert result["changed"] is False, result


def test_restart_adopts_kernel_state_and_keeps_open_connections(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    with lab.hold("m42", "192.0.2.10", 8080) as held:
        assert in_block(held.first, app_lease(st, "m42")), held.first
        table = our_table(lab)

        # restart with the store kept
        result = apply(lab, config)
        assert result["changed"] is False and not result["adopted"], result
        assert held.ping() == held.first

        # restart with the store lost: the live maps are adopted, nothing changes
        shutil.rmtree(store_dir(config))
        result = apply(lab, config)
        assert result["adopted"] is True and result["changed"] is False, result
        assert (result["elements_added"], result["elements_removed"]) == (0, 0), result
        assert our_table(lab) == table
        assert status(lab, config)["workloads"] == st["workloads"]
        assert held.ping() == held.first
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), app_lease(st, "m42"))


# --- 4. someone else's kernel objects -------------------------------------------------

def test_foreign_kernel_state_is_left_alone(lab: Lab) -> None:
    foreign_table = f"foreign_{secrets.token_hex(3)}"
    ns_exec(lab.host, ["nft", "-f", "-"], input=f"""
table inet {foreign_table} {{
    set blocked {{ type ipv4_addr; elements = {{ 192.0.2.200 }} }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr @blocked counter drop comment "someone else's"
    }}
}}
table ip egress_agent {{
    chain same_name_other_family {{ ip daddr 192.0.2.201 counter; }}
}}
""")
    # someone else's policy routing: it never matches the lab's traffic (the
    # agent owns most mark bits, so a mark alone could collide with its own)
    for fam, src in (("-4", "192.0.2.200"), ("-6", "2001:db8:ff::200")):
        host(lab, "ip", fam, "rule", "add", "from", src, "fwmark", "0x1/0x1", "lookup", "100",
             "priority", "5000")
    host(lab, "ip", "route", "add", "192.0.2.200/32", "via", "203.0.113.129", "dev", "up1",
         "table", "100")
    host(lab, "ip", "-6", "route", "add", "2001:db8:ff::/64", "via", "2001:db8:a::1", "dev",
         "up0", "table", "100")

    def foreign() -> dict[str, str]:
        out = {t: host(lab, "nft", "list", "table", *t.split())
               for t in ("ip lab_nat", "ip6 lab_nat6", f"inet {foreign_table}", "ip egress_agent")}
        out["rules"] = ip_rules(lab)
        out["table 100"] = (host(lab, "ip", "route", "show", "table", "100")
                            + host(lab, "ip", "-6", "route", "show", "table", "100"))
        return out

    before = foreign()
    config = demo_config(lab)
    apply(lab, config)
    during = foreign()
    assert our_rule_lines(during["rules"])
    assert without_our_rules(during.pop("rules")) == without_our_rules(before["rules"])
    assert during == {k: v for k, v in before.items() if k != "rules"}
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), app_lease(status(lab, config), "m42"))

    agent_json(lab, "teardown")
    assert foreign() == before


# --- 5. an invalid config ----------------------------------------------------------

def test_invalid_config_changes_nothing_in_the_kernel(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)

    def snapshot() -> tuple:
        return our_table(lab), ip_rules(lab), our_route_lines(lab), store_files(config)

    good = snapshot()
    broken = {
        "ipv6-in-ipv4.yaml": ("ipv4: 203.0.113.20}", 'ipv4: "2001:db8::20"}'),
        "unknown-ip.yaml": ("egress: {ipv4: partner-link,", "egress: {ipv4: no-such-ip,"),
        "yaml-syntax.yaml": ("source: [10.0.1.4]", "source: [10.0.1.4"),
    }
    for name, (old, new) in broken.items():
        text = edited(lab, (old, new))
        path = write_variant(lab, name, text)
        proc = agent(lab, "apply", "-c", path, "--json", check=False)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert f"{path}:{line_of(text, new)}:" in proc.stderr, (name, proc.stderr)
        assert snapshot() == good, name
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), app_lease(st, "m42"))


# --- 6. teardown ---------------------------------------------------------------

def test_teardown_leaves_no_trace(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    assert has_our_table(lab) and our_rule_lines(ip_rules(lab)) and our_route_lines(lab)
    st = status(lab, config)
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), app_lease(st, "m42"))

    result = agent_json(lab, "teardown")
    assert result["elements_removed"] > 0 and result["route_ops"], result
    assert not has_our_table(lab)
    assert our_rule_lines(ip_rules(lab)) == []
    assert our_route_lines(lab) == []

    for seen, want in ((lab.probe("m42", "192.0.2.10", 8080), HOST_DEFAULT4),
                       (lab.probe("m42", "2001:db8:ff::10", 8080), HOST_DEFAULT6),
                       (lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080), HOST_DEFAULT4)):
        assert seen is not None and seen.address == want, (seen, want)

    again = agent_json(lab, "teardown")
    assert again["changed"] is False, again

    # no table here now: `status` says so rather than report the store's leases as live
    p = agent(lab, "status", "-c", config, check=False)
    assert p.returncode == 8 and "no table inet egress_agent" in p.stderr, p.stderr
    # the store outlives teardown: applying again gives the same blocks back
    assert apply(lab, config)["changed"]
    assert [w["leases"] for w in status(lab, config)["workloads"]] == \
        [w["leases"] for w in st["workloads"]]
    assert in_block(lab.probe("m42", "192.0.2.10", 8080), app_lease(st, "m42"))


# --- 7. a config change --------------------------------------------------------

def test_removing_a_workload_changes_only_its_elements(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    with lab.hold("m42", "192.0.2.10", 8080) as held:
        assert in_block(held.first, app_lease(st, "m42")), held.first
        text = edited(
            lab, ("  - {id: m43, app: billing, source: [10.0.1.3], interface: vm-m43}\n", ""),
            ("  - name: legacy-udp\n"
             "    match: {workloads: [m43], protocols: [udp]}\n"
             "    egress: {ipv4: legacy, ipv4_fallback: drop}\n", ""))
        smaller = write_variant(lab, "without-m43.yaml", text)
        result = apply(lab, smaller)
        assert result["changed"] and not result["skeleton_replaced"], result
        assert result["elements_added"] == 0 and result["elements_removed"] > 0, result
        assert result["route_ops"] == [], result

        st2 = status(lab, smaller)
        kept = {k: v for k, v in leases(st).items() if k[0] != "m43"}
        assert leases(st2) == kept
        assert {w["id"]: w["app_ip"] for w in st2["workloads"]} == {
            w["id"]: w["app_ip"] for w in st["workloads"] if w["id"] != "m43"}
        assert held.ping() == held.first

    assert in_block(lab.probe("m42", "192.0.2.10", 8080), app_lease(st, "m42"))

    # m43's address is now an unknown source in a managed network: dropped
    e = explain(lab, smaller, "10.0.1.3", "192.0.2.10", 8080, "tcp", "vm-m43")
    assert e["action"] == "drop", e
    origin = OriginCounters(lab, syn8080=f"ip daddr 192.0.2.10 tcp dport 8080 {SYN}")
    drops = drop_counters(lab)
    assert lab.probe("m43", "192.0.2.10", 8080, timeout=1) is None
    assert origin.read() == {"syn8080": 0}
    assert delta(drops, drop_counters(lab))[UNKNOWN_DROP] >= 1


def test_verify_compares_what_the_echo_server_saw(lab):
    """`verify` probes from each workload's context (cgroup; machines with --lab)."""
    config = demo_config(lab)
    apply(lab, config)
    proc = agent(lab, "verify", "-c", config, "--echo", "192.0.2.10:8080",
                 "--lab", lab.prefix, "--json")
    rows = json.loads(proc.stdout)
    assert {r["workload"] for r in rows} == {"m42", "m43", "m44", "batch"}
    assert all(r["match"] for r in rows), rows
    # a wrong expectation is a mismatch: m44's own IP vanishes from the store's view
    # by pointing verify at a config where m44 has no machine-scoped IP (and joins
    # billing: an app that nothing serves is refused by the config check)
    broken = write_variant(lab, "verify-mismatch.yaml", edited(
        lab, ("{id: m44-ip, workload: m44, ipv4: 203.0.113.20}", "{id: m44-ip, workload: m43, ipv4: 203.0.113.20}"),
        ("{id: m44, app: web,", "{id: m44, app: billing,")))
    proc = agent(lab, "verify", "-c", broken, "--echo", "192.0.2.10:8080", "--lab", lab.prefix,
                 check=False)
    assert proc.returncode == 4 and "MISMATCH" in proc.stdout, proc.stdout + proc.stderr


def test_a_recreated_cgroup_is_matched_again(lab):
    """nft 1.0.6 lists a removed cgroup's element by id and cannot delete it by that id:
    the next apply must still succeed, and the new cgroup must be matched."""
    from egress_agent.lab.topology import cgroup2_root
    config = demo_config(lab)
    apply(lab, config)
    lease = app_lease(status(lab, config), "batch")
    assert in_block(lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080), lease)
    path = os.path.join(cgroup2_root(), lab.cgroup)
    os.rmdir(path)  # like `systemctl restart` of the unit: a new cgroup, a new id
    os.mkdir(path)
    result = apply(lab, config)
    assert result["changed"], result
    assert in_block(lab.probe_cgroup(lab.cgroup, "192.0.2.10", 8080), lease)
    assert apply(lab, config)["changed"] is False


# --- 8. reading the kernel by name (issue 12) ------------------------------------

def test_list_and_plan_against_running_name_workloads_and_ips(lab: Lab) -> None:
    """`list` decodes the running table's maps into workloads and egress IPs (what
    the store's leases say); `plan --against-running` says a move between apps as
    `~ m43: billing-2 ... → partner-link ...` and, once applied, `no change`."""
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    listed = {p["workload"]: p for p in agent_json(lab, "list", "-c", config)}
    assert sorted(listed) == ["batch", "m42", "m43", "m44"]
    m42 = listed["m42"]
    assert {(s["address"], s["interface"]) for s in m42["sources"]} == {
        ("10.0.1.2", "vm-m42"), ("fd00:1::2", "vm-m42")}
    default = [x for x in m42["leases"] if x["default"]]
    lease = app_lease(st, "m42")
    assert [(x["ip"], x["ipv4"], x["ports"], x["ipv6"]) for x in default] == [
        (lease["ip"], lease["ipv4"], lease["ports"], lease["ipv6"])]
    assert listed["batch"]["cgroups"] == [lab.cgroup]
    text = agent(lab, "list", "-c", config, "--ip", "m44-ip").stdout.splitlines()
    assert text[0].split()[:3] == ["WORKLOAD", "EGRESS", "IP"] and len(text) == 2, text
    assert text[1].split()[:5] == ["m44", "m44-ip", "203.0.113.20:1024-2047", "-", "default"]

    assert agent(lab, "plan", "-c", config, "--against-running").stdout.strip() == \
        "no change: the running host already has this config"
    moved = write_variant(lab, "m43-partners.yaml", edited(
        lab, ("{id: m43, app: billing,", "{id: m43, app: partners,")))
    out = agent(lab, "plan", "-c", moved, "--against-running").stdout.splitlines()
    m43 = app_lease(st, "m43")
    partner = next(x["ports"] for x in listed["m43"]["leases"] if x["ip"] == "partner-link")
    assert out[0] == (f"~ m43: {m43['ip']} {m43['ipv4']}:{m43['ports'][0]}-{m43['ports'][1]} "
                      f"{m43['ipv6']} → partner-link 203.0.113.140:{partner[0]}-{partner[1]}"), out
    assert not [line for line in out if line[:2] in ("+ ", "- ", "~ ") and "m43" not in line]
    plan = agent_json(lab, "plan", "-c", moved, "--against-running")
    assert [(c["change"], c["workload"]) for c in plan["workloads"]] == [("~", "m43")]
    after = plan["workloads"][0]["after"]["leases"]
    assert [x["ip"] for x in after if x["default"]] == ["partner-link"]
    apply(lab, moved)
    assert agent_json(lab, "plan", "-c", moved, "--against-running")["changed"] is False
    assert agent(lab, "plan", "-c", moved, "--against-running", "--nft").stdout.startswith(
        "no change")
