"""The fast YAML path (rapidyaml, config._ryml_data) gives the data of the
line-tracking path (libyaml, config._read_yaml) whenever it answers, and declines
(None) whenever the line-tracking path refuses the text; random documents in
block and flow style, with YAML 1.1's odd scalars, plain and quoted, the
fixtures and the generated benchmark configs."""

import glob
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent import config
from egress_agent.config import ConfigError, _read_data, _read_yaml, _ryml_data

ROOT = Path(__file__).parent.parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from gen_config import config_text  # noqa: E402


def typed(x):
    """Data with its types spelled out (True is not 1, 1 is not 1.0) and key order kept."""
    if isinstance(x, dict):
        return ("map", [(typed(k), typed(v)) for k, v in x.items()])
    if isinstance(x, list):
        return ("seq", [typed(v) for v in x])
    return (type(x).__name__, repr(x))


def slow(text):
    return _read_yaml(text, "f.yaml")[0]


# Scalars as a config writer might type them, and the ones YAML 1.1 reads oddly.
SCALARS = [
    "app", "w1", "billing-prod", "10.0.0.1", "203.0.113.10", "2001:db8::1", "10.0.0.0/8",
    "2001:db8:10::/64", "1024-65535", "443", "0", "-1", "+12", "1.5", "-0.0", "1e3", "1.0e+3",
    "1E5", ".5", "1.", "017", "0o17", "0x1F", "0b101", "1_000", "1:30", "190:20:30.15", ".inf",
    "-.Inf", ".nan", "NaN", "Infinity", "yes", "No", "ON", "off", "y", "n", "true", "False",
    "TRUE", "~", "null", "Null", "NULL", "2001-01-01", "2001-12-14t21:59:43.10-05:00", "<<",
    "=", "system.slice/cron.service", "a b c", "x:y", "a/b", "x-", "-x", "_", "a.b",
    "99999999999999999999", "0.1.2", "12:", "'quoted'", '"dq: yes"', "'yes'", "a#b",
    "-.5", "+.5", ".5e3", ".5e+3", "-.5e+3", "5.", "-1.", "0.", "-0.", "00.5", "1e+3", "1.5e3",
    "0.5e-3", "0.8", "1.0",
]
KEYS = ["id", "app", "source", "ipv4", "ports", "dns", "yes", "1", "null", "~", "x y", "1.5", "on"]

# Quoted scalars: always strings, whatever they would be plain, with what a plain
# scalar may not hold, escapes, and some that are not one scalar or not YAML at all.
QUOTED = [
    r'"2001:db8::1"', r"'10.0.0.1'", r'"fd00:1::/64"', r'"yes"', r"'no'", r'"1"', r"'1.5'",
    r'"null"', r"'~'", r'"0x10"', r"'017'", r'"1_000"', r'"2001-01-01"', r'".inf"', r'"<<"',
    r"'='", r'""', r"''", r'"#"', r"'#'", r'"a # b"', r"' #'", r'": "', r"'x: y'", r'"[a, b]"',
    r"'{a: b}'", r'"*a"', r"'&a'", r'"!x"', r'"? x"', r'"- x"', r"'|'", r'"%x"', r'"@x"',
    r'"`x`"', r'" lead"', r"'trail '", r'"\\"', r'"a\"b"', r'"it\"s"', r"'it''s'", r"''''",
    r"""'"'""", r'''"'"''', r"'a\b'", r'"\t\n"', r'"\u00e9"', r'"\x41\x7f"', r'"\N\_\L\P"',
    r'"\/"', r'"\ "', r'"\0"', r'"\ud800"', r'"\q"', r'"\x4"', r'"_q_0"', r"'_q_1'",
    r'"open', r"'open", r'"a"b', r"'a'b", r'"a""b"', r"'a' 'b'", r"'a'#c",
]
_TEXT = st.text(st.sampled_from(" abcxy01:#,-[]{}'\"\\*&!?|>%@`~"), max_size=8)
quoted = st.one_of(
    st.sampled_from(QUOTED),
    _TEXT.map(lambda t: "'" + t.replace("'", "''") + "'"),
    _TEXT.map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    _TEXT.map(lambda t: '"' + t + '"'))  # stray backslashes and quotes too

