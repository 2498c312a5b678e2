"""The ``vitkit`` command line: one table of subcommands (:data:`COMMANDS`), each handled by the module that does
the work, so everything the CLI does is also available from Python. Errors vitkit raises on purpose are printed as
one clear line (exit code 2), not as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

from .errors import VitkitError
from .tools.commands import parse_key_values  # noqa: F401  (re-exported: vitkit.cli.parse_key_values)

# The subcommands: name -> (module, one-line help). Each module offers ``add_<name>_args(parser)`` and
# ``run_<name>_args(args) -> exit code``; it is imported only when its command (or --help) needs it.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("vitkit.tools.commands", "list registered models"),
    "convert": ("vitkit.tools.commands", "convert a foreign checkpoint into a vitkit checkpoint folder"),
    "train": ("vitkit.tools.commands", "train a model from a YAML recipe (also under torchrun for several processes)"),
    "eval": ("vitkit.tools.evaluate", "evaluate a checkpoint with its task (default: the run's own data and split)"),
    "predict": ("vitkit.tools.predict", "the checkpoint's task's prediction for image files (a classifier: top-k)"),
    "zeroshot": ("vitkit.tools.predict", "zero-shot classification of image files: class names in, probabilities "
                                         "out"),
    "retrieve": ("vitkit.tools.predict", "image-text retrieval: the best images for each caption, or with "
                                         "--to-text the best captions for each image"),
    "sample": ("vitkit.tools.predict", "sample images of one class from a trained generator into a PNG grid"),
    "explain": ("vitkit.tools.explain", "attention pictures for image files: rollout, last-layer CLS attention, "
                                        "gradient-weighted"),
    "export": ("vitkit.tools.export", "export a trained model to ONNX, OpenVINO (fp32 or int8) or a Hugging Face "
                                      "transformers folder, checked against PyTorch (onnxruntime, OpenVINO, "
                                      "transformers)"),
    "bench": ("vitkit.tools.bench", "time vitkit against transformers (and timm) ViTs on this CPU, with the matmul "
                                    "peak"),
    "ablate": ("vitkit.tools.ablate", "train the variants of a design-choice study and tabulate mean ± std "
                                      "accuracy"),
    "report": ("vitkit.tools.report", "rebuild the docs' generated tables, verdicts and plots from their committed "
                                      "results files (--check: fail if they differ)"),
    "sparsevit": ("vitkit.tools.search", "SparseViT: search per-stage window keep ratios under latency budgets "
                                         "measured on this CPU"),
    "serve": ("vitkit.tools.serve", "serve a trained model: a web page (upload an image) and a JSON API, on "
                                    "127.0.0.1 by default"),
}


def _handlers(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    module = importlib.import_module(COMMANDS[name][0])
    return getattr(module, f"add_{name}_args"), getattr(module, f"run_{name}_args")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitkit", description="Vision Transformers on PyTorch")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, help) in COMMANDS.items():
        add_args, run = _handlers(name)
        p = sub.add_parser(name, help=help, description=help)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """While a command runs, a warning is one line, ``vitkit <command>: warning: <message>`` (the category is
    named unless it is vitkit's own or a plain UserWarning), instead of Python's ``file:line: Category: message``
    followed by the source line that warned (``return ImageFolder(``), and is written above a progress bar
    (``tqdm.write``) rather than into it. Only the format changes: which warnings show, and their capture by
    ``warnings.catch_warnings(record=True)`` / ``pytest.warns``, stay as they were."""
    previous = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:  # warnings.formatwarning signature
        own = category is UserWarning or category.__module__.split(".")[0] == "vitkit"
        text = f"vitkit {command}: warning: {'' if own else category.__name__ + ': '}{' '.join(str(message).split())}"
        from tqdm.auto import tqdm  # the class the progress bars use (its bars are in tqdm._instances)

        if getattr(tqdm, "_instances", None):  # a progress bar is on the line: print above it
            tqdm.write(text, file=sys.stderr)
            return ""
        return text + "\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


@contextlib.contextmanager
def _names_as_given() -> Iterator[None]:
    """While a command runs, stdout and stderr write the undecodable bytes of a file name (which Python keeps as
    lone surrogates, ``"\\udcff"``) back as they came. Under a UTF-8 locale such as en_US.UTF-8 Python's stdout is
    strict: ``vitkit predict RUN $'\\xff.png'`` ended in a UnicodeEncodeError traceback printing the image's path.
    The streams are put back as they were afterwards."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")
            changed.append(stream)
    try:
        yield
    finally:
        for stream in changed:
            stream.reconfigure(errors="strict")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _one_line_warnings(args.command), _names_as_given():
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
