"""Contrastive pretraining: NT-Xent over processes, two-view augmentation, feature probes, end-to-end runs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import vitkit
from vitkit.data import ImagesOnly, batch_collate, load_digits
from vitkit.data.transforms import ContrastiveViews, ViewConfig, build_contrastive_views, build_transforms
from vitkit.engine import train
from vitkit.engine.distributed import DistInfo, all_gather_with_grad
from vitkit.errors import ConfigError, DataError
from vitkit.models.simclr import ContrastiveViT
from vitkit.tasks import TaskContext, build_task
from vitkit.tasks.contrastive import nt_xent
from vitkit.tasks.probe import encoder_fn, evaluate_probes, extract_features, knn_classify, linear_probe

REPO = Path(__file__).resolve().parents[1]
ENCODER = dict(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2)
# A contrastive ViT on the built-in 8x8 digits; one thread, since these tiny steps gain nothing from two.
TINY = [
    "task.name=contrastive", "data.name=digits", "model.name=simclr_vit_fmnist_tiny",
    *(f"model.args.encoder_args.{k}={v}" for k, v in ENCODER.items()),
    "model.args.proj_hidden_dim=32", "model.args.proj_dim=16", "train.batch_size=64", "train.progress=false",
    "train.threads=1", "optim.lr=3e-3", "schedule.warmup_epochs=0.5", "task.args.probe_epochs=30",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; also undoes train.threads=1


# ------------------------------------------------------------------------------------------------ the loss
def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent written anchor by anchor, straight from the SimCLR paper's definition."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = torch.stack([z[i] @ z[j] / t for j in range(2 * n) if j != i])
        losses.append(-(z[i] @ z[pos] / t) + torch.logsumexp(others, 0))
    return torch.stack(losses).mean()


def test_nt_xent_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss, correct = nt_xent(z1, z2, 0.2)
    assert torch.allclose(loss, _naive_nt_xent(z1, z2, 0.2), atol=1e-5)
    perfect, correct = nt_xent(z1, z1 + 1e-3 * z2, 0.2)
    assert correct == 10 and perfect < loss
    # collapsed embeddings: every other embedding is as close as the positive, loss = log(2N - 1)
    same = torch.ones(6, 4)
    assert nt_xent(same, same, 0.5)[0].item() == pytest.approx(math.log(11), abs=1e-5)


class _TinyEncoder(nn.Module):
    """A stand-in for the model: flatten, linear, L2-normalise (what ContrastiveViT.forward returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x.flatten(1)), dim=-1)


def _global_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _TinyEncoder()
    return model, torch.randn(8, 3, 2, 2, generator=g), torch.randn(8, 3, 2, 2, generator=g)


