"""``vitkit eval``: load a checkpoint and score it on a dataset through its own task (which decides what the
metrics are); also the loading helpers every tool shares (:func:`load_model`, :func:`task_for_model`)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..convert.auto import load_checkpoint
from ..data import batch_collate, build_dataset
from ..errors import CheckpointError, ConfigError
from ..tasks import DEFAULT_TASK, TASKS, Task, TaskContext, build_task
from ..tasks._text import checkpoint_tokenizer
from ..tasks.base import checkpoint_folder


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder means its best checkpoint (then its last); a checkpoint folder is used as it is; a hub id
    ``hf-hub:ORG/NAME`` is its cached snapshot."""
    candidate = checkpoint_folder(path)
    if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
        return candidate
    raise CheckpointError(f"{path} is neither a vitkit checkpoint folder (config.json + model.safetensors) nor a "
                          f"training run folder with checkpoints/best")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint's model in eval mode (``pretrained_cfg["task"]`` names the task it was trained for).

    A checkpoint with NaN or infinite weights (a diverged run) is refused: its scores would mean nothing."""
    folder = resolve_model_dir(path)
    model = load_checkpoint(folder)  # a vitkit folder, or a Hugging Face / timm / OpenCLIP one converted on the fly
    if getattr(model, "tokenizer", False) is None and callable(getattr(model, "set_tokenizer", None)):
        tokenizer = checkpoint_tokenizer(folder)  # a converted text model: tokenizer.json beside its weights
        if tokenizer is not None:
            model.set_tokenizer(tokenizer)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f", … ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(f"{folder / 'model.safetensors'}: {len(bad)} tensors hold NaN or infinite values "
                              f"({shown}); the run that wrote it diverged")
    return model.to(device).eval()


def _input_spec(model) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of the images the model takes; a ConfigError for a model whose config names no
    input size (a next-scale generator draws images and takes none: ``vitkit sample`` is its command)."""
    size = model.pretrained_cfg.get("input_size")
    if not size or len(size) != 3:
        raise ConfigError(f"{getattr(model, 'model_name', None) or type(model).__name__} takes no image files (its "
                          f"config names no input_size); a generator is sampled with `vitkit sample`")
    channels, h, w = size
    return int(channels), (int(h), int(w))


def run_config(folder: str | Path) -> Any:
    """The recipe a checkpoint was trained with (``train_config.yaml`` beside its weights), or None (converted)."""
    saved = Path(folder) / "train_config.yaml"
    if not saved.is_file():
        return None
    from ..engine.config import load_config

    return load_config(saved)


def task_spec(model: torch.nn.Module, folder: str | Path | None = None) -> tuple[str, dict[str, Any] | None]:
    """(name, settings) of the task a checkpoint was trained for: the run's ``train_config.yaml`` when the folder
    has one, else ``pretrained_cfg["task"]``, else the model class's ``default_task`` (converted checkpoints)."""
    cfg = run_config(folder) if folder is not None else None
    if cfg is not None:
        return cfg.task.name, cfg.task.args
    return model.pretrained_cfg.get("task") or getattr(model, "default_task", DEFAULT_TASK), None


def task_for_model(model: torch.nn.Module, folder: str | Path | None = None, ctx: TaskContext | None = None
                   ) -> Task:
    """The task a checkpoint was trained for (see :func:`task_spec`), built with ``ctx``."""
    return build_task(*task_spec(model, folder), ctx)


