"""config._Checked: after random changes of a config's workloads (added, removed,
moved between apps, sources, cgroups and fixed blocks taken from other workloads or
egress IPs, ids reused), the check of the changed workloads alone finds a problem
exactly when the full _check_semantics does, and a Reader on the same edits
reports what a cold load() reports."""

from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.config import (Config, ConfigError, Reader, _check_semantics, _Checked, load,
                                 workload_changes)

BASE = {
    "version": 1, "host": {"name": "h", "region": "r"},
    "defaults": {"ports_per_workload": 64},
    "egress_ips": [
        {"id": "ip0", "app": "a", "ipv4": "203.0.113.10", "ipv6": "2001:db8:1::/64"},
        {"id": "ip1", "app": "b", "ipv4": "203.0.113.11"},
        {"id": "ip2", "app": "far", "region": "other", "ipv4": "203.0.113.12"},
        {"id": "own", "workload": "w1", "ipv4": "203.0.113.13"},
    ],
    "workloads": [
        {"id": "w0", "app": "a", "source": ["10.0.0.1"]},
        {"id": "w1", "app": "lonely", "source": ["10.0.0.2", "fd00::2"]},
        {"id": "w2", "app": "b", "cgroup": "a/b"},
        {"id": "w3", "app": "c2", "source": ["10.0.0.4"]},
        {"id": "w4", "source": ["10.0.0.5"], "blocks": {"ip0": "1024-1087"}, "app": "a"},
    ],
    "policies": [
        {"name": "p0", "match": {"workloads": ["w0"]}, "egress": "drop"},
        {"name": "p1", "match": {"apps": ["c2"]}, "egress": {"ipv4": "ip1"}},
    ],
}
BASE["egress_ips"].append({"id": "ip3", "app": "c2", "ipv4": "203.0.113.14"})

SOURCES = ["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.0.10", "203.0.113.10", "fd00::2", "fd00::9",
           "2001:db8:1::5", "2001:db8:2::5"]
APPS = ["a", "b", "c2", "lonely", "far", "nobody", None]
IDS = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7"]
CGROUPS = ["a/b", "c/d", "e"]
BLOCKS = [{}, {"ip0": "1024-1087"}, {"ip0": "1088-1151"}, {"ip1": "1024-1087"}, {"nope": "1024-1087"}]

WORKLOAD = st.builds(
    lambda i, app, kind, srcs, cg, blocks: {
        "id": i, **({"app": app} if app else {}),
        **({"source": srcs} if kind else {"cgroup": cg}),
        **({"blocks": blocks} if blocks and kind else {})},
    st.sampled_from(IDS), st.sampled_from(APPS), st.booleans(),
    st.lists(st.sampled_from(SOURCES), min_size=1, max_size=2), st.sampled_from(CGROUPS),
    st.sampled_from(BLOCKS))
CHANGE = st.one_of(st.tuples(st.just("add"), st.integers(0, 10), WORKLOAD),
                   st.tuples(st.just("remove"), st.integers(0, 10)),
                   st.tuples(st.just("replace"), st.integers(0, 10), WORKLOAD))


def edit(ws: list, change) -> None:
    """Apply one CHANGE to the list of workloads, in place."""
    at = change[1] % (len(ws) + 1)
    if change[0] == "add":
        ws.insert(at, change[2])
    elif ws and change[0] == "remove":
        del ws[at % len(ws)]
    elif ws:
        ws[at % len(ws)] = change[2]


def changed(cfg: Config, change) -> Config:
    ws = list(cfg.workloads)
    edit(ws, change)
    data = {k: v for k, v in cfg.model_dump(exclude_defaults=True).items() if k != "workloads"}
    data["workloads"] = ws  # the unchanged models as they are: as a Reader hands them
    return Config.model_validate(data)


@settings(max_examples=400, deadline=None)
@given(st.lists(CHANGE, min_size=1, max_size=10))
def test_the_check_of_changed_workloads_agrees_with_the_full_check(changes):
    cfg = Config.model_validate(BASE)
    assert _check_semantics(cfg) == []
    checked = _Checked(cfg)
    for change in changes:
        new = changed(checked.cfg, change)
        full = bool(_check_semantics(new))
        fast = checked.after(new, workload_changes(checked.cfg, new))
        if fast is None:  # only for an added workload with fixed blocks
            assert change[0] != "remove" and change[2].get("blocks"), change
            checked = checked if full else _Checked(new)
        elif isinstance(fast, _Checked):
            assert not full, (change, _check_semantics(new))
            checked = fast
        else:
            assert fast is False and full, change


def test_a_change_beyond_the_workloads_takes_the_full_check():
    cfg = Config.model_validate(BASE)
    checked = _Checked(cfg)
    data = cfg.model_dump(exclude_defaults=True)
    data["policies"] = data["policies"][:1]
    new = Config.model_validate({**data, "workloads": cfg.workloads})
    assert checked.after(new, workload_changes(cfg, new)) is None


def workload_line(w: dict) -> str:
    parts = [f"id: {w['id']}"] + ([f"app: {w['app']}"] if "app" in w else []) + (
        [f"source: [{', '.join(repr(s) for s in w['source'])}]"] if "source" in w
        else [f"cgroup: {w['cgroup']}"]) + (
        [f"blocks: {{{', '.join(f'{k}: {v}' for k, v in w['blocks'].items())}}}"] if w.get("blocks") else [])
    return "  - {" + ", ".join(parts) + "}\n"


HEAD = """version: 1
host: {name: h, region: r}
defaults: {ports_per_workload: 64}
egress_ips:
  - {id: ip0, app: a, ipv4: 203.0.113.10, ipv6: "2001:db8:1::/64"}
  - {id: ip1, app: b, ipv4: 203.0.113.11}
  - {id: ip2, app: far, region: other, ipv4: 203.0.113.12}
  - {id: own, workload: w1, ipv4: 203.0.113.13}
  - {id: ip3, app: c2, ipv4: 203.0.113.14}
policies:
  - {name: p0, match: {workloads: [w0]}, egress: drop}
  - {name: p1, match: {apps: [c2]}, egress: {ipv4: ip1}}
workloads:
"""


@settings(max_examples=100, deadline=None)
@given(st.lists(CHANGE, min_size=1, max_size=8))
def test_a_reader_on_the_same_changes_reports_what_a_cold_load_reports(tmp_path_factory, changes):
    path = tmp_path_factory.mktemp("i") / "c.yaml"
    ws = list(BASE["workloads"])
    path.write_text(HEAD + "".join(map(workload_line, ws)))
    reader = Reader()
    reader.load(path)
    for change in changes:
        edit(ws, change)
        path.write_text(HEAD + "".join(map(workload_line, ws)))
        try:
            got = ("config", reader.load(path).config)
        except ConfigError as e:
            got = ("error", str(e))
        try:
            want = ("config", load(path).config)
        except ConfigError as e:
            want = ("error", str(e))
        assert got == want, change
