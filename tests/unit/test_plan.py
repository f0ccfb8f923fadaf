"""Behaviour of the planned ruleset, traced packet by packet; explain agrees."""

from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from egress_agent import names
from egress_agent.alloc import Allocations, allocate
from egress_agent.hoststate import HostFacts, Usable
from egress_agent.config import parse
from egress_agent.plan import build, explain
from tracer import trace

DESIGN = Path(__file__).parent.parent / "configs" / "design.yaml"


def lab_config():
    text = resources.files("egress_agent").joinpath("lab/demo.yaml").read_text()
    return parse(text.replace("@PREFIX@", "t"), "demo.yaml").config


def planned(cfg, usable=Usable(), prev=Allocations()):
    a, _ = allocate(cfg, prev, usable)
    return build(cfg, a, HostFacts(usable=usable)), a


@pytest.fixture(scope="module")
def lab():
    cfg = lab_config()
    # the lab host has every address but legacy's
    usable = Usable(v4=frozenset({"billing-1", "billing-2", "m44-ip", "partner-link"}),
                    v6=frozenset({"billing-1", "billing-2"}))
    p, a = planned(cfg, usable)
    return cfg, p.desired, a, usable


def test_machine_scoped_beats_app_scoped(lab):
    cfg, d, a, _ = lab
    v = trace(d, "10.0.1.4", "192.0.2.10", "tcp", 8080, iif="vm-m44")
    assert (v.action, v.address) == ("snat", "203.0.113.20")
    assert v.ports == a.leases[("m44", "m44-ip")].ports


def test_app_scoped_workloads_get_their_app_ip_and_own_block(lab):
    cfg, d, a, _ = lab
    v42 = trace(d, "10.0.1.2", "192.0.2.10", "tcp", 8080, iif="vm-m42")
    v43 = trace(d, "10.0.1.3", "192.0.2.10", "tcp", 8080, iif="vm-m43")
    assert {v42.address, v43.address} == {"203.0.113.10", "203.0.113.11"}  # balanced
    assert v42.ports == a.leases[("m42", a.app_choice["m42"])].ports
    v6 = trace(d, "fd00:1::2", "2001:db8:ff::10", "tcp", 8080, iif="vm-m42")
    assert v6.action == "snat" and v6.address == a.leases[("m42", a.app_choice["m42"])].ipv6


def test_cgroup_workload_and_its_children(lab):
    cfg, d, a, _ = lab
    v = trace(d, "", "192.0.2.10", "tcp", 8080, cgroup="egress-lab-t/app.service")
    child = trace(d, "", "192.0.2.10", "tcp", 8080, cgroup="egress-lab-t/app.service/sub")
    assert v.action == "snat" and v == child
    assert trace(d, "", "192.0.2.10", cgroup="egress-lab-t/other.service").action == "none"


def test_first_matching_policy_wins_and_destination_policy_routes(lab):
    cfg, d, a, _ = lab
    v = trace(d, "10.0.1.3", "198.51.100.10", "tcp", 8080, iif="vm-m43")
    assert (v.action, v.address) == ("snat", "203.0.113.140")
    assert names.route_table(v.eid) == names.route_table(a.eids["partner-link"])
    # m43's UDP: legacy-udp would match, but partner-via-link comes first for 198.51.100.10
    v = trace(d, "10.0.1.3", "198.51.100.10", "udp", 8081, iif="vm-m43")
    assert v.address == "203.0.113.140"


def test_drop_fallback_never_yields_another_address(lab):
    cfg, d, a, _ = lab
    assert trace(d, "10.0.1.3", "192.0.2.10", "udp", 8081, iif="vm-m43").action == "drop"
    # m42 is not in legacy-udp: its UDP goes out from its app IP
    assert trace(d, "10.0.1.2", "192.0.2.10", "udp", 8081, iif="vm-m42").action == "snat"


def test_partner_link_down_drops_its_traffic():
    cfg = lab_config()
    p, _ = planned(cfg, Usable(v4=frozenset({"billing-1", "billing-2", "m44-ip"})))
    for src, iif in (("10.0.1.2", "vm-m42"), ("10.0.1.4", "vm-m44")):
        assert trace(p.desired, src, "198.51.100.10", "tcp", 8080, iif=iif).action == "drop"


@pytest.mark.parametrize("proto, dst, port", [("udp", "192.0.2.53", 53), ("tcp", "192.0.2.53", 53),
                                               ("icmp", "192.0.2.10", None),
                                               ("tcp", "10.99.0.10", 8080)])
