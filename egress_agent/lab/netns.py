"""Thin helpers over `ip` and `nsenter` for building the lab.

The lab shells out instead of using netlink bindings on purpose: every step is
then a command a human can copy from an error message and replay by hand.

Commands run inside a namespace go through `nsenter --net=/run/netns/NAME`,
not `ip netns exec`: the latter remounts /sys in a private mount namespace,
which hides the cgroup2 hierarchy that the cgroup probes and the agent's
`socket cgroupv2` matching need to see.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

NETNS_DIR = "/run/netns"


class CommandError(RuntimeError):
    """A command failed; carries the command line and what it said on stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.cmd)!s} exited {returncode}: {self.stderr}")


def run(cmd: Sequence[str], check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` (no shell), capture text output, raise CommandError if `check`."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True,
                              timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(cmd, -1, f"timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stderr)
    return proc


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def nsenter_prefix(ns: str) -> list[str]:
    """Command prefix that runs the rest of the argv inside namespace `ns`."""
    return ["nsenter", f"--net={netns_path(ns)}", "--"]


def ns_exec(ns: str, cmd: Sequence[str], check: bool = True,
            timeout: float = 30.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` inside network namespace `ns` (mount namespace unchanged)."""
    return run(nsenter_prefix(ns) + list(cmd), check=check, timeout=timeout, input=input)


def ns_add(name: str) -> None:
    """Create namespace `name` and bring its loopback up."""
    run(["ip", "netns", "add", name])
    link_up(name, "lo")


def ns_del(name: str) -> None:
    """Delete namespace `name`; a missing namespace is not an error."""
    if os.path.exists(netns_path(name)):
        run(["ip", "netns", "del", name], check=False)


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the named network namespaces that start with `prefix`."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def ns_pids(ns: str) -> list[int]:
    """Pids of the processes whose network namespace is `ns`."""
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def ns_sysctl(ns: str, key: str, value: str | int) -> None:
    """Set a sysctl inside `ns` (/proc/sys/net follows the caller's netns)."""
    ns_exec(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NS ARGS...`"""
    return run(["ip", "-n", ns, *args], check=check)


def link_up(ns: str, dev: str) -> None:
    ip(ns, "link", "set", dev, "up")


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with `if_a` in `ns_a` and `if_b` in `ns_b`, both up."""
    ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    link_up(ns_a, if_a)
    link_up(ns_b, if_b)


def _family(*addrs: str | None) -> str:
    return "-6" if any(a and ":" in a for a in addrs) else "-4"


def addr_add(ns: str, dev: str, cidr: str, *extra: str) -> None:
    """Add an address; IPv6 addresses get `nodad` so they are usable at once."""
    args = ["addr", "add", cidr, "dev", dev, *extra]
    if ":" in cidr and "nodad" not in extra:
        args.append("nodad")
    ip(ns, *args)


def addr_del(ns: str, dev: str, cidr: str) -> None:
    ip(ns, "addr", "del", cidr, "dev", dev)


def route_add(ns: str, dst: str, via: str | None = None, dev: str | None = None,
              *extra: str) -> None:
    """`ip route add DST [via VIA] [dev DEV] EXTRA...`, family from the addresses."""
    args = [_family(dst, via), "route", "add", dst]
    if via:
        args += ["via", via]
    if dev:
        args += ["dev", dev]
    ip(ns, *args, *extra)


def route_del(ns: str, dst: str, *extra: str) -> None:
    ip(ns, _family(dst), "route", "del", dst, *extra)
