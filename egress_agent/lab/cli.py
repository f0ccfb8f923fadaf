"""`egress-agent lab up|demo|down`: the whole system on one machine.

`demo` applies lab/demo.yaml in the lab's host namespace with the real agent,
then probes the origin's echo servers from every workload's context and
prints, per check, the expected and the observed source address and port.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import resources

from .. import names
from .topology import DEFAULT_PREFIX, STATE_ROOT, Lab, LabError

HOST_DEFAULTS = frozenset({"203.0.113.2", "2001:db8:a::2", "203.0.113.130"})


def demo_config_text(prefix: str) -> str:
    return resources.files("egress_agent").joinpath("lab/demo.yaml").read_text().replace(
        "@PREFIX@", prefix)


def write_demo_config(lab: Lab) -> str:
    path = os.path.join(STATE_ROOT, lab.prefix, "config.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(demo_config_text(lab.prefix))
    lab.ensure_cgroup(lab.cgroup)
    return path


def demo_checks(prefix: str):
    from ..verify import Check
    cg = names.lab_cgroup(prefix)
    C = Check
    return [
        C("m42 tcp 192.0.2.10:8080 (app IP)", "m42", "10.0.1.2", "192.0.2.10", 8080, iif="vm-m42", machine="m42"),
        C("m42 tcp [2001:db8:ff::10]:8080 (IPv6)", "m42", "fd00:1::2", "2001:db8:ff::10", 8080, iif="vm-m42", machine="m42"),
        C("m43 tcp 192.0.2.10:8080 (app IP)", "m43", "10.0.1.3", "192.0.2.10", 8080, iif="vm-m43", machine="m43"),
        C("m44 tcp 192.0.2.10:8080 (machine IP)", "m44", "10.0.1.4", "192.0.2.10", 8080, iif="vm-m44", machine="m44"),
        C("batch tcp 192.0.2.10:8080 (cgroup)", "batch", cg, "192.0.2.10", 8080, cgroup=cg),
        C("m42 tcp 198.51.100.10:8080 (policy via up1)", "m42", "10.0.1.2", "198.51.100.10", 8080, iif="vm-m42", machine="m42"),
        C("m43 udp 192.0.2.10:8081 (fallback drop)", "m43", "10.0.1.3", "192.0.2.10", 8081, "udp", iif="vm-m43", machine="m43"),
        C("m42 udp 192.0.2.10:8081 (app IP)", "m42", "10.0.1.2", "192.0.2.10", 8081, "udp", iif="vm-m42", machine="m42"),
        C("m42 dns udp 192.0.2.53:53 (excluded)", "m42", "10.0.1.2", "192.0.2.53", 53, "udp", iif="vm-m42", machine="m42"),
        C("m42 tcp 10.99.0.10:8080 (excluded dst)", "m42", "10.0.1.2", "10.99.0.10", 8080, iif="vm-m42", machine="m42"),
        C("spoof as 10.0.1.2 (wrong interface)", None, "10.0.1.2", "192.0.2.10", 8080, iif="vm-spoof", machine="spoof", bind="10.0.1.2"),
        C("spoof 10.0.1.66 (unknown in managed net)", None, "10.0.1.66", "192.0.2.10", 8080, iif="vm-spoof", machine="spoof"),
    ]


def run_demo_checks(prefix: str, config: str, as_json: bool) -> int:
    """Runs inside the lab host namespace (see cmd_demo)."""
    from .. import wiring
    from ..verify import print_rows, probe, run_checks
    cfg = wiring.load_config(config)
    rows = run_checks(cfg, demo_checks(prefix), lambda c: probe(c, prefix),
                      wiring.live_explainer(cfg), HOST_DEFAULTS,
                      progress=None if as_json else lambda s: print(s, file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        print_rows(rows)
    return 0 if all(r.ok for r in rows) else 4


def _agent(lab: Lab, *args: str) -> int:
    cmd = lab.agent_prefix() + [sys.executable, "-m", "egress_agent.cli", *args]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).returncode


def cmd_up(args) -> int:
    lab = Lab(args.prefix)
    print(f"building lab {args.prefix} (namespaces {args.prefix}-*) ...", file=sys.stderr)
    try:
        lab.up(replace=args.replace)
    except LabError as e:
        print(f"lab up: {e}", file=sys.stderr)
        return 2
    print(json.dumps(lab.describe(), indent=2) if args.json else
          f"lab {args.prefix} is up: host namespace {lab.host}, origin {lab.origin}; "
          f"next: egress-agent lab demo --prefix {args.prefix}")
    return 0


def cmd_demo(args) -> int:
    lab = Lab(args.prefix)
    try:
        lab.refuse_foreign()
    except LabError as e:
        print(f"lab demo: {e}", file=sys.stderr)
        return 2
    if not lab.exists():
        print(f"lab {args.prefix} is not up; building it ...", file=sys.stderr)
        lab.up()
    config = write_demo_config(lab)
    running = _daemon_pid(lab)
    if args.daemon:
        rc = _start_daemon(lab, config)
    elif running:  # it holds the namespace's lock (an apply would be refused) and applies itself
        print(f"the lab's daemon (pid {running}) keeps {config} applied; checking",
              file=sys.stderr)
        rc = 0
    else:
        print(f"applying {config} in namespace {lab.host} ...", file=sys.stderr)
        rc = _agent(lab, "apply", "-c", config)
    if rc != 0:
        return rc
    return cmd_check(args)


def cmd_check(args) -> int:
    """The demo's checks only: what the origin sees now (e.g. while the daemon reacts)."""
    config = os.path.join(STATE_ROOT, args.prefix, "config.yaml")
    if not os.path.exists(config):
        print(f"lab {args.prefix} has no config yet: run `egress-agent lab demo` first",
              file=sys.stderr)
        return 2
    return _agent(Lab(args.prefix), "lab", "_checks", "--prefix", args.prefix, "-c", config,
                  *(["--json"] if args.json else []))


