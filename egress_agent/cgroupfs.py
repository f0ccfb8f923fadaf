"""Where cgroup v2 is, and a private view of it at /sys/fs/cgroup.

libnftables resolves `socket cgroupv2` paths relative to /sys/fs/cgroup. On
hybrid hosts cgroup2 lives elsewhere (e.g. /sys/fs/cgroup/unified), so the
agent mounts cgroup2 at /sys/fs/cgroup in a mount namespace of its own: the
host's mounts are untouched and cgroup ids are global, so the elements it
writes match the host's processes.
"""

from __future__ import annotations

import ctypes
from typing import Optional

VIEW = "/sys/fs/cgroup"  # where libnftables resolves `socket cgroupv2` paths
CGROUP2_SUPER_MAGIC = 0x63677270
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """The mount point of the whole cgroup2 hierarchy (/sys/fs/cgroup, or e.g.
    /sys/fs/cgroup/unified on hybrid hosts), or None: a mount of the hierarchy's
    root before a bind mount of a subtree, then VIEW, then the shortest path."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] == "cgroup2":
                fields = pre.split()
                mnt = fields[4].encode().decode("unicode_escape")  # \040 etc.
                found.append((fields[3] != "/", mnt != VIEW, len(mnt), mnt))
    return min(found)[3] if found else None


def ensure_view(target: str = VIEW) -> str:
    """Make `target` show cgroup2 for this process; return what it was before."""
    root = cgroup2_root()
    if root == target:
        return "native"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for a private cgroup2 view")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / private in our mount namespace")
    if libc.mount(b"cgroup2", target.encode(), b"cgroup2", 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount cgroup2 at {target}")
    return f"private mount (host has cgroup2 at {root or 'nowhere'})"

