"""nft text: the skeleton, elements, policy rules, and one transaction per sync.

Pure. The transaction is written as nft text (its errors point at line and
column; nft 1.0.6's JSON API cannot declare `ipv4_addr . inet_service` values)
and read back as JSON by the nft adapter, normalised by `normalize_element`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Union

from . import names, shape
from .config import Policy, port_bounds
from .model import Desired, Element, Observed

T = f"{names.TABLE_FAMILY} {names.TABLE_NAME}"
CHUNK = 2000  # elements per `add element` statement

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
    "source4": (("addr",), ("mark",)), "source6": (("addr",), ("mark",)),
    "source4_if": (("addr", "ifname"), ("mark",)), "source6_if": (("addr", "ifname"), ("mark",)),
    "bound4": (("addr",), None), "bound6": (("addr",), None),
    "managed4": (("prefix",), None), "managed6": (("prefix",), None),
    "egress4": (("prefix",), None), "egress6": (("prefix",), None),
    "exclude4": (("prefix",), None), "exclude6": (("prefix",), None),
    "exclude_services": (("proto", "port"), None), "exclude_protocols": (("proto",), None),
    "assign4": (("mark",), ("mark",)), "assign6": (("mark",), ("mark",)),
    "snat4": (("mark",), ("addr", "ports")), "snat4_addr": (("mark",), ("addr",)),
    "snat6": (("mark",), ("addr",)),
    **{names.cgroup_map(l): (("cgroup",), ("mark",)) for l in names.CGROUP_LEVELS},
}
POLICY_SET_KINDS: _Kinds = (("mark",), None)


def kinds_of(set_name: str) -> _Kinds:
    if set_name.startswith("policy_"):
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
    kk, vk = kinds_of(set_name)
    key = _part(kk, e[0])
    if vk is None or not with_value:
        return key
    return f"{key} : {_part(vk, e[1])}"


# --- reading the kernel's JSON ------------------------------------------------------

def _norm_atom(kind: str, v: Any) -> Any:
    if isinstance(v, dict) and "elem" in v:  # element with comment/timeout
        v = v["elem"]["val"] if "val" in v["elem"] else v["elem"]
    if kind == "addr":
        return str(ipaddress.ip_address(v))
    if kind == "prefix":
        if isinstance(v, dict) and "prefix" in v:
            return str(ipaddress.ip_network(f'{v["prefix"]["addr"]}/{v["prefix"]["len"]}'))
        if isinstance(v, dict) and "range" in v:
            a, b = (ipaddress.ip_address(x) for x in v["range"])
            nets = list(ipaddress.summarize_address_range(a, b))
            return str(nets[0]) if len(nets) == 1 else f"{a}-{b}"
        return str(ipaddress.ip_address(v))
    if kind == "ports":
        if isinstance(v, dict) and "range" in v:
            return (int(v["range"][0]), int(v["range"][1]))
        return (int(v), int(v))
    if kind == "port":
        return int(v)
    if kind == "mark":
        return int(v)
    if kind == "cgroup":
        return v if isinstance(v, str) else int(v)
    return v


def _norm_part(kinds: tuple[str, ...], v: Any) -> Any:
    if isinstance(v, dict) and "elem" in v:
        v = v["elem"]["val"]
    if len(kinds) == 1:
        return _norm_atom(kinds[0], v)
    return tuple(_norm_atom(k, x) for k, x in zip(kinds, v["concat"]))


def normalize_element(set_name: str, raw: Any) -> Element:
    kk, vk = kinds_of(set_name)
    if vk is None:
        return (_norm_part(kk, raw), None)
    return (_norm_part(kk, raw[0]), _norm_part(vk, raw[1]))


def observed_from_json(doc: dict, routes=frozenset(), rules=frozenset()) -> Observed:
    """Our table, as `nft -j list table inet egress_agent` gives it."""
    table = False
    skeleton = None
    elements: dict[str, frozenset[Element]] = {}
    chains: dict[str, list[str]] = {c: [] for c in names.GENERATED_CHAINS}
    for item in doc.get("nftables", []):
        if "table" in item:
            table = True
        if "set" in item and item["set"]["name"] == "skeleton":
            skeleton = item["set"].get("comment")
        for kind in ("set", "map"):
            if kind in item:
                s = item[kind]
                name = s["name"]
                if name in KINDS or name.startswith("policy_"):
                    elements[name] = frozenset(normalize_element(name, e) for e in s.get("elem", []))
        if "rule" in item and item["rule"]["chain"] in chains:
            chains[item["rule"]["chain"]].append(item["rule"].get("comment", ""))
    return Observed(table, skeleton, elements, {c: tuple(r) for c, r in chains.items()},
                    frozenset(routes), frozenset(rules), shape.from_json(doc) if table else None)


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
            parts.append("goto commit")
        else:
            parts.append(f"meta mark set meta mark | 0x{int(act) << names.EID_SHIFT:08x} goto commit")
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
            f"goto refuse")
    return (_commented(body, "limit ports"),)


# --- the transaction -----------------------------------------------------------------

@dataclass
class Transaction:
    """One nft batch: all of it or none of it. `text` is what `nft -f` would read."""

    lines: list[str] = field(default_factory=list)
    added: int = 0
    removed: int = 0
    full: bool = False
    policies_changed: bool = False
    repaired: list[str] = field(default_factory=list)  # skeleton chains rewritten in place

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + ("\n" if self.lines else "")

    @property
    def empty(self) -> bool:
        return not self.lines


def _chunks(items: list[str]):
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def _set_decl(name: str) -> str:
    return f"add set {T} {name} {{ type mark; }}"


def skeleton_whole(observed: Observed, expected: Optional[shape.Shape] = None) -> bool:
    """Our table exists, holds this skeleton version, and (when it was read from
    the kernel) every skeleton chain, rule and set declaration of it."""
    return (observed.table and observed.skeleton == skeleton_digest()
            and (observed.shape is None or observed.shape == (expected or skeleton_shape())))


def _damaged_chains(observed: Observed, expected: Optional[shape.Shape]):
    """Skeleton chains to rewrite in place, or None (whole, or only a table replace helps)."""
    if not observed.table or observed.skeleton != skeleton_digest() or observed.shape is None:
        return None
    want = expected or skeleton_shape()
    if observed.shape == want:
        return None
    return shape.damaged_chains(want, observed.shape) or None


def transaction(desired: Desired, observed: Observed,
                expected: Optional[shape.Shape] = None) -> Transaction:
    """The batch that turns `observed` into `desired` (empty when equal).

    `expected`: the skeleton's shape as this kernel lists it, when that differs
    from what shape.py reads from the source (another nft version)."""
    tx = Transaction()
    damaged = _damaged_chains(observed, expected)
    if damaged:
        # Only skeleton chains lost rules (flushed, a rule deleted): rewrite them
        # in place in this batch, and keep the table and its elements (a full
        # replace rewrites every element: seconds for 100k workloads).
        src = skeleton_text()
        blocks = shape.chain_blocks(src)
        tx.repaired = [name for name, _ in damaged]
        tx.lines += [f"flush chain {T} {name}" for name, exists in damaged if exists]
        tx.lines += [f"table {T} {{"] + [blocks[name] for name, _ in damaged] + ["}"]
        observed = Observed(True, observed.skeleton, observed.elements, observed.chains,
                            observed.routes, observed.rules, None)
    elif not skeleton_whole(observed, expected):
        # A new, outdated or damaged skeleton: replace the table in one batch.
        # NAT bindings and marks live in conntrack, so open connections survive.
        tx.full = True
        tx.lines += [f"add table {T}", f"delete table {T}", skeleton_text().rstrip()]
        observed = Observed(table=True, skeleton=skeleton_digest())

    changed_chains = [c for c in names.GENERATED_CHAINS
                      if comments(desired.chains.get(c, ())) != observed.chains.get(c, ())]
    tx.policies_changed = bool(changed_chains)
    for chain in changed_chains:
        tx.lines.append(f"flush chain {T} {chain}")

    dynamic_want = {n for n in desired.elements if n.startswith("policy_")}
    dynamic_have = {n for n in observed.elements if n.startswith("policy_")}
    for name in sorted(dynamic_want - dynamic_have):
        tx.lines.append(_set_decl(name))

    adds: list[str] = []
    for name in sorted(set(desired.elements) | set(observed.elements)):
        if name in dynamic_have - dynamic_want:
            continue
        want = desired.elements.get(name, frozenset())
        have = observed.elements.get(name, frozenset())
        kk, vk = kinds_of(name)
        if kk == ("cgroup",) and any(_stale_cgroup(k) for k, _ in have - want):
            # A cgroup that was removed is listed by its id, and nft 1.0.6 cannot
            # delete an element by that id: flush the map and add back what we want.
            tx.lines.append(f"flush map {T} {name}")
            tx.removed += len(have)
            have = frozenset()
        if vk is None:
            gone, new = have - want, want - have
        else:
            want_map = dict(want)
            have_map = dict(have)
            gone = {e for e in have if want_map.get(e[0], _MISSING) != e[1]}
            new = {e for e in want if have_map.get(e[0], _MISSING) != e[1]}
        if gone:
            tx.removed += len(gone)
            for chunk in _chunks(sorted(element_text(name, e, with_value=False) for e in gone)):
                tx.lines.append(f"delete element {T} {name} {{ {', '.join(chunk)} }}")
        if new:
            tx.added += len(new)
            for chunk in _chunks(sorted(element_text(name, e) for e in new)):
                adds.append(f"add element {T} {name} {{ {', '.join(chunk)} }}")
    tx.lines += adds
    for chain in changed_chains:
        tx.lines += [f"add rule {T} {chain} {r}" for r in desired.chains.get(chain, ())]
    for name in sorted(dynamic_have - dynamic_want):
        tx.lines.append(f"delete set {T} {name}")
    return tx


_MISSING = object()


def _stale_cgroup(key) -> bool:
    """An element of a vanished cgroup: nft shows its id (a number) instead of a path."""
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())

