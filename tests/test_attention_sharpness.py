"""EfficientViT's ablation switches, the ReLU attention maps they imply, the sharpness statistics, and
benchmarks/attention_sharpness.py (measure, records, tables) on tiny random models and hand-made maps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkit.tools.ablate as ablate
from vitkit.engine.config import config_to_yaml, load_config
from vitkit.errors import ConfigError, InputShapeError
from vitkit.layers.attention import capture_attention
from vitkit.layers.linear_attention import ReLULinearAttention, relu_attention_map, relu_linear_attention
from vitkit.layers.lite_mla import LiteMLA
from vitkit.models import create_model, from_pretrained
from vitkit.models.efficientvit import EfficientViT, EfficientViTBlock
from vitkit.tools import report
from vitkit.tools.report import load_script
from vitkit.viz.attention_stats import SharpnessMeter, capture_named_attention, head_statistics, top_k_size

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "attention_sharpness.py"
TINY = dict(img_size=32, widths=[8, 8, 16, 16, 16], depths=[1, 1, 1, 1, 1], dim=8, head_widths=[16, 16],
            num_classes=3)


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def _keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- EfficientViT switches
def test_switches_remove_only_their_parts_and_defaults_keep_the_keys():
    torch.manual_seed(0)
    default = _keys(EfficientViT(**TINY))
    assert _keys(EfficientViT(**TINY, local_dwconv=True, scales=(5,))) == default
    blocks = {k for k in default if ".local_module.depth_conv." in k}
    attn_blocks = {k for k in blocks if k.startswith(("stages.2.", "stages.3."))}
    assert attn_blocks and blocks == attn_blocks  # only EfficientViTBlocks (attention stages) have a local_module
    no_dw = _keys(EfficientViT(**TINY, local_dwconv=False))
    assert set(default) - set(no_dw) == attn_blocks and set(no_dw) <= set(default)
    assert all(no_dw[k] == default[k] for k in no_dw)

    no_ms = _keys(EfficientViT(**TINY, scales=()))
    gone = set(default) - set(no_ms)
    assert gone and all(".context_module.aggreg." in k for k in gone) and set(no_ms) <= set(default)
    for key in (k for k in no_ms if k.endswith("context_module.proj.conv.weight")):
        out, in_width = default[key][:2]
        assert no_ms[key] == (out, in_width // 2, 1, 1)  # one scale fewer: heads·dim instead of 2·heads·dim
    with pytest.raises(ValueError, match="local_dwconv"):
        EfficientViT(**TINY, local_dwconv="no")


def test_without_dwconv_the_local_branch_is_pointwise():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 5, 5)
    bumped = x.clone()
    bumped[0, :, 2, 2] += 1.0
    for dw, spreads in ((True, True), (False, False)):
        block = EfficientViTBlock(16, 8, 4.0, (5,), "hardswish", local_dwconv=dw).eval()
        with torch.no_grad():
            diff = (block.local_module(bumped) - block.local_module(x)).abs().sum(dim=1)[0]
        diff[2, 2] = 0
        assert bool(diff.max() > 1e-6) is spreads


@pytest.mark.parametrize("flags", [dict(local_dwconv=False), dict(scales=()), dict(local_dwconv=False, scales=())])
def test_ablated_models_run_and_round_trip(tmp_path, flags):
    torch.manual_seed(0)
    model = EfficientViT(**TINY, **flags).eval()
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x)) and model(x).shape == (2, 3)
    assert _keys(again) == _keys(model)


def test_study_variants_build_distinct_models():
    study = ablate.STUDIES["efficientvit_parts"]
    assert [v.label for v in study.variants] == ["full", "no_dwconv", "no_multiscale", "neither"]
    recipe = ROOT / "configs" / "fmnist" / "demo.yaml"
    base = load_config(recipe)
    keys, structures = set(), set()
    for variant in study.variants:
        cfg = load_config(recipe, ablate._variant_overrides(study, variant, 1.0, base))
        model = create_model(cfg.model.name, **cfg.model.args)
        with torch.no_grad():
            assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
        keys.add(ablate.run_key(cfg))
        structures.add(frozenset(_keys(model)))
        blocks = [m for m in model.modules() if isinstance(m, EfficientViTBlock)]
        assert blocks and all(isinstance(b.local_module.depth_conv, torch.nn.Identity)
                              == ("dwconv" in variant.label or variant.label == "neither") for b in blocks)
        assert all((len(b.context_module.aggreg) == 0)
                   == (variant.label in ("no_multiscale", "neither")) for b in blocks)
    assert len(keys) == 4 and len(structures) == 4
    # the new flag at its default leaves a run's key where it was before the flag existed (ablate.LATER_FLAGS)
    full = ablate._variant_overrides(study, study.variants[0], 1.0, base)
    assert ablate.run_key(load_config(recipe, [*full, "model.args.local_dwconv=true"])) == \
        ablate.run_key(load_config(recipe, full))


# ---------------------------------------------------------------------- implied ReLU attention
def _brute_force(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A_ij = relu(q_i)·relu(k_j) / Σ_j relu(q_i)·relu(k_j), one entry at a time (q, k: (N, d))."""
    n_q, n_k = q.shape[0], k.shape[0]
    out = torch.zeros(n_q, n_k, dtype=torch.float64)
    for i in range(n_q):
        scores = [float(F.relu(q[i]).double() @ F.relu(k[j]).double()) for j in range(n_k)]
        total = sum(scores)
        for j in range(n_k):
            out[i, j] = scores[j] / total if total > 0 else 1.0 / n_k
    return out


