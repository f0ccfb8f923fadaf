"""Hostile configs fed to a running daemon: it keeps the last good state in the
kernel (the origin still sees the assigned sources), stays alive in bounded
memory, logs FILE:LINE: reason, and applies the next valid config.

One lab and one daemon for the whole sequence; each hostile file replaces the
config the way a deploy would (rename over it), so the daemon reloads it.
"""

from __future__ import annotations

import os
import secrets

from egress_agent.config import MAX_BYTES
from egress_agent.lab.cli import write_demo_config
from egress_agent.lab.topology import Lab

from daemon_helpers import (
    PARTNER_EGRESS, Agent, demo_text, in_block, lease, status, wait_until, write_by_rename,
)

ECHO = "192.0.2.10"
PARTNER_DST = "198.51.100.10"
PARTNER_LINK = "203.0.113.140"
HOST_DEFAULT4 = "203.0.113.2"
PEAK_RSS_MB = 400  # the daemon on the lab config peaks near 60 MB; the bugs reached GBs


def alias_bomb() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for x, y in zip("bcdefghi", "abcdefgh"):
        text += f"{x}: &{x} [" + ",".join([f"*{y}"] * 9) + "]\n"
    return text


def rename_over(path: str, make) -> None:
    """Build the hostile thing beside `path` (make(tmp)), then rename it over `path`."""
    tmp = os.path.join(os.path.dirname(path), f".hostile.{secrets.token_hex(3)}")
    make(tmp)
    os.rename(tmp, path)


def writer(data: bytes):
    def make(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return make


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_hostile_configs_keep_the_last_good_state(lab: Lab) -> None:
    cfg = write_demo_config(lab)
    good = demo_text(lab)
    hostile = [  # (what, how to make it, line, words of the logged reason)
        ("500 nested [", writer((good + "x: " + "[" * 500 + "\n").encode()),
         len(good.splitlines()) + 1, "nested more than 32 levels deep"),
        ("one byte \\xff", writer(good.encode() + b"# \xff\n"), len(good.splitlines()) + 1,
         "byte 0xff at column 3 is not UTF-8"),
        ("an alias bomb", writer((good + alias_bomb()).encode()), len(good.splitlines()) + 7,
         "aliases expand the file to more than"),
        ("include: [/dev/zero]", writer((good + "include: [/dev/zero]\n").encode()),
         len(good.splitlines()) + 1, "cannot read /dev/zero: a character device"),
        ("a FIFO", os.mkfifo, 0, "cannot read: a FIFO, not a regular file"),
        ("a huge file", writer(good.encode() + b"#" * MAX_BYTES + b"\n"), 0,
         "cannot read: larger than"),
    ]
    with Agent(lab, cfg, resync=0.5) as ag:
        ag.wait_syncs(1, trigger="start")
        m42 = lease(status(lab, cfg), "m42")
        assert in_block(lab.probe("m42", ECHO, 8080), m42)
        assert lab.probe("m42", PARTNER_DST, 8080).address == PARTNER_LINK

        for what, make, line, words in hostile:
            n = len(ag.errors())
            rename_over(cfg, make)
            logged = wait_until(lambda: [r for r in ag.errors()[n:] if r.get("file") == cfg],
                                timeout=15, what=f"the error for {what} (log: {ag.tail()})")
            assert logged[0]["line"] == line and words in logged[0]["reason"], (what, logged)
            assert logged[0]["problem"].startswith(f"{cfg}:{line}: "), logged
            ag.check_alive()
            # a resync or two later, the kernel still holds the last good state
            ag.wait_next_sync(trigger="resync")
            assert in_block(lab.probe("m42", ECHO, 8080), m42), what
            assert lab.probe("m42", PARTNER_DST, 8080).address == PARTNER_LINK, what
            assert peak_rss_mb(ag.proc.pid) < PEAK_RSS_MB, what

        # the next valid config is applied (it replaces the FIFO or huge file, too)
        write_by_rename(cfg, demo_text(lab, (PARTNER_EGRESS, "    egress: default\n")))
        s = ag.wait_next_sync(trigger="config")
        assert s["changed"], s
        assert lab.probe("m42", PARTNER_DST, 8080).address == HOST_DEFAULT4
        assert in_block(lab.probe("m42", ECHO, 8080), m42)
