"""An incremental sync equals a whole plan: the partial == full property.

Random sequences of edits (add, remove, move between apps, a new source, a
cgroup appearing, failover and fail-back, drain, an egress IP added or
removed, a policy edit, a fixed port block set or cleared) run through the Reconciler on the fakes. After every
step the allocations it keeps, the elements, chains, routes and rules the fake
kernel holds, and its own index must equal what the oracle gives from the same
previous allocations: today's full `allocate()` + `build()`. Edits of
workloads and of usability must take the incremental path, planning only the
workloads they touch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from egress_agent.alloc import allocate, drain
from egress_agent.config import Config, Reader, parse
from egress_agent.hoststate import HostFacts, HostState, existing_cgroups, usable_from
from egress_agent.nft.fake import FakeNft
from egress_agent.nft.listing import observed_from_json
from egress_agent.nft.text import comments
from egress_agent.plan import build
from egress_agent.reconcile import Reconciler
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store

IPS = {  # id: (app or "workload:ID", ipv4, ipv6 range)
    "a1": ("a", "203.0.113.10", "2001:db8:10::/64"),
    "a2": ("a", "203.0.113.11", None),
    "b1": ("b", "203.0.113.20", "2001:db8:20::/64"),
    "b2": ("b", "203.0.113.21", None),
    "m0": ("workload:w0", "198.51.100.5", None),
}
EXTRA_IP = ("a3", ("a", "203.0.113.12", "2001:db8:12::/64"))
BLOCK = 2048  # ports_per_workload: 31 blocks per IP, room for every workload a test adds
POLICY_EGRESS = ["default", "drop", "{ipv4: b2, ipv4_fallback: drop}", "{ipv4: a1}"]


class AllLive:
    """conntrack as a test wants it: every lingering block still has connections."""

    def __contains__(self, item) -> bool:
        return True


@dataclass
class World:
    workloads: dict = field(default_factory=lambda: {"w0": ("a", 0, None)})  # id: (app, src, cgroup)
    extra_ip: bool = False
    policy: int = 0
    policy_apps: tuple = ("b",)
    down: set = field(default_factory=set)
    drain: bool = False
    next_id: int = 1
    next_src: int = 1
    cgroot: str = ""
    fixed: dict = field(default_factory=dict)  # workload: (ip, first port) of its fixed block

    def ips(self):
        out = dict(IPS)
        if self.extra_ip:
            out[EXTRA_IP[0]] = EXTRA_IP[1]
        return out

    def config_text(self) -> str:
        lines = ["version: 1", "host: {name: h, region: r}",
                 f"defaults: {{ports_per_workload: {BLOCK}, port_range: 1024-65535}}",
                 "managed_sources: [10.0.0.0/16]", "egress_ips:"]
        for ip_id, (owner, v4, v6) in self.ips().items():
            scope = f"workload: {owner.split(':')[1]}" if owner.startswith("workload:") else f"app: {owner}"
            lines.append(f"  - {{id: {ip_id}, {scope}, ipv4: {v4}"
                         + (f", ipv6: '{v6}'" if v6 else "") + "}")
        lines.append("workloads:")
        ips = self.ips()
        for w, (app, src, cg) in self.workloads.items():
            where = f"cgroup: {cg}" if cg else f"source: [10.0.{src // 250}.{src % 250 + 1}]"
            ip, lo = self.fixed.get(w, (None, 0))
            # a block on an IP of another app (the workload moved) or one that is gone
            # is left out, and is back when the workload or the IP is
            fixed = (f", blocks: {{{ip}: {lo}-{lo + BLOCK - 1}}}"
                     if ip in ips and ips[ip][0] == app else "")
            lines.append(f"  - {{id: {w}, app: {app}, {where}{fixed}}}")
        lines += ["policies:",
                  f"  - {{name: p, match: {{apps: [{', '.join(self.policy_apps)}], "
                  f"destinations: [192.0.2.0/24]}}, egress: {POLICY_EGRESS[self.policy]}}}"]
        return "\n".join(lines) + "\n"

    def host(self) -> HostState:
        addrs = set()
        for ip_id, (_, v4, v6) in self.ips().items():
            if ip_id not in self.down:
                addrs.add(v4)
                if v6:
                    addrs.add(v6.split("/")[0] + "1")
        return HostState(frozenset(addrs))


# what each edit does to the world; its kind: "workloads", "usable" or "shared"
def add(w: World, k: int):
    wid = f"w{w.next_id}"
    w.next_id += 1
    w.next_src += 1
    w.workloads[wid] = ("ab"[k % 2], w.next_src, f"svc/{wid}" if k % 3 == 0 else None)
    return "workloads"


def remove(w: World, k: int):
    ids = [x for x in w.workloads if x != "w0"]
    if ids:
        del w.workloads[ids[k % len(ids)]]
        w.fixed.pop(ids[k % len(ids)], None)
    return "workloads"


def move(w: World, k: int):
    ids = list(w.workloads)
    x = ids[k % len(ids)]
    app, src, cg = w.workloads[x]
    w.workloads[x] = ("b" if app == "a" else "a", src, cg)
    return "workloads"


def new_source(w: World, k: int):
    ids = list(w.workloads)
    x = ids[k % len(ids)]
    app, _, cg = w.workloads[x]
    w.next_src += 1
    w.workloads[x] = (app, w.next_src, None if cg else f"svc/{x}")  # a new source, or a cgroup
    return "workloads"


def flip_ip(w: World, k: int):
    ids = sorted(w.ips())
    x = ids[k % len(ids)]
    w.down ^= {x}
    return "usable"


def flip_drain(w: World, k: int):
    w.drain = not w.drain
    return "drain"


def flip_extra_ip(w: World, k: int):
    w.extra_ip = not w.extra_ip
    w.down.discard(EXTRA_IP[0])
    return "shared"


def edit_policy(w: World, k: int):
    w.policy = k % len(POLICY_EGRESS)
    w.policy_apps = (("a",), ("b",), ("a", "b"))[k % 3]
    return "shared"


def flip_cgroup(w: World, k: int):
    """A workload's cgroup appears, or goes away (seen by the periodic resync)."""
    groups = [cg for _, _, cg in w.workloads.values() if cg]
    if groups:
        path = os.path.join(w.cgroot, groups[k % len(groups)])
        os.makedirs(path) if not os.path.isdir(path) else os.rmdir(path)
    return "resync"


