"""nft text: the skeleton, how each element and policy rule is written.

Pure. The agent writes nft text, not nft JSON: its errors point at line and
column, and nft 1.0.6's JSON API cannot declare `ipv4_addr . inet_service`
values. `KINDS` says how each atom of each set's keys and values is written
here and read back by `nft.listing`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from importlib import resources
from typing import Any, Optional, Union

from .. import names, shape
from ..config import Policy, port_bounds
from ..model import Element

# --- skeleton ----------------------------------------------------------------------


def skeleton_source() -> str:
    return resources.files("egress_agent").joinpath("rules/skeleton.nft").read_text()


def skeleton_digest(src: Optional[str] = None) -> str:
    src = src or skeleton_source()
    return "egress-agent skeleton " + hashlib.sha256(src.encode()).hexdigest()[:12]


def skeleton_text() -> str:
    src = skeleton_source()
    return src.replace("@SKELETON@", skeleton_digest(src))


@functools.lru_cache(maxsize=1)
def skeleton_shape() -> shape.Shape:
    """What the kernel lists of the skeleton's chains, rules and sets (shape.py)."""
    return shape.from_source(skeleton_source())


# --- element kinds -------------------------------------------------------------------

# How each atom of a key or value is written and read: addr, prefix, ifname,
# cgroup, mark, proto, port, ports (a range).
_Kinds = tuple[tuple[str, ...], Optional[tuple[str, ...]]]
KINDS: dict[str, _Kinds] = {
    **{n: (("addr",), ("mark",)) for n in names.SOURCE_MAP.values()},
    **{n: (("addr", "ifname"), ("mark",)) for n in names.SOURCE_IF_MAP.values()},
    **{n: (("addr",), None) for n in names.BOUND_SET.values()},
    **{n: (("prefix",), None) for n in names.MANAGED_SET.values()},
    **{n: (("prefix",), None) for n in names.EGRESS_SET.values()},
    **{n: (("prefix",), None) for n in names.GATEWAY_SET.values()},
    **{n: (("prefix",), None) for n in names.EXCLUDE_SET.values()},
    names.EXCLUDE_SERVICES_SET: (("proto", "port"), None),
    names.EXCLUDE_PROTOCOLS_SET: (("proto",), None),
    names.UNTRANSLATED_SET: (("mark",), None),
    **{n: (("mark",), ("mark",)) for n in names.ASSIGN_MAP.values()},
    names.SNAT4_PORTS_MAP: (("mark",), ("addr", "ports")),
    names.SNAT4_ADDR_MAP: (("mark",), ("addr",)),
    names.SNAT6_MAP: (("mark",), ("addr",)),
    **{names.cgroup_map(l): (("cgroup",), ("mark",)) for l in names.CGROUP_LEVELS},
}
POLICY_SET_KINDS: _Kinds = (("mark",), None)


def kinds_of(set_name: str) -> _Kinds:
    if names.is_policy_set(set_name):
        return POLICY_SET_KINDS
    return KINDS[set_name]


def _atom(kind: str, v: Any) -> str:
    if kind == "mark":
        return f"0x{v:08x}"
    if kind in ("ifname",):
        return json.dumps(v)
    if kind == "cgroup":
        return json.dumps(v) if isinstance(v, str) else str(v)  # int: a vanished cgroup's id
    if kind == "ports":
        lo, hi = v
        return str(lo) if lo == hi else f"{lo}-{hi}"
    return str(v)


def _part(kinds: tuple[str, ...], v: Any) -> str:
    if len(kinds) == 1:
        return _atom(kinds[0], v)
    return " . ".join(_atom(k, x) for k, x in zip(kinds, v))


def element_text(set_name: str, e: Element, with_value: bool = True) -> str:
    return element_writer(set_name, with_value)(e)


def _mark(v: int) -> str:
    return "0x%08x" % v


def _ports(v: tuple[int, int]) -> str:
    lo, hi = v
    return str(lo) if lo == hi else f"{lo}-{hi}"


# the kinds whose atoms one function writes, as _atom does (a full sync writes
# 500k elements at 100k workloads: one call per atom, not a lookup chain)
_ATOM_WRITERS = {"mark": _mark, "ports": _ports, "addr": str, "prefix": str, "proto": str,
                 "port": str, "ifname": json.dumps}


# single atoms that %-formatting writes as _atom does
_FORMATS = {"mark": "0x%08x", "addr": "%s", "prefix": "%s", "proto": "%s", "port": "%s"}


