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
