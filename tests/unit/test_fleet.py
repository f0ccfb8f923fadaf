"""egress-agent fleet: one fleet file -> every host's files, with blocks allocated
once for the fleet and kept across renders."""

from __future__ import annotations

import json

import pytest

from egress_agent import fleet
from egress_agent.config import ConfigError, parse
from egress_agent.lab.pairlab import FLEET
from egress_agent.store import Store, who

M3 = "  - {id: m3, app: app, host: w1, source: [10.1.1.3]}\n"


def write(tmp_path, text: str) -> str:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return str(path)


def test_every_host_gets_files_that_validate_and_both_gateways_the_same_blocks(tmp_path):
    r = fleet.run(write(tmp_path, FLEET), str(tmp_path / "state"), str(tmp_path / "out"))
    assert r["hosts"] == ["g1", "g2", "w1", "w2"]
    configs = {h: parse((tmp_path / "out" / h / "config.yaml").read_text(), h).config
               for h in r["hosts"]}
    g1, g2, w1 = configs["g1"], configs["g2"], configs["w1"]
    assert g1.host.role == "gateway" and g1.workloads == g2.workloads  # blocks and all
    assert {w.id: dict(w.blocks) for w in g1.workloads} == {
        "m1": {"app-ip": "1024-2047", "partner-ip": "1024-2047"},
        "m2": {"app-ip": "2048-3071", "partner-ip": "2048-3071"}}
    # the policy, on both sides: the workload host routes to partner-ip, the pair translates
    for c in (g1, w1):
        assert [(p.name, p.egress.ipv4, p.egress.ipv4_fallback) for p in c.policies] == [
            ("to-partner", "partner-ip", "drop")]
    assert [w.interface for w in g1.workloads] == ["t101", "t102"]
    ip = w1.egress_ips[0]
    assert (ip.remote, ip.via.dev, ip.via.gateway) == (True, "t-app", "10.250.1.150")
    # IPv6: the range on both sides, the pair's tunnel address as the next hop
    assert (ip.ipv6, ip.via.gateway6) == ("2001:db8:140::/64", "fd00:250::196")
    assert g1.egress_ips[0].ipv6 == "2001:db8:140::/64"
    assert [(w.id, dict(w.blocks)) for w in w1.workloads] == [
        ("m1", {"app-ip": "1024-2047", "partner-ip": "1024-2047"})]
    assert sorted(ip.id for ip in w1.egress_ips) == ["app-ip", "partner-ip"]
    files = sorted(p.name for p in (tmp_path / "out" / "g1").iterdir())
    assert files == ["config.yaml", "conntrackd.conf", "keepalived.conf", "notify", "tunnels.sh"]
    tun = (tmp_path / "out" / "g2" / "tunnels.sh").read_text()
    assert "ip link add t101 type vxlan id 101 remote 10.200.0.11" in tun
    assert "ip link set t101 address 02:ea:00:00:65:01" in tun  # the same MAC on g1 and g2
    assert tun == (tmp_path / "out" / "g1" / "tunnels.sh").read_text()
    # forwarding, a strict TCP conntrack, IPv6 with a link-local address of its own
    # (without one the kernel solicits no neighbour for a forwarded packet)
    for line in ("sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0",
                 "ip addr replace fd00:250::196/126 dev t101 nodad",
                 "ip addr replace fe80::1/64 dev t101 nodad",
                 "ip route replace fd00:1::2/128 via fd00:250::195 dev t101"):
        assert line in tun, line
    keepalived = (tmp_path / "out" / "g1" / "keepalived.conf").read_text()
    assert "virtual_ipaddress_excluded {\n\t\t2001:db8:f::1/64 dev up0" in keepalived


