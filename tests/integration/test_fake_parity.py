"""The nft fake lists what the kernel lists: the same batches go to libnftables
in a namespace of the test's own and to FakeNft, and both listings read the
same through `observed_from_json` (elements, generated chains, skeleton digest,
shape) and carry the same set and chain declarations. The unit tests' fake
kernel (and the traces that walk it) is only as good as this."""

import json
import secrets
import subprocess
import sys

PARITY = r'''
import json
from importlib import resources
from egress_agent.alloc import Allocations, Usable, allocate
from egress_agent.config import parse
from egress_agent.model import Observed
from egress_agent.nft.fake import FakeNft
from egress_agent.nft.libnft import Libnft
from egress_agent.plan import HostFacts, build
from egress_agent.nft.diff import T, transaction
from egress_agent.nft.listing import observed_from_json
from egress_agent.nft.text import comments

def desired(text):
    cfg = parse(text.replace("@PREFIX@", "t"), "demo.yaml").config
    usable = Usable(v4=frozenset({"billing-1", "billing-2", "m44-ip", "partner-link"}),
                    v6=frozenset({"billing-1", "billing-2"}))
    a, _ = allocate(cfg, Allocations(), usable)
    return build(cfg, a, HostFacts(usable=usable, cgroups=frozenset())).desired

def declarations(doc):
    return [{k: {f: v for f, v in x[k].items() if f not in ("handle", "elem")}}
            for x in doc["nftables"] for k in ("set", "map", "chain") if k in x]

def read(doc):
    o = observed_from_json(doc)
    return {"elements": sorted((k, sorted(map(repr, v))) for k, v in o.elements.items() if v),
            "chains": sorted(o.chains.items()), "skeleton": o.skeleton, "shape": repr(o.shape),
            "declarations": declarations(doc)}

demo = resources.files("egress_agent").joinpath("lab/demo.yaml").read_text()
kernel, fake = Libnft(), FakeNft()
steps = []
def both(name, batch):
    kernel.run(batch)
    fake.run(batch)
    k, f = read(kernel.list_table()), read(fake.list_table())
    steps.append({"step": name, "same": k == f,
                  "differs": {key: [k[key], f[key]] for key in k if k[key] != f[key]}})

d = desired(demo)
both("first apply", transaction(d, Observed()).text)
edited = desired(demo.replace("  - {id: m43, app: billing, source: [10.0.1.3], interface: vm-m43}\n", "")
                 .replace("  - name: legacy-udp\n    match: {workloads: [m43], protocols: [udp]}\n"
                          "    egress: {ipv4: legacy, ipv4_fallback: drop}\n", ""))
both("an edit", transaction(edited, observed_from_json(kernel.list_table())).text)
both("a flushed chain", f"flush chain {T} postrouting\n")
both("its repair", transaction(edited, observed_from_json(kernel.list_table())).text)
both("a flushed map", f"flush map {T} snat4\n")
# read by a child process, as the reconciler reads it: the same Observed
child, here = kernel.read_table(), observed_from_json(kernel.list_table())
steps.append({"step": "read in a child", "same": child == here and fake.read_table() == observed_from_json(fake.list_table()),
              "differs": {} if child == here else {"child": repr(child)[:2000], "here": repr(here)[:2000]}})
print(json.dumps(steps))
'''


def test_the_fake_lists_what_the_kernel_lists():
    ns = f"eafake{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", PARITY],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        steps = json.loads(p.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    assert [s["step"] for s in steps] == ["first apply", "an edit", "a flushed chain",
                                          "its repair", "a flushed map", "read in a child"]
    for s in steps:
        assert s["same"], (s["step"], s["differs"])
