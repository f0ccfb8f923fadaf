"""An in-memory nftables that takes the batches `nft.diff` writes.

It holds what the kernel holds of our table: every chain with its hook and
rules (the rule texts as written), every set and map with its declaration and
elements. `list_table()` answers in the JSON shape of `nft -j list table` that
`render.observed_from_json` and `shape.from_json` read; packet traces
(tests/unit/tracer.py) walk the rules and elements it holds.

It behaves like the kernel where the agent depends on it: batches are atomic,
deleting what is absent fails (ENOENT), adding a map key with another value
fails (EEXIST), declaring an existing set with another type or an existing
chain on another hook fails (EEXIST), a set used by a rule cannot be deleted
(EBUSY), a rule may only name sets and chains that exist, cgroup paths must
exist. Element keys and values are read with the types the set was declared
with. It knows only the statements the renderer writes; anything else is an
error, so a renderer change that the fake does not know fails loudly in unit
tests.

Rules are listed as a projection of the kernel's expression trees: the sets
they use, their statements, verdicts and comment, which is all that
`shape.from_json` reads (shape.py says why); nft's own rewriting of
expressions is not imitated.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import names, shape
from . import NftError

T = names.TABLE
GATE = names.GATE_TABLE  # a gateway's gate (gateway.py): kept as text


@dataclass
class NftSet:
    decl: shape.SetDecl
    elements: dict[Any, Any] = field(default_factory=dict)  # key -> value (None in a set)

    @property
    def kinds(self) -> tuple[tuple[str, ...], Optional[tuple[str, ...]]]:
        return kinds_of_decl(self.decl)


@dataclass
class Chain:
    hook: shape.Hook
    rules: list[str] = field(default_factory=list)  # rule texts, in order


@dataclass
class Table:
    sets: dict[str, NftSet] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)


class FakeNft:
    def __init__(self, cgroups: Optional[set[str]] = None, journal: Optional[list] = None):
        self.table: Optional[Table] = None
        self.cgroups = cgroups  # None: every path exists
        self.batches: list[str] = []  # every batch the fake took, in order
        # shared with FakeRouting to record the order of nft batches and route ops
        self.journal = journal
        self.refusals: list[str] = []  # the next batches are refused with these messages
        self.gen = 0  # the ruleset generation: +1 per accepted batch (tests bump it for foreign ones)
        self.gate: Optional[str] = None  # a gateway's gate table (gateway.py), as text

    # --- the port ---------------------------------------------------------------
    def run(self, batch: str) -> None:
        if not batch.strip():  # as Libnft: nothing to send
            return
        if self.refusals:
            raise NftError(f"batch:1:1-1: Error: {self.refusals.pop(0)}", batch)
        state, gate = copy.deepcopy(self.table), self.gate
        lines = batch.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            start = i
            i += 1
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith((f"table {T} {{", f"table {GATE} {{")):
                    depth, block = 1, [line]
                    while depth:
                        if i >= len(lines):
                            raise NftError("syntax error, unexpected end of file")
                        block.append(lines[i])
                        depth += lines[i].count("{") - lines[i].count("}")
                        i += 1
                    if line.startswith(f"table {GATE} "):
                        gate = "\n".join(block)
                    else:
                        state = self._declare(state, "\n".join(block))
                elif line == f"add table {GATE}":
                    gate = gate or ""
                elif line == f"delete table {GATE}":
                    if gate is None:
                        raise NftError("Could not process rule: No such file or directory (table)")
                    gate = None
                else:
                    state = self._statement(state, line)
            except NftError as e:
                raise NftError(f"batch:{start + 1}:1-{len(line)}: Error: {e.message}\n{line}",
                               batch) from None
        self.table, self.gate = state, gate
        self.batches.append(batch)
        if self.journal is not None:
            self.journal.append(("nft", batch))
        self.gen += 1

    def generation(self) -> int:
        return self.gen

    def read_table(self):
        from .listing import observed_from_json
        return observed_from_json(self.list_table())

    def list_table(self, terse: bool = False) -> dict:
        """`terse`: without elements (`nft -t`)."""
        if self.table is None:
            return {"nftables": []}
        t = {"family": "inet", "table": names.TABLE_NAME}
        doc: list[dict] = [{"metainfo": {"json_schema_version": 1}},
                           {"table": {"family": "inet", "name": names.TABLE_NAME}}]
        for name, s in self.table.sets.items():
            d = s.decl
            item: dict[str, Any] = {**t, "name": name,
                                    "type": d.types[0] if len(d.types) == 1 else list(d.types)}
            if d.value:
                item["map"] = d.value.replace("interval ", "")
            # as nft 1.0.6 lists them (tests/unit/fixtures): `dynamic` is not listed
            flags = [f for f in d.flags if f != "dynamic"]
            if flags:
                item["flags"] = flags
            if d.size:
                item["size"] = d.size
            if d.counter:
                item["stmt"] = [{"counter": None}]
            if d.comment:
                item["comment"] = d.comment
            if s.elements and not terse:
                kk, vk = s.kinds
                item["elem"] = [_to_json(kk, k) if vk is None else [_to_json(kk, k), _to_json(vk, v)]
                                for k, v in s.elements.items()]
            doc.append({d.kind: item})
        for name, c in self.table.chains.items():
            item = {**t, "name": name}
            if c.hook:
                item.update(zip(("type", "hook", "prio", "policy"), c.hook))
            doc.append({"chain": item})
        for name, c in self.table.chains.items():
            for body in c.rules:
                comment, tokens = shape.rule_from_text(body)
                doc.append({"rule": {**t, "chain": name, "expr": [_expr(x) for x in tokens],
                                     **({"comment": comment} if comment else {})}})
        return json.loads(json.dumps({"nftables": doc}))

    # --- reading the state (tests) -----------------------------------------------------
    def elements(self, name: str) -> dict[Any, Any]:
        """The elements of set or map `name`, key -> value (None in a set); live."""
        assert self.table is not None, "no table"
        return self.table.sets[name].elements

    def refuse_next(self, message: str = "Could not process rule: Cannot allocate memory") -> None:
        """Refuse the next batch as the kernel would (nothing of it applied)."""
        self.refusals.append(message)

    # --- statements ----------------------------------------------------------------
    def _declare(self, state: Optional[Table], block: str) -> Table:
        """A `table inet egress_agent { ... }` block: declares what is absent; a
        chain that exists gets the block's rules appended (as nft does)."""
        st = state or Table()
        src = shape.parse(block)
        if src.unknown:
            raise NftError(f"syntax error: the fake does not know this: {src.unknown[0][:80]}")
        for name, decl in src.sets.items():
            self._declare_set(st, name, decl)
        for name, (hook, _) in src.chains.items():
            have = st.chains.get(name)
            if have is None:
                st.chains[name] = Chain(hook)
            elif have.hook != hook:
                raise NftError(f"Could not process rule: File exists (chain {name} on another hook)")
        for name, (_, rules) in src.chains.items():
            for body in rules:
                self._add_rule(st, name, body)
        return st

    def _declare_set(self, st: Table, name: str, decl: shape.SetDecl) -> None:
        have = st.sets.get(name)
        if have is None:
            kinds_of_decl(decl)  # a type the fake cannot read elements of is refused now
            st.sets[name] = NftSet(decl)
        elif (have.decl.kind, have.decl.types, have.decl.value) != (decl.kind, decl.types, decl.value):
            raise NftError(f"Could not process rule: File exists ({decl.kind} {name} declared "
                           f"otherwise)")

    def _add_rule(self, st: Table, chain: str, body: str) -> None:
        target = self._need_chain(st, chain)
        plain = re.sub(r'comment "(?:[^"\\]|\\.)*"', "", body)
        for ref in re.findall(r"@(\w+)", plain):
            self._need_set(st, ref)
        for ref in re.findall(r"\b(?:goto|jump) (\w+)", plain):
            self._need_chain(st, ref)
        target.rules.append(body)

    def _statement(self, state: Optional[Table], line: str) -> Optional[Table]:
        if line == f"add table {T}":
            return state or Table()
        if line == f"delete table {T}":
            self._need_table(state)
            return None
        st = self._need_table(state)
        if m := re.match(rf"flush chain {T} (\w+)$", line):
            self._need_chain(st, m.group(1)).rules.clear()
        elif m := re.match(rf"flush (set|map) {T} (\w+)$", line):
            self._need_set(st, m.group(2), m.group(1)).elements.clear()
        elif m := re.match(rf"add (set|map) {T} (.*)$", line):
            decl = shape.set_decl(f"{m.group(1)} {m.group(2)}")
            if decl is None:
                raise NftError(f"syntax error: cannot read the declaration {line[:80]}")
            self._declare_set(st, *decl)
        elif m := re.match(rf"delete (set|map) {T} (\w+)$", line):
            name = m.group(2)
            self._need_set(st, name, m.group(1))
            if any(re.search(rf"@{name}\b", r) for c in st.chains.values() for r in c.rules):
                raise NftError(f"Could not process rule: Device or resource busy ({name} in use)")
            del st.sets[name]
        elif m := re.match(rf"(add|delete) element {T} (\w+) \{{ (.*) \}}$", line):
            self._elements(st, *m.groups())
        elif m := re.match(rf"add rule {T} (\w+) (.*)$", line):
            self._add_rule(st, m.group(1), m.group(2))
        else:
            raise NftError(f"syntax error: the fake does not know this statement: {line[:80]}")
        return st

    def _elements(self, st: Table, verb: str, name: str, body: str) -> None:
        s = self._need_set(st, name)
        kk, vk = s.kinds
        for part in body.split(", "):
            if verb == "add":
                k, sep, v = part.partition(" : ")
                if bool(sep) != (vk is not None):
                    raise NftError(f"syntax error: {part!r}: a {s.decl.kind}'s element"
                                   + (" needs a value" if vk else " has no value"))
                key, val = self._parse(kk, k), (self._parse(vk, v) if vk else None)
                if key in s.elements and s.elements[key] != val:
                    raise NftError("Could not process rule: File exists")
                s.elements[key] = val
            else:
                key = self._parse(kk, part)
                if key not in s.elements:
                    raise NftError("Could not process rule: No such file or directory")
                del s.elements[key]

    def _need_table(self, state: Optional[Table]) -> Table:
        if state is None:
            raise NftError("Could not process rule: No such file or directory (table)")
        return state

    def _need_chain(self, st: Table, name: str) -> Chain:
        if name not in st.chains:
            raise NftError(f"Could not process rule: No such file or directory (chain {name})")
        return st.chains[name]

    def _need_set(self, st: Table, name: str, kind: Optional[str] = None) -> NftSet:
        s = st.sets.get(name)
        if s is None or (kind is not None and s.decl.kind != kind):
            raise NftError(f"Could not process rule: No such file or directory ({kind or 'set'} {name})")
        return s

    def _parse(self, kinds: tuple[str, ...], text: str) -> Any:
        parts = text.split(" . ")
        if len(parts) != len(kinds):
            raise NftError(f"syntax error: {text!r} does not match the set type")
        vals = tuple(self._atom(k, p.strip()) for k, p in zip(kinds, parts))
        return vals[0] if len(vals) == 1 else vals

    def _atom(self, kind: str, s: str) -> Any:
        try:
            if kind == "mark":
                return int(s, 16) if s.startswith("0x") else int(s)
            if kind == "addr":
                return str(ipaddress.ip_address(s))
            if kind == "prefix":
                n = ipaddress.ip_network(s)
                return str(n.network_address) if n.num_addresses == 1 else str(n)
            if kind == "ifname":
                return json.loads(s)
            if kind == "cgroup":
                if s.startswith('"'):
                    path = json.loads(s)
                    if self.cgroups is not None and path not in self.cgroups:
                        raise NftError("cgroupv2 path fails: No such file or directory")
                    return path
                return int(s)
            if kind == "ports":
                lo, _, hi = s.partition("-")
                return (int(lo), int(hi or lo))
            if kind in ("port", "proto"):
                return int(s) if s.isdigit() else s
        except ValueError as e:
            raise NftError(f"syntax error: {s!r}: {e}") from None
        raise NftError(f"unknown kind {kind}")


