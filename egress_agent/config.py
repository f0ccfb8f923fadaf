"""Config version 1: load, validate, explain errors as FILE:LINE: reason.

pydantic checks the shape and each field (and gives `egress-agent schema`);
`_check_semantics` checks what spans fields (duplicate ids, references,
overlaps, capacity). Every error is reported with the line of the YAML node
it is about, found through the path -> line map built while parsing.
"""

from __future__ import annotations

import bisect
import collections
import difflib
import functools
import gc
import glob
import hashlib
import ipaddress
import json
import os
import re
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional, Union, get_args

import ryml
import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints,
                      ValidationError, WithJsonSchema, model_validator)

from . import names

PathT = tuple[Union[str, int], ...]


# --- errors ----------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    message: str
    column: int = 0  # 1-based; 0: not known (a file-level problem)
    value: Any = None  # the bad value as written, when it is one scalar
    suggestion: Optional[str] = None  # the closest valid name, for a likely typo

    def __str__(self) -> str:  # the column stays out: FILE:LINE is what editors and greps take
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"

    def to_json(self) -> dict:
        d: dict[str, Any] = {"file": self.file, "line": self.line, "column": self.column or None,
                             "field": self.path, "message": self.message}
        if self.value is not None:
            d["value"] = self.value
        if self.suggestion is not None:
            d["suggestion"] = self.suggestion
        return d


class ConfigError(Exception):
    """One or more problems with a config file; str() gives one line each."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- field types -----------------------------------------------------------------

def _ipv4(v: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(v)))
    except ValueError:
        if _is_ipv6(v):
            raise ValueError(f"{v!r} is an IPv6 address; this field takes an IPv4 "
                             "address like 203.0.113.10 (IPv6 goes under ipv6:)") from None
        raise ValueError(f"{v!r} is not an IPv4 address like 203.0.113.10") from None


def _ipv6(v: str) -> str:
    try:
        return str(ipaddress.IPv6Address(str(v)))
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv6 address like 2001:db8::1") from None


def _is_ipv6(v: Any) -> bool:
    try:
        ipaddress.IPv6Address(str(v).split("/")[0])
        return True
    except ValueError:
        return False


def _network(v: str, version: Optional[int] = None) -> str:
    try:
        net = ipaddress.ip_network(str(v), strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not an address or prefix like 192.0.2.0/24 "
                         "or 2001:db8::/32") from None
    if str(v).count("/") and net.network_address != ipaddress.ip_interface(str(v)).ip:
        raise ValueError(f"{v!r} has host bits set; did you mean {net}?")
    if version and net.version != version:
        raise ValueError(f"{v!r} is IPv{net.version}; this field takes an IPv{version} "
                         + ("range like 2001:db8:10::/64" if version == 6 else "prefix"))
    return str(net)


_DOTTED = re.compile(r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")


def _host_address(v: str) -> str:
    """A workload source: one address (a /32 or /128 is accepted as the same)."""
    if isinstance(v, str) and _DOTTED.fullmatch(v):
        return v  # canonical IPv4, the common case: no ipaddress objects (100k workloads)
    net = ipaddress.ip_network(_network(v))
    if net.num_addresses != 1:
        raise ValueError(f"{v!r} is a network; a workload source is one address "
                         "(list each, and put the network under managed_sources)")
    return str(net.network_address)


def _ipv6_range(v: str) -> str:
    net = ipaddress.IPv6Network(_network(v, 6))
    if net.prefixlen > 120:
        raise ValueError(f"{v!r} is too small: give each workload its own address "
                         "from a range of /120 or larger (e.g. /64)")
    return str(net)


def _port_range(v: Any) -> str:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(v))
    if not m:
        raise ValueError(f"{v!r} is not a port range like 1024-65535")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{v!r}: ports go from 1 to 65535, low before high")
    return f"{lo}-{hi}"


_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_CGROUP = re.compile(r"[A-Za-z0-9_.:@+=-]+(/[A-Za-z0-9_.:@+=-]+)*")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _ifname(v: str) -> str:
    if not _IFNAME.fullmatch(str(v)):
        raise ValueError(f"{v!r} is not an interface name (1-15 characters of "
                         "letters, digits, _ . : @ -)")
    return str(v)


def _cgroup(v: str) -> str:
    s = str(v).strip("/")
    if not _CGROUP.fullmatch(s) or ".." in s.split("/"):
        raise ValueError(f"{v!r} is not a cgroup path nftables can take: use the path "
                         "below the cgroup2 root, like system.slice/cron.service "
                         "(letters, digits and _ . : @ + = - only)")
    depth = s.count("/") + 1
    if depth > max(names.CGROUP_LEVELS):
        raise ValueError(f"{v!r} is {depth} levels deep; at most "
                         f"{max(names.CGROUP_LEVELS)} are supported")
    return s


def _not_an_id(v: Any) -> str:
    return (f"{v!r} is not an id: start with a letter or digit, then "
            "letters, digits, _ . - (at most 63)")


# An id is checked by pydantic-core's own regex, not a Python validator: there are
# two per workload (100,000 Python calls cost ~0.1 s); _problem_from_pydantic words
# its error as the validators do.
_ID_ANCHORED = "^" + _ID.pattern + "$"
_PATTERN_MESSAGES: dict[str, Callable[[Any], str]] = {_ID_ANCHORED: _not_an_id}


def _str_type(fn, fmt: Optional[str] = None, pattern: Optional[str] = None,
              example: Optional[str] = None):
    schema: dict[str, Any] = {"type": "string"}
    if fmt:
        schema["format"] = fmt
    if pattern:
        schema["pattern"] = pattern
    if example:
        schema["examples"] = [example]
    return Annotated[str, AfterValidator(fn), WithJsonSchema(schema)]




IPv4 = _str_type(_ipv4, "ipv4", example="203.0.113.10")
IPv6 = _str_type(_ipv6, "ipv6", example="2001:db8::1")
IPv6Range = _str_type(_ipv6_range, example="2001:db8:10::/64")
Prefix = _str_type(_network, example="10.0.0.0/8")
# A workload source: pydantic-core's regex takes a canonical IPv4 address (100,000
# Python calls saved), the Python validator whatever else; only its errors are
# reported (_other_union_branch drops the regex branch's).
_CANONICAL_IPV4 = "^" + _DOTTED.pattern + "$"
HostAddress = Annotated[Union[Annotated[str, StringConstraints(pattern=_CANONICAL_IPV4)],
                              Annotated[str, AfterValidator(_host_address)]],
                        Field(union_mode="left_to_right"),
                        WithJsonSchema({"type": "string", "examples": ["10.0.1.2"]})]
IfName = _str_type(_ifname, pattern=_IFNAME.pattern)
CgroupPath = _str_type(_cgroup, example="system.slice/cron.service")
Id = Annotated[str, StringConstraints(pattern=_ID_ANCHORED),
               WithJsonSchema({"type": "string", "pattern": _ID.pattern})]
PortRange = Annotated[Union[int, str], AfterValidator(_port_range),
                      WithJsonSchema({"type": ["string", "integer"],
                                      "examples": ["1024-65535", 443]})]


def _port_block(v: Any) -> str:
    # LO-HI only: a generated file (egress-agent fleet) names the ports, and a bare
    # number would be a block of one port, surely a mistake
    if not isinstance(v, str) or "-" not in v:
        raise ValueError(f"{v!r} is not a port block; write it LO-HI, like 10240-11263")
    return _port_range(v)


PortBlock = Annotated[Union[int, str], AfterValidator(_port_block),
                      WithJsonSchema({"type": "string", "examples": ["10240-11263"]})]


def port_bounds(r: str) -> tuple[int, int]:
    lo, hi = r.split("-")
    return int(lo), int(hi)


# --- the model -------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Host(_Model):
    name: str = Field(description="this host's name, for logs and status")
    region: Id = Field(description="egress IPs of other regions are ignored here")
    role: Literal["workload", "gateway"] = Field(
        "workload", description="gateway: one host of a gateway pair (docs/gateway.md): its "
                                "egress IPs are programmed whether or not it holds their "
                                "addresses now (keepalived moves them), and nothing local "
                                "answers on them")


class Defaults(_Model):
    port_range: PortRange = Field("1024-65535", description="SNAT source ports usable on each IPv4")
    ports_per_workload: int = Field(1024, ge=1, le=65535,
                                    description="one workload's port block on one IPv4: "
                                                "its concurrent connections to one destination ip:port")
    warn_at: float = Field(0.8, gt=0, le=1, description="usage ratio that raises a warning")
    unavailable: Literal["default", "drop"] = Field(
        "default", description="what a workload gets when no dedicated IP is usable")


class Via(_Model):
    dev: IfName
    gateway: Optional[IPv4] = None
    gateway6: Optional[IPv6] = None


class Limits(_Model):
    connections_per_destination: Optional[int] = Field(
        None, ge=1, description="connections this IP may carry to one origin ip:port")
    max_workloads: Optional[int] = Field(None, ge=1, description="workloads that may share this IP")


class EgressIP(_Model):
    id: Id
    region: Optional[Id] = Field(None, description="default: the host's region")
    app: Optional[Id] = Field(None, description="app-scoped: shared by the app's workloads")
    workload: Optional[Id] = Field(None, description="machine-scoped: takes precedence over the app's")
    ipv4: Optional[IPv4] = None
    ipv6: Optional[IPv6Range] = Field(None, description="each workload gets its own address in it")
    via: Optional[Via] = Field(None, description="optional policy route for this IP's traffic")
    remote: bool = Field(False, description="translated by the gateway pair that holds the "
                                            "address (docs/gateway.md): this host routes the "
                                            "IP's traffic untranslated through via (required)")
    ports: Optional[PortRange] = Field(None, description="this host's slice of the port space")
    state: Literal["active", "draining"] = "active"
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _scope(self):
        if (self.app is None) == (self.workload is None):
            raise ValueError("set exactly one of app (shared by an app's workloads) "
                             "or workload (machine-scoped)")
        if self.ipv4 is None and self.ipv6 is None:
            raise ValueError("set ipv4, ipv6 or both")
        return self


class Workload(_Model):
    id: Id
    app: Optional[Id] = None
    source: list[HostAddress] = Field(default_factory=list,
                                      description="a machine's source addresses (VM or container)")
    interface: Optional[IfName] = Field(None, description="the machine's sources only count "
                                                          "when they arrive on this interface")
    cgroup: Optional[CgroupPath] = Field(None, description="local processes in this cgroupv2 "
                                                           "(path below the cgroup2 root)")
    blocks: dict[Id, PortBlock] = Field(
        default_factory=dict,
        description="fixed port blocks, egress IP id -> LO-HI (like 10240-11263): taken as "
                    "given, never moved (both gateways of a pair translate a remote "
                    "workload to the same block, from one fleet-wide allocation)")

    @model_validator(mode="after")
    def _kind(self):
        if bool(self.source) == bool(self.cgroup):
            raise ValueError("set either source (a machine) or cgroup (local processes)")
        if self.interface and not self.source:
            raise ValueError("interface only applies to a machine with source addresses")
        # A big host holds 100k of these: what many of them have alike is held once
        # (the app's name, no fixed blocks, which fields were set: 70 of 820 bytes
        # each; bench/README.md, "Memory"). The models are frozen: nothing changes
        # these in place, and model_copy copies the fields set before it adds to it.
        d = self.__dict__
        if d["app"] is not None:
            d["app"] = sys.intern(d["app"])
        if not d["blocks"]:
            d["blocks"] = _NO_BLOCKS
        fields = self.__pydantic_fields_set__
        shared = _FIELDS_SET.setdefault(frozenset(fields), fields)
        if shared is not fields:
            object.__setattr__(self, "__pydantic_fields_set__", shared)
        return self


_NO_BLOCKS: dict = {}
_FIELDS_SET: dict[frozenset, set] = {}


class Exclude(_Model):
    dns: bool = True
    icmp: bool = True
    destinations: list[Prefix] = Field(default_factory=list)


Protocol = Literal["tcp", "udp", "icmp"]


class Match(_Model):
    workloads: list[Id] = Field(default_factory=list)
    apps: list[Id] = Field(default_factory=list)
    destinations: list[Prefix] = Field(default_factory=list)
    ports: list[PortRange] = Field(default_factory=list)
    protocols: list[Protocol] = Field(default_factory=list)


class PolicyEgress(_Model):
    ipv4: Optional[Id] = None
    ipv4_fallback: Optional[str] = Field(
        None, description="an egress IP id, default or drop; unset: defaults.unavailable")
    ipv6: Optional[Id] = Field(None, description="unset: the ipv4 IP's range, if it has one")

    @model_validator(mode="after")
    def _some(self):
        if self.ipv4 is None and self.ipv6 is None:
            raise ValueError("name an egress IP in ipv4 or ipv6, or write egress: default / drop")
        return self


class Policy(_Model):
    name: Id
    match: Match = Match()
    egress: Union[Literal["default", "drop"], PolicyEgress]


class Config(_Model):
    version: Literal[1]
    host: Host
    state_dir: str = "/var/lib/egress-agent"
    defaults: Defaults = Defaults()
    egress_ips: list[EgressIP] = Field(default_factory=list)
    workloads: list[Workload] = Field(default_factory=list)
    managed_sources: list[Prefix] = Field(
        default_factory=list,
        description="networks whose forwarded traffic must come from a known workload: "
                    "an unknown source in them is dropped, never sent with the host's address")
    exclude: Exclude = Exclude()
    policies: list[Policy] = Field(default_factory=list)
    include: list[str] = Field(
        default_factory=list,
        description="globs, relative to this file, of files whose egress_ips, workloads, "
                    "policies and managed_sources are appended (in file-name order), e.g. "
                    "conf.d/*.yaml for per-app files dropped by a fleet tool")

    # --- lookups the planner uses (indexed once: they run per workload) ---------
    @cached_property
    def _here(self) -> list[EgressIP]:
        return [ip for ip in self.egress_ips if (ip.region or self.host.region) == self.host.region]

    @cached_property
    def _by_id(self) -> dict[str, EgressIP]:
        return {ip.id: ip for ip in self.egress_ips}

    # The indexes of `workloads` live in the instance's __dict__, as cached properties
    # do: pydantic compares and dumps fields alone, and model_copy shares them with
    # the copy (which checks they index its own workloads list).
    @property
    def _index(self) -> Optional["_Index"]:
        return self.__dict__.get("_workload_index")

    def _set_index(self, ix: "_Index") -> "_Index":
        self.__dict__["_workload_index"] = ix
        return ix

    def _ix(self) -> "_Index":
        ix = self._index
        if ix is None or ix.workloads is not self.workloads:  # a copy with other workloads
            ix = self._set_index(_Index(self.workloads))
        return ix

    @property
    def workloads_by_id(self) -> dict[str, "Workload"]:
        """Workload id -> workload. A config the Reader read right after another takes
        that one's index over and applies what changed (O(changed)); the other builds
        its own again if it is ever asked (applied.py asks the new one only)."""
        ix = self._ix()
        if ix.by_id is None:
            base = ix.base
            if base is not None and base.by_id is not None:
                out, base.by_id = base.by_id, None
                for w in ix.removed:
                    if out.get(w.id) is w:
                        del out[w.id]
                out.update((w.id, w) for w in ix.added)
            else:
                out = dict(zip(map(attrgetter("id"), self.workloads), self.workloads))
            ix.by_id = out
        return ix.by_id

    @property
    def workload_positions(self) -> dict[str, int]:
        """Workload id -> its index in `workloads` (the order allocation follows): O(workloads)
        to build, so only for orderings of more than one (in_order)."""
        ix = self._ix()
        if ix.positions is None:
            ix.positions = dict(zip(map(attrgetter("id"), self.workloads), range(len(self.workloads))))
        return ix.positions

    def in_order(self, ids: Iterable[str]) -> list[str]:
        """Those of `ids` that are workloads of this config, in config order."""
        by_id = self.workloads_by_id
        out = [w for w in ids if w in by_id]
        if len(out) > 1:
            out.sort(key=self.workload_positions.__getitem__)
        return out

    def changes_since(self, old: "Config") -> Optional[tuple[list["Workload"], list["Workload"]]]:
        """(added, removed): the workload models this config has and `old` has not, and
        the other way round, when the Reader read this config right after `old` (its
        unchanged entries are the same models); None when that is not known."""
        ix, base = self._ix(), old._index
        if ix.base is None or ix.base is not base or base.workloads is not old.workloads:
            return None
        return ix.added, ix.removed

    @cached_property
    def _by_owner(self) -> dict[tuple[str, str], list[EgressIP]]:
        out: dict[tuple[str, str], list[EgressIP]] = {}
        for ip in self._here:
            key = ("app", ip.app) if ip.app else ("workload", ip.workload)
            out.setdefault(key, []).append(ip)  # type: ignore[arg-type]
        return out

    def ips_here(self) -> list[EgressIP]:
        return self._here

    def ip(self, ip_id: str) -> EgressIP:
        return self._by_id[ip_id]

    def app_ips(self, app: Optional[str]) -> list[EgressIP]:
        return self._by_owner.get(("app", app), []) if app else []

    def own_ips(self, workload: str) -> list[EgressIP]:
        return self._by_owner.get(("workload", workload), [])

    def ip_ports(self, ip: EgressIP) -> tuple[int, int]:
        return port_bounds(ip.ports or self.defaults.port_range)

    @property
    def fixed_blocks(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Egress IP id -> workload id -> the port block its `blocks:` fixes there
        (derived from the base config's, as workloads_by_id is)."""
        ix = self._ix()
        if ix.fixed is None:
            base = ix.base.fixed if ix.base is not None else None
            out: dict[str, dict[str, tuple[int, int]]] = (
                {ip: dict(ws) for ip, ws in base.items()} if base is not None else {})
            for w in ix.removed if base is not None else ():
                for ip_id in w.blocks:
                    out.get(ip_id, {}).pop(w.id, None)
            for w in ix.added if base is not None else self.workloads:
                for ip_id, block in w.blocks.items():
                    out.setdefault(ip_id, {})[w.id] = port_bounds(block)
            ix.fixed = {ip: ws for ip, ws in out.items() if ws}
        return ix.fixed

    def fixed_blocks_of(self, workload: str) -> dict[str, tuple[int, int]]:
        """Egress IP id -> the port block `workload`'s `blocks:` fixes there (none: {})."""
        w = self.workloads_by_id.get(workload)
        return {} if w is None else {ip: port_bounds(b) for ip, b in w.blocks.items()}


