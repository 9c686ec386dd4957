"""Arrows point down: no package imports one above it, and no module imports loop.

The layers are those of ``docs/architecture.md``. Imports are read with ``ast`` (module
level and inside functions alike: a lazy import is still a dependency). ``from pkg import
name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``.
Command modules (``pipeline/cli/``, any ``*/cli.py`` and ``__main__``) are the top layer
wherever they live: a package's operator commands sit beside it but above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.config import REPO_ROOT

PIPELINE = REPO_ROOT / "pipeline"

# Lowest first. A package may import packages of lower layers only; packages sharing a
# layer do not import each other.
LAYERS: list[set[str]] = [
    {"config", "digits", "errors"},
    {"contract"},
    {"observability"},
    {"llm"},
    {"prompts"},
    {"transport"},
    {"control"},
    {"resilience"},
    {"stages"},
    {"evaluation", "dlq", "review", "runtime", "client"},
    {"harness"},
    {"cli"},
]
LAYER_OF = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PIPELINE.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            targets |= subs or {node.module}
        elif isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
    return {t for t in targets if t in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def package(module: str) -> str:
    """The layer name of a module: ``cli`` for command modules, else its package."""
    parts = module.split(".")
    if parts[-1] in ("cli", "__main__") or (len(parts) > 1 and parts[1] == "cli"):
        return "cli"
    return parts[1] if len(parts) > 1 else "pipeline"


def test_every_package_has_a_layer() -> None:
    packages = {package(m) for m in MODULES} - {"pipeline"}
    assert packages <= LAYER_OF.keys(), f"give these a layer: {sorted(packages - LAYER_OF.keys())}"


def test_no_import_points_up_or_sideways() -> None:
    offenders = []
    for module, targets in GRAPH.items():
        source = package(module)
        for target in targets:
            dest = package(target)
            if source in ("pipeline", dest) or dest == "pipeline":
                continue
            if LAYER_OF[dest] >= LAYER_OF[source]:
                offenders.append(f"{module} ({source}) imports {target} ({dest})")
    assert not offenders, "\n".join(sorted(offenders))


def test_no_module_import_loops() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_planted_loop_and_an_upward_arrow() -> None:
    """The checks above would say so: a loop and an arrow up, planted in a copy."""
    planted = {**GRAPH, "pipeline.contract.codec": {"pipeline.stages.settle"}}
    planted["pipeline.stages.settle"] = GRAPH["pipeline.stages.settle"] | {
        "pipeline.contract.codec"
    }
    assert _cycles(planted)
    assert (
        LAYER_OF[package("pipeline.stages.settle")] > LAYER_OF[package("pipeline.contract.codec")]
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, set()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_packages_and_their_arrows_are_as_documented() -> None:
    """docs/architecture.md names every package; a new one must be described there."""
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [p for p in LAYER_OF if f"`pipeline/{p}" not in doc]
    assert not missing, f"describe in docs/architecture.md: {missing}"
