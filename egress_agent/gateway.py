"""A gateway host's role in its pair: keepalived's notify (docs/gateway.md).

keepalived runs `egress-agent gateway primary|backup|fault -c CONFIG
--conntrackd-config FILE` on every VRRP transition (pair.keepalived_conf). The
gate is a table of its own, `inet egress_agent_gate`: while closed it drops the
new connections of remote workloads (their tunnels' interfaces and the managed
sources). A host that has just become the active gateway holds the egress
address before conntrackd has committed the replica of what the other one
translated; a UDP datagram of a held flow would meanwhile look new here and be
given a fresh mapping that collides with the replica's. So, as conntrackd's own
primary-backup.sh does:

- primary: commit the replica (`conntrackd -c`), open the gate, then flush the
  caches, resync with the kernel and send the other host a bulk update (-f, -R, -B);
- backup, fault: close the gate, then ask the active one for a resync (-n).

The gate's table is not the daemon's: the daemon never rewrites it and its
drift watch ignores it; `teardown` removes it with the agent's own table.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from typing import Callable, Optional

from . import names
from .config import Config

ROLES = ("primary", "backup", "fault")
GATE = names.GATE_TABLE
ROLE_FILE = "gateway-role.json"  # in state_dir: what `status` shows


def gate_batch(cfg: Config, closed: bool) -> str:
    """One nft batch that leaves the gate open (no table) or closed, whatever it was."""
    out = [f"add table {GATE}", f"delete table {GATE}"]
    if not closed:
        return "\n".join(out) + "\n"
    ifaces = sorted({w.interface for w in cfg.workloads if w.interface})
    nets = {4: [], 6: []}
    for n in cfg.managed_sources:
        net = ipaddress.ip_network(str(n), strict=False)
        nets[net.version].append(net.with_prefixlen)
    why = 'comment "standby gateway: new connections wait for the active one"'
    rules = [f"ct state new iifname {{ {', '.join(json.dumps(i) for i in ifaces)} }} "
             f"counter drop {why}"] if ifaces else []
    rules += [f"ct state new {fam} saddr {{ {', '.join(v)} }} counter drop {why}"
              for fam, v in (("ip", nets[4]), ("ip6", nets[6])) if v]
    out += [f"table {GATE} {{",
            "  chain prerouting {",
            "    type filter hook prerouting priority mangle - 5; policy accept;",
            *[f"    {r}" for r in rules],
            "  }", "}"]
    return "\n".join(out) + "\n"


# conntrackd's commands for each role, in order (its primary-backup.sh); the gate
# opens after the commit and closes before the resync request
_BEFORE = {"primary": ("-c",), "backup": (), "fault": ()}
_AFTER = {"primary": ("-f", "-R", "-B"), "backup": ("-n",), "fault": ("-n",)}


def set_role(cfg: Config, role: str, run_nft: Callable[[str], None],
             conntrackd: Optional[str] = None,
             run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Take `role`: conntrackd's commands around the gate; the problems met (a
    conntrackd command that failed does not keep the gate as it was: a closed gate
    on the active gateway would be an outage)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    problems: list[str] = []

    def ctd(flags: tuple[str, ...]) -> None:
        for flag in flags if conntrackd else ():
            p = run(["conntrackd", "-C", conntrackd, flag], capture_output=True, text=True,
                    timeout=30)
            if p.returncode != 0:
                problems.append(f"conntrackd -C {conntrackd} {flag} exited {p.returncode}: "
                                f"{(p.stderr or p.stdout).strip()[:300]}")

    ctd(_BEFORE[role])
    run_nft(gate_batch(cfg, closed=role != "primary"))
    ctd(_AFTER[role])
    _write_role(cfg.state_dir, role)
    return problems


def _write_role(state_dir: str, role: str) -> None:
    os.makedirs(state_dir, exist_ok=True)
    tmp = os.path.join(state_dir, f".{ROLE_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"role": role, "since": time.time()}, f)
    os.replace(tmp, os.path.join(state_dir, ROLE_FILE))


def read_role(state_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(state_dir, ROLE_FILE)) as f:
            d = json.load(f)
        return d if isinstance(d, dict) and d.get("role") in ROLES else None
    except (OSError, ValueError):
        return None
