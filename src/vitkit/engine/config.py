"""Training configuration: typed dataclasses, YAML recipes and dotted overrides, via OmegaConf.

A recipe (``configs/fmnist/vit_tiny.yaml``) is merged onto the defaults below, then ``--set a.b=c``
overrides are applied. OmegaConf checks keys and types against the dataclasses, so a typo or a bad
value fails with a :class:`~vitkit.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.transforms import AugmentConfig
from ..errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "vit_fmnist_tiny"
    pretrained: str | None = None
    # Extra constructor arguments for create_model, e.g. {drop_path_rate: 0.1, pos_embed: learned_2d}.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    data_dir: str | None = None
    root: str | None = None  # image_folder: a folder with train/ and val/ (or test/) subfolders
    eval_split: str = "test"
    train_fraction: float = 1.0  # data-size studies: a stratified, seeded subset of the training set
    image_size: int | None = None  # resize (None: the dataset's own size)
    download: bool = True
    max_bad_images: int = 0  # unreadable images dropped (and reported) at start or skipped during training
    # image_folder: how each file is checked when the dataset is built; "header" reads headers (fast),
    # "decode" decodes every file and so also catches truncated data before the first step
    verify: Literal["header", "decode"] = "header"
    num_workers: int = 0


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    layer_decay: float | None = None  # layer-wise LR decay for fine-tuning, e.g. 0.75
    clip_grad: float | None = None


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # global batch per optimizer step (split over processes and accumulation)
    grad_accum: int = 1
    ema_decay: float | None = None
    # bf16 autocast: true | false | auto (bf16 only where the CPU computes it natively, AMX or AVX512-BF16;
    # emulated bf16 is several times slower than fp32). A CUDA device counts as native.
    bf16: Union[bool, str] = False  # noqa: UP007 - OmegaConf needs typing.Union
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    eval_every: int = 1  # epochs
    eval_batch_size: int = 512
    checkpoint_every_steps: int | None = None  # also checkpoint mid-epoch (resume is exact either way)
    max_steps: int | None = None  # stop early (smoke tests, simulated interruption); schedule is unchanged
    progress: bool = True
    threads: int | None = None


@dataclass
class TaskConfig:
    """The objective: a registered task name (``vitkit.tasks.TASKS``) and its own settings."""

    name: str = "classify"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    output_dir: str = "runs/exp"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _config_error(e: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return ConfigError(f"{origin}: {'key ' + repr(key) + ': ' if key else ''}{msg}")


def _validate(cfg: RunConfig) -> RunConfig:
    checks = {
        "train.epochs": cfg.train.epochs >= 1,
        "train.batch_size": cfg.train.batch_size >= 1,
        "train.grad_accum": cfg.train.grad_accum >= 1 and cfg.train.batch_size % cfg.train.grad_accum == 0,
        "train.ema_decay": cfg.train.ema_decay is None or 0 < cfg.train.ema_decay < 1,
        "train.bf16": cfg.train.bf16 in (True, False, "auto"),
        "optim.lr": cfg.optim.lr > 0,
        "optim.weight_decay": cfg.optim.weight_decay >= 0,
        "optim.layer_decay": cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1,
        "data.train_fraction": 0 < cfg.data.train_fraction <= 1,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs >= 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        values = ", ".join(f"{k}={OmegaConf.select(OmegaConf.structured(cfg), k)!r}" for k in bad)
        raise ConfigError(f"invalid value: {values} (batch_size must be divisible by grad_accum)")
    from ..tasks import TASKS, parse_task_args

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not a known task; known tasks: {', '.join(sorted(TASKS))}")
    parse_task_args(TASKS[cfg.task.name], cfg.task.args)  # a misspelt task.args key fails here, by name
    return cfg


def _task_shorthand(layer: DictConfig) -> DictConfig:
    """``task: mae`` (the older recipe form, or ``--set task=mae``) means ``task: {name: mae}``."""
    if isinstance(layer, DictConfig) and isinstance(layer.get("task", None), str):
        layer = layer.copy()
        layer.task = {"name": layer.task}
    return layer


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- ``base`` dict <- YAML ``recipe`` <- dotted ``overrides`` (``["optim.lr=1e-3", ...]``)."""
    schema = OmegaConf.structured(RunConfig)
    layers: list[tuple[str, DictConfig]] = []
    if base:
        layers.append(("base config", OmegaConf.create(base)))
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as e:  # noqa: BLE001 - YAML errors come in several types
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-3")
        layers.append(("--set", OmegaConf.from_dotlist(list(overrides))))
    merged = schema
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, _task_shorthand(layer))
        except OmegaConfBaseException as e:
            raise _config_error(e, origin) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _config_error(e, "config") from None
    return _validate(cfg)  # type: ignore[arg-type]


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
