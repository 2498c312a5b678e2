"""The package's layering, read from the source (no imports of vitkit needed):

* lower layers never import higher ones, and packages import each other without cycles;
* the training engine and the tools never name a task or a model family: they reach every objective through the
  Task interface (``capabilities``, ``zero_shot``, ``retrieval_scores``, ``sample_images``, ...);
* only models/ and the converters reach into the models package's private modules;
* every family file stays readable (≤ 500 lines).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitkit"

# A package may import its own rank or lower ones. The training engine sits under the tools that use a trained
# model, and the command line on top of everything.
RANKS = {
    "_version": 0, "errors": 0, "utils": 0, "schema": 0,
    "layers": 1, "data": 1, "viz": 1,
    "models": 2,
    "convert": 3, "tasks": 3,
    "engine": 4,
    "tools": 5,
    "cli": 6, "__init__": 6, "__main__": 6,
}
FAMILIES = sorted(p.stem for p in (SRC / "models").glob("*.py") if not p.stem.startswith("_"))
TASK_MODULES = sorted(p.stem for p in (SRC / "tasks").glob("*.py") if not p.stem.startswith("_") and p.stem != "base")


def _task_names() -> set[str]:
    """``name = "..."`` of every task class (read from the source, so the test needs no import)."""
    names = set()
    for path in (SRC / "tasks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                            and getattr(stmt.targets[0], "id", None) == "name"
                            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                        names.add(stmt.value.value)
    return names


def _family_classes() -> set[str]:
    """Public classes defined in the family files (VisionTransformer, SwinTransformer, CLIP, ...)."""
    names = set()
    for family in FAMILIES:
        tree = ast.parse((SRC / "models" / f"{family}.py").read_text())
        names |= {n.name for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")}
    return names


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported(path: Path) -> list[tuple[str, int]]:
    """Absolute dotted names (inside vitkit, without the ``vitkit.`` prefix) a module imports, with line numbers."""
    rel = path.relative_to(SRC).with_suffix("")
    here = list(rel.parts[:-1])  # the package a relative import starts from (also for an __init__)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [f"{'.'.join(base)}.{a.name}".strip(".") for a in node.names]
                out += [(n, node.lineno) for n in names]
            elif node.module and node.module.split(".")[0] == "vitkit":
                out.append((node.module.partition(".")[2], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name.partition(".")[2], node.lineno) for a in node.names if a.name.split(".")[0] == "vitkit"]
    return [(n, line) for n, line in out if n]


def test_every_package_has_a_rank():
    packages = {_package_of(p) for p in _modules()}
    assert packages <= set(RANKS), f"give these a rank in RANKS: {sorted(packages - set(RANKS))}"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for path in _modules():
        mine = _package_of(path)
        for name, line in _imported(path):
            theirs = name.split(".")[0]
            if theirs in RANKS and RANKS[theirs] > RANKS[mine]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({mine}) imports {name} ({theirs})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    edges: dict[str, set[str]] = {}
    for path in _modules():
        mine = _package_of(path)
        for name, _ in _imported(path):
            theirs = name.split(".")[0]
            if theirs != mine and theirs in RANKS:
                edges.setdefault(mine, set()).add(theirs)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in edges.get(start, ()))

    cycles = sorted(p for p in edges if reaches(p, p, {p}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def _engine_and_tools() -> list[Path]:
    return [p for p in _modules() if _package_of(p) in ("engine", "tools")]


def test_engine_and_tools_import_no_family_or_task_module():
    families = {f"models.{f}" for f in FAMILIES}
    tasks = {f"tasks.{t}" for t in TASK_MODULES}
    bad = [f"{p.relative_to(SRC)}:{line} imports {name}"
           for p in _engine_and_tools() for name, line in _imported(p)
           if any(name == m or name.startswith(m + ".") for m in families | tasks)]
    assert not bad, "the engine and the tools reach families and tasks only through the registries:\n" + "\n".join(bad)


def test_engine_and_tools_name_no_task_or_family():
    """No string equal to a task or family name (``task.name == "clip"``), and no family class
    (``isinstance(model, CLIP)``): behaviour that belongs to one objective lives in its task."""
    words = _task_names() | set(FAMILIES)
    classes = _family_classes()
    assert {"classify", "clip", "mae", "vilt"} <= words and {"CLIP", "ViLT", "SwinTransformer"} <= classes
    bad = []
    for path in _engine_and_tools():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} string {node.value!r}")
            elif isinstance(node, ast.Name) and node.id in classes:
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} name {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in classes:
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} attribute .{node.attr}")
    assert not bad, "tools and engine name a task or family:\n" + "\n".join(bad)


def test_private_model_modules_stay_inside_models_and_converters():
    bad = [f"{p.relative_to(SRC)}:{line} imports {name}"
           for p in _modules() if _package_of(p) not in ("models", "convert")
           for name, line in _imported(p) if re.match(r"models\._", name)]
    assert not bad, "use the models package's public names instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_files_stay_readable(family):
    lines = len((SRC / "models" / f"{family}.py").read_text().splitlines())
    assert lines <= 500, f"models/{family}.py has {lines} lines (> 500): move building blocks to layers/"
