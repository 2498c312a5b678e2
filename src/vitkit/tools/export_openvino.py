"""``vitkit export openvino RUN DIR``: a vitkit classifier as an OpenVINO IR folder, fp32 or int8, checked.

:func:`export_openvino` traces the model with vitkit's own ONNX exporter (:func:`vitkit.tools.export.export_onnx`,
dynamic batch, the model's own image size), converts that file with ``openvino.convert_model`` (int8: NNCF
post-training quantization on calibration images, :func:`vitkit.tools.runtimes.quantize_openvino`) and writes
``DIR`` the way Hugging Face optimum-intel lays out its folders, so OpenVINO's ``Core.read_model`` (or
optimum-intel) opens it:

* ``openvino_model.xml`` + ``openvino_model.bin``: the IR, weights kept float32 (``compress_to_fp16=False``: the
  fp32 export is meant to compute what PyTorch computes); the preprocessing metadata is also in its ``rt_info``
  under ``vitkit`` (JSON strings);
* ``config.json``: the vitkit config of the model (what ``save_pretrained`` writes beside the weights);
* ``vitkit_export.json``: the metadata of the ONNX export (input/output names, input_size, mean, std,
  interpolation, class_names, task), the precision, the vitkit and OpenVINO versions, the checks' results and
  the list of files (it marks the folder as an export that a later one may replace).

Checks (``check=True``): fp32 runs random batches through OpenVINO's CPU plugin and PyTorch and refuses the folder
above ``atol``. int8 checks its fp32 graph the same way before quantizing, then runs the calibration images through
the int8 IR and the fp32 PyTorch model: the report gives the max |Δ| of the logits and the top-1 agreement, and the
folder is refused only when the agreement is below :data:`MIN_INT8_AGREEMENT` (quantization moves logits by design,
so no atol applies). The images are those the model was calibrated on (the run's own training images).

The folder appears whole or not at all, as ``vitkit export hf``'s: it is written beside ``DIR`` under a temporary
name and renamed into place after the checks; ``DIR`` may be missing, empty or an earlier OpenVINO export holding
only its own files; anything else is refused before any work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import ConfigError
from ..utils import OutputPathError, file_mode, require_extra
from .export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    ParityError,
    _input_size,
    _metadata,
    _name,
    export_onnx,
    metadata_line,
)
from .export_hf import MARKER, _new_sibling, _swap_in, check_destination
from .runtimes import DEFAULT_CALIBRATION, OpenVinoRuntime, quantize_openvino

FORMAT = "openvino"
PRECISIONS = ("fp32", "int8")
XML, BIN, CONFIG = "openvino_model.xml", "openvino_model.bin", "config.json"
MIN_INT8_AGREEMENT = 0.9  # top-1 agreement of the int8 IR with fp32 PyTorch below which the export is refused
DEFAULT_ATOL = 1e-4
_CHECK_BATCH = 32  # images per OpenVINO call in the int8 check


# ---------------------------------------------------------------------------------------------------- helpers
def _require_extras(precision: str) -> Any:
    """openvino (and nncf for int8, onnx for the exporter) or one line naming the extra; the openvino module."""
    ov = require_extra("openvino", "openvino", "vitkit export openvino")
    if precision == "int8":
        require_extra("nncf", "openvino", "vitkit export openvino --precision int8")
    require_extra("onnx", "export", "vitkit export openvino (it converts vitkit's ONNX export)")
    return ov


def check_openvino_destination(out_dir: str | os.PathLike) -> tuple[Path, bool]:
    """:func:`vitkit.tools.export_hf.check_destination`, and an earlier export there must be an OpenVINO one."""
    target, replaces = check_destination(out_dir)
    if replaces:
        try:
            kind = json.loads((target / MARKER).read_text(encoding="utf-8")).get("format", "hf")
        except (OSError, ValueError, AttributeError):
            kind = "unreadable"
        if kind != FORMAT:
            raise OutputPathError(f"{os.fspath(out_dir)}: holds an earlier vitkit export of another format ({kind}), "
                                  f"not an OpenVINO one; choose another folder")
    return target, replaces


def _check_calibration(calibration: Any, input_size: tuple[int, int, int]) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor):
        raise ConfigError("int8 export needs calibration images: a (N, C, H, W) tensor of normalised inputs "
                          "(vitkit.tools.runtimes.calibration_images(RUN, N))")
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != input_size or calibration.shape[0] < 1:
        raise ConfigError(f"calibration images must be (N, {', '.join(map(str, input_size))}) with N >= 1, got "
                          f"{tuple(calibration.shape)}")
    calibration = calibration.detach().float().cpu()
    if not torch.isfinite(calibration).all():
        raise ConfigError("calibration images hold NaN or infinite values")
    return calibration


def _torch_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        return model(x.to(device)).float().cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return diff if diff == diff and diff != float("inf") else float("inf")


def _check_fp32(source: Any, model: nn.Module, input_size: tuple[int, int, int], atol: float, threads: int,
                seed: int, what: str) -> list[dict[str, Any]]:
    """Random batches (2 and 3: the batch axis is free) through OpenVINO and PyTorch; a ParityError above atol."""
    runtime = OpenVinoRuntime(source, "fp32", threads)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for batch in (2, 3):
        x = torch.randn(batch, *input_size, generator=gen)
        label = "x".join(map(str, x.shape))
        try:
            out = runtime(x)
        except Exception as e:  # OpenVINO's errors have no common public base class
            raise ExportError(f"the {what} of {_name(model)} fails in OpenVINO on a {label} batch: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        ref = _torch_logits(model, x)
        if out.shape != ref.shape:
            raise ParityError(f"OpenVINO returns {tuple(out.shape)} for a {label} batch, PyTorch {tuple(ref.shape)}")
        diff = _max_diff(out, ref)
        results.append({"shape": list(x.shape), "max_abs_diff": diff})
        if diff > atol:
            raise ParityError(f"{_name(model)}: the OpenVINO {what} differs from PyTorch by max |Δ| = {diff:.3g} "
                              f"(> atol {atol:g}) on a {label} batch; the folder was not written")
    return results


def _check_int8(xml: Path, model: nn.Module, calibration: torch.Tensor, threads: int) -> dict[str, Any]:
    """Top-1 agreement and max |Δ| of the int8 IR against fp32 PyTorch on the calibration images; refused below
    :data:`MIN_INT8_AGREEMENT`."""
    runtime = OpenVinoRuntime(xml, "fp32", threads)  # "fp32": the IR is already int8; no second quantization
    outs, refs = [], []
    for start in range(0, calibration.shape[0], _CHECK_BATCH):
        x = calibration[start:start + _CHECK_BATCH]
        outs.append(runtime(x))
        refs.append(_torch_logits(model, x))
    out, ref = torch.cat(outs), torch.cat(refs)
    if out.shape != ref.shape:
        raise ParityError(f"the int8 OpenVINO model returns {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    agreement = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    result = {"images": int(calibration.shape[0]), "top1_agreement": agreement, "max_abs_diff": _max_diff(out, ref),
              "min_agreement": MIN_INT8_AGREEMENT}
    if agreement < MIN_INT8_AGREEMENT:
        raise ParityError(f"{_name(model)}: the int8 OpenVINO model agrees with fp32 PyTorch on the top-1 class of "
                          f"only {agreement:.1%} of the {result['images']} calibration images (< "
                          f"{MIN_INT8_AGREEMENT:.0%}; max |Δ| {result['max_abs_diff']:.3g}); the folder was not "
                          f"written: export fp32, or calibrate on more images")
    return result


def _fsync_files(folder: Path) -> None:
    """Flush what OpenVINO and the writers left in ``folder`` before it is renamed into place."""
    for path in folder.iterdir():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------- export
def export_openvino(model: nn.Module, folder: str | os.PathLike, precision: str = "fp32",
                    calibration: torch.Tensor | None = None, check: bool = True, atol: float = DEFAULT_ATOL, *,
                    opset: int = DEFAULT_OPSET, threads: int | None = None, seed: int = 0,
                    source: str | None = None) -> dict[str, Any]:
    """Write ``model`` as an OpenVINO IR folder (see the module docstring) and return a report.

    Args:
        precision: ``"fp32"`` or ``"int8"`` (NNCF post-training quantization on ``calibration``).
        calibration: int8 only: normalised inputs (N, C, H, W) at the model's input size
            (:func:`vitkit.tools.runtimes.calibration_images` takes them from a training run).
        check: fp32: refuse above ``atol`` against PyTorch; int8: refuse a top-1 agreement with fp32 PyTorch
            below :data:`MIN_INT8_AGREEMENT` on the calibration images (and check the fp32 graph first).
        opset: of the intermediate ONNX export. threads: OpenVINO's threads in the check (default torch's).
        source: where the model came from, recorded in ``vitkit_export.json``.

    The report: path, precision, files, input/output names and shapes, the checks, the metadata written, the
    folder's size, whether an earlier export was replaced.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"an OpenVINO export is one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not atol > 0:
        raise ConfigError(f"atol must be > 0, got {atol!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export_openvino needs a torch.nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    target, replaces = check_openvino_destination(folder)  # before any work
    input_size = _input_size(model)
    if precision == "int8":
        calibration = _check_calibration(calibration, input_size)
    elif calibration is not None:
        raise ConfigError("calibration images are for precision='int8'; an fp32 export takes none")
    ov = _require_extras(precision)
    threads = threads or max(1, torch.get_num_threads())
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).float()  # the reference of the checks computes in float32, as the IR does
    was_training = model.training
    model.eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(target, "tmp")
    tmp.mkdir()
    checks: list[dict[str, Any]] = []
    int8: dict[str, Any] | None = None
    try:
        os.chmod(tmp, file_mode() | (file_mode() & 0o444) >> 2)  # a folder's usual mode (0755 under umask 022)
        with tempfile.TemporaryDirectory() as work:
            onnx_path = Path(work) / "model.onnx"
            onnx_report = export_onnx(model, onnx_path, opset=opset, dynamic_batch=True, dynamic_size=False,
                                      check=False, seed=seed)  # the OpenVINO check below covers the whole chain
            ov_model = ov.convert_model(str(onnx_path))
        meta = {k: json.loads(v) for k, v in _metadata(model, input_size, onnx_report["dynamic_axes"]).items()}
        meta["precision"] = precision
        for key, value in meta.items():
            ov_model.set_rt_info(json.dumps(value), ["vitkit", key])
        if precision == "int8":
            if check:  # a conversion error shows here as such, not as a poor int8 agreement
                checks = _check_fp32(ov_model, model, input_size, atol, threads, seed + 1, "fp32 graph")
            ov_model = quantize_openvino(ov_model, calibration)
        ov.save_model(ov_model, str(tmp / XML), compress_to_fp16=False)
        files = [XML, BIN]
        config = model.config() if callable(getattr(model, "config", None)) else None
        if isinstance(config, dict):
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            files.append(CONFIG)
        if check and precision == "fp32":
            checks = _check_fp32(tmp / XML, model, input_size, atol, threads, seed + 1, "IR")
        elif check:
            int8 = _check_int8(tmp / XML, model, calibration, threads)
        versions = {"vitkit_version": __version__, "openvino_version": ov.__version__}
        if precision == "int8":
            versions["nncf_version"] = require_extra("nncf", "openvino", "int8").__version__
        marker = {"format": FORMAT, **meta, **versions, "source": source or _name(model),
                  "onnx_opset": opset, "checks": {"fp32": checks, "int8": int8, "atol": atol},
                  "files": sorted(files)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _fsync_files(tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        target, replaces = check_openvino_destination(folder)  # nothing else appeared there meanwhile
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    shape = lambda port: [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]  # noqa: E731
    return {
        "path": os.fspath(folder), "format": FORMAT, "precision": precision, "model_name": _name(model),
        "files": sorted([*files, MARKER]), "folder_bytes": size, "replaced_earlier_export": replaces,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": shape(ov_model.inputs[0])},
        "output": {"name": OUTPUT_NAME, "shape": shape(ov_model.outputs[0])},
        "checks": checks, "max_abs_diff": max((c["max_abs_diff"] for c in checks), default=None), "atol": atol,
        "int8": int8, "calibration_images": int(calibration.shape[0]) if calibration is not None else 0,
        "metadata": meta, **versions, "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------------- CLI
def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    dims = lambda d: "[" + ", ".join(map(str, d)) + "]"  # noqa: E731
    lines = [f"exported {report['model_name']} -> {report['path']} as OpenVINO IR {report['precision']} "
             f"({', '.join(report['files'])}; {report['folder_bytes'] / 1e6:.2f} MB, OpenVINO "
             f"{report['openvino_version'].split('-')[0]})"
             + (" (replaced the earlier export)" if report["replaced_earlier_export"] else ""),
             f"input {report['input']['name']} {report['input']['dtype']} {dims(report['input']['shape'])} -> "
             f"output {report['output']['name']} {dims(report['output']['shape'])}"]
    if report["checks"]:
        what = "fp32 graph" if report["precision"] == "int8" else "IR"
        each = ", ".join(f"{'x'.join(map(str, c['shape']))}: {c['max_abs_diff']:.1e}" for c in report["checks"])
        lines.append(f"OpenVINO {what} vs PyTorch: max |Δ| {report['max_abs_diff']:.1e} <= atol {report['atol']:g} "
                     f"({each})")
    if report["int8"]:
        q = report["int8"]
        lines.append(f"int8 vs PyTorch fp32 on the {q['images']} calibration images: top-1 agreement "
                     f"{q['top1_agreement']:.1%} (>= {q['min_agreement']:.0%}), max |Δ| {q['max_abs_diff']:.2g}")
    if not report["checks"] and not report["int8"]:
        lines.append("not checked against PyTorch (--no-check)")
    lines.append(metadata_line(report["metadata"]))
    return "\n".join(lines)


def run_export_openvino_args(args: argparse.Namespace) -> int:
    """``vitkit export openvino RUN DIR [--precision fp32|int8] [--calibration-images N]`` (the arguments of
    :func:`vitkit.tools.export.add_export_args`)."""
    from .evaluate import load_model, resolve_model_dir
    from .runtimes import calibration_images

    precision = getattr(args, "precision", "fp32")
    count = getattr(args, "calibration_images", None)
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)} for openvino, got {precision!r}")
    if count is not None and precision != "int8":
        raise ConfigError("--calibration-images is for --precision int8")
    count = DEFAULT_CALIBRATION if count is None else count
    if count < 1:
        raise ConfigError(f"--calibration-images must be >= 1, got {count}")
    check_openvino_destination(args.output)  # before the checkpoint is loaded
    _require_extras(precision)
    folder = resolve_model_dir(args.run)
    model = load_model(folder)
    calibration = calibration_images(folder, count, model=model) if precision == "int8" else None
    report = export_openvino(model, args.output, precision, calibration, check=not args.no_check, atol=args.atol,
                             opset=args.opset, source=str(folder))
    print(format_report(report))
    return 0
