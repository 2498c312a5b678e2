"""vitkit -> Hugging Face ``transformers``: the inverse of the ``hf_*`` converters (``vitkit export hf``).

:func:`hf_export` turns a model into an :class:`HFExport` (``config.json``, the weights in the Hub's key layout,
``preprocessor_config.json``, tokenizer files) without writing anything; ``vitkit.tools.export_hf`` writes the
folder and runs :attr:`HFExport.check`, which loads it with ``transformers`` and compares outputs.

Supported: ViT (``ViTForImageClassification``; ``ViTModel`` for a model without classes), Swin
(``SwinForImageClassification`` / ``SwinModel``), MAE (``ViTMAEForPreTraining``), CLIP (``CLIPModel`` +
tokenizer, :mod:`.hf_export_clip`) and ViLT (``ViltForMaskedLM`` / ``ViltForImageAndTextRetrieval`` /
``ViltModel``, :mod:`.hf_export_vilt`). A model that uses a switch the Hugging Face class cannot express (relative or
per-block positions, GAP pooling, layer scale, a hybrid stem, unshifted or pruned windows, ...) is refused with
one :class:`HFExportError` line naming the switch, never written with different outputs. What only changes
behaviour away from the model's own image size (position resampling) or in training (drop path) is exported and
said in :attr:`HFExport.notes`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, VitkitError
from ..layers.attention import Attention
from ..layers.mlp import QuickGELU
from ..layers.patch_embed import PatchEmbed
from ..models.mae import MaskedAutoencoderViT
from ..models.swin import SwinTransformer
from ..models.vit import VisionTransformer
from ..utils import require_extra

StateDict = dict[str, torch.Tensor]
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class HFExportError(ConfigError):
    """The model uses a feature the Hugging Face class cannot express; the message names it."""


class HFParityError(VitkitError):
    """The exported folder, loaded with ``transformers``, does not compute what the vitkit model computes."""


@dataclass
class HFExport:
    """Everything an HF folder holds, in memory: JSON files, weights (Hub key names) and text files."""

    architecture: str  # the transformers class that loads it, e.g. "ViTForImageClassification"
    config: dict[str, Any]
    state: StateDict
    preprocessor: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # extra text files (tokenizer.json, ...)
    notes: list[str] = field(default_factory=list)
    # check(folder, atol) -> [{"output": name, "max_abs_diff": d}, ...]; raises HFParityError above atol
    check: Callable[[Path, float], list[dict[str, Any]]] | None = None


# ---------------------------------------------------------------------------------------------------- helpers
def model_label(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def refuse(model: nn.Module, target: str, problems: list[str]) -> None:
    """One HFExportError line naming every feature ``target`` cannot express (nothing when there is none)."""
    if problems:
        raise HFExportError(f"{model_label(model)}: cannot export to Hugging Face {target}: "
                            f"{'; '.join(problems)} (no counterpart there)")


def hf_act(act: nn.Module) -> str | None:
    """The ``hidden_act`` name of an activation module, or None when transformers has none equal to it."""
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(act))


def blocks_act(blocks: list[nn.Module], what: str, problems: list[str]) -> str:
    """The one ``hidden_act`` of these blocks' MLPs (a problem is recorded when there is none)."""
    names = {hf_act(b.mlp.act) for b in blocks}
    if len(names) != 1 or None in names:
        kinds = sorted({type(b.mlp.act).__name__ for b in blocks})
        problems.append(f"the {what} activation {', '.join(kinds)}")
        return "gelu"
    return names.pop()


def default_scale(attn: nn.Module) -> bool:
    return math.isclose(float(attn.scale), attn.head_dim**-0.5, rel_tol=1e-6)


def tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that owns its memory (safetensors refuses views sharing storage)."""
    return t.detach().to("cpu").contiguous().clone()


def hf_layer(block: nn.Module, hf: str, attention: str, names: dict[str, str],
             parts: tuple[str, str, str] = ("query", "key", "value")) -> StateDict:
    """A vitkit pre-norm block as HF weights at prefix ``hf``: ``qkv`` (rows [q; k; v]) split into
    ``attention.format(part)`` for each of ``parts``; ``names`` maps the other vitkit parameter prefixes to HF's."""
    own = block.state_dict()
    out: StateDict = {}
    for kind in ("weight", "bias"):
        qkv = own.get(f"attn.qkv.{kind}")
        if qkv is not None:
            for part, value in zip(parts, qkv.chunk(3, dim=0)):
                out[f"{hf}{attention.format(part)}.{kind}"] = tensor(value)
        for mine, theirs in names.items():
            if f"{mine}.{kind}" in own:
                out[f"{hf}{theirs}.{kind}"] = tensor(own[f"{mine}.{kind}"])
    return out


