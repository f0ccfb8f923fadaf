"""The skeleton's shape: its chains, their rules and its set declarations, compared
without the kernel's handles, counters and elements.

Pure. The same shape is read from two places: the skeleton source
(rules/skeleton.nft, what the agent writes) and the kernel's JSON listing
(`nft -j list table`, what the kernel holds). A flushed chain, a deleted or
inserted rule, a deleted set or a chain whose hook changed makes them differ,
and a sync that sees a difference replaces the whole table in one batch.

Why a projection and not the kernel's full expression trees: nft rewrites
expressions on the way into the kernel (`meta mark & 0x80000000 == 0x80000000`
is listed as a prefix match; `ip saddr` in an inet table carries a hidden
`meta nfproto`), so the tree cannot be derived from the source without nft's
own parser. Per rule the shape keeps what survives that rewriting unchanged in
nft 1.0.6 and later: the named sets and maps it uses (`@source4`), the chains
it jumps to, its statements (counter, snat, reject, ...) and verdicts, and its
comment. A rule rewritten in place into another rule with the same sets,
statements and comment is not seen (the kernel test pins the projection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from . import names

# statements and verdicts whose JSON key is the nft keyword itself
KEYWORDS = ("accept", "drop", "return", "reject", "snat", "dnat", "masquerade", "redirect",
            "counter", "log", "queue", "notrack", "limit", "quota")
# named chain priorities of the inet family (nft(8), "CHAIN PRIORITIES")
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
              "srcnat": 100}

Rule = tuple[Optional[str], tuple[str, ...]]  # (comment, sorted tokens)
Hook = Optional[tuple[str, str, int, str]]     # (type, hook, priority, policy); None: regular


@dataclass(frozen=True)
class Shape:
    """chains: name -> (hook, rules); sets: name -> (set|map, key types).

    The rules of the generated chains (policies, limits) are not part of the
    shape: they change with the config and are compared by their comments."""

    chains: tuple[tuple[str, Hook, tuple[Rule, ...]], ...]
    sets: tuple[tuple[str, str, tuple[str, ...]], ...]

    def chain(self, name: str) -> Optional[tuple[Hook, tuple[Rule, ...]]]:
        return next(((h, r) for n, h, r in self.chains if n == name), None)

    def set(self, name: str) -> Optional[tuple[str, tuple[str, ...]]]:
        return next(((k, t) for n, k, t in self.sets if n == name), None)


def _shape(chains: dict[str, tuple[Hook, list[Rule]]],
           sets: dict[str, tuple[str, tuple[str, ...]]]) -> Shape:
    return Shape(tuple((n, h, () if n in names.GENERATED_CHAINS else tuple(r))
                       for n, (h, r) in sorted(chains.items())),
                 tuple((n, k, t) for n, (k, t) in sorted(sets.items())))


# --- from the source ---------------------------------------------------------------

_COMMENT = re.compile(r'\scomment\s+"((?:[^"\\]|\\.)*)"\s*$')


def rule_from_text(body: str) -> Rule:
    m = _COMMENT.search(body)
    comment = m.group(1) if m else None
    body = body[:m.start()] if m else body
    tokens = [f"@{s}" for s in re.findall(r"@(\w+)", body)]
    tokens += [f"{v} {t}" for v, t in re.findall(r"\b(goto|jump)\s+(\w+)", body)]
    words = re.findall(r"[\w-]+", re.sub(r"\b(goto|jump)\s+\w+", "", body))
    tokens += [w for w in words if w in KEYWORDS]
    return comment, tuple(sorted(tokens))


def _priority(text: str) -> int:
    m = re.fullmatch(r"\s*(-?\d+|[a-z]+)\s*(?:([+-])\s*(\d+))?\s*", text)
    if not m:
        raise ValueError(f"skeleton: cannot read chain priority {text!r}")
    base = int(m.group(1)) if m.group(1).lstrip("-").isdigit() else PRIORITIES[m.group(1)]
    off = int(m.group(3) or 0)
    return base + off if m.group(2) != "-" else base - off


@dataclass(frozen=True)
class SetDecl:
    """One `set`/`map` declaration as written, e.g.
    `map snat4 { type mark : interval ipv4_addr . inet_service; }`."""

    kind: str                      # set | map
    types: tuple[str, ...]         # key types
    value: Optional[str] = None    # a map's value type as written after `:`
    flags: tuple[str, ...] = ()
    size: Optional[int] = None
    counter: bool = False
    comment: Optional[str] = None


@dataclass
class Source:
    """What a `table ... { ... }` block declares, in source order: chains with
    their hook and rule texts, sets with their declarations. `unknown`: lines
    of the table block that are none of these (a caller that applies the block
    refuses them)."""

    chains: dict[str, tuple[Hook, list[str]]]
    sets: dict[str, SetDecl]
    unknown: list[str]


_DECL = re.compile(r"(set|map) (\w+) \{\s*(.*?)\s*\}$")


def set_decl(line: str) -> Optional[tuple[str, SetDecl]]:
    """(name, declaration) of one set/map declaration line, None if it is not one."""
    m = _DECL.match(line)
    if not m or not m.group(3).startswith("type "):
        return None
    kind, name, body = m.groups()
    comment = None
    c = re.search(r'comment "((?:[^"\\]|\\.)*)";?', body)
    if c:
        comment, body = c.group(1), body[:c.start()] + body[c.end():]
    fields = [f.strip() for f in body.split(";") if f.strip()]
    keys, _, value = fields[0][len("type "):].partition(":")
    flags: tuple[str, ...] = ()
    size, counter = None, False
    for f in fields[1:]:
        if f.startswith("flags "):
            flags = tuple(x.strip() for x in f[len("flags "):].split(","))
        elif f.startswith("size "):
            size = int(f[len("size "):])
        elif f == "counter":
            counter = True
        else:
            return None
    return name, SetDecl(kind, tuple(t.strip() for t in keys.split(" . ")),
                         value.strip() or None, flags, size, counter, comment)


def parse(src: str) -> Source:
    """The chains and sets of the skeleton source, or of any `table { }` block."""
    chains: dict[str, tuple[Hook, list[str]]] = {}
    sets: dict[str, SetDecl] = {}
    unknown: list[str] = []
    chain: Optional[str] = None
    for raw in src.splitlines():
        line = raw.strip()
        if '"' not in line:  # a '#' inside a quoted comment is not a comment
            line = line.split("#", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if chain is None:
            decl = set_decl(line)
            if decl:
                sets[decl[0]] = decl[1]
            elif m := re.match(r"chain (\w+) \{$", line):
                chain = m.group(1)
                chains[chain] = (None, [])
            elif not re.match(r"(table \w+ \w+ \{|\})$", line):
                unknown.append(line)
            continue
        if line == "}":
            chain = None
            continue
        m = re.match(r"type (\w+) hook (\w+) priority ([^;]+); policy (\w+);", line)
        if m:
            chains[chain] = ((m.group(1), m.group(2), _priority(m.group(3)), m.group(4)),
                             chains[chain][1])
            continue
        chains[chain][1].append(line)
    return Source(chains, sets, unknown)


def from_source(src: str) -> Shape:
    """The shape of the skeleton source (the `table ... { ... }` block)."""
    s = parse(src)
    return _shape({n: (h, [rule_from_text(r) for r in rules]) for n, (h, rules) in s.chains.items()},
                  {n: (d.kind, d.types) for n, d in s.sets.items()})


# --- from the kernel's JSON --------------------------------------------------------

def _tokens(expr: Any, out: list[str]) -> None:
    if isinstance(expr, dict):
        for k, v in expr.items():
            if k in ("goto", "jump") and isinstance(v, dict):
                out.append(f"{k} {v.get('target')}")
                continue
            if k in KEYWORDS:
                out.append(k)
            _tokens(v, out)
    elif isinstance(expr, list):
        for x in expr:
            _tokens(x, out)
    elif isinstance(expr, str) and expr.startswith("@"):
        out.append(expr)


def rule_from_json(rule: dict) -> Rule:
    out: list[str] = []
    _tokens(rule.get("expr", []), out)
    return rule.get("comment"), tuple(sorted(out))


def from_json(doc: dict) -> Shape:
    """The shape of our table in `nft -j list table inet egress_agent` output.

    Sets named policy_* are the config's, declared per sync: not skeleton."""
    chains: dict[str, tuple[Hook, list[Rule]]] = {}
    sets: dict[str, tuple[str, tuple[str, ...]]] = {}
    for item in doc.get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            hook = ((c["type"], c["hook"], int(c["prio"]), c.get("policy", "accept"))
                    if "hook" in c else None)
            chains[c["name"]] = (hook, chains.get(c["name"], (None, []))[1])
        elif "rule" in item:
            r = item["rule"]
            hook, rules = chains.setdefault(r["chain"], (None, []))
            rules.append(rule_from_json(r))
        for kind in ("set", "map"):
            if kind in item and not names.is_policy_set(item[kind]["name"]):
                s = item[kind]
                t = s.get("type")
                sets[s["name"]] = (kind, tuple(t) if isinstance(t, list) else (t,))
    return _shape(chains, sets)


