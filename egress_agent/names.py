"""Every name, mark bit, table id and rule priority the agent owns.

The skeleton (rules/skeleton.nft) declares the table's chains, sets and maps;
the Python code names them only through this module (tests/unit/test_names.py
checks that both agree).

One module so that what the agent touches is recognisable in `nft list`,
`ip rule` and `ip route show table all`, and so that nothing outside these
ranges is ever read or written (docs/design.md, "Kernel objects").
"""

from __future__ import annotations

TABLE_FAMILY = "inet"
TABLE_NAME = "egress_agent"
TABLE = f"{TABLE_FAMILY} {TABLE_NAME}"
# a gateway host's gate (gateway.py): keepalived's notify owns it, not the daemon
GATE_TABLE_NAME = "egress_agent_gate"
GATE_TABLE = f"{TABLE_FAMILY} {GATE_TABLE_NAME}"

# --- packet / conntrack mark layout -------------------------------------------
# bits  0-19  workload id (wid), 1..WID_MAX; 0 means "not a workload"
# bits 20-27  egress id (eid) of the chosen egress IP, 1..EID_MAX; 0 = host default
# bit  29     "passed the agent's prerouting": set on packets from managed sources
#             after classification, cleared again in forward (the SNAT maps are
#             keyed by the lease mark without it); the guard ip rule below
#             prohibits forwarding a managed source's packet that lacks it
# bit  30     "classified by egress-agent": set in the conntrack mark of every
#             connection the agent decided, so a conntrack dump can be filtered
#             by the kernel (CTA_MARK/CTA_MARK_MASK) to the agent's own flows
# bit  31     drop decision (never stored in conntrack: the first packet is dropped)
# The agent owns the whole mark of connections that come from workloads; marks
# of all other traffic are left alone.
WID_BITS = 20
WID_MASK = (1 << WID_BITS) - 1  # 0x000fffff
WID_MAX = WID_MASK
EID_SHIFT = 20
EID_MASK = 0xFF << EID_SHIFT  # 0x0ff00000
EID_MAX = 0xFF
DROP_FLAG = 0x80000000
OURS_FLAG = 0x40000000
SEEN_FLAG = 0x20000000


def lease_mark(wid: int, eid: int) -> int:
    """The mark a connection of workload `wid` carries when it leaves via `eid`."""
    if not 1 <= wid <= WID_MAX:
        raise ValueError(f"workload id {wid} outside 1..{WID_MAX}")
    if not 0 <= eid <= EID_MAX:
        raise ValueError(f"egress id {eid} outside 0..{EID_MAX}")
    return (eid << EID_SHIFT) | wid


def split_mark(mark: int) -> tuple[int, int]:
    return mark & WID_MASK, (mark & EID_MASK) >> EID_SHIFT


# --- policy routing ------------------------------------------------------------
# One route table and one ip rule per egress IP that has `via`. Table ids and
# priorities are eid + base, so `ip rule` shows e.g. "7101: from all fwmark
# 0x100000/0xff00000 lookup 7101" for eid 1.
ROUTE_TABLE_BASE = 7100
RULE_PRIORITY_BASE = 7100
# The guard: `from PREFIX fwmark 0/SEEN_FLAG prohibit`, one per managed_sources
# prefix, before every lookup rule. nft does not flush ip rules: while our
# table is gone (`nft flush ruleset`, `nft delete table`) until the agent has
# put it back, a workload's packets are refused, never sent with the host's
# address or their inside source.
# The host's own packets are routed before any hook can mark them, so the
# host's addresses inside managed prefixes (a gateway address on the
# workloads' link) skip the guard: `from ADDR goto ANCHOR`, where ANCHOR is a
# `nop` rule of ours right after the guard (a goto needs a rule at its target).
EXEMPT_PRIORITY = RULE_PRIORITY_BASE - 1
GUARD_PRIORITY = RULE_PRIORITY_BASE
ANCHOR_PRIORITY = RULE_PRIORITY_BASE + 1


def route_table(eid: int) -> int:
    return ROUTE_TABLE_BASE + eid


def rule_priority(eid: int) -> int:
    return RULE_PRIORITY_BASE + eid