def test_dns_icmp_and_excluded_destinations_use_the_host_default(lab, proto, dst, port):
    cfg, d, a, _ = lab
    assert trace(d, "10.0.1.2", dst, proto, port, iif="vm-m42").action == "default"


def test_unknown_source_in_managed_prefix_and_spoofing_are_dropped(lab):
    cfg, d, a, _ = lab
    assert trace(d, "10.0.1.66", "192.0.2.10", "tcp", 8080, iif="vm-spoof").action == "drop"
    assert trace(d, "10.0.1.2", "192.0.2.10", "tcp", 8080, iif="vm-spoof").action == "drop"
    assert trace(d, "fd00:1::99", "2001:db8:ff::10", "tcp", 8080, iif="vm-x").action == "drop"
    assert trace(d, "172.16.0.9", "192.0.2.10", "tcp", 8080, iif="eth9").action == "none"


def test_app_failover_and_unavailable():
    cfg = lab_config()
    p, a = planned(cfg)
    home = a.app_choice["m42"]
    other = "billing-2" if home == "billing-1" else "billing-1"
    p2, a2 = planned(cfg, Usable(v4=frozenset({other, "m44-ip", "partner-link"}), v6=frozenset()), a)
    v = trace(p2.desired, "10.0.1.2", "192.0.2.10", "tcp", 8080, iif="vm-m42")
    assert v.address == cfg.ip(other).ipv4 and v.ports == a2.leases[("m42", other)].ports
    # IPv6 of the app is gone entirely: defaults.unavailable (default)
    assert trace(p2.desired, "fd00:1::2", "2001:db8:ff::10", "tcp", 8080, iif="vm-m42").action == "default"
    # back: the same block as before
    p3, a3 = planned(cfg, Usable(), a2)
    v = trace(p3.desired, "10.0.1.2", "192.0.2.10", "tcp", 8080, iif="vm-m42")
    assert v.ports == a.leases[("m42", home)].ports and v.address == cfg.ip(home).ipv4


def test_unavailable_drop_never_yields_another_address():
    cfg = lab_config().model_copy(deep=True)
    cfg = parse(Path(DESIGN).read_text().replace("unavailable: default", "unavailable: drop")).config
    p, a = planned(cfg, Usable(v4=frozenset(), v6=frozenset()))
    for dst, port in (("192.0.2.10", 443), ("203.0.113.99", 80), ("2001:db8:ff::1", 443)):
        v = trace(p.desired, "10.0.1.2" if ":" not in dst else "fd00:1::2", dst, "tcp", port,
                  iif="vm-m42")
        assert v.action == "drop", (dst, v)


def test_design_example_policies():
    cfg = parse(DESIGN.read_text()).config
    p, a = planned(cfg)
    d = p.desired
    # m-42 has its machine IP, but finance-static (apps: billing) wins for 192.0.2.0/24:443
    v = trace(d, "10.0.1.2", "192.0.2.7", "tcp", 443, iif="vm-m42")
    assert v.address == "203.0.113.10"
    assert trace(d, "10.0.1.2", "192.0.2.7", "tcp", 80, iif="vm-m42").address == "203.0.113.20"
    assert trace(d, "10.0.1.2", "198.51.100.1", "tcp", 80, iif="vm-m42").action == "default"


packets = st.tuples(
    st.sampled_from([("10.0.1.2", "vm-m42", None), ("10.0.1.3", "vm-m43", None),
                     ("10.0.1.4", "vm-m44", None), ("10.0.1.2", "vm-spoof", None),
                     ("10.0.1.66", "vm-spoof", None), ("fd00:1::2", "vm-m42", None),
                     ("2001:db8:10::100", "vm-m43", None), ("203.0.113.50", "vm-m43", None),
                     ("203.0.113.10", "lo", None),
                     ("", None, "egress-lab-t/app.service")]),
    st.sampled_from(["192.0.2.10", "192.0.2.53", "198.51.100.10", "10.99.0.10", "203.0.113.1",
                     "2001:db8:ff::10"]),
    st.sampled_from(["tcp", "udp", "icmp"]),
    st.sampled_from([None, 53, 443, 8080, 8081]),
)


