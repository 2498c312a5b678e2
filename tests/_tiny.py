"""Tiny constructor overrides per model family, so registry-wide tests stay fast.

Every family file gets an entry here; a registered model without one fails the registry tests.
"""

from __future__ import annotations

from typing import Any

from vitkit.models import model_defaults, model_family

NUM_CLASSES = 5


def _vit(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    patch = defaults.get("patch_size", 16)
    stride = defaults.get("patch_stride") or patch
    over: dict[str, Any] = dict(embed_dim=24, depth=2, num_heads=2, num_classes=NUM_CLASSES, mlp_dim=None)
    reduction = stride
    if defaults.get("stem") == "resnet":
        n_stages = min(len(defaults.get("stem_layers", (1,))), 2) or 1
        over.update(stem_layers=[1] * n_stages, stem_width=8)
        reduction = 4 * 2 ** (n_stages - 1) * patch
    size = 2 * reduction
    over["img_size"] = size
    return over, (defaults.get("in_chans", 3), size, size)


def _t2t(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    stride = 1
    for _, s, _ in defaults.get("t2t_kernels", ((7, 4, 2), (3, 2, 1), (3, 2, 1))):
        stride *= s
    size = 2 * stride  # a 2x2 token grid
    over = dict(embed_dim=24, depth=2, num_heads=2, token_dim=8, num_classes=NUM_CLASSES, img_size=size)
    return over, (defaults.get("in_chans", 3), size, size)


FAMILIES = {"vit": _vit, "t2t_vit": _t2t}


def tiny(name: str) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """(overrides, input shape C×H×W) for a registered model."""
    family = model_family(name)
    if family not in FAMILIES:
        raise AssertionError(f"no tiny config for family {family!r}: add one to tests/_tiny.py")
    return FAMILIES[family](model_defaults(name))
