"""SparseViT's latency-constrained search for per-stage window keep ratios (``vitkit sparsevit search``).

It searches a model that offers per-stage window keep ratios (:func:`can_prune_windows`), ideally adapted to them:
the run of ``vitkit train --config configs/scenes/swin_adapt.yaml`` (which starts from
``configs/scenes/swin_dense.yaml``'s run).

A candidate is one keep ratio per stage (from a discrete set). Its latency comes from a lookup table measured
once on this CPU, end to end: the whole model timed dense, then with one stage at a time pruned to each ratio
(the others dense); a stage's entry is what its ratio changes against dense, and the changes add up, so the
table prices any candidate without running it and the search is reproducible for a seed (direct timing would
make the budget test noisy). Before timing, the model runs once on a large batch (:func:`settle`): on our
2-core CPU a process's dense latency at batch 8 fell from ~18-19 ms to ~14 ms after its first large batch while
pruned configurations did not move, so a table timed in a fresh process over-priced the dense model and budgets
set as speed-ups were met in the table and missed in a long-running process. Candidates over the
budget are rejected *before* they are evaluated. The evolution keeps a population of the best evaluated
candidates, makes children by uniform crossover of two parents and by mutation (each stage's ratio redrawn with
a probability), and evaluates only new, affordable ones. The output is every evaluated candidate, the best under
each budget, and the Pareto front of metric vs latency, as JSON and a plot; the final candidates are re-timed
directly so the reported latency is measured, not only predicted. Each generation's new candidates are scored
together, in this process or as Ray tasks (``--backend ray``: the model, its task and the scoring images are put
in Ray's object store once; every task scores one candidate with this process's thread count, so the scores, and
the picks, are those of the local search).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .backends import add_backend_args, check_backend, open_backend
from .timing import Candidate as Timed
from .timing import time_alternating

DEFAULT_CHOICES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# the run the search needs: a windowed model adapted to window pruning (ratios drawn per stage and step)
TRAIN_HINT = "`vitkit train --config configs/scenes/swin_adapt.yaml`"
Ratios = tuple[float, ...]


def can_prune_windows(model: nn.Module) -> bool:
    """Whether ``model`` offers what the search sets: per-stage window keep ratios (``num_stages``, the
    ``keep_ratios`` it runs with and ``set_keep_ratios``), whatever its family."""
    return (isinstance(getattr(model, "num_stages", None), int) and hasattr(model, "keep_ratios")
            and callable(getattr(model, "set_keep_ratios", None)))


def _time_ratios(model: nn.Module, images: torch.Tensor, configs: dict[Any, Ratios], repeats: int,
                 warmup: int = 1) -> dict[Any, float]:
    """Median ms per batch of ``model`` at each configuration of keep ratios, timed in alternating rounds
    (:func:`~vitkit.tools.timing.time_alternating`, one call per sample, ``repeats`` samples each): a slow spell of
    the machine (another process, a frequency change) spreads over all of them instead of inflating whichever one
    it happens to hit. The keep ratios are switched outside the timed region; the model's own are restored."""
    saved = model.keep_ratios
    timed = [Timed(name=str(key), library="vitkit", precision=str(images.dtype), is_peer=False,
                   fn=lambda: model(images), prepare=lambda ratios=ratios: model.set_keep_ratios(ratios))
             for key, ratios in configs.items()]
    try:
        # every sample is kept (max_contention=1): the search's figures are medians of plain alternating rounds
        time_alternating(timed, samples=repeats, min_sample_s=0.0, max_contention=1.0, warmup=warmup)
    finally:
        model.set_keep_ratios(saved)
    return {key: 1000 * statistics.median(c.samples) for key, c in zip(configs, timed)}


@dataclass
class LatencyTable:
    """``fixed_ms``: the dense model's latency; ``stage_ms[i][r]``: what stage ``i`` at ratio ``r`` (the others
    dense) changes it by (≤ 0 when pruning saves time); ``predict`` adds them up."""

    choices: Ratios
    stage_ms: list[dict[float, float]]
    fixed_ms: float
    batch_size: int
    threads: int

    def predict(self, ratios: Ratios) -> float:
        return self.fixed_ms + sum(table[r] for table, r in zip(self.stage_ms, ratios))


