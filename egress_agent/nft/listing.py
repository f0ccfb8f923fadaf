"""Reading the kernel's JSON listing of our table back into an `Observed`.

Pure. `nft -j list table inet egress_agent` answers in nft's JSON; each
element is normalised by `normalize_element` to the same tuples plan.py
builds, using the kinds `nft.text` writes them with.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from .. import names, shape
from ..model import Element, Observed
from .text import KINDS, kinds_of


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
        if "set" in item and item["set"]["name"] == names.SKELETON_SET:
            skeleton = item["set"].get("comment")
        for kind in ("set", "map"):
            if kind in item:
                s = item[kind]
                name = s["name"]
                if name in KINDS or names.is_policy_set(name):
                    elements[name] = frozenset(normalize_element(name, e) for e in s.get("elem", []))
        if "rule" in item and item["rule"]["chain"] in chains:
            chains[item["rule"]["chain"]].append(item["rule"].get("comment", ""))
    return Observed(table, skeleton, elements, {c: tuple(r) for c, r in chains.items()},
                    frozenset(routes), frozenset(rules), shape.from_json(doc) if table else None)
