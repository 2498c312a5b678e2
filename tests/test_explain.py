"""Attention pictures (viz.attention, engine.explain): rollout maths, explain on tiny models, files, the command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vitkit
from _tiny import tiny
from vitkit.errors import ConfigError, DataError
from vitkit.layers import AttentionMapSource
from vitkit.tools.explain import add_explain_args, explain, explain_files, run_explain_args
from vitkit.viz.attention import attention_rollout, render_overlay

SMALL = dict(embed_dim=24, depth=2, num_heads=2, mlp_dim=None, num_classes=3, img_size=16)  # 4x4 patch grid


def small_model(name: str = "vit_fmnist_tiny", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return vitkit.create_model(name, **{**SMALL, **kw}).eval()


def random_maps(layers: int, batch: int = 2, heads: int = 3, n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, n, generator=g).mul(3).softmax(-1) for _ in range(layers)]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything explain must leave as it was: weights, training flags, grads, hooks, capture sinks."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "sinks": [m.attn_sink for m in model.modules() if isinstance(m, AttentionMapSource)],
    }


def assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert after["training"] == before["training"]
    assert all(g is None for g in after["grads"])
    assert after["hooks"] == before["hooks"] == 0
    assert all(s is None for s in after["sinks"])


# ---------------------------------------------------------------------------- rollout maths
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one(fusion, discard):
    joint = attention_rollout(random_maps(4), num_prefix_tokens=1, head_fusion=fusion, discard_ratio=discard)
    assert joint.shape == (2, 5, 5)
    assert (joint >= 0).all()
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 5))


def test_identity_maps_roll_out_to_the_identity():
    eye = torch.eye(6).expand(1, 2, 6, 6)
    torch.testing.assert_close(attention_rollout([eye, eye, eye], 1), torch.eye(6)[None])


def test_rollout_is_the_product_of_the_layers_first_layer_first():
    """Two layers by hand: Ã = (mean_heads(A) + I) / 2, joint = Ã₂ Ã₁ (not Ã₁ Ã₂: the matrices do not commute)."""
    maps = random_maps(2, batch=1, n=4, seed=3)
    a1, a2 = [(m[0].double().mean(0) + torch.eye(4, dtype=torch.float64)) / 2 for m in maps]
    expected = (a2 @ a1).float()
    torch.testing.assert_close(attention_rollout(maps, 1)[0], expected)
    assert not torch.allclose(expected, (a1 @ a2).float(), atol=1e-4)


def test_rollout_peaks_where_every_layer_s_cls_attends():
    """CLS attends only to patch k in every layer, patches to themselves: after L layers the CLS row is
    2^-L on CLS and 1 - 2^-L on patch k (each layer keeps half through the residual identity)."""
    n, k, layers = 10, 6, 3
    a = torch.eye(n)
    a[0] = 0
    a[0, k] = 1
    joint = attention_rollout([a.expand(2, 4, n, n)] * layers, num_prefix_tokens=1)
    expected = torch.zeros(n)
    expected[0], expected[k] = 2.0**-layers, 1 - 2.0**-layers
    torch.testing.assert_close(joint[0, 0], expected)
    assert int(joint[1, 0, 1:].argmax()) + 1 == k


def test_discard_keeps_attention_to_the_prefix_tokens():
    """One layer, discard 95% of the 5x4 weights to patch keys: only the largest survives, the CLS column stays."""
    maps = random_maps(1, batch=1, heads=1, n=5)
    fused = maps[0][0, 0]
    kept = torch.zeros_like(fused)
    kept[:, 0] = fused[:, 0]
    top = int(fused[:, 1:].argmax())
    kept[top // 4, 1 + top % 4] = fused[:, 1:].max()
    expected = (kept + torch.eye(5)) / (kept + torch.eye(5)).sum(-1, keepdim=True)
    torch.testing.assert_close(attention_rollout(maps, num_prefix_tokens=1, discard_ratio=0.95)[0], expected)


def test_rollout_bad_input():
    with pytest.raises(ConfigError, match="head_fusion"):
        attention_rollout(random_maps(1), 1, head_fusion="median")
    with pytest.raises(ConfigError, match="discard_ratio"):
        attention_rollout(random_maps(1), 1, discard_ratio=1.0)
    with pytest.raises(ValueError, match="same B and N"):
        attention_rollout(random_maps(1, n=5) + random_maps(1, n=7), 1)


# ---------------------------------------------------------------------------- explain on tiny models
CASES = {
    "vit_cls": ("vit_fmnist_tiny", {}),
    "vit_gap": ("vit_fmnist_tiny", dict(class_token=False, pool="gap")),
    "vit_gap_with_cls": ("vit_fmnist_tiny", dict(pool="gap")),
    "t2t_transformer": ("t2t_vit_t_fmnist_tiny", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_explain_shapes_and_model_left_as_it_was(case):
    name, kw = CASES[case]
    over, (c, h, w) = tiny(name)
    if name.startswith("vit"):
        over, (h, w) = {**over, "img_size": 16}, (16, 16)  # a 4x4 grid, not tiny()'s 2x2
    torch.manual_seed(0)
    model = vitkit.create_model(name, **{**over, **kw, "attn_drop_rate": 0.3, "drop_rate": 0.3})
    model.train()
    model.head.eval()  # a mixed setting must come back as it was too
    x = torch.randn(2, c, h, w)
    grid = (h // model.reduction[0], w // model.reduction[1]) if hasattr(model, "reduction") else \
        model.patch_embed.grid
    before = snapshot(model)
    out = {m: explain(model, x, m) for m in ("rollout", "last", "grad")}
    assert_unchanged(before, model)
    heads = model.blocks[0].attn.num_heads
    assert out["rollout"].shape == out["grad"].shape == (2, *grid)
    assert out["last"].shape == (2, heads, *grid)
    for m, heat in out.items():
        assert torch.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1, m
        assert heat.flatten(1).amax(1).eq(1).all(), m  # scaled per image
    # dropout was off (eval mode during explain): the same answer twice, and the same as the model in eval
    torch.testing.assert_close(explain(model, x, "rollout"), out["rollout"])
    torch.testing.assert_close(explain(model.eval(), x, "rollout"), out["rollout"])


def test_t2t_explains_only_the_backbone_blocks():
    """The transformer T2T module records two maps of other token counts first; the last map is the last block's."""
    over, shape = tiny("t2t_vit_t_fmnist_tiny")
    model = vitkit.create_model("t2t_vit_t_fmnist_tiny", **over).eval()
    x = torch.randn(1, *shape)
    maps = model.attention_maps(x)
    assert len(maps) == len(model.blocks) + 2
    last = maps[-1][:, :, 0, 1:]
    expected = (last - last.amin()) / (last.amax() - last.amin())
    torch.testing.assert_close(explain(model, x, "last").flatten(2), expected)
    joint = attention_rollout(maps[-len(model.blocks):], 1)[:, 0, 1:]
    expected = (joint - joint.amin()) / (joint.amax() - joint.amin())
    torch.testing.assert_close(explain(model, x, "rollout").flatten(1), expected)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_identity_attention_gives_a_uniform_map(pool):
    """A mask that lets each token attend only to itself: rollout has nothing to point at, every patch is equal."""
    model = small_model(pool=pool, class_token=pool == "cls")
    n = model.num_prefix_tokens + 16
    model._block_inputs = lambda i, x, grid, cache: (x, torch.eye(n, dtype=torch.bool))
    x = torch.randn(2, 1, 16, 16)
    maps = model.attention_maps(x)
    assert all(torch.equal(m, torch.eye(n).expand_as(m)) for m in maps)
    joint = attention_rollout(maps, model.num_prefix_tokens)
    read = joint[:, 0, 1:] if pool == "cls" else joint.mean(1)  # the CLS row, or the mean over patch rows
    assert (read == read[0, 0]).all()
    # grad too for CLS (relevance stays on the diagonal); for GAP its diagonal is each patch's own gradient
    for method in ("rollout", "last", "grad") if pool == "cls" else ("rollout", "last"):
        heat = explain(model, x, method)
        assert (heat == heat.flatten()[0]).all(), method


