"""How sharp trained attention is: softmax attention against ReLU linear attention (EfficientViT's LiteMLA).

The claim (EfficientViT, Cai et al. 2023): ReLU linear attention cannot produce sharp distributions, so it
captures global context but little local detail; EfficientViT restores the local detail with multi-scale tokens
and a depthwise conv in its FFN. This script measures the first half on trained models: for every attention
layer and head, the statistics of :mod:`vitkit.viz.attention_stats` (row entropy / log N, top-1, top-5 and
top-10% mass, the largest weight), averaged over ``--images`` validation images. Softmax layers record their
probabilities; ReLU linear layers (``LiteMLA``, ``ReLULinearAttention``) the map they imply,
``A_ij = relu(q_i)·relu(k_j) / Σ_j relu(q_i)·relu(k_j)``, formed explicitly (small token counts).

Images: the run's own held-out validation part of the training split (``data.val_fraction`` / ``data.val_seed``
of its ``train_config.yaml``, carved as the trainer carves it), of which a seeded subset of ``--images`` is
taken (``--seed``), so every run of the same recipe sees the same images. A run trained without a validation
split gets the same carving at ``--val-fraction`` instead; those images were trained on, and its records say
``held_out: false``.

Every invocation APPENDS one record per (run, layer, head) to ``--results`` (JSON lines; run name, path, model,
layer, attention kind, head, statistics, images, split, machine, run_id); the tables come from that file alone
(:func:`render_sharpness`, the ``vitkit report`` block ``script script=benchmarks/attention_sharpness.py
function=render_sharpness part=table|summary|heads``). A run named ``<group>_s<seed>`` is one seed of ``group``
(the record's ``group``): the report's ``verdict`` kind with ``per=run`` compares groups over their runs.

    python benchmarks/attention_sharpness.py --run vit=runs/ablate/<vit run> \\
        --run evit=runs/ablate/<full run> --run evit_no_dwconv=runs/ablate/<no_dwconv run> --images 512
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.data import build_dataset
from vitkit.data.base import batch_images_of
from vitkit.data.transforms import build_transforms
from vitkit.errors import ConfigError
from vitkit.layers.attention import AttentionMapSource
from vitkit.layers.linear_attention import ReLULinearAttention
from vitkit.layers.lite_mla import LiteMLA
from vitkit.tools.ablate import machine_facts, read_results
from vitkit.tools.evaluate import load_model, resolve_model_dir, run_config
from vitkit.tools.timing import append_jsonl
from vitkit.viz.attention_stats import SharpnessMeter, capture_named_attention

DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "efficient" / "sharpness.jsonl"
STATS = ("entropy", "entropy_norm", "top1_mass", "top5_mass", "top10pct_mass", "max_weight")
RECORD_KEYS = ("run", "model", "layer", "attention", "head", "n_keys", *STATS, "k_top5", "k_top10pct", "run_id")
PARTS = ("table", "summary", "heads", "plot")


# ---------------------------------------------------------------------------- measuring
def attention_kind(module: nn.Module) -> str:
    """``relu_linear`` for the ReLU linear attention modules, ``softmax`` for every other map source."""
    return "relu_linear" if isinstance(module, (LiteMLA, ReLULinearAttention)) else "softmax"


def measure(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> list[dict[str, Any]]:
    """Statistics per (layer, head) of ``model`` (eval mode) on normalised ``images``: one dict each, with the
    layer's module name and its attention kind. A model with no attention layer is an error."""
    kinds = {name: attention_kind(m) for name, m in model.named_modules() if isinstance(m, AttentionMapSource)}
    if not kinds:
        raise ConfigError(f"{type(model).__name__} has no attention layer that can report its maps")
    meter = SharpnessMeter()
    with capture_named_attention(model) as maps, torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
            for name, recorded in maps.items():
                for attn in recorded:
                    meter.update(name, attn)
                recorded.clear()
    return [{**r, "attention": kinds[r["layer"]]} for r in meter.results()]


