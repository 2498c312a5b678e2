"""``vitkit report``: rebuild every generated table, verdict and plot of the docs from committed results files.

A doc holds hand-written prose and generated blocks between markers::

    <!-- report: KIND key=value key="a value with spaces" -->
    ...generated; rewritten by `vitkit report`...
    <!-- /report -->

Paths in the arguments are relative to the doc's folder (``results=ablations/results.jsonl``), except
``script=`` (relative to the repository root, the folder holding ``pyproject.toml``). Kinds:

* ``ablation`` (``results``, ``study``, optional ``studies`` file): a study's table and verdicts, the same text
  ``vitkit ablate`` writes (:func:`vitkit.tools.ablate.format_table`);
* ``ablation_plot`` (``results``, ``study``, ``image``): the study's plot, and the image link;
* ``table`` (``results``, ``group``, ``columns``, optional ``where``, ``order``): mean ± std over the records of
  each group, e.g. ``columns="test.top1*100:test top-1 (%):.2f,params:params:,d"``;
* ``verdict`` (``results``, ``group``, ``value``, ``contrast``, ``expect``, optional ``margin``, ``says``,
  ``where``, ``baseline``, ``unit``): one claim judged by the verdict rule of :mod:`vitkit.tools.verdict`,
  e.g. ``contrast=gap:1,cls:-1 expect=within margin=1``;
* ``script`` (``script``, ``function``, more arguments): ``function(doc_dir, **arguments)`` of a repository
  script (a benchmark's own tables), returning Markdown;
* ``verdicts`` (``doc``, optional ``match``): the verdict lines of another doc, rebuilt from that doc's results,
  for a summary (the README's) that cannot fall behind its studies.

``vitkit report --check`` changes nothing and fails (exit 1) listing every doc whose blocks differ from what its
results give, so tables cannot drift from their data; the test suite runs it.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from ..utils import atomic_write_text

# a marker starts its line (an indented one is an example in a code block, left alone)
BLOCK = re.compile(r"^(<!-- report: (?P<head>[^\n]*?) -->\n)(?P<body>.*?)^(<!-- /report -->)", re.S | re.M)
SECTIONS: dict[str, Callable[..., str]] = {}
DEFAULT_DOCS = ("docs/*.md", "benchmarks/RESULTS.md", "README.md")
# a generated verdict line: a list item with "→ **verdict**" (or a goal's "→ goal **reached**")
VERDICT_LINE = re.compile(r"^\s*- .* → (goal )?\*\*")


def select_run_meta(records: list[dict[str, Any]], run: str = "latest") -> dict[str, Any]:
    """The ``meta`` record of one run of a benchmark's results file (records ``{"kind": "meta" | ... | "end",
    "run_id"}``): ``run`` is a run_id, or ``latest``: the last run that finished (has its ``end`` record) and is
    not a ``--quick`` one."""
    metas = [r for r in records if r.get("kind") == "meta"]
    ends = {r["run_id"] for r in records if r.get("kind") == "end"}
    if run == "latest":
        done = [m for m in metas if m["run_id"] in ends and not m["settings"].get("quick")]
        if not done:
            raise ConfigError(f"no finished full run among the {len(metas)} run(s) of the results file")
        return done[-1]
    found = [m for m in metas if m["run_id"] == run]
    if not found:
        raise ConfigError(f"no run {run!r} in the results file; runs: {[m['run_id'] for m in metas]}")
    return found[-1]


def run_records(records: list[dict[str, Any]], run: str = "latest", kind: str | None = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, records) of one run of a benchmark's results file (:func:`select_run_meta`): the run's records other
    than its meta record, or only those of ``kind``."""
    meta = select_run_meta(records, run)
    own = [r for r in records if r.get("run_id") == meta["run_id"] and r.get("kind") != "meta"]
    return meta, [r for r in own if kind is None or r.get("kind") == kind]


def median_contention(record: dict[str, Any]) -> float | None:
    """The median over a timed record's samples of the CPU share other processes took (None: never measured)."""
    import math
    import statistics

    measured = [c for c in record.get("contention") or [] if c is not None and not math.isnan(c)]
    return statistics.median(measured) if measured else None


def contention_mark(record: dict[str, Any], limit: float) -> str:
    """A timed figure's mark in a table (method.md §5): "†" no clean sample was ever taken (an estimate), "*" its
    kept samples' median contention is above ``limit``, "" a clean figure."""
    if "noisy" in (record.get("note") or ""):
        return "†"
    cont = median_contention(record)
    return "*" if cont is not None and cont > limit else ""


