"""The planner: Config + Allocations + host facts -> Desired kernel objects.

Pure (imports neither nftables nor pyroute2; tests/unit/test_purity.py proves
it). The same decision logic serves `explain`, so what `explain` says is what
the ruleset does.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

from . import names
from .alloc import Allocations, app_ips, failover_target, own_ips
from .config import Config, Policy, PolicyEgress, Workload, policy_matches, port_bounds
from .hoststate import HostFacts, Usable
from .model import Desired, Element, Route, Rule

DEFAULT = "default"
DROP = "drop"


@dataclass(frozen=True)
class Choice:
    """What one family of one workload's traffic gets: an egress IP, default or drop."""

    action: str  # "snat" | "default" | "drop"
    ip: Optional[str] = None  # egress IP id when action == "snat"
    reason: str = ""


@dataclass
class Plan:
    desired: Desired
    alloc: Allocations
    notes: list[str] = field(default_factory=list)  # e.g. cgroups not present yet
    usable: Usable = Usable()  # which egress IPs this plan took as usable
    # the workloads whose cgroup is missing, and the shared part (applied.py)
    missing_cgroups: set[str] = field(default_factory=set)
    shared: Desired = Desired()


# --- decisions -------------------------------------------------------------------

def _unavailable(cfg: Config) -> Choice:
    return Choice(cfg.defaults.unavailable, reason="no usable egress IP: defaults.unavailable")


def assignment(cfg: Config, alloc: Allocations, w: Workload, fam: int, usable: Usable) -> Choice:
    """The workload's own egress for `fam` when no policy matches. Each family is
    assigned on its own; a family with no assignment follows defaults.unavailable,
    never the host's address silently."""
    for ip in own_ips(cfg, w):
        if (ip.ipv4 if fam == 4 else ip.ipv6):
            if usable.ok(ip, fam):
                return Choice("snat", ip.id, "machine-scoped IP")
            break  # own IP present in config but unusable: the app's IPs take over
    choice = alloc.family_choice(w.id, fam)
    ip = cfg.ip(choice) if choice else None
    if ip is None or not (ip.ipv4 if fam == 4 else ip.ipv6):
        return Choice(cfg.defaults.unavailable,
                      reason=f"no IPv{fam} egress IP for this workload: defaults.unavailable")
    if usable.ok(ip, fam):
        if choice != alloc.app_choice.get(w.id):
            return Choice("snat", ip.id, f"app {w.app} IP {ip.id}: its IPv6 range "
                                         f"({alloc.app_choice[w.id]} has none)")
        return Choice("snat", ip.id, f"app {w.app} IP")
    alt = failover_target(cfg, w, ip, fam, usable, alloc.leases)
    if alt:
        return Choice("snat", alt, f"failover: {ip.id} unusable, another IP of app {w.app}")
    return _unavailable(cfg)


def policy_choice(cfg: Config, p: Policy, fam: int, usable: Usable) -> Optional[Choice]:
    """What a matching policy gives traffic of `fam`; None: the policy is not for `fam`."""
    e = p.egress
    if e == DEFAULT:
        return Choice(DEFAULT, reason=f"policy {p.name}: egress default")
    if e == DROP:
        return Choice(DROP, reason=f"policy {p.name}: egress drop")
    assert isinstance(e, PolicyEgress)
    ip_id = e.ipv4 if fam == 4 else (e.ipv6 or (e.ipv4 if e.ipv4 and cfg.ip(e.ipv4).ipv6 else None))
    if ip_id is None:
        return None
    ip = cfg.ip(ip_id)
    if usable.ok(ip, fam):
        return Choice("snat", ip_id, f"policy {p.name}")
    fb = e.ipv4_fallback or cfg.defaults.unavailable
    if fb == DROP:
        return Choice(DROP, reason=f"policy {p.name}: {ip_id} unusable, fallback drop")
    if fb == DEFAULT:
        return Choice(DEFAULT, reason=f"policy {p.name}: {ip_id} unusable, fallback default")
    fb_ip = cfg.ip(fb)
    if fam == 4 and usable.ok(fb_ip, 4):
        return Choice("snat", fb, f"policy {p.name}: {ip_id} unusable, fallback {fb}")
    return Choice(cfg.defaults.unavailable,
                  reason=f"policy {p.name}: {ip_id} and its fallback unusable: defaults.unavailable")


