"""Evaluate a checkpoint on a dataset, and predict for image files, each through the checkpoint's own task."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..data import batch_collate, build_dataset
from ..data.image_folder import load_image
from ..errors import CheckpointError, ConfigError, DataError
from ..models import from_pretrained
from ..tasks import TASKS, Task, TaskContext, build_task
from ..tasks.base import checkpoint_folder


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder means its best checkpoint (then its last); a checkpoint folder is used as it is."""
    path = Path(path)
    candidate = checkpoint_folder(path)
    if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
        return candidate
    raise CheckpointError(f"{path} is neither a vitkit checkpoint folder (config.json + model.safetensors) nor a "
                          f"training run folder with checkpoints/best")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint's model in eval mode (``pretrained_cfg["task"]`` names the task it was trained for).

    A checkpoint with NaN or infinite weights (a diverged run) is refused: its scores would mean nothing."""
    folder = resolve_model_dir(path)
    model = from_pretrained(folder)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f", … ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(f"{folder / 'model.safetensors'}: {len(bad)} tensors hold NaN or infinite values "
                              f"({shown}); the run that wrote it diverged")
    return model.to(device).eval()


def _placeholder_names(names: list[str]) -> bool:
    """Names that say nothing about the classes (HF's LABEL_0, plain indices): no reason to compare them."""
    return all(str(n) in (f"LABEL_{i}", str(i), f"class_{i}") for i, n in enumerate(names))


def _input_spec(model) -> tuple[int, tuple[int, int]]:
    channels, h, w = model.pretrained_cfg["input_size"]
    return int(channels), (int(h), int(w))


def task_spec(model: torch.nn.Module, folder: str | Path | None = None) -> tuple[str, dict[str, Any] | None]:
    """(name, settings) of the task a checkpoint was trained for: the run's ``train_config.yaml`` when the folder
    has one, else ``pretrained_cfg["task"]``, else classification (converted checkpoints)."""
    saved = Path(folder) / "train_config.yaml" if folder is not None else None
    if saved is not None and saved.is_file():
        from .config import load_config

        cfg = load_config(saved)
        return cfg.task.name, cfg.task.args
    return model.pretrained_cfg.get("task", "classify"), None


def task_for_model(model: torch.nn.Module, folder: str | Path | None = None, ctx: TaskContext | None = None
                   ) -> Task:
    """The task a checkpoint was trained for (see :func:`task_spec`), built with ``ctx``."""
    return build_task(*task_spec(model, folder), ctx)


def evaluate_checkpoint(path: str | Path, data: str = "fashion_mnist", split: str = "test",
                        data_dir: str | None = None, batch_size: int = 512, bf16: bool = False,
                        download: bool = False, ignore_class_names: bool = False, **data_kw: Any
                        ) -> tuple[dict[str, Any], Task]:
    """Evaluate a checkpoint with its own task (top-1 for a classifier, reconstruction loss and k-NN for MAE,
    ...); normalisation comes from the checkpoint. Returns the metrics and the task (for its report).

    A classifier whose class names differ from the dataset's is refused (a digits model scored on Fashion-MNIST
    would count "0" as "T-shirt/top"); ``ignore_class_names`` scores it by class index anyway."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    folder = resolve_model_dir(path)
    model = load_model(folder)
    channels, size = _input_spec(model)
    build = lambda s: build_dataset(data, s, data_dir=data_dir, image_size=size, num_channels=channels,
                                    download=download, **data_kw)
    dataset = build(split)
    names = model.pretrained_cfg.get("class_names")
    num_classes = getattr(model, "num_classes", None)
    name, args = task_spec(model, folder)
    train_set = build("train") if getattr(TASKS.get(name), "eval_needs_train_set", False) else dataset
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    ctx = TaskContext(train_set=train_set, eval_set=dataset, eval_batch_size=batch_size, collate=batch_collate,
                      autocast=autocast)
    task = build_task(name, args, ctx)
    if task.name == "classify" and num_classes != len(dataset.classes):
        raise DataError(f"the model predicts {num_classes} classes, the {data} {split} set has "
                        f"{len(dataset.classes)}")
    if (task.name == "classify" and names and not ignore_class_names and not _placeholder_names(names)
            and list(map(str, names)) != list(map(str, dataset.classes))):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, dataset.classes)) if str(a) != str(b)]
        raise DataError(f"{folder} was trained on other classes than the {data} {split} set ({len(diff)} of "
                        f"{len(names)} names differ, e.g. {'; '.join(diff[:3])}); pass --ignore-class-names to "
                        f"score it by class index anyway")
    if names is None and task.name == "classify":
        model.pretrained_cfg = {**model.pretrained_cfg, "class_names": list(dataset.classes)}
    task.setup(model)
    batches = (task.prepare_batch(b, train=False) for b in ctx.iterate(task.eval_dataset(dataset), batch_size))
    with autocast():
        metrics = task.evaluate(model, batches)
    return metrics, task


@torch.no_grad()
def predict_images(model: torch.nn.Module, paths: list[str | Path], topk: int = 5,
                   folder: str | Path | None = None) -> list[dict[str, Any]]:
    """The model's task's prediction for each image file (top-k classes with probabilities for a classifier);
    unreadable files raise a DataError naming them."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
    channels, size = _input_spec(model)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    images = torch.stack([load_image(str(p), channels, size) for p in paths])
    task = task_for_model(model, folder)  # the checkpoint's folder holds the run's task settings
    task.setup(model)
    results = task.predict(model, task.prepare_batch(images, train=False), topk=topk)
    return [{"path": str(p), **r} for p, r in zip(paths, results)]


def zero_shot_files(run: str | Path, paths: Sequence[str | Path], class_names: Sequence[str],
                    templates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``vitkit zeroshot``: every class with its probability, best first, for each image file.

    ``templates`` default to those the run was trained with (its ``task.args.templates``), else
    :data:`DEFAULT_TEMPLATES`."""
    from ..data.transforms import build_transforms
    from ..models.clip import CLIP
    from ..tasks.clip import DEFAULT_TEMPLATES, model_tokenizer, zero_shot_classify

    names = [str(c).strip() for c in class_names if str(c).strip()]
    if len(names) < 2:
        raise ConfigError(f"zero-shot classification needs at least two class names, got {names}")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    folder = resolve_model_dir(run)
    model = load_model(folder)
    if not isinstance(model, CLIP):
        raise ConfigError(f"{folder} holds a {type(model).__name__}; zero-shot classification needs a CLIP")
    if templates is None:
        task, args = task_spec(model, folder)
        templates = list((args or {}).get("templates") or DEFAULT_TEMPLATES) if task == "clip" else DEFAULT_TEMPLATES
    tokenizer = model_tokenizer(model, folder)
    cfg = model.pretrained_cfg
    channels, size = _input_spec(model)
    images = torch.stack([load_image(str(p), channels, size) for p in paths])
    images = build_transforms(None, False, cfg["mean"], cfg["std"], size)(images)
    probs = zero_shot_classify(model, tokenizer, images, names, templates)
    results = []
    for path, row in zip(paths, probs):
        order = row.argsort(descending=True).tolist()
        results.append({"path": str(path), "top": [(names[i], float(row[i])) for i in order]})
    return results


def load_generator(run: str | Path, steps: int | None = None, cfg: float | None = None, top_k: int | None = None,
                   seed: int = 0, **settings: Any) -> tuple[torch.nn.Module, Task, list[str]]:
    """(model, task, class names) of a trained generator run (ar, var or hart: its task says which), with the
    task's sampling settings overridden: ``task.sample_images(model, labels)`` then draws samples.

    ``steps``: MaskGIT steps of a masked-order ar generator, or HART's diffusion steps (0 = the discrete image);
    other generators take none. ``cfg`` / ``top_k`` default to the run's task settings; ``settings`` are further
    task arguments (``temperature``, ``top_p``). The tokenizer is the one the run trained on (its
    ``task.args.tokenizer``, else the path saved in the checkpoint)."""
    import dataclasses

    from ..tasks.generation import GENERATOR_TASKS

    folder = resolve_model_dir(run)
    model = load_model(folder)
    name, args = task_spec(model, folder)
    if name not in GENERATOR_TASKS:
        raise ConfigError(f"{run} was trained with task {name!r}; sampling needs a generator "
                          f"({', '.join(GENERATOR_TASKS)})")
    task = build_task(name, args)
    saved = model.pretrained_cfg.get("tokenizer")
    if saved and not (checkpoint_folder(task.args.tokenizer or ".") / "config.json").is_file():
        task.args = dataclasses.replace(task.args, tokenizer=str(saved))  # run from another working directory
    overrides: dict[str, Any] = {"sample_seed": seed, **settings}
    if cfg is not None:
        overrides["cfg"] = cfg
    if top_k is not None:
        overrides["top_k"] = top_k
    if steps is not None:
        if name == "ar" and model.order == "masked":
            overrides["steps"] = steps
        elif name == "hart":
            overrides["diffusion_steps"] = steps
        else:
            raise ConfigError("--steps is for a masked-order ar generator (MaskGIT steps) or hart (diffusion steps); "
                              f"this {name} generator takes one step per {'token' if name == 'ar' else 'scale'}")
    try:
        task.args = dataclasses.replace(task.args, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampling settings for {run}: {e}") from None
    names = model.pretrained_cfg.get("class_names") or task.tokenizer().pretrained_cfg.get("source_classes") \
        or [str(i) for i in range(model.num_classes)]
    return model, task, [str(n) for n in list(names)[:model.num_classes]]


def sample_run(run: str | Path, class_name: str, n: int = 64, steps: int | None = None, cfg: float | None = None,
               top_k: int | None = None, seed: int = 0, out: str | Path | None = None) -> tuple[Path, float]:
    """Sample ``n`` images of one class from a trained generator run (see :func:`load_generator` for the
    settings) and write them as a PNG grid; returns (the PNG's path, wall-clock seconds per image, sampling and
    decoding). ``out`` defaults to ``samples_<class>.png`` in the run folder."""
    import time

    from ..tasks.generation import class_index, save_image_grid, to_unit

    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    model, task, names = load_generator(run, steps=steps, cfg=cfg, top_k=top_k, seed=seed)
    label = class_index(class_name, names)
    start = time.perf_counter()
    null = model.num_classes  # every generator's null class (the unconditional row of its class table)
    images = task.sample_images(model, torch.full((n,), null if label < 0 else label, dtype=torch.long))
    seconds = (time.perf_counter() - start) / n
    shown = "unconditional" if label < 0 else str(names[label])
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in shown)
    path = save_image_grid(to_unit(images, model.pretrained_cfg), out or Path(run) / f"samples_{safe}.png")
    return path, seconds


def vilt_task_for(model: torch.nn.Module, folder: str | Path) -> Task:
    """The vilt task set up for ``model``: the run's settings (tokenizer length, ...), defaults for a converted
    checkpoint that has none."""
    name, args = task_spec(model, folder)
    task = build_task("vilt", args if name == "vilt" else None)
    task.setup(model)
    return task


def retrieval_scores(run: str | Path, paths: Sequence[str | Path], texts: Sequence[str]) -> torch.Tensor:
    """(images, texts) matching scores of image files against captions with a CLIP (cosine similarity of the
    normalised embeddings, times the learned scale) or a ViLT (the ITM logit of every pair, one joint pass each)."""
    from ..data.transforms import build_transforms
    from ..models.clip import CLIP, logit_scale_multiplier
    from ..models.vilt import ViLT
    from ..tasks.clip import configured_tokenizer, model_tokenizer, tokenize

    texts = [str(t).strip() for t in texts if str(t).strip()]
    if not texts or not paths:
        raise ConfigError("retrieval needs at least one image file and one text")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    folder = resolve_model_dir(run)
    model = load_model(folder)
    if not isinstance(model, (CLIP, ViLT)):
        raise ConfigError(f"{folder} holds a {type(model).__name__}; retrieval needs a CLIP or a ViLT")
    cfg = model.pretrained_cfg
    channels, size = _input_spec(model)
    images = torch.stack([load_image(str(p), channels, size) for p in paths])
    images = build_transforms(None, False, cfg["mean"], cfg["std"], size)(images)
    with torch.inference_mode():
        if isinstance(model, CLIP):
            ids, mask = tokenize(configured_tokenizer(model_tokenizer(model, folder), model.context_length), texts)
            img = model.encode_image(images, normalize=True).float()
            txt = model.encode_text(ids, mask, normalize=True).float()
            return logit_scale_multiplier(model.logit_scale.detach()).float() * img @ txt.T
        task = vilt_task_for(model, folder)
        rows = [task._scores(model, images[i:i + 1].expand(len(texts), -1, -1, -1), texts)
                for i in range(len(paths))]
        return torch.stack(rows)


def retrieve_files(run: str | Path, paths: Sequence[str | Path], texts: Sequence[str], to_text: bool = False,
                   topk: int = 5) -> list[dict[str, Any]]:
    """``vitkit retrieve``: for each text the best-matching image files (or with ``to_text`` for each image
    the best-matching texts), best first, with their scores (see :func:`retrieval_scores`)."""
    texts = [str(t).strip() for t in texts if str(t).strip()]
    scores = retrieval_scores(run, paths, texts)
    if to_text:
        queries, keys, table = [str(p) for p in paths], texts, scores
    else:
        queries, keys, table = texts, [str(p) for p in paths], scores.T
    results = []
    for query, row in zip(queries, table):
        order = row.argsort(descending=True)[:topk].tolist()
        results.append({"query": query, "matches": [(keys[i], float(row[i])) for i in order]})
    return results