def _step(ctx: TaskContext, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The contrastive task's training step on (v1, v2); returns the loss and the gradients."""
    model, _, _ = _global_batch()
    v1, v2 = v1.clone().requires_grad_(), v2.clone().requires_grad_()
    task = build_task("contrastive", {"temperature": 0.3}, ctx)
    loss, stats = task.training_step(model, (v1, v2))
    loss.backward()
    return {"loss": loss.detach(), "acc": torch.tensor(stats["acc"]), "v1": v1.grad, "v2": v2.grad,
            **{f"param.{n}": p.grad for n, p in model.named_parameters()}}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        info = DistInfo(rank=rank, world_size=world)
        ctx = TaskContext(rank=rank, world_size=world, all_gather=lambda t: all_gather_with_grad(t, info))
        _, v1, v2 = _global_batch()
        part = slice(rank * len(v1) // world, (rank + 1) * len(v1) // world)
        torch.save(_step(ctx, v1[part], v2[part]), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_nt_xent_equals_the_global_batch(tmp_path):
    """Two gloo processes, each with half of a global batch, get the loss and gradients of the whole batch.

    Every process averages over its own anchors with negatives from both (gathered with gradients). The mean of
    the two losses is the global loss, DDP's average of the parameter gradients is the global gradient, and an
    input's gradient on its process is ``world_size`` times the global one (each process's loss is a mean over
    half the anchors).
    """
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    _, v1, v2 = _global_batch()
    ref = _step(TaskContext(), v1, v2)
    assert abs(float(sum(p["loss"] for p in parts)) / world - float(ref["loss"])) <= 1e-6
    for key in ref:
        if key.startswith("param."):
            assert (sum(p[key] for p in parts) / world - ref[key]).abs().max() <= 1e-6, key
    for key in ("v1", "v2"):
        grads = torch.cat([p[key] for p in parts]) / world
        assert (grads - ref[key]).abs().max() <= 1e-6, key
    assert sum(float(p["acc"]) for p in parts) == float(ref["acc"])  # summed stats add up too


# ------------------------------------------------------------------------------------------------ views
def test_views_shapes_normalisation_independence_and_seed():
    images = load_digits("train").images[:16]
    mean, std = (0.3,), (0.4,)
    views = build_contrastive_views({"blur_prob": 1.0}, mean, std, 8)
    a, b = views(images)
    assert a.shape == b.shape == (16, 1, 8, 8) and a.dtype == torch.float32
    assert not torch.allclose(a, b)  # two independent draws
    torch.manual_seed(3)
    first = views(images)
    torch.manual_seed(3)
    again = views(images)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    # without any random op a view is the plain evaluation transform: same scaling and normalisation
    plain = build_contrastive_views(dict(crop_scale=(1, 1), crop_ratio=(1, 1), hflip=False, jitter_prob=0,
                                         blur_prob=0), mean, std, 8)
    expected = build_transforms(None, False, mean, std, 8)(images)
    for view in plain(images):
        assert torch.allclose(view, expected, atol=1e-5)
    assert torch.allclose(plain(images.float() / 255)[0], expected, atol=1e-5)  # [0, 1] floats work as well
    with pytest.raises(DataError, match=r"\(B, 1, H, W\)"):
        views(torch.zeros(2, 3, 8, 8))


def test_views_leave_out_colour_ops_on_gray_images():
    names = lambda v: [type(m).__name__ for m in v.view.augment]
    gray = build_contrastive_views(None, (0.5,), (0.5,), 28)
    rgb = build_contrastive_views(None, (0.5,) * 3, (0.5,) * 3, 28)
    assert "RandomGrayscale" not in names(gray) and "RandomGrayscale" in names(rgb)
    assert gray.view.augment[2].saturation == 0 and rgb.view.augment[2].saturation == 0.4
    assert isinstance(gray, ContrastiveViews) and gray.view.augment[-1].flags["kernel_size"] == (3, 3)
    a, b = rgb(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert a.shape == (4, 3, 28, 28)


@pytest.mark.parametrize("bad,match", [
    ({"crop_scal": (0.2, 1)}, r"crop_scal"),
    ({"crop_scale": (0.0, 1.0)}, r"views\.crop_scale"),
    ({"blur_kernel": 4}, r"views\.blur_kernel"),
    ({"brightness": 1.5}, r"views\.brightness"),
])
def test_view_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        ViewConfig.from_dict(bad)
    with pytest.raises(ConfigError, match=match):
        build_task("contrastive", {"views": bad})


# ------------------------------------------------------------------------------------------------ probes
def _clusters(n: int, num_classes: int = 4, dim: int = 16, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centers[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_knn_and_linear_probe_on_separable_and_random_features():
    x, y = _clusters(400)
    xt, yt = _clusters(200, seed=1)
    preds = knn_classify(x, y, xt, 4, k=10)
    assert (preds == yt).float().mean() >= 0.95
    assert torch.equal(preds, knn_classify(x, y, xt, 4, k=10, chunk=7))  # chunking changes nothing
    probe = linear_probe(x, y, xt, yt, 4, epochs=50)
    assert probe["top1"] >= 0.95 and probe["train_top1"] >= 0.95
    assert linear_probe(x, y, xt, yt, 4, epochs=50) == probe  # deterministic
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 evaluation around them changes nothing
        assert torch.equal(knn_classify(x, y, xt, 4, k=10), preds)
        assert linear_probe(x, y, xt, yt, 4, epochs=50) == probe
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))  # features that know no labels
    assert (knn_classify(x, y, noise, 4, k=10) == yt).float().mean() < 0.45
    assert linear_probe(torch.randn(400, 16), y, noise, yt, 4, epochs=50)["top1"] < 0.45
    with pytest.raises(DataError, match="one label per feature"):
        linear_probe(x, y[:-1], xt, yt, 4)


class _Pixels(nn.Module):
    """An "encoder" whose features are the pixels: k-NN on raw digits is known to be about 97 % accurate."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_probes_of_a_model_and_unlabelled_data():
    torch.manual_seed(0)
    train_set, eval_set = load_digits("train"), load_digits("test")
    model = vitkit.create_model("simclr_vit_fmnist_tiny", encoder_args=ENCODER, proj_hidden_dim=16, proj_dim=8)
    classifier = vitkit.create_model("vit_fmnist_tiny", num_classes=10, **ENCODER)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(encoder_fn(model)(x), model.encode(x))
    assert torch.equal(encoder_fn(classifier)(x), classifier.forward_head(classifier.forward_features(x), True))
    tf = build_transforms(None, False, train_set.mean, train_set.std, 8)
    prepare = lambda b: (tf(b[0]), b[1])
    ctx = TaskContext(train_set=train_set, eval_set=eval_set, collate=batch_collate, eval_batch_size=100)
    # labels stay with their features through batching, subsetting and both probes
    pixels = evaluate_probes(_Pixels(), ctx, prepare, k=5, probe_epochs=50, max_train=500)
    assert pixels["knn_top1"] > 0.9 and pixels["linear_top1"] > 0.85
    model.train()
    out = evaluate_probes(model, ctx, prepare, k=5, probe_epochs=0)
    assert model.training and set(out) == {"knn_top1"}  # the mode is restored; probe_epochs=0: k-NN only
    with pytest.raises(DataError, match="labelled"):
        evaluate_probes(model, TaskContext(train_set=ImagesOnly(train_set), eval_set=eval_set), prepare)
    with pytest.raises(DataError, match="labelled batches"):
        extract_features(encoder_fn(model), [torch.zeros(2, 1, 8, 8)])


# ------------------------------------------------------------------------------------------------ the model
def test_contrastive_vit_interface():
    torch.manual_seed(0)
    model = vitkit.create_model("simclr_vit_fmnist_tiny", encoder_args=ENCODER, proj_hidden_dim=16, proj_dim=8)
    assert isinstance(model, ContrastiveViT) and model.pretrained_cfg["input_size"] == (1, 8, 8)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("encoder.", "projector.")) for n in names) and "encoder.cls_token" in names
    z = model(torch.randn(4, 1, 8, 8))
    assert z.shape == (4, 8) and torch.allclose(z.norm(dim=-1), torch.ones(4))
    assert model.no_weight_decay() == {"encoder.cls_token", "encoder.pos_embed.weight"}
    assert model.lr_layer_id("encoder.patch_embed.proj.weight") == 0
    assert model.lr_layer_id("encoder.blocks.1.mlp.fc1.weight") == 2
    assert model.lr_layer_id("projector.0.weight") == model.num_lr_layers - 1 == 3
    bn = ContrastiveViT("vit_fmnist_tiny", ENCODER, proj_hidden_dim=16, proj_dim=8, proj_layers=3, proj_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.projector) == 2
    with pytest.raises(ValueError, match="num_classes"):
        ContrastiveViT("vit_fmnist_tiny", {**ENCODER, "num_classes": 10})


# ------------------------------------------------------------------------------------------------ end to end
def _weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / name / "model.safetensors"))


def test_contrastive_run_resume_and_transfer(tmp_path):
    """Digits pretraining: k-NN picks the best checkpoint, resume is exact, the encoder loads into a ViT."""
    full = train(None, [*TINY, "train.epochs=2", f"output_dir={tmp_path / 'full'}"])
    assert full["finished"] and full["task"] == "contrastive" and full["primary_metric"] == "knn_top1"
    for key in ("knn_top1", "linear_top1", "loss", "acc"):
        assert key in full["best"] and key in full["final"]
    rows = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 1 for r in rows)
    assert full["best"]["knn_top1"] == max(r["eval_knn_top1"] for r in rows)

    stopped = train(None, [*TINY, "train.epochs=2", "train.max_steps=7", f"output_dir={tmp_path / 'cut'}"])
    assert not stopped["finished"] and stopped["steps"] == 7
    resumed = train(None, [], resume=tmp_path / "cut")
    assert resumed["finished"] and resumed["steps"] == full["steps"] == 44
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hist = lambda run: [json.loads(x)["eval_knn_top1"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert hist(tmp_path / "full") == hist(tmp_path / "cut")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit = vitkit.create_model("vit_fmnist_tiny", pretrained=tmp_path / "full/checkpoints/last", num_classes=10,
                                  **ENCODER)
    assert any("encoder" in str(w.message) and "projector" in str(w.message) for w in caught)
    own = vit.state_dict()
    encoder = {k[len("encoder."):]: v for k, v in a.items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(own[k], v) for k, v in encoder.items())
    assert vit.head.weight.shape == (10, 16)

    from vitkit.tools.evaluate import evaluate_checkpoint  # `vitkit eval` on the pretraining checkpoint

    metrics, task = evaluate_checkpoint(tmp_path / "full", data="digits")
    assert task.name == "contrastive" and metrics["knn_top1"] == pytest.approx(full["best"]["knn_top1"], abs=0.02)
    assert "k-NN top-1" in task.format_report(metrics)


def test_recipe_and_config_checks():
    from vitkit.engine import load_config

    cfg = load_config(REPO / "configs/fmnist/contrastive_tiny.yaml")
    assert cfg.task.name == "contrastive" and cfg.model.name == "simclr_vit_fmnist_tiny" and cfg.train.bf16
    task = build_task(cfg.task.name, cfg.task.args)
    assert isinstance(task.args.views, ViewConfig)
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["task.name=contrastive", "task.args.temperature=0"])
    with pytest.raises(ConfigError, match="augment"):
        train(None, [*TINY, "augment.hflip=true", "output_dir=/nonexistent"])
