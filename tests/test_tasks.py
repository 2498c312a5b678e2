"""The task API: a new objective plugs into the engine without touching the trainer."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitkit.engine.trainer as trainer_module
from vitkit.data import build_dataset, images_only
from vitkit.engine import load_config, train
from vitkit.errors import ConfigError
from vitkit.models import create_model
from vitkit.tasks import TASKS, Task, batch_images, register_task, replace_images

TINY_MODEL = ["model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
              "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2"]
COMMON = ["data.name=digits", *TINY_MODEL, "train.batch_size=64", "train.progress=false", "optim.lr=3e-3",
          "schedule.warmup_epochs=0.5"]


@dataclass
class MeanPixelArgs:
    scale: float = 1.0


class MeanPixelTask(Task):
    """Toy label-free objective: regress each image's mean pixel value. Knows nothing of classes."""

    name = "toy_mean_pixel"
    primary_metric = "mse"
    mode = "min"
    Args = MeanPixelArgs

    def train_dataset(self, dataset):
        return images_only(dataset)

    def eval_dataset(self, dataset):
        return images_only(dataset)

    def build_model(self, model_cfg):
        model = create_model(model_cfg.name, **{**model_cfg.args, "num_classes": 1})
        src = self.ctx.train_set
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(src.mean), "std": tuple(src.std)}
        return model

    def training_step(self, model, batch):
        assert isinstance(batch, torch.Tensor), "an image-only dataset yields plain image tensors"
        target = self.args.scale * batch.mean(dim=(1, 2, 3))
        loss = F.mse_loss(model(batch).squeeze(-1).float(), target)
        return loss, {"loss": loss.item() * len(batch), "count": len(batch), "abs_target": target.abs().sum().item()}

    @torch.no_grad()
    def evaluate(self, model, batches):
        se, n = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for images in batches:
            se += ((model(images).squeeze(-1).float() - self.args.scale * images.mean(dim=(1, 2, 3))) ** 2).sum()
            n += len(images)
        se, n = self.ctx.all_reduce_sum(se), self.ctx.all_reduce_sum(n)
        return {"mse": se.item() / n.item(), "count": int(n.item()), "_not_logged": [1, 2, 3]}

    def write_artifacts(self, model, metrics, folder):
        (folder / "toy.txt").write_text(f"{metrics['mse']:.6f}")
        return ["toy.txt"]

    def summary_fields(self, metrics):
        return {"toy_field": "written by the task"}


class TwoOptimizerTask(MeanPixelTask):
    """Two optimizers and two backward passes per step: the extension point a VQ-GAN discriminator needs."""

    name = "toy_two_optimizers"

    def build_optimizers(self, model, make_optimizer):
        body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        head = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9)
        return {"model": torch.optim.AdamW(body, lr=3e-3), "head": head}

    def optimizer_step(self, loop, micro_batches):
        stats: dict[str, float] = {}
        for name in ("model", "head"):
            for i, batch in enumerate(micro_batches):
                with loop.forward_context(last_micro_batch=i == len(micro_batches) - 1):
                    loss, s = self.training_step(loop.model, batch)
                loop.backward(loss)
                if name == "model":
                    for k, v in s.items():
                        stats[k] = stats.get(k, 0.0) + v
            stats.update(loop.step(name))
        return stats


for _cls in (MeanPixelTask, TwoOptimizerTask):
    if _cls.name not in TASKS:
        register_task(_cls)


def test_trainer_names_nothing_of_classification():
    source = inspect.getsource(trainer_module)
    for word in ("label", "top1", "top5", "classif", "confusion", "num_classes", "class_names"):
        assert not re.search(word, source, re.IGNORECASE), f"the trainer mentions {word!r}"


