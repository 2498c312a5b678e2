"""vitkit ViLT -> Hugging Face ``ViltForMaskedLM`` / ``ViltForImageAndTextRetrieval`` / ``ViltModel`` (the inverse
of :mod:`.hf_vilt`).

The class follows the heads the model has: the MLM head -> ``ViltForMaskedLM``, the ranking head ->
``ViltForImageAndTextRetrieval``, neither -> ``ViltModel``. transformers has no ViLT class with both heads, so a
model with both is refused (build or reset it with one). An untied MLM decoder is written with
``tie_word_embeddings=False``. Patch sampling is not exported (``max_image_length=-1``): vitkit samples patches
in training only, transformers whenever ``max_image_length > 0``. The tokenizer travels as for CLIP
(:func:`.hf_export_clip.tokenizer_files`); the image processor is a ``ViltImageProcessor`` resizing the shorter
side to the model's size (vitkit resizes to the model's size: the same for square images).

The check compares outputs that do not depend on the order of the image tokens (transformers shuffles them even
when it keeps them all): the pooled output, the ranking score, the MLM logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.vilt import ViLT
from .hf_export import (
    BERT_LAYER,
    HFExport,
    blocks_act,
    compare,
    default_scale,
    dtype_name,
    hf_act,
    hf_layer,
    image_processor,
    load_hf,
    model_label,
    random_images,
    reference,
    refuse,
    tensor,
)
from .hf_export_clip import tokenizer_files

__all__ = ["ViLT", "export_vilt"]


def export_vilt(m: ViLT) -> HFExport:
    mlm, rank = m.mlm_head is not None, m.rank_output is not None
    arch = "ViltForMaskedLM" if mlm else "ViltForImageAndTextRetrieval" if rank else "ViltModel"
    blocks = list(m.blocks)
    problems = []
    if mlm and rank:
        problems.append("both an MLM head and a ranking head (transformers' ViLT classes hold one each; "
                        "rebuild with mlm_head=False or rank_head=False)")
    if m.img_size[0] != m.img_size[1]:
        problems.append(f"non-square images (img_size={list(m.img_size)}; HF ViLT's position table is square)")
    if any(not isinstance(b.ls1, nn.Identity) or not default_scale(b.attn) for b in blocks):
        problems.append("layer scale or a non-default attention scale")
    act = blocks_act(blocks, "MLP", problems)
    if mlm and hf_act(m.mlm_head.act) != act:
        problems.append("an MLM-head activation different from the blocks'")
    config = {
        "architectures": [arch], "model_type": "vilt", "vocab_size": m.vocab_size,
        "type_vocab_size": m.text_embed.token_type_embeddings.num_embeddings,
        "modality_type_vocab_size": m.modality_embed.num_embeddings, "max_position_embeddings": m.max_text_len,
        "hidden_size": m.embed_dim, "num_hidden_layers": len(blocks), "num_attention_heads": blocks[0].attn.num_heads,
        "intermediate_size": blocks[0].mlp.fc1.out_features, "hidden_act": act,
        "hidden_dropout_prob": float(m.model_args.get("drop_rate", 0.0)),
        "attention_probs_dropout_prob": float(m.model_args.get("attn_drop_rate", 0.0)),
        "layer_norm_eps": float(m.norm.eps), "image_size": m.img_size[0], "patch_size": m.patch_embed.patch_size[0],
        "num_channels": m.in_chans, "qkv_bias": blocks[0].attn.qkv.bias is not None,
        "max_image_length": -1,  # transformers samples patches at inference too when > 0; vitkit only in training
        "tie_word_embeddings": not (mlm and m.mlm_head.decoder is not None),
        "pad_token_id": m.text_embed.word_embeddings.padding_idx, "dtype": dtype_name(m),
    }
    refuse(m, arch, problems)
    p = "" if arch == "ViltModel" else "vilt."
    te = f"{p}embeddings.text_embeddings."
    state = {
        f"{te}word_embeddings.weight": tensor(m.text_embed.word_embeddings.weight),
        f"{te}position_embeddings.weight": tensor(m.text_embed.position_embeddings.weight),
        f"{te}token_type_embeddings.weight": tensor(m.text_embed.token_type_embeddings.weight),
        f"{te}LayerNorm.weight": tensor(m.text_embed.norm.weight),
        f"{te}LayerNorm.bias": tensor(m.text_embed.norm.bias),
        f"{p}embeddings.cls_token": tensor(m.cls_token), f"{p}embeddings.position_embeddings": tensor(m.pos_embed),
        f"{p}embeddings.patch_embeddings.projection.weight": tensor(m.patch_embed.proj.weight),
        f"{p}embeddings.patch_embeddings.projection.bias": tensor(m.patch_embed.proj.bias),
        f"{p}embeddings.token_type_embeddings.weight": tensor(m.modality_embed.weight),
        f"{p}layernorm.weight": tensor(m.norm.weight), f"{p}layernorm.bias": tensor(m.norm.bias),
        f"{p}pooler.dense.weight": tensor(m.pooler.weight), f"{p}pooler.dense.bias": tensor(m.pooler.bias),
    }
    for i, block in enumerate(blocks):
        state.update(hf_layer(block, f"{p}encoder.layer.{i}.", "attention.attention.{}", BERT_LAYER))
    if rank and not mlm:
        state["rank_output.weight"] = tensor(m.rank_output.weight)
        state["rank_output.bias"] = tensor(m.rank_output.bias)
    if mlm:
        head = m.mlm_head
        for theirs, mine in (("transform.dense", head.dense), ("transform.LayerNorm", head.norm)):
            state[f"mlm_score.{theirs}.weight"], state[f"mlm_score.{theirs}.bias"] = (tensor(mine.weight),
                                                                                      tensor(mine.bias))
        state["mlm_score.decoder.bias"] = tensor(head.bias)
        if head.decoder is not None:
            state["mlm_score.decoder.weight"] = tensor(head.decoder.weight)
    notes, files = [], {}
    if m.patch_sampling:
        notes.append(f"patch sampling (max_image_length={m.max_image_length}, training only in vitkit) is not "
                     f"exported: transformers would also sample at inference; max_image_length=-1 keeps every patch")
    tokenizer = m.tokenizer
    if tokenizer is not None:
        files, _ = tokenizer_files(tokenizer, None, m.max_text_len)
    else:
        notes.append("the model carries no tokenizer: no tokenizer files were written")
    preprocessor = image_processor(m, "ViltImageProcessor", m.in_chans, m.img_size,
                                   size_divisor=m.patch_embed.patch_size[0], do_pad=True)
    preprocessor["size"] = {"shortest_edge": m.img_size[0]}

    def check(folder: Path, atol: float) -> list[dict[str, Any]]:
        ours, hf = reference(m), load_hf(arch, folder)
        gen = torch.Generator().manual_seed(3)
        ids = torch.randint(0, m.vocab_size, (2, min(m.max_text_len, 7)), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, ids.shape[1] // 2:] = 0
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=random_images(m.in_chans, m.img_size))
        with torch.no_grad():
            mine = ours(**inputs)
            if arch == "ViltModel":
                return compare({"pooler_output": (mine["pooled"], hf(**inputs).pooler_output)}, atol, model_label(m))
            theirs = hf(**inputs).logits
            ours_out = mine["mlm_logits"] if mlm else mine["itm_score"][:, None]
            return compare({"logits": (ours_out, theirs)}, atol, model_label(m))

    return HFExport(arch, config, state, preprocessor, files, notes, check)