def rule_fwmark(eid: int) -> tuple[int, int]:
    """(fwmark, mask) of the ip rule that sends egress `eid` to its table."""
    return eid << EID_SHIFT, EID_MASK


def is_our_table(table_id: int) -> bool:
    return ROUTE_TABLE_BASE + 1 <= table_id <= ROUTE_TABLE_BASE + EID_MAX


def is_our_priority(priority: int) -> bool:
    """The guard's priorities and the lookup rules' priorities."""
    return EXEMPT_PRIORITY <= priority <= RULE_PRIORITY_BASE + EID_MAX


# --- nftables object names -----------------------------------------------------
# cgroupv2 matching needs the ancestor level in the expression
# (`socket cgroupv2 level N`), so there is one map per level.
CGROUP_LEVELS = range(1, 9)


def cgroup_map(level: int) -> str:
    return f"cgroup_l{level}"


POLICY_SET_PREFIX = "policy_"


def policy_set(index: int) -> str:
    """Named set of the workload ids one policy applies to (by position)."""
    return f"{POLICY_SET_PREFIX}{index}_workloads"


def is_policy_set(name: str) -> bool:
    """A set the config's policies declare per sync (not part of the skeleton)."""
    return name.startswith(POLICY_SET_PREFIX)


# The set whose comment carries the skeleton's version (nft 1.0.6 lists set
# comments in JSON, not table comments).
SKELETON_SET = "skeleton"


# The static maps and sets of the skeleton, by family where it matters.
SOURCE_MAP = {4: "source4", 6: "source6"}            # saddr : wid-mark
SOURCE_IF_MAP = {4: "source4_if", 6: "source6_if"}    # saddr . iifname : wid-mark
BOUND_SET = {4: "bound4", 6: "bound6"}                # sources bound to an interface
MANAGED_SET = {4: "managed4", 6: "managed6"}          # managed networks (intervals)
EGRESS_SET = {4: "egress4", 6: "egress6"}             # every egress address/range (intervals)
GATEWAY_SET = {4: "gw_egress4", 6: "gw_egress6"}      # a gateway host's egress addresses (intervals)
UNTRANSLATED_SET = "untranslated"                     # egress id marks of remote IPs (a gateway's)
EXCLUDE_SET = {4: "exclude4", 6: "exclude6"}          # excluded destinations
EXCLUDE_SERVICES_SET = "exclude_services"             # proto . port (DNS)
EXCLUDE_PROTOCOLS_SET = "exclude_protocols"           # proto (ICMP)
ASSIGN_MAP = {4: "assign4", 6: "assign6"}             # wid-mark : lease mark (default route)
SNAT4_PORTS_MAP = "snat4"                            # lease mark : addr . port block
SNAT4_ADDR_MAP = "snat4_addr"                        # lease mark : addr (ICMP and others)
SNAT6_MAP = "snat6"                                  # lease mark : ipv6 addr
POLICY_CHAIN = "policies"
LIMIT_CHAIN = "limits"
COMMIT_CHAIN = "commit"   # a decided packet's last stop: marks its connection as ours
REFUSE_CHAIN = "refuse"   # a connection with no free port in its block is refused here
# Chains whose rules the agent writes (flushed and refilled in one batch when
# their rules change); every other chain is the static skeleton.
GENERATED_CHAINS = (POLICY_CHAIN, LIMIT_CHAIN)
FLOWS4_SET = "flows4"                # per lease . destination: connection counts
REFUSED_SET = "refused_ports"        # per lease . protocol: refusals (block full)


# --- one agent per network namespace ---------------------------------------------
def lock_socket(netns: str) -> bytes:
    """The abstract unix socket the daemon holds while it runs in `netns` (nslock.py)."""
    return b"\0egress-agent/" + netns.encode()


# --- the lab ------------------------------------------------------------------------
# `egress-agent lab` builds one namespace per role; `verify --lab PREFIX` probes
# from the machines' namespaces.
def lab_netns(prefix: str, name: str) -> str:
    """Namespace of lab role `name` ("host", "origin" or a machine like "m42")."""
    return f"{prefix}-{name}"


def lab_cgroup(prefix: str) -> str:
    """The lab's local cgroup workload, relative to the cgroup2 root."""
    return f"egress-lab-{prefix}/app.service"