class _Index:
    """The indexes of one workloads list, each built when first asked. A config the
    Reader read knows the index of the config read before it (`base`) and the
    workload models that differ (`added`, `removed`), so that its indexes follow from
    the base's at the cost of what changed (docs/design.md, "Incremental syncs")."""

    __slots__ = ("workloads", "base", "added", "removed", "by_id", "positions", "fixed")

    def __init__(self, workloads: list, base: Optional["_Index"] = None,
                 added: Iterable = (), removed: Iterable = ()) -> None:
        self.workloads = workloads
        self.base = base
        self.added, self.removed = list(added), list(removed)
        self.by_id: Optional[dict] = None
        self.positions: Optional[dict[str, int]] = None
        self.fixed: Optional[dict[str, dict[str, tuple[int, int]]]] = None


def policy_matches(policy: Policy, w: Workload) -> bool:
    m = policy.match
    if not m.workloads and not m.apps:
        return True
    return w.id in m.workloads or (w.app is not None and w.app in m.apps)


def policy_ips(policy: Policy, cfg: Config) -> list[str]:
    """The egress IPs a policy may send a workload to (each needs a lease)."""
    e = policy.egress
    if not isinstance(e, PolicyEgress):
        return []
    # with ipv6 unset, the ipv4 IP's own range serves IPv6: it is in the list already
    out = [x for x in (e.ipv4, e.ipv4_fallback, e.ipv6) if x and x not in ("default", "drop")]
    return list(dict.fromkeys(out))


# --- reading: bounded before anything is built --------------------------------------
#
# A config is input from whoever can write /etc/egress-agent or drop a conf.d file:
# reading it must end, in bounded time and memory, with a config or a ConfigError
# (the daemon keeps its last good state on one, and `check` is the unit's
# ExecStartPre). PyYAML's composer and constructor recurse once per nesting level
# (500 `[` is a RecursionError; far more overflows libyaml's Cython composer), and
# every consumer of the data repeats an aliased node at each alias (a 390-byte alias
# bomb is 10^9 nodes). So the size is bounded while reading, and depth and alias
# expansion are counted on the parser's event stream, which builds nothing, before
# the file is composed. These bounds hold whatever parser builds the data later.

MAX_BYTES = 16 * 2**20  # a config and its includes together; bench/gen_config.py's
#                         100,000 workloads are 5 MB
MAX_DEPTH = 32          # nesting levels; the schema itself has 5
MAX_NODES = 4_000_000   # YAML nodes, an alias counting as every node it repeats
MAX_INCLUDED = 1000     # files that include: may add

_ALLOWED_TAGS = {None, "!", "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq",
                 "tag:yaml.org,2002:map"}