def _daemon_pid(lab: Lab) -> int | None:
    """The pid of the daemon `lab demo --daemon` started, if it still runs."""
    try:
        with open(os.path.join(STATE_ROOT, lab.prefix, "agent.pid")) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _start_daemon(lab: Lab, config: str, timeout: float = 30.0) -> int:
    """`egress-agent run` in the lab's host namespace, logging to a file; `lab down`
    stops it with everything else in the lab's namespaces."""
    import time
    log = os.path.join(STATE_ROOT, lab.prefix, "agent.log")
    pid_file = os.path.join(STATE_ROOT, lab.prefix, "agent.pid")
    pid = _daemon_pid(lab)
    if pid:
        print(f"the lab's daemon is running already (pid {pid}, log {log})", file=sys.stderr)
        return 0
    cmd = lab.agent_prefix() + [sys.executable, "-m", "egress_agent.cli", "run", "-c", config,
                                "--log-format", "json", "--resync", "30"]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    with open(pid_file, "w") as f:
        f.write(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"the daemon exited {proc.returncode}; see {log}", file=sys.stderr)
            return 1
        if '"event": "sync"' in open(log).read():
            print(f"daemon running in {lab.host} (pid {proc.pid}); log: {log}", file=sys.stderr)
            return 0
        time.sleep(0.1)
    print(f"the daemon did not sync within {timeout:.0f} s; see {log}", file=sys.stderr)
    return 1


def cmd_checks(args) -> int:
    return run_demo_checks(args.prefix, args.config, args.json)


def cmd_down(args) -> int:
    Lab(args.prefix).down()
    print(f"lab {args.prefix} removed")
    return 0


def cmd_pair(args) -> int:
    from .pairlab import PairLab, demo
    if args.down:
        lab = PairLab(args.prefix)
        lab.down()
        print(f"pair lab {args.prefix} removed")
        return 0
    try:
        rows = demo(args.prefix, say=(lambda s: print(s, file=sys.stderr)) if args.json else print,
                    keep=args.keep)
    except FileExistsError as e:
        print(f"lab pair: {e}", file=sys.stderr)
        return 2
    return _report(rows, args.json)


def _report(rows: list[dict], as_json: bool) -> int:
    """A pair lab's rows: JSON, or the match count after the printed rows; exit 4 on
    any mismatch."""
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"\n{sum(r['ok'] for r in rows)} of {len(rows)} match")
    return 0 if all(r["ok"] for r in rows) else 4


def cmd_vm_pair(args) -> int:
    from . import vmlab
    prefix = args.prefix
    cls = vmlab.VagrantPairLab if args.vagrant else vmlab.VmPairLab
    try:
        lab = cls(prefix, accel=args.accel, kernel=args.kernel)
    except ValueError as e:
        print(f"lab vm-pair: {e}", file=sys.stderr)
        return 2
    if args.down:
        if not os.path.exists(lab.run_dir):  # kept with the other kernel's image
            lab = next((x for x in (cls(prefix, accel=args.accel, kernel=k)
                                    for k in vmlab.KERNELS) if os.path.exists(x.run_dir)), lab)
        lab.down()
        print(f"VM pair lab {prefix} removed")
        return 0
    if args.render:
        r = lab.render(args.render)
        print("\n".join(r["written"]))
        return 0
    try:
        rows = vmlab.demo(lab, say=(lambda s: print(s, file=sys.stderr)) if args.json else print,
                          keep=args.keep, rounds=args.failovers)
    except FileExistsError as e:
        print(f"lab vm-pair: {e}", file=sys.stderr)
        return 2
    return _report(rows, args.json)


