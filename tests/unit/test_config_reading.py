"""Hostile config files: each is refused with FILE:LINE: reason, never another
exception, a hang or unbounded memory (the daemon and `check` read the same way)."""

import os
import shutil
from pathlib import Path

import pytest

from egress_agent import config
from egress_agent.cli import main
from egress_agent.config import ConfigError, load, watched_paths

HEAD = "version: 1\nhost: {name: h, region: ams}\n"
OK = HEAD + "egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1}\n"


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def refused(path):
    """The one problem load() reports for `path`."""
    with pytest.raises(ConfigError) as e:
        load(path)
    assert len(e.value.problems) == 1, str(e.value)
    return e.value.problems[0]


def alias_bomb() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for x, y in zip("bcdefghi", "abcdefgh"):
        text += f"{x}: &{x} [" + ",".join([f"*{y}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize("name, data, line, words", [
    ("nested", HEAD + "workloads: " + "[" * 500 + "\n", 3, "nested more than 32 levels deep"),
    ("very-nested", HEAD + "x: " + "[" * 200_000 + "]" * 200_000 + "\n", 3, "nested more than 32"),
    ("block-nested", HEAD + "".join("  " * i + f"k{i}:\n" for i in range(40)), 35, "nested more than"),
    ("bad-byte", (HEAD + "# caf\xe9\n").encode("latin-1"), 3, "byte 0xe9 at column 6 is not UTF-8"),
    ("ff", HEAD.encode() + b"\xff", 3, "byte 0xff at column 1 is not UTF-8"),
    ("alias-bomb", alias_bomb(), 7, "aliases expand the file to more than 4,000,000 values"),
    ("self-alias", HEAD + "x: &a [1, *a]\n", 3, "alias *a names no complete anchor"),
    ("unknown-alias", HEAD + "x: *nope\n", 3, "alias *nope names no complete anchor"),
    ("nul", HEAD + "x: a\0b\n", 3, "YAML syntax: character #x0000: control characters"),
    ("tab", HEAD + "x:\n\t- a\n", 4, "YAML syntax:"),
    ("bad-date", HEAD + "x: 2001-13-45\n", 3, "cannot read the value '2001-13-45': month must be"),
    ("huge-int", HEAD + "x: " + "9" * 5000 + "\n", 3, "Exceeds the limit (4300 digits)"),
    ("list-key", HEAD + "? [a, b]\n: c\n", 3, "a key must be a plain name"),
    ("map-key", HEAD + "{a: 1}: c\n", 3, "a key must be a plain name"),
    ("tag", HEAD + "x: !!timestamp soon\n", 3, "tag 'tag:yaml.org,2002:timestamp' is not part"),
    ("python-tag", HEAD + "x: !!python/object:os.system {}\n", 3, "is not part of this config"),
])
def test_hostile_file_is_one_problem_at_its_line(tmp_path, name, data, line, words):
    p = write(tmp_path / f"{name}.yaml", data)
    problem = refused(p)
    assert (problem.file, problem.line) == (str(p), line), str(problem)
    assert words in problem.message, str(problem)


def test_too_big_a_file_is_refused_after_reading_limit_plus_one_bytes(tmp_path):
    p = write(tmp_path / "big.yaml", OK + "#" * config.MAX_BYTES + "\n")
    problem = refused(p)
    assert (problem.file, problem.line) == (str(p), 0)
    assert "larger than 16,777,216 bytes" in problem.message


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: os.symlink("/dev/zero", p), "a character device"),
])
def test_a_config_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, make, kind):
    p = tmp_path / "config.yaml"
    make(p)
    problem = refused(p)
    assert (problem.file, problem.line) == (str(p), 0)
    assert problem.message == f"cannot read: {kind}, not a regular file"


def test_a_symlinked_config_still_works(tmp_path):
    target = write(tmp_path / "real/config.yaml", OK)
    link = tmp_path / "config.yaml"
    link.symlink_to(target)
    assert load(link).config.egress_ips[0].ipv4 == "203.0.113.1"


