"""`check` for scripts: every problem in one pass, sorted, with column, value and
suggestion (`--json`); capacity lists every workload that does not fit; `plan --json`
says whether anything would change."""

import json

from egress_agent.cli import main
from egress_agent.hoststate import HostState
from egress_agent.nft.fake import FakeNft
from egress_agent.reconcile import Reconciler
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def at(text: str, needle: str, nth: int = 1) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of needle."""
    i = -1
    for _ in range(nth):
        i = text.index(needle, i + 1)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


# Field errors (pydantic) and cross-field errors in one file, written so that the order
# in the file is not the order in which they are found (policies first).
BAD = """\
version: 1
host: {name: h1, region: ams}
state_dir: STATE
policies:
  - name: p1
    match: {workloads: [m44, m45x]}
    egress: {ipv4: web-2, ipv4_fallback: drop}
egress_ips:
  - id: billing-1
    app: billing
    ipv4: 203.0.113.10
    state: activ
  - id: batch-1
    app: batch
    ipv4: 2001:db8::1
  - id: web-1
    app: web
    ipv4: 203.0.113.12
workloads:
  - {id: m42, app: biling, source: [10.0.1.2]}
  - {id: m43, app: web, source: [10.0.1.3], interfce: vm-m43}
  - {id: m44, app: web, source: [10.0.1.4]}
  - {id: m44, app: web, source: [10.0.1.5]}
  - {id: m45, app: web, source: [10.0.1.300]}
"""


def test_check_json_reports_every_problem_sorted_with_columns_values_and_suggestions(
        capsys, tmp_path):
    text = BAD.replace("STATE", str(tmp_path / "state"))
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    code, out, err = run(capsys, "check", "-c", p, "--json")
    assert code == 1 and err == ""
    doc = json.loads(out)
    assert doc["ok"] is False
    got = [(q["line"], q["column"], q["field"], q.get("value"), q.get("suggestion"))
           for q in doc["problems"]]
    assert got == [
        # cross-field: m45x is unknown (m45 is invalid, but its id counts as known)
        (*at(text, "m45x"), "policies[0].match.workloads[1]", "m45x", "m45"),
        (*at(text, "web-2"), "policies[0].egress.ipv4", "web-2", "web-1"),
        # field errors
        (*at(text, "activ"), "egress_ips[0].state", "activ", "active"),
        (*at(text, "2001:db8::1"), "egress_ips[1].ipv4", "2001:db8::1", None),
        # cross-field among the items that validated: billing-1 is invalid, but it
        # names the app, so the typo gets its suggestion
        (*at(text, "biling"), "workloads[0].app", "biling", "billing"),
        (*at(text, "interfce"), "workloads[1].interfce", "interfce", "interface"),  # the key
        (*at(text, "m44", 3), "workloads[3].id", "m44", None),
        (*at(text, "10.0.1.300"), "workloads[4].source[0]", "10.0.1.300", None),
    ]
    assert all(q["file"] == str(p) for q in doc["problems"])
    messages = [q["message"] for q in doc["problems"]]
    assert "did you mean 'm45'?" in messages[0] and "did you mean 'web-1'?" in messages[1]
    assert "already used by workloads[2]" in messages[6]  # the index as written in the file

    # the text form: the same problems, in the same order, FILE:LINE: field: reason
    code, out, err = run(capsys, "check", "-c", p)
    assert code == 1 and out == ""
    assert err.splitlines() == [f"{p}:{q['line']}: {q['field']}: {q['message']}"
                                for q in doc["problems"]]


def test_check_json_ok_and_unreadable(capsys, tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(BAD.replace("STATE", str(tmp_path / "state")).split("policies:")[0])
    code, out, _ = run(capsys, "check", "-c", p, "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "file": str(p), "problems": [],
                                             "egress_ips": 0, "workloads": 0, "policies": 0}
    code, out, err = run(capsys, "check", "-c", tmp_path / "nope.yaml", "--json")
    (q,) = json.loads(out)["problems"]
    assert code == 1 and err == "" and q["column"] is None  # the file, not a place in it
    assert "cannot read" in q["message"] and "value" not in q


def test_a_problem_in_host_leaves_the_cross_field_checks_out(capsys, tmp_path):
    """Every cross-field check reads host.region: with it invalid they cannot run, and
    the field error is reported alone rather than with guesses."""
    p = tmp_path / "bad.yaml"
    p.write_text(BAD.replace("STATE", str(tmp_path / "state"))
                 .replace("region: ams", "region: [ams]"))
    code, out, _ = run(capsys, "check", "-c", p, "--json")
    fields = [q["field"] for q in json.loads(out)["problems"]]
    assert code == 1 and "host.region" in fields
    assert "policies[0].egress.ipv4" not in fields and "workloads[3].id" not in fields


FULL = """\
version: 1
host: {name: h1, region: ams}
state_dir: STATE
egress_ips:
  - {id: web-1, app: web, ipv4: 203.0.113.12, limits: {max_workloads: 1}}
  - {id: db-1, app: db, ipv4: 203.0.113.13, ports: 1024-2047}
