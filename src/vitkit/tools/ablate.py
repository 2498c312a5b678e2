"""``vitkit ablate``: train the variants of a base recipe under one protocol and tabulate the outcome.

Each study answers one design claim of a paper; the studies are data (``studies.yaml`` beside this module, or
a file of your own with the same form). Every variant is the base recipe
plus a few dotted overrides, trained by the same engine with the same data, augmentation, budget and seeds.
Runs are keyed by their full resolved configuration, so a variant shared by two studies (the baseline,
for one) is trained once, and a second invocation skips every run already in ``results.jsonl``; a run that
was interrupted is resumed from its last checkpoint. The trainings run here (``--jobs`` side by side) or as Ray
tasks (``--backend ray``, :mod:`.backends`); this process alone appends to the results file, as each one ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import config_to_dict, load_config
from ..engine.trainer import train
from ..errors import ConfigError
from ..utils import atomic_write_text
from .backends import add_backend_args, check_backend, open_backend
from .backends import die_with_parent as die_with_parent  # kept importable from here (worker initializer)

# what a record says about the machine a run happened to train on, not about the run: these differ between two
# trainings of the same run (another backend, node or load); every other field is the same for the same seeds
RECORD_FIELDS_THAT_VARY = ("train_img_s", "wall_clock_s", "machine", "load_1m", "finished_at", "elapsed_s")


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Check:
    """One testable reading of a claim: ``sum weight * variant`` is ``above`` 0, ``below`` 0 or ``within``
    ±margin (points of the metric, in %), judged by :func:`vitkit.tools.verdict.decide`."""
    says: str
    contrast: tuple[tuple[str, float], ...]
    expect: str
    margin: float | None = None


@dataclass(frozen=True)
class Study:
    name: str
    claim: str
    variants: tuple[Variant, ...]
    lr_multipliers: tuple[float, ...] = (1.0,)  # a learning-rate sweep per variant (pooling study)
    steps_matched_fraction: bool = field(default=False)  # data-size: epochs / fraction, same optimizer steps
    # with steps_matched_fraction: the data fraction the recipe's epoch count is meant for (1.0: the full set)
    reference_fraction: float = 1.0
    evals_per_run: int | None = None  # evaluate this many times per run (long small-data runs), else the recipe's
    scale_warmup: bool = False  # with steps_matched_fraction: warm-up epochs scaled too (same warm-up steps)
    # Δ against the first variant with the same label suffix ("..._10pct" vs "scratch_10pct"), not the first row
    compare_within_suffix: bool = False
    checks: tuple[Check, ...] = ()  # the claim, as contrasts judged by the verdict rule (tools/verdict.py)
    recipe: str | None = None  # the study's own base recipe (the default --recipe), if it needs one

    @property
    def needs_pretrained(self) -> bool:
        return any("{pretrained." in o for v in self.variants for o in v.overrides)


STUDIES_FILE = Path(__file__).with_name("studies.yaml")
_STUDY_OPTIONS = {"lr_multipliers", "steps_matched_fraction", "reference_fraction", "evals_per_run", "scale_warmup",
                  "compare_within_suffix", "checks", "recipe"}


def _parse_check(item: Any, where: str, labels: set[str]) -> Check:
    from .verdict import EXPECTATIONS

    if not isinstance(item, dict) or not isinstance(item.get("says"), str) or \
            not isinstance(item.get("contrast"), dict) or item.get("expect") not in EXPECTATIONS:
        raise ConfigError(f"{where}: a check needs 'says' (text), 'contrast' ({{variant: weight}}) and 'expect' "
                          f"(one of {list(EXPECTATIONS)})")
    unknown = sorted(set(item["contrast"]) - labels)
    if unknown:
        raise ConfigError(f"{where}: check {item['says']!r} names {unknown}, not variants of the study")
    if item["expect"] == "within" and not isinstance(item.get("margin"), (int, float)):
        raise ConfigError(f"{where}: check {item['says']!r} expects 'within' and needs a 'margin' (points)")
    return Check(item["says"], tuple((str(k), float(v)) for k, v in item["contrast"].items()), item["expect"],
                 item.get("margin"))


def load_studies(path: str | Path = STUDIES_FILE) -> dict[str, Study]:
    """The studies of a YAML file (``studies: {name: {claim, options..., variants: {label: [overrides]}}}``);
    vitkit's own are in ``studies.yaml`` beside this module. A malformed entry is a ConfigError naming it."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the studies: {e}") from None
    studies = {}
    for name, spec in (data.get("studies") or {}).items() if isinstance(data, dict) else ():
        where = f"{path}: study {name!r}"
        if not isinstance(spec, dict) or not isinstance(spec.get("claim"), str) or \
                not isinstance(spec.get("variants"), dict) or not spec["variants"]:
            raise ConfigError(f"{where} needs a 'claim' (text) and 'variants' ({{label: [overrides]}})")
        unknown = sorted(set(spec) - _STUDY_OPTIONS - {"claim", "variants"})
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; options are {sorted(_STUDY_OPTIONS)}")
        variants = []
        for label, overrides in spec["variants"].items():
            if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
                raise ConfigError(f"{where}, variant {label!r}: overrides must be a list of 'key=value' strings")
            variants.append(Variant(str(label), tuple(overrides)))
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
                   if k in _STUDY_OPTIONS and k != "checks"}
        labels = {v.label for v in variants}
        options["checks"] = tuple(_parse_check(c, where, labels) for c in spec.get("checks") or ())
        studies[str(name)] = Study(str(name), " ".join(spec["claim"].split()), tuple(variants), **options)
    if not studies:
        raise ConfigError(f"{path} defines no studies (expected a top-level 'studies:' mapping)")
    return studies


