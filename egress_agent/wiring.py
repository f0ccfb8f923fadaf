"""The composition root: the one place where the pipeline meets the real kernel.

Every stage takes its effects as arguments: the `Reconciler` an `NftPort`, a
`RoutingPort`, a `Store`, a host reader and a cgroup root; the `Daemon` a
reconciler factory and a usage collector. Unit tests pass fakes
(nft/fake.py, routing/fake.py); this module builds the real ones (libnftables,
pyroute2, the state dir, netlink host dumps, ctnetlink, the cgroup2 view) for
the CLI, the daemon, `verify` and the lab, so each of them builds nothing of
its own (docs/design.md, "Layout").
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from . import cgroupfs
from .config import Config, load
from .hoststate import Usable, read_host_state, usable_from


def load_config(path: str, state_dir: Optional[str] = None) -> Config:
    """The config at `path`, with `state_dir` (a --state-dir) put over its own."""
    cfg = load(path).config
    return cfg.model_copy(update={"state_dir": state_dir}) if state_dir else cfg


def usable_here(cfg: Config) -> Usable:
    """The egress IPs usable on this host now (no root needed: netlink dumps)."""
    return usable_from(cfg, read_host_state())


def table_here() -> Optional[bool]:
    """Is the agent's table in this network namespace? None: cannot tell (nftables
    needs CAP_NET_ADMIN to be read)."""
    from .nft.libnft import Libnft
    try:
        return Libnft().has_table()
    except PermissionError:
        return None


def nft_runner() -> Callable[[str], None]:
    """Run one nft batch in this network namespace (NftError when refused)."""
    from .nft.libnft import Libnft
    return Libnft().run


def running_table():
    """The agent's table in this network namespace, read whole (an `Observed`)."""
    from .nft.libnft import Libnft
    return Libnft().read_table()


def reconciler(cfg: Optional[Config] = None, read_host: Callable = read_host_state):
    """The reconciler of this host: libnftables, pyroute2, the config's state dir,
    the host's addresses and links (`read_host`), live conntrack leases, cgroup2 at
    cgroupfs.VIEW.

    Without a config (teardown) it has no store to read or write."""
    from .conntrack import live_leases
    from .nft.libnft import Libnft
    from .reconcile import Reconciler
    from .routing.iproute import IPRouteRouting
    from .store import Store
    if cfg is None:
        return Reconciler(Libnft(), IPRouteRouting(), Store("/nonexistent"), read_host_state)
    try:
        cgroupfs.ensure_view()
    except OSError as e:  # only cgroup workloads need it; say so, keep going
        print(f"warning: no cgroup2 view at {cgroupfs.VIEW} ({e}); cgroup workloads "
              "cannot be classified", file=sys.stderr)
    return Reconciler(Libnft(), IPRouteRouting(), Store(cfg.state_dir), read_host,
                      cgroup_root=cgroupfs.VIEW, live_leases=live_leases)


def usage_collector() -> Callable[[Config], object]:
    """A usage snapshot with its own nft context (it runs in the usage thread)."""
    from .nft.libnft import Libnft
    from .report import collect
    from .store import Store
    nft = None

    def collect_usage(cfg: Config, alloc=None):
        """`alloc`: the allocations the kernel holds (the daemon's memory); None:
        read the store (at 100k workloads that is seconds of CPU every interval)."""
        nonlocal nft
        nft = nft or Libnft()
        return collect(cfg, Store(cfg.state_dir).load() if alloc is None else alloc, nft)
    return collect_usage


def daemon(config_path: str, **options):
    """The daemon on this host's kernel; `options` are the Daemon's (resync_interval,
    metrics, translation_log, watch_netlink, ...)."""
    from .daemon import Daemon
    from .probe import Prober, with_unreachable
    options.setdefault("collect_usage", usage_collector())
    prober = options.setdefault("prober", Prober())
    read_host = with_unreachable(read_host_state, prober)
    return Daemon(config_path, lambda cfg: reconciler(cfg, read_host), **options)


def live_explainer(cfg: Config):
    """explain() against the stored allocations and this host's usable addresses:
    what `verify` and the lab expect each probe's source to be."""
    from .alloc import allocate
    from .plan import explain
    from .store import Store
    usable = usable_here(cfg)
    # what an apply of this config would hold: the stored allocations, kept where they fit
    alloc, _ = allocate(cfg, Store(cfg.state_dir).load(), usable)
    return lambda c: explain(cfg, alloc, c.src, c.dst, c.port, c.proto, c.iif, usable)
