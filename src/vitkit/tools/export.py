"""Export a vitkit classifier to ONNX and check the file against PyTorch with onnxruntime.

:func:`export_onnx` writes ``pixel_values`` (B, C, H, W) float32 -> ``logits`` graphs that run without vitkit or
torch; the preprocessing a consumer needs (mean, std, input size, interpolation, class names) travels in the
file's ``metadata_props`` as JSON strings. ``vitkit export onnx RUN OUT.onnx`` calls it (:func:`add_export_args`,
:func:`run_export_args`).

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer, at **opset 18** by default. Why, as
measured on torch 2.13 / onnxruntime 1.32 for every registered classifier family:

* the TorchScript tracer exports ViT (all position kinds, hybrid ResNet stem, overlapping patches), T2T-ViT
  (Performer and transformer tokens), Swin and SimCLR with a largest difference of about 1e-7 from PyTorch, in
  about a second per tiny model, and needs nothing beyond ``onnx``;
* the torch.export-based exporter (``dynamo=True``, torch's default since 2.9) needs ``onnxscript``, took 3-5x
  longer, and failed on Swin and on relative-position-bias ViTs (its decomposition of SDPA with an attention
  bias builds an invalid ``view``). torch deprecates the TorchScript exporter; :data:`EXPORTER` is the one line
  to change once torch.export handles those models.

Opset 18 is the first whose ``Resize`` has ``antialias``: a dynamic-size ViT resamples its learned position
table with antialiased bicubic interpolation (``pos_interp_antialias=True``), for which the TorchScript exporter
has no translation; this module supplies one (``Resize`` with ``antialias=1, cubic_coeff_a=-0.5,
exclude_outside=1``, PyTorch's PIL-style kernel; equal to 1e-7). Opsets 14-17 export every model except those.

Dynamic sizes: tracing records each Python ``if`` once. A ViT/T2T with ``dynamic_img_size=True`` skips the
resampling of its position table at its own size, so a graph traced at that size would only work there; it is
therefore traced at another size (``img + one patch stride`` high, ``+ two`` wide), where the resampling is
recorded, and the graph resamples (an identity at the model's own size) for every size. Swin pads any size in
eager mode, but its padding, window shrinking and shift are Python decisions per stage size, so one traced
graph is only right for sizes that take the same decisions: Swin exports with a static size unless
``dynamic_size=True`` is asked for, and then the check at a second size decides. Every export is checked
(``check=True``) at the model's size and, for dynamic files, at a second size and another batch size, so a
graph that would silently be wrong elsewhere is refused instead of written.

Known refusal: a dynamic-size ViT with ``pos_embed="learned_2d"``. It resamples each axis table as a one-column
image, and torch 2.13's antialiased ``F.interpolate`` returns a constant for inputs of width 1 (``(1, 1, 4, 1)``
-> every output equals the first value; the same data as one row resamples correctly). ONNX Resize resamples
correctly, so the two disagree at sizes other than the model's and the check refuses the file; a static-size
export of that model is exact.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import ConfigError, VitkitError
from ..tasks import DEFAULT_TASK
from ..utils import atomic_path, check_output_path

EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 14, 20  # SDPA has an ONNX translation from opset 14; the tracer's tables end at 20
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
FORMATS = ("onnx", "hf", "openvino")  # hf: a transformers folder (export_hf); openvino: an IR folder (export_openvino)
SUFFIXES = {"onnx": (".onnx",)}  # the extension each format's file must have
_PROTO_LIMIT = 2 * 1024**3  # protobuf's limit for one file; larger weights would need ONNX external data
PREPROCESSING = ("RGB (or grayscale when input_size[0] == 1) pixels scaled to [0, 1], resized to input_size[1:] "
                 "with `interpolation`, normalised per channel as (x - mean) / std, laid out NCHW float32")


class ExportError(VitkitError):
    """A model cannot be exported, or the exported file does not compute what the model computes."""


class ParityError(ExportError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


# ---------------------------------------------------------------------------- helpers
def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"ONNX export needs {module}: pip install 'vitkit[export]' ({e})") from None


def _backbone(model: nn.Module) -> nn.Module:
    """The module that takes the images: the encoder of a wrapper (SimCLR), else the model itself."""
    enc = getattr(model, "encoder", None)
    return enc if isinstance(enc, nn.Module) else model


def _declared_dynamic(model: nn.Module) -> bool | None:
    """``dynamic_img_size`` of the image module: True/False where the model has the switch, None where it
    has none (Swin, which pads any size itself)."""
    value = getattr(_backbone(model), "dynamic_img_size", None)
    return None if value is None else bool(value)


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    size = dict(getattr(model, "pretrained_cfg", {}) or {}).get("input_size")
    if size is None:
        enc = _backbone(model)
        img, chans = getattr(enc, "img_size", None), getattr(enc, "in_chans", None)
        if img is None or chans is None:
            raise ConfigError(f"{type(model).__name__} has no pretrained_cfg['input_size'] to export it for")
        size = (chans, *((img, img) if isinstance(img, int) else img))
    c, h, w = (int(v) for v in size)
    return c, h, w


def _size_step(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """How much a second test size adds to each side: one token (ViT, T2T) or one last-stage window (Swin)."""
    enc = _backbone(model)
    red = getattr(getattr(enc, "patch_embed", None), "reduction", None) or getattr(enc, "reduction", None)
    if red is not None:
        return int(red[0]), int(red[1])
    if all(hasattr(enc, a) for a in ("patch_size", "window_size", "num_stages")):
        m = int(enc.patch_size) * int(enc.window_size) * 2 ** (int(enc.num_stages) - 1)
        return m, m
    return hw


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or type(model).__name__


def _one_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _describe_failure(exc: BaseException, model: nn.Module, opset: int) -> str:
    """One line: which operator (or what) stopped the exporter, and what to do about it."""
    text = str(exc)
    match = (re.search(r"operator '([^']+)'", text) or re.search(r"unrecognized namespace ([\w:]+)", text)
             or re.search(r"ONNX export of (?:operator )?'?([\w:.]+)", text))
    added = re.search(r"added in version (\d+)", text)
    head = f"cannot export {_name(model)} to ONNX (opset {opset}, {EXPORTER})"
    if match:
        op = match.group(1)
        hint = ""
        if "_aa" in op and opset < 18:
            hint = ("; antialiased resampling of the position table (dynamic image size) needs opset >= 18, or "
                    "export a static size (--static-size)")
        elif op.startswith("mkldnn::"):
            hint = "; export the plain model, not one prepared by prepare_for_inference"
        elif added:
            hint = f"; it is translated from opset {added.group(1)} on (--opset {added.group(1)})"
        return f"{head}: the operator {op} has no ONNX translation at opset {opset}{hint}"
    return f"{head}: {type(exc).__name__}: {_one_line(text)}"


def _aa_symbolic(op: str, onnx_mode: str):
    """Translation of PyTorch's antialiased ``F.interpolate`` (``aten::_upsample_<mode>2d_aa``) to ONNX ``Resize``
    with ``antialias=1``: PyTorch's kernel is PIL's (cubic a = -0.5, weights renormalised inside the image, i.e.
    ``exclude_outside=1``); equal to PyTorch to about 1e-6 on tables of ViT size, up and down."""
    from torch.onnx import symbolic_helper

    base = symbolic_helper._interpolate_helper(op, 4, onnx_mode)

    def symbolic(g, input, output_size, *args):
        out = base(g, input, output_size, *args)
        node = out.node()
        node.i_("antialias", 1)
        node.i_("exclude_outside", 1)
        if onnx_mode == "cubic":
            node.f_("cubic_coeff_a", -0.5)
        return out

    return symbolic


_AA_REGISTERED = False


def _register_antialias_symbolics() -> None:
    """Teach the tracer antialiased resizing at opset >= 18, once per process (torch has no translation).

    The translation stays registered: it only adds an operator the exporter refused before, and unregistering
    leaves torch's registry in a state where a lower opset fails with an unrelated error instead of "try opset 18".
    An existing translation (a newer torch, or the user's) is kept.
    """
    global _AA_REGISTERED
    if _AA_REGISTERED:
        return
    try:
        from torch.onnx._internal.torchscript_exporter import registration
        registered = registration.registry.is_registered_op
    except (ImportError, AttributeError):
        registered = lambda name, version: False  # noqa: E731
    for op, mode in (("_upsample_bicubic2d_aa", "cubic"), ("_upsample_bilinear2d_aa", "linear")):
        name = f"aten::{op}"
        if not registered(name, MAX_OPSET):
            torch.onnx.register_custom_op_symbolic(name, _aa_symbolic(op, mode), 18)
    _AA_REGISTERED = True


@contextlib.contextmanager
def _quiet_stdout_on_failure() -> Iterator[None]:
    """Keep the exporter's C++ graph dump off stdout when it fails (torch 2.13's TorchScript exporter always turns
    its log on, then prints the whole IR graph "at exception"); on success anything written is passed through."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a file (notebooks)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
            if ok:
                sink.seek(0)
                text = sink.read().decode(errors="replace")
                if text:
                    sys.stdout.write(text)