BERT_LAYER = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def class_labels(model: nn.Module, num_classes: int) -> dict[str, Any]:
    """``id2label`` / ``label2id`` from the checkpoint's class names (``LABEL_i`` without names: transformers
    reads the class count from ``id2label``)."""
    names = (getattr(model, "pretrained_cfg", {}) or {}).get("class_names")
    if not names or len(names) != num_classes:
        names = [f"LABEL_{i}" for i in range(num_classes)]
    id2label = {str(i): str(n) for i, n in enumerate(names)}
    return {"id2label": id2label, "label2id": {n: int(i) for i, n in id2label.items()}}


def image_processor(model: nn.Module, kind: str, channels: int, size: tuple[int, int],
                    **extra: Any) -> dict[str, Any]:
    """``preprocessor_config.json``: vitkit's evaluation preprocessing (resize to the input size, scale to [0, 1],
    normalise) as an HF image processor of class ``kind``."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in PIL_RESAMPLE:
        raise HFExportError(f"{model_label(model)}: interpolation {interpolation!r} has no PIL resample code "
                            f"({sorted(PIL_RESAMPLE)})")
    mean = [float(v) for v in cfg.get("mean") or (0.5,) * channels]
    std = [float(v) for v in cfg.get("std") or (0.5,) * channels]
    return {"image_processor_type": kind, "do_resize": True, "size": {"height": size[0], "width": size[1]},
            "resample": PIL_RESAMPLE[interpolation], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": mean, "image_std": std, **extra}


def side(value: tuple[int, int]) -> int | list[int]:
    """An HF size field: an int when square, else [h, w]."""
    return int(value[0]) if value[0] == value[1] else [int(value[0]), int(value[1])]


def dtype_name(model: nn.Module) -> str:
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(weight.dtype if weight is not None else torch.float32).removeprefix("torch.")


def load_transformers_class(name: str) -> Any:
    """``transformers.<name>``, or one line saying why it cannot be imported."""
    transformers = require_extra("transformers", "hf", "checking a Hugging Face export")
    try:
        return getattr(transformers, name)
    except Exception as e:  # noqa: BLE001 - transformers' lazy imports raise whatever their dependencies raise
        raise HFParityError(f"cannot import transformers.{name} to check the export ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); skip the check with --no-check") from None


def load_hf(name: str, folder: Path) -> nn.Module:
    """The exported folder loaded by transformers, in fp32 eval mode."""
    return load_transformers_class(name).from_pretrained(str(folder)).float().eval()


def reference(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy of ``model`` in eval mode (the check never changes the caller's model)."""
    return copy.deepcopy(model).float().cpu().eval()


def image_check(m: nn.Module, arch: str, classifier: bool, pooled: bool
                ) -> Callable[[Path, float], list[dict[str, Any]]]:
    """The check of an image model's export: logits for a classifier, else the last hidden state and (``pooled``)
    the pooler output against ``forward_head(pre_logits=True)``; without a pooler the folder is loaded with
    ``add_pooling_layer=False``."""

    def check(folder: Path, atol: float) -> list[dict[str, Any]]:
        ours = reference(m)
        kwargs = {} if classifier or pooled else {"add_pooling_layer": False}
        hf = load_transformers_class(arch).from_pretrained(str(folder), **kwargs).float().eval()
        x = random_images(m.in_chans, m.img_size)
        with torch.no_grad():
            out = hf(pixel_values=x)
            if classifier:
                return compare({"logits": (ours(x), out.logits)}, atol, model_label(m))
            feats = ours.forward_features(x)
            pairs = {"last_hidden_state": (feats, out.last_hidden_state)}
            if pooled:
                pairs["pooler_output"] = (ours.forward_head(feats, pre_logits=True), out.pooler_output)
            return compare(pairs, atol, model_label(m))

    return check