def fix_block(w: World, k: int):
    """A workload's block on an IP of its app is fixed (at a multiple of 1024 where the
    allocator's blocks are, so that it often covers one or two of them), or no longer."""
    ids = list(w.workloads)
    x = ids[k % len(ids)]
    if x in w.fixed:
        del w.fixed[x]
        return "workloads"
    app = w.workloads[x][0]
    ips = [i for i, (owner, _, _) in w.ips().items() if owner == app]
    ip, lo = ips[k // 7 % len(ips)], 1024 + (k // 3 % 12) * 1024
    if all(i != ip or lo + BLOCK <= other or other + BLOCK <= lo for i, other in w.fixed.values()):
        w.fixed[x] = (ip, lo)
    return "workloads"


EDITS = [add, add, remove, move, new_source, flip_ip, flip_drain, flip_extra_ip, edit_policy,
         flip_cgroup, fix_block, fix_block]


def assert_disjoint(a) -> None:
    """The oracle itself: no two leases share a port of one address, or an IPv6 address."""
    blocks: dict[str, list] = {}
    for lease in a.leases.values():
        if lease.ports:
            blocks.setdefault(lease.ipv4, []).append(lease.ports)
    for addr, bs in blocks.items():
        bs.sort()
        assert all(hi < lo for (_, hi), (lo, _) in zip(bs, bs[1:])), (addr, bs)
    v6 = [lease.ipv6 for lease in a.leases.values() if lease.ipv6]
    assert len(v6) == len(set(v6)), sorted(v6)


def read(world: World, reader) -> Config:
    """The world's config: parsed anew, or (`reader`: (Reader, path)) through a Reader
    and copied as the daemon copies it, so that the sync finds what changed from the
    Reader (Config.changes_since) instead of comparing every workload."""
    if reader is None:
        return parse(world.config_text()).config
    r, path = reader
    path.write_text(world.config_text())
    return r.load(path).config.model_copy(update={"state_dir": str(path.parent)})


def check_step(rec: Reconciler, world: World, cgroot: str, kind: str, prev, reader=None) -> None:
    before = rec.index.cfg
    cfg = read(world, reader)
    if reader is not None and kind == "workloads":
        assert cfg.changes_since(before) is not None
    host = world.host()
    rec.read_host = lambda: host
    trigger = {"usable": "netlink", "resync": "resync"}.get(kind, "config")
    r = rec.sync(cfg, trigger=trigger, full=trigger == "resync")

    usable = usable_from(cfg, host)
    want_alloc, _ = allocate(cfg, prev, usable)
    if want_alloc.lingering:
        want_alloc = drain(want_alloc, rec.live_leases([]))[0]
    assert rec.alloc == want_alloc
    assert_disjoint(want_alloc)
    assert Store(rec.store.dir).load() == want_alloc  # allocations.json + its journal
    want = build(cfg, want_alloc, HostFacts(usable, existing_cgroups(cfg, cgroot),
                                            host.addresses)).desired
    assert rec.index.desired() == want
    kernel = observed_from_json(rec.nft.list_table())
    for name in set(want.elements) | set(kernel.elements):
        assert kernel.elements.get(name, frozenset()) == want.elements.get(name, frozenset()), name
    assert {c: comments(x) for c, x in want.chains.items()} == \
        {c: kernel.chains.get(c, ()) for c in want.chains}
    assert rec.routing.dump() == (want.routes, want.rules)
    if kind in ("workloads", "usable", "drain", "resync"):
        assert r.mode == "incremental", r.to_json()
        assert r.replanned <= 3 + len(world.workloads) // 2 or kind != "workloads", r.to_json()


@settings(max_examples=200, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(EDITS), st.integers(0, 1000)), min_size=1, max_size=12),
       st.integers(0, 2**16))