class _Unreadable(Exception):
    """A file that was not read: why, and the line when the bytes are the reason."""

    def __init__(self, reason: str, line: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.line = line


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _read_file(path: str, limit: int = MAX_BYTES) -> str:
    """The text of a regular file of at most `limit` bytes, decoded as UTF-8.

    O_NONBLOCK: opening a FIFO does not wait for a writer, and a file that would block
    a read (/proc/kmsg) answers EAGAIN. The type is checked on the open descriptor, so
    a symlinked config works and nothing can swap the file between check and read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _Unreadable(e.strerror or str(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _Unreadable(f"{_file_kind(mode)}, not a regular file")
        chunks, n = [], 0
        while n <= limit:  # read at most limit + 1 bytes: enough to know it is too big
            chunk = os.read(fd, min(limit + 1 - n, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
    except OSError as e:
        raise _Unreadable(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise _Unreadable(f"larger than {limit:,} bytes (a config and its includes may "
                          f"hold {MAX_BYTES // 2**20} MiB together)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _Unreadable(f"byte 0x{data[e.start]:02x} at column {col} is not UTF-8; "
                          "save the file as UTF-8", line) from None


def _syntax(e: Exception, text: str, file: str) -> Problem:
    """One line for any error of the YAML reader, scanner, parser or composer."""
    line, msg = 1, str(e)
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        msg = e.problem or e.context or msg
    elif isinstance(e, yaml.reader.ReaderError):  # the C reader gives a byte offset
        line = text.encode("utf-8", "surrogatepass")[:max(e.position, 0)].count(b"\n") + 1
        msg = (f"character #x{e.character:04x}: {e.reason}" if isinstance(e.character, int)
               else e.reason)
    elif isinstance(e, UnicodeError):  # a str with lone surrogates (parse() of odd text)
        line = text.count("\n", 0, getattr(e, "start", 0)) + 1
        msg = "text that is not valid Unicode"
    return Problem(file, line, "", "YAML syntax: " + " ".join(str(msg).split()))


def _check_structure(text: str, file: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH, more than MAX_NODES nodes with aliases
    expanded, and explicit tags, walking the event stream without recursion."""
    nodes = 0
    opened: list[tuple[Optional[str], int]] = []  # (anchor, nodes before it)
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for, aliases expanded
    scalar, alias = yaml.ScalarEvent, yaml.AliasEvent
    starts = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
    ends = (yaml.SequenceEndEvent, yaml.MappingEndEvent)

    def refuse(ev, msg: str) -> ConfigError:
        return ConfigError([Problem(file, ev.start_mark.line + 1, "", msg)])

    try:
        for ev in yaml.parse(text, Loader=_EventLoader):
            t = ev.__class__
            if t is scalar:
                nodes += 1
                if ev.anchor is not None:
                    sizes[ev.anchor] = 1
                if ev.tag not in _ALLOWED_TAGS:
                    raise refuse(ev, f"tag {ev.tag!r} is not part of this config's format; "
                                     "write the plain value (quote it to keep it a string)")
            elif t in ends:
                anchor, before = opened.pop()
                if anchor is not None:
                    sizes[anchor] = nodes - before
            elif t in starts:
                opened.append((ev.anchor, nodes))
                nodes += 1
                if len(opened) > MAX_DEPTH:
                    raise refuse(ev, f"nested more than {MAX_DEPTH} levels deep")
                if ev.tag not in _ALLOWED_TAGS:
                    raise refuse(ev, f"tag {ev.tag!r} is not part of this config's format")
            elif t is alias:
                n = sizes.get(ev.anchor)
                if n is None:
                    raise refuse(ev, f"alias *{ev.anchor} names no complete anchor before it")
                nodes += n
                if nodes > MAX_NODES:
                    raise refuse(ev, f"aliases expand the file to more than {MAX_NODES:,} "
                                     "values; write the values out or use fewer aliases")
    except (yaml.YAMLError, UnicodeError) as e:
        raise ConfigError([_syntax(e, text, file)]) from None
    if nodes > MAX_NODES:
        raise ConfigError([Problem(file, 1, "", f"more than {MAX_NODES:,} values")])


_COMMENT = re.compile(r"(?:^|(?<=[ \t]))#.*")
_GLUED_HASH = re.compile(r"[^ \t\n]#")
_KEEP_BRACKETS = {i: None for i in range(128) if chr(i) not in "[]{}\n"}
_SHORT_LINE = 300


def _plainly_bounded(text: str) -> bool:
    """True when the characters alone show that the text is within the bounds the
    walk checks, so the fast path may skip it (the walk is ~8% of a big config's load).

    Sound, judged with C-speed string methods, for text without quotes, aliases,
    tags, `#` glued to a token, or unusual line breaks (anything else takes the walk):
    - no `*`: no alias; no `!`: no tag;
    - nodes: each `: ? - , [ {` brings at most 3 (a flow pair: mapping, key, value);
    - depth: with quotes excluded and comments stripped, a bracket outside a flow
      collection can only be part of a plain scalar or of a block scalar's text, so
      if every line's brackets balance and never go below zero, no flow collection
      spans lines and a line's bracket depth bounds its flow depth; block nesting
      needs a deeper column every two levels. Lines of at most 300 characters keep the
      depth under ~900, which libyaml's composer survives and which the YAML
      constructor builds or stops with RecursionError (then the slow path walks)."""
    if any(c in text for c in "*!'\"\r\x85\u2028\u2029"):
        return False
    lines = text.split("\n")
    if max(map(len, lines)) > _SHORT_LINE:
        return False
    if 3 * sum(text.count(c) for c in ":?-,[{") + 1 > MAX_NODES:
        return False
    if "#" in text:  # a comment starts at a # after a blank; any other # takes the walk
        if _GLUED_HASH.search(text):
            return False
        text = "\n".join(_COMMENT.sub("", line) if "#" in line else line for line in lines)
    for line in set(text.translate(_KEEP_BRACKETS).split("\n")):
        depth = 0
        for c in line:
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth < 0:
                    return False
        if depth:
            return False
    return True


# --- YAML with line numbers ------------------------------------------------------

Where = tuple[str, int, int, int]  # (file, line, column, column of its key), 1-based


def _value(loader: yaml.SafeLoader, node: yaml.Node, file: str) -> Any:
    """A scalar's value; a value Python refuses (2001-13-45, a 5,000-digit int) is a
    config error at its line, not a ValueError."""
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, OverflowError, AttributeError) as e:
        raise ConfigError([Problem(file, node.start_mark.line + 1, "",
                                   f"cannot read the value {str(node.value)[:40]!r}: "
                                   f"{str(e).split(';')[0][:120]}")]) from None


_MERGE = "tag:yaml.org,2002:merge"


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: PathT,
               lines: dict[PathT, Where], file: str) -> Any:
    """Build plain data from YAML nodes, recording the file and line of every path."""
    lines[path] = (file, node.start_mark.line + 1, node.start_mark.column + 1,
                   node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        merged = 0  # merge keys (<<: *defaults) put their pairs first; written keys override
        if any(k.tag == _MERGE for k, _ in node.value):
            written = sum(k.tag != _MERGE for k, _ in node.value)
            loader.flatten_mapping(node)
            merged = len(node.value) - written
        written_keys: set = set()
        for i, (k, v) in enumerate(node.value):
            if not isinstance(k, yaml.ScalarNode):
                raise ConfigError([Problem(file, k.start_mark.line + 1, _dotted(path),
                                           "a key must be a plain name, not a list or mapping")])
            key = _value(loader, k, file)
            if i >= merged and key in written_keys:
                raise ConfigError([Problem(file, k.start_mark.line + 1, _dotted(path + (key,)),
                                           f"key {key!r} appears twice")])
            if i >= merged:
                written_keys.add(key)
            out[key] = _construct(loader, v, path + (key,), lines, file)
            # the key's line (a problem with a block is about its key); the column of a
            # scalar written beside its key, which is what a problem with it is about
            at = v if isinstance(v, yaml.ScalarNode) and v.start_mark.line == k.start_mark.line else k
            lines[path + (key,)] = (file, k.start_mark.line + 1, at.start_mark.column + 1,
                                    k.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, v, path + (i,), lines, file) for i, v in enumerate(node.value)]
    return _value(loader, node, file)


def _dotted(path: PathT) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _where(path: PathT, lines: dict[PathT, Where], default: Where) -> Where:
    path = tuple(path)
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, default)


def _problem(path: PathT, msg: str, lines: dict[PathT, Where], file: str,
             value: Any = None, suggestion: Optional[str] = None, at_key: bool = False) -> Problem:
    """A problem at the line of `path` (or of its nearest parent that is written), at
    the column of its value, or with `at_key` of its key (an unknown field)."""
    f, line, column, key_column = _where(path, lines, (file, 1, 0, 0))
    column = key_column if at_key else column
    if value is not None and not isinstance(value, (str, int, float, bool)):
        value = None  # only a scalar is quoted: a block is at its line
    if isinstance(value, str) and len(value) > 200:
        value = value[:197] + "..."
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        value = str(value)  # .nan and .inf are YAML floats, but not JSON
    return Problem(f, line, _dotted(path), msg, column, value, suggestion)


@dataclass(frozen=True)
class Loaded:
    config: Config
    file: str
    text: str
    files: tuple[str, ...] = ()  # the main file and every included one

    @cached_property
    def lines(self) -> dict[PathT, Where]:
        """Path -> (file, line), built on demand: only errors need it."""
        return _assemble(self.text, self.file, with_lines=True)[1]

    def position(self, workload_id: str) -> tuple[str, int, int]:
        """(file, line, column) of a workload, for errors found after validation."""
        for i, w in enumerate(self.config.workloads):
            if w.id == workload_id:
                return _where(("workloads", i), self.lines, (self.file, 1, 0, 0))[:3]
        return (self.file, 1, 0)

    def where(self, workload_id: str) -> str:
        """FILE:LINE of a workload."""
        return "%s:%d" % self.position(workload_id)[:2]


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Duplicate
    return d


_EventLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _FastLoader(_EventLoader):  # type: ignore[misc,valid-type]
    """libyaml's parser; duplicate keys send the file to the slow path, which names them."""

    def construct_mapping(self, node, deep=False):
        m = super().construct_mapping(node, deep=deep)
        if len(m) != len(node.value):
            raise _Duplicate
        return m


# --- the fast YAML path: rapidyaml, for the text whose data it surely gives ---------
#
# libyaml through PyYAML builds a Python Node and two Marks per value before the
# data: ~3 s of CPU for 100,000 workloads. rapidyaml (C++) parses the same text into
# a flat tree and writes it as JSON in ~0.2 s, which json reads in C. It is used
# only where its data is PyYAML SafeLoader's, judged cheaply and soundly:
# - the text: what _plainly_bounded passes (no quotes, aliases, tags, glued `#`,
#   unbalanced brackets on a line: the bounds hold), printable ASCII without tabs,
#   and none of `? & | > % @ \x60` (complex keys, anchors, block scalars,
#   directives, reserved characters: libyaml refuses `@x`, rapidyaml takes it), nor
#   a `:` before `, [ ] { }` or starting a scalar (`{a:}`, `[:x]`): in a flow
#   collection YAML 1.1 ends a plain scalar there, YAML 1.2 and rapidyaml do not;
#   no document markers (rapidyaml skips a `...` before the first document);
# - the tree: one document whose root is a mapping;
# - the JSON: rapidyaml writes a plain scalar unquoted only when it looks like a
#   JSON number, true, false or null (json then reads it as YAML 1.1 does, but for
#   some floats, which the parse_float hook declines); any other scalar is a JSON
#   string, quoted or not in the YAML. So a string that YAML 1.1 would resolve to
#   something else if it was plain (yes, ~, 0x1F, 1_000, 2001-01-01, <<, an empty
#   key, ...) sends the file to the slow path, as does a duplicate key
#   (_no_duplicates) or JSON that json refuses.
# - quoted scalars (`ipv6: "2001:db8::1"`, as most writers quote) never reach
#   rapidyaml: _unquoted replaces each one-line quoted scalar with a plain
#   placeholder _q_<i> and all of the above is judged on that text; its JSON must
#   then hold every placeholder exactly once as a whole string, which is put back
#   as the quoted scalar's value (always a str). A placeholder that is only part
#   of a string, or missing, means the quotes were not where a scalar starts (a
#   plain `it's 'x'`, a continued line, a comment): declined. See _unquoted.
# Anything else takes the libyaml path below, which stays the reference.

def _yaml11_patterns() -> re.Pattern:
    """One pattern for a JSON string whose text a YAML 1.1 resolver (SafeLoader's)
    would not read as a string if it was a plain scalar."""
    alternatives = set()
    for resolvers in yaml.SafeLoader.yaml_implicit_resolvers.values():
        for tag, regexp in resolvers:
            body = regexp.pattern.strip()
            assert body.startswith("^") and body.endswith("$"), body
            alternatives.add(body[1:-1])
    # the lookahead: a string that starts with none of the resolvers' first
    # characters is dismissed before the alternatives are tried
    first = "".join(sorted(c for c in yaml.SafeLoader.yaml_implicit_resolvers if c))
    return re.compile('"(?=["' + re.escape(first) + '])(?:' + "|".join(sorted(alternatives))
                      + ')"', re.X)


_NOT_PLAIN_STR = _yaml11_patterns()
_YAML11_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?")
_NOT_FOR_RYML = re.compile(r"[?&|>%@`]")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # tabs too: checked before quotes are masked
_ODD_COLON = re.compile(r":(?:[,\[\]{}]|(?<=[\s,\[{]:)\S)")  # written so that re scans for ':' alone
# something after a flow collection closes other than `,` `]` `}` or a comment: YAML
# 1.1 refuses `- {a: 1}  - {b: 2}` on one line, which rapidyaml reads as two entries
_AFTER_FLOW = re.compile(r"[\]}](?:[ \t]*[^\s,\]}#]|#)")


