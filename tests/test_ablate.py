"""A tiny ablation: 2 variants x 1 seed on digits gives a table and a plot, and resumes without retraining."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import vitkit.tools.ablate as ablate
from vitkit.cli import main as cli_main
from vitkit.errors import ConfigError

TINY = ["data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
        "model.args.embed_dim=16", "model.args.depth=1", "model.args.num_heads=2", "train.batch_size=64",
        "train.epochs=1", "train.max_steps=null"]


def test_tiny_ablation_table_plot_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--recipe", "configs/fmnist/vit_tiny.yaml", "--study", "pos_embed", "--seeds", "1",
            "--variants", "none,learned_1d", "--output-dir", str(out), *[a for o in TINY for a in ("--set", o)]]
    assert cli_main(args) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["final"]["top1"] <= 1 for r in rows)
    table = (out / "ablation_pos_embed.md").read_text()
    assert "| none |" in table and "| learned_1d |" in table and "± " in table
    assert (out / "ablation_pos_embed.png").stat().st_size > 1000
    assert "results:" in capsys.readouterr().out

    calls = []
    monkeypatch.setattr(ablate, "train", lambda *a, **k: calls.append(a) or pytest.fail("retrained a done run"))
    assert cli_main(args) == 0
    assert calls == [] and len((out / "results.jsonl").read_text().splitlines()) == 2


def test_shared_variants_are_trained_once_and_lr_sweep(tmp_path, monkeypatch):
    seen = []

    def fake_train(recipe, overrides, resume=None, **kw):
        seen.append(tuple(overrides))
        lr = next(float(o.split("=")[1]) for o in overrides if o.startswith("optim.lr=")) \
            if any(o.startswith("optim.lr=") for o in overrides) else 2e-3
        return {"final": {"top1": 0.5 + lr}, "best": {"top1": 0.5 + lr}, "params": 10, "train_img_s": 1.0,
                "train_wall_clock_s": 1.0}

    monkeypatch.setattr(ablate, "train", fake_train)
    rows = ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["pooling", "overlap"], 2, tmp_path, TINY)
    n_lr = len(ablate.STUDIES["pooling"].lr_multipliers)
    assert len([r for r in rows if r["study"] == "pooling"]) == 2 * n_lr * 2
    assert len(seen) == 2 * n_lr * 2 + 2  # overlap's non-overlapping variant equals the base recipe: no new run
    table = (tmp_path / "ablation_pooling.md").read_text()
    assert table.count("(best lr)") == 2


def test_data_size_keeps_optimizer_steps(tmp_path, monkeypatch):
    epochs = {}
    monkeypatch.setattr(ablate, "train", lambda recipe, over, resume=None, **kw: epochs.setdefault(
        next(o for o in over if o.startswith("data.train_fraction")), [o for o in over if o.startswith("train.ep")])
        and {"final": {"top1": 0.1}, "best": {"top1": 0.1}, "params": 1, "train_img_s": 1.0, "train_wall_clock_s": 1.0})
    ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["data_size"], 1, tmp_path, [*TINY, "train.epochs=3"],
                        variants=["pure_10pct", "pure_100pct"])
    assert epochs["data.train_fraction=0.1"][-1] == "train.epochs=30"
    assert epochs["data.train_fraction=1.0"][-1] == "train.epochs=3"


def test_unknown_study_and_variant(tmp_path):
    with pytest.raises(ConfigError, match="unknown study"):
        ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["colour"], 1, tmp_path)
    with pytest.raises(ConfigError, match="none of"):
        ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["pos_embed"], 1, tmp_path, TINY, variants=["x"])


def test_parallel_jobs_train_each_run_once_in_worker_processes(tmp_path):
    """--jobs 2: two real (tiny) trainings in spawned workers, recorded once each, then nothing left to do."""
    out = tmp_path / "abl"
    rows = ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["pos_embed"], 1, out, TINY,
                               variants=["none", "learned_1d"], jobs=2)
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in results) == sorted(r["key"] for r in rows) and len(results) == 2
    assert {r["variant"] for r in rows} == {"none", "learned_1d"}
    threads = max(1, (os.cpu_count() or 1) // 2)
    for r in results:  # each worker ran with cores // jobs threads, recorded in its resolved config
        assert f"threads: {threads}" in (Path(r["run_dir"]) / "config.yaml").read_text()
    again = ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["pos_embed"], 1, out, TINY,
                                variants=["none", "learned_1d"], jobs=2)
    assert [r["final"] for r in again] == [r["final"] for r in rows]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="jobs"):
        ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["pos_embed"], 1, out, TINY, jobs=0)


def test_ssl_study_fills_pretrained_checkpoints_and_matches_steps(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ablate, "train", lambda recipe, over, resume=None, **kw: seen.append(over) or {
        "final": {"top1": 0.5}, "best": {"top1": 0.5}, "params": 1, "train_img_s": 1.0, "train_wall_clock_s": 1.0})
    with pytest.raises(ConfigError, match=r"--pretrained mae=PATH"):
        ablate.run_ablation("configs/fmnist/finetune_tiny.yaml", ["ssl"], 1, tmp_path, TINY)
    assert ablate.STUDIES["ssl"].needs_pretrained and not ablate.STUDIES["pos_embed"].needs_pretrained
    ablate.run_ablation("configs/fmnist/finetune_tiny.yaml", ["ssl"], 1, tmp_path, [*TINY, "train.epochs=2"],
                        pretrained={"mae": "runs/m", "contrastive": "runs/c"})
    mae_1 = next(o for o in seen if "model.pretrained=runs/m" in o and "data.train_fraction=0.01" in o)
    assert "train.epochs=20" in mae_1 and "optim.layer_decay=0.75" in mae_1 and "train.eval_every=4" in mae_1
    assert "schedule.warmup_epochs=10" in mae_1
    scratch_10 = next(o for o in seen if "data.train_fraction=0.1" in o and not any("pretrained" in x for x in o))
    assert "train.epochs=2" in scratch_10 and "optim.layer_decay=0.75" not in scratch_10
    table = (tmp_path / "ablation_ssl.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "Δ vs first of its group" in table
    assert "| — |" in rows["scratch_10pct"] and "| — |" in rows["scratch_1pct"] and "| — |" not in rows["mae_10pct"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_die_with_a_killed_ablate(tmp_path):
    """Killing `vitkit ablate` (even with SIGKILL) must not leave its trainings running as orphans."""
    import signal
    import subprocess
    import textwrap
    import time

    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from vitkit.tools.ablate import die_with_parent

        def work(path):
            open(path, "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=die_with_parent) as pool:
                pool.submit(work, {str(tmp_path / "child.pid")!r}).result()
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    pid_file = tmp_path / "child.pid"
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:  # a zombie waiting for init counts as gone
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the worker outlived its killed parent")


def test_studies_are_data_and_a_file_of_ones_own_works(tmp_path):
    """vitkit's studies come from studies.yaml (no study is code); a user's file has the same form, and a
    malformed one fails naming the file and the study."""
    assert {"pos_embed", "pooling", "data_size", "ssl", "window"} <= set(ablate.STUDIES)
    assert ablate.STUDIES["pooling"].lr_multipliers == (0.5, 1.0, 2.0, 4.0)
    assert [v.label for v in ablate.STUDIES["hybrid"].variants] == ["pure", "hybrid"]
    mine = tmp_path / "studies.yaml"
    mine.write_text("studies:\n  depth:\n    claim: Deeper is better.\n    variants:\n      d1: [model.args.depth=1]\n"
                    "      d2: [model.args.depth=2]\n")
    studies = ablate.load_studies(mine)
    assert studies["depth"].claim == "Deeper is better." and len(studies["depth"].variants) == 2
    mine.write_text("studies:\n  depth:\n    claim: x\n    variants: {d1: model.args.depth=1}\n")
    with pytest.raises(ConfigError, match=r"studies.yaml: study 'depth', variant 'd1'"):
        ablate.load_studies(mine)
    mine.write_text("studies:\n  depth:\n    claim: x\n    seeds: 3\n    variants: {d1: []}\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['seeds'\]"):
        ablate.load_studies(mine)


def test_lr_pick_on_validation_and_one_row_per_study_membership(tmp_path, monkeypatch):
    """With a held-out split the sweep's pick follows validation (not test); a run shared by two studies is
    trained once and written as a row of each; the table carries the verdicts of the study's checks."""
    def fake_train(recipe, overrides, resume=None, **kw):
        lr = float(next((o.split("=")[1] for o in overrides if o.startswith("optim.lr=")), 2e-3))
        seed = int(next(o.split("=")[1] for o in overrides if o.startswith("train.seed=")))
        gap = any("pool=gap" in o for o in overrides)
        val = 0.80 + (0.05 if lr < 2e-3 else 0.0) + 0.001 * seed  # validation favours the smallest lr
        test = 0.80 + (0.05 if lr > 5e-3 else 0.0) + 0.002 * seed + (0.001 if gap else 0.0)  # test the largest
        return {"primary_metric": "top1", "eval_split": "val", "final": {"top1": val, "epoch": 1},
                "best": {"top1": val, "epoch": 1}, "test": {"top1": test}, "params": 10, "train_img_s": 1.0,
                "train_wall_clock_s": 1.0}

    monkeypatch.setattr(ablate, "train", fake_train)
    results = tmp_path / "kept" / "results.jsonl"
    ablate.run_ablation("configs/fmnist/vit_tiny.yaml", ["pooling", "overlap"], 2, tmp_path / "out", TINY,
                        results=results)
    rows = ablate.read_results(results)
    base = [r for r in rows if r["variant"] in ("cls", "non_overlapping") and r["lr_mult"] == 1.0]
    assert {r["study"] for r in base} == {"pooling", "overlap"} and len({r["key"] for r in base}) == 2  # 2 seeds
    assert all(r["machine"]["cores"] and r["test"]["top1"] for r in rows)
    table = (tmp_path / "out" / "ablation_pooling.md").read_text()
    best = [line for line in table.splitlines() if "(best lr)" in line]
    assert len(best) == 2 and all("| 0.001 |" in line for line in best)  # the smallest lr: picked on val
    assert "picked on the validation split" in table and "val top-1" in table
    assert "GAP and CLS at their own best lr barely differ" in table and "**holds**" in table


