"""The daemon's event sources: the config's files (inotify) and the host's links
and addresses (rtnetlink). Each is a thread body that runs until `stopping` is
set and raises when it cannot go on; `Daemon.start_watcher` restarts it, and
stops the daemon when it keeps failing.

Lost events are not failures: the kernel says it dropped some (netlink
ENOBUFS, inotify IN_Q_OVERFLOW), the body calls `lost(name)`, which logs a
warning and queues a full resync, and goes on reading.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Callable, Optional

from .config import watched_paths
from .inbox import Trigger
from .nftwatch import messages_from, netlink_socket

Post = Callable[[Trigger], None]
Lost = Callable[[str], None]

# rtnetlink (linux/rtnetlink.h)
NETLINK_ROUTE = 0
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21


def open_rtnetlink() -> socket.socket:
    # a flap of one link is ~3 messages of ~1-4 KiB of socket memory each: the
    # default 208 KiB holds ~100 flaps while the main thread holds the GIL
    sock = netlink_socket(NETLINK_ROUTE)
    sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    sock.settimeout(1.0)  # to see `stopping`
    return sock


def watch_links(stopping: threading.Event, post: Post, lost: Lost,
                open_socket: Callable[[], socket.socket] = open_rtnetlink) -> None:
    """Link and address events. The message is not parsed further: the loop
    re-reads the host, which is the truth, not the event.

    A raw socket and not pyroute2's IPRoute: only the message type is needed,
    a timeout lets the thread see `stopping`, and ENOBUFS surfaces as the
    error of one recv() on a socket that stays subscribed, so nothing is
    missed between the overflow and the resync's fresh dump."""
    with open_socket() as sock:
        while not stopping.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                lost("netlink")
                continue
            kinds = [kind for kind, _, _ in messages_from(data)]
            if not kinds:
                continue
            # a link that comes back has lost its routes: a link event always
            # syncs (which re-reads our routes); an address event only when it
            # changes which egress IPs are usable.
            post(Trigger("netlink", force=any(k in (RTM_NEWLINK, RTM_DELLINK) for k in kinds)))


def watch_config(config_path: str, stopping: threading.Event, post: Post, lost: Lost,
                 log) -> None:
    """inotify on the config's directory and on the directories of its includes.

    Watching directories, not files, sees editors that write a new file and
    rename it over the old one. Directories of includes added later are
    watched from the next start."""
    from inotify_simple import INotify, flags
    wanted: dict[int, Optional[str]] = {}
    with INotify() as ino:
        def watch(paths: dict[str, Optional[str]]) -> None:
            for directory, name in paths.items():
                try:
                    wd = ino.add_watch(directory, flags.CLOSE_WRITE | flags.MOVED_TO
                                       | flags.CREATE | flags.DELETE | flags.MOVED_FROM)
                    wanted[wd] = name
                except OSError as e:
                    log.warning("cannot watch for config changes", directory=directory,
                                error=str(e))

        # a config that is a symlink: also watch the file it resolves to
        target = os.path.realpath(config_path)
        watch({**watched_paths(config_path), os.path.dirname(target): os.path.basename(target)})
        while not stopping.is_set():
            events = ino.read(timeout=1000)
            if any(ev.mask & flags.Q_OVERFLOW for ev in events):
                lost("inotify")
                continue
            now = os.path.realpath(config_path) if events else target
            if now != target:  # a symlink on the way now points elsewhere (..data swap)
                target = now
                watch({os.path.dirname(target): os.path.basename(target)})
                post(Trigger("config", reload=True))
                continue
            for ev in events:
                name = wanted.get(ev.wd)
                if ev.name == name or (name is None and ev.name.endswith((".yaml", ".yml"))):
                    post(Trigger("config", reload=True))
