"""Planning is pure: config, alloc, plan, diff, render import neither nftables nor pyroute2."""

import subprocess
import sys

PURE = ["egress_agent.config", "egress_agent.alloc", "egress_agent.plan", "egress_agent.render",
        "egress_agent.adopt", "egress_agent.routing.diff", "egress_agent.hoststate",
        "egress_agent.shape", "egress_agent.drift", "egress_agent.nftwatch"]


def test_pure_modules_import_no_kernel_library():
    code = ("import sys\n"
            f"for m in {PURE!r}: __import__(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nftables', 'pyroute2'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure modules pulled in: {out.stdout.strip()}"