@pytest.mark.parametrize("entry, make, words", [
    ("/dev/zero", None, "cannot read /dev/zero: a character device, not a regular file"),
    ("fifo.yaml", lambda p: os.mkfifo(p), "fifo.yaml: a FIFO, not a regular file"),
    ("conf.d", lambda p: p.mkdir(), "conf.d: a directory, not a regular file"),
    ("gone.yaml", None, "gone.yaml does not exist; create it or remove it from include:"),
    ("dangling.yaml", lambda p: p.symlink_to("nowhere"), "dangling.yaml: No such file or directory"),
    ("nodir/*.yaml", None, "the directory"),
    ("'*/x.yaml'", None, "only the file name may hold * ? or [...]"),
])
def test_an_include_that_cannot_be_read_is_reported_at_its_line(tmp_path, entry, make, words):
    main = write(tmp_path / "config.yaml", OK + "# fragments:\ninclude:\n  - " + entry + "\n")
    if make:
        make(tmp_path / entry)
    problem = refused(main)
    assert (problem.file, problem.line, problem.path) == (str(main), 7, "include[0]"), str(problem)
    assert words in problem.message, str(problem)


def test_a_glob_that_matches_nothing_includes_nothing(tmp_path):
    (tmp_path / "conf.d").mkdir()
    main = write(tmp_path / "config.yaml", OK + "include: [conf.d/*.yaml]\n")
    assert load(main).files == (str(main),)


