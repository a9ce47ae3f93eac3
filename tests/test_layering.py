"""Each layer imports only downward, no two modules import each other (directly or around a loop), and the
config layer and the command line's `--help` load without torch.

The import graph is read statically (`ast`) from every module of `jepa4rec_dist/` (its `kernels/` included): every
`import` / `from ... import`, at module level or inside a function (a lazy import is still a dependency).
An edge points at the module imported (`from pkg import mod` at `pkg.mod`, `from mod import name` at `mod`);
the implicit import of parent packages is not an edge.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jepa4rec_dist",)

# Lowest first. A module sits in the tier of the longest entry naming it or a package above it (the root package
# `jepa4rec_dist` names only its own __init__); every module must sit somewhere. A module may import its own tier
# and the tiers below, never a tier above.
LAYERS: list[tuple[str, list[str]]] = [
    ("config", ["jepa4rec_dist.config", "jepa4rec_dist.baselines.configs", "jepa4rec_dist.hybrid.config"]),
    ("data, devices, kernels", ["jepa4rec_dist.data", "jepa4rec_dist.device", "jepa4rec_dist.kernels",
                                "jepa4rec_dist.cluster.paths"]),
    ("model", ["jepa4rec_dist.model"]),
    # the harness, metrics, scorers of our encoders, one split's evaluation; the Ray actor pool runs the same
    # evaluation (and item encoding, for hybrid.vectors) on actors
    ("evaluation core", ["jepa4rec_dist.eval", "jepa4rec_dist.cluster.evaluate"]),
    ("baselines, hybrid model", ["jepa4rec_dist.baselines", "jepa4rec_dist.hybrid"]),
    ("evaluation jobs", ["jepa4rec_dist.eval.run"]),  # exports and baselines of every family, one table
    ("training", ["jepa4rec_dist.train", "jepa4rec_dist.hybrid.train"]),
    ("cluster", ["jepa4rec_dist.cluster"]),  # Ray Train workers, job submission
    ("entry points", ["jepa4rec_dist.cli", "jepa4rec_dist.launching", "jepa4rec_dist.serve", "jepa4rec_dist.hf",
                      "jepa4rec_dist"]),
]

# Edges inside jepa4rec_dist/data/, which another change is editing: tolerated until that lands. Each must still
# exist (a fixed one fails test_known_exceptions_still_exist: delete it here).
KNOWN: dict[tuple[str, str], str] = {}

HEAVY = ("torch", "transformers")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    path: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        where = "inside a function" if self.lazy else "at module level"
        return f"{self.src} -> {self.dst} ({self.path}:{self.line}, {where})"


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, mods: dict[str, Path], path: str):
        self.module, self.is_package, self.mods, self.path = module, is_package, mods, path
        self.depth, self.edges = 0, []

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def _add(self, target: str, node) -> None:
        dst = _resolve(target, self.mods)
        if dst is not None and dst != self.module:
            self.edges.append(Edge(self.module, dst, self.path, node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the package (of a package's __init__: the package itself)
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.mods else base, node)


def import_edges() -> list[Edge]:
    mods = _modules()
    edges = []
    for module, path in mods.items():
        visitor = _Imports(module, path.name == "__init__.py", mods, str(path.relative_to(ROOT)))
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges += visitor.edges
    return edges


def tier(module: str) -> int | None:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            named = module == prefix or (prefix != "jepa4rec_dist" and module.startswith(prefix + "."))
            if named and len(prefix) > best:
                best, found = len(prefix), i
    return found


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component of more than one module."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.src, {}).setdefault(e.dst, e)
        graph.setdefault(e.dst, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:  # a shortest way from one member back to itself, inside the component
        start = min(component)
        came: dict[str, Edge] = {}
        frontier, seen = [start], {start}
        while frontier and start not in came:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph[v].items()):
                    if w in component and (w == start or w not in seen) and w not in came:
                        came[w] = e
                        seen.add(w)
                        nxt.append(w)
            frontier = nxt
        cycle, v = [], start
        while True:
            cycle.append(came[v])
            v = came[v].src
            if v == start:
                break
        cycles.append(cycle[::-1])
    return cycles


EDGES = import_edges()


def test_every_module_has_a_layer():
    missing = sorted({m for m in _modules() if tier(m) is None})
    assert not missing, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {missing}"


def test_imports_point_downward():
    bad = [e for e in EDGES if (e.src, e.dst) not in KNOWN and (tier(e.dst) or 0) > (tier(e.src) or 0)]
    lines = [f"{e}: layer '{LAYERS[tier(e.src)][0]}' imports layer '{LAYERS[tier(e.dst)][0]}' above it" for e in bad]
    assert not bad, "imports upward:\n" + "\n".join(lines)


def test_no_import_cycles():
    cycles = find_cycles([e for e in EDGES if (e.src, e.dst) not in KNOWN])
    text = ["\n".join("    " + str(e) for e in cycle) for cycle in cycles]
    assert not cycles, "modules that import each other:\n" + "\n\n".join(text)


def test_known_exceptions_still_exist():
    present = {(e.src, e.dst) for e in EDGES}
    fixed = [edge for edge in KNOWN if edge not in present]
    assert not fixed, f"fixed, so remove from KNOWN: {fixed}"


def test_the_checks_catch_what_they_are_for():
    up = Edge("jepa4rec_dist.config", "jepa4rec_dist.train.pretrain", "x.py", 1, True)
    assert tier(up.dst) > tier(up.src)
    k = "jepa4rec_dist.kernels."
    loop = [Edge(k + "_local_global_flash", k + "local_global_attention", "a.py", 1, True),
            Edge(k + "local_global_attention", k + "_local_global_flash", "b.py", 2, True),
            Edge(k + "local_global_attention", k + "_local_global_common", "b.py", 3, False)]
    (cycle,) = find_cycles(loop)
    assert {(e.src, e.dst) for e in cycle} == {(e.src, e.dst) for e in loop[:2]}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_config_and_cli_import_without_torch():
    code = ("import json, sys\nimport jepa4rec_dist.config, jepa4rec_dist.cli\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    loaded = json.loads(_run(["-c", code]).stdout.strip().splitlines()[-1])
    assert loaded == [], f"`import jepa4rec_dist.config, jepa4rec_dist.cli` imported {loaded}"


def test_help_imports_no_torch():
    script = Path(sys.executable).with_name("jepa4rec")  # the console script, when installed
    args = [str(script)] if script.is_file() else ["-m", "jepa4rec_dist.cli"]
    done = _run(["-X", "importtime", *args, "--help"])
    assert done.stdout.startswith("usage: jepa4rec")
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(imported & set(HEAVY))
    assert imported and not heavy, f"`jepa4rec --help` imported {heavy}"


def test_every_command_help_imports_no_torch():
    from jepa4rec_dist.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    code = ("import contextlib, io, json, sys\nfrom jepa4rec_dist.cli import main\nout = {}\n"
            f"for command in {sorted(sub.choices)!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            main([command, '--help'])\n        except SystemExit:\n            pass\n"
            f"    out[command] = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(json.dumps(out))")
    loaded = json.loads(_run(["-c", code]).stdout.strip().splitlines()[-1])
    assert loaded and not any(loaded.values()), f"`jepa4rec <command> --help` imported: {loaded}"
