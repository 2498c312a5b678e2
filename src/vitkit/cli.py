"""The ``vitkit`` command line: models, convert, train, eval, predict, bench, ablate, explain, export, sparsevit,
zeroshot, retrieve, sample, serve.

Each command parses its arguments here and calls a library function, so everything the CLI does is also
available from Python. Errors vitkit raises on purpose are printed as one clear line (exit code 2),
not as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import VitkitError

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> exit code`` as a subcommand; ``fn.configure(parser)`` adds its arguments."""

    def wrap(fn):
        fn.help = help
        _COMMANDS[name] = fn
        return fn

    return wrap


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into one usage line and exit code 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


# ---------------------------------------------------------------------------- models
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vit_*_patch16_*'")
    p.add_argument("--family", help="only this family (file), e.g. vit or t2t_vit")


@command("models", "list registered models")
def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    for name in list_models(args.pattern, family=args.family):
        print(name)
    return 0


cmd_models.configure = _models_args


# ---------------------------------------------------------------------------- convert
def _convert_args(p: argparse.ArgumentParser) -> None:
    from .convert import CONVERTERS

    p.add_argument("kind", choices=sorted(CONVERTERS), help="the checkpoint's origin")
    p.add_argument("src", help="the foreign checkpoint (folder or file)")
    p.add_argument("dst", help="the vitkit checkpoint folder to write")
    p.add_argument("--arg", dest="args", action="append", default=[], metavar="KEY=VALUE",
                   help="a model constructor argument the weights cannot tell, e.g. --arg num_heads=2 (repeatable)")


def parse_key_values(items: list[str]) -> dict:
    """``["num_heads=2", "dynamic_img_size=true"]`` -> ``{"num_heads": 2, "dynamic_img_size": True}`` (YAML values)."""
    import yaml

    from .errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} must look like key=value")
        out[key] = yaml.safe_load(value)
    return out


@command("convert", "convert a foreign checkpoint into a vitkit checkpoint folder")
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    model = convert(args.kind, args.src, args.dst, **parse_key_values(args.args))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({type(model).__name__}, {n / 1e6:.2f}M parameters)")
    return 0


cmd_convert.configure = _convert_args


# ---------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--recipe", dest="config", help="YAML recipe, e.g. configs/fmnist/vit_tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set optim.lr=1e-3 --set train.epochs=5")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder exactly where it stopped")
    p.add_argument("--output-dir", help="shorthand for --set output_dir=...")


@command("train", "train a model from a YAML recipe (also under torchrun for several processes)")
def cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    summary = train(args.config, overrides, resume=args.resume)
    return 0 if summary["finished"] or summary["steps"] else 1


cmd_train.configure = _train_args


# ---------------------------------------------------------------------------- eval
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder or a training run folder (uses checkpoints/best)")
    p.add_argument("--data", default="fashion_mnist", help="dataset name (fashion_mnist, cifar10, cifar100, "
                   "digits, image_folder)")
    p.add_argument("--data-dir", help="where the dataset lives (image_folder: the root)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=_positive_int, default=512)
    p.add_argument("--bf16", action="store_true", help="run in bfloat16 autocast")
    p.add_argument("--confusion", metavar="PNG", help="also write the confusion matrix picture here")
    p.add_argument("--ignore-class-names", action="store_true",
                   help="score a classifier by class index even though its class names differ from the dataset's")


@command("eval", "evaluate a checkpoint with its task (a classifier: top-1, top-5, per-class accuracy)")
def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_checkpoint

    metrics, task = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.data_dir, args.batch_size,
                                        args.bf16, ignore_class_names=args.ignore_class_names)
    print(task.format_report(metrics))
    if args.confusion:
        if "confusion" not in metrics:
            from .errors import ConfigError

            raise ConfigError(f"--confusion: the {task.name!r} task has no confusion matrix")
        import torch

        from .viz import plot_confusion

        plot_confusion(torch.tensor(metrics["confusion"]), metrics["class_names"], args.confusion)
        print(f"confusion matrix: {args.confusion}")
    return 0


cmd_eval.configure = _eval_args


