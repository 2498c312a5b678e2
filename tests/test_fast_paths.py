"""The fast inference paths give the exact path's outputs, within stated tolerances (no timing here).

Tolerances (logits of small random-but-spread models, whose logits have a std of about 1):

* fp32 prepared (packed oneDNN GEMMs, fused GELU/residual, CLS shortcut) vs the plain model: max |Δ| ≤ 1e-5
  (only the summation order of the GEMMs differs);
* bf16 vs fp32: relative L2 error ≤ 3e-2 (bf16 keeps 8 significant bits; errors average out over the GEMMs);
* torch.compile vs eager (same precision): fp32 max |Δ| ≤ 1e-4, bf16 relative L2 ≤ 3e-2;
* int8 (PT2E static quantization, compiled): tests/test_runtimes.py.
"""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.models.vit import VisionTransformer
from vitkit.tools.bench import (
    MODEL_SPECS,
    ContentionMeter,
    add_bench_args,
    format_table,
    realistic_images,
    vit_flops,
)
from vitkit.tools.inference import (
    FusedBlock,
    PackedLinear,
    native_bf16_supported,
    prepare_for_inference,
    resolve_precision,
)

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built in")


def _spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init gives near-constant logits; spread norms, biases and weights like a trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim == 1 and "norm" in name else (0.05 if p.ndim == 1 else 0.05)
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    args.update(kw)
    return _spread(VisionTransformer(**args))


def _ref(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@needs_onednn
@pytest.mark.parametrize("kw", [
    {},
    {"init_values": 0.1},  # LayerScale: blocks keep the unfused residual
    {"pos_embed": "relative", "pos_placement": "every_layer"},  # attention bias, sliced for the CLS query
    {"pool": "gap"},  # no CLS shortcut
    {"act": "quick_gelu"},  # no oneDNN post-op: plain activation after a packed GEMM
    {"act": "gelu_tanh", "qkv_bias": False},
    {"pos_placement": "every_layer_shared"},
])
def test_fp32_prepared_matches_plain(kw):
    model = _tiny(**kw)
    ref = _ref(model, X)
    fast = prepare_for_inference(model, "fp32")
    assert fast.dtype == torch.float32
    assert (fast(X) - ref).abs().max().item() <= 1e-5
    assert fast.info["cls_shortcut"] == (kw.get("pool", "cls") == "cls")


@needs_onednn
def test_fusion_is_applied_and_state_dict_unchanged():
    model = _tiny()
    keys = list(model.state_dict())
    fast = prepare_for_inference(model, "fp32")
    assert list(fast.model.state_dict()) == keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, fast.model.state_dict()[k])
    assert all(isinstance(b, FusedBlock) for b in fast.model.blocks)
    assert isinstance(fast.model.blocks[0].mlp.fc1, PackedLinear)
    assert fast.model.blocks[0].mlp.fc1.post_op[0] == "gelu"
    assert fast.info["packed_linear"] == 3 * 4 + 1
    # the original model is untouched (inplace=False)
    assert type(model.blocks[0]) is not FusedBlock and type(model.blocks[0].attn.qkv) is torch.nn.Linear


@needs_onednn
def test_shortcut_and_fusion_switches_agree():
    model = _tiny()
    outs = [prepare_for_inference(model, "fp32", fuse=f, cls_shortcut=s)(X) for f in (True, False)
            for s in (True, False)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() <= 1e-5


@needs_onednn
def test_bf16_close_to_fp32():
    model = _tiny()
    ref = _ref(model, X)
    fast = prepare_for_inference(model, "bf16")
    out = fast(X)
    assert out.dtype == torch.float32 and fast.model.head.weight.dtype == torch.bfloat16
    assert _rel(out, ref) <= 3e-2


def test_precision_auto_follows_hardware():
    assert resolve_precision("auto") == (torch.bfloat16 if native_bf16_supported() else torch.float32)
    assert resolve_precision("fp32") == torch.float32
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="precision"):
        prepare_for_inference(_tiny(), "int4")


@needs_onednn
def test_attention_maps_on_prepared_model():
    model = _tiny()
    fast = prepare_for_inference(model, "fp32")
    with vitkit.capture_attention(fast) as maps:
        out = fast(X)
    assert len(maps) == 3 and all(m.shape == (4, 3, 65, 65) for m in maps)  # full maps, no CLS shortcut
    assert (out - _ref(model, X)).abs().max().item() <= 1e-5
    assert torch.allclose(maps[0].sum(-1), torch.ones(4, 3, 65), atol=1e-5)