# nft data types -> how the fake reads and lists one atom of them
_ATOMS = {"mark": "mark", "ipv4_addr": "addr", "ipv6_addr": "addr", "ifname": "ifname",
          "cgroupsv2": "cgroup", "inet_proto": "proto", "inet_service": "port"}


def kinds_of_decl(decl: shape.SetDecl) -> tuple[tuple[str, ...], Optional[tuple[str, ...]]]:
    """The atoms of a key and of a value of the set `decl` declares: an address
    of an interval set is a prefix; an `interval` value's service a port range."""
    def atoms(types: list[str], ranges: dict[str, str]) -> tuple[str, ...]:
        out = []
        for t in types:
            if t not in _ATOMS:
                raise NftError(f"the fake does not know the type {t}")
            out.append(ranges.get(_ATOMS[t], _ATOMS[t]))
        return tuple(out)
    key = atoms(list(decl.types),
                {"addr": "prefix", "port": "ports"} if "interval" in decl.flags else {})
    if decl.value is None:
        return key, None
    value = decl.value.split()
    interval = value[0] == "interval"  # render writes ranges of ports only
    return key, atoms([t for t in value[interval:] if t != "."],
                      {"port": "ports"} if interval else {})


def _to_json(kinds: tuple[str, ...], v: Any) -> Any:
    def atom(kind: str, x: Any) -> Any:
        if kind == "ports":
            return x[0] if x[0] == x[1] else {"range": [x[0], x[1]]}
        if kind == "prefix" and "/" in str(x):
            a, l = str(x).split("/")
            return {"prefix": {"addr": a, "len": int(l)}}
        return x
    if len(kinds) == 1:
        return atom(kinds[0], v)
    return {"concat": [atom(k, x) for k, x in zip(kinds, v)]}


def _expr(token: str) -> dict:
    """A JSON statement carrying `token` as the kernel's listing would (shape.py)."""
    if token.startswith("@"):
        return {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": token}}
    if " " in token:
        verdict, target = token.split(" ", 1)
        return {verdict: {"target": target}}
    return {token: None}
