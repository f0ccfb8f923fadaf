"""Trace one packet through the planned ruleset (skeleton semantics + elements).

A test-side model of rules/skeleton.nft: classification, exclusions, the
rendered policy rules (parsed back from their text), assignments and SNAT
maps. Behaviour tests ask it what happens to a packet instead of asserting
rule strings; the kernel tests then prove the skeleton does the same.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from egress_agent import names
from egress_agent.model import Desired


@dataclass(frozen=True)
class Verdict:
    action: str  # snat | default | drop | none
    workload_mark: Optional[int] = None
    address: Optional[str] = None
    ports: Optional[tuple[int, int]] = None
    eid: int = 0


def _in_prefixes(addr, elems):
    a = ipaddress.ip_address(addr)
    for k, _ in elems:
        if a in ipaddress.ip_network(k):
            return True
    return False


def _policy_verdict(rule: str, mark: int, fam: int, dst: str, proto: str, dport, el):
    body = rule.rsplit(" comment ", 1)[0]
    m = re.match(r"meta nfproto ipv(\d)", body)
    if int(m.group(1)) != fam:
        return None
    s = re.search(r"meta mark @(\S+)", body)
    if s and (mark, None) not in el.get(s.group(1), frozenset()):
        return None
    d = re.search(r"ip6? daddr \{ ([^}]*) \}", body)
    if d and not any(ipaddress.ip_address(dst) in ipaddress.ip_network(x) for x in d.group(1).split(", ")):
        return None
    p = re.search(r"meta l4proto \{ ([^}]*) \}", body)
    l4 = "ipv6-icmp" if (proto == "icmp" and fam == 6) else proto
    if p and l4 not in p.group(1).split(", "):
        return None
    t = re.search(r"th dport \{ ([^}]*) \}", body)
    if t:
        ok = False
        for x in t.group(1).split(", "):
            lo, _, hi = x.partition("-")
            ok |= dport is not None and int(lo) <= dport <= int(hi or lo)
        if not ok:
            return None
    if body.endswith("drop"):
        return "drop"
    o = re.search(r"meta mark set meta mark \| (0x[0-9a-f]+) goto commit$", body)
    if o:
        return mark | int(o.group(1), 16)
    assert body.endswith("goto commit"), body
    return mark


def trace(d: Desired, src: str, dst: str, proto: str = "tcp", dport: Optional[int] = None,
          iif: Optional[str] = None, cgroup: Optional[str] = None, state: str = "new") -> Verdict:
    """`src` of a cgroup's process: the address it bound, or "" (the host picks).
    `state`: what conntrack says of the packet, "new" or "invalid"."""
    el = d.elements
    fam = ipaddress.ip_address(dst).version
    mark = None
    if cgroup:
        parts = cgroup.strip("/").split("/")
        for level in sorted(names.CGROUP_LEVELS, reverse=True):
            if len(parts) >= level:
                hit = dict(el.get(names.cgroup_map(level), ())).get("/".join(parts[:level]))
                if hit is not None:
                    mark = hit
                    break
        if mark is None:
            return Verdict("none")
        if state == "invalid":
            return Verdict("drop")
    else:
        src = str(ipaddress.ip_address(src))
        if iif != "lo" and _in_prefixes(src, el.get(names.EGRESS_SET[fam], ())):
            return Verdict("drop")
        by_if = dict(el.get(names.SOURCE_IF_MAP[fam], ()))
        plain = dict(el.get(names.SOURCE_MAP[fam], ()))
        if state == "invalid":
            workload_source = (src in plain or (src, None) in el.get(names.BOUND_SET[fam], ())
                               or _in_prefixes(src, el.get(names.MANAGED_SET[fam], ())))
            return Verdict("drop" if workload_source else "none")
        if (src, iif) in by_if:
            mark = by_if[(src, iif)]
        elif src in plain:
            mark = plain[src]
        elif (src, None) in el.get(names.BOUND_SET[fam], ()):
            return Verdict("drop")
        elif _in_prefixes(src, el.get(names.MANAGED_SET[fam], ())):
            return Verdict("drop")
        else:
            return Verdict("none")
    wid_mark = mark
    # chain commit: a workload's untranslated packet may not carry an egress source
    bound_egress = bool(cgroup and src and _in_prefixes(src, el.get(names.EGRESS_SET[fam], ())))
    l4 = "ipv6-icmp" if (proto == "icmp" and fam == 6) else proto
    if ((proto, dport), None) in el.get("exclude_services", ()) \
            or (l4, None) in el.get("exclude_protocols", ()) \
            or _in_prefixes(dst, el.get(names.EXCLUDE_SET[fam], ())) \
            or _in_prefixes(dst, el.get(names.MANAGED_SET[fam], ())):
        return Verdict("drop" if bound_egress else "default", wid_mark)
    for rule in d.chains[names.POLICY_CHAIN]:
        v = _policy_verdict(rule, mark, fam, dst, proto, dport, el)
        if v == "drop":
            return Verdict("drop", wid_mark)
        if v is not None:
            mark = v
            break
    else:
        mark = dict(el.get(names.ASSIGN_MAP[fam], ())).get(mark, mark)
    if mark & names.DROP_FLAG:
        return Verdict("drop", wid_mark)
    eid = (mark & names.EID_MASK) >> names.EID_SHIFT
    if eid == 0:
        return Verdict("drop" if bound_egress else "default", wid_mark)
    if fam == 6:
        return Verdict("snat", wid_mark, dict(el[names.SNAT6_MAP])[mark], None, eid)
    if proto in ("tcp", "udp"):
        addr, ports = dict(el[names.SNAT4_PORTS_MAP])[mark]
        return Verdict("snat", wid_mark, addr, ports, eid)
    return Verdict("snat", wid_mark, dict(el[names.SNAT4_ADDR_MAP])[mark], None, eid)