STUDIES: dict[str, Study] = load_studies()


def _base_patch(base_cfg) -> int:
    from ..models import model_defaults

    return int(base_cfg.model.args.get("patch_size") or model_defaults(base_cfg.model.name).get("patch_size", 16))


def _fill_pretrained(item: str, pretrained: dict[str, str], study: Study, variant: Variant) -> str:
    """``{pretrained.NAME}`` -> the checkpoint given with ``--pretrained NAME=PATH``."""
    while "{pretrained." in item:
        start = item.index("{pretrained.")
        end = item.index("}", start)
        name = item[start + len("{pretrained."):end]
        if name not in pretrained:
            raise ConfigError(f"study {study.name}, variant {variant.label}: needs a pretrained checkpoint "
                              f"'{name}'; pass --pretrained {name}=PATH (a run folder or checkpoint folder)")
        item = item[:start] + str(pretrained[name]) + item[end + 1:]
    return item


def _variant_overrides(study: Study, variant: Variant, lr_mult: float, base_cfg,
                       pretrained: dict[str, str] | None = None) -> list[str]:
    patch = _base_patch(base_cfg)
    over = [_fill_pretrained(o.replace("{2 * patch}", str(2 * patch)).replace("{patch}", str(patch)),
                             pretrained or {}, study, variant) for o in variant.overrides]
    if lr_mult != 1.0:
        over.append(f"optim.lr={base_cfg.optim.lr * lr_mult:.6g}")
    epochs = base_cfg.train.epochs
    if study.steps_matched_fraction:
        frac = next((float(o.split("=")[1]) for o in over if o.startswith("data.train_fraction=")), 1.0)
        scale = study.reference_fraction / frac
        epochs = max(1, round(base_cfg.train.epochs * scale))
        over.append(f"train.epochs={epochs}")
        if study.scale_warmup:
            over.append(f"schedule.warmup_epochs={base_cfg.schedule.warmup_epochs * scale:g}")
    if study.evals_per_run:
        over.append(f"train.eval_every={max(1, epochs // study.evals_per_run)}")
    return over


# Constructor flags added after results files were first recorded: at these values they build the model as before,
# so they stay out of the key and every recorded run keeps its key (a flag set otherwise is part of it).
LATER_FLAGS: dict[str, Any] = {"reg_tokens": 0, "no_embed_class": False, "fc_norm": False, "pre_norm": False,
                               "attn_eps": 1e-15, "vision_act": None, "text_act": None, "vision_norm_eps": None,
                               "text_norm_eps": None, "local_dwconv": True, "sparse_grouping": "equal",
                               "token_keep_ratio": 1.0, "attn_kind": "softmax"}


# Config keys added after results files were first recorded, with the value that behaves as before: left out of
# the key at that value, for the same reason.
LATER_SETTINGS: dict[tuple[str, str], Any] = {("data", "test_split"): None}


