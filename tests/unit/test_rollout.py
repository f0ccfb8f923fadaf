"""packaging/ansible/rollout.yml, run for real by ansible-playbook on this machine
(connection local) against a config directory in tmp: the candidate is gated where it
is staged, the live files change only after the gate, and in one rename.

The agent is a stand-in script: `check` is the real one; `plan --against-running`
plays a daemon that has applied whatever the live files say (changed = the planned
files differ from the live ones), since a real plan needs the kernel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "packaging/ansible/rollout.yml"

pytestmark = pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                                reason="ansible-core not installed (scripts/install-deps ansible-core)")

HEAD = """version: 1
host: {name: h1, region: ams}
state_dir: STATE
include: [conf.d/*.yaml]
egress_ips:
  - {id: web-1, app: web, ipv4: 203.0.113.12}
"""

AGENT = """#!PYTHON
import glob, json, os, subprocess, sys
args = sys.argv[1:]
cfg = args[args.index("-c") + 1]
live = os.path.join(os.environ["LIVE"], "config.yaml")

def files(path):
    base = os.path.dirname(path)
    return [open(path).read()] + [open(f).read() for f in sorted(glob.glob(base + "/conf.d/*.yaml"))]

with open(os.environ["AGENT_LOG"], "a") as log:
    log.write(json.dumps({"argv": args, "live": files(live)}) + "\\n")
if args[0] == "check":
    sys.exit(subprocess.run([PYTHON_Q, "-m", "egress_agent.cli", *args]).returncode)
print(json.dumps({"changed": files(cfg) != files(live), "nft": "", "route_ops": [], "notes": []}))
"""


def playbook(tmp_path, live: Path, candidate: Path, fragments=None):
    agent = tmp_path / "agent"
    agent.write_text(AGENT.replace("PYTHON_Q", repr(sys.executable))
                     .replace("PYTHON", sys.executable))
    agent.chmod(0o755)
    inv = tmp_path / "inventory"
    inv.write_text("[egress_hosts]\nlocalhost ansible_connection=local ansible_become=false "
                   "ansible_python_interpreter=/usr/bin/python3\n")
    argv = ["ansible-playbook", "-i", inv, PLAYBOOK, "-e", f"config_src={candidate}",
            "-e", f"config_dir={live}", "-e", f"egress_agent={agent}", "-e", "check_service=false"]
    if fragments:
        argv += ["-e", f"fragments_src={fragments}"]
    env = {**os.environ, "LIVE": str(live), "AGENT_LOG": str(tmp_path / "agent.log"),
           "PYTHONPATH": str(ROOT), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
           "ANSIBLE_NOCOLOR": "1"}
    (tmp_path / "agent.log").write_text("")
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env,
                       timeout=300)
    calls = [json.loads(l) for l in (tmp_path / "agent.log").read_text().splitlines()]
    return r, calls


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def snapshot(live: Path) -> dict:
    return {str(p.relative_to(live)): p.read_text() for p in sorted(live.rglob("*.yaml"))
            if ".." not in str(p.relative_to(live))}


def test_rollout_gates_the_staged_candidate_then_switches_in_one_rename(tmp_path):
    live = tmp_path / "etc"
    head = HEAD.replace("STATE", str(tmp_path / "state"))
    write(live / "config.yaml", head)
    write(live / "conf.d/web.yaml", "workloads:\n  - {id: w1, app: web, source: [10.0.1.1]}\n")
    before = snapshot(live)

    # an invalid candidate (a fragment with a typo in its app): refused, live untouched
    bad = write(tmp_path / "bad/conf.d/web.yaml",
                "workloads:\n  - {id: w1, app: wbe, source: [10.0.1.1]}\n")
    cand = write(tmp_path / "cand.yaml", head + "# v2\n")
    r, calls = playbook(tmp_path, live, cand, bad.parent)
    assert r.returncode != 0, r.stdout
    assert "did you mean 'web'?" in r.stdout  # check's own message, in ansible's output
    assert [c["argv"][0] for c in calls] == ["check"]
    assert "/..release-" in calls[0]["argv"][2]  # gated where it was staged
    assert snapshot(live) == before and not (live / "config.yaml").is_symlink()

    # a valid candidate with new fragments: gated while the live files are the old ones
    new = write(tmp_path / "good/conf.d/web.yaml",
                "workloads:\n  - {id: w1, app: web, source: [10.0.1.1]}\n"
                "  - {id: w2, app: web, source: [10.0.1.2]}\n")
    r, calls = playbook(tmp_path, live, cand, new.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = [(c["argv"][0], "--against-running" in c["argv"], "/..release-" in c["argv"][2])
             for c in calls]
    assert kinds[:2] == [("check", False, True), ("plan", True, True)]
    assert all(k == ("plan", True, False) for k in kinds[2:]) and len(kinds) >= 3
    old_live = [before["config.yaml"], before["conf.d/web.yaml"]]
    assert calls[0]["live"] == calls[1]["live"] == old_live  # the gate came first
    assert calls[-1]["live"] == [cand.read_text(), new.read_text()]
    # main config and fragments are both reached through ..data: one rename switched them
    assert os.readlink(live / "config.yaml") == "..data/config.yaml"
    assert os.readlink(live / "conf.d") == "..data/conf.d"
    first = os.readlink(live / "..data")
    assert first.startswith("..release-")
    assert snapshot(live)["config.yaml"] == cand.read_text()
    assert (live / "conf.d/web.yaml").read_text() == new.read_text()
    # the fragments that were live before are kept aside, not lost
    (aside,) = [p for p in live.iterdir() if p.name.startswith("conf.d.before-rollout-")]
    assert (aside / "web.yaml").read_text() == before["conf.d/web.yaml"]

    # the next rollout without fragments_src carries the live fragments over; the
    # previous release is kept for a rollback, older ones (the refused one) removed
    cand.write_text(head + "# v3\n")
    r, calls = playbook(tmp_path, live, cand)
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls[0]["argv"][0] == "check" and calls[0]["live"][0] == head + "# v2\n"
    second = os.readlink(live / "..data")
    assert second != first
    assert sorted(p.name for p in live.iterdir() if p.name.startswith("..release-")) \
        == sorted([first, second])
    assert (live / "config.yaml").read_text() == head + "# v3\n"
    assert (live / "conf.d/web.yaml").read_text() == new.read_text()


def test_pair_playbook_installs_the_rendered_set_up_and_changes_nothing_the_second_time(tmp_path):
    """packaging/ansible/pair.yml with the files `fleet render` wrote: every host's
    tunnels script, and a gateway's keepalived.conf, notify and conntrackd.conf, at
    paths in tmp (services and the tunnels script are not run here)."""
    from egress_agent import fleet
    from egress_agent.lab.pairlab import FLEET
    (tmp_path / "fleet.yaml").write_text(FLEET)
    fleet.run(str(tmp_path / "fleet.yaml"), str(tmp_path / "state"), str(tmp_path / "rendered"))
    inv = tmp_path / "inventory"
    local = "ansible_connection=local ansible_become=false ansible_python_interpreter=/usr/bin/python3"
    inv.write_text(f"[egress_gateways]\ng1 {local}\n[egress_hosts]\nw1 {local}\n")
    root = tmp_path / "root"
    paths = {"tunnels_script": "{{ inventory_hostname }}/tunnels",
             "keepalived_conf": "{{ inventory_hostname }}/keepalived.conf",
             "keepalived_notify": "{{ inventory_hostname }}/notify",
             "conntrackd_conf": "{{ inventory_hostname }}/conntrackd.conf"}
    for h in ("g1", "w1"):
        (root / h).mkdir(parents=True)
    argv = ["ansible-playbook", "-i", str(inv), str(ROOT / "packaging/ansible/pair.yml"),
            "-e", f"rendered_dir={tmp_path / 'rendered'}", "-e", "run_tunnels=false",
            "-e", "manage_services=false",
            *[x for k, v in paths.items() for x in ("-e", f"{k}={root}/{v}")]]
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rendered = tmp_path / "rendered"
    for src, dest, mode in (("tunnels.sh", "tunnels", 0o755), ("keepalived.conf", "keepalived.conf", 0o644),
                            ("notify", "notify", 0o755), ("conntrackd.conf", "conntrackd.conf", 0o644)):
        assert (root / "g1" / dest).read_text() == (rendered / "g1" / src).read_text(), dest
        assert (root / "g1" / dest).stat().st_mode & 0o777 == mode, dest
    assert sorted(p.name for p in (root / "w1").iterdir()) == ["tunnels"]  # no pair files
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    recap = [line for line in again.stdout.splitlines() if " ok=" in line]
    assert again.returncode == 0 and len(recap) == 2 and all("changed=0" in x for x in recap), \
        again.stdout
