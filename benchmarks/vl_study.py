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

    python benchmarks/vl_study.py --clip clip=runs/vl_clip_s0 \\
        --vilt wpa=runs/vl_vilt_wpa_s0,runs/vl_vilt_wpa_s1 --vilt no-wpa=runs/vl_vilt_nowpa_s0,runs/vl_vilt_nowpa_s1 \\
        --out docs/vision_language/results.json --figures docs/vision_language
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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


# ---------------------------------------------------------------------------------------------------- main
def mean_std(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", action="append", default=[], help="NAME=RUN[,RUN...]")
    ap.add_argument("--vilt", action="append", default=[], help="NAME=RUN[,RUN...]")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--extra-n", type=int, default=1000, help="test canvases for the hard-ITM and class-word MLM")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--figures", type=Path, default=None, help="folder for retrieval_grid.png and wpa_heatmap.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {"clip": [], "vilt": []}
    for kind, specs in (("clip", args.clip), ("vilt", args.vilt)):
        for spec in specs:
            name, runs = parse_spec(spec)
            per_run = []
            for run in runs:
                t0 = time.perf_counter()
                metrics, _ = evaluate_checkpoint(run, data="fmnist_captions", split="test", batch_size=250)
                row = {"run": run, **scalars(metrics)}
                row.update(clip_plain_zero_shot(run) if kind == "clip" else vilt_extra(run, args.extra_n))
                row["seconds"] = time.perf_counter() - t0
                log(f"{kind} {name} {run}: {row}")
                per_run.append(row)
            keys = [k for k in per_run[0] if k not in ("run", "seconds")]
            result[kind].append({"name": name, "runs": per_run,
                                 "mean_std": {k: mean_std([r[k] for r in per_run]) for k in keys}})
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        if args.clip:
            clip_retrieval_grid(parse_spec(args.clip[0])[1][0], args.figures / "retrieval_grid.png")
        if args.vilt:
            wpa_heat_map(parse_spec(args.vilt[0])[1][0], args.figures / "wpa_heatmap.png")
    print(json.dumps({k: [{"name": g["name"], **g["mean_std"]} for g in v] for k, v in result.items()}, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