COMMON = SCALARS[:9]  # what configs mostly hold: drawn more often, so most documents take the fast path
scalars = st.one_of(st.sampled_from(COMMON), st.sampled_from(COMMON), st.sampled_from(SCALARS),
                    st.sampled_from(QUOTED[:3]), quoted)
keys = st.one_of(st.sampled_from(KEYS[:6]), st.sampled_from(KEYS[:6]), st.sampled_from(KEYS[:6]),
                 st.sampled_from(KEYS), quoted)
docs = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12)


def render(value, indent: int, flow: bool, styles) -> str:
    """YAML text of a generated value: each collection block or flow as drawn."""
    if isinstance(value, str):
        return value
    if flow or next(styles):
        if isinstance(value, list):
            return "[" + ", ".join(render(v, 0, True, styles) for v in value) + "]"
        return "{" + ", ".join(f"{k}: {render(v, 0, True, styles)}" for k, v in value.items()) + "}"
    pad = " " * indent
    if not value:
        return "[]" if isinstance(value, list) else "{}"
    lines = []
    for k, v in (enumerate(value) if isinstance(value, list) else value.items()):
        head = f"{pad}- " if isinstance(value, list) else f"{pad}{k}:"
        inner = render(v, indent + 2, False, styles)
        if isinstance(v, (list, dict)) and v and not inner.startswith(("[", "{")):
            lines.append(head.rstrip() + "\n" + inner)
        else:
            lines.append((head if head.endswith(" ") else head + " ") + inner)
    return "\n".join(lines)


@settings(max_examples=400)
@given(st.dictionaries(keys, docs, min_size=1, max_size=5),
       st.lists(st.booleans(), min_size=50, max_size=50), st.booleans())
def test_the_fast_path_gives_the_line_tracking_data_or_declines(doc, style_bits, comments):
    styles = iter(style_bits * 20)
    text = render(doc, 0, False, styles) + "\n"
    if comments:
        text = "# generated\n" + text.replace("\n", "  # note\n", 1)
    fast = _ryml_data(text)
    try:
        reference = slow(text)
    except ConfigError:
        assert fast is None, f"rapidyaml took text libyaml refuses:\n{text}"
        return
    if fast is not None:
        assert typed(fast) == typed(reference), text


@pytest.mark.parametrize("token", SCALARS + QUOTED)
@pytest.mark.parametrize("form", ["key: {t}\n", "{t}: v\n", "k: [{t}, x]\n", "k: {{a: {t}}}\n",
                                  "k:\n  - {t}\n", "k: {t}  # {t}\n", "k: [x,{t}]\n",
                                  "k: {{{t}: {t}}}\n", "k: a, {t}\n", "k: a\n  {t}\n", "k: [x {t}]\n",
                                  "# {t}\nk: {t}\n"])
def test_each_odd_scalar_reads_as_yaml_1_1_does(token, form):
    text = form.format(t=token)
    fast = _ryml_data(text)
    try:
        reference = slow(text)
    except ConfigError:
        assert fast is None
        return
    assert fast is None or typed(fast) == typed(reference), text


def lab_config() -> str:
    """The lab's config as `egress-agent lab up` writes it: quoted IPv6, comments."""
    return (ROOT / "egress_agent/lab/demo.yaml").read_text().replace("@PREFIX@", "eal0")


def test_the_lab_config_with_its_quoted_ipv6_takes_the_fast_path():
    """Its quotes do not decline it (and no flow mapping of it spans lines, which
    would: _plainly_bounded bounds the depth line by line)."""
    text = lab_config()
    assert '"2001:db8:10::/64"' in text
    fast = _ryml_data(text)
    assert fast is not None and typed(fast) == typed(slow(text))
    spanning = text.replace("    via: {dev: up1, gateway: 203.0.113.129}",
                            "    via: {dev: up1,\n          gateway: 203.0.113.129}")
    assert _ryml_data(spanning) is None and typed(slow(spanning)) == typed(slow(text))


