"""rapidyaml's error handler writes to fd 2, so config._quiet_ryml_json points fd 2
at a memory file while it parses. fd 2 is the process's: two parses at once (the
daemon's start loads the config while its inotify thread reads the include globs,
config.watched_paths) could leave fd 2 on a memory file for good, and every later log
line of the daemon went there (seen: bench/failover.py, 1 start in 8). fd 2 must be
what it was, whatever the threads do."""

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

from gen_config import config_text  # noqa: E402

from egress_agent import config as C  # noqa: E402


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_fd2_is_restored_when_threads_parse_at_once(tmp_path):
    text = config_text(2000, str(tmp_path)).encode("ascii")
    bad = b"a: [1, 2\nb: c\n"  # refused: rapidyaml reports on fd 2, then raises
    before = os.fstat(2)
    errors = []

    def parse(data: bytes) -> None:
        try:
            for _ in range(30):
                C._quiet_ryml_json(data)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=parse, args=(text if i % 2 else bad,))
               for i in range(6)]
    saved = os.dup(2)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        now = os.fstat(2)
        where = os.readlink("/proc/self/fd/2")
    finally:
        os.dup2(saved, 2)  # the test run's own stderr back, whatever happened
        os.close(saved)
    assert not errors
    assert _same_file(now, before), where
