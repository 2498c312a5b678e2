"""vitkit CLIP -> Hugging Face ``CLIPModel`` + its tokenizer and image processor (the inverse of :mod:`.hf_clip`).

The weights: q/k/v split from vitkit's fused ``qkv``, each tower with its own ``hidden_act`` and
``layer_norm_eps`` (read from the modules, so shared and per-tower settings both export). ``logit_scale`` is
written as vitkit uses it, clamped at ln 100 (transformers does not clamp), so the logits agree.

The tokenizer (the ``tokenizers`` one the model carries, or ``tokenizer.json`` beside a converted checkpoint) is
written as ``tokenizer.json`` without its truncation and padding settings (transformers sets those per call;
``model_max_length`` is the text context) plus ``tokenizer_config.json`` / ``special_tokens_map.json``. A CLIP
BPE tokenizer is declared ``CLIPTokenizer``; any other (vitkit's WordPiece caption tokenizers) is declared
``PreTrainedTokenizerFast``, which transformers loads verbatim: ``CLIPTokenizer`` would rebuild a BPE pipeline
from the vocabulary and change the ids. The image processor is a ``CLIPImageProcessor`` that resizes to the
model's size without a centre crop, as vitkit evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip import CLIP, LEGACY_EOS_TOKEN_ID, LOGIT_SCALE_MAX
from .hf_export import (
    HFExport,
    HFParityError,
    blocks_act,
    compare,
    default_scale,
    dtype_name,
    hf_layer,
    image_processor,
    load_hf,
    load_transformers_class,
    model_label,
    random_images,
    reference,
    refuse,
    tensor,
)

CLIP_LAYER = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
PROBE_TEXTS = ("a photo of a bag", "Two SHIRTS, on the left!", "an ankle boot")
__all__ = ["CLIP", "export_clip"]


def _tower_eps(norms: list[nn.LayerNorm], what: str, problems: list[str]) -> float:
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1:
        problems.append(f"several LayerNorm eps in the {what} tower ({sorted(eps)})")
    return max(eps)


def _tower_problems(blocks: list[nn.Module], what: str) -> list[str]:
    problems = []
    if any(not isinstance(b.ls1, nn.Identity) for b in blocks):
        problems.append(f"layer scale in the {what} tower")
    if not all(default_scale(b.attn) for b in blocks):
        problems.append(f"a non-default attention scale in the {what} tower")
    if any(b.attn.qkv.bias is None or b.attn.proj.bias is None for b in blocks):
        problems.append(f"attention without biases in the {what} tower")
    return problems


def _layers(blocks: list[nn.Module], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, block in enumerate(blocks):
        out.update(hf_layer(block, f"{prefix}encoder.layers.{i}.", "self_attn.{}_proj", CLIP_LAYER, ("q", "k", "v")))
    return out


# ---------------------------------------------------------------------------------------------------- tokenizer
def _special_tokens(data: dict[str, Any], vocab: dict[str, int], eos_token_id: int | None) -> dict[str, str]:
    """The special tokens transformers needs, named from the tokenizer itself (``eos_token_id``: the token the
    model pools at, None for a model that pools at none)."""
    by_id = {i: t for t, i in vocab.items()}
    if eos_token_id is None:
        eos = next((t for t in ("<|endoftext|>", "[SEP]") if t in vocab), None)
    elif eos_token_id == LEGACY_EOS_TOKEN_ID:  # pooled at the highest id: OpenAI's <|endoftext|> is the last token
        eos = "<|endoftext|>" if "<|endoftext|>" in vocab else by_id[max(by_id)]
    else:
        eos = by_id.get(eos_token_id)
    tokens = {"eos_token": eos}
    bos = next((t for t in ("<|startoftext|>", "[CLS]") if t in vocab), None)
    unk = (data.get("model") or {}).get("unk_token")
    padding = data.get("padding") or {}
    pad = padding.get("pad_token") if padding.get("pad_token") in vocab else ("[PAD]" if "[PAD]" in vocab else eos)
    tokens.update(bos_token=bos, unk_token=unk if unk in vocab else None, pad_token=pad)
    if "[SEP]" in vocab and "[CLS]" in vocab:
        tokens.update(sep_token="[SEP]", cls_token="[CLS]")
    if "[MASK]" in vocab:
        tokens["mask_token"] = "[MASK]"
    return {k: v for k, v in tokens.items() if v is not None}


def tokenizer_files(tokenizer: Any, eos_token_id: int | None, context_length: int
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """(files, special tokens) that let ``AutoTokenizer`` / ``CLIPProcessor`` tokenize exactly as ``tokenizer``."""
    data = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = _special_tokens(data, vocab, eos_token_id)
    data["truncation"], data["padding"] = None, None
    model = data.get("model") or {}
    clip_bpe = model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>" and "<|endoftext|>" in vocab
    config = {"tokenizer_class": "CLIPTokenizer" if clip_bpe else "PreTrainedTokenizerFast",
              "model_max_length": context_length, "clean_up_tokenization_spaces": False, **special}
    files = {"tokenizer.json": json.dumps(data, ensure_ascii=False),
             "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
             "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n"}
    return files, special


def plain_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` without truncation and padding, to compare ids with transformers' defaults."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


# ---------------------------------------------------------------------------------------------------- CLIP
def export_clip(m: CLIP) -> HFExport:
    arch = "CLIPModel"
    visual, text = m.visual, m.text
    vblocks, tblocks = list(visual.blocks), list(text.blocks)
    problems = _tower_problems(vblocks, "vision") + _tower_problems(tblocks, "text")
    if visual.img_size[0] != visual.img_size[1]:
        problems.append(f"non-square images (img_size={list(visual.img_size)}; HF CLIP's image_size is one side)")
    if not isinstance(visual.norm_pre, nn.LayerNorm):
        problems.append("no LayerNorm before the vision blocks (HF CLIP's pre_layrnorm)")
    if visual.pos_kind != "learned_1d" or visual.pos_placement != "input" or visual.pool != "cls":
        problems.append(f"vision positions {visual.pos_kind!r}/{visual.pos_placement!r} or pool {visual.pool!r}")
    vision_norms = [visual.norm, *([visual.norm_pre] if isinstance(visual.norm_pre, nn.LayerNorm) else []),
                    *(n for b in vblocks for n in (b.norm1, b.norm2))]
    text_norms = [text.norm, *(n for b in tblocks for n in (b.norm1, b.norm2))]
    logit_scale = float(m.logit_scale.detach())
    notes = []
    if logit_scale > LOGIT_SCALE_MAX:
        notes.append(f"logit_scale {logit_scale:.6g} is written clamped at ln 100 = {LOGIT_SCALE_MAX:.6g}, the value "
                     f"vitkit uses (transformers does not clamp)")
        logit_scale = LOGIT_SCALE_MAX
    tokenizer = m.tokenizer
    files, special = ({}, {})
    if tokenizer is not None:
        files, special = tokenizer_files(tokenizer, m.eos_token_id, m.context_length)
    else:
        notes.append("the model carries no tokenizer: no tokenizer files were written")
    vocab = tokenizer.get_vocab(with_added_tokens=True) if tokenizer is not None else {}
    token_id = lambda name: vocab.get(special.get(name)) if special.get(name) else None  # noqa: E731
    text_config = {
        "model_type": "clip_text_model", "vocab_size": m.vocab_size, "hidden_size": text.width,
        "intermediate_size": tblocks[0].mlp.fc1.out_features, "num_hidden_layers": len(tblocks),
        "num_attention_heads": tblocks[0].attn.num_heads, "max_position_embeddings": m.context_length,
        "hidden_act": blocks_act(tblocks, "text MLP", problems), "layer_norm_eps": _tower_eps(text_norms, "text",
                                                                                              problems),
        "eos_token_id": m.eos_token_id, "bos_token_id": token_id("bos_token"), "pad_token_id": token_id("pad_token"),
        "projection_dim": m.embed_dim,
    }
    vision_config = {
        "model_type": "clip_vision_model", "hidden_size": visual.embed_dim,
        "intermediate_size": vblocks[0].mlp.fc1.out_features, "num_hidden_layers": len(vblocks),
        "num_attention_heads": vblocks[0].attn.num_heads, "num_channels": visual.in_chans,
        "image_size": visual.img_size[0], "patch_size": visual.patch_embed.patch_size[0],
        "hidden_act": blocks_act(vblocks, "vision MLP", problems),
        "layer_norm_eps": _tower_eps(vision_norms, "vision", problems), "projection_dim": m.embed_dim,
    }
    refuse(m, arch, problems)
    config = {"architectures": [arch], "model_type": "clip", "projection_dim": m.embed_dim,
              "logit_scale_init_value": logit_scale, "text_config": text_config, "vision_config": vision_config,
              "dtype": dtype_name(m)}
    v, t = "vision_model.", "text_model."
    state = {
        f"{v}embeddings.class_embedding": tensor(visual.cls_token.reshape(-1)),
        f"{v}embeddings.patch_embedding.weight": tensor(visual.patch_embed.proj.weight),
        f"{v}embeddings.position_embedding.weight": tensor(visual.pos_embed.weight[0]),
        "visual_projection.weight": tensor(visual.head.weight),
        f"{t}embeddings.token_embedding.weight": tensor(text.embed.token_embed.weight),
        f"{t}embeddings.position_embedding.weight": tensor(text.embed.pos_embed.weight),
        "text_projection.weight": tensor(m.text_projection.weight),
        "logit_scale": torch.tensor(logit_scale, dtype=m.logit_scale.dtype),
    }
    for kind in ("weight", "bias"):
        state[f"{v}pre_layrnorm.{kind}"] = tensor(getattr(visual.norm_pre, kind))
        state[f"{v}post_layernorm.{kind}"] = tensor(getattr(visual.norm, kind))
        state[f"{t}final_layer_norm.{kind}"] = tensor(getattr(text.norm, kind))
    state.update(_layers(vblocks, v))
    state.update(_layers(tblocks, t))
    if visual.dynamic_img_size:
        notes.append("other image sizes: pass interpolate_pos_encoding=True to transformers")
    size = tuple(visual.img_size)
    preprocessor = image_processor(m, "CLIPImageProcessor", visual.in_chans, size, do_center_crop=False,
                                   crop_size={"height": size[0], "width": size[1]},
                                   do_convert_rgb=visual.in_chans == 3)

    def check(folder: Path, atol: float) -> list[dict[str, Any]]:
        ours, hf = reference(m), load_hf(arch, folder)
        x = random_images(visual.in_chans, size)
        ids, mask = _probe_ids(m)
        with torch.no_grad():
            out = hf(input_ids=ids, pixel_values=x, attention_mask=mask)
            emb = ours(x, ids, mask, embeddings=True)
            logits = ours(x, ids, mask).logits_per_image
        results = compare({"image_embeds": (F.normalize(emb.image_embeds, dim=-1), out.image_embeds),
                           "text_embeds": (F.normalize(emb.text_embeds, dim=-1), out.text_embeds),
                           "logits_per_image": (logits, out.logits_per_image)}, atol, model_label(m))
        if tokenizer is not None:
            theirs = load_transformers_class("AutoTokenizer").from_pretrained(str(folder))
            plain = plain_tokenizer(tokenizer)
            for text_ in PROBE_TEXTS:
                a, b = plain.encode(text_).ids, list(theirs(text_)["input_ids"])
                if a != b:
                    raise HFParityError(f"{model_label(m)}: the exported tokenizer gives {b} for {text_!r}, vitkit's "
                                        f"{a}; the folder was not written")
            results.append({"output": f"tokenizer ids ({len(PROBE_TEXTS)} texts)", "max_abs_diff": 0.0})
        return results

    return HFExport(arch, config, state, preprocessor, files, notes, check)


def _probe_ids(m: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random token sequences ending in the end-of-text token, the second one padded."""
    length = min(m.context_length, 8)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, m.vocab_size, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    if m.eos_token_id != LEGACY_EOS_TOKEN_ID:
        ids[ids == m.eos_token_id] = (m.eos_token_id + 1) % m.vocab_size
        ids[0, -1] = m.eos_token_id
        ids[1, length // 2] = m.eos_token_id
        mask[1, length // 2 + 1:] = 0
    return ids, mask