def test_toy_label_free_task_trains_logs_and_picks_best_by_its_own_metric(tmp_path):
    run = tmp_path / "toy"
    summary = train(None, [*COMMON, "task.name=toy_mean_pixel", "task.args.scale=2.0", "train.epochs=3",
                           f"output_dir={run}"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # every statistic the task returned is logged (sums / count), every scalar metric too, non-scalars not
    assert all({"train_loss", "train_abs_target", "eval_mse", "eval_count"} <= set(r) for r in rows)
    assert all("eval__not_logged" not in r and "eval_top1" not in r for r in rows)
    assert summary["primary_metric"] == "mse" and summary["mode"] == "min" and summary["task"] == "toy_mean_pixel"
    assert summary["best"]["mse"] == min(r["eval_mse"] for r in rows)
    assert summary["best"]["epoch"] == min(rows, key=lambda r: r["eval_mse"])["epoch"]
    assert summary["final"]["mse"] == rows[-1]["eval_mse"] and summary["toy_field"] == "written by the task"
    assert (run / "toy.txt").is_file() and (run / "curves.png").is_file()
    assert not (run / "confusion.png").exists()
    assert json.loads((run / "summary.json").read_text())["best"] == summary["best"]
    saved = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert saved["pretrained_cfg"]["task"] == "toy_mean_pixel"


def test_two_optimizer_task_steps_both_and_resumes_exactly(tmp_path):
    over = [*COMMON, "task.name=toy_two_optimizers", "train.epochs=2", "optim.clip_grad=1.0"]
    full = train(None, [*over, f"output_dir={tmp_path / 'full'}"])
    assert full["finished"]
    cut = train(None, [*over, "train.max_steps=5", f"output_dir={tmp_path / 'cut'}"])
    assert not cut["finished"]
    state = torch.load(tmp_path / "cut/checkpoints/last/train_state.pt", weights_only=True)
    assert set(state["optimizers"]) == {"model", "head"} and state["optimizers"]["head"]["state"]
    train(None, [], resume=tmp_path / "cut")
    a = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/last/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert all("train_grad_norm" in r and "train_grad_norm_head" in r for r in rows)


def test_recipe_task_forms_and_errors():
    assert load_config(None, ["task=classify"]).task.name == "classify"  # the older shorthand
    cfg = load_config(None, ["task.name=toy_mean_pixel", "task.args.scale=3"])
    assert cfg.task.name == "toy_mean_pixel" and cfg.task.args == {"scale": 3}
    with pytest.raises(ConfigError, match=r"not a known task.*classify.*mae"):
        load_config(None, ["task.name=nope"])
    with pytest.raises(ConfigError, match=r"scal\b|\['scal'\]"):
        load_config(None, ["task.name=toy_mean_pixel", "task.args.scal=3"])


def test_batches_of_any_shape():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.ones(2, 1, 4, 4)
    ds = build_dataset("digits", "test")
    batch = ds.__getitems__([0, 1])
    assert batch_images(replace_images(batch, y)) is y and torch.equal(replace_images(batch, y).labels, batch.labels)
    assert batch_images({"images": x, "input_ids": torch.zeros(2, 3)}) is x
    assert replace_images({"images": x, "m": 1}, y) == {"images": y, "m": 1}
    assert batch_images(x) is x and batch_images((x, 0)) is x
    view = images_only(ds)
    got = view.__getitems__([0, 1])
    assert isinstance(got, torch.Tensor) and torch.equal(got, batch.images)
    assert view.classes == ds.classes and view.mean == ds.mean and len(view) == len(ds)


# ------------------------------------------------------------------------------------------------ MAE task
MAE_TINY = ["data.name=digits", "model.name=mae_vit_fmnist_tiny", "task.name=mae",
            "model.args.encoder_args={img_size: 8, patch_size: 2, embed_dim: 16, depth: 2, num_heads: 2}",
            "model.args.decoder_embed_dim=16", "model.args.decoder_depth=1", "model.args.decoder_num_heads=2",
            "train.batch_size=64", "train.progress=false", "optim.lr=3e-3", "schedule.warmup_epochs=0.5",
            "task.args.probe_epochs=20", "augment.crop=random_resized", "augment.hflip=true"]


def test_mae_task_end_to_end_resume_eval_and_finetune(tmp_path, capsys):
    """MAE on digits: trains without labels, picks best by the lowest eval loss, reports probes, draws the grid,
    resumes exactly; `vitkit eval`/`predict` go through the task; a classifier fine-tunes from the encoder."""
    from vitkit.cli import main as cli_main

    over = [*MAE_TINY, "train.epochs=2"]
    full = train(None, [*over, f"output_dir={tmp_path / 'full'}"])
    assert full["primary_metric"] == "loss" and full["mode"] == "min"
    assert full["best"]["loss"] <= full["final"]["loss"] and 0 <= full["final"]["knn_top1"] <= 1
    assert "linear_top1" in full["final"] and (tmp_path / "full" / "mae_reconstruction.png").is_file()
    rows = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["train_mask_ratio"] - 0.75) < 0.05 and "eval_knn_top1" in rows[-1]
    train(None, [*over, "train.max_steps=5", f"output_dir={tmp_path / 'cut'}"])
    train(None, [], resume=tmp_path / "cut")
    a = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "full"), "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction loss" in out and "k-NN top-1" in out
    from PIL import Image

    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), mode="L").save(tmp_path / "x.png")
    assert cli_main(["predict", str(tmp_path / "full"), str(tmp_path / "x.png")]) == 0
    assert "reconstruction_loss" in capsys.readouterr().out

    fine = train(None, [*COMMON, f"model.pretrained={tmp_path / 'full'}", "optim.layer_decay=0.75",
                        "train.epochs=1", f"output_dir={tmp_path / 'fine'}"])
    assert fine["task"] == "classify" and 0 <= fine["final"]["top1"] <= 1