def validation_images(folder: Path, model: nn.Module, count: int, seed: int, val_fraction: float,
                      data_dir: str | None = None, download: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """``count`` normalised images of the run's held-out validation part (see the module docstring) and what
    they are (dataset, val_fraction, val_seed, held_out, image indices' seed)."""
    cfg = run_config(folder)
    name = cfg.data.name if cfg is not None else "fashion_mnist"
    channels, height, width = model.pretrained_cfg["input_size"]
    kw: dict[str, Any] = dict(cfg.data.args or {}) if cfg is not None else {}
    if cfg is not None and cfg.data.root:
        kw["root"] = cfg.data.root
    train = build_dataset(name, "train", data_dir=data_dir or (cfg.data.data_dir if cfg else None),
                          image_size=(height, width), num_channels=channels, download=download, **kw)
    held_out = cfg is not None and cfg.data.val_fraction > 0
    fraction = cfg.data.val_fraction if held_out else val_fraction
    val_seed = cfg.data.val_seed if cfg is not None else 0
    if not hasattr(train, "split_off"):
        raise ConfigError(f"{folder}: the {name!r} dataset cannot hold out a validation split (no split_off)")
    _, val = train.split_off(fraction, seed=val_seed)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    idx = pick.tolist()
    images = batch_images_of(val.__getitems__(idx) if hasattr(val, "__getitems__") else [val[i] for i in idx])
    transform = build_transforms(None, False, model.pretrained_cfg["mean"], model.pretrained_cfg["std"],
                                 (height, width))
    about = {"dataset": name, "split": f"train[val {fraction:g}, seed {val_seed}]", "val_fraction": fraction,
             "val_seed": val_seed, "held_out": held_out, "images": len(pick), "image_seed": seed}
    return transform(images), about


def run_group(name: str) -> str:
    """Runs named ``<group>_s<seed>`` are seeds of one group (what a verdict compares): ``relu_s1`` -> ``relu``."""
    return re.sub(r"_s\d+$", "", name)


def run(args: argparse.Namespace, log=print) -> str:
    """Measure every ``--run``, appending its records as each run is done; returns the invocation's run_id."""
    torch.set_num_threads(args.threads)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = {**machine_facts(), "threads": torch.get_num_threads()}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    for name, path in args.runs:
        folder = resolve_model_dir(path)
        model = load_model(folder).float().eval()
        images, about = validation_images(folder, model, args.images, args.seed, args.val_fraction,
                                          args.data_dir, args.download)
        rows = measure(model, images, args.batch_size)
        model_name = getattr(model, "model_name", None) or type(model).__name__
        records = [{"kind": "head", "run_id": run_id, "run": name, "group": run_group(name), "path": str(path),
                    "model": model_name, **about,
                    **r, "machine": machine, "command": args.command} for r in rows]
        append_jsonl(args.results, records)
        log(f"{name} ({model_name}): {len({r['layer'] for r in rows})} attention layers, {len(rows)} heads, "
            f"{about['images']} images of {about['dataset']} {about['split']}"
            + ("" if about["held_out"] else " (NOT held out: the run trained on them)"))
    return run_id


# ---------------------------------------------------------------------------- from the results file: the renderer
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The head records of a results file, each checked for the keys the tables read."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: results file not found")
    records = [r for r in read_results(path) if r.get("kind") == "head"]
    for i, r in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise ConfigError(f"{path}: head record {i + 1} lacks {missing}")
    if not records:
        raise ConfigError(f"{path}: no head records")
    return records