def test_checks_are_validated(tmp_path):
    mine = tmp_path / "studies.yaml"
    mine.write_text("studies:\n  depth:\n    claim: x\n    variants: {d1: [], d2: []}\n"
                    "    checks: [{says: deeper, contrast: {d2: 1, d3: -1}, expect: above}]\n")
    with pytest.raises(ConfigError, match=r"names \['d3'\], not variants"):
        ablate.load_studies(mine)
    mine.write_text("studies:\n  depth:\n    claim: x\n    variants: {d1: [], d2: []}\n"
                    "    checks: [{says: same, contrast: {d2: 1, d1: -1}, expect: within}]\n")
    with pytest.raises(ConfigError, match="needs a 'margin'"):
        ablate.load_studies(mine)


@pytest.mark.parametrize("study", ["vit_cnn_data", "sparse_window", "transfer_heldout", "transfer_digits",
                                   "ssl_size"])
def test_every_variant_of_the_new_studies_builds_its_model(study, tmp_path):
    """Each variant's overrides of the study's own recipe give a valid config whose model builds, loads its
    pretrained checkpoint (made here: the pretraining models on five classes, and an MAE) and runs."""
    import warnings

    import vitkit
    from vitkit.engine.config import load_config
    from vitkit.tools.ablate import _variant_overrides, load_studies

    pretrained = {}
    for name, model_name in (("vit_sup", "vit_fmnist_tiny"), ("hybrid_sup", "vit_fmnist_hybrid_tiny"),
                             ("resnet_sup", "resnet_fmnist_tiny"), ("vit_mae", "mae_vit_fmnist_tiny")):
        kw = {} if name == "vit_mae" else {"num_classes": 5}
        vitkit.create_model(model_name, **kw).save_pretrained(tmp_path / name)
        pretrained[name] = str(tmp_path / name)
    for size, (dim, depth, heads) in {"s": (48, 6, 3), "m": (96, 6, 3), "l": (160, 8, 4)}.items():
        encoder = {"embed_dim": dim, "depth": depth, "num_heads": heads}
        vitkit.create_model("mae_vit_fmnist_tiny", encoder_args=encoder).save_pretrained(tmp_path / f"mae_{size}")
        pretrained[f"mae_{size}"] = str(tmp_path / f"mae_{size}")
    s = load_studies()[study]
    base = load_config(s.recipe)
    names = set()
    for variant in s.variants:
        cfg = load_config(s.recipe, _variant_overrides(s, variant, 1.0, base, pretrained))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the five-class heads are dropped, as announced
            model = vitkit.create_model(cfg.model.name, pretrained=cfg.model.pretrained, **cfg.model.args).eval()
        c, h, w = model.pretrained_cfg["input_size"]
        with torch.no_grad():
            assert model(torch.randn(2, c, h, w)).shape == (2, 10)
        names.add((cfg.model.name, cfg.optim.name))
    assert len(names) == (1 if study in ("sparse_window", "ssl_size") else 3)