def test_grad_default_target_is_the_predicted_class():
    model = small_model()
    x = torch.randn(3, 1, 16, 16)
    pred = model(x).argmax(-1)
    default = explain(model, x, "grad")
    assert torch.isfinite(default).all()
    torch.testing.assert_close(default, explain(model, x, "grad", target=pred))
    torch.testing.assert_close(default[:1], explain(model, x[:1], "grad", target=int(pred[0])), atol=1e-5, rtol=0)
    other = (pred + 1) % 3
    assert not torch.allclose(default, explain(model, x, "grad", target=other))
    with pytest.raises(ConfigError, match=r"target must be a class index in \[0, 3\)"):
        explain(model, x, "grad", target=3)
    with pytest.raises(ConfigError, match="not class-specific"):
        explain(model, x, "rollout", target=0)
    with pytest.raises(ConfigError, match="unknown explain method 'saliency'"):
        explain(model, x, "saliency")


def test_swin_is_refused_with_one_clear_line():
    over, shape = tiny("swin_fmnist_tiny")
    model = vitkit.create_model("swin_fmnist_tiny", **over)
    with pytest.raises(ConfigError) as info:
        explain(model, torch.randn(1, *shape))
    assert str(info.value) == ("swin_fmnist_tiny: attention is computed inside 2x2 windows, so there is no image-wide "
                               "attention to roll out; explain supports ViT and T2T-ViT (TokenClassifier) models, "
                               "and MAE/contrastive models through their encoder")