@torch.inference_mode()
def settle(model: nn.Module, images: torch.Tensor, factor: int = 32) -> None:
    """One dense forward of ``factor`` × the batch, so that timings see the steady state of a long-running
    process (see the module docstring) rather than a fresh one's, which favours pruning."""
    saved = model.keep_ratios
    try:
        model.set_keep_ratios((1.0,) * model.num_stages)
        model(images.repeat(factor, *([1] * (images.dim() - 1))))
    finally:
        model.set_keep_ratios(saved)


@torch.inference_mode()
def measure_latency_table(model: nn.Module, images: torch.Tensor, choices: Sequence[float] = DEFAULT_CHOICES,
                          repeats: int = 15) -> LatencyTable:
    """Time the whole model on ``images`` (a prepared batch) dense and with each stage alone at each ratio.

    The configurations are timed in alternating rounds (one call of each per round, ``repeats`` rounds, median per
    configuration; see :func:`_time_ratios`)."""
    model.eval()
    settle(model, images)
    dense = (1.0,) * model.num_stages
    configs = {(i, float(r)): dense[:i] + (float(r),) + dense[i + 1:]
               for i in range(model.num_stages) for r in choices if float(r) != 1.0}
    configs[(-1, 1.0)] = dense
    median = _time_ratios(model, images, configs, repeats)
    fixed = median[(-1, 1.0)]
    stage_ms = [{float(r): (median[(i, float(r))] - fixed if float(r) != 1.0 else 0.0) for r in choices}
                for i in range(model.num_stages)]
    return LatencyTable(tuple(float(c) for c in choices), stage_ms, fixed, int(images.shape[0]),
                        torch.get_num_threads())


@torch.inference_mode()
def measure_latency(model: nn.Module, images: torch.Tensor, ratios: Ratios, repeats: int = 15) -> float:
    """Direct timing (median ms per batch) of the model at ``ratios``."""
    return _time_ratios(model, images, {"direct": tuple(ratios)}, repeats, warmup=2)["direct"]


@dataclass
class Candidate:
    ratios: Ratios
    latency_ms: float  # predicted by the table
    metric: float


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other one beats on both latency (lower) and metric (higher), fastest first."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.latency_ms, -c.metric)):
        if not front or c.metric > front[-1].metric:
            front.append(c)
    return front


