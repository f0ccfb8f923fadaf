"""The allocation store under state_dir: current allocations and their history.

`allocations.json` is replaced atomically (write, fsync, rename); `history.jsonl`
is append-only, one event per line, so `who` can answer for any past time.
The store is written only after the kernel accepted a sync.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .alloc import Allocations, Event, Lease

ALLOCATIONS = "allocations.json"
HISTORY = "history.jsonl"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(s: str) -> datetime:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class Store:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)

    def exists(self) -> bool:
        return (self.dir / ALLOCATIONS).exists()

    def load(self) -> Allocations:
        try:
            return Allocations.from_json(json.loads((self.dir / ALLOCATIONS).read_text()))
        except FileNotFoundError:
            return Allocations()

    def save(self, alloc: Allocations, events: list[Event], at: Optional[str] = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        at = at or now_iso()
        if events:
            with open(self.dir / HISTORY, "a") as f:
                for e in events:
                    f.write(json.dumps({"at": at, "event": e.kind, **e.lease.to_json()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        tmp = self.dir / (ALLOCATIONS + ".tmp")
        with open(tmp, "w") as f:
            # dumps() without indent is the C encoder: json.dump(indent=...) is ~20x slower
            f.write(json.dumps(alloc.to_json(), separators=(",", ":"), sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / ALLOCATIONS)
        fd = os.open(self.dir, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def history(self) -> Iterator[dict]:
        try:
            with open(self.dir / HISTORY) as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
        except FileNotFoundError:
            return


@dataclass(frozen=True)
class Holder:
    """One hold of an address (and port block) by a workload, from the history.

    state: "held" (leased now or at that time), "lingering" (released, but
    connections translated into it still live: the block is given to nobody
    else), "drained" (released, and its last connection was found gone at
    `drained`), "released" (a release written before lingering existed).
    """

    workload: str
    ip: str
    address: str
    ports: Optional[tuple[int, int]]
    since: str
    until: Optional[str]  # released at (None: still held)
    lingering: bool = False  # the release waited for its connections to end
    drained: Optional[str] = None  # when no connection was left in it

    @property
    def state(self) -> str:
        if self.until is None:
            return "held"
        if not self.lingering:
            return "released"
        return "drained" if self.drained else "lingering"

    @property
    def end(self) -> Optional[str]:
        """When the block stopped carrying this workload's traffic (None: it still may)."""
        return (self.drained if self.lingering else self.until) if self.until else None

    def describe(self) -> str:
        ports = f" ports {self.ports[0]}-{self.ports[1]}" if self.ports else ""
        head = f"{self.workload}: {self.address}{ports} via {self.ip}, since {self.since}"
        return head + {
            "held": " (still held)",
            "released": f" until {self.until}",
            "lingering": f", released {self.until}, connections still open "
                         "(block not reused until they close)",
            "drained": f", released {self.until}, last connection closed by {self.drained}",
        }[self.state]

    def to_json(self) -> dict:
        return {"workload": self.workload, "egress_ip": self.ip, "address": self.address,
                "ports": list(self.ports) if self.ports else None,
                "since": self.since, "until": self.until, "state": self.state,
                "released": self.until, "drained": self.drained,
                "connections_open": self.state == "lingering"}


def who(history: Iterable[dict], address: str, port: Optional[int] = None,
        at: Optional[str] = None) -> list[Holder]:
    """Who held `address` (and `port`) at time `at` (default: now).

    Replays the history: an assign opens a hold, the matching release ends the
    lease; a `linger` after it keeps the hold going while the released block
    still carries connections, until `drained`. An assign of the same block
    to the same workload while it lingers continues the one hold. Matching is
    on the IPv4 and port block, or the IPv6 address.
    """
    addr = str(ipaddress.ip_address(address))
    when = parse_time(at) if at else None
    open_: dict[tuple, dict] = {}      # key -> its hold (a dict, see hold())
    released: dict[tuple, dict] = {}   # key -> its last released hold
    holds: list[dict] = []

    def matches(ev: dict) -> bool:
        if ev.get("ipv6") == addr:
            return True
        if ev.get("ipv4") != addr:
            return False
        if port is None or not ev.get("ports"):
            return True
        lo, hi = ev["ports"]
        return lo <= port <= hi

    for ev in history:
        key = (ev["workload"], ev["ip"], ev.get("ipv4"), tuple(ev.get("ports") or ()), ev.get("ipv6"))
        kind = ev["event"]
        if kind == "assign":
            h = released.pop(key, None)
            if h is not None and h["linger"] and h["drained"] is None:
                h["until"], h["linger"] = None, False  # its own block again: one hold
                open_[key] = h
            elif key not in open_ and matches(ev):
                open_[key] = {"ev": ev, "until": None, "linger": False, "drained": None}
                holds.append(open_[key])
        elif kind == "release" and key in open_:
            h = open_.pop(key)
            h["until"] = ev["at"]
            released[key] = h
        elif kind == "linger" and key in released and released[key]["until"] == ev["at"]:
            released[key]["linger"] = True
        elif kind == "drained" and key in released and released[key]["linger"]:
            released[key]["drained"] = released[key]["drained"] or ev["at"]
    out = [_holder(h["ev"], addr, h["until"], h["linger"], h["drained"]) for h in holds]
    return [h for h in out if _held_at(h, when)]


def _held_at(h: Holder, when: Optional[datetime]) -> bool:
    if when is None:
        return h.end is None
    return parse_time(h.since) <= when and (h.end is None or when < parse_time(h.end))


def _holder(ev: dict, addr: str, until: Optional[str], linger: bool = False,
            drained: Optional[str] = None) -> Holder:
    return Holder(ev["workload"], ev["ip"], addr,
                  tuple(ev["ports"]) if ev.get("ports") and ev.get("ipv4") == addr else None,  # type: ignore[arg-type]
                  ev["at"], until, linger, drained)


__all__ = ["Store", "who", "Holder", "Lease", "now_iso"]
