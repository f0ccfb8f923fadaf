"""Drift is repaired at once: foreign changes to our table, ip rules and routes,
with the daemon running (resync 600 s, so only the event watcher can repair),
a TCP connection of m42 held open and a prober opening new TCP connections from
m43 every 3 ms (m43's UDP follows a drop policy in demo.yaml) towards the origin's echo server.

Per fault: a warning log line names what was found; the table equals what it
was before (elements, skeleton chains and rules, generated chains); the held
connection still echoes with its first source; the daemon is alive; and the
origin saw m43's probes only from m43's assigned address and port block, or
not at all. One lab for all nft faults, one for the rule/route faults.

What keeps the origin clean in the milliseconds before the repair: the guard
nat chain postrouting_guard (a flushed postrouting or a deleted SNAT rule),
TCP/UDP never falling through to snat4_addr (a flushed snat4), and the guard
ip rules at priority 7100 (the table gone: `nft delete table`, `nft flush
ruleset`). Without them this test saw 20-45 probes per fault answered from the
host's address (203.0.113.2) or from ports outside m43's block.
"""

from __future__ import annotations

import json
import re
import time

from egress_agent.lab.cli import write_demo_config
from egress_agent.lab.topology import LAB_NAT, Lab
from egress_agent.lab.netns import ns_exec
from egress_agent import shape
from egress_agent.nft.listing import observed_from_json
from egress_agent.nft.text import skeleton_shape

from agent_helpers import agent_json, apply
from daemon_helpers import (Agent, Prober, host, ip_rule_priorities, lease, started, status,
                            wait_until)

ECHO = "192.0.2.10"
T = ("inet", "egress_agent")


def table_state(lab: Lab):
    """Our table as the agent compares it (elements, skeleton shape, generated chains)."""
    proc = host(lab, "nft", "-j", "list", "table", *T, check=False)
    return observed_from_json(json.loads(proc.stdout)) if proc.returncode == 0 else None


def handle_of(lab: Lab, chain: str, fragment: str) -> str:
    out = host(lab, "nft", "-a", "list", "chain", *T, chain).stdout
    line = next(l for l in out.splitlines() if fragment in l)
    return re.search(r"# handle (\d+)", line).group(1)


def in_block(answer: dict, l: dict) -> bool:
    return answer["src"] == l["ipv4"] and l["ports"][0] <= answer["sport"] <= l["ports"][1]


def assert_repaired(lab: Lab, ag: Agent, held, prober: Prober, m43: dict, before,
                    fault: list[str], found: str, is_whole=None) -> float:
    """Run `fault` in the host namespace; wait for the repair; check everything.
    The seconds from the fault's return to the table being whole again."""
    n = len(ag.records("drift repaired"))
    t0 = time.time()
    host(lab, *fault)
    t_fault = time.time()
    whole = is_whole or (lambda: table_state(lab) == before)
    wait_until(whole, 5, interval=0.002, what=f"repair after {' '.join(fault)}")
    t_whole = time.time()
    warn = wait_until(lambda: ag.records("drift repaired")[n:], 5,
                      what=f"a 'drift repaired' warning (log: {ag.tail()})")[0]
    assert warn["level"] == "warning", warn
    assert any(found in f for f in warn["found"]), (found, warn)
    ag.check_alive()
    assert held.ping() == held.first, "the held connection did not survive"
    # new flows during and after the fault: only m43's own source, or nothing
    time.sleep(0.1)
    seen = [a for a in list(prober.answers) if a["sent"] >= t0 - 0.05]
    wrong = [a for a in seen if not in_block(a, m43)]
    assert not wrong, f"{' '.join(fault)}: the origin saw {wrong[:5]} ({len(wrong)} wrong)"
    assert [a for a in seen if a["sent"] > t_whole + 0.02], "no answers after the repair"
    print(f"{' '.join(fault)}: whole again after {(t_whole - t_fault) * 1000:.1f} ms; "
          f"{len(seen)} answers, all from {m43['ipv4']}; found {warn['found']}")
    return t_whole - t_fault