def compare(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], atol: float, what: str) -> list[dict[str, Any]]:
    """Max abs difference of each (vitkit, HF) pair; an HFParityError naming the first one above ``atol``."""
    results = []
    for name, (ours, theirs) in pairs.items():
        if tuple(ours.shape) != tuple(theirs.shape):
            raise HFParityError(f"{what}: {name} has shape {tuple(theirs.shape)} in transformers, "
                                f"{tuple(ours.shape)} in vitkit")
        diff = float((ours.double() - theirs.double()).abs().max()) if ours.numel() else 0.0
        if not math.isfinite(diff) or diff > atol:
            raise HFParityError(f"{what}: transformers' {name} differs from vitkit's by max |Δ| = {diff:.3g} "
                                f"(> atol {atol:g}); the folder was not written")
        results.append({"output": name, "max_abs_diff": diff})
    return results


def random_images(channels: int, size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------- ViT
def vit_problems(m: VisionTransformer, classifier: bool) -> list[str]:
    """The switches of a ViT that HF ViT (and ViTMAE's encoder) cannot express."""
    problems = []
    pe = m.patch_embed
    if not isinstance(pe, PatchEmbed):
        problems.append("a hybrid ResNet stem (stem='resnet')")
    elif pe.stride != pe.patch_size or any(pe.proj.padding):
        problems.append(f"overlapping patches (patch_stride={list(pe.stride)} < patch_size {list(pe.patch_size)})")
    registers = getattr(m, "reg_token", None)
    if registers is not None:
        problems.append(f"register tokens (reg_tokens={registers.shape[1]})")
    if getattr(m, "dist_token", None) is not None:
        problems.append("a distillation token")
    if getattr(m, "no_embed_class", False):
        problems.append("positions for the patches only (no_embed_class=True)")
    if isinstance(getattr(m, "norm_pre", None), nn.LayerNorm):
        problems.append("a LayerNorm before the blocks (pre_norm=True)")
    if not isinstance(m.norm, nn.LayerNorm) or isinstance(m.pre_logits, nn.LayerNorm):
        problems.append("the final LayerNorm after pooling (fc_norm=True)")
    if m.cls_token is None:
        problems.append("no class token (class_token=False)")
    elif m.pool != "cls" and classifier:
        problems.append(f"pool={m.pool!r} (HF ViT classifies the CLS token)")
    if m.pos_kind not in ("learned_1d", "sincos_2d", "none"):
        problems.append(f"pos_embed={m.pos_kind!r} (HF ViT adds one learned 1D table)")
    elif m.pos_placement != "input" and m.pos_kind != "none":
        problems.append(f"positions added before every block (pos_placement={m.pos_placement!r})")
    if any(not isinstance(b.ls1, nn.Identity) for b in m.blocks):
        problems.append(f"layer scale (init_values={m.model_args.get('init_values')})")
    if any(type(b.attn) is not Attention for b in m.blocks):
        problems.append(f"ReLU linear attention (attn_kind={m.model_args.get('attn_kind')!r}; HF ViT has softmax)")
    elif not all(default_scale(b.attn) for b in m.blocks):
        problems.append("a non-default attention scale (qk_scale)")
    if len({b.attn.qkv.bias is None for b in m.blocks}) > 1:
        problems.append("qkv biases in some blocks only")
    return problems


def vit_positions(m: VisionTransformer) -> torch.Tensor:
    """The (1, 1 + h*w, D) table HF adds to [CLS] + patches: learned, MAE's fixed sin-cos, or zeros (none)."""
    dtype = m.cls_token.dtype
    if m.pos_embed is None:
        return torch.zeros(1, m.num_prefix_tokens + m.grid[0] * m.grid[1], m.embed_dim, dtype=dtype)
    return tensor(m.pos_embed.weight).to(dtype)


def vit_notes(m: VisionTransformer) -> list[str]:
    notes = []
    if m.pos_kind != "learned_1d":
        notes.append(f"pos_embed={m.pos_kind!r} is written as HF's (learned) position table; equal at "
                     f"{m.img_size[0]}x{m.img_size[1]}")
    if m.dynamic_img_size:
        notes.append("other image sizes: pass interpolate_pos_encoding=True to transformers (bicubic without "
                     "antialiasing" + (", vitkit resamples with it)" if m.model_args.get("pos_interp_antialias", True)
                                       else ", as this model)"))
    if m.model_args.get("drop_path_rate"):
        notes.append("drop_path_rate is not exported (HF ViT has no drop path; inference is unaffected)")
    return notes


def vit_encoder(m: VisionTransformer, prefix: str) -> StateDict:
    """Embeddings, layers and final norm of a ViT as HF ``{prefix}embeddings...``, ``encoder.layer.i``."""
    proj = m.patch_embed.proj
    state = {
        f"{prefix}embeddings.cls_token": tensor(m.cls_token),
        f"{prefix}embeddings.position_embeddings": vit_positions(m),
        f"{prefix}embeddings.patch_embeddings.projection.weight": tensor(proj.weight),
        f"{prefix}embeddings.patch_embeddings.projection.bias": (
            tensor(proj.bias) if proj.bias is not None else torch.zeros(proj.out_channels, dtype=proj.weight.dtype)),
        f"{prefix}layernorm.weight": tensor(m.norm.weight),
        f"{prefix}layernorm.bias": tensor(m.norm.bias),
    }
    for i, block in enumerate(m.blocks):
        state.update(hf_layer(block, f"{prefix}encoder.layer.{i}.", "attention.attention.{}", BERT_LAYER))
    return state


def vit_config(m: VisionTransformer, problems: list[str]) -> dict[str, Any]:
    """The ``ViTConfig`` fields every ViT-like HF model shares (ViT, ViTMAE's encoder)."""
    first = m.blocks[0]
    patch = m.patch_embed.patch_size if isinstance(m.patch_embed, PatchEmbed) else (1, 1)
    return {
        "hidden_size": m.embed_dim, "num_hidden_layers": len(m.blocks), "num_attention_heads": first.attn.num_heads,
        "intermediate_size": first.mlp.fc1.out_features, "hidden_act": blocks_act(list(m.blocks), "MLP", problems),
        "hidden_dropout_prob": float(m.model_args.get("drop_rate", 0.0)),
        "attention_probs_dropout_prob": float(m.model_args.get("attn_drop_rate", 0.0)),
        "layer_norm_eps": float(getattr(m.norm, "eps", 1e-6)), "image_size": side(m.img_size),
        "patch_size": side(patch),
        "num_channels": m.in_chans, "qkv_bias": first.attn.qkv.bias is not None, "dtype": dtype_name(m),
    }


def export_vit(m: VisionTransformer) -> HFExport:
    classifier = m.num_classes > 0
    arch = "ViTForImageClassification" if classifier else "ViTModel"
    problems = vit_problems(m, classifier)
    representation = isinstance(m.pre_logits, nn.Sequential)
    if representation and classifier:
        problems.append(f"a pre-logits layer before the head (representation_size={m.num_features}; "
                        f"{arch} classifies the CLS token directly)")
    if not classifier and m.pool != "cls" and m.cls_token is not None:
        problems.append(f"pool={m.pool!r} (HF ViTModel's pooler reads the CLS token)")
    config = {"architectures": [arch], "model_type": "vit", **vit_config(m, problems),
              "encoder_stride": m.patch_embed.reduction[0], "pooler_act": "tanh",
              "pooler_output_size": m.num_features}
    refuse(m, arch, problems)
    prefix = "vit." if classifier else ""
    state = vit_encoder(m, prefix)
    notes = vit_notes(m)
    if classifier:
        config.update(class_labels(m, m.num_classes))
        state["classifier.weight"], state["classifier.bias"] = tensor(m.head.weight), tensor(m.head.bias)
    elif representation:
        state["pooler.dense.weight"] = tensor(m.pre_logits[0].weight)
        state["pooler.dense.bias"] = tensor(m.pre_logits[0].bias)
    else:
        notes.append("no pooler weights (the model has no pre-logits layer): load with "
                     "ViTModel.from_pretrained(folder, add_pooling_layer=False); last_hidden_state is exact")
    preprocessor = image_processor(m, "ViTImageProcessor", m.in_chans, m.img_size)

    check = image_check(m, arch, classifier, pooled=classifier or representation)
    return HFExport(arch, config, state, preprocessor, notes=notes, check=check)


# ---------------------------------------------------------------------------------------------------- Swin
def export_swin(m: SwinTransformer) -> HFExport:
    classifier = m.num_classes > 0
    arch = "SwinForImageClassification" if classifier else "SwinModel"
    args = m.model_args
    problems = []
    if m.sparse_stages:
        problems.append(f"sparse token stages (sparse_stages={list(m.sparse_stages)})")
    blocks = [b for stage in m.stages if not stage.sparse for b in stage.blocks]
    if any(b.shift_size != (m.window_size // 2 if j % 2 else 0)
           for stage in m.stages if not stage.sparse for j, b in enumerate(stage.blocks)):
        problems.append("unshifted windows (shift_windows=False)")
    if any(r < 1 for r in m.keep_ratios):
        problems.append(f"window pruning (keep ratios {list(m.keep_ratios)})")
    if not all(default_scale(b.attn) for b in blocks):
        problems.append(f"a non-default attention scale (qk_scale={args.get('qk_scale')})")
    ratio = float(args.get("mlp_ratio", 4.0))
    if any(b.mlp.fc1.out_features != int(b.attn.head_dim * b.attn.num_heads * ratio) for b in blocks):
        problems.append("MLP widths that are not int(width * mlp_ratio)")
    if m.absolute_pos_embed is not None and any(s % m.patch_size for s in m.img_size):
        problems.append(f"absolute positions for an image size {list(m.img_size)} that is not a multiple of the "
                        f"patch size {m.patch_size}")
    config = {
        "architectures": [arch], "model_type": "swin", "image_size": side(m.img_size), "patch_size": m.patch_size,
        "num_channels": m.in_chans, "embed_dim": m.embed_dim, "depths": [len(s.blocks) for s in m.stages],
        "num_heads": [s.blocks[0].attn.num_heads for s in m.stages], "window_size": m.window_size,
        "mlp_ratio": ratio, "qkv_bias": blocks[0].attn.qkv.bias is not None if blocks else True,
        "hidden_dropout_prob": float(args.get("drop_rate", 0.0)),
        "attention_probs_dropout_prob": float(args.get("attn_drop_rate", 0.0)),
        "drop_path_rate": float(args.get("drop_path_rate", 0.0)), "hidden_act": blocks_act(blocks, "MLP", problems),
        "use_absolute_embeddings": m.absolute_pos_embed is not None, "layer_norm_eps": float(m.norm.eps),
        "encoder_stride": m.patch_size * 2 ** (m.num_stages - 1), "dtype": dtype_name(m),
    }
    refuse(m, arch, problems)
    p = "swin." if classifier else ""
    state = {
        f"{p}embeddings.patch_embeddings.projection.weight": tensor(m.patch_embed.weight),
        f"{p}embeddings.patch_embeddings.projection.bias": tensor(m.patch_embed.bias),
        f"{p}embeddings.norm.weight": tensor(m.patch_norm.weight),
        f"{p}embeddings.norm.bias": tensor(m.patch_norm.bias),
        f"{p}layernorm.weight": tensor(m.norm.weight), f"{p}layernorm.bias": tensor(m.norm.bias),
    }
    if m.absolute_pos_embed is not None:  # (1, h, w, C) -> (1, h*w, C)
        state[f"{p}embeddings.position_embeddings"] = tensor(m.absolute_pos_embed.flatten(1, 2))
    for i, stage in enumerate(m.stages):
        for j, block in enumerate(stage.blocks):
            hf = f"{p}encoder.layers.{i}.blocks.{j}."
            state.update(hf_layer(block, hf, "attention.self.{}", BERT_LAYER))
            state[f"{hf}attention.self.relative_position_bias_table"] = tensor(block.attn.relative_position_bias_table)
        if stage.downsample is not None:
            hf = f"{p}encoder.layers.{i}.downsample."
            state[f"{hf}reduction.weight"] = tensor(stage.downsample.reduction.weight)
            state[f"{hf}norm.weight"] = tensor(stage.downsample.norm.weight)
            state[f"{hf}norm.bias"] = tensor(stage.downsample.norm.bias)
    if classifier:
        config.update(class_labels(m, m.num_classes))
        state["classifier.weight"], state["classifier.bias"] = tensor(m.head.weight), tensor(m.head.bias)
    notes = []
    if m.keep_ratio_choices:
        notes.append("keep_ratio_choices (sparsity-aware training) is not exported; inference is dense as in vitkit")
    preprocessor = image_processor(m, "ViTImageProcessor", m.in_chans, m.img_size)

    return HFExport(arch, config, state, preprocessor, notes=notes, check=image_check(m, arch, classifier, True))


# ---------------------------------------------------------------------------------------------------- MAE
def export_mae(m: MaskedAutoencoderViT) -> HFExport:
    arch = "ViTMAEForPreTraining"
    enc = m.encoder
    problems = [] if type(enc) is VisionTransformer else [f"a {type(enc).__name__} encoder"]
    problems += vit_problems(enc, classifier=False)
    if isinstance(enc.pre_logits, nn.Sequential):
        problems.append(f"an encoder pre-logits layer (representation_size={enc.num_features})")
    if enc.img_size[0] != enc.img_size[1]:
        problems.append(f"non-square images (img_size={list(enc.img_size)}: ViTMAE builds square sin-cos tables)")
    dec = list(m.decoder_blocks)
    if dec and (dec[0].attn.qkv.bias is not None) != (enc.blocks[0].attn.qkv.bias is not None):
        problems.append("decoder_qkv_bias different from the encoder's qkv_bias (ViTMAE has one qkv_bias)")
    if any(not isinstance(b.ls1, nn.Identity) for b in dec) or not all(default_scale(b.attn) for b in dec):
        problems.append("a decoder with layer scale or a non-default attention scale")
    config = {"architectures": [arch], "model_type": "vit_mae", **vit_config(enc, problems),
              "decoder_hidden_size": m.decoder_embed.out_features, "decoder_num_hidden_layers": len(dec),
              "decoder_num_attention_heads": dec[0].attn.num_heads if dec else 1,
              "decoder_intermediate_size": dec[0].mlp.fc1.out_features if dec else 1,
              "mask_ratio": float(m.mask_ratio), "norm_pix_loss": bool(m.norm_pix_loss)}
    if dec and blocks_act(dec, "decoder MLP", problems) != config["hidden_act"]:
        problems.append("a decoder activation different from the encoder's")
    eps = {float(n.eps) for n in (m.decoder_norm, *(b.norm1 for b in dec), *(b.norm2 for b in dec))}
    if eps != {config["layer_norm_eps"]}:
        problems.append("decoder LayerNorm eps different from the encoder's")
    refuse(m, arch, problems)
    state = vit_encoder(enc, "vit.")
    state.update({
        "decoder.decoder_embed.weight": tensor(m.decoder_embed.weight),
        "decoder.decoder_embed.bias": tensor(m.decoder_embed.bias),
        "decoder.mask_token": tensor(m.mask_token),
        "decoder.decoder_pos_embed": tensor(m.decoder_pos_embed.weight).to(m.mask_token.dtype),
        "decoder.decoder_norm.weight": tensor(m.decoder_norm.weight),
        "decoder.decoder_norm.bias": tensor(m.decoder_norm.bias),
        "decoder.decoder_pred.weight": tensor(m.decoder_pred.weight),
        "decoder.decoder_pred.bias": tensor(m.decoder_pred.bias),
    })
    for i, block in enumerate(dec):
        state.update(hf_layer(block, f"decoder.decoder_layers.{i}.", "attention.attention.{}", BERT_LAYER))
    notes = [n for n in vit_notes(enc) if not n.startswith("pos_embed='sincos_2d'")]
    preprocessor = image_processor(m, "ViTImageProcessor", enc.in_chans, enc.img_size)

    def check(folder: Path, atol: float) -> list[dict[str, Any]]:
        ours, hf = reference(m), load_hf(arch, folder)
        x = random_images(enc.in_chans, enc.img_size)
        noise = torch.rand(x.shape[0], enc.grid[0] * enc.grid[1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out, mine = hf(pixel_values=x, noise=noise), ours(x, noise=noise)
        return compare({"mask": (mine.mask, out.mask), "logits": (mine.pred, out.logits),
                        "loss": (mine.loss, out.loss)}, atol, model_label(m))

    return HFExport(arch, config, state, preprocessor, notes=notes, check=check)


# ---------------------------------------------------------------------------------------------------- dispatch
def _exporters() -> dict[type, Callable[[Any], HFExport]]:
    from .hf_export_clip import CLIP, export_clip
    from .hf_export_vilt import ViLT, export_vilt

    return {VisionTransformer: export_vit, SwinTransformer: export_swin, MaskedAutoencoderViT: export_mae,
            CLIP: export_clip, ViLT: export_vilt}


def hf_export(model: nn.Module) -> HFExport:
    """The Hugging Face folder of ``model`` in memory (:class:`HFExport`); HFExportError for a model or a feature
    transformers cannot express. Subclasses are refused too: they add what their base class's HF model lacks."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export to Hugging Face needs a vitkit model, got {type(model).__name__}")
    exporters = _exporters()
    exporter = exporters.get(type(model))
    if exporter is None:
        known = ", ".join(c.__name__ for c in exporters)
        raise HFExportError(f"{model_label(model)}: a {type(model).__name__} has no Hugging Face transformers "
                            f"counterpart that vitkit exports to (it exports {known})")
    return exporter(model)
