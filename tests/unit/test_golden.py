"""Golden files: one config in, what it adds to an empty skeleton out (the route
ops, then under `# nft batch` the elements, sets and generated chains of its
first apply, without the skeleton). The skeleton
itself is the same for every config and is checked once, in
test_a_first_apply_is_the_skeleton_then_the_case.

Update after an intended change with: pytest tests/unit/test_golden.py --update-golden
"""

from pathlib import Path

import pytest

from egress_agent.alloc import Allocations, allocate
from egress_agent.config import load
from egress_agent.model import Desired, Observed
from egress_agent.plan import build
from egress_agent.nft.diff import transaction
from egress_agent.nft.diff import T
from egress_agent.nft.text import skeleton_digest, skeleton_text
from egress_agent.routing.diff import diff_routes

GOLDEN = Path(__file__).parent.parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))
EMPTY_SKELETON = Observed(table=True, skeleton=skeleton_digest())


def desired(path: Path) -> Desired:
    cfg = load(path).config
    a, _ = allocate(cfg, Allocations())
    return build(cfg, a).desired


def render_case(path: Path) -> str:
    d = desired(path)
    ops = diff_routes(d.routes, d.rules, frozenset(), frozenset())
    return ("# route ops\n" + "".join(f"ip {o.describe()}\n" for o in ops)
            + "# nft batch\n" + transaction(d, EMPTY_SKELETON).text)


@pytest.mark.parametrize("case", CASES)
def test_golden(case, update_golden):
    got = render_case(GOLDEN / f"{case}.yaml")
    expected = GOLDEN / f"{case}.expected"
    if update_golden or not expected.exists():
        expected.write_text(got)
        if not update_golden:
            pytest.fail(f"wrote missing {expected.name}; review and commit it")
    assert got == expected.read_text(), f"{case}: output changed; if intended, run with --update-golden"


def test_a_first_apply_is_the_skeleton_then_the_case():
    """From nothing: the table is created, emptied, declared from skeleton.nft
    (its digest in place of @SKELETON@), then filled as on the empty skeleton."""
    d = desired(GOLDEN / "via-and-policies.yaml")
    text = skeleton_text()
    assert "@SKELETON@" not in text and f'comment "{skeleton_digest()}"' in text
    first = transaction(d, Observed())
    assert first.full
    assert first.text == (f"add table {T}\ndelete table {T}\n" + text.rstrip() + "\n"
                          + transaction(d, EMPTY_SKELETON).text)


def test_there_are_golden_cases():
    assert len(CASES) >= 3


@pytest.mark.parametrize("case", CASES)
def test_the_fake_kernel_takes_each_case_and_lists_it_back(case):
    from egress_agent.nft.fake import FakeNft
    from egress_agent.nft.listing import observed_from_json
    from egress_agent.nft.text import comments
    d = desired(GOLDEN / f"{case}.yaml")
    nft = FakeNft()
    nft.run(transaction(d, Observed()).text)
    got = observed_from_json(nft.list_table())
    assert {k: v for k, v in got.elements.items() if v} == {k: v for k, v in d.elements.items() if v}
    assert got.chains == {c: comments(r) for c, r in d.chains.items()}
    assert transaction(d, got).empty
