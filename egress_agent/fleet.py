"""One fleet file -> every host's files (issue 13, docs/gateway.md "The fleet file").

The fleet file names the gateway pairs (their fabric, VRRP id, the two gateway
hosts), the workload hosts (their fabric address and tunnel id), the app IPs
(each on one pair) and the workloads (each on one workload host). `render`
turns it into, per host:

- a workload host: `config.yaml` (its workloads; each app IP `remote: true`,
  `via:` the tunnel to the IP's pair) and `tunnels.sh` (one VXLAN to each pair of
  its region: the host's network set-up, which the agent does not do itself);
- a gateway host: `config.yaml` (`role: gateway`; every remote workload of its
  pair's IPs bound to its host's tunnel, with the fleet's `blocks:`),
  `keepalived.conf`, `conntrackd.conf`, `notify` (keepalived's notify script) and
  `tunnels.sh` (a VXLAN per workload host, the same MAC on both gateways).

Blocks are allocated once for the fleet, per pair, by the agent's own allocator
over the pair's gateway config: the state (allocations and history, so `who
--state-dir STATE/PAIR` answers for the fleet) lives in the fleet's state dir,
and a render keeps every block that still fits, whatever else changed. Both
gateways of a pair get the same blocks, written into their configs.

A workload removed from the fleet frees its block at the next render: unlike a
host, the fleet cannot see the connections still open on it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError

from .alloc import Allocations, CapacityError, allocate
from .config import (
    ConfigError, Defaults, HostAddress, Id, IfName, IPv4, IPv6Range, Limits, Policy, PortRange,
    Prefix, Problem, policy_ips, policy_matches,
    _Model, _problem, _problem_from_pydantic, _read_yaml, _read_file, parse,
)
from .gateway import notify_script
from .pair import Member, Pair, conntrackd_conf, keepalived_conf

VXLAN_PORT = 4789
_FORWARDING = ("sysctl -qw net.ipv4.ip_forward=1", "sysctl -qw net.ipv6.conf.all.forwarding=1")
# the tunnels' link-local addresses: fixed, as their MACs are (no generated ones, whose
# traffic from a standby would reach the workload host)
_LINK_LOCAL = {"pair": "fe80::1/64", "host": "fe80::2/64"}


class FleetGateway(_Model):
    host: str = Field(description="the gateway host's name")
    fabric_dev: IfName = Field(description="its interface on the fabric")
    fabric_addr: IPv4 = Field(description="its own address on the fabric")
    priority: int = Field(ge=1, le=254, description="VRRP priority: the higher is active first")
    uplink: IfName = Field(description="where the pair's app IPs live (keepalived adds them)")


class FleetPair(_Model):
    id: Id
    region: Id
    vrid: int = Field(ge=1, le=255, description="VRRP virtual router id, unique on the fabric")
    fabric: Prefix = Field(description="the fabric network: VRRP, conntrackd, tunnels")
    vip: IPv4 = Field(description="the pair's fabric address: every tunnel ends there")
    tunnels: Prefix = Field(description="a /30 per workload host (by its vni): .1 the host, "
                                        ".2 the pair")
    tunnels6: Optional[Prefix] = Field(None, description="IPv6 in the tunnels, a /126 per "
                                                         "workload host (by its vni): needed "
                                                         "when an IP of the pair has ipv6")
    vip6: Optional[str] = Field(None, description="ADDRESS/PREFIX the pair holds on its "
                                                  "uplink, where the IPv6 ranges are routed")
    gateways: list[FleetGateway] = Field(min_length=2, max_length=2)


class FleetHost(_Model):
    name: str
    region: Id
    fabric_dev: IfName
    fabric_addr: IPv4
    vni: int = Field(ge=1, le=16777215, description="its tunnels' VXLAN id, unique in the fleet")


class FleetIP(_Model):
    id: Id
    app: Id
    ipv4: IPv4
    ipv6: Optional[IPv6Range] = Field(None, description="each workload gets its own address in "
                                                       "it (the one its block fixes)")
    pair: Id = Field(description="the gateway pair that holds it")
    ports: Optional[PortRange] = None
    limits: Limits = Limits()


class FleetWorkload(_Model):
    id: Id
    app: Id
    host: str = Field(description="the workload host it runs on")
    source: list[HostAddress] = Field(min_length=1)
    interface: Optional[IfName] = Field(None, description="its interface on its host")


class Fleet(_Model):
    version: Literal[1]
    state_dir: str = Field("/var/lib/egress-agent", description="each host's state_dir")
    defaults: Defaults = Defaults()
    pairs: list[FleetPair] = Field(default_factory=list)
    hosts: list[FleetHost] = Field(default_factory=list)
    egress_ips: list[FleetIP] = Field(default_factory=list)
    workloads: list[FleetWorkload] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list, description="as in a host's config; "
                                   "each host gets those that can match its workloads")


@dataclass(frozen=True)
class Layout:
    """Where things live on the hosts ({host} is the host's name): a real fleet's
    defaults, or a lab's directories."""

    state_dir: Optional[str] = None  # None: the fleet's state_dir
    notify: str = "/etc/keepalived/egress-agent-notify"
    conntrackd_conf: str = "/etc/conntrackd/conntrackd.conf"
    conntrackd_run: str = "/run/conntrackd"

    def of(self, what: str, host: str, f: "Fleet") -> str:
        value = getattr(self, what)
        return (f.state_dir if value is None else value).format(host=host)


@dataclass
class Rendered:
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> name -> text
    allocations: dict[str, Allocations] = field(default_factory=dict)  # pair -> its blocks
    events: dict[str, list] = field(default_factory=dict)  # pair -> what its allocation changed


def load(path: str) -> tuple[Fleet, dict]:
    """The fleet file, validated; ConfigError with FILE:LINE problems."""
    text = _read_file(path)
    data, lines = _read_yaml(text, path)
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as e:
        raise ConfigError(sorted((_problem_from_pydantic(err, path, lines) for err in e.errors()),
                                 key=lambda p: (p.line, p.column))) from None
    problems = [_problem(where, msg, lines, path) for where, msg in _references(fleet)]
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.line, p.column)))
    return fleet, lines


