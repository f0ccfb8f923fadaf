"""egress-agent: static egress IPs for the workloads of one host.

Exit status: 0 ok; 1 the config is invalid (or a check failed); 2 usage
error; 3 the kernel refused a change (nothing of it was applied); 4 a
verification found a mismatch; 5 another egress-agent holds this network
namespace (nothing was done); 6 the kernel took the change but the state dir
could not be written; 8 this network namespace has no egress-agent table
(`status`, `usage`, `list`, `explain`: run them where the agent runs); 9 `apply`: the
kernel took the config, but no egress IP of this host is usable.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import os
import sys
from enum import IntEnum
from typing import Optional

from . import __version__, argtypes, log, names, verify, wiring
from .alloc import CapacityError
from .config import ConfigError, load, schema


class Exit(IntEnum):
    OK = 0
    INVALID = 1
    USAGE = 2
    KERNEL = 3
    MISMATCH = 4
    BUSY = 5
    STORE = 6
    NOT_HERE = 8  # 7 is the daemon's (a watcher that cannot recover)
    UNUSABLE = 9


def _out(args, data, human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        print(human)


def _load(args):
    return wiring.load_config(args.config, getattr(args, "state_dir", None))


def _not_here(args) -> Optional[int]:
    """Exit.NOT_HERE, said on stderr (and as JSON with --json), when this network
    namespace has no agent table: what `status`, `usage` and `explain` would say
    here is about some other namespace's traffic. None when the table is here, or
    when nftables cannot be read without root (the command goes on)."""
    if wiring.table_here() is not False:
        return None
    from .nslock import netns
    msg = (f"no table {names.TABLE} in this network namespace ({netns()}): the agent has "
           f"not applied here. Run this where the agent runs (e.g. nsenter "
           f"--net=/run/netns/NAME egress-agent {args.cmd} ...), or start the agent here "
           f"(systemctl start egress-agent, or egress-agent apply)")
    if getattr(args, "json", False):
        print(json.dumps({"error": msg, "table": False}, indent=2))
    print(f"egress-agent {args.cmd}: {msg}", file=sys.stderr)
    return Exit.NOT_HERE


# --- pure commands (no root) ----------------------------------------------------

def cmd_check(args) -> int:
    """Every problem in one pass: text lines on stderr, or with --json one document
    on stdout, {"ok": bool, "problems": [{file, line, column, field, message, ...}]}."""
    try:
        loaded = load(args.config)
        cfg = loaded.config
        if args.state_dir:
            cfg = cfg.model_copy(update={"state_dir": args.state_dir})
        problems = _capacity_problems(loaded, cfg)
    except ConfigError as e:
        problems = e.problems
    except CapacityError as e:  # the host's limits (ids for marks), not one workload's
        from .config import Problem
        problems = [Problem(args.config, 1, "", f"capacity: {e}")]
    if problems:
        if not args.json:
            raise ConfigError(problems)  # main() prints one line each on stderr
        print(json.dumps({"ok": False, "file": args.config,
                          "problems": [p.to_json() for p in problems]}, indent=2))
        return Exit.INVALID
    n_ip, n_w, n_p = len(cfg.egress_ips), len(cfg.workloads), len(cfg.policies)
    _out(args, {"ok": True, "file": args.config, "problems": [], "egress_ips": n_ip,
                "workloads": n_w, "policies": n_p},
         f"{args.config}: ok ({n_ip} egress IP{'s' * (n_ip != 1)}, {n_w} workload"
         f"{'s' * (n_w != 1)}, {n_p} polic{'ies' if n_p != 1 else 'y'})")
    return Exit.OK


def _capacity_problems(loaded, cfg) -> list:
    """Every workload that gets no block, at its line (not just the first)."""
    from .alloc import allocate
    from .config import Problem
    full: list[CapacityError] = []
    allocate(cfg, _readable_store(cfg), full=full)
    out = []
    for e in full:
        file, line, column = loaded.position(e.workload)
        out.append(Problem(file, line, "workloads", f"capacity: {e}", column, e.workload))
    return sorted(out, key=lambda p: (p.file, p.line, p.column))


def _readable_store(cfg):
    """The leases the capacity check starts from, if the store can be read; `check`
    must not wait on a FIFO or fail on a damaged store (the daemon handles those)."""
    from .alloc import Allocations
    from .store import ALLOCATIONS, Store
    if not os.path.isfile(os.path.join(cfg.state_dir, ALLOCATIONS)):
        return Allocations()
    try:
        return Store(cfg.state_dir).load()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Allocations()


def _offline_plan(cfg):
    from .alloc import allocate
    from .plan import build
    a, events = allocate(cfg, _readable_store(cfg))
    return build(cfg, a), events


def cmd_plan(args) -> int:
    """What apply would change, workload by workload in names (`~ m43: billing-2
    203.0.113.11:1024-2047 → partner-link 203.0.113.140:2048-3071`), then the route
    ops and what else the batch does; `--nft` prints the batch itself."""
    cfg = _load(args)
    from .model import Observed
    from .nft.diff import transaction
    from .programmed import changes, decode
    from .routing.diff import diff_routes
    if args.against_running:  # what apply would change on this host now (root)
        log.configure("console")  # a corrupt store's warning on stderr, not in the plan
        rec = wiring.reconciler(cfg)
        rec.quarantine = False  # a plan moves no file
        observed = rec.observe()
        running = _running_ids(cfg, observed)
        p, _, _, _ = rec.plan(cfg, observed)
    else:
        p, _ = _offline_plan(cfg)
        observed, running = Observed(), p.alloc
    tx = transaction(p.desired, observed)
    ops = diff_routes(p.desired.routes, p.desired.rules, observed.routes, observed.rules)
    changed = not tx.empty or bool(ops)
    damage = _skeleton_damage(observed) if args.against_running else []
    moved = changes(decode(observed.elements, running.wids, running.eids),
                    decode(p.desired.elements, p.alloc.wids, p.alloc.eids))
    if args.json:
        print(json.dumps({"changed": changed, "workloads": [c.to_json() for c in moved],
                          "policies_changed": tx.policies_changed, "skeleton_damage": damage,
                          "route_ops": [o.describe() for o in ops],
                          "elements_added": tx.added, "elements_removed": tx.removed,
                          "nft": tx.text, "notes": p.notes,
                          "allocations": p.alloc.to_json()}, indent=2))
        return Exit.OK
    if args.against_running and not changed:
        print("no change: the running host already has this config")
        return Exit.OK
    if args.nft:
        print("# route ops, applied before the nft batch")
        for o in ops:
            print(f"ip {o.describe()}")
        print("# nft batch (one transaction)")
        print(tx.text, end="")
    else:
        for c in moved:
            print(c.text())
        for d in damage:
            print(f"skeleton damaged: {d}")
        if tx.policies_changed:
            print("policies: rewritten")
        for o in ops:
            print(f"ip {o.describe()}")
        print(f"# {tx.added} elements added, {tx.removed} removed in one nft batch "
              f"(--nft prints it)")
    for n in p.notes:
        print(f"# note: {n}")
    return Exit.OK


def _running_ids(cfg, observed):
    """The workload and egress ids the running kernel's maps use: the store's,
    or what the kernel itself says when the store is gone (adopt.py)."""
    from .adopt import adopt
    stored = _readable_store(cfg)
    return stored if stored.wids or not observed.table else adopt(cfg, observed)


def _skeleton_damage(observed) -> list[str]:
    """What the running table lacks of the skeleton (the daemon's drift check says the same)."""
    from .nft.text import skeleton_digest, skeleton_shape
    from .shape import differences
    if not observed.table:
        return [f"table {names.TABLE} missing"]
    if observed.skeleton != skeleton_digest():
        return [f"skeleton version {observed.skeleton!r} instead of {skeleton_digest()!r}"]
    return differences(skeleton_shape(), observed.shape) if observed.shape else []


def cmd_explain(args) -> int:
    cfg = _load(args)
    from .hoststate import Usable
    from .plan import explain
    if not args.assume_usable and (code := _not_here(args)):
        return code
    p, _ = _offline_plan(cfg)
    # this host's addresses and links decide what is usable (no root needed)
    usable = Usable() if args.assume_usable else wiring.usable_here(cfg)
    dst, port, proto = args.dst  # 192.0.2.1:443/tcp, already checked by argtypes.destination
    port, proto = port or args.port, proto or args.proto
    e = explain(cfg, p.alloc, args.src, dst, port, proto or ("tcp" if port else None), args.iif,
                usable)
    d = e.to_json()
    human = "\n".join(f"{k:15} {'-' if v is None else v}" for k, v in d.items())
    missing = [ip.id for ip, lost in _unusable(cfg, usable) if lost == _families(ip)]
    if missing:
        human += (f"\nnote: not usable on this host (address absent or link down): "
                  f"{', '.join(missing)}; --assume-usable explains as if they were")
    _out(args, d, human)
    return Exit.OK


def cmd_schema(args) -> int:
    print(json.dumps(schema(), indent=2))
    return Exit.OK


def cmd_who(args) -> int:
    from .store import Store, who
    state_dir = args.state_dir or (load(args.config).config.state_dir
                                   if os.path.exists(args.config) else "/var/lib/egress-agent")
    addr, port = argtypes.address_port(args.address)
    store = Store(state_dir)
    holders = who(store.history(), addr, port, args.at)
    if store.skipped_lines:
        print(f"warning: {store.history_path}: skipped {store.skipped_lines} line(s) that are "
              f"not events (first: line {store.first_skipped}; a torn write?)", file=sys.stderr)
    if args.json:
        print(json.dumps([h.to_json() for h in holders], indent=2))
    elif not holders:
        print(f"nobody held {args.address}" + (f" at {args.at}" if args.at else " now"))
    else:
        for h in holders:
            print(h.describe())
    return Exit.OK if holders else Exit.INVALID


# --- kernel commands (root) --------------------------------------------------------

def cmd_apply(args) -> int:
    cfg = _load(args)
    from . import nslock
    from .nft import NftError
    from .routing import RoutingError
    log.configure("console")  # warnings (a quarantined store) on stderr
    with nslock.acquire():
        rec = wiring.reconciler(cfg)
        try:
            r = rec.sync(cfg, trigger="apply", full=True)
        except NftError as e:
            print(f"{args.config}: the kernel refused the change; nothing was applied:\n"
                  f"{e.message}\n{e.excerpt()}", file=sys.stderr)
            return Exit.KERNEL
        except RoutingError as e:
            # route adds run before the nft batch and removals after it (every
            # intermediate state is harmless); the next apply completes the rest
            print(f"{args.config}: the kernel refused a route change; apply again once "
                  f"fixed: {e}", file=sys.stderr)
            return Exit.KERNEL
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
    elif not r.changed:
        print("no change")
    else:
        print(f"applied: +{r.added} -{r.removed} elements"
              + (", policies rewritten" if r.policies_changed else "")
              + (", skeleton replaced" if r.skeleton_replaced else "")
              + (", allocations adopted from the kernel" if r.adopted else "")
              + f" in {r.duration_ms:.0f} ms")
        for op in r.route_ops:
            print(f"  ip {op}")
    for n in r.notes:
        print(f"note: {n}", file=sys.stderr)
    unusable = _unusable(cfg, r.usable)
    if unusable:
        named = [ip.id if lost == _families(ip) else f"{ip.id} (IPv{lost[0]})"
                 for ip, lost in unusable]
        print(f"egress-agent apply: not usable on this host (address absent or link down): "
              f"{', '.join(named)}; their workloads follow their fallback (drop, or the "
              f"host's own address), and the daemon moves them back when the address "
              f"returns", file=sys.stderr)
    if r.store_error:
        print(f"egress-agent apply: the kernel has the change, but the state dir could not be "
              f"written ({r.store_error}); fix it and apply again", file=sys.stderr)
        return Exit.STORE
    active = [ip for ip in cfg.ips_here() if ip.state == "active"]
    dead = [ip for ip, lost in unusable if lost == _families(ip)]
    if active and len(dead) == len(active):
        print("egress-agent apply: no egress IP of this host is usable: is this the agent's "
              "network namespace, are its addresses configured?", file=sys.stderr)
        return Exit.UNUSABLE
    return Exit.OK


def _families(ip) -> list[int]:
    return [f for f, a in ((4, ip.ipv4), (6, ip.ipv6)) if a]


def _unusable(cfg, usable) -> list[tuple]:
    """(egress IP, the families it has that are not usable) for each active IP of this
    host that lost some (lost == _families(ip): the IP is not usable at all)."""
    out = []
    for ip in cfg.ips_here():
        lost = [f for f in _families(ip) if not usable.ok(ip, f)]
        if ip.state == "active" and lost:
            out.append((ip, lost))
    return out


def cmd_run(args) -> int:
    from . import metrics, nslock
    log.configure(args.log_format)
    if args.metrics != "off":
        try:  # a wrong argument is refused before the daemon says it starts
            metrics.parse_listen(args.metrics, args.metrics_nonlocal)
        except ValueError as e:
            print(f"egress-agent run: {e}", file=sys.stderr)
            return Exit.USAGE
    # `kill -USR1 PID`: every thread's stack on stderr (the journal), for a daemon that
    # seems stuck; it goes on running
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # before anything that reads the kernel: a daemon whose first sync waits (on the
    # kernel's locks, a huge table) has said that it runs, with which config
    log.get().info("starting", config=os.path.abspath(args.config), pid=os.getpid())
    lock = nslock.acquire(serve=True)  # for the daemon's life; Busy is reported by main()
    state = metrics.State(detail=args.metrics_detail)
    if args.metrics != "off":
        try:
            metrics.serve(args.metrics, state, nonlocal_=args.metrics_nonlocal)
        except (ValueError, OSError) as e:
            print(f"egress-agent run: {e}", file=sys.stderr)
            return Exit.USAGE
    d = wiring.daemon(args.config, resync_interval=args.resync, state_dir=args.state_dir,
                      metrics=state, usage_interval=args.usage_interval,
                      translation_log=args.translation_log)
    try:
        return d.run()
    finally:
        lock.release()


def cmd_usage(args) -> int:
    cfg = _load(args)
    if code := _not_here(args):
        return code
    snap = wiring.usage_collector()(cfg)
    if args.json:
        print(json.dumps(snap.to_json(args.top), indent=2))
        return Exit.OK
    ct = snap.conntrack
    print(f"conntrack: {ct['count']} of {ct['max']} entries"
          + (f" ({ct['ratio']:.1%})" if ct["ratio"] is not None else "")
          + "".join(f", {k} {v}" for k, v in ct["stats"].items()
                    if k in ("insert_failed", "drop", "early_drop") and v))
    rows = snap.rows[:args.top] if args.top else snap.rows
    print(f"\n{'WORKLOAD':12} {'EGRESS ADDRESS':18} {'PROTO':5} {'DESTINATION':28} "
          f"{'CONNS':>6} {'LIMIT':>6} {'RATIO':>6}  LIMIT KIND")
    for r in rows:
        dst = argtypes.endpoint_text(r.destination, r.port)
        ratio = f"{r.ratio:.0%}" if r.ratio is not None else "-"
        print(f"{r.workload:12} {r.egress_address:18} {r.protocol:5} {dst:28} {r.connections:>6} "
              f"{r.limit or '-':>6} {ratio:>6}  {r.limit_kind}{'  WARN' if r.warning else ''}")
    if not rows:
        print("(no connections through dedicated egress IPs)")
    if snap.refused:
        print(f"\n{'REFUSED':12} {'EGRESS ADDRESS':18} {'PROTO':5} {'COUNT':>6}  REASON")
        for r in snap.refused:
            print(f"{r['workload']:12} {r['egress_address'] or '-':18} {r['protocol']:5} "
                  f"{r['refused']:>6}  {r['reason']}")
    return Exit.OK


def cmd_list(args) -> int:
    """What the kernel holds, by workload and egress IP: the running table's maps,
    named by the store's ids (programmed.py)."""
    cfg = _load(args)
    if code := _not_here(args):
        return code
    from .programmed import decode
    observed = wiring.running_table()
    ids = _running_ids(cfg, observed)
    rows = [p for p in decode(observed.elements, ids.wids, ids.eids).values()
            if not args.workload or p.workload in args.workload]
    if args.ip:  # only the leases on those IPs, of the workloads that have one
        rows = [r for p in rows if (r := replace(p, leases=tuple(
            x for x in p.leases if x.ip in args.ip))).leases]
    if args.json:
        print(json.dumps([p.to_json() for p in rows], indent=2))
        return Exit.OK
    print(f"{'WORKLOAD':12} {'EGRESS IP':13} {'IPV4:PORTS':26} {'IPV6':24} {'ROUTE':8} FROM")
    for p in rows:
        for x in p.leases or [None]:
            v4 = (x.v4_text() if x else None) or "-"
            print(f"{p.workload:12} {x.ip if x else '-':13} {v4:26} "
                  f"{(x.ipv6 if x else None) or '-':24} "
                  f"{'-' if x is None else 'default' if x.default else 'policy':8} {p.from_text()}")
    if not rows:
        print("(nothing programmed" + (" that matches" if args.workload or args.ip else "") + ")")
    return Exit.OK


def cmd_gateway(args) -> int:
    """keepalived's notify on a gateway host: conntrackd's replica and the gate; or,
    with `script`, the same as a shell script for keepalived's notify."""
    cfg = _load(args)
    from .gateway import notify_script, set_role
    if cfg.host.role != "gateway":
        print(f"egress-agent gateway: {args.config}: host.role is {cfg.host.role!r}, not "
              f"'gateway'; only a gateway host has a gate", file=sys.stderr)
        return Exit.INVALID
    if args.role == "script":
        if not args.conntrackd_config:
            print("egress-agent gateway script: give --conntrackd-config FILE (see "
                  "egress-agent gateway --help)", file=sys.stderr)
            return Exit.USAGE
        print(notify_script(cfg.state_dir, args.conntrackd_config), end="")
        return Exit.OK
    problems = set_role(cfg.state_dir, args.role, wiring.nft_runner(), args.conntrackd_config)
    for p in problems:
        print(f"egress-agent gateway {args.role}: {p}", file=sys.stderr)
    _out(args, {"role": args.role, "gate": "open" if args.role == "primary" else "closed",
                "problems": problems},
         f"gateway {args.role}: gate {'open' if args.role == 'primary' else 'closed'}")
    return Exit.KERNEL if problems else Exit.OK


def cmd_fleet(args) -> int:
    """One fleet file -> every host's files, with the fleet's blocks (fleet.py)."""
    from . import fleet
    layout = fleet.Layout() if not args.layout_root else fleet.Layout(
        *(f"{args.layout_root}/{{host}}/{x}" for x in ("state", "notify", "conntrackd.conf")),
        f"{args.layout_root}/{{host}}")
    r = fleet.run(args.fleet, args.state, args.out if args.action == "render" else None, layout)
    if args.json:
        print(json.dumps({"ok": True, **r}, indent=2))
        return Exit.OK
    for pid, changes in r["changes"].items():
        for c in changes:
            print(f"{pid}: {c}")
    if args.action == "render":
        print(f"wrote {len(r['written'])} files for {len(r['hosts'])} hosts under {args.out}: "
              f"{', '.join(r['hosts'])}; fleet state in {args.state}")
    else:
        print(f"{args.fleet}: ok ({len(r['hosts'])} hosts, "
              f"{sum(len(b) for b in r['blocks'].values())} blocks)")
    return Exit.OK


def cmd_teardown(args) -> int:
    from . import nslock
    with nslock.acquire():
        r = wiring.reconciler().teardown()
    _out(args, r.to_json(), f"removed table {names.TABLE} ({r.removed} elements)"
         + "".join(f"\n  ip {op}" for op in r.route_ops))
    return Exit.OK


def cmd_status(args) -> int:
    cfg = _load(args)
    from .alloc import lingering_order
    from .hoststate import read_host_state, usable_from
    from .store import Store
    from . import cgroupfs, health
    daemon = health.read(cfg.state_dir)
    host = read_host_state()
    if daemon and daemon["daemon"]["running"]:  # the gateways its probe finds unreachable
        host = replace(host, unreachable=frozenset(daemon["daemon"].get("unreachable", ())))
    usable = usable_from(cfg, host)
    a = Store(cfg.state_dir).load()
    if code := _not_here(args):
        return code
    # grouped once: per workload and per IP lookups stay O(workloads) at 100k
    per_ip: dict[str, int] = {}
    per_workload: dict[str, list] = {}
    for (w, i), lease in sorted(a.leases.items()):
        per_ip[i] = per_ip.get(i, 0) + 1
        per_workload.setdefault(w, []).append(lease.to_json())
    lingering_by_ip: dict[str, list] = {}
    for k in sorted(a.lingering, key=lingering_order):
        lingering_by_ip.setdefault(k[1], []).append(a.lingering[k].to_json())
    from .hoststate import cgroup_exists
    known = daemon["conditions"] if daemon else {}
    ip_conds = {i: health.with_since("egress_ip", i, c, known)
                for i, c in health.ip_conditions(cfg, usable, host).items()}
    ips = []
    for ip in cfg.ips_here():
        n = per_ip.get(ip.id, 0)
        present = bool(ip.ipv4 and host.has_address(ip.ipv4))
        state = ip.state if usable.ok(ip, 4) or usable.ok(ip, 6) or ip.state != "active" else "failed-over"
        # released blocks whose connections still live: not free, not reused
        lingering = lingering_by_ip.get(ip.id, [])
        ips.append({"id": ip.id, "ipv4": ip.ipv4, "ipv6": ip.ipv6, "present": present,
                    "state": state, "workloads": n, "max_workloads": ip.limits.max_workloads,
                    "lingering": lingering, "conditions": ip_conds[ip.id]})
    from .config import policy_matches
    ratios: dict[str, float] = {}
    try:  # usage needs root (a ctnetlink dump); status works without it
        for r in wiring.usage_collector()(cfg).rows:
            if r.workload != "*" and r.ratio is not None:
                ratios[r.workload] = max(ratios.get(r.workload, 0.0), r.ratio)
        have_usage = True
    except (PermissionError, OSError):
        have_usage = False
    wls = []
    cgroup_ok = health.cgroup_check(daemon, cgroup_exists(cgroupfs.VIEW))
    for w in cfg.workloads:
        leases = per_workload.get(w.id, [])
        wls.append({"id": w.id, "app": w.app, "source": w.source, "cgroup": w.cgroup,
                    "app_ip": a.app_choice.get(w.id), "leases": leases,
                    "app_ip6": a.app_choice6.get(w.id),  # IPv6 from another app IP
                    "policies": [p.name for p in cfg.policies if policy_matches(p, w)],
                    "highest_ratio": round(ratios.get(w.id, 0.0), 4) if have_usage else None,
                    "conditions": health.with_since("workload", w.id, health.workload_conditions(
                        cfg, w, a.app_choice.get(w.id), leases, ip_conds, cgroup_ok), known)})
    d = daemon["daemon"] if daemon else {"running": False}
    gateway = None
    if cfg.host.role == "gateway":  # keepalived's last word (gateway.py)
        from .gateway import read_role
        gateway = read_role(cfg.state_dir) or {"role": None, "since": None}
    if args.json:
        print(json.dumps({"daemon": d, **({"gateway": gateway} if gateway else {}),
                          "egress_ips": ips, "workloads": wls}, indent=2))
        return Exit.OK
    for line in health.daemon_lines(d, cfg.state_dir):
        print(line)
    if gateway:
        print(f"gateway: {gateway['role']} since {health.iso(gateway['since'])}" if gateway["role"]
              else "gateway: no role yet (keepalived's notify has not run: the gate is as "
                   "`egress-agent gateway` last left it)")
    print()
    print(f"{'EGRESS IP':12} {'IPV4':16} {'PRESENT':8} {'STATE':12} WORKLOADS")
    for i in ips:
        print(f"{i['id']:12} {i['ipv4'] or '-':16} {'yes' if i['present'] else 'NO':8} "
              f"{i['state']:12} {i['workloads']}/{i['max_workloads'] or '-'}"
              + "".join(f"\n  {line}" for line in health.condition_lines(i["conditions"]))
              + (f" (+{len(i['lingering'])} released, connections still open: "
                 + ", ".join(f"{l['workload']} {l['ports'][0]}-{l['ports'][1]}" if l["ports"]
                             else f"{l['workload']} {l['ipv6']}" for l in i["lingering"]) + ")"
                 if i["lingering"] else ""))
    print()
    print(f"{'WORKLOAD':12} {'EGRESS IP':13} {'IPV4':16} {'PORTS':12} {'IPV6':20} {'RATIO':>6}  POLICIES")
    for w in wls:
        ratio = "-" if w["highest_ratio"] is None else f"{w['highest_ratio']:.0%}"
        for l in w["leases"] or [{"ip": "-", "ipv4": None, "ports": None, "ipv6": None,
                                  "temporary": False}]:
            ports = f"{l['ports'][0]}-{l['ports'][1]}" if l["ports"] else "-"
            ip = l["ip"] + ("*" if l.get("temporary") else "")
            print(f"{w['id']:12} {ip:13} {l['ipv4'] or '-':16} {ports:12} {l['ipv6'] or '-':20} "
                  f"{ratio:>6}  {','.join(w['policies']) or '-'}")
    if any(l.get("temporary") for w in wls for l in w["leases"]):
        print("* a temporary block while the workload's own IP is unusable")
    for w in wls:
        for line in health.condition_lines(w["conditions"]):
            print(f"{w['id']}: {line}")
    return Exit.OK


def cmd_verify(args) -> int:
    cfg = _load(args)
    dst, port = args.echo  # argtypes.endpoint
    checks = verify.workload_checks(cfg, dst, port, args.proto, args.lab)
    if not checks:
        print("nothing to verify: no cgroup workloads (machines need --lab, or run the probe "
              "inside the machine: python -m egress_agent.lab.echo probe ...)", file=sys.stderr)
        return Exit.USAGE
    rows = verify.run_checks(cfg, checks, lambda c: verify.probe(c, args.lab),
                             wiring.live_explainer(cfg),
                             progress=None if args.json else lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        verify.print_rows(rows)
    return Exit.OK if all(r.ok for r in rows) else Exit.MISMATCH


# --- the parser ------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line (no usage block), exit 2; subcommands inherit it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(Exit.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# Commands that change or read the kernel: without CAP_NET_ADMIN they are refused
# at once with exit 2, not after a partial run (or as "the kernel refused", exit 3).
ROOT_COMMANDS = {"apply", "run", "usage", "list", "gateway", "teardown", "verify", "lab"}
CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def needs_root(args) -> bool:
    return (args.cmd in ROOT_COMMANDS and getattr(args, "role", None) != "script") \
        or bool(getattr(args, "against_running", False))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="egress-agent",
        description="Give every workload of this host (machines by source address, local "
                    "processes by cgroup) its own static egress IPv4 + IPv6, with nftables "
                    "SNAT port blocks and policy routes.",
        epilog="Exit status: 0 ok, 1 invalid config or failed check (or a corrupt state "
               "file), 2 usage, 3 kernel refused the change (nothing applied), 4 verify "
               "mismatch, 5 another egress-agent holds this network namespace, 6 applied but "
               "the state dir could not be written.")
    p.add_argument("--version", action="version", version=f"egress-agent {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name, fn, help, config=True, json_=True):
        sp = sub.add_parser(name, help=help, description=help)
        if config:
            sp.add_argument("-c", "--config", default=os.environ.get(
                "EGRESS_AGENT_CONFIG", "/etc/egress-agent/config.yaml"),
                help="config file (default: $EGRESS_AGENT_CONFIG or /etc/egress-agent/config.yaml)")
            sp.add_argument("--state-dir", help="override state_dir of the config")
        if json_:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    add("check", cmd_check, "validate a config: exit 0, or 1 with FILE:LINE: reason per problem")
    sp = add("plan", cmd_plan, "what a first apply would program, workload by workload (no "
             "root), or with --against-running what apply would change on this host (root): "
             "'+', '-' or '~' per workload with its egress IP, address:ports and IPv6, then "
             "the route ops; --nft prints the nft batch itself")
    sp.add_argument("--against-running", action="store_true",
                    help="diff against this host's kernel state and allocations")
    sp.add_argument("--nft", action="store_true",
                    help="print the route ops and the nft batch itself instead of the "
                         "changes by workload")
    sp = add("explain", cmd_explain,
             "say which workload, policy, action, source address, port block and route "
             "table a packet would get")
    sp.add_argument("src", type=argtypes.source,
                    help="source address of a machine, or a cgroup path")
    sp.add_argument("dst", type=argtypes.destination,
                    help="destination address, optionally ADDR:PORT/PROTO ([IPv6]:PORT/PROTO)")
    sp.add_argument("--port", type=argtypes.port)
    sp.add_argument("--proto", choices=argtypes.PROTOCOLS)
    sp.add_argument("--iif", type=argtypes.ifname, help="interface the packet arrives on")
    sp.add_argument("--assume-usable", action="store_true",
                    help="treat every egress IP as present and up (default: look at this host)")
    add("schema", cmd_schema, "print the JSON Schema of the config (for editors)",
        config=False, json_=False)
    sp = add("who", cmd_who, "name the workload that held ADDR[:PORT] now or at --at TIME")
    sp.add_argument("address", type=_checked(argtypes.address_port),
                    help="egress address, with :PORT for IPv4 ([v6]:port for IPv6)")
    sp.add_argument("--at", type=argtypes.when, help="ISO-8601 time, e.g. 2026-11-23T10:00:00Z")
    add("apply", cmd_apply, "reconcile the kernel with the config once (root)")
    sp = add("run", cmd_run,
             "the daemon: reconcile at start, on config changes (inotify, SIGHUP), on "
             "address/link changes (netlink) and every --resync seconds; SIGTERM leaves the "
             "kernel state in place (systemd Type=notify)", json_=False)
    sp.add_argument("--resync", type=argtypes.seconds, default=60.0, metavar="SECONDS",
                    help="full resync interval that repairs drift (default 60)")
    sp.add_argument("--log-format", choices=log.FORMATS, default="auto",
                    help="console (readable), json (one object a line, the message under "
                         "'event'), journal (message, then key=value); auto: console on a "
                         "terminal, journal when stderr is journald, else json. On journald "
                         "each line carries its priority: journalctl -p warning works")
    sp.add_argument("--metrics", default="127.0.0.1:9469", metavar="ADDR:PORT",
                    type=argtypes.listen,
                    help="Prometheus metrics endpoint (default 127.0.0.1:9469; loopback only "
                         "unless --metrics-nonlocal; 'off' disables it)")
    sp.add_argument("--metrics-nonlocal", action="store_true",
                    help="allow a --metrics address that is not loopback: anyone who reaches "
                         "it reads every workload's name, addresses and usage")
    sp.add_argument("--metrics-detail", action="store_true",
                    help="add series per workload and per destination (connections, usage "
                         "ratio, refusals): one per workload, IPv6 address and origin port, "
                         "so unbounded on a big host; by default metrics are per egress IP")
    sp.add_argument("--translation-log", metavar="PATH",
                    help="write one JSON line per start and end of each translated connection "
                         "(workload, inside and outside address:port, destination), rotated at "
                         "64 MB x 5 files; for abuse reports (off by default)")
    sp.add_argument("--usage-interval", type=argtypes.seconds, default=15.0, metavar="SECONDS",
                    help="how often usage is read from conntrack for metrics and warnings "
                         "(default 15)")
    sp = add("usage", cmd_usage,
             "connections per workload and destination against their limits (port block, "
             "connections_per_destination), most saturated first; conntrack count and "
             "refusals (root)")
    sp.add_argument("--top", type=argtypes.positive_int, metavar="N",
                    help="only the N most saturated rows")
    sp = add("list", cmd_list,
             "what the kernel holds now, by workload and egress IP: each lease's address, "
             "port block and IPv6 address, whether it is the workload's default route or a "
             "policy's, and the sources or cgroup it is for (root)")
    sp.add_argument("--workload", action="append", metavar="ID",
                    help="only this workload (repeatable)")
    sp.add_argument("--ip", action="append", metavar="ID",
                    help="only the leases on this egress IP (repeatable)")
    sp = add("gateway", cmd_gateway,
             "on a gateway host (host.role: gateway), keepalived's notify: primary commits "
             "conntrackd's replica, then opens the gate to new connections; backup and fault "
             "close it, then ask for a resync (docs/gateway.md) (root). `script` prints the "
             "same as a shell script to give keepalived as notify (no Python start in a "
             "failover)")
    sp.add_argument("role", choices=("primary", "backup", "fault", "script"))
    sp.add_argument("--conntrackd-config", metavar="FILE",
                    help="conntrackd.conf of this host (egress_agent.pair renders it); "
                         "without it only the gate changes")
    sp = add("fleet", cmd_fleet,
             "one fleet file (pairs, workload hosts, app IPs, workloads) -> each host's "
             "config.yaml, tunnels.sh and, on gateways, keepalived.conf, conntrackd.conf and "
             "notify; blocks allocated once for the fleet, kept across renders "
             "(docs/gateway.md)", config=False)
    sp.add_argument("action", choices=("check", "render"),
                    help="check: validate and allocate, write nothing; render: write OUT/HOST/*")
    sp.add_argument("-f", "--fleet", required=True, metavar="FILE", help="the fleet file")
    sp.add_argument("-o", "--out", default="rendered", metavar="DIR",
                    help="render: where each host's files go (default ./rendered)")
    sp.add_argument("--state", default="/var/lib/egress-agent-fleet", metavar="DIR",
                    help="the fleet's allocations and history, one directory per pair "
                         "(who --state-dir DIR/PAIR answers for the fleet)")
    sp.add_argument("--layout-root", metavar="DIR",
                    help="for a lab on one machine: each host's state_dir, keepalived notify "
                         "and conntrackd files under DIR/HOST/ instead of the hosts' usual paths")
    add("teardown", cmd_teardown, "remove every kernel object the agent owns, nothing else (root)",
        config=False)
    add("status", cmd_status, "egress IPs (present, state, workloads) and each workload's leases")
    sp = add("verify", cmd_verify,
             "probe an echo endpoint from each workload's context and compare the source "
             "address and port it saw with the assignment")
    sp.add_argument("--echo", required=True, metavar="ADDR:PORT", type=argtypes.endpoint,
                    help="echo endpoint answering with the source it saw, e.g. 192.0.2.10:8080 "
                         "or [2001:db8:ff::10]:8080")
    sp.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    sp.add_argument("--lab", metavar="PREFIX",
                    help="also probe machines from the namespaces of this lab (PREFIX-<workload>)")
    from .lab.cli import add_lab_commands
    add_lab_commands(sub)
    return p


def _checked(fn):
    """A type that validates but keeps the text as written (for messages)."""
    def check(text: str) -> str:
        fn(text)
        return text
    check.__name__ = fn.__name__
    return check


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    from .nslock import Busy
    from .store import StoreCorrupt
    if needs_root(args) and not has_net_admin():
        print(f"egress-agent {args.cmd}: needs root (CAP_NET_ADMIN); run it as root, "
              "e.g. with sudo", file=sys.stderr)
        return Exit.USAGE
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return Exit.INVALID
    except Busy as e:
        print(f"egress-agent {args.cmd}: {e}; a running daemon applies config changes itself "
              "(edit the file or send SIGHUP); otherwise retry when it is done", file=sys.stderr)
        return Exit.BUSY
    except StoreCorrupt as e:
        print(f"egress-agent {args.cmd}: {e}; the next apply or daemon sync moves it aside "
              "and adopts the kernel's live state", file=sys.stderr)
        return Exit.INVALID
    except BrokenPipeError:  # `egress-agent status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    except CapacityError as e:
        where = load(args.config).where(e.workload) if getattr(args, "config", None) else ""
        print(f"{where}: workloads: capacity: {e}", file=sys.stderr)
        return Exit.INVALID
    except PermissionError as e:
        print(f"egress-agent {args.cmd}: {e}; this command needs root (CAP_NET_ADMIN)",
              file=sys.stderr)
        return Exit.USAGE


if __name__ == "__main__":
    sys.exit(main())
