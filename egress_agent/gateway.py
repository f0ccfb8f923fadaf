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

import json
import os
import shlex
import subprocess
import time
from typing import Callable, Optional

from . import names

ROLES = ("primary", "backup", "fault")
GATE = names.GATE_TABLE
ROLE_FILE = "gateway-role.json"  # in state_dir: what `status` shows


def gate_batch(closed: bool) -> str:
    """One nft batch that leaves the gate open (no table) or closed, whatever it
    was. Closed, it drops every new connection of a workload: after the agent's
    prerouting (priority mangle) has classified it, a workload's packet carries its
    id in the mark. So the gate needs nothing of the config, and keepalived's
    notify can be a shell script (`notify_script`), milliseconds instead of a
    Python start."""
    out = [f"add table {GATE}", f"delete table {GATE}"]
    if closed:
        out += [f"table {GATE} {{",
                "  chain prerouting {",
                "    type filter hook prerouting priority mangle + 5; policy accept;",
                f"    ct state new meta mark & {names.WID_MASK:#010x} != 0 counter drop "
                f'comment "standby gateway: new connections wait for the active one"',
                "  }", "}"]
    return "\n".join(out) + "\n"


# conntrackd's commands for each role, in order (its primary-backup.sh); the gate
# opens after the commit and closes before the resync request
_BEFORE = {"primary": ("-c",), "backup": (), "fault": ()}
_AFTER = {"primary": ("-f", "-R", "-B"), "backup": ("-n",), "fault": ("-n",)}


def set_role(state_dir: str, role: str, run_nft: Callable[[str], None],
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
    run_nft(gate_batch(closed=role != "primary"))
    ctd(_AFTER[role])
    _write_role(state_dir, role)
    return problems


def notify_script(state_dir: str, conntrackd: str) -> str:
    """keepalived's notify for one gateway host (`notify_script primary|backup|fault`):
    what `set_role` does, in sh, with the same batches and the same order."""
    def ctd(flags: tuple[str, ...]) -> list[str]:
        return [f"  conntrackd -C {shlex.quote(conntrackd)} {f} || rc=1" for f in flags]

    def role(r: str) -> list[str]:
        batch = gate_batch(closed=r != "primary")
        return [f"{r})", *ctd(_BEFORE[r]), f"  nft -f - <<'EOF' || rc=1", batch.rstrip(), "EOF",
                *ctd(_AFTER[r]), "  ;;"]

    role_file = shlex.quote(os.path.join(state_dir, ROLE_FILE))
    return "\n".join([
        "#!/bin/sh",
        "# keepalived's notify for egress-agent's gate (egress-agent gateway script)",
        "rc=0",
        'case "$1" in',
        *role("primary"), *role("backup"), *role("fault"),
        '*) echo "usage: $0 primary|backup|fault" >&2; exit 2 ;;',
        "esac",
        f'printf \'{{"role": "%s", "since": %s}}\\n\' "$1" "$(date +%s.%N)" > {role_file}.tmp '
        f"&& mv {role_file}.tmp {role_file}",
        "exit $rc", ""])


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
