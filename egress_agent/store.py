"""The allocation store under state_dir: current allocations and their history.

`allocations.json` is replaced atomically (a temporary file unique to the
writer, fsync, rename). It is validated on load as strictly as the config; a
file that does not parse or does not validate raises `StoreCorrupt` and
nothing else, so the caller can move it aside (`quarantine`) and adopt the
kernel's live state instead of failing every sync.

`history.jsonl` is append-only, one event per line, so `who` can answer for
any past time. An append that a full disk or a crash cut short leaves a torn
last line: the next append first ends it with a newline, and readers skip
(and count) every line that is not a valid event.

The store is written only after the kernel accepted a sync; a failed write
never changes what the agent believes the kernel holds (reconcile.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from . import names
from .alloc import Allocations, Event, Lease, lingering_order
from .config import _ID

ALLOCATIONS = "allocations.json"
JOURNAL = "allocations.journal"
HISTORY = "history.jsonl"
# journal records before the next write is a whole allocations.json again
COMPACT_AFTER = 1000
# 100k workloads with two leases each are ~25 MB of JSON
MAX_ALLOCATIONS_BYTES = 256 << 20
# history lines per write() (about 50 KiB)
HISTORY_CHUNK = 256
_quote = json.encoder.encode_basestring_ascii  # a JSON string, as json.dumps writes it
# no indent: the C encoder (json.dump(indent=...) is ~20x slower)
_COMPACT = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
LEASE_KEYS = frozenset({"workload", "ip", "ipv4", "ports", "ipv6", "temporary"})
TOP_KEYS = frozenset({"version", "wids", "eids", "app_choice", "leases"})
OPTIONAL_KEYS = frozenset({"app_choice6", "lingering", "token"})  # absent when empty
RECORD_KEYS = frozenset({"base", "workloads", "lingering"})
RECORD_WORKLOAD_KEYS = frozenset({"wid", "app_choice", "app_choice6", "leases"})


class StoreCorrupt(ValueError):
    """The store file at `path` cannot be used: `reason` says why."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(s: str) -> datetime:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# --- allocations.json: strict validation -------------------------------------------

def _int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _id_map(d: Any, field: str, hi: int, bad) -> dict[str, int]:
    if not isinstance(d, dict):
        bad(f"{field}: expected an object of id -> number, got {type(d).__name__}")
    seen: dict[int, str] = {}
    for k, v in d.items():
        if not _ID.fullmatch(k):
            bad(f"{field}: {k[:80]!r} is not an id")
        if not _int(v, 1, hi):
            bad(f"{field}.{k}: {str(v)[:40]} is not a number in 1..{hi}")
        if v in seen:
            bad(f"{field}: {k} and {seen[v]} share the number {v}")
        seen[v] = k
    return dict(d)


def _address(v: Any, version: int, where: str, bad) -> Optional[str]:
    if v is None:
        return None
    try:
        if not isinstance(v, str):
            raise ValueError
        a = ipaddress.ip_address(v)
    except ValueError:
        bad(f"{where}: {str(v)[:60]!r} is not an IPv{version} address")
    if a.version != version:
        bad(f"{where}: {v} is not an IPv{version} address")
    return v


