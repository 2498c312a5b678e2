"""The ``vitkit`` command line: models, convert, train, eval, predict, bench, ablate.

Each command parses its arguments here and calls a library function, so everything the CLI does is also
available from Python. Errors vitkit raises on purpose are printed as one clear line (exit code 2),
not as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import VitkitError

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> exit code`` as a subcommand; ``fn.configure(parser)`` adds its arguments."""

    def wrap(fn):
        fn.help = help
        _COMMANDS[name] = fn
        return fn

    return wrap


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


@command("convert", "convert a foreign checkpoint into a vitkit checkpoint folder")
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    model = convert(args.kind, args.src, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({type(model).__name__}, {n / 1e6:.2f}M parameters)")
    return 0


cmd_convert.configure = _convert_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers on PyTorch")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
