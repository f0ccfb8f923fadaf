"""What wakes the daemon's loop: triggers posted by threads and signal handlers.

`queue.Queue` cannot carry signals: a Python signal handler runs in the main
thread between two bytecodes, possibly while that thread holds the queue's
lock inside `get()`; a `put()` from the handler then waits for a lock its own
thread holds (issue 10: a loop of `systemctl reload` froze the daemon; every
further SIGHUP nested one more blocked handler, 5,000 of them a RecursionError).

Here nothing takes a lock: producers append to a deque (atomic in CPython)
and write one byte to a non-blocking pipe; the loop sleeps in `poll()` on
the pipe. `signal.set_wakeup_fd(inbox.wakeup_fd)` makes the C-level signal
handler write to the same pipe, so a signal wakes the loop at once; the
Python handlers only set flags that the loop reads (see daemon.py).
"""

from __future__ import annotations

import collections
import os
import select
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Trigger:
    kind: str  # start | sighup | config | netlink | resync | watcher | ...
    full: bool = False    # re-read the kernel instead of trusting memory
    reload: bool = False  # re-read the config file
    force: bool = False   # sync even if no egress IP changed usability


class Inbox:
    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._items: collections.deque[Trigger] = collections.deque()

    @property
    def wakeup_fd(self) -> int:
        return self._write

    def post(self, item: Trigger) -> None:
        self._items.append(item)
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop has a wake-up pending already

    def wait(self, timeout: Optional[float]) -> None:
        """Sleep until something was posted or a signal arrived (or `timeout`);
        empty the pipe. Posts made before the call return at once."""
        if not self._items:
            poll = select.poll()  # not select(): no FD_SETSIZE limit on the fd number
            poll.register(self._read, select.POLLIN)
            poll.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def take(self) -> list[Trigger]:
        out = []
        while True:
            try:
                out.append(self._items.popleft())
            except IndexError:
                return out
