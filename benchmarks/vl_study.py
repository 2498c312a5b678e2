"""The vision-language study's numbers and pictures (docs/vision_language.md) from trained CLIP and ViLT runs.

For each CLIP run (``--clip NAME=RUN[,RUN...]``; several runs are seeds):

* the run's own task evaluation on the **held-out captioned test canvases** (5,000, made from Fashion-MNIST test
  images only): zero-shot top-1 on canvases, image↔text recall@1/5, hard-negative accuracy (true caption above
  its position-swapped version);
* **zero-shot top-1 on the plain Fashion-MNIST test set** (10,000 images): each 28×28 test image, unchanged,
  alone on the 28×56 canvas the model reads (on the left half, then on the right half; the other half empty),
  classified among the 10 class words with the run's prompt templates averaged.

For each ViLT run (``--vilt NAME=RUN[,RUN...]``, e.g. with and without WPA):

* the task evaluation on the test canvases: ITM accuracy with random (image-swapped) negatives, MLM accuracy
  (whole-word masks over every word), hard-negative accuracy, image→text R@1/R@5 among 20 captions, mean WPA
  distance of matching and non-matching pairs;
* **ITM on hard negatives as a decision**: the share of position-swapped captions the ITM head rejects (logit < 0)
  next to the share of true captions it accepts, on the two-item test canvases;
* **MLM on class words**: one class word per caption masked whole (every piece of "t-shirt", "ankle boot"),
  predicted exactly, with the canvas and with an empty canvas (what the text alone tells).

Pictures: a CLIP retrieval grid (text queries → the 5 best test canvases, the query's own canvas framed) and a
ViLT word-patch alignment heat map (the IPOT plan row of each word over the 7×14 patch grid).

**Results** (``--results FILE``, JSON lines, see docs/method.md): every evaluated run **appends** one record
``{"kind": "run", "family": "clip"|"vilt", "variant": NAME, "run": FOLDER, "seed": N, "metrics": {every number
above}, "eval_seconds", "settings", "threads", "machine", "load_1m", "finished_at", "key", "source"}``; a run
already in the file (same family, variant and folder) is skipped, so adding seeds evaluates only the new runs.
``--chance`` appends the chance levels of every measure on the test canvases (``{"kind": "chance", "clip":
{...}, "vilt": {...}}``, same metric names; see :func:`chance_levels`). ``vitkit report docs/vision_language.md``
rebuilds the doc's tables and verdicts from that file with :func:`render_table` and :func:`render_verdict`.

    python benchmarks/vl_study.py --chance --results docs/vision_language/results.jsonl
    python benchmarks/vl_study.py --clip clip=runs/vl_clip_s0 \\
        --vilt wpa=runs/vl_vilt_wpa_s0,runs/vl_vilt_wpa_s1 --vilt no-wpa=runs/vl_vilt_nowpa_s0,runs/vl_vilt_nowpa_s1 \\
        --results docs/vision_language/results.jsonl --figures docs/vision_language
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.data import build_dataset
from vitkit.data.captions import CAPTION_WORDS, swapped_caption
from vitkit.data.transforms import build_transforms
from vitkit.models.vilt import wpa_plan
from vitkit.tasks.clip import DEFAULT_TEMPLATES, configured_tokenizer, model_tokenizer, tokenize, zero_shot_classify
from vitkit.tasks.vilt import Encoded
from vitkit.tools.evaluate import evaluate_checkpoint, load_model, resolve_model_dir, task_for_model, task_spec


def parse_spec(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise SystemExit(f"{text!r}: expected NAME=RUN[,RUN...]")
    name, runs = text.split("=", 1)
    return name, [r for r in runs.split(",") if r]


def normalise(canvases_uint8: torch.Tensor, model) -> torch.Tensor:
    """uint8 canvases -> the model's evaluation input (as ``vitkit eval`` prepares it)."""
    cfg = model.pretrained_cfg
    return build_transforms(None, False, cfg["mean"], cfg["std"])(canvases_uint8)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not k.startswith("_") and isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------------------- CLIP
