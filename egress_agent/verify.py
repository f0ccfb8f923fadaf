"""verify: ask an echo endpoint which source it saw, compare with the assignment.

The expectation comes from `explain` on the live allocations and host state;
the observation from a probe run in the workload's context (its cgroup, or
the machine's network namespace in the lab). An echo endpoint answers a TCP
connection or UDP datagram with one line: "<source address> <source port>".
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from . import names
from .argtypes import endpoint_text
from .config import Config
from .lab.netns import nsenter_prefix


@dataclass(frozen=True)
class Check:
    label: str
    workload: Optional[str]   # None: not a workload (e.g. a spoofer)
    src: str                  # source address, or cgroup path
    dst: str
    port: int
    proto: str = "tcp"
    iif: Optional[str] = None
    machine: Optional[str] = None  # lab namespace name suffix, when run in the lab
    cgroup: Optional[str] = None
    bind: Optional[str] = None     # source address to bind (spoofing test)


@dataclass(frozen=True)
class Row:
    check: Check
    expected: str
    observed: str
    ok: bool
    reason: str

    def to_json(self) -> dict:
        c = self.check
        return {"check": c.label, "workload": c.workload, "destination": f"{c.dst}:{c.port}/{c.proto}",
                "expected": self.expected, "observed": self.observed, "match": self.ok,
                "reason": self.reason}


Seen = Optional[tuple[str, int]]


def judge(check: Check, expl, seen: Seen, host_defaults: frozenset[str]) -> Row:
    if expl.action == "snat":
        ports = f":{expl.ports[0]}-{expl.ports[1]}" if expl.ports else ""
        expected = f"{expl.source_address}{ports}"
        ok = seen is not None and seen[0] == expl.source_address and (
            not expl.ports or expl.ports[0] <= seen[1] <= expl.ports[1])
    elif expl.action == "drop":
        expected, ok = "nothing (drop)", seen is None
    elif expl.action == "default":
        expected = "host default address"
        ok = seen is not None and (not host_defaults or seen[0] in host_defaults)
    else:
        expected, ok = "not managed", True
    observed = "no answer" if seen is None else endpoint_text(*seen)
    return Row(check, expected, observed, ok, expl.reason)


def run_checks(cfg: Config, checks: list[Check], probe: Callable[[Check], Seen],
               explain_fn, host_defaults: frozenset[str] = frozenset(),
               progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    rows = []
    for i, c in enumerate(checks, 1):
        if progress:
            progress(f"[{i}/{len(checks)}] {c.label}")
        rows.append(judge(c, explain_fn(c), probe(c), host_defaults))
    return rows


def print_rows(rows: list[Row]) -> None:
    w = max([len(r.check.label) for r in rows] + [5])
    print(f"{'CHECK':{w}}  {'EXPECTED':26} {'OBSERVED':26} MATCH")
    for r in rows:
        print(f"{r.check.label:{w}}  {r.expected:26} {r.observed:26} {'yes' if r.ok else 'NO'}")
    bad = sum(not r.ok for r in rows)
    print(f"\n{len(rows) - bad} of {len(rows)} match" + ("" if not bad else f"; {bad} MISMATCH"))


def probe_command(dst: str, port: int, proto: str, bind: Optional[str] = None,
                  timeout: float = 2.0) -> list[str]:
    cmd = [sys.executable, "-m", "egress_agent.lab.echo", "probe", f"--{proto}", dst, str(port),
           "--json", "--timeout", str(timeout)]
    return cmd + (["--source", bind] if bind else [])


def probe(c: Check, lab_prefix: Optional[str] = None) -> Seen:
    """What the echo endpoint saw of a probe from the check's context: its cgroup,
    or its machine's namespace in lab `lab_prefix`."""
    if c.cgroup:
        return run_probe(cgroup_prefix(c.cgroup), c)
    return run_probe(nsenter_prefix(names.lab_netns(lab_prefix, c.machine)), c)


def run_probe(prefix: list[str], c: Check) -> Seen:
    out = subprocess.run(prefix + probe_command(c.dst, c.port, c.proto, c.bind),
                         capture_output=True, text=True, timeout=30, cwd="/",
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        r = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"probe did not run: {out.stderr.strip()}") from None
    return (r["source_address"], r["source_port"]) if r.get("ok") else None


def cgroup_prefix(path: str) -> list[str]:
    from .cgroupfs import VIEW, cgroup2_root
    procs = os.path.join(cgroup2_root() or VIEW, path, "cgroup.procs")
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs]


def workload_checks(cfg: Config, dst: str, port: int, proto: str,
                    lab_prefix: Optional[str]) -> list[Check]:
    out = []
    fam = ipaddress.ip_address(dst).version
    for w in cfg.workloads:
        if w.cgroup:
            out.append(Check(f"{w.id} (cgroup)", w.id, w.cgroup, dst, port, proto, cgroup=w.cgroup))
        elif lab_prefix:
            src = next((s for s in w.source if ipaddress.ip_address(s).version == fam), None)
            if src:
                out.append(Check(f"{w.id}", w.id, src, dst, port, proto, iif=w.interface,
                                 machine=w.id))
    return out