def _run_exporter(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                  dynamic_axes: dict[str, dict[int, str]]) -> None:
    """``torch.onnx.export`` with the tracer's expected warnings silenced (the parity check is what decides)."""
    _register_antialias_symbolics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # one per Python branch on a shape
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        # the hybrid stem standardises its conv weights with F.batch_norm(training=True): exact, not a train mode
        warnings.filterwarnings("ignore", message=r".*operator 'batch_norm' is set to train=True", category=UserWarning)
        try:
            with _quiet_stdout_on_failure():
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=dynamic_axes or None, do_constant_folding=True)
        except Exception as e:  # the exporter's own errors, and vitkit's shape checks during tracing
            raise ExportError(_describe_failure(e, model, opset)) from e


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _metadata(model: nn.Module, input_size: tuple[int, int, int], dynamic_axes: dict[str, Any]) -> dict[str, str]:
    """What a consumer needs to preprocess without vitkit; every value is a JSON string."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    names = cfg.get("class_names")
    values = {
        "vitkit_version": __version__,
        "model_name": getattr(model, "model_name", None),
        "model_class": type(model).__name__,
        "model_args": getattr(model, "model_args", None),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": list(input_size),
        "mean": [float(v) for v in cfg["mean"]] if cfg.get("mean") is not None else None,
        "std": [float(v) for v in cfg["std"]] if cfg.get("std") is not None else None,
        "interpolation": cfg.get("interpolation"),
        "class_names": [str(n) for n in names] if names is not None else None,
        "task": cfg.get("task") or getattr(model, "default_task", DEFAULT_TASK),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
        "preprocessing": PREPROCESSING,
    }
    return {k: json.dumps(v) for k, v in values.items()}


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The vitkit metadata of an exported file, decoded from JSON (keys without JSON values are kept as text)."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


def _check_parity(path: Path, model: nn.Module, cases: list[tuple[int, int, int, int]], atol: float,
                  seed: int) -> list[dict[str, Any]]:
    """Run the same random batches through onnxruntime (CPUExecutionProvider) and PyTorch; refuse a difference."""
    np = _require("numpy")
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are raised below as one line, not also logged in red
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    results = []
    for shape in cases:
        x = torch.randn(*shape, generator=gen)
        label = "x".join(map(str, shape))
        try:
            out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        except Exception as e:  # onnxruntime's errors have no common public base class
            hint = (" (the model's own size ran: export a static size, dynamic_size=False / --static-size)"
                    if results and tuple(shape[2:]) != tuple(cases[0][2:]) else "")
            raise ExportError(f"the exported graph of {_name(model)} fails in onnxruntime on a {label} batch"
                              f"{hint}: {_one_line(e)}") from None
        with torch.inference_mode():
            ref = model(x.to(device)).float().cpu().numpy()
        if out.shape != ref.shape:
            raise ParityError(f"onnxruntime returns {out.shape} for a {label} batch, PyTorch {ref.shape}")
        diff = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
        if not np.isfinite(diff):
            diff = float("inf")
        results.append({"shape": list(shape), "max_abs_diff": diff})
        if diff > atol:
            hint = ("; the model's own size matched, so only the dynamic size is off: export a static size "
                    "(dynamic_size=False, --static-size)") if results[0]["max_abs_diff"] <= atol and \
                tuple(shape[2:]) != tuple(cases[0][2:]) else ""
            raise ParityError(f"{_name(model)}: onnxruntime differs from PyTorch by max |Δ| = {diff:.3g} "
                              f"(> atol {atol:g}) on a {label} batch; the file was not written{hint}")
    return results


def _missing_folders(folder: Path) -> list[Path]:
    """The folders above (and including) ``folder`` that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


