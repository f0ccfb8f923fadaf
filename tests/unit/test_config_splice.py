"""config.Reader reads an edit of whole list entries alone (config._splice): after
random line edits of a file written in every style the fast path takes (flow and
block entries, comments, blank lines, quotes, a list at indent 0), and some it does
not (anchors, block scalars, tabs, other indents, top-level lines), a reload
equals a cold load(), or both refuse the config with the same problems."""

from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent import config
from egress_agent.config import ConfigError, Reader, load

BASE = """version: 1
host: {name: h, region: r}
defaults: {ports_per_workload: 64}
egress_ips:
  - {id: ip0, app: a, ipv4: 203.0.113.10, ipv6: "2001:db8:1::/64"}
  - id: ip1
    app: b
    ipv4: 203.0.113.11
# a comment at column 0
workloads:
  - {id: w0, app: a, source: [10.0.0.1]}
  - id: w1   # a comment
    app: b
    source:
    - 10.0.0.2
  - {id: w2, app: a, source: ["fd00::2"]}

  - {id: w3, app: b, source: [10.0.0.4]}
policies:
- name: p0
  match: {ports: [25]}
  egress: drop
- {name: p1, egress: default}
managed_sources: [10.0.0.0/8]
"""


def pool(n: int) -> list[str]:
    return [
        f"  - {{id: w{n}, app: a, source: [10.0.1.{n}]}}",
        f"  - {{id: w{n}, app: b, source: ['10.0.1.{n}']}}",
        f'  - {{id: w{n}, app: a, source: ["fd00::1:{n}"]}}',
        f"  - id: w{n}", "    app: a", f"    source: [10.0.2.{n}]", "    source:", f"    - 10.0.3.{n}",
        "  -", f"    id: w{n}", "  # a comment", "# a comment", "", "   ", "  - {id: w0, app: a, source: [10.0.0.1]}",
        f" - {{id: w{n}, app: a, source: [10.0.4.{n}]}}", f"   - {{id: w{n}, app: a, source: [10.0.4.{n}]}}",
        f"- {{id: w{n}, app: a, source: [10.0.5.{n}]}}", f"  - {{id: ip{n}, app: a, ipv4: 203.0.113.{n}}}",
        f"- {{name: p{n}, egress: drop}}", f"- name: p{n}", "  egress: default", "managed_sources: [10.0.0.0/8]",
        "workloads:", "policies:", '  - {id: "w9', '    x"}', "  - |", "  - &a {id: w7, app: a, source: [10.0.7.1]}",
        "  - *a", "---", "\t- {id: w8}", f"  - {{id: w{n}, app: a, source: [10.0.1.{n}]}}" + " " * 300,
        f"  - {{id: w\u00e9{n}, app: a, source: [10.0.1.{n}]}}", "  - {id: w5, app: a, source: [10.0.0.5]}  # c",
        "  - {id: w6, app: a, cgroup: a/b}", "  - {id: w6, app: a, source: [10.0.0.6]} - {id: x}",
        "  - [1, 2]", "  - 17", "  - {id: w4, app: yes, source: [10.0.0.9]}", "  - {id: w4, app: a, source: [10.0.0.1]}",
    ]


EDIT = st.tuples(st.sampled_from(["insert", "delete", "replace", "duplicate", "mutate"]),
                 st.integers(0, 60), st.integers(0, 60), st.integers(0, 400))


def outcome(fn):
    try:
        loaded = fn()
    except ConfigError as e:
        return ("error", str(e))
    return ("config", loaded.config.model_dump())


def apply(lines: list[str], edit) -> list[str]:
    op, at, choice, n = edit
    lines = list(lines)
    at = at % (len(lines) + 1)
    options = pool(n)
    if op == "insert":
        lines.insert(at, options[choice % len(options)])
    elif lines and op == "delete":
        del lines[at % len(lines)]
    elif lines and op == "replace":
        lines[at % len(lines)] = options[choice % len(options)]
    elif lines and op == "duplicate":
        lines.insert(at, lines[at % len(lines)])
    elif lines and op == "mutate":
        line = lines[at % len(lines)]
        if line:
            i = choice % len(line)
            lines[at % len(lines)] = line[:i] + "0ab:-# "[n % 7] + line[i + 1:]
    return lines


