"""Fast CPU inference for vitkit token models: precision choice, pre-packed fused Linears, compile, int8.

:func:`prepare_for_inference` turns a trained model into an :class:`InferenceModel`. Every step is listed with
what it changes numerically:

* ``precision="fp32"`` keeps every operation in float32 (oneDNN/MKL fp32 GEMMs; no implicit bf16). Outputs
  match the plain model to float32 rounding (≈1e-6 relative; the GEMMs sum in a different order).
* ``precision="bf16"`` casts weights *and* activations to bfloat16 (true bf16 weights, not autocast: autocast
  re-casts every weight on every call, which costs more than the matmul at batch 1). GEMMs and the attention
  kernel accumulate in float32 and round their outputs to bf16; LayerNorm and softmax compute in float32
  internally. Outputs are returned as float32. Expect logits to differ by about 1% of their scale.
* ``precision="auto"`` picks bf16 when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), where it
  is several times faster, and fp32 elsewhere (oneDNN would emulate bf16 there, slower than fp32).
* ``fuse=True`` (eager only) replaces each ``nn.Linear`` of the blocks and the head by a :class:`PackedLinear`:
  the weight is reordered once into oneDNN's blocked layout (instead of on every call), the bias, the MLP's
  GELU and the residual additions run inside the GEMM as post-ops (no separate passes over the activations).
  The same parameters are kept, so ``state_dict()`` keys and values are unchanged.
* ``cls_shortcut=True``: a CLS-pooled classifier only reads the CLS token after the last block, so the last
  block computes its attention for that one query (keys and values stay complete) and its projection and MLP
  for that one token. Exact; it skips about 1/depth of the work (``depth``: number of blocks).
* ``compile=True`` wraps the forward in ``torch.compile`` (inductor, ``freezing=True``: weights become
  constants, prepacked for oneDNN, and pointwise ops fuse). The first call per input shape compiles (tens of
  seconds); :attr:`InferenceModel.compile_seconds` records it. Under ``compile`` the manual fusion is skipped,
  inductor's freezing passes do the equivalent.
* ``precision="int8"``: static int8 quantization through PyTorch's PT2E flow (``torch.export``, then torchao's
  ``prepare_pt2e`` / ``convert_pt2e`` with the x86 Inductor quantizer: int8 weights per output channel, int8
  activations with scales observed on ``calibration`` images), compiled by inductor with weight freezing, which
  lowers each quantize/dequantize + Linear/Conv pattern to one oneDNN int8 GEMM (VNNI or AMX-int8). It needs a
  few hundred representative, normalised inputs (``calibration``; :func:`vitkit.tools.runtimes.calibration_images`
  takes them from a run's training data). Lossy: see benchmarks/RESULTS.md for top-1 and agreement with fp32.
  Needs the ``int8`` extra (torchao). The first call per input shape compiles, as with ``compile=True``.

Attention maps (:func:`vitkit.capture_attention`) keep working on a prepared model: while they are captured the
model runs its ordinary (explicit softmax) path.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import Attention, AttentionMapSource
from ..layers.block import Block
from ..layers.mlp import Mlp
from ..utils import amx_supported, cpu_flags, native_bf16_supported  # noqa: F401  (hardware facts, re-exported)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
MIN_CALIBRATION = 8  # fewer images give activation ranges that are mostly noise
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- hardware


def resolve_precision(precision: str) -> torch.dtype:
    """The compute dtype: ``"auto"`` -> bf16 where native bf16 exists, else fp32; ``"int8"`` -> fp32 (between int8
    GEMMs); ``"fp32"``/``"bf16"`` as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8":
        return torch.float32  # the graph between the int8 GEMMs stays float32
    if precision == "auto":
        return torch.bfloat16 if native_bf16_supported() else torch.float32
    return _DTYPES[precision]


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (process-wide; Linux only).

    By default glibc serves blocks above 32 MiB with a fresh ``mmap`` and unmaps them on free, so every large
    activation (e.g. ViT-B's MLP output at batch 32) is page-faulted and zeroed again on every forward pass.
    This sets ``M_MMAP_MAX=0`` and a huge ``M_TRIM_THRESHOLD``: the heap grows once to the working set and
    stays. The cost is that the process keeps its peak memory. Returns False where it cannot be applied.
    It speeds up every library in the process alike, so the benchmark applies it (or not) to all of them.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default  # noqa: B018  (raises when the op is missing)
        torch.ops.mkldnn._reorder_linear_weight.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------------------- packed, fused Linear
def fusable_activation(act: nn.Module) -> tuple[str, str] | None:
    """The oneDNN post-op ``(attr, algorithm)`` equal to ``act``, or None when it has none."""
    if type(act) is nn.GELU:
        return ("gelu", "tanh" if act.approximate == "tanh" else "none")
    if type(act) is nn.ReLU:
        return ("relu", "")
    if type(act) is nn.SiLU:
        return ("swish", "")
    return None


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose weight is reordered once for oneDNN, with an optional fused activation or residual.

    ``forward(x, residual=None)`` computes ``act(x Wᵀ + b)`` or ``x Wᵀ + b + residual`` in one oneDNN call.
    The parameters are the original ones (same names, same tensors); the packed copy is rebuilt whenever
    the weight changes in place (``load_state_dict``, ``copy_``). Training or autograd falls back to
    ``F.linear`` because the oneDNN op has no backward.
    """

    def __init__(self, linear: nn.Linear, act: tuple[str, str] | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.post_op: tuple[str, str] = act or ("none", "")
        self._act_module: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None
        self.repack()

    @classmethod
    def wrap(cls, linear: nn.Linear, act: nn.Module | None = None) -> PackedLinear:
        attr = fusable_activation(act) if act is not None else None
        if act is not None and attr is None:
            raise ValueError(f"{type(act).__name__} has no oneDNN post-op")
        out = cls(linear, attr)
        out._act_module = act
        return out

    def _key(self) -> tuple:
        return (self.weight.data_ptr(), self.weight._version, self.weight.dtype)

    def repack(self) -> None:
        """Reorder the weight into oneDNN's layout (needed again after the weight changed)."""
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self._packed_key = self._key()

    def _fallback(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self._act_module is not None:
            y = self._act_module(y)
        return y if residual is None else y + residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (x.dtype != self.weight.dtype or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return self._fallback(x, residual)
        if self._packed_key != self._key():
            self.repack()
        attr, algorithm = self.post_op
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, attr, [], algorithm)
        if attr != "none":
            y = torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, attr, [], algorithm)
            return y.add_(residual)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), self._packed, self.bias, "add")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", post_op={self.post_op[0]}"


