"""egress_agent.conntrack against the kernel and against conntrack-tools.

Every entry lives in a scratch network namespace made for the test (deleted
in a finally); nothing here reads or writes the host's conntrack table.
Entries are created over ctnetlink (no packets are sent).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections import Counter

import pytest

from egress_agent import conntrack as ct
from egress_agent import names

from conntrack_insert import Entry, InsertError, generate, insert, scratch_netns

OURS = names.OURS_FLAG
OURS_MASK = f"0x{OURS:08x}/0x{OURS:08x}"


@pytest.fixture
def ns():
    with scratch_netns("eact") as name:
        yield name


# --- conntrack-tools as the reference ------------------------------------------------

def conntrack_tools(ns: str, *args: str) -> list[str]:
    """Lines of `conntrack -L ARGS -o extended` inside namespace `ns`."""
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "conntrack", "-L",
                           *args, "-o", "extended"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if ln.strip()]


def parse_line(line: str) -> dict:
    """One `conntrack -L -o extended` line: family, protocol, orig/reply tuples, mark, zone."""
    tok = line.split()
    out = {"family": tok[0], "protocol": int(tok[3]), "orig": {}, "reply": {}, "mark": 0,
           "zone": 0, "state": tok[5] if "=" not in tok[5] else None}
    cur = out["orig"]
    for t in tok:
        if "=" not in t:
            continue
        k, v = t.split("=", 1)
        if k == "src" and "src" in out["orig"]:
            cur = out["reply"]
        if k in ("src", "dst", "sport", "dport", "type", "code", "id"):
            cur[k] = v
        elif k in ("mark", "zone"):
            out[k] = int(v)
    return out


def tools_groups(ns: str, *args: str) -> Counter:
    """The same grouping as dump_groups(), computed from conntrack-tools' output."""
    groups: Counter = Counter()
    for line in conntrack_tools(ns, *args):
        e = parse_line(line)
        groups[ct.Group(e["mark"], e["protocol"], e["orig"]["dst"],
                        int(e["orig"].get("dport", 0)), e["reply"]["dst"])] += 1
    return groups


def expected_groups(entries: list[Entry], mark: int | None = OURS,
                    mask: int | None = OURS) -> Counter:
    want: Counter = Counter()
    for e in entries:
        if mark is not None and (e.mark & mask) != (mark & mask):
            continue
        port = 0 if e.protocol in (1, 58) else e.dport
        want[ct.Group(e.mark, e.protocol, e.destination, port, e.egress_address)] += 1
    return want


# --- a known table ----------------------------------------------------------------------

def known_entries() -> list[Entry]:
    """TCP and UDP, IPv4 and IPv6, several workloads, egress addresses and destinations,
    some without OURS_FLAG, plus entries only the generic walker reads (ICMP, a zone)."""
    entries: list[Entry] = []
    sport = 20000
    rport = 30000
    dests4 = ["203.0.113.10", "203.0.113.20", "198.51.100.7"]
    dests6 = ["2001:db8:d::1", "2001:db8:d::2"]
    for wid in range(1, 8):
        eid = 1 + wid % 3
        for di, dst in enumerate(dests4 + dests6):
            v6 = ":" in dst
            for proto, dport in ((6, 443), (17, 53), (6, 8080)):
                n = (wid + di + dport) % 4          # 0..3 connections per group
                for _ in range(n):
                    sport += 1
                    rport += 1
                    ours = (wid + sport) % 5 != 0   # ~20% without the flag
                    mark = names.lease_mark(wid, eid) | (OURS if ours else 0)
                    entries.append(Entry(
                        proto, f"fd00::{wid:x}" if v6 else f"10.1.0.{wid}", sport, dst, dport,
                        f"2001:db8:e::{eid}" if v6 else f"192.0.2.{eid}", rport, mark))
    # unmarked traffic that is not the agent's at all
    entries.append(Entry(6, "10.9.9.9", 40000, "203.0.113.10", 443, "10.9.9.9", 40000, 0))
    entries.append(Entry(17, "10.9.9.9", 40001, "203.0.113.10", 53, "10.9.9.9", 40001, 0x123))
    # slow path: ICMP echo (v4 and v6), a non-default zone
    entries.append(Entry(1, "10.1.0.1", 77, "203.0.113.10", 0, "192.0.2.2", 77,
                         names.lease_mark(1, 2) | OURS))
    entries.append(Entry(58, "fd00::1", 78, "2001:db8:d::1", 0, "2001:db8:e::2", 78,
                         names.lease_mark(1, 2) | OURS))
    entries.append(Entry(6, "10.1.0.2", 41000, "203.0.113.20", 443, "192.0.2.3", 41000,
                         names.lease_mark(2, 3) | OURS, zone=7))
    return entries