def test_includes_share_the_size_limit_with_the_main_file(tmp_path):
    main = write(tmp_path / "config.yaml", OK + "include: [conf.d/*.yaml]\n")
    write(tmp_path / "conf.d/a.yaml", "workloads: []\n#" + "x" * (config.MAX_BYTES // 2) + "\n")
    write(tmp_path / "conf.d/b.yaml", "workloads: []\n#" + "x" * (config.MAX_BYTES // 2) + "\n")
    problem = refused(main)
    assert (problem.file, problem.line) == (str(main), 5)
    assert "cannot read" in problem.message and "b.yaml: larger than" in problem.message


def test_a_bad_byte_in_an_include_names_the_included_file_and_line(tmp_path):
    main = write(tmp_path / "config.yaml", OK + "include: [conf.d/*.yaml]\n")
    frag = write(tmp_path / "conf.d/web.yaml", b"workloads: []\n\n# \xc3\x28\n")
    problem = refused(main)
    assert (problem.file, problem.line) == (str(frag), 3)
    assert "byte 0xc3 at column 3 is not UTF-8" in problem.message


def test_a_hostile_include_is_caught_by_the_same_bounds(tmp_path):
    main = write(tmp_path / "config.yaml", OK + "include: [conf.d/*.yaml]\n")
    frag = write(tmp_path / "conf.d/web.yaml", "workloads:\n" + alias_bomb())
    problem = refused(main)
    assert (problem.file, problem.line) == (str(frag), 8)
    assert "aliases expand" in problem.message


@pytest.mark.parametrize("data", [HEAD + "include: " + "[" * 500, "\xff", alias_bomb()])
def test_watched_paths_reads_through_the_same_bounds(tmp_path, data):
    p = write(tmp_path / "config.yaml", data.encode("latin-1") if data == "\xff" else data)
    assert watched_paths(str(p)) == {str(tmp_path): "config.yaml"}


def test_check_answers_a_fifo_and_dev_zero_include_with_exit_1(tmp_path, capsys):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert main(["check", "-c", str(fifo)]) == 1
    assert capsys.readouterr().err == f"{fifo}:0: cannot read: a FIFO, not a regular file\n"
    inc = write(tmp_path / "config.yaml", OK + "include: [/dev/zero]\n")
    assert main(["check", "-c", str(inc)]) == 1
    assert capsys.readouterr().err == (f"{inc}:5: include[0]: cannot read /dev/zero: a "
                                       "character device, not a regular file\n")


def test_a_huge_value_is_quoted_short(tmp_path):
    p = write(tmp_path / "config.yaml", HEAD + "egress_ips:\n  - {id: a, app: x, ipv4: '"
              + "9" * 100_000 + "'}\nversion_: [" + ",".join(["1"] * 10_000) + "]\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert [(q.line, q.path) for q in e.value.problems] == [(4, "egress_ips[0].ipv4"),
                                                           (5, "version_")]
    assert all(len(str(q)) < 400 for q in e.value.problems), str(e.value)[:1000]


def test_a_wrong_type_in_the_main_file_is_reported_even_with_includes(tmp_path):
    main = write(tmp_path / "config.yaml", OK + "include: [conf.d/*.yaml]\nworkloads: {}\n")
    write(tmp_path / "conf.d/web.yaml", "workloads:\n  - {id: w, app: x, source: [10.0.0.2]}\n")
    problem = refused(main)
    assert (problem.file, problem.line, problem.path) == (str(main), 6, "workloads"), str(problem)


# --- the shortcut: text whose characters alone show it is within the bounds --------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import yaml  # noqa: E402

from egress_agent.config import MAX_NODES, _plainly_bounded  # noqa: E402


def measured(text: str) -> tuple[int, int, int, int]:
    """(depth, nodes, aliases, tags) of the events libyaml gives before any error."""
    depth = deepest = nodes = aliases = tags = 0
    try:
        for ev in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                deepest = max(deepest, depth)
            elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            aliases += isinstance(ev, yaml.AliasEvent)
            nodes += isinstance(ev, (yaml.NodeEvent))
            tags += getattr(ev, "tag", None) not in (None, "!")
    except yaml.YAMLError:
        pass
    return deepest, nodes, aliases, tags


PIECES = ["[", "]", "{", "}", ",", ", ", ": ", ":", "- ", "? ", "\n", "  ", "a", "b1", "#",
          " #", "# ", "x]", "y[", "|\n", ">\n", "&a ", "---\n", "\t", "[[", "]]", "- - "]


@settings(max_examples=2000)
@given(st.lists(st.sampled_from(PIECES), max_size=80))
def test_the_shortcut_is_sound(pieces):
    text = "".join(pieces)
    if _plainly_bounded(text):
        depth, nodes, aliases, tags = measured(text)
        longest = max(map(len, text.split("\n")))
        assert depth <= 3 * (longest + 1) and nodes <= MAX_NODES and not aliases and not tags, text


@pytest.mark.parametrize("text", [
    "a: [b,#]\n" * 5 + "c: d\n",          # a '#' glued to a token starts a comment in libyaml
    "a: [b, c # ]\n d]\n",                # a flow that spans lines
    "x]: [b]\n", "a: 'x'\n", "a: *b\n", "a: !!str b\n", "a: [b]\r\n",
    "a: " + "[" * 200 + "]" * 200 + "\n",  # a line over 300 characters
])
def test_the_shortcut_declines(text):
    assert not _plainly_bounded(text)


def test_the_shortcut_takes_the_generated_configs(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent.parent / "bench"))
    from gen_config import config_text
    assert _plainly_bounded(config_text(1000))


def test_nesting_the_shortcut_lets_through_is_still_refused(tmp_path):
    p = write(tmp_path / "config.yaml", HEAD + "x:\n" + "- " * 140 + "[" * 7 + "]" * 7 + "\n")
    assert _plainly_bounded(p.read_text())
    problem = refused(p)
    assert (problem.line, problem.message) == (4, "nested more than 32 levels deep")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="reading as another user takes root and setpriv (CI has both)")
def test_an_include_this_user_may_not_read_is_reported_at_its_line():
    import subprocess
    import sys
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="egress-include-"))  # outside pytest's 0700 tmp
    try:
        d.chmod(0o755)
        main = write(d / "config.yaml", OK + "include: [secret.yaml]\n")
        main.chmod(0o644)
        write(d / "secret.yaml", "workloads: []\n").chmod(0o600)
        code = ("from egress_agent.config import load, ConfigError\n"
                f"try: load({str(main)!r})\n"
                "except ConfigError as e: print(e)\n")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, cwd=Path(__file__).parent.parent.parent)
        assert r.stdout == (f"{main}:5: include[0]: cannot read {d}/secret.yaml: "
                            "Permission denied\n"), r.stdout + r.stderr
    finally:
        shutil.rmtree(d)