def policy_applies(p: Policy, w: Workload, fam: int, dst: str, port: Optional[int],
                   proto: Optional[str]) -> bool:
    if not policy_matches(p, w):
        return False
    m = p.match
    fam_dsts = [d for d in m.destinations if ipaddress.ip_network(d).version == fam]
    if m.destinations and not fam_dsts:
        return False
    if fam_dsts and not any(ipaddress.ip_address(dst) in ipaddress.ip_network(d) for d in fam_dsts):
        return False
    protos = _policy_protocols(p)
    if protos is not None and proto not in protos:
        return False
    if m.ports:
        if port is None or not any(lo <= port <= hi for lo, hi in map(port_bounds, m.ports)):
            return False
    return True


def _policy_protocols(p: Policy) -> Optional[list[str]]:
    m = p.match
    protos = list(m.protocols) or None
    if m.ports:
        protos = [x for x in (protos or ["tcp", "udp"]) if x in ("tcp", "udp")]
    return protos


# --- explain ---------------------------------------------------------------------

@dataclass(frozen=True)
class Explanation:
    workload: Optional[str]
    policy: Optional[str]
    action: str
    source_address: Optional[str]
    ports: Optional[tuple[int, int]]
    route_table: Optional[int]
    reason: str
    egress_ip: Optional[str] = None

    def to_json(self) -> dict:
        return {"workload": self.workload, "policy": self.policy, "action": self.action,
                "egress_ip": self.egress_ip, "source_address": self.source_address,
                "ports": list(self.ports) if self.ports else None,
                "route_table": self.route_table, "reason": self.reason}


def find_workload(cfg: Config, src: str, iface: Optional[str] = None) -> tuple[Optional[Workload], str]:
    """Which workload a source (address or cgroup path) belongs to, and why not."""
    try:
        addr = str(ipaddress.ip_address(src))
    except ValueError:
        path = src.strip("/")
        best = None
        for w in cfg.workloads:
            if w.cgroup and (path == w.cgroup or path.startswith(w.cgroup + "/")):
                if best is None or w.cgroup.count("/") > best.cgroup.count("/"):
                    best = w
        return best, "" if best else f"no workload has cgroup {path} or a parent of it"
    if iface != "lo":
        for ip in cfg.egress_ips:
            if any(ipaddress.ip_address(addr) in ipaddress.ip_network(x) for x in (ip.ipv4, ip.ipv6) if x):
                return None, (f"{addr} is an address of egress IP {ip.id}: only the agent's SNAT "
                              "sends with it; as a packet's source it is a forgery: drop")
    for w in cfg.workloads:
        if addr in w.source:
            if w.interface and iface and iface != w.interface:
                return None, f"{addr} belongs to {w.id} but arrived on {iface}, not {w.interface}: drop"
            return w, ""
    for net in cfg.managed_sources:
        if ipaddress.ip_address(addr) in ipaddress.ip_network(net):
            return None, f"unknown source in managed network {net}: drop"
    return None, "not a workload: the agent leaves this traffic alone"


