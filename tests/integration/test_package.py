"""The Debian package and the systemd unit, as CI must check them.

Builds dist/*.deb with dpkg-buildpackage (debhelper) and checks what dpkg and
lintian see: a Debian revision, conffiles, md5sums, copyright, changelog, man
page, modes (./ 0755), the maintainer scripts' restart-after-upgrade, lintian
with no error and only the overrides explained in debian/. Installs it with
apt into a clean Debian 12 root (debootstrap, cached) and runs the installed
agent there (packaging/test-deb); checks the unit with systemd-analyze verify
(inside that root) and its hardening score (<= 2.0).
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd, timeout=1500):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


# lintian tags overridden in debian/egress-agent.lintian-overrides, each with its
# reason there; any other warning or error fails the test
EXPLAINED = {"unusual-interpreter", "initial-upload-closes-no-bugs"}


def build():
    deb = run("packaging/build-deb").strip().splitlines()[-1]
    assert re.fullmatch(r"dist/egress-agent_[\d.]+-\d+[^_]*_\w+\.deb", deb), deb
    return deb


def test_deb_is_a_debian_package_with_conffiles_md5sums_copyright_changelog():
    deb = build()
    info = run("dpkg-deb", "-I", deb)
    version = re.search(r"^ Version: (\S+)$", info, re.M).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+", version), f"{version}: no Debian revision"
    assert "python3 (<< 3.12), python3 (>= 3.11), python3-nftables, python3-yaml" in info
    assert "adduser" in info
    for member in ("conffiles", "md5sums", "postinst", "prerm", "postrm"):
        assert re.search(rf"^ .*\b{member}\b", info, re.M), f"no {member} in {deb}"
    ctrl = subprocess.run(f"dpkg-deb --ctrl-tarfile {deb} | tar -xOf - ./conffiles ./postinst "
                          "./prerm", shell=True, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "/etc/default/egress-agent\n" in ctrl.stdout
    assert "/etc/egress-agent/config.yaml.example\n" in ctrl.stdout
    # deb-systemd-helper semantics: restart after an upgrade, never stop before
    assert "_dh_action=restart" in ctrl.stdout
    assert "adduser --quiet --system --group" in ctrl.stdout
    prerm_stop = re.findall(r"^(.*)\n.*deb-systemd-invoke stop", ctrl.stdout, re.M)
    assert prerm_stop and all('"$1" = remove' in line for line in prerm_stop), prerm_stop

    listing = run("dpkg-deb", "-c", deb).splitlines()
    modes = {line.split()[-1]: line.split()[0] for line in listing}
    assert modes["./"] == "drwxr-xr-x", modes["./"]
    assert modes["./usr/bin/egress-agent"] == "-rwxr-xr-x"
    for path in ("./usr/share/doc/egress-agent/copyright",
                 "./usr/share/doc/egress-agent/changelog.Debian.gz",
                 "./usr/share/man/man1/egress-agent.1.gz",
                 "./lib/systemd/system/egress-agent.service",
                 "./etc/default/egress-agent"):
        assert modes.get(path) == "-rw-r--r--", (path, modes.get(path))
    dirs = [m for p, m in modes.items() if m.startswith("d")]
    assert set(dirs) == {"drwxr-xr-x"}, set(dirs)
    assert not any("/psutil" in p or "/yaml/" in p for p in modes), "psutil or a bundled PyYAML"

    run("scripts/install-deps", "lintian")
    p = subprocess.run(["lintian", "--pedantic", "--show-overrides", "--tag-display-limit", "0", deb],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    tags = re.findall(r"^([EWIPXO]): egress-agent(?: \w+)?: (\S+)", p.stdout, re.M)
    assert tags or p.returncode == 0, p.stdout + p.stderr
    errors = [t for kind, t in tags if kind == "E"]
    unexplained = {t for kind, t in tags if kind == "W"}
    overridden = {t for kind, t in tags if kind == "O"}
    assert not errors, p.stdout
    assert not unexplained, f"lintian warnings not explained: {unexplained}\n{p.stdout}"
    assert overridden <= EXPLAINED, overridden - EXPLAINED


def test_deb_installs_in_a_clean_root_and_runs():
    build()
    out = run("packaging/test-deb")
    assert "egress-agent 0." in out
    assert "config.yaml.example: ok" in out
    assert "python3-nftables: importable" in out
    assert "systemd-analyze verify: ok" in out
    assert re.search(r"^user: egress-agent:x:(\d+):", out, re.M).group(1) != "0"
    assert "conffile: /etc/default/egress-agent " in out
    assert "dpkg --verify (md5sums): ok" in out
    assert "is-enabled: enabled" in out
    assert "purge: state removed, user kept" in out


def test_unit_hardening_score():
    out = run("systemd-analyze", "security", "--offline=true", "packaging/egress-agent.service")
    score = float(re.search(r"Overall exposure level for egress-agent.service: ([\d.]+)", out).group(1))
    assert score <= 2.0, out[-2000:]
    unit = (ROOT / "packaging/egress-agent.service").read_text()
    lines = set(unit.splitlines())
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=30",
                 "ProtectSystem=strict", "StateDirectory=egress-agent",
                 "ConfigurationDirectory=egress-agent", "User=egress-agent",
                 "CapabilityBoundingSet=CAP_NET_ADMIN", "AmbientCapabilities=CAP_NET_ADMIN",
                 "EnvironmentFile=-/etc/default/egress-agent", "ProtectKernelTunables=yes",
                 "IPAddressDeny=any", "IPAddressAllow=localhost"):
        assert line in lines, line
    assert "$EGRESS_AGENT_ARGS" in unit
    # an invalid config must not make a restart loop: no fatal check before start
    assert not any(x.startswith("ExecStartPre=") and " check " in x for x in lines)
    assert "CAP_SYS_ADMIN" not in "".join(x for x in lines if not x.startswith("#"))


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