class _Declined(Exception):
    """A value whose YAML 1.1 reading the JSON does not tell: take the libyaml path."""


def _yaml11_float(s: str) -> float:
    """A number json reads as a float. rapidyaml writes some as it did not read them
    (.5 as 0.5, -.5 as -0.5, 5. as 5.0), which YAML 1.1 reads as the same float,
    but for -.5 (a string for YAML 1.1) and a number that is not a YAML 1.1 float
    (an exponent without a dot or a sign: a string, whose text is then unknown):
    those decline the fast path."""
    if s.startswith("-0.") or not _YAML11_FLOAT.fullmatch(s):
        raise _Declined
    return float(s)


def _no_constant(s: str) -> Any:
    raise _Declined  # NaN, Infinity: YAML 1.1 reads them as strings; let libyaml say


# A one-line quoted scalar of at most 256 characters where a scalar may start
# (after a blank, `[`, `{` or `,`, or at a line's start; the possessive repeats
# end it where YAML does), or a comment, whose text may hold quotes. The bound keeps
# a quoted key well within YAML 1.1's 1,024 characters for a key, which the
# shorter placeholder would otherwise hide.
_QUOTED_OR_COMMENT = re.compile(r"""(?<![^ \n\[{,])(?:"(?:[^"\\\n]|\\.){0,256}+"|'(?:[^'\n]|''){0,256}+')"""
                                r"|(?<![^ \n])#[^\n]*")
_PLACEHOLDER = re.compile(r'"_q_([0-9]+)"')


def _unquoted(text: str) -> tuple[str, list[str]]:
    """`text` with each quoted scalar replaced by the plain scalar _q_<i> and each
    comment by a bare `#` (its text may hold quotes, and a comment still ends a plain
    scalar), and the quoted scalars as written. A quote that is left (a multi-line
    or longer quoted scalar, an apostrophe in a plain scalar) is declined later."""
    quoted: list[str] = []

    def replace(m: re.Match) -> str:
        if m[0][0] == "#":
            return "#"
        quoted.append(m[0])
        return f"_q_{len(quoted) - 1}"
    return _QUOTED_OR_COMMENT.sub(replace, text), quoted


def _quoted_values(quoted: list[str]) -> Optional[list[str]]:
    """The strings one-line quoted scalars stand for, as the reference reads them;
    None when it would refuse one. Only backslash escapes need a reader: they are
    read together by both of the reference's (libyaml walks the events first and
    refuses \\ud800, which SafeLoader takes), and must agree."""
    escaped = [q for q in quoted if q[0] == '"' and "\\" in q]
    if escaped:
        seq = "[" + ",".join(escaped) + "]"
        try:
            values = yaml.load(seq, Loader=yaml.SafeLoader)
            if values != yaml.load(seq, Loader=_EventLoader):
                return None
        except yaml.YAMLError:
            return None
        read = iter(values)
    return [q[1:-1].replace("''", "'") if q[0] == "'"
            else next(read) if "\\" in q else q[1:-1] for q in quoted]


def _ryml_data(text: str) -> Any:
    """The data of `text` through rapidyaml, or None when it may differ from
    SafeLoader's (then the caller takes the libyaml path)."""
    if not text.isascii() or _CONTROL.search(text) or "_q_" in text:
        return None
    quoted: list[str] = []
    if "'" in text or '"' in text:
        text, quoted = _unquoted(text)
    if _NOT_FOR_RYML.search(text) or _ODD_COLON.search(text) or _AFTER_FLOW.search(text) \
            or text.startswith((":", "---", "...")) or "\n---" in text or "\n..." in text \
            or not _plainly_bounded(text):
        return None
    js = _quiet_ryml_json(text.encode("ascii"))
    if js is None or _NOT_PLAIN_STR.search(js):
        return None
    if quoted:  # each placeholder must be a whole string, once: then it was a scalar
        values = _quoted_values(quoted)
        if values is None or js.count("_q_") != len(quoted):
            return None
        js, n = _PLACEHOLDER.subn(lambda m: json.dumps(values[int(m[1])]), js)
        if n != len(quoted):
            return None
    try:
        return json.loads(js, object_pairs_hook=_no_duplicates, parse_float=_yaml11_float,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError, _Duplicate, _Declined):
        return None


def _ryml_json(data: bytes) -> Optional[str]:
    tree = ryml.parse_in_arena(data)
    if tree.empty() or not tree.is_map(tree.root_id()):
        return None  # empty, a stream of documents or a scalar: libyaml says what it is
    return ryml.emit_json(tree)  # refuses (ExceptionVisit) nesting past its own bound


def _quiet_ryml_json(data: bytes) -> Optional[str]:
    """rapidyaml's JSON of `data`, or None when it refuses it (the libyaml path then
    says why, with its line). Its error handler writes to file descriptor 2 before
    raising, so fd 2 goes to a memory file meanwhile; whatever else was written
    there in that time (another thread's log line) is passed on, only rapidyaml's
    own report is dropped. Where no such file can be made (or fd 2 is closed), the
    report is let through rather than the fast path given up.

    fd 2 is the process's, so one thread at a time (_FD2): two parses at once (the
    daemon's start loads the config while its inotify thread reads the include globs)
    left fd 2 on the other's memory file for good, and the daemon's log with it."""
    with _FD2:
        return _quiet_ryml_json_locked(data)


_FD2 = threading.Lock()


def _quiet_ryml_json_locked(data: bytes) -> Optional[str]:
    try:
        spill = _spill_file()
        saved = os.dup(2)
    except OSError:
        try:
            return _ryml_json(data)
        except Exception:
            return None
    with spill:
        os.dup2(spill.fileno(), 2)
        refused = False
        try:
            js = _ryml_json(data)
        except Exception:  # ExceptionParse, ExceptionVisit, ...: the slow path decides
            js, refused = None, True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if spill.tell():
            spill.seek(0)
            others = [ln for ln in spill.read().splitlines(keepends=True)
                      if not (refused and _RYML_REPORT.search(ln))]
            if others:
                os.write(2, b"".join(others))
    return js


def _spill_file():
    try:  # no file system needed (the unit's ProtectSystem=strict, PrivateTmp=yes)
        return os.fdopen(os.memfd_create("egress-agent-ryml", os.MFD_CLOEXEC), "w+b")
    except (OSError, AttributeError):
        return tempfile.TemporaryFile()


_RYML_REPORT = re.compile(rb"ERROR: \[\w+\]|ERROR: \(node=|\(detected here\)\s*$")


def _read_data(text: str, file: str, with_lines: bool) -> tuple[Any, Optional[dict[PathT, Where]]]:
    """Data, and with `with_lines` the path -> (file, line) map.

    Fast path: JSON (valid YAML, and what generators of big configs write) or
    libyaml, with no line tracking. Any error falls back to the line-tracking
    loader, which says where."""
    if not with_lines:
        return _read_plain(text, file)[0], None
    return _read_yaml(text, file)


def _read_plain(text: str, file: str) -> tuple[Any, bool]:
    """_read_data without lines: (data, whether rapidyaml's fast path gave it)."""
    if text.lstrip().startswith("{"):
        try:  # json's scanner stops deep nesting with RecursionError: the walk then says where
            return json.loads(text, object_pairs_hook=_no_duplicates), False
        except (ValueError, RecursionError, _Duplicate):
            pass
    data = _ryml_data(text)
    if data is not None:
        return data, True
    checked = False
    if not _plainly_bounded(text):
        _check_structure(text, file)
        checked = True
    try:
        return yaml.load(text, Loader=_FastLoader), False
    except (yaml.YAMLError, _Duplicate, ValueError, TypeError, OverflowError,
            AttributeError, RecursionError):
        pass
    return _read_yaml(text, file, checked=checked)[0], False


class _IncludeProblem(Exception):
    """An include: entry that fails, to be reported at its line in the including file."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


def _assemble(text: str, file: str, with_lines: bool, read=None):
    """The main file's data with its includes appended. `read` (text, file) gives a
    file's data where lines are not needed (a Reader's cache); _read_data else."""
    data, lines = (read(text, file), None) if read and not with_lines \
        else _read_data(text, file, with_lines)
    if not isinstance(data, dict):
        raise ConfigError([Problem(file, 1, "", "expected a mapping with version: 1, host:, ...")])
    if lines is None and with_lines:
        lines = {}
    try:
        included = _include(data, lines, file, text, read)
    except _IncludeProblem as e:
        if lines is None:  # the fast path has no lines: read again with them
            lines = _read_data(text, file, with_lines=True)[1]
        raise ConfigError([_problem(("include", e.index), e.message, lines, file,
                                    _at(data, ("include", e.index)))]) from None
    return data, lines, included


def _read_yaml(text: str, file: str, checked: bool = False) -> tuple[Any, dict[PathT, Where]]:
    if not checked:
        _check_structure(text, file)
    lines: dict[PathT, Where] = {}
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses unprintable characters here
        node = loader.get_single_node()
        data = _construct(loader, node, (), lines, file) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError([_syntax(e, text, file)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


# What an included file may add to; lists are appended in file-name order.
INCLUDABLE = ("egress_ips", "workloads", "policies", "managed_sources")
_WILDCARD = re.compile(r"[*?[]")


def _include_paths(i: int, pattern: str, base: str, room: int) -> list[str]:
    """The files one include: entry names. A literal path must exist (a missing one
    would silently drop its workloads); a glob may match nothing (an empty conf.d),
    but only in the file name, in a directory that exists, so matching is one
    directory listing however the pattern is written."""
    full = os.path.join(base, pattern)
    directory, name = os.path.split(full)
    if _WILDCARD.search(directory):
        raise _IncludeProblem(i, f"{pattern!r}: only the file name may hold * ? or [...]; "
                                 "name the directory, like conf.d/*.yaml")
    if not _WILDCARD.search(name):
        if not os.path.lexists(full):
            raise _IncludeProblem(i, f"{full} does not exist; create it or remove it "
                                     "from include: (a glob like conf.d/*.yaml may match nothing)")
        return [full]
    if not os.path.isdir(directory):
        raise _IncludeProblem(i, f"{pattern!r}: the directory {directory} does not exist")
    matches = sorted(glob.glob(full))
    if len(matches) > room:
        raise _IncludeProblem(i, f"{pattern!r} matches {len(matches)} files; a config may "
                                 f"include at most {MAX_INCLUDED}")
    return matches


def _include(data: dict, lines: Optional[dict[PathT, Where]], file: str, text: str,
             read=None) -> list[str]:
    """Append the lists of every file that `include:` names (relative to `file`)."""
    base = os.path.dirname(os.path.abspath(file))
    included: list[str] = []
    grown: set[str] = set()  # the lists of `data` this call made, extended in place
    patterns = data.get("include") or []
    if not isinstance(patterns, list):
        return included  # pydantic reports the type
    left = MAX_BYTES - len(text.encode("utf-8", "surrogatepass")) if patterns else 0
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            continue  # pydantic reports the type
        for path in _include_paths(i, pattern, base, MAX_INCLUDED - len(included)):
            try:
                frag_text = _read_file(path, max(left, 0))
            except _Unreadable as e:
                if e.line:  # the bytes are wrong: say where in the included file
                    raise ConfigError([Problem(path, e.line, "", e.reason)]) from None
                raise _IncludeProblem(i, f"cannot read {path}: {e.reason}") from None
            left -= len(frag_text.encode("utf-8"))
            frag, flines = (read(frag_text, path), None) if read and lines is None \
                else _read_data(frag_text, path, with_lines=lines is not None)
            if frag is None:
                included.append(path)
                continue
            if flines is None:  # fast path failed to explain: take the slow one
                flines = {}
            bad_shape = not isinstance(frag, dict) or bool(set(frag) - set(INCLUDABLE)) or any(
                not isinstance(v, list) for v in frag.values())
            if bad_shape and not flines:  # say where: read it again with lines
                frag, flines = _read_yaml(frag_text, path)
            if not isinstance(frag, dict) or set(frag) - set(INCLUDABLE):
                bad = sorted(map(str, set(frag) - set(INCLUDABLE))) if isinstance(frag, dict) \
                    else ["(not a mapping)"]
                raise ConfigError([Problem(path, flines.get((bad[0],), (path, 1))[1], bad[0],
                                           f"an included file may only hold {', '.join(INCLUDABLE)}")])
            for key, items in frag.items():
                if not isinstance(items, list):
                    raise ConfigError([Problem(path, flines.get((key,), (path, 1))[1], key,
                                               "expected a list")])
                existing = data.get(key)
                if existing is None:
                    existing = []
                elif not isinstance(existing, list):
                    continue  # pydantic reports the main file's wrong type, at its line
                offset = len(existing)
                if key in grown:
                    existing.extend(items)
                else:  # a new list once: the main file's may be a YAML alias's or a cache's
                    data[key] = [*existing, *items]
                    grown.add(key)
                if lines is not None:
                    # a list only includes add is at its first fragment: a problem in it
                    # keeps its field path (workloads[1].source[0]) and its file and line
                    lines.setdefault((key,), flines.get((key,), (path, 1, 0, 0)))
                    for p, w in flines.items():
                        if len(p) >= 2 and p[0] == key:
                            lines[(key, p[1] + offset) + p[2:]] = w
            included.append(path)
    return included


def watched_paths(file: str) -> dict[str, Optional[str]]:
    """Directories to watch for changes of `file` and its includes: dir -> file name
    (None: any *.yaml / *.yml in it). Read leniently: an invalid file still has a dir."""
    base = os.path.dirname(os.path.abspath(file))
    out: dict[str, Optional[str]] = {base: os.path.basename(file)}
    try:
        data = _read_data(_read_file(file), file, with_lines=False)[0]
    except (_Unreadable, ConfigError):
        return out
    patterns = data.get("include") if isinstance(data, dict) else None
    for pattern in patterns if isinstance(patterns, list) else []:
        if isinstance(pattern, str):
            out[os.path.dirname(os.path.join(base, pattern))] = None
    return out


@contextmanager
def _gc_paused():
    """No cyclic garbage collection while a config is built: its ~10^6 new dicts,
    lists and models hold no cycles, but each 700 allocations start a young
    collection and every tenth of those an older one over all of them (half the
    time of a 100k-workload load). Reference counting still frees as usual."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse(text: str, file: str = "<config>") -> Loaded:
    """Every problem at once, sorted by file and line: the field errors, and the
    cross-field checks over whatever did validate."""
    with _gc_paused():
        return _parse(text, file)