def run_key(cfg) -> str:
    """Identify a run by what it trains: the config with the model's arguments fully resolved."""
    from ..models import resolve_model_args

    data = config_to_dict(cfg)
    resolved = resolve_model_args(cfg.model.name, **cfg.model.args) if cfg.model.name else None
    if resolved is not None:
        data["model"]["args"] = {k: v for k, v in resolved.items()
                                 if k not in LATER_FLAGS or LATER_FLAGS[k] != v}
    data.pop("output_dir", None)
    for (section, key), default in LATER_SETTINGS.items():
        if data.get(section, {}).get(key, default) == default:
            data[section].pop(key, None)
    # these change speed, display, tracking or placement, not the trained model (and keep older keys valid)
    for how_not_what in ("threads", "progress", "loggers", "logger_args", "device", "strategy",
                         "activation_checkpointing"):
        data["train"].pop(how_not_what, None)
    data["data"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (JSON lines); a bad line is a ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}, line {number}: not a JSON record ({e.msg})") from None
    return records


def machine_facts() -> dict[str, Any]:
    """What a training speed depends on: CPU, cores, bf16/AMX support, torch, Python (the part of
    :func:`~vitkit.tools.timing.machine_record` a training record keeps)."""
    from .timing import machine_record

    machine = machine_record()
    return {k: machine[k] for k in ("cpu", "cores", "native_bf16", "amx", "torch", "python")}


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _run_record(recipe: str | Path, over: list[str], run_dir: Path, epochs: int, model: str) -> dict[str, Any]:
    """Train one variant (resuming its folder if a checkpoint is there) and keep every metric it reported."""
    import time

    resume = run_dir if (run_dir / "checkpoints" / "last").is_dir() else None
    load_before, started = _load_1m(), time.time()
    # a folder without a checkpoint is this tool's own interrupted start: begin it again
    summary = train(recipe, [*over, f"output_dir={run_dir}", "train.progress=false"], resume=resume,
                    if_exists="overwrite")
    return {"metric": summary.get("primary_metric", "top1"), "eval_split": summary.get("eval_split", "test"),
            "final": summary["final"], "best": summary["best"], **({"test": summary["test"]} if "test" in summary
                                                                    else {}),
            "params": summary["params"], "train_img_s": summary["train_img_s"],
            "wall_clock_s": summary["train_wall_clock_s"], "epochs": epochs, "model": model,
            "machine": machine_facts(), "load_1m": [load_before, _load_1m()],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "elapsed_s": round(time.time() - started, 1), "run_dir": str(run_dir)}


