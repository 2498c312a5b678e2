"""Pictures: training curves, confusion matrices, attention maps (and later reconstructions)."""

from .attention import attention_rollout, render_overlay
from .plots import plot_ablation, plot_confusion, plot_curves

__all__ = ["attention_rollout", "plot_ablation", "plot_confusion", "plot_curves", "render_overlay"]
