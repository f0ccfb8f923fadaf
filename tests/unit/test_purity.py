"""Planning is pure: config, alloc, plan, the nft diff/text/listing import neither nftables nor pyroute2.
And the product imports no test or benchmark helper."""

import ast
import subprocess
import sys
from pathlib import Path

PURE = ["egress_agent.config", "egress_agent.alloc", "egress_agent.plan",
        "egress_agent.nft.diff", "egress_agent.nft.text", "egress_agent.nft.listing",
        "egress_agent.adopt", "egress_agent.routing.diff", "egress_agent.hoststate",
        "egress_agent.shape", "egress_agent.drift", "egress_agent.nftwatch"]


def test_pure_modules_import_no_kernel_library():
    code = ("import sys\n"
            f"for m in {PURE!r}: __import__(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nftables', 'pyroute2'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure modules pulled in: {out.stdout.strip()}"


def test_product_imports_no_test_or_bench_helper():
    """The product never imports what tests and benchmarks use to drive the kernel
    (conntrack_insert raises the global nf_conntrack_max; daemon_helpers, rawpkt...).
    egress_agent/lab is the lab, not the product, and may."""
    root = Path(__file__).resolve().parents[2]
    helpers = {"tests", "bench"} | {p.stem for d in ("tests", "bench")
                                     for p in (root / d).rglob("*.py")}
    found = []
    for path in sorted((root / "egress_agent").rglob("*.py")):
        if (root / "egress_agent" / "lab") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno}: imports {m}"
                      for m in mods if m.split(".")[0] in helpers]
    assert not found, "\n".join(found)
