"""Inference benchmark: vitkit against transformers' ViT (sdpa and eager) and timm (when importable).

Method, chosen because the machines this runs on are shared and small:

* Every library runs in the same process, with identical weights (the transformers model is converted with
  :mod:`vitkit.convert.hf_vit`), under ``torch.inference_mode``, after a warm-up.
* Candidates are timed in alternating rounds (the order rotates every round), each sample lasting at least
  ``min_sample_s``; the reported figure is the median over samples.
* Contention is measured, not guessed: during every sample the CPU time used by *other* processes (from
  ``/proc/stat`` minus this process' own time) is recorded; samples where others took more than
  ``max_contention`` of the machine are discarded and re-taken (up to ``max_rounds``).
* Peak fp32 and bf16 matmul GFLOP/s are measured once, in the same process, before any case, with the same timer:
  every GEMM shape the models run at the benchmarked batches (plus square ones), each with ``torch.mm`` and with
  oneDNN's pre-packed Linear that vitkit's prepared models use; the best median counts. Model GFLOP/s use
  :func:`vit_flops` (2 x multiply-accumulates, attention included; LayerNorm, softmax and GELU are not counted);
  "% of peak" (:func:`peak_fraction`, the one computation behind the log lines and the table) counts the FLOPs a
  case actually computes, so vitkit's CLS shortcut is not credited with work it skips.
* Peak RSS per case: each case is re-run alone in a fresh child process (same build code, a few calls) and its
  ``getrusage`` high-water mark is reported, together with the RSS of that child right after the imports, so
  one case's memory never hides behind another's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..utils import make_torchvision_importable
from .timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    cpu_name,
    machine_load,
    machine_record,
    time_alternating,
    utc_now,
    wait_for_quiet,
)

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "vit_s16": dict(label="ViT-S/16", embed_dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16,
                    img_size=224, num_classes=1000),
    "vit_b16": dict(label="ViT-B/16", embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16,
                    img_size=224, num_classes=1000),
}
TIMM_NAMES = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224"}


# ---------------------------------------------------------------------------- FLOPs
def vit_flops(img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
              mlp_dim: int | None = None, num_classes: int = 1000, in_chans: int = 3, class_token: bool = True,
              **_: Any) -> int:
    """FLOPs (2 x multiply-accumulates) of one image through a plain ViT classifier.

    Per block: 2·N·(4D² + 2·D·D_mlp) for the qkv, projection and MLP GEMMs, plus 2·2·N²·D for q·kᵀ and
    attn·v; plus the patch embedding (2·P·C·p²·D) and the head (2·D·classes). ViT-S/16 at 224: 9.2 GFLOP.
    """
    mlp_dim = mlp_dim or 4 * embed_dim
    patches = (img_size // patch_size) ** 2
    n = patches + (1 if class_token else 0)
    d = embed_dim
    block = 2 * n * (4 * d * d + 2 * d * mlp_dim) + 2 * 2 * n * n * d
    embed = 2 * patches * in_chans * patch_size * patch_size * d
    return embed + depth * block + 2 * d * num_classes


def _shortcut_flops(spec: dict[str, Any]) -> int:
    """FLOPs vitkit's CLS shortcut skips: the last block's proj + MLP for all but one token, q·kᵀ and attn·v
    for all but one query."""
    n = (spec["img_size"] // spec["patch_size"]) ** 2 + 1
    d, m = spec["embed_dim"], spec["mlp_dim"]
    return (n - 1) * (2 * (d * d + 2 * d * m) + 2 * 2 * n * d)


def executed_flops(spec: dict[str, Any], batch: int, cls_shortcut: bool) -> int:
    """FLOPs one call on ``batch`` images actually computes: the full model, less what the CLS shortcut skips."""
    return batch * (vit_flops(**spec) - (_shortcut_flops(spec) if cls_shortcut else 0))


def model_gemm_shapes(spec: dict[str, Any], batch: int) -> list[tuple[int, int, int]]:
    """The (M, K, N) shapes of a ViT's block GEMMs at ``batch`` images: qkv, projection, fc1, fc2."""
    m = batch * ((spec["img_size"] // spec["patch_size"]) ** 2 + 1)
    d, h = spec["embed_dim"], spec["mlp_dim"]
    return [(m, d, 3 * d), (m, d, d), (m, d, h), (m, h, d)]


# ---------------------------------------------------------------------------- matmul peak
def _gemm_kernels(dtype: torch.dtype, m: int, k: int, n: int) -> dict[str, Callable[[], Any]]:
    """The GEMM kernels the candidates run, on random (M, K) x (K, N) operands: ``torch.mm`` (what eager models
    reach through ``nn.Linear``) and oneDNN's pre-packed Linear (what :func:`prepare_for_inference` runs; it is
    ``F.linear`` where oneDNN cannot pack). A peak measured with fewer kernels than the models use is no peak."""
    from .inference import PackedLinear

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    kernels: dict[str, Callable[[], Any]] = {"mm": lambda: torch.mm(a, b)}
    try:
        packed = PackedLinear(torch.nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False))
    except (RuntimeError, AttributeError):  # no oneDNN packing for this dtype here: the models do not use it either
        return kernels
    kernels["packed"] = lambda: packed(a)
    return kernels


def measure_matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]] | None = None, repeats: int = 5,
                        meter: ContentionMeter | None = None, max_contention: float = 0.1, min_sample_s: float = 0.2,
                        max_rounds: int | None = None, backoff_s: float = 1.0, budget_s: float | None = None
                        ) -> dict[str, Any]:
    """Best median GFLOP/s over GEMM shapes (M, K, N) and kernels (:func:`_gemm_kernels`); square 1024/2048/4096
    unless ``shapes`` is given. Give the models' own GEMM shapes at the batches benchmarked
    (:func:`model_gemm_shapes`): a peak must cover every kernel and shape the models run, or a model reads as
    faster than the peak. Timed like the models (:func:`time_alternating`: contention-filtered samples of at least
    ``min_sample_s``, median per case)."""
    shapes = shapes or [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096)]
    cases = [((m, k, n), name, Candidate(f"{name} {m}x{k}x{n}", "torch", str(dtype), fn, False))
             for m, k, n in shapes for name, fn in _gemm_kernels(dtype, m, k, n).items()]
    time_alternating([c for _, _, c in cases], repeats, min_sample_s, max_contention, max_rounds=max_rounds,
                     warmup=1, meter=meter, backoff_s=backoff_s, budget_s=budget_s)
    best: dict[str, Any] = {"gflops": 0.0, "shape": None, "kernel": None, "all": []}
    for (m, k, n), name, c in cases:
        gflops = 2 * m * k * n / statistics.median(c.samples) / 1e9
        best["all"].append(((m, k, n), name, gflops))
        if gflops > best["gflops"]:
            best.update(gflops=gflops, shape=(m, k, n), kernel=name)
    best["square_gflops"] = max((g for (m, k, n), _, g in best["all"] if m == k == n), default=0.0)
    return best


