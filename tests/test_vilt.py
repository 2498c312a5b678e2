"""ViLT: parity with Hugging Face ``ViltForImageAndTextRetrieval`` / ``ViltForMaskedLM`` (tiny random configs,
fp32), IPOT against the official ViLT reference vectors, the k >= 1 generalisation, the converter, patch sampling,
checkpoints and the registered configurations."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.errors import CheckpointError, InputShapeError
from vitkit.layers.ot import cost_matrix_cosine, ipot, optimal_transport_dist, trace
from vitkit.models.vilt import ViLT, wpa_distance

# Data-only reference vectors made with the official code (see shared/reference/README.md). A missing folder
# is a failure, not a skip: parity must be checked, not silently dropped.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vilt_ipot"


def _reference(folder: Path = REFERENCE) -> dict[str, torch.Tensor]:
    path = folder / "vilt_ipot.safetensors"
    if not path.is_file():
        pytest.fail(f"IPOT reference vectors not found: expected {path} (see shared/reference/README.md, "
                    f"section vilt_ipot/)")
    return load_file(str(path))


def _case(ref: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith(f"case{i}.")}


def _ipot_inputs(c: dict[str, torch.Tensor]):
    """What optimal_transport_dist hands to ipot: the masked cost, lengths and pads."""
    tp, ip = c["txt_pad"], c["img_pad"]
    joint = tp.unsqueeze(-1) | ip.unsqueeze(-2)
    cost = cost_matrix_cosine(c["txt_emb"], c["img_emb"]).masked_fill(joint, 0)
    return cost, (~tp).sum(1).float(), tp, (~ip).sum(1).float(), ip, joint


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- IPOT
def test_missing_reference_fails_with_its_path(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="nowhere"):
        _reference(tmp_path / "nowhere")


@pytest.mark.parametrize("i", [0, 1, 2])
def test_ipot_matches_the_official_reference(i):
    c = _case(_reference(), i)
    cost, tl, tp, il, ip, joint = _ipot_inputs(c)
    assert _max_diff(cost, c["cost"]) <= 1e-5
    T = ipot(cost, tl, tp, il, ip, joint, 0.5, 50, 1)
    assert T.shape == c["T"].shape  # (B, N, M): image x text
    assert _max_diff(T, c["T"]) <= 1e-5
    assert _max_diff(trace(cost.matmul(T)), c["distance"]) <= 1e-5
    txt, img = c["txt_emb"].clone().requires_grad_(), c["img_emb"]
    dist = optimal_transport_dist(txt, img, tp, ip)  # defaults: beta 0.5, 50 iterations, k 1
    assert _max_diff(dist, c["distance"]) <= 1e-5
    dist.sum().backward()  # differentiable through the cost, the plan is a constant
    assert torch.isfinite(txt.grad).all() and txt.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 5])
def test_ipot_with_several_inner_steps_gives_a_valid_plan(k):
    """k > 1 (the official code fails with a shape error there): a transport plan with the right marginals,
    zero on padded pairs, and within the k = 1 result's convergence error of it."""
    for i in range(3):
        c = _case(_reference(), i)
        cost, tl, tp, il, ip, joint = _ipot_inputs(c)
        T = ipot(cost, tl, tp, il, ip, joint, 0.5, 50, k)
        assert (T >= 0).all() and (T[joint.transpose(1, 2)] == 0).all()
        # σ is updated last, so the text marginal is exact; the image marginal has converged
        torch.testing.assert_close(T.sum(1), (~tp).float() / tl[:, None], atol=1e-6, rtol=0)
        torch.testing.assert_close(T.sum(2), (~ip).float() / il[:, None], atol=1e-4, rtol=0)
        assert _max_diff(trace(cost.matmul(T)), c["distance"]) <= 1e-4


def test_one_proximal_step_with_many_inner_steps_is_sinkhorn():
    """From T = 1 the first proximal step is entropic OT with kernel exp(-C/beta): k inner updates are Sinkhorn
    iterations, so enough of them reach an independent float64 Sinkhorn solution; one does not."""
    c = _case(_reference(), 2)  # CLS/SEP-style masks at both ends
    cost, tl, tp, il, ip, joint = _ipot_inputs(c)
    K = torch.exp(-cost.double() / 0.5).masked_fill(joint, 0)
    a, b = (~tp).double() / tl[:, None], (~ip).double() / il[:, None]
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(500):
        u = torch.where(~tp, a / (K @ v[..., None])[..., 0], 0.0)
        v = torch.where(~ip, b / (K.transpose(1, 2) @ u[..., None])[..., 0], 0.0)
    sinkhorn = (u[..., None] * K * v[:, None, :]).transpose(1, 2)
    assert _max_diff(ipot(cost, tl, tp, il, ip, joint, 0.5, 1, 30).double(), sinkhorn) <= 1e-6
    assert _max_diff(ipot(cost, tl, tp, il, ip, joint, 0.5, 1, 1).double(), sinkhorn) > 1e-4


