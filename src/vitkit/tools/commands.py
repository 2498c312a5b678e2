"""Command-line glue for the commands whose work lives below the tools: ``models`` (the registry), ``convert``
(:mod:`vitkit.convert`) and ``train`` (:mod:`vitkit.engine`). Every command module offers
``add_<command>_args(parser)`` and ``run_<command>_args(args) -> exit code``; :mod:`vitkit.cli` is their table."""

from __future__ import annotations

import argparse
import re
import textwrap

from ..errors import ConfigError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into one usage line and exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_key_values(items: list[str]) -> dict:
    """``["num_heads=2", "dynamic_img_size=true"]`` -> ``{"num_heads": 2, "dynamic_img_size": True}`` (YAML values);
    a value that is not valid YAML (``x=[1,``) is a ConfigError naming it."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} must look like key=value")
        try:
            out[key] = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError) as e:  # ParserError, ScannerError, ...; an integer of > 4,300 digits
            first = " ".join(str(e).split("\n")[0].split())
            raise ConfigError(f"{item!r}: the value is not valid YAML ({type(e).__name__}: {first})") from None
    return out


# ---------------------------------------------------------------------------- models
def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vit_*_patch16_*'")
    p.add_argument("--family", help="only this family (file), e.g. vit or t2t_vit")


def run_models_args(args: argparse.Namespace) -> int:
    from ..models import list_models

    for name in list_models(args.pattern, family=args.family):
        print(name)
    return 0


# ---------------------------------------------------------------------------- convert
def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line, reST ````literals```` and roles as plain text."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    return re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", text).replace("``", "")


def _converter_line(doc: str | None) -> str:
    """The first sentence of a ``convert_*`` docstring without what every converter does ("into a vitkit checkpoint
    folder dst; returns the model"): one short line per kind in ``vitkit convert --help``."""
    text = _first_paragraph(doc)
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", text)
    text = text[:match.start() + 1] if match else text
    text = re.sub(r";? returns the model(?=\.$)", "", text)
    return re.sub(r" into a vitkit checkpoint folder dst", "", text)


def _converter_description(kind: str, module_doc: str | None) -> str:
    """The converter module's first paragraph, and the paragraph about this kind where the module has several
    (``vitkit convert KIND SRC DST — ...``), wrapped."""
    paragraphs = [p for p in (module_doc or "").strip().split("\n\n") if p.strip()]
    chosen = paragraphs[:1] + [p for p in paragraphs[1:] if p.lstrip().startswith(f"``vitkit convert {kind} ")]
    return "\n\n".join(textwrap.fill(_first_paragraph(p), 100) for p in chosen)


def _converter_epilog(kind: str, specs) -> str:
    """Every ``--arg`` key of ``kind`` (its ``ConvertArg.describe()``), one wrapped entry each."""
    if not specs:
        return f"vitkit convert {kind} takes no --arg keys."
    lines = ["--arg keys (KEY=VALUE, the value in YAML: 2, true, [1, 2], hswish):"]
    for spec in specs:
        lines.append(textwrap.fill(spec.describe(), 100, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """One subcommand per converter kind, ``vitkit convert KIND SRC DST [--arg KEY=VALUE ...]``, whose --help
    lists the keys that converter declares (``vitkit.convert.CONVERTER_ARGS``)."""
    import sys

    from ..convert import CONVERTER_ARGS, CONVERTERS

    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND",
                             title="kinds (vitkit convert KIND --help lists its --arg keys)")
    for kind in sorted(CONVERTERS):
        fn = CONVERTERS[kind]
        sub = kinds.add_parser(kind, help=_converter_line(fn.__doc__),
                               description=_converter_description(kind, sys.modules[fn.__module__].__doc__),
                               epilog=_converter_epilog(kind, CONVERTER_ARGS.get(kind, ())),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("src", metavar="SRC", help="the foreign checkpoint (folder or file)")
        sub.add_argument("dst", metavar="DST", help="the vitkit checkpoint folder to write")
        sub.add_argument("--arg", dest="args", action="append", default=[], metavar="KEY=VALUE",
                         help="a value the checkpoint does not tell, or one to override (repeatable; the keys are "
                              "listed below)")


def run_convert_args(args: argparse.Namespace) -> int:
    from ..convert import convert

    model = convert(args.kind, args.src, args.dst, **parse_key_values(args.args))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({type(model).__name__}, {n / 1e6:.2f}M parameters)")
    return 0


# ---------------------------------------------------------------------------- train
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--recipe", dest="config", help="YAML recipe, e.g. configs/fmnist/vit_tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set optim.lr=1e-3 --set train.epochs=5")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder exactly where it stopped")
    p.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    p.add_argument("--if-exists", choices=("refuse", "resume", "overwrite"), default="refuse",
                   help="when the output folder already holds a run: refuse (default), resume it from its last "
                        "checkpoint, or overwrite it (its checkpoints and metrics are removed first)")


def run_train_args(args: argparse.Namespace) -> int:
    from ..engine import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    summary = train(args.config, overrides, resume=args.resume, if_exists=args.if_exists)
    return 0 if summary["finished"] or summary["steps"] else 1
