"""Inference benchmark: vitkit against transformers' ViT (sdpa and eager) and timm (when importable).

Method, chosen because the machines this runs on are shared and small:

* Every library runs in the same process, with identical weights (the transformers model is converted with
  :mod:`vitkit.convert.hf_vit`), under ``torch.inference_mode``, after a warm-up.
* Candidates are timed in alternating rounds (the order rotates every round), each sample lasting at least
  ``min_sample_s``; the reported figure is the median over samples.
* Contention is measured, not guessed: during every sample the CPU time used by *other* processes (from
  ``/proc/stat`` minus this process' own time) is recorded; samples where others took more than
  ``max_contention`` of the machine are discarded and re-taken (up to ``max_rounds``).
* Peak fp32 and bf16 matmul GFLOP/s are measured in the same process (square GEMMs and the model's own GEMM
  shapes; the best median counts), and model GFLOP/s use :func:`vit_flops` (2 x multiply-accumulates, attention
  included; LayerNorm, softmax and GELU are not counted).
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


# ---------------------------------------------------------------------------- contention-aware timing
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    values = [int(v) for v in parts[1:9]]
    return sum(values) - values[3] - values[4]


def _own_ticks() -> int:
    t = os.times()  # this process (all threads) + waited-for children
    return round((t.user + t.system + t.children_user + t.children_system) * _CLK_TCK)


class ContentionMeter:
    """CPU share that other processes took while a block of code ran (0 = machine was ours, 1 = all of it).

    The tick sources and the clock can be injected, so the arithmetic is testable without a busy machine.
    """

    def __init__(self, busy_ticks: Callable[[], int | None] = _machine_busy_ticks,
                 own_ticks: Callable[[], int] = _own_ticks, clock: Callable[[], float] = time.perf_counter,
                 cpus: int | None = None) -> None:
        self.busy_ticks, self.own_ticks, self.clock = busy_ticks, own_ticks, clock
        self.available = busy_ticks() is not None
        self.cpus = cpus or os.cpu_count() or 1

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        result = {"contention": 0.0, "seconds": 0.0}
        busy0, own0, t0 = self.busy_ticks(), self.own_ticks(), self.clock()
        yield result
        elapsed = self.clock() - t0
        busy1, own1 = self.busy_ticks(), self.own_ticks()
        result["seconds"] = elapsed
        if busy0 is not None and busy1 is not None and elapsed > 0:
            others = max(0, (busy1 - busy0) - (own1 - own0))
            # ticks are 1/CLK_TCK s coarse: over a window of a few ms one tick of another process would read as
            # more than the whole machine, so the share is kept in [0, 1]
            result["contention"] = min(1.0, others / (elapsed * _CLK_TCK * self.cpus))


def wait_for_quiet(meter: ContentionMeter, max_contention: float, max_wait_s: float = 600.0,
                   window_s: float = 2.0) -> float:
    """Sleep until other processes use less than ``max_contention`` of the machine over ``window_s`` (or give up
    after ``max_wait_s``); returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        with meter.measure() as m:
            time.sleep(window_s)
        if m["contention"] <= max_contention:
            break
    return time.perf_counter() - start


def machine_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ---------------------------------------------------------------------------- matmul peak
def _time_call(fn: Callable[[], Any], min_s: float = 0.2) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed / n


def measure_matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]] | None = None, repeats: int = 5,
                        meter: ContentionMeter | None = None, max_contention: float = 0.1) -> dict[str, Any]:
    """Best median GFLOP/s over GEMM shapes (M, K, N): square 1024/2048/4096 unless ``shapes`` is given."""
    shapes = shapes or [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096)]
    meter = meter or ContentionMeter()
    best: dict[str, Any] = {"gflops": 0.0, "shape": None, "all": []}
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            samples: list[float] = []
            for _ in range(repeats * 4):
                with meter.measure() as c:
                    s = _time_call(lambda a=a, b=b: torch.mm(a, b), 0.15)
                if c["contention"] <= max_contention:
                    samples.append(2 * m * k * n / s / 1e9)
                else:
                    time.sleep(1.0)
                if len(samples) >= repeats:
                    break
            if samples:
                best["all"].append(((m, k, n), statistics.median(samples)))
                if statistics.median(samples) > best["gflops"]:
                    best.update(gflops=statistics.median(samples), shape=(m, k, n))
    square = [g for (m, k, n), g in best["all"] if m == k == n]
    best["square_gflops"] = max(square, default=0.0)
    return best


# ---------------------------------------------------------------------------- model builders
def _lazy_transformers():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTConfig, ViTForImageClassification


def timm_available() -> bool:
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