@torch.inference_mode()
def clip_plain_zero_shot(run: str, batch: int = 1000) -> dict[str, float]:
    """Zero-shot top-1 over the plain Fashion-MNIST test images placed alone on the left / right half."""
    folder = resolve_model_dir(run)
    model = load_model(folder)
    _, args = task_spec(model, folder)
    templates = list((args or {}).get("templates") or DEFAULT_TEMPLATES)
    words = list((args or {}).get("class_names") or CAPTION_WORDS)
    tokenizer = model_tokenizer(model, folder)
    test = build_dataset("fashion_mnist", "test")
    out = {}
    for side, col in (("left", 0), ("right", 28)):
        hits = 0
        for start in range(0, len(test), batch):
            items = test.images[start:start + batch]
            canvas = torch.zeros(items.shape[0], 1, 28, 56, dtype=torch.uint8)
            canvas[..., col:col + 28] = items
            probs = zero_shot_classify(model, tokenizer, normalise(canvas, model), words, templates)
            hits += int((probs.argmax(1) == test.labels[start:start + batch].long()).sum())
        out[f"plain_zeroshot_{side}"] = hits / len(test)
    out["plain_zeroshot"] = (out["plain_zeroshot_left"] + out["plain_zeroshot_right"]) / 2
    return out


@torch.inference_mode()
def clip_retrieval_grid(run: str, path: Path, queries: int = 5, topk: int = 5, seed: int = 0) -> None:
    """Text queries (captions of test canvases with two items) -> the ``topk`` most similar test canvases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = resolve_model_dir(run)
    model = load_model(folder)
    test = build_dataset("fmnist_captions", "test")
    tok = configured_tokenizer(model_tokenizer(model, folder), model.context_length)
    image_emb = torch.cat([model.encode_image(normalise(test.images[i:i + 1000], model), normalize=True).float()
                           for i in range(0, len(test), 1000)])
    rng = np.random.default_rng(seed)
    two = [i for i, c in enumerate(test.captions) if swapped_caption(c) is not None]
    one = [i for i, c in enumerate(test.captions) if swapped_caption(c) is None]
    picks = list(rng.choice(two, queries - 2, replace=False)) + list(rng.choice(one, 2, replace=False))
    texts = [test.captions[i] for i in picks]
    text_emb = model.encode_text(*tokenize(tok, texts), normalize=True).float()
    sims = text_emb @ image_emb.T
    fig, axes = plt.subplots(len(picks), topk, figsize=(2.0 * topk, 1.35 * len(picks)), squeeze=False)
    for r, (i, text) in enumerate(zip(picks, texts)):
        best = sims[r].argsort(descending=True)[:topk].tolist()
        for c, j in enumerate(best):
            ax = axes[r][c]
            ax.imshow(test.images[j, 0].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            own = j == i or test.captions[j] == text
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if own else "lightgray")
                spine.set_linewidth(3 if own else 1)
            ax.set_xlabel(f"{float(sims[r, j]):.2f}", fontsize=7)
        axes[r][0].set_title(f"“{text}”", fontsize=8, loc="left")
    fig.suptitle("CLIP text → image retrieval on held-out canvases (green: a canvas the query describes)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- ViLT
def _vilt_task(run: str):
    folder = resolve_model_dir(run)
    model = load_model(folder)
    task = task_for_model(model, folder)
    task.setup(model)
    return model, task


def _class_word_span(caption: str) -> tuple[int, int] | None:
    """Character span of the first class word in ``caption`` (longest match: "ankle boot" before "boot")."""
    best = None
    for word in sorted(CAPTION_WORDS, key=len, reverse=True):
        at = f" {caption} ".find(f" {word} ")
        if at >= 0 and (best is None or at < best[0]):
            best = (at, at + len(word))
    return best


@torch.inference_mode()
def vilt_extra(run: str, n: int = 1000, batch: int = 250) -> dict[str, float]:
    """Hard-negative ITM decisions and class-word MLM (with the canvas and with an empty one)."""
    model, task = _vilt_task(run)
    test = build_dataset("fmnist_captions", "test")
    idx = list(range(min(n, len(test))))
    images = normalise(test.images[idx], model)
    blank = normalise(torch.zeros_like(test.images[idx]), model)
    captions = [test.captions[i] for i in idx]
    out: dict[str, float] = {}
    # hard negatives: ITM logits of the true and the swapped caption of two-item canvases
    rows = [i for i, c in enumerate(captions) if swapped_caption(c) is not None]
    true = torch.cat([task._scores(model, images[rows[s:s + batch]], [captions[i] for i in rows[s:s + batch]])
                      for s in range(0, len(rows), batch)])
    swap = torch.cat([task._scores(model, images[rows[s:s + batch]],
                                   [swapped_caption(captions[i]) for i in rows[s:s + batch]])
                      for s in range(0, len(rows), batch)])
    out.update(hard_rank_acc=float((true > swap).float().mean()), hard_rejected=float((swap < 0).float().mean()),
               true_accepted=float((true > 0).float().mean()), hard_pairs=float(len(rows)))
    # class-word MLM: mask every token of the first class word of each caption
    enc = task.encode(captions)
    offsets = [e.offsets for e in task.tokenizer.encode_batch(captions)]
    masked = enc.input_ids.clone()
    target = torch.full_like(enc.input_ids, -100)
    for r, caption in enumerate(captions):
        span = _class_word_span(caption)
        for t, (a, b) in enumerate(offsets[r][:masked.shape[1]]):
            if span and b > a and a >= span[0] and b <= span[1] and enc.attention_mask[r, t]:
                target[r, t] = enc.input_ids[r, t]
                masked[r, t] = task.mask_id
    for name, pixels in (("mlm_class_word_acc", images), ("mlm_class_word_acc_blank", blank)):
        hits = 0
        for s in range(0, len(captions), batch):
            sub = Encoded(masked[s:s + batch], enc.attention_mask[s:s + batch], enc.word_ids[s:s + batch])
            logits = task._forward(model, pixels[s:s + batch], sub)["mlm_logits"]
            tgt = target[s:s + batch]
            ok = (logits.argmax(-1) == tgt) | (tgt == -100)
            hits += int(ok.all(1).sum())
        out[name] = hits / len(captions)
    return out


@torch.inference_mode()
def wpa_heat_map(run: str, path: Path, index: int | None = None, beta: float = 0.5, iteration: int = 50) -> None:
    """The IPOT plan between the words of a test caption and the patches of its canvas, one panel per word."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, task = _vilt_task(run)
    test = build_dataset("fmnist_captions", "test")
    if index is None:
        index = next(i for i, c in enumerate(test.captions) if swapped_caption(c) is not None)
    caption = test.captions[index]
    image = normalise(test.images[index:index + 1], model)
    enc = task.encode([caption])
    out = model(enc.input_ids, enc.attention_mask, None, image)
    last = int(out["text_masks"].sum(1)[0]) - 1  # [SEP]: words are the tokens between it and [CLS]
    plan = wpa_plan(out, beta, iteration)[0]  # (text, image tokens)
    tokens = task.tokenizer.encode(caption).tokens
    pidx = out["patch_index"][0]  # every patch in grid order at evaluation
    grid = (int(pidx[:, 0].max()) + 1, int(pidx[:, 1].max()) + 1)
    words = [t for t in range(1, last)]
    cols = 4
    nrows = (len(words) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 1.5 * nrows), squeeze=False)
    panels = [ax for row in axes for ax in row]
    panels[0].imshow(test.images[index, 0].numpy(), cmap="gray")
    panels[0].set_title("canvas", fontsize=8)
    for ax, t in zip(panels[1:], words):
        heat = torch.zeros(*grid)
        heat[pidx[:, 0], pidx[:, 1]] = plan[t, 1:].float()
        ax.imshow(test.images[index, 0].numpy(), cmap="gray", alpha=0.35)
        ax.imshow(torch.nn.functional.interpolate(heat[None, None], size=(28, 56), mode="nearest")[0, 0],
                  cmap="magma", alpha=0.7)
        ax.set_title(tokens[t], fontsize=8)
    for ax in panels:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.suptitle(f"ViLT word-patch alignment (IPOT plan, β={beta}, {iteration} iterations): “{caption}”",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- chance
CLIP_RECIPE = "configs/captions/clip_tiny.yaml"
VILT_RECIPE = "configs/captions/vilt_tiny.yaml"


def _recipe_test_set(recipe: str | Path):
    """The recipe and its dataset's test split, built as training and ``vitkit eval`` build it (``data.args``)."""
    from vitkit.engine.config import load_config

    path = Path(recipe)
    cfg = load_config(path if path.is_absolute() or path.is_file() else Path(__file__).resolve().parents[1] / path)
    return cfg, build_dataset(cfg.data.name, "test", data_dir=cfg.data.data_dir, **dict(cfg.data.args or {}))


def t2i_chance(captions: list[str], k: int) -> Fraction:
    """Recall@k of a random ranking of all N images for each caption as a query, a hit being any image whose caption
    text is the query's: the mean over queries of 1 - C(N - m, k) / C(N, k), m = canvases sharing the caption."""
    n, counts = len(captions), Counter(captions)
    return sum((1 - Fraction(math.comb(n - counts[c], k), math.comb(n, k)) for c in captions), Fraction(0)) / n


def chance_levels(clip_recipe: str | Path = CLIP_RECIPE, vilt_recipe: str | Path = VILT_RECIPE) -> dict[str, Any]:
    """What a model that ranks at random scores on each measure of the study, exactly, from the test canvases.

    CLIP (the candidate sets of :meth:`vitkit.tasks.clip.CLIPTask._retrieval_hits`): image -> text ranks the D
    distinct caption texts, one of which is the image's, so R@k = k / D for every image; text -> image ranks all
    N images and accepts any of the m images with the query's caption, so R@k = mean of 1 - C(N-m, k) / C(N, k);
    zero-shot top-1 on a canvas: (its distinct classes) / (classes); ``zeroshot_all_items``: 1 / C(classes,
    its distinct classes); hard negatives: 1/2. ViLT (:meth:`vitkit.tasks.vilt.ViLTTask._retrieval`): each of the
    first ``retrieval_images`` test images ranks its own caption against ``retrieval_candidates - 1`` other
    captions drawn from those that differ in text and, by the labels, cannot describe it (so repeated texts among
    the distractors change nothing: the hit is the true caption's own place), R@k = k / K whenever an image has
    at least K - 1 such captions (checked: ``fewest_eligible``); ITM with half of the pairs image-swapped and the
    hard negatives: 1/2.
    """
    from vitkit.data.text_batches import may_match

    clip_cfg, test = _recipe_test_set(clip_recipe)
    captions, labels = list(test.captions), test.labels
    n, distinct = len(captions), len(set(captions))
    classes = len((clip_cfg.task.args or {}).get("class_names") or CAPTION_WORDS)
    present = [len({int(c) for c in row if c >= 0}) for row in labels.tolist()]
    clip: dict[str, float] = {"plain_zeroshot": 1 / classes, "plain_zeroshot_left": 1 / classes,
                              "plain_zeroshot_right": 1 / classes,
                              "zeroshot_top1": float(sum(Fraction(k, classes) for k in present if k) /
                                                     sum(1 for k in present if k)),
                              "zeroshot_all_items": float(sum(Fraction(1, math.comb(classes, k)) for k in present
                                                              if k) / sum(1 for k in present if k))}
    for k in (1, 5):
        i2t, t2i = Fraction(min(k, distinct), distinct), t2i_chance(captions, k)
        clip.update({f"i2t_recall@{k}": float(i2t), f"t2i_recall@{k}": float(t2i),
                     f"recall@{k}": float((i2t + t2i) / 2)})
    two_items = sum(1 for c in captions if swapped_caption(c) is not None)
    clip.update(hard_negative_acc=0.5, count=n, distinct_captions=distinct, hard_negative_count=two_items)

    vilt_cfg, vtest = _recipe_test_set(vilt_recipe)
    a = vilt_cfg.task.args or {}
    cands, images = int(a.get("retrieval_candidates", 20)), int(a.get("retrieval_images", 200))
    pool, pool_labels = list(vtest.captions), vtest.labels
    eligible = []
    for i in range(min(images, len(pool))):
        ok = torch.tensor([c != pool[i] for c in pool]) & ~may_match(pool_labels, pool_labels[i:i + 1])[:, 0]
        eligible.append(int(ok.sum()))
    sizes = [1 + min(cands - 1, e) for e in eligible]
    vilt = {"itm_acc": 0.5, "hard_neg_acc": 0.5, "hard_rank_acc": 0.5,
            "retrieval_r1": float(sum(Fraction(1, K) for K in sizes) / len(sizes)),
            "retrieval_r5": float(sum(Fraction(min(5, K), K) for K in sizes) / len(sizes)),
            "retrieval_candidates": cands, "retrieval_images": len(sizes), "fewest_eligible": min(eligible)}
    return {"kind": "chance", "dataset": clip_cfg.data.name, "split": "test",
            "data_args": dict(clip_cfg.data.args or {}),
            "recipes": {"clip": str(clip_recipe), "vilt": str(vilt_recipe)},
            "same_test_set": list(vtest.captions) == captions, "clip": clip, "vilt": vilt,
            "method": "a random ranking over each task's own candidates (chance_levels in benchmarks/vl_study.py)",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": "benchmarks/vl_study.py --chance"}


# ---------------------------------------------------------------------------------------------------- records
def run_record(family: str, variant: str, run: str, metrics: dict[str, float], seed: int | None, source: str,
               **facts: Any) -> dict[str, Any]:
    """One evaluated run, as results files hold it (see the module): identity first, then every metric, then
    how and where it was measured."""
    return {"kind": "run", "family": family, "variant": variant, "run": run, "seed": seed, "metrics": metrics,
            **facts, "source": source}


def seed_from_name(run: str) -> int | None:
    match = re.search(r"_s(\d+)$", Path(run).name)
    return int(match.group(1)) if match else None


def run_identity(run: str) -> dict[str, Any]:
    """The run's seed (its recipe's ``train.seed``, else the ``_sN`` of its folder name) and run key."""
    from vitkit.tools.ablate import run_key
    from vitkit.tools.evaluate import run_config

    cfg = run_config(resolve_model_dir(run))
    if cfg is None:
        return {"seed": seed_from_name(run)}
    return {"seed": int(cfg.train.seed), "key": run_key(cfg)}


def read_records(path: Path | None) -> list[dict[str, Any]]:
    from vitkit.tools.ablate import read_results

    return read_results(path) if path is not None else []


def append_record(path: Path | None, record: dict[str, Any]) -> None:
    print(json.dumps(record))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def evaluate_run(kind: str, name: str, run: str, threads: int, extra_n: int) -> dict[str, Any]:
    from vitkit.tools.ablate import _load_1m, machine_facts

    load_before, t0 = _load_1m(), time.perf_counter()
    metrics, _ = evaluate_checkpoint(run, data="fmnist_captions", split="test", batch_size=250)
    row = scalars(metrics)
    row.update(clip_plain_zero_shot(run) if kind == "clip" else vilt_extra(run, extra_n))
    identity = run_identity(run)
    settings = {"eval_batch_size": 250, **({"extra_n": extra_n} if kind == "vilt" else {})}
    return run_record(kind, name, run, row, identity.pop("seed"), "benchmarks/vl_study.py",
                      eval_seconds=round(time.perf_counter() - t0, 1), settings=settings, threads=threads,
                      machine=machine_facts(), load_1m=[load_before, _load_1m()],
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **identity)


# ---------------------------------------------------------------------------------------------------- the doc
# (label, metric fields shown as "a / b", format): "%" scales by 100. {name} in a label is filled from the first
# run's metrics and settings, then the chance record's family section.
TABLE_ROWS: dict[str, list[tuple[str, tuple[str, ...], str]]] = {
    "clip": [
        ("zero-shot top-1, **plain Fashion-MNIST test set** (10,000 images, each alone on the left half, then the "
         "right half; mean of both)", ("plain_zeroshot",), "%"),
        ("… on the left half / on the right half", ("plain_zeroshot_left", "plain_zeroshot_right"), "%"),
        ("zero-shot top-1 on the {count:,} test canvases (top class is one of the canvas's items)",
         ("zeroshot_top1",), "%"),
        ("image → text recall@1 / @5: each canvas ranks the {distinct_captions:,} distinct caption texts",
         ("i2t_recall@1", "i2t_recall@5"), "%"),
        ("text → image recall@1 / @5: each caption ranks all {count:,} canvases, any with its text counts",
         ("t2i_recall@1", "t2i_recall@5"), "%"),
        ("hard negatives: true caption scored above its position-swapped version ({hard_negative_count:,} pairs)",
         ("hard_negative_acc",), "%"),
    ],
    "vilt": [
        ("ITM accuracy, random (image-swapped) negatives, {count:,} pairs", ("itm_acc",), "%"),
        ("MLM accuracy, whole-word masks over all words", ("mlm_acc",), "%"),
        ("MLM on **class words** (one class word per caption masked whole), with the canvas; first {extra_n:,} "
         "test captions", ("mlm_class_word_acc",), "%"),
        ("… the same captions with an **empty** canvas (what the text alone tells)", ("mlm_class_word_acc_blank",),
         "%"),
        ("image → text R@1 / R@5 among {retrieval_candidates} captions ({retrieval_count:,} images)",
         ("retrieval_r1", "retrieval_r5"), "%"),
        ("hard negatives: true caption above its position-swapped one ({hard_neg_count:,} pairs)",
         ("hard_neg_acc",), "%"),
        ("hard negatives as ITM decisions: swapped captions rejected / true captions accepted ({hard_pairs:,} "
         "two-item canvases among the first {extra_n:,})", ("hard_rejected", "true_accepted"), "%"),
        ("mean OT distance, matching / non-matching pairs", ("wpa_pos", "wpa_neg"), ".3f"),
    ],
}


def _numbered(doc_dir: Path, results: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a results file, so that a table can name the lines it comes from."""
    from vitkit.tools.report import load_records

    load_records(doc_dir, results)  # the same checks and errors as every report kind
    lines = (doc_dir / results).read_text(encoding="utf-8").splitlines()
    return [(i, json.loads(line)) for i, line in enumerate(lines, 1) if line.strip()]


def _chance(numbered: list[tuple[int, dict[str, Any]]]) -> tuple[int | None, dict[str, Any]]:
    found = [(i, r) for i, r in numbered if r.get("kind") == "chance"]
    return found[-1] if found else (None, {})


def _cell(values: list[list[float]], fmt: str) -> str:
    """One seed: its values ("a / b"); several: the means (± std for one field) and the seeds in brackets."""
    spec, unit = (".1f", "%") if fmt == "%" else (fmt, "")
    show = lambda vs: " / ".join(format(v, spec) for v in vs)  # noqa: E731
    if len(values) == 1:
        return show(values[0]) + unit
    means = [float(np.mean(col)) for col in zip(*values)]
    spread = f" ± {float(np.std(values, ddof=1)):{spec}}" if len(means) == 1 else ""
    return f"{show(means)}{spread}{unit} ({', '.join(show(v) for v in values)})"


def _chance_cell(section: dict[str, Any], fields: tuple[str, ...], fmt: str) -> str:
    """Chance in %: one decimal ("10", "15.7"), two below 1% ("0.05")."""
    if fmt != "%" or any(f not in section for f in fields):
        return "—"
    pct = [100 * section[f] for f in fields]
    return " / ".join(f"{p:.1f}".removesuffix(".0") if p >= 1 else f"{p:.2f}" for p in pct) + "%"


def _label(template: str, names: dict[str, Any]) -> str:
    names = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in names.items()}
    return template.format_map(names)


def render_table(doc_dir: Path, plots: bool = True, results: str = "", family: str = "",
                 variants: str = "") -> str:
    """``<!-- report: script script=benchmarks/vl_study.py function=render_table results=... family=clip
    variants="clip:CLIP" -->``: one row per measure of :data:`TABLE_ROWS`, one column per variant (its ``kind:
    run`` records, seeds in order), the chance level from the ``kind: chance`` record, and the metric names; a
    last line names the records' lines."""
    from vitkit.errors import ConfigError

    numbered = _numbered(doc_dir, results)
    chance_line, chance = _chance(numbered)
    section = chance.get(family, {})
    columns = [v.partition(":")[::2] for v in variants.split(",") if v]
    runs = {name: sorted(((i, r) for i, r in numbered if r.get("kind") == "run" and r.get("family") == family
                          and r.get("variant") == name), key=lambda ir: (ir[1].get("seed") is None, ir[1].get("seed")))
            for name, _ in columns}
    empty = [name for name, found in runs.items() if not found]
    if empty:
        raise ConfigError(f"{results}: no {family} runs of variant(s) {empty}")
    first = next(iter(runs.values()))[0][1]
    names = {**section, **first.get("settings", {}), **first["metrics"]}
    seeds = lambda n: f"{n} seed{'s' if n > 1 else ''}"  # noqa: E731
    out = ["| measurement | " + " | ".join(f"{label or name} (`{name}`, {seeds(len(runs[name]))})"
                                            for name, label in columns) + " | chance | `metrics` field(s) |",
           "|---|" + "---:|" * (len(columns) + 1) + "---|"]
    for template, fields, fmt in TABLE_ROWS[family]:
        scale = 100 if fmt == "%" else 1
        cells = [_cell([[r["metrics"][f] * scale for f in fields] for _, r in runs[name]], fmt) for name, _ in columns]
        out.append(f"| {_label(template, names)} | " + " | ".join(cells) +
                   f" | {_chance_cell(section, fields, fmt)} | " + " / ".join(f"`{f}`" for f in fields) + " |")
    where = "; ".join(f"`{name}` line{'s' if len(runs[name]) > 1 else ''} " +
                      ", ".join(f"{i} (seed {r.get('seed')}, `{r['run']}`)" for i, r in runs[name])
                      for name, _ in columns)
    out += ["", f"Cells: the `metrics` of the `kind: run` records (× 100 for %): one seed's value, or mean ± std over "
                f"the seeds with each seed's value in brackets, in seed order. From [results.jsonl]({results}): "
                f"{where}; chance: " + (f"line {chance_line} (`kind: chance`)." if chance_line else "none yet.")]
    return "\n".join(out)


def render_verdict(doc_dir: Path, plots: bool = True, results: str = "", value: str = "", contrast: str = "",
                   expect: str = "", chance: str | None = None, says: str | None = None, group: str = "variant",
                   where: str = "kind=run", unit: str = "points", margin: str | None = None) -> str:
    """A ``verdict`` line of ``vitkit report`` (the same rule and wording: it is
    :func:`vitkit.tools.report.verdict_section` that writes it) with two additions that kind lacks:

    * ``value="a*100|b*100"``: the first of these fields a record has (CLIP and ViLT name their hard-negative
      accuracy ``hard_negative_acc`` and ``hard_neg_acc``);
    * ``chance="clip.t2i_recall@5*100"``: the baseline read from the results' ``kind: chance`` record instead of
      written in the marker.
    """
    from vitkit.tools import report

    numbered = _numbered(doc_dir, results)
    baseline = None
    if chance:
        line, record = _chance(numbered)
        baseline = report.field(record, chance)
        if not isinstance(baseline, (int, float)):
            raise KeyError(f"{results}: no chance record with {chance!r}")
        baseline = repr(float(baseline))
    kw = dict(group=group, contrast=contrast, expect=expect, margin=margin, says=says or value, where=where,
              unit=unit, baseline=baseline)
    if "|" not in value:
        return report.verdict_section(doc_dir, results=results, value=value, **kw)
    options = value.split("|")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for _, r in numbered:
            found = [v for v in (report.field(r, o) for o in options) if isinstance(v, (int, float))]
            rows.append(json.dumps({**r, "_value": found[0] if found else None}))
        (Path(tmp) / "results.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return report.verdict_section(Path(tmp), results="results.jsonl", value="_value", **kw)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", action="append", default=[], help="NAME=RUN[,RUN...]")
    ap.add_argument("--vilt", action="append", default=[], help="NAME=RUN[,RUN...]")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--extra-n", type=int, default=1000, help="test canvases for the hard-ITM and class-word MLM")
    ap.add_argument("--results", type=Path, default=None,
                    help="JSON-lines file the records are appended to (runs already there are skipped)")
    ap.add_argument("--chance", action="store_true",
                    help="append the chance level of every measure, computed from the recipes' test canvases")
    ap.add_argument("--figures", type=Path, default=None, help="folder for retrieval_grid.png and wpa_heatmap.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    done = {(r.get("family"), r.get("variant"), r.get("run")) for r in read_records(args.results)
            if r.get("kind") == "run"}
    if args.chance:
        append_record(args.results, chance_levels())
    for kind, specs in (("clip", args.clip), ("vilt", args.vilt)):
        for spec in specs:
            name, runs = parse_spec(spec)
            for run in runs:
                if (kind, name, run) in done:
                    log(f"{kind} {name} {run}: already in {args.results}, skipped")
                    continue
                record = evaluate_run(kind, name, run, args.threads, args.extra_n)
                log(f"{kind} {name} {run}: evaluated in {record.get('eval_seconds')} s")
                append_record(args.results, record)
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        if args.clip:
            clip_retrieval_grid(parse_spec(args.clip[0])[1][0], args.figures / "retrieval_grid.png")
        if args.vilt:
            wpa_heat_map(parse_spec(args.vilt[0])[1][0], args.figures / "wpa_heatmap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