def chain_blocks(src: str) -> dict[str, str]:
    """Each chain's block of the skeleton source (`chain X { ... }`), by name."""
    out: dict[str, str] = {}
    lines = src.splitlines()
    for i, raw in enumerate(lines):
        m = re.match(r"\s*chain (\w+) \{", raw)
        if not m:
            continue
        depth, j = 0, i
        while True:
            depth += lines[j].count("{") - lines[j].count("}")
            if depth == 0:
                break
            j += 1
        out[m.group(1)] = "\n".join(lines[i:j + 1])
    return out


def damaged_chains(want: Shape, have: Shape) -> Optional[list[tuple[str, bool]]]:
    """The skeleton chains to rewrite in place, (name, exists), when that repairs
    `have`; None when only replacing the table does: a set declaration differs,
    a chain hangs on another hook, or a foreign chain sits in our table."""
    if want.sets != have.sets or {n for n, _, _ in have.chains} - {n for n, _, _ in want.chains}:
        return None
    out = []
    for name, hook, rules in want.chains:
        got = have.chain(name)
        if got is not None and got[0] != hook:
            return None
        if got is None or got[1] != rules:
            out.append((name, got is not None))
    return out


# --- what differs ---------------------------------------------------------------------

def differences(want: Shape, have: Shape) -> list[str]:
    """What of `want` the kernel's `have` lacks or holds otherwise, one phrase each,
    e.g. "chain postrouting: 0 of 6 skeleton rules"."""
    out: list[str] = []
    for name, hook, rules in want.chains:
        got = have.chain(name)
        if got is None:
            out.append(f"chain {name} missing")
            continue
        if got[0] != hook:
            out.append(f"chain {name}: hook {got[0]} instead of {hook}")
        if got[1] != rules:
            same = sum(1 for r in got[1] if r in rules)
            extra = len(got[1]) - same
            out.append(f"chain {name}: {min(same, len(rules))} of {len(rules)} skeleton rules"
                       + (f", {extra} foreign" if extra else "")
                       + (", out of order" if same == len(rules) == len(got[1]) else ""))
    for name, _, _ in have.chains:
        if want.chain(name) is None:
            out.append(f"chain {name} foreign")
    for name, kind, types in want.sets:
        got = have.set(name)
        if got is None:
            out.append(f"{kind} {name} missing")
        elif got != (kind, types):
            out.append(f"{kind} {name}: declared as {got[0]} of {' . '.join(got[1])}")
    for name, kind, _ in have.sets:
        if want.set(name) is None:
            out.append(f"{kind} {name} foreign")
    return out