def peak_key(precision: str) -> str:
    """Which measured peak a row is held against: int8 rows sit beside bf16 (both low-precision GEMM units)."""
    return "bf16" if precision in ("bf16", "int8") else "fp32"


def peak_fraction(executed_gflops: float, precision: str, peaks: dict[str, Any]) -> float:
    """The one computation of "% of peak" (logs and table): FLOPs actually executed per second over the measured
    matmul peak of that precision."""
    peak = peaks[peak_key(precision)]["gflops"]
    return executed_gflops / peak if peak else 0.0


# ---------------------------------------------------------------------------- model builders
def _lazy_transformers():
    make_torchvision_importable()  # transformers' vision models import torchvision
    from transformers import ViTConfig, ViTForImageClassification

    return ViTConfig, ViTForImageClassification


def timm_available() -> bool:
    make_torchvision_importable()  # timm imports torchvision
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


def _perturb_like_trained(model: torch.nn.Module, seed: int = 0) -> None:
    """Random init gives near-identical logits for every input; give norms, biases and weights some spread
    so that precision comparisons (logit drift, top-1 agreement) mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.add_(noise * (0.1 if "norm" in name.lower() else 0.02))
            else:
                p.add_(noise * 0.01)


def build_hf_vit(spec: dict[str, Any], attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """transformers' ViTForImageClassification for ``spec``, deterministic weights."""
    ViTConfig, ViTForImageClassification = _lazy_transformers()
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=spec["img_size"], patch_size=spec["patch_size"], hidden_size=spec["embed_dim"],
                    num_hidden_layers=spec["depth"], num_attention_heads=spec["num_heads"],
                    intermediate_size=spec["mlp_dim"], num_labels=spec["num_classes"], attn_implementation=attn)
    model = ViTForImageClassification(cfg).eval()
    _perturb_like_trained(model, seed)
    return model


VIT_CONFIG = "vit_small_patch16_224"  # the registered configuration whose class builds every benchmarked ViT


def vit_class() -> type[torch.nn.Module]:
    """vitkit's ViT class, reached through the registry (tools name no family)."""
    from ..models import registered_class

    return registered_class(VIT_CONFIG)


def vitkit_from_hf(hf: torch.nn.Module) -> torch.nn.Module:
    """The same network as a vitkit VisionTransformer (identical weights)."""
    from ..convert.hf_vit import convert_hf_vit_state_dict, hf_vit_args, normalize_hf_vit_keys

    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    args = hf_vit_args(hf.config.to_dict(), normalize_hf_vit_keys(dict(state)))
    model = vit_class()(**args).eval()
    model.load_state_dict(convert_hf_vit_state_dict(state, args["depth"]))
    return model


def build_vitkit(spec: dict[str, Any]) -> torch.nn.Module:
    """A vitkit ViT with HF's conventions (eps 1e-12), random weights (for memory runs, where values don't matter)."""
    return vit_class()(img_size=spec["img_size"], patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                       depth=spec["depth"], num_heads=spec["num_heads"], mlp_dim=spec["mlp_dim"],
                       num_classes=spec["num_classes"], norm_eps=1e-12, pos_interp_antialias=False).eval()


def build_timm(model_key: str, vitkit_model: torch.nn.Module | None) -> torch.nn.Module:
    """timm's ViT; loads vitkit's weights when the key names line up (they do up to ``pos_embed``)."""
    import timm

    spec = MODEL_SPECS[model_key]
    model = timm.create_model(TIMM_NAMES[model_key], pretrained=False, num_classes=spec["num_classes"]).eval()
    if vitkit_model is not None:
        state = {("pos_embed" if k == "pos_embed.weight" else k): v for k, v in vitkit_model.state_dict().items()}
        with contextlib.suppress(Exception):  # layout differences: keep timm's own init (speed is the same)
            model.load_state_dict(state, strict=False)
    return model


# ---------------------------------------------------------------------------- candidates


def candidate_kinds(precision: str, include_timm: bool, compile: bool, int8: bool, plain: bool) -> list[str]:
    """Which candidates a (model, batch, precision) cell times."""
    if precision == "fp32":
        kinds = ["vitkit"] + (["vitkit-compile"] if compile else []) + (["vitkit-plain"] if plain else [])
        kinds += ["hf-sdpa", "hf-eager"] + (["timm"] if include_timm else [])
        kinds += ["vitkit-int8"] if int8 else []
    else:
        kinds = ["vitkit"] + (["vitkit-compile"] if compile else []) + (["vitkit-plain-autocast"] if plain else [])
        kinds += ["hf-sdpa-bf16", "hf-sdpa-autocast", "hf-eager-bf16", "hf-eager-autocast"]
        kinds += ["timm-bf16", "timm-autocast"] if include_timm else []
    return kinds


