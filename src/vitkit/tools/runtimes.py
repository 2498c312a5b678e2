"""One interface over the CPU runtimes a classifier can be served on: PyTorch, onnxruntime and OpenVINO.

A :class:`Runtime` maps a normalised batch (N, C, H, W) to float32 logits, whatever runs it:

* ``torch``: :func:`~vitkit.tools.inference.prepare_for_inference` (fp32, bf16, int8 through PT2E);
* ``onnxruntime``: an ``InferenceSession`` on vitkit's own ONNX export of the same weights (fp32 only: the CPU
  execution provider has no bf16 GEMMs), thread pool kept from spinning between calls;
* ``openvino``: the same ONNX file read by OpenVINO (fp32, or bf16 through ``INFERENCE_PRECISION_HINT``), or an
  int8 model quantized by NNCF post-training quantization on calibration images.

Each runtime compiles one graph per input shape on first use (OpenVINO is reshaped to the static shape, which it
runs faster than a dynamic batch). :func:`time_runtimes` times several on one batch in one process, alternating
(the studies' timing method), and :func:`fastest_runtime` is what ``vitkit serve --backend auto`` does at start.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import require_extra

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
SUPPORTED = {"torch": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "int8")}
DEFAULT_CALIBRATION = 300  # images: the usual few hundred of post-training quantization


def check_backend(backend: str, precision: str) -> None:
    """One line for a backend or precision this module does not run (before any model is loaded)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in SUPPORTED[backend]:
        raise ConfigError(f"the {backend} backend runs {', '.join(SUPPORTED[backend])}, not {precision!r}"
                          + ("; bf16 runs on torch or openvino" if backend == "onnxruntime" else ""))