def test_nft_faults_are_repaired_at_once(lab: Lab) -> None:
    cfg = write_demo_config(lab)
    # without the daemon: `plan --against-running` sees a flushed skeleton chain
    # (it used to say "no change"), and a starting daemon repairs it
    apply(lab, cfg)
    host(lab, "nft", "flush", "chain", *T, "output")
    plan = agent_json(lab, "plan", "-c", cfg, "--against-running")
    n = len(skeleton_shape().chain("output")[1])
    assert plan["changed"] and plan["skeleton_damage"] == [f"chain output: 0 of {n} skeleton rules"]
    # only the damaged chain is rewritten: the elements stay
    assert plan["nft"].startswith("flush chain inet egress_agent output\n"), plan["nft"][:200]
    assert plan["elements_added"] == 0, plan
    ag = started(lab, cfg, resync=600.0)
    try:
        st = status(lab, cfg)
        m42, m43 = lease(st, "m42"), lease(st, "m43")
        before = table_state(lab)
        assert before is not None and before.table
        assert ag.syncs(trigger="start")[0]["changed"]  # the flushed chain, put back
        assert agent_json(lab, "plan", "-c", cfg, "--against-running")["changed"] is False
        # the kernel lists the skeleton as shape.py reads it from the source (if
        # not, every repair would be followed by another: the daemon would learn
        # the kernel's listing, but this nft version should not need that)
        assert before.shape == skeleton_shape(), shape.differences(skeleton_shape(), before.shape)
        with lab.hold("m42", ECHO, 8080) as held, \
                Prober(lab, "m43", ECHO, 8080, proto="tcp", interval=0.003) as prober:
            assert (held.first.address, held.first.port) and held.first.address == m42["ipv4"]
            prober.wait_first(lambda a: in_block(a, m43), what="a first answer from m43")
            postrouting = before.shape.chain("postrouting")[1]
            n = len(postrouting)
            cases = [
                (["nft", "flush", "chain", *T, "postrouting"],
                 f"chain postrouting: 0 of {n} skeleton rules"),
                (["nft", "delete", "rule", *T, "postrouting", "handle",
                  handle_of(lab, "postrouting", "@snat4 ")],
                 f"chain postrouting: {n - 1} of {n} skeleton rules"),
                (["nft", "flush", "map", *T, "snat4"], "map snat4: "),
                (["nft", "delete", "table", *T], "table inet egress_agent missing"),
                (["nft", "flush", "ruleset"], "table inet egress_agent missing"),
            ]
            for fault, found in cases:
                if fault[1] == "delete" and fault[2] == "rule":  # its handle, read now
                    fault[-1] = handle_of(lab, "postrouting", "@snat4 ")
                assert_repaired(lab, ag, held, prober, m43, before, fault, found)
            # the lab's own NAT went with the ruleset: put it back for the teardown
            ns_exec(lab.host, ["nft", "-f", "-"], input=LAB_NAT)
        assert not ag.errors(), ag.errors()
    finally:
        ag.stop()


PARTNER_RULE, PARTNER_TABLE = 7104, 7104  # partner-link is demo.yaml's 4th egress IP


def test_rule_and_route_faults_are_repaired_at_once(lab: Lab) -> None:
    cfg = write_demo_config(lab)
    ag = started(lab, cfg, resync=600.0)
    try:
        st = status(lab, cfg)
        m42, m43 = lease(st, "m42"), lease(st, "m43")
        before = table_state(lab)
        routes = host(lab, "ip", "route", "show", "table", str(PARTNER_TABLE)).stdout
        assert routes.strip() and PARTNER_RULE in ip_rule_priorities(lab)
        # the host's own packets from its gateway address inside managed_sources
        # are routed before any hook marks them: the guard lets them pass
        rules = host(lab, "ip", "rule").stdout
        assert "7099:\tfrom 10.0.1.1 goto 7101" in rules and "7101:\tfrom all nop" in rules, rules
        assert host(lab, "ping", "-c1", "-W2", "-I", "10.0.1.1", "10.0.1.2", check=False).returncode == 0
        # a new host address inside managed_sources gets its exemption at once
        host(lab, "ip", "addr", "add", "10.0.1.200/32", "dev", "vm-m42")
        wait_until(lambda: "7099:\tfrom 10.0.1.200 goto 7101" in host(lab, "ip", "rule").stdout, 5,
                   what="the exemption of 10.0.1.200")
        assert host(lab, "ping", "-c1", "-W2", "-I", "10.0.1.200", "10.0.1.2", check=False).returncode == 0
        host(lab, "ip", "addr", "del", "10.0.1.200/32", "dev", "vm-m42")
        wait_until(lambda: "10.0.1.200" not in host(lab, "ip", "rule").stdout, 5,
                   what="the exemption of 10.0.1.200 gone")
        with lab.hold("m42", ECHO, 8080) as held, \
                Prober(lab, "m43", ECHO, 8080, proto="tcp", interval=0.003) as prober:
            prober.wait_first(lambda a: in_block(a, m43), what="a first answer from m43")
            assert_repaired(lab, ag, held, prober, m43, before,
                            ["ip", "rule", "del", "priority", str(PARTNER_RULE)],
                            f"priority {PARTNER_RULE}",
                            lambda: PARTNER_RULE in ip_rule_priorities(lab))
            assert_repaired(lab, ag, held, prober, m43, before,
                            ["ip", "route", "del", "default", "table", str(PARTNER_TABLE)],
                            f"table {PARTNER_TABLE} missing",
                            lambda: host(lab, "ip", "route", "show", "table",
                                         str(PARTNER_TABLE)).stdout == routes)
            # a foreign rule in our range is removed again
            assert_repaired(lab, ag, held, prober, m43, before,
                            ["ip", "rule", "add", "fwmark", "0x1", "lookup", "7150",
                             "priority", "7200"],
                            "priority 7200 fwmark 0x1/0xffffffff lookup 7150 foreign",
                            lambda: 7200 not in ip_rule_priorities(lab))
            # the guard (names.GUARD_PRIORITY), deleted: put back at once
            assert_repaired(lab, ag, held, prober, m43, before,
                            ["ip", "rule", "del", "priority", "7100"],
                            "priority 7100 from 10.0.1.0/24",
                            lambda: 7100 in ip_rule_priorities(lab))
            # someone else's rule in our priorities pointing at a table not ours:
            # not ours to delete; it is left alone and every sync still works
            n = len(ag.syncs())
            host(lab, "ip", "rule", "add", "fwmark", "0x1", "lookup", "main", "priority", "7200")
            ag.wait_syncs(n + 1, timeout=5)
            assert 7200 in ip_rule_priorities(lab)
            host(lab, "ip", "rule", "del", "priority", "7200")
        assert not ag.errors(), ag.errors()
    finally:
        ag.stop()
