"""A fuzzer over the config: mutants of the lab config and the design example, at
byte and token level. load() either succeeds or raises ConfigError whose every
line is FILE:LINE: reason; a sample goes through the real `egress-agent check`
in a subprocess: exit 0, 1 or 2, never a traceback, done within 5 s.

Deterministic: the hypothesis profile of tests/conftest.py derandomizes it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.config import MAX_BYTES, ConfigError, load

ROOT = Path(__file__).parent.parent.parent
SEEDS = {
    "demo": (ROOT / "egress_agent/lab/demo.yaml").read_bytes().replace(b"@PREFIX@", b"fuzz"),
    "design": (ROOT / "tests/configs/design.yaml").read_bytes(),
}
STATE = re.compile(rb"state_dir: .*")

_bomb = b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + b"".join(
    b"%c: &%c [" % (x, x) + b",".join([b"*%c" % y] * 9) + b"]\n"
    for x, y in zip(b"bcdefghi", b"abcdefgh"))

TOKENS = [
    b"[", b"{", b"]", b"}", b",", b"&a ", b"*a", b"&a [*a]", b"<<: *a\n", b"<<: {x: 1}\n",
    b"\t", b"\0", b"\x07", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\xe2\x80\xa8",
    b"\r", b"\n", b"  ", b"- ", b": ", b"? ", b"#", b"'", b'"', b"---\n", b"...\n", b"%YAML 1.1\n",
    b"9" * 5000, b"1e999", b"-1", b"0x1F", b"0o17", b"2001-13-45", b".nan", b"~", b"null",
    b"true", b"[]", b"{}", b"!!binary aGk=", b"!!python/object:os.system {}", b"!!timestamp x",
    b"[" * 60, b"{a: " * 40, b"{a: 1}: x\n", b"? [a]\n: b\n", _bomb,
    b"include: [fifo]\n", b"include: [zero]\n", b"include: [/dev/zero]\n",
    b"include: [missing.yaml]\n", b"include: [conf.d/*.yaml]\n", b"include: ['*/*.yaml']\n",
    b"include: [.]\n", b"include: [conf.d]\n", b"include: [big.yaml]\n", b"include: [bad.d/*]\n",
    b"include: [nodir/*.yaml]\n", b"include: {a: b}\n", b"include: [[x]]\n",
    b"version: 2\n", b"workloads: 5\n", b"egress_ips: {}\n", b"host: []\n",
    b"app: bilin", b"app: billing", b"source: [203.0.113.10]", b"managed_sources: [203.0.113.0/24]\n",
    b"ipv4: 2001:db8::1", b"ipv6: 10.0.0.0/8", b"ports: 0-70000", b"id: ''",
]
VALUES = [b"[]", b"{}", b"~", b"-1", b"99999999999999999999", b"1.5", b"true", b"'x'",
          b"[a, [b]]", b"{k: v}", b"\"\\u0000\"", b"*a", b"&a 1"]

_pos = st.floats(0, 1, exclude_max=True)
OPS = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("insert"), _pos, st.sampled_from(TOKENS), st.booleans()),
    st.tuples(st.just("duplicate-line"), _pos),
    st.tuples(st.just("delete"), _pos, st.integers(1, 200)),
    st.tuples(st.just("retype"), _pos, st.sampled_from(VALUES)),
)
MUTANTS = st.tuples(st.sampled_from(sorted(SEEDS)), st.lists(OPS, min_size=1, max_size=4))


def mutate(seed: str, ops, state_dir: str) -> bytes:
    data = STATE.sub(b"state_dir: " + state_dir.encode(), SEEDS[seed])
    for op in ops:
        at = int(op[1] * (len(data) + 1))
        start = data.rfind(b"\n", 0, at) + 1  # the line `at` falls in
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end
        if op[0] == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ op[2]]) + data[at + 1:]
        elif op[0] == "truncate":
            data = data[:at]
        elif op[0] == "insert":
            at = start if op[3] else at
            data = data[:at] + op[2] + data[at:]
        elif op[0] == "duplicate-line":  # duplicate keys, duplicate list items
            data = data[:end] + b"\n" + data[start:end] + data[end:]
        elif op[0] == "delete":
            data = data[:at] + data[at + op[2]:]
        elif op[0] == "retype":  # the value after a key's colon becomes another type
            colon = data.find(b": ", start, end)
            if colon >= 0:
                data = data[:colon + 2] + op[2] + data[end:]
    return data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Odd things an include: may name: a FIFO, a device, a directory, a huge file."""
    d = tmp_path_factory.mktemp("fuzz")
    os.mkfifo(d / "fifo")
    (d / "zero").symlink_to("/dev/zero")
    (d / "conf.d").mkdir()
    (d / "conf.d/10-web.yaml").write_text(
        "workloads:\n  - {id: web9, app: billing, source: [10.0.1.99]}\n")
    (d / "bad.d").mkdir()
    (d / "bad.d/x.yaml").write_bytes(b"workloads: [\xff]\n")
    os.mkfifo(d / "bad.d/y.yaml")
    with open(d / "big.yaml", "wb") as f:
        f.write(b"workloads: []\n#" + b"x" * MAX_BYTES + b"\n")
    (d / "state").mkdir()
    return d


def assert_config_error(e: ConfigError, allowed_files) -> None:
    assert e.problems
    for p in e.problems:
        line = str(p)
        assert "\n" not in line and re.match(r"[^:]+:\d+: \S", line), line
        assert p.file in allowed_files, line


@pytest.mark.timeout(600)
@settings(max_examples=2000)
@given(MUTANTS)
def test_load_of_a_mutant_succeeds_or_is_a_config_error(workdir, mutant):
    path = workdir / "config.yaml"
    path.write_bytes(mutate(*mutant, str(workdir / "state")))
    try:
        load(path)
    except ConfigError as e:
        fragments = {str(workdir / d / f) for d in ("conf.d", "bad.d")
                     for f in os.listdir(workdir / d)}
        assert_config_error(e, {str(path), *fragments, str(workdir / "big.yaml")})


@pytest.mark.timeout(600)
@settings(max_examples=40)
@given(MUTANTS)
def test_check_of_a_mutant_exits_0_1_or_2_without_a_traceback_in_5_s(workdir, mutant):
    path = workdir / "config-cli.yaml"
    path.write_bytes(mutate(*mutant, str(workdir / "state")))
    r = subprocess.run([sys.executable, "-m", "egress_agent.cli", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=5, cwd=workdir,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode in (0, 1, 2), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 1:
        assert all(re.match(r"[^:]+:\d+: \S", line) for line in r.stderr.splitlines()), r.stderr


@settings(max_examples=200)
@given(MUTANTS)
def test_the_shortcut_gives_the_same_answers_as_the_walk(mutant):
    from egress_agent import config
    text = mutate(*mutant, "/nonexistent/state").decode("utf-8", "replace")

    def outcome():
        try:
            return config.parse(text, "f.yaml").config
        except ConfigError as e:
            return str(e)

    with_shortcut = outcome()
    shortcut, config._plainly_bounded = config._plainly_bounded, lambda text: False
    try:
        assert outcome() == with_shortcut
    finally:
        config._plainly_bounded = shortcut
