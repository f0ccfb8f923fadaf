"""No module of the package imports one that imports it back, the lab included.

Every import counts, also the ones inside functions: a deferred import hides a
cycle from Python, not from the reader (cli -> verify -> cli was one). The
composition root (wiring.py) builds the real adapters; the CLI, the daemon,
verify and the lab take them from there instead of from each other.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "egress_agent"


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from . import names` imports the module names; `from .x import y` imports x
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                      for a in node.names}
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first walk: [a, b, ..., a]."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def graph_of(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_package_has_no_import_cycle():
    graph = graph_of(PACKAGE)
    assert "egress_agent.lab.cli" in graph and "egress_agent.verify" in graph["egress_agent.cli"]
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_cli_the_daemon_verify_and_the_lab_get_their_adapters_from_wiring():
    graph = graph_of(PACKAGE)
    for m in ("egress_agent.cli", "egress_agent.lab.cli"):
        assert "egress_agent.wiring" in graph[m]
    # only the composition root builds the real kernel adapters
    builders = {m for m, deps in graph.items()
                if {"egress_agent.nft.libnft", "egress_agent.routing.iproute"} <= deps}
    assert builders == {"egress_agent.wiring"}


def test_a_cycle_through_a_deferred_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "lab").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lab" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from . import verify\n")
    (pkg / "verify.py").write_text("def f():\n    from .lab.cli import g\n")
    (pkg / "lab" / "cli.py").write_text("from ..cli import main\n")
    (pkg / "ok.py").write_text("from .lab import cli as lab_cli\nimport pkg.verify\n")
    graph = graph_of(pkg)
    assert graph["pkg.ok"] == {"pkg.lab.cli", "pkg.verify"}
    assert cycles(graph) == [["pkg.cli", "pkg.verify", "pkg.lab.cli", "pkg.cli"]]
