"""systemd's notify protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET.

Twenty lines of socket code; the PyPI packages for it are unmaintained.
"""

from __future__ import annotations

import os
import socket
from typing import Optional


class Notifier:
    def __init__(self, address: Optional[str] = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract socket
        self.address = address or None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None

    def __call__(self, *lines: str) -> bool:
        if not self._sock:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            return False

    def watchdog_interval(self) -> Optional[float]:
        """Half of WATCHDOG_USEC in seconds, if systemd asked this process for pings."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6