def _parse(text: str, file: str, reader: Optional["Reader"] = None) -> Loaded:
    global _suggestions_left
    _suggestions_left = SUGGESTION_BUDGET
    if reader is not None:
        try:
            return reader._parse(text, file)
        except (ConfigError, ValidationError):
            pass  # the reader's data is load()'s; load()'s path says what is wrong, and where
    data, _, included = _assemble(text, file, with_lines=False)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        data, lines, _ = _assemble(text, file, with_lines=True)
        errs = [err for err in e.errors() if not _other_union_branch(err)]
        raise ConfigError(_in_order(
            [_problem_from_pydantic(err, file, lines) for err in errs]
            + _semantics_of_the_rest(data, errs, lines, file))) from None
    semantic = _check_semantics(cfg)
    if semantic:
        data, lines, _ = _assemble(text, file, with_lines=True)
        raise ConfigError(_in_order([_semantic_problem(s, data, lines, file) for s in semantic]))
    return Loaded(cfg, file, text, (file, *included))


def _in_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.column))


def _at(data: Any, path: PathT) -> Any:
    """The value at `path` in the data as written, or None."""
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# Lists whose invalid items the cross-field checks can do without, and fields they never read.
_ITEMS = ("egress_ips", "workloads", "policies", "managed_sources")
_UNREAD = ("state_dir", "exclude", "include")


def _semantics_of_the_rest(data: dict, errs: list[dict], lines: dict[PathT, Where],
                           file: str) -> list[Problem]:
    """The cross-field checks over the items that did validate, so one `check` shows
    every mistake. An invalid item is left out, and its id and app count as known
    (a reference to it is not also "unknown"); a problem with host, version or
    defaults, which every check reads, leaves them out altogether."""
    bad: dict[str, set[int]] = {k: set() for k in _ITEMS}
    rest = dict(data)
    for err in errs:
        loc = err["loc"]
        if len(loc) >= 2 and loc[0] in bad and isinstance(loc[1], int):
            bad[loc[0]].add(loc[1])
        elif loc and (loc[0] in _UNREAD or (len(loc) == 1 and err["type"] == "extra_forbidden")):
            rest.pop(loc[0], None)
        else:
            return []
    kept: dict[str, list[int]] = {}
    known: dict[str, set[str]] = {"workload": set(), "app": set(), "ip": set(), "served": set()}
    for k in _ITEMS:
        items = data.get(k)
        if not isinstance(items, list):
            continue
        kept[k] = [i for i in range(len(items)) if i not in bad[k]]
        rest[k] = [items[i] for i in kept[k]]
        for i in bad[k]:
            item = items[i] if isinstance(items[i], dict) else {}
            for field, kind in (("id", {"workloads": "workload", "egress_ips": "ip"}.get(k)),
                                ("app", "app" if k in ("workloads", "egress_ips") else None)):
                if kind and isinstance(item.get(field), str):
                    known[kind].add(item[field])
            if k == "egress_ips" and isinstance(item.get("app"), str):
                known["served"].add(item["app"])  # it may serve the app: no "unserved" guess
    try:
        cfg = Config.model_validate(rest)
    except ValidationError:
        return []
    number = lambda base, items: zip(kept.get(base, range(len(items))), items)  # noqa: E731
    return [_semantic_problem(s, data, lines, file)
            for s in _check_semantics(cfg, number, known)]


def _semantic_problem(s: tuple, data: Any, lines: dict[PathT, Where], file: str) -> Problem:
    path, msg, *suggestion = s
    return _problem(path, msg, lines, file, _at(data, path), suggestion[0] if suggestion else None)


# Names compared for suggestions in one parse: difflib takes ~14 us per name, so a file
# with thousands of unknown references among 100,000 ids would take minutes; past the
# budget (~3 s) problems come without a suggestion.
SUGGESTION_BUDGET = 200_000
_suggestions_left = SUGGESTION_BUDGET


def _closest(name: Any, names: Iterable[Any]) -> Optional[str]:
    global _suggestions_left
    pool = sorted({str(n) for n in names if n})
    if len(pool) > _suggestions_left:
        return None
    _suggestions_left -= len(pool)
    close = difflib.get_close_matches(str(name), pool, n=1)
    return close[0] if close else None


def _did_you_mean(suggestion: Optional[str]) -> str:
    return f"; did you mean {suggestion!r}?" if suggestion else ""


def _fields_at(loc: PathT) -> list[str]:
    """The field names of the model at `loc` (for a did-you-mean on an unknown field)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(t: Any) -> Any:
    if isinstance(t, type) and issubclass(t, BaseModel):
        return t
    for arg in get_args(t):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def load(path: Union[str, Path], reader: Optional["Reader"] = None) -> Loaded:
    """Read and validate a config file; any problem is a ConfigError with FILE:LINE.
    With a `reader`, what did not change since its last load is not read again."""
    p = str(path)
    try:
        text = _read_file(p)
    except _Unreadable as e:
        raise ConfigError([Problem(p, e.line, "", e.reason if e.line
                                   else f"cannot read: {e.reason}")]) from None
    with _gc_paused():
        return _parse(text, p, reader)


# Lists whose entries a Reader keeps as validated models.
_KEPT = ("egress_ips", "workloads", "policies")


@dataclass
class _FileSeen:
    digest: bytes
    text: str
    data: dict  # the file's data, with the validated model in place of each entry of _KEPT
    # the _entry_key of each entry of _KEPT as read (beside data's models): a changed
    # file's unchanged entries are found by them, without reading its old text again
    keys: Optional[dict[str, list[str]]] = None
    shape: Optional["_Shape"] = None  # when the fast path read it: where an edit may be spliced


# --- splicing an edit into a file's last data (Reader) --------------------------------
#
# An editor or a fleet tool changes a few entries of a big file; reading the whole
# file again (rapidyaml, JSON, the checks of the fast path) is ~30 ms at 10,000
# workloads. When the file's last version took rapidyaml's fast path, its structure
# is plain to see from its lines, and an edit confined to whole entries of one
# top-level list is read alone:
# - that fast path refuses multi-line quoted scalars, block scalars (| >), anchors
#   and aliases, tags, document markers, tabs, and flow collections over more than
#   one line. What is left is block structure: a line at column 0 (neither blank nor
#   a comment) is always a top-level key, since a plain scalar continues only on
#   lines indented more than its block; in a top-level list written as a block
#   sequence at indent I (`workloads:` alone on its line, then `  - ...`), a line of
#   I spaces and `- ` starts an entry and nothing else (an entry's own keys sit at
#   I+2 or deeper, and no scalar continues at column I), and an entry's lines run
#   to the next such line or top-level key;
# - the text before and after the edit is byte for byte that of the last version;
#   the edit is widened to whole lines, then to whole entries; it may hold blank
#   and comment lines but no top-level line;
# - the new lines are read as the document `KEY:\n` + lines by _ryml_data, so every
#   check of the fast path applies to them (all of them are local to a line: the
#   characters, quotes, brackets, line length), and their entries must be as many
#   as their entry lines; the bound on nodes is kept as a count over the whole text
#   (unmasked: at least what _plainly_bounded counts);
# - the count of entry lines before, in and after the edit must add up to the
#   list's length in the last data.
# Then the new data is the last one with the edited entries replaced, which is what
# reading the whole file gives (tests/unit/test_config_reader.py compares them after
# random edits). Anything else reads the whole file.

_NODE_CHARS = ":?-,[{"
_HEADER = re.compile(r"\n(?=[^ \n#-])")  # a line starting at column 0, not a comment or `-`
_KEPT_HEADER = re.compile(r"(" + "|".join(_KEPT) + r"):(?:[ ]+(?:#[^\n]*)?)?")
_BLOCK = 4096


@dataclass
class _Shape:
    headers: list[int]  # offset of each top-level line
    lists: dict[int, tuple[str, str]]  # header index -> (its key, the indent of its entries)
    nodes: int  # 3 x the characters that may bring a node, over the whole text

    @classmethod
    def of(cls, text: str, data: dict) -> Optional["_Shape"]:
        headers = ([0] if text and text[0] not in " \n#-" else []) + \
            [m.end() for m in _HEADER.finditer(text)]
        lists: dict[int, tuple[str, str]] = {}
        for k, h in enumerate(headers):
            end = text.find("\n", h)
            m = _KEPT_HEADER.fullmatch(text, h, len(text) if end < 0 else end)
            if m is None or not isinstance(data.get(m[1]), list):
                continue
            first = _first_content_line(text, len(text) if end < 0 else end + 1)
            if first is None:
                continue
            line = text[first:_line_end(text, first)]
            indent = line[:len(line) - len(line.lstrip(" "))]
            if _entry_line(line, indent):
                lists[k] = (m[1], indent)
        return cls(headers, lists, _nodes(text))


def _nodes(text: str) -> int:
    return 3 * sum(map(text.count, _NODE_CHARS))


def _line_end(text: str, i: int) -> int:
    """The offset of the newline ending the line at `i` (or the text's end)."""
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _first_content_line(text: str, i: int, stop: Optional[int] = None) -> Optional[int]:
    """The offset of the first line at or after `i` (a line start), before `stop`, that
    is neither blank nor a comment; None if there is none."""
    stop = len(text) if stop is None else stop
    while i < stop:
        end = _line_end(text, i)
        body = text[i:end].lstrip(" ")
        if body and not body.startswith("#"):
            return i
        i = end + 1
    return None


@functools.lru_cache(maxsize=16)
def _bad_lines(indent: str) -> re.Pattern:
    """A line that is neither blank, a comment, an entry line at `indent`, nor
    indented deeper than it (the inside of an entry)."""
    n = len(indent)
    return re.compile((rf"^ {{0,{n - 1}}}[^ \n#]|" if n else "") + rf"^ {{{n}}}(?!- |-$)[^ \n#]", re.M)


def _entry_line(line: str, indent: str) -> bool:
    return line.startswith(indent) and (line[len(indent):].startswith("- ") or line[len(indent):] == "-")


def _count_entries(text: str, indent: str, start: int, end: int) -> int:
    """Entry lines (`indent` then `- ` or a lone `-`) starting in text[start:end] after
    a newline, i.e. every one but a line starting at `start` itself."""
    return (text.count("\n" + indent + "- ", start, end + len(indent) + 2)
            - (text.startswith("\n" + indent + "- ", end - 1) if end > start else 0)
            + text.count("\n" + indent + "-\n", start, end + len(indent) + 2)
            - (text.startswith("\n" + indent + "-\n", end - 1) if end > start else 0))


def _common_prefix(a: str, b: str) -> int:
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + _BLOCK] == b[i:i + _BLOCK]:
        i += _BLOCK
    j = min(i + _BLOCK, n)
    while j - i > 16:
        m = (i + j) // 2
        if a[i:m] == b[i:m]:
            i = m
        else:
            j = m
    while i < n and a[i] == b[i]:
        i += 1
    return min(i, n)