class FusedBlock(Block):
    """A :class:`~vitkit.layers.Block` whose residual additions run inside the projection GEMMs.

    Built from an existing block with :meth:`from_block` (same child modules, so the same parameter names and
    tensors) and swapped in for it. Only blocks without LayerScale qualify (a LayerScale would sit between GEMM
    and residual). With attention capture, training or autograd it runs the ordinary :class:`Block` path.
    """

    @classmethod
    def from_block(cls, block: Block) -> FusedBlock:
        """A FusedBlock sharing ``block``'s modules; raises ValueError for a block that cannot be fused."""
        if not can_fuse_block(block):
            raise ValueError("only plain Blocks (Attention + Mlp, no LayerScale, activation packed into fc1) fuse")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, child in block.named_children():
            fused.add_module(name, child)
        fused.train(block.training)
        return fused

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, queries: slice | None = None
                ) -> torch.Tensor:
        if self.training or self.attn.attn_sink is not None or torch.is_grad_enabled():
            return super().forward(x, attn_bias, queries)
        y = self.attn.mix(self.norm1(x), attn_bias, queries)
        x = self.attn.proj(y, x if queries is None else x[:, queries])
        return self.mlp.fc2(self.mlp.fc1(self.norm2(x)), x)


def _block_is_plain(blk: nn.Module) -> bool:
    return (type(blk) in (Block, FusedBlock) and type(blk.attn) is Attention and type(blk.mlp) is Mlp)


def can_fuse_block(blk: nn.Module) -> bool:
    """A plain Block without LayerScale whose MLP activation already runs inside a packed ``fc1``."""
    return (type(blk) is Block and _block_is_plain(blk) and isinstance(blk.ls1, nn.Identity)
            and isinstance(blk.ls2, nn.Identity) and isinstance(blk.mlp.act, nn.Identity)
            and isinstance(blk.mlp.fc1, PackedLinear))