def eval_data_settings(folder: str | Path, data: str | None = None, split: str | None = None,
                       data_dir: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """(dataset, split, build_dataset keywords) to evaluate a checkpoint on: by default the run's own data and
    evaluation split (an image-folder run is scored on its own folder); a dataset named explicitly keeps the
    run's settings only when it is the run's dataset. Converted checkpoints default to Fashion-MNIST's test set."""
    cfg = run_config(folder)
    own = cfg is not None and (data is None or data == cfg.data.name)
    if not own:
        return data or "fashion_mnist", split or "test", {"data_dir": data_dir}
    kw: dict[str, Any] = {"data_dir": data_dir or cfg.data.data_dir, **(cfg.data.args or {})}
    if cfg.data.root and not data_dir:
        kw["root"] = cfg.data.root
    if not split and cfg.data.eval_split is None:
        raise ConfigError(f"{folder}: the run has no evaluation split (data.eval_split=null: it held out part of its "
                          "training data); name one with --split")
    return cfg.data.name, split or cfg.data.eval_split, kw


def evaluate_checkpoint(path: str | Path, data: str | None = None, split: str | None = None,
                        data_dir: str | None = None, batch_size: int = 512, bf16: bool = False,
                        download: bool = False, ignore_class_names: bool = False, progress: bool = False,
                        **data_kw: Any) -> tuple[dict[str, Any], Task]:
    """Evaluate a checkpoint with its own task (top-1 for a classifier, reconstruction loss and k-NN for MAE,
    ...); normalisation comes from the checkpoint. Returns the metrics and the task (for its report).

    ``data``/``split`` default to the run's own dataset and evaluation split (:func:`eval_data_settings`). The
    task refuses data the model cannot be scored on before any work (a classifier of other classes;
    ``ignore_class_names`` scores it by class index anyway)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    folder = resolve_model_dir(path)
    model = load_model(folder)
    channels, size = _input_spec(model)
    data, split, settings = eval_data_settings(folder, data, split, data_dir)
    settings = {**settings, **data_kw}
    build = lambda s: build_dataset(data, s, image_size=size, num_channels=channels, download=download, **settings)
    dataset = build(split)
    name, args = task_spec(model, folder)
    train_set = build("train") if getattr(TASKS.get(name), "eval_needs_train_set", False) else dataset
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    ctx = TaskContext(train_set=train_set, eval_set=dataset, eval_batch_size=batch_size, collate=batch_collate,
                      autocast=autocast, progress=progress)
    task = build_task(name, args, ctx)
    task.check_eval_data(model, dataset, f"the {data} {split} set", ignore_class_names)
    task.setup(model)
    batches = (task.prepare_batch(b, train=False) for b in ctx.iterate(task.eval_dataset(dataset), batch_size))
    with autocast():
        metrics = task.evaluate(model, batches)
    return metrics, task


# ---------------------------------------------------------------------------- command line
def add_eval_args(p: Any) -> None:
    from .commands import positive_int

    p.add_argument("checkpoint", help="a checkpoint folder or a training run folder (uses checkpoints/best)")
    p.add_argument("--data", help="dataset name (fashion_mnist, cifar10, cifar100, digits, image_folder, ...; "
                   "default: the run's own dataset, or fashion_mnist for a converted checkpoint)")
    p.add_argument("--data-dir", help="where the dataset lives (image_folder: the root; default: the run's)")
    p.add_argument("--split", help="default: the run's evaluation split (data.eval_split), else test")
    p.add_argument("--batch-size", type=positive_int, default=512)
    p.add_argument("--bf16", action="store_true", help="run in bfloat16 autocast")
    p.add_argument("--confusion", metavar="PNG", help="also write the confusion matrix picture here")
    p.add_argument("--ignore-class-names", action="store_true",
                   help="score a classifier by class index even though its class names differ from the dataset's")


def run_eval_args(args: Any) -> int:
    metrics, task = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.data_dir, args.batch_size,
                                        args.bf16, ignore_class_names=args.ignore_class_names, progress=True)
    print(task.format_report(metrics))
    if args.confusion:
        if "confusion" not in metrics:
            raise ConfigError(f"--confusion: the {task.name!r} task has no confusion matrix")
        from ..viz import plot_confusion

        plot_confusion(torch.tensor(metrics["confusion"]), metrics["class_names"], args.confusion)
        print(f"confusion matrix: {args.confusion}")
    return 0
