"""A fuzzer over the store files (issue 10: "a fuzzer over the config and the store").

Seeded (derandomized) and bounded. Mutants of a real allocations.json and
history.jsonl: truncation, byte flips, invalid UTF-8, any JSON node replaced by a
value of another type (huge numbers, floats, nesting), overlapping port blocks.

- `Store.load` returns valid allocations or raises StoreCorrupt, nothing else;
  after StoreCorrupt the reconciler quarantines the file and adopts the kernel;
- `who` (in process on every mutant, and as the CLI in a subprocess on a sample)
  never raises: exit 0/1/2, no traceback, within 5 s.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

from hypothesis import HealthCheck, event, given, settings, strategies as st

from egress_agent.alloc import Allocations
from egress_agent.nft.fake import FakeNft
from egress_agent.store import Store, StoreCorrupt, validate, who

from test_store import CONFIG, Host, reconciler, snat4  # one config, one set of fakes

from egress_agent.config import parse

SETTINGS = dict(derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
    | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from(["203.0.113.10", "2001:db8:10::100", "a1", "w0", "1024-2047", ""]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _replace(node, path, value):
    if not path:
        return value
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


@st.composite
def json_mutant(draw, doc):
    """`doc` with one node replaced, or two leases sharing a block."""
    doc = json.loads(json.dumps(doc))
    if draw(st.booleans()) and isinstance(doc, dict) and len(doc.get("leases", [])) > 1:
        i, j = draw(st.permutations(range(len(doc["leases"]))))[:2]
        doc["leases"][i].update(ipv4=doc["leases"][j]["ipv4"], ports=doc["leases"][j]["ports"])
        return json.dumps(doc).encode()
    path = draw(st.sampled_from(list(_paths(doc))))
    return json.dumps(_replace(doc, path, draw(json_values))).encode()


@st.composite
def byte_mutant(draw, raw: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "utf8", "splice"]))
    i = draw(st.integers(0, max(0, len(raw) - 1)))
    if kind == "truncate":
        return raw[:i]
    if kind == "flip":
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if kind == "utf8":
        return raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[i:]
    return raw[:i] + draw(st.sampled_from([b"9" * 5000, b"[" * 3000, b"1e999", b"NaN", b"\n"])) + raw[i:]


def _state(tmp_path_factory):
    """A state dir after three syncs (start, a failover, the way back); the config."""
    d = tmp_path_factory.mktemp("fuzz")
    cfg = parse(CONFIG.replace("version: 1\n", f"version: 1\nstate_dir: {d / 'state'}\n")).config
    from test_store import BOTH, ONLY_A2
    nft, host = FakeNft(), Host()
    rec = reconciler(cfg, nft, host)
    rec.sync(cfg)
    host.state = ONLY_A2
    rec.sync(cfg)
    host.state = BOTH
    rec.sync(cfg)
    store = Store(cfg.state_dir)
    return cfg, nft, store.allocations_path.read_bytes(), store.history_path.read_bytes()


_cache: dict = {}


def state(tmp_path_factory):
    if "s" not in _cache:
        _cache["s"] = _state(tmp_path_factory)
    return _cache["s"]


def mutants(raw: bytes):
    return st.one_of(byte_mutant(raw), json_mutant(json.loads(raw)))


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_load_raises_only_store_corrupt_and_quarantine_recovers(tmp_path_factory, data):
    cfg, nft, raw, _ = state(tmp_path_factory)
    mutant = data.draw(mutants(raw))
    d = tmp_path_factory.mktemp("s")
    cfg = cfg.model_copy(update={"state_dir": str(d)})
    store = Store(d)
    store.allocations_path.write_bytes(mutant)
    try:
        loaded = store.load()
    except StoreCorrupt as e:
        assert e.path == str(store.allocations_path) and e.reason
        event("corrupt")
    else:
        event("valid")
        assert validate(loaded.to_json(), "again") == loaded  # what loads is valid
        return
    kernel = FakeNft()
    kernel.table = copy.deepcopy(nft.table)  # the kernel as the last sync left it
    before = snat4(kernel)
    rec = reconciler(cfg, kernel)
    r = rec.sync(cfg, trigger="start")
    assert r.adopted and r.quarantined and not r.changed and snat4(kernel) == before
    assert store.load() == rec.alloc != Allocations()


def history_mutants(raw: bytes):
    lines = raw.splitlines(keepends=True)

    @st.composite
    def line_mutant(draw):
        i = draw(st.integers(0, len(lines) - 1))
        doc = json.loads(lines[i])
        return b"".join(lines[:i]) + draw(json_mutant(doc)) + b"\n" + b"".join(lines[i + 1:])
    return st.one_of(byte_mutant(raw), line_mutant())


QUERIES = [("203.0.113.10", 1500, None), ("203.0.113.11", 3000, None),
           ("2001:db8:10::100", None, None), ("203.0.113.10", 1024, "2026-01-01T00:00:00Z"),
           ("203.0.113.11", None, "2099-01-01T00:00:00+00:00")]


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_who_never_raises_on_a_mutated_history(tmp_path_factory, data):
    _, _, _, raw = state(tmp_path_factory)
    d = tmp_path_factory.mktemp("h")
    store = Store(d)
    store.history_path.write_bytes(data.draw(history_mutants(raw)))
    for addr, port, at in QUERIES:
        for h in who(store.history(), addr, port, at):
            assert h.workload and h.since


@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_who_cli_on_mutated_store_files(tmp_path_factory, data):
    """The CLI in a subprocess, as an operator runs it: exit 0/1/2, no traceback, < 5 s."""
    _, _, raw_alloc, raw_hist = state(tmp_path_factory)
    d = tmp_path_factory.mktemp("cli")
    Store(d).history_path.write_bytes(data.draw(history_mutants(raw_hist)))
    Store(d).allocations_path.write_bytes(data.draw(mutants(raw_alloc)))
    addr, port, at = data.draw(st.sampled_from(QUERIES))
    target = f"[{addr}]:{port}" if ":" in addr and port else f"{addr}:{port}" if port else addr
    argv = [sys.executable, "-m", "egress_agent.cli", "who", target, "--state-dir", str(d),
            "-c", str(d / "none.yaml"), *(["--at", at] if at else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=5,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode in (0, 1, 2), proc
    assert "Traceback" not in proc.stderr, proc.stderr