@pytest.fixture
def table(ns):
    entries = known_entries()
    assert insert(entries, netns=ns) == len(entries)
    return ns, entries


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("threaded", [True, False])
def test_dump_groups_equals_expected_and_conntrack_tools(table, threaded):
    ns, entries = table
    stats = ct.DumpStats()
    got = ct.dump_groups(netns=ns, stats=stats, threaded=threaded)
    want = expected_groups(entries)
    assert got == dict(want)
    assert got == dict(tools_groups(ns, "--mark", OURS_MASK))
    # The kernel filtered: entries without the bit never reached us.
    assert stats.kernel_filtered
    assert stats.messages == sum(want.values())
    assert stats.messages < len(entries)
    assert stats.slow == 3 and stats.fast == stats.messages - 3   # icmp, icmpv6, zone
    assert all(g.mark & OURS for g in got)


def test_dump_groups_unfiltered_and_other_masks(table):
    ns, entries = table
    everything = ct.dump_groups(None, None, netns=ns)
    assert everything == dict(expected_groups(entries, None))
    assert everything == dict(tools_groups(ns))
    assert sum(everything.values()) == len(entries)
    # one egress id, by mark bits: OURS and eid 2
    mark, mask = OURS | (2 << names.EID_SHIFT), OURS | names.EID_MASK
    stats = ct.DumpStats()
    got = ct.dump_groups(mark, mask, netns=ns, stats=stats)
    assert got == dict(expected_groups(entries, mark, mask))
    assert got == dict(tools_groups(ns, "--mark", f"0x{mark:08x}/0x{mask:08x}"))
    assert stats.messages == sum(got.values())
    # an exact mark (mask None: all bits)
    exact = names.lease_mark(3, 1) | OURS
    assert ct.dump_groups(exact, None, netns=ns) == dict(expected_groups(entries, exact, 0xFFFFFFFF))


def test_dump_groups_by_family(table):
    ns, entries = table
    v4 = ct.dump_groups(family=socket.AF_INET, netns=ns)
    v6 = ct.dump_groups(family=socket.AF_INET6, netns=ns)
    want = expected_groups(entries)
    assert v4 == {g: n for g, n in want.items() if ":" not in g.destination}
    assert v6 == {g: n for g, n in want.items() if ":" in g.destination}
    assert v4 == dict(tools_groups(ns, "-f", "ipv4", "--mark", OURS_MASK))
    assert v6 == dict(tools_groups(ns, "-f", "ipv6", "--mark", OURS_MASK))


def test_fast_path_agrees_with_generic_walker(table, monkeypatch):
    ns, entries = table
    fast = ct.dump_groups(None, None, netns=ns)
    monkeypatch.setattr(ct.V4, "valid", lambda key: False)
    monkeypatch.setattr(ct.V6, "valid", lambda key: False)
    stats = ct.DumpStats()
    slow = ct.dump_groups(None, None, netns=ns, stats=stats)
    assert stats.fast == 0 and stats.slow == len(entries)
    assert slow == fast


def test_dump_entries_matches_conntrack_tools(table):
    ns, entries = table
    ours = [e for e in ct.dump_entries(OURS, OURS, netns=ns)]
    assert len(ours) == sum(1 for e in entries if e.mark & OURS)

    def norm_ours(e: dict) -> tuple:
        o, r = e["orig"], e["reply"]
        ports = ((o["sport"], o["dport"], r["sport"], r["dport"]) if "icmp_id" not in o
                 else (o["icmp_type"], o["icmp_code"], o["icmp_id"], r["icmp_id"]))
        return (e["protocol"], o["src"], o["dst"], r["src"], r["dst"], *ports, e["mark"],
                e["zone"], e["state"])

    def norm_tools(e: dict) -> tuple:
        o, r = e["orig"], e["reply"]
        ports = ((int(o["sport"]), int(o["dport"]), int(r["sport"]), int(r["dport"]))
                 if "type" not in o else (int(o["type"]), int(o["code"]), int(o["id"]),
                                          int(r["id"])))
        return (e["protocol"], o["src"], o["dst"], r["src"], r["dst"], *ports, e["mark"],
                e["zone"], e["state"])

    tools = [parse_line(ln) for ln in conntrack_tools(ns, "--mark", OURS_MASK)]
    assert sorted(map(norm_ours, ours)) == sorted(map(norm_tools, tools))
    tcp = [e for e in ours if e["protocol"] == 6]
    assert tcp and all(e["state"] == "ESTABLISHED" for e in tcp)
    assert all(e["timeout"] and 0 < e["timeout"] <= 600 for e in ours)


@pytest.mark.parametrize("recvmmsg", [True, False])
def test_many_entries_across_batches(ns, recvmmsg, monkeypatch):
    """Enough entries for many chunks and recvmmsg batches, threaded and not; and the
    plain recv_into fallback for systems without recvmmsg."""
    if not recvmmsg:
        monkeypatch.setattr(ct, "_mmsg", False)
    entries = list(generate(30_000, workloads=300, destinations=20, egress_ips=5,
                            udp_share=0.1, ipv6_share=0.05))
    insert(entries, netns=ns)
    want = dict(expected_groups(entries))
    for threaded in (True, False):
        stats = ct.DumpStats()
        assert ct.dump_groups(netns=ns, stats=stats, threaded=threaded) == want
        assert stats.messages == sum(want.values()) == 27_000
        assert stats.recvs > (ct.RECV_BATCH if recvmmsg else 100)
    assert want == dict(tools_groups(ns, "--mark", OURS_MASK))
    assert ct.read_counts(ns)["count"] == 30_000


