"""The static skeleton and every golden batch, after the skeleton as in a first
apply, pass `nft -c` (dry run) on this kernel, in a namespace of the test's
own. libnftables resolves cgroup paths even in a dry run, so the goldens'
cgroup elements (paths of other hosts) are checked as one element on a cgroup
the test creates."""

import secrets
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

CHECK = r'''
import sys
from egress_agent import cgroupfs
from egress_agent.nft.libnft import Libnft
from egress_agent.nft.diff import T
from egress_agent.nft.text import skeleton_text
cgroupfs.ensure_view()
nft = Libnft()
nft.check(skeleton_text())
cgroup, batches = sys.argv[1], sys.argv[2:]
for path in batches:
    text = open(path).read().split("# nft batch\n", 1)[1]
    lines = [l for l in text.splitlines() if not l.startswith("add element inet egress_agent cgroup_l")]
    lines.append(f'add element inet egress_agent cgroup_l2 {{ "{cgroup}" : 0x00000001 }}')
    # the goldens hold no skeleton: check them as a first apply sends them
    nft.check(f"add table {T}\ndelete table {T}\n" + skeleton_text() + "\n".join(lines) + "\n")
print("ok", len(batches))
'''


def test_skeleton_and_golden_batches_pass_nft_check():
    from egress_agent.cgroupfs import cgroup2_root
    ns = f"easkel{secrets.token_hex(2)}"
    parent = f"easkel-{secrets.token_hex(2)}"
    cg = Path(cgroup2_root()) / parent / "x.service"
    cg.mkdir(parents=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        batches = sorted(str(p) for p in GOLDEN.glob("*.expected"))
        # nsenter, not `ip netns exec`: that one remounts /sys and hides the cgroup
        p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", CHECK,
                            f"{parent}/x.service", *batches],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == f"ok {len(batches)}"
    finally:
        subprocess.run(["ip", "netns", "del", ns])
        cg.rmdir()
        cg.parent.rmdir()
