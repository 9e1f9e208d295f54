"""The architecture, checked: imports go one way (no cycles, counting imports inside functions), each folder of
lora_analysis imports only the layers below it, and the default run directory is spelled in one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora", "lora_analysis")

# lora_analysis layers, bottom up; the top-level modules (commands and their shared cli.py) sit above them all.
# lora/ is below every one of them.
LAYERS = {"metrics": 1, "load": 2, "groundtruth": 2, "tables": 3, "verdicts": 4, "render": 5}
COMMANDS = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level or inside functions), resolved to modules:
    ``from a.b import c`` counts ``a.b.c`` where that is a module, else ``a.b``."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_walker_sees_imports_inside_functions_and_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    mods = _modules()
    inner = _imports("lora_analysis.subspace", mods["lora_analysis.subspace"], set(mods))
    assert "lora.train" in inner  # imported inside _load(): the walk counts it


def test_no_import_cycle(graph):
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "lora":
        return 0
    if len(parts) == 1:
        return COMMANDS  # the package's own __init__
    return LAYERS.get(parts[1], COMMANDS)


def test_analysis_layers_import_only_downwards(graph):
    upward = [(m, t) for m, targets in graph.items() if m.startswith("lora_analysis.")
              for t in targets if t.startswith("lora_analysis") and _layer(t) > _layer(m)]
    assert not upward, upward
    assert not [(m, t) for m, targets in graph.items() if m.startswith("lora.") or m == "lora"
                for t in targets if t.startswith("lora_analysis")], "lora/ must not import lora_analysis"


# the project's one ΔW, DoRA W′ and factored-SVD formulas: pure torch
PURE_LORA = {"lora.layers", "lora.dora", "lora.factored"}


def test_metrics_are_pure(graph):
    """No file I/O, plotting or model loading in the metrics: they import torch, each other and the project's one
    ΔW / DoRA W′ formulas (lora.layers, lora.dora) only."""
    for name, path in _modules().items():
        if name.startswith("lora_analysis.metrics"):
            others = {t for t in graph[name] if not t.startswith("lora_analysis.metrics")}
            assert others <= PURE_LORA, (name, others - PURE_LORA)
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"\bopen\(|matplotlib|pandas|transformers|safetensors", text), name


def test_default_run_directory_is_spelled_once():
    spelled = [name for name, path in _modules().items()
               if re.search(r"""["']runs["']\s*\)?\s*/\s*["']default|runs/default|LORA_RUNS?_DIR""",
                            path.read_text(encoding="utf-8"))]
    assert spelled == ["lora.rundir"], spelled


def test_every_folder_says_what_it_may_import():
    for folder in sorted(p for p in (ROOT / "lora_analysis").iterdir() if p.is_dir() and p.name in LAYERS):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert "import" in doc.lower(), folder.name


RUN_DIRECTORY_CODE = ("lora.rundir", "lora_analysis.load")


def test_verdicts_and_render_read_no_run_directory(graph):
    """Verdicts and renderers take tables and claims: they never open a run, a manifest or a base model."""
    leaks = [(m, t) for m, targets in graph.items() if _layer(m) in (LAYERS["verdicts"], LAYERS["render"])
             for t in targets if t.startswith(RUN_DIRECTORY_CODE)]
    assert not leaks, leaks


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string literal of ``path`` but docstrings, with its line (f-strings' constant parts included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_flag_names_only_in_commands():
    """Options (``--top``, ``--runs``, ...) are the commands' business: metrics, tables, verdicts and renderers
    raise errors about values, and the command that parsed the flag names it."""
    flagged = [(name, line, text) for name, path in _modules().items()
               if name.startswith("lora_analysis.") and _layer(name) in (LAYERS["metrics"], LAYERS["tables"],
                                                                        LAYERS["verdicts"], LAYERS["render"])
               for line, text in _string_literals(path) if re.search(r"(^|[\s(])--[a-z]", text)]
    assert not flagged, flagged
    assert re.search(r"(^|[\s(])--[a-z]", "pass --top 3") and not re.search(r"(^|[\s(])--[a-z]", "a -- b, x--y")