workloads:
  - {id: w1, app: web, source: [10.0.1.1]}
  - {id: w2, app: web, source: [10.0.1.2]}
  - {id: w3, app: web, source: [10.0.1.3]}
  - {id: d1, app: db, source: [10.0.2.1]}
  - {id: d2, app: db, source: [10.0.2.2]}
"""


def test_check_lists_every_workload_that_does_not_fit(capsys, tmp_path):
    text = FULL.replace("STATE", str(tmp_path / "state"))
    p = tmp_path / "full.yaml"
    p.write_text(text)
    code, out, err = run(capsys, "check", "-c", p, "--json")
    assert code == 1 and err == ""
    problems = json.loads(out)["problems"]
    assert [(q["line"], q["column"], q["value"]) for q in problems] == [
        (*at(text, "{id: w2"), "w2"), (*at(text, "{id: w3"), "w3"), (*at(text, "{id: d2"), "d2")]
    assert "max_workloads 1 reached" in problems[0]["message"]
    assert "every egress IP of app 'db' is full" in problems[2]["message"]
    code, _, err = run(capsys, "check", "-c", p)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[1].startswith(f"{p}:{at(text, 'id: w3')[0]}: workloads: capacity: workload 'w3'")


def test_plan_json_says_whether_anything_would_change(capsys, tmp_path, monkeypatch):
    p = tmp_path / "ok.yaml"
    p.write_text(FULL.replace("STATE", str(tmp_path / "state"))
                 .replace("max_workloads: 1", "max_workloads: 3").replace("1024-2047", "1024-4095"))
    code, out, _ = run(capsys, "plan", "-c", p, "--json")
    assert code == 0 and json.loads(out)["changed"] is True  # a first apply creates everything

    # against a running host (the kernel ports replaced by fakes): true until applied
    host = HostState(frozenset({"203.0.113.12", "203.0.113.13"}))
    rec = Reconciler(FakeNft(), FakeRouting(), Store(tmp_path / "state"), lambda: host)
    monkeypatch.setattr("egress_agent.wiring.reconciler", lambda cfg: rec)
    monkeypatch.setattr("egress_agent.cli.has_net_admin", lambda: True)
    # plan points structlog at stderr, here capsys's: later tests would log to a closed file
    monkeypatch.setattr("egress_agent.log.configure", lambda *a, **kw: None)
    code, out, _ = run(capsys, "plan", "-c", p, "--json", "--against-running")
    assert code == 0 and json.loads(out)["changed"] is True
    from egress_agent.config import load
    rec.sync(load(p).config, full=True)
    code, out, _ = run(capsys, "plan", "-c", p, "--json", "--against-running")
    d = json.loads(out)
    assert code == 0 and d["changed"] is False and d["nft"] == "" and d["route_ops"] == []
    # a changed config is a change again
    p.write_text(p.read_text().replace("  - {id: d2, app: db, source: [10.0.2.2]}\n", ""))
    code, out, _ = run(capsys, "plan", "-c", p, "--json", "--against-running")
    assert code == 0 and json.loads(out)["changed"] is True


def test_problems_in_fragments_name_the_fragment_line_and_column(capsys, tmp_path):
    """The line map of an included file keeps its columns too; problems of the main
    file and of the fragment come sorted by file, then line."""
    main_text = (FULL.replace("STATE", str(tmp_path / "state")).split("\nworkloads:")[0]
                 + "\ninclude: [conf.d/*.yaml]\nmanaged_sources: [10.0.0.0/33]\n")
    p = tmp_path / "main.yaml"
    p.write_text(main_text)
    frag_text = "workloads:\n  - {id: w1, app: wbe, source: [10.0.1.1]}\n"
    frag = tmp_path / "conf.d/a.yaml"
    frag.parent.mkdir()
    frag.write_text(frag_text)
    code, out, _ = run(capsys, "check", "-c", p, "--json")
    got = [(q["file"], q["line"], q["column"], q["field"], q.get("suggestion"))
           for q in json.loads(out)["problems"]]
    assert code == 1 and got == [
        (str(frag), *at(frag_text, "wbe"), "workloads[0].app", "web"),
        (str(p), *at(main_text, "10.0.0.0/33"), "managed_sources[0]", None)]


def test_a_host_limit_is_a_json_problem_too(capsys, tmp_path):
    """More egress IPs in the region than the mark has ids for: not one workload's
    problem, so it is at the file, and still JSON on stdout."""
    ips = "".join(f"  - {{id: e{i}, app: web, ipv4: 203.0.113.{i}}}\n" for i in range(256))
    p = tmp_path / "many.yaml"
    p.write_text(f"version: 1\nhost: {{name: h1, region: ams}}\nstate_dir: {tmp_path}/state\n"
                 f"egress_ips:\n{ips}")
    code, out, err = run(capsys, "check", "-c", p, "--json")
    (q,) = json.loads(out)["problems"]
    assert code == 1 and err == "" and q["file"] == str(p)
    assert "more than 255 egress IPs on one host" in q["message"]


def test_suggestions_are_bounded_in_time(capsys, tmp_path):
    """Thousands of unknown references among thousands of ids: every one is reported,
    and the did-you-means stop at a budget rather than taking minutes."""
    from egress_agent import config
    wls = "".join(f"  - {{id: w{i}, app: web, source: [10.1.{i // 250}.{i % 250 + 1}]}}\n"
                  for i in range(2000))
    refs = ", ".join(f"x{i}" for i in range(2000))
    p = tmp_path / "refs.yaml"
    p.write_text(f"version: 1\nhost: {{name: h1, region: ams}}\nstate_dir: {tmp_path}/s\n"
                 "egress_ips:\n  - {id: web-1, app: web, ipv4: 203.0.113.12}\n"
                 f"workloads:\n{wls}policies:\n  - name: p\n    match: {{workloads: [{refs}]}}\n"
                 "    egress: default\n")
    code, out, _ = run(capsys, "check", "-c", p, "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and len(problems) == 2000
    with_suggestion = sum("suggestion" in q for q in problems)
    assert 0 < with_suggestion <= config.SUGGESTION_BUDGET // 2000


FIXED = """\
version: 1
host: {name: gw-a1, region: ams}
state_dir: STATE
egress_ips:
  - {id: ams-app-1, app: billing, ipv4: 203.0.113.140, ports: 10240-12287}
