"""Training pictures: loss/accuracy curves and the confusion matrix (matplotlib, no display needed)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..utils import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png", dpi=120,
                                             bbox_inches="tight"))
    plt.close(fig)


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, primary: str = "top1") -> None:
    """Loss (train and eval) and every logged top-1 accuracy (eval ``*top1``, e.g. top1, knn_top1,
    linear_top1; train accuracy when logged) against epoch, in percent. ``primary`` is drawn first and bold."""
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax_loss.plot([h["epoch"] for h in evals], [h["eval_loss"] for h in evals], "s-", label="eval")
    keys = sorted({k for h in history for k in h if k.startswith("eval_") and k.endswith("top1")},
                  key=lambda k: (k != f"eval_{primary}", k))
    for key in keys:
        rows = [h for h in history if key in h]
        ax_acc.plot([h["epoch"] for h in rows], [100 * h[key] for h in rows], "s-", label=key.replace("_", " "),
                    linewidth=2.5 if key == f"eval_{primary}" else 1.2)
    trains = [h for h in history if h.get("train_acc") is not None]
    if trains:
        ax_acc.plot([h["epoch"] for h in trains], [100 * h["train_acc"] for h in trains], "o-", label="train acc")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"loss{' (primary metric)' if primary == 'loss' else ''}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    _save(fig, path)


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str] | None, path: str | Path) -> None:
    """Row-normalised confusion matrix with counts, true class on the rows."""
    path = Path(path)
    n = confusion.shape[0]
    names = list(class_names) if class_names and len(class_names) == n else [str(i) for i in range(n)]
    norm = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_ablation(lines: Sequence[dict[str, Any]], title: str, path: str | Path) -> None:
    """Bars of mean test top-1 per variant (and learning rate) with ±1 std error bars over seeds."""
    path = Path(path)
    labels = [ln["variant"] + (f"\nlr {ln['lr']:.2g}" if "lr" in ln and len({x["lr"] for x in lines}) > 1 else "")
              for ln in lines]
    means = [ln["mean"] for ln in lines]
    stds = [ln["std"] for ln in lines]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(lines) + 2), 4))
    colors = ["tab:orange" if ln.get("best_lr") else "tab:blue" for ln in lines]
    ax.bar(range(len(lines)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(range(len(lines)), labels, rotation=30 if len(lines) > 4 else 0, ha="right" if len(lines) > 4
                  else "center")
    low = min(m - s for m, s in zip(means, stds)) if lines else 0
    high = max(m + s for m, s in zip(means, stds)) if lines else 100
    pad = max(0.5, (high - low) * 0.3)
    ax.set_ylim(max(0, low - pad), min(100, high + pad))
    for i, (m, s) in enumerate(zip(means, stds)):
        ax.text(i, m + s + pad * 0.08, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="test top-1 (%), mean ± std over seeds")
    ax.set_title(title if len(title) < 90 else title[:87] + "...", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_image_rows(rows: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float], path: str | Path,
                    title: str | None = None) -> None:
    """A grid with one named row per entry of ``rows`` (each a normalised (N, C, H, W) batch), e.g. original /
    masked / reconstructed images; pixel values are un-normalised with ``mean``/``std`` and clipped to [0, 1]."""
    path = Path(path)
    names = list(rows)
    n = max(int(rows[k].shape[0]) for k in names)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    fig, axes = plt.subplots(len(names), n, figsize=(1.3 * n, 1.4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        images = (rows[name].detach().float().cpu() * s + m).clamp(0, 1)
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < images.shape[0]:
                img = images[c].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_lines(series: dict[str, list[tuple[float, list[float]]]], path: str | Path, title: str, xlabel: str,
               ylabel: str, logx: bool = False, xticks: Sequence[tuple[float, str]] = ()) -> None:
    """One line per series through the mean at each x, ±1 std error bars, every seed's value as a faint dot:
    accuracy against data size or model size, where a bar chart would hide the trend."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, points) in enumerate(series.items()):
        color = f"C{i}"
        xs = [x for x, _ in points]
        means = [statistics.fmean(v) for _, v in points]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar(xs, means, yerr=stds, fmt="o-", color=color, capsize=3, label=name)
        for x, values in points:
            ax.scatter([x] * len(values), values, color=color, alpha=0.3, s=12)
    if logx:
        ax.set_xscale("log")
    if xticks:
        ax.set_xticks([x for x, _ in xticks], [t for _, t in xticks])
        ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title if len(title) < 90 else title[:87] + "...", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    _save(fig, path)
