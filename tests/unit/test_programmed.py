"""programmed.py: the maps decoded by workload and egress IP, and the changes
between two decodings in names (what `list` and `plan` print)."""

from __future__ import annotations

from importlib import resources

from egress_agent.alloc import Allocations, allocate
from egress_agent.config import parse
from egress_agent.hoststate import HostFacts, Usable
from egress_agent.plan import build
from egress_agent.programmed import changes, decode

USABLE = Usable(v4=frozenset({"billing-1", "billing-2", "m44-ip", "partner-link"}),
                v6=frozenset({"billing-1", "billing-2"}))


def planned(text: str, prev: Allocations = Allocations()):
    cfg = parse(text, "demo.yaml").config
    a, _ = allocate(cfg, prev, USABLE)
    return build(cfg, a, HostFacts(usable=USABLE)), a


def demo() -> str:
    return resources.files("egress_agent").joinpath("lab/demo.yaml").read_text().replace(
        "@PREFIX@", "t")


def test_decode_names_every_lease_the_allocation_holds():
    p, a = planned(demo())
    got = decode(p.desired.elements, a.wids, a.eids)
    assert sorted(got) == ["batch", "m42", "m43", "m44"]
    for w, prog in got.items():
        want = {(x.ip, x.ipv4, x.ports, x.ipv6) for (wl, _), x in a.leases.items() if wl == w}
        assert {(x.ip, x.ipv4, x.ports, x.ipv6) for x in prog.leases} == want, w
        assert [x.ip for x in prog.leases if x.default] == [a.app_choice.get(w, "m44-ip")], w
    assert got["m42"].sources == (("10.0.1.2", "vm-m42"), ("fd00:1::2", "vm-m42"))
    assert got["batch"].cgroups == ("egress-lab-t/app.service",) and not got["batch"].sources


def test_a_workload_the_store_does_not_name_is_shown_by_its_id():
    p, a = planned(demo())
    wids = dict(a.wids)
    wid = wids.pop("m43")
    eids = {k: v for k, v in a.eids.items() if k != "legacy"}
    got = decode(p.desired.elements, wids, eids)
    assert f"wid {wid}" in got and "m43" not in got
    assert any(x.ip == f"eid {a.eids['legacy']}" for x in got[f"wid {wid}"].leases)


def test_changes_say_a_move_an_addition_a_removal_and_new_sources_in_names():
    before, a = planned(demo())
    text = demo().replace("{id: m43, app: billing,", "{id: m43, app: partners,").replace(
        "source: [10.0.1.4]", "source: [10.0.1.4, 10.0.1.9]").replace(
        "  - {id: batch, app: billing, cgroup: egress-lab-t/app.service}\n",
        "  - {id: m45, app: billing, source: [10.0.1.5], interface: vm-m43}\n")
    after, b = planned(text, a)
    got = changes(decode(before.desired.elements, a.wids, a.eids),
                  decode(after.desired.elements, b.wids, b.eids))
    lines = {c.workload: c.text() for c in got}
    assert sorted(lines) == ["batch", "m43", "m44", "m45"], lines
    m43, partner = a.leases[("m43", "billing-2")], a.leases[("m43", "partner-link")]
    assert lines["m43"] == (f"~ m43: billing-2 {m43.ipv4}:{m43.ports[0]}-{m43.ports[1]} "
                            f"{m43.ipv6} → partner-link 203.0.113.140:{partner.ports[0]}-"
                            f"{partner.ports[1]}")
    assert lines["m44"] == ("~ m44: from 10.0.1.4 on vm-m44 → 10.0.1.4 on vm-m44, "
                            "10.0.1.9 on vm-m44")
    assert lines["batch"].startswith("- batch: billing-1 203.0.113.10:") and \
        lines["batch"].endswith("; from cgroup egress-lab-t/app.service")
    assert lines["m45"].startswith("+ m45: ") and "from 10.0.1.5 on vm-m43" in lines["m45"]
    assert [c.to_json()["change"] for c in got] == ["-", "~", "~", "+"]
    assert changes(decode(after.desired.elements, b.wids, b.eids),
                   decode(after.desired.elements, b.wids, b.eids)) == []
