"""Attribution has no holes (issue 10), on a real kernel.

A workload holds a TCP connection through its port block; the block is then
released while the connection lives (its IP set to `draining`; the workload
removed and its machine given to a new workload). The truth is the echo
server: the held connection keeps answering from the released block, `who`
names the old holder with its open connection, a new workload leaves from
another block, and once the connection has closed the next check frees the
block while `who --at` still answers for the past.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from egress_agent.lab.topology import Lab

from agent_helpers import (agent, app_lease, apply, demo_config, edited, host, in_block, status,
                           write_variant)
from daemon_helpers import Agent, wait_until, write_by_rename

ECHO = ("192.0.2.10", 8080)
M42 = "  - {id: m42, app: billing, source: [10.0.1.2, \"fd00:1::2\"], interface: vm-m42}\n"


def who(lab: Lab, config: str, addr: str, port: int, at: str | None = None) -> tuple[int, list]:
    """`who ADDR:PORT [--at T] --json`: exit status and holders."""
    proc = agent(lab, "who", "-c", config, f"{addr}:{port}", *(["--at", at] if at else []),
                 "--json", check=False)
    return proc.returncode, json.loads(proc.stdout)


def who_text(lab: Lab, config: str, addr: str, port: int, at: str | None = None) -> str:
    return agent(lab, "who", "-c", config, f"{addr}:{port}", *(["--at", at] if at else []),
                 check=False).stdout


def short_conntrack_timeouts(lab: Lab) -> None:
    """A closed TCP connection leaves the host's conntrack within a second or two
    instead of TIME_WAIT's 120 s (per network namespace: the lab's host only)."""
    for state in ("fin_wait", "time_wait", "close_wait", "last_ack", "close"):
        host(lab, "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_{state}=1")


def conntrack_has(lab: Lab, addr: str, port: int) -> bool:
    """Does the host's conntrack still hold a connection the origin sees from addr:port?"""
    out = host(lab, "conntrack", "-L", "-p", "tcp")
    return any(f"dst={addr} sport={ECHO[1]} dport={port} " in line for line in out.splitlines())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def test_a_draining_ips_open_connection_keeps_its_block_and_who_names_it(lab: Lab) -> None:
    short_conntrack_timeouts(lab)
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    lease = app_lease(st, "m42")
    ip_id, addr = lease["ip"], lease["ipv4"]
    # billing-1 is written in block style, billing-2 in flow style
    line = next(l for l in open(config) if l.strip() in (f"- id: {ip_id}",)
                or l.strip().startswith(f"- {{id: {ip_id},"))
    drained_text = edited(lab, (line, line.replace(f"id: {ip_id},", f"id: {ip_id}, state: draining,")
                                if "{" in line else line + "    state: draining\n"))
    drained = write_variant(lab, "draining.yaml", drained_text)

    with lab.hold("m42", *ECHO) as held:
        assert in_block(held.first, lease), held.first
        port = held.first.port
        apply(lab, drained)
        st2 = status(lab, drained)
        moved = app_lease(st2, "m42")
        assert moved["ip"] != ip_id
        # the held connection still leaves from the released block; new ones do not
        assert held.ping() == held.first
        assert in_block(lab.probe("m42", *ECHO), moved)
        # the released block is still m42's: who says so, status does not count it free
        rc, holders = who(lab, drained, addr, port)
        assert rc == 0, holders
        [h] = holders
        assert (h["workload"], h["egress_ip"], h["state"], h["connections_open"]) == \
            ("m42", ip_id, "lingering", True), h
        assert h["ports"] == lease["ports"] and h["released"] and h["drained"] is None
        assert "connections still open (block not reused until they close)" in \
            who_text(lab, drained, addr, port)
        [ip] = [i for i in st2["egress_ips"] if i["id"] == ip_id]
        assert [(l["workload"], l["ports"]) for l in ip["lingering"]] == [("m42", lease["ports"])]
        lo, hi = lease["ports"]
        assert f"(+1 released, connections still open: m42 {lo}-{hi})" in \
            agent(lab, "status", "-c", drained).stdout
        # a check while it is open changes nothing
        apply(lab, drained)
        assert who(lab, drained, addr, port)[1][0]["state"] == "lingering"
        during = now_iso()

    # closed: conntrack forgets it, and the next check frees the block
    wait_until(lambda: not conntrack_has(lab, addr, port), 15, what="the closed connection "
               "to leave conntrack")
    apply(lab, drained)
    rc, holders = who(lab, drained, addr, port)
    assert holders == [] and rc != 0, holders
    assert not [i for i in status(lab, drained)["egress_ips"] if i["id"] == ip_id][0]["lingering"]
    rc, [h] = who(lab, drained, addr, port, during)
    assert rc == 0 and (h["workload"], h["state"]) == ("m42", "drained") and h["drained"], h
    assert "last connection closed by" in who_text(lab, drained, addr, port, during)


def test_a_removed_workloads_block_is_not_reused_while_open_and_the_daemon_frees_it(lab: Lab) -> None:
    short_conntrack_timeouts(lab)
    config = demo_config(lab)
    # the machine of m42 becomes workload m99: without lingering it would get m42's
    # block back (the lowest free one on the least loaded IP)
    moved_text = edited(lab, (M42, M42.replace("id: m42,", "id: m99,")))
    with Agent(lab, config, resync=600, extra=("--usage-interval", "0.3")) as daemon:
        daemon.wait_syncs(1)
        lease = app_lease(status(lab, config), "m42")
        addr = lease["ipv4"]
        with lab.hold("m42", *ECHO) as held:
            assert in_block(held.first, lease), held.first
            port = held.first.port
            write_by_rename(config, moved_text)
            wait_until(lambda: "m99" in {w["id"] for w in status(lab, config)["workloads"]}
                       and app_lease(status(lab, config), "m99"), 15, what="m99 leased")
            new = app_lease(status(lab, config), "m99")
            assert (new["ipv4"], new["ports"]) != (addr, lease["ports"]), new
            seen = lab.probe("m42", *ECHO)  # the same machine, now m99
            assert in_block(seen, new) and not in_block(seen, lease), seen
            assert held.ping() == held.first
            [h] = who(lab, config, addr, port)[1]
            assert (h["workload"], h["state"]) == ("m42", "lingering"), h
            assert who(lab, config, seen.address, seen.port)[1][0]["workload"] == "m99"
            during = now_iso()
            time.sleep(1.0)  # several usage dumps see the open connection: it stays
            assert who(lab, config, addr, port)[1][0]["state"] == "lingering"
            assert daemon.syncs(trigger="drained") == []
        # closed: the usage thread sees it gone and a sync frees it, no config change
        daemon.wait_syncs(1, timeout=20, trigger="drained")
        rc, holders = who(lab, config, addr, port)
        assert holders == [] and rc != 0, holders
        [h] = who(lab, config, addr, port, during)[1]
        assert (h["workload"], h["state"]) == ("m42", "drained"), h
        daemon.check_alive()
        assert not daemon.errors(), daemon.errors()
