"""The contract between the training engine and an objective.

The engine owns the loop (data order, optimisation, checkpoints, logging, processes); a task owns everything
specific to an objective: which model it builds, what a batch is and how it becomes a loss, how to evaluate,
which metric picks the ``best`` checkpoint (and in which direction), and which pictures to draw. The engine
never looks inside a batch: it moves it to the device and hands it to the task.

A batch is whatever the dataset's collate yields: an image tensor, an ``(images, labels)`` tuple, or a dict
of tensors (``{"images": ..., "input_ids": ..., "attention_mask": ...}``). :func:`batch_images` and
:func:`replace_images` read and replace the image part of any of them.

Statistics returned by :meth:`Task.training_step` are **sums over the samples** of the (micro-)batch plus a
``"count"``; the trainer adds them over steps and processes and logs ``train_<key> = sum / count`` for every
key, so a task never needs trainer changes to log something new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models import checkpoint_folder  # noqa: F401  (tasks import it from here)

Batch = Any  # torch.Tensor | tuple | list | Mapping[str, Any]


# ---------------------------------------------------------------------------- batches
def batch_images(batch: Batch) -> torch.Tensor:
    """The image tensor of a batch: the tensor itself, the first element of a tuple, or ``batch["images"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "images" not in batch:
            raise KeyError(f"a dict batch needs an 'images' entry, got keys {sorted(batch)}")
        return batch["images"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


def replace_images(batch: Batch, images: torch.Tensor) -> Batch:
    """The same batch with its image part replaced (tuples and NamedTuples keep their type)."""
    if isinstance(batch, torch.Tensor):
        return images
    if isinstance(batch, Mapping):
        return {**batch, "images": images}
    if hasattr(batch, "_replace"):
        return batch._replace(**{batch._fields[0]: images})
    return type(batch)([images, *batch[1:]])


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a (nested) batch to ``device``; other leaves stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Batch) -> int:
    return int(batch_images(batch).shape[0])


# ---------------------------------------------------------------------------- what a task is given
@dataclass
class TaskContext:
    """What the engine lends a task: processes, device, datasets and helpers.

    ``all_gather`` concatenates a tensor's first dimension over processes **keeping the gradient** of the
    local part (InfoNCE and CLIP take their negatives from every process); ``all_reduce_sum`` sums a
    tensor over processes (evaluation counts). Both are identities in one process.

    ``progress`` shows a progress bar (tqdm, on stderr, rank 0 only) for every pass of :meth:`iterate`; other long
    loops of a task (fitting a probe, sampling) wrap their iterable in :meth:`track`. The trainer sets it from
    ``train.progress``, ``vitkit eval`` turns it on; off by default, so library calls and tests stay quiet.
    """

    augment: Any = None  # vitkit.data.transforms.AugmentConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    autocast: Callable[[], AbstractContextManager] = nullcontext
    train_set: Any = None  # the datasets as the recipe built them (labelled if the source has labels)
    eval_set: Any = None
    eval_batch_size: int = 512
    collate: Callable[[Any], Any] | None = None
    progress: bool = False  # a progress bar for evaluation passes (iterate) and other long loops (track)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def track(self, iterable: Iterable[Any], desc: str, total: int | None = None, unit: str = "batch"
              ) -> Iterable[Any]:
        """``iterable`` itself, shown as a progress bar on stderr while it is consumed when ``progress`` is on (on
        rank 0 only, like the trainer's epoch bar); the bar goes away when the loop ends."""
        if not (self.progress and self.is_main):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)

    def iterate(self, dataset: Any, batch_size: int | None = None, shard: bool = True, desc: str = "eval"
                ) -> Iterator[Batch]:
        """Batches of ``dataset`` in order, on the device; with ``shard`` each process takes every
        ``world_size``-th sample (reduce the results with ``all_reduce_sum``). With ``progress`` the pass shows
        a bar named ``desc``."""
        from torch.utils.data import BatchSampler, DataLoader

        idx = list(range(self.rank, len(dataset), self.world_size)) if shard else list(range(len(dataset)))
        sampler = BatchSampler(idx, batch_size or self.eval_batch_size, drop_last=False)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate)
        for batch in self.track(loader, desc, total=len(sampler)):
            yield to_device(batch, self.device)


