"""names.py and the skeleton agree, and the product names the kernel's objects
only through names.py: a renamed set or chain is one edit in names.py plus the
skeleton, never a hunt through string literals."""

import ast
import re
from pathlib import Path

from egress_agent import names
from egress_agent.nft.text import KINDS, skeleton_shape, skeleton_source

PACKAGE = Path(__file__).resolve().parents[2] / "egress_agent"

SETS = ([*names.SOURCE_MAP.values(), *names.SOURCE_IF_MAP.values(), *names.BOUND_SET.values(),
         *names.MANAGED_SET.values(), *names.EGRESS_SET.values(), *names.GATEWAY_SET.values(),
         *names.EXCLUDE_SET.values(),
         *names.ASSIGN_MAP.values()]
        + [names.cgroup_map(level) for level in names.CGROUP_LEVELS]
        + [names.EXCLUDE_SERVICES_SET, names.EXCLUDE_PROTOCOLS_SET, names.UNTRANSLATED_SET,
           names.SNAT4_PORTS_MAP,
           names.SNAT4_ADDR_MAP, names.SNAT6_MAP, names.SKELETON_SET, names.FLOWS4_SET,
           names.REFUSED_SET])
CHAINS = [names.POLICY_CHAIN, names.LIMIT_CHAIN, names.COMMIT_CHAIN, names.REFUSE_CHAIN]


def test_every_name_in_names_py_is_declared_by_the_skeleton_and_back():
    shape = skeleton_shape()
    declared = {n for n, _, _ in shape.sets}
    assert sorted(set(SETS)) == sorted(declared)
    assert set(CHAINS) <= {n for n, _, _ in shape.chains}
    assert set(names.GENERATED_CHAINS) <= set(CHAINS)
    assert re.search(rf"^table {names.TABLE} {{$", skeleton_source(), re.M)
    # every set the agent fills has its element kinds; the data path fills the others
    assert set(KINDS) == declared - {names.SKELETON_SET, names.FLOWS4_SET, names.REFUSED_SET}
    assert not any(names.is_policy_set(n) for n in declared)
    assert names.is_policy_set(names.policy_set(3))


def _strings(tree: ast.AST):
    """String constants that are not docstrings, with their line."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_the_product_names_tables_and_sets_only_through_names_py():
    table = names.TABLE
    # "skeleton" is also a word (drift findings of kind "skeleton"): not scanned
    sets = set(SETS) - {names.SKELETON_SET}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "names.py":
            continue
        for line, s in _strings(ast.parse(path.read_text(), str(path))):
            if s in sets or table in s or s.startswith(names.POLICY_SET_PREFIX):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {s!r}")
    assert not found, "use the names.py constant:\n" + "\n".join(found)


def test_the_scan_finds_a_literal_name(tmp_path):
    tree = ast.parse('"""inet egress_agent in a docstring is fine"""\n'
                     'x = "snat4"\ny = f"flush chain inet egress_agent {c}"\n')
    hits = [(line, s) for line, s in _strings(tree) if s in SETS or names.TABLE in s]
    assert hits == [(2, "snat4"), (3, "flush chain inet egress_agent ")]
