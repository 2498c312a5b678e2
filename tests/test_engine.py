"""The training engine: config, optimizer groups, schedule, exact resume, atomic checkpoints, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitkit
from vitkit.cli import main as cli_main
from vitkit.engine import Trainer, load_config, train
from vitkit.engine.checkpoint import resolve, write_checkpoint
from vitkit.engine.optim import param_groups, warmup_cosine
from vitkit.errors import CheckpointError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]

# A tiny ViT on the built-in 8x8 digits: a run takes about a second.
TINY = [
    "data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
    "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2", "train.batch_size=64",
    "train.progress=false", "optim.lr=3e-3", "schedule.warmup_epochs=0.5",
]


def _weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / name / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ config
def test_recipe_and_overrides():
    cfg = load_config(REPO / "configs/fmnist/vit_tiny.yaml", ["optim.lr=1e-3", "train.epochs=2",
                                                               "model.args.pos_embed=learned_2d"])
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 2 and cfg.model.name == "vit_fmnist_tiny"
    assert cfg.model.args["pos_embed"] == "learned_2d" and cfg.augment.crop == "pad_crop"


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", r"optim\.lrr"),
    ("train.epochs=many", r"train\.epochs"),
    ("augment.crop=diagonal", r"augment\.crop"),
    ("optim.lr=-1", r"optim\.lr=-1"),
    ("train.batch_size=10", r"train\.grad_accum"),
    ("nonsense", "key=value"),
    ("train.bf16=maybe", r"train\.bf16"),
    ("task.name=segment", r"task\.name='segment'.*known tasks: .*classify"),
])
def test_config_errors_name_the_key(override, match):
    extra = ["train.grad_accum=3"] if "batch_size" in override else []
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override, *extra])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*learning_rate"):
        load_config(unknown)


# ------------------------------------------------------------------------------------------------ optimizer
def test_no_weight_decay_on_norms_biases_tokens_and_layer_decay():
    model = vitkit.create_model("vit_fmnist_tiny", depth=2)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embed.weight", "norm.weight", "head.bias", "blocks.0.norm1.weight"} <= plain
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decayed
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.25 and scale["patch_embed.proj.weight"] == 0.125


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.0, warmup_lr=0.0)
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


# ------------------------------------------------------------------------------------------------ training
def test_train_writes_report_plots_and_checkpoints(tmp_path, capsys):
    summary = train(None, [*TINY, "train.epochs=2", f"output_dir={tmp_path / 'run'}"])
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "curves.png", "confusion.png", "config.yaml", "summary.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["eval_top1"] <= 1 for r in rows)
    assert summary["finished"] and summary["best"]["top1"] == max(r["eval_top1"] for r in rows)
    assert summary["final"]["top1"] == rows[-1]["eval_top1"] and summary["final"]["epoch"] == 2
    assert summary["primary_metric"] == "top1" and summary["mode"] == "max" and summary["task"] == "classify"
    assert set(summary["per_class_top1"]) == {str(i) for i in range(10)}
    assert all("train_acc" in r and "train_loss" in r and "eval_top5" in r for r in rows)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["best"] == summary["best"]
    assert summary["train_img_s"] > 0
    captured = capsys.readouterr()
    assert "best eval top1" in captured.out + captured.err and "best checkpoint" in captured.out + captured.err
    best = vitkit.from_pretrained(run / "checkpoints" / "best")
    assert best.pretrained_cfg["class_names"] == [str(i) for i in range(10)]
    assert len(best.pretrained_cfg["mean"]) == 1 and "train_config.yaml" in os.listdir(run / "checkpoints" / "best")


def test_curves_are_drawn_per_evaluation_not_per_epoch(tmp_path, monkeypatch):
    """Many tiny epochs (a 1% data fraction) must not spend their time in matplotlib."""
    import vitkit.viz.plots as plots

    drawn = []
    monkeypatch.setattr(plots, "plot_curves", lambda history, *a, **k: drawn.append(len(history)))
    train(None, [*TINY, "train.epochs=6", "train.eval_every=4", f"output_dir={tmp_path / 'run'}"])
    assert drawn == [4, 6]  # the evaluation at epoch 4, then the last epoch's


AUGMENTED = [*TINY, "augment.crop=pad_crop", "augment.crop_padding=1", "augment.hflip=true",
             "augment.random_erasing=0.25", "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0",
             "model.args.drop_path_rate=0.1", "train.ema_decay=0.9", "train.epochs=2", "train.grad_accum=2"]


def test_resume_is_exact(tmp_path):
    """A run interrupted mid-epoch and resumed ends with the same weights as an uninterrupted run."""
    train(None, [*AUGMENTED, f"output_dir={tmp_path / 'full'}"])
    stopped = train(None, [*AUGMENTED, "train.max_steps=7", f"output_dir={tmp_path / 'cut'}"])
    assert not stopped["finished"] and stopped["steps"] == 7
    resumed = train(None, [], resume=tmp_path / "cut")
    assert resumed["finished"] and resumed["steps"] == 44
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    ema_full = load_file(str(tmp_path / "full/checkpoints/last/ema.safetensors"))
    ema_cut = load_file(str(tmp_path / "cut/checkpoints/last/ema.safetensors"))
    assert all(torch.equal(ema_full[k], ema_cut[k]) for k in ema_full)
    hist = lambda run: [json.loads(x)["eval_top1"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert hist(tmp_path / "full") == hist(tmp_path / "cut")


def test_resume_at_epoch_boundary_and_with_wrong_folder(tmp_path):
    train(None, [*TINY, "train.epochs=2", f"output_dir={tmp_path / 'full'}"])
    train(None, [*TINY, "train.epochs=2", "train.max_steps=22", f"output_dir={tmp_path / 'cut'}"])
    train(None, [], resume=tmp_path / "cut")
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(None, TINY, resume=tmp_path / "empty")


def test_checkpoint_swap_survives_a_crash(tmp_path, monkeypatch):
    model = vitkit.create_model("vit_fmnist_tiny", depth=1)
    folder = tmp_path / "last"
    write_checkpoint(folder, model, {"step": 1})
    real_rename = Path.rename
    calls = {"n": 0}

    def crash_on_second_rename(self, target):
        calls["n"] += 1
        if calls["n"] == 2:  # after the old checkpoint moved aside, before the new one moved in
            raise OSError("power cut")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(OSError, match="power cut"):
        write_checkpoint(folder, model, {"step": 2})
    monkeypatch.undo()
    recovered = resolve(folder)
    assert torch.load(recovered / "train_state.pt", weights_only=True)["step"] == 1


def test_bf16_training_runs(tmp_path):
    summary = train(None, [*TINY, "train.epochs=1", "train.bf16=true", f"output_dir={tmp_path / 'bf'}"])
    assert summary["finished"] and math.isfinite(summary["final"]["top1"])


def test_evaluation_shows_progress_like_training(tmp_path, capsys):
    """The evaluation at the end of an epoch has a bar (on stderr) exactly when training has one."""
    train(None, [*TINY, "train.epochs=1", "train.progress=true", f"output_dir={tmp_path / 'on'}"])
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "eval 1/1" in err
    train(None, [*TINY, "train.epochs=1", f"output_dir={tmp_path / 'off'}"])  # TINY: train.progress=false
    err = capsys.readouterr().err
    assert "epoch 1/1" not in err and "eval 1/1" not in err


def test_task_context_progress_bars(capsys):
    from vitkit.tasks import TaskContext

    data = torch.arange(10.0)
    quiet = TaskContext()  # off by default: library calls and tests print nothing
    assert torch.cat(list(quiet.iterate(data, batch_size=4))).tolist() == data.tolist()
    assert list(quiet.track(range(3), "fit")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    shown = TaskContext(progress=True)
    assert torch.cat(list(shown.iterate(data, batch_size=4, desc="probe features"))).tolist() == data.tolist()
    assert list(shown.track(range(3), "fit probe", unit="epoch")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "probe features" in err and "/3 " in err and "fit probe" in err  # named, with its length
    other_rank = TaskContext(progress=True, rank=1, world_size=2)  # only rank 0 draws bars
    assert len(list(other_rank.iterate(data, batch_size=4))) == 2
    assert capsys.readouterr().err == ""


def _png(path: Path, value: int, size=(8, 8), mode="L") -> None:
    Image.fromarray(np.full(size, value, dtype=np.uint8), mode=mode).save(path)


def test_image_folder_corrupt_images_are_reported(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                _png(root / split / cls / f"{i}.png", 40 + 100 * c + i)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    base = [*TINY, "data.name=image_folder", f"data.root={root}", "data.eval_split=val", "train.batch_size=8",
            "model.args.in_chans=1", "train.epochs=1"]
    with pytest.raises(DataError, match=r"broken\.png"):
        train(None, [*base, f"output_dir={tmp_path / 'r0'}"])
    with pytest.warns(UserWarning, match=r"broken\.png"):
        summary = train(None, [*base, "data.max_bad_images=1", f"output_dir={tmp_path / 'r1'}"])
    assert summary["finished"]


def test_eval_defaults_to_the_runs_own_folder_and_split(tmp_path, capsys):
    """`vitkit eval RUN` of a run trained on the user's own folder scores its own eval split, not Fashion-MNIST;
    `--data image_folder` alone also takes the run's folder."""
    root = tmp_path / "imgs"
    for split, count in (("train", 8), ("val", 5)):
        for c, cls in enumerate(("ant", "bee", "cow")):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                _png(root / split / cls / f"{i}.png", 30 + 80 * c + i)
    run = tmp_path / "run"
    train(None, [*TINY, "data.name=image_folder", f"data.root={root}", "data.eval_split=val", "train.batch_size=8",
                 "model.args.in_chans=1", "train.epochs=1", f"output_dir={run}"])
    from vitkit.tools.evaluate import evaluate_checkpoint

    metrics, task = evaluate_checkpoint(run)
    assert task.name == "classify" and metrics["count"] == 15 and metrics["class_names"] == ["ant", "bee", "cow"]
    assert cli_main(["eval", str(run), "--data", "image_folder"]) == 0
    assert "15" in capsys.readouterr().out
    assert cli_main(["eval", str(run), "--data", "image_folder", "--split", "train"]) == 0
    assert "24" in capsys.readouterr().out
    assert cli_main(["eval", str(run), "--data", "digits"]) == 2  # another dataset: its classes do not fit
    assert "predicts 3 classes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_eval_predict(tmp_path, capsys):
    run = tmp_path / "cli"
    args = [a for item in TINY for a in ("--set", item)]
    assert cli_main(["train", *args, "--set", "train.epochs=1", "--output-dir", str(run)]) == 0
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--data", "digits", "--confusion", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "per-class accuracy" in out and (tmp_path / "c.png").is_file()
    _png(tmp_path / "a.png", 200, size=(16, 16))
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    assert cli_main(["predict", str(run), str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("%") == 6 and "a.png" in out
    assert cli_main(["predict", str(run), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert cli_main(["predict", str(run), str(tmp_path / "bad.png")]) == 2
    assert "bad.png: cannot load image" in capsys.readouterr().err
    assert cli_main(["train", "--set", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err
    assert cli_main(["models", "vit_fmnist*"]) == 0
    assert "vit_fmnist_tiny" in capsys.readouterr().out
    # what a classifier's task cannot do is refused in one line, named by the task, not by a model class check
    for cmd in (["zeroshot", str(run), str(tmp_path / "a.png"), "--classes", "a,b"],
                ["retrieve", str(run), str(tmp_path / "a.png"), "--text", "a bag"],
                ["sample", str(run), "--class", "0"]):
        assert cli_main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'classify' task" in err and "cannot do" in err, err


# ------------------------------------------------------------------------------------------------ distributed
def test_ddp_two_processes_match_single_process(tmp_path):
    """2 CPU processes (gloo) with the same global batch reach the same weights as 1 process.

    Tolerance: 1e-5 max abs difference after 22 AdamW steps; gradients are averaged in another order, so
    bit-exactness is not expected.
    """
    common = [*TINY, "train.epochs=1", "augment.label_smoothing=0.1"]
    train(None, [*common, f"output_dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitkit.cli",
           "train", *[a for item in common for a in ("--set", item)], "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff <= 1e-5, diff
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 22


def test_trainer_rejects_indivisible_batch():
    cfg = load_config(None, [*TINY, "train.batch_size=63", "train.grad_accum=1"])
    from vitkit.engine.distributed import DistInfo

    with pytest.raises(ConfigError, match="divisible by processes"):
        Trainer(cfg, dist=DistInfo(world_size=2))


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs" / "fmnist").glob("*.yaml")))
def test_every_shipped_recipe_loads_and_builds(recipe):
    """A typo in a shipped recipe (key, value, model or task argument) must fail here, not an hour into a run:
    the recipe's task builds its model and takes one training step on a 28x28 stand-in for Fashion-MNIST."""
    from vitkit.data import build_dataset
    from vitkit.data.transforms import AugmentConfig
    from vitkit.tasks import TaskContext, build_task

    cfg = load_config(REPO / "configs" / "fmnist" / recipe)
    cfg.model.pretrained = None  # fine-tuning recipes point at a pretraining run
    cfg.task.args.pop("distill_teacher", None)  # distillation recipes at a teacher run (tests/test_distill.py)
    stand_in = build_dataset("digits", "train", image_size=28, num_channels=1)
    ctx = TaskContext(augment=AugmentConfig(**vars(cfg.augment)), train_set=stand_in, eval_set=stand_in)
    task = build_task(cfg.task.name, cfg.task.args, ctx)
    model = task.build_model(cfg.model)
    assert tuple(model.pretrained_cfg["input_size"]) == (1, 28, 28)
    task.setup(model)
    batch = task.train_dataset(stand_in).__getitems__(list(range(8)))
    loss, stats = task.training_step(model, task.prepare_batch(batch, train=True))
    loss.backward()
    assert torch.isfinite(loss) and stats["count"] == 8