# ---------------------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                dynamic_size: bool | None = None, check: bool = True, atol: float = 1e-4, seed: int = 0
                ) -> dict[str, Any]:
    """Write ``model`` to ``path`` as ONNX (``pixel_values`` -> ``logits``) and return a report.

    Args:
        opset: ONNX opset, 14-20 (default 18, see the module docstring for why).
        dynamic_batch: leave the batch axis free.
        dynamic_size: leave height and width free; None = when the model accepts other sizes by construction
            (ViT / T2T-ViT with ``dynamic_img_size=True``, also inside SimCLR). Swin only on request.
        check: run random batches through onnxruntime and PyTorch and refuse the file (nothing is written) when
            they differ by more than ``atol``: batch 2 at the model's size, plus another batch size and/or a
            second image size when those axes are dynamic.
        seed: seed of the check's random batches.

    The report: exporter, opset, input/output names and shapes (free axes by name), dynamic axes, the checks
    with their max abs differences, the file size and the metadata written. The file appears atomically:
    a failed export or check leaves no file (and an existing one untouched). ``path`` is checked before any work
    (:func:`vitkit.utils.check_output_path`): it must end in ``.onnx``, may not be a device, FIFO, socket or
    folder, and the nearest existing folder above it must be writable; missing folders are created (named in the
    report's ``created_folders`` and printed by the CLI) and removed again when the export fails. A symbolic link
    is written through to the file it names.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    if not atol > 0:
        raise ConfigError(f"atol must be > 0, got {atol!r}")
    # the destination before any work: an .onnx name in a writable folder, not a device, FIFO or folder
    target = check_output_path(path, suffixes=SUFFIXES["onnx"], create_parent=True, what="ONNX file")
    from .inference import InferenceModel

    if isinstance(model, InferenceModel):
        raise ExportError("export the plain model, not one prepared by prepare_for_inference: its packed oneDNN "
                          "Linears have no ONNX operator (onnxruntime does its own fusion)")
    if not all(hasattr(model, m) for m in ("forward_features", "forward_head")):
        raise ExportError(f"{_name(model)} ({type(model).__name__}) is not a classifier: its forward does not map "
                          f"images to one logits tensor (MAE returns loss, predictions and mask); export a "
                          f"classifier built on its encoder instead (vitkit.models.load_backbone)")
    onnx = _require("onnx")
    if check:
        _require("onnxruntime")

    c, h, w = _input_size(model)
    declared = _declared_dynamic(model)
    if dynamic_size is None:
        dynamic_size = declared is True
    elif dynamic_size and declared is False:
        raise ConfigError(f"{_name(model)} was built for {h}x{w} images only (dynamic_img_size=False): export it "
                          f"with a static size (--static-size), or rebuild it with dynamic_img_size=True")
    step = _size_step(model, (h, w))
    other = (h + step[0], w + 2 * step[1])
    trace_hw = other if dynamic_size and declared else (h, w)  # see the module docstring

    if any(t.is_floating_point() and t.dtype != torch.float32 for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).float()  # the exported graph is float32 end to end
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if weight_bytes > _PROTO_LIMIT * 0.95:
        raise ExportError(f"{_name(model)} has {weight_bytes / 1e9:.1f} GB of weights, over the 2 GB limit of one "
                          f"ONNX file; external-data export is not supported yet")

    dynamic_axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if dynamic_size:
        dynamic_axes.setdefault(INPUT_NAME, {}).update({2: "height", 3: "width"})
    cases = [(2, c, h, w)]
    if dynamic_size:
        cases.append((3 if dynamic_batch else 2, c, *other))
    elif dynamic_batch:
        cases.append((3, c, h, w))

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    path = Path(path)
    created = _missing_folders(target.parent)
    try:
        for folder in created:  # said in the report; removed again when the export fails
            folder.mkdir()
        with atomic_path(path, create_parent=False) as tmp:
            example = torch.randn(2, c, *trace_hw, generator=torch.Generator().manual_seed(seed)).to(device)
            _run_exporter(model, example, tmp, opset, dynamic_axes)
            proto = onnx.load(str(tmp))
            meta = _metadata(model, (c, h, w), dynamic_axes)
            for key, value in meta.items():
                prop = proto.metadata_props.add()
                prop.key, prop.value = key, value
            proto.doc_string = f"vitkit {__version__} export of {_name(model)}: {INPUT_NAME} -> {OUTPUT_NAME}"
            try:
                onnx.checker.check_model(proto)
            except Exception as e:
                raise ExportError(f"the exported graph of {_name(model)} is not valid ONNX: {_one_line(e)}") from None
            onnx.save(proto, str(tmp))
            checks = _check_parity(tmp, model, cases, atol, seed + 1) if check else []
            size = tmp.stat().st_size
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty
        raise
    finally:
        model.train(was_training)

    graph = proto.graph
    return {
        "path": str(path),
        "format": "onnx",
        "exporter": EXPORTER,
        "opset": opset,
        "model_name": _name(model),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": _dims(graph.input[0])},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": _dims(graph.output[0])},
        "dynamic_axes": {k: dict(v) for k, v in dynamic_axes.items()},
        "dynamic_batch": bool(dynamic_batch),
        "dynamic_size": bool(dynamic_size),
        "traced_size": list(trace_hw),
        "checks": checks,
        "max_abs_diff": max((r["max_abs_diff"] for r in checks), default=None),
        "atol": atol,
        "file_bytes": size,
        "created_folders": [str(f) for f in created],
        "metadata": {k: json.loads(v) for k, v in meta.items()},
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------- CLI
def add_export_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``vitkit export FORMAT RUN OUT``."""
    p.add_argument("format", choices=list(FORMATS), help="output format")
    p.add_argument("run", help="a training run folder or checkpoint folder")
    p.add_argument("output", help="onnx: the .onnx file to write (atomically; missing folders are created and named; "
                                  "a symbolic link is written through; devices, FIFOs and folders are refused); hf, "
                                  "openvino: the folder to write (new, empty, or an earlier export of that format)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET}: antialiased Resize for "
                        f"dynamic-size ViTs)")
    p.add_argument("--static-size", action="store_true",
                   help="fix height and width to the model's input size (default: free where the model accepts "
                        "other sizes)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the parity check (onnxruntime, transformers for hf, OpenVINO for openvino, "
                        "vs PyTorch)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted |exported - PyTorch| output")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="openvino only: int8 is NNCF post-training quantization on the run's training images, "
                        "refused when its top-1 agreement with fp32 PyTorch on them is below 90%% (no atol)")
    p.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="openvino int8: how many training images of the run calibrate it (default 300)")


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    shape = lambda dims: "[" + ", ".join(map(str, dims)) + "]"  # noqa: E731
    lines = [
        f"exported {report['model_name']} -> {report['path']} ({report['file_bytes'] / 1e6:.2f} MB, "
        f"opset {report['opset']}, {report['exporter']})",
        f"input {report['input']['name']} {report['input']['dtype']} {shape(report['input']['shape'])} -> "
        f"output {report['output']['name']} {shape(report['output']['shape'])}",
    ]
    if report.get("created_folders"):
        lines.append(f"created the folder {report['created_folders'][-1]} (it did not exist)")
    if report["checks"]:
        each = ", ".join(f"{'x'.join(map(str, r['shape']))}: {r['max_abs_diff']:.1e}" for r in report["checks"])
        lines.append(f"onnxruntime vs PyTorch: max |Δ| {report['max_abs_diff']:.1e} <= atol {report['atol']:g} "
                     f"({each})")
    else:
        lines.append("not checked against onnxruntime (--no-check)")
    lines.append(metadata_line(report["metadata"]))
    return "\n".join(lines)