def validate(d: Any, where: str | Path) -> Allocations:
    """The allocations in `d` (parsed JSON), or StoreCorrupt naming the first problem.

    As strict as the config: exact keys, types, id syntax, number ranges, address
    families, port ranges, every lease naming known ids, no two leases sharing a
    port or an IPv6 address."""
    def bad(reason: str):
        raise StoreCorrupt(where, reason)

    if not isinstance(d, dict):
        bad(f"expected a JSON object, got {type(d).__name__}")
    d = {k: v for k, v in d.items() if k != "token"} if isinstance(d, dict) else d
    if not TOP_KEYS <= set(d) <= TOP_KEYS | OPTIONAL_KEYS:
        bad(f"keys {sorted(d)[:10]}; expected {sorted(TOP_KEYS)} and optionally "
            f"{sorted(OPTIONAL_KEYS)}")
    if d["version"] != 1 or type(d["version"]) is not int:
        bad(f"version {str(d['version'])[:20]}; this agent reads version 1")
    wids = _id_map(d["wids"], "wids", names.WID_MAX, bad)
    eids = _id_map(d["eids"], "eids", names.EID_MAX, bad)
    choice = _choice(d["app_choice"], "app_choice", wids, eids, bad)
    choice6 = _choice(d.get("app_choice6", {}), "app_choice6", wids, eids, bad)
    if not isinstance(d["leases"], list):
        bad("leases: expected a list")
    leases: dict[tuple[str, str], Lease] = {}
    blocks: dict[str, list[tuple[int, int, str]]] = {}
    v6_owner: dict[str, str] = {}
    for i, x in enumerate(d["leases"]):
        at = f"leases[{i}]"
        lease = _lease(x, at, LEASE_KEYS, bad)
        w, ip = lease.workload, lease.ip
        if w not in wids:
            bad(f"{at}.workload: {w[:80]!r} has no workload number")
        if ip not in eids:
            bad(f"{at}.ip: {ip[:80]!r} has no egress number")
        if (w, ip) in leases:
            bad(f"{at}: a second lease of {w} on {ip}")
        if lease.ports is not None:
            blocks.setdefault(str(ipaddress.ip_address(lease.ipv4)), []).append(
                (lease.ports[0], lease.ports[1], w))
        if lease.ipv6 is not None:
            key6 = str(ipaddress.ip_address(lease.ipv6))
            if key6 in v6_owner:
                bad(f"{at}.ipv6: {lease.ipv6} is leased to {v6_owner[key6]} too")
            v6_owner[key6] = w
        leases[(w, ip)] = lease
    # released leases whose connections may live: their workload or IP may be gone
    # from the config (and so from wids/eids); their mark keeps the ids they had
    lingering = d.get("lingering", [])
    if not isinstance(lingering, list):
        bad("lingering: expected a list")
    for i, x in enumerate(lingering):
        at = f"lingering[{i}]"
        if isinstance(x, dict) and not _int(x.get("mark"), 1, 0x0FFFFFFF):
            bad(f"{at}.mark: {str(x.get('mark'))[:40]} is not a lease mark")
        _lease(x, at, LEASE_KEYS | {"mark"}, bad)
    for addr, bs in blocks.items():
        bs.sort()
        for (lo1, hi1, w1), (lo2, hi2, w2) in zip(bs, bs[1:]):
            if lo2 <= hi1:
                bad(f"leases: port blocks {lo1}-{hi1} ({w1}) and {lo2}-{hi2} ({w2}) "
                    f"overlap on {addr}")
    base = Allocations(wids, eids, choice, leases, choice6)
    return Allocations.from_json({**base.to_json(), "lingering": lingering}) if lingering else base


def _choice(c: Any, field: str, wids: dict, eids: dict, bad) -> dict[str, str]:
    if not isinstance(c, dict):
        bad(f"{field}: expected an object of workload -> egress IP")
    for w, ip in c.items():
        if w not in wids or not isinstance(ip, str) or ip not in eids:
            bad(f"{field}.{w[:80]}: names a workload or egress IP without a number")
    return dict(c)


def _lease(x: Any, at: str, keys: frozenset, bad) -> Lease:
    """One lease object, checked for types, families and its port block."""
    if not isinstance(x, dict) or set(x) != keys:
        bad(f"{at}: expected an object with keys {sorted(keys)}")
    w, ip = x["workload"], x["ip"]
    if not isinstance(w, str) or not _ID.fullmatch(w):
        bad(f"{at}.workload: {str(w)[:80]!r} is not an id")
    if not isinstance(ip, str) or not _ID.fullmatch(ip):
        bad(f"{at}.ip: {str(ip)[:80]!r} is not an id")
    ipv4 = _address(x["ipv4"], 4, f"{at}.ipv4", bad)
    ipv6 = _address(x["ipv6"], 6, f"{at}.ipv6", bad)
    ports = x["ports"]
    if ipv4 is None and ipv6 is None:
        bad(f"{at}: neither ipv4 nor ipv6")
    if (ports is None) != (ipv4 is None):
        bad(f"{at}: an IPv4 lease has a port block and only an IPv4 lease has one")
    if ports is not None and not (isinstance(ports, list) and len(ports) == 2
                                  and _int(ports[0], 1, 65535) and _int(ports[1], ports[0], 65535)):
        bad(f"{at}.ports: {str(ports)[:60]} is not [first, last] within 1-65535")
    if type(x["temporary"]) is not bool:
        bad(f"{at}.temporary: expected true or false")
    return Lease(w, ip, ipv4, tuple(ports) if ports else None, ipv6, x["temporary"])


