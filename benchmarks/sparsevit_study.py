"""The SparseViT study's numbers and pictures (docs/efficient.md) from trained dense and sparsity-adapted Swin runs.

Per seed (``--dense`` and ``--adapted`` list the runs in the same seed order):

1. ``vitkit sparsevit search`` on the adapted run (:func:`vitkit.tools.search.run_search`), budgets given as
   speed-up targets over the dense model (``--speedup``), candidates scored on the **val** scenes (made from
   Fashion-MNIST *training* images), so the search picks nothing on the test numbers below. The runs are loaded
   from their folders, i.e. their ``checkpoints/best``, which the trainer chose on its evaluation split: runs
   trained with ``data.eval_split: test`` and no ``data.val_fraction`` had their checkpoint chosen on test;
   and the val scenes reuse the training images, so they are not held out from training;
2. on the **test** scenes (Fashion-MNIST test images only): mAP and exact match of the dense run, of the adapted
   run dense, at each searched pick and at every uniform keep ratio (the same ratio in every stage), and of the
   *dense* run pruned without adaptation (at the picks and the uniform ratios), which shows what adaptation buys;
3. latency measured directly, not predicted: every configuration above timed in alternating rotating rounds
   (:func:`vitkit.tools.timing.time_alternating`, rounds where other processes took more than ``--max-contention``
   of the CPU discarded), fp32, ``--threads`` threads, at each ``--latency-batch``; plus the dense model with
   window shifting turned off, because a pruned stage runs its shifted blocks unshifted (the shift would need
   neighbours that may be pruned) and that alone changes the cost.

With ``--low-res``, dense runs trained on the scenes downscaled (SparseViT's question, Chen et al., 2023: *sparse at
high resolution or dense at low resolution?*) are scored on the test scenes downscaled the same way and timed in the
same rounds.

Results: every number is **appended** to ``--results`` (default ``docs/efficient/results.jsonl``) as JSON lines
under a ``--variant`` name (one invocation of the study; a name already in the file is refused), records of three
kinds (:func:`study_records`): ``eval`` (one test evaluation of one run at one keep-ratio configuration: every
metric), ``pick`` (one seed's search outcome under one budget: the ratios, their val score, the latency the table
predicted, the search process's own direct timing, the uniform baseline, and the pick's test evaluation) and
``timing`` (one cell of the study's alternating rounds: configuration, batch, process state, median ms, samples,
contention). ``vitkit report docs/efficient.md`` rebuilds the doc's tables, verdicts and trade-off plots from them
through the ``render_*`` functions below. ``--out`` is the work file passed between the two phases.

Pictures: test mAP against measured latency (dense, uniform ratios with and without adaptation, searched picks)
and the windows stage 1 keeps on test scenes at the pick of each budget.

    python benchmarks/sparsevit_study.py --dense runs/eff/dense_s0,runs/eff/dense_s1 \\
        --adapted runs/eff/adapt_s0,runs/eff/adapt_s1 --speedup 1.25 1.5 2 \\
        --search-dir runs/eff --variant adapt --results docs/efficient/results.jsonl --figures docs/efficient
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vitkit.tools.ablate import machine_facts, read_results
from vitkit.tools.evaluate import load_model, resolve_model_dir, task_for_model
from vitkit.tools.search import DEFAULT_CHOICES, eval_batches, measure_latency_table, run_search, settle
from vitkit.tools.timing import Candidate, ContentionMeter, cpu_name, machine_load, time_alternating, wait_for_quiet

Ratios = tuple[float, ...]


@torch.inference_mode()
def score(model, task, batches, ratios: Ratios) -> dict[str, float]:
    model.set_keep_ratios(ratios)
    metrics = task.evaluate(model, batches)
    model.set_keep_ratios([1.0] * model.num_stages)
    return {"mAP": float(metrics["mAP"]), "exact_match": float(metrics["exact_match"])}


def time_configs(model, configs: list[Ratios], others: dict[str, torch.nn.Module], batch: int, threads: int,
                 repeats: int, max_contention: float, meter: ContentionMeter) -> dict[str, dict[str, Any]]:
    """Median ms per batch of each keep-ratio configuration of ``model`` and of each of ``others`` (whole models
    at their own input size), all timed in the same alternating rounds, with what the rounds saw: kept samples,
    the largest share of the CPU other processes took during one (``contention_max``), discarded samples and
    whether the cell never got a clean sample (``noisy``)."""
    torch.set_num_threads(threads)

    def images(m) -> torch.Tensor:
        c, h, w = m.pretrained_cfg["input_size"]
        return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))

    x = images(model)

    def run(r: Ratios):
        model.set_keep_ratios(r)
        return model(x)

    cands = [Candidate(str(r), "vitkit", "fp32", lambda r=r: run(r), False) for r in configs]
    inputs = {name: images(m) for name, m in others.items()}
    cands += [Candidate(name, "vitkit", "fp32", lambda m=m, xm=inputs[name]: m(xm), False)
              for name, m in others.items()]
    if max_contention < 1:
        wait_for_quiet(meter, max_contention, max_wait_s=120)
    time_alternating(cands, samples=repeats, min_sample_s=0.5, max_contention=max_contention, meter=meter)
    model.set_keep_ratios([1.0] * model.num_stages)
    cells = {}
    for cand in cands:
        seen = [c for c in getattr(cand, "contention", []) if c == c]  # NaN: never measured clean
        cells[cand.name] = {"ms": 1e3 * statistics.median(cand.samples), "samples": len(cand.samples),
                            "contention_max": max(seen) if seen else None, "discarded": cand.discarded,
                            "noisy": "noisy" in cand.note}
    return cells


@torch.inference_mode()
def kept_windows_figure(model, task, batches, picks: dict[str, Ratios], path: Path, n: int = 6) -> None:
    """Test scenes with the stage-1 windows each budget's pick prunes shaded (importance = L2 norm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images = batches[0][0][:n]
    stage = model.stages[0]
    tokens = model.embed(images)
    grid = tokens.shape[1] // min(stage.window_size, tokens.shape[1])
    cell = images.shape[-1] / grid
    fig, axes = plt.subplots(len(picks), n, figsize=(1.6 * n, 1.7 * len(picks)), squeeze=False)
    for row, (label, ratios) in enumerate(picks.items()):
        kept = stage.run_pruned(tokens, ratios[0])[1]
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(images[col, 0].numpy(), cmap="gray")
            kept_here = set(kept[col].tolist())
            for idx in range(grid * grid):
                r, c = divmod(idx, grid)
                ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, lw=0.6, ec="tab:orange",
                                       fc="none" if idx in kept_here else (0.85, 0.1, 0.1, 0.45)))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{label}\nkeep {ratios[0]:g}", fontsize=8)
    fig.suptitle("stage-1 windows at each budget's pick on test scenes: pruned ones shaded red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- records (docs/efficient/results.jsonl)
STUDY = "sparsevit"
TIMING_ONLY = ("dense, no shift", "dense, low resolution")  # timed in the same rounds, not keep-ratio configurations


def config_label(ratios) -> str:
    """A keep-ratio configuration's name in records and tables: ``dense``, ``uniform 0.6`` or ``keep 0.5/0.9/1``
    (no commas: rows are verdict groups)."""
    rs = [float(r) for r in ratios]
    if all(r == 1.0 for r in rs):
        return "dense"
    if len(set(rs)) == 1:
        return f"uniform {rs[0]:g}"
    return "keep " + "/".join(f"{r:g}" for r in rs)


def _ratios(key: Any) -> list[float]:
    """``"(0.5, 0.9, 1.0)"`` (a configuration's key in the study's work file) or a sequence, as floats."""
    return [float(v) for v in (key.strip("()").split(",") if isinstance(key, str) else key)]


def eval_row(model: str, label: str) -> str:
    """An evaluation's ``row``: the adapted run's configurations by name (``adapted dense`` unpruned), the dense
    run's as ``dense run`` (unpruned) and ``dense run pruned to <name>``."""
    if model == "adapted":
        return "adapted dense" if label == "dense" else label
    return "dense run" if label == "dense" else f"dense run pruned to {label}"


def study_records(result: dict[str, Any], variant: str, machine: dict[str, Any], source: str,
                  **extra: Any) -> list[dict[str, Any]]:
    """The records of one invocation of the study, from its work file (``result``: what :func:`main` and
    :func:`finish` write, or a study JSON of an earlier version of this script).

    * ``eval``: one test evaluation of one run (``model``: ``adapted``, ``dense run`` pruned without adaptation,
      ``low resolution``) at one configuration, every metric under ``test``;
    * ``pick``: one seed's search outcome under one budget, for the adapted run (``row`` ``searched 1.25x``, with
      ``search``: split and images it scored on, the val score, the latency the table predicted and the table's
      dense latency, the search process's own direct timings of the pick and of the dense model, and ``uniform``:
      the densest uniform ratio the table fits in the budget) and for the dense run pruned to the same ratios
      (``dense run pruned to searched 1.25x``); ``test`` is the test evaluation of those ratios;
    * ``timing``: one cell of the study's alternating rounds (``row``, ``batch``, ``state``: ``fresh`` process or
      ``settled`` after one large batch): median ``ms`` and, where recorded, samples and contention. Ratios are
      only taken between cells of one variant, batch and state: the same rounds of one process.

    Every record carries ``threads``, ``machine``, ``source`` and ``extra`` (e.g. ``finished_at``, ``load_1m``).
    """
    head = {"study": STUDY, "variant": variant}
    tail = {"threads": result["threads"], "machine": machine, "source": source, **extra}
    records: list[dict[str, Any]] = []
    for seed, s in enumerate(result["seeds"]):
        runs = {"adapted": s["adapted_run"], "dense run": s["dense_run"]}
        tests = {"adapted": s["adapted"], "dense run": s["dense_pruned"]}
        for model, scores in tests.items():
            for key, metrics in scores.items():
                records.append({**head, "record": "eval", "seed": seed, "model": model, "run": runs[model],
                                "row": eval_row(model, config_label(_ratios(key))), "ratios": _ratios(key),
                                "split": "test", "test": metrics, **tail})
        if "low_res" in s:
            low = s["low_res"]
            records.append({**head, "record": "eval", "seed": seed, "model": "low resolution", "run": low["run"],
                            "row": "dense at " + "x".join(map(str, low["input_size"][1:])), "ratios": None,
                            "input_size": low["input_size"], "split": "test",
                            "test": {k: v for k, v in low.items() if k not in ("run", "input_size")}, **tail})
        search = s["search"]
        for budget, b in search["budgets"].items():
            speedup = float(budget[:-1]) if budget.endswith("x") else None
            found: dict[str, Any] = {
                "split": result.get("search_split", "val"), "val_images": result.get("eval_images", 1000),
                "seed": seed, "budget_ms": b["budget_ms"],
                "table_dense_ms": result.get("table_dense_ms") or (b["budget_ms"] * speedup if speedup else None),
                "direct_dense_ms": search["dense_ms"], "dense_val": {"mAP": search["dense_metric"]},
                "evaluated": b.get("evaluated"), "out_dir": search.get("out_dir")}
            best = b.get("best")
            if best is None:
                records.append({**head, "record": "pick", "seed": seed, "model": "adapted", "run": runs["adapted"],
                                "row": f"searched {budget}", "budget": budget, "ratios": None,
                                "search": {**found, "why": b.get("why")}, **tail})
                continue
            found.update(predicted_ms=best["latency_ms"], direct_ms=b["best_measured_ms"],
                         val={"mAP": best["metric"]})
            uni = b.get("uniform_baseline")
            uniform = None if uni is None else {
                "row": config_label(uni["ratios"]), "ratios": _ratios(uni["ratios"]), "predicted_ms": uni["latency_ms"],
                "direct_ms": uni.get("measured_ms"), "val": {"mAP": uni["metric"]}}
            key = str(tuple(_ratios(best["ratios"])))
            for model, scores in tests.items():
                records.append({**head, "record": "pick", "seed": seed, "model": model, "run": runs[model],
                                "row": ("searched " if model == "adapted" else "dense run pruned to searched ")
                                + budget, "budget": budget, "ratios": _ratios(best["ratios"]),
                                "config": config_label(best["ratios"]), "split": "test", "test": scores[key],
                                **({"search": found, "uniform": uniform} if model == "adapted" else {}), **tail})
    for state, name in (("fresh", "latency_ms_fresh"), ("settled", "latency_ms")):
        for batch, cells in result.get(name, {}).items():
            for key, cell in cells.items():
                config = key.startswith("(")
                records.append({**head, "record": "timing", "row": config_label(_ratios(key)) if config else key,
                                "ratios": _ratios(key) if config else None, "batch": int(batch), "state": state,
                                "precision": "fp32", **(cell if isinstance(cell, dict) else {"ms": cell}), **tail})
    return records


class _Variant:
    """One variant's records, indexed for the renderers."""

    def __init__(self, doc_dir: Path | str, results: str, variant: str):
        from vitkit.tools.report import load_records

        records = [r for r in load_records(Path(doc_dir), results)
                   if r.get("study") == STUDY and r.get("variant") == variant]
        if not records:
            raise ValueError(f"{results} holds no records of SparseViT variant {variant!r}")
        sources = sorted({str(r.get("source")) for r in records})
        if len(sources) > 1:
            raise ValueError(f"SparseViT variant {variant!r} mixes records of {sources}: one invocation per variant")
        self.name, self.source = variant, sources[0]
        self.evals = {(r["row"], r["seed"]): r for r in records if r["record"] == "eval"}
        self.picks = {(r["row"], r["seed"]): r for r in records if r["record"] == "pick"}
        self.ms = {(r["row"], r["batch"], r["state"]): r["ms"] for r in records if r["record"] == "timing"}
        self.seeds = sorted({r["seed"] for r in records if "seed" in r})
        self.budgets = list(dict.fromkeys(r["budget"] for r in records if r["record"] == "pick"))
        self.batches = list(dict.fromkeys(r["batch"] for r in records if r["record"] == "timing"))
        self.uniform = sorted({r["row"] for r in records if r["record"] == "timing" and r["row"].startswith("uniform")},
                              key=lambda row: -float(row.split()[1]))
        self.low = sorted({r["row"] for r in records if r.get("model") == "low resolution"})

    def mAP(self, row: str) -> list[float]:
        """Test mAP in % of ``row`` (an evaluation or a pick), one per seed."""
        return [100 * {**self.evals, **self.picks}[(row, s)]["test"]["mAP"] for s in self.seeds]

    def pick(self, budget: str, seed: int) -> dict[str, Any]:
        return self.picks[(f"searched {budget}", seed)]

    def speedup(self, row: str, batch: int, state: str = "settled") -> float:
        """The dense model's latency over ``row``'s, in the same rounds (direct timing)."""
        return self.ms[("dense", batch, state)] / self.ms[(row, batch, state)]


def _stats(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} ({' / '.join(f'{v:.2f}' for v in values)})"


def _each(values: list[str]) -> str:
    """One value where every seed has the same, else one per seed."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def render_sparsevit_table(doc_dir: Path | str, plots: bool = True, results: str = "efficient/results.jsonl",
                           variant: str = "adapt") -> str:
    """The study's table (``vitkit report`` kind ``script``): every configuration's direct latency in the study's
    rounds (settled, and the speed-up in the fresh process), test mAP of the adapted runs and of the dense runs
    pruned without adaptation; mean ± std over the seeds, then each seed."""
    v = _Variant(doc_dir, results, variant)
    b0 = v.batches[0]
    dense = v.mAP("dense run")
    lines = ["| configuration | keep ratios (stage 1, 2, 3) | "
             + " | ".join(f"ms, batch {b}" for b in v.batches)
             + f" | × dense, batch {b0} | × dense, batch {b0}, fresh process | test mAP %, adapted | Δ vs dense run "
             "| test mAP %, dense run pruned |", "|---|---|" + "---:|" * (len(v.batches) + 2) + "---|---:|---|"]

    def timing(rows: list[str]) -> str:
        ms = " | ".join(_each([f"{v.ms[(r, b, 'settled')]:.2f}" for r in rows]) for b in v.batches)
        settled = _each([f"{v.speedup(r, b0):.2f}" for r in rows])
        fresh = _each([f"{v.speedup(r, b0, state='fresh'):.2f}" for r in rows])
        return f"{ms} | {settled} | {fresh}"

    def scores(adapted: str, pruned: str) -> str:
        a = v.mAP(adapted)
        delta = statistics.mean(x - d for x, d in zip(a, dense))
        return f"{_stats(a)} | {delta:+.2f} | {_stats(v.mAP(pruned))}"

    stages = len(v.evals[("adapted dense", v.seeds[0])]["ratios"])
    full = str(tuple([1.0] * stages))
    lines.append(f"| dense run | {full} | {timing(['dense'])} | - | 0 | {_stats(dense)} |")
    lines.append(f"| adapted, dense | {full} | {timing(['dense'])} | {scores('adapted dense', 'dense run')} |")
    for budget in v.budgets:
        picks = [v.pick(budget, s) for s in v.seeds]
        if any(p["ratios"] is None for p in picks):
            lines.append(f"| searched, {budget} budget | nothing fits on some seed | "
                         + " | ".join("-" for _ in v.batches) + " | - | - | - | - | - |")
            continue
        ratios = _each([str(tuple(p["ratios"])) for p in picks])
        lines.append(f"| **searched, {budget} budget** | {ratios} | {timing([p['config'] for p in picks])} | "
                     f"{scores(f'searched {budget}', f'dense run pruned to searched {budget}')} |")
    for row in v.uniform:
        ratios = str(tuple([float(row.split()[1])] * stages))
        lines.append(f"| {row} | {ratios} | {timing([row])} | {scores(row, f'dense run pruned to {row}')} |")
    if ("dense, no shift", b0, "settled") in v.ms:
        lines.append(f"| dense, no shift (timing only) | - | {timing(['dense, no shift'])} | - | - | - |")
    for row in v.low:
        low = v.mAP(row)
        delta = statistics.mean(low) - statistics.mean(dense)
        lines.append(f"| dense run on scenes downscaled to {row.split()[-1].replace('x', '×')} | - | "
                     f"{timing(['dense, low resolution'])} | - | {delta:+.2f} | {_stats(low)} |")
    return "\n".join(lines)


def render_sparsevit_speed(doc_dir: Path | str, plots: bool = True, results: str = "efficient/results.jsonl",
                           variant: str = "adapt", target: str = "1.5") -> str:
    """Each seed's pick under each budget, its speed-up over dense three ways: predicted by the search's latency
    table, timed directly by the search process (pick and dense timed in separate calls), and timed directly in
    the study's alternating rounds (settled, and fresh); the last one is what verdicts use. Also the uniform
    baseline the search compared with (the densest uniform ratio its table fits in the budget)."""
    v = _Variant(doc_dir, results, variant)
    b0, goal = v.batches[0], float(target)
    lines = [f"| budget | seed | pick | val mAP % | table's prediction: ms (× dense) | search process, direct: ms "
             f"(× dense) | study rounds, direct: ms (× dense) | fresh process: × dense | ≥ {goal:g}× (study rounds) "
             "| uniform baseline: val mAP %, study rounds × dense |", "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for budget in v.budgets:
        for s in v.seeds:
            p = v.pick(budget, s)
            found = p["search"]
            if p["ratios"] is None:
                lines.append(f"| {budget} | {s} | nothing fits | - | - | - | - | - | - | - |")
                continue
            row, uni = p["config"], p.get("uniform")
            baseline = "none fits" if uni is None else (
                f"{uni['row']}: {100 * uni['val']['mAP']:.2f}, {v.speedup(uni['row'], b0):.2f}×")
            lines.append(
                f"| {budget} | {s} | {tuple(p['ratios'])} | {100 * found['val']['mAP']:.2f} | "
                f"{found['predicted_ms']:.2f} ({found['table_dense_ms'] / found['predicted_ms']:.2f}×) | "
                f"{found['direct_ms']:.2f} ({found['direct_dense_ms'] / found['direct_ms']:.2f}×) | "
                f"{v.ms[(row, b0, 'settled')]:.2f} ({v.speedup(row, b0):.2f}×) | {v.speedup(row, b0, 'fresh'):.2f}× | "
                f"{'yes' if v.speedup(row, b0) >= goal else 'no'} | {baseline} |")
    first = v.pick(v.budgets[0], v.seeds[0])["search"]
    searched = " / ".join(f"{v.pick(v.budgets[0], s)['search']['direct_dense_ms']:.2f}" for s in v.seeds)
    lines += ["", f"Batch {b0}, fp32. The dense model: {first['table_dense_ms']:.2f} ms in the search's table, "
              f"{searched} ms in the search processes (seed {' / '.join(map(str, v.seeds))}), "
              f"{v.ms[('dense', b0, 'settled')]:.2f} ms in the study's rounds ({v.ms[('dense', b0, 'fresh')]:.2f} ms "
              f"in the fresh process). Candidates scored on {first['val_images']} scenes of the "
              f"`{first['split']}` split."]
    return "\n".join(lines)


def render_sparsevit_goal(doc_dir: Path | str, plots: bool = True, results: str = "efficient/results.jsonl",
                          variant: str = "adapt", speedup: str = "1.5", loss: str = "0.5") -> str:
    """SparseViT's goal, "≥ ``speedup``× lower latency at ≤ ``loss`` point of accuracy lost", for each budget's
    picks: the speed from the direct timings of the study's rounds (every seed's pick must reach it), the accuracy
    by the verdict rule, as the one-sided claim "the dense run's test mAP minus the pick's is below ``loss``"
    (``verdict`` kind: ``contrast="dense run:1,searched B:-1" baseline=loss expect=below``; ``within`` would
    also count a pick that gains more than ``loss`` against it, which the goal does not)."""
    from vitkit.tools.report import verdict_section

    v = _Variant(doc_dir, results, variant)
    b0, target = v.batches[0], float(speedup)
    lines = []
    for budget in v.budgets:
        picks = [v.pick(budget, s) for s in v.seeds]
        if any(p["ratios"] is None for p in picks):
            lines.append(f"- {budget} budget: nothing fits on some seed → goal **not reached**")
            continue
        fast = [v.speedup(p["config"], b0) for p in picks]
        searched = " / ".join(f"{p['search']['direct_dense_ms'] / p['search']['direct_ms']:.2f}×" for p in picks)
        accuracy = verdict_section(Path(doc_dir), results=results, group="row", value="test.mAP*100",
                                   contrast=f"dense run:1,searched {budget}:-1", expect="below", baseline=loss,
                                   where=f"variant={variant}", says=f"loses less than {loss} point of test mAP")
        judged = accuracy.rsplit("**", 2)[-2]
        slow = [str(s) for s, f in zip(v.seeds, fast) if f < target]
        if slow:
            goal = f"not reached (under {target:g}× on seed {', '.join(slow)})"
        else:
            goal = {"holds": "reached", "fails": f"not reached (loses {loss} point or more)"}.get(judged, judged)
        lines.append(f"- **{budget} budget**: " + " / ".join(f"{f:.2f}×" for f in fast)
                     + f" faster than dense at batch {b0} in the study's rounds (seed {' / '.join(map(str, v.seeds))};"
                     f" the search process's own timing: {searched}) → goal **{goal}**")
        lines.append("  " + accuracy)
    return "\n".join(lines)


def render_sparsevit_plot(doc_dir: Path | str, plots: bool = True, results: str = "efficient/results.jsonl",
                          variant: str = "adapt", image: str = "efficient/sparsevit_tradeoff.png") -> str:
    """The trade-off plot (test mAP against the study's direct latency), redrawn from the records."""
    if plots:
        v = _Variant(doc_dir, results, variant)
        tradeoff_figure(v, Path(doc_dir) / image)
    return f"![test mAP against measured latency, {variant}]({image})"


def tradeoff_figure(v: _Variant, path: Path) -> None:
    """Test mAP (mean over seeds) against the latency measured in the study's rounds (settled, first batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b0 = v.batches[0]
    lat = {row: ms for (row, b, state), ms in v.ms.items() if b == b0 and state == "settled"}
    mean = lambda row: statistics.mean(v.mAP(row))  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([lat[u] for u in v.uniform], [mean(u) for u in v.uniform], "o-", label="uniform ratio, adapted")
    for u in v.uniform:
        ax.annotate(u.split()[1], (lat[u], mean(u)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot([lat[u] for u in v.uniform], [mean(f"dense run pruned to {u}") for u in v.uniform], "s--", c="0.5",
            label="uniform ratio, dense model (no adaptation)")
    for i, s in enumerate(v.seeds):
        for j, budget in enumerate(v.budgets):
            p = v.pick(budget, s)
            if p["ratios"] is not None:
                ax.scatter([lat[p["config"]]], [100 * p["test"]["mAP"]], marker="*", s=140, zorder=3, c=f"C{2 + j}",
                           label=f"searched pick, {budget} budget" if i == 0 else None)
    for row in v.low:
        ax.scatter([lat["dense, low resolution"]], [mean(row)], marker="D", c="tab:purple", zorder=3,
                   label="dense, scenes downscaled (low resolution)")
    ax.axhline(mean("dense run"), c="k", lw=0.8, ls=":", label="dense run (mean of seeds)")
    ax.axhline(mean("dense run") - 0.5, c="tab:red", lw=0.8, ls=":", label="−0.5 point")
    ax.axvline(lat["dense"] / 1.5, c="tab:red", lw=0.8, ls="--", label="1.5× faster than dense")
    threads = next(iter(v.evals.values()))["threads"]
    ax.set_xlabel(f"measured latency, ms per batch of {b0} ({threads} threads, fp32)")
    ax.set_ylabel("test mAP (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", required=True, help="dense runs, comma-separated, one per seed")
    ap.add_argument("--adapted", required=True, help="sparsity-adapted runs, same seed order")
    ap.add_argument("--low-res", default=None,
                    help="dense runs trained on the scenes downscaled (e.g. model.args.img_size=56), one per seed: "
                         "SparseViT's 'dense, low resolution' alternative")
    ap.add_argument("--speedup", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    ap.add_argument("--choices", type=float, nargs="+", default=list(DEFAULT_CHOICES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--latency-batch", type=int, nargs="+", default=[8, 1], help="the first one prices the search")
    ap.add_argument("--eval-images", type=int, default=1000, help="val scenes scoring each search candidate")
    ap.add_argument("--test-images", type=int, default=None, help="test scenes (default: all the run's)")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--table-repeats", type=int, default=31, help="rounds timing the search's latency table")
    ap.add_argument("--max-contention", type=float, default=0.2)
    ap.add_argument("--search-dir", default="runs/sparsevit_study")
    ap.add_argument("--variant", default=None,
                    help="the name this invocation's records get in --results (default: study-<date-time>); a name "
                         "already there is refused: one invocation per variant (its timings share rounds)")
    ap.add_argument("--results", default="docs/efficient/results.jsonl",
                    help="JSON-lines file the records are appended to (default: %(default)s)")
    ap.add_argument("--out", default=None, help="work file between the phases (default: SEARCH_DIR/study.json)")
    ap.add_argument("--figures", default="docs/efficient")
    ap.add_argument("--finish", default=None, metavar="JSON", help=argparse.SUPPRESS)  # the timing phase
    args = ap.parse_args(argv)
    if args.finish:
        return finish(args)
    dense_runs, adapted_runs = args.dense.split(","), args.adapted.split(",")
    low_runs = args.low_res.split(",") if args.low_res else []
    if len(dense_runs) != len(adapted_runs) or (low_runs and len(low_runs) != len(dense_runs)):
        ap.error("--dense, --adapted (and --low-res) need one run per seed each, in the same order")
    args.variant = args.variant or time.strftime("study-%Y%m%d-%H%M")
    if any(r.get("study") == STUDY and r.get("variant") == args.variant for r in read_results(args.results)):
        ap.error(f"{args.results} already holds SparseViT variant {args.variant!r}: name this one with --variant")
    out = Path(args.out or Path(args.search_dir) / "study.json")
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, 1-min load {machine_load()}")

    # one latency table for every seed (same architecture, so the same budgets), timed once with care
    model = load_model(adapted_runs[0]).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    table = measure_latency_table(model, torch.randn(args.latency_batch[0], c, h, w,
                                                     generator=torch.Generator().manual_seed(0)),
                                  args.choices, repeats=args.table_repeats)
    searches = []
    for i, adapted_run in enumerate(adapted_runs):
        searches.append(run_search(adapted_run, out_dir=Path(args.search_dir) / f"search_s{i}",
                                   speedups=args.speedup, eval_images=args.eval_images,
                                   latency_batch=args.latency_batch[0], choices=args.choices,
                                   population=args.population, generations=args.generations, seed=i, table=table))
    full = tuple([1.0] * model.num_stages)
    configs = sorted({full, *(tuple([r] * model.num_stages) for r in args.choices),
                      *(tuple(b["best"]["ratios"]) for s in searches for b in s["budgets"].values() if b["best"])},
                     reverse=True)
    seeds = []
    for i, (dense_run, adapted_run, search) in enumerate(zip(dense_runs, adapted_runs, searches)):
        adapted, dense = load_model(adapted_run), load_model(dense_run)
        task = task_for_model(adapted, resolve_model_dir(adapted_run))
        task.setup(adapted)
        batches = eval_batches(resolve_model_dir(adapted_run), task, "fmnist_scenes", "test", limit=args.test_images)
        picks = {key: tuple(b["best"]["ratios"]) for key, b in search["budgets"].items() if b["best"]}
        entry = {"dense_run": dense_run, "adapted_run": adapted_run, "dense_ratios": full, "search": search,
                 "adapted": {str(r): score(adapted, task, batches, r) for r in configs},
                 "dense_pruned": {str(r): score(dense, task, batches, r) for r in configs}}
        if low_runs:
            low = load_model(low_runs[i]).eval()
            low_task = task_for_model(low, resolve_model_dir(low_runs[i]))
            low_task.setup(low)  # its eval transform downsizes the test scenes as training did
            low_batches = eval_batches(resolve_model_dir(low_runs[i]), low_task, "fmnist_scenes", "test",
                                       limit=args.test_images)
            entry["low_res"] = {"run": low_runs[i], "input_size": low.pretrained_cfg["input_size"],
                                **score(low, low_task, low_batches, full)}
        seeds.append(entry)
        print(f"seed {i}: dense run test mAP {100 * entry['dense_pruned'][str(full)]['mAP']:.2f}, adapted dense "
              f"{100 * entry['adapted'][str(full)]['mAP']:.2f}; picks "
              + ", ".join(f"{k} {r} {100 * entry['adapted'][str(r)]['mAP']:.2f}" for k, r in picks.items()))
        if i == 0:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            kept_windows_figure(adapted, task, batches, picks, Path(args.figures) / "sparsevit_kept_windows.png")

    result = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__, "choices": args.choices,
              "speedups": args.speedup, "configs": [list(r) for r in configs], "seeds": seeds,
              "search_split": "val", "eval_images": args.eval_images, "test_images": args.test_images,
              "table_dense_ms": table.fixed_ms, "repeats": args.repeats}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    # timing in a fresh process, settled by one large dense batch (vitkit.tools.search.settle) so every
    # configuration is timed in the same, steady state whatever this process evaluated before
    timing = [sys.executable, __file__, "--finish", str(out), "--threads", str(args.threads),
              "--repeats", str(args.repeats), "--max-contention", str(args.max_contention), "--figures", args.figures,
              "--latency-batch", *map(str, args.latency_batch), "--dense", args.dense, "--adapted", args.adapted,
              "--variant", args.variant, "--results", args.results]
    return subprocess.run(timing, check=False).returncode


def finish(args: argparse.Namespace) -> int:
    """Time every configuration of the study's work file (written by the first phase), append every record to
    ``--results``, redraw the trade-off plot from them and print the doc's tables."""
    out = Path(args.finish)
    result = json.loads(out.read_text())
    torch.set_num_threads(args.threads)
    seeds = result["seeds"]
    model = load_model(seeds[0]["adapted_run"]).eval()
    no_shift = load_model(seeds[0]["adapted_run"]).eval()  # same weights, every block unshifted: timing only
    for stage in no_shift.stages:
        for blk in stage.blocks:
            blk.shift_size = 0
    others = {"dense, no shift": no_shift}
    if "low_res" in seeds[0]:
        others["dense, low resolution"] = load_model(seeds[0]["low_res"]["run"]).eval()
    configs = [tuple(float(v) for v in r) for r in result["configs"]]
    meter = ContentionMeter()
    # first as a fresh process finds them, then settled: every model once through a large batch (see settle)
    for key in ("latency_ms_fresh", "latency_ms"):
        if key == "latency_ms":
            for m in (model, *others.values()):
                c, h, w = m.pretrained_cfg["input_size"]
                settle(m, torch.randn(max(args.latency_batch), c, h, w))
        result[key] = {str(b): time_configs(model, configs, others, b, args.threads, args.repeats,
                                            args.max_contention, meter) for b in args.latency_batch}
    out.write_text(json.dumps(result, indent=1, default=float))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    records = study_records(result, args.variant, machine_facts(), f"benchmarks/sparsevit_study.py --out {out}",
                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), load_1m=machine_load())
    with open(results, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"appended {len(records)} records of variant {args.variant!r} to {results}")
    study = _Variant(results.parent, results.name, args.variant)
    tradeoff_figure(study, Path(args.figures) / "sparsevit_tradeoff.png")
    for render in (render_sparsevit_table, render_sparsevit_speed):
        print("\n" + render(results.parent, results=results.name, variant=args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