@pytest.mark.parametrize("k", [1, 3])
def test_ipot_converges_to_the_exact_transport_cost(k):
    """IPOT's proximal steps converge to the unregularised optimum. With n words, n patches and uniform weights
    that optimum is the best one-to-one assignment (Birkhoff), found here by trying all 5! of them."""
    g = torch.Generator().manual_seed(3)
    txt, img = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    cost = cost_matrix_cosine(txt, img)
    perms = torch.tensor(list(itertools.permutations(range(5))))
    best = cost[:, torch.arange(5), perms].mean(-1).min(-1).values  # (B,)
    coarse = optimal_transport_dist(txt, img, pad, pad, iteration=50, k=k)
    fine = optimal_transport_dist(txt, img, pad, pad, iteration=500, k=k)
    assert (fine >= best - 1e-5).all() and (fine <= coarse + 1e-6).all()
    assert _max_diff(fine, best) <= 1e-4


def test_ipot_rejects_k_zero():
    c = _case(_reference(), 0)
    with pytest.raises(ValueError, match="k >= 1"):
        ipot(*_ipot_inputs(c), 0.5, 50, 0)


# ---------------------------------------------------------------------------- Hugging Face parity
transformers = pytest.importorskip("transformers")
from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltForMaskedLM, ViltModel  # noqa: E402

from vitkit.convert.hf_vilt import convert_hf_vilt, load_hf_vilt  # noqa: E402

TINY = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, vocab_size=50,
            max_position_embeddings=12, image_size=32, patch_size=8)
# another layer setup: 1-channel images, no qkv bias, tanh GELU, eps 1e-6, three modality types (NLVR2)
OTHER = dict(TINY, num_channels=1, qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-6,
             modality_type_vocab_size=3, type_vocab_size=3)