def fuse_linears(model: nn.Module) -> dict[str, int]:
    """Swap Linears for :class:`PackedLinear` and plain blocks for :class:`FusedBlock`, in place.

    Returns counts of what was converted. A no-op (all zeros) where oneDNN's fused Linear op is missing, or
    for a bf16 model on a CPU where oneDNN has no bf16 kernels.
    """
    counts = {"packed_linear": 0, "fused_activation": 0, "fused_block": 0}
    if not _onednn_linear_available():
        return counts
    low_precision = any(p.dtype == torch.bfloat16 for p in model.parameters())
    if low_precision and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # oneDNN's packed bf16 GEMM needs AVX512 (or AMX); on an AVX2-only CPU the reorder op raises, so the
        # model keeps PyTorch's own bf16 Linears there.
        return counts
    for parent in list(model.modules()):
        for child_name, blk in list(parent.named_children()):
            if not _block_is_plain(blk):
                continue
            mlp: Mlp = blk.mlp
            if not isinstance(mlp.fc1, PackedLinear) and fusable_activation(mlp.act) is not None:
                mlp.fc1 = PackedLinear.wrap(mlp.fc1, mlp.act)
                mlp.act = nn.Identity()
                counts["fused_activation"] += 1
            if can_fuse_block(blk):
                setattr(parent, child_name, FusedBlock.from_block(blk))
                counts["fused_block"] += 1
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, PackedLinear.wrap(child))
    counts["packed_linear"] = sum(isinstance(m, PackedLinear) for m in model.modules())
    return counts


# ---------------------------------------------------------------------------- the CLS shortcut
def _cls_shortcut_ok(model: nn.Module) -> bool:
    """The shortcut needs the standard TokenClassifier forward, CLS pooling and a plain last block."""
    from ..models import TokenClassifier

    if not isinstance(model, TokenClassifier) or getattr(model, "pool", None) != "cls":
        return False
    if getattr(model, "num_prefix_tokens", 0) < 1 or len(model.blocks) < 1:
        return False
    cls = type(model)
    for name in ("forward", "forward_features", "forward_head", "pool_tokens", "run_blocks"):
        if getattr(cls, name) is not getattr(TokenClassifier, name):
            return False
    return _block_is_plain(model.blocks[-1])


def forward_cls_shortcut(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for a CLS-pooled TokenClassifier, computing the last block for the CLS token only."""
    tokens, grid = model.embed_tokens(x)
    tokens, _ = model.run_blocks(tokens, grid, last_queries=slice(0, 1))
    return model.forward_head(model.norm(tokens))


# ---------------------------------------------------------------------------- the wrapper
class InferenceModel(nn.Module):
    """A prepared model: casts inputs to the compute dtype, runs without autograd, returns float32.

    ``model`` is the prepared module (its ``state_dict`` is the original one, cast to ``dtype``); ``info``
    records what :func:`prepare_for_inference` did; ``compile_seconds`` the first compiled call's duration.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, cls_shortcut: bool, info: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.cls_shortcut = cls_shortcut
        self.info = info
        self.compile_seconds: float | None = None
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        self._sources = [m for m in model.modules() if isinstance(m, AttentionMapSource)]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.model, "pretrained_cfg", {})

    def _impl(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_shortcut:
            return forward_cls_shortcut(self.model, x)
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.dtype)
            if any(m.attn_sink is not None for m in self._sources):
                out = self.model(x)  # attention maps wanted: the ordinary path records them
            elif self._compiled is not None:
                first = tuple(x.shape) not in self._compiled_shapes
                start = time.perf_counter()
                # freezing must be on while inductor compiles; compile(options=...) does not reach it
                with _inductor_freezing(), warnings.catch_warnings():
                    # inductor's int8 lowering copies zero points with torch.tensor(tensor): a note, not a fault
                    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
                    out = self._compiled(x)
                if first:
                    self._compiled_shapes.add(tuple(x.shape))
                    self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - start
            else:
                out = self._impl(x)
            return out.float()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, cls_shortcut={self.cls_shortcut}, compiled={self._compiled is not None}"


def _inductor_freezing() -> contextlib.AbstractContextManager:
    """Inductor's ``freezing`` (weights as constants, oneDNN prepacking, linear+pointwise fusion)."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError:
        return contextlib.nullcontext()
    return inductor_config.patch(freezing=True)


def _import_pt2e() -> tuple[Any, Any, Any]:
    """torchao's PT2E entry points, with its import-time notes about CUDA kernels kept off the console."""
    import logging

    from ..utils import require_extra

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        require_extra("torchao", "int8", "int8 inference (PT2E quantization)")
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return prepare_pt2e, convert_pt2e, xiq