def _train_pending(recipe: str | Path, pending: dict[str, tuple[list[str], int, str]], out: Path, jobs: int,
                   record: Callable[[str, dict[str, Any]], None], recipe_threads: int | None = None,
                   backend: str = "local", address: str | None = None) -> None:
    """Run every pending training and record each one (here, in this process) as soon as it ends.

    Locally, on a small CPU, several single-threaded runs side by side use the cores better than one run that
    splits small matrix products over threads; each of ``jobs`` workers gets ``cores // jobs`` threads unless the
    recipe fixes ``train.threads`` (``recipe_threads``: the recipe's own value, not a request for that many). On
    Ray each training is a task asking for ``train.threads`` CPUs (1 unless the recipe fixes it) and, where the
    cluster has GPUs, one GPU.
    """
    with open_backend(backend, address, jobs, feature="vitkit ablate --backend ray") as runner:
        if runner.name == "ray":  # a recipe's own thread count is kept (the numbers may depend on it)
            cpus, gpus = runner.fit_cpus(recipe_threads or 1), runner.gpus_per_job()
            fixed = [] if recipe_threads is not None else ["train.threads=1"]
        else:
            cpus, gpus = 1, 0.0
            share = max(1, (os.cpu_count() or 1) // jobs)
            fixed = [] if recipe_threads is not None or jobs <= 1 else [f"train.threads={share}"]
        calls = {key: (recipe, [*fixed, *over], out / "runs" / key, epochs, model)
                 for key, (over, epochs, model) in pending.items()}
        runner.run_each(_run_record, calls, record, cpus=cpus, gpus=gpus, what="training")


def run_ablation(recipe: str | Path, studies: list[str], seeds: int, output_dir: str | Path,
                 overrides: list[str] | None = None, variants: list[str] | None = None,
                 jobs: int = 1, pretrained: dict[str, str] | None = None,
                 catalogue: dict[str, Study] | None = None, results: str | Path | None = None,
                 backend: str = "local", address: str | None = None) -> list[dict[str, Any]]:
    """Train every (study, variant, lr, seed) not yet done; write results, tables and plots; return rows.

    ``jobs`` trainings run side by side (separate processes); results are appended as each one ends, so an
    interrupted ablation resumes with what is left. ``pretrained`` names the checkpoints that variants
    refer to as ``{pretrained.NAME}``. ``catalogue``: the studies to choose from (default :data:`STUDIES`).
    ``results``: the results file (default ``output_dir/results.jsonl``), one line per table row (study,
    variant, lr, seed) with every metric of its run; a run shared by several rows is trained once.
    ``backend``: ``local`` or ``ray`` (at ``address``, see :mod:`.backends`); for the same seeds and
    ``train.threads`` both write the same records but for :data:`RECORD_FIELDS_THAT_VARY`.
    """
    catalogue = STUDIES if catalogue is None else catalogue
    unknown = [s for s in studies if s not in catalogue]
    if unknown:
        raise ConfigError(f"unknown study {unknown}; choose from {sorted(catalogue)} or 'all'")
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    check_backend(backend, address)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = Path(results) if results is not None else out / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_results(results_path)
    done = {r["key"]: r for r in existing}
    have_rows = {_row_id(r) for r in existing}
    base_over = list(overrides or [])
    base_cfg = load_config(recipe, base_over)
    planned: list[tuple[str, dict[str, Any]]] = []  # (key, row without results), in table order
    pending: dict[str, tuple[list[str], int, str]] = {}  # runs to train, each key once
    for study_name in studies:
        study = catalogue[study_name]
        chosen = [v for v in study.variants if variants is None or v.label in variants]
        if not chosen:
            raise ConfigError(f"study {study_name}: none of {variants} is a variant; "
                              f"choose from {[v.label for v in study.variants]}")
        for variant in chosen:
            for lr_mult in study.lr_multipliers:
                for seed in range(seeds):
                    over = [*base_over, *_variant_overrides(study, variant, lr_mult, base_cfg, pretrained),
                            f"train.seed={seed}"]
                    cfg = load_config(recipe, over)
                    key = run_key(cfg)
                    if key not in done:
                        pending.setdefault(key, (over, cfg.train.epochs, cfg.model.name))
                    planned.append((key, {"study": study_name, "variant": variant.label, "seed": seed,
                                          "lr": cfg.optim.lr, "lr_mult": lr_mult, "overrides": over}))

    run_fields = ("study", "variant", "seed", "lr", "lr_mult", "overrides")

    def append_rows(key: str) -> None:
        """Write the table rows this run answers (every planned row with its key not yet in the file)."""
        result = {k: v for k, v in done[key].items() if k not in run_fields}
        lines = []
        for k, row in planned:
            if k == key and _row_id({**row, "key": key}) not in have_rows:
                have_rows.add(_row_id({**row, "key": key}))
                lines.append(json.dumps({**row, **result}) + "\n")
        with open(results_path, "a", encoding="utf-8") as f:
            f.writelines(lines)

    def record(key: str, result: dict[str, Any]) -> None:
        done[key] = {"key": key, **result}
        append_rows(key)

    for key in {k for k, _ in planned if k in done}:  # rows of runs trained for another study
        append_rows(key)
    if pending:
        _train_pending(recipe, pending, out, jobs, record, base_cfg.train.threads, backend, address)
    rows = [{**done[key], **row} for key, row in planned]
    for study_name in studies:
        study_rows = [r for r in rows if r["study"] == study_name]
        atomic_write_text(out / f"ablation_{study_name}.md", format_table(catalogue[study_name], study_rows))
        from ..viz.plots import plot_ablation

        plot_ablation(summarize(catalogue[study_name], study_rows), f"{study_name}: {catalogue[study_name].claim}",
                      out / f"ablation_{study_name}.png")
    atomic_write_text(out / "ablations.md", "\n\n".join(
        format_table(catalogue[s], [r for r in rows if r["study"] == s]) for s in studies) + "\n")
    return rows


def _row_id(r: dict[str, Any]) -> tuple:
    return r.get("key"), r.get("study"), r.get("variant"), r.get("lr_mult", 1.0), r.get("seed")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _scores(r: dict[str, Any]) -> tuple[float, float | None]:
    """(test, validation) value of a row's primary metric, in % (validation: None without a held-out split)."""
    if "metric" not in r:  # a record of an older vitkit: the final evaluation on test, as "top1"
        return 100 * r["top1"], None
    metric = r["metric"]
    if "test" in r:
        return 100 * r["test"][metric], 100 * r["final"][metric]
    return 100 * r["final"][metric], None


def summarize(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (variant, lr): mean/std over seeds; with an LR sweep, each variant's best LR is marked,
    picked on the validation split when the runs held one out (else on test, and the table says so)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    lines = []
    for (variant, lr), rs in groups.items():
        tests, vals = zip(*(_scores(r) for r in rs))
        mean, std = _mean_std(list(tests))
        has_val = all(v is not None for v in vals)
        val_mean, val_std = _mean_std(list(vals)) if has_val else (None, None)
        lines.append({"variant": variant, "lr": lr, "mean": mean, "std": std, "n": len(rs), "values": list(tests),
                      "val_mean": val_mean, "val_std": val_std,
                      "params": rs[0]["params"], "img_s": statistics.fmean(r["train_img_s"] for r in rs),
                      "wall_clock": statistics.fmean(r["wall_clock_s"] for r in rs),
                      "epochs": rs[0]["epochs"], "best_lr": False})
    order = {v.label: i for i, v in enumerate(study.variants)}  # the study's order, whatever the file's
    lines.sort(key=lambda ln: (order.get(ln["variant"], len(order)), ln["lr"]))
    if len(study.lr_multipliers) > 1:
        on_val = all(ln["val_mean"] is not None for ln in lines)
        for variant in dict.fromkeys(ln["variant"] for ln in lines):
            best = max((ln for ln in lines if ln["variant"] == variant),
                       key=lambda ln: ln["val_mean"] if on_val else ln["mean"])
            best["best_lr"] = True
    return lines


def chosen_lines(study: Study, lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant's line that the claim is judged on: its best learning rate in a sweep, else its only line."""
    sweep = len(study.lr_multipliers) > 1
    return {ln["variant"]: ln for ln in lines if ln["best_lr"] or not sweep}


def judge(study: Study, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verdict of every check of the study, on the test values of the chosen lines."""
    from .verdict import contrast_interval, decide

    chosen = chosen_lines(study, lines)
    out = []
    for check in study.checks:
        weights = dict(check.contrast)
        if any(v not in chosen for v in weights):
            continue  # a variant left out of this invocation (--variants)
        interval = contrast_interval({v: chosen[v]["values"] for v in weights}, weights)
        seeds = min(chosen[v]["n"] for v in weights)
        out.append({"check": check, "interval": interval,
                    "verdict": decide(interval, check.expect, check.margin, seeds)})
    return out


def format_verdicts(study: Study, lines: list[dict[str, Any]]) -> list[str]:
    out = []
    for j in judge(study, lines):
        check, interval = j["check"], j["interval"]
        terms = " ".join(f"{'+' if w > 0 else '−'} {'' if abs(w) == 1 else f'{abs(w):g}×'}{v}"
                         for v, w in check.contrast).lstrip("+ ")
        expect = {"above": "> 0", "below": "< 0"}.get(check.expect) or f"within ±{check.margin:g}"
        shown = "no interval" if interval is None else f"{interval.show()} points"
        out.append(f"- {check.says} ({terms} {expect}): {shown} → **{j['verdict']}**")
    return out


def format_table(study: Study, rows: list[dict[str, Any]]) -> str:
    """The study's table (mean ± std over seeds, Δ against the reference with its 95 % Welch interval) and
    the verdict of each of its checks; the same text in the run folder and in the docs."""
    from .verdict import contrast_interval

    lines = summarize(study, rows)
    sweep = len(study.lr_multipliers) > 1
    has_val = all(ln["val_mean"] is not None for ln in lines)
    ref = next((ln for ln in lines if ln["best_lr"] or not sweep), None)
    suffix = lambda ln: ln["variant"].rsplit("_", 1)[-1]  # noqa: E731
    refs: dict[str, dict[str, Any]] = {}
    if study.compare_within_suffix:
        for ln in lines:
            refs.setdefault(suffix(ln), ln)
    out = [f"### {study.name}", "", f"Claim: {study.claim}", "",
           "| variant | " + ("lr | " if sweep else "") + ("val top-1 | " if has_val else "") +
           "test top-1 (mean ± std) | seeds | " + ("Δ vs first of its group [95% CI] | " if refs else
                                                  "Δ vs first [95% CI] | ") +
           "params | train img/s | wall-clock (s) | epochs |",
           "|---|" + ("---|" if sweep else "") + ("---|" if has_val else "") + "---|---|---|---|---|---|---|"]
    for ln in lines:
        base = refs.get(suffix(ln), ref) if refs else ref
        if base is None or ln is base:
            delta = "—"
        else:
            interval = contrast_interval({"a": ln["values"], "b": base["values"]}, {"a": 1.0, "b": -1.0})
            delta = (f"{ln['mean'] - base['mean']:+.2f}" if interval is None
                     else f"{interval.estimate:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]")
        mark = " (best lr)" if ln["best_lr"] else ""
        out.append(f"| {ln['variant']}{mark} | " + (f"{ln['lr']:.2g} | " if sweep else "") +
                   (f"{ln['val_mean']:.2f} ± {ln['val_std']:.2f} | " if has_val else "") +
                   f"{ln['mean']:.2f} ± {ln['std']:.2f} | {ln['n']} | {delta} | {ln['params'] / 1e6:.3f}M | "
                   f"{ln['img_s']:.0f} | {ln['wall_clock']:.0f} | {ln['epochs']} |")
    if sweep:
        out += ["", "With a learning-rate sweep, each variant's best learning rate is " +
                ("picked on the validation split (val top-1); the test set is read once, by the final models."
                 if has_val else "picked on the test set: these runs held out no validation split "
                 "(data.val_fraction), so the pick flatters every variant."),
                "Δ compares each row with the first variant at its best learning rate."]
    verdicts = format_verdicts(study, lines)
    if verdicts:
        out += ["", "Verdicts (95% Welch interval of the difference in test top-1 points, rule of "
                "[method.md](method.md)):", "", *verdicts]
    return "\n".join(out)


# ---------------------------------------------------------------------------- command line
def add_ablate_args(p: Any) -> None:
    from .commands import positive_int

    p.add_argument("--recipe", "--config", dest="recipe",
                   help="the base YAML recipe (default: the study's own, for a study that names one)")
    p.add_argument("--study", action="append", required=True, metavar="STUDY",
                   help=f"which claim to test (repeatable, or 'all'); vitkit's studies: {', '.join(STUDIES)}")
    p.add_argument("--studies-file", help="a YAML file of studies of your own (same form as vitkit's studies.yaml)")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds per variant")
    p.add_argument("--output-dir", default="runs/ablate", help="results.jsonl, tables, plots and run folders")
    p.add_argument("--results", help="the results file to append to and read (default: OUTPUT_DIR/results.jsonl), "
                                     "e.g. the committed docs/ablations/results.jsonl")
    p.add_argument("--variants", help="comma-separated subset of the study's variants")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="trainings side by side, each in its own process with cores/jobs threads (2 on 2 cores "
                        "is faster than 1 run on both)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to the base recipe for every variant")
    add_backend_args(p, "trainings")
    p.add_argument("--pretrained", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained checkpoint that variants name as {pretrained.NAME}, e.g. "
                        "--pretrained mae=runs/fmnist_mae_tiny (see the study's variants)")


def run_ablate_args(args: Any) -> int:
    from .commands import parse_key_values

    catalogue = load_studies(args.studies_file) if args.studies_file else STUDIES
    pretrained = {k: str(v) for k, v in parse_key_values(args.pretrained).items()}
    # 'all': every study whose pretrained checkpoints were given and that runs on this recipe (a study with a
    # recipe of its own, e.g. on scenes, runs only when named or when --recipe is that recipe)
    studies = ([s for s in catalogue if (not catalogue[s].needs_pretrained or pretrained)
                and catalogue[s].recipe in (None, args.recipe)] if "all" in args.study
               else list(dict.fromkeys(args.study)))
    if args.recipe is None:
        own = {catalogue[s].recipe for s in studies if s in catalogue}
        if len(own) != 1 or None in own:
            raise ConfigError("--recipe is needed: " + ("the studies name different recipes of their own"
                                                        if len(own - {None}) > 1 else
                                                        "not every study named has a recipe of its own"))
        args.recipe = own.pop()
    variants = args.variants.split(",") if args.variants else None
    run_ablation(args.recipe, studies, args.seeds, args.output_dir, args.overrides, variants, args.jobs, pretrained,
                 catalogue, args.results, args.backend, args.address)
    for s in studies:
        print(Path(args.output_dir, f"ablation_{s}.md").read_text())
    print(f"results: {args.results or Path(args.output_dir, 'results.jsonl')}, "
          f"plots: {args.output_dir}/ablation_<study>.png")
    return 0
