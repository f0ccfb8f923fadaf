"""An in-memory nftables that takes the batches `nft.diff` writes.

It behaves like the kernel where the agent depends on it: batches are atomic,
deleting what is absent fails (ENOENT), adding a map key with another value
fails (EEXIST), a set used by a rule cannot be deleted (EBUSY), cgroup paths
must exist. `list_table()` answers in the JSON shape of `nft -j`. It knows
only the statements the renderer writes; anything else is an error, so a
renderer change that the fake does not know fails loudly in unit tests.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from typing import Any, Optional

from .. import names, shape
from .text import KINDS, kinds_of
from . import NftError

T = names.TABLE


class FakeNft:
    def __init__(self, cgroups: Optional[set[str]] = None):
        # {"comment", "sets": {name: {key: value}}, "rules": {chain: [rule, ...]},
        #  "decl": {set: (set|map, key types)}, "chains": {chain: [hook, [rule, ...]]}}
        self.table: Optional[dict] = None
        self.cgroups = cgroups  # None: every path exists
        self.batches: list[str] = []
        self.gen = 0  # the ruleset generation: +1 per accepted batch (tests bump it for foreign ones)

    # --- the port ---------------------------------------------------------------
    def run(self, batch: str) -> None:
        state = copy.deepcopy(self.table)
        lines = batch.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith(f"table {T} {{"):
                    depth, block = 1, []
                    while depth:
                        block.append(lines[i])
                        depth += lines[i].count("{") - lines[i].count("}")
                        i += 1
                    state = self._declare(state, block)
                else:
                    state = self._statement(state, line)
            except NftError as e:
                raise NftError(f"batch:{i}:1-{len(line)}: Error: {e.message}\n{line}", batch) from None
        self.table = state
        self.batches.append(batch)
        self.gen += 1

    def generation(self) -> int:
        return self.gen

    def list_table(self, terse: bool = False) -> dict:
        """`terse`: without elements (`nft -t`)."""
        doc: list[dict] = [{"metainfo": {"json_schema_version": 1}}]
        if self.table is None:
            return {"nftables": []}
        t = {"family": names.TABLE_FAMILY, "table": names.TABLE_NAME}
        doc.append({"table": {"family": names.TABLE_FAMILY, "name": names.TABLE_NAME}})
        if self.table["comment"]:
            doc.append({"set": {**t, "name": names.SKELETON_SET, "type": "mark",
                                "comment": self.table["comment"]}})
        for name, elems in self.table["sets"].items():
            # the dynamic sets (flows4, refused_ports) are filled by the data path only
            kk, vk = kinds_of(name) if name in KINDS or names.is_policy_set(name) else ((), None)
            kind, types = self.table["decl"].get(name, ("set", ("mark",)))
            item: dict[str, Any] = {**t, "name": name,
                                    "type": types[0] if len(types) == 1 else list(types)}
            raw = []
            for k, v in elems.items():
                jk = _to_json(kk, k)
                raw.append(jk if vk is None else [jk, _to_json(vk, v)])
            if raw and not terse:
                item["elem"] = raw
            doc.append({kind: item})
        for name, (hook, bodies) in self.table["chains"].items():
            c: dict[str, Any] = {**t, "name": name}
            if hook:
                c.update(zip(("type", "hook", "prio", "policy"), hook))
            doc.append({"chain": c})
            for body in bodies + self.table["rules"].get(name, []):
                comment, tokens = shape.rule_from_text(body)
                doc.append({"rule": {**t, "chain": name, "expr": [_expr(x) for x in tokens],
                                     **({"comment": comment} if comment else {})}})
        return json.loads(json.dumps({"nftables": doc}))

    # --- statements ----------------------------------------------------------------
    def _declare(self, state: Optional[dict], block: list[str]) -> dict:
        if state is None:
            state = _empty()
        chain = None
        for raw in block:
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            m = re.match(r'set skeleton \{.*comment "(.*)"; \}$', s)
            if m:
                state["comment"] = m.group(1)
                continue
            m = re.match(r"(set|map) (\S+) \{\s*type ([^;:]+)", s)
            if m and chain is None:
                state["sets"].setdefault(m.group(2), {})
                state["decl"][m.group(2)] = (m.group(1), tuple(x.strip() for x in m.group(3).split(" . ")))
                continue
            m = re.match(r"chain (\w+) \{", s)
            if m:
                chain = m.group(1)
                state["chains"][chain] = [None, []]
            elif s == "}":
                chain = None
            elif chain and (m := re.match(r"type (\w+) hook (\w+) priority ([^;]+); policy (\w+);", s)):
                state["chains"][chain][0] = (m.group(1), m.group(2), shape._priority(m.group(3)), m.group(4))
            elif chain and chain not in names.GENERATED_CHAINS:
                state["chains"][chain][1].append(s)
        return state

    def _statement(self, state: Optional[dict], line: str) -> Optional[dict]:
        if line == f"add table {T}":
            return state or _empty()
        if line == f"delete table {T}":
            self._need_table(state)
            return None
        st = self._need_table(state)
        m = re.match(rf"flush chain {T} (\S+)$", line)
        if m and m.group(1) in names.GENERATED_CHAINS:
            st["rules"][m.group(1)] = []
            return st
        if m and m.group(1) in st["chains"]:  # drift in unit tests: a skeleton chain flushed
            st["chains"][m.group(1)][1] = []
            return st
        m = re.match(rf"flush map {T} (\S+)$", line)
        if m:
            st["sets"][self._need_set(st, m.group(1))] = {}
            return st
        m = re.match(rf"add set {T} (\S+) \{{ type mark; \}}$", line)
        if m:
            st["sets"].setdefault(m.group(1), {})
            return st
        m = re.match(rf"delete set {T} (\S+)$", line)
        if m:
            name = self._need_set(st, m.group(1))
            if any(f"@{name} " in r or r.endswith(f"@{name}")
                   for rules in st["rules"].values() for r in rules):
                raise NftError(f"Could not process rule: Device or resource busy: set {name} in use")
            del st["sets"][name]
            return st
        m = re.match(rf"(add|delete) element {T} (\S+) \{{ (.*) \}}$", line)
        if m:
            verb, name, body = m.groups()
            elems = st["sets"][self._need_set(st, name)]
            kk, vk = kinds_of(name)
            for part in body.split(", "):
                if verb == "add":
                    k, v = (part.split(" : ", 1) + [None])[:2] if vk else (part, None)
                    key = self._parse(kk, k)
                    val = self._parse(vk, v) if vk else None
                    if key in elems and elems[key] != val:
                        raise NftError("Could not process rule: File exists")
                    elems[key] = val
                else:
                    key = self._parse(kk, part)
                    if key not in elems:
                        raise NftError("Could not process rule: No such file or directory")
                    del elems[key]
            return st
        m = re.match(rf"add rule {T} (\S+) (.*)$", line)
        if m and m.group(1) in names.GENERATED_CHAINS:
            for ref in re.findall(r"@(\w+)", m.group(2)):
                self._need_set(st, ref)
            st["rules"].setdefault(m.group(1), []).append(m.group(2))
            return st
        raise NftError(f"syntax error: the fake does not know this statement: {line[:80]}")

    def _need_table(self, state: Optional[dict]) -> dict:
        if state is None:
            raise NftError("Could not process rule: No such file or directory (table)")
        return state

    def _need_set(self, st: dict, name: str) -> str:
        if name not in st["sets"]:
            raise NftError(f"Could not process rule: No such file or directory (set {name})")
        return name

    def _parse(self, kinds: tuple[str, ...], text: str) -> Any:
        parts = text.split(" . ")
        if len(parts) != len(kinds):
            raise NftError(f"syntax error: {text!r} does not match the set type")
        vals = tuple(self._atom(k, p.strip()) for k, p in zip(kinds, parts))
        return vals[0] if len(vals) == 1 else vals

    def _atom(self, kind: str, s: str) -> Any:
        try:
            if kind == "mark":
                return int(s, 16)
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
            if kind == "port":
                return int(s)
            if kind == "proto":
                return s
        except ValueError as e:
            raise NftError(f"syntax error: {s!r}: {e}") from None
        raise NftError(f"unknown kind {kind}")


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


def _empty() -> dict:
    return {"comment": None, "sets": {}, "rules": {c: [] for c in names.GENERATED_CHAINS},
            "decl": {}, "chains": {}}


def _expr(token: str) -> dict:
    """A JSON statement carrying `token` as the kernel's listing would (shape.py)."""
    if token.startswith("@"):
        return {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": token}}
    if " " in token:
        verdict, target = token.split(" ", 1)
        return {verdict: {"target": target}}
    return {token: None}
