"""Predictions for files: a model's task's answer for each image (``vitkit predict``), zero-shot classes
(``vitkit zeroshot``), image-text retrieval (``vitkit retrieve``) and samples of a class (``vitkit sample``).

Each goes through the checkpoint's own task (:meth:`~vitkit.tasks.Task.predict`, ``zero_shot``,
``retrieval_scores``, ``configure_sampling`` + ``sample_images``); a task that cannot do one says so in one line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.image_folder import load_image
from ..data.image_io import WRITE_FORMATS, image_write_format
from ..errors import ConfigError, DataError
from ..tasks import SEED_LIMIT, Task, check_sampling_values
from ..tasks._text import check_utf8
from ..utils import check_output_path
from .evaluate import _input_spec, load_model, resolve_model_dir, task_for_model

# `vitkit sample --n`: one grid of at most this many images (512 rows of 8); checked before the run is loaded
MAX_SAMPLES = 4096


def _images(model: torch.nn.Module, paths: Sequence[str | Path]) -> torch.Tensor:
    """The image files as a uint8 batch at the model's input size; missing files are named together."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    channels, size = _input_spec(model)
    return torch.stack([load_image(str(p), channels, size) for p in paths])


def _run_task(run: str | Path, capability: str, what: str) -> tuple[torch.nn.Module, Task]:
    """The run's model and its task, set up; refused in one line when the task lacks ``capability``."""
    folder = resolve_model_dir(run)
    model = load_model(folder)
    task = task_for_model(model, folder)
    if not task.can(capability):
        raise ConfigError(f"{folder} holds a {type(model).__name__} trained with the {task.name!r} task, which "
                          f"cannot do {what}")
    task.setup(model)
    return model, task


def _clean_texts(texts: Sequence[str], what: str) -> list[str]:
    """The non-empty texts, stripped; text that is not valid UTF-8 (undecodable bytes of a command-line argument)
    is a ConfigError naming ``what``."""
    cleaned = [str(t).strip() for t in texts if str(t).strip()]
    check_utf8(cleaned, what)
    return cleaned


@torch.no_grad()
def predict_images(model: torch.nn.Module, paths: list[str | Path], topk: int = 5,
                   folder: str | Path | None = None) -> list[dict[str, Any]]:
    """The model's task's prediction for each image file (top-k classes with probabilities for a classifier);
    unreadable files raise a DataError naming them."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
    images = _images(model, paths)
    task = task_for_model(model, folder)  # the checkpoint's folder holds the run's task settings
    task.setup(model)
    results = task.predict(model, task.prepare_batch(images, train=False), topk=topk)
    return [{"path": str(p), **r} for p, r in zip(paths, results)]


def zero_shot_files(run: str | Path, paths: Sequence[str | Path], class_names: Sequence[str],
                    templates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``vitkit zeroshot``: every class with its probability, best first, for each image file; ``templates``
    default to those the run was trained with."""
    names = _clean_texts(class_names, "class_names")
    if templates:
        check_utf8(templates, "templates")
    if len(names) < 2:
        raise ConfigError(f"zero-shot classification needs at least two class names, got {names}")
    model, task = _run_task(run, "zero_shot", "zero-shot classification")
    images = task.prepare_batch(_images(model, paths), train=False)
    probs = task.zero_shot(model, images, names, templates)
    results = []
    for path, row in zip(paths, probs):
        order = row.argsort(descending=True).tolist()
        results.append({"path": str(path), "top": [(names[i], float(row[i])) for i in order]})
    return results


def retrieval_scores(run: str | Path, paths: Sequence[str | Path], texts: Sequence[str]) -> torch.Tensor:
    """(images, texts) matching scores of image files against captions, by the run's task (a CLIP: scaled cosine
    similarity; a ViLT: the ITM logit of every pair)."""
    texts = _clean_texts(texts, "texts")
    if not texts or not paths:
        raise ConfigError("retrieval needs at least one image file and one text")
    model, task = _run_task(run, "retrieve", "image-text retrieval")
    images = task.prepare_batch(_images(model, paths), train=False)
    with torch.inference_mode():
        return task.retrieval_scores(model, images, texts)