def evolutionary_search(evaluate: Callable[[Ratios], float] | None, latency: Callable[[Ratios], float],
                        num_stages: int, budget_ms: float, choices: Sequence[float] = DEFAULT_CHOICES,
                        population: int = 12, generations: int = 5, parents: int = 4, mutation_prob: float = 0.3,
                        seed: int = 0, cache: dict[Ratios, float] | None = None, max_tries: int = 2000,
                        evaluate_many: Callable[[list[Ratios]], list[float]] | None = None) -> list[Candidate]:
    """Evolve per-stage ratios that maximise ``evaluate`` with ``latency <= budget_ms``; returns every affordable
    candidate evaluated (``cache`` shares evaluations between budgets). The new candidates of a generation do not
    depend on each other's scores, so they are scored together: by ``evaluate_many`` (a list of ratios -> their
    scores, e.g. as parallel jobs) when given, else one by one with ``evaluate``; the result is the same."""
    if population < 2 or parents < 2 or generations < 0 or not 0 <= mutation_prob <= 1:
        raise ConfigError("search: need population >= 2, parents >= 2, generations >= 0, mutation_prob in [0, 1]")
    if evaluate_many is None:
        if evaluate is None:
            raise ConfigError("search: give evaluate or evaluate_many")
        evaluate_many = lambda batch: [evaluate(r) for r in batch]  # noqa: E731
    rng = random.Random(seed)
    choices = tuple(sorted(float(c) for c in choices))
    cache = {} if cache is None else cache
    seen: dict[Ratios, Candidate] = {}

    def consider(ratios: Ratios, added: list[Ratios]) -> bool:
        if ratios in seen:
            return False
        lat = latency(ratios)
        if lat > budget_ms:  # rejected before any evaluation
            return False
        seen[ratios] = Candidate(ratios, lat, math.nan)  # scored below, with the rest of its generation
        added.append(ratios)
        return True

    def fill(make: Callable[[], Ratios], count: int) -> None:
        added: list[Ratios] = []
        tries = 0
        while len(added) < count and tries < max_tries:
            tries += 1
            consider(make(), added)
        new = [r for r in added if r not in cache]
        cache.update(zip(new, evaluate_many(new) if new else []))
        for ratios in added:
            seen[ratios].metric = cache[ratios]

    fill(lambda: tuple(rng.choice(choices) for _ in range(num_stages)), population)
    if not seen:
        cheapest = min(latency(tuple([choices[0]] * num_stages)), latency(tuple([choices[-1]] * num_stages)))
        raise ConfigError(f"search: no candidate fits a {budget_ms:.2f} ms budget (the sparsest costs "
                          f"{cheapest:.2f} ms on this machine)")
    for _ in range(generations):
        best = sorted(seen.values(), key=lambda c: -c.metric)[:parents]

        def child(best: list[Candidate] = best) -> Ratios:
            a, b = rng.sample(best, 2) if len(best) > 1 else (best[0], best[0])
            genes = [rng.choice((x, y)) for x, y in zip(a.ratios, b.ratios)]
            return tuple(rng.choice(choices) if rng.random() < mutation_prob else g for g in genes)

        fill(child, population)
    return sorted(seen.values(), key=lambda c: (-c.metric, c.latency_ms))