class Runtime:
    """A callable ``(N, C, H, W) float tensor -> (N, K) float32 logits`` with what runs it."""

    backend = "?"

    def __init__(self, precision: str, threads: int) -> None:
        self.precision, self.threads = precision, threads
        self.info: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchRuntime(Runtime):
    """vitkit's own path: :func:`prepare_for_inference` (packed oneDNN Linears, CLS shortcut, optional compile)."""

    backend = "torch"

    def __init__(self, model: nn.Module, precision: str, threads: int, calibration: torch.Tensor | None = None,
                 compile: bool = False) -> None:
        from .inference import prepare_for_inference

        super().__init__(precision, threads)
        torch.set_num_threads(threads)  # torch's pool is process-wide; the peers keep their own pools
        self.prepared = prepare_for_inference(model, precision, compile=compile, calibration=calibration)
        self.info = dict(self.prepared.info)

    @property
    def name(self) -> str:
        return f"torch {self.precision}" + (" compiled" if self.info.get("compile") and self.precision != "int8"
                                            else "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepared(x)


class OnnxRuntime(Runtime):
    """onnxruntime's CPU execution provider on an exported file; the pool sleeps between calls (no spinning), so
    it does not take the cores of whatever runs next in the process."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, threads: int) -> None:
        ort = require_extra("onnxruntime", "export", "the onnxruntime backend")
        super().__init__("fp32", threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.info = {"version": ort.__version__, "allow_spinning": 0}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


class OpenVinoRuntime(Runtime):
    """OpenVINO's CPU plugin on the ONNX export (or an IR folder), latency hint, a fixed thread count; bf16 is the
    plugin's inference precision hint, int8 an NNCF-quantized model."""

    backend = "openvino"

    def __init__(self, source: str | Path | Any, precision: str, threads: int,
                 calibration: torch.Tensor | None = None) -> None:
        ov = require_extra("openvino", "openvino", "the OpenVINO backend")
        super().__init__(precision, threads)
        self.core = ov.Core()
        model = source if isinstance(source, ov.Model) else self.core.read_model(str(source))
        if precision == "int8":
            if calibration is None:
                raise ConfigError("int8 on OpenVINO needs calibration images (NNCF post-training quantization)")
            model = quantize_openvino(model, calibration)
        self.model = model
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                       "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        self._compiled: dict[tuple[int, ...], Any] = {}
        self.info = {"version": ov.__version__, **self.config}

    def compiled_for(self, shape: tuple[int, ...]) -> Any:
        """The model compiled for one static input shape (compiled on first use)."""
        if shape not in self._compiled:
            model = self.model.clone()
            model.reshape({model.inputs[0].get_any_name(): list(shape)})
            self._compiled[shape] = self.core.compile_model(model, "CPU", self.config)
        return self._compiled[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous()
        request = self.compiled_for(tuple(x.shape))
        return torch.from_numpy(request(x.numpy())[0].copy())


def quantize_openvino(model: Any, calibration: torch.Tensor, batch_size: int = 1) -> Any:
    """NNCF post-training int8 quantization of an OpenVINO model (transformer preset: the attention's softmax and
    LayerNorms stay float), calibrated on ``calibration`` (N, C, H, W)."""
    nncf = require_extra("nncf", "openvino", "int8 OpenVINO models")
    items = [calibration[i:i + batch_size].float().numpy() for i in range(0, calibration.shape[0], batch_size)]
    return nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(items))


def export_for_runtimes(model: nn.Module, folder: str | Path) -> Path:
    """vitkit's ONNX export of ``model`` (dynamic batch, parity-checked) into ``folder``; its path."""
    from .export import export_onnx

    path = Path(folder) / "model.onnx"
    export_onnx(model, path, dynamic_batch=True, dynamic_size=False)
    return path


def build_runtime(model: nn.Module, backend: str, precision: str = "fp32", *, threads: int | None = None,
                  calibration: torch.Tensor | None = None, onnx_path: str | Path | None = None,
                  compile: bool = False) -> Runtime:
    """The ``backend`` runtime of ``model`` at ``precision``; onnxruntime and OpenVINO run ``onnx_path`` (exported
    now into a temporary folder when not given). ``calibration`` (normalised inputs) is needed for int8."""
    check_backend(backend, precision)
    threads = threads or torch.get_num_threads()
    if precision == "int8" and calibration is None:
        raise ConfigError(f"int8 on {backend} needs calibration images (vitkit.tools.runtimes.calibration_images)")
    if backend == "torch":
        return TorchRuntime(model, precision, threads, calibration, compile)
    if onnx_path is None:
        with tempfile.TemporaryDirectory() as tmp:  # both runtimes read the file into memory at construction
            return build_runtime(model, backend, precision, threads=threads, calibration=calibration,
                                 onnx_path=export_for_runtimes(model, tmp))
    if backend == "onnxruntime":
        return OnnxRuntime(onnx_path, threads)
    return OpenVinoRuntime(onnx_path, precision, threads, calibration)


class RuntimeModule(nn.Module):
    """A runtime dressed as the classifier it runs (``pretrained_cfg``, ``model_name``), so a task's ``predict``
    can call it like the model."""

    def __init__(self, runtime: Runtime, model: nn.Module) -> None:
        super().__init__()
        self.runtime = runtime
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        self.model_name = getattr(model, "model_name", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime(x)


# ---------------------------------------------------------------------------- calibration data
def calibration_images(run: str | Path, count: int = DEFAULT_CALIBRATION, seed: int = 0,
                       model: nn.Module | None = None) -> torch.Tensor:
    """``count`` normalised training images of the run a checkpoint came from (a seeded random subset), prepared
    as its task prepares evaluation batches: what int8 calibration needs. A checkpoint without a training
    config (a converted one) has no training data to take them from: a ConfigError says so. ``model``: the
    checkpoint's model when the caller has loaded it already (it is not read again)."""
    from ..data import build_dataset
    from .evaluate import _input_spec, eval_data_settings, load_model, resolve_model_dir, run_config, task_for_model

    if count < 1:
        raise ConfigError(f"calibration needs at least one image, got {count}")
    folder = resolve_model_dir(run)
    if run_config(folder) is None:
        raise ConfigError(f"{folder}: no train_config.yaml beside the weights, so no training images to calibrate "
                          f"int8 on; quantize a vitkit training run (or pass calibration= in Python)")
    model = model if model is not None else load_model(folder)
    channels, size = _input_spec(model)
    name, _, settings = eval_data_settings(folder, split="train")
    dataset = build_dataset(name, "train", image_size=size, num_channels=channels, **settings)
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    images = torch.stack([_image_of(dataset[i]) for i in pick])
    task = task_for_model(model, folder)
    task.setup(model)
    return task.prepare_batch(images, train=False).float()


def _image_of(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


# ---------------------------------------------------------------------------- timing and choice
def time_runtimes(runtimes: Sequence[Runtime], x: torch.Tensor, samples: int = 5, min_sample_s: float = 0.3,
                  max_contention: float = 0.1, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each runtime on ``x``, timed in alternating rounds in this process."""
    from .timing import Candidate, time_alternating

    cands = [Candidate(rt.name, rt.backend, rt.precision, (lambda rt=rt: rt(x)), rt.backend != "torch")
             for rt in runtimes]
    time_alternating(cands, samples=samples, min_sample_s=min_sample_s, max_contention=max_contention, log=log)
    return {c.name: statistics.median(c.samples) for c in cands}


def fastest_runtime(model: nn.Module, precision: str, example: torch.Tensor, *, threads: int | None = None,
                    calibration: torch.Tensor | None = None, log: Callable[[str], None] | None = None
                    ) -> tuple[Runtime, dict[str, float]]:
    """Build every installed backend that runs ``precision``, time them once on ``example`` and keep the fastest
    (``vitkit serve --backend auto``). Returns it and the median seconds per call of each."""
    built: list[Runtime] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = None
        for backend in BACKENDS:
            if precision not in SUPPORTED[backend]:
                continue
            if backend != "torch":
                try:
                    require_extra("onnxruntime" if backend == "onnxruntime" else "openvino",
                                  "export" if backend == "onnxruntime" else "openvino", backend)
                except Exception as e:  # not installed: not a candidate
                    if log:
                        log(f"{backend}: skipped ({e})")
                    continue
                onnx_path = onnx_path or export_for_runtimes(model, tmp)
            built.append(build_runtime(model, backend, precision, threads=threads, calibration=calibration,
                                       onnx_path=onnx_path))
    seconds = time_runtimes(built, example, samples=3, min_sample_s=0.2, max_contention=1.0)
    best = min(built, key=lambda rt: seconds[rt.name])
    return best, seconds