SPLICED = [0, 0]  # edits read alone, reloads: that the property is not vacuous


@settings(max_examples=300, deadline=None)
@given(st.lists(EDIT, min_size=1, max_size=8))
def test_a_reload_after_random_line_edits_equals_a_cold_load(tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("s") / "c.yaml"
    lines = BASE.splitlines()
    path.write_text(BASE)
    reader = Reader()
    assert outcome(lambda: reader.load(path)) == outcome(lambda: load(path))
    for edit in edits:
        lines = apply(lines, edit)
        path.write_text("\n".join(lines) + "\n")
        before = reader.spliced
        assert outcome(lambda: reader.load(path)) == outcome(lambda: load(path)), (edit, path.read_text())
        SPLICED[0] += reader.spliced - before
        SPLICED[1] += 1


def test_the_random_edits_above_were_mostly_read_alone():
    if SPLICED[1] < 100:  # run alone: run the property first
        test_a_reload_after_random_line_edits_equals_a_cold_load()
    # most random edits break the file (then the next compares with the last good one)
    assert SPLICED[0] > SPLICED[1] // 20, SPLICED


def test_one_added_and_one_removed_workload_are_read_alone_and_keep_every_other_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    reader = Reader()
    first = reader.load(path).config
    added = BASE.replace("\npolicies:", "\n  - {id: w9, app: a, source: [10.0.0.9]}\npolicies:")
    path.write_text(added)
    second = reader.load(path).config
    assert reader.spliced == 1 and second == load(path).config
    assert [w.id for w in second.workloads] == ["w0", "w1", "w2", "w3", "w9"]
    assert all(a is b for a, b in zip(first.workloads, second.workloads))
    path.write_text(BASE.replace("  - {id: w2, app: a, source: [\"fd00::2\"]}\n", ""))
    third = reader.load(path).config
    assert reader.spliced == 2 and third == load(path).config
    assert [w.id for w in third.workloads] == ["w0", "w1", "w3"]
    assert third.workloads[2] is first.workloads[3]


def test_an_edit_outside_the_lists_or_across_two_of_them_reads_the_whole_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    reader = Reader()
    reader.load(path)
    for text in (BASE.replace("ports_per_workload: 64", "ports_per_workload: 32"),
                 BASE.replace("    ipv4: 203.0.113.11\n", "    ipv4: 203.0.113.12\n").replace(
                     "source: [10.0.0.4]", "source: [10.0.0.5]")):
        path.write_text(text)
        assert reader.load(path).config == load(path).config
    assert reader.spliced == 0


def test_an_edit_inside_a_block_entry_reads_that_entry(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    reader = Reader()
    reader.load(path)
    read = []
    real = config._ryml_data
    monkeypatch.setattr(config, "_ryml_data", lambda text: read.append(text) or real(text))
    path.write_text(BASE.replace("    - 10.0.0.2\n", "    - 10.0.0.3\n"))
    assert reader.load(path).config == load(path).config
    assert reader.spliced == 1
    assert read[0] == "workloads:\n  - id: w1   # a comment\n    app: b\n    source:\n    - 10.0.0.3\n"


@settings(max_examples=300, deadline=None)
@given(st.text("ab\n", max_size=40), st.integers(0, 9000), st.lists(
    st.tuples(st.booleans(), st.integers(0, 10**6), st.sampled_from("abx\n")), max_size=3))
def test_the_common_prefix_and_suffix_are_those_of_a_plain_walk(head, pad, edits):
    a = head + "x" * pad  # long enough for the block comparisons and the bisection
    b = list(a)
    for delete, at, c in edits:
        if delete and b:
            del b[at % len(b)]
        else:
            b.insert(at % (len(b) + 1), c)
    b = "".join(b)
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    assert config._common_prefix(a, b) == p
    limit, s = min(len(a), len(b)) - p, 0
    while s < limit and a[-1 - s] == b[-1 - s]:
        s += 1
    assert config._common_suffix(a, b, limit) == s