@needs_onednn
def test_packed_weights_follow_weight_updates():
    model = _tiny()
    fast = prepare_for_inference(model, "fp32")
    other = _tiny()
    _spread(other, seed=5)
    fast.model.load_state_dict(other.state_dict())
    assert (fast(X) - _ref(other, X)).abs().max().item() <= 1e-5


def _compile_or_skip(model, precision):
    try:
        fast = prepare_for_inference(model, precision, compile=True)
        return fast, fast(X)
    except Exception as e:  # no C++ toolchain for inductor, unsupported platform, ...
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {str(e)[:200]}")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_matches_eager(precision):
    model = _tiny()
    fast, out = _compile_or_skip(model, precision)
    eager = prepare_for_inference(model, precision)(X)
    assert fast.compile_seconds is not None and fast.compile_seconds > 0
    if precision == "fp32":
        assert (out - eager).abs().max().item() <= 1e-4
    else:
        assert _rel(out, _ref(model, X)) <= 3e-2


def test_hf_parity_of_prepared_fp32(tmp_path):
    pytest.importorskip("transformers")
    from vitkit.tools.bench import build_hf_vit, vitkit_from_hf

    spec = dict(MODEL_SPECS["vit_s16"], embed_dim=48, depth=2, num_heads=3, mlp_dim=96, img_size=32,
                patch_size=8, num_classes=7)
    hf = build_hf_vit(spec, "sdpa")
    fast = prepare_for_inference(vitkit_from_hf(hf), "fp32")
    with torch.no_grad():
        assert (hf(X).logits - fast(X)).abs().max().item() <= 1e-5


def test_flop_count():
    # ViT-S/16 and ViT-B/16 at 224: 9.2 and 35.1 GFLOP (2 x MACs, attention included; 4.6 and 17.6 GMACs)
    assert abs(vit_flops(**MODEL_SPECS["vit_s16"]) / 1e9 - 9.2) < 0.05
    assert abs(vit_flops(**MODEL_SPECS["vit_b16"]) / 1e9 - 35.1) < 0.05
    d, n = 384, 197
    per_block = 2 * n * (4 * d * d + 2 * d * 1536) + 4 * n * n * d
    assert vit_flops(**MODEL_SPECS["vit_s16"]) == 2 * 196 * 768 * d + 12 * per_block + 2 * d * 1000