KIND_LABELS = {
    "vitkit": "vitkit (prepare_for_inference)",
    "vitkit-compile": "vitkit + torch.compile",
    "vitkit-int8": "vitkit int8 (PT2E, compiled)",
    "vitkit-plain": "vitkit plain model",
    "vitkit-plain-autocast": "vitkit plain model, autocast",
    "hf-sdpa": "transformers sdpa",
    "hf-eager": "transformers eager",
    "hf-sdpa-bf16": "transformers sdpa, bf16 weights",
    "hf-sdpa-autocast": "transformers sdpa, autocast",
    "hf-eager-bf16": "transformers eager, bf16 weights",
    "hf-eager-autocast": "transformers eager, autocast",
    "timm": "timm",
    "timm-bf16": "timm, bf16 weights",
    "timm-autocast": "timm, autocast",
}


def _autocast_fn(model: torch.nn.Module, x: torch.Tensor, hf: bool) -> Callable[[], Any]:
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return out.logits if hf else out

    return run


def make_candidate(kind: str, model_key: str, batch: int, precision: str, x: torch.Tensor,
                   sources: dict[str, Any]) -> Candidate:
    """Build candidate ``kind``. ``sources`` caches what several candidates share (the HF model, its vitkit twin)."""
    from .inference import prepare_for_inference

    spec = MODEL_SPECS[model_key]

    def hf_model(attn: str) -> torch.nn.Module:
        key = f"hf-{attn}"
        if key not in sources:
            sources[key] = build_hf_vit(spec, attn)
        return sources[key]

    def vitkit_twin() -> torch.nn.Module:
        if "vitkit" not in sources:
            sources["vitkit"] = vitkit_from_hf(hf_model("sdpa")) if sources.get("from_hf", True) \
                else build_vitkit(spec)
        return sources["vitkit"]

    import copy

    single_use = sources.get("single_use", False)  # memory runs: convert in place, never hold two copies
    label = KIND_LABELS[kind]
    if kind.startswith("vitkit"):
        base = sources.pop("vitkit") if single_use and vitkit_twin() is not None else copy.deepcopy(vitkit_twin())
        if kind == "vitkit-plain":
            return Candidate(label, "vitkit", precision, lambda: base(x), False)
        if kind == "vitkit-plain-autocast":
            return Candidate(label, "vitkit", precision, _autocast_fn(base, x, False), False)
        # a prepared model may skip part of the last block (CLS shortcut): its "% of peak" counts what it computes
        if kind == "vitkit-int8":
            im = prepare_for_inference(base, "int8", calibration=realistic_images(64, spec["img_size"]), inplace=True)
            im(x)  # compiles outside the timed region
            return Candidate(label, "vitkit", "int8", lambda: im(x), False, compile_s=im.compile_seconds,
                             flops=executed_flops(spec, batch, im.cls_shortcut))
        compile = kind == "vitkit-compile"
        im = prepare_for_inference(base, precision, compile=compile, inplace=True)
        im(x)  # compiles (when asked) outside the timed region
        return Candidate(label, "vitkit", precision, lambda: im(x), False, compile_s=im.compile_seconds,
                         flops=executed_flops(spec, batch, im.cls_shortcut))
    if kind.startswith("hf-"):
        attn = "eager" if kind.startswith("hf-eager") else "sdpa"
        model = hf_model(attn)
        if kind.endswith("-bf16"):
            model = (model if single_use else copy.deepcopy(model)).to(torch.bfloat16)
            xb = x.to(torch.bfloat16)
            return Candidate(label, "transformers", precision, lambda: model(xb).logits, True)
        if kind.endswith("-autocast"):
            return Candidate(label, "transformers", precision, _autocast_fn(model, x, True), True)
        return Candidate(label, "transformers", precision, lambda: model(x).logits, True)
    if kind.startswith("timm"):
        model = build_timm(model_key, sources.get("vitkit"))
        if kind.endswith("-bf16"):
            model = model.to(torch.bfloat16)
            xb = x.to(torch.bfloat16)
            return Candidate(label, "timm", precision, lambda: model(xb), True)
        if kind.endswith("-autocast"):
            return Candidate(label, "timm", precision, _autocast_fn(model, x, False), True)
        return Candidate(label, "timm", precision, lambda: model(x), True)
    raise ValueError(f"unknown candidate kind {kind!r}")


# ---------------------------------------------------------------------------- kernels and accuracy
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines on fd 2; keep the benchmark output readable."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def attention_kernels(fn: Callable[[], Any]) -> list[str]:
    """The aten attention ops one call runs (which SDPA kernel, or the explicit bmm/softmax path)."""
    from torch.profiler import profile

    with _quiet_stderr(), torch.inference_mode(), profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    picked = sorted(n for n in names if "scaled_dot_product" in n or "flash" in n)
    if not picked:
        picked = sorted(n for n in names if n in ("aten::bmm", "aten::_softmax", "aten::baddbmm"))
    return [n for n in picked if n != "aten::scaled_dot_product_attention"] or picked