def vitkit_from_hf(hf: torch.nn.Module) -> torch.nn.Module:
    """The same network as a vitkit VisionTransformer (identical weights)."""
    from .convert.hf_vit import convert_hf_vit_state_dict, hf_vit_args, normalize_hf_vit_keys
    from .models.vit import VisionTransformer

    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    args = hf_vit_args(hf.config.to_dict(), normalize_hf_vit_keys(dict(state)))
    model = VisionTransformer(**args).eval()
    model.load_state_dict(convert_hf_vit_state_dict(state, args["depth"]))
    return model


def build_vitkit(spec: dict[str, Any]) -> torch.nn.Module:
    """A vitkit ViT with HF's conventions (eps 1e-12), random weights (for memory runs, where values don't matter)."""
    from .models.vit import VisionTransformer

    return VisionTransformer(img_size=spec["img_size"], patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
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
@dataclass
class Candidate:
    """One thing to time: ``fn`` runs one batch."""

    name: str
    library: str
    precision: str
    fn: Callable[[], Any]
    is_peer: bool
    compile_s: float | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    discarded: int = 0


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
    "vitkit-int8": "vitkit int8 dynamic",
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
    from .engine.inference import prepare_for_inference

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
        if kind == "vitkit-int8":
            im = prepare_for_inference(base, "fp32", quantize="int8", inplace=True)
            return Candidate(label, "vitkit", "int8", lambda: im(x), False)
        compile = kind == "vitkit-compile"
        im = prepare_for_inference(base, precision, compile=compile, inplace=True)
        im(x)  # compiles (when asked) outside the timed region
        return Candidate(label, "vitkit", precision, lambda: im(x), False, compile_s=im.compile_seconds)
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


def time_alternating(cands: list[Candidate], samples: int = 5, min_sample_s: float = 0.5,
                     max_contention: float = 0.1, max_rounds: int | None = None, warmup: int = 2,
                     meter: ContentionMeter | None = None, log: Callable[[str], None] | None = None,
                     backoff_s: float = 2.0) -> None:
    """Fill ``cand.samples`` (seconds per call) by timing all candidates in alternating, rotating rounds."""
    meter = meter or ContentionMeter()
    max_rounds = max_rounds or samples * 4
    with torch.inference_mode():
        per_call = []
        for c in cands:
            for _ in range(warmup):
                c.fn()
            t0 = time.perf_counter()
            c.fn()
            per_call.append(time.perf_counter() - t0)
        reps = [max(1, math.ceil(min_sample_s / max(t, 1e-6))) for t in per_call]
        for r in range(max_rounds):
            if all(len(c.samples) >= samples for c in cands):
                break
            order = list(range(len(cands)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                c = cands[i]
                if len(c.samples) >= samples:
                    continue
                with meter.measure() as m:
                    t0 = time.perf_counter()
                    for _ in range(reps[i]):
                        c.fn()
                    dt = (time.perf_counter() - t0) / reps[i]
                if m["contention"] <= max_contention:
                    c.samples.append(dt)
                else:
                    c.discarded += 1
                    time.sleep(backoff_s)  # let the other job finish instead of burning rounds
        for c in cands:  # never quiet enough: keep the fastest discarded-round estimate honest by flagging it
            if not c.samples:
                t0 = time.perf_counter()
                c.fn()
                c.samples.append(time.perf_counter() - t0)
                c.note = (c.note + " noisy").strip()
        if log:
            log("  " + ", ".join(f"{c.name}: {len(c.samples)} ok/{c.discarded} discarded" for c in cands))


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
    from .engine.inference import prepare_for_inference

    spec = MODEL_SPECS[model_key]
    ref_model = vitkit_from_hf(build_hf_vit(spec, "sdpa"))
    x = realistic_images(batch, spec["img_size"])
    with torch.inference_mode():
        ref = ref_model(x).float()
    variants: list[tuple[str, dict[str, Any]]] = [("fp32 prepared", {"precision": "fp32"}),
                                                  ("bf16 prepared", {"precision": "bf16"}),
                                                  ("int8 dynamic", {"precision": "fp32", "quantize": "int8"})]
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
    from .data.digits import load_digits
    from .engine.inference import prepare_for_inference
    from .models.vit import VisionTransformer

    torch.manual_seed(seed)
    train, test = load_digits("train", 32), load_digits("test", 32)
    mean, std = torch.tensor(train.mean).view(1, -1, 1, 1), torch.tensor(train.std).view(1, -1, 1, 1)

    def norm(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    model = VisionTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6,
                              num_heads=3, mlp_ratio=2.0)
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
                     ("int8 dynamic", {"precision": "fp32", "quantize": "int8"})):
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
        from .engine.inference import tune_cpu_allocator

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
    code = "import sys; from vitkit.benchmark import _rss_child; _rss_child(sys.argv[1])"
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
    gflops: float
    peak_fraction: float
    samples: int
    discarded: int
    compile_s: float | None = None
    rss_base_mb: float | None = None
    rss_peak_mb: float | None = None
    kernels: str = ""
    note: str = ""


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


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every cell; return ``{"meta": ..., "rows": [Row...], "accuracy": [...]}``."""
    from .engine.inference import amx_supported, native_bf16_supported, tune_cpu_allocator

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
    shapes: list[tuple[int, int, int]] = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096)]
    for key in cfg.models:
        s = MODEL_SPECS[key]
        m = 32 * ((s["img_size"] // s["patch_size"]) ** 2 + 1)
        shapes += [(m, s["embed_dim"], 3 * s["embed_dim"]), (m, s["embed_dim"], s["mlp_dim"]),
                   (m, s["mlp_dim"], s["embed_dim"])]
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        wait_for_quiet(meter, cfg.max_contention)
        peaks[name] = measure_matmul_peak(dtype, shapes, meter=meter, max_contention=cfg.max_contention)
        log(f"peak {name} matmul: {peaks[name]['gflops']:.0f} GFLOP/s (M,K,N = {peaks[name]['shape']}); "
            f"square GEMMs alone: {peaks[name]['square_gflops']:.0f}")
    meta["peak"] = peaks
    rows: list[Row] = []
    for key in cfg.models:
        spec = MODEL_SPECS[key]
        flops = vit_flops(**spec)
        meta.setdefault("flops", {})[key] = flops
        meta.setdefault("shortcut_flops", {})[key] = flops - _shortcut_flops(spec)
        for batch in cfg.batches:
            x = realistic_images(batch, spec["img_size"])
            for precision in cfg.precisions:
                kinds = candidate_kinds(precision, include_timm, cfg.compile, cfg.int8, cfg.plain)
                log(f"{spec['label']} batch {batch} {precision}: building {len(kinds)} candidates")
                sources: dict[str, Any] = {}
                cands = [make_candidate(k, key, batch, precision, x, sources) for k in kinds]
                kernels = {}
                for k, c in zip(kinds, cands):
                    if k in ("vitkit", "hf-sdpa", "hf-sdpa-bf16", "hf-eager", "hf-eager-bf16", "timm", "timm-bf16"):
                        kernels[k] = ", ".join(attention_kernels(c.fn))
                waited = wait_for_quiet(meter, cfg.max_contention)
                if waited > 5:
                    log(f"  waited {waited:.0f} s for other processes to finish")
                time_alternating(cands, cfg.samples, cfg.min_sample_s, cfg.max_contention, meter=meter, log=log)
                cell = _cell_rows(key, batch, precision, kinds, cands, kernels, flops, peaks)
                if cfg.rss:
                    for k, r in zip(kinds, cell):
                        mem = peak_rss(k, key, batch, precision, torch.get_num_threads(), tune_allocator=tuned)
                        if mem:
                            r.rss_base_mb, r.rss_peak_mb = mem["base_mb"], mem["peak_mb"]
                for r in cell:
                    log(f"  {r.name:36s} {r.img_s:8.1f} img/s  x{r.ratio or 0:.2f}  {r.gflops:6.0f} GFLOP/s"
                        f"  {100 * r.peak_fraction:4.0f}% peak" + (f"  rss {r.rss_peak_mb:.0f} MiB" if r.rss_peak_mb
                                                                   else ""))
                rows += cell
                del cands, sources
                gc.collect()
    # measure the peaks again now: keep the better figure (a contended start must not flatter the fractions)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        wait_for_quiet(meter, cfg.max_contention)
        again = measure_matmul_peak(dtype, shapes, meter=meter, max_contention=cfg.max_contention)
        if again["gflops"] > peaks[name]["gflops"]:
            again["square_gflops"] = max(again["square_gflops"], peaks[name]["square_gflops"])
            peaks[name] = again
        else:
            peaks[name]["square_gflops"] = max(again["square_gflops"], peaks[name]["square_gflops"])
        log(f"peak {name} matmul (end of run): {again['gflops']:.0f} GFLOP/s; kept {peaks[name]['gflops']:.0f}")
    for r in rows:
        peak = peaks["bf16" if r.precision in ("bf16", "int8") else "fp32"]["gflops"]
        r.peak_fraction = r.gflops / peak if peak else 0.0
    _compare_int8_with_bf16_peers(rows)
    accuracy = accuracy_report(cfg.models[0], compile=cfg.compile) if cfg.accuracy else []
    digits = digits_accuracy_report() if cfg.accuracy else []
    meta["load_after"] = machine_load()
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
    spec = MODEL_SPECS[key]
    med = {k: statistics.median(c.samples) for k, c in zip(kinds, cands)}
    peer_best = max((batch / med[k] for k, c in zip(kinds, cands) if c.is_peer), default=None)
    rows = []
    for k, c in zip(kinds, cands):
        img_s = batch / med[k]
        gflops = img_s * flops / 1e9
        peak = peaks["bf16" if c.precision in ("bf16", "int8") else "fp32"]["gflops"]
        spread = (max(c.samples) - min(c.samples)) / med[k] if len(c.samples) > 1 else 0.0
        rows.append(Row(model=spec["label"], batch=batch, precision=c.precision, name=c.name, library=c.library,
                        is_peer=c.is_peer, img_s=img_s, ms=1000 * med[k], spread=spread,
                        ratio=(img_s / peer_best) if peer_best else None, gflops=gflops,
                        peak_fraction=gflops / peak if peak else 0.0, samples=len(c.samples), discarded=c.discarded,
                        compile_s=c.compile_s, kernels=kernels.get(k, ""), note=c.note))
    return rows


def _shape(peak: dict[str, Any]) -> str:
    shape = peak.get("shape")
    return "x".join(str(v) for v in shape) if shape else "-"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), which every benchmark prints with its figures."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------- formatting
def format_table(result: dict[str, Any]) -> str:
    """Markdown: one table with every case, then peaks, kernels and accuracy."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Machine: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}"
        + (f", transformers {meta['transformers']}" if "transformers" in meta else "")
        + f"; timm {'included' if meta['timm'] else 'not installed'}; glibc allocator tuned for all libraries: "
        + f"{'yes' if meta['allocator_tuned'] else 'no'}.",
        f"Measured matmul peak: fp32 {meta['peak']['fp32']['gflops']:.0f} GFLOP/s, "
        f"bf16 {meta['peak']['bf16']['gflops']:.0f} GFLOP/s: the best median over square 1024-4096 GEMMs and the "
        f"models' own GEMM shapes at batch 32 (M x K x N: fp32 {_shape(meta['peak']['fp32'])}, "
        f"bf16 {_shape(meta['peak']['bf16'])}); square GEMMs alone reach "
        f"fp32 {meta['peak']['fp32'].get('square_gflops', 0):.0f}, "
        f"bf16 {meta['peak']['bf16'].get('square_gflops', 0):.0f} GFLOP/s. \"% of peak\" uses the higher figure.",
        "GFLOP/s count the full model (ViT-S/16 9.2, ViT-B/16 35.1 GFLOP per image) for every implementation, also "
        "where vitkit's CLS shortcut skips part of the last block.",
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
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"], choices=sorted(MODEL_SPECS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--samples", type=int, default=5, help="clean timing samples per candidate")
    parser.add_argument("--min-sample-seconds", type=float, default=0.5, help="minimum duration of one sample")
    parser.add_argument("--max-contention", type=float, default=0.1,
                        help="discard samples during which other processes used more than this CPU share")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 dynamic quantization candidate")
    parser.add_argument("--no-plain", action="store_true", help="skip vitkit's unprepared model")
    parser.add_argument("--no-timm", action="store_true", help="leave timm out even when importable")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-case peak-RSS child processes")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the logit-drift report")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc's malloc defaults (the tuning applies to every library alike)")
    parser.add_argument("--quick", action="store_true", help="ViT-S only, 3 samples, no compile/RSS (smoke run)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--markdown", help="also write the markdown table to this file")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(models=args.models, batches=args.batches, precisions=args.precisions, samples=args.samples,
                      min_sample_s=args.min_sample_seconds, max_contention=args.max_contention,
                      compile=not args.no_compile, int8=not args.no_int8, plain=not args.no_plain,
                      timm=not args.no_timm, rss=not args.no_rss, threads=args.threads,
                      tune_allocator=not args.no_tune_allocator, accuracy=not args.no_accuracy)
    if args.quick:
        cfg.models, cfg.samples, cfg.compile, cfg.rss, cfg.accuracy = ["vit_s16"], 3, False, False, False
    return cfg


def run_bench_args(args: argparse.Namespace) -> int:
    """``vitkit bench``: run, print the markdown table, optionally save JSON/markdown."""
    try:
        _lazy_transformers()
    except ImportError:
        print("vitkit bench needs transformers (pip install 'vitkit[hf]') for the peer comparison", file=sys.stderr)
        return 2
    result = run_benchmark(config_from_args(args), log=lambda s: print(s, flush=True))
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
