"""The state store cannot wedge or lie (issue 10), on a real kernel.

The truth is what the origin's echo server saw. Each test has its own lab
(unique prefix); a tmpfs a test mounts over its own lab's state dir is always
unmounted in a `finally`, before the lab is torn down.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from agent_helpers import agent, app_lease, apply, demo_config, in_block, status
from daemon_helpers import Prober, our_table, started, wait_until, without_m43

from egress_agent.config import load
from egress_agent.lab.echo import child_env
from egress_agent.lab.topology import Lab

BILLING_1, BILLING_2 = "203.0.113.10", "203.0.113.11"
ECHO = "192.0.2.10"


def state_dir(config: str) -> str:
    return load(config).config.state_dir


def who(lab: Lab, config: str, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = agent(lab, "who", target, "-c", config, *extra, check=False)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc
    return proc


def holders(lab: Lab, config: str, target: str, *extra: str) -> list[str]:
    return [h["workload"] for h in json.loads(who(lab, config, target, "--json", *extra).stdout)]


@contextmanager
def tmpfs(path: str, size: str):
    """A tmpfs of the test's own at `path` (made before any agent process starts, so an
    agent in a private mount namespace sees the same filesystem); always unmounted."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


# --- a corrupt store: quarantined, the kernel adopted -----------------------------

