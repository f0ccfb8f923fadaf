"""Bad arguments: every command answers in one line with exit 2, and a kernel
command without CAP_NET_ADMIN is refused up front with exit 2."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from egress_agent.cli import has_net_admin, main

DESIGN = Path(__file__).parent.parent / "configs" / "design.yaml"


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and not err.startswith("usage:"), err
    return err


@pytest.mark.parametrize("argv, words", [
    (["explain", "10.0.1.2", "198.51.100.10:99999/tcp"], "'99999' is not a port (1-65535)"),
    (["explain", "10.0.1.2", "198.51.100.10:443/sctp"], "'sctp' in '198.51.100.10:443/sctp' is not a protocol"),
    (["explain", "10.0.1.2", "[2001:db8::1]:x"], "'x' is not a port"),
    (["explain", "10.0.1.2", "example.org"], "'example.org' is not an IP address"),
    (["explain", "10.0.1.300", "198.51.100.10"], "'10.0.1.300' is not an IP address"),
    (["explain", "10.0.1.2", "198.51.100.10", "--port", "0"], "'0' is not a port"),
    (["explain", "10.0.1.2", "198.51.100.10", "--proto", "sctp"], "invalid choice: 'sctp'"),
    (["explain", "10.0.1.2", "198.51.100.10", "--iif", "no such interface"], "not an interface name"),
    (["who", "203.0.113.10:http"], "'http' is not a port"),
    (["who", "somewhere:80"], "'somewhere' is not an IP address"),
    (["who", "[2001:db8::1:80"], "is not ADDR[:PORT]"),
    (["who", "203.0.113.10:1500", "--at", "yesterday"], "'yesterday' is not an ISO-8601 time"),
    (["run", "--resync", "-1"], "'-1' is not a number of seconds above 0"),
    (["run", "--usage-interval", "nan"], "'nan' is not a number of seconds"),
    (["run", "--metrics", "0.0.0.0"], "is not ADDR:PORT"),
    (["usage", "--top", "0"], "'0' is not a whole number of at least 1"),
    (["verify", "--echo", "192.0.2.10"], "'192.0.2.10' is not ADDR:PORT"),
    (["verify", "--echo", "192.0.2.10:8080", "--proto", "icmp"], "invalid choice: 'icmp'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["check", "--colour"], "unrecognized arguments: --colour"),
    (["explain"], "the following arguments are required: src, dst"),
    (["lab", "up", "--prefix"], "expected one argument"),
])
def test_a_bad_argument_is_one_line_and_exit_2(capsys, argv, words):
    err = usage_error(capsys, *argv)
    assert err.startswith("egress-agent"), err
    assert words in err, err
    assert err.rstrip().endswith("--help)"), err


def test_help_still_shows_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["explain", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: egress-agent explain") and "--iif" in out


def test_good_arguments_still_work(capsys, tmp_path):
    cfg = tmp_path / "design.yaml"
    cfg.write_text(DESIGN.read_text().replace("/var/lib/egress-agent", str(tmp_path / "s")))
    assert main(["explain", "-c", str(cfg), "--assume-usable", "10.0.1.2",
                 "[2001:db8:ff::10]:443/tcp"]) == 0
    assert main(["who", "[2001:db8::1]:80", "--state-dir", str(tmp_path / "s")]) == 1
    assert "nobody held [2001:db8::1]:80 now" in capsys.readouterr().out


def agent(*argv, drop_net_admin=False, timeout=30):
    cmd = [sys.executable, "-m", "egress_agent.cli", *map(str, argv)]
    if drop_net_admin:  # root without CAP_NET_ADMIN: what a non-root operator has
        cmd = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent.parent.parent)


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="dropping CAP_NET_ADMIN takes root and setpriv (CI has both)")


@needs_setpriv
@pytest.mark.parametrize("argv", [["apply"], ["run"], ["usage"], ["teardown"],
                                  ["plan", "--against-running"], ["verify", "--echo", "192.0.2.1:7"],
                                  ["lab", "check"]])
def test_a_kernel_command_without_cap_net_admin_is_exit_2(argv):
    config = [] if argv[0] in ("teardown", "lab") else ["-c", DESIGN]
    r = agent(*argv, *config, drop_net_admin=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"egress-agent {argv[0]}: needs root (CAP_NET_ADMIN); run it as root, "
                        "e.g. with sudo\n")


@needs_setpriv
def test_pure_commands_need_no_cap_net_admin():
    r = agent("check", "-c", DESIGN, drop_net_admin=True)
    assert r.returncode == 0 and "ok (2 egress IPs" in r.stdout, r.stderr


def test_run_refuses_metrics_on_every_address_in_one_line(tmp_path):
    cfg = tmp_path / "design.yaml"
    cfg.write_text(DESIGN.read_text().replace("/var/lib/egress-agent", str(tmp_path / "s")))
    for listen in ("0.0.0.0:9469", "[::]:9469", "192.0.2.1:9469"):
        r = agent("run", "-c", cfg, "--metrics", listen, timeout=20)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        if has_net_admin():
            assert r.stderr.startswith(f"egress-agent run: --metrics {listen}: refusing"), r.stderr


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from egress_agent import argtypes  # noqa: E402
from egress_agent.metrics import parse_listen  # noqa: E402

ARG_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.:[]/abcdeftcpud²٣ -+eE", max_size=40),
    st.from_regex(r"\[?[0-9a-f:.]{0,20}\]?(:[0-9²]{0,7})?(/[a-z]{0,5})?", fullmatch=True),
)


@settings(max_examples=400)
@given(st.sampled_from(["address", "port", "positive_int", "seconds", "ifname", "source",
                        "endpoint", "address_port", "destination", "when", "listen"]), ARG_TEXT)
def test_argument_types_refuse_anything_they_cannot_use_with_their_own_error(name, text):
    import argparse
    try:
        getattr(argtypes, name)(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)


@settings(max_examples=300)
@given(ARG_TEXT)
def test_metrics_listen_refuses_with_a_value_error(text):
    try:
        parse_listen(text)
    except ValueError as e:
        assert "\n" not in str(e)