def retrieve_files(run: str | Path, paths: Sequence[str | Path], texts: Sequence[str], to_text: bool = False,
                   topk: int = 5) -> list[dict[str, Any]]:
    """``vitkit retrieve``: for each text the best-matching image files (or with ``to_text`` for each image
    the best-matching texts), best first, with their scores (see :func:`retrieval_scores`)."""
    texts = _clean_texts(texts, "texts")
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


def load_generator(run: str | Path, steps: int | None = None, cfg: float | None = None, top_k: int | None = None,
                   seed: int = 0, **settings: Any) -> tuple[torch.nn.Module, Task, list[str]]:
    """(model, task, class names) of a trained generator run, with the task's sampling settings overridden
    (:meth:`~vitkit.tasks.Task.configure_sampling`): ``task.sample_images(model, labels)`` then draws samples."""
    model, task = _run_task(run, "sample", "sampling")
    task.configure_sampling(model, steps=steps, cfg=cfg, top_k=top_k, seed=seed, **settings)
    return model, task, task.output_names(model)


def sample_run(run: str | Path, class_name: str, n: int = 64, steps: int | None = None, cfg: float | None = None,
               top_k: int | None = None, seed: int = 0, out: str | Path | None = None) -> tuple[Path, float]:
    """Sample ``n`` images of one class from a trained generator run (see :func:`load_generator` for the
    settings) and write them as a PNG grid; returns (the PNG's path, wall-clock seconds per image, sampling and
    decoding). ``out`` defaults to ``samples_<class>.png`` in the run folder."""
    from ..tasks import class_index, save_image_grid, to_unit

    check_sample_settings(n, cfg, seed)
    if out is not None:
        image_write_format(out, "out")
        check_output_path(out, create_parent=True, what="--out image grid")  # before sampling, not after
    model, task, names = load_generator(run, steps=steps, cfg=cfg, top_k=top_k, seed=seed)
    label = class_index(class_name, names)
    start = time.perf_counter()
    images = task.sample_images(model, torch.full((n,), label, dtype=torch.long))  # -1: unconditional
    seconds = (time.perf_counter() - start) / n
    shown = "unconditional" if label < 0 else str(names[label])
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in shown)
    path = save_image_grid(to_unit(images, model.pretrained_cfg), out or Path(run) / f"samples_{safe}.png")
    return path, seconds