def test_blocks_stay_across_renders_and_unrelated_edits_and_who_answers_for_the_fleet(tmp_path):
    state, out = str(tmp_path / "state"), str(tmp_path / "out")
    first = fleet.run(write(tmp_path, FLEET), state, out)["blocks"]["app"]
    # a new workload listed first, the hosts in another order: nobody else moves
    text = FLEET.replace("workloads:\n", "workloads:\n" + M3).replace(
        "  - {name: w1, region: lab, fabric_dev: fabr0, fabric_addr: 10.200.0.11, vni: 101}\n", "") \
        .replace("hosts:\n", "hosts:\n  - {name: w1, region: lab, fabric_dev: fabr0, "
                             "fabric_addr: 10.200.0.11, vni: 101}\n")
    second = fleet.run(write(tmp_path, text), state, out)
    assert {k: v for k, v in second["blocks"]["app"].items() if not k.startswith("m3 ")} == first
    assert second["changes"]["app"] == ["assign m3 app-ip 3072-4095",
                                        "assign m3 partner-ip 3072-4095"]
    assert fleet.run(write(tmp_path, text), state, out)["changes"]["app"] == []
    holders = who(Store(f"{state}/app").history(), "203.0.113.140", 3500, None)
    assert [h.to_json()["workload"] for h in holders] == ["m3"]


def test_a_policy_reaches_only_the_hosts_whose_workloads_it_can_match(tmp_path):
    text = FLEET.replace("match: {ports: [7001], protocols: [tcp]}",
                         "match: {workloads: [m2], ports: [7001], protocols: [tcp]}")
    fleet.run(write(tmp_path, text), str(tmp_path / "state"), str(tmp_path / "out"))
    cfg = {h: parse((tmp_path / "out" / h / "config.yaml").read_text(), h).config
           for h in ("w1", "w2", "g1")}
    assert not cfg["w1"].policies and [ip.id for ip in cfg["w1"].egress_ips] == ["app-ip"]
    assert [p.match.workloads for p in cfg["w2"].policies] == [["m2"]]
    assert [p.match.workloads for p in cfg["g1"].policies] == [["m2"]]


def test_check_writes_nothing(tmp_path):
    r = fleet.run(write(tmp_path, FLEET), str(tmp_path / "state"), None)
    assert r["written"] == [] and not (tmp_path / "state").exists()


@pytest.mark.parametrize("edit, at, message", [
    (("pair: app}", "pair: ap}"), "pair: ap}", "egress_ips[0].pair: no pair 'ap' under pairs:"),
    (("host: w2,", "host: w9,"), "host: w9,", "workloads[1].host: no workload host 'w9' under hosts:"),
    (("vni: 102", "vni: 101"), "vni: 101}\n  - {name: w2", "hosts[1].vni: vni 101 is w1's already"),
    (("priority: 150", "priority: 0"), "priority: 0", "pairs[0].gateways[0].priority"),
    (('    tunnels6: "fd00:250::/64"\n', ""), 'ipv6: "2001:db8:140::/64", pair',
     "egress_ips[0].ipv6: pair 'app' needs tunnels6: and vip6: to carry IPv6"),
    (("ports_per_workload: 1024", "ports_per_workload: 40000"), "host: w2,",
     "workloads[1]: capacity: workload 'm2' needs a port block on egress IP 'app-ip'"),
])
def test_a_bad_fleet_file_is_an_error_at_its_line(tmp_path, edit, at, message):
    text = FLEET.replace(*edit)
    line = text[:text.index(at)].count("\n") + 1 + at.count("\n")
    with pytest.raises(ConfigError) as e:
        fleet.run(write(tmp_path, text), str(tmp_path / "state"), None)
    assert any((p.line, message in str(p)) == (line, True) for p in e.value.problems), \
        (line, [str(x) for x in e.value.problems])


def test_the_cli_renders_with_json(tmp_path, capsys):
    from egress_agent.cli import main
    assert main(["fleet", "render", "-f", write(tmp_path, FLEET), "-o", str(tmp_path / "out"),
                 "--state", str(tmp_path / "state"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and len(doc["written"]) == 14 and doc["blocks"]["app"]["m1 app-ip"] == "1024-2047"


def test_a_removed_workload_frees_its_block_at_once(tmp_path):
    state, out = str(tmp_path / "state"), str(tmp_path / "out")
    fleet.run(write(tmp_path, FLEET), state, out)
    without = FLEET.replace('  - {id: m1, app: app, host: w1, source: [10.1.1.2, "fd00:1::2"], '
                            'interface: m1}\n', "")
    r = fleet.run(write(tmp_path, without), state, out)
    assert r["changes"]["app"] == ["release m1 app-ip 1024-2047", "release m1 partner-ip 1024-2047"]
    back = fleet.run(write(tmp_path, without.replace("workloads:\n", "workloads:\n" + M3)),
                     state, out)
    assert back["blocks"]["app"]["m3 app-ip"] == "1024-2047"  # m1's, free again