def section(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        SECTIONS[name] = fn
        return fn
    return register


def repo_root(start: Path) -> Path:
    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def parse_head(head: str, where: str) -> tuple[str, dict[str, str]]:
    try:
        words = shlex.split(head)
    except ValueError as e:
        raise ConfigError(f"{where}: cannot read the report marker ({e})") from None
    if not words:
        raise ConfigError(f"{where}: a report marker needs a kind, one of {sorted(SECTIONS)}")
    kind, args = words[0], {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise ConfigError(f"{where}: marker argument {word!r} must look like key=value")
        args[key] = value
    if kind not in SECTIONS:
        raise ConfigError(f"{where}: unknown report kind {kind!r}; kinds: {sorted(SECTIONS)}")
    return kind, args


def render_text(text: str, doc: Path, plots: bool = True) -> str:
    """The doc's text with every generated block rebuilt from its results."""
    def rebuild(match: re.Match) -> str:
        line = text.count("\n", 0, match.start()) + 1
        where = f"{doc}:{line}"
        kind, args = parse_head(match["head"], where)
        try:
            body = SECTIONS[kind](doc.parent, plots=plots, **args)
        except TypeError as e:
            raise ConfigError(f"{where}: report kind {kind!r}: {e}") from None
        except (KeyError, ValueError, OSError) as e:
            raise ConfigError(f"{where}: report kind {kind!r} failed: {type(e).__name__}: {e}") from None
        return match.group(1) + body.rstrip("\n") + "\n" + match.group(4)

    return BLOCK.sub(rebuild, text)


def read_doc(path: Path) -> str:
    """A doc's text; a doc that is not UTF-8 is a ConfigError naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} cannot be "
                          f"decoded: {e.reason})") from None


def report(paths: list[Path], check: bool = False) -> list[tuple[Path, str]]:
    """Rebuild the docs (or with ``check`` only compare); returns (doc, unified diff) for every doc that differs."""
    changed = []
    for path in paths:
        old = read_doc(path)
        new = render_text(old, path, plots=not check)
        if new != old:
            diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path),
                                                f"{path} (from its results)", n=1))
            changed.append((path, diff))
            if not check:
                atomic_write_text(path, new)
    return changed


def doc_paths(patterns: list[str] | tuple[str, ...], root: Path) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        found = sorted(root.glob(pattern)) if any(c in pattern for c in "*?[") else [root / pattern]
        paths += [p for p in found if p.is_file() and "<!-- report:" in read_doc(p)]
    return paths


# ---------------------------------------------------------------------------- records
def load_records(doc_dir: Path, results: str) -> list[dict[str, Any]]:
    from .ablate import read_results

    records: list[dict[str, Any]] = []
    for name in results.split(","):
        path = doc_dir / name
        if not path.is_file():
            raise ConfigError(f"{path}: results file not found")
        records += read_results(path)
    return records


def field(record: dict[str, Any], expr: str) -> Any:
    """A dotted path into a record, optionally scaled: ``test.top1*100``; None where the path is absent."""
    path, _, scale = expr.partition("*")
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value * float(scale) if scale and isinstance(value, (int, float)) else value


def select(records: list[dict[str, Any]], where: str | None) -> list[dict[str, Any]]:
    """Records matching every ``key=value`` of ``where`` (``;``-separated, values compared as text)."""
    if not where:
        return records
    tests = [w.partition("=")[::2] for w in where.split(";") if w]
    return [r for r in records if all(str(field(r, k)) == v for k, v in tests)]


def grouped(records: list[dict[str, Any]], group: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(field(r, group)), []).append(r)
    return groups


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if spec else f"{value:g}"


# ---------------------------------------------------------------------------- kinds
def _study(studies: str | None, name: str, doc_dir: Path):
    from .ablate import STUDIES, load_studies

    catalogue = load_studies(doc_dir / studies) if studies else STUDIES
    if name not in catalogue:
        raise ConfigError(f"study {name!r} is not in {'the file ' + studies if studies else 'vitkit studies'}")
    return catalogue[name]


@section("ablation")
def ablation_section(doc_dir: Path, results: str, study: str, studies: str | None = None, plots: bool = True) -> str:
    from .ablate import format_table

    rows = [r for r in load_records(doc_dir, results) if r.get("study") == study]
    if not rows:
        raise ConfigError(f"{results} holds no rows of study {study!r}")
    table = format_table(_study(studies, study, doc_dir), rows)
    return table.split("\n", 2)[2].lstrip("\n")  # the doc has its own heading


@section("ablation_plot")
def ablation_plot_section(doc_dir: Path, results: str, study: str, image: str, studies: str | None = None,
                          plots: bool = True) -> str:
    from ..viz.plots import plot_ablation
    from .ablate import summarize

    spec = _study(studies, study, doc_dir)
    if plots:
        rows = [r for r in load_records(doc_dir, results) if r.get("study") == study]
        plot_ablation(summarize(spec, rows), f"{study}: {spec.claim}", doc_dir / image)
    return f"![{study}]({image})"


@section("ablation_lines")
def ablation_lines_section(doc_dir: Path, results: str, study: str, image: str, series: str, x: str,
                           xlabel: str = "", ylabel: str = "test top-1 (%)", logx: str = "false",
                           title: str | None = None, studies: str | None = None, plots: bool = True) -> str:
    """Test accuracy against a quantity the variant names encode, one line per series, from the same runs as the
    study's table: ``series="ViT:vit_{x};ResNet:resnet_{x}"`` and ``x="1pct:1:1%;10pct:10:10%"``
    (token:position[:tick label]); a variant without runs yet leaves its point out."""
    from ..viz.plots import plot_lines
    from .ablate import chosen_lines, summarize

    spec = _study(studies, study, doc_dir)
    ticks = []
    for item in x.split(";"):
        token, _, rest = item.partition(":")
        position, _, tick = rest.partition(":")
        ticks.append((token, float(position), tick or token))
    known = {v.label for v in spec.variants}
    variants = {}  # series name -> [(x position, variant)]
    for name, _, pattern in (item.partition(":") for item in series.split(";")):
        variants[name] = [(pos, pattern.format(x=token)) for token, pos, _ in ticks]
        unknown = [v for _, v in variants[name] if v not in known]
        if unknown:
            raise ConfigError(f"series {name!r}: study {study!r} has no variants {unknown}")
    if plots:
        rows = [r for r in load_records(doc_dir, results) if r.get("study") == study]
        lines = chosen_lines(spec, summarize(spec, rows))
        points = {name: [(pos, lines[v]["values"]) for pos, v in pairs if v in lines]
                  for name, pairs in variants.items()}
        plot_lines({k: v for k, v in points.items() if v}, doc_dir / image, title or f"{study}: {spec.claim}",
                   xlabel, ylabel, logx=logx.lower() == "true", xticks=[(pos, tick) for _, pos, tick in ticks])
    return f"![{study}]({image})"


def _columns(spec: str) -> list[tuple[str, str, str]]:
    cols = []
    for item in spec.split(","):
        expr, header, fmt = ([*item.split(":", 2), "", ""])[:3]
        cols.append((expr, header or expr, fmt))
    return cols


@section("table")
def table_section(doc_dir: Path, results: str, group: str, columns: str, where: str | None = None,
                  order: str | None = None, label: str | None = None, plots: bool = True) -> str:
    """Mean ± std (n > 1) or the value (n = 1) of each column over each group's records, plus the seed count."""
    groups = grouped(select(load_records(doc_dir, results), where), group)
    names = order.split(",") if order else list(groups)
    cols = _columns(columns)
    out = [f"| {label or group} | " + " | ".join(h for _, h, _ in cols) + " | runs |",
           "|---|" + "---:|" * len(cols) + "---:|"]
    for name in names:
        if name not in groups:
            raise ConfigError(f"{results}: no records with {group}={name}")
        cells = []
        for expr, _, fmt in cols:
            values = _values(groups[name], expr, None)
            if not values:
                cells.append("—")
            elif len(values) == 1:
                cells.append(_fmt(values[0], fmt))
            else:
                cells.append(f"{_fmt(statistics.fmean(values), fmt)} ± {_fmt(statistics.stdev(values), fmt)}")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {len(groups[name])} |")
    return "\n".join(out)


def _values(records: list[dict[str, Any]], value: str, per: str | None) -> list[float]:
    """The numeric ``value`` of each record, or with ``per`` the mean of each ``per`` group's values."""
    if per is None:
        return [v for v in (field(r, value) for r in records) if isinstance(v, (int, float))]
    return [statistics.fmean(vs) for vs in (_values(rs, value, None) for rs in grouped(records, per).values()) if vs]


@section("verdict")
def verdict_section(doc_dir: Path, results: str, group: str, value: str, contrast: str, expect: str,
                    margin: str | None = None, says: str | None = None, where: str | None = None,
                    unit: str = "points", baseline: str | None = None, per: str | None = None,
                    digits: str = "2", plots: bool = True) -> str:
    """``baseline``: a constant the contrast is compared with (e.g. chance: ``contrast=clip:1 baseline=10``).
    ``per``: a field whose records are one run (e.g. a run's per-head records): their values are averaged first,
    so the interval counts runs, not heads."""
    from dataclasses import replace

    from .verdict import contrast_interval, decide

    groups = grouped(select(load_records(doc_dir, results), where), group)
    weights = {}
    for term in contrast.split(","):
        name, _, weight = term.partition(":")
        if name in weights:
            raise ConfigError(f"contrast {contrast!r} names {name!r} twice")
        weights[name] = float(weight or 1)
    missing = [g for g in weights if g not in groups]
    if missing:
        raise ConfigError(f"{results}: no records with {group} in {missing} (groups: {sorted(groups)})")
    values = {g: _values(groups[g], value, per) for g in weights}
    interval = contrast_interval(values, weights)
    shift = float(baseline) if baseline else 0.0
    if interval is not None and shift:
        interval = replace(interval, estimate=interval.estimate - shift, low=interval.low - shift,
                           high=interval.high - shift)
    seeds = min(len(v) for v in values.values())
    verdict = decide(interval, expect, float(margin) if margin else None, seeds)
    terms = " ".join(f"{'+' if w > 0 else '−'} {'' if abs(w) == 1 else f'{abs(w):g}×'}{g}"
                     for g, w in weights.items()).lstrip("+ ") + (f" − {shift:g}" if shift else "")
    bound = {"above": "> 0", "below": "< 0"}.get(expect) or f"within ±{float(margin or 0):g}"
    shown = "no interval" if interval is None else f"{interval.show(int(digits))}{' ' + unit if unit else ''}"
    return f"- {says or value} ({terms} {bound}): {shown} → **{verdict}**"


def load_script(path: str | Path) -> ModuleType:
    """A repository script (a benchmark) imported by path, as the ``script`` kind and the tests use it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: script not found")
    name = f"_vitkit_script_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # not a .py file: Python has no loader for it
        raise ConfigError(f"{path}: not a Python script (.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise ConfigError(f"{e.filename or path}:{e.lineno}: the script is not valid Python ({e.msg})") from None
    except BaseException:
        del sys.modules[name]  # a half-run module must not be reused by the next call
        raise
    return module


@section("script")
def script_section(doc_dir: Path, script: str, function: str, plots: bool = True, **args: str) -> str:
    path = repo_root(doc_dir) / script
    module = load_script(path)
    fn = getattr(module, function, None)
    if fn is None:
        raise ConfigError(f"{path} has no function {function!r}")
    return fn(doc_dir, plots=plots, **args)


@section("verdicts")
def verdicts_section(doc_dir: Path, doc: str, match: str | None = None, plots: bool = True) -> str:
    """Every verdict line of ``doc`` (relative to this doc's folder; nested goal lines keep their indent), as
    that doc's own blocks give them from its results now; ``match``: only lines containing this text."""
    path = doc_dir / doc
    if not path.is_file():
        raise ConfigError(f"{path}: doc not found")
    text = render_text(read_doc(path), path, plots=False)
    lines = [line for block in BLOCK.finditer(text) for line in block["body"].splitlines()
             if VERDICT_LINE.match(line) and (match is None or match in line)]
    if not lines:
        raise ConfigError(f"{path}: no generated verdict line" + (f" containing {match!r}" if match else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
KIND_HELP = {
    "ablation": "a `vitkit ablate` study's table and verdicts (results=, study=)",
    "ablation_plot": "its bars of test top-1 per variant (results=, study=, image=)",
    "ablation_lines": "its test top-1 against a size the variant names encode (series=, x=, image=)",
    "table": "mean ± std of columns over groups of records (results=, group=, columns=, where=)",
    "verdict": "one verdict line by the rule of docs/method.md (group=, value=, contrast=, expect=, per=)",
    "script": "a benchmark's own renderer (script=, function=, ...)",
    "verdicts": "every verdict line of another doc (doc=, match=)",
}


def add_report_args(p: Any) -> None:
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("a generated block is <!-- report: KIND key=value ... --> ... <!-- /report -->; kinds:\n"
                + "\n".join(f"  {kind:15s} {KIND_HELP.get(kind, '')}" for kind in SECTIONS))
    p.add_argument("docs", nargs="*", help=f"docs to rebuild (default: {' '.join(DEFAULT_DOCS)})")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 listing the docs whose generated blocks differ from their results")


def run_report_args(args: Any) -> int:
    root = Path.cwd()
    paths = [Path(d) for d in args.docs] if args.docs else doc_paths(DEFAULT_DOCS, root)
    if not paths:  # run from another folder: `--check` would pass having checked nothing
        raise ConfigError(f"no doc with report blocks in {root} ({', '.join(DEFAULT_DOCS)}); run vitkit report from "
                          f"the repository root, or name the docs")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"doc not found: {', '.join(missing)}")
    changed = report(paths, check=args.check)
    for path, diff in changed:
        print(diff if args.check else f"rebuilt {path}")
    if args.check and changed:
        print(f"{len(changed)} doc(s) differ from their results; run `vitkit report` and commit", file=sys.stderr)
        return 1
    print(f"{len(paths)} doc(s) checked, {len(changed)} " + ("differ" if args.check else "rewritten"))
    return 0