def _references(f: Fleet) -> list[tuple[tuple, str]]:
    """What names nothing, or twice: (path, message)."""
    out: list[tuple[tuple, str]] = []
    pairs = {p.id: p for p in f.pairs}
    hosts = {h.name: h for h in f.hosts}
    gateways = {g.host for p in f.pairs for g in p.gateways}
    for kind, items, key in (("pairs", f.pairs, "id"), ("hosts", f.hosts, "name"),
                             ("egress_ips", f.egress_ips, "id"), ("workloads", f.workloads, "id")):
        seen: set = set()
        for i, x in enumerate(items):
            if getattr(x, key) in seen:
                out.append(((kind, i, key), f"{getattr(x, key)!r} is named twice"))
            seen.add(getattr(x, key))
    vnis: dict[int, str] = {}
    for i, h in enumerate(f.hosts):
        if h.vni in vnis:
            out.append((("hosts", i, "vni"), f"vni {h.vni} is {vnis[h.vni]}'s already"))
        vnis.setdefault(h.vni, h.name)
        if h.name in gateways:
            out.append((("hosts", i, "name"), f"{h.name!r} is a gateway host of a pair"))
    for i, p in enumerate(f.pairs):
        if len(p.id) > 12:  # the workload host's tunnel is `t-ID`, an interface name
            out.append((("pairs", i, "id"), "at most 12 characters: it names the tunnel t-ID"))
        net = ipaddress.ip_network(p.tunnels)
        for h in f.hosts:
            if h.region == p.region and (h.vni + 1) * 4 > net.num_addresses:
                out.append((("pairs", i, "tunnels"),
                            f"{p.tunnels} has no /30 for vni {h.vni} (host {h.name})"))
    apps = set()
    for i, ip in enumerate(f.egress_ips):
        apps.add(ip.app)
        if ip.pair not in pairs:
            out.append((("egress_ips", i, "pair"), f"no pair {ip.pair!r} under pairs:"))
        elif ip.ipv6 and not (pairs[ip.pair].tunnels6 and pairs[ip.pair].vip6):
            out.append((("egress_ips", i, "ipv6"), f"pair {ip.pair!r} needs tunnels6: and vip6: "
                        "to carry IPv6"))
    ip_ids, workload_ids = {ip.id for ip in f.egress_ips}, {w.id for w in f.workloads}
    for i, pol in enumerate(f.policies):
        for ip_id in policy_ips(pol, None):
            if ip_id not in ip_ids:
                out.append((("policies", i, "egress"), f"no egress IP {ip_id!r} under egress_ips:"))
        for j, w in enumerate(pol.match.workloads):
            if w not in workload_ids:
                out.append((("policies", i, "match", "workloads", j), f"no workload {w!r}"))
    for i, w in enumerate(f.workloads):
        if w.host not in hosts:
            out.append((("workloads", i, "host"), f"no workload host {w.host!r} under hosts:"))
        if w.app not in apps:
            out.append((("workloads", i, "app"), f"no egress IP serves app {w.app!r}"))
    return out