def test_a_study_with_its_own_recipe_runs_on_it(monkeypatch):
    """A study that names a recipe (scenes, data sizes) is its --recipe's default; `--study all` on another
    recipe leaves it out; several studies of different recipes need --recipe."""
    ran = []
    monkeypatch.setattr(ablate, "run_ablation", lambda recipe, studies, *a, **k: ran.append((recipe, studies)))
    monkeypatch.setattr(ablate.Path, "read_text", lambda self, *a, **k: "")
    args = lambda **kw: type("A", (), {"studies_file": None, "pretrained": [], "variants": None, "seeds": 1,  # noqa: E731
                                        "output_dir": "o", "overrides": [], "jobs": 1, "results": None,
                                        "backend": "local", "address": None, **kw})()
    ablate.run_ablate_args(args(study=["sparse_window"], recipe=None))
    assert ran[-1] == ("configs/scenes/sparse_window.yaml", ["sparse_window"])
    ablate.run_ablate_args(args(study=["all"], recipe="configs/fmnist/ablation.yaml"))
    assert "sparse_window" not in ran[-1][1] and "vit_cnn_data" not in ran[-1][1] and "pooling" in ran[-1][1]
    with pytest.raises(ConfigError, match="different recipes"):
        ablate.run_ablate_args(args(study=["sparse_window", "vit_cnn_data"], recipe=None))
    with pytest.raises(ConfigError, match="not every study named"):
        ablate.run_ablate_args(args(study=["pooling"], recipe=None))