def explain(cfg: Config, alloc: Allocations, src: str, dst: str, port: Optional[int] = None,
            proto: Optional[str] = None, iface: Optional[str] = None,
            usable: Usable = Usable()) -> Explanation:
    w, why = find_workload(cfg, src, iface)
    if w is None:
        action = DROP if why.endswith("drop") else "none"
        return Explanation(None, None, action, None, None, None, why)
    fam = ipaddress.ip_address(dst).version
    ex = cfg.exclude
    if ex.dns and port == 53 and proto in ("tcp", "udp"):
        return _host_default(w, "excluded: DNS")
    if ex.icmp and proto == "icmp":
        return _host_default(w, "excluded: ICMP")
    for net in ex.destinations:
        if ipaddress.ip_address(dst) in ipaddress.ip_network(net):
            return _host_default(w, f"excluded destination {net}")
    for net in cfg.managed_sources:
        if ipaddress.ip_address(dst) in ipaddress.ip_network(net):
            return _host_default(w, f"east-west: destination in managed network {net}")
    policy = None
    choice = None
    for p in cfg.policies:
        c = policy_choice(cfg, p, fam, usable)
        if c is not None and policy_applies(p, w, fam, dst, port, proto):
            policy, choice = p.name, c
            break
    if choice is None:
        choice = assignment(cfg, alloc, w, fam, usable)
    if choice.action != "snat":
        return Explanation(w.id, policy, choice.action, None, None, None, choice.reason)
    lease = alloc.lease(w.id, choice.ip)
    ip = cfg.ip(choice.ip)
    table = names.route_table(alloc.eids[ip.id]) if ip.via else None
    if fam == 4:
        ports = lease.ports if proto in ("tcp", "udp", None) else None
        return Explanation(w.id, policy, "snat", lease.ipv4, ports, table, choice.reason, ip.id)
    return Explanation(w.id, policy, "snat", lease.ipv6, None, table, choice.reason, ip.id)


def _host_default(w: Workload, reason: str) -> Explanation:
    return Explanation(w.id, None, DEFAULT, None, None, None, reason)


# --- desired kernel objects --------------------------------------------------------

def egress_prefixes(cfg: Config) -> list[str]:
    """Every configured egress address and IPv6 range, of any region, present or
    not: no workload may send with one unless the agent's SNAT writes it."""
    return [x for ip in cfg.egress_ips for x in (ip.ipv4, ip.ipv6) if x]


def _collapse(prefixes: list[str], fam: int) -> frozenset[Element]:
    return _collapsed(tuple(prefixes), fam)


@functools.lru_cache(maxsize=64)  # the same prefixes every sync: ipaddress is slow
def _collapsed(prefixes: tuple[str, ...], fam: int) -> frozenset[Element]:
    nets = [ipaddress.ip_network(p) for p in prefixes if ipaddress.ip_network(p).version == fam]
    out = set()
    for n in ipaddress.collapse_addresses(nets):
        # nft lists a one-address interval as the bare address
        out.add((str(n.network_address) if n.num_addresses == 1 else str(n), None))
    return frozenset(out)


def _mark_for(alloc: Allocations, wid: int, c: Choice) -> int:
    if c.action == "snat":
        return names.lease_mark(wid, alloc.eids[c.ip])
    if c.action == DROP:
        return names.DROP_FLAG | wid
    return wid


# One element of the plan: (set or map name, element).
Placed = tuple[str, Element]


def build(cfg: Config, alloc: Allocations, facts: HostFacts = HostFacts()) -> Plan:
    """The desired kernel objects for this config and these allocations: the shared
    part and every workload's elements (the index of an incremental sync is the same
    pieces, kept per workload: docs/design.md, "Incremental syncs")."""
    notes: list[str] = []
    shared = build_shared(cfg, alloc, facts)
    el: dict[str, set[Element]] = {n: set(v) for n, v in shared.elements.items()}
    held = leases_by_workload(alloc)
    missing = set()
    for w in cfg.workloads:
        placed, note = workload_elements(cfg, alloc, w, held.get(w.id, ()), facts)
        for name, e in placed:
            el[name].add(e)
        if note:
            notes.append(note)
            missing.add(w.id)
    desired = Desired({k: frozenset(v) for k, v in el.items()}, shared.chains,
                      shared.routes, shared.rules)
    return Plan(desired, alloc, notes, facts.usable, missing, shared)


