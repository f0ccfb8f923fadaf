"""Small helpers for the agent tests: run the CLI in the lab's host namespace,
read the kernel there, and count what reaches the origin.

Ground truth stays with the lab: what the echo server answered (Lab.probe,
Lab.hold) and what the origin namespace received (OriginCounters).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys

from egress_agent import names
from egress_agent.lab.cli import demo_config_text, write_demo_config
from egress_agent.lab.echo import child_env
from egress_agent.lab.netns import ns_exec
from egress_agent.lab.topology import Lab

HOST_DEFAULT4 = "203.0.113.2"
HOST_DEFAULT6 = "2001:db8:a::2"


# --- the agent's command line ----------------------------------------------------

def agent(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`egress-agent ARGS...` in the lab's host namespace (cgroup2 at /sys/fs/cgroup)."""
    cmd = lab.agent_prefix() + [sys.executable, "-m", "egress_agent.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env(), cwd="/")
    if check and proc.returncode != 0:
        raise AssertionError(f"egress-agent {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def agent_json(lab: Lab, *args: str) -> dict:
    return json.loads(agent(lab, *args, "--json").stdout)


def apply(lab: Lab, config: str) -> dict:
    """One `apply --json`; the SyncResult as a dict."""
    return agent_json(lab, "apply", "-c", config)


def status(lab: Lab, config: str) -> dict:
    """`status --json`, without the live usage ratio (it moves with traffic)."""
    st = agent_json(lab, "status", "-c", config)
    for w in st["workloads"]:
        w.pop("highest_ratio", None)
    return st


def explain(lab: Lab, config: str, src: str, dst: str, port: int, proto: str,
            iif: str | None = None) -> dict:
    args = ["explain", "-c", config, src, dst, "--port", str(port), "--proto", proto]
    return agent_json(lab, *args, *(["--iif", iif] if iif else []))


def leases(st: dict) -> dict[tuple[str, str], dict]:
    """(workload, egress IP id) -> lease, from `status --json`."""
    return {(l["workload"], l["ip"]): l for w in st["workloads"] for l in w["leases"]}


def app_lease(st: dict, workload: str) -> dict:
    """The lease of `workload` on the app IP it was given."""
    w = next(w for w in st["workloads"] if w["id"] == workload)
    assert w["app_ip"], f"{workload} has no app IP: {w}"
    return leases(st)[(workload, w["app_ip"])]


def in_block(seen, lease: dict) -> bool:
    """The echo server saw the lease's IPv4 and a port inside its block."""
    lo, hi = lease["ports"]
    return seen is not None and seen.address == lease["ipv4"] and lo <= seen.port <= hi


# --- configs ---------------------------------------------------------------------

def demo_config(lab: Lab) -> str:
    """lab/demo.yaml for this lab (also creates the cgroup workload's cgroup)."""
    return write_demo_config(lab)


def write_variant(lab: Lab, name: str, text: str) -> str:
    """Write a config variant next to the demo config; its path."""
    path = os.path.join(lab.state_dir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def edited(lab: Lab, *replacements: tuple[str, str]) -> str:
    """The demo config text with each (old, new) replaced exactly once."""
    text = demo_config_text(lab.prefix)
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} is not unique in demo.yaml"
        text = text.replace(old, new)
    return text


def line_of(text: str, fragment: str) -> int:
    """1-based number of the only line of `text` that contains `fragment`."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(found) == 1, (fragment, found)
    return found[0]


# --- the host namespace -----------------------------------------------------------

def host(lab: Lab, *cmd: str) -> str:
    """Run a command in the lab's host namespace; its stdout."""
    return ns_exec(lab.host, list(cmd)).stdout


def our_table(lab: Lab) -> str:
    return host(lab, "nft", "list", "table", "inet", names.TABLE_NAME)


def has_our_table(lab: Lab) -> bool:
    return f"table inet {names.TABLE_NAME}\n" in host(lab, "nft", "list", "tables")


def ip_rules(lab: Lab) -> str:
    return host(lab, "ip", "rule", "show") + host(lab, "ip", "-6", "rule", "show")


def without_our_rules(rules: str) -> str:
    """`ip rule show` text minus the lines at the agent's priorities."""
    return "".join(line + "\n" for line in rules.splitlines()
                   if not names.is_our_priority(int(line.split(":")[0])))


def our_rule_lines(rules: str) -> list[str]:
    return [l for l in rules.splitlines() if names.is_our_priority(int(l.split(":")[0]))]


def our_route_lines(lab: Lab) -> list[str]:
    """Routes in the agent's table ids, both families."""
    out = []
    for fam in ("-4", "-6"):
        for line in host(lab, "ip", fam, "route", "show", "table", "all").splitlines():
            m = re.search(r"\btable (\d+)\b", line)
            if m and names.is_our_table(int(m.group(1))):
                out.append(line)
    return out


def drop_counters(lab: Lab, family: str = "ip") -> dict[str, int]:
    """Packets counted by the drop rules of chain classify_forward for `family`
    ("ip" or "ip6"), by comment."""
    data = json.loads(host(lab, "nft", "-j", "list", "chain", "inet", names.TABLE_NAME,
                           "classify_forward"))
    out = {}
    for item in data["nftables"]:
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        exprs = rule["expr"]
        proto = exprs[0]["match"]["left"]["payload"]["protocol"]
        packets = next(e["counter"]["packets"] for e in exprs if "counter" in e)
        if proto == family:
            out[rule["comment"]] = packets
    return out


SPOOF_DROP = "workload source on another interface"
UNKNOWN_DROP = "unknown source in a managed network"


# --- the origin namespace ---------------------------------------------------------

class OriginCounters:
    """Named nft counters in a table of our own in the ORIGIN namespace, at
    prerouting priority raw: they count what arrives on the origin's links
    before reverse-path filtering or any socket could discard it. The table
    lives and dies with the lab's origin namespace."""

    def __init__(self, lab: Lab, **matches: str):
        """`matches`: counter name (not an nft keyword such as `udp`) -> match."""
        self.lab = lab
        self.table = f"eatest_{secrets.token_hex(3)}"
        counters = "".join(f"  counter {n} {{}}\n" for n in matches)
        rules = "".join(f"    {m} counter name {n}\n" for n, m in matches.items())
        ns_exec(lab.origin, ["nft", "-f", "-"], input=(
            f"table inet {self.table} {{\n{counters}"
            "  chain pre {\n    type filter hook prerouting priority raw; policy accept;\n"
            f"{rules}  }}\n}}\n"))

    def read(self) -> dict[str, int]:
        data = json.loads(ns_exec(self.lab.origin, ["nft", "-j", "list", "counters", "table",
                                                    "inet", self.table]).stdout)
        return {i["counter"]["name"]: i["counter"]["packets"]
                for i in data["nftables"] if "counter" in i}

    def delete(self) -> None:
        ns_exec(self.lab.origin, ["nft", "delete", "table", "inet", self.table], check=False)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def ping(lab: Lab, machine: str, dst: str, source: str | None = None,
         wait: float = 2.0) -> bool:
    """One ICMP echo from `machine`'s namespace; True if answered."""
    cmd = ["ping", "-n", "-q", "-c1", f"-W{wait:g}", dst] + (["-I", source] if source else [])
    return ns_exec(lab.ns(machine), cmd, check=False).returncode == 0