def test_relu_attention_map_is_the_brute_force_map_and_gives_the_linear_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 5)
    q[0, 0, 2] = -1.0  # a query whose ReLU is zero: a uniform row
    attn = relu_attention_map(F.relu(q), F.relu(k))
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 7))
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(attn[b, h].double(), _brute_force(q[b, h], k[b, h]), atol=1e-6, rtol=1e-5)
    dead = (F.relu(q) @ F.relu(k).transpose(-2, -1)).sum(-1) == 0
    assert dead[0, 0, 2] and torch.equal(attn[0, 0, 2], torch.full((7,), 1 / 7))
    live = (attn @ v).masked_fill(dead[..., None], 0.0)  # the linear path gives a dead query a zero output
    linear = relu_linear_attention(F.relu(q), F.relu(k), v)
    torch.testing.assert_close(live, linear, atol=1e-5, rtol=1e-4)


def test_relu_linear_attention_records_its_map_without_changing_its_output():
    torch.manual_seed(0)
    layer = ReLULinearAttention(16, num_heads=2).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        expected = layer(x)
        with capture_attention(layer) as maps:
            out = layer(x)
        q, k, _ = layer.qkv(x).reshape(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    assert torch.equal(out, expected) and len(maps) == 1 and maps[0].shape == (2, 2, 9, 9)
    torch.testing.assert_close(maps[0][1, 1].double(), _brute_force(q[1, 1], k[1, 1]), atol=1e-6, rtol=1e-5)


def test_lite_mla_records_the_brute_force_map_of_every_head():
    torch.manual_seed(0)
    mla = LiteMLA(16, dim=4, scales=(3,)).eval()
    seen = []
    attend = mla.attend
    mla.attend = lambda qkv: seen.append(qkv) or attend(qkv)
    with torch.no_grad(), capture_attention(mla) as maps:
        mla(torch.randn(1, 16, 5, 5))
    qkv = seen[0][0]  # (heads_total, 3·dim, N)
    assert maps[0].shape == (1, 8, 25, 25)  # 4 base heads + 4 aggregated ones
    for h in (0, 7):
        q, k = qkv[h, :4].T, qkv[h, 4:8].T
        torch.testing.assert_close(maps[0][0, h].double(), _brute_force(q, k), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- statistics
def test_one_hot_and_uniform_maps():
    n = 20
    one_hot = torch.eye(n)[torch.randperm(n)].expand(2, 1, n, n)
    uniform = torch.full((2, 1, n, n), 1 / n)
    sharp, flat = head_statistics(torch.cat([one_hot, uniform], dim=1))
    assert sharp["entropy"] == pytest.approx(0, abs=1e-9) and sharp["entropy_norm"] == pytest.approx(0, abs=1e-9)
    assert sharp["top1_mass"] == pytest.approx(1) and sharp["max_weight"] == pytest.approx(1)
    assert flat["entropy"] == pytest.approx(math.log(n)) and flat["entropy_norm"] == pytest.approx(1)
    assert flat["top1_mass"] == pytest.approx(1 / n) and flat["max_weight"] == pytest.approx(1 / n)
    assert flat["k_top5"] == 5 and flat["top5_mass"] == pytest.approx(5 / n)
    assert flat["k_top10pct"] == 2 and flat["top10pct_mass"] == pytest.approx(2 / n)
    assert top_k_size(4, 5) == 4 and top_k_size(4, 0.1) == 1 and top_k_size(31, 0.1) == 4
    assert head_statistics(torch.ones(1, 1, 3, 1))[0]["entropy_norm"] is None  # one key: nothing to normalise by


def test_meter_means_over_batches_equal_one_batch():
    torch.manual_seed(0)
    maps = torch.randn(6, 3, 8, 8).mul(3).softmax(-1)
    split, whole = SharpnessMeter(), SharpnessMeter()
    split.update("a", maps[:2])
    split.update("a", maps[2:])
    whole.update("a", maps)
    for r1, r2 in zip(split.results(), whole.results()):
        assert r1.keys() == r2.keys() and r1["rows"] == 48
        for key in r1:
            assert r1[key] == pytest.approx(r2[key])
    by_hand = -(maps[:, 1] * maps[:, 1].log()).sum(-1).mean() / math.log(8)
    assert whole.results()[1]["entropy_norm"] == pytest.approx(float(by_hand), rel=1e-5)


def test_statistics_refuse_what_is_not_probabilities():
    meter = SharpnessMeter()
    with pytest.raises(InputShapeError, match="rows must sum to 1"):
        meter.update("scores", torch.rand(1, 2, 4, 4) + 0.1)
    with pytest.raises(InputShapeError, match="not logits"):
        meter.update("logits", torch.randn(1, 2, 4, 4))
    with pytest.raises(InputShapeError, match="B, heads, N_query, N_key"):
        meter.update("flat", torch.full((4, 4), 0.25))
    meter.update("a", torch.full((1, 2, 4, 4), 0.25))
    with pytest.raises(InputShapeError, match="its own meter"):
        meter.update("a", torch.full((1, 2, 9, 9), 1 / 9))


def test_named_capture_names_every_layer():
    torch.manual_seed(0)
    vit = create_model("vit_fmnist_tiny", embed_dim=24, depth=2, num_heads=2).eval()
    with torch.no_grad(), capture_named_attention(vit) as maps:
        vit(torch.randn(2, 1, 28, 28))
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(len(v) == 1 and v[0].shape[:2] == (2, 2) for v in maps.values())
    assert all(m.attn_sink is None for m in vit.modules() if hasattr(m, "attn_sink"))


# ---------------------------------------------------------------------- the benchmark
def test_measure_tells_softmax_from_relu_layers(bench):
    torch.manual_seed(0)
    evit = EfficientViT(**TINY, in_chans=1).eval()
    rows = bench.measure(evit, torch.randn(3, 1, 32, 32), batch_size=2)
    assert {r["attention"] for r in rows} == {"relu_linear"}
    assert sorted((r["n_keys"], r["rows"]) for r in rows) == [(1, 3)] * 4 + [(4, 12)] * 4  # 1x1, 2x2 maps; 2 + 2 heads
    vit = create_model("vit_fmnist_tiny", embed_dim=24, depth=1, num_heads=2).eval()
    rows = bench.measure(vit, torch.randn(3, 1, 28, 28))
    assert [(r["layer"], r["head"], r["attention"]) for r in rows] == [("blocks.0.attn", 0, "softmax"),
                                                                     ("blocks.0.attn", 1, "softmax")]
    assert all(0 <= r["entropy_norm"] <= 1 + 1e-6 for r in rows)
    with pytest.raises(ConfigError, match="no attention layer"):
        bench.measure(torch.nn.Conv2d(1, 1, 1), torch.randn(1, 1, 4, 4))


def _fake_run(folder: Path, model_name: str, data_dir: Path, val_fraction: float) -> Path:
    torch.manual_seed(0)
    best = folder / "checkpoints" / "best"
    create_model(model_name).save_pretrained(best)
    cfg = load_config(ROOT / "configs" / "fmnist" / "demo.yaml",
                      [f"model.name={model_name}", f"data.data_dir={data_dir}", f"data.val_fraction={val_fraction}"])
    (best / "train_config.yaml").write_text(config_to_yaml(cfg))
    return folder


def test_command_appends_records_from_held_out_images(bench, tmp_path, capsys):
    from test_data import write_fake_fmnist

    data = tmp_path / "fmnist"
    write_fake_fmnist(data, n_train=40)
    evit = _fake_run(tmp_path / "evit", "efficientvit_fmnist_tiny", data, 0.25)
    vit = _fake_run(tmp_path / "vit", "vit_fmnist_tiny", data, 0.0)
    results = tmp_path / "out" / "sharpness.jsonl"
    assert bench.main(["--run", f"evit={evit}", "--run", f"vit_s1={vit}", "--images", "6", "--val-fraction",
                       "0.25", "--results", str(results), "--threads", "1"]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    by_run = {name: [r for r in records if r["group"] == name] for name in ("evit", "vit")}  # vit_s1: seed 1
    assert {r["run"] for r in by_run["vit"]} == {"vit_s1"}
    assert {r["attention"] for r in by_run["evit"]} == {"relu_linear"}
    assert {r["attention"] for r in by_run["vit"]} == {"softmax"}
    assert {r["held_out"] for r in by_run["evit"]} == {True} and {r["held_out"] for r in by_run["vit"]} == {False}
    assert all(r["images"] == 6 and r["model"] and r["machine"]["cpu"] and r["rows"] % 6 == 0 for r in records)
    assert "NOT held out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--run", f"evit={evit}", "--run", f"evit={vit}", "--results", str(results)])


def _record(run: str, run_id: str, layer: str, head: int, attention: str, n: int, entropy_norm: float,
            top1: float) -> dict:
    return {"kind": "head", "run_id": run_id, "run": run, "model": f"{run}_model", "layer": layer,
            "attention": attention, "head": head, "n_keys": n, "rows": 10, "entropy": entropy_norm * math.log(n),
            "entropy_norm": entropy_norm, "top1_mass": top1, "top5_mass": min(1.0, 3 * top1),
            "top10pct_mass": 2 * top1 / 3 + 1 / 3, "k_top5": min(5, n), "k_top10pct": top_k_size(n, 0.1),
            "max_weight": min(1.0, 2 * top1), "images": 8, "dataset": "fashion_mnist",
            "split": "train[val 0.1, seed 0]", "held_out": True, "machine": {"cpu": "Test CPU", "torch": "x"}}


def _synthetic(path: Path) -> list[dict]:
    records = [_record("evit", "T1", "stages.3.blocks.1.context_module", h, "relu_linear", 16, 0.99, 0.5)
               for h in range(2)]  # an older measurement of evit, superseded below
    records += [_record("vit", "T2", f"blocks.{b}.attn", h, "softmax", 50, 0.4 + 0.1 * h + 0.05 * b, 0.3 + 0.1 * h)
                for b in range(2) for h in range(2)]
    records += [_record("evit", "T2", "stages.3.blocks.1.context_module", h, "relu_linear", 16, 0.9 - 0.1 * h,
                        0.2 + 0.05 * h) for h in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_render_tables_from_a_results_file(bench, tmp_path, monkeypatch):
    import vitkit.viz.plots as plots

    records = _synthetic(tmp_path / "s.jsonl")
    table = bench.render_sharpness(tmp_path, results="s.jsonl", part="table")
    newest = [r for r in records if r["run"] == "evit" and r["run_id"] == "T2"]
    mean_norm = sum(r["entropy_norm"] for r in newest) / 3
    row = next(line for line in table.splitlines() if line.startswith("| evit |"))
    assert f"{mean_norm:.3f} ({min(r['entropy_norm'] for r in newest):.3f}–" in row and "| 3 |" in row
    assert f"| {1 / 16:.3f} |" in row and "0.990" not in table  # the older evit run is not shown
    assert sum(line.startswith("| vit |") for line in table.splitlines()) == 2  # one row per layer
    summary = bench.render_sharpness(tmp_path, results="s.jsonl", part="summary", runs="vit,evit")
    lines = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split("|")[1].strip() for line in lines] == ["vit", "evit"]
    vit_rows = [r for r in records if r["run"] == "vit"]
    assert f"| {sum(r['top1_mass'] for r in vit_rows) / 4:.3f} |" in lines[0]
    heads = bench.render_sharpness(tmp_path, results="s.jsonl", part="heads")
    assert len([line for line in heads.splitlines() if line.startswith(("| vit", "| evit"))]) == 7
    assert "Test CPU" in table and "8 images of fashion_mnist" in table
    with pytest.raises(ConfigError, match="part='bars'"):
        bench.render_sharpness(tmp_path, results="s.jsonl", part="bars")
    with pytest.raises(ConfigError, match="part=plot needs image=FILE"):
        bench.render_sharpness(tmp_path, results="s.jsonl", part="plot")
    drawn = {}
    monkeypatch.setattr(plots, "plot_lines", lambda series, path, *a, **kw: drawn.update(series=series, path=path))
    assert bench.render_sharpness(tmp_path, results="s.jsonl", part="plot", image="by_layer.png",
                                  stat="entropy_norm") == "![attention entropy_norm by layer](by_layer.png)"
    # vit: two layers, each the mean of its two heads; evit (its newest run only): one layer
    assert drawn["series"] == {"vit": [(1, [pytest.approx(0.45)]), (2, [pytest.approx(0.50)])],
                               "evit": [(1, [pytest.approx(0.8)])]} and drawn["path"] == tmp_path / "by_layer.png"
    with pytest.raises(ConfigError, match="not in the results file"):
        bench.render_sharpness(tmp_path, results="s.jsonl", runs="swin")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"kind": "head", "run": "x"}) + "\n")
    with pytest.raises(ConfigError, match="lacks"):
        bench.render_sharpness(tmp_path, results="bad.jsonl")