def parse_allocations(raw: bytes, where: str | Path, journal: bytes = b"") -> Allocations:
    """allocations.json, with the journal records written since (for the same token)
    replayed on it, validated as a whole."""
    d = _json(raw, where)
    return validate(replay(d, journal, where) if journal else d, where)


def replay(d: Any, journal: bytes, where: str | Path) -> Any:
    """Each journal record sets the whole state of the workloads it names (number,
    app choices, leases) and the lingering list; records of another snapshot (a
    crash between writing allocations.json and removing the journal) are skipped,
    and so is a torn last line."""
    if not isinstance(d, dict) or not isinstance(d.get("leases"), list):
        return d
    token = d.get("token")
    leases = {}
    for x in d["leases"]:
        leases.setdefault(x.get("workload") if isinstance(x, dict) else None, []).append(x)
    lines = journal.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            r = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            if n == len(lines):
                break  # torn by a crash or a full disk: the kernel and a resync know the rest
            raise StoreCorrupt(f"{where} ({JOURNAL} line {n})", "not a JSON record") from None
        if not (isinstance(r, dict) and set(r) == RECORD_KEYS and isinstance(r["workloads"], dict)
                and all(isinstance(v, dict) and set(v) == RECORD_WORKLOAD_KEYS
                        and isinstance(v["leases"], list) for v in r["workloads"].values())):
            raise StoreCorrupt(f"{where} ({JOURNAL} line {n})", "not a journal record")
        if token is None or r["base"] != token:
            continue
        for w, v in r["workloads"].items():
            for key, field in (("wid", "wids"), ("app_choice", "app_choice"),
                               ("app_choice6", "app_choice6")):
                m = d.setdefault(field, {})
                if not isinstance(m, dict):
                    return d  # validate() names it
                if v[key] is None:
                    m.pop(w, None)
                else:
                    m[w] = v[key]
            leases[w] = v["leases"]
        d["lingering"] = r["lingering"]
    d["leases"] = [x for xs in leases.values() for x in xs]
    if not d.get("app_choice6"):
        d.pop("app_choice6", None)
    if not d.get("lingering"):
        d.pop("lingering", None)
    return d


def journal_record(base: str, a: Allocations, workloads) -> dict:
    return {"base": base,
            "lingering": [a.lingering[k].to_json() for k in sorted(a.lingering, key=lingering_order)],
            "workloads": {w: {"wid": a.wids.get(w), "app_choice": a.app_choice.get(w),
                              "app_choice6": a.app_choice6.get(w),
                              "leases": [l.to_json() for ip in sorted(a.eids)
                                         if (l := a.leases.get((w, ip)))]}
                          for w in sorted(workloads)}}