def _part_writer(kinds: tuple[str, ...]):
    fns = [_ATOM_WRITERS.get(k) or functools.partial(_atom, k) for k in kinds]
    if len(fns) == 1:
        return fns[0]
    if len(fns) == 2:
        a, b = fns
        return lambda v: f"{a(v[0])} . {b(v[1])}"
    return lambda v: " . ".join(f(x) for f, x in zip(fns, v))


@functools.lru_cache(maxsize=None)
def element_writer(set_name: str, with_value: bool = True):
    """The function that writes an element of `set_name` as element_text does."""
    kk, vk = kinds_of(set_name)
    if len(kk) == 1 and kk[0] in _FORMATS and (not with_value or vk is None or (
            len(vk) == 1 and vk[0] in _FORMATS)):
        if vk is None or not with_value:
            fmt = _FORMATS[kk[0]]
            return lambda e: fmt % (e[0],)
        fmt = f"{_FORMATS[kk[0]]} : {_FORMATS[vk[0]]}"
        return fmt.__mod__  # the element is the (key, value) tuple: one C call
    key = _part_writer(kk)
    if vk is None or not with_value:
        return lambda e: key(e[0])
    val = _part_writer(vk)
    return lambda e: f"{key(e[0])} : {val(e[1])}"


# --- policy rules ------------------------------------------------------------------

def policy_rules(p: Policy, set_name: Optional[str],
                 actions: dict[int, Union[None, str, int]]) -> list[str]:
    """One rule per family the policy is for. `actions[fam]`: eid, 'default', 'drop' or None.

    The rule comment carries the policy name and a digest of the rule, so the
    adapter can tell from the kernel's listing whether the chain is current.
    """
    m = p.match
    out = []
    for fam in (4, 6):
        act = actions[fam]
        if act is None:
            continue
        dsts = [d for d in m.destinations if ipaddress.ip_network(d).version == fam]
        if m.destinations and not dsts:
            continue
        parts = [f"meta nfproto ipv{fam}"]
        if set_name:
            parts.append(f"meta mark @{set_name}")
        if dsts:
            parts.append(f"{'ip' if fam == 4 else 'ip6'} daddr {{ {', '.join(dsts)} }}")
        protos = list(m.protocols)
        if m.ports:
            protos = [x for x in (protos or ["tcp", "udp"]) if x in ("tcp", "udp")]
        if protos:
            l4 = ["ipv6-icmp" if (x == "icmp" and fam == 6) else x for x in protos]
            parts.append(f"meta l4proto {{ {', '.join(l4)} }}")
        if m.ports:
            ports = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in map(port_bounds, m.ports)]
            parts.append(f"th dport {{ {', '.join(ports)} }}")
        if act == "drop":
            parts.append("counter drop")
        elif act == "default":
            parts.append(f"goto {names.COMMIT_CHAIN}")
        else:
            parts.append(f"meta mark set meta mark | 0x{int(act) << names.EID_SHIFT:08x} "
                         f"goto {names.COMMIT_CHAIN}")
        out.append(_commented(" ".join(parts), f"policy {p.name}"))
    return out


def rule_comment(rule: str) -> str:
    return rule.rsplit(" comment ", 1)[1].strip('"')


def comments(rules: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(rule_comment(r) for r in rules)


def _commented(body: str, label: str) -> str:
    """A rule with a comment naming it and a digest of it, so the kernel's listing
    tells whether the chain is current."""
    return f'{body} comment "{label} {hashlib.sha256(body.encode()).hexdigest()[:8]}"'


def limit_rules(block_size: int) -> tuple[str, ...]:
    """Refuse the connection that would find no free port in its block.

    A workload's connections to one destination ip:port each need a port of its
    block; when the block is full, SNAT would drop the packet silently (UDP) or
    leave TCP in SYN retries. Counting with `ct count` refuses the next one at
    once instead (TCP reset, ICMP admin-prohibited) and counts the refusal per
    lease in @refused_ports. TCP connections in TIME_WAIT are not counted.
    """
    body = (f"meta nfproto ipv4 meta l4proto {{ tcp, udp }} meta mark & 0x{names.EID_MASK:08x} != 0 "
            f"add @{names.FLOWS4_SET} {{ meta mark . ip daddr . meta l4proto . th dport "
            f"ct count over {block_size} }} update @{names.REFUSED_SET} {{ meta mark . meta l4proto }} "
            f"goto {names.REFUSE_CHAIN}")
    return (_commented(body, "limit ports"),)
