"""nft/libnft.py's in_child: a listing read in a forked child, so its heap dies with
it. What comes back is the child's value, its error, or word that it died."""

import os
import signal

import pytest

from egress_agent.nft import NftError
from egress_agent.nft.libnft import in_child


def test_the_childs_value_comes_back_and_its_memory_stays_there():
    before = open("/proc/self/statm").read().split()[1]
    got = in_child(lambda: (os.getpid(), {"x": frozenset({(1, "a")})}, len(bytearray(200 << 20))))
    assert got[0] != os.getpid() and got[1] == {"x": frozenset({(1, "a")})} and got[2] == 200 << 20
    after = open("/proc/self/statm").read().split()[1]
    assert int(after) - int(before) < (50 << 20) // os.sysconf("SC_PAGE_SIZE")


def test_an_nft_error_in_the_child_is_raised_here_with_its_message():
    def refuse():
        raise NftError("Error: No such file or directory")
    with pytest.raises(NftError, match="No such file or directory"):
        in_child(refuse)


def test_any_other_error_is_named():
    with pytest.raises(NftError, match="KeyError: 'snat4'"):
        in_child(lambda: {}["snat4"])


def test_a_child_that_dies_without_an_answer_is_an_error_not_a_hang():
    with pytest.raises(NftError, match="ended without an answer .killed by signal 9"):
        in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_the_child_does_not_run_this_processs_signal_handlers():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda *a: seen.append(os.getpid()))
    try:
        with pytest.raises(NftError, match="killed by signal 15"):
            in_child(lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen == []
