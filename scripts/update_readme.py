"""Regenerate the README's generated tables from the code, or check that they are current.

    python scripts/update_readme.py           # rewrite the tables in README.md (also: make readme)
    python scripts/update_readme.py --check   # exit 1 naming every stale table, change nothing

Each table sits between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->``:

* ``models``: every registered name from ``vitkit.list_models()``, grouped by family (the file it is defined in),
  with the family's description (the first sentence of its module docstring) and each model's parameter count;
* ``tasks``: the task registry (``vitkit.tasks.TASKS``): name, primary metric and direction, first docstring
  sentence;
* ``converters``: ``vitkit.convert.CONVERTERS``: the kind ``vitkit convert`` takes and what it reads;
* ``cli``: the subcommands of the CLI's own parser (``vitkit.cli.build_parser()``) and their help.

Edit the code (docstrings, help strings), not the tables: ``tests/test_readme.py`` fails while a table is stale.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

BEGIN = "<!-- BEGIN GENERATED: {} -->"
END = "<!-- END GENERATED: {} -->"
NOTE = "<!-- written by scripts/update_readme.py from the code: edit the code, then run `make readme` -->"

# families in reading order (classifiers, pretraining, vision-language, generation); others follow by name
FAMILY_ORDER = ["vit", "t2t_vit", "swin", "efficientvit", "mae", "simclr", "clip", "vilt", "vqvae", "ar", "var",
                "hart"]


# ---------------------------------------------------------------------------------------------- text helpers
def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line, with reST markup as Markdown."""
    if not doc:
        return ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"`\1`", para)  # :func:`~a.b.name` -> `name`
    para = para.replace("``", "`")
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bal)(?<!\bvs)\.(\s|$)", para)
    return (para[:match.start() + 1] if match else para).strip()


def cell(text: str) -> str:
    """Text that is safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def human_count(n: int) -> str:
    """12_345_678 -> '12.3M', 2_010_020_000 -> '2.01B', 340_000 -> '340k'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{round(n / 1e3)}k"


# ---------------------------------------------------------------------------------------------- models
def count_parameters(name: str) -> int | None:
    """Parameters of a registered model, counted without allocating the large tensors.

    Factory calls that ask for a large tensor (>= 4096 elements: the weights) make it on the meta device; small
    ones (drop-path schedules, position tables' helpers) stay on the CPU, where constructors may read their
    values. None if the model cannot be built that way.
    """
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    from vitkit.models import create_model

    constructors = _device_constructors()

    class LargeOnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in constructors and kwargs.get("device") is None:
                shape = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
                try:
                    numel = math.prod(int(s) for s in shape)
                except (TypeError, ValueError):
                    numel = 0
                if numel >= 4096:
                    kwargs["device"] = "meta"
            return func(*args, **kwargs)

    try:
        with warnings.catch_warnings(), LargeOnMeta():
            warnings.simplefilter("ignore")
            model = create_model(name)
    except Exception:  # noqa: BLE001  (a count is a nicety; the name is still listed)
        return None
    return sum(p.numel() for p in model.parameters())


def family_order(families: list[str]) -> list[str]:
    known = [f for f in FAMILY_ORDER if f in families]
    return known + sorted(f for f in families if f not in FAMILY_ORDER)


def model_table() -> str:
    import vitkit
    from vitkit.models import model_family

    by_family: dict[str, list[str]] = {}
    for name in vitkit.list_models():
        by_family.setdefault(model_family(name), []).append(name)
    rows = ["| family | what it is | models (parameters) |", "|---|---|---|"]
    for family in family_order(list(by_family)):
        if not (ROOT / "src" / "vitkit" / "models" / f"{family}.py").is_file():
            continue  # registered by user code (or a test) in this process, not shipped
        module = importlib.import_module(f"vitkit.models.{family}")
        path = package_path(module)
        counts = {name: count_parameters(name) for name in by_family[family]}
        ordered = sorted(counts, key=lambda n: (counts[n] is None, counts[n] or 0, n))  # small to large
        names = [f"`{n}`" + (f" {human_count(counts[n])}" if counts[n] is not None else "") for n in ordered]
        rows.append(f"| `{family}`<br>`{path}` | {cell(first_sentence(module.__doc__))} | {', '.join(names)} |")
    return "\n".join(rows)


def package_path(module) -> str:
    """``models/vit.py``: a module's file inside the package, as the tables show it."""
    return Path(module.__file__).resolve().relative_to(ROOT / "src" / "vitkit").as_posix()


# ---------------------------------------------------------------------------------------------- tasks
def task_table() -> str:
    from vitkit.tasks import TASKS

    rows = ["| task | file | primary metric | what it trains |", "|---|---|---|---|"]
    for name in sorted(TASKS):
        cls = TASKS[name]
        if not cls.__module__.startswith("vitkit."):
            continue  # registered by user code (or a test) in this process, not shipped
        module = sys.modules[cls.__module__]
        path = package_path(module)
        # the class's own docstring, else its module's (a class without one would inherit nothing useful)
        doc = cls.__dict__.get("__doc__") or module.__doc__
        rows.append(f"| `{name}` | `{path}` | `{cls.primary_metric}` ({cls.mode}) | {cell(first_sentence(doc))} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- converters
def converter_table() -> str:
    from vitkit.convert import CONVERTERS

    rows = ["| `vitkit convert` kind | function | what it reads |", "|---|---|---|"]
    for kind in sorted(CONVERTERS):
        fn = CONVERTERS[kind]
        rows.append(f"| `{kind}` | `{fn.__module__}.{fn.__name__}` | {cell(first_sentence(fn.__doc__))} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- CLI
def _sub_actions(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _positionals(parser: argparse.ArgumentParser) -> str:
    words = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        word = action.metavar or action.dest.upper()
        if action.nargs in ("+", "*"):
            word = f"{word} [{word} ...]" if action.nargs == "+" else f"[{word} ...]"
        elif action.nargs == "?":
            word = f"[{word}]"
        words.append(word)
    return " ".join(words)


def _choices_note(parser: argparse.ArgumentParser) -> str:
    notes = []
    for action in parser._actions:
        if not action.option_strings and action.choices and not isinstance(action, argparse._SubParsersAction):
            notes.append(f"{action.metavar or action.dest.upper()}: {', '.join(map(str, action.choices))}")
    return f" ({'; '.join(notes)})" if notes else ""


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, str]]:
    """(command line, help) for every leaf subcommand, depth first, in the parser's order."""
    sub = _sub_actions(parser)
    if sub is None:
        return []
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    out = []
    for name, child in sub.choices.items():
        words = f"{prefix} {name}"
        if _sub_actions(child) is not None:
            out += _commands(child, words)
            continue
        usage = f"{words} {_positionals(child)}".strip()
        out.append((usage, (helps.get(name) or child.description or "") + _choices_note(child)))
    return out


def cli_table() -> str:
    from vitkit.cli import build_parser

    rows = ["| command | what it does |", "|---|---|"]
    for usage, help_text in _commands(build_parser(), "vitkit"):
        rows.append(f"| `{usage}` | {cell(help_text)} |")
    return "\n".join(rows)


TABLES: dict[str, Callable[[], str]] = {
    "models": model_table, "tasks": task_table, "converters": converter_table, "cli": cli_table,
}


# ---------------------------------------------------------------------------------------------- README
def _section(text: str, name: str) -> tuple[int, int]:
    """(start, end) of the text between the markers of ``name``; ValueError naming a missing marker."""
    begin, end = BEGIN.format(name), END.format(name)
    i = text.find(begin)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ValueError(f"README has no {begin if i < 0 else end} marker for the {name!r} table")
    return i + len(begin), j


def render(text: str, tables: dict[str, str]) -> str:
    """``text`` with each named table's markers holding ``tables[name]``."""
    for name, table in tables.items():
        start, end = _section(text, name)
        text = f"{text[:start]}\n{NOTE}\n\n{table}\n\n{text[end:]}"
    return text


def generate(names: list[str] | None = None) -> dict[str, str]:
    return {name: TABLES[name]() for name in (names or TABLES)}


def stale_tables(text: str, tables: dict[str, str] | None = None) -> list[str]:
    """Names of the tables whose README text differs from what the code generates now."""
    tables = generate() if tables is None else tables
    stale = []
    for name, table in tables.items():
        start, end = _section(text, name)
        if text[start:end] != f"\n{NOTE}\n\n{table}\n\n":
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/update_readme.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale; change nothing")
    parser.add_argument("--readme", type=Path, default=README, help="the file to update (default: README.md)")
    parser.add_argument("--only", action="append", choices=sorted(TABLES), help="only this table (repeatable)")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    tables = generate(args.only)
    try:
        stale = stale_tables(text, tables)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print(f"{args.readme}: stale generated table(s): {', '.join(stale)}; run `make readme` "
                  f"(python scripts/update_readme.py)", file=sys.stderr)
            return 1
        print(f"{args.readme}: generated tables are current ({', '.join(tables)})")
        return 0
    if stale:
        args.readme.write_text(render(text, {n: tables[n] for n in stale}), encoding="utf-8")
    print(f"{args.readme}: rewrote {', '.join(stale)}" if stale else f"{args.readme}: already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