def _json(raw: bytes, where: str | Path) -> Any:
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise StoreCorrupt(where, f"not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise StoreCorrupt(where, "nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN, integers too long to convert
        raise StoreCorrupt(where, f"not JSON: {str(e)[:200]}") from None
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


# --- history.jsonl: lenient reading --------------------------------------------------

def parse_event(raw: bytes) -> Optional[dict]:
    """One history line as an event dict, or None if it is not a valid event."""
    try:
        ev = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        # any event kind: readers act on those they know (assign, release)
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
            return None
        if not isinstance(ev.get("at"), str) or not isinstance(ev.get("workload"), str) \
                or not isinstance(ev.get("ip"), str):
            return None
        parse_time(ev["at"])
        for fam, key in ((4, "ipv4"), (6, "ipv6")):
            v = ev.get(key)
            if v is not None and (not isinstance(v, str) or ipaddress.ip_address(v).version != fam):
                return None
        p = ev.get("ports")
        if p is not None and not (isinstance(p, list) and len(p) == 2
                                  and _int(p[0], 0, 65535) and _int(p[1], 0, 65535)):
            return None
        return ev
    except (ValueError, RecursionError, OverflowError):
        return None


def allocations_text(alloc: Allocations, token: str) -> str:
    """allocations.json: what json.dumps({**alloc.to_json(), "token": token},
    separators=(",", ":"), sort_keys=True) writes, with the leases written out
    directly (100k of them at 100k workloads: 0.40 -> 0.12 s)."""
    enc, q = _COMPACT.encode, _quote
    leases = ",".join([
        f'{{"ip":{q(l.ip)},"ipv4":{"null" if l.ipv4 is None else q(l.ipv4)},'
        f'"ipv6":{"null" if l.ipv6 is None else q(l.ipv6)},'
        f'"ports":{"[%d,%d]" % l.ports if l.ports else "null"},'
        f'"temporary":{"true" if l.temporary else "false"},"workload":{q(l.workload)}}}'
        for _, l in sorted(alloc.leases.items())])
    rest = {**alloc.to_json(leases=False), "token": token}
    head = enc({k: v for k, v in rest.items() if k < "leases"})
    tail = enc({k: v for k, v in rest.items() if k > "leases"})
    return f'{head[:-1]},"leases":[{leases}],{tail[1:]}'


def event_record(at: str, e: Event, adopted: bool = False) -> str:
    """The history line of event `e` at time `at` (adopted: learnt from the kernel's
    live maps, not decided by an allocation): what json.dumps(separators=(",", ":"))
    writes for {"at", "event", **lease.to_json(), "adopted"?}, written out directly
    (a full sync at 100k workloads writes 100k of them: 0.18 -> 0.07 s)."""
    lease, q = e.lease, _quote
    return (f'{{"at":{q(at)},"event":{q(e.kind)},"workload":{q(lease.workload)},"ip":{q(lease.ip)},'
            f'"ipv4":{"null" if lease.ipv4 is None else q(lease.ipv4)},'
            f'"ports":{"[%d,%d]" % lease.ports if lease.ports else "null"},'
            f'"ipv6":{"null" if lease.ipv6 is None else q(lease.ipv6)},'
            f'"temporary":{"true" if lease.temporary else "false"}'
            + (',"adopted":true}' if adopted else "}"))


def _lease_key(ev: dict) -> tuple:
    return (ev["workload"], ev["ip"], ev.get("ipv4"), tuple(ev.get("ports") or ()), ev.get("ipv6"))


def open_assigns(history: Iterable[dict]) -> dict[tuple, dict]:
    """The assign events that no release has closed, by lease."""
    open_: dict[tuple, dict] = {}
    for ev in history:
        key = _lease_key(ev)
        if ev["event"] == "assign":
            open_.setdefault(key, ev)
        elif ev["event"] == "release":
            open_.pop(key, None)
    return open_


def lease_key(lease: Lease) -> tuple:
    return _lease_key(lease.to_json())


# --- the store -----------------------------------------------------------------------

class Store:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.skipped_lines = 0  # history lines the last history() read skipped
        self.first_skipped: Optional[int] = None
        # the token of the allocations.json this process read or wrote last, and the
        # journal records written on it since; None: the next write is a whole one
        self.token: Optional[str] = None
        self.journal_records = 0

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL

    @property
    def allocations_path(self) -> Path:
        return self.dir / ALLOCATIONS

    @property
    def history_path(self) -> Path:
        return self.dir / HISTORY

    def exists(self) -> bool:
        # a dangling symlink is no store: adopt the kernel rather than start empty
        return os.path.exists(self.allocations_path)

    def load(self) -> Allocations:
        """The stored allocations (empty if there are none). StoreCorrupt if the file
        cannot be used; OSError only if it cannot be read at all (EACCES, EIO)."""
        path = self.allocations_path
        try:
            # O_NONBLOCK: a FIFO put there must not hang the agent
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return Allocations()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreCorrupt(path, "not a regular file")
            if st.st_size > MAX_ALLOCATIONS_BYTES:
                raise StoreCorrupt(path, f"{st.st_size} bytes, more than "
                                         f"{MAX_ALLOCATIONS_BYTES} (not written by this agent)")
            chunks, n = [], 0
            while n <= MAX_ALLOCATIONS_BYTES:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
                n += len(b)
        finally:
            os.close(fd)
        if n > MAX_ALLOCATIONS_BYTES:
            raise StoreCorrupt(path, f"more than {MAX_ALLOCATIONS_BYTES} bytes")
        raw = b"".join(chunks)
        journal = self._read_journal()
        a = parse_allocations(raw, path, journal)
        token = _json(raw, path).get("token")
        self.token = token if isinstance(token, str) else None
        self.journal_records = journal.count(b"\n")
        return a

    def _read_journal(self) -> bytes:
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return b""
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise StoreCorrupt(self.journal_path, "not a regular file")
            data = f.read(MAX_ALLOCATIONS_BYTES + 1)
        if len(data) > MAX_ALLOCATIONS_BYTES:
            raise StoreCorrupt(self.journal_path, f"more than {MAX_ALLOCATIONS_BYTES} bytes")
        return data

    def append_allocations(self, alloc: Allocations, workloads) -> bool:
        """Journal what changed for these workloads (and the lingering blocks): one
        line, O(changed). False: this store needs a whole write first (none read or
        written by this process yet, or the journal is long: COMPACT_AFTER)."""
        if self.token is None or self.journal_records >= COMPACT_AFTER:
            return False
        line = json.dumps(journal_record(self.token, alloc, workloads), separators=(",", ":"))
        fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _write_all(fd, b"\n")  # end a torn line: it stays one bad line
            _write_all(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.journal_records += 1
        return True

    def quarantine(self) -> Path:
        """Move allocations.json aside, beside itself; its new path."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = self.dir / f"{ALLOCATIONS}.corrupt-{stamp}"
        n = 1
        while os.path.lexists(dest):
            n += 1
            dest = self.dir / f"{ALLOCATIONS}.corrupt-{stamp}-{n}"
        os.rename(self.allocations_path, dest)
        if os.path.lexists(self.journal_path):
            os.rename(self.journal_path, str(dest).replace(ALLOCATIONS, JOURNAL, 1))
        self.token = None
        self._sync_dir()
        return dest

    def save(self, alloc: Allocations, events: list[Event], at: Optional[str] = None) -> None:
        at = at or now_iso()
        self.append_history([event_record(at, e) for e in events])
        self.write_allocations(alloc)

    def append_history(self, records: list[str]) -> None:
        """Append `records` (event_record's lines), whole lines per write() (HISTORY_CHUNK of them:
        a full sync at 100k workloads writes 100k lines). A torn last line (a crash
        or a full disk during an earlier append) is ended first, so it stays one
        bad line that readers skip instead of swallowing the next record."""
        if not records:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.history_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _write_all(fd, b"\n")
            for i in range(0, len(records), HISTORY_CHUNK):
                _write_all(fd, ("\n".join(records[i:i + HISTORY_CHUNK]) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_allocations(self, alloc: Allocations) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # unique per writer: two writers never share (and never rename away) one temp file
        fd, tmp = tempfile.mkstemp(prefix=ALLOCATIONS + ".", suffix=".tmp", dir=self.dir)
        try:
            token = os.urandom(8).hex()
            _write_all(fd, allocations_text(alloc, token).encode())
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 ignores the umask; open() would not
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.allocations_path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._sync_dir()
        self.token, self.journal_records = token, 0
        try:  # its records name the old token: a crash before this unlink skips them
            os.unlink(self.journal_path)
        except FileNotFoundError:
            pass

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def history(self) -> Iterator[dict]:
        """Every valid event, in order. Lines that are not one (a torn tail, bytes
        that are not UTF-8 or JSON, a wrong shape) are skipped and counted in
        `skipped_lines` (first one: `first_skipped`)."""
        self.skipped_lines, self.first_skipped = 0, None
        try:
            fd = os.open(self.history_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreCorrupt(self.history_path, "not a regular file")
        with os.fdopen(fd, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                ev = parse_event(raw)
                if ev is None:
                    self.skipped_lines += 1
                    self.first_skipped = self.first_skipped or n
                    continue
                yield ev


def _umask() -> int:
    """The process umask, read without changing it (os.umask() sets it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
        key = _lease_key(ev)
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


__all__ = ["Store", "StoreCorrupt", "who", "Holder", "Lease", "now_iso", "event_record",
           "open_assigns", "lease_key"]
