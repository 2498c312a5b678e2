"""SparseViT: window pruning in a Swin stage, sparsity-aware adaptation, and the latency-constrained search."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: F401  (fixture)
from vitkit.engine.config import config_to_yaml, load_config
from vitkit.errors import ConfigError
from vitkit.layers.window_attention import window_partition
from vitkit.models.swin import SwinTransformer
from vitkit.tools.search import (
    Candidate,
    LatencyTable,
    evolutionary_search,
    measure_latency_table,
    pareto_front,
    run_data_args,
    run_search,
)


def _model(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=2, in_chans=1, num_classes=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                window_size=4, drop_path_rate=0.0)
    return SwinTransformer(**{**args, **kw}).eval()


def test_ratio_one_is_the_dense_model_exactly():
    model = _model()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        dense = model(x)
        model.set_keep_ratios([1.0, 1.0])
        assert torch.equal(model(x), dense)
    # with unshifted stages, keeping every window through the pruned path is the dense stage too
    flat = _model(depths=(1, 1))
    emb = flat.embed(x)
    with torch.no_grad():
        pruned, idx = flat.stages[0].run_pruned(emb, 1.0)
        assert idx.shape == (2, 16)
        torch.testing.assert_close(pruned, flat.stages[0].run_blocks(emb), atol=1e-6, rtol=0)


def test_kept_windows_are_the_top_l2_ones_and_the_rest_pass_through():
    model = _model()
    stage = model.stages[0]
    torch.manual_seed(1)
    x = torch.randn(2, 16, 16, 16) * 0.1
    loud = {0: [3, 9, 14], 1: [0, 5, 6]}  # per image, windows made to have the largest norms
    for b, windows in loud.items():
        for w in windows:
            r, c = divmod(w, 4)
            x[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4] *= 30
    with torch.no_grad():
        out, idx = stage.run_pruned(x, 3 / 16)
        assert [sorted(i.tolist()) for i in idx] == [loud[0], loud[1]]
        win_in, win_out = window_partition(x, 4).reshape(2, 16, 16, 16), window_partition(out, 4).reshape(2, 16, 16, 16)
        for b in range(2):
            for w in range(16):
                if w in loud[b]:  # kept: the stage's blocks applied to that window alone
                    alone = win_in[b, w].reshape(1, 4, 4, 16)
                    for blk in stage.blocks:
                        alone = blk(alone)
                    torch.testing.assert_close(win_out[b, w], alone.reshape(16, 16))
                else:  # pruned: unchanged
                    assert torch.equal(win_out[b, w], win_in[b, w])


def test_keep_ratios_change_at_run_time_and_are_checked():
    model = _model()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        dense = model(x)
        model.set_keep_ratios([0.25, 1.0])
        assert model.keep_ratios == (0.25, 1.0) and not torch.allclose(model(x), dense)
    with pytest.raises(ValueError, match="keep ratios"):
        model.set_keep_ratios([0.0, 1.0])
    with pytest.raises(ValueError, match="keep ratios"):
        model.set_keep_ratios([0.5])
    with pytest.raises(ValueError, match="window_keep_ratios"):
        _model(window_keep_ratios=(0.5,))
    built = _model(window_keep_ratios=(0.5, 1.0))
    assert built.keep_ratios == (0.5, 1.0)


def test_sparsity_aware_adaptation_draws_ratios_per_step_reproducibly():
    model = _model(keep_ratio_choices=(0.25, 0.5, 1.0)).train()
    seen = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        seen.append(model._step_ratios())
    assert seen[0] == seen[1] and all(r in (0.25, 0.5, 1.0) for r in seen[0])
    torch.manual_seed(0)
    draws = {tuple(model._step_ratios()) for _ in range(30)}
    assert len(draws) > 1  # different steps train different ratios
    x = torch.randn(2, 1, 32, 32)
    model(x).sum().backward()  # trains through pruned stages
    assert all(p.grad is not None for n, p in model.named_parameters() if "stages.0.blocks" in n)
    model.eval()
    assert model._step_ratios() == [None, None]  # evaluation uses the set ratios


def _toy_latency(ratios):
    return 1.0 + 4 * ratios[0] + 2 * ratios[1] + ratios[2]


def _toy_metric(ratios):
    return ratios[0] * 0.5 + ratios[1] * 0.3 + ratios[2] * 0.2 - 0.01 * sum(r == 1.0 for r in ratios)


def test_search_respects_the_budget_before_evaluating_and_is_seeded():
    calls = []

    def evaluate(r):
        calls.append(r)
        return _toy_metric(r)

    a = evolutionary_search(evaluate, _toy_latency, 3, budget_ms=4.0, population=8, generations=4, seed=3)
    assert a and all(c.latency_ms <= 4.0 for c in a)
    assert all(_toy_latency(r) <= 4.0 for r in calls)  # nothing over budget was ever evaluated
    b = evolutionary_search(_toy_metric, _toy_latency, 3, budget_ms=4.0, population=8, generations=4, seed=3)
    assert [c.ratios for c in a] == [c.ratios for c in b]
    c = evolutionary_search(_toy_metric, _toy_latency, 3, budget_ms=4.0, population=8, generations=4, seed=4)
    assert [x.ratios for x in c] != [x.ratios for x in a]
    assert a[0].metric == max(x.metric for x in a)
    with pytest.raises(ConfigError, match="no candidate fits"):
        evolutionary_search(_toy_metric, _toy_latency, 3, budget_ms=0.5)


def test_pareto_front():
    cands = [Candidate((1.0,), 3.0, 0.9), Candidate((0.5,), 2.0, 0.8), Candidate((0.4,), 2.5, 0.7),
             Candidate((0.2,), 1.0, 0.5)]
    assert [c.ratios for c in pareto_front(cands)] == [(0.2,), (0.5,), (1.0,)]


def test_latency_table_prices_candidates():
    model = _model()
    table = measure_latency_table(model, torch.randn(2, 1, 32, 32), (0.25, 1.0), repeats=2)
    assert isinstance(table, LatencyTable) and len(table.stage_ms) == 2
    assert table.predict((1.0, 1.0)) > 0 and table.fixed_ms >= 0
    assert model.keep_ratios == (1.0, 1.0)  # restored


def test_search_end_to_end_on_a_tiny_scene_model(tmp_path, data_no_system_dirs):  # noqa: F811
    write_fake_fmnist(tmp_path / "fm", n_train=40, n_test=10)
    model = vitkit.create_model("swin_scenes_tiny", img_size=64, embed_dim=8, depths=[1, 1], num_heads=[2, 2])
    model.pretrained_cfg = {**model.pretrained_cfg, "task": "multilabel"}  # as training with that task records
    model.save_pretrained(tmp_path / "ckpt")
    # the scenes come from the run's own settings (as training saves them), not from arguments
    data_args = {"data_dir": str(tmp_path / "fm"), "num_eval_scenes": 24, "canvas": 64, "max_items": 2}
    overrides = ["task.name=multilabel", "data.name=fmnist_scenes"]
    cfg = load_config(None, overrides + [f"data.args.{k}={v}" for k, v in data_args.items()])
    (tmp_path / "ckpt" / "train_config.yaml").write_text(config_to_yaml(cfg))
    assert run_data_args(tmp_path / "ckpt", "fmnist_scenes") == data_args
    assert run_data_args(tmp_path / "ckpt", "fashion_mnist") == {}
    out = run_search(tmp_path / "ckpt", [1e6], tmp_path / "search", split="val", eval_images=24, latency_batch=2,
                     choices=(0.5, 1.0), population=3, generations=1, speedups=[1.0], log=lambda s: None)
    report = json.loads((tmp_path / "search" / "search.json").read_text())
    assert (tmp_path / "search" / "pareto.png").is_file() and report["pareto_front"]
    best = out["budgets"]["1e+06ms"]["best"]
    assert best["latency_ms"] <= 1e6 and 0 <= best["metric"] <= 1
    # a speed-up target is a budget of the dense latency the table predicts, divided by the target
    saved = report["latency_table"]
    stage_ms = [{float(k): v for k, v in t.items()} for t in saved["stage_ms"]]
    table = LatencyTable(**{**saved, "choices": (0.5, 1.0), "stage_ms": stage_ms})
    assert out["budgets"]["1x"]["budget_ms"] == pytest.approx(table.predict((1.0, 1.0)))
    assert out["budgets"]["1x"]["best"]["latency_ms"] <= out["budgets"]["1x"]["budget_ms"]
    with pytest.raises(ConfigError, match="budgets"):
        run_search(tmp_path / "ckpt", [], tmp_path / "search", log=lambda s: None)
    # a shared table is used as given (no re-timing), and a budget nothing fits is reported, not fatal
    table.stage_ms = [{0.5: 1.0, 1.0: 2.0}, {0.5: 1.0, 1.0: 2.0}]
    table.fixed_ms = 1.0
    out = run_search(tmp_path / "ckpt", [2.5, 4.0], tmp_path / "search2", eval_images=24, latency_batch=2,
                     choices=(0.5, 1.0), population=3, generations=1, table=table, log=lambda s: None)
    assert out["budgets"]["2.5ms"]["best"] is None and "no candidate fits" in out["budgets"]["2.5ms"]["why"]
    best = out["budgets"]["4ms"]["best"]
    assert best["latency_ms"] == table.predict(tuple(best["ratios"])) <= 4.0 and tuple(best["ratios"]) != (1.0, 1.0)
    with pytest.raises(ConfigError, match="latency table"):
        run_search(tmp_path / "ckpt", [4.0], tmp_path / "search3", choices=(0.25, 1.0), table=table,
                   log=lambda s: None)


def test_search_asks_for_the_capability_not_a_family(tmp_path):
    from vitkit.tools.search import can_prune_windows, measure_latency

    assert can_prune_windows(_model())
    vit = vitkit.create_model("vit_fmnist_tiny", embed_dim=16, depth=1, num_heads=2)
    assert not can_prune_windows(vit)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="per-stage window keep ratios.*configs/scenes/swin_adapt.yaml"):
        run_search(tmp_path / "vit", [5.0], tmp_path / "out", log=lambda s: None)
    model = _model()
    assert measure_latency(model, torch.randn(2, 1, 32, 32), (0.25, 1.0), repeats=2) > 0
    assert model.keep_ratios == (1.0, 1.0)  # the timer switched ratios and restored them


def test_cli_search_needs_a_budget_and_says_so(tmp_path, capsys):
    from vitkit.cli import main

    _model().save_pretrained(tmp_path / "ckpt")
    assert main(["sparsevit", "search", str(tmp_path / "ckpt")]) == 2
    assert "--budget-ms" in capsys.readouterr().err
    assert main(["sparsevit", "search", str(tmp_path / "ckpt"), "--speedup", "0"]) == 2
    assert "> 0" in capsys.readouterr().err
    # every option explains itself, and the help names the run the search needs
    import argparse

    from vitkit.tools.search import add_sparsevit_args

    parser = argparse.ArgumentParser()
    add_sparsevit_args(parser)
    search = parser._subparsers._group_actions[0].choices["search"]
    assert [a.dest for a in search._actions if not a.help] == []
    assert "configs/scenes/swin_adapt.yaml" in search.format_help()