def test_read_counts(ns):
    c0 = ct.read_counts(ns)
    assert c0["count"] == 0
    with open(ct.PROC_MAX) as f:
        assert c0["max"] == int(f.read())
    insert([Entry(6, "10.1.0.1", 1000 + i, "203.0.113.1", 443, "192.0.2.1", 2000 + i, OURS)
            for i in range(5)], netns=ns)
    c = ct.read_counts(ns)
    assert c["count"] == 5
    for name in ("insert_failed", "drop", "early_drop", "insert", "invalid"):
        assert name in c["stats"]
    assert c["stats"]["entries"] == 5          # table-wide, not summed over CPUs
    assert c["stats"]["insert"] >= 5


def test_read_stats_sums_cpus_and_tolerates_missing(tmp_path):
    p = tmp_path / "nf_conntrack"
    p.write_text("entries  clashres found new invalid insert insert_failed drop early_drop\n"
                 "0000000a  00000001 00000002 00000000 00000003 00000010 00000001 00000002 00000000\n"
                 "0000000a  00000000 00000001 00000000 00000004 0000000f 00000000 00000003 00000001\n")
    s = ct.read_stats(str(p))
    assert s == {"entries": 10, "clashres": 1, "found": 3, "new": 0, "invalid": 7,
                 "insert": 0x1f, "insert_failed": 1, "drop": 5, "early_drop": 1}
    assert ct.read_stats(str(tmp_path / "missing")) == {}


def test_enobufs_retries_once_then_raises(table, monkeypatch):
    ns, entries = table
    real = ct._dump_once
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return real(*a, **kw)

    monkeypatch.setattr(ct, "_dump_once", flaky)
    stats = ct.DumpStats()
    assert ct.dump_groups(netns=ns, stats=stats) == dict(expected_groups(entries))
    assert stats.enobufs_retries == 1

    def always(*a, **kw):
        raise OSError(errno.ENOBUFS, "No buffer space available")

    monkeypatch.setattr(ct, "_dump_once", always)
    with pytest.raises(ct.DumpInterrupted):
        ct.dump_groups(netns=ns)


def test_netlink_error_is_raised(ns):
    # A malformed request (a 2-byte CTA_MARK) is answered with NLMSG_ERROR (ERANGE on 6.x).
    bad = ct.dump_request(1, socket.AF_UNSPEC)[:20] + b"\x06\x00\x08\x00\xff\xff\x00\x00"
    bad = len(bad).to_bytes(4, "little") + bad[4:]
    for threaded in (True, False):
        sock = ct.open_socket(ns)
        try:
            with pytest.raises(OSError) as exc:
                for buf, segs in ct._chunks(sock, bad, ct.DumpStats(), threaded=threaded):
                    for off, end in segs:
                        ln = int.from_bytes(buf[off:off + 4], "little")
                        typ = int.from_bytes(buf[off + 4:off + 6], "little")
                        assert not ct._control(buf, off, ln, typ)
        finally:
            sock.close()
        assert exc.value.errno in (errno.EINVAL, errno.ERANGE)


def test_insert_guards(ns):
    with pytest.raises(ValueError):
        insert([Entry(6, "10.1.0.1", 1, "203.0.113.1", 443, "192.0.2.1", 2)])
    e = Entry(6, "10.1.0.1", 1, "203.0.113.1", 443, "192.0.2.1", 2, OURS)
    insert([e], netns=ns)
    with pytest.raises(InsertError) as exc:
        insert([e], netns=ns)
    assert exc.value.errno == errno.EEXIST


def test_scratch_namespace_is_deleted():
    with scratch_netns("eact") as name:
        assert os.path.exists(f"/run/netns/{name}")
        insert([Entry(17, "10.1.0.1", 1, "203.0.113.1", 53, "192.0.2.1", 2, OURS)], netns=name)
    assert not os.path.exists(f"/run/netns/{name}")


def test_benchmark_script_runs_small():
    """bench/conntrack_read.py end to end at a small size (it checks ours == conntrack-tools)."""
    import json
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    before = {n for n in os.listdir("/run/netns") if n.startswith("eact")}
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "conntrack_read.py"),
                           "--sizes", "3000", "--runs", "1", "--no-pyroute2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    row = summary["sizes"]["3000"]
    assert row["created"] == 3000
    assert row["ours"]["entries"] == row["tools"]["entries"] == 2700
    assert row["ours"]["peak_rss_mb"] > 0 and row["tools"]["peak_rss_mb"] > 0
    assert {n for n in os.listdir("/run/netns") if n.startswith("eact")} <= before
