"""DeiT distillation: the distilled ViT's two heads and the classify task's teacher loss (hard and soft)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.data import build_dataset
from vitkit.data.transforms import AugmentConfig
from vitkit.engine import load_config, train
from vitkit.errors import ConfigError
from vitkit.models.vit import DistilledVisionTransformer
from vitkit.tasks import TASKS, TaskContext, build_task, parse_task_args
from vitkit.tools.inference import prepare_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
STUDENT = dict(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2)
STUDENT_SET = ["model.name=deit_fmnist_tiny_distilled", *(f"model.args.{k}={v}" for k, v in STUDENT.items())]
TEACHER_SET = ["model.name=resnet_fmnist_tiny", "model.args.img_size=8", "model.args.layers=[1,1]",
               "model.args.widths=[4,8]", "model.args.stem_width=6"]
RUN = ["data.name=digits", "train.batch_size=64", "train.progress=false", "optim.lr=3e-3",
       "schedule.warmup_epochs=0.5"]


def _student(num_classes: int = 5) -> DistilledVisionTransformer:
    torch.manual_seed(0)
    return vitkit.create_model("deit_fmnist_tiny_distilled", num_classes=num_classes, **STUDENT)


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits", "train")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A tiny ResNet trained one epoch on digits: a real run folder (its best checkpoint is the teacher)."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(None, [*RUN, *TEACHER_SET, "train.epochs=1", f"output_dir={run}"])
    return run


def _saved_teacher(folder: Path, like, **changes) -> Path:
    """A tiny ResNet teacher saved with ``like``'s statistics (a dataset), then ``changes`` to its config."""
    args = dict(img_size=8, layers=[1, 1], widths=[4, 8], stem_width=6, num_classes=len(like.classes))
    args.update({k: v for k, v in changes.items() if k in ("img_size", "num_classes")})
    teacher = vitkit.create_model("resnet_fmnist_tiny", **args)
    cfg = {**teacher.pretrained_cfg, "mean": tuple(like.mean), "std": tuple(like.std),
           "class_names": list(like.classes)[:args["num_classes"]]}
    cfg.update({k: v for k, v in changes.items() if k in ("mean", "std")})
    teacher.pretrained_cfg = cfg
    teacher.save_pretrained(folder)
    return folder


def _task(digits, teacher: str | None, overrides: tuple[str, ...] = (), model: list[str] = STUDENT_SET,
          label_smoothing: float = 0.0):
    cfg = load_config(None, [*model, *(f"task.args.{o}" for o in overrides)]
                      + ([f"task.args.distill_teacher={teacher}"] if teacher else []))
    ctx = TaskContext(augment=AugmentConfig(label_smoothing=label_smoothing), train_set=digits, eval_set=digits)
    task = build_task("classify", cfg.task.args, ctx)
    return task, cfg.model


# ------------------------------------------------------------------------------------------------ the model
def test_distilled_forward_train_tuple_eval_mean():
    model = _student()
    assert model.num_prefix_tokens == 2 and model.dist_token.abs().sum() > 0
    assert model.pos_embed.weight.shape[1] == 2 + 16  # a position slot for [CLS] and for the distillation token
    x = _x()
    model.train()
    plain = model(x)  # training mode, but not asked for both heads: the mean, as timm
    assert torch.is_tensor(plain) and plain.shape == (3, 5)
    model.set_distilled_training(True)
    cls, dist = model(x)
    assert cls.shape == dist.shape == (3, 5) and (cls - dist).abs().max() > 1e-3
    torch.testing.assert_close(plain, (cls + dist) / 2)
    model.eval()
    logits = model(x)
    assert torch.is_tensor(logits)
    torch.testing.assert_close(logits, (cls + dist) / 2)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)


def test_reset_classifier_replaces_both_heads():
    model = _student()
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3 and model.model_args["num_classes"] == 3
    model.train().set_distilled_training(True)
    assert [t.shape for t in model(_x())] == [(3, 3), (3, 3)]
    with pytest.raises(ValueError, match="pool must be 'cls'"):
        model.reset_classifier(3, pool="gap")


def test_save_and_load_round_trip(tmp_path):
    model = _student().eval()
    model.set_distilled_training(True)
    model.save_pretrained(tmp_path / "m")
    loaded = vitkit.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is DistilledVisionTransformer and not loaded.distilled_training
    assert "distilled_training" not in json.loads((tmp_path / "m" / "config.json").read_text())["model_args"]
    assert torch.equal(loaded(_x()), model(_x()))
    again = vitkit.create_model("deit_fmnist_tiny_distilled", pretrained=tmp_path / "m", num_classes=5, **STUDENT)
    assert torch.equal(again.eval()(_x()), model(_x()))