def check_sample_settings(n: int, cfg: float | None, seed: int) -> None:
    """What :func:`sample_run` checks before it loads anything: 1 <= ``n`` <= MAX_SAMPLES, ``cfg`` a finite
    number >= 0 (or None: the run's), 0 <= ``seed`` < 2**63."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise ConfigError(f"n must be an integer from 1 to {MAX_SAMPLES}, got {n!r}")
    check_sampling_values(cfg, seed)


# ---------------------------------------------------------------------------- command line
def _arg_type(check: Any, expected: str) -> Any:
    """An argparse type from ``check(text) -> value`` (raising ValueError when the value is out of range): a bad
    value is one usage line, ``argument --x: must be <expected>, got <text>``, before any work."""
    import argparse

    def parse(text: str) -> Any:
        try:
            return check(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}") from None

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


def _in_range(kind: Any, low: float, high: float | None = None) -> Any:
    def check(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and value >= low and (high is None or value < high)):
            raise ValueError(text)
        return value
    return check


def _utf8_arg(text: str, what: str) -> str:
    check_utf8([text], what)
    return text


def _print_ranked(query: str, rows: Sequence[tuple[str, float]], percent: bool) -> None:
    print(query)
    for name, value in rows:
        print(f"  {100 * value:6.2f}%  {name}" if percent else f"  {value:8.3f}  {name}")


def add_predict_args(p: Any) -> None:
    from .commands import positive_int

    p.add_argument("checkpoint", help="a checkpoint folder or a training run folder (uses checkpoints/best)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--topk", type=positive_int, default=5, help="how many classes to show (>= 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def run_predict_args(args: Any) -> int:
    import json

    results = predict_images(load_model(args.checkpoint), args.images, args.topk,
                             folder=resolve_model_dir(args.checkpoint))
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        _print_ranked(r["path"], r.get("top", []), percent=True)
        for key, value in r.items():
            if key not in ("path", "top"):
                print(f"  {key}: {value}")
    return 0


def add_zeroshot_args(p: Any) -> None:
    from .commands import positive_int

    p.add_argument("run", help="a CLIP training run folder or checkpoint folder (uses checkpoints/best)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'bag,coat,sneaker'")
    p.add_argument("--template", dest="templates", action="append", metavar="TEXT",
                   help="prompt with '{}' for the class name, repeatable; the embeddings of a class's prompts are "
                        "averaged (default: the run's task.args.templates)")
    p.add_argument("--topk", type=positive_int, default=5, help="how many classes to show (>= 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def run_zeroshot_args(args: Any) -> int:
    import json

    _utf8_arg(args.classes, "--classes")
    for template in args.templates or []:
        _utf8_arg(template, "--template")
    for r in zero_shot_files(args.run, args.images, args.classes.split(","), args.templates):
        r["top"] = r["top"][:args.topk]
        if args.json:
            print(json.dumps(r))
        else:
            _print_ranked(r["path"], r["top"], percent=True)
    return 0


def add_retrieve_args(p: Any) -> None:
    from .commands import positive_int

    p.add_argument("run", help="a CLIP or ViLT training run folder or checkpoint folder (uses checkpoints/best)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--text", dest="texts", action="append", default=[], metavar="TEXT", help="a caption, repeatable")
    p.add_argument("--texts-file", help="a UTF-8 file with one caption per line (added to --text)")
    p.add_argument("--to-text", action="store_true",
                   help="rank the texts for each image (default: rank the images for each text)")
    p.add_argument("--topk", type=positive_int, default=5, help="how many matches to show (>= 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def run_retrieve_args(args: Any) -> int:
    import json

    for text in args.texts:
        _utf8_arg(text, "--text")
    texts = list(args.texts)
    if args.texts_file:
        texts += read_texts_file(args.texts_file)
    for r in retrieve_files(args.run, args.images, texts, to_text=args.to_text, topk=args.topk):
        if args.json:
            print(json.dumps(r))
        else:
            _print_ranked(r["query"], r["matches"], percent=False)
    return 0


def read_texts_file(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is allowed); anything else is a DataError naming the
    file and the first undecodable byte."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: --texts-file must be UTF-8 text; byte 0x{data[e.start]:02x} on line {line} "
                        f"(offset {e.start}) is not valid UTF-8") from None
    return text.splitlines()


def add_sample_args(p: Any) -> None:
    count = _arg_type(_in_range(int, 1, MAX_SAMPLES + 1), f"an integer from 1 to {MAX_SAMPLES}")
    p.add_argument("run", help="a generator run folder or checkpoint folder (task ar, var or hart)")
    p.add_argument("--class", dest="class_name", required=True, metavar="NAME_OR_INDEX",
                   help="the class to sample: its name or index ('none': unconditional)")
    p.add_argument("--n", type=count, default=64, help=f"how many images, 1 to {MAX_SAMPLES} (8 per grid row)")
    p.add_argument("--steps", type=_arg_type(_in_range(int, 0), "an integer >= 0"),
                   help="masked-order ar: MaskGIT steps; hart: diffusion steps (0 = none)")
    p.add_argument("--cfg", type=_arg_type(_in_range(float, 0), "a finite number >= 0"),
                   help="classifier-free guidance, a finite number >= 0 (default: the run's task.args.cfg)")
    p.add_argument("--top-k", type=_arg_type(_in_range(int, 0), "an integer >= 0"),
                   help="sample among the k likeliest tokens, 0 = all (default: the run's)")
    p.add_argument("--seed", type=_arg_type(_in_range(int, 0, SEED_LIMIT), "an integer with 0 <= seed < 2**63"),
                   default=0, help="sampling seed, 0 <= seed < 2**63 (same seed, same images)")
    p.add_argument("--out", help=f"the image grid to write, {'/'.join(WRITE_FORMATS)} (default: "
                                 "RUN/samples_<class>.png)")


def run_sample_args(args: Any) -> int:
    if args.out is not None:
        image_write_format(args.out, "--out")
    path, seconds = sample_run(args.run, args.class_name, args.n, args.steps, args.cfg, args.top_k, args.seed,
                               args.out)
    print(f"wrote {path} ({args.n} images, {1000 * seconds:.1f} ms per image)")
    return 0
