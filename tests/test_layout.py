"""The package's shape follows DESIGN.md §2: rooms, who may import whom, no cycles, files of 400 lines at most.

The imports are read from the source (``ast``), lazy ones inside functions included, so a test
fails on the first import against the table, not when someone notices a slow or circular import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_bench"
MAX_LINES = 400
FOUNDATIONS = {"registry", "dist", "repro", "schedules"}  # the only modules at the package root
_BELOW_RUN = {"registry", "config", "dist", "repro", "schedules", "losses", "heads", "backbones", "data",
              "methods", "eval", "tracking"}
# DESIGN.md §2, "may import" (rooms of ssl_bench; third-party libraries are not checked here).
ALLOWED = {
    "registry": set(),
    "config": {"registry"},
    "dist": set(),
    "repro": set(),
    "schedules": set(),
    "losses": {"dist"},
    "heads": set(),
    "backbones": {"registry", "config"},
    "data": {"registry", "config", "dist"},
    "methods": {"losses", "heads", "backbones", "schedules", "data", "registry", "config", "dist"},
    "eval": {"data", "backbones", "schedules", "dist", "config", "registry"},
    "tracking": {"config", "repro"},
    "run": _BELOW_RUN,
    "launch": {"config", "repro", "tracking"},
    "report": {"config", "tracking"},
    "bench": {"run", "eval", "data", "methods", "config", "repro"},
    "cli": _BELOW_RUN | {"run", "launch", "report", "bench", "cli"},
}
LAZY_ONLY = {"launch": {"run"}}  # launch imports run inside functions only: plan-time checks, the job
TORCH_FREE = ("ssl_bench.config", "ssl_bench.tracking", "ssl_bench.report.table", "ssl_bench.report.collect",
              "ssl_bench.report.plots", "ssl_bench.report.curves", "ssl_bench.report.wandb_source")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported ssl_bench module, line, lazy) for every import in the file; lazy = inside a function."""
    tree = ast.parse(path.read_text())
    lazy_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "ssl_bench" or name.startswith("ssl_bench."):
                found.append((name, node.lineno, node.lineno in lazy_lines))
    return found


def _in_a_type_check_block(path: Path, line: int) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
               and n.lineno <= line <= n.end_lineno for n in ast.walk(tree))


def test_the_root_holds_only_the_foundations():
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root == FOUNDATIONS, f"modules at ssl_bench/ beyond the foundations: {sorted(root - FOUNDATIONS)}"
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms | FOUNDATIONS == set(ALLOWED), f"rooms without a row in the table: {sorted(rooms - set(ALLOWED))}"


def test_every_import_follows_the_table():
    wrong = []
    for module, path in MODULES.items():
        room = _room(module)
        for target, line, lazy in _imports(module, path):
            other = _room(target)
            if not other or other == room or _in_a_type_check_block(path, line):
                continue
            allowed = ALLOWED[room] | (LAZY_ONLY.get(room, set()) if lazy else set())
            if other not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} ({room} -> {other})")
    assert not wrong, "imports against DESIGN.md §2:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    """Module-level imports (lazy ones run later, so they cannot cycle at import time) form no cycle."""
    graph = {m: {t for t, _, lazy in _imports(m, p) if not lazy and t in MODULES and t != m}
             for m, p in MODULES.items()}
    for module, targets in graph.items():  # importing a.b.c imports its packages a.b and a first,
        # except the importer's own packages, which are already being imported (no cycle)
        graph[module] = {parent for t in targets for parent in _parents(t)
                         if parent != module and not module.startswith(parent + ".")} | targets
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))] + [module]


def test_files_are_at_most_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (DESIGN.md habit 7): {long}"


def test_the_table_and_the_design_notes_agree():
    """Every room of the table has its row in DESIGN.md §2 (when the notes are at hand)."""
    design = PACKAGE.parents[1] / "shared" / "DESIGN.md"
    if not design.is_file():
        pytest.skip(f"{design} is not part of this checkout")
    text = design.read_text()
    missing = [r for r in ALLOWED if f"`{r}.py`" not in text and f"`{r}/`" not in text]
    assert not missing, f"rooms without a row in DESIGN.md §2: {missing}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_records_and_reports_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