def test_prepare_for_inference_skips_the_cls_shortcut():
    """The head reads two tokens: computing the last block for [CLS] only would be wrong, so it is not done."""
    model = _student().eval()
    model.set_distilled_training(True)
    fast = prepare_for_inference(model, "fp32")
    assert fast.info["cls_shortcut"] is False
    assert (fast(_x()) - model(_x())).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_loss_is_deits(kind, digits, tmp_path):
    """The task's loss against a hand computation: (1 - a)·CE_smoothed(cls, y) + a·(CE(dist, argmax t) or
    tau²·KL(softmax(t/tau) || softmax(dist/tau)) summed over batch × classes / (batch·classes))."""
    teacher_dir = _saved_teacher(tmp_path / "t", digits)
    alpha, tau, eps = 0.3, 2.0, 0.1
    task, model_cfg = _task(digits, str(teacher_dir), (f"distill_type={kind}", f"distill_alpha={alpha}",
                                                       f"distill_tau={tau}"), label_smoothing=eps)
    model = task.build_model(model_cfg)
    task.setup(model)
    model.train()
    images, labels = task.prepare_batch(digits.__getitems__(list(range(6))), train=True)
    loss, stats = task.training_step(model, (images, labels))

    with torch.no_grad():
        cls, dist = model(images)
        t = vitkit.from_pretrained(teacher_dir).eval()(images)
    n, c = cls.shape
    smooth = (1 - eps) * F.one_hot(labels, c) + eps / c
    label_loss = -(smooth * cls.log_softmax(-1)).sum(-1).mean()
    if kind == "hard":
        dist_loss = -dist.log_softmax(-1)[torch.arange(n), t.argmax(-1)].mean()
    else:
        p_t = (t / tau).softmax(-1)
        dist_loss = (p_t * (p_t.log() - (dist / tau).log_softmax(-1))).sum() * tau ** 2 / (n * c)
    expected = (1 - alpha) * label_loss + alpha * dist_loss
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
    assert abs(stats["loss_cls"] / n - label_loss.item()) <= 1e-5
    assert abs(stats["loss_distill"] / n - dist_loss.item()) <= 1e-5
    assert stats["teacher_acc"] == (t.argmax(-1) == labels).sum().item() and stats["count"] == n
    assert stats["acc"] == ((cls + dist).argmax(-1) == labels).sum().item()


def test_teacher_sees_the_mixed_batch(digits, tmp_path):
    """With Mixup/CutMix the teacher labels the same mixed images the student sees (as DeiT)."""
    teacher_dir = _saved_teacher(tmp_path / "t", digits)
    task, model_cfg = _task(digits, str(teacher_dir))
    task.mixup = lambda images, labels: (images.flip(0), F.one_hot(labels.flip(0), 10).float())  # a stand-in
    model = task.build_model(model_cfg)
    task.setup(model)
    seen = []
    task.teacher.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    images, labels = task.prepare_batch(digits.__getitems__(list(range(4))), train=True)
    _, stats = task.training_step(model.train(), (images, labels))
    assert torch.equal(seen[0], images.flip(0)) and "acc" not in stats and "teacher_acc" in stats


def test_distillation_trains_and_the_run_evaluates_without_its_teacher(teacher_run, tmp_path, capsys):
    """A few epochs through the engine lower the loss; the saved student answers with one tensor, and `vitkit
    eval` of the run needs no teacher (it is not read outside training)."""
    run = tmp_path / "student"
    train(None, [*RUN, *STUDENT_SET, "train.epochs=3", f"task.args.distill_teacher={teacher_run}",
                 f"output_dir={run}"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_loss_cls", "train_loss_distill", "train_teacher_acc"} <= set(r) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["train_loss_distill"] < rows[0][
        "train_loss_distill"]
    from vitkit.cli import main as cli_main

    moved = teacher_run.with_name("gone")
    teacher_run.rename(moved)
    try:
        assert cli_main(["eval", str(run)]) == 0
    finally:
        moved.rename(teacher_run)
    assert "top-1" in capsys.readouterr().out


def test_the_recipe_builds_and_steps(digits, tmp_path):
    """configs/fmnist/vit_deit_distill.yaml distils from the resnet_tiny recipe's run, on a 28x28 stand-in."""
    cfg = load_config(REPO / "configs/fmnist/vit_deit_distill.yaml")
    assert cfg.task.args["distill_teacher"] == load_config(REPO / "configs/fmnist/resnet_tiny.yaml").output_dir
    stand_in = build_dataset("digits", "train", image_size=28, num_channels=1)
    teacher_dir = _saved_teacher(tmp_path / "t", stand_in, img_size=28)
    ctx = TaskContext(augment=AugmentConfig(**vars(cfg.augment)), train_set=stand_in, eval_set=stand_in)
    task = build_task(cfg.task.name, {**cfg.task.args, "distill_teacher": str(teacher_dir)}, ctx)
    model = task.build_model(cfg.model)
    task.setup(model)
    loss, stats = task.training_step(model.train(), task.prepare_batch(stand_in.__getitems__(list(range(8))),
                                                                      train=True))
    loss.backward()
    assert torch.isfinite(loss) and stats["count"] == 8 and model.dist_token.grad is not None


# ------------------------------------------------------------------------------------------------ refusals
def _refused(match: str, fn, *args) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_refusals_are_one_line(digits, tmp_path):
    build = lambda teacher, model=STUDENT_SET: (lambda t, m: t.build_model(m))(*_task(digits, teacher, model=model))
    _refused("no such run or checkpoint folder", build, str(tmp_path / "missing"))
    good = str(_saved_teacher(tmp_path / "good", digits))
    vit = ["model.name=vit_fmnist_tiny", *STUDENT_SET[1:]]
    _refused("needs a student with a distillation token", build, good, vit)
    _refused("predicts 5 classes, the student 10", build, str(_saved_teacher(tmp_path / "c", digits, num_classes=5)))
    _refused(r"takes inputs of size \(1, 16, 16\), the student \(1, 8, 8\)", build,
             str(_saved_teacher(tmp_path / "s", digits, img_size=16)))
    _refused("normalises with mean", build, str(_saved_teacher(tmp_path / "n", digits, mean=(0.5,), std=(0.5,))))
    _refused("distill_alpha=1.5 must be in", load_config, None, ["task.args.distill_alpha=1.5"])
    _refused("distill_tau", load_config, None, ["task.args.distill_tau=0"])
    _refused("distill_type", load_config, None, ["task.args.distill_type=medium"])
    _refused("does not take task.args", parse_task_args, TASKS["multilabel"], {"distill_teacher": good})
