"""Label-using evaluations of frozen features, shared by the self-supervised tasks (MAE, contrastive).

Pretraining objectives have no accuracy of their own; what matters is how useful the encoder's features are
for a labelled task *without* fine-tuning the encoder. Two standard read-outs:

* :func:`knn_classify`: weighted k-NN on cosine similarity, each of the ``k`` neighbours voting for its
  class with weight ``exp(sim / T)`` (Wu et al. 2018, InstDisc; the ``eval_knn`` of DINO). No training,
  no hyper-parameter search, so it is cheap enough to track during pretraining.
* :func:`linear_probe`: a linear classifier (logistic regression) trained on standardised frozen features by
  full-batch L-BFGS: deterministic, so the same features always give the same number.

:func:`evaluate_probes` runs both for a model and a task's datasets. Every process computes the same
numbers over the whole datasets (no sharding), so there is nothing to reduce under ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from ..errors import DataError
from .base import Batch, TaskContext

Encoder = Callable[[torch.Tensor], torch.Tensor]


def encoder_fn(model: nn.Module) -> Encoder:
    """Images -> pooled features (B, D): ``model.encode`` for pretraining models, the pre-logits features for
    vitkit classifiers."""
    encode = getattr(model, "encode", None)
    if callable(encode):
        return encode
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    raise TypeError(f"{type(model).__name__} has neither encode() nor forward_features()/forward_head(): "
                    f"cannot read features from it")


def _labelled(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping) and "images" in batch and "labels" in batch:
        return batch["images"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    raise DataError(f"feature probes need labelled batches (images, labels); got a {type(batch).__name__} "
                    f"batch: evaluate k-NN / linear probes on a dataset with labels")


@torch.no_grad()
def extract_features(encode: Encoder, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 on the CPU (N, D), labels int64 (N,)) of prepared labelled batches."""
    feats, labels = [], []
    for batch in batches:
        images, y = _labelled(batch)
        f = encode(images)
        if f.dim() != 2 or f.shape[0] != images.shape[0]:
            raise DataError(f"the encoder returned features of shape {tuple(f.shape)} for {images.shape[0]} "
                            f"images; expected (B, D)")
        feats.append(f.float().cpu())
        labels.append(y.to("cpu", torch.int64))
    if not feats:
        raise DataError("no batches to extract features from (empty dataset?)")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted classes (M,) of ``test_feats`` by a cosine-similarity k-NN vote weighted by ``exp(sim / T)``.

    Test features go ``chunk`` at a time, so memory stays at ``chunk x N`` float32 similarities (245 MB for
    1024 x 60k) whatever the test set's size. Returns CPU predictions.
    """
    if len(train_feats) != len(train_labels) or len(train_feats) == 0:
        raise DataError(f"k-NN needs a non-empty training set with one label per feature, got "
                        f"{len(train_feats)} features and {len(train_labels)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(bank.device, torch.int64)
    preds = []
    with torch.autocast(bank.device.type, enabled=False):  # fp32 similarities even inside a bf16 evaluation
        for start in range(0, len(test_feats), chunk):
            query = F.normalize(test_feats[start:start + chunk].float().to(bank.device), dim=1)
            sim, idx = (query @ bank.T).topk(k, dim=1)
            votes = torch.zeros(len(query), num_classes, device=bank.device)
            votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
            preds.append(votes.argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 weight_decay: float = 1e-4) -> dict[str, float]:
    """Top-1 of a linear classifier trained on frozen features: ``{"top1": test, "train_top1": train}``.

    Multinomial logistic regression on features standardised with the training set's statistics, fitted by
    full-batch L-BFGS (strong Wolfe line search) for at most ``epochs`` iterations, each one pass over the
    features, with an L2 penalty ``weight_decay / 2 * |W|^2``. Full batch rather than mini-batch SGD: no
    learning rate or batch size to tune, a few dozen large matmuls instead of thousands of tiny steps, and the
    result is deterministic (zero initialisation, no sampling). 60k x 96 features take about a second.
    """
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels) or len(train_feats) == 0:
        raise DataError(f"linear probe needs one label per feature: {len(train_feats)}/{len(train_labels)} "
                        f"train, {len(test_feats)}/{len(test_labels)} test")
    x_train, x_test = train_feats.float().cpu(), test_feats.float().cpu()
    y_train, y_test = train_labels.long().cpu(), test_labels.long().cpu()
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    weight = torch.zeros(num_classes, x_train.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    if epochs > 0:
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=epochs, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(F.linear(x_train, weight, bias), y_train)
            loss = loss + 0.5 * weight_decay * weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad(), torch.autocast("cpu", enabled=False):  # fp32 even inside a bf16 evaluation
            opt.step(closure)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        acc = lambda x, y: (F.linear(x, weight, bias).argmax(1) == y).float().mean().item() if len(y) else 0.0
        return {"top1": acc(x_test, y_test), "train_top1": acc(x_train, y_train)}


def _dataset_labels(dataset: Any) -> torch.Tensor | None:
    for attr in ("labels", "targets"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.int64)
    return None


def _subset(dataset: Any, max_train: int | None, seed: int) -> Any:
    """A seeded, class-stratified subset of about ``max_train`` samples (the dataset itself if smaller)."""
    if max_train is None or max_train >= len(dataset):
        return dataset
    from ..data import stratified_indices

    labels = _dataset_labels(dataset)
    if labels is not None:
        idx = stratified_indices(labels, max_train / len(dataset), seed)
    else:
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_train].sort().values
    return Subset(dataset, idx.tolist())


def _check_labelled(dataset: Any, which: str) -> None:
    from ..data import ImagesOnly

    if dataset is None:
        raise DataError(f"k-NN / linear probes need the labelled {which} set, and the task context has none")
    if isinstance(dataset, ImagesOnly) or not getattr(dataset, "classes", None):
        raise DataError(f"k-NN / linear probes need a labelled {which} set; {dataset!r} has no labels/classes")


def evaluate_probes(model: nn.Module, ctx: TaskContext, prepare: Callable[[Batch], Batch], k: int = 20,
                    temperature: float = 0.07, probe_epochs: int = 100, max_train: int | None = None,
                    seed: int = 0) -> dict[str, float]:
    """``{"knn_top1", "linear_top1", "linear_train_top1"}`` of the frozen ``model`` on ``ctx.eval_set``, fitted
    on ``ctx.train_set`` (or a seeded stratified subset of ``max_train`` samples, to bound the time).

    ``prepare`` is the task's evaluation preparation (uint8 -> normalised). Every process computes the whole
    thing (``shard=False``), so all ranks return the same numbers; ``probe_epochs=0`` skips the linear probe.
    """
    _check_labelled(ctx.train_set, "training")
    _check_labelled(ctx.eval_set, "evaluation")
    num_classes = len(ctx.train_set.classes)
    train_set = _subset(ctx.train_set, max_train, seed)
    was_training = model.training
    model.eval()
    encode = encoder_fn(model)
    try:
        with ctx.autocast():
            batches = lambda ds, which: (prepare(b) for b in ctx.iterate(ds, shard=False, desc=f"probe: {which}"))
            train_x, train_y = extract_features(encode, batches(train_set, "train features"))
            test_x, test_y = extract_features(encode, batches(ctx.eval_set, "eval features"))
    finally:
        model.train(was_training)
    if int(max(train_y.max(), test_y.max())) >= num_classes:
        raise DataError(f"labels go up to {int(max(train_y.max(), test_y.max()))} but the training set has "
                        f"{num_classes} classes")
    preds = knn_classify(train_x, train_y, test_x, num_classes, k, temperature)
    out = {"knn_top1": (preds == test_y).float().mean().item()}
    if probe_epochs > 0:
        lin = linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=probe_epochs)
        out.update(linear_top1=lin["top1"], linear_train_top1=lin["train_top1"])
    return out