def leases_by_workload(alloc: Allocations) -> dict[str, list]:
    out: dict[str, list] = {}
    for lease in alloc.leases.values():
        out.setdefault(lease.workload, []).append(lease)
    return out


def workload_elements(cfg: Config, alloc: Allocations, w: Workload, leases,
                      facts: HostFacts) -> tuple[list[Placed], Optional[str]]:
    """What one workload puts in the kernel (its sources, cgroup, assignment, the
    SNAT of each of its `leases`, its policy sets), and a note when its cgroup is
    missing. Nothing here depends on another workload."""
    out: list[Placed] = []
    note = None
    wid = alloc.wids[w.id]
    for src in w.source:
        fam = 6 if ":" in src else 4
        if w.interface:
            out.append((names.SOURCE_IF_MAP[fam], ((src, w.interface), wid)))
            out.append((names.BOUND_SET[fam], (src, None)))
        else:
            out.append((names.SOURCE_MAP[fam], (src, wid)))
    if w.cgroup:
        if facts.cgroups is not None and w.cgroup not in facts.cgroups:
            note = (f"workload {w.id}: cgroup {w.cgroup} does not exist yet; "
                    "it is added when it appears")
        else:
            out.append((names.cgroup_map(w.cgroup.count("/") + 1), (w.cgroup, wid)))
    for fam in (4, 6):
        mark = _mark_for(alloc, wid, assignment(cfg, alloc, w, fam, facts.usable))
        # No element for "the mark stays the wid" (no egress IP, unavailable: default):
        # a lookup that misses ends the rule, and chain decide goes to commit with
        # the mark unchanged, as the element would. An IPv4-only host saves 100k
        # assign6 elements at 100k workloads (a fifth of a full sync's batch).
        if mark != wid:
            out.append((names.ASSIGN_MAP[fam], (wid, mark)))
    for lease in leases:
        mark = names.lease_mark(wid, alloc.eids[lease.ip])
        if lease.ipv4:
            out.append((names.SNAT4_ADDR_MAP, (mark, lease.ipv4)))
            if lease.ports:
                out.append((names.SNAT4_PORTS_MAP, (mark, (lease.ipv4, lease.ports))))
        if lease.ipv6:
            out.append((names.SNAT6_MAP, (mark, lease.ipv6)))
    for i, p in enumerate(cfg.policies):
        if (p.match.workloads or p.match.apps) and policy_matches(p, w):
            out.append((names.policy_set(i), (wid, None)))
    return out, note