@settings(max_examples=300, deadline=None)
@given(pkt=packets, down=st.sets(st.sampled_from(["billing-1", "billing-2", "m44-ip", "partner-link"])))
def test_explain_says_what_the_ruleset_does(pkt, down):
    (src, iif, cgroup), dst, proto, port = pkt
    if (":" in dst) != (":" in src) and not cgroup:
        return
    if proto == "icmp":
        port = None
    cfg = lab_config()
    up = frozenset({"billing-1", "billing-2", "m44-ip", "partner-link"} - down)
    usable = Usable(v4=up, v6=up & {"billing-1", "billing-2"})
    p, a = planned(cfg, usable)
    v = trace(p.desired, src, dst, proto, port, iif=iif, cgroup=cgroup)
    e = explain(cfg, a, cgroup or src, dst, port, proto, iif, usable)
    assert e.action == v.action, (e, v)
    if v.action == "snat":
        assert e.source_address == v.address
        assert (e.ports == v.ports) or proto == "icmp"


def test_traffic_between_workloads_of_the_host_is_not_translated(lab):
    cfg, d, a, _ = lab
    assert trace(d, "10.0.1.2", "10.0.1.3", "tcp", 8080, iif="vm-m42").action == "default"
    e = explain(cfg, a, "10.0.1.2", "10.0.1.3", 8080, "tcp", "vm-m42")
    assert e.action == "default" and "east-west" in e.reason


def test_a_vanished_cgroup_is_replaced_by_flushing_its_map():
    """nft lists a removed cgroup's element by id and cannot delete it by that id."""
    from egress_agent.model import Observed
    from egress_agent.nft.fake import FakeNft
    from egress_agent.nft.diff import transaction
    from egress_agent.nft.listing import observed_from_json
    cfg = lab_config()
    p, _ = planned(cfg)
    nft = FakeNft()
    nft.run(transaction(p.desired, Observed()).text)
    # the cgroup is recreated: the kernel now holds its old id, not the path
    nft.table.sets[names.cgroup_map(2)].elements = {45302: 4}
    tx = transaction(p.desired, observed_from_json(nft.list_table()))
    assert f"flush map inet egress_agent {names.cgroup_map(2)}" in tx.lines
    assert not any(l.startswith("delete element") and "cgroup" in l for l in tx.lines)
    nft.run(tx.text)
    assert transaction(p.desired, observed_from_json(nft.list_table())).empty


# --- sources are bound in both families ---------------------------------------------

def test_no_one_sends_with_an_egress_address_present_or_not(lab):
    """m43 (or anyone) sending with m42's IPv6 egress address, or with an IPv4
    egress address that is not on the host (legacy), is dropped; explain agrees."""
    cfg, d, a, usable = lab
    m42_v6 = a.leases[("m42", a.app_choice["m42"])].ipv6
    assert ("203.0.113.50", None) in d.elements[names.EGRESS_SET[4]]  # legacy: not on the host
    for src, dst, iif in ((m42_v6, "2001:db8:ff::10", "vm-m43"), ("2001:db8:11::7", "2001:db8:ff::10", "up0"),
                          ("203.0.113.50", "192.0.2.10", "vm-m43"), ("203.0.113.10", "192.0.2.10", "vm-m43")):
        for proto, port in (("tcp", 8080), ("udp", 53), ("icmp", None)):
            assert trace(d, src, dst, proto, port, iif=iif).action == "drop", (src, proto)
            e = explain(cfg, a, src, dst, port, proto, iif, usable)
            assert e.action == "drop" and "egress IP" in e.reason, e
    # local traffic to local addresses loops through lo: left alone
    assert explain(cfg, a, "203.0.113.10", "203.0.113.11", 80, "tcp", "lo", usable).action == "none"


def test_a_workload_process_bound_to_an_egress_address_never_leaves_with_it(lab):
    """batch binds another workload's egress address: translated traffic gets its
    own lease; untranslated traffic (excluded, east-west) is dropped."""
    cfg, d, a, _ = lab
    cg = "egress-lab-t/app.service"
    own = a.leases[("batch", a.app_choice["batch"])]
    for bound in ("203.0.113.11", "203.0.113.10", "203.0.113.50"):
        v = trace(d, bound, "192.0.2.10", "tcp", 8080, cgroup=cg)
        assert (v.action, v.address, v.ports) == ("snat", own.ipv4, own.ports)
        assert trace(d, bound, "192.0.2.53", "udp", 53, cgroup=cg).action == "drop"
        assert trace(d, bound, "10.0.1.3", "tcp", 22, cgroup=cg).action == "drop"
    assert trace(d, "2001:db8:10::1", "2001:db8:ff::10", "udp", 53, cgroup=cg).action == "drop"
    # the host picks the source: excluded traffic keeps the host default
    assert trace(d, "", "192.0.2.53", "udp", 53, cgroup=cg).action == "default"


