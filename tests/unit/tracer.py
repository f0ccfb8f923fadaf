"""Trace one packet through the table the nft fake holds: its chains' rules
and its maps' elements, as the batches put them there.

A small interpreter of the rule syntax rules/skeleton.nft and the rendered
policy and limit rules use (matches on addresses, marks, protocols, ports,
conntrack state, fib type, cgroup ancestry; `meta mark set`, map lookups,
`snat ... map`, jump/goto/return, accept/drop/reject), run hook by hook in
priority order as the kernel runs base chains. A change to skeleton.nft
changes what the traces see; a statement the interpreter does not know fails
the test instead of being skipped. Behaviour tests ask it what happens to a
packet instead of asserting rule strings; the kernel tests then prove the
kernel does the same.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from egress_agent import names
from egress_agent.model import Desired, Observed
from egress_agent.nft.fake import FakeNft, Table
from egress_agent.nft.diff import transaction


@dataclass(frozen=True)
class Verdict:
    action: str  # snat | default | drop | reject | none
    workload_mark: Optional[int] = None  # the mark the packet was classified with
    address: Optional[str] = None
    ports: Optional[tuple[int, int]] = None
    eid: int = 0


def kernel_of(d: Desired) -> FakeNft:
    """A fake kernel that took the first batch for `d` (skeleton and elements)."""
    nft = FakeNft()
    nft.run(transaction(d, Observed()).text)
    return nft


_KERNELS: dict[int, tuple[Desired, FakeNft]] = {}


def _kernel(d: Union[Desired, FakeNft]) -> Table:
    if isinstance(d, FakeNft):
        assert d.table is not None, "the fake holds no table"
        return d.table
    if id(d) not in _KERNELS:  # the Desired is kept, so its id is not reused meanwhile
        if len(_KERNELS) > 64:
            _KERNELS.clear()
        _KERNELS[id(d)] = (d, kernel_of(d))
    return _KERNELS[id(d)][1].table


def trace(d: Union[Desired, FakeNft], src: str, dst: str, proto: str = "tcp",
          dport: Optional[int] = None, iif: Optional[str] = None, cgroup: Optional[str] = None,
          state: str = "new", flows: int = 0) -> Verdict:
    """The fate of one packet. `d`: a fake kernel, or a Desired applied to a fresh one.
    `src` of a cgroup's process: the address it bound, or "" (the host picks).
    `state`: what conntrack says of it, "new" or "invalid". `flows`: connections
    its workload already has to this destination and port. `dst` is never one of
    the host's own addresses (the traces follow the forward and output paths)."""
    table = _kernel(d)
    fam = ipaddress.ip_address(dst).version
    pkt = _Packet(fam=fam, src=str(ipaddress.ip_address(src)) if src else None,
                  dst=str(ipaddress.ip_address(dst)),
                  l4="ipv6-icmp" if (proto == "icmp" and fam == 6) else proto, dport=dport,
                  iif=iif, cgroup=cgroup.strip("/") if cgroup else None, ct_state=state,
                  flows=flows)
    hooks = ["output", "postrouting"] if cgroup else ["prerouting", "forward", "postrouting"]
    end = None
    for hook in hooks:
        end = _Run(table, pkt).hook(hook)
        if end in ("drop", "reject"):
            break
        if pkt.snat is not None:
            break
    if end in ("drop", "reject"):
        return Verdict(end, pkt.classified)
    if pkt.snat is not None:
        value, mark = pkt.snat
        addr, ports = value if isinstance(value, tuple) else (value, None)
        return Verdict("snat", pkt.classified, addr, ports,
                       (mark & names.EID_MASK) >> names.EID_SHIFT)
    return Verdict("none" if pkt.classified is None else "default", pkt.classified)


# --- the packet and its run --------------------------------------------------------

@dataclass
class _Packet:
    fam: int
    src: Optional[str]
    dst: str
    l4: str
    dport: Optional[int]
    iif: Optional[str]
    cgroup: Optional[str]
    ct_state: str
    flows: int
    mark: int = 0
    ct_mark: int = 0
    hoplimit: int = 64
    classified: Optional[int] = None  # the mark the first map lookup set
    snat: Optional[tuple[Any, int]] = None  # (map value, mark) once bound


class _NoMatch(Exception):
    """The rule stops here: a match failed, or a lookup missed (the kernel's NFT_BREAK)."""


_ABSENT = object()  # a field the packet does not have (e.g. `ip saddr` of IPv6)


