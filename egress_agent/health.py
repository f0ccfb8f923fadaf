"""Conditions, Kubernetes style, for `status`: per egress IP and per workload.

A condition is a type, a status (True/False), a reason (CamelCase, for
scripts), a message (for people) and `since`, when its status last changed.
The daemon knows `since`: it writes the transitions it saw, with its own state
(last sync, last error, last config load), to <state_dir>/status.json after
every sync and every config load. `status` computes the conditions from the
config, the store and the host as they are, and takes `since` from that file.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from .config import Config
from .hoststate import HostState, Usable

STATUS_FILE = "status.json"
FAMILIES = {4: "IPv4", 6: "IPv6"}


def condition(type_: str, status: bool, reason: str, message: str) -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "since": None}


def ip_conditions(cfg: Config, usable: Usable, host: Optional[HostState] = None) -> dict:
    """egress IP id -> its conditions: `IPv4Usable`, `IPv6Usable` (for the families
    it has) and `Draining`. With `host`, an unusable family says why."""
    out = {}
    for ip in cfg.ips_here():
        conds = []
        for fam, name in FAMILIES.items():
            addr = ip.ipv4 if fam == 4 else ip.ipv6
            if addr is None:
                continue
            if usable.ok(ip, fam):
                conds.append(condition(f"{name}Usable", True, "Usable",
                                       f"{addr} is on the host: new connections leave from it"))
                continue
            if ip.state != "active":
                reason, why = "Draining", "state: draining takes no new connections"
            elif host is not None and ip.via is not None and not host.link_up(ip.via.dev):
                reason, why = "LinkDown", f"its link {ip.via.dev} is down"
            elif host is not None and not host.reaches(ip):
                reason, why = "GatewayUnreachable", (f"its gateway {ip.via.gateway} does not "
                                                     f"answer the probe")
            else:
                reason, why = "AddressMissing", f"{addr} is not on the host (or its link is down)"
            conds.append(condition(f"{name}Usable", False, reason,
                                   f"{why}; its workloads follow their fallback"))
        draining = ip.state == "draining"
        conds.append(condition("Draining", draining, "StateDraining" if draining else "StateActive",
                               "existing connections finish, new ones go elsewhere" if draining
                               else "takes new connections"))
        out[ip.id] = conds
    return out


# types whose True is the bad news (the others: True is the normal state)
_TRUE_IS_NEWS = {"Draining", "FailedOver"}


def workload_conditions(cfg: Config, w, own_ip: Optional[str], leases: list[dict],
                        ip_conds: dict, cgroup_ok: Callable[[object], bool]) -> list[dict]:
    """`FailedOver` (a temporary block on another IP, or the fallback, while its own IP
    is unusable: since then), and `CgroupPresent` for a cgroup workload."""
    out = []
    temp = [lease for lease in leases if lease.get("temporary")]
    down = [c for c in ip_conds.get(own_ip, []) if c["type"].endswith("Usable") and not c["status"]]
    fams = " and ".join(c["type"][:-len("Usable")] for c in down)
    if temp:
        c = condition("FailedOver", True, "TemporaryBlock",
                      f"{own_ip}'s {fams or 'address'} is unusable: a temporary block on "
                      + ", ".join(lease["ip"] for lease in temp))
    elif down and not leases:
        c = condition("FailedOver", True, "Fallback",
                      f"{own_ip} is unusable and no other IP of app {w.app} is: "
                      f"unavailable={cfg.defaults.unavailable}")
    else:
        c = condition("FailedOver", False, "OwnIP", "leaves from its own egress IP"
                      if leases else "no egress IP of its own (policies or the host's default)")
    if c["status"] and down:  # it failed over when its IP went down
        c["since"] = min((d["since"] for d in down if d["since"] is not None), default=None)
    out.append(c)
    if w.cgroup:
        ok = cgroup_ok(w)
        out.append(condition("CgroupPresent", ok, "CgroupFound" if ok else "CgroupMissing",
                             w.cgroup if ok else f"{w.cgroup} does not exist: nothing of it is "
                             "matched until it appears"))
    return out


def cgroup_check(daemon: Optional[dict], exists: Callable[[str], bool]) -> Callable[[object], bool]:
    """Whether a workload's cgroup exists: as the running daemon saw it at its last
    sync (it may see another cgroup mount than this process), else on this host."""
    if not daemon or not daemon["daemon"].get("running"):
        return lambda w: exists(w.cgroup)
    missing = {k.split("/")[1] for k, v in daemon["conditions"].items()
               if k.startswith("workload/") and k.endswith("/CgroupPresent") and not v["status"]}
    return lambda w: w.id not in missing


def condition_lines(conds: list[dict]) -> list[str]:
    """The conditions that are news (not the normal state), one line each."""
    return [f"{c['type']}={c['status']} {c['reason']}"
            + (f" since {iso(c['since'])}" if c["since"] else "") + f": {c['message']}"
            for c in conds if c["status"] == (c["type"] in _TRUE_IS_NEWS)]


def daemon_lines(d: dict, state_dir: str) -> list[str]:
    if not d.get("pid"):
        return [f"daemon: no status in {state_dir}/{STATUS_FILE}: `egress-agent run` has not "
                "run with this state_dir (what follows is read from the kernel and the store)"]
    out = [f"daemon: {'running' if d['running'] else 'NOT RUNNING'} (pid {d['pid']}, "
           f"started {iso(d.get('started'))})"]
    sync = d.get("last_sync")
    if sync:
        out.append(f"last sync: {iso(sync['time'])} {sync['trigger']} "
                   + (f"{sync['mode']} ok in {sync['duration_ms']} ms" if sync["ok"]
                      else f"FAILED: {sync['error']}"))
    load = d.get("config_load")
    if load:
        out.append(f"config: valid, loaded {iso(load['time'])}" if load["ok"] else
                   f"config: INVALID since {iso(load['time'])} ({load['problems'][0] if load['problems'] else '?'}); "
                   + (f"the state of {iso(load['last_ok_time'])} stays applied" if load.get("last_ok_time")
                      else "no valid config loaded yet: nothing applied by this daemon"))
    err = d.get("last_error")
    if err:
        out.append(f"last error: {iso(err['time'])} {err['message']}")
    return out


class Tracker:
    """When each condition last changed status: (kind, id, type) -> (status, since)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], tuple[bool, float]] = {}

    def observe(self, kind: str, conds: dict, now: float) -> None:
        """`conds`: object id -> conditions, for every object of `kind`; objects and
        types no longer there are forgotten."""
        keep = set()
        for oid, cs in conds.items():
            for c in cs:
                key = (kind, oid, c["type"])
                keep.add(key)
                old = self.seen.get(key)
                if old is None or old[0] != c["status"]:
                    self.seen[key] = (c["status"], now)
        for key in [k for k in self.seen if k[0] == kind and k not in keep]:
            del self.seen[key]

    def to_json(self) -> dict:
        return {f"{k}/{oid}/{t}": {"status": st, "since": since}
                for (k, oid, t), (st, since) in sorted(self.seen.items())}


def write(state_dir: str, daemon: dict, tracker: Tracker) -> None:
    """Replace status.json at once (a reader never sees half a file)."""
    path = os.path.join(state_dir, STATUS_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"daemon": daemon, "conditions": tracker.to_json()}, f)
    os.replace(tmp, path)


def read(state_dir: str) -> Optional[dict]:
    """What the daemon wrote, with `running` set from its pid; None: no file."""
    try:
        with open(os.path.join(state_dir, STATUS_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    d = data.get("daemon", {})
    d["running"] = _alive(d.get("pid"))
    return data


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return b"egress" in f.read()
    except (OSError, TypeError, ValueError):
        return False


def with_since(kind: str, oid: str, conds: list[dict], known: dict) -> list[dict]:
    """Fill each condition's `since` from the daemon's file, where the daemon saw
    the same status (an older or newer view of it says nothing)."""
    for c in conds:
        seen = known.get(f"{kind}/{oid}/{c['type']}")
        if seen and seen["status"] == c["status"]:
            c["since"] = seen["since"]
    return conds


def iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
