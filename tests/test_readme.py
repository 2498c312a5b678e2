"""The README matches the code: its generated tables are current, every command it shows parses, every run folder
a command uses is made earlier in the README, every import it shows works, and its Layout and study lists name
every package folder and study. Running the commands is ``tests/test_first_hour.py``.

The helpers that read the README's shell blocks (``bash_blocks``, ``commands``) are shared with that walk.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WALK_MARKER = re.compile(r"<!--\s*walk:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


# ---------------------------------------------------------------------------------------------- README reading
def code_blocks(text: str) -> list[tuple[str, str | None, str]]:
    """(language, walk name or None, body) of every fenced block, in order. A block is walked when the line right
    before its fence is ``<!-- walk: NAME -->``."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        marker = WALK_MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
        out.append((m.group(1), marker.group(1) if marker else None, "\n".join(lines[i + 1:j])))
        i = j + 1
    return out


def bash_blocks(text: str) -> list[tuple[str | None, str]]:
    """(walk name or None, body) of every ``bash`` block."""
    return [(walk, body) for lang, walk, body in code_blocks(text) if lang == "bash"]


def commands(body: str) -> list[list[str]]:
    """The commands of a shell block as argv lists: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", body)
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def vitkit_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``vitkit`` (or ``torchrun ... -m vitkit.cli``), or None for other commands."""
    if argv[0] == "vitkit":
        return argv[1:]
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "vitkit.cli":
        return argv[argv.index("-m") + 2:]
    return None


@cache
def makefile_variables() -> dict[str, str]:
    out = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Z_]+)\s*[?:]?=\s*(.*?)\s*$", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def make_recipe(target: str) -> list[list[str]]:
    """The vitkit commands of a Makefile target's recipe, variables expanded (``$(VENV)/bin/vitkit`` -> vitkit)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line)), None)
    assert start is not None, f"Makefile has no target {target!r}"
    variables = makefile_variables()
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        for _ in range(3):  # nested variables
            line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
        argv = shlex.split(line.strip().lstrip("@"))
        if argv and Path(argv[0]).name == "vitkit":
            out.append(["vitkit", *argv[1:]])
    return out


def all_commands(text: str) -> list[list[str]]:
    """Every command of every shell block in README order, ``make TARGET`` replaced by its vitkit commands."""
    out = []
    for _, body in bash_blocks(text):
        for argv in commands(body):
            out += make_recipe(argv[1]) if argv[0] == "make" and len(argv) == 2 else [argv]
    return out


def _settings(argv: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs (and ``--output-dir``) of a train command."""
    out = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--set":
            key, _, v = value.partition("=")
            out[key.strip()] = v
        elif flag == "--output-dir":
            out["output_dir"] = value
    return out


def _option(argv: list[str], *names: str) -> str | None:
    for flag, value in zip(argv, argv[1:]):
        if flag in names:
            return value
    return None


def _run_references(config: dict, prefix: str = "") -> dict[str, str]:
    """``{dotted key: value}`` of a recipe's settings that name a run folder (``runs/...``)."""
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            out.update(_run_references(value, f"{prefix}{key}."))
        elif isinstance(value, str) and value.startswith("runs/"):
            out[f"{prefix}{key}"] = value
    return out


def run_of(path: str) -> str:
    """``runs/x/checkpoints/best`` -> ``runs/x``."""
    parts = Path(path).parts
    return str(Path(*parts[:2])) if len(parts) >= 2 and parts[0] == "runs" else path


# ---------------------------------------------------------------------------------------------- generated tables
def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("update_readme", module)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_are_current():
    stale = _update_readme().stale_tables(README.read_text(encoding="utf-8"))
    assert not stale, f"README.md: stale generated table(s) {stale}: run `make readme` (scripts/update_readme.py)"


def test_check_names_the_stale_table_and_update_fixes_it(tmp_path, capsys):
    script = _update_readme()
    readme = tmp_path / "README.md"
    table = script.generate(["tasks"])["tasks"]
    readme.write_text(script.render("# t\n\n<!-- BEGIN GENERATED: tasks -->\nold\n<!-- END GENERATED: tasks -->\n",
                                    {"tasks": table.replace("`classify`", "`classifier`")}))
    assert script.main(["--check", "--only", "tasks", "--readme", str(readme)]) == 1
    assert "stale generated table(s): tasks" in capsys.readouterr().err
    assert script.main(["--only", "tasks", "--readme", str(readme)]) == 0
    assert script.main(["--check", "--only", "tasks", "--readme", str(readme)]) == 0
    assert "`classify`" in readme.read_text()
    readme.write_text("# no markers\n")
    assert script.main(["--check", "--only", "tasks", "--readme", str(readme)]) == 2
    assert "BEGIN GENERATED: tasks" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- commands
