"""Tiny constructor overrides per model family, so registry-wide tests stay fast.

Every family file gets an entry here; a registered model without one fails the registry tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitkit.models import TokenClassifier, model_defaults, model_family, registered_class

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


def _encoder_wrapper(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Models built around a registered encoder (``encoder=<name>``, ``encoder_args``): a tiny encoder."""
    encoder, shape = tiny(defaults["encoder"])
    encoder.pop("num_classes", None)  # wrappers build their encoder without a head
    return dict(encoder_args=encoder), shape


def _mae(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    over, shape = _encoder_wrapper(defaults)
    return dict(over, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), shape


def _simclr(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    encoder, shape = _vit(model_defaults(defaults["encoder"]))
    encoder.pop("num_classes")  # the encoder has no classifier; the projector's width stands in for it
    return dict(encoder_args=encoder, proj_hidden_dim=16, proj_dim=NUM_CLASSES), shape


def _swin(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Two stages: an 8x8 map of 2x2 windows (regular + shifted block), merged to 4x4."""
    size = 8 * defaults.get("patch_size", 4)
    over = dict(embed_dim=8, depths=[2, 1], num_heads=[2, 2], window_size=2, num_classes=NUM_CLASSES, img_size=size)
    return over, (defaults.get("in_chans", 3), size, size)


def _efficientvit(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The official five-stage layout at widths 8-16: the attention stages see a 4x4 map (linear path) and a
    2x2 map (quadratic path)."""
    size = 32 * defaults.get("stem_stride", 2)
    over = dict(widths=[8, 8, 16, 16, 16], depths=[1, 1, 1, 1, 1], dim=8, head_widths=[16, 16],
                num_classes=NUM_CLASSES, img_size=size)
    return over, (defaults.get("in_chans", 3), size, size)


def _resnet(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Two layers of one block at widths 4 and 8 (the first with a projection shortcut, the second strided); the
    family's block and stem, on 16x16 images (ImageNet stem: 8, 4, 2 pixels) or 8x8 (the small stem)."""
    size = 16 if defaults.get("stem", "imagenet") == "imagenet" else 8
    over = dict(layers=[1, 1], widths=[4, 8], stem_width=6, num_classes=NUM_CLASSES, img_size=size)
    return over, (defaults.get("in_chans", 3), size, size)


def _clip(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """CLIP: a 2x2 patch grid, two blocks per tower, a 50-token vocabulary ending in the end-of-text token;
    :func:`call` adds the captions."""
    size = 2 * defaults.get("patch_size", 32)
    over = dict(embed_dim=NUM_CLASSES, img_size=size, vision_width=24, vision_layers=2, vision_heads=2,
                vision_mlp_dim=None, text_width=16, text_layers=2, text_heads=2, text_mlp_dim=None, vocab_size=50,
                context_length=8, eos_token_id=49)
    return over, (defaults.get("in_chans", 3), size, size)


def _vqvae(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """VAR's tokenizer: two levels at GroupNorm's minimum width 32 (8x8 images, 4x4 latent) and four scales, so
    each of the four shared phi convolutions is used and gets a gradient. Its forward is a training step that
    returns (loss, rec, vq_loss) with ``.loss``, like MAE. The single-scale tokenizer keeps one 4x4 scale."""
    scales = [4] if len(defaults.get("patch_nums", ())) == 1 else [1, 2, 3, 4]
    over = dict(ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=4, vocab_size=16, patch_nums=scales)
    return over, (defaults.get("in_channels", 3), 8, 8)


def _var(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    """VAR (not a classifier, see ``call``): scales 1, 2, 3 (L = 14 tokens) over a 4-channel, 16-code tokenizer.
    The "input shape" is that of the teacher-forcing input per sample, (L - 1, c_vae) = (13, 4)."""
    over = dict(depth=2, embed_dim=16, num_heads=2, vocab_size=16, c_vae=4, patch_nums=[1, 2, 3],
                num_classes=NUM_CLASSES)
    return over, (13, 4)


def _hart(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    """HART (VAR + a residual diffusion head, see ``call``): VAR's tiny transformer and a one-block, width-16 head."""
    over, shape = _var(defaults)
    return dict(over, diff_width=16, diff_depth=1, diffusion_batch_mul=1), shape


def _ar(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """models/ar.py, the token generators (not classifiers, see ``call``): two blocks of width 16 over a 3x3 map of
    16 codes; their "input shape" is that of one code map, (9,), drawn as floats and turned into codes by ``call``."""
    over = dict(depth=2, embed_dim=16, num_heads=2, vocab_size=16, grid_size=3, num_classes=NUM_CLASSES,
                image_size=None)
    return over, (9,)


VILT_VOCAB = 40


def _vilt(defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """ViLT (text + image, not a classifier, see ``call``): a 2x2 patch grid, 8 text tokens, a 40-word vocabulary."""
    size = 2 * defaults.get("patch_size", 32)
    over = dict(embed_dim=24, depth=2, num_heads=2, mlp_dim=None, vocab_size=VILT_VOCAB, max_text_len=8,
                img_size=size)
    return over, (defaults.get("in_chans", 3), size, size)


FAMILIES = {"vit": _vit, "swin": _swin, "efficientvit": _efficientvit, "vilt": _vilt, "clip": _clip, "t2t_vit": _t2t,
            "mae": _mae, "simclr": _simclr, "vqvae": _vqvae, "var": _var,
            "hart": _hart, "ar": _ar, "resnet": _resnet}


def is_classifier(name: str) -> bool:
    """Registered models with the classifier interface (``forward_features`` + ``forward_head``, a tensor out);
    MAE returns a loss, predictions and a mask instead."""
    cls = registered_class(name)
    return cls is None or issubclass(cls, TokenClassifier) or all(
        hasattr(cls, m) for m in ("forward_features", "forward_head", "forward_intermediates"))


def tiny(name: str) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """(overrides, input shape C×H×W) for a registered model."""
    family, defaults = model_family(name), model_defaults(name)
    if family in FAMILIES:
        return FAMILIES[family](defaults)
    if "encoder" in defaults:
        return _encoder_wrapper(defaults)
    raise AssertionError(f"no tiny config for family {family!r}: add one to tests/_tiny.py")


class _Outputs(tuple):
    """A dict output in the shape the registry tests read (a tuple of tensors with ``.loss``, like MAE's)."""

    loss: torch.Tensor


def call(model: torch.nn.Module, x: torch.Tensor):
    """``model(x)`` for an image batch ``x``. CLIP also gets seeded captions ending in its end-of-text token; ViLT
    gets 8 seeded text ids (the second text padded after 5) and returns its float outputs as a tuple whose
    ``loss`` reaches every head (ITM score, MLM logits)."""
    from vitkit.models import CLIP

    if isinstance(model, CLIP):
        ids = torch.randint(0, model.vocab_size, (x.shape[0], model.context_length),
                            generator=torch.Generator().manual_seed(2))
        ids[:, -1] = model.eos_token_id
        return model(x, ids)
    name = getattr(model, "model_name", None)
    if name is not None and model_family(name) == "var":  # x is the teacher-forcing input; seeded class ids
        labels = torch.randint(0, NUM_CLASSES + 1, (x.shape[0],), generator=torch.Generator().manual_seed(0))
        return model(labels, x)
    if name is not None and model_family(name) == "hart":  # VAR's input plus seeded tokens and residual: both losses
        g = torch.Generator().manual_seed(0)
        B, pn = x.shape[0], model.patch_nums[-1]
        labels = torch.randint(0, NUM_CLASSES + 1, (B,), generator=g)
        gt_idx = torch.randint(0, model.vocab_size, (B, model.L), generator=g)
        residual = torch.randn(B, model.c_vae, pn, pn, generator=g)
        ce, diff = model.training_loss(labels, x, gt_idx, residual)
        result = _Outputs((ce, diff))
        result.loss = ce + diff
        return result
    if name is not None and model_family(name) == "ar" and hasattr(model, "sample"):  # codes from x; seeded labels
        codes = (x.abs() * 1000).long() % model.vocab_size
        labels = torch.randint(0, NUM_CLASSES + 1, (x.shape[0],), generator=torch.Generator().manual_seed(0))
        return model(codes, labels)  # GeneratorOutput: (loss, logits, targets, mask, perm) with .loss
    if name is None or model_family(name) != "vilt":
        return model(x)
    ids = torch.randint(1, VILT_VOCAB, (x.shape[0], 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1:, 5:] = 0
    out = model(ids, mask, pixel_values=x)
    result = _Outputs(v for v in out.values() if torch.is_tensor(v) and v.is_floating_point())
    result.loss = out["mlm_logits"].logsumexp(-1).mean() + out["itm_score"].mean()
    return result


# ---------------------------------------------------------------------------- tiny checkpoints the tools serve
def save_tiny_classifier_run(run) -> None:
    """A tiny untrained Fashion-MNIST ViT as training leaves it: ``run/checkpoints/best`` (what serve, predict and
    the benchmarks load)."""
    import vitkit

    torch.manual_seed(0)
    vitkit.create_model("vit_fmnist_tiny", embed_dim=24, depth=2, num_heads=2).save_pretrained(
        Path(run) / "checkpoints" / "best")


def save_tiny_clip(folder) -> None:
    """A tiny zero-shot CLIP checkpoint with its own tokenizer (task ``clip``), saved to ``folder``."""
    import vitkit
    from vitkit.data.captions import train_tokenizer

    tok = train_tokenizer(["a shirt on the left", "a bag on the right", "a coat"], vocab_size=80)
    torch.manual_seed(0)
    clip = vitkit.create_model("clip_fmnist_tiny", vision_width=24, vision_layers=1, vision_heads=2, text_width=16,
                               text_layers=1, text_heads=2, vocab_size=80, eos_token_id=tok.token_to_id("[SEP]"),
                               tokenizer=tok.to_str())
    clip.pretrained_cfg = {**clip.pretrained_cfg, "task": "clip"}
    clip.save_pretrained(folder)


def save_tiny_var(root) -> None:
    """A tiny VAR generator as training leaves it, in ``root / "var"``, with its tokenizer in ``root / "vq"`` (the
    recipe beside the weights names the task and the tokenizer)."""
    import yaml

    import vitkit
    from vitkit.models.vqvae import MultiScaleVQVAE

    vq = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, in_channels=1, patch_nums=(1, 2, 4))
    MultiScaleVQVAE(**vq).eval().save_pretrained(root / "vq")
    args = dict(depth=2, embed_dim=32, num_heads=2, vocab_size=16, c_vae=4, patch_nums=[1, 2, 4])
    var = vitkit.create_model("var_fmnist_tiny", **args)
    var.pretrained_cfg = {**var.pretrained_cfg, "mean": (0.5,), "std": (0.5,), "input_size": (1, 8, 8)}
    var.save_pretrained(root / "var")
    (root / "var" / "train_config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "var_fmnist_tiny", "args": args},
         "task": {"name": "var", "args": {"tokenizer": str(root / "vq")}}, "data": {"name": "digits"}}))