def build_shared(cfg: Config, alloc: Allocations, facts: HostFacts) -> Desired:
    """The part of the plan no single workload owns: the address sets, the policy
    sets' declarations (empty here), the generated chains, routes and ip rules."""
    from .nft.text import limit_rules, policy_rules  # nft.text owns nft syntax

    el: dict[str, set[Element]] = {n: set() for n in _ALL_SETS}
    for fam in (4, 6):
        el[names.MANAGED_SET[fam]] |= _collapse(cfg.managed_sources, fam)
        el[names.EGRESS_SET[fam]] |= _collapse(egress_prefixes(cfg), fam)
        el[names.EXCLUDE_SET[fam]] |= _collapse(cfg.exclude.destinations, fam)
        if cfg.host.role == "gateway":
            el[names.GATEWAY_SET[fam]] |= _collapse(
                [a for ip in cfg.ips_here() for a in (ip.ipv4, ip.ipv6) if a], fam)
    el[names.UNTRANSLATED_SET] = {(alloc.eids[ip.id] << names.EID_SHIFT, None)
                                  for ip in cfg.ips_here() if ip.remote}
    if cfg.exclude.dns:
        el[names.EXCLUDE_SERVICES_SET] |= {(("tcp", 53), None), (("udp", 53), None)}
    if cfg.exclude.icmp:
        el[names.EXCLUDE_PROTOCOLS_SET] |= {("icmp", None), ("ipv6-icmp", None)}

    rules_text: list[str] = []
    for i, p in enumerate(cfg.policies):
        set_name = None
        if p.match.workloads or p.match.apps:
            set_name = names.policy_set(i)
            el[set_name] = set()
        choices = {fam: policy_choice(cfg, p, fam, facts.usable) for fam in (4, 6)}
        rules_text += policy_rules(p, set_name, {f: _choice_mark_or(alloc, c) for f, c in choices.items()})

    routes: set[Route] = set()
    rules: set[Rule] = guard_rules(cfg.managed_sources, facts.addresses)
    for ip in cfg.ips_here():
        if ip.via is None:
            continue
        eid = alloc.eids[ip.id]
        table = names.route_table(eid)
        fwmark, mask = names.rule_fwmark(eid)
        if ip.ipv4:
            routes.add(Route(4, table, ip.via.dev, ip.via.gateway))
            rules.add(Rule(4, names.rule_priority(eid), fwmark, mask, table))
        if ip.ipv6:
            routes.add(Route(6, table, ip.via.dev, ip.via.gateway6))
            rules.add(Rule(6, names.rule_priority(eid), fwmark, mask, table))

    chains = {names.POLICY_CHAIN: tuple(rules_text),
              names.LIMIT_CHAIN: limit_rules(cfg.defaults.ports_per_workload)}
    return Desired({k: frozenset(v) for k, v in el.items()}, chains,
                   frozenset(routes), frozenset(rules))


def guard_rules(managed, host_addresses) -> set[Rule]:
    """The guard (names.py): one prohibit rule per managed_sources prefix; for each
    host address inside one, a goto past it (the host's own packets are routed
    before any hook can mark them); and the nop the gotos land on."""
    return set(_guard_rules(tuple(managed), frozenset(host_addresses)))


@functools.lru_cache(maxsize=8)  # the same every sync but a failover's: hundreds of addresses
def _guard_rules(managed: tuple, host_addresses: frozenset[str]) -> frozenset[Rule]:
    nets = [ipaddress.ip_network(str(n), strict=False) for n in managed]
    rules = {Rule(n.version, names.GUARD_PRIORITY, 0, names.SEEN_FLAG, 0, n.with_prefixlen,
                  "prohibit") for n in nets}
    for a in map(ipaddress.ip_address, host_addresses):
        if any(a.version == n.version and a in n for n in nets):
            rules.add(Rule(a.version, names.EXEMPT_PRIORITY, 0, 0, 0,
                           ipaddress.ip_network(a).with_prefixlen, "goto", names.ANCHOR_PRIORITY))
    for family in {n.version for n in nets}:
        rules.add(Rule(family, names.ANCHOR_PRIORITY, 0, 0, 0, "", "nop"))
    return frozenset(rules)


def _choice_mark_or(alloc: Allocations, c: Optional[Choice]) -> Union[None, str, int]:
    """What a policy rule does for one family: None (no rule), 'default', 'drop' or an eid."""
    if c is None:
        return None
    return alloc.eids[c.ip] if c.action == "snat" else c.action


_ALL_SETS = (
    list(names.SOURCE_MAP.values()) + list(names.SOURCE_IF_MAP.values())
    + list(names.BOUND_SET.values()) + list(names.MANAGED_SET.values())
    + list(names.EGRESS_SET.values()) + list(names.GATEWAY_SET.values())
    + list(names.EXCLUDE_SET.values()) + list(names.ASSIGN_MAP.values())
    + [names.cgroup_map(l) for l in names.CGROUP_LEVELS]
    + [names.SNAT4_PORTS_MAP, names.SNAT4_ADDR_MAP, names.SNAT6_MAP,
       names.EXCLUDE_SERVICES_SET, names.EXCLUDE_PROTOCOLS_SET, names.UNTRANSLATED_SET]
)