def _common_suffix(a: str, b: str, limit: int) -> int:
    la, lb, i = len(a), len(b), 0
    while i < limit and a[la - min(i + _BLOCK, limit):la - i] == b[lb - min(i + _BLOCK, limit):lb - i]:
        i = min(i + _BLOCK, limit)
    j = min(i + _BLOCK, limit)
    while j - i > 16:
        m = (i + j) // 2
        if a[la - m:la - i] == b[lb - m:lb - i]:
            i = m
        else:
            j = m
    while i < limit and a[la - i - 1] == b[lb - i - 1]:
        i += 1
    return i


def _splice(seen: "_FileSeen", text: str) -> Optional[tuple[dict, "_Shape", Optional[dict]]]:
    """The data of `text` from `seen` (its last version) when the edit is whole
    entries of one top-level list (see above): (data, shape, entry keys); else None."""
    shape, old = seen.shape, seen.text
    if shape is None or not shape.lists:
        return None
    p = _common_prefix(old, text)
    s = _common_suffix(old, text, min(len(old), len(text)) - p)
    a = old.rfind("\n", 0, p) + 1
    e = len(old) - s
    b = e if e == 0 or old[e - 1] == "\n" else (old.find("\n", e) + 1 or len(old))
    k = bisect.bisect_left(shape.headers, a) - 1
    if k not in shape.lists:
        return None
    key, indent = shape.lists[k]
    body = _line_end(old, shape.headers[k]) + 1  # the list's first line
    end = shape.headers[k + 1] if k + 1 < len(shape.headers) else len(old)
    if b > end or a < body:
        return None
    delta = len(text) - len(old)
    # widen to whole entries: the edit starts at an entry line (or holds none), and
    # what follows it (past blanks and comments) is an entry line, the next
    # top-level line or the end
    for _ in range(4):
        firsts = [(old, _first_content_line(old, a, b)), (text, _first_content_line(text, a, b + delta))]
        if not all(f is None or _entry_line(t[f:_line_end(t, f)], indent) for t, f in firsts):
            a = max(old.rfind("\n" + indent + "- ", body - 1, a),
                    old.rfind("\n" + indent + "-\n", body - 1, a)) + 1
            if a < body:
                return None
            continue
        after = _first_content_line(old, b, end)
        if after is not None and not _entry_line(old[after:_line_end(old, after)], indent):
            nxt = [x for x in (old.find("\n" + indent + "- ", after, end),
                               old.find("\n" + indent + "-\n", after, end)) if x >= 0]
            b = min(nxt) + 1 if nxt else end
            continue
        break
    else:
        return None
    region_old, region_new = old[a:b], text[a:b + delta]
    if _bad_lines(indent).search(region_new):
        return None  # a top-level line, or a line at the entries' indent or less that starts none
    nodes = shape.nodes - _nodes(region_old) + _nodes(region_new)
    if nodes + 1 > MAX_NODES:
        return None
    i = _count_entries(old, indent, body - 1, a)
    n_old = _count_entries(old, indent, a - 1, b)
    models = seen.data.get(key)
    if not isinstance(models, list) or i + n_old + _count_entries(old, indent, b - 1, end) != len(models):
        return None
    n_new = _count_entries(text, indent, a - 1, b + delta)
    read = _ryml_data(key + ":\n" + region_new)
    if not isinstance(read, dict) or list(read) != [key]:
        return None
    entries = read[key] if n_new else []
    if n_new and (not isinstance(entries, list) or len(entries) != n_new) or \
            not n_new and read[key] is not None:
        return None
    keys = seen.keys
    if keys is not None and key in keys and len(keys[key]) == len(models):
        new_keys = [_entry_key(e) for e in entries]
        kept = dict(zip(keys[key][i:i + n_old], models[i:i + n_old]))  # a moved entry keeps its model
        entries = [kept.get(k, e) for k, e in zip(new_keys, entries)]
        keys = dict(keys)
        keys[key] = [*keys[key][:i], *new_keys, *keys[key][i + n_old:]]
    data = dict(seen.data)
    data[key] = [*models[:i], *entries, *models[i + n_old:]]
    headers = shape.headers[:k + 1] + [h + delta for h in shape.headers[k + 1:]]
    return data, _Shape(headers, shape.lists, nodes), keys


# each kept list's model, as Config declares it (list[Workload] -> Workload)
_KEPT_MODELS = {k: get_args(Config.model_fields[k].annotation)[0] for k in _KEPT}


def _validate_kept(data: Any) -> Config:
    """Config.model_validate(data) for the Reader's data, whose lists hold the models
    of the entries it kept and plain data for the others: only the others are
    validated. pydantic runs a model's `after` validators again on every instance
    it is given (100k calls of Workload._kind per reload at 100k workloads); the kept
    ones passed them when they were made. Any problem raises ValidationError, and the
    Reader hands the config to load()'s path, which says where it is."""
    if not isinstance(data, dict):
        return Config.model_validate(data)
    lists = {k: data[k] for k in _KEPT if isinstance(data.get(k), list)}
    entries = {k: [e if type(e) is _KEPT_MODELS[k] else _KEPT_MODELS[k].model_validate(e)
                   for e in v] for k, v in lists.items()}
    return Config.model_validate({**data, **{k: [] for k in lists}}).model_copy(update=entries)


class Reader:
    """Loads one config again and again, as the daemon does on each change: a file
    (the main one or an include) whose bytes are those of the last good load is
    not parsed again, and in a file that changed, only the egress_ips, workloads
    and policies entries whose data changed are validated again (and when the
    change is whole entries of one list, only its lines are read: _splice). Every
    file is still read (bounded, as by load()) and hashed: an mtime has coarse
    ticks, and a size or inode says nothing about an edit in place. The result
    equals load()'s; a config with any problem is handed to load()'s own path,
    which reports it."""

    def __init__(self) -> None:
        self._files: dict[str, _FileSeen] = {}
        # this load's files, in include order: (file, digest, text, data, entry keys, shape)
        self._order: list[tuple[str, bytes, str, dict, Optional[dict[str, list[str]]],
                                Optional[_Shape]]] = []
        self.spliced = 0  # edits read by _splice (for tests and benchmarks)
        self._checked: Optional[_Checked] = None  # the last good config's indexes

    def load(self, path: Union[str, Path]) -> Loaded:
        return load(path, self)

    def _read(self, text: str, file: str) -> Any:
        """A file's data for _assemble: the cached models where the bytes or the
        entry did not change, plain data where they did."""
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        seen = self._files.get(file)
        keys, shape = None, None
        spliced = _splice(seen, text) if seen is not None and seen.digest != digest else None
        if seen is not None and seen.digest == digest:
            data = dict(seen.data)  # _include replaces the main file's lists: never the cache's
            keys, shape = seen.keys, seen.shape
        elif spliced is not None:
            data, shape, keys = spliced
            self.spliced += 1
        else:
            data, fast = _read_plain(text, file)
            if isinstance(data, dict) and fast:
                shape = _Shape.of(text, data)
            if isinstance(data, dict) and len(text) <= _REUSE_TEXT:
                keys = {key: [_entry_key(e) for e in data[key]] for key in _KEPT
                        if isinstance(data.get(key), list)}
            if isinstance(data, dict) and seen is not None and seen.keys is not None:
                data = dict(data)
                for key, models in self._still_valid(seen).items():
                    if key in (keys or {}):
                        data[key] = [models.get(k, e) if isinstance(e, dict) else e
                                     for k, e in zip(keys[key], data[key])]
        if isinstance(data, dict):  # a copy: _include replaces the main file's lists
            self._order.append((file, digest, text, dict(data), keys, shape))
        return data

    @staticmethod
    def _still_valid(seen: _FileSeen) -> dict[str, dict[str, BaseModel]]:
        """The models of a changed file's last version, by the data they came from."""
        out: dict[str, dict[str, BaseModel]] = {}
        for key, keys in (seen.keys or {}).items():
            models = seen.data.get(key)
            if isinstance(models, list) and len(keys) == len(models):
                out[key] = dict(zip(keys, models))
        return out

    def _parse(self, text: str, file: str) -> Loaded:
        self._order = []
        data, _, included = _assemble(text, file, with_lines=False, read=self._read)
        cfg = _validate_kept(data)
        # Remember each file's entries as models: _include appended the lists in
        # the order the files were read, the main file's first.
        offsets = {key: 0 for key in _KEPT}
        files: dict[str, _FileSeen] = {}
        for f, digest, ftext, fdata, keys, shape in self._order:
            kept = dict(fdata)
            for key in _KEPT:
                if isinstance(fdata.get(key), list):
                    n = len(fdata[key])
                    kept[key] = getattr(cfg, key)[offsets[key]:offsets[key] + n]
                    offsets[key] += n
            files[f] = _FileSeen(digest, ftext, kept, keys, shape)
        last = self._checked
        changes = _workload_changes(self._files, files) if last is not None else None
        checked = last.after(cfg, changes) if last is not None else None
        if checked is None:
            if _check_semantics(cfg):
                raise ConfigError([])
            checked = _Checked(cfg)
        elif not checked:
            raise ConfigError([])
        if last is not None and changes is not None:
            base = last.cfg._ix()
            base.base, base.added, base.removed = None, [], []  # one step back is enough
            cfg._set_index(_Index(cfg.workloads, base, *changes))
        # derived now, from the base's own (which the next load cuts loose)
        cfg.workloads_by_id, cfg.fixed_blocks
        self._checked = checked
        self._files, self._order = files, []
        return Loaded(cfg, file, text, (file, *included))


