"""Command-line value types: each refuses a bad value with one line that says what
is expected (argparse then exits 2), so no command meets a value it cannot use.

Pure: no kernel access, so `check`, `explain` and `who` stay usable without root.
The one ADDR:PORT / [IPv6]:PORT parser (`endpoint`) and its writer (`endpoint_text`)
live here; the metrics listener and the lab's echo server use them too.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from typing import Optional

PROTOCOLS = ("tcp", "udp", "icmp")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_DOTTED_OR_HEX = re.compile(r"[\d.]+|.*:.*")  # what can only be meant as an address


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A refused value: argparse prints the message; other callers catch ValueError."""


def _bad(msg: str) -> BadValue:
    return BadValue(msg)


def address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _bad(f"{text!r} is not an IP address like 192.0.2.10 or 2001:db8::10") from None


def _number(text: str) -> Optional[int]:
    """A decimal number of at most 9 ASCII digits (str.isdigit also takes '²')."""
    t = text.strip()
    return int(t) if t.isascii() and t.isdigit() and len(t) <= 9 else None


def port(text: str) -> int:
    n = _number(text)
    if n is None or not 1 <= n <= 65535:
        raise _bad(f"{text!r} is not a port (1-65535)")
    return n


def positive_int(text: str) -> int:
    n = _number(text)
    if n is None or n < 1:
        raise _bad(f"{text!r} is not a whole number of at least 1")
    return n


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < 10**7:  # also refuses nan and inf
        raise _bad(f"{text!r} is not a number of seconds above 0")
    return v


def ifname(text: str) -> str:
    if not _IFNAME.fullmatch(text):
        raise _bad(f"{text!r} is not an interface name (1-15 of letters, digits, _ . : @ -)")
    return text


def source(text: str) -> str:
    """A machine's source address or a cgroup path (explain's SRC)."""
    if _DOTTED_OR_HEX.fullmatch(text):
        return address(text)
    if not text.strip("/") or any(c.isspace() for c in text):
        raise _bad(f"{text!r} is neither an IP address nor a cgroup path like "
                   "system.slice/cron.service")
    return text


def _split_port(text: str, what: str) -> tuple[str, Optional[str]]:
    """`ADDR`, `ADDR:PORT` (IPv4) or `[ADDR]:PORT` -> (ADDR, PORT or None)."""
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _bad(f"{text!r} is not {what}")
        return addr, rest[1:] if rest else None
    if text.count(":") == 1:
        addr, _, p = text.partition(":")
        return addr, p
    return text, None


def endpoint(text: str) -> tuple[str, int]:
    """ADDR:PORT, or [IPv6]:PORT -> (address, port)."""
    what = "ADDR:PORT like 192.0.2.10:8080 or [2001:db8::10]:8080"
    addr, p = _split_port(text, what)
    if p is None:
        raise _bad(f"{text!r} is not {what}")
    return address(addr), port(p)


def endpoint_text(addr: str, port_: int) -> str:
    """(address, port) -> ADDR:PORT, or [IPv6]:PORT: what `endpoint` reads back."""
    return f"[{addr}]:{port_}" if ":" in addr else f"{addr}:{port_}"


def address_port(text: str) -> tuple[str, Optional[int]]:
    """`who`'s ADDR[:PORT] or [IPv6]:PORT -> (address, port or None)."""
    addr, p = _split_port(text, "ADDR[:PORT] like 203.0.113.10:1500 or [2001:db8::1]:1500")
    return address(addr), None if p is None else port(p)


def destination(text: str) -> tuple[str, Optional[int], Optional[str]]:
    """explain's DST: ADDR, ADDR:PORT/PROTO or [IPv6]:PORT/PROTO -> (address, port, proto)."""
    text_, _, proto = text.partition("/")
    if proto and proto not in PROTOCOLS:
        raise _bad(f"{proto!r} in {text!r} is not a protocol: use one of {', '.join(PROTOCOLS)}")
    addr, p = _split_port(text_, "ADDR[:PORT[/PROTO]] like 198.51.100.10:443/tcp")
    return address(addr), None if p is None else port(p), proto or None


def when(text: str) -> str:
    """An ISO-8601 time, as written (the store parses it the same way)."""
    from .store import parse_time
    try:
        parse_time(text)
    except ValueError:
        raise _bad(f"{text!r} is not an ISO-8601 time like 2026-11-23T10:00:00Z") from None
    return text


def listen(text: str) -> str:
    """--metrics: ADDR:PORT, [IPv6]:PORT or off, as written (which addresses are
    allowed is metrics.parse_listen's decision, with --metrics-nonlocal)."""
    if text != "off":
        endpoint(text)
    return text
