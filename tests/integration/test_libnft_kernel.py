"""The libnftables adapter on this kernel, in a namespace of the test's own."""

import json
import secrets
import subprocess
import sys

# Libnft.list_table(terse=True) lists `ruleset inet` (nft 1.0.6 fetches every
# element for `list table -t`) and keeps our table's objects: it must equal what
# `list table -t` says, with other tables of the family and of others beside it.
TERSE = r'''
import json
import nftables
from egress_agent.nft.libnft import Libnft
from egress_agent.nft.text import skeleton_text
nft = Libnft()
nft.run(skeleton_text())
nft.run("add element inet egress_agent assign4 { 0x00000001 : 0x00100001 }\n"
        "add element inet egress_agent snat4 { 0x00100001 : 203.0.113.1 . 1024-1087 }\n"
        "add table inet other\nadd set inet other s { type ipv4_addr; elements = { 192.0.2.1 } }\n"
        "add chain inet other c { type filter hook output priority 0; }\n"
        "add rule inet other c ip daddr @s accept\n"
        "add table ip egress_agent\nadd chain ip egress_agent c\n")
raw = nftables.Nftables()
raw.set_json_output(True)
raw.set_terse_output(True)
rc, out, err = raw.cmd("list table inet egress_agent")
assert rc == 0, err
print(json.dumps([nft.list_table(terse=True), json.loads(out)]))
'''


def test_terse_listing_is_our_table_without_elements():
    ns = f"eafullsync{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", TERSE],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        got, want = json.loads(p.stdout)
        assert got == want
        objs = [next(iter(i.values())) for i in got["nftables"] if "metainfo" not in i]
        assert {o.get("table", o.get("name")) for o in objs} == {"egress_agent"}
        assert {o["family"] for o in objs} == {"inet"}
        assert any("rule" in i for i in got["nftables"])
        assert not any("elem" in i.get("map", i.get("set", {})) for i in got["nftables"])
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# A full sync from nothing in parts (Transaction.parts) leaves the kernel as one batch
# does: the same elements, and the skeleton whole.
PARTS = r'''
import json, os, sys, tempfile
sys.path.insert(0, "bench")
from gen_config import config_text
from egress_agent import hoststate
import egress_agent.reconcile as rmod
from egress_agent.alloc import Usable
from egress_agent.config import Reader
from egress_agent.hoststate import HostState
from egress_agent.nft import diff
from egress_agent.nft.libnft import Libnft
from egress_agent.nft.listing import observed_from_json
from egress_agent.nft.text import skeleton_digest
from egress_agent.routing.fake import FakeRouting
from egress_agent.store import Store
diff.PART_ELEMENTS = int(sys.argv[1])
state = tempfile.mkdtemp(prefix="eafullsync-")
with open(state + "/c.yaml", "w") as f:
    f.write(config_text(300, state))
cfg = Reader().load(state + "/c.yaml").config
rmod.usable_from = hoststate.usable_from = lambda cfg, host: Usable()
nft = Libnft()
rec = rmod.Reconciler(nft, FakeRouting(), Store(state), lambda: HostState(frozenset(), frozenset()))
g0 = nft.generation()
r = rec.sync(cfg, "start", full=True)
o = observed_from_json(nft.list_table())
assert o.skeleton == skeleton_digest() and rec.trusted
import shutil
shutil.rmtree(state)
print(json.dumps({"commits": nft.generation() - g0, "added": r.added,
                  "elements": {k: sorted(map(repr, v)) for k, v in o.elements.items()}}))
'''


def _full_sync_in_netns(part_elements: int) -> dict:
    import os
    ns = f"eafullsync{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PARTS, str(part_elements)],
                           capture_output=True, text=True, timeout=120, cwd=root)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_a_full_sync_from_nothing_in_parts_leaves_what_one_batch_leaves():
    # 300 workloads: four maps of 300 elements each, one statement each (diff.CHUNK)
    one, parts = _full_sync_in_netns(10_000), _full_sync_in_netns(100)
    assert one["commits"] == 1 and parts["commits"] >= 4, (one["commits"], parts["commits"])
    assert parts["added"] == one["added"] > 1000
    assert parts["elements"] == one["elements"]
