"""Attention pictures for a trained token model: where in the image did it look?

Three methods, all read from the softmax attention of the backbone blocks (``model.blocks``; the tokens-to-token
module of a T2T-ViT works on other token counts and is left out):

* ``rollout`` (Abnar & Zuidema, 2020): per block, fuse the heads (mean by default), add the identity for the
  residual connection, renormalise the rows, and multiply the blocks together, first block first. The result is
  a row-stochastic (N, N) "joint attention" of the output tokens on the input tokens.
* ``last``: the last block's attention, one map per head (no mixing across layers).
* ``grad`` (Chefer et al., 2021, "generic attention explainability"): per block, the mean over heads of
  relu(dScore/dA ⊙ A) for a target class logit (default: the predicted class), accumulated from R = I by
  R ← R + Ā R, first block first. Class-specific, unlike the other two.

Which output token is explained follows the model's pooling, because that is the token the head reads:

* ``pool='cls'``: the CLS row, over the patch tokens.
* ``pool='gap'`` (with or without a CLS token): the mean over the patch-token rows (the head reads the mean of
  the patch tokens), over the patch tokens; for ``last`` the mean over query patch tokens, per head.

Refused with a :class:`~vitkit.errors.ConfigError` (one line, saying why): models that are not a
:class:`~vitkit.models.TokenClassifier` (Swin attends inside windows, so there is no image-wide attention),
``pool='none'`` (a prediction per token, no single token to explain), and ``grad`` on a model without a
classifier head. MAE and contrastive models (:class:`~vitkit.models.EncoderWrapper`) are explained
through their ``.encoder``, which has no head: ``rollout`` and ``last`` work, ``grad`` is refused.

:func:`explain` returns maps on the patch grid, scaled to [0, 1] per image; :func:`render_overlay` draws one over
an image; :func:`explain_files` is the ``vitkit explain`` command (PNG per image + ``maps.safetensors``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.attention import capture_attention
from ..models import EncoderWrapper, TokenClassifier
from ..utils import atomic_write
from ..viz.attention import attention_rollout, display_size, panel_figure

METHODS = ("rollout", "last", "grad")
SUPPORTED = ("explain supports ViT and T2T-ViT (TokenClassifier) models, and MAE/contrastive models through their "
             "encoder")


# ---------------------------------------------------------------------------- which model, which tokens
def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def explained_model(model: nn.Module) -> TokenClassifier:
    """The token model whose attention is explained: the model itself, or a wrapper's ``.encoder``.

    Anything else is refused with one line saying why: there must be one image-wide softmax attention per
    block over [prefix tokens] + a grid of patch tokens, and a pooled output token to explain.
    """
    name = _name(model)
    if isinstance(model, EncoderWrapper) and isinstance(getattr(model, "encoder", None), TokenClassifier):
        model = model.encoder
    if not isinstance(model, TokenClassifier):
        window = getattr(model, "window_size", None)
        if isinstance(window, int):
            raise ConfigError(f"{name}: attention is computed inside {window}x{window} windows, so there is no "
                              f"image-wide attention to roll out; {SUPPORTED}")
        raise ConfigError(f"{name}: a {type(model).__name__} has no patch tokens on a grid with image-wide "
                          f"attention, so there is nothing to roll out; {SUPPORTED}")
    if model.pool not in ("cls", "gap"):
        raise ConfigError(f"{name}: pool={model.pool!r} predicts per token, so no single output token can be "
                          f"explained; explain needs pool='cls' or pool='gap'")
    return model


def _has_head(model: TokenClassifier) -> bool:
    return isinstance(model.head, nn.Linear) and getattr(model, "num_classes", 0) > 0


def _read_rows(joint: torch.Tensor, model: TokenClassifier) -> torch.Tensor:
    """(B, [heads,] N, N) -> (B, [heads,] n_patches): the row(s) of the token the head reads, over patch keys."""
    p = model.num_prefix_tokens
    if model.pool == "cls":
        return joint[..., 0, p:]
    return joint[..., p:, p:].mean(dim=-2)


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout, no drop-path), then restore every module's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _forward(model: TokenClassifier, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """Output, the blocks' attention maps and the patch grid of one forward (``TokenClassifier``'s two steps)."""
    with capture_attention(model.blocks) as maps:
        tokens, grid = model.embed_tokens(x)
        tokens, _ = model.run_blocks(tokens, grid)
        out = model.forward_head(model.norm(tokens))
    if len(maps) != len(model.blocks):
        raise ConfigError(f"{_name(model)}: its {len(model.blocks)} blocks recorded {len(maps)} attention maps; "
                          f"explain needs one softmax attention map per block")
    return out, list(maps), grid


def _targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Class index per image: the predicted class by default, one int for all images, or one per image."""
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(dim=-1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch or bool(((t < 0) | (t >= classes)).any()):
        raise ConfigError(f"target must be a class index in [0, {classes}) or one per image ({batch}), "
                          f"got {target!r}")
    return t


def _grad_relevance(maps: list[torch.Tensor], score: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s rule: R = I; per block R ← R + mean_heads(relu(∂score/∂A ⊙ A)) R."""
    grads = torch.autograd.grad(score, maps)
    batch, n = maps[0].shape[0], maps[0].shape[-1]
    relevance = torch.eye(n, device=maps[0].device).expand(batch, n, n)
    for attn, grad in zip(maps, grads):
        cam = (grad.float() * attn.detach().float()).clamp(min=0).mean(dim=1)
        relevance = relevance + cam @ relevance
    return relevance


def _explain_raw(model: nn.Module, x: torch.Tensor, method: str, target: int | Sequence[int] | torch.Tensor | None,
                 discard_ratio: float, head_fusion: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unscaled map on the patch grid and the class logits (None for a model without a head)."""
    if method not in METHODS:
        raise ConfigError(f"unknown explain method {method!r}; choose from {', '.join(METHODS)}")
    token_model = explained_model(model)
    has_head = _has_head(token_model)
    if method == "grad" and not has_head:
        raise ConfigError(f"{_name(model)}: method 'grad' needs class logits and this model has no classifier "
                          f"head; use rollout or last")
    if target is not None and method != "grad":
        raise ConfigError(f"target picks the class explained by 'grad'; method {method!r} is not class-specific")
    with _untouched(model), torch.set_grad_enabled(method == "grad"):
        out, maps, grid = _forward(token_model, x)
        logits = out.detach().float() if has_head else None
        if method == "rollout":
            heat = _read_rows(attention_rollout(maps, token_model.num_prefix_tokens, head_fusion, discard_ratio),
                              token_model)
        elif method == "last":
            heat = _read_rows(maps[-1].float(), token_model)
        else:
            chosen = _targets(target, logits)
            score = out.float().gather(1, chosen[:, None]).sum()
            heat = _read_rows(_grad_relevance(maps, score), token_model)
    heat = heat.detach().float()
    return heat.reshape(*heat.shape[:-1], *grid), logits


def _scale01(heat: torch.Tensor, dims: int) -> torch.Tensor:
    """Min-max scale over the last ``dims`` dimensions; a constant map (nothing stands out) becomes 0."""
    flat = heat.flatten(-dims)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    span = hi - lo
    flat = torch.where(span > 1e-6 * hi.abs().clamp(min=1e-12), (flat - lo) / span.clamp(min=1e-30),
                       torch.zeros_like(flat))
    return flat.reshape(heat.shape)


def explain(model: nn.Module, x: torch.Tensor, method: str = "rollout",
            target: int | Sequence[int] | torch.Tensor | None = None, discard_ratio: float = 0.0,
            head_fusion: str = "mean") -> torch.Tensor:
    """Where the model looked, per image of the normalised batch ``x`` (B, C, H, W), in [0, 1].

    Returns (B, h, w) on the patch grid, or (B, heads, h, w) for ``last`` (scaled per image over all heads, so
    heads stay comparable). ``target`` (``grad`` only): a class index, or one per image; default the predicted
    class. ``discard_ratio``/``head_fusion``: see :func:`attention_rollout` (``rollout`` only). The model runs in
    eval mode and is left exactly as it was: training flags restored, no ``.grad`` written, no hooks.
    """
    heat, _ = _explain_raw(model, x, method, target, discard_ratio, head_fusion)
    return _scale01(heat, 3 if method == "last" else 2)


# ---------------------------------------------------------------------------- files and the command
def _unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """File stems, with ``_2``, ``_3``, ... appended where two inputs share one (a/cat.png, b/cat.jpg)."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def explain_files(checkpoint: str | Path | nn.Module, images: Sequence[str | Path],
                  methods: Sequence[str] = ("rollout",), out_dir: str | Path = "explain", topk: int = 3,
                  discard_ratio: float = 0.0) -> list[Path]:
    """Explain image files with a checkpoint (a run or checkpoint folder, or a loaded model).

    Images are read and normalised exactly as ``vitkit predict`` does (``load_image`` + the checkpoint task's
    eval transform). Writes ``<out_dir>/<stem>.png`` per image (the input, then one panel per method, one per
    head for ``last``; titles give the predicted class and probability, ``grad`` explains that class) and
    ``<out_dir>/maps.safetensors`` with keys ``<stem>/<method>``: the maps on the patch grid before scaling to
    [0, 1] (rollout: joint attention; last: (heads, h, w) probabilities; grad: relevance). Returns the paths.
    """
    from ..data.image_folder import load_image
    from .evaluate import _input_spec, load_model, task_for_model

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
    methods = list(dict.fromkeys(methods or ["rollout"]))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown explain method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not images:
        raise ConfigError("no image files given")
    model = checkpoint if isinstance(checkpoint, nn.Module) else load_model(checkpoint)
    token_model = explained_model(model)
    if "grad" in methods and not _has_head(token_model):
        raise ConfigError(f"{_name(model)}: method 'grad' needs class logits and this model has no classifier "
                          f"head; use rollout or last")
    channels, size = _input_spec(model)
    batch = torch.stack([load_image(str(p), channels, size) for p in images])  # BadImageError names the file
    task = task_for_model(model)
    task.setup(model)
    x = task.prepare_batch(batch, train=False)

    results = {m: _explain_raw(model, x, m, None, discard_ratio, "mean") for m in methods}
    logits = next(iter(results.values()))[1]
    probs = logits.softmax(-1) if logits is not None else None
    names = model.pretrained_cfg.get("class_names") or ([str(i) for i in range(probs.shape[-1])]
                                                        if probs is not None else [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tensors: dict[str, torch.Tensor] = {}
    predictions: dict[str, list[list[Any]]] = {}
    for i, (path, stem) in enumerate(zip(images, _unique_stems(images))):
        top: list[tuple[str, float]] = []
        if probs is not None:
            vals, idx = probs[i].topk(min(topk, probs.shape[-1]))
            top = [(str(names[j]), float(v)) for v, j in zip(vals.tolist(), idx.tolist())]
            predictions[stem] = [list(t) for t in top]
        guess = f"\n{top[0][0]} {100 * top[0][1]:.1f}%" if top else ""
        panels: list[tuple[str, torch.Tensor]] = []
        for m in methods:
            raw = results[m][0][i]
            tensors[f"{stem}/{m}"] = raw.contiguous().cpu()
            scaled = _scale01(raw, raw.dim())
            if m == "last":
                panels += [(f"last, head {h}{guess}", scaled[h]) for h in range(scaled.shape[0])]
            else:
                panels.append((f"{m}{guess}", scaled))
        picture = load_image(str(path), channels, display_size(size)).permute(1, 2, 0).numpy()
        picture = picture[..., 0] if picture.shape[-1] == 1 else picture
        summary = ", ".join(f"{n} {100 * p:.1f}%" for n, p in top)
        png = out / f"{stem}.png"
        panel_figure(picture, panels, f"{Path(path).name}" + (f": {summary}" if summary else ""), png)
        written.append(png)
    from safetensors.torch import save_file

    meta = {"methods": ",".join(methods), "model": _name(model), "discard_ratio": str(discard_ratio),
            "predictions": json.dumps(predictions)}
    maps_path = out / "maps.safetensors"
    atomic_write(maps_path, lambda p: save_file(tensors, str(p), metadata=meta))
    written.append(maps_path)
    return written


def _ratio(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_explain_args(p: argparse.ArgumentParser) -> None:
    """``vitkit explain RUN IMAGE... [--method M]... [--out DIR] [--discard-ratio F] [--topk K]``."""
    p.add_argument("checkpoint", metavar="RUN", help="a checkpoint folder or a training run folder "
                                                     "(uses checkpoints/best)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--method", dest="methods", action="append", choices=METHODS, default=None,
                   help="rollout (default), last (one map per head of the last block) or grad (gradient-weighted, "
                        "for the predicted class); repeat for several")
    p.add_argument("--out", default="explain", help="output folder (default: explain/)")
    p.add_argument("--discard-ratio", type=_ratio, default=0.0,
                   help="rollout: zero this fraction of the smallest attention weights per layer (default 0)")
    p.add_argument("--topk", type=_positive, default=3, help="classes named in each picture's title (default 3)")


def run_explain_args(args: argparse.Namespace) -> int:
    """Run ``vitkit explain`` and print the written paths, one a line."""
    for path in explain_files(args.checkpoint, args.images, args.methods or ["rollout"], args.out,
                              topk=args.topk, discard_ratio=args.discard_ratio):
        print(path)
    return 0
