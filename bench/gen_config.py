"""Generate a config with N machine workloads for benchmarks.

N workloads of one app spread over enough egress IPs (64-port blocks: 1008
per IPv4), each machine with one IPv4 source; two policies. Addresses: 10/8
sources, 203.0.113.0/24 and 198.51.100.0/24 egress IPs (bench netns only).
With ipv6, each egress IP also has an IPv6 range and each machine an IPv6 source,
quoted as the lab's config and most writers quote them ("fd00::1:0").
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys

PORTS = 64
BLOCKS_PER_IP = (65535 - 1024 + 1) // PORTS


def egress_addresses(n: int) -> list[str]:
    pool = [str(a) for net in ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24")
            for a in ipaddress.ip_network(net).hosts()]
    if n > len(pool):
        raise SystemExit(f"{n} egress IPs do not fit the documentation ranges")
    return pool[:n]


def source(i: int) -> str:
    return str(ipaddress.IPv4Address("10.0.0.0") + 256 + i)


def source6(i: int) -> str:
    return str(ipaddress.IPv6Address("fd00::") + 256 + i)


def config_text(n: int, state_dir: str = "/tmp/egress-bench-state", extra_ips: int = 0,
                ipv6: bool = False) -> str:
    n_ips = max(1, math.ceil(n / BLOCKS_PER_IP * 1.1)) + extra_ips
    lines = ["version: 1", "host: {name: bench, region: r}", f"state_dir: {state_dir}",
             f"defaults: {{ports_per_workload: {PORTS}}}", "egress_ips:"]
    for j, addr in enumerate(egress_addresses(n_ips)):
        v6 = f', ipv6: "2001:db8:{j:x}::/64"' if ipv6 else ""
        lines.append(f"  - {{id: ip{j}, app: app, ipv4: {addr}{v6}}}")
    lines.append("workloads:")
    for i in range(n):
        v6 = f', "{source6(i)}"' if ipv6 else ""
        lines.append(f"  - {{id: w{i}, app: app, source: [{source(i)}{v6}]}}")
    lines += ["managed_sources: [10.0.0.0/8" + (', "fd00::/64"]' if ipv6 else "]"),
              "exclude: {destinations: [172.16.0.0/12]}",
              "policies:",
              "  - {name: to-partner, match: {destinations: [192.0.2.0/24], ports: [443]}, egress: default}",
              "  - {name: block-smtp, match: {ports: [25]}, egress: drop}"]
    return "\n".join(lines) + "\n"


FRAGMENT = 1000


def fragments(text: str, d: str) -> tuple[str, list[str]]:
    """The config with its workloads in conf.d/NNNN.yaml, FRAGMENT each: the main
    file and the fragments, in order."""
    main, workloads = [], []
    for line in text.splitlines():
        if line.startswith("  - {id: ") and ", source: [" in line:
            workloads.append(line)
        elif line != "workloads:":
            main.append(line)
    os.makedirs(os.path.join(d, "conf.d"))
    frags = []
    for k in range(0, len(workloads), FRAGMENT):
        frags.append(os.path.join(d, "conf.d", f"{k // FRAGMENT:04}.yaml"))
        with open(frags[-1], "w") as f:
            f.write("workloads:\n" + "\n".join(workloads[k:k + FRAGMENT]) + "\n")
    path = os.path.join(d, "main.yaml")
    with open(path, "w") as f:
        f.write("\n".join(main) + "\ninclude: [conf.d/*.yaml]\n")
    return path, frags


if __name__ == "__main__":
    sys.stdout.write(config_text(int(sys.argv[1]), ipv6="--ipv6" in sys.argv[2:]))
