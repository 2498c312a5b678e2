"""The var and hart tasks (next-scale generators on a frozen multi-scale tokenizer) and `vitkit sample`, on tiny
models and the 8×8 digits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitkit.engine.config import ModelConfig
from vitkit.engine.trainer import train
from vitkit.errors import ConfigError
from vitkit.models.hart import HART
from vitkit.models.var import VAR
from vitkit.models.vqvae import MultiScaleVQVAE
from vitkit.tasks import TaskContext, build_task
from vitkit.tasks.var import HARTTask, VARTask
from vitkit.tools.predict import sample_run

V, SCALES = 16, (1, 2, 4)  # vocabulary and scales of the tiny tokenizer (8×8 digits -> 4×4 latent, L = 21)
L = sum(p * p for p in SCALES)
TINY_VQ = dict(vocab_size=V, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, in_channels=1,
               patch_nums=SCALES)
TINY_VAR = dict(depth=2, embed_dim=32, num_heads=2)
TINY_HART = dict(TINY_VAR, diff_width=32, diff_depth=1, diff_sampling_steps=2, diffusion_batch_mul=2)
ARGS = {"var": TINY_VAR, "hart": TINY_HART}


def _digits(split: str = "test"):
    from vitkit.data import build_dataset

    return build_dataset("digits", split, download=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny untrained multi-scale tokenizer saved as a checkpoint folder (the tasks only need it frozen)."""
    folder = tmp_path_factory.mktemp("msvq") / "vq"
    torch.manual_seed(0)
    MultiScaleVQVAE(**TINY_VQ).eval().save_pretrained(folder)
    return folder


def _task(name: str, tokenizer, **args):
    data = _digits()
    ctx = TaskContext(train_set=data, eval_set=data)
    task = build_task(name, {"tokenizer": str(tokenizer), "samples_per_class": 2, **args}, ctx)
    torch.manual_seed(0)
    model = task.build_model(ModelConfig(name=f"{name}_fmnist_tiny", args=dict(ARGS[name])))
    task.setup(model)
    batch = task.prepare_batch(data.__getitems__(list(range(16))), train=False)
    return task, model, batch


@pytest.mark.parametrize("name", ["var", "hart"])
def test_task_steps_evaluates_and_draws_samples(name, tokenizer, tmp_path):
    task, model, batch = _task(name, tokenizer, diffusion_weight=0.5) if name == "hart" else _task(name, tokenizer)
    assert isinstance(task, HARTTask if name == "hart" else VARTask)
    assert (task.primary_metric, task.mode) == ("nll", "min")
    assert type(model) is (HART if name == "hart" else VAR)
    assert (model.vocab_size, model.patch_nums, model.num_classes) == (V, SCALES, 10)  # tokenizer's and data's
    assert model.pretrained_cfg["input_size"] == (1, 8, 8) and model.pretrained_cfg["tokenizer"] == str(tokenizer)
    loss, stats = task.training_step(model.train(), batch)
    loss.backward()
    assert stats["count"] == 16 and math.isfinite(stats["nll"])
    assert stats["nll"] / 16 == pytest.approx(math.log(V), rel=0.1)  # a fresh head: near-uniform logits
    expected = stats["nll"] + 0.5 * stats["diffusion"] if name == "hart" else stats["nll"]
    assert stats["loss"] == pytest.approx(expected, rel=1e-5) and loss.item() * 16 == pytest.approx(stats["loss"])
    metrics = task.evaluate(model.eval(), [batch, batch])
    assert metrics["count"] == 32 and metrics["bits_per_token"] == pytest.approx(metrics["nll"] / math.log(2))
    assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_token"] * L)
    assert [k for k in metrics if k.startswith("acc_")] == ["acc_1x1", "acc_2x2", "acc_4x4"]
    assert ("diffusion" in metrics) == (name == "hart")
    assert metrics == task.evaluate(model, [batch, batch])  # deterministic (hart: seeded diffusion noise)
    assert task.write_artifacts(model, metrics, tmp_path) == [f"{name}_samples.png"]
    assert (tmp_path / f"{name}_samples.png").is_file()
    images = task.sample_images(model, torch.tensor([0, 3, -1]))
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1  # normalised, mean = std = 0.5
    assert torch.equal(images, task.sample_images(model, torch.tensor([0, 3, -1])))  # sample_seed
    assert "accuracy per scale" in task.format_report(metrics)