def test_report_block(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / SCRIPT.name)
    (tmp_path / "docs" / "efficient").mkdir(parents=True)
    _synthetic(tmp_path / "docs" / "efficient" / "sharpness.jsonl")
    doc = tmp_path / "docs" / "efficient.md"
    head = "<!-- report: script script=benchmarks/attention_sharpness.py function=render_sharpness part=summary -->"
    doc.write_text(f"# Efficient\n\n{head}\nstale\n<!-- /report -->\n")
    assert report.report([doc], check=True)
    report.report([doc])
    assert "| evit | `evit_model` | relu_linear |" in doc.read_text()
    assert report.report([doc], check=True) == []


def test_a_relu_linear_vit_has_the_softmax_vits_parameters_and_its_maps_are_relu_maps(tmp_path):
    """``attn_kind=relu_linear`` swaps only the kernel: the same parameter names and shapes as the softmax ViT
    (so one checkpoint loads into either), the maps are the ReLU maps, the CLS-only path (``queries``) gives the
    full path's CLS output, it trains and round-trips; an unknown kind or an attention bias is one clear error."""
    kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    soft, relu = create_model("vit_fmnist_tiny", **kw), create_model("vit_fmnist_tiny", attn_kind="relu_linear", **kw)
    assert {k: v.shape for k, v in soft.state_dict().items()} == {k: v.shape for k, v in relu.state_dict().items()}
    assert all(isinstance(b.attn, ReLULinearAttention) for b in relu.blocks)
    relu.load_state_dict(soft.state_dict())
    x = torch.randn(2, 1, 28, 28)
    relu.eval()
    with torch.no_grad(), capture_attention(relu) as maps:
        relu(x)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 17))
    with torch.no_grad():
        tokens = torch.randn(2, 17, 16)
        full = relu.blocks[0].attn(tokens)
        torch.testing.assert_close(relu.blocks[0].attn(tokens, None, slice(0, 1)), full[:, :1])
        with pytest.raises(ValueError, match="no additive attention bias"):
            relu.blocks[0].attn(tokens, torch.zeros(1, 2, 17, 17))
    relu.train()
    relu(x).sum().backward()
    assert all(p.grad is not None for p in relu.parameters() if p.requires_grad)
    relu.save_pretrained(tmp_path / "relu")
    again = from_pretrained(tmp_path / "relu").eval()
    relu.eval()
    assert isinstance(again.blocks[0].attn, ReLULinearAttention)
    with torch.no_grad():
        torch.testing.assert_close(again(x), relu(x))
    with pytest.raises(ValueError, match="attn_kind must be 'softmax' or 'relu_linear'"):
        create_model("vit_fmnist_tiny", attn_kind="cosine", **kw)