def _hf_model(cls, **kw):
    torch.manual_seed(0)
    model = cls(ViltConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial weights: HF's init has zero biases and unit norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _inputs(channels: int, size: tuple[int, int], padded: bool, type_ids: bool = False):
    """Two texts (the second padded), two images; with ``padded`` the second image (and for wide batches the
    first too) fill only a top-left part of the batch, as ViltProcessor pads images of different sizes."""
    g = torch.Generator().manual_seed(sum(size))
    ids = torch.randint(1, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    pixels = torch.randn(2, channels, *size, generator=g)
    pixel_mask = None
    if padded:
        pixel_mask = torch.ones(2, *size, dtype=torch.long)
        pixel_mask[1, size[0] - 8:] = 0
        pixel_mask[1, :, size[1] - 16:] = 0
        pixel_mask[0, :, size[1] - 8:] = 0
    types = torch.randint(0, 3, (2, 7), generator=g) if type_ids else None
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels, pixel_mask=pixel_mask)


def _run_hf(model, inputs, seed: int = 0, **kw):
    """HF output + the (row, col) of its image tokens. HF shuffles the patch order (torch.multinomial) even when
    it keeps every patch; visual_embed is its first draw, so the same seed reproduces the order."""
    base = model if isinstance(model, ViltModel) else model.vilt
    mask = inputs["pixel_mask"]
    if mask is None:
        mask = torch.ones(inputs["pixel_values"].shape[0], *inputs["pixel_values"].shape[-2:], dtype=torch.long)
    with torch.no_grad():
        torch.manual_seed(seed)
        _, _, (patch_index, _) = base.embeddings.visual_embed(inputs["pixel_values"], mask, max_image_length=-1)
        torch.manual_seed(seed)
        out = model(**inputs, output_hidden_states=True, **kw)
    return out, patch_index


def _in_hf_order(ours: torch.Tensor, n_text: int, patch_index: torch.Tensor, width: int) -> torch.Tensor:
    """Our (text + [CLS] + every grid patch) tokens re-ordered like HF's (text + [CLS] + its chosen patches)."""
    flat = patch_index[..., 0] * width + patch_index[..., 1]
    patches = ours[:, n_text + 1:].gather(1, flat[..., None].expand(-1, -1, ours.shape[-1]))
    return torch.cat([ours[:, :n_text + 1], patches], dim=1)


CASES = {  # (HF class, config, image sizes with padding flags, token type ids)
    "retrieval": (ViltForImageAndTextRetrieval, TINY, [((32, 48), True), ((40, 40), False), ((24, 24), True)],
                  False),
    "mlm": (ViltForMaskedLM, TINY, [((32, 48), True), ((40, 40), False)], False),
    "mlm_other_layers": (ViltForMaskedLM, OTHER, [((48, 32), True)], True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_parity(tmp_path, name):
    cls, cfg, sizes, type_ids = CASES[name]
    hf = _hf_model(cls, **cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_vilt(tmp_path / "hf").eval()
    assert (ours.rank_output is not None) == (cls is ViltForImageAndTextRetrieval)
    assert (ours.mlm_head is not None) == (cls is ViltForMaskedLM)
    for size, padded in sizes:
        inputs = _inputs(cfg.get("num_channels", 3), size, padded, type_ids)
        ref, patch_index = _run_hf(hf, inputs)
        with torch.no_grad():
            out = ours(**inputs, output_hidden_states=True)
        if cls is ViltForImageAndTextRetrieval:
            assert _max_diff(ref.logits[:, 0], out["itm_score"]) <= 1e-5
            with torch.no_grad():
                assert _max_diff(ref.logits[:, 0], ours.itm_score(**inputs)) <= 1e-5
        else:
            assert _max_diff(ref.logits, out["mlm_logits"]) <= 1e-5
            with torch.no_grad():
                assert _max_diff(ref.logits, ours.mlm_logits(**inputs)) <= 1e-5
        width = size[1] // cfg["patch_size"]
        assert len(ref.hidden_states) == len(out["hidden_states"]) == cfg["num_hidden_layers"] + 1
        for i, (theirs, mine) in enumerate(zip(ref.hidden_states, out["hidden_states"])):
            assert _max_diff(theirs, _in_hf_order(mine, 7, patch_index, width)) <= 1e-5, f"hidden state {i}"
        # the final features and the pooled output, from HF's bare model
        base, patch_index = _run_hf(hf.vilt, inputs)
        feats = torch.cat([out["text_feats"], out["image_feats"]], dim=1)
        assert _max_diff(base.last_hidden_state, _in_hf_order(feats, 7, patch_index, width)) <= 1e-5
        assert _max_diff(base.pooler_output, out["pooled"]) <= 1e-5


def test_hf_second_image_type_and_bare_model(tmp_path):
    """ViltModel (no heads) converts; NLVR2's image_token_type_idx=2 selects the third modality embedding."""
    hf = _hf_model(ViltModel, **OTHER)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}')
    ours = convert_hf_vilt(tmp_path / "hf", tmp_path / "ours").eval()
    assert ours.rank_output is None and ours.mlm_head is None
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"model": {"type": "WordPiece"}}'
    inputs = _inputs(1, (32, 32), True)
    ref, patch_index = _run_hf(hf, inputs, image_token_type_idx=2)
    loaded = vitkit.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        out = loaded(**inputs, image_token_type_idx=2)
    feats = torch.cat([out["text_feats"], out["image_feats"]], dim=1)
    assert _max_diff(ref.last_hidden_state, _in_hf_order(feats, 7, patch_index, 4)) <= 1e-5
    assert _max_diff(ref.pooler_output, out["pooled"]) <= 1e-5
    assert "itm_score" not in out and "mlm_logits" not in out


def test_in_memory_state_dict_and_untied_decoder(tmp_path):
    """torch.save(model.state_dict()) carries the tied decoder weight (Hub files drop it); a decoder that differs
    from the word table converts into an untied head."""
    hf = _hf_model(ViltForMaskedLM, **TINY)
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    save_file(state, tmp_path / "hf" / "model.safetensors")
    ours = load_hf_vilt(tmp_path / "hf").eval()
    assert ours.model_args["tie_mlm_decoder"] and ours.mlm_head.decoder is None
    inputs = _inputs(3, (32, 32), False)
    ref, _ = _run_hf(hf, inputs)
    with torch.no_grad():
        assert _max_diff(ref.logits, ours.mlm_logits(**inputs)) <= 1e-5
    decoder = state["mlm_score.decoder.weight"] + 0.1 * torch.randn_like(state["mlm_score.decoder.weight"])
    save_file({**state, "mlm_score.decoder.weight": decoder}, tmp_path / "hf" / "model.safetensors")
    untied = load_hf_vilt(tmp_path / "hf").eval()
    assert not untied.model_args["tie_mlm_decoder"]
    with torch.no_grad():
        out = untied(**inputs)
        expected = torch.nn.functional.linear(hf.mlm_score.transform(out["text_feats"]), decoder,
                                              hf.mlm_score.decoder.bias)
        assert _max_diff(out["mlm_logits"], expected) <= 1e-5
    untied.save_pretrained(tmp_path / "untied")  # no shared tensors either way
    assert "mlm_head.decoder.weight" in load_file(tmp_path / "untied" / "model.safetensors")


def test_converter_errors_name_the_problem(tmp_path):
    hf = _hf_model(ViltForImageAndTextRetrieval, **TINY)
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    key = "vilt.encoder.layer.1.layernorm_after.bias"
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="layernorm_after.bias"):
        load_hf_vilt(tmp_path / "hf")
    save_file({**state, "vilt.extra.weight": torch.zeros(1)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_hf_vilt(tmp_path / "hf")
    save_file({**state, "vilt.embeddings.position_embeddings": torch.zeros(1, 26, 24)},
              tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="26 rows"):
        load_hf_vilt(tmp_path / "hf")
    save_file(state, tmp_path / "hf" / "model.safetensors")
    convert_hf_vilt(tmp_path / "hf", tmp_path / "ok", drop_path_rate=0.1, patch_sampling=True)
    args = vitkit.from_pretrained(tmp_path / "ok").model_args
    assert args["drop_path_rate"] == 0.1 and args["patch_sampling"]


# ---------------------------------------------------------------------------- the model itself
def _tiny(**kw) -> ViLT:
    torch.manual_seed(0)
    args = dict(img_size=(16, 32), patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                vocab_size=30, max_text_len=8, max_image_length=5)
    return ViLT(**{**args, **kw}).eval()


def _batch(size=(16, 32)):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 30, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    pixel_mask = torch.ones(2, *size, dtype=torch.long)
    pixel_mask[1, :, 8:] = 0  # 4x2 = 8 valid patches of 4x8
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 1, *size, generator=g),
                pixel_mask=pixel_mask)


def test_patch_sampling_keeps_at_most_max_image_length_and_is_seeded():
    model = _tiny(patch_sampling=True)
    batch = _batch()
    with torch.no_grad():
        full = model(**batch)  # eval: no sampling, every patch in grid order
        assert full["image_feats"].shape[1] == 1 + 32 and full["image_masks"][1].sum() == 1 + 8
        model.train()  # dropout is 0, so only the draw differs between runs
        runs = [model(**batch, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
        torch.manual_seed(4)
        global_a = model(**batch)
        torch.manual_seed(4)
        global_b = model(**batch)
    for out in runs:
        idx = out["patch_index"]
        assert out["image_feats"].shape[1] == 1 + 5 and idx.shape == (2, 5, 2)
        assert (out["image_masks"].sum(1) == 1 + 5).all()  # both images have >= 5 valid patches
        assert (idx[1, :, 1] < 2).all()  # only valid (left) patches of the padded image are drawn
        assert len({tuple(p) for p in idx[0].tolist()}) == 5  # without replacement
    assert torch.equal(runs[0]["patch_index"], runs[1]["patch_index"])
    assert torch.equal(runs[0]["pooled"], runs[1]["pooled"])
    assert not torch.equal(runs[0]["patch_index"], runs[2]["patch_index"])
    assert torch.equal(global_a["patch_index"], global_b["patch_index"])
    with torch.no_grad():  # kept tokens are exactly the full model's tokens at those positions (before blocks)
        sampled, mask, index = model.embed_image(batch["pixel_values"], batch["pixel_mask"], True,
                                                 torch.Generator().manual_seed(1))
        every, _, _ = model.embed_image(batch["pixel_values"], batch["pixel_mask"], False)
        flat = index[..., 0] * 8 + index[..., 1]
        assert torch.equal(sampled[:, 1:], every[:, 1:].gather(1, flat[..., None].expand(-1, -1, 16)))
    # fewer valid patches than max_image_length: the image is topped up with masked patches
    few = _tiny(patch_sampling=True, max_image_length=12)
    out = few(**batch, patch_sampling=True, generator=torch.Generator().manual_seed(0))
    assert out["image_feats"].shape[1] == 1 + 12 and out["image_masks"][1].sum() == 1 + 8


def test_padding_does_not_change_valid_outputs():
    """Extra padded patches (a wider batch) and padded text leave the pooled output unchanged."""
    model = _tiny()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
        small = {k: v[1:] for k, v in batch.items()}
        small["pixel_values"], small["pixel_mask"] = small["pixel_values"][..., :8], None
        alone = model(**small)
        torch.testing.assert_close(alone["pooled"], out["pooled"][1:], atol=1e-5, rtol=0)
        short = {k: v[:1] for k, v in batch.items()}
        short["input_ids"], short["attention_mask"] = short["input_ids"][:, :4], None
        torch.testing.assert_close(model(**short)["pooled"], out["pooled"][:1], atol=1e-5, rtol=0)


def test_input_errors_are_readable():
    model = _tiny()
    batch = _batch()
    with pytest.raises(InputShapeError, match="at most 8 text tokens"):
        model(**{**batch, "input_ids": torch.ones(2, 9, dtype=torch.long), "attention_mask": None})
    with pytest.raises(InputShapeError, match="integer tensor"):
        model(batch["pixel_values"])
    bad = batch["pixel_mask"].clone()
    bad[0, :4] = 0  # valid region not at the top
    with pytest.raises(InputShapeError, match="top-left rectangle"):
        model(**{**batch, "pixel_mask": bad})
    with pytest.raises(ValueError, match="modality_types"):
        model(**batch, image_token_type_idx=2)
    with pytest.raises(InputShapeError, match="1 input channel"):
        model(**{**batch, "pixel_values": torch.randn(2, 3, 16, 32)})


def test_save_load_round_trip_and_position_resampling(tmp_path):
    model = _tiny(tie_mlm_decoder=True)
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch)
    model.save_pretrained(tmp_path / "ckpt")
    assert "mlm_head.decoder.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")  # tied: stored once
    loaded = vitkit.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is ViLT
    with torch.no_grad():
        got = loaded(**batch)
    for key in ("text_feats", "image_feats", "pooled", "itm_score", "mlm_logits"):
        assert torch.equal(got[key], expected[key]), key
    # another table size: resampled as ViLT resamples at run time (bilinear, corners aligned)
    bigger = vitkit.from_pretrained(tmp_path / "ckpt", img_size=(24, 48)).eval()
    assert bigger.pos_embed.shape == (1, 1 + 6 * 12, 16)
    with torch.no_grad():
        x = torch.randn(1, 1, 24, 48)
        ids = batch["input_ids"][:1]
        torch.testing.assert_close(bigger(ids, pixel_values=x)["pooled"], loaded(ids, pixel_values=x)["pooled"])


def test_wpa_distance_and_training_step():
    model = _tiny().train()
    batch = _batch()
    out = model(**batch)
    dist = wpa_distance(out)
    assert dist.shape == (2,) and torch.isfinite(dist).all()
    loss = out["mlm_logits"].logsumexp(-1).mean() + out["itm_score"].sum() + dist.sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_registered_configurations():
    for name, params in (("vilt_b32", 112_218_427), ("vilt_fmnist_tiny", 344_001)):
        with torch.device("meta"):
            model = vitkit.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == params, name
    # the backbone of ViLT-B/32 has exactly HF ViltModel's parameter count (its default config is ViLT-B/32)
    with torch.device("meta"):
        hf = sum(p.numel() for p in ViltModel(ViltConfig()).parameters())
        ours = vitkit.create_model("vilt_b32", rank_head=False, mlm_head=False)
    assert sum(p.numel() for p in ours.parameters()) == hf
    model = vitkit.create_model("vilt_fmnist_tiny", depth=1).eval()
    assert tuple(model.pretrained_cfg["input_size"]) == (1, 28, 56)
    with torch.no_grad():
        out = model(torch.randint(1, 128, (2, 16)), pixel_values=torch.randn(2, 1, 28, 56))
    assert out["image_feats"].shape == (2, 1 + 98, 96) and out["mlm_logits"].shape == (2, 16, 128)
    ids = {n: model.lr_layer_id(n) for n, _ in model.named_parameters()}
    assert ids["text_embed.word_embeddings.weight"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1
    assert ids["mlm_head.bias"] == model.num_lr_layers - 1


def test_grad_checkpointing_gives_the_same_gradients():
    batch = _batch()
    grads = []
    for ckpt in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(ckpt)
        out = model(**batch)
        (out["mlm_logits"].logsumexp(-1).mean() + out["itm_score"].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