# ---------------------------------------------------------------------------- predict
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder or a training run folder (uses checkpoints/best)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--topk", type=_positive_int, default=5, help="how many classes to show (>= 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


@command("predict", "top-k classes for image files")
def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .engine import load_model, predict_images
    from .engine.evaluate import resolve_model_dir

    results = predict_images(load_model(args.checkpoint), args.images, args.topk,
                             folder=resolve_model_dir(args.checkpoint))
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        print(r["path"])
        for name, p in r.get("top", []):
            print(f"  {100 * p:6.2f}%  {name}")
        for key, value in r.items():
            if key not in ("path", "top"):
                print(f"  {key}: {value}")
    return 0


cmd_predict.configure = _predict_args


# ---------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    from .benchmark import add_bench_args

    add_bench_args(p)


@command("bench", "time vitkit against transformers (and timm) ViTs on this CPU, with the matmul peak")
def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_bench_args

    return run_bench_args(args)


cmd_bench.configure = _bench_args


# ---------------------------------------------------------------------------- ablate
def _ablate_args(p: argparse.ArgumentParser) -> None:
    from .engine.ablate import STUDIES

    p.add_argument("--recipe", "--config", dest="recipe", required=True, help="the base YAML recipe")
    p.add_argument("--study", action="append", required=True, choices=[*STUDIES, "all"],
                   help="which claim to test (repeatable, or 'all')")
    p.add_argument("--seeds", type=_positive_int, default=2, help="seeds per variant")
    p.add_argument("--output-dir", default="runs/ablate", help="results.jsonl, tables, plots and run folders")
    p.add_argument("--variants", help="comma-separated subset of the study's variants")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="trainings side by side, each in its own process with cores/jobs threads (2 on 2 cores "
                        "is faster than 1 run on both)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to the base recipe for every variant")
    p.add_argument("--pretrained", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained checkpoint the study's variants use, e.g. --pretrained mae=runs/fmnist_mae_tiny "
                        "(ssl study: mae and contrastive)")


@command("ablate", "train the variants of a design-choice study and tabulate mean ± std accuracy")
def cmd_ablate(args: argparse.Namespace) -> int:
    from .engine.ablate import STUDIES, run_ablation

    pretrained = {k: str(v) for k, v in parse_key_values(args.pretrained).items()}
    # 'all': every study whose pretrained checkpoints were given
    studies = ([s for s in STUDIES if not STUDIES[s].needs_pretrained or pretrained] if "all" in args.study
               else list(dict.fromkeys(args.study)))
    variants = args.variants.split(",") if args.variants else None
    run_ablation(args.recipe, studies, args.seeds, args.output_dir, args.overrides, variants, args.jobs, pretrained)
    for s in studies:
        print(Path(args.output_dir, f"ablation_{s}.md").read_text())
    print(f"results: {args.output_dir}/results.jsonl, plots: {args.output_dir}/ablation_<study>.png")
    return 0


cmd_ablate.configure = _ablate_args


# ---------------------------------------------------------------------------- explain
def _explain_args(p: argparse.ArgumentParser) -> None:
    from .engine.explain import add_explain_args

    add_explain_args(p)


@command("explain", "attention pictures for image files: rollout, last-layer CLS attention, gradient-weighted")
def cmd_explain(args: argparse.Namespace) -> int:
    from .engine.explain import run_explain_args

    return run_explain_args(args)


cmd_explain.configure = _explain_args


# ---------------------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    from .engine.export import add_export_args

    add_export_args(p)


@command("export", "export a trained model to ONNX, checked against PyTorch with onnxruntime")
def cmd_export(args: argparse.Namespace) -> int:
    from .engine.export import run_export_args

    return run_export_args(args)


cmd_export.configure = _export_args


# ---------------------------------------------------------------------------- sparsevit
def _sparsevit_args(p: argparse.ArgumentParser) -> None:
    from .engine.sparsevit import add_sparsevit_args

    add_sparsevit_args(p)


@command("sparsevit", "SparseViT: search per-stage window keep ratios under latency budgets measured on this CPU")
def cmd_sparsevit(args: argparse.Namespace) -> int:
    from .engine.sparsevit import run_search
    from .errors import ConfigError

    if args.eval_images < 1 or args.latency_batch < 1:
        raise ConfigError("--eval-images and --latency-batch must be >= 1")
    if not args.budget_ms and not args.speedup:
        raise ConfigError("sparsevit search: give --budget-ms MS [MS ...] or --speedup X [X ...]")
    run_search(args.run, args.budget_ms, args.out, args.data, args.split, parse_key_values(args.data_arg),
               args.eval_images, args.latency_batch, args.choices, args.population, args.generations, args.seed,
               speedups=args.speedup)
    print(f"wrote {Path(args.out) / 'search.json'} and {Path(args.out) / 'pareto.png'}")
    return 0


cmd_sparsevit.configure = _sparsevit_args