def realistic_images(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Smooth, image-like inputs (upsampled low-resolution noise plus fine noise), normalised to about ±1."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, size // 16, size // 16, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(batch, 3, size, size, generator=g)
    return ((x.clamp(0, 1) - 0.5) / 0.5).contiguous()


def accuracy_report(model_key: str = "vit_s16", batch: int = 64, compile: bool = False) -> list[dict[str, Any]]:
    """Logit drift of each fast path against the plain fp32 vitkit model, on image-like inputs.

    Reported: max |Δ logit|, relative L2 error ‖Δ‖/‖ref‖, top-1 agreement and top-5 overlap of the reference
    top-1. Weights are random-but-spread (see :func:`_perturb_like_trained`), so top-1 margins are small: a
    conservative setting for agreement.
    """
    from .inference import prepare_for_inference

    spec = MODEL_SPECS[model_key]
    ref_model = vitkit_from_hf(build_hf_vit(spec, "sdpa"))
    x = realistic_images(batch, spec["img_size"])
    with torch.inference_mode():
        ref = ref_model(x).float()
    calibration = realistic_images(256, spec["img_size"], seed=1)
    variants: list[tuple[str, dict[str, Any]]] = [("fp32 prepared", {"precision": "fp32"}),
                                                  ("bf16 prepared", {"precision": "bf16"}),
                                                  ("int8 PT2E", {"precision": "int8", "calibration": calibration})]
    if compile:
        variants += [("fp32 compiled", {"precision": "fp32", "compile": True}),
                     ("bf16 compiled", {"precision": "bf16", "compile": True})]
    rows = []
    for name, kw in variants:
        im = prepare_for_inference(ref_model, **kw)
        out = im(x)
        diff = out - ref
        top1 = ref.argmax(-1)
        rows.append({
            "variant": name,
            "max_abs": diff.abs().max().item(),
            "rel_l2": (diff.norm() / ref.norm()).item(),
            "top1_agree": (out.argmax(-1) == top1).float().mean().item(),
            "top5_contains": (out.topk(5, -1).indices == top1[:, None]).any(-1).float().mean().item(),
            "logit_std": ref.std().item(),
        })
        del im
    return rows


def digits_accuracy_report(epochs: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """Real-data check: train a small ViT on the bundled digits (32x32, a few seconds of CPU per epoch), then
    compare the test accuracy and the per-image agreement of each fast path with the plain fp32 model."""
    from ..data.digits import load_digits
    from .inference import prepare_for_inference

    torch.manual_seed(seed)
    train, test = load_digits("train", 32), load_digits("test", 32)
    mean, std = torch.tensor(train.mean).view(1, -1, 1, 1), torch.tensor(train.std).view(1, -1, 1, 1)

    def norm(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    model = vit_class()(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                        mlp_ratio=2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * math.ceil(len(train) / 64))
    x_train, y_train = norm(train.images), train.labels
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train)).split(64):
            shift = torch.randint(-2, 3, (2,)).tolist()  # small random translations
            xb = torch.roll(x_train[idx], shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), y_train[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    x_test, y_test = norm(test.images), test.labels
    with torch.inference_mode():
        ref = model(x_test)
    rows = [{"variant": "fp32 plain", "accuracy": (ref.argmax(-1) == y_test).float().mean().item(),
             "agree": 1.0, "rel_l2": 0.0}]
    for name, kw in (("fp32 prepared", {"precision": "fp32"}), ("bf16 prepared", {"precision": "bf16"}),
                     ("int8 PT2E", {"precision": "int8", "calibration": x_train[:256]})):
        out = prepare_for_inference(model, **kw)(x_test)
        rows.append({"variant": name, "accuracy": (out.argmax(-1) == y_test).float().mean().item(),
                     "agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     "rel_l2": ((out - ref).norm() / ref.norm()).item()})
    return rows


# ---------------------------------------------------------------------------- peak RSS in a child process
def _rss_mb(field: str = "VmRSS") -> float:
    """Current RSS (``VmRSS``) or this process image's high-water mark (``VmHWM``) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak RSS of this process. ``VmHWM`` belongs to the process image, whereas Linux carries ``ru_maxrss``
    over fork + exec, so a child would report its parent's peak; getrusage is the fallback off Linux."""
    hwm = _rss_mb("VmHWM")
    if hwm == hwm:  # not NaN
        return hwm
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _rss_child(payload: str) -> None:
    """Entry point of the memory child: build one candidate, run it, print RSS after imports and the peak."""
    job = json.loads(payload)
    if job.get("tune_allocator"):
        from .inference import tune_cpu_allocator

        tune_cpu_allocator()
    torch.set_num_threads(job["threads"])
    with contextlib.suppress(Exception):
        _lazy_transformers()  # the same imports in every child, so the baseline is comparable
    base = _rss_mb()
    spec = MODEL_SPECS[job["model"]]
    x = torch.randn(job["batch"], 3, spec["img_size"], spec["img_size"])
    sources: dict[str, Any] = {"from_hf": False, "single_use": True}
    cand = make_candidate(job["kind"], job["model"], job["batch"], job["precision"], x, sources)
    gc.collect()
    with torch.inference_mode():
        for _ in range(job["calls"]):
            cand.fn()
    peak = _peak_rss_mb()
    print(json.dumps({"base_mb": base, "peak_mb": peak}))


def peak_rss(kind: str, model_key: str, batch: int, precision: str, threads: int, calls: int = 3,
             tune_allocator: bool = False, timeout: float = 900) -> dict[str, float] | None:
    """Run one case alone in a fresh interpreter; its RSS after imports and its peak RSS (MiB)."""
    payload = json.dumps({"kind": kind, "model": model_key, "batch": batch, "precision": precision,
                          "threads": threads, "calls": calls, "tune_allocator": tune_allocator})
    code = "import sys; from vitkit.tools.bench import _rss_child; _rss_child(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


# ---------------------------------------------------------------------------- the comparison
@dataclass
class Row:
    model: str
    batch: int
    precision: str
    name: str
    library: str
    is_peer: bool
    img_s: float
    ms: float
    spread: float
    ratio: float | None
    gflops: float  # the full model's FLOPs per second (comparable across implementations, like img/s)
    peak_fraction: float  # FLOPs actually computed per second over the measured peak (see peak_fraction)
    samples: int
    discarded: int
    compile_s: float | None = None
    rss_base_mb: float | None = None
    rss_peak_mb: float | None = None
    kernels: str = ""
    note: str = ""
    executed_gflops: float | None = None  # below gflops where vitkit's CLS shortcut skips part of the last block
    candidate: str = ""  # the candidate's kind (a key of KIND_LABELS)
    samples_ms: list[float] = field(default_factory=list)  # every kept sample (ms per call): the raw figures
    contention: list[float | None] = field(default_factory=list)  # other processes' CPU share during each


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["vit_s16", "vit_b16"])
    batches: list[int] = field(default_factory=lambda: [1, 32])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    samples: int = 5
    min_sample_s: float = 0.5
    max_contention: float = 0.1
    compile: bool = True
    int8: bool = True
    plain: bool = True
    timm: bool = True
    rss: bool = True
    threads: int | None = None
    tune_allocator: bool = True
    accuracy: bool = True
    kernels: bool = True  # profile which attention kernel each implementation runs
    warmup: int = 2  # calls per candidate before its samples
    max_rounds: int | None = None  # rounds of time_alternating per cell (default: 4 x samples)
    backoff_s: float = 2.0  # pause after a sample other processes disturbed
    cell_budget_s: float | None = None  # seconds after which a cell takes no further round (None: no limit)
    max_wait_s: float = 600.0  # longest wait for a quiet machine before a cell
    quiet_window_s: float = 2.0
    peak_squares: list[int] = field(default_factory=lambda: [1024, 2048, 4096])  # besides the models' GEMMs
    peak_samples: int = 5
    peak_min_sample_s: float = 0.2
    peak_budget_s: float | None = None


def quick_config(**overrides: Any) -> BenchConfig:
    """``vitkit bench --quick``: under a minute on a quiet 2-core machine. The same comparison on fewer cases:
    ViT-S/16 at batch 1 and 8, fp32 and bf16, vitkit's prepared model against every transformers variant (and
    timm), 3 samples of 0.2 s after one warm-up call; the peak on the model's own GEMMs only. No compile, int8,
    unprepared model, kernel profile, memory or accuracy runs; short waits for a quiet machine and a time budget
    per cell, so a busy machine costs accuracy (samples flagged ``noisy``), not minutes."""
    cfg = BenchConfig(models=["vit_s16"], batches=[1, 8], samples=3, min_sample_s=0.2, compile=False, int8=False,
                      plain=False, rss=False, accuracy=False, kernels=False, warmup=1, max_rounds=6, backoff_s=0.25,
                      cell_budget_s=10.0, max_wait_s=2.0, quiet_window_s=0.5, peak_squares=[], peak_samples=3,
                      peak_min_sample_s=0.05, peak_budget_s=4.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def peak_shapes(cfg: BenchConfig) -> list[tuple[int, int, int]]:
    """The GEMMs the peak is measured on: the squares of ``cfg.peak_squares`` and every benchmarked model's own
    GEMMs at every benchmarked batch (so no model GEMM is bigger, or runs a kernel, the peak did not see)."""
    shapes = [(n, n, n) for n in cfg.peak_squares]
    for key in cfg.models:
        for batch in cfg.batches:
            shapes += [s for s in model_gemm_shapes(MODEL_SPECS[key], batch) if s not in shapes]
    return shapes


def format_row_log(r: Row) -> str:
    """The line logged as each case is measured; its "% peak" is the table's (one :func:`peak_fraction`)."""
    return (f"  {r.name:36s} {r.img_s:8.1f} img/s  x{r.ratio or 0:.2f}  {r.gflops:6.0f} GFLOP/s"
            f"  {100 * r.peak_fraction:4.0f}% peak" + (f"  rss {r.rss_peak_mb:.0f} MiB" if r.rss_peak_mb else ""))


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print, results: str | None = None,
                  command: str = "") -> dict[str, Any]:
    """Run every cell; return ``{"meta": ..., "rows": [Row...], "accuracy": [...]}``.

    The matmul peaks are measured once, before any case, on every GEMM shape and kernel the models run; every
    "% of peak" (the log lines and the table) is :func:`peak_fraction` of those peaks. With ``results``, the raw
    records are appended to that JSON-lines file as they are measured (a ``meta`` record, one ``row`` record per
    case with its samples, the accuracy records, an ``end`` record): :func:`result_from_records` rebuilds the
    returned dict from them, so ``vitkit report`` renders the tables without timing anything."""
    from .inference import amx_supported, native_bf16_supported, tune_cpu_allocator

    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tuned = tune_cpu_allocator() if cfg.tune_allocator else False
    include_timm = cfg.timm and timm_available()
    meter = ContentionMeter()
    meta: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "native_bf16": native_bf16_supported(), "amx": amx_supported(),
        "timm": include_timm, "allocator_tuned": tuned, "load_before": machine_load(),
    }
    with contextlib.suppress(Exception):
        import transformers

        meta["transformers"] = transformers.__version__
    log(f"vitkit bench: torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}; timm "
        f"{'included' if include_timm else 'not importable'}; allocator tuned: {tuned}")

    def quiet() -> None:
        waited = wait_for_quiet(meter, cfg.max_contention, cfg.max_wait_s, cfg.quiet_window_s)
        if waited > 5:
            log(f"  waited {waited:.0f} s for other processes to finish")

    shapes = peak_shapes(cfg)
    needed = {peak_key(p) for p in cfg.precisions} | ({"bf16"} if cfg.int8 and "fp32" in cfg.precisions else set())
    peaks: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name not in needed:
            peaks[name] = {"gflops": 0.0, "shape": None, "kernel": None, "all": [], "square_gflops": 0.0}
            continue
        quiet()
        peaks[name] = measure_matmul_peak(dtype, shapes, cfg.peak_samples, meter, cfg.max_contention,
                                          cfg.peak_min_sample_s, cfg.max_rounds, cfg.backoff_s, cfg.peak_budget_s)
        log(f"peak {name} matmul: {peaks[name]['gflops']:.0f} GFLOP/s ({peaks[name]['kernel']}, M,K,N = "
            f"{peaks[name]['shape']}; {len(shapes)} shapes)")
    meta["peak"] = peaks
    run_id = utc_now()
    if results:
        append_jsonl(results, [{"kind": "meta", "run_id": run_id, "command": command, "settings": asdict(cfg),
                                "machine": machine_record(), "bench": meta}])
    rows: list[Row] = []
    for key in cfg.models:
        spec = MODEL_SPECS[key]
        flops = vit_flops(**spec)
        meta.setdefault("flops", {})[key] = flops
        meta.setdefault("shortcut_flops", {})[key] = flops - _shortcut_flops(spec)
        sources: dict[str, Any] = {}  # the model's HF builds and vitkit twin, shared by its cells
        for batch in cfg.batches:
            x = realistic_images(batch, spec["img_size"])
            for precision in cfg.precisions:
                kinds = candidate_kinds(precision, include_timm, cfg.compile, cfg.int8, cfg.plain)
                log(f"{spec['label']} batch {batch} {precision}: building {len(kinds)} candidates")
                cands = [make_candidate(k, key, batch, precision, x, sources) for k in kinds]
                kernels = {}
                if cfg.kernels:
                    for k, c in zip(kinds, cands):
                        if k in ("vitkit", "hf-sdpa", "hf-sdpa-bf16", "hf-eager", "hf-eager-bf16", "timm",
                                 "timm-bf16"):
                            kernels[k] = ", ".join(attention_kernels(c.fn))
                quiet()
                time_alternating(cands, cfg.samples, cfg.min_sample_s, cfg.max_contention, max_rounds=cfg.max_rounds,
                                 warmup=cfg.warmup, meter=meter, log=log, backoff_s=cfg.backoff_s,
                                 budget_s=cfg.cell_budget_s)
                cell = _cell_rows(key, batch, precision, kinds, cands, kernels, flops, peaks)
                if cfg.rss:
                    for k, r in zip(kinds, cell):
                        mem = peak_rss(k, key, batch, precision, torch.get_num_threads(), tune_allocator=tuned)
                        if mem:
                            r.rss_base_mb, r.rss_peak_mb = mem["base_mb"], mem["peak_mb"]
                for r in cell:
                    log(format_row_log(r))
                if results:
                    append_jsonl(results, [{"kind": "row", "run_id": run_id, **asdict(r)} for r in cell])
                rows += cell
                del cands
                gc.collect()
        del sources
        gc.collect()
    _compare_int8_with_bf16_peers(rows)
    accuracy = accuracy_report(cfg.models[0], compile=cfg.compile) if cfg.accuracy else []
    digits = digits_accuracy_report() if cfg.accuracy else []
    meta["load_after"] = machine_load()
    meta["wall_s"] = time.perf_counter() - started
    if results:
        append_jsonl(results, [*({"kind": "accuracy", "run_id": run_id, **a} for a in accuracy),
                               *({"kind": "digits", "run_id": run_id, **a} for a in digits),
                               {"kind": "end", "run_id": run_id, "seconds": round(meta["wall_s"], 1),
                                "load_after": meta["load_after"], "finished_at": utc_now()}])
    noisy = sum("noisy" in r.note for r in rows)
    log(f"measured in {meta['wall_s']:.0f} s" + (f"; {noisy} of {len(rows)} cases never had a quiet sample (noisy): "
                                                 f"other processes were busy" if noisy else ""))
    return {"meta": meta, "rows": [asdict(r) for r in rows], "accuracy": accuracy, "digits": digits}


def _compare_int8_with_bf16_peers(rows: list[Row]) -> None:
    """int8 sits in the fp32 cell (its × is against fp32 peers); also say how it does against bf16 peers."""
    for r in rows:
        if r.precision != "int8":
            continue
        best = max((p.img_s for p in rows if p.is_peer and p.model == r.model and p.batch == r.batch
                    and p.precision == "bf16"), default=None)
        if best:
            r.note = (r.note + f" x{r.img_s / best:.2f} vs best bf16 peer").strip()


def _cell_rows(key: str, batch: int, precision: str, kinds: list[str], cands: list[Candidate],
               kernels: dict[str, str], flops: int, peaks: dict[str, Any]) -> list[Row]:
    """The rows of one (model, batch, precision) cell; ``flops``: the full model's per image."""
    spec = MODEL_SPECS[key]
    med = {k: statistics.median(c.samples) for k, c in zip(kinds, cands)}
    peer_best = max((batch / med[k] for k, c in zip(kinds, cands) if c.is_peer), default=None)
    rows = []
    for k, c in zip(kinds, cands):
        img_s = batch / med[k]
        gflops = img_s * flops / 1e9
        executed = (c.flops if c.flops is not None else batch * flops) / med[k] / 1e9
        spread = (max(c.samples) - min(c.samples)) / med[k] if len(c.samples) > 1 else 0.0
        fraction = peak_fraction(executed, c.precision, peaks)
        note = c.note
        if fraction > 1:  # a measurement to distrust, said so rather than hidden
            note = (note + " above the measured matmul peak").strip()
        rows.append(Row(model=spec["label"], batch=batch, precision=c.precision, name=c.name, library=c.library,
                        is_peer=c.is_peer, img_s=img_s, ms=1000 * med[k], spread=spread,
                        ratio=(img_s / peer_best) if peer_best else None, gflops=gflops,
                        peak_fraction=fraction, samples=len(c.samples), discarded=c.discarded,
                        compile_s=c.compile_s, kernels=kernels.get(k, ""), note=note, executed_gflops=executed,
                        candidate=k,
                        samples_ms=[1e3 * v for v in c.samples],
                        contention=[None if math.isnan(v) else v for v in c.contention]))
    return rows


def _peak_text(peaks: dict[str, Any], name: str) -> str:
    peak = peaks.get(name) or {}
    if not peak.get("gflops"):
        return f"{name} not measured"
    shape = peak.get("shape")
    where = ", ".join(filter(None, [peak.get("kernel"), "x".join(str(v) for v in shape) if shape else None]))
    square = f"; square GEMMs {peak['square_gflops']:.0f}" if peak.get("square_gflops") else ""
    return f"{name} {peak['gflops']:.0f} GFLOP/s" + (f" ({where}{square})" if where or square else "")


# ---------------------------------------------------------------------------- from the records
def result_from_records(records: list[dict[str, Any]], run: str = "latest") -> dict[str, Any]:
    """The dict :func:`run_benchmark` returned, rebuilt from run ``run`` of its records (see ``results``). Every
    timing figure is recomputed from the raw samples (median ms, img/s, × best peer, GFLOP/s, % of peak)."""
    from .report import select_run_meta

    meta = select_run_meta(records, run)
    own = [r for r in records if r.get("run_id") == meta["run_id"]]
    end = next((r for r in own if r["kind"] == "end"), {})

    def strip(kind: str) -> list[dict[str, Any]]:  # the run's records of ``kind``, as run_benchmark returned them
        return [{k: v for k, v in r.items() if k not in ("kind", "run_id")} for r in own if r["kind"] == kind]

    rows = strip("row")
    for r in rows:
        ms = statistics.median(r["samples_ms"])
        scale = r["ms"] / ms  # 1.0 for records of this code; the derived figures follow the samples either way
        r.update(ms=ms, img_s=1e3 * r["batch"] / ms, gflops=r["gflops"] * scale,
                 peak_fraction=r["peak_fraction"] * scale, samples=len(r["samples_ms"]))
    for r in rows:
        best = max((p["img_s"] for p in rows if p["is_peer"] and (p["model"], p["batch"]) == (r["model"], r["batch"])
                    and p["precision"] == ("fp32" if r["precision"] == "int8" else r["precision"])), default=None)
        r["ratio"] = r["img_s"] / best if best else None
    bench = {**meta["bench"], "run_id": meta["run_id"], "machine": meta["machine"], "settings": meta["settings"],
             "wall_s": end.get("seconds"), "load_after": end.get("load_after")}
    return {"meta": bench, "rows": rows, "accuracy": strip("accuracy"), "digits": strip("digits")}


def format_summary(result: dict[str, Any]) -> str:
    """Markdown: per (model, batch, precision), the best peer against vitkit's prepared model, eager and compiled."""
    rows = result["rows"]
    lines = ["| model | batch | precision | best peer (img/s) | vitkit eager | × | vitkit compiled | × "
             "| % of matmul peak (best vitkit) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    cells = dict.fromkeys((r["model"], r["batch"], r["precision"]) for r in rows if r["precision"] != "int8")
    bold = lambda v: f"**{v:.2f}**" if v >= 1 else f"{v:.2f}"  # noqa: E731
    for model, batch, precision in cells:
        here = [r for r in rows if (r["model"], r["batch"], r["precision"]) == (model, batch, precision)]
        peer = max((r["img_s"] for r in here if r["is_peer"]), default=None)
        ours = {r["candidate"]: r for r in here if not r["is_peer"]}
        eager, compiled = ours.get("vitkit"), ours.get("vitkit-compile")
        if peer is None or eager is None:
            continue
        cols = [f"{eager['img_s']:.1f}", bold(eager["img_s"] / peer)]
        cols += [f"{compiled['img_s']:.1f}", bold(compiled["img_s"] / peer)] if compiled else ["-", "-"]
        best = max((r for r in (eager, compiled) if r), key=lambda r: r["img_s"])
        lines.append(f"| {model} | {batch} | {precision} | {peer:.1f} | {' | '.join(cols)} "
                     f"| {100 * best['peak_fraction']:.0f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- formatting
def format_table(result: dict[str, Any]) -> str:
    """Markdown: one table with every case, then peaks, kernels and accuracy."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Machine: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}"
        + (f", transformers {meta['transformers']}" if "transformers" in meta else "")
        + f"; timm {'included' if meta['timm'] else 'not installed'}; glibc allocator tuned for all libraries: "
        + f"{'yes' if meta['allocator_tuned'] else 'no'}.",
        f"Measured matmul peak: {_peak_text(meta['peak'], 'fp32')}, {_peak_text(meta['peak'], 'bf16')}: the best "
        "median over the GEMMs the models run at the benchmarked batches (and square ones where listed), each timed "
        "with torch.mm and with oneDNN's pre-packed Linear (what vitkit's prepared models run).",
        "GFLOP/s count the full model (ViT-S/16 9.2, ViT-B/16 35.1 GFLOP per image) for every implementation, also "
        "where vitkit's CLS shortcut skips part of the last block; \"% of peak\" counts the FLOPs actually computed "
        "(without the skipped part) against the peak of the row's precision (int8 against bf16).",
        "",
        "| model | batch | precision | implementation | img/s | × best peer | GFLOP/s | % of peak | peak RSS MiB "
        "| notes |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        rss = f"{r['rss_peak_mb']:.0f}" if r.get("rss_peak_mb") else "-"
        notes = []
        if r.get("compile_s"):
            notes.append(f"compile {r['compile_s']:.0f} s")
        if r["spread"] > 0.15:
            notes.append(f"spread {100 * r['spread']:.0f}%")
        if r.get("note"):
            notes.append(r["note"])
        name = r["name"] if not r["is_peer"] else f"*{r['name']}*"
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {name} | {r['img_s']:.1f} | {ratio} | "
                     f"{r['gflops']:.0f} | {100 * r['peak_fraction']:.0f}% | {rss} | {'; '.join(notes)} |")
    base = {r.get("rss_base_mb") for r in rows if r.get("rss_base_mb")}
    if base:
        lines += ["", f"Peak RSS is each case alone in a fresh process (RSS after importing torch + transformers: "
                      f"{min(base):.0f}-{max(base):.0f} MiB)."]
    kern = sorted({(r["name"], r["precision"], r["kernels"]) for r in rows if r.get("kernels")})
    if kern:
        lines += ["", "Attention kernels seen by the profiler:"]
        seen = set()
        for name, prec, k in kern:
            if (name, prec) not in seen:
                seen.add((name, prec))
                lines.append(f"- {name} ({prec}): `{k}`")
    if result.get("accuracy"):
        lines += ["", "Accuracy of the fast paths against the plain fp32 model (64 image-like inputs):", "",
                  "| variant | max abs Δ logit | rel. L2 error | top-1 agreement | ref. top-1 in top-5 |",
                  "|---|---:|---:|---:|---:|"]
        for a in result["accuracy"]:
            lines.append(f"| {a['variant']} | {a['max_abs']:.2e} | {a['rel_l2']:.2e} | {100 * a['top1_agree']:.1f}% "
                         f"| {100 * a['top5_contains']:.1f}% |")
    if result.get("digits"):
        lines += ["", "A trained model on real data (ViT 96-wide, 6 blocks, bundled digits at 32x32, 359 test images):",
                  "", "| variant | test accuracy | agreement with fp32 | rel. L2 error of logits |",
                  "|---|---:|---:|---:|"]
        for a in result["digits"]:
            lines.append(f"| {a['variant']} | {100 * a['accuracy']:.1f}% | {100 * a['agree']:.1f}% "
                         f"| {a['rel_l2']:.2e} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vitkit bench`` (and benchmarks/bench_inference.py)."""
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SPECS),
                        help="models to time (default: vit_s16 vit_b16; --quick: vit_s16)")
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: 1 32; --quick: 1 8)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: fp32 bf16")
    parser.add_argument("--samples", type=int, help="clean timing samples per candidate (default: 5; --quick: 3)")
    parser.add_argument("--min-sample-seconds", type=float,
                        help="minimum duration of one sample (default: 0.5; --quick: 0.2)")
    parser.add_argument("--max-contention", type=float, default=0.1,
                        help="discard samples during which other processes used more than this CPU share")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 (PT2E) candidate")
    parser.add_argument("--no-plain", action="store_true", help="skip vitkit's unprepared model")
    parser.add_argument("--no-timm", action="store_true", help="leave timm out even when importable")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-case peak-RSS child processes")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the logit-drift report")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc's malloc defaults (the tuning applies to every library alike)")
    parser.add_argument("--quick", action="store_true",
                        help="under a minute on a quiet 2-core machine: ViT-S/16 at batch 1 and 8, fp32 and bf16, "
                             "vitkit against every transformers variant, 3 samples; no compile, int8, plain model, "
                             "RSS or accuracy")
    parser.add_argument("--results", default=None, metavar="JSONL",
                        help="append the raw records (every sample, its contention, the machine) to this JSON-lines "
                             "file, e.g. benchmarks/results/inference.jsonl; `vitkit report` renders them")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--markdown", help="also write the markdown table to this file")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The full benchmark, or :func:`quick_config` with ``--quick``; options given explicitly win either way."""
    cfg = quick_config() if args.quick else BenchConfig()
    given = {"models": args.models, "batches": args.batches, "precisions": args.precisions, "samples": args.samples,
             "min_sample_s": args.min_sample_seconds}
    for k, v in given.items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.max_contention, cfg.threads = args.max_contention, args.threads
    cfg.tune_allocator = not args.no_tune_allocator
    for flag, attr in (("no_compile", "compile"), ("no_int8", "int8"), ("no_plain", "plain"), ("no_timm", "timm"),
                       ("no_rss", "rss"), ("no_accuracy", "accuracy")):
        if getattr(args, flag):
            setattr(cfg, attr, False)
    return cfg


def run_bench_args(args: argparse.Namespace) -> int:
    """``vitkit bench``: run, print the markdown table, optionally save JSON/markdown."""
    try:
        _lazy_transformers()
    except ImportError:
        print("vitkit bench needs transformers (pip install 'vitkit[hf]') for the peer comparison", file=sys.stderr)
        return 2
    command = " ".join(["vitkit bench", *(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])])
    result = run_benchmark(config_from_args(args), log=lambda s: print(s, flush=True), results=args.results,
                           command=command)
    table = format_table(result)
    print()
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitkit bench", description="CPU inference benchmark against peers")
    add_bench_args(parser)
    return run_bench_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(bench_main())