def test_truncated_store_is_quarantined_and_the_kernel_adopted(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    st = status(lab, config)
    m42 = app_lease(st, "m42")
    path = os.path.join(state_dir(config), "allocations.json")
    with lab.hold("m42", ECHO, 8080) as held:
        assert in_block(held.first, m42), held.first
        table = our_table(lab)

        # between runs: truncated (a crash of the filesystem, a bad restore)
        with open(path, "rb+") as f:
            f.truncate(os.path.getsize(path) // 2)
        truncated = open(path, "rb").read()
        # a plan says what apply would do and moves nothing
        plan = agent(lab, "plan", "--against-running", "-c", config, "--json")
        assert json.loads(plan.stdout)["changed"] is False and "corrupt" in plan.stderr
        assert open(path, "rb").read() == truncated
        proc = agent(lab, "apply", "-c", config, "--json")
        r = json.loads(proc.stdout)
        assert r["adopted"] and not r["changed"] and r["quarantined"], r
        assert "allocation store corrupt" in proc.stderr and path in proc.stderr, proc.stderr
        assert open(r["quarantined"], "rb").read() == truncated
        assert our_table(lab) == table
        assert status(lab, config)["workloads"] == st["workloads"]
        assert held.ping() == held.first
        assert in_block(lab.probe("m42", ECHO, 8080), m42), lab.last_result

        # the daemon's start does the same
        with open(path, "w") as f:
            f.write('{"version": 1, "wids": {"m42": "one"}}')
        with started(lab, config, resync=30.0) as ag:
            s = ag.syncs(trigger="start")[0]
            assert s["adopted"] and not s["changed"] and s["quarantined"], s
            warn = ag.records(level="warning", path=path)
            assert warn and "wids" in warn[0]["reason"], ag.tail()
            assert held.ping() == held.first
            assert in_block(lab.probe("m42", ECHO, 8080), m42), lab.last_result
            assert not ag.errors(), ag.errors()
        assert status(lab, config)["workloads"] == st["workloads"]
    moved = [n for n in os.listdir(state_dir(config)) if n.startswith("allocations.json.corrupt-")]
    assert len(moved) == 2, moved


def test_state_dir_lost_who_names_the_adopted_holder(lab: Lab) -> None:
    config = demo_config(lab)
    apply(lab, config)
    m42 = app_lease(status(lab, config), "m42")
    with lab.hold("m42", ECHO, 8080) as held:
        shutil.rmtree(state_dir(config))
        r = apply(lab, config)
        assert r["adopted"] and not r["changed"], r
        assert holders(lab, config, f"{m42['ipv4']}:{held.first.port}") == ["m42"]
        assert holders(lab, config, m42["ipv6"]) == ["m42"]
        assert held.ping() == held.first
        assert "still held" in who(lab, config, f"{m42['ipv4']}:{held.first.port}").stdout


# --- a read-only state dir during a failover ----------------------------------------

def test_read_only_state_dir_during_failover_and_back(lab: Lab) -> None:
    config = demo_config(lab)
    state = state_dir(config)
    with tmpfs(state, "1m"):
        with started(lab, config, resync=30.0) as ag:  # only netlink explains a fast switch
            m42 = app_lease(status(lab, config), "m42")
            assert m42["ipv4"] == BILLING_1, m42
            with Prober(lab, "m42", ECHO, 8081, proto="udp", interval=0.005) as pr:
                pr.wait_first(lambda a: a["src"] == BILLING_1, timeout=5)
                subprocess.run(["mount", "-o", "remount,ro", state], check=True)

                t0 = time.time()
                lab.address_del(BILLING_1)
                out = pr.wait_first(lambda a: a["src"] == BILLING_2, after=t0, timeout=5,
                                    what="failover to billing-2")
                err = wait_until(lambda: ag.records("allocation store write failed; the kernel "
                                                    "has the change, the write is retried"),
                                 5, what="the store error")[0]
                assert err["errno"] == "EROFS" and err["path"].startswith(state), err

                t1 = time.time()
                lab.address_add(BILLING_1)
                back = pr.wait_first(lambda a: a["src"] == BILLING_1, after=t1, timeout=5,
                                     what="fail-back to billing-1 without a resync")
                time.sleep(0.2)
                later = [a for a in pr.answers if a["sent"] >= back["recv"]]
                assert later and all(a["src"] == BILLING_1 and
                                     m42["ports"][0] <= a["sport"] <= m42["ports"][1]
                                     for a in later + [back]), later[:5]
                assert back["recv"] - t1 < 5.0  # not the 30 s resync
                print(f"read-only state dir: failover {1000 * (out['recv'] - t0):.0f} ms, "
                      f"fail-back {1000 * (back['recv'] - t1):.0f} ms (resync 30 s)")

                # retried while read-only: fails again, and is retried later
                wait_until(lambda: [r for r in ag.syncs(trigger="store-retry") if "store_error" in r],
                           10, what="a failed retry while read-only")
                writes = len(ag.syncs(trigger="store-retry"))
                subprocess.run(["mount", "-o", "remount,rw", state], check=True)
                t_rw = time.time()
                # the write is retried (backoff) once the state dir is writable
                ok = wait_until(lambda: [s for s in ag.syncs(trigger="store-retry")[writes:]
                                         if "store_error" not in s], 40,
                                what="a successful store retry")
                assert not ok[0]["changed"], ok
                print(f"store write retried {len(ag.syncs(trigger='store-retry'))} time(s); "
                      f"written {time.time() - t_rw:.1f} s after the remount rw")
            ag.check_alive()
        st = status(lab, config)
        assert app_lease(st, "m42") == m42
        assert not [l for w in st["workloads"] for l in w["leases"] if l["temporary"]], st
        # the history has the failover, at the times the kernel took it
        assert holders(lab, config, f"{BILLING_2}:{out['sport']}", "--at",
                       iso(out["recv"])) == ["m42"]
        # now: released; while the failover's UDP flows live in conntrack the block
        # lingers (attribution), and `who` says so rather than naming a holder
        now = json.loads(who(lab, config, f"{BILLING_2}:{out['sport']}", "--json").stdout)
        assert all(h["workload"] == "m42" and h["state"] == "lingering" and h["released"]
                   for h in now), now


# --- a full state dir mid-append ---------------------------------------------------

def test_full_state_dir_tears_history_and_who_still_answers(lab: Lab) -> None:
    config = demo_config(lab)
    state = state_dir(config)
    with tmpfs(state, "64k"):
        apply(lab, config)
        st = status(lab, config)
        m42, m43 = app_lease(st, "m42"), app_lease(st, "m43")
        history = os.path.join(state, "history.jsonl")
        # leave 30 bytes of the history's last page, then fill the filesystem:
        # the next append is cut inside its first record
        size = os.path.getsize(history)
        with open(history, "ab") as f:
            f.write(b"\n" * ((4096 - 30 - size) % 4096))
        with open(os.path.join(state, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC

        smaller = os.path.join(lab.state_dir, "without-m43.yaml")
        with open(smaller, "w") as f:
            f.write(without_m43(lab))
        proc = agent(lab, "apply", "-c", smaller, check=False)
        assert proc.returncode == 6 and "No space left on device" in proc.stderr, proc
        assert "Traceback" not in proc.stderr
        assert not open(history, "rb").read().endswith(b"\n")  # torn
        assert "10.0.1.3" not in our_table(lab)  # the kernel took it

        p = who(lab, config, f"{m42['ipv4']}:{m42['ports'][0]}")
        assert p.returncode == 0 and p.stdout.startswith("m42: ") and "skipped 1 line" in p.stderr, p
        assert in_block(lab.probe("m42", ECHO, 8080), m42), lab.last_result

        os.unlink(os.path.join(state, "filler"))
        assert agent(lab, "apply", "-c", smaller).returncode == 0
        assert holders(lab, config, f"{m43['ipv4']}:{m43['ports'][0]}") == []
        assert holders(lab, config, f"{m42['ipv4']}:{m42['ports'][0]}") == ["m42"]
        assert "skipped 1 line" in who(lab, config, f"{m42['ipv4']}:{m42['ports'][0]}").stderr


# --- one agent per network namespace ----------------------------------------------

HOLD_LOCK = ("import sys; from egress_agent import nslock; l = nslock.acquire(); "
             "print('held', flush=True); sys.stdin.read()")


def test_second_apply_or_agent_in_the_namespace_refuses(lab: Lab) -> None:
    config = demo_config(lab)
    # an apply that holds the lock (deterministic: a process of ours holding it)
    holder = subprocess.Popen(lab.agent_prefix() + [sys.executable, "-c", HOLD_LOCK],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=child_env(), cwd="/")
    try:
        assert holder.stdout.readline() == "held\n"
        p = agent(lab, "apply", "-c", config, check=False)
        assert p.returncode == 5 and p.stdout == "", p
        assert len(p.stderr.splitlines()) == 1 and f"pid {holder.pid}" in p.stderr, p.stderr
        assert our_table(lab) is None  # nothing was done
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)

    # applies at once: each one either applies or refuses; nothing crashes
    cmd = lab.agent_prefix() + [sys.executable, "-m", "egress_agent.cli", "apply", "-c", config]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env(), cwd="/") for _ in range(4)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert {c for c, _ in results} <= {0, 5} and 0 in {c for c, _ in results}, results
    print(f"4 applies at once: exit codes {sorted(c for c, _ in results)}")
    assert not [e for _, e in results if "Traceback" in e], results
    assert sorted(os.listdir(state_dir(config))) == ["allocations.json", "history.jsonl"]
    m42 = app_lease(status(lab, config), "m42")
    assert in_block(lab.probe("m42", ECHO, 8080), m42), lab.last_result
    assert holders(lab, config, f"{m42['ipv4']}:{m42['ports'][0]}") == ["m42"]

    # while the daemon runs: apply, teardown and a second daemon refuse, naming it
    with started(lab, config, resync=30.0) as ag:
        for args in (["apply", "-c", config], ["teardown"], ["run", "-c", config, "--metrics", "off"]):
            p = agent(lab, *args, check=False)
            assert p.returncode == 5 and f"pid {ag.proc.pid}" in p.stderr, (args, p)
            assert "Traceback" not in p.stderr
        ag.check_alive()
        assert our_table(lab) is not None
        assert in_block(lab.probe("m42", ECHO, 8080), m42), lab.last_result
        assert not ag.errors(), ag.errors()
    assert holders(lab, config, f"{m42['ipv4']}:{m42['ports'][0]}") == ["m42"]