def workload_changes(old: Config, new: Config) -> Optional[tuple[list, list]]:
    """(added, removed): the workload models `new` has and `old` has not, and the
    other way round. An entry a Reader did not change is the same model, and a config
    it read right after `old` knows which are not (O(changed)); otherwise the models
    are told apart by identity, with set operations in C (O(workloads)). None when
    `new` holds one model twice."""
    changes = new.changes_since(old)
    if changes is not None:
        return changes
    before = dict(zip(map(id, old.workloads), old.workloads))
    after = dict(zip(map(id, new.workloads), new.workloads))
    if len(after) != len(new.workloads):
        return None
    return ([after[k] for k in after.keys() - before.keys()],
            [before[k] for k in before.keys() - after.keys()])


def _workload_changes(old: dict[str, _FileSeen], new: dict[str, _FileSeen]
                      ) -> Optional[tuple[list, list]]:
    """(added, removed): the workload models in `new`'s files that were not in `old`'s,
    and the other way round, looked for in the files that changed alone (a file with
    the same bytes holds the same models). None when a changed file holds one model
    twice (two entries alike: the full check names them)."""
    added, removed = [], []
    for f in [*old, *(f for f in new if f not in old)]:
        o, n = old.get(f), new.get(f)
        if o is not None and n is not None and o.digest == n.digest:
            continue
        before = o.data.get("workloads") if o is not None else None
        after = n.data.get("workloads") if n is not None else None
        before = before if isinstance(before, list) else []
        after = after if isinstance(after, list) else []
        had, has = set(map(id, before)), set(map(id, after))
        if len(has) != len(after):
            return None
        removed += [w for w in before if id(w) not in has]
        added += [w for w in after if id(w) not in had]
    return added, removed


class _Checked:
    """A config that passed _check_semantics, with indexes of its workloads, so that
    the next one, when only workloads changed, is checked for the changed ones
    alone: `after` says whether it has a problem exactly when _check_semantics
    would find one (tests/unit/test_config_incremental.py compares them).

    A config without problems gets one only through what changed: an added
    workload's id, source or cgroup already used (or used twice by the added ones),
    its app served by no egress IP here (unless one is its own), a source that is
    an egress IPv4 or lies in an egress IPv6 range; a removed workload named by an
    egress IP (`workload:`) or a policy's match, or the last one of an app that a
    policy's match names and no egress IP has. An added workload with fixed
    `blocks:` takes the full check."""

    def __init__(self, cfg: Config, index: Optional[tuple] = None) -> None:
        self.cfg = cfg
        if index is None:
            ws = cfg.workloads
            index = ({w.id for w in ws}, {s for w in ws for s in w.source},
                     {w.cgroup for w in ws if w.cgroup}, collections.Counter(w.app for w in ws))
        self.ids, self.sources, self.cgroups, self.apps = index

    def after(self, new: Config, changes: Optional[tuple[list, list]]
              ) -> "Union[_Checked, None, Literal[False]]":
        """None: take the full check (more than workloads changed, or the workload
        models that changed are not known: `changes`, from _workload_changes); else a
        false value when `new` has a problem, a _Checked of `new` when not."""
        old = self.cfg
        if changes is None or (new.version, new.host, new.defaults, new.managed_sources) != \
                (old.version, old.host, old.defaults, old.managed_sources) or \
                not _same(new.egress_ips, old.egress_ips) or not _same(new.policies, old.policies):
            return None
        added, removed = changes
        if any(w.blocks for w in added):
            return None
        ids = [w.id for w in added]
        sources = [s for w in added for s in w.source]
        cgroups = [w.cgroup for w in added if w.cgroup]
        gone_ids = {w.id for w in removed}
        gone_sources = {s for w in removed for s in w.source}
        gone_cgroups = {w.cgroup for w in removed if w.cgroup}

        def clash(new_values, have, freed):
            return len(set(new_values)) != len(new_values) or any(
                v in have and v not in freed for v in new_values)

        bad = clash(ids, self.ids, gone_ids) or clash(sources, self.sources, gone_sources) \
            or clash(cgroups, self.cgroups, gone_cgroups)
        apps = collections.Counter(w.app for w in added)
        apps.subtract(w.app for w in removed)
        if not bad and added:
            here = {ip.app for ip in new.ips_here() if ip.app}
            owned = {ip.workload for ip in new.ips_here() if ip.workload}
            bad = any(w.app and w.app not in here and w.id not in owned for w in added)
        if not bad and sources:
            v4 = {ip.ipv4 for ip in new.egress_ips if ip.ipv4}
            ranges = [ipaddress.ip_network(ip.ipv6) for ip in new.egress_ips if ip.ipv6]
            bad = any(s in v4 for s in sources) or any(
                ":" in s and any(ipaddress.IPv6Address(s) in net for net in ranges)
                for s in sources)
        if not bad and removed:
            still = (gone_ids - set(ids))  # ids no workload has any more
            bad = any(ip.workload in still for ip in new.egress_ips) or any(
                wid in still for p in new.policies for wid in p.match.workloads)
            gone_apps = {a for a, n in apps.items() if a is not None and n < 0
                         and self.apps[a] + n <= 0}
            if not bad and gone_apps:
                ip_apps = {ip.app for ip in new.egress_ips if ip.app}
                bad = any(a in gone_apps and a not in ip_apps for p in new.policies for a in p.match.apps)
        if bad:
            return False  # a problem: load()'s own path says which
        # update the indexes in place: the old config is not checked again
        self.ids -= gone_ids - set(ids)
        self.ids.update(ids)
        self.sources -= gone_sources - set(sources)
        self.sources.update(sources)
        self.cgroups -= gone_cgroups - set(cgroups)
        self.cgroups.update(cgroups)
        self.apps.update(apps)
        self.apps = +self.apps if any(n <= 0 for n in apps.values()) else self.apps
        return _Checked(new, (self.ids, self.sources, self.cgroups, self.apps))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b))


def _entry_key(entry: Any) -> str:
    """An entry's data as one string: equal only for data that validates alike
    (True is not 1, 1 is not 1.0, '1' is not 1; key order kept)."""
    return repr(entry)


# A changed file's unchanged entries keep their models when its last version was
# at most this big (an include of ~20,000 workloads): finding them takes the key of
# each of its entries, kept in memory, which for a far bigger file would cost more
# memory than validating it again costs time.
_REUSE_TEXT = 1 << 20


def _other_union_branch(err: dict) -> bool:
    """For `egress: default | drop | {ipv4: ...}`, report only the branch the user wrote."""
    inp = err.get("input")
    if err["loc"][-1:] == ("constrained-str",) and "source" in err["loc"]:
        return True  # a source that is not a canonical IPv4: what _host_address says counts
    if not any(isinstance(part, str) and ("[" in part or "(" in part) for part in err["loc"]):
        return False  # not inside a union: a plain field (version: {}) must be reported
    return ((err["type"] == "literal_error" and isinstance(inp, dict))
            or (err["type"] in ("model_type", "dict_type") and isinstance(inp, str)))


def _problem_from_pydantic(err: dict, file: str, lines: dict[PathT, Where]) -> Problem:
    # pydantic adds union/validator tags to loc; keep the parts that are config paths.
    loc: list[Union[str, int]] = []
    for i, part in enumerate(err["loc"]):
        # an unknown key is the user's, whatever its characters (`state_di[r:`)
        user_key = err["type"] == "extra_forbidden" and i == len(err["loc"]) - 1
        if isinstance(part, str) and ("[" in part or "(" in part) and not user_key:
            continue  # a union or validator tag, not a config key
        if (tuple(loc) + (part,)) in lines or isinstance(part, int) or err["type"] == "missing" \
                or err["type"] == "extra_forbidden":
            loc.append(part)
    msg = err["msg"]
    value, suggestion = err.get("input"), None
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "string_pattern_mismatch" and \
            (err.get("ctx") or {}).get("pattern") in _PATTERN_MESSAGES:
        msg = _PATTERN_MESSAGES[err["ctx"]["pattern"]](value)
    elif err["type"] == "missing":
        msg, value = f"missing required field {loc[-1]!r}", None
    elif err["type"] == "extra_forbidden":
        value, suggestion = loc[-1], _closest(loc[-1], _fields_at(tuple(loc[:-1])))
        msg = (f"unknown field {loc[-1]!r}{_did_you_mean(suggestion)} "
               "(see `egress-agent schema` for the fields)")
    elif err["type"] == "literal_error":
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."  # a problem is one short line
        suggestion = _closest(err.get("input"), re.findall(r"'([^']*)'",
                                                           str((err.get("ctx") or {}).get("expected"))))
        msg = f"{shown} is not allowed: {msg[0].lower()}{msg[1:]}{_did_you_mean(suggestion)}"
    if len(msg) > 300:  # a validator quoting a huge value: keep the line readable
        msg = msg[:297] + "..."
    return _problem(tuple(loc), msg, lines, file, value, suggestion,
                    at_key=err["type"] == "extra_forbidden")


# --- checks that span fields -----------------------------------------------------

Numbering = Callable[[str, list], Iterable[tuple[int, Any]]]


def _as_written(base: str, items: list) -> Iterable[tuple[int, Any]]:
    return enumerate(items)


