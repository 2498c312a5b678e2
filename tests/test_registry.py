"""Registry-wide tests: every registered model builds, runs, trains and round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch

import vitkit
from _tiny import NUM_CLASSES, call, is_classifier, tiny
from vitkit.errors import ConfigError
from vitkit.layers import AttentionMapSource, capture_attention

ALL_MODELS = vitkit.list_models()
CLASSIFIERS = [n for n in ALL_MODELS if is_classifier(n)]


def _build(name: str):
    over, shape = tiny(name)
    torch.manual_seed(0)
    return vitkit.create_model(name, **over), shape


def _run(model, x: torch.Tensor) -> torch.Tensor:
    """The model's output as one tensor: logits, or every field of a tuple output (MAE: loss, pred, mask).
    Seeded, so models that draw random masks draw the same ones."""
    torch.manual_seed(1)
    out = call(model, x)
    return out if torch.is_tensor(out) else torch.cat([t.detach().flatten().float() for t in out])


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    out = call(model, x)
    return out.logsumexp(-1).mean() if torch.is_tensor(out) else out.loss


def test_registry_lists_the_families():
    names = vitkit.list_models("vit_*")
    for expected in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                     "vit_large_patch16_224", "vit_huge_patch14_224", "vit_base_patch32_384",
                     "vit_base_patch16_384", "vit_base_r50_s16_384", "vit_fmnist_tiny"):
        assert expected in names
    assert vitkit.list_models("vit_*_patch14_224") == sorted(vitkit.list_models("vit_*_patch14_224"))
    assert all(n.startswith("vit_fmnist") for n in vitkit.list_models("vit_fmnist*"))


def test_unknown_model_suggests_names():
    with pytest.raises(ValueError, match="did you mean vit_small_patch16_224"):
        vitkit.create_model("vit_smal_patch16_224")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_shapes_and_interface(name):
    model, shape = _build(name)
    model.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        inter = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert logits.shape == (2, NUM_CLASSES)
    assert pooled.shape == (2, model.num_features)
    assert len(inter) == 1 and inter[0].shape[0] == 2 and inter[0].ndim == 4
    assert torch.isfinite(logits).all()
    assert tuple(model.pretrained_cfg["input_size"]) == shape
    if not any(isinstance(m, AttentionMapSource) for m in model.modules()):  # a CNN: refused in one line
        with pytest.raises(ConfigError, match="no attention"):
            model.attention_maps(x)
        return
    maps = model.attention_maps(x)
    assert len(maps) >= 1
    torch.testing.assert_close(maps[0].sum(-1), torch.ones_like(maps[0].sum(-1)))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    model, shape = _build(name)
    model.train()
    loss = _loss(model, torch.randn(2, *shape))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_save_load_round_trip(name, tmp_path):
    model, shape = _build(name)
    model.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = _run(model, x)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = vitkit.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model) and loaded.model_name == name
    over, _ = tiny(name)
    via_registry = vitkit.create_model(name, pretrained=tmp_path / "ckpt", **over).eval()
    with torch.no_grad():
        assert torch.equal(_run(loaded, x), expected)
        assert torch.equal(_run(via_registry, x), expected)


def test_capture_attention_context_is_reentrant_safe():
    model, shape = _build("vit_fmnist_tiny")
    x = torch.randn(1, *shape)
    with capture_attention(model) as maps:
        model(x)
    n = len(maps)
    model(x)  # outside the context nothing is recorded any more
    assert len(maps) == n == len(model.blocks)