def quantize_int8(model: nn.Module, calibration: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """The PT2E int8 graph of ``model`` (x86 Inductor quantizer), calibrated on ``calibration`` (N, C, H, W).

    Returns an exported ``GraphModule`` with quantize/dequantize nodes around every Linear and Conv; it runs
    (slowly) in eager mode and becomes int8 oneDNN kernels once compiled with inductor's freezing on, which
    :class:`InferenceModel` does. The batch axis is exported dynamic, so any batch size runs.
    """
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 4:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"int8 needs calibration images as one (N, C, H, W) float tensor, got {shape}")
    if calibration.shape[0] < MIN_CALIBRATION:
        raise ValueError(f"int8 needs at least {MIN_CALIBRATION} calibration images (a few hundred is usual), got "
                         f"{calibration.shape[0]}")
    prepare_pt2e, convert_pt2e, xiq = _import_pt2e()
    module = model.eval()
    calibration = calibration.float()
    example = calibration[:2]
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on specialised Python branches; the check is the output
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for start in range(0, calibration.shape[0], batch_size):
            prepared(calibration[start:start + batch_size])
    return convert_pt2e(prepared)


def prepare_for_inference(
    model: nn.Module,
    precision: str = "auto",
    *,
    fuse: bool = True,
    cls_shortcut: bool = True,
    compile: bool = False,
    calibration: torch.Tensor | None = None,
    example_input: torch.Tensor | None = None,
    inplace: bool = False,
) -> InferenceModel:
    """Make ``model`` fast for CPU inference; see the module docstring for exactly what each option does.

    Args:
        precision: ``"auto"`` (bf16 with native CPU support, else fp32), ``"fp32"`` (exact), ``"bf16"``, or
            ``"int8"`` (PT2E static quantization, compiled; needs ``calibration``).
        fuse: pre-pack Linear weights for oneDNN and fuse bias, activation and residual into the GEMMs.
        cls_shortcut: compute the last block for the CLS token only (CLS-pooled classifiers; exact).
        compile: ``torch.compile`` (inductor with weight freezing); compile time lands in ``compile_seconds``.
        calibration: int8 only: a few hundred normalised inputs (N, C, H, W) whose activation ranges set the
            int8 scales (:func:`vitkit.tools.runtimes.calibration_images` takes them from a run's training data).
        example_input: if given, one call is made with it, so compilation happens here, not on first use.
        inplace: modify ``model`` itself instead of a deep copy (saves memory; the model is then cast/packed).
    """
    dtype = resolve_precision(precision)
    int8 = precision == "int8"
    if int8 and calibration is None:
        raise ValueError("precision='int8' needs calibration images (calibration=, a few hundred normalised training "
                         "inputs; vitkit.tools.runtimes.calibration_images reads them from a run)")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    model.to(dtype)
    info: dict[str, Any] = {"precision": "int8" if int8 else ("bf16" if dtype == torch.bfloat16 else "fp32"),
                            "compile": compile or int8, "native_bf16": native_bf16_supported(),
                            "amx": amx_supported()}
    if fuse and not compile and not int8:
        info.update(fuse_linears(model))
    # int8: no CLS shortcut. Under inductor's freezing, torch 2.13 lowers the int8 graph of the shortcut's last
    # block (queries sliced to the CLS token) to wrong values (max |Δ logit| 3.3 vs 0.19 uncompiled, top-1
    # agreement 82% on a trained Fashion-MNIST ViT); the full last block compiles exactly.
    shortcut = cls_shortcut and not int8 and _cls_shortcut_ok(model)
    info["cls_shortcut"] = shortcut
    wrapper = InferenceModel(model, dtype, shortcut, info)
    if int8:
        graph = quantize_int8(model, calibration)
        info["quantized_ops"] = sum(1 for n in graph.graph.nodes if "quantize_per_tensor" in str(n.target))
        info["calibration_images"] = int(calibration.shape[0])
        wrapper._compiled = torch.compile(graph, dynamic=False)
    elif compile:
        wrapper._compiled = torch.compile(wrapper._impl, dynamic=False)
    if example_input is not None:
        wrapper(example_input)
    return wrapper
