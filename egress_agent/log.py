"""structlog set-up: one line per log record, in one of three formats.

- console: readable, for a terminal;
- json: one JSON object a line (`event` is the message), for log shippers;
- journal: the message first, then `key=value` pairs (logfmt), for journald.

When stderr is journald's stream (systemd sets JOURNAL_STREAM to its device and
inode), every line starts with its syslog priority, `<3>` for an error, `<4>` a
warning, `<6>` info: journald strips it and files the line at that priority, so
`journalctl -p warning -u egress-agent` shows warnings and errors only. `auto`
picks console on a terminal, journal on journald, JSON otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, TextIO

import structlog
from structlog.processors import LogfmtRenderer

FORMATS = ("auto", "console", "json", "journal")
# syslog priorities (sd-daemon(3)), by structlog's level names
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def on_journal(stream: TextIO) -> bool:
    """Is `stream` connected to journald? JOURNAL_STREAM is "DEVICE:INODE" of the
    stream systemd gave us (systemd.exec(5)); a child with a redirected stderr
    inherits the variable, hence the comparison."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _journal_line(_, __, event_dict: dict) -> str:
    message = str(event_dict.pop("event", ""))
    event_dict.pop("timestamp", None)  # journald stamps every line itself
    event_dict.pop("level", None)  # the priority says it
    rest = _logfmt(None, None, {k: _flat(v) for k, v in event_dict.items() if v is not None})
    return f"{message} {rest}" if rest else message


_logfmt = LogfmtRenderer(bool_as_flag=False)


def _flat(v):
    """A list as `a,b,c` (`workloads=m42,m43`), a dict as compact JSON, not Python's repr."""
    if isinstance(v, (list, tuple, set, frozenset)):
        return ",".join(map(str, v))
    return json.dumps(v, separators=(",", ":"), default=str) if isinstance(v, dict) else v


def _prefixed(render):
    """Put the syslog priority in front of what `render` makes of the record."""
    def processor(logger, name, event_dict):
        prio = PRIORITY.get(event_dict.get("level", "info"), 6)
        return f"<{prio}>{render(logger, name, event_dict)}"
    return processor


def configure(fmt: Optional[str] = None, level: int = logging.INFO,
              stream: Optional[TextIO] = None) -> str:
    """Set up logging on `stream` (stderr); returns the format chosen. `fmt` None
    or "auto": console on a terminal, journal on journald, JSON otherwise."""
    stream = stream or sys.stderr
    journal = on_journal(stream)
    if fmt in (None, "auto"):
        fmt = "console" if stream.isatty() else "journal" if journal else "json"
    render = {"console": structlog.dev.ConsoleRenderer(colors=False),
              "json": structlog.processors.JSONRenderer(),
              "journal": _journal_line}[fmt]
    if journal:
        render = _prefixed(render)
    stamp = [] if fmt == "journal" else [structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[structlog.processors.add_log_level, *stamp, render],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return fmt


def get():
    return structlog.get_logger("egress-agent")
