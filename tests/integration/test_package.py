"""The Debian package and the systemd unit, as CI must check them.

Builds dist/*.deb, installs it with apt into a clean Debian 12 root
(debootstrap, cached) and runs the installed agent there; checks the unit with
systemd-analyze verify (inside that root) and its hardening score.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd, timeout=1500):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_deb_builds_installs_in_a_clean_root_and_runs():
    out = run("packaging/build-deb")
    deb = out.strip().splitlines()[-1]
    assert re.fullmatch(r"dist/egress-agent_[\d.]+_\w+\.deb", deb)
    info = run("dpkg-deb", "-I", deb)
    assert "Depends: python3 (>= 3.11), python3 (<< 3.12), python3-nftables, nftables, conntrack" in info
    out = run("packaging/test-deb")
    assert "egress-agent 0." in out
    assert "config.yaml.example: ok" in out
    assert "python3-nftables: importable" in out
    assert "systemd-analyze verify: ok" in out


def test_unit_hardening_score():
    out = run("systemd-analyze", "security", "--offline=true", "packaging/egress-agent.service")
    score = float(re.search(r"Overall exposure level for egress-agent.service: ([\d.]+)", out).group(1))
    assert score <= 3.0, out[-2000:]
    unit = (ROOT / "packaging/egress-agent.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=",
                 "ProtectSystem=strict", "StateDirectory=egress-agent",
                 "ConfigurationDirectory=egress-agent", "CapabilityBoundingSet=CAP_NET_ADMIN"):
        assert line in unit


def test_vagrantfile_validates_and_provisioning_parses():
    run("scripts/install-deps", "vagrant")
    out = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant",
                         capture_output=True, text=True, timeout=300)
    try:
        assert out.returncode == 0 and "validated successfully" in out.stdout, out.stdout + out.stderr
    finally:
        subprocess.run(["rm", "-rf", str(ROOT / "vagrant" / ".vagrant")])
    for script in ("provision-origin.sh", "provision-egress.sh"):
        run("sh", "-n", f"vagrant/{script}")


def test_rollout_playbook_and_path_unit_parse():
    run("scripts/install-deps", "ansible-core")
    out = run("ansible-playbook", "--syntax-check", "-i", "localhost,",
              "packaging/ansible/rollout.yml")
    assert "playbook: packaging/ansible/rollout.yml" in out
    run("systemd-analyze", "verify", "packaging/ansible/egress-agent-reload.path")
