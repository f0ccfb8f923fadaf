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
from typing import Iterator, Optional

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
    workload: str
    ip: str
    address: str
    ports: Optional[tuple[int, int]]
    since: str
    until: Optional[str]  # None: still held

    def to_json(self) -> dict:
        return {"workload": self.workload, "egress_ip": self.ip, "address": self.address,
                "ports": list(self.ports) if self.ports else None,
                "since": self.since, "until": self.until}


def who(history: Iterator[dict], address: str, port: Optional[int] = None,
        at: Optional[str] = None) -> list[Holder]:
    """Who held `address` (and `port`) at time `at` (default: now).

    Replays the history: an assign opens an interval, the matching release
    closes it. Matching is on the IPv4 and port block, or the IPv6 address.
    """
    addr = str(ipaddress.ip_address(address))
    when = parse_time(at) if at else None
    open_: dict[tuple, dict] = {}
    out: list[Holder] = []

    def matches(ev: dict) -> bool:
        if ev.get("ipv6") == addr:
            return True
        if ev.get("ipv4") != addr:
            return False
        if port is None or not ev.get("ports"):
            return True
        lo, hi = ev["ports"]
        return lo <= port <= hi

    def held_at(since: str, until: Optional[str]) -> bool:
        if when is None:
            return until is None
        return parse_time(since) <= when and (until is None or when < parse_time(until))

    for ev in history:
        key = (ev["workload"], ev["ip"], ev.get("ipv4"), tuple(ev.get("ports") or ()), ev.get("ipv6"))
        if ev["event"] == "assign":
            open_[key] = ev
        elif ev["event"] == "release" and key in open_:
            start = open_.pop(key)
            if matches(start) and held_at(start["at"], ev["at"]):
                out.append(_holder(start, addr, ev["at"]))
    for ev in open_.values():
        if matches(ev) and held_at(ev["at"], None):
            out.append(_holder(ev, addr, None))
    return out


def _holder(ev: dict, addr: str, until: Optional[str]) -> Holder:
    return Holder(ev["workload"], ev["ip"], addr,
                  tuple(ev["ports"]) if ev.get("ports") and ev.get("ipv4") == addr else None,  # type: ignore[arg-type]
                  ev["at"], until)


__all__ = ["Store", "who", "Holder", "Lease", "now_iso"]