def _tunnel_addrs(p: FleetPair, h: FleetHost, family: int = 4) -> tuple[str, str]:
    """(the host's, the pair's) address in the host's tunnel: the vni-th /30 (/126)."""
    net = p.tunnels if family == 4 else p.tunnels6
    base = ipaddress.ip_network(net).network_address + 4 * h.vni
    return str(base + 1), str(base + 2)


def _v6(p: FleetPair, f: "Fleet") -> bool:
    return any(ip.ipv6 for ip in f.egress_ips if ip.pair == p.id)


def _mac(vni: int) -> str:
    """The pair's MAC on a host's tunnel: the same on both gateways, so the workload
    host's neighbour entry stays right across a failover."""
    return "02:ea:%02x:%02x:%02x:01" % ((vni >> 16) & 0xFF, (vni >> 8) & 0xFF, vni & 0xFF)


def _dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def _policies_for(f: Fleet, ws: list[FleetWorkload], ip_ids: set[str]) -> list[dict]:
    """The fleet's policies as one host takes them: those that can match one of `ws`
    and name no egress IP but `ip_ids`, their workload and app lists cut to `ws`'s
    (a host's config names only its own)."""
    ids, apps = {w.id for w in ws}, {w.app for w in ws}
    out = []
    for pol in f.policies:
        if not any(policy_matches(pol, w) for w in ws) or not set(policy_ips(pol, None)) <= ip_ids:
            continue
        d = pol.model_dump(exclude_defaults=True)
        if pol.match.workloads or pol.match.apps:
            d["match"]["workloads"] = [w for w in pol.match.workloads if w in ids]
            d["match"]["apps"] = [a for a in pol.match.apps if a in apps]
            d["match"] = {k: v for k, v in d["match"].items() if v}
        out.append(d)
    return out


def _policies(pols: list[dict]) -> dict:
    return {"policies": pols} if pols else {}


def _ip_doc(ip: FleetIP) -> dict:
    return {"id": ip.id, "app": ip.app, "ipv4": ip.ipv4, **({"ipv6": ip.ipv6} if ip.ipv6 else {})}


def _gateway_doc(f: Fleet, p: FleetPair, host: str, blocks: dict[str, dict[str, str]],
                 state_dir: str) -> dict:
    ips = [ip for ip in f.egress_ips if ip.pair == p.id]
    apps, ids = {ip.app for ip in ips}, {ip.id for ip in ips}
    hosts = {h.name: h for h in f.hosts}
    # its IPs' apps' workloads, and those a policy sends to one of its IPs
    sent = [pol for pol in f.policies if set(policy_ips(pol, None)) & ids]
    ws = [w for w in f.workloads if hosts[w.host].region == p.region
          and (w.app in apps or any(policy_matches(pol, w) for pol in sent))]
    return {
        "version": 1,
        "host": {"name": host, "region": p.region, "role": "gateway"},
        "state_dir": state_dir,
        "defaults": f.defaults.model_dump(exclude_defaults=True),
        "egress_ips": [{**_ip_doc(ip),
                        **({"ports": ip.ports} if ip.ports else {}),
                        **({"limits": ip.limits.model_dump(exclude_none=True)}
                           if ip.limits != Limits() else {})} for ip in ips],
        "workloads": [{"id": w.id, "app": w.app, "source": list(w.source),
                       "interface": f"t{hosts[w.host].vni}",
                       **({"blocks": blocks[w.id]} if blocks.get(w.id) else {})} for w in ws],
        "managed_sources": sorted({_host_prefix(s) for w in ws for s in w.source}),
    } | _policies(_policies_for(f, ws, ids))


def _host_prefix(addr: str) -> str:
    return str(ipaddress.ip_network(addr))