def test_every_vitkit_command_parses():
    """Unknown subcommands and flags, missing arguments and bad choices fail here without running anything."""
    from vitkit.cli import build_parser

    parser = build_parser()
    lines = [a for a in (vitkit_argv(argv) for argv in all_commands(README.read_text(encoding="utf-8"))) if a]
    assert len(lines) > 20
    for argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README: `vitkit {shlex.join(argv)}` does not parse (exit {e.code})")


def test_recipes_and_scripts_named_exist():
    for argv in all_commands(README.read_text(encoding="utf-8")):
        config = _option(argv, "--config", "--recipe")
        if config:
            assert (ROOT / config).is_file(), f"README: `{shlex.join(argv)}`: {config} does not exist"
        if argv[0] in ("python", "torchrun") and any(a.endswith(".py") for a in argv):
            script = next(a for a in argv if a.endswith(".py"))
            assert (ROOT / script).is_file(), f"README: `{shlex.join(argv)}`: {script} does not exist"


def test_every_run_is_made_before_it_is_used():
    """A command that reads ``runs/X`` (a tool's argument, ``--resume``, a ``--set`` or a recipe setting such as
    ``model.pretrained``) comes after the command that writes it, in README order (``make demo`` included)."""
    made: set[str] = set()
    for argv in all_commands(README.read_text(encoding="utf-8")):
        args = vitkit_argv(argv)
        if args is None:
            continue
        line = f"`vitkit {shlex.join(args)}`"
        writes: set[str] = set()
        reads: dict[str, str] = {}
        if args[0] == "train":
            settings = _settings(args)
            resume = _option(args, "--resume")
            config = _option(args, "--config", "--recipe")
            recipe = yaml.safe_load((ROOT / config).read_text()) if config else {}
            if resume:
                reads["--resume"] = resume
                writes.add(run_of(resume))
            reads.update({k: v for k, v in _run_references(recipe).items() if k != "output_dir"})
            reads.update({k: v for k, v in settings.items() if v.startswith("runs/") and k != "output_dir"})
            output = settings.get("output_dir") or (recipe or {}).get("output_dir")
            if output:
                writes.add(run_of(output))
        else:
            skip_next = False
            for token in args[1:]:
                if skip_next:
                    skip_next = False
                    continue
                if token in ("--out", "--output-dir", "--confusion"):
                    skip_next = True  # what a tool writes, not what it reads
                    continue
                for value in re.findall(r"(?:^|=)(runs/[\w./-]+)", token):
                    reads[token] = value
        for what, path in reads.items():
            assert run_of(path) in made, (f"README: {line} reads {path} ({what}) before any command makes it; "
                                          f"made so far: {sorted(made)}")
        made |= writes


# ---------------------------------------------------------------------------------------------- Python snippets
def test_python_imports_shown_work():
    """Every ``from vitkit... import name`` and ``vitkit.name`` attribute in the README's Python blocks exists."""
    import vitkit

    for lang, _, body in code_blocks(README.read_text(encoding="utf-8")):
        if lang != "python":
            continue
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitkit":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README: from {node.module} import {alias.name} fails"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "vitkit":
                assert hasattr(vitkit, node.attr), f"README: vitkit.{node.attr} does not exist"


# ---------------------------------------------------------------------------------------------- prose lists
def test_layout_names_every_package_folder():
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    folders = sorted(p.parent.name for p in (ROOT / "src" / "vitkit").glob("*/__init__.py"))
    missing = [f for f in folders if not re.search(rf"^\s+{f}/\s", layout, re.M)]
    assert not missing, f"README Layout lacks a line for src/vitkit/{missing}"
    tools = sorted(p.stem for p in (ROOT / "src" / "vitkit" / "tools").glob("*.py") if not p.stem.startswith("_"))
    tools_line = layout[layout.index("tools/"):layout.index("viz/")]
    missing = [t for t in tools if t not in tools_line]
    assert not missing, f"README Layout: the tools/ line lacks {missing}"


def test_studies_list_every_doc():
    text = README.read_text(encoding="utf-8")
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    missing = [d for d in docs if f"(docs/{d})" not in text]
    assert not missing, f"README does not link {missing}"


def test_readme_lists_every_task_and_family_in_prose():
    """The generated tables list them; the introduction must not lag behind (it once named 3 of 10 tasks)."""
    from vitkit.tasks import TASKS

    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    tasks_line = next(line for line in layout.splitlines() if line.strip().startswith("tasks/"))
    shipped = [name for name, cls in TASKS.items() if cls.__module__.startswith("vitkit.")]  # not tests' own
    missing = [t for t in shipped if not re.search(rf"\b{t}\b", tasks_line)]
    assert not missing, f"README Layout: the tasks/ line lacks {missing}"