class StepLoop(Protocol):
    """The engine's side of one optimizer step, for tasks that override :meth:`Task.optimizer_step`."""

    model: nn.Module  # the training model (possibly DDP-wrapped or compiled)
    optimizers: dict[str, torch.optim.Optimizer]
    grad_accum: int

    def forward_context(self, last_micro_batch: bool) -> AbstractContextManager:
        """Autocast, and DDP's ``no_sync`` for every micro-batch but the last."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """``(loss / grad_accum).backward()``."""
        ...

    def step(self, name: str = "model") -> dict[str, float]:
        """Clip, step and zero that optimizer, advance its LR schedule (and the EMA for ``"model"``)."""
        ...


@dataclass
class NoArgs:
    """Settings of a task that takes none."""


# ---------------------------------------------------------------------------- the task
class Task:
    """Base class of every objective; subclasses set the class attributes and override what differs.

    ``Args`` is a dataclass of the task's own settings (``task.args`` in a recipe); unknown keys fail with
    the key's name.
    """

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    mode: ClassVar[Literal["max", "min"]]
    Args: ClassVar[type] = NoArgs
    # what the tools may ask of this task besides evaluate/predict: "zero_shot" (:meth:`zero_shot`),
    # "retrieve" (:meth:`retrieval_scores`) and "sample" (:meth:`configure_sampling`, :meth:`sample_images`);
    # "logits": :meth:`predict` needs nothing of the model but ``model(images)`` -> logits, so any runtime that
    # computes those (onnxruntime, OpenVINO, an int8 graph) can stand in for the model
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # evaluation needs the training set too (k-NN and linear probes of pretraining tasks)
    eval_needs_train_set: ClassVar[bool] = False

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        self.args = args if args is not None else self.Args()
        self.ctx = ctx or TaskContext()
        self.train_transform: nn.Module | None = None
        self.eval_transform: nn.Module | None = None

    # ------------------------------------------------------------------ data
    def train_dataset(self, dataset: Any) -> Any:
        """The dataset the loop draws training batches from (e.g. an image-only view for pretraining)."""
        return dataset

    def eval_dataset(self, dataset: Any) -> Any:
        return dataset

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg: Any) -> nn.Module:
        raise NotImplementedError

    def setup(self, model: nn.Module) -> None:
        """Build the batch transforms from the model's input size and normalisation (called once the model
        exists; tasks that need more, e.g. two augmented views, extend it)."""
        from ..data.transforms import build_transforms

        cfg = model.pretrained_cfg
        size = tuple(cfg.get("input_size", (None, None, None)))[1:]
        size = None if None in size else size
        self.train_transform = build_transforms(self.ctx.augment, True, cfg["mean"], cfg["std"], size)
        self.eval_transform = build_transforms(None, False, cfg["mean"], cfg["std"], size)

    def prepare_batch(self, batch: Batch, train: bool) -> Batch:
        """uint8 images -> normalised (and, when training, augmented) float images; runs without autograd."""
        tf = self.train_transform if train else self.eval_transform
        return replace_images(batch, tf(batch_images(batch))) if tf is not None else batch

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate and statistics: sums over the batch's samples plus ``"count"``."""
        raise NotImplementedError

    def build_optimizers(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
                         ) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; ``"model"`` is the one whose steps drive the EMA. ``make_optimizer(module)`` is
        the recipe's optimizer (weight-decay groups, layer decay) over a module's parameters."""
        return {"model": make_optimizer(model)}

    def optimizer_step(self, loop: StepLoop, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches. Objectives with several optimizers or
        backward passes per step (a VQ-GAN discriminator) override this and call ``loop.step(name)``."""
        stats: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            with loop.forward_context(last_micro_batch=i == len(micro_batches) - 1):
                loss, batch_stats = self.training_step(loop.model, batch)
            loop.backward(loss)
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        stats.update(loop.step("model"))
        return stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        """Metrics over the evaluation set (prepared batches); reduce sums with ``self.ctx.all_reduce_sum``.
        Scalars are logged; other values (lists, tensors) are for :meth:`write_artifacts` and reports."""
        raise NotImplementedError

    def write_artifacts(self, model: nn.Module, metrics: dict[str, Any], folder: Path) -> list[str]:
        """Pictures and files of one evaluation, written into ``folder`` (rank 0 only); returns their names."""
        return []

    def summary_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Task-specific entries of ``summary.json`` besides the scalar metrics (e.g. per-class accuracy)."""
        return {}

    def format_report(self, metrics: dict[str, Any]) -> str:
        """What ``vitkit eval`` prints."""
        return "   ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in scalar_metrics(metrics).items())

    def predict(self, model: nn.Module, images: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
        """Per-image results for ``vitkit predict`` (``images``: prepared float batch)."""
        raise ConfigError(f"the {self.name!r} task has no predict; use a checkpoint of a task that does "
                          f"(e.g. classify)")

    # ------------------------------------------------------------------ what tools ask of a trained model
    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def _cannot(self, what: str) -> ConfigError:
        return ConfigError(f"a model trained with the {self.name!r} task cannot do {what}")

    def check_eval_data(self, model: nn.Module, dataset: Any, where: str, ignore_class_names: bool = False) -> None:
        """Refuse an evaluation set this model cannot be scored on (``where`` names it in the error), before any
        work; e.g. a classifier of other classes. Nothing to check by default."""

    def zero_shot(self, model: nn.Module, images: torch.Tensor, class_names: Sequence[str],
                  templates: Sequence[str] | None = None) -> torch.Tensor:
        """(B, C) probabilities of prepared images over free-text ``class_names`` (capability ``"zero_shot"``)."""
        raise self._cannot("zero-shot classification")

    def retrieval_scores(self, model: nn.Module, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(images, texts) matching scores of prepared images against captions (capability ``"retrieve"``)."""
        raise self._cannot("image-text retrieval")

    def configure_sampling(self, model: nn.Module, steps: int | None = None, cfg: float | None = None,
                           top_k: int | None = None, seed: int = 0, **settings: Any) -> None:
        """Override the run's sampling settings before :meth:`sample_images` (capability ``"sample"``)."""
        raise self._cannot("sampling")

    def sample_images(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """Images (normalised like the training data) of the classes ``labels`` (capability ``"sample"``)."""
        raise self._cannot("sampling")

    def output_names(self, model: nn.Module) -> list[str]:
        """The classes a generator is conditioned on, by name (capability ``"sample"``)."""
        raise self._cannot("sampling")


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers of a metrics dict (what goes into ``metrics.jsonl`` and ``summary.json``)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_configured_model(model_cfg: Any, **defaults: Any) -> nn.Module:
    """The model a recipe's ``model`` section names: ``create_model(model.name, pretrained=..., **args)``, or, with
    no ``model.name``, the architecture of the ``model.pretrained`` checkpoint itself (a vitkit, run, Hugging Face,
    timm or OpenCLIP folder, or a hub id), so any checkpoint can be fine-tuned. ``model.args`` apply as overrides
    in both cases (``num_classes`` drops a head that no longer fits, ``img_size`` resamples the position tables);
    ``defaults`` (e.g. the data's class count) are used where ``model.args`` does not say."""
    from ..models import create_model

    args = {**defaults, **dict(model_cfg.args)}
    if model_cfg.name is None:
        if not model_cfg.pretrained:
            raise ConfigError("model.name is null and there is no model.pretrained: name a registered model "
                              "(vitkit models) or give a checkpoint to build the model from")
        from ..convert.auto import load_checkpoint

        return load_checkpoint(model_cfg.pretrained, **args)
    pretrained = checkpoint_folder(model_cfg.pretrained) if model_cfg.pretrained else None
    try:
        return create_model(model_cfg.name, pretrained=pretrained, **args)
    except CheckpointError as e:
        if pretrained is None or "does not fit" not in str(e):
            raise
        raise CheckpointError(f"{e}; to fine-tune the checkpoint's own architecture, drop model.name "
                              f"(--set model.name=null)") from None


# ---------------------------------------------------------------------------- registry
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to recipes as ``task: {name: <cls.name>}``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    if cls.mode not in ("max", "min"):
        raise ValueError(f"task {cls.name!r}: mode must be 'max' or 'min', got {cls.mode!r}")
    TASKS[cls.name] = cls
    return cls


def parse_task_args(cls: type[Task], args: Mapping[str, Any] | None) -> Any:
    """``task.args`` of a recipe -> the task's ``Args`` dataclass; an unknown key, a value of another type than the
    field's annotation (``tokenizer: true`` where a path is expected, ``top_k: .inf``) or out of its range
    (``vitkit.schema.TASK_ARG_RANGES``, e.g. ``cfg`` >= 0) is one ConfigError naming every bad key."""
    from ..schema import task_argument_problems

    args = dict(args or {})
    known = {f.name for f in dataclasses.fields(cls.Args)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"task {cls.name!r} does not take task.args {unknown}; valid: {sorted(known) or 'none'}")
    problems = task_argument_problems(cls.Args, args)
    if problems:
        raise ConfigError(f"task {cls.name!r}: " + "; ".join(problems))
    try:
        return cls.Args(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"task {cls.name!r}: bad task.args: {e}") from None


def build_task(name: str, args: Mapping[str, Any] | None = None, ctx: TaskContext | None = None) -> Task:
    """The registered task ``name`` with its settings; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    return cls(parse_task_args(cls, args), ctx)