@pytest.mark.parametrize("name", ["var", "hart"])
def test_loss_falls_on_a_fixed_batch(name, tokenizer):
    task, model, batch = _task(name, tokenizer)
    model.cond_drop_rate = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(0)  # hart: the same diffusion timesteps and noise every step
        loss, stats = task.training_step(model.train(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((stats["nll"] / 16, stats.get("diffusion", 0.0) / 16))
    assert losses[-1][0] < 0.6 * losses[0][0]
    if name == "hart":
        assert losses[-1][1] < losses[0][1]


def test_hart_task_loss_is_harts_training_loss(tokenizer):
    """The task's single pass (logits kept for the NLL and per-scale accuracy) computes HART.training_loss."""
    task, model, batch = _task("hart", tokenizer)
    model.eval()
    x, gt, residual = task.tokenize(batch[0])
    logits, diff = task._forward(model, batch[1], x, gt, residual, torch.Generator().manual_seed(1))
    ce, ref = model.training_loss(batch[1], x, gt, residual, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(task._ce(logits, gt).mean(), ce)
    torch.testing.assert_close(diff, ref)
    # the residual completes the tokens: f̂(idx) + r is the encoder's f
    tok = task.tokenizer()
    idx = list(gt.split([p * p for p in SCALES], dim=1))
    torch.testing.assert_close(tok.idx_to_fhat(idx, last_one=True) + residual, tok.encode(batch[0]))


def test_tasks_refuse_a_tokenizer_or_model_that_does_not_fit(tokenizer, tmp_path):
    from vitkit.models.vqvae import SingleScaleVQVAE

    single = tmp_path / "single"
    SingleScaleVQVAE(**{**TINY_VQ, "patch_nums": (4,)}).save_pretrained(single)
    with pytest.raises(ConfigError, match="needs a multi-scale VQ tokenizer"):
        build_task("var", {"tokenizer": str(single)}).tokenizer()
    with pytest.raises(ConfigError, match="needs a single-scale VQ tokenizer"):
        build_task("ar", {"tokenizer": str(tokenizer)}).tokenizer()
    with pytest.raises(ConfigError, match="needs task.args.tokenizer"):
        build_task("hart", {}).tokenizer()
    task = build_task("var", {"tokenizer": str(tokenizer)}, TaskContext(train_set=_digits()))
    with pytest.raises(ConfigError, match="does not fit this VAR"):
        task.build_model(ModelConfig(name="var_fmnist_tiny", args={**TINY_VAR, "vocab_size": 32}))
    with pytest.raises(ConfigError, match="trains a HART"):
        build_task("hart", {"tokenizer": str(tokenizer)}).build_model(ModelConfig(name="var_fmnist_tiny",
                                                                                  args=TINY_VAR))
    with pytest.raises(ConfigError, match="diffusion_weight"):
        build_task("hart", {"tokenizer": str(tokenizer), "diffusion_weight": -1})


def test_train_hart_then_vitkit_sample_writes_a_grid(tokenizer, tmp_path, capsys):
    """One tiny epoch through the engine, then `vitkit sample` by class name and by index."""
    from PIL import Image

    from vitkit.cli import main as cli_main

    args = [f"model.args.{k}={json.dumps(v)}" for k, v in TINY_HART.items()]
    summary = train(None, ["data.name=digits", "train.batch_size=128", "train.progress=false", "train.epochs=1",
                           "schedule.warmup_epochs=0.2", "task.name=hart", f"task.args.tokenizer={tokenizer}",
                           "task.args.samples_per_class=1", "model.name=hart_fmnist_tiny", *args,
                           f"output_dir={tmp_path / 'hart'}"])
    assert summary["primary_metric"] == "nll" and summary["final"]["nll"] < math.log(V)
    assert (tmp_path / "hart" / "hart_samples.png").is_file()

    capsys.readouterr()
    out = tmp_path / "grid.png"
    assert cli_main(["sample", str(tmp_path / "hart"), "--class", "3", "--n", "10", "--steps", "1", "--cfg", "2",
                     "--top-k", "4", "--seed", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "per image" in printed
    assert Image.open(out).size == (8 * 8 + 2 * 9, 2 * 8 + 2 * 3)  # 8 per row, 2 rows, 2-pixel gaps and border
    path, seconds = sample_run(tmp_path / "hart", "3", n=10, steps=1, cfg=2.0, top_k=4, seed=1,
                               out=tmp_path / "again.png")
    assert seconds > 0 and Image.open(path).tobytes() == Image.open(out).tobytes()  # seeded
    names = json.loads((tmp_path / "hart" / "checkpoints" / "best" / "config.json").read_text())
    first = names["pretrained_cfg"]["class_names"][0]
    path, _ = sample_run(tmp_path / "hart", first, n=2)  # by name, into the run folder by default
    assert path == tmp_path / "hart" / f"samples_{first}.png" and path.is_file()
    assert cli_main(["sample", str(tmp_path / "hart"), "--class", "giraffe"]) == 2
    assert "unknown class 'giraffe'" in capsys.readouterr().err

    # the served page's sampler: POST /sample renders a grid of the run's generator
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vitkit.tools.serve import create_app

    client = TestClient(create_app(tmp_path / "hart"))
    card = client.get("/model").json()
    assert card["generator"] is True and card["explain"] is None
    r = client.post("/sample", params={"class": first, "n": 4, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["grid"].startswith("data:image/png;base64,") and r.json()["ms_per_image"] > 0
    assert client.post("/sample", params={"class": "giraffe"}).status_code == 400
    assert client.post("/sample", params={"class": first, "n": 65}).status_code == 400


@pytest.mark.parametrize("name", ["ar", "var"])
def test_vitkit_sample_reads_the_generator_from_the_run(name, tokenizer, tmp_path, capsys):
    """ar (masked order: --steps are MaskGIT steps) and var (no steps) runs, trained one tiny epoch each."""
    from PIL import Image

    from vitkit.cli import main as cli_main
    from vitkit.models.vqvae import SingleScaleVQVAE

    tok = tokenizer
    model_args = dict(TINY_VAR)
    if name == "ar":
        tok = tmp_path / "single"
        SingleScaleVQVAE(**{**TINY_VQ, "patch_nums": (4,)}).save_pretrained(tok)
        model_args["order"] = "masked"
    args = [f"model.args.{k}={json.dumps(v)}" for k, v in model_args.items()]
    train(None, ["data.name=digits", "train.batch_size=256", "train.progress=false", "train.epochs=1",
                 "schedule.warmup_epochs=0.2", f"task.name={name}", f"task.args.tokenizer={tok}",
                 "task.args.samples_per_class=0", f"model.name={name}_fmnist_tiny", *args,
                 f"output_dir={tmp_path / 'run'}"])
    capsys.readouterr()
    steps = ["--steps", "3"] if name == "ar" else []
    assert cli_main(["sample", str(tmp_path / "run"), "--class", "none", "--n", "3", *steps,
                     "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (3 * 8 + 4 * 2, 8 + 2 * 2)
    if name == "var":
        assert cli_main(["sample", str(tmp_path / "run"), "--class", "1", "--steps", "3"]) == 2
        assert "--steps is for" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot do sampling"):
        sample_run(tokenizer, "1")  # a bare checkpoint without a generator task
