"""probe.py: a remote IP's gateway is unreachable after `misses` silent intervals,
reachable again at its first answer; the echo request is well formed."""

from __future__ import annotations

import struct

from egress_agent.probe import Prober, _checksum, _is_reply, echo


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_peer_is_down_after_three_silent_intervals_and_up_at_its_first_answer():
    clock = Clock()
    p = Prober(interval=0.25, misses=3, clock=clock)  # binary fractions: exact sums
    assert not p.observe({"10.250.1.2"}, ())  # first round: reachable until proven silent
    for _ in range(3):
        clock.t += 0.25
        assert not p.observe({"10.250.1.2"}, ()) and p.unreachable() == frozenset()
    clock.t += 0.125
    assert p.observe({"10.250.1.2"}, ()) and p.unreachable() == {"10.250.1.2"}
    clock.t += 0.25
    assert not p.observe({"10.250.1.2"}, ())  # no change: no trigger
    clock.t += 0.25
    assert p.observe({"10.250.1.2"}, {"10.250.1.2"}) and p.unreachable() == frozenset()


def test_a_peer_no_longer_configured_is_forgotten_and_a_stranger_ignored():
    clock = Clock()
    p = Prober(interval=0.2, misses=3, clock=clock)
    p.observe({"a"}, ())
    clock.t += 1.0
    assert p.observe({"a"}, {"b"}) and p.unreachable() == {"a"}
    assert p.observe({"c"}, ()) and p.unreachable() == frozenset() and set(p.heard) == {"c"}


def test_the_echo_request_checks_out_and_replies_are_told_apart():
    pkt = echo(0x1234, 7)
    assert pkt[0] == 8 and _checksum(pkt) == 0 and struct.unpack("!HH", pkt[4:8]) == (0x1234, 7)
    reply = bytes([0]) + pkt[1:]
    ip_header = bytes([0x45]) + bytes(19)
    assert _is_reply(ip_header + reply, raw=True, ident=0x1234)
    assert not _is_reply(ip_header + reply, raw=True, ident=0x4321)  # another process's
    assert not _is_reply(ip_header + pkt, raw=True, ident=0x1234)  # a request, not a reply
    assert _is_reply(reply, raw=False, ident=0)


def test_without_the_right_to_send_icmp_the_probe_says_so_once_and_blocks_nothing(monkeypatch):
    import threading

    from egress_agent import probe

    def refused():
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(probe, "open_socket", refused)
    stopping, said, changes = threading.Event(), [], []
    p = Prober(interval=0.01, misses=3)
    rounds = iter(range(30))

    def peers():
        if next(rounds, None) is None:
            stopping.set()
        return frozenset({"10.250.1.2"})

    p.run(stopping, peers, lambda: changes.append(1), said.append)
    assert len(said) == 1 and "ping_group_range" in said[0]
    assert p.unreachable() == frozenset() and not changes
