"""The gateway pair's keepalived and conntrackd files (egress_agent.pair).

The kernel test (tests/integration/test_gateway_pair.py) runs both daemons with
these files; here, what each setting must say, and the mistakes refused."""

from __future__ import annotations

import dataclasses

import pytest

from egress_agent.pair import Member, Pair, conntrackd_conf, keepalived_conf

PAIR = Pair(id="app", vrid=51, fabric="10.200.0.0/24",
            members=(Member("g1", "fabr0", "10.200.0.2", 150),
                     Member("g2", "fabr0", "10.200.0.3", 100)),
            vips=(("10.200.0.100/24", "fabr0"), ("203.0.113.140/24", "up0")), track=("up0",))


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_keepalived_each_host_names_itself_and_its_peer() -> None:
    for me, peer, prio in (("g1", "10.200.0.3", "150"), ("g2", "10.200.0.2", "100")):
        text = lines(keepalived_conf(PAIR, me, f"/usr/sbin/notify {me}"))
        assert f"router_id {me}" in text and f"priority {prio}" in text
        assert text[text.index("unicast_peer {") + 1] == peer
        assert f'notify_master "/usr/sbin/notify {me} primary"' in text
        assert f'notify_backup "/usr/sbin/notify {me} backup"' in text
        assert f'notify_fault "/usr/sbin/notify {me} fault"' in text


def test_keepalived_holds_every_vip_and_never_preempts() -> None:
    text = lines(keepalived_conf(PAIR, "g1", "n"))
    assert "10.200.0.100/24 dev fabr0" in text and "203.0.113.140/24 dev up0" in text
    assert "state BACKUP" in text and "nopreempt" in text and "version 3" in text
    assert "advert_int 0.1" in text
    tracked = text[text.index("track_interface {") + 1:]
    assert tracked[:2] == ["fabr0", "up0"]


def test_conntrackd_syncs_with_the_peer_and_ignores_the_fabric() -> None:
    text = lines(conntrackd_conf(PAIR, "g2", "/run/x"))
    assert "Mode FTFW {" in text
    assert "IPv4_address 10.200.0.3" in text and "IPv4_Destination_Address 10.200.0.2" in text
    assert "Interface fabr0" in text
    ignore = text[text.index("Address Ignore {") + 1:]
    assert ignore[:2] == ["IPv4_address 127.0.0.1", "IPv4_address 10.200.0.0/24"]
    assert "Path /run/x/conntrackd.ctl" in text and "LockFile /run/x/conntrackd.lock" in text


@pytest.mark.parametrize("change, message", [
    (dict(vrid=0), "VRRP allows 1-255"),
    (dict(members=(Member("g1", "fabr0", "10.200.0.2", 100),
                   Member("g2", "fabr0", "10.200.0.3", 100))), "priorities must differ"),
    (dict(members=(Member("g1", "fabr0", "10.200.0.2", 150),
                   Member("g1", "fabr0", "10.200.0.3", 100))), "two different hosts"),
    (dict(members=(Member("g1", "fab0", "10.200.0.2", 150),
                   Member("g2", "fabr0", "10.200.0.3", 100))), "'fab0': conntrackd reads"),
    (dict(track=("a-name-far-too-long",)), "not a Linux interface name"),
    (dict(members=(Member("g1", "fabr0", "10.9.0.2", 150),
                   Member("g2", "fabr0", "10.200.0.3", 100))), "outside the fabric"),
    (dict(advert_int=0.001), "0.01-40.95"),
])
def test_mistakes_are_refused_with_what_is_wrong(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PAIR, **change)


def test_an_unknown_host_is_an_error() -> None:
    with pytest.raises(KeyError, match="no host 'g3'"):
        keepalived_conf(PAIR, "g3", "n")
