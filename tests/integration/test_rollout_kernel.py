"""packaging/ansible/rollout.yml against a running daemon in the lab: an invalid
candidate never reaches it (the origin still sees the assigned source); a valid one
is switched in, the daemon applies it, and the playbook's wait on
`plan --against-running --json` ends with "changed": false."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from egress_agent.lab.echo import child_env
from egress_agent.lab.topology import Lab

from daemon_helpers import PARTNER_EGRESS, demo_text, started

ROOT = Path(__file__).resolve().parents[2]
PARTNER_DST = "198.51.100.10"
PARTNER_LINK = "203.0.113.140"
HOST_DEFAULT4 = "203.0.113.2"


def rollout(lab: Lab, tmp: Path, live: Path, candidate: str) -> subprocess.CompletedProcess:
    src = tmp / "candidate.yaml"
    src.write_text(candidate)
    agent = tmp / "agent"  # the real CLI, in the lab's host namespace
    agent.write_text("#!/bin/sh\nexec " + shlex.join(
        lab.agent_prefix() + [sys.executable, "-m", "egress_agent.cli"]) + ' "$@"\n')
    agent.chmod(0o755)
    inv = tmp / "inventory"
    inv.write_text("[egress_hosts]\nlocalhost ansible_connection=local ansible_become=false "
                   "ansible_python_interpreter=/usr/bin/python3\n")
    return subprocess.run(
        ["ansible-playbook", "-i", str(inv), str(ROOT / "packaging/ansible/rollout.yml"),
         "-e", f"config_src={src}", "-e", f"config_dir={live}", "-e", f"egress_agent={agent}",
         "-e", "check_service=false"],
        capture_output=True, text=True, timeout=300,
        env={**child_env(), "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"})


def test_rollout_gates_then_switches_under_a_running_daemon(lab: Lab, tmp_path: Path) -> None:
    from egress_agent.lab.cli import write_demo_config
    write_demo_config(lab)  # the cgroup workload's cgroup
    live = Path(lab.state_dir) / "etc"
    live.mkdir(parents=True)
    (live / "config.yaml").write_text(demo_text(lab))
    with started(lab, str(live / "config.yaml")) as ag:
        assert lab.probe("m42", PARTNER_DST, 8080).address == PARTNER_LINK
        # invalid: a typo in an egress IP id; refused before the live files change
        r = rollout(lab, tmp_path, live, demo_text(lab, (PARTNER_EGRESS,
                    "    egress: {ipv4: partner-lnk, ipv4_fallback: drop}\n")))
        assert r.returncode != 0 and "did you mean 'partner-link'?" in r.stdout, r.stdout
        assert not (live / "config.yaml").is_symlink()
        assert not ag.syncs(trigger="config")
        assert lab.probe("m42", PARTNER_DST, 8080).address == PARTNER_LINK
        # valid: switched in; the playbook returns once the daemon has applied it
        r = rollout(lab, tmp_path, live, demo_text(lab, (PARTNER_EGRESS, "    egress: default\n")))
        assert r.returncode == 0, r.stdout + r.stderr
        assert os.readlink(live / "config.yaml") == "..data/config.yaml"
        assert ag.syncs(trigger="config")
        assert lab.probe("m42", PARTNER_DST, 8080).address == HOST_DEFAULT4
        ag.check_alive()
