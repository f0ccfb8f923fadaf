"""The one ADDR:PORT parser (argtypes.endpoint) and its writer, which the CLI,
verify --echo, the metrics listener and the lab's echo server share."""

import argparse

import pytest
from hypothesis import given, strategies as st

from egress_agent.argtypes import endpoint, endpoint_text
from egress_agent.lab.echo import main as echo_main
from egress_agent.metrics import parse_listen


@pytest.mark.parametrize("text, expect", [
    ("192.0.2.10:8080", ("192.0.2.10", 8080)),
    ("203.0.113.1:1", ("203.0.113.1", 1)),
    ("198.51.100.7:65535", ("198.51.100.7", 65535)),
    ("[2001:db8::10]:8080", ("2001:db8::10", 8080)),
    ("[2001:DB8:0::10]:53", ("2001:db8::10", 53)),  # any spelling, read compressed
    ("[::1]:9469", ("::1", 9469)),
])
def test_endpoint_reads_v4_and_bracketed_v6(text, expect):
    assert endpoint(text) == expect


@pytest.mark.parametrize("text, words", [
    ("192.0.2.10", "'192.0.2.10' is not ADDR:PORT"),
    ("192.0.2.10:", "'' is not a port"),
    ("192.0.2.10:0", "'0' is not a port (1-65535)"),
    ("192.0.2.10:65536", "'65536' is not a port"),
    ("192.0.2.10:http", "'http' is not a port"),
    ("192.0.2.10:８０", "is not a port"),  # fullwidth digits are not a port
    ("example.org:80", "'example.org' is not an IP address"),
    ("192.0.2.300:80", "'192.0.2.300' is not an IP address"),
    ("2001:db8::10:8080", "is not ADDR:PORT"),  # v6 without brackets: where would the port be?
    ("[2001:db8::10]", "is not ADDR:PORT"),
    ("[2001:db8::10:8080", "is not ADDR:PORT"),
    ("[2001:db8::10]8080", "is not ADDR:PORT"),
    ("[192.0.2.10:80", "is not ADDR:PORT"),
    ("[]:80", "'' is not an IP address"),
    ("", "is not ADDR:PORT"),
])
def test_endpoint_refuses_bad_input_saying_what_is_wrong(text, words):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        endpoint(text)
    assert words in str(e.value)
    assert isinstance(e.value, ValueError)  # callers outside argparse catch ValueError


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
def test_endpoint_reads_back_what_endpoint_text_writes(addr, port):
    assert endpoint(endpoint_text(str(addr), port)) == (str(addr), port)


def test_metrics_listen_and_echo_server_use_the_same_parser(capsys):
    with pytest.raises(ValueError, match=r"^--metrics 2001:db8::1:80: .* is not ADDR:PORT"):
        parse_listen("2001:db8::1:80")
    with pytest.raises(SystemExit) as e:
        echo_main(["--tcp", "[2001:db8::1]"])
    assert e.value.code == 2
    assert "'[2001:db8::1]' is not ADDR:PORT" in capsys.readouterr().err