def write_search_report(path: str | Path, table: LatencyTable, results: dict[str, Any],
                        all_candidates: Sequence[Candidate], dense_ms: float | None = None) -> Path:
    """search.json + pareto.png (metric vs latency, every evaluated candidate, the front and the picks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(all_candidates)
    report = {"latency_table": asdict(table), "dense_ms": dense_ms, "budgets": results,
              "pareto_front": [asdict(c) for c in front], "evaluated": [asdict(c) for c in all_candidates]}
    from ..utils import atomic_write_text

    atomic_write_text(out / "search.json", json.dumps(report, indent=1, default=float))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([c.latency_ms for c in all_candidates], [c.metric for c in all_candidates], s=10, c="0.7",
               label="evaluated")
    ax.plot([c.latency_ms for c in front], [c.metric for c in front], "o-", label="Pareto front")
    for res in results.values():
        ax.axvline(res["budget_ms"], ls=":", c="0.5")
        if res["best"] is None:
            continue
        ax.scatter([res["best"]["latency_ms"]], [res["best"]["metric"]], marker="*", s=120, zorder=3,
                   label=f"best ≤ {res['budget_ms']:.1f} ms")
    if dense_ms is not None:
        ax.axvline(dense_ms, c="k", lw=1, label="dense")
    ax.set_xlabel("predicted latency (ms / batch)")
    ax.set_ylabel("metric")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return out


def run_data_args(folder: str | Path, data: str) -> dict[str, Any]:
    """The dataset settings a run was trained with (its ``train_config.yaml``), when it used ``data``: a search
    must score candidates on scenes like those the model learned (canvas, items per scene)."""
    from .evaluate import run_config

    cfg = run_config(folder)
    return dict(cfg.data.args or {}) if cfg is not None and cfg.data.name == data else {}


def eval_batches(folder: str | Path, task: Any, data: str, split: str, data_args: dict[str, Any] | None = None,
                 limit: int | None = None, batch_size: int = 250) -> list:
    """The first ``limit`` images of ``split``, made with the run's own dataset settings (``data_args`` override
    them; the training-set size does not apply) and prepared by its task, in batches."""
    from ..data import build_dataset

    settings = {k: v for k, v in run_data_args(folder, data).items() if k != "num_scenes"}
    ds = build_dataset(data, split, **{**settings, **(data_args or {})})
    n = min(limit or len(ds), len(ds))
    return [task.prepare_batch(ds.__getitems__(list(range(i, min(i + batch_size, n)))), train=False)
            for i in range(0, n, batch_size)]


def score_candidate(state: tuple[nn.Module, Any, list, int], ratios: Ratios) -> float:
    """The task's primary metric of the model at ``ratios`` on the scoring batches; ``state`` is (model, task,
    batches, threads), the threads those of the search's own process (the scores must not depend on where they
    are computed)."""
    model, task, batches, threads = state
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    model.set_keep_ratios(ratios)
    return float(task.evaluate(model, batches)[task.primary_metric])


def run_search(checkpoint: str | Path, budgets_ms: Sequence[float] = (), out_dir: str | Path = "sparsevit_search",
               data: str = "fmnist_scenes", split: str = "val", data_args: dict[str, Any] | None = None,
               eval_images: int = 1000, latency_batch: int = 8, choices: Sequence[float] = DEFAULT_CHOICES,
               population: int = 12, generations: int = 5, seed: int = 0, speedups: Sequence[float] = (),
               table: LatencyTable | None = None, log: Callable[[str], None] = print, backend: str = "local",
               address: str | None = None) -> dict[str, Any]:
    """Search keep ratios for a trained windowed model under each budget (ms per ``latency_batch`` images on this
    CPU, or ``speedups``: the dense latency the table predicts divided by each); candidates are scored with the
    checkpoint's task on ``eval_images`` images of ``split`` (not the test split: the search must not pick on the
    numbers it reports). Dataset settings default to the run's own (``train_config.yaml``); ``data_args`` override
    them. ``table`` reuses a latency table measured before (several runs of one architecture priced alike). A
    budget nothing fits is reported (``best`` None) without stopping the others. Writes ``search.json`` and
    ``pareto.png``. ``backend``: where candidates are scored, ``local`` (this process) or ``ray`` (at ``address``;
    see :mod:`.backends`): the same scores, so the same picks; the latencies are timed here either way."""
    from .evaluate import load_model, resolve_model_dir, task_for_model

    check_search_settings(budgets_ms, speedups, choices, population, generations, eval_images, latency_batch)
    check_backend(backend, address)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"{out_dir}: the search's output must be a folder (for search.json and pareto.png), "
                          "and this is a file")
    from ..utils import check_output_path

    check_output_path(Path(out_dir) / "search.json", create_parent=True, what="search report")
    model = load_model(checkpoint)
    if not can_prune_windows(model):
        raise ConfigError(f"{checkpoint}: the search needs a model with per-stage window keep ratios (num_stages, "
                          f"keep_ratios, set_keep_ratios), e.g. a run of {TRAIN_HINT}; {type(model).__name__} has "
                          f"none")
    folder = resolve_model_dir(checkpoint)
    task = task_for_model(model, folder)
    task.setup(model)
    batches = eval_batches(folder, task, data, split, data_args, eval_images)
    images = batches[0].images[:latency_batch] if hasattr(batches[0], "images") else batches[0][0][:latency_batch]
    log(f"latency table: {model.num_stages} stages x {len(choices)} ratios, batch {latency_batch}, "
        f"{torch.get_num_threads()} threads")
    if table is None:
        table = measure_latency_table(model, images, choices)
    elif table.choices != tuple(float(c) for c in choices) or len(table.stage_ms) != model.num_stages:
        raise ConfigError(f"search: the latency table prices {len(table.stage_ms)} stages x {table.choices}, "
                          f"the model has {model.num_stages} stages and the search uses {tuple(choices)}")
    else:
        settle(model, images)  # the direct timings below, in the state the table was timed in
    dense = tuple([1.0] * model.num_stages)
    dense_ms = measure_latency(model, images, dense)
    # the latencies are timed before Ray starts (its processes would disturb them)
    with open_backend(backend, address, feature="vitkit sparsevit search --backend ray") as runner:
        shared = runner.share((model, task, batches, torch.get_num_threads()))

        def evaluate_many(batch: list[Ratios]) -> list[float]:
            return runner.map(score_candidate, shared, batch, cpus=torch.get_num_threads())

        def evaluate(ratios: Ratios) -> float:
            return evaluate_many([ratios])[0]

        cache: dict[Ratios, float] = {dense: evaluate(dense)}
        log(f"dense: {task.primary_metric} {cache[dense]:.4f}, {dense_ms:.2f} ms "
            f"(table predicts {table.predict(dense):.2f})")
        budgets = [(f"{b:g}ms", b) for b in budgets_ms] + [(f"{s:g}x", table.predict(dense) / s) for s in speedups]
        results: dict[str, Any] = {}
        everything: dict[Ratios, Candidate] = {}
        for key, budget in budgets:
            try:
                found = evolutionary_search(evaluate, table.predict, model.num_stages, budget, choices, population,
                                            generations, seed=seed, cache=cache, evaluate_many=evaluate_many)
            except ConfigError as e:  # this budget is below the sparsest candidate: say so, go on with the others
                results[key] = {"budget_ms": budget, "best": None, "why": str(e)}
                log(f"budget {budget:g} ms: {e}")
                continue
            best = found[0]
            measured = measure_latency(model, images, best.ratios)
            uniform = [Candidate(tuple([r] * model.num_stages), table.predict(tuple([r] * model.num_stages)), 0.0)
                       for r in sorted(choices)]
            affordable = [u for u in uniform if u.latency_ms <= budget]
            baseline = None
            if affordable:
                u = affordable[-1]  # the densest uniform ratio within the budget
                if u.ratios not in cache:
                    cache[u.ratios] = evaluate(u.ratios)
                baseline = {"ratios": u.ratios, "latency_ms": u.latency_ms, "metric": cache[u.ratios],
                            "measured_ms": measure_latency(model, images, u.ratios)}
            results[key] = {"budget_ms": budget, "best": asdict(best), "best_measured_ms": measured,
                            "evaluated": len(found), "uniform_baseline": baseline}
            everything.update({c.ratios: c for c in found})
            log(f"budget {budget:g} ms: best {best.ratios} {task.primary_metric} {best.metric:.4f}, predicted "
                f"{best.latency_ms:.2f} ms, measured {measured:.2f} ms ({dense_ms / measured:.2f}x vs dense); "
                f"uniform {baseline['ratios'][0] if baseline else '-'}: "
                f"{baseline['metric'] if baseline else float('nan'):.4f}")
        model.set_keep_ratios(dense)
        everything[dense] = Candidate(dense, table.predict(dense), cache[dense])
        write_search_report(out_dir, table, results, list(everything.values()), dense_ms)
        return {"dense_ms": dense_ms, "dense_metric": cache[dense], "budgets": results, "out_dir": str(out_dir)}


def _number(value: Any) -> bool:
    """A real number that fits a float (not a bool, not an int beyond 1e308)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _values(values: Sequence[Any]) -> str:
    return ", ".join(f"{v:g}" if _number(v) else repr(v) for v in values)