@pytest.mark.parametrize("src,iif", [("10.0.1.2", "vm-m42"), ("10.0.1.66", "vm-spoof"),
                                     ("10.0.1.2", "vm-spoof"), ("fd00:1::2", "vm-m42"),
                                     ("fd00:1::99", "vm-x")])
def test_invalid_packets_from_workloads_and_managed_networks_are_dropped(lab, src, iif):
    cfg, d, a, _ = lab
    dst = "2001:db8:ff::10" if ":" in src else "192.0.2.10"
    for proto, port in (("tcp", 8080), ("udp", 8081)):
        assert trace(d, src, dst, proto, port, iif=iif, state="invalid").action == "drop"


def test_invalid_packets_of_others_are_left_alone_and_of_cgroups_dropped(lab):
    cfg, d, a, _ = lab
    assert trace(d, "172.16.0.9", "192.0.2.10", "tcp", 8080, iif="eth9", state="invalid").action == "none"
    assert trace(d, "", "192.0.2.10", "tcp", 8080, cgroup="egress-lab-t/app.service/x",
                 state="invalid").action == "drop"
    assert trace(d, "", "192.0.2.10", "tcp", 8080, cgroup="other.service", state="invalid").action == "none"


PER_FAMILY = """version: 1
host: {name: h, region: r}
defaults: {unavailable: UNAVAILABLE}
egress_ips:
  - {id: dual, app: app, ipv4: 203.0.113.10, ipv6: "2001:db8:10::/64"}
  - {id: v4, app: app, ipv4: 203.0.113.11}
  - {id: plain, app: plain, ipv4: 203.0.113.12}
workloads:
  - {id: w1, app: app, source: [10.0.1.1, "fd00:1::1"]}
  - {id: w2, app: app, source: [10.0.1.2, "fd00:1::2"]}
  - {id: p1, app: plain, source: [10.0.1.3, "fd00:1::3"]}
managed_sources: [10.0.1.0/24, "fd00:1::/64"]
"""


@pytest.mark.parametrize("unavailable", ["default", "drop"])
def test_each_family_is_assigned_on_its_own(unavailable):
    """A workload on an IP without IPv6 gets its IPv6 from another IP of its app;
    a workload whose app has no IPv6 at all follows defaults.unavailable."""
    cfg = parse(PER_FAMILY.replace("UNAVAILABLE", unavailable)).config
    p, a = planned(cfg)
    d = p.desired
    on_v4 = next(w for w, ip in a.app_choice.items() if ip == "v4")
    src = {"w1": "fd00:1::1", "w2": "fd00:1::2"}[on_v4]
    v = trace(d, src, "2001:db8:ff::10", "tcp", 443)
    assert v.action == "snat" and v.address == a.leases[(on_v4, "dual")].ipv6
    e = explain(cfg, a, src, "2001:db8:ff::10", 443, "tcp")
    assert (e.action, e.source_address, e.egress_ip) == ("snat", v.address, "dual"), e
    assert "IPv6 range" in e.reason
    v4 = trace(d, src.replace("fd00:1::", "10.0.1."), "192.0.2.10", "tcp", 443)
    assert v4.address == "203.0.113.11"

    v = trace(d, "fd00:1::3", "2001:db8:ff::10", "tcp", 443)
    e = explain(cfg, a, "fd00:1::3", "2001:db8:ff::10", 443, "tcp")
    assert v.action == e.action == unavailable, (v, e)
    assert "no IPv6 egress IP" in e.reason and "defaults.unavailable" in e.reason


def test_adoption_recovers_the_ipv6_choice():
    from egress_agent.adopt import adopt
    from egress_agent.model import Observed
    from egress_agent.nft.fake import FakeNft
    from egress_agent.nft.diff import transaction
    from egress_agent.nft.listing import observed_from_json
    cfg = parse(PER_FAMILY.replace("UNAVAILABLE", "drop")).config
    p, a = planned(cfg)
    nft = FakeNft()
    nft.run(transaction(p.desired, Observed()).text)
    got = adopt(cfg, observed_from_json(nft.list_table()))
    assert got.app_choice6 == a.app_choice6 and got.leases == a.leases