def test_incremental_syncs_equal_a_whole_plan(tmp_path_factory, edits, seed):
    tmp = tmp_path_factory.mktemp("inc")
    cgroot = str(tmp / "cgroup")
    os.makedirs(cgroot)
    world = World(cgroot=cgroot)
    for i in range(3):
        add(world, seed >> i)
    live = {"all": AllLive()}
    rec = Reconciler(FakeNft(), FakeRouting(), Store(tmp / "state"), world.host,
                     cgroup_root=cgroot,
                     live_leases=lambda marks: frozenset() if world.drain else live["all"])
    reader = (Reader(), tmp / "c.yaml") if seed % 2 else None
    rec.sync(read(world, reader), trigger="start", full=True)
    for edit, k in edits:
        kind = edit(world, k)
        # a copy: an incremental sync writes its change into rec.alloc's dicts
        check_step(rec, world, cgroot, kind, rec.alloc.copy(), reader)


# --- the resync trusts memory only while nftables' generation says nothing else committed ---

def _synced(tmp_path):
    world = World(cgroot=str(tmp_path))
    for i in range(3):
        add(world, i)
    nft = FakeNft()
    rec = Reconciler(nft, FakeRouting(), Store(tmp_path / "state"), world.host,
                     cgroup_root=str(tmp_path))
    cfg = parse(world.config_text()).config
    rec.sync(cfg, trigger="start", full=True)
    return rec, nft, cfg


def test_a_resync_with_nothing_committed_since_reads_no_table(tmp_path):
    rec, nft, cfg = _synced(tmp_path)
    listed = []
    nft.list_table = lambda terse=False, _l=nft.list_table: listed.append(1) or _l(terse)
    r = rec.sync(cfg, trigger="resync", full=True)
    assert r.mode == "incremental" and not r.changed and listed == []


def test_a_commit_by_anyone_else_makes_the_resync_read_and_repair(tmp_path):
    rec, nft, cfg = _synced(tmp_path)
    nft.elements("snat4").clear()
    nft.gen += 1  # another process committed (to any table)
    r = rec.sync(cfg, trigger="resync", full=True)
    assert r.mode == "full" and r.added and [f.kind for f in r.drift] == ["elements"]
    assert rec.sync(cfg, trigger="resync", full=True).mode == "incremental"


def test_a_commit_by_another_process_during_a_sync_is_not_trusted(tmp_path):
    """Damage committed between the start of a sync and its own batch: the batch's
    generation is one too far, so the next resync reads the table."""
    rec, nft, cfg = _synced(tmp_path)
    run = nft.run

    def foreign_first(batch):
        nft.elements("managed4").clear()  # a set this batch does not touch
        nft.gen += 1
        run(batch)
    nft.run = foreign_first
    world_cfg = cfg.model_copy(update={"workloads": cfg.workloads[:-1]})
    assert rec.sync(world_cfg, trigger="config").mode == "incremental"
    nft.run = run
    r = rec.sync(world_cfg, trigger="resync", full=True)
    assert r.mode == "full" and r.added, r.to_json()