def check_search_settings(budgets_ms: Sequence[float], speedups: Sequence[float], choices: Sequence[float],
                          population: int, generations: int, eval_images: int = 1, latency_batch: int = 1,
                          flags: bool = False) -> None:
    """What :func:`run_search` (and ``vitkit sparsevit search``, right after parsing) checks before any work: at
    least one budget or speed-up, each a finite number > 0; keep ratios in (0, 1]; population >= 2; generations
    >= 0; eval_images, latency_batch >= 1. One ConfigError names every bad setting (as ``--flags`` with
    ``flags``)."""
    def named(name: str) -> str:
        return f"--{name.replace('_', '-')}" if flags else name

    bad = []
    if not budgets_ms and not speedups:
        bad.append("give latency budgets (--budget-ms MS [MS ...]) or speed-up targets (--speedup X [X ...])")
    for name, values in (("budget_ms", budgets_ms), ("speedup", speedups)):
        wrong = [v for v in values if not (_number(v) and math.isfinite(v) and v > 0)]
        if wrong:
            bad.append(f"{named(name)} must be finite numbers > 0, got {_values(wrong)}")
    wrong = [c for c in choices if not (_number(c) and 0 < c <= 1)]
    if wrong or not choices:
        bad.append(f"{named('choices')} (keep ratios) must be numbers in (0, 1], got "
                   f"{_values(wrong) or 'none'}")
    for name, value, low in (("population", population, 2), ("generations", generations, 0),
                             ("eval_images", eval_images, 1), ("latency_batch", latency_batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            bad.append(f"{named(name)} must be an integer >= {low}, got {value!r}")
    if bad:
        raise ConfigError(("" if flags else "search: ") + "; ".join(bad))


def add_sparsevit_args(p) -> None:
    """Arguments of ``vitkit sparsevit search``. The run it searches is a windowed model adapted to window pruning:
    ``vitkit train --config configs/scenes/swin_dense.yaml``, then ``vitkit train --config
    configs/scenes/swin_adapt.yaml`` (which starts from the dense run and writes ``runs/scenes_swin_adapt``)."""
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser(
        "search", help="latency-constrained evolutionary search of per-stage window keep ratios",
        description="Search per-stage window keep ratios of a trained windowed model under latency budgets measured "
                    f"on this CPU. The run comes from {TRAIN_HINT} (after configs/scenes/swin_dense.yaml, which it "
                    "starts from); e.g. `vitkit sparsevit search runs/scenes_swin_adapt --speedup 1.25 1.5 2`.")
    s.add_argument("run", help="a trained windowed model (run folder or checkpoint), ideally sparsity-adapted: "
                               f"runs/scenes_swin_adapt from {TRAIN_HINT}")
    s.add_argument("--budget-ms", type=float, nargs="+", default=[],
                   help="latency budgets, ms per --latency-batch images on this CPU (finite, > 0)")
    s.add_argument("--speedup", type=float, nargs="+", default=[],
                   help="or budgets as speed-up targets over the dense model, e.g. 1.25 1.5 2 (finite, > 0)")
    s.add_argument("--out", default="sparsevit_search", help="folder for search.json and pareto.png")
    s.add_argument("--data", default="fmnist_scenes",
                   help="dataset the candidates are scored on, with the run's own settings (default: %(default)s)")
    s.add_argument("--split", default="val", help="the split candidates are scored on (not test)")
    s.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset setting, e.g. num_scenes=2000 (repeatable)")
    s.add_argument("--eval-images", type=int, default=1000,
                   help="images of --split each candidate is scored on (default: %(default)s)")
    s.add_argument("--latency-batch", type=int, default=8,
                   help="batch size the latencies are measured and budgeted at (default: %(default)s)")
    s.add_argument("--choices", type=float, nargs="+", default=list(DEFAULT_CHOICES),
                   help="keep ratios a stage may take, in (0, 1] (default: %(default)s)")
    s.add_argument("--population", type=int, default=12,
                   help="candidates evaluated per generation, and the first random ones, >= 2 (default: "
                        "%(default)s)")
    s.add_argument("--generations", type=int, default=5,
                   help="rounds of crossover and mutation after the random start, >= 0 (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search (same seed, same candidates)")
    add_backend_args(s, "candidate scores")


def run_sparsevit_args(args) -> int:
    """``vitkit sparsevit search``: checks the flags, runs :func:`run_search`, names what it wrote."""
    from .commands import parse_key_values

    check_search_settings(args.budget_ms, args.speedup, args.choices, args.population, args.generations,
                          args.eval_images, args.latency_batch, flags=True)  # before the model is loaded
    run_search(args.run, args.budget_ms, args.out, args.data, args.split, parse_key_values(args.data_arg),
               args.eval_images, args.latency_batch, args.choices, args.population, args.generations, args.seed,
               speedups=args.speedup, backend=args.backend, address=args.address)
    print(f"wrote {Path(args.out) / 'search.json'} and {Path(args.out) / 'pareto.png'}")
    return 0