def test_bench_helpers():
    import argparse

    p = argparse.ArgumentParser()
    add_bench_args(p)
    args = p.parse_args(["--quick", "--batches", "1"])
    assert args.quick and args.batches == [1]
    # Deterministic: injected tick counters and clock (a real sub-millisecond window is noise, see #12).
    from vitkit.tools.timing import _CLK_TCK

    def fake(*values):
        it = iter(values)
        return lambda: next(it)

    # 1 s on 2 CPUs = 2 * CLK_TCK ticks available; the machine got CLK_TCK busy ticks, ours were CLK_TCK / 2
    meter = ContentionMeter(busy_ticks=fake(0, 0, _CLK_TCK), own_ticks=fake(0, _CLK_TCK // 2),
                            clock=fake(10.0, 11.0), cpus=2)
    with meter.measure() as m:
        pass
    assert m["seconds"] == 1.0 and abs(m["contention"] - (_CLK_TCK - _CLK_TCK // 2) / (2 * _CLK_TCK)) < 1e-9
    # more ticks of others than the window holds (coarse ticks over a short window) are capped at 1
    meter = ContentionMeter(busy_ticks=fake(0, 0, 50), own_ticks=fake(0, 0), clock=fake(0.0, 0.001), cpus=2)
    with meter.measure() as m:
        pass
    assert m["contention"] == 1.0
    # our own ticks above the machine's (counter skew) read as no contention, never negative
    meter = ContentionMeter(busy_ticks=fake(0, 0, 1), own_ticks=fake(0, 5), clock=fake(0.0, 1.0), cpus=2)
    with meter.measure() as m:
        pass
    assert m["contention"] == 0.0
    x = realistic_images(2, 32)
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1.0
    row = dict(model="ViT-S/16", batch=1, precision="fp32", name="vitkit", library="vitkit", is_peer=False,
               img_s=10.0, ms=100.0, spread=0.0, ratio=1.2, gflops=92.0, peak_fraction=0.5, samples=5,
               discarded=0, compile_s=None, rss_base_mb=300.0, rss_peak_mb=400.0, kernels="flash", note="")
    meta = dict(cpu="cpu", threads=2, torch="2", timm=False, allocator_tuned=True,
                peak={"fp32": {"gflops": 184.0, "shape": (1, 1, 1)}, "bf16": {"gflops": 1000.0, "shape": (1, 1, 1)}})
    text = format_table({"meta": meta, "rows": [row], "accuracy": []})
    assert "| ViT-S/16 | 1 | fp32 | vitkit | 10.0 | 1.20 |" in text


def test_bench_percentages_come_from_one_computation():
    """"% of peak" counts the FLOPs a case computes (vitkit's CLS shortcut is not credited with the work it skips),
    against its precision's peak; the logged line and the table show the same figure."""
    from dataclasses import asdict

    from vitkit.tools.bench import _cell_rows, executed_flops, format_row_log, peak_fraction
    from vitkit.tools.timing import Candidate

    spec = MODEL_SPECS["vit_s16"]
    flops = vit_flops(**spec)
    peaks = {"fp32": {"gflops": 200.0, "shape": (1576, 384, 1536), "kernel": "packed"},
             "bf16": {"gflops": 400.0, "shape": (1576, 384, 1536), "kernel": "mm"}}
    assert executed_flops(spec, 8, False) == 8 * flops > executed_flops(spec, 8, True)
    short = Candidate("vitkit", "vitkit", "fp32", lambda: None, False, flops=executed_flops(spec, 8, True))
    peer = Candidate("transformers sdpa", "transformers", "fp32", lambda: None, True)
    fast = Candidate("too fast", "vitkit", "fp32", lambda: None, False)
    short.samples, peer.samples, fast.samples = [0.5, 0.4, 0.6], [0.6, 0.5, 0.5], [8 * flops / 250e9] * 3
    rows = _cell_rows("vit_s16", 8, "fp32", ["vitkit", "hf-sdpa", "x"], [short, peer, fast], {}, flops, peaks)
    # same time, same model GFLOP/s; the shortcut row's fraction counts only what it computed
    assert rows[0].gflops == pytest.approx(rows[1].gflops) == pytest.approx(8 * flops / 0.5 / 1e9)
    assert rows[0].peak_fraction == pytest.approx(executed_flops(spec, 8, True) / 0.5 / 1e9 / 200)
    assert rows[1].peak_fraction == pytest.approx(8 * flops / 0.5 / 1e9 / 200)
    assert rows[1].peak_fraction > rows[0].peak_fraction
    assert rows[0].peak_fraction == peak_fraction(rows[0].executed_gflops, "fp32", peaks)
    # a case faster than the peak is flagged (the peak measurement missed something), never hidden
    assert rows[2].peak_fraction == pytest.approx(1.25) and "above the measured matmul peak" in rows[2].note
    assert peak_fraction(100.0, "int8", peaks) == 0.25 and peak_fraction(100.0, "fp32", {"fp32": {"gflops": 0}}) == 0
    meta = dict(cpu="cpu", threads=2, torch="2", timm=False, allocator_tuned=True, peak=peaks)
    table = format_table({"meta": meta, "rows": [asdict(r) for r in rows], "accuracy": []})
    assert "fp32 200 GFLOP/s (packed, 1576x384x1536)" in table
    for r in rows:
        shown = f"{100 * r.peak_fraction:.0f}%"
        assert f"{shown} peak" in format_row_log(r).replace("  ", " ").replace("  ", " ")
        line = next(line for line in table.splitlines() if f"| {r.name} |" in line or f"| *{r.name}* |" in line)
        assert f"| {shown} |" in line


def test_bench_peak_covers_the_models_gemms_and_kernels():
    from vitkit.tools.bench import BenchConfig, measure_matmul_peak, model_gemm_shapes, peak_shapes, quick_config

    spec = MODEL_SPECS["vit_s16"]
    assert model_gemm_shapes(spec, 2) == [(394, 384, 1152), (394, 384, 384), (394, 384, 1536), (394, 1536, 384)]
    cfg = BenchConfig(models=["vit_s16"], batches=[1, 32], peak_squares=[1024])
    shapes = peak_shapes(cfg)
    assert (1024, 1024, 1024) in shapes and all(s in shapes for b in (1, 32) for s in model_gemm_shapes(spec, b))
    quick = quick_config()
    assert quick.models == ["vit_s16"] and quick.batches == [1, 8] and quick.samples >= 3 and not quick.compile
    assert set(peak_shapes(quick)) == {s for b in (1, 8) for s in model_gemm_shapes(spec, b)}
    # every kernel the candidates run is timed for every shape (tiny shapes, one sample: structure only)
    peak = measure_matmul_peak(torch.float32, [(32, 16, 8), (16, 16, 16)], repeats=1, max_contention=1.0,
                               min_sample_s=0.0)
    kernels = {name for _, name, _ in peak["all"]}
    assert "mm" in kernels and ("packed" in kernels or not torch.backends.mkldnn.is_available())
    assert peak["gflops"] == max(g for _, _, g in peak["all"]) and peak["square_gflops"] > 0


def test_alternating_timer_prepares_each_candidate_outside_the_timed_region():
    """``prepare`` switches shared state (the search's keep ratios) before every warm-up and sample."""
    from vitkit.tools.timing import Candidate, time_alternating

    state = {"now": None}
    seen = {"a": [], "b": []}
    cands = [Candidate(name, "x", "fp32", lambda name=name: seen[name].append(state["now"]), False,
                       prepare=lambda name=name: state.update(now=name)) for name in ("a", "b")]
    time_alternating(cands, samples=3, min_sample_s=0.0, max_contention=1.0, warmup=1)
    assert seen["a"] and set(seen["a"]) == {"a"} and set(seen["b"]) == {"b"}
    assert all(len(c.samples) == 3 and c.discarded == 0 for c in cands)


def test_alternating_timer_on_a_machine_that_is_never_quiet():
    """Every sample disturbed: the rounds stop at the budget, and each candidate keeps the median of its disturbed
    samples, flagged noisy (no extra call, no endless waiting)."""
    import contextlib

    from vitkit.tools.timing import Candidate, time_alternating

    class Busy:
        @contextlib.contextmanager
        def measure(self):
            yield {"contention": 1.0, "seconds": 0.0}

    calls = []
    cand = Candidate("a", "x", "fp32", lambda: calls.append(1), False)
    time_alternating([cand], samples=3, min_sample_s=0.0, max_contention=0.1, max_rounds=50, warmup=0,
                     meter=Busy(), backoff_s=0.01, budget_s=0.0)
    assert cand.discarded == 1 and len(calls) == 2  # sizing call + the first round; the budget ended the rounds
    assert len(cand.samples) == 1 and cand.note == "noisy"


def _classifiers() -> list[str]:
    from _tiny import is_classifier

    return [n for n in vitkit.list_models() if is_classifier(n)]


@needs_onednn
def test_fused_blocks_are_swapped_not_mutated():
    """Fusion replaces each Block in its ModuleList by a FusedBlock sharing the same modules."""
    model = _tiny()
    blk = model.blocks[0]
    fast = prepare_for_inference(model, "fp32", inplace=True)
    assert fast.info["fused_block"] == 3 and isinstance(model.blocks[0], FusedBlock)
    assert type(blk) is not FusedBlock and model.blocks[0].attn is blk.attn and model.blocks[0].mlp is blk.mlp
    with pytest.raises(ValueError, match="plain Blocks"):
        FusedBlock.from_block(VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2).blocks[0])


@needs_onednn
@pytest.mark.parametrize("name", _classifiers())
def test_every_registered_model_prepares_exactly(name):
    """Any family (hybrids, T2T, ...) goes through prepare_for_inference; fp32 stays within 1e-5."""
    from _tiny import tiny

    over, shape = tiny(name)
    torch.manual_seed(0)
    model = _spread(vitkit.create_model(name, **over))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    ref = _ref(model, x)
    assert (prepare_for_inference(model, "fp32")(x) - ref).abs().max().item() <= 1e-5
    assert _rel(prepare_for_inference(model, "bf16")(x), ref) <= 5e-2