def allocate_pair(f: Fleet, p: FleetPair, prev: Allocations) -> tuple[Allocations, list]:
    """The pair's blocks: the agent's allocation over its gateway config (without
    `blocks:`), keeping `prev` where it fits."""
    cfg = parse(_dump(_gateway_doc(f, p, p.gateways[0].host, {}, f.state_dir)),
                f"<pair {p.id}>").config
    a, events = allocate(cfg, prev)
    a.lingering.clear()  # the fleet cannot see connections: a freed block is free
    return a, [e for e in events if e.kind != "linger"]


def render(f: Fleet, prev: dict[str, Allocations], layout: Layout = Layout()) -> Rendered:
    """Every host's files. CapacityError when a pair's IPs cannot hold its workloads."""
    out = Rendered()
    # workload -> IP -> its block, fleet-wide: in the gateways' configs and in its own
    # host's (whose allocation, status and `who` then tell the same blocks, and whose
    # app choice is the one the gateways translate to)
    blocks: dict[str, dict[str, str]] = {}
    for p in f.pairs:
        a, out.events[p.id] = allocate_pair(f, p, prev.get(p.id, Allocations()))
        out.allocations[p.id] = a
        for (w, ip), lease in a.leases.items():
            if lease.ports:
                blocks.setdefault(w, {})[ip] = "%d-%d" % lease.ports
        pair = Pair(p.id, p.vrid, p.fabric,
                    tuple(Member(g.host, g.fabric_dev, g.fabric_addr, g.priority)  # type: ignore
                          for g in p.gateways),
                    ((f"{p.vip}/{ipaddress.ip_network(p.fabric).prefixlen}",
                      p.gateways[0].fabric_dev),
                     *((f"{ip.ipv4}/32", p.gateways[0].uplink) for ip in f.egress_ips
                       if ip.pair == p.id),
                     *([(p.vip6, p.gateways[0].uplink)] if p.vip6 and _v6(p, f) else [])),
                    track=(p.gateways[0].uplink,))
        region_hosts = [h for h in f.hosts if h.region == p.region]
        for g in p.gateways:
            # forwarding, and a mid-stream TCP packet before conntrackd's commit is
            # invalid (dropped), not a new connection
            tun = [*_FORWARDING, "sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0"]
            for h in region_hosts:
                host_addr, pair_addr = _tunnel_addrs(p, h)
                dev = f"t{h.vni}"
                tun += [f"ip link show {dev} >/dev/null 2>&1 || ip link add {dev} type vxlan id {h.vni} remote {h.fabric_addr} "
                        f"dstport {VXLAN_PORT} dev {g.fabric_dev} nolearning",
                        f"ip link set {dev} address {_mac(h.vni)} addrgenmode none",
                        f"ip link set {dev} up", f"ip addr replace {pair_addr}/30 dev {dev}"]
                host6 = None
                if _v6(p, f):
                    host6, pair6 = _tunnel_addrs(p, h, 6)
                    # a link-local address of its own (no generated one: addrgenmode none),
                    # without which the kernel sends no neighbour solicitation for a
                    # forwarded packet
                    tun += [f"ip addr replace {pair6}/126 dev {dev} nodad",
                            f"ip addr replace {_LINK_LOCAL['pair']} dev {dev} nodad"]
                tun += [f"ip route replace {_host_prefix(s)} via {host6 if ':' in s else host_addr} "
                        f"dev {dev}" for w in f.workloads if w.host == h.name for s in w.source
                        if ":" not in s or host6]
            state = layout.of("state_dir", g.host, f)
            out.files[g.host] = {
                "config.yaml": _dump(_gateway_doc(f, p, g.host, blocks, state)),
                "keepalived.conf": keepalived_conf(pair, g.host, layout.of("notify", g.host, f)),
                "conntrackd.conf": conntrackd_conf(pair, g.host,
                                                   layout.of("conntrackd_run", g.host, f)),
                "notify": notify_script(state, layout.of("conntrackd_conf", g.host, f)),
                "tunnels.sh": _script(tun),
            }
    for h in f.hosts:
        mine = [w for w in f.workloads if w.host == h.name]
        # the IPs of its workloads' apps, and those a policy may send one of them to
        wanted = {ip.id for ip in f.egress_ips if ip.app in {w.app for w in mine}} | {
            x for pol in f.policies if any(policy_matches(pol, w) for w in mine)
            for x in policy_ips(pol, None)}
        pairs = [p for p in f.pairs if p.region == h.region]
        ips, tun = [], list(_FORWARDING)
        for p in pairs:
            host_addr, pair_addr = _tunnel_addrs(p, h)
            dev = f"t-{p.id}"
            tun += [f"ip link show {dev} >/dev/null 2>&1 || ip link add {dev} type vxlan id {h.vni} local {h.fabric_addr} remote {p.vip} "
                    f"dstport {VXLAN_PORT} dev {h.fabric_dev} nolearning",
                    f"ip link set {dev} addrgenmode none", f"ip link set {dev} up",
                    f"ip addr replace {host_addr}/30 dev {dev}"]
            via: dict = {"dev": dev, "gateway": pair_addr}
            if _v6(p, f):
                host6, pair6 = _tunnel_addrs(p, h, 6)
                tun += [f"ip addr replace {host6}/126 dev {dev} nodad",
                        f"ip addr replace {_LINK_LOCAL['host']} dev {dev} nodad"]
                via["gateway6"] = pair6
            ips += [{**_ip_doc(ip), "remote": True,
                     "via": {k: v for k, v in via.items() if k != "gateway6" or ip.ipv6}}
                    for ip in f.egress_ips if ip.pair == p.id and ip.id in wanted]
        doc = {"version": 1, "host": {"name": h.name, "region": h.region},
               "state_dir": layout.of("state_dir", h.name, f),
               "defaults": f.defaults.model_dump(exclude_defaults=True),
               "egress_ips": ips,
               "workloads": [{"id": w.id, "app": w.app, "source": list(w.source),
                              **({"interface": w.interface} if w.interface else {}),
                              **({"blocks": blocks[w.id]} if blocks.get(w.id) else {})}
                             for w in mine],
               "managed_sources": sorted({_host_prefix(s) for w in mine for s in w.source}),
               } | _policies(_policies_for(f, mine, {ip["id"] for ip in ips}))
        out.files[h.name] = {"config.yaml": _dump(doc), "tunnels.sh": _script(tun)}
    return out