# ---------------------------------------------------------------------------- zeroshot
def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a CLIP training run folder or checkpoint folder (uses checkpoints/best)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'bag,coat,sneaker'")
    p.add_argument("--template", dest="templates", action="append", metavar="TEXT",
                   help="prompt with '{}' for the class name, repeatable; the embeddings of a class's prompts are "
                        "averaged (default: the run's task.args.templates)")
    p.add_argument("--topk", type=_positive_int, default=5, help="how many classes to show (>= 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


@command("zeroshot", "zero-shot classification of image files with a CLIP: class names in, probabilities out")
def cmd_zeroshot(args: argparse.Namespace) -> int:
    import json

    from .engine.evaluate import zero_shot_files

    for r in zero_shot_files(args.run, args.images, args.classes.split(","), args.templates):
        r["top"] = r["top"][:args.topk]
        if args.json:
            print(json.dumps(r))
            continue
        print(r["path"])
        for name, p in r["top"]:
            print(f"  {100 * p:6.2f}%  {name}")
    return 0


cmd_zeroshot.configure = _zeroshot_args


# ---------------------------------------------------------------------------- retrieve
def _retrieve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a CLIP or ViLT training run folder or checkpoint folder (uses checkpoints/best)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--text", dest="texts", action="append", default=[], metavar="TEXT",
                   help="a caption, repeatable")
    p.add_argument("--texts-file", help="a UTF-8 file with one caption per line (added to --text)")
    p.add_argument("--to-text", action="store_true",
                   help="rank the texts for each image (default: rank the images for each text)")
    p.add_argument("--topk", type=_positive_int, default=5, help="how many matches to show (>= 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


@command("retrieve", "image-text retrieval with a CLIP or ViLT: the best images for each caption, or with "
                     "--to-text the best captions for each image")
def cmd_retrieve(args: argparse.Namespace) -> int:
    import json

    from .engine.evaluate import retrieve_files

    texts = list(args.texts)
    if args.texts_file:
        texts += Path(args.texts_file).read_text(encoding="utf-8").splitlines()
    for r in retrieve_files(args.run, args.images, texts, to_text=args.to_text, topk=args.topk):
        if args.json:
            print(json.dumps(r))
            continue
        print(r["query"])
        for key, score in r["matches"]:
            print(f"  {score:8.3f}  {key}")
    return 0


cmd_retrieve.configure = _retrieve_args


# ---------------------------------------------------------------------------- sample
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a generator run folder or checkpoint folder (task ar, var or hart)")
    p.add_argument("--class", dest="class_name", required=True, metavar="NAME_OR_INDEX",
                   help="the class to sample: its name or index ('none': unconditional)")
    p.add_argument("--n", type=_positive_int, default=64, help="how many images (8 per grid row)")
    p.add_argument("--steps", type=int, help="masked-order ar: MaskGIT steps; hart: diffusion steps (0 = none)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance (default: the run's task.args.cfg)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the PNG grid to write (default: RUN/samples_<class>.png)")


@command("sample", "sample images of one class from a trained generator (ar, var, hart) into a PNG grid")
def cmd_sample(args: argparse.Namespace) -> int:
    from .engine.evaluate import sample_run

    path, seconds = sample_run(args.run, args.class_name, args.n, args.steps, args.cfg, args.top_k, args.seed,
                               args.out)
    print(f"wrote {path} ({args.n} images, {1000 * seconds:.1f} ms per image)")
    return 0


cmd_sample.configure = _sample_args


# ---------------------------------------------------------------------------- serve
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a training run folder or checkpoint folder: the only model this server serves")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="larger uploads get 413")
    p.add_argument("--explain", default="rollout", choices=["rollout", "last", "grad", "none"],
                   help="attention overlay shown with each prediction")


@command("serve", "serve a trained model: a web page (upload an image) and a JSON API, on 127.0.0.1 by default")
def cmd_serve(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    try:
        from .serve import serve
    except ImportError as e:
        raise ConfigError(f"vitkit serve needs FastAPI and uvicorn: pip install 'vitkit[serve]' ({e})") from None
    if not 0 < args.port < 65536 or args.max_upload_mb <= 0:
        raise ConfigError("--port must be in 1..65535 and --max-upload-mb > 0")
    serve(args.run, args.host, args.port, int(args.max_upload_mb * 1024 * 1024),
          None if args.explain == "none" else args.explain)
    return 0


cmd_serve.configure = _serve_args


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitkit", description="Vision Transformers on PyTorch")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, fn in _COMMANDS.items():
        p = sub.add_parser(name, help=fn.help, description=fn.help)
        fn.configure(p)
        p.set_defaults(_run=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except VitkitError as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: name it in one line
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"vitkit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
