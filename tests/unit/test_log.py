"""The log's formats: journald gets each line's priority and the message first."""

from __future__ import annotations

import json
import os

import pytest
import structlog

from egress_agent import log


@pytest.fixture(autouse=True)
def _keep_the_suites_logging():
    """configure() is global: the rest of the suite logs as before this module."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _lines(tmp_path, monkeypatch, fmt, journal: bool, emit) -> tuple[str, list[str]]:
    path = tmp_path / "stderr"
    with open(path, "w+") as f:
        st = os.fstat(f.fileno())
        # systemd's JOURNAL_STREAM names the stream it gave; another stream is not journald
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino if journal else 1}")
        chosen = log.configure(fmt, stream=f)
        emit(log.get())
        f.seek(0)
        return chosen, f.read().splitlines()


def _emit(lg) -> None:
    lg.info("sync", trigger="config", workloads=["m42", "m43"], notes=None)
    lg.warning("drift repaired", found=["table egress_agent missing"])
    lg.error("config invalid", problem='x.yaml:3: "bad"')


def test_auto_on_journald_is_journal_with_priorities_and_the_message_first(tmp_path, monkeypatch):
    chosen, lines = _lines(tmp_path, monkeypatch, "auto", True, _emit)
    assert chosen == "journal"
    assert lines == ["<6>sync trigger=config workloads=m42,m43",
                     '<4>drift repaired found="table egress_agent missing"',
                     '<3>config invalid problem="x.yaml:3: \\"bad\\""']


def test_json_on_journald_keeps_json_behind_the_priority(tmp_path, monkeypatch):
    _, lines = _lines(tmp_path, monkeypatch, "json", True, _emit)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert json.loads(lines[1][3:])["found"] == ["table egress_agent missing"]


def test_auto_elsewhere_is_json_without_priorities(tmp_path, monkeypatch):
    chosen, lines = _lines(tmp_path, monkeypatch, "auto", False, _emit)
    assert chosen == "json"
    recs = [json.loads(line) for line in lines]
    assert [(r["event"], r["level"]) for r in recs] == [
        ("sync", "info"), ("drift repaired", "warning"), ("config invalid", "error")]
    assert all("timestamp" in r for r in recs)