def _check_semantics(cfg: Config, number: Numbering = _as_written,
                     known: Optional[dict[str, set[str]]] = None) -> list[tuple]:
    """(path, message[, suggestion]) per problem. `number` gives each item its index
    in the file (invalid items left out of `cfg`), `known` the ids and apps of those."""
    out: list[tuple] = []
    known = known or {"workload": set(), "app": set(), "ip": set(), "served": set()}

    def dupes(items, what: str, key, base: str, values=None):
        if values is not None and len(set(values)) == len(values):
            return  # all distinct, the usual case: no walk with a key function per item
        seen: dict[Any, int] = {}
        for i, it in number(base, items):
            for k, sub in key(it):
                if k in seen:
                    out.append(((base, i) + sub, f"{what} {k!r} is already used by "
                                f"{base}[{seen[k]}]; each must be unique"))
                else:
                    seen[k] = i

    ips_, ws = cfg.egress_ips, cfg.workloads
    dupes(ips_, "id", lambda ip: [(ip.id, ("id",))], "egress_ips", [ip.id for ip in ips_])
    dupes(ips_, "ipv4", lambda ip: [(ip.ipv4, ("ipv4",))] if ip.ipv4 else [], "egress_ips",
          [ip.ipv4 for ip in ips_ if ip.ipv4])
    wids = [w.id for w in ws]
    dupes(ws, "id", lambda w: [(w.id, ("id",))], "workloads", wids)
    sources = [s for w in ws for s in w.source]
    dupes(ws, "source", lambda w: [(s, ("source", j)) for j, s in enumerate(w.source)], "workloads",
          sources)
    dupes(ws, "cgroup", lambda w: [(w.cgroup, ("cgroup",))] if w.cgroup else [], "workloads",
          [w.cgroup for w in ws if w.cgroup])
    dupes(cfg.policies, "name", lambda p: [(p.name, ("name",))], "policies")

    ranges = [(i, ipaddress.ip_network(ip.ipv6)) for i, ip in number("egress_ips", cfg.egress_ips)
              if ip.ipv6]
    for a, (i, na) in enumerate(ranges):
        for j, nb in ranges[:a]:
            if na.overlaps(nb):
                out.append((("egress_ips", i, "ipv6"),
                            f"range {na} overlaps {nb} of egress_ips[{j}]"))

    workload_ids = set(wids)
    workload_apps = {w.app for w in ws}
    apps = (workload_apps - {None}) | {ip.app for ip in cfg.egress_ips if ip.app}
    out += _unserved_apps(cfg, number, known["served"], workload_apps)
    out += _fixed_block_problems(cfg, number, known["ip"])
    out += _egress_addresses_of_workloads(cfg, ranges, number, sources)
    ips = {ip.id: ip for ip in cfg.egress_ips}
    lo, hi = port_bounds(cfg.defaults.port_range)
    if cfg.defaults.ports_per_workload > hi - lo + 1:
        out.append((("defaults", "ports_per_workload"),
                    f"a block of {cfg.defaults.ports_per_workload} ports does not fit "
                    f"port_range {cfg.defaults.port_range} ({hi - lo + 1} ports)"))
    for i, ip in number("egress_ips", cfg.egress_ips):
        if ip.workload and ip.workload not in workload_ids | known["workload"]:
            close = _closest(ip.workload, workload_ids | known["workload"])
            out.append((("egress_ips", i, "workload"),
                        f"unknown workload {ip.workload!r}" + (_did_you_mean(close) if close
                                                               else "; define it under workloads:"),
                        close))
        if ip.ports:
            plo, phi = port_bounds(ip.ports)
            if cfg.defaults.ports_per_workload > phi - plo + 1:
                out.append((("egress_ips", i, "ports"),
                            f"a block of {cfg.defaults.ports_per_workload} ports "
                            f"(defaults.ports_per_workload) does not fit {ip.ports}"))
        if ip.via and ip.via.gateway6 and not ip.ipv6:
            out.append((("egress_ips", i, "via", "gateway6"), "gateway6 needs an ipv6 range on this IP"))
        if ip.remote and ip.via is None:
            out.append((("egress_ips", i, "remote"), "a remote IP is reached through its gateway: "
                        "add via: {dev: TUNNEL, gateway: PEER}"))
        if ip.remote and cfg.host.role == "gateway":
            out.append((("egress_ips", i, "remote"), "a gateway host translates its IPs itself: "
                        "remote: true is for the workload hosts"))
    for i, p in number("policies", cfg.policies):
        for j, wid in enumerate(p.match.workloads):
            if wid not in workload_ids | known["workload"]:
                close = _closest(wid, workload_ids | known["workload"])
                out.append((("policies", i, "match", "workloads", j),
                            f"unknown workload {wid!r}{_did_you_mean(close)}", close))
        for j, app in enumerate(p.match.apps):
            if app not in apps | known["app"]:
                close = _closest(app, apps | known["app"])
                out.append((("policies", i, "match", "apps", j),
                            f"unknown app {app!r}: no workload or egress IP has it"
                            + _did_you_mean(close), close))
        if p.match.ports and p.match.protocols and not set(p.match.protocols) & {"tcp", "udp"}:
            out.append((("policies", i, "match", "ports"), "ports only apply to tcp or udp"))
        if isinstance(p.egress, PolicyEgress):
            e = p.egress
            for field, fam in (("ipv4", 4), ("ipv6", 6)):
                ref = getattr(e, field)
                if ref is None:
                    continue
                if ref in known["ip"]:
                    continue
                if ref not in ips:
                    close = _closest(ref, ips.keys() | known["ip"])
                    out.append((("policies", i, "egress", field),
                                f"unknown egress IP {ref!r}" + (_did_you_mean(close) if close else
                                f"; ids are: {', '.join(sorted(ips)) or 'none'}"), close))
                elif fam == 4 and not ips[ref].ipv4:
                    out.append((("policies", i, "egress", field), f"egress IP {ref!r} has no ipv4"))
                elif fam == 6 and not ips[ref].ipv6:
                    out.append((("policies", i, "egress", field), f"egress IP {ref!r} has no ipv6 range"))
            fb = e.ipv4_fallback
            if fb is not None and fb not in ("default", "drop") and fb not in known["ip"]:
                if fb not in ips:
                    close = _closest(fb, [*ips, *known["ip"], "default", "drop"])
                    out.append((("policies", i, "egress", "ipv4_fallback"),
                                f"{fb!r} is neither default, drop nor an egress IP id"
                                + _did_you_mean(close), close))
                elif not ips[fb].ipv4:
                    out.append((("policies", i, "egress", "ipv4_fallback"), f"egress IP {fb!r} has no ipv4"))
                elif fb == e.ipv4:
                    out.append((("policies", i, "egress", "ipv4_fallback"),
                                "the fallback must differ from ipv4"))
            if fb is not None and e.ipv4 is None:
                out.append((("policies", i, "egress", "ipv4_fallback"), "a fallback needs ipv4"))
    return out


def _unserved_apps(cfg: Config, number: Numbering, known_apps: set[str],
                   workload_apps: set[Optional[str]]) -> list[tuple]:
    """A workload's app that no egress IP here serves: a typo would leave with the
    host's shared address, so it is an error (a machine-scoped IP serves it anyway)."""
    here = {ip.app for ip in cfg.ips_here() if ip.app}
    owned = {ip.workload for ip in cfg.ips_here() if ip.workload}
    out: list[tuple] = []
    if not workload_apps - here - known_apps - {None}:
        return out  # every app is served: no walk over the workloads
    said: dict[str, tuple[str, Optional[str]]] = {}
    for i, w in number("workloads", cfg.workloads):
        if not w.app or w.app in here or w.id in owned or w.app in known_apps:
            continue
        if w.app not in said:
            elsewhere = sorted({ip.region or cfg.host.region for ip in cfg.egress_ips
                                if ip.app == w.app})
            close = _closest(w.app, here | known_apps)
            said[w.app] = (f"no egress IP serves app {w.app!r} in region {cfg.host.region!r}"
                           + (f" (it has egress IPs in {', '.join(elsewhere)})" if elsewhere else "")
                           + (_did_you_mean(close) if close else
                              "; add an egress IP with this app, or fix the name"), close)
        out.append((("workloads", i, "app"), *said[w.app]))
    return out


def _fixed_block_problems(cfg: Config, number: Numbering, known_ips: set[str]) -> list[tuple]:
    """Fixed blocks (`blocks:`) are taken as given, so each must be one the allocator
    could have chosen (the IP's block size, inside its ports, on an IP the workload
    leaves from), and no two may overlap: two workloads would leave from one
    address and port, and conntrack could not tell their connections apart."""
    out: list[tuple] = []
    with_blocks = [(i, w) for i, w in number("workloads", cfg.workloads) if w.blocks]
    if not with_blocks:
        return out
    ips = {ip.id: ip for ip in cfg.egress_ips}
    here = {ip.id for ip in cfg.ips_here()}
    size = cfg.defaults.ports_per_workload
    placed: dict[str, list[tuple[int, int, int, str]]] = {}  # ip id -> (lo, hi, index, id)
    for i, w in with_blocks:
        uses = ({ip.id for ip in cfg.app_ips(w.app)} | {ip.id for ip in cfg.own_ips(w.id)}
                | {x for p in cfg.policies if policy_matches(p, w) for x in policy_ips(p, cfg)})
        for ip_id, block in w.blocks.items():
            path = ("workloads", i, "blocks", ip_id)
            ip = ips.get(ip_id)
            if ip is None:
                if ip_id not in known_ips:  # the closest of its own IPs, else of all
                    close = _closest(ip_id, uses) or _closest(ip_id, ips.keys() | known_ips)
                    out.append((path, f"unknown egress IP {ip_id!r}" + (
                        _did_you_mean(close) if close
                        else f"; ids are: {', '.join(sorted(ips)) or 'none'}"), close))
                continue
            lo, hi = port_bounds(block)
            plo, phi = cfg.ip_ports(ip)
            if ip_id not in here:
                out.append((path, f"egress IP {ip_id!r} is in region {ip.region!r}, not this "
                                  f"host's ({cfg.host.region!r}): a block there is never used"))
            elif not ip.ipv4:
                out.append((path, f"egress IP {ip_id!r} has no ipv4; port blocks are on IPv4"))
            elif ip_id not in uses:
                out.append((path, f"workload {w.id!r} never leaves from egress IP {ip_id!r} (not "
                                  "its app's, its own, nor named by a policy matching it)"))
            elif hi - lo + 1 != size:
                out.append((path, f"{block} is {hi - lo + 1} ports; a block is "
                                  f"defaults.ports_per_workload ({size}) ports"))
            elif lo < plo or hi > phi:
                out.append((path, f"{block} is outside the ports of egress IP {ip_id!r} "
                                  f"({plo}-{phi})"))
            else:
                placed.setdefault(ip_id, []).append((lo, hi, i, w.id))
    for ip_id, blocks in placed.items():
        blocks.sort()
        last = blocks[0]  # of the blocks so far, the one reaching highest
        for b in blocks[1:]:
            if b[0] <= last[1]:
                first, second = sorted((last, b), key=lambda x: x[2])  # at the later one
                out.append((("workloads", second[2], "blocks", ip_id),
                            f"{second[0]}-{second[1]} overlaps {first[0]}-{first[1]}, the block "
                            f"of workload {first[3]!r} (workloads[{first[2]}]) on egress IP "
                            f"{ip_id!r}; fixed blocks must not overlap"))
            if b[1] > last[1]:
                last = b
    return out


@functools.lru_cache(maxsize=1 << 18)
def _v6_int(s: str) -> int:
    return int(ipaddress.IPv6Address(s))


def _egress_addresses_of_workloads(cfg: Config, ranges, number: Numbering,
                                   sources: list[str]) -> list[tuple]:
    """An egress address that is a workload's own source, or inside managed_sources,
    would be classified as a workload's traffic (or dropped as an unknown one)."""
    out: list[tuple] = []
    v4 = {ip.ipv4: i for i, ip in number("egress_ips", cfg.egress_ips) if ip.ipv4}
    clash = not v4.keys().isdisjoint(sources) or bool(ranges) and any(":" in s for s in sources)
    bounds = [(int(net.network_address), int(net.broadcast_address)) for _, net in ranges]
    for i, w in number("workloads", cfg.workloads) if clash else ():
        for j, s in enumerate(w.source):
            if s in v4:
                out.append((("egress_ips", v4[s], "ipv4"),
                            f"{s} is also the source of workload {w.id!r} (workloads[{i}]"
                            f".source[{j}]); an egress address must not be a workload's address"))
            elif ranges and ":" in s:
                a = _v6_int(s)  # a reload checks the same sources again: parsed once
                for (k, net), (lo, hi) in zip(ranges, bounds):
                    if lo <= a <= hi:
                        out.append((("egress_ips", k, "ipv6"),
                                    f"range {net} holds {s}, the source of workload {w.id!r} "
                                    f"(workloads[{i}].source[{j}]); use a range of its own"))
    managed = [(k, ipaddress.ip_network(m)) for k, m in number("managed_sources", cfg.managed_sources)]
    for i, ip in number("egress_ips", cfg.egress_ips):
        for k, m in managed:
            if ip.ipv4 and m.version == 4 and ipaddress.IPv4Address(ip.ipv4) in m:
                out.append((("egress_ips", i, "ipv4"),
                            f"{ip.ipv4} lies inside managed_sources[{k}] ({m}); egress "
                            "addresses must be outside the workloads' networks"))
            if ip.ipv6 and m.version == 6 and ipaddress.IPv6Network(ip.ipv6).overlaps(m):
                out.append((("egress_ips", i, "ipv6"),
                            f"range {ip.ipv6} overlaps managed_sources[{k}] ({m}); egress "
                            "addresses must be outside the workloads' networks"))
    return out


def schema() -> dict:
    s = Config.model_json_schema()
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["title"] = "egress-agent config, version 1"
    return s
