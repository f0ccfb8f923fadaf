"""store.event_record writes a history line by hand (a full sync at 100k workloads
writes 100k): it is exactly what json.dumps wrote for the same record."""

import json

from hypothesis import given, strategies as st

from egress_agent.alloc import EVENT_KINDS, Event, Lease
from egress_agent.store import event_record

TEXT = st.text(max_size=12)  # any text: quotes, backslashes, controls, non-ASCII
LEASE = st.builds(Lease, TEXT, TEXT, st.none() | TEXT,
                  st.none() | st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
                  st.none() | TEXT, st.booleans())


@given(TEXT, st.sampled_from(EVENT_KINDS), LEASE, st.booleans())
def test_a_history_line_is_what_json_dumps_writes(at, kind, lease, adopted):
    record = {"at": at, "event": kind, **lease.to_json(), **({"adopted": True} if adopted else {})}
    line = event_record(at, Event(kind, lease), adopted)
    assert line == json.dumps(record, separators=(",", ":"))
    assert json.loads(line) == record


WORKLOAD = st.text(alphabet="abw-é\"\\", min_size=1, max_size=4)


@given(st.dictionaries(st.tuples(WORKLOAD, st.sampled_from(["ip1", "ip2"])), LEASE, max_size=6),
       st.dictionaries(WORKLOAD, st.integers(1, 99), max_size=4), st.booleans())
def test_allocations_json_is_what_json_dumps_writes(leases, wids, lingering):
    from dataclasses import replace

    from egress_agent.alloc import Allocations, Lingering, block_key
    from egress_agent.store import allocations_text
    leases = {k: replace(l, workload=k[0], ip=k[1]) for k, l in leases.items()}
    linger = {block_key(l): Lingering(l, 7) for l in list(leases.values())[:1]} if lingering else {}
    a = Allocations(wids, {"ip1": 1, "ip2": 2}, {w: "ip1" for w in wids}, leases,
                    {w: "ip2" for w in list(wids)[:1]}, linger)
    want = json.dumps({**a.to_json(), "token": "t0"}, separators=(",", ":"), sort_keys=True)
    assert allocations_text(a, "t0") == want
