"""The lab: one host, its machines and an origin, all in network namespaces.

    m42 ─┐ vm-m42                up0 203.0.113.2/25 (+.10 .11 .20) ── o0 ─┐
    m43 ─┤ vm-m43   <p>-host           2001:db8:a::2/64 (+10::1 11::1)     │ <p>-origin
    m44 ─┤ vm-m44   (the agent)  up1 203.0.113.130/25 (+.140)      ── o1 ─┘ echo servers
  spoof ─┘ vm-spoof

The origin runs strict rp_filter, so it drops a packet whose source address is
routed back through the other link: what the echo server saw proves both the
source address and the uplink used. The host masquerades 10/8 and fd00::/8 in
foreign tables (`ip lab_nat`, `ip6 lab_nat6`) standing for "the host's default
egress" that the agent must coexist with.

All state lives in the namespace names (`<prefix>-*`) and in
/run/egress-agent-lab/<prefix>/state.json, so `down()` works from any process.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import cgroupfs, names
from .echo import HeldConnection, HeldGroup, Seen, child_env
from .netns import (
    addr_add, addr_del, ip, list_namespaces, ns_add, ns_del, ns_exec, ns_pids,
    nsenter_prefix, route_add, veth,
)

STATE_ROOT = "/run/egress-agent-lab"
# `--prefix` of every lab command defaults to $EGRESS_LAB_PREFIX, else this
DEFAULT_PREFIX = os.environ.get("EGRESS_LAB_PREFIX") or "ealab"

GATEWAY4 = "10.0.1.1"
GATEWAY6 = "fd00:1::1"
ORIGIN_GW_A4, ORIGIN_GW_A6, ORIGIN_GW_B4 = "203.0.113.1", "2001:db8:a::1", "203.0.113.129"


@dataclass(frozen=True)
class Machine:
    name: str
    ipv4: str
    ipv6: str | None = None
    extra_ipv4: tuple[str, ...] = ()  # more /32s on eth0 (spoof borrows m42's)

    @property
    def interface(self) -> str:
        """Host-side interface name (≤ 15 chars)."""
        return f"vm-{self.name}"


MACHINES: dict[str, Machine] = {m.name: m for m in (
    Machine("m42", "10.0.1.2", "fd00:1::2"),
    Machine("m43", "10.0.1.3"),
    Machine("m44", "10.0.1.4"),
    Machine("spoof", "10.0.1.66", extra_ipv4=("10.0.1.2",)),
)}

# Host uplink addresses, in the order they are added (the first IPv4 of a link
# is its primary: the source masquerade picks). address -> (device, cidr).
HOST_ADDRESSES: dict[str, tuple[str, str]] = {
    "203.0.113.2": ("up0", "203.0.113.2/25"),
    "203.0.113.10": ("up0", "203.0.113.10/25"),
    "203.0.113.11": ("up0", "203.0.113.11/25"),
    "203.0.113.20": ("up0", "203.0.113.20/25"),
    "2001:db8:a::2": ("up0", "2001:db8:a::2/64"),
    "2001:db8:10::1": ("up0", "2001:db8:10::1/64"),
    "2001:db8:11::1": ("up0", "2001:db8:11::1/64"),
    "203.0.113.130": ("up1", "203.0.113.130/25"),
    "203.0.113.140": ("up1", "203.0.113.140/25"),
}

ORIGIN_LOOPBACK = ("192.0.2.10/32", "192.0.2.53/32", "198.51.100.10/32", "10.99.0.10/32",
                   "2001:db8:ff::10/128")
ECHO_TCP = ("192.0.2.10:8080", "198.51.100.10:8080", "10.99.0.10:8080",
            "[2001:db8:ff::10]:8080", "192.0.2.53:53")
ECHO_UDP = ("192.0.2.10:8081", "[2001:db8:ff::10]:8081", "192.0.2.53:53")

# Someone else's NAT on the host: the "default egress" for machines. Priority
# srcnat (100), like typical host firewalls; the agent has to win against it.
LAB_NAT = """
table ip lab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 10.0.0.0/8 oifname { "up0", "up1" } masquerade
    }
}
table ip6 lab_nat6 {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip6 saddr fd00::/8 oifname "up0" masquerade
    }
}
"""


class LabError(RuntimeError):
    pass


# --- cgroups -------------------------------------------------------------------------

def cgroup2_root() -> str:
    """Mount point of the cgroup2 hierarchy (cgroupfs.cgroup2_root); the lab needs one."""
    root = cgroupfs.cgroup2_root()
    if root is None:
        raise LabError("no cgroup2 mount in /proc/self/mountinfo")
    return root


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


# --- processes -----------------------------------------------------------------------

def _starttime(pid: int) -> str | None:
    """Start time of `pid` in clock ticks: together with the pid, names a process
    unambiguously (pids are recycled)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _kill(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace`; reap our children."""
    live = {p: _starttime(p) for p in pids}
    live = {p: t for p, t in live.items() if t is not None}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline:
            for pid in list(live):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                if _starttime(pid) != live[pid]:
                    del live[pid]
            time.sleep(0.02)


# --- the lab -------------------------------------------------------------------------

class Lab:
    """Build, probe and remove the lab topology for namespace prefix `prefix`."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, state_root: str = STATE_ROOT):
        if not prefix or "/" in prefix or len(prefix) > 20:
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self.state_dir = os.path.join(state_root, prefix)
        self.host = self.ns("host")
        self.origin = self.ns("origin")
        self.cgroup = names.lab_cgroup(prefix)  # relative to cgroup2_root()
        self.last_result: dict | None = None
        self._procs: list[subprocess.Popen] = []

    # names and state

    def ns(self, name: str) -> str:
        """Namespace of `name`: "host", "origin" or a machine name ("m42")."""
        if name not in ("host", "origin") and name not in MACHINES:
            raise KeyError(f"no lab namespace {name!r}")
        return names.lab_netns(self.prefix, name)

    def namespaces(self) -> list[str]:
        return [self.host, self.origin] + [self.ns(m) for m in MACHINES]

    def exists(self) -> bool:
        return bool(self.present_namespaces()) or os.path.exists(self.state_dir)

    def built_here(self) -> bool:
        """A lab that `up()` built: its state file says so."""
        return self._load_state().get("prefix") == self.prefix

    def present_namespaces(self) -> list[str]:
        """The lab's own namespaces that exist now (never any other `<prefix>-*`)."""
        mine = set(self.namespaces())
        return [n for n in list_namespaces(self.prefix + "-") if n in mine]

    def refuse_foreign(self) -> None:
        """Namespaces named like ours that no lab state accounts for are someone else's."""
        present = self.present_namespaces()
        if present and not self.built_here():
            raise LabError(f"namespaces {', '.join(present)} exist but no lab {self.prefix} was "
                           f"built here (no {self._state_path()}): they are not ours to use or "
                           f"replace; choose another prefix (--prefix or EGRESS_LAB_PREFIX)")

    def _state_path(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    def _load_state(self) -> dict:
        try:
            with open(self._state_path()) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _update_state(self, **changes: object) -> None:
        state = self._load_state() | changes
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = self._state_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self._state_path())

    # up / down

    def up(self, replace: bool = False) -> None:
        """Build the whole lab. A lab of this prefix that is up already is replaced
        only when asked (`replace`), and never when it is not one `up()` built:
        on a shared host it may be someone else's."""
        self.refuse_foreign()
        if self.exists():
            if not replace:
                raise LabError(f"lab {self.prefix} is up already: use it, remove it with "
                               f"`egress-agent lab down --prefix {self.prefix}`, or choose another "
                               f"prefix (--prefix or EGRESS_LAB_PREFIX)")
            self.down()
        self._update_state(prefix=self.prefix, echo=[], cgroups=[])
        try:
            for ns in self.namespaces():
                ns_add(ns)
            self._host()
            self._origin()
            for m in MACHINES.values():
                self._machine(m)
            self.ensure_cgroup(self.cgroup)
            self._start_echo()
        except BaseException:
            self.down()
            raise

    def _sysctls(self, ns: str, values: dict[str, object]) -> None:
        ns_exec(ns, ["sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in values.items()])

    def _routes(self) -> list[tuple[str, str | None, str]]:
        """The host's routes as (destination, gateway, device)."""
        routes = [("default", ORIGIN_GW_A4, "up0"), ("10.99.0.0/16", ORIGIN_GW_A4, "up0"),
                  ("default", ORIGIN_GW_A6, "up0")]
        for m in MACHINES.values():
            routes.append((f"{m.ipv4}/32", None, m.interface))
            if m.ipv6:
                routes.append((f"{m.ipv6}/128", None, m.interface))
        return routes

    def _host(self) -> None:
        h, o = self.host, self.origin
        # `default` first, so every interface created later inherits it. As on
        # a systemd host, removing a primary IPv4 promotes a secondary instead
        # of deleting them all (with their routes), and IPv6 addresses survive
        # a link flap.
        self._sysctls(h, {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                          "net.ipv4.conf.lo.rp_filter": 0, "net.ipv4.ip_forward": 1,
                          "net.ipv6.conf.all.forwarding": 1, "net.ipv6.conf.all.accept_dad": 0,
                          "net.ipv6.conf.default.accept_dad": 0,
                          "net.ipv4.conf.all.promote_secondaries": 1,
                          "net.ipv4.conf.default.promote_secondaries": 1,
                          "net.ipv6.conf.all.keep_addr_on_down": 1,
                          "net.ipv6.conf.default.keep_addr_on_down": 1})
        self._sysctls(o, {"net.ipv4.conf.all.rp_filter": 1, "net.ipv4.conf.default.rp_filter": 1,
                          "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
        veth(h, "up0", o, "o0")
        veth(h, "up1", o, "o1")
        # The egress IPv6 addresses and 2001:db8:a::2 tie on longest-prefix
        # match towards 2001:db8:ff::/64, and the kernel then prefers the most
        # recently added one. Matching labels make a::2 the host's v6 source
        # whatever the order addresses are (re)added in.
        ip(h, "addrlabel", "add", "prefix", "2001:db8:a::/64", "label", "99")
        ip(h, "addrlabel", "add", "prefix", "2001:db8:ff::/64", "label", "99")
        for dev, cidr in HOST_ADDRESSES.values():
            addr_add(h, dev, cidr)
        for dst, via, dev in self._routes()[:3]:
            route_add(h, dst, via, dev)
        ns_exec(h, ["nft", "-f", "-"], input=LAB_NAT)

    def _origin(self) -> None:
        o = self.origin
        addr_add(o, "o0", "203.0.113.1/25")
        addr_add(o, "o0", "2001:db8:a::1/64")
        addr_add(o, "o1", "203.0.113.129/25")
        for cidr in ORIGIN_LOOPBACK:
            addr_add(o, "lo", cidr)
        for net in ("2001:db8:10::/64", "2001:db8:11::/64"):
            route_add(o, net, "2001:db8:a::2")
        self._sysctls(o, {"net.ipv4.conf.o0.rp_filter": 1, "net.ipv4.conf.o1.rp_filter": 1})

    def _machine(self, m: Machine) -> None:
        h, ns = self.host, self.ns(m.name)
        self._sysctls(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
        veth(h, m.interface, ns, "eth0")
        addr_add(h, m.interface, f"{GATEWAY4}/32")
        route_add(h, f"{m.ipv4}/32", None, m.interface)
        for a in (m.ipv4, *m.extra_ipv4):
            addr_add(ns, "eth0", f"{a}/32")
        route_add(ns, GATEWAY4, None, "eth0")
        route_add(ns, "default", GATEWAY4, "eth0", "src", m.ipv4)
        if m.ipv6:
            addr_add(h, m.interface, f"{GATEWAY6}/128")
            route_add(h, f"{m.ipv6}/128", None, m.interface)
            addr_add(ns, "eth0", f"{m.ipv6}/128")
            route_add(ns, GATEWAY6, None, "eth0")
            route_add(ns, "default", GATEWAY6, "eth0")

    def _start_echo(self) -> None:
        args = [f"--tcp={e}" for e in ECHO_TCP] + [f"--udp={e}" for e in ECHO_UDP]
        log = open(os.path.join(self.state_dir, "echo.log"), "w")
        proc = subprocess.Popen(
            nsenter_prefix(self.origin) + [sys.executable, "-m", "egress_agent.lab.echo", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
            cwd="/", env=child_env(), start_new_session=True)
        log.close()
        self._procs.append(proc)
        self._update_state(echo=[{"pid": proc.pid, "starttime": _starttime(proc.pid)}])
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        proc.stdout.close()  # the server never writes again
        if line.strip() != "ready":
            with open(os.path.join(self.state_dir, "echo.log")) as f:
                raise LabError(f"echo server did not start: {f.read().strip()}")

    def down(self) -> None:
        """Remove everything `up()` made: processes, namespaces, cgroups, state."""
        state = self._load_state()
        pids = [e["pid"] for e in state.get("echo", []) if _starttime(e["pid"]) == e["starttime"]]
        _kill(pids)
        names = self.present_namespaces()
        # Anything else still inside our namespaces was started in the lab
        # (agents, held connections); it would keep the namespaces alive.
        _kill([p for ns in names for p in ns_pids(ns) if p != os.getpid()])
        for ns in names:
            ns_del(ns)
        for p in self._procs:
            p.poll()
        self._procs.clear()
        root = cgroup2_root()
        dirs = set(state.get("cgroups", [])) | {self.cgroup, os.path.dirname(self.cgroup)}
        for rel in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
            path = os.path.join(root, rel)
            _kill([p for p in _cgroup_pids(path) if p != os.getpid()])
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # busy or not empty: say so, keep going
                print(f"lab down: cannot remove cgroup {path}: {exc}", file=sys.stderr)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # cgroups

    def ensure_cgroup(self, rel_path: str) -> str:
        """Create cgroup `rel_path` (under the cgroup2 root) and any missing
        parents; those created are recorded so that `down()` removes them."""
        root = cgroup2_root()
        rel_path = rel_path.strip("/")
        created, parts = [], rel_path.split("/")
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            try:
                os.mkdir(os.path.join(root, rel))
                created.append(rel)
            except FileExistsError:
                pass
        if created:
            self._update_state(cgroups=sorted(set(self._load_state().get("cgroups", []) + created)))
        return os.path.join(root, rel_path)

    def cgroup_prefix(self, rel_path: str) -> list[str]:
        """Command prefix: join cgroup `rel_path`, then the host namespace."""
        procs = os.path.join(self.ensure_cgroup(rel_path), "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs] + nsenter_prefix(self.host)

    def agent_prefix(self) -> list[str]:
        """Command prefix to run the agent in the host namespace with cgroup2
        at /sys/fs/cgroup, where nft resolves `socket cgroupv2` paths. On
        hybrid hosts that takes a private mount namespace (`unshare -m`)."""
        if cgroup2_root() == cgroupfs.VIEW:
            return nsenter_prefix(self.host)
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount -t cgroup2 cgroup2 {cgroupfs.VIEW} && exec "$@"', "sh"] + nsenter_prefix(self.host)

    # probes

    def _probe(self, prefix: list[str], dst: str, port: int, proto: str,
               source: str | None, timeout: float) -> Seen | None:
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        cmd = prefix + [sys.executable, "-m", "egress_agent.lab.echo", "probe", f"--{proto}",
                        dst, str(port), "--json", "--timeout", str(timeout)]
        if source:
            cmd += ["--source", source]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 20,
                              env=child_env(), cwd="/")
        try:
            self.last_result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise LabError(f"probe failed to run: {' '.join(cmd)}: {proc.stderr.strip()}") from None
        r = self.last_result
        return Seen(r["source_address"], r["source_port"]) if r["ok"] else None

    def probe(self, machine: str, dst: str, port: int = 8080, proto: str = "tcp",
              family: int | None = None, *, source: str | None = None,
              timeout: float = 2.0) -> Seen | None:
        """What the echo server at dst:port saw of a connection from `machine`
        (or "host"/"origin"); None if no answer. `family` (4/6), if given, must
        match `dst`. The full result, error included, is kept in `last_result`."""
        if family is not None and family != (6 if ":" in dst else 4):
            raise ValueError(f"{dst} is not IPv{family}")
        return self._probe(nsenter_prefix(self.ns(machine)), dst, port, proto, source, timeout)

    def probe_cgroup(self, cgroup_rel_path: str, dst: str, port: int = 8080,
                     proto: str = "tcp", *, source: str | None = None,
                     timeout: float = 2.0) -> Seen | None:
        """Like `probe`, from a local process of the host namespace that runs
        in cgroup `cgroup_rel_path` (created if missing)."""
        return self._probe(self.cgroup_prefix(cgroup_rel_path), dst, port, proto, source, timeout)

    def hold(self, machine: str, dst: str, port: int = 8080, **kw: object) -> HeldConnection:
        """A long-lived TCP connection from `machine` (see HeldConnection)."""
        return HeldConnection(dst, port, prefix=nsenter_prefix(self.ns(machine)), **kw)

    def hold_many(self, machine: str, dst: str, port: int = 8080, count: int = 100,
                  **kw: object) -> HeldGroup:
        """Up to `count` long-lived TCP flows from `machine` (see HeldGroup)."""
        return HeldGroup(dst, port, count, prefix=nsenter_prefix(self.ns(machine)), **kw)

    def hold_cgroup(self, cgroup_rel_path: str, dst: str, port: int = 8080,
                    **kw: object) -> HeldConnection:
        return HeldConnection(dst, port, prefix=self.cgroup_prefix(cgroup_rel_path), **kw)

    # provisioning changes, for failover tests

    def address_del(self, address: str) -> None:
        """Remove one of the host's uplink addresses (HOST_ADDRESSES)."""
        dev, cidr = HOST_ADDRESSES[address]
        addr_del(self.host, dev, cidr)

    def address_add(self, address: str) -> None:
        dev, cidr = HOST_ADDRESSES[address]
        addr_add(self.host, dev, cidr)

    def link_set(self, dev: str, up: bool) -> None:
        """Set a host link (up0, up1, vm-*) down or up. Down removes the routes
        through it (kernel behaviour); up puts the lab's routes back."""
        ip(self.host, "link", "set", dev, "up" if up else "down")
        if up:
            for dst, via, rdev in self._routes():
                if rdev == dev:
                    fam = "-6" if ":" in (via or dst) else "-4"
                    ip(self.host, fam, "route", "replace", dst,
                       *(["via", via] if via else []), "dev", dev)

    def describe(self) -> dict:
        """Names and addresses of the lab, JSON-able (for configs and humans)."""
        return {
            "prefix": self.prefix,
            "namespaces": {"host": self.host, "origin": self.origin,
                           **{m: self.ns(m) for m in MACHINES}},
            "host": {
                "uplinks": {
                    "up0": {"peer": "o0", "gateway4": ORIGIN_GW_A4, "gateway6": ORIGIN_GW_A6,
                            "addresses": [a for a, (d, _) in HOST_ADDRESSES.items() if d == "up0"]},
                    "up1": {"peer": "o1", "gateway4": ORIGIN_GW_B4,
                            "addresses": [a for a, (d, _) in HOST_ADDRESSES.items() if d == "up1"]},
                },
                "default_egress": {"up0": ["203.0.113.2", "2001:db8:a::2"], "up1": ["203.0.113.130"]},
                "foreign_tables": ["ip lab_nat", "ip6 lab_nat6"],
                "gateway": {"ipv4": GATEWAY4, "ipv6": GATEWAY6},
            },
            "machines": {m.name: {"namespace": self.ns(m.name), "interface": m.interface,
                                  "ipv4": m.ipv4, "ipv6": m.ipv6, "extra_ipv4": list(m.extra_ipv4)}
                         for m in MACHINES.values()},
            "origin": {"echo_tcp": list(ECHO_TCP), "echo_udp": list(ECHO_UDP), "dns": "192.0.2.53",
                       "internal": "10.99.0.10"},
            "cgroup": {"root": cgroup2_root(), "workload": self.cgroup},
            "state_dir": self.state_dir,
        }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m egress_agent.lab.topology up|down|describe [--prefix P]`"""
    p = argparse.ArgumentParser(prog="egress_agent.lab.topology")
    p.add_argument("action", choices=("up", "down", "describe"))
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)
    lab = Lab(args.prefix)
    t0 = time.monotonic()
    if args.action == "describe":
        print(json.dumps(lab.describe(), indent=2))
        return 0
    getattr(lab, args.action)()
    print(f"lab {args.action} ({args.prefix}): {time.monotonic() - t0:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