def add_lab_commands(sub) -> None:
    lab = sub.add_parser("lab", help="the whole system on one machine, in network namespaces",
                         description="Build a host, machines (m42, m43, m44, spoof), a local "
                                     "cgroup workload and an origin with echo servers in network "
                                     "namespaces; run the agent there and check what the origin sees.")
    lsub = lab.add_subparsers(dest="lab_cmd", metavar="up|demo|check|down|pair|vm-pair", required=True)
    for name, fn, help in (("up", cmd_up, "build the lab namespaces and start the echo servers"),
                           ("demo", cmd_demo, "apply the lab config and compare expected with "
                                              "observed source addresses (builds the lab if needed)"),
                           ("check", cmd_check, "only compare expected with observed again (e.g. "
                                                "while the daemon reacts to a change)"),
                           ("down", cmd_down, "remove every namespace, process and cgroup of the lab"),
                           ("pair", cmd_pair, "a gateway pair: two workload hosts, two gateways "
                                              "(the agent, keepalived, conntrackd) and an origin, "
                                              "built from a fleet file; compare what the origin "
                                              "sees with the fleet's blocks, fail the active "
                                              "gateway over, compare again, cut both gateways "
                                              "off (drop fallback); then remove it"),
                           ("vm-pair", cmd_vm_pair,
                            "the pair lab as five VMs (w1 w2 g1 g2 origin; qemu, KVM or TCG) "
                            "from an image built here (vagrant/vm-image, cached in build/vm-stable), "
                            "provisioned by vagrant/pair/provision.sh (the Vagrantfile's "
                            "script); the checks of `lab pair`; then stops its qemu processes"),
                           ("_checks", cmd_checks, argparse.SUPPRESS)):
        sp = lsub.add_parser(name, help=help, description=help if isinstance(help, str) else None)
        default = "vmlab" if name == "vm-pair" else DEFAULT_PREFIX  # vmlab.DEFAULT_PREFIX
        sp.add_argument("--prefix", default=default,
                        help=f"lab name, prefix of its namespaces (default {default})")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "up":
            sp.add_argument("--replace", action="store_true",
                            help="remove this prefix's lab first, if `lab up` built it")
        if name == "pair":
            sp.add_argument("--keep", action="store_true",
                            help="leave the lab up afterwards, to look around")
            sp.add_argument("--down", action="store_true",
                            help="remove a pair lab left up with --keep")
        if name == "vm-pair":
            sp.add_argument("--keep", action="store_true",
                            help="leave the VMs up afterwards (their consoles and qemu pids in "
                                 "build/vm-KERNEL/run-PREFIX)")
            sp.add_argument("--down", action="store_true",
                            help="stop the qemu processes of a lab left up (by their recorded "
                                 "pids), remove its namespace and files")
            sp.add_argument("--accel", choices=("kvm", "tcg"),
                            help="qemu's accelerator (default: kvm when the CPU has vmx or svm, "
                                 "else tcg)")
            sp.add_argument("--kernel", choices=("stable", "backports"), default="stable",
                            help="the guests' kernel: Debian 12's own, 6.1 (stable, the "
                                 "default; image in build/vm-stable) or bookworm-backports' "
                                 "6.12 (image in build/vm-backports)")
            sp.add_argument("--vagrant", action="store_true",
                            help="boot the VMs with Vagrant instead (vagrant/pair/Vagrantfile, "
                                 "vagrant-libvirt, the box vagrant/box makes; libvirtd and "
                                 "Vagrant run in the lab's namespace); the same checks, over "
                                 "SSH. Files in build/box-KERNEL/run-PREFIX, Vagrant's in "
                                 "build/vagrant")
            sp.add_argument("--failovers", type=int, default=0, metavar="N",
                            help="after the checks, N more failovers, keepalived stopped and "
                                 "the fabric link down in turn, each with connections held "
                                 "from m1 and m2 (a row each; default 0)")
            sp.add_argument("--render", metavar="DIR",
                            help="only write the fleet file and each host's files into DIR "
                                 "(for vagrant/pair/Vagrantfile: vagrant/pair/rendered)")
        if name == "_checks":
            sp.add_argument("-c", "--config", required=True)
        if name == "demo":
            sp.add_argument("--daemon", action="store_true",
                            help="run `egress-agent run` in the lab (instead of one apply) and "
                                 "leave it running; its log is /run/egress-agent-lab/PREFIX/agent.log")
        sp.set_defaults(fn=fn)
    # `_checks` is internal (the part of demo/check that runs inside the lab): unlisted
    lsub._choices_actions = [a for a in lsub._choices_actions if a.dest != "_checks"]