def metadata_line(meta: dict[str, Any]) -> str:
    """The preprocessing an export carries, in one line of its report."""
    return (f"metadata: input_size {meta['input_size']}, mean {meta['mean']}, std {meta['std']}, interpolation "
            f"{meta['interpolation']}, {len(meta['class_names']) if meta['class_names'] else 'no'} class names")


def run_export_args(args: argparse.Namespace) -> int:
    """``vitkit export onnx RUN OUT.onnx``: load the checkpoint, export, check, print the report."""
    from .evaluate import load_model

    if args.format != "openvino" and (getattr(args, "precision", "fp32") != "fp32"
                                      or getattr(args, "calibration_images", None) is not None):
        raise ConfigError("--precision int8 and --calibration-images are for `vitkit export openvino`")
    if args.format == "hf":
        from .export_hf import run_export_hf_args

        return run_export_hf_args(args)
    if args.format == "openvino":
        from .export_openvino import run_export_openvino_args

        return run_export_openvino_args(args)
    if args.format != "onnx":
        raise ConfigError(f"unknown export format {args.format!r}; choose one of {FORMATS}")
    # the destination before the checkpoint is loaded (export_onnx checks it again for Python callers)
    check_output_path(args.output, suffixes=SUFFIXES[args.format], create_parent=True, what="ONNX file")
    model = load_model(args.run)
    report = export_onnx(model, args.output, opset=args.opset, dynamic_size=False if args.static_size else None,
                         check=not args.no_check, atol=args.atol)
    print(format_report(report))
    return 0