workloads:
  - {id: m-0, app: billing, source: [10.1.1.1]}
  - {id: m-1, app: billing, source: [10.1.1.2], blocks: {ams-app-1: 10240-11263}}
  - id: m-2
    app: billing
    source: [10.1.1.3]
    blocks:
      ams-app-1: 11264-12287
"""


def test_check_places_fixed_block_overlaps_and_the_capacity_they_take(capsys, tmp_path):
    """An overlap is at the block's own line and column; a workload that finds no room
    beside the fixed blocks is at its own line."""
    text = FIXED.replace("STATE", str(tmp_path / "state"))
    p = tmp_path / "gw.yaml"
    p.write_text(text)
    code, out, _ = run(capsys, "check", "-c", p, "--json")
    (q,) = json.loads(out)["problems"]
    assert code == 1 and (q["line"], q["column"], q["value"]) == (*at(text, "{id: m-0"), "m-0")
    assert "no free block of 1024 ports left in 10240-12287" in q["message"]

    text = text.replace("11264-12287", "10752-11775")
    p.write_text(text)
    code, out, _ = run(capsys, "check", "-c", p, "--json")
    (q,) = json.loads(out)["problems"]
    assert code == 1 and (q["line"], q["column"]) == at(text, "10752-11775")
    assert (q["field"], q["value"]) == ("workloads[2].blocks.ams-app-1", "10752-11775")
    assert "overlaps 10240-11263, the block of workload 'm-1'" in q["message"]