class _Run:
    def __init__(self, table: Table, pkt: _Packet):
        self.table, self.pkt, self.depth = table, pkt, 0

    def hook(self, hook: str) -> Optional[str]:
        base = sorted(((c.hook[2], n, c) for n, c in self.table.chains.items()
                       if c.hook and c.hook[1] == hook), key=lambda x: (x[0], x[1]))
        for _, name, chain in base:
            if chain.hook[0] == "nat" and (self.pkt.ct_state == "invalid" or self.pkt.snat):
                continue  # NAT sees only the first packet of a tracked connection
            end = self.chain(name)
            if end in ("drop", "reject"):
                return end
            if end is None and chain.hook[3] == "drop":
                return "drop"
        return None

    def chain(self, name: str) -> Optional[str]:
        """accept | drop | reject, or None: returned (or fell off the end)."""
        self.depth += 1
        assert self.depth < 32, f"chain {name}: jumps nested too deep (a loop?)"
        try:
            for rule in self.table.chains[name].rules:
                try:
                    end = self.rule(_parse(rule))
                except _NoMatch:
                    continue
                if end is None:
                    continue
                kind, target = end
                if kind == "jump":
                    sub = self.chain(target)
                    if sub is not None:
                        return sub
                    continue
                if kind == "goto":
                    return self.chain(target)
                if kind == "return":
                    return None
                return kind  # accept, drop, reject
            return None
        finally:
            self.depth -= 1

    def rule(self, items: list) -> Optional[tuple[str, Optional[str]]]:
        for item in items:
            op = item[0]
            if op == "match":
                _, lhs, neg, rhs = item
                value = self.value(lhs)
                if value is _ABSENT or self.matches(value, rhs) == neg:
                    raise _NoMatch
            elif op == "set":
                _, target, expr = item
                value = self.value(expr)
                if value is _ABSENT:
                    raise _NoMatch
                if target == "meta mark":
                    if expr[2] is not None and self.pkt.classified is None:
                        self.pkt.classified = value
                    self.pkt.mark = value
                else:
                    self.pkt.ct_mark = value
            elif op == "snat":
                _, fam, expr = item
                value = self.value(expr)
                if fam != self.pkt.fam or value is _ABSENT:
                    raise _NoMatch
                self.pkt.snat = (value, self.pkt.mark)
                return ("accept", None)
            elif op == "count":  # add @flows4 { ... ct count over N }
                if self.pkt.flows + 1 <= item[1]:
                    raise _NoMatch
            elif op in ("counter", "update"):
                continue
            else:
                return (op, item[1])  # verdicts, reject
        return None

    def value(self, expr) -> Any:
        """`expr`: (selectors, (binop, number) or None, map name or None)."""
        selectors, binop, mapname = expr
        parts = [self.field(s) for s in selectors]
        if any(p is _ABSENT for p in parts):
            return _ABSENT
        v = parts[0] if len(parts) == 1 else tuple(parts)
        if binop:
            v = v & binop[1] if binop[0] == "&" else v | binop[1]
        if mapname:
            hit = _lookup(v, self.table.sets[mapname].elements)
            return _ABSENT if hit is None else hit[1]
        return v

    def field(self, sel: str) -> Any:
        p = self.pkt
        if sel in ("ip saddr", "ip daddr", "ip6 saddr", "ip6 daddr"):
            if (p.fam == 4) != sel.startswith("ip "):
                return _ABSENT
            if sel.endswith("saddr"):
                return p.src if p.src else _ABSENT  # the host's own pick: none of ours
            return p.dst
        if sel == "ip6 hoplimit":
            return p.hoplimit if p.fam == 6 else _ABSENT
        if sel == "icmpv6 type":
            return _ABSENT  # the traces send no ICMPv6 of their own
        if sel == "meta mark":
            return p.mark
        if sel == "meta l4proto":
            return p.l4
        if sel == "meta nfproto":
            return f"ipv{p.fam}"
        if sel == "th dport":
            return p.dport if p.l4 in ("tcp", "udp") and p.dport is not None else _ABSENT
        if sel in ("iif", "iifname"):
            return p.iif if p.iif is not None else _ABSENT
        if sel == "ct state":
            return p.ct_state
        if sel in ("ct direction", "ct mark"):
            if p.ct_state == "invalid":
                return _ABSENT  # no conntrack entry
            return "original" if sel == "ct direction" else p.ct_mark
        if sel == "fib daddr type":
            return "multicast" if ipaddress.ip_address(p.dst).is_multicast else "unicast"
        m = re.fullmatch(r"socket cgroupv2 level (\d+)", sel)
        if m:
            parts = p.cgroup.split("/") if p.cgroup else []
            level = int(m.group(1))
            return "/".join(parts[:level]) if len(parts) >= level else _ABSENT
        raise AssertionError(f"tracer: unknown selector {sel!r}")

    def matches(self, value: Any, rhs) -> bool:
        kind, what = rhs
        if kind == "set":
            return _lookup(value, self.table.sets[what].elements) is not None
        if kind == "anon":
            return any(_same(value, x) for x in what)
        return _same(value, what)


def _lookup(key: Any, elements: dict) -> Optional[tuple[Any, Any]]:
    """The element of `elements` that `key` falls in (exact, or in its prefix)."""
    if key in elements:
        return key, elements[key]
    for k, v in elements.items():
        if (_same(key, k) if not isinstance(k, tuple)
                else isinstance(key, tuple) and len(k) == len(key)
                and all(_same(a, b) for a, b in zip(key, k))):
            return k, v
    return None


