"""config.Reader, the daemon's reloads: after random edits of include: fragments
(and of the main file) its result equals a cold load(), or both refuse the config
with the same problems; an unchanged file is not parsed again and an unchanged
entry keeps its validated model."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent import config
from egress_agent.config import ConfigError, Reader, load

HEAD = """version: 1
host: {name: h, region: r}
egress_ips:
  - {id: ip0, app: a, ipv4: 203.0.113.10}
  - {id: ip1, app: b, ipv4: 203.0.113.11}
include: [conf.d/*.yaml]
"""


def workload(i: int, app: str = "a", bad: bool = False) -> str:
    src = "10.0.300.1" if bad else f"10.0.{i // 250}.{i % 250 + 1}"
    return f"  - {{id: w{i}, app: {app}, source: [{src}]}}\n"


def write_fragment(d, name: str, ids: list[int], app: str = "a", bad: int = -1) -> None:
    text = "workloads:\n" + "".join(workload(i, app, i == bad) for i in ids) if ids else "workloads: []\n"
    path = d / "conf.d" / name
    path.write_text(text)


def outcome(fn):
    try:
        loaded = fn()
    except ConfigError as e:
        return ("error", str(e))
    return ("config", loaded.config.model_dump(), loaded.files)


def make(tmp_path, fragments=3, per=4):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "c.yaml").write_text(HEAD)
    for f in range(fragments):
        write_fragment(tmp_path, f"{f:02}.yaml", list(range(f * 100, f * 100 + per)))
    return tmp_path / "c.yaml"


EDITS = st.one_of(
    st.tuples(st.just("rewrite"), st.integers(0, 3), st.lists(st.integers(0, 399), max_size=6, unique=True),
              st.sampled_from(["a", "b", "nobody"]), st.integers(-1, 399)),
    st.tuples(st.just("touch"), st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, 3)),
    st.tuples(st.just("main"), st.booleans()),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(EDITS, min_size=1, max_size=8))
def test_a_reload_after_random_edits_equals_a_cold_load(tmp_path_factory, edits):
    path = make(tmp_path_factory.mktemp("c"))
    d = path.parent
    reader = Reader()
    assert outcome(lambda: reader.load(path)) == outcome(lambda: load(path))
    for edit in edits:
        frag = d / "conf.d" / f"{edit[1]:02}.yaml" if edit[0] != "main" else None
        if edit[0] == "rewrite":
            write_fragment(d, frag.name, edit[2], edit[3], edit[4])
        elif edit[0] == "touch" and frag.exists():
            frag.write_text(frag.read_text())
        elif edit[0] == "remove" and frag.exists():
            frag.unlink()
        elif edit[0] == "main":
            path.write_text(HEAD + ("defaults: {ports_per_workload: 512}\n" if edit[1] else ""))
        assert outcome(lambda: reader.load(path)) == outcome(lambda: load(path)), edit


def test_one_changed_fragment_is_the_only_file_parsed_and_its_unchanged_entries_keep_their_models(
        tmp_path, monkeypatch):
    path = make(tmp_path, fragments=5, per=10)
    reader = Reader()
    before = reader.load(path).config
    write_fragment(tmp_path, "02.yaml", [*range(200, 205), 299, *range(206, 210)])  # w205 -> w299
    parsed, read = [], []
    real, real_ryml = config._read_plain, config._ryml_data
    monkeypatch.setattr(config, "_read_plain", lambda text, file: parsed.append(file) or real(text, file))
    monkeypatch.setattr(config, "_ryml_data", lambda text: read.append(text) or real_ryml(text))
    after = reader.load(path).config
    frag = str(tmp_path / "conf.d" / "02.yaml")
    assert parsed == []  # no file read whole: the edit is one entry, read alone (_splice)
    assert read == ["workloads:\n" + workload(299)] and reader.spliced == 1
    assert after == load(path).config
    old = {w.id: w for w in before.workloads}
    for w in after.workloads:
        if w.id == "w299":
            assert w is not old.get("w299")
        else:
            assert w is old[w.id], w.id  # the same model: not validated again
    assert [ip for ip in after.egress_ips] == list(before.egress_ips)
    assert after.egress_ips[0] is before.egress_ips[0]  # the unchanged main file's models too


def test_an_invalid_edit_is_reported_as_load_reports_it_and_the_next_good_one_loads(tmp_path):
    path = make(tmp_path)
    reader = Reader()
    reader.load(path)
    write_fragment(tmp_path, "01.yaml", [100, 101], bad=101)
    with pytest.raises(ConfigError) as cached:
        reader.load(path)
    with pytest.raises(ConfigError) as cold:
        load(path)
    assert str(cached.value) == str(cold.value)
    assert f"{tmp_path / 'conf.d' / '01.yaml'}:3:" in str(cached.value)
    write_fragment(tmp_path, "01.yaml", [100, 101])
    assert reader.load(path).config == load(path).config


def test_a_fragment_edited_in_place_with_the_same_size_and_mtime_is_read_anew(tmp_path):
    path = make(tmp_path)
    reader = Reader()
    reader.load(path)
    frag = tmp_path / "conf.d" / "00.yaml"
    st_before = os.stat(frag)
    frag.write_text(frag.read_text().replace("app: a", "app: b", 1))
    os.utime(frag, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert os.stat(frag).st_size == st_before.st_size
    assert reader.load(path).config == load(path).config
    assert reader.load(path).config.workloads[0].app == "b"


def test_a_problem_in_a_list_only_includes_add_names_its_fragment_line_and_field(tmp_path):
    """The main file has no workloads: key; the field path and the fragment's line
    stay (before: `c.yaml:1: [1][0]: ...`)."""
    path = make(tmp_path, fragments=1, per=0)
    write_fragment(tmp_path, "00.yaml", [1, 2], bad=2)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{tmp_path / 'conf.d' / '00.yaml'}:3: workloads[1].source[0]: ")


def test_the_daemons_reload_goes_through_its_reader(tmp_path):
    from egress_agent.daemon import Daemon
    path = make(tmp_path, fragments=3, per=4)
    daemon = Daemon(str(path), make_reconciler=lambda cfg: object(), watch_netlink=False)
    assert daemon.load_config()
    first = daemon.cfg
    write_fragment(tmp_path, "01.yaml", [100, 101, 102, 150])
    assert daemon.load_config()
    assert daemon.cfg == load(path).config
    assert daemon.cfg.workloads[0] is first.workloads[0]  # 00.yaml did not change
    write_fragment(tmp_path, "02.yaml", [200], bad=200)
    assert not daemon.load_config()  # logged; the last good config stays
    assert [w.id for w in daemon.cfg.workloads][4:] == ["w100", "w101", "w102", "w150",
                                                        "w200", "w201", "w202", "w203"]
