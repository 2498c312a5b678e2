"""Training configuration: typed dataclasses, YAML recipes and dotted overrides, via OmegaConf.

A recipe (``configs/fmnist/vit_tiny.yaml``) is merged onto the defaults below, then ``--set a.b=c``
overrides are applied. OmegaConf checks keys and types against the dataclasses, so a typo or a bad
value fails with a :class:`~vitkit.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.transforms import AugmentConfig
from ..errors import ConfigError
from ..tasks import DEFAULT_TASK
from .distributed import DEVICES
from .loggers import LOGGERS, LoggerArgs

DEFAULT_MODEL = "vit_fmnist_tiny"  # when a recipe names neither a model nor a checkpoint
STRATEGIES = ("ddp", "fsdp")  # train.strategy (see vitkit.engine.fsdp)


@dataclass
class ModelConfig:
    # a registered model; null (with model.pretrained) builds the checkpoint's own architecture, so a converted or
    # downloaded checkpoint of any configuration fine-tunes without a registered name; null alone: vit_fmnist_tiny
    name: str | None = None
    pretrained: str | None = None  # a checkpoint or run folder, a Hugging Face / timm / OpenCLIP folder, or hf-hub:ID
    # Extra constructor arguments for create_model, e.g. {drop_path_rate: 0.1, pos_embed: learned_2d}.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    data_dir: str | None = None
    root: str | None = None  # image_folder: a folder with train/ and val/ (or test/) subfolders
    # the split evaluated (or, with val_fraction, tested once at the end); null: none (needs val_fraction > 0)
    eval_split: str | None = "test"
    train_fraction: float = 1.0  # data-size studies: a stratified, seeded subset of the training set
    # A validation split carved from the training images (stratified, seeded by val_seed, the same for every
    # training seed): evaluations during training and the best checkpoint use it; eval_split (the test set) is
    # read once, by the final model, after the last epoch. train_fraction then subsets what is left.
    val_fraction: float = 0.0
    val_seed: int = 0
    # a dataset with its own validation split (eval_split: val, e.g. fmnist_scenes): the split read once, by the
    # final model, after the last epoch, as with val_fraction (null: none)
    test_split: str | None = None
    image_size: int | None = None  # resize (None: the dataset's own size)
    download: bool = True
    max_bad_images: int = 0  # unreadable images dropped (and reported) at start or skipped during training
    # image_folder: how each file is checked when the dataset is built; "header" reads headers (fast),
    # "decode" decodes every file and so also catches truncated data before the first step
    verify: Literal["header", "decode"] = "header"
    # DataLoader processes; auto: sized from train.device (0 on the CPU, whose cores compute the step; on CUDA the
    # node's cores shared among its training processes, at most 8 each). An integer is taken as it is.
    num_workers: Union[int, str] = "auto"  # noqa: UP007 - OmegaConf needs typing.Union
    # settings of a generated dataset, e.g. fmnist_scenes: {canvas: 112, max_items: 4, num_scenes: 20000, seed: 0}
    args: dict[str, Any] = field(default_factory=dict)


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
    # auto: CUDA when torch sees a GPU, else the CPU; cuda: fail in one line where there is none; cpu: even with one
    device: str = "auto"
    # bf16 autocast on train.device: true | false | auto (bf16 only where the device computes it natively: a CPU
    # with AMX or AVX512-BF16, a GPU from Ampere on; emulated bf16 is several times slower than fp32). No fp16.
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
    # experiment trackers that also get every metric, the config and the pictures (rank 0): tensorboard, mlflow
    loggers: list[str] = field(default_factory=list)
    logger_args: LoggerArgs = field(default_factory=LoggerArgs)  # tensorboard.log_dir, mlflow.tracking_uri, ...
    # with several processes (torchrun): ddp replicates the model; fsdp shards parameters, gradients and optimizer
    # state per transformer block (FSDP2) and writes sharded checkpoints any process count resumes
    strategy: str = "ddp"
    activation_checkpointing: bool = False  # recompute each transformer block in backward: less memory, more compute


@dataclass
class TaskConfig:
    """The objective: a registered task name (``vitkit.tasks.TASKS``) and its own settings."""

    name: str = DEFAULT_TASK
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


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[:2]).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _config_error(e: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = (str(e).splitlines() or [type(e).__name__])[0]
    return ConfigError(f"{origin}: {'key ' + repr(key) + ': ' if key else ''}{msg}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x: Any) -> bool:
    return _finite(x) and x > 0


def _non_negative(x: Any) -> bool:
    return _finite(x) and x >= 0


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or rule(x)


def _in_unit(x: Any) -> bool:
    return _finite(x) and 0 <= x < 1


# key: (rule, what the value must be). Every setting with a range is here, so a bad value fails before any
# work starts instead of training the wrong thing (a negative clip reverses the gradients, a negative min_lr
# drives the learning rate below zero) or failing an epoch later.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "output_dir": (lambda x: bool(str(x).strip()), "a folder path"),
    "model.name": (lambda x: x is None or bool(str(x).strip()),
                   "a registered model name (vitkit models), or null to build model.pretrained's own"),
    "data.train_fraction": (lambda x: _finite(x) and 0 < x <= 1, "in (0, 1]"),
    "data.val_fraction": (lambda x: _finite(x) and 0 <= x < 1, "in [0, 1) (0: no validation split)"),
    "data.image_size": (_optional(lambda x: x >= 1), "an integer >= 1, or null for the dataset's own size"),
    "data.max_bad_images": (lambda x: x >= 0, "an integer >= 0"),
    "data.num_workers": (lambda x: x == "auto" or (type(x) is int and x >= 0),
                         "an integer >= 0 (0 loads in the main process) or auto (sized from train.device)"),
    "optim.lr": (_positive, "a finite number > 0"),
    "optim.weight_decay": (_non_negative, "a finite number >= 0"),
    "optim.betas": (lambda x: len(x) == 2 and all(_in_unit(b) for b in x), "two numbers in [0, 1)"),
    "optim.momentum": (_in_unit, "in [0, 1)"),
    "optim.layer_decay": (_optional(lambda x: _finite(x) and 0 < x <= 1), "in (0, 1], or null"),
    "optim.clip_grad": (_optional(_positive), "a finite number > 0, or null for no clipping"),
    "schedule.warmup_epochs": (_non_negative, "a finite number >= 0"),
    "schedule.min_lr": (_non_negative, "a finite number >= 0"),
    "schedule.warmup_lr": (_non_negative, "a finite number >= 0"),
    "train.epochs": (lambda x: x >= 1, "an integer >= 1"),
    "train.batch_size": (lambda x: x >= 1, "an integer >= 1"),
    "train.grad_accum": (lambda x: x >= 1, "an integer >= 1"),
    "train.ema_decay": (_optional(lambda x: _finite(x) and 0 < x < 1), "in (0, 1), or null"),
    "train.device": (lambda x: x in DEVICES, ", ".join(DEVICES[:-1]) + f" or {DEVICES[-1]}"),
    "train.bf16": (lambda x: x in (True, False, "auto"), "true, false or auto"),
    "train.eval_every": (lambda x: x >= 1, "an integer >= 1 (epochs between evaluations)"),
    "train.eval_batch_size": (lambda x: x >= 1, "an integer >= 1"),
    "train.checkpoint_every_steps": (_optional(lambda x: x >= 1), "an integer >= 1, or null"),
    "train.max_steps": (_optional(lambda x: x >= 1), "an integer >= 1, or null for the whole schedule"),
    "train.threads": (_optional(lambda x: x >= 1), "an integer >= 1, or null for torch's default"),
    "train.strategy": (lambda x: x in STRATEGIES, " or ".join(STRATEGIES)),
    "train.loggers": (lambda x: set(x) <= set(LOGGERS) and len(set(x)) == len(x),
                      f"a list of distinct loggers among: {', '.join(LOGGERS)}"),
    **{f"train.logger_args.{key}": (_optional(lambda x: bool(str(x).strip())), "a non-empty string, or null for "
                                    "the default") for key in ("tensorboard.log_dir", "mlflow.tracking_uri",
                                                               "mlflow.experiment", "mlflow.run_name")},
}


def _validate(cfg: RunConfig) -> RunConfig:
    bad = []
    for key, (rule, expected) in _RULES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        try:
            ok = bool(rule(value))
        except TypeError:
            ok = False
        if not ok:
            bad.append(f"{key}={_show(value)} must be {expected}")
    t = cfg.train
    if not bad and t.strategy == "fsdp" and t.ema_decay:
        bad.append("train.ema_decay needs train.strategy=ddp (the EMA copy is not sharded)")
    d = cfg.data
    if not bad and d.test_split is not None and d.val_fraction > 0:
        bad.append(f"data.test_split={d.test_split!r} with data.val_fraction={d.val_fraction}: with a held-out "
                   f"validation fraction the test split is data.eval_split; leave data.test_split null")
    if not bad and d.test_split is not None and d.test_split == d.eval_split:
        bad.append(f"data.test_split={d.test_split!r} equals data.eval_split: choices would be made on the test "
                   f"split; evaluate on a validation split (data.eval_split: val)")
    if not bad and t.batch_size % t.grad_accum:
        bad.append(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    if bad:
        raise ConfigError("invalid setting: " + "; ".join(bad))
    from ..tasks import TASKS, parse_task_args

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not a known task; known tasks: {', '.join(sorted(TASKS))}")
    parse_task_args(TASKS[cfg.task.name], cfg.task.args)  # a misspelt task.args key fails here, by name
    _check_model(cfg.model)
    return cfg


def _show(value: Any) -> str:
    from collections.abc import Sequence

    return str(list(value)) if isinstance(value, Sequence) and not isinstance(value, str) else repr(value)


def _check_model(model: ModelConfig) -> None:
    """The model name is registered and ``model.args`` would build it: the arguments its constructor takes, their
    types and ranges, a build on the meta device (the constructor's own checks, no memory) and the weights against
    half of the machine's memory (``vitkit.models.check_model_arguments``). A failure of the check is an
    error, never a skipped check."""
    from ..models import check_model_arguments, list_models

    if model.name is None:
        if model.pretrained:
            return  # the checkpoint's own configuration, checked when it is read
        model.name = DEFAULT_MODEL
    if model.name not in list_models():
        import difflib

        close = difflib.get_close_matches(model.name, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `vitkit models` lists them"
        if os.path.isdir(model.name) or str(model.name).startswith("hf-hub:"):
            hint = f"; to fine-tune that checkpoint, set model.pretrained={model.name} and model.name=null"
        raise ConfigError(f"model.name={model.name!r} is not a registered model{hint}")
    check_model_arguments(model.name, model.args, "model.args")


def _task_shorthand(layer: DictConfig) -> DictConfig:
    """``task: mae`` (the older recipe form, or ``--set task=mae``) means ``task: {name: mae}``."""
    if isinstance(layer, DictConfig) and isinstance(layer.get("task", None), str):
        layer = layer.copy()
        layer.task = {"name": layer.task}
    return layer


@dataclass(frozen=True)
class _Reset:
    key: str


def _reset_layer(key: str) -> _Reset:
    """``~model.args``: drop what earlier layers set under ``key`` (e.g. a recipe's model arguments that a
    variant with another model does not take), so later overrides start from the default."""
    if OmegaConf.select(_schema(), key, default=_MISSING) is _MISSING:
        raise ConfigError(f"--set ~{key}: {key!r} is not a setting")
    return _Reset(key)


_MISSING = object()


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- ``base`` dict <- YAML ``recipe`` <- dotted ``overrides`` (``["optim.lr=1e-3", ...]``).

    An override ``~key`` (no value) resets ``key`` to its default, e.g. ``~model.args`` before naming another
    model whose constructor takes other arguments than the recipe's."""
    schema = _schema()  # merge never changes its inputs, so one schema serves every call
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
            raise ConfigError(f"{path} is not valid YAML: {_first_line(e)}") from None
    if overrides:
        for item in overrides:
            if item.startswith("~") and "=" not in item:  # Hydra's deletion syntax: back to the default
                layers.append((f"--set {item}", _reset_layer(item[1:])))
                continue
            if "=" not in item or not item.partition("=")[0].strip():
                raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-3")
            try:
                layers.append((f"--set {item}", OmegaConf.from_dotlist([item])))
            except Exception as e:  # noqa: BLE001 - the value is parsed as YAML: ScannerError, ParserError, ...
                raise ConfigError(f"--set {item}: the value is not valid YAML ({_first_line(e)})") from None
    merged = schema
    for origin, layer in layers:
        if isinstance(layer, _Reset):
            merged = merged.copy()
            OmegaConf.update(merged, layer.key, OmegaConf.select(schema, layer.key), merge=False)
            continue
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{origin}: the top level must be a mapping of sections (task, model, data, optim, "
                              f"schedule, train, ...), got a {type(layer).__name__}")
        try:
            merged = OmegaConf.merge(merged, _task_shorthand(layer))
        except OmegaConfBaseException as e:
            raise _config_error(e, origin) from None
        except (TypeError, ValueError) as e:  # e.g. a list merged onto a mapping
            raise ConfigError(f"{origin}: the value does not have the structure of its key, e.g. a list where a "
                              f"mapping belongs ({_first_line(e)})") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _config_error(e, "config") from None
    except ConfigError as e:  # raised by a section's own checks (augment)
        raise ConfigError(f"config: {e}") from None
    return _validate(cfg)  # type: ignore[arg-type]


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
