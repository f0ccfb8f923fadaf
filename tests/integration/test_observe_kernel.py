"""Every state an operator alerts on, seen in `status --json` and in a scraped metric
(issue 12): one family of an IP gone, a failed-over workload, an invalid reload,
a draining IP; and `promtool check metrics` accepts the scrape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from agent_helpers import demo_config, edited, status, write_variant
from daemon_helpers import Agent, wait_until, write_by_rename
from egress_agent.lab.echo import child_env
from egress_agent.lab.netns import nsenter_prefix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BILLING_2 = '{id: billing-2, app: billing, ipv4: 203.0.113.11, ipv6: "2001:db8:11::/64"}'


def scrape_text(lab, port: int) -> str | None:
    p = subprocess.run(nsenter_prefix(lab.host) + [
        sys.executable, "-c", "import sys, urllib.request; sys.stdout.write(urllib.request."
        f"urlopen('http://127.0.0.1:{port}/metrics', timeout=2).read().decode())"],
        capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


def value(text: str, family: str, /, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            for s in fam.samples:
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
    return None


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in obj["conditions"]}


def test_family_failover_reload_and_drain_in_status_and_metrics(lab):
    config = demo_config(lab)
    original = open(config).read()
    port = 20000 + int(lab.prefix[-3:], 16) % 1000

    def metric(family, /, **labels):
        def read():
            text = scrape_text(lab, port)
            return text if text and value(text, family, **labels) is not None else None
        return value(wait_until(read, timeout=10, what=f"{family} {labels}"), family, **labels)

    def until(family, want, /, **labels):
        wait_until(lambda: metric(family, **labels) == want, timeout=15,
                   what=f"{family} {labels} == {want}")

    with Agent(lab, config, extra=("--metrics", f"127.0.0.1:{port}")) as a:
        a.wait_syncs(1)
        st = status(lab, config)
        assert st["daemon"]["running"] and st["daemon"]["last_sync"]["ok"]
        assert st["daemon"]["config_load"]["ok"]
        assert metric("egress_agent_config_last_reload_successful") == 1
        assert metric("egress_agent_last_sync_success_timestamp_seconds") > 1.7e9
        assert metric("egress_agent_egress_ip_usable", egress_ip="billing-1", family="ipv4") == 1
        assert metric("egress_agent_build_info") == 1
        assert metric("process_resident_memory_bytes") > 0  # the standard process collector
        # the scrape is valid by Prometheus' own linter
        text = scrape_text(lab, port)
        subprocess.run([os.path.join(ROOT, "scripts", "install-deps"), "prometheus"], check=True)
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr

        # only billing-1's IPv4 goes: its IPv6 stays usable
        lab.address_del("203.0.113.10")
        until("egress_agent_egress_ip_usable", 0, egress_ip="billing-1", family="ipv4")
        assert metric("egress_agent_egress_ip_usable", egress_ip="billing-1", family="ipv6") == 1
        assert metric("egress_agent_failovers", egress_ip="billing-1", family="ipv4") == 1
        assert value(scrape_text(lab, port), "egress_agent_failovers", egress_ip="billing-1",
                     family="ipv6") is None
        st = status(lab, config)
        ip = next(i for i in st["egress_ips"] if i["id"] == "billing-1")
        c = conditions(ip)
        assert (c["IPv4Usable"]["status"], c["IPv4Usable"]["reason"]) == (False, "AddressMissing")
        assert c["IPv4Usable"]["since"] > a.started
        assert c["IPv6Usable"]["status"] is True and c["Draining"]["status"] is False
        moved = [w for w in st["workloads"] if w["app_ip"] == "billing-1"]
        assert moved, "billing-1 holds some of billing's workloads"
        for w in moved:
            fo = conditions(w)["FailedOver"]
            assert (fo["status"], fo["reason"]) == (True, "TemporaryBlock"), w
            assert fo["since"] == c["IPv4Usable"]["since"]
        lab.address_add("203.0.113.10")
        until("egress_agent_egress_ip_usable", 1, egress_ip="billing-1", family="ipv4")

        # an invalid config: the last good state stays, and both views say so
        write_by_rename(config, original + "\nbogus_field: 1\n")
        until("egress_agent_config_last_reload_successful", 0)
        # (`status -c` on the invalid file says what is wrong with it; the daemon's
        # view is read with the same settings from a valid copy)
        st = status(lab, write_variant(lab, "good.yaml", original))
        load = st["daemon"]["config_load"]
        assert load["ok"] is False and "bogus_field" in load["problems"][0]
        assert load["last_ok_time"] is not None
        assert "config invalid" in st["daemon"]["last_error"]["message"]
        ok_time = metric("egress_agent_config_last_reload_success_timestamp_seconds")
        assert ok_time == load["last_ok_time"]

        # draining billing-2: a condition and the egress_ip_info state
        write_by_rename(config, original.replace(BILLING_2, BILLING_2[:-1] + ", state: draining}"))
        until("egress_agent_config_last_reload_successful", 1)
        until("egress_agent_egress_ip_info", 1, egress_ip="billing-2", state="draining")
        st = status(lab, config)
        ip = next(i for i in st["egress_ips"] if i["id"] == "billing-2")
        c = conditions(ip)
        assert (c["Draining"]["status"], c["Draining"]["reason"]) == (True, "StateDraining")
        assert (c["IPv4Usable"]["status"], c["IPv4Usable"]["reason"]) == (False, "Draining")
        # draining is not a failover
        assert value(scrape_text(lab, port), "egress_agent_failovers", egress_ip="billing-2",
                     family="ipv4") is None
    st = status(lab, config)
    assert st["daemon"]["running"] is False  # stopped: the file stays, the pid is gone


def run_in(lab, ns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(nsenter_prefix(ns) + [sys.executable, "-m", "egress_agent.cli", *args],
                          capture_output=True, text=True, timeout=60, env=child_env(), cwd="/")


def test_outside_the_agents_namespace_commands_say_so_and_apply_names_unusable_ips(lab):
    """`status`, `usage` and `explain` where no agent table is: exit 8 and one line
    saying where to run them, instead of a report about nothing; `apply` names the
    egress IPs it cannot use, and exits 9 when it can use none."""
    config = demo_config(lab)
    for args in (("status",), ("usage",), ("explain", "10.0.1.2", "198.51.100.1:8080/tcp")):
        p = run_in(lab, lab.host, args[0], "-c", config, *args[1:], "--json")
        assert p.returncode == 8, (args, p.returncode, p.stdout, p.stderr)
        assert json.loads(p.stdout)["table"] is False
        assert f"{args[0]}: no table inet egress_agent in this network namespace" in p.stderr
        assert "nsenter --net=/run/netns/NAME" in p.stderr and len(p.stderr.splitlines()) == 1
    # on the host: the demo's `legacy` IP is not provisioned (on purpose): named, exit 0
    p = run_in(lab, lab.host, "apply", "-c", config)
    assert p.returncode == 0, p.stderr
    assert "not usable on this host (address absent or link down): legacy;" in p.stderr
    assert run_in(lab, lab.host, "status", "-c", config, "--json").returncode == 0
    # the origin has none of the host's addresses: every workload would fall back (and
    # no up1: a route through a link that does not exist is a config error, exit 3)
    elsewhere = write_variant(lab, "elsewhere.yaml", edited(
        lab, (f"{lab.prefix}/state\n", f"{lab.prefix}/state-elsewhere\n"),
        ("\n    via: {dev: up1, gateway: 203.0.113.129}", "")))
    p = run_in(lab, lab.origin, "apply", "-c", elsewhere)
    assert p.returncode == 9, (p.returncode, p.stdout, p.stderr)
    assert ("not usable on this host (address absent or link down): billing-1, billing-2, "
            "m44-ip, partner-link, legacy;") in p.stderr
    assert "no egress IP of this host is usable" in p.stderr