def test_a_quoted_configs_problem_is_still_at_its_file_and_line(tmp_path):
    """The fast path keeps no lines; a problem found in its data is placed by
    reading again with them."""
    p = tmp_path / "c.yaml"
    p.write_text(config_text(5, ipv6=True).replace('"fd00::103"', '"fd00::zz"'))
    assert _ryml_data(p.read_text()) is not None
    with pytest.raises(ConfigError) as e:
        config.load(p)
    [problem] = e.value.problems
    assert (problem.file, problem.line, problem.path) == (str(p), 11, "workloads[3].source[1]")
    assert "'fd00::zz'" in problem.message


def fixtures():
    return sorted({*glob.glob(str(ROOT / "tests/**/*.yaml"), recursive=True),
                   *glob.glob(str(ROOT / "egress_agent/lab/*.yaml")),
                   str(ROOT / "packaging/config.example.yaml")})


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_fixture_reads_the_same_on_both_paths(path):
    text = Path(path).read_text(errors="surrogateescape")
    try:
        reference = slow(text)
    except ConfigError:
        return  # a fixture of a bad file: the error path is the line-tracking one
    fast = _ryml_data(text)
    assert fast is None or typed(fast) == typed(reference)
    assert typed(_read_data(text, path, with_lines=False)[0]) == typed(reference)


@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("ipv6", [False, True])
def test_the_generated_configs_take_the_fast_path_with_the_same_data(n, ipv6):
    text = config_text(n, ipv6=ipv6)
    assert ('"' in text) == ipv6
    fast = _ryml_data(text)
    assert fast is not None
    assert typed(fast) == typed(slow(text))


@pytest.mark.parametrize("text", [
    "version: 1\nhost: @x\n",        # reserved character: rapidyaml takes it
    "version: 1\nhost: ]\n",         # a stray bracket: rapidyaml takes it as a string
    ": a\nversion: 1\n",             # an empty key
    "---\nversion: 1\n---\nb: 2\n",  # two documents
    "version: 1\n...\nb: 2\n",
])
def test_text_only_rapidyaml_accepts_is_a_syntax_error_at_its_line(text):
    assert _ryml_data(text) is None
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.yaml")
    assert "YAML syntax" in str(e.value) or "expected" in str(e.value)


def test_rapidyaml_reports_stay_off_stderr_and_other_writes_pass(monkeypatch, capfd):
    def noisy(data):
        os.write(2, b"another thread's log line\n")
        os.write(2, b"line=1 col=7 (6B): ERROR: [parse] two colons on same line\n"
                    b"/project/cpp/src/c4/yml/parse_engine.def.hpp:4335: (detected here)\n")
        raise RuntimeError("refused")
    monkeypatch.setattr(config, "_ryml_json", noisy)
    assert config._quiet_ryml_json(b"a: b: c\n") is None
    assert capfd.readouterr().err == "another thread's log line\n"


