"""Pictures: training curves, confusion matrices (and later attention maps, reconstructions)."""

from .plots import plot_ablation, plot_confusion, plot_curves

__all__ = ["plot_ablation", "plot_confusion", "plot_curves"]
