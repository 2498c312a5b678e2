"""Training pictures: loss/accuracy curves and the confusion matrix (matplotlib, no display needed)."""

from __future__ import annotations

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


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Loss (train and eval) and accuracy (train and eval) against epoch."""
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax_loss.plot([h["epoch"] for h in evals], [h["eval_loss"] for h in evals], "s-", label="eval")
        ax_acc.plot([h["epoch"] for h in evals], [100 * h["eval_top1"] for h in evals], "s-", label="eval top-1")
    trains = [h for h in history if h.get("train_acc") is not None]
    if trains:
        ax_acc.plot([h["epoch"] for h in trains], [100 * h["train_acc"] for h in trains], "o-", label="train")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
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