def _same(value: Any, element: Any) -> bool:
    """`value` of the packet equals or falls in `element` (prefix, range)."""
    if isinstance(element, str) and "/" in element:
        try:
            return ipaddress.ip_address(value) in ipaddress.ip_network(element)
        except (ValueError, TypeError):
            return False
    if isinstance(element, str) and isinstance(value, int) and re.fullmatch(r"\d+-\d+", element):
        lo, hi = map(int, element.split("-"))
        return lo <= value <= hi
    if isinstance(element, str) and isinstance(value, int):
        return element.isdigit() and int(element) == value
    if isinstance(value, str) and isinstance(element, str):
        try:
            return ipaddress.ip_address(value) == ipaddress.ip_address(element)
        except ValueError:
            return value == element
    return value == element


# --- the rule syntax -----------------------------------------------------------------

_SELECTORS = ("ip saddr", "ip daddr", "ip6 saddr", "ip6 daddr", "ip6 hoplimit", "icmpv6 type",
              "meta mark", "meta l4proto", "meta nfproto", "th dport", "ct state",
              "ct direction", "ct mark", "fib daddr type", "iifname", "iif")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{},]|[^\s{},]+')


@functools.lru_cache(maxsize=4096)
def _parse(rule: str) -> list:
    """A rule text as items: ("match", expr, negated, rhs), ("set", target, expr),
    ("snat", family, expr), ("count", n), ("counter",), ("update",), verdicts."""
    toks = _TOKEN.findall(rule)
    items: list = []
    i = 0

    def selector(i: int) -> tuple[Optional[str], int]:
        for s in _SELECTORS:
            words = s.split()
            if toks[i:i + len(words)] == words:
                return s, i + len(words)
        if toks[i:i + 3] == ["socket", "cgroupv2", "level"]:
            return f"socket cgroupv2 level {toks[i + 3]}", i + 4
        return None, i

    def expr(i: int):
        sel, i = selector(i)
        assert sel, f"tracer: cannot read {' '.join(toks[i:])!r} in {rule!r}"
        sels = [sel]
        while i < len(toks) and toks[i] == ".":
            sel, i = selector(i + 1)
            assert sel, f"tracer: cannot read a concatenation in {rule!r}"
            sels.append(sel)
        binop = None
        if i < len(toks) and toks[i] in ("&", "|"):
            binop, i = (toks[i], int(toks[i + 1], 0)), i + 2
        mapname = None
        if i < len(toks) and toks[i] == "map":
            mapname, i = toks[i + 1].lstrip("@"), i + 2
        return (tuple(sels), binop, mapname), i

    def literal(t: str) -> Any:
        try:
            return int(t, 0)
        except ValueError:
            return t

    while i < len(toks):
        t = toks[i]
        if t == "comment":
            i += 2
        elif t in ("counter",):
            items.append(("counter",))
            i += 1
        elif t in ("accept", "drop", "return"):
            items.append((t, None))
            i += 1
        elif t in ("goto", "jump"):
            items.append((t, toks[i + 1]))
            i += 2
        elif t == "reject":
            items.append(("reject", None))
            i += 1
            if i < len(toks) and toks[i] == "with":
                i += 3
        elif t == "snat":
            assert toks[i + 1] in ("ip", "ip6") and toks[i + 2] == "to", rule
            fam = 4 if toks[i + 1] == "ip" else 6
            e, i = expr(i + 3)
            items.append(("snat", fam, e))
        elif t in ("add", "update"):
            assert toks[i + 1].startswith("@") and toks[i + 2] == "{", rule
            j = toks.index("}", i)
            inner = toks[i + 3:j]
            if t == "add":
                k = inner.index("count")
                assert inner[k - 1] == "ct" and inner[k + 1] == "over", rule
                items.append(("count", int(inner[k + 2])))
            else:
                items.append(("update",))
            i = j + 1
        else:
            e, i = expr(i)
            if i < len(toks) and toks[i] == "set":
                target = " ".join(e[0])
                assert target in ("meta mark", "ct mark") and not e[1] and not e[2], rule
                v, i = expr(i + 1)
                items.append(("set", target, v))
                continue
            neg = False
            if toks[i] in ("==", "!="):
                neg, i = toks[i] == "!=", i + 1
            if toks[i].startswith("@"):
                rhs, i = ("set", toks[i][1:]), i + 1
            elif toks[i] == "{":
                j = toks.index("}", i)
                rhs, i = ("anon", tuple(literal(x) for x in toks[i + 1:j] if x != ",")), j + 1
            else:
                rhs, i = ("literal", literal(toks[i])), i + 1
                if i < len(toks) and toks[i] == ",":  # flags: ct state new,invalid
                    values = [rhs[1]]
                    while i < len(toks) and toks[i] == ",":
                        values.append(literal(toks[i + 1]))
                        i += 2
                    rhs = ("anon", tuple(values))
            items.append(("match", e, neg, rhs))
    return items