def latest(records: list[dict[str, Any]], runs: str | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """(run name, its records from the last invocation that measured it), in the order the names first appear;
    ``runs``: a comma-separated subset, in that order."""
    names = list(dict.fromkeys(r["run"] for r in records))
    if runs:
        wanted = [n.strip() for n in runs.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ConfigError(f"runs {unknown} are not in the results file; it has {names}")
        names = wanted
    out = []
    for name in names:
        mine = [r for r in records if r["run"] == name]
        last = mine[-1]["run_id"]
        out.append((name, [r for r in mine if r["run_id"] == last]))
    return out


def _layers(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    order = list(dict.fromkeys(r["layer"] for r in rows))
    return [(layer, sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["head"])) for layer in order]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _spread(values: list[float | None]) -> str:
    """mean (min–max over heads)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return "–"
    return _f(_mean(kept)) + (f" ({min(kept):.3f}–{max(kept):.3f})" if len(kept) > 1 else "")


def format_table(selected: list[tuple[str, list[dict[str, Any]]]]) -> str:
    lines = ["| run | model | layer | attention | keys N | heads | entropy / log N (heads: min–max) | top-1 mass "
             "| uniform 1/N | top-5 mass (k) | top-10% mass (k) | max weight |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, rows in selected:
        for layer, heads in _layers(rows):
            h0 = heads[0]
            lines.append(
                f"| {name} | `{h0['model']}` | `{layer}` | {h0['attention']} | {h0['n_keys']} | {len(heads)} | "
                f"{_spread([h['entropy_norm'] for h in heads])} | {_f(_mean([h['top1_mass'] for h in heads]))} | "
                f"{1 / h0['n_keys']:.3f} | {_f(_mean([h['top5_mass'] for h in heads]))} ({h0['k_top5']}) | "
                f"{_f(_mean([h['top10pct_mass'] for h in heads]))} ({h0['k_top10pct']}) | "
                f"{_f(max(h['max_weight'] for h in heads))} |")
    return "\n".join(lines)


def format_summary(selected: list[tuple[str, list[dict[str, Any]]]]) -> str:
    lines = ["| run | model | attention | layers | heads | mean entropy / log N | mean top-1 mass | "
             "mean top-10% mass | max weight |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in selected:
        kinds = ", ".join(sorted({r["attention"] for r in rows}))
        lines.append(f"| {name} | `{rows[0]['model']}` | {kinds} | {len(_layers(rows))} | {len(rows)} | "
                     f"{_f(_mean([r['entropy_norm'] for r in rows]))} | {_f(_mean([r['top1_mass'] for r in rows]))} | "
                     f"{_f(_mean([r['top10pct_mass'] for r in rows]))} | {_f(max(r['max_weight'] for r in rows))} |")
    return "\n".join(lines)


def format_heads(selected: list[tuple[str, list[dict[str, Any]]]]) -> str:
    lines = ["| run | layer | head | keys N | entropy (nats) | entropy / log N | top-1 | top-5 | top-10% | max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in selected:
        for layer, heads in _layers(rows):
            lines += [f"| {name} | `{layer}` | {h['head']} | {h['n_keys']} | {_f(h['entropy'])} | "
                      f"{_f(h['entropy_norm'])} | {_f(h['top1_mass'])} | {_f(h['top5_mass'])} | "
                      f"{_f(h['top10pct_mass'])} | {_f(h['max_weight'])} |" for h in heads]
    return "\n".join(lines)


def _about(selected: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Which images and machine each run's figures come from."""
    parts = []
    for name, rows in selected:
        r = rows[0]
        machine = r.get("machine") or {}
        seen = "" if r.get("held_out", True) else ", trained on (no held-out split)"
        parts.append(f"{name}: {r.get('images', '?')} images of {r.get('dataset', '?')} {r.get('split', '')}"
                     f"{seen}; {r['run_id']}, {machine.get('cpu', 'unknown CPU')}, torch {machine.get('torch', '?')}")
    return "Measured on: " + "; ".join(parts) + "."


def plot_by_layer(selected: list[tuple[str, list[dict[str, Any]]]], path: Path, stat: str) -> None:
    """``stat`` (averaged over heads) against the attention layer's depth, one line per run group (the mean over
    its seeds, each seed a dot)."""
    from vitkit.viz.plots import plot_lines

    series: dict[str, dict[int, list[float]]] = {}
    for name, rows in selected:
        for depth, (_, heads) in enumerate(_layers(rows), start=1):
            value = _mean([h[stat] for h in heads])
            if value is not None:
                series.setdefault(run_group(name), {}).setdefault(depth, []).append(value)
    what = {"entropy_norm": "entropy / log N (1 = uniform)", "top1_mass": "mass of the largest weight"}.get(stat, stat)
    plot_lines({g: sorted(points.items()) for g, points in series.items()}, path,
               f"{what} by attention layer (mean over heads, dots: seeds)", "attention layer", what,
               xticks=[(d, str(d)) for d in sorted({d for p in series.values() for d in p})])


def render_sharpness(doc_dir: str | Path, plots: bool = True, results: str = "efficient/sharpness.jsonl",
                     part: str = "table", runs: str | None = None, image: str | None = None,
                     stat: str = "entropy_norm") -> str:
    """Markdown for ``vitkit report`` (kind ``script``), from the results file alone (``results`` relative to
    ``doc_dir``), each run name's last measurement (``runs``: a comma-separated subset and order):

    * ``part=table``: per run and attention layer, the statistics averaged over heads (entropy also min–max);
    * ``part=summary``: per run, averaged over every layer and head;
    * ``part=heads``: every head;
    * ``part=plot``: ``stat`` by layer depth, one line per run group, drawn to ``image`` (when ``plots``).
    """
    if part not in PARTS:
        raise ConfigError(f"part={part!r}: one of {', '.join(PARTS)}")
    selected = latest(read_records(Path(doc_dir) / results), runs)
    if part == "plot":
        if not image or stat not in STATS:
            raise ConfigError(f"part=plot needs image=FILE and stat= one of {', '.join(STATS)}")
        if plots:
            plot_by_layer(selected, Path(doc_dir) / image, stat)
        return f"![attention {stat} by layer]({image})"
    text = {"table": format_table, "summary": format_summary, "heads": format_heads}[part](selected)
    return text + "\n\n" + _about(selected)


# ---------------------------------------------------------------------------- command line
def _named_run(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--run takes NAME=PATH (a run or checkpoint folder), got {text!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", dest="runs", action="append", required=True, type=_named_run, metavar="NAME=PATH",
                        help="a trained run (or checkpoint folder) and the name its rows get; repeatable")
    parser.add_argument("--images", type=int, default=512, help="validation images per run (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset (default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="held-out fraction for a run trained without one (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", help="where the dataset lies (default: the run's data.data_dir)")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS),
                        help="JSON-lines file the records are appended to (default: %(default)s)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or not 0 < args.val_fraction < 1:
        parser.error("--images and --batch-size must be >= 1, --val-fraction in (0, 1)")
    names = [n for n, _ in args.runs]
    if len(set(names)) != len(names):
        parser.error(f"--run names must differ, got {names}")
    args.command = shlex.join(["python", "benchmarks/attention_sharpness.py", *argv])
    run(args, log=lambda s: print(s, flush=True))
    results = os.path.abspath(args.results)
    for part in ("summary", "table"):
        print()
        print(render_sharpness(Path(results).parent, results=Path(results).name, part=part, runs=",".join(names)))
    print(f"records: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