def test_other_models_refused_and_wrappers_explain_their_encoder():
    with pytest.raises(ConfigError, match="Linear has no patch tokens on a grid"):
        explain(torch.nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(ConfigError, match="pool='none' predicts per token"):
        explain(small_model(pool="none"), torch.randn(1, 1, 16, 16))
    over, shape = tiny("simclr_vit_fmnist_tiny")
    wrapper = vitkit.create_model("simclr_vit_fmnist_tiny", **over).eval()
    before = snapshot(wrapper)
    assert explain(wrapper, torch.randn(2, *shape), "last").shape == (2, 2, 2, 2)
    assert_unchanged(before, wrapper)
    with pytest.raises(ConfigError, match="'grad' needs class logits and this model has no classifier head"):
        explain(wrapper, torch.randn(2, *shape), "grad")


# ---------------------------------------------------------------------------- pictures and files
def test_render_overlay():
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # (8, 16)
    heat = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    out = render_overlay(gray, heat)
    assert out.mode == "RGB" and out.size == (16, 8)
    rgb = np.asarray(out).astype(int)
    assert (rgb[..., 0] != rgb[..., 2]).any()  # gray shows in colour under the heat map
    np.testing.assert_array_equal(np.asarray(render_overlay(gray, heat, alpha=0.0))[..., 1], gray)
    colour = np.random.default_rng(0).random((8, 16, 3))
    assert render_overlay(colour, heat.numpy(), cmap="viridis").size == (16, 8)
    assert render_overlay(Image.fromarray(gray), heat).size == (16, 8)
    with pytest.raises(ConfigError, match="colormap"):
        render_overlay(gray, heat, cmap="no-such-map")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = small_model()
    model.pretrained_cfg = {**model.pretrained_cfg, "class_names": ["cat", "dog", "fox"]}
    folder = tmp_path_factory.mktemp("run") / "ckpt"
    model.save_pretrained(folder)
    return folder


def write_images(folder):
    rng = np.random.default_rng(0)
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    paths = [folder / "a" / "shirt.png", folder / "b" / "shirt.jpg", folder / "colour.png"]
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (32, 24), dtype=np.uint8)).save(paths[1])
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(paths[2])
    return paths


def test_explain_files_writes_a_picture_per_image_and_the_maps(checkpoint, tmp_path):
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    written = explain_files(checkpoint, images, ["rollout", "last", "grad", "rollout"], out, topk=2)
    assert written == [out / "shirt.png", out / "shirt_2.png", out / "colour.png", out / "maps.safetensors"]
    for png in written[:3]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    with safe_open(str(written[-1]), "pt") as f:
        assert set(f.keys()) == {f"{s}/{m}" for s in ("shirt", "shirt_2", "colour") for m in ("rollout", "last",
                                                                                               "grad")}
        assert f.get_tensor("shirt/rollout").shape == (4, 4)
        assert f.get_tensor("colour/last").shape == (2, 4, 4)
        meta = f.metadata()
    predictions = json.loads(meta["predictions"])
    assert meta["methods"] == "rollout,last,grad" and len(predictions["shirt_2"]) == 2
    assert predictions["colour"][0][0] in ("cat", "dog", "fox")


def test_corrupt_image_is_one_line_naming_the_file(checkpoint, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "broken.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as info:
        explain_files(checkpoint, [good, bad], ["rollout"], tmp_path / "out")
    assert str(info.value).startswith(f"{bad}: cannot load image") and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing is written before every image has loaded


def test_command_line_through_argparse(checkpoint, tmp_path, capsys):
    images = write_images(tmp_path / "in")[:1]
    parser = argparse.ArgumentParser(prog="vitkit explain")
    add_explain_args(parser)
    out = tmp_path / "pictures"
    args = parser.parse_args([str(checkpoint), str(images[0]), "--method", "last", "--method", "grad",
                              "--out", str(out), "--discard-ratio", "0.5"])
    assert run_explain_args(args) == 0
    assert capsys.readouterr().out.split() == [str(out / "shirt.png"), str(out / "maps.safetensors")]
    with safe_open(str(out / "maps.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["shirt/grad", "shirt/last"]
    defaults = parser.parse_args([str(checkpoint), str(images[0])])
    assert defaults.methods is None and defaults.out == "explain" and defaults.discard_ratio == 0.0
    for bad in (["--discard-ratio", "1.5"], ["--method", "saliency"]):
        with pytest.raises(SystemExit):
            parser.parse_args([str(checkpoint), str(images[0]), *bad])