def test_a_syntax_error_prints_only_the_agents_own_problem(tmp_path, capfd):
    p = tmp_path / "c.yaml"
    p.write_text("version: 1\nhost: {name: a: b}\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert f"{p}:2: YAML syntax" in str(e.value)
    assert capfd.readouterr().err == ""


def test_with_no_memory_file_nor_stderr_the_fast_path_still_reads(monkeypatch):
    def no_file():
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(config, "_spill_file", no_file)
    assert json.loads(config._quiet_ryml_json(b"a: [1, b]\n")) == {"a": [1, "b"]}
    assert config._quiet_ryml_json(b"a: b: c\n") is None


@pytest.mark.parametrize("text", [
    "a: {ports:}\n", "a: [x:, y]\n", "a: {b: c:}\n", "a: [:x]\n", "a: {b: x, :y}\n", ":x: 1\n",
    "a: {b: dest?inations}\n", "a: {b: to? -x}\n", "? a\n: b\n",
    "...\nversion: 1\n",  # rapidyaml skips a document end before the first document
    "a:\n  - {x: 1}  - {y: 2}\n",  # two entries on one line: rapidyaml reads both
])
def test_what_yaml_1_1_and_rapidyaml_read_apart_in_flow_collections_declines(text):
    """Found by mutating configs: in a flow collection YAML 1.1 (PyYAML) ends a plain
    scalar at `:` before `, [ ] { }` and at `?`; rapidyaml reads on."""
    assert _ryml_data(text) is None


PIECES = SCALARS + QUOTED + [" ", "\n", ":", ": ", "- ", "  ", ",", "[", "]", "{", "}", "#", " #",
                             "?", ":x", "x:", "{a: b}", "[a, b]", "\n  - ", "~", "---\n", "...\n",
                             '"', "'", "\\", "''"]
MUTATION = st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(["insert", "delete", "line"]),
                     st.one_of(st.sampled_from(PIECES), st.sampled_from([":", ":x", "?", "x:"])),
                     st.integers(1, 10))


def _seeds() -> list[str]:
    data = yaml.safe_load(config_text(4, ipv6=True))
    return [config_text(3), config_text(3, ipv6=True), lab_config(),
            yaml.safe_dump(data, default_flow_style=False, sort_keys=False),
            yaml.safe_dump(data, default_flow_style=None, sort_keys=False, indent=4),
            yaml.safe_dump(data, default_flow_style=None, sort_keys=False, default_style="'"),
            yaml.safe_dump(data, default_flow_style=True, sort_keys=False, default_style='"')]


@settings(max_examples=1000)
@given(st.sampled_from(_seeds()), st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_configs_read_the_same_or_decline(text, mutations):
    """Mutants of a generated config, in flow and block style (this found the
    flow-collection and document-marker cases above)."""
    for at, op, piece, k in mutations:
        i = int(at * (len(text) + 1))
        if op == "insert":
            text = text[:i] + piece + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + k:]
        else:
            lines = text.split("\n")
            lines.insert(int(at * len(lines)), lines[k % len(lines)])
            text = "\n".join(lines)
    fast = _ryml_data(text)
    try:
        reference = slow(text)
    except ConfigError:
        assert fast is None, text
        return
    assert fast is None or typed(fast) == typed(reference), text


@pytest.mark.parametrize("source, column, message", [
    ("[10.0.0.0/24]", 38, "'10.0.0.0/24' is a network; a workload source is one address"),
    ("[x]", 38, "'x' is not an address or prefix like 192.0.2.0/24 or 2001:db8::/32"),
    ("[123]", 38, "Input should be a valid string"),
    ("[10.0.0.1, 300.0.0.1]", 48, "'300.0.0.1' is not an address or prefix"),
])
def test_a_bad_source_is_one_problem_as_the_python_validator_words_it(source, column, message):
    """Canonical IPv4 sources are checked by pydantic-core's regex; anything else by
    _host_address, whose error alone is reported (one problem, not one per branch)."""
    with pytest.raises(ConfigError) as e:
        config.parse("version: 1\nhost: {name: a, region: r}\n"
                     "egress_ips: [{id: i, app: a, ipv4: 203.0.113.1}]\n"
                     f"workloads: [{{id: w, app: a, source: {source}}}]\n", "f.yaml")
    [p] = e.value.problems
    assert (p.line, p.column, p.path) == (4, column, f"workloads[0].source[{source.count(',')}]")
    assert p.message.startswith(message)


def test_sources_keep_their_canonical_form():
    cfg = config.parse("version: 1\nhost: {name: a, region: r}\n"
                       "egress_ips: [{id: i, app: a, ipv4: 203.0.113.1}]\n"
                       "workloads: [{id: w, app: a, source: [10.0.0.1, 10.0.0.2/32, '2001:db8::1/128']}]\n"
                       ).config
    assert cfg.workloads[0].source == ["10.0.0.1", "10.0.0.2", "2001:db8::1"]