def _script(lines: list[str]) -> str:
    """The host's set-up as a script that may run again (at boot, after a render):
    what exists is kept, addresses and routes are replaced, not added twice."""
    return "#!/bin/sh\n# the host's tunnels for egress-agent (egress-agent fleet render)\nset -e\n" \
        + "".join(f"{x}\n" for x in lines)


def capacity_problem(e: CapacityError, f: Fleet, lines: dict, file: str) -> Problem:
    i = next((i for i, w in enumerate(f.workloads) if w.id == e.workload), None)
    return _problem(("workloads", i) if i is not None else (), f"capacity: {e}", lines, file)


def run(path: str, state: str, out_dir: Optional[str], layout: Layout = Layout()) -> dict:
    """`egress-agent fleet check|render`: load, allocate against the fleet's state,
    and with `out_dir` write every host's files and the state. ConfigError with
    FILE:LINE problems (capacity too)."""
    from .store import Store
    f, lines = load(path)
    stores = {p.id: Store(os.path.join(state, p.id)) for p in f.pairs}
    prev = {pid: s.load() for pid, s in stores.items()}
    try:
        r = render(f, prev, layout)
    except CapacityError as e:
        raise ConfigError([capacity_problem(e, f, lines, path)]) from None
    changes = {}
    for p in f.pairs:
        events = r.events[p.id]
        changes[p.id] = [f"{e.kind} {e.lease.workload} {e.lease.ip} "
                         + ("%d-%d" % e.lease.ports if e.lease.ports else "") for e in events]
        if out_dir is not None:
            stores[p.id].save(r.allocations[p.id], events)
    written = write(r, out_dir) if out_dir is not None else []
    return {"hosts": sorted(r.files), "written": written, "changes": changes,
            "blocks": {pid: {f"{w} {ip}": "%d-%d" % lease.ports
                             for (w, ip), lease in sorted(a.leases.items()) if lease.ports}
                       for pid, a in r.allocations.items()}}


def write(r: Rendered, out_dir: str) -> list[str]:
    """OUT/HOST/NAME for every file; the paths written."""
    written = []
    for host, files in sorted(r.files.items()):
        os.makedirs(os.path.join(out_dir, host), exist_ok=True)
        for name, text in files.items():
            path = os.path.join(out_dir, host, name)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.chmod(tmp, 0o755 if name in ("notify", "tunnels.sh") else 0o644)
            os.replace(tmp, path)
            written.append(path)
    return written
