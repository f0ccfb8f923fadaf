"""Golden files: one config in, the exact first-apply nft batch and route ops out.

Update after an intended change with: pytest tests/unit/test_golden.py --update-golden
"""

from pathlib import Path

import pytest

from egress_agent.alloc import Allocations, allocate
from egress_agent.config import load
from egress_agent.model import Observed
from egress_agent.plan import build
from egress_agent.nft.diff import transaction
from egress_agent.routing.diff import diff_routes

GOLDEN = Path(__file__).parent.parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))


def render_case(path: Path) -> str:
    cfg = load(path).config
    a, _ = allocate(cfg, Allocations())
    d = build(cfg, a).desired
    ops = diff_routes(d.routes, d.rules, frozenset(), frozenset())
    return ("# route ops\n" + "".join(f"ip {o.describe()}\n" for o in ops)
            + "# nft batch\n" + transaction(d, Observed()).text)


@pytest.mark.parametrize("case", CASES)
def test_golden(case, update_golden):
    got = render_case(GOLDEN / f"{case}.yaml")
    expected = GOLDEN / f"{case}.expected"
    if update_golden or not expected.exists():
        expected.write_text(got)
        if not update_golden:
            pytest.fail(f"wrote missing {expected.name}; review and commit it")
    assert got == expected.read_text(), f"{case}: output changed; if intended, run with --update-golden"


def test_there_are_golden_cases():
    assert len(CASES) >= 3
