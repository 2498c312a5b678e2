"""Token-based generation: the single-scale VQ tokenizer, the generator in its three orders (raster, random,
masked), KV-cached and guided sampling, and the vq / ar tasks on tiny data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.engine.config import ModelConfig
from vitkit.engine.trainer import train
from vitkit.errors import ConfigError, InputShapeError
from vitkit.layers.sampling import cfg_combine, masked_counts
from vitkit.models import from_pretrained
from vitkit.models.ar import ORDERS, TokenGenerator
from vitkit.models.vqvae import SingleScaleVQVAE
from vitkit.tasks import TaskContext, build_task
from vitkit.tasks.ar import ARTask
from vitkit.tasks.base import batch_images
from vitkit.tasks.vq import VQTask, restart_dead_codes

V, G, C = 16, 4, 3  # vocabulary, grid (L = 16 tokens), classes of the tiny generators
L = G * G
TINY = dict(vocab_size=V, grid_size=G, num_classes=C, embed_dim=32, depth=2, num_heads=2)
TINY_VQ = dict(vocab_size=V, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, in_channels=1, patch_nums=(G,))


def tiny_gen(order: str, **kw) -> TokenGenerator:
    torch.manual_seed(0)
    return TokenGenerator(**{**TINY, "order": order, **kw}).eval()


def tiny_vq(**kw) -> SingleScaleVQVAE:
    torch.manual_seed(0)
    return SingleScaleVQVAE(**{**TINY_VQ, **kw}).eval()


def codes_and_labels(B: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.randint(0, C, (B,), generator=g)


# ---------------------------------------------------------------------- the tokenizer
def test_single_scale_vq_is_the_multi_scale_one_with_one_map():
    vq = tiny_vq()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    idx = vq.img_to_idx(x)
    assert len(idx) == 1 and idx[0].shape == (2, L) and vq.grid_size == G
    img = vq.idx_to_img(idx, last_one=True)
    assert img.shape == x.shape and img.abs().max() <= 1
    # plain VQ: f̂ is the nearest code vectors themselves (φ is the identity with quant_resi=0)
    f = vq.encode(x)
    f_hat = vq.idx_to_fhat(idx, last_one=True)
    assert torch.equal(f_hat, vq.quantize.embedding(idx[0]).transpose(1, 2).reshape_as(f))
    out = vq.train()(x)
    assert torch.isfinite(out.loss) and out.rec.shape == x.shape
    assert vq.quantize.ema_vocab_hit_SV.shape == (1, V) and len(vq.quantize.usages(2 * L)) == 1
    with pytest.raises(ValueError, match="exactly one latent size"):
        SingleScaleVQVAE(**{**TINY_VQ, "patch_nums": (2, 4)})
    model = vitkit.create_model("vq_fmnist_tiny")
    assert model.patch_nums == (7,) and model.img_size == 28 and model.pretrained_cfg["mean"] == (0.5,)


def test_dead_codes_restart_onto_encoder_features():
    vq = tiny_vq().train()
    vq(torch.rand(4, 1, 8, 8) * 2 - 1)  # one EMA update
    ema = vq.quantize.ema_vocab_hit_SV
    ema.fill_(10.0)
    ema[0, :3] = 0.0  # three dead codes
    features = torch.randn(2, 4, G, G)
    before = vq.quantize.embedding.weight.detach().clone()
    assert restart_dead_codes(vq, features, tokens_per_step=2 * L, threshold=0.03) == 3
    weight = vq.quantize.embedding.weight.detach()
    pool = features.permute(0, 2, 3, 1).reshape(-1, 4)
    assert all((pool == weight[i]).all(1).any() for i in range(3))
    assert torch.equal(weight[3:], before[3:]) and (ema[0, :3] > 0).all()
    assert restart_dead_codes(vq, features, tokens_per_step=2 * L, threshold=0.03) == 0


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("order", ORDERS)
def test_each_order_learns_a_fixed_batch(order):
    model = tiny_gen(order, cond_drop_rate=0.0).train()
    codes, labels = codes_and_labels(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(codes, labels, generator=torch.Generator().manual_seed(0))  # the same orders / masks
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=0.1)
    assert losses[-1] < 0.5 * losses[0]


def test_raster_order_is_causal():
    model = tiny_gen("raster")
    codes, labels = codes_and_labels()
    out = model(codes, labels)
    assert torch.equal(out.targets, codes) and out.mask.eq(1).all()
    assert torch.equal(out.perm, torch.arange(L).expand(4, L))
    k = 6
    changed = codes.clone()
    changed[:, k] = (changed[:, k] + 1) % V
    other = model(changed, labels).logits
    # slot j predicts t_j from t_<j: slots 0..k do not see t_k, slot k + 1 is the first that does
    torch.testing.assert_close(other[:, :k + 1], out.logits[:, :k + 1], rtol=0, atol=1e-6)
    assert (other[:, k + 1] - out.logits[:, k + 1]).abs().max() > 1e-4
    other_label = model(codes, (labels + 1) % C).logits
    assert (other_label[:, 0] - out.logits[:, 0]).abs().max() > 1e-4  # the class token conditions the first code


def test_random_order_draws_permutations_and_is_told_the_next_position():
    model = tiny_gen("random")
    codes, labels = codes_and_labels(8)
    out = model(codes, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.perm.sort(1).values, torch.arange(L).expand(8, L))
    assert len({tuple(p.tolist()) for p in out.perm}) == 8  # one order per sample
    assert torch.equal(out.targets, codes.gather(1, out.perm))
    again = model(codes, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.perm, out.perm) and torch.equal(again.logits, out.logits)

    # Two orders equal up to slot 2 and then swapping positions 2 and 3: slots 0 and 1 are identical, slot 2 gets
    # the same input token (t_1) and differs only in the target position it is told to predict.
    first = torch.arange(L).expand(8, L).clone()
    second = first.clone()
    second[:, [2, 3]] = second[:, [3, 2]]
    a = model.logits_for(codes, labels, perm=first)
    b = model.logits_for(codes, labels, perm=second)
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=0, atol=1e-6)
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3
    with torch.no_grad():
        model.target_pos.zero_()  # without the target-position embedding nothing tells slot 2 what to predict
    torch.testing.assert_close(model.logits_for(codes, labels, perm=first)[:, 2],
                               model.logits_for(codes, labels, perm=second)[:, 2], rtol=0, atol=1e-6)
    with pytest.raises(InputShapeError, match="permutations"):
        model.logits_for(codes, labels, perm=torch.zeros(8, L, dtype=torch.long))


def test_masked_training_masks_follow_the_cosine_schedule():
    model = tiny_gen("masked")
    mask = model.random_mask(4000, torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= L
    # ratio = cos(π/2·u), u ~ U(0, 1): E[ratio] = 2/π; count = ⌈ratio·L⌉ adds under one token on average
    assert abs(counts.float().mean().item() / L - 2 / math.pi) < 0.05
    codes, labels = codes_and_labels()
    given = torch.zeros(4, L, dtype=torch.bool)
    given[:, :5] = True
    out = model(codes, labels, mask=given)
    assert torch.equal(out.mask, given.float()) and torch.equal(out.targets, codes)
    nll = torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), codes, reduction="none")
    torch.testing.assert_close(out.loss, nll[:, :5].mean())
    # masked inputs are hidden: changing a masked code changes nothing, changing a visible one changes the logits
    hidden, shown = codes.clone(), codes.clone()
    hidden[:, 0] = (hidden[:, 0] + 1) % V
    shown[:, 9] = (shown[:, 9] + 1) % V
    assert torch.equal(model(hidden, labels, mask=given).logits, out.logits)
    assert (model(shown, labels, mask=given).logits - out.logits).abs().max() > 1e-4


def test_masked_counts_is_maskgits_cosine_schedule():
    assert masked_counts(49, 8) == [48, 45, 40, 34, 27, 18, 9, 0]  # floor(49·cos(π/2·t/8)), t = 1..8
    for steps in (1, 2, 5, L):
        counts = masked_counts(L, steps)
        assert counts[-1] == 0 and all(c >= 1 for c in counts[:-1])
        assert all(a > b for a, b in zip([L, *counts], counts))  # every step decides at least one token
    assert masked_counts(L, L) == list(range(L - 1, -1, -1))
    for bad in (0, L + 1):
        with pytest.raises(ValueError, match="steps"):
            masked_counts(L, bad)


# ---------------------------------------------------------------------- sampling
def test_masked_sampling_follows_the_schedule_and_fills_every_position():
    model = tiny_gen("masked")
    codes, history = model.sample(6, 1, steps=5, generator=0, cfg=1.0, return_steps=True)
    assert codes.shape == (6, G, G) and codes.min() >= 0 and codes.max() < V
    assert len(history) == 5
    for step, (counts, expected) in enumerate(zip([h.eq(-1).sum(1) for h in history], masked_counts(L, 5))):
        assert counts.eq(expected).all(), f"step {step}"
    for before, after in zip(history, history[1:]):  # a decided code is never re-masked or changed
        decided = before.ne(-1)
        assert torch.equal(after[decided], before[decided])
    assert torch.equal(history[-1], codes.flatten(1))


@pytest.mark.parametrize("order", ["raster", "random"])
def test_kv_cached_logits_equal_the_full_forward(order):
    model = tiny_gen(order)
    codes, labels = codes_and_labels()
    perm = model.random_perm(4, torch.Generator().manual_seed(3)) if order == "random" else None
    full = model.logits_for(codes, labels, perm=perm)
    cached = model.incremental_logits(codes, labels, perm=perm)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_guidance_zero_is_the_conditional_model(order):
    model = tiny_gen(order)
    codes, labels = codes_and_labels()
    kw = {"perm": model.random_perm(4, torch.Generator().manual_seed(0))} if order == "random" else {}
    if order == "masked":
        kw = {"mask": model.random_mask(4, torch.Generator().manual_seed(0))}
    cond = model.logits_for(codes, labels, **kw)
    uncond = model.logits_for(codes, None, **kw)  # None = the null class
    torch.testing.assert_close(model.guided_logits(codes, labels, 0.0, **kw), cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.guided_logits(codes, labels, 2.0, **kw), 3 * cond - 2 * uncond,
                               rtol=0, atol=1e-4)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), cond)


@pytest.mark.parametrize("order", ORDERS)
def test_seeded_sampling_is_reproducible(order):
    model = tiny_gen(order).train()
    kw = dict(cfg=1.5, top_k=8, top_p=0.9, temperature=0.9)
    a = model.sample(5, generator=torch.Generator().manual_seed(7), **kw)
    b = model.sample(5, generator=7, **kw)
    c = model.sample(5, generator=8, **kw)
    assert model.training  # sampling runs in eval mode and restores the mode
    assert a.shape == (5, G, G) and a.dtype == torch.long and a.min() >= 0 and a.max() < V
    assert torch.equal(a, b) and not torch.equal(a, c)
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert model.sample(5, labels, generator=0).shape == (5, G, G)
    assert model.sample(5, -1, generator=0).shape == (5, G, G)  # unconditional
    if order == "raster":  # greedy decoding does not depend on the seed
        assert torch.equal(model.sample(3, 1, top_k=1, generator=0), model.sample(3, 1, top_k=1, generator=1))


def test_generator_checks_its_inputs():
    model = tiny_gen("raster")
    codes, labels = codes_and_labels()
    with pytest.raises(InputShapeError, match="integer codes"):
        model(codes.float(), labels)
    with pytest.raises(InputShapeError, match=r"codes must be in \[0, 16\)"):
        model(codes + V, labels)
    with pytest.raises(InputShapeError, match="labels"):
        model(codes, labels[:2])
    with pytest.raises(ValueError, match="raster order takes no perm"):
        model(codes, labels, perm=torch.arange(L).expand(4, L))
    with pytest.raises(ValueError, match="one token per step"):
        model.sample(2, steps=4)
    with pytest.raises(ConfigError, match="order="):
        vitkit.create_model("ar_fmnist_tiny", order="diagonal")
    assert model(codes.view(4, G, G), labels).logits.shape == (4, L, V)  # code maps work as well


def test_registered_generators():
    names = vitkit.list_models("ar_fmnist_tiny*")
    assert names == ["ar_fmnist_tiny", "ar_fmnist_tiny_masked", "ar_fmnist_tiny_random"]
    for name in names:
        model = vitkit.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        assert 1e6 <= params <= 3e6 and model.num_tokens == 49 and model.vocab_size == 256
        assert model.pretrained_cfg["input_size"] == (1, 28, 28) and len(model.pretrained_cfg["class_names"]) == 10


@pytest.mark.parametrize("order", ORDERS)
def test_save_load_round_trip(order, tmp_path):
    model = tiny_gen(order)
    codes, labels = codes_and_labels()
    model.save_pretrained(tmp_path / "gen")
    loaded = from_pretrained(tmp_path / "gen").eval()
    assert type(loaded) is TokenGenerator and loaded.order == order
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded(codes, labels, generator=g()).logits, model(codes, labels, generator=g()).logits)
    assert torch.equal(loaded.sample(3, generator=0), model.sample(3, generator=0))
    vq = tiny_vq()
    vq.save_pretrained(tmp_path / "vq")
    vq2 = from_pretrained(tmp_path / "vq").eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert type(vq2) is SingleScaleVQVAE and torch.equal(vq2.img_to_idx(x)[0], vq.img_to_idx(x)[0])


# ---------------------------------------------------------------------- tasks
def _digits(split: str = "train"):
    from vitkit.data import build_dataset

    return build_dataset("digits", split, download=False)


@pytest.mark.parametrize("order", ORDERS)
def test_ar_task_steps_and_evaluates_on_tiny_data(order, tmp_path):
    tiny_vq().save_pretrained(tmp_path / "vq")
    data = _digits("test")
    ctx = TaskContext(train_set=data, eval_set=data)
    task = build_task("ar", {"tokenizer": str(tmp_path / "vq"), "samples_per_class": 2, "steps": 4}, ctx)
    assert isinstance(task, ARTask)
    model = task.build_model(ModelConfig(
        name="ar_fmnist_tiny", args={"order": order, "embed_dim": 32, "depth": 2, "num_heads": 2}))
    assert (model.vocab_size, model.grid_size, model.num_classes) == (V, G, 10)  # from the tokenizer and the data
    task.setup(model)
    batch = task.prepare_batch(data.__getitems__(list(range(16))), train=True)
    loss, stats = task.training_step(model.train(), batch)
    loss.backward()
    assert stats["count"] == 16 and math.isfinite(stats["nll"]) and stats["nll"] / 16 == pytest.approx(loss.item())
    metrics = task.evaluate(model.eval(), [batch, batch])
    assert metrics["count"] == 32 and metrics["bits_per_token"] == pytest.approx(metrics["nll"] / math.log(2))
    assert metrics == task.evaluate(model, [batch, batch])  # fixed evaluation orders / masks
    assert ("bits_per_image" in metrics) == (order != "masked")
    assert task.write_artifacts(model, metrics, tmp_path) == ["ar_samples.png"]
    assert (tmp_path / "ar_samples.png").is_file()
    results = task.predict(model, batch[0][:3])
    assert len(results) == 3 and all("bits_per_token" in r for r in results)
    with pytest.raises(ConfigError, match="does not fit the tokenizer"):
        task.build_model(ModelConfig(name="ar_fmnist_tiny", args={"vocab_size": 32}))
    with pytest.raises(ConfigError, match="needs task.args.tokenizer"):
        build_task("ar", {}, ctx).tokenizer()


@pytest.mark.parametrize("name, patch_nums", [("vq_fmnist_tiny", [G]), ("vqvae_fmnist_tiny", [1, 2, G])])
def test_vq_task_steps_and_evaluates(name, patch_nums, tmp_path):
    """Single-scale and VAR's multi-scale tokenizer alike."""
    data = _digits("test")
    task = build_task("vq", {"grid_images": 4}, TaskContext(train_set=data, eval_set=data))
    assert isinstance(task, VQTask) and task.mode == "max" and task.primary_metric == "psnr"
    model = task.build_model(ModelConfig(name=name, args={**TINY_VQ, "patch_nums": patch_nums}))
    task.setup(model)
    batch = task.prepare_batch(data.__getitems__(list(range(32))), train=True)
    loss, stats = task.training_step(model.train(), batch)
    assert math.isfinite(loss.item()) and 0 <= stats["step_codebook_usage"] <= 1
    metrics = task.evaluate(model.eval(), [batch])
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1 / metrics["rec_mse"]))
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["codebook_perplexity"] <= V
    assert task.write_artifacts(model, metrics, tmp_path) == ["vq_reconstruction.png", "vq_codebook.png"]
    assert "PSNR" in task.format_report(metrics)
    assert set(task.predict(model, batch[0][:2])[0]) == {"rec_mse", "psnr", "distinct_codes"}


@pytest.mark.parametrize("continuous_prob", [0.0, 1.0])
def test_vq_task_hybrid_step_decodes_f_or_f_hat(continuous_prob):
    """HART's hybrid tokenizer: continuous_prob = 1 decodes the encoder's f itself, 0 the quantised f̂; the
    continuous PSNR (decoding f) is reported either way, and the setting is checked."""
    data = _digits("test")
    task = build_task("vq", {"continuous_prob": continuous_prob}, TaskContext(train_set=data, eval_set=data))
    model = task.build_model(ModelConfig(name="vqvae_fmnist_tiny", args={**TINY_VQ, "patch_nums": [1, 2, G]}))
    task.setup(model)
    batch = task.prepare_batch(data.__getitems__(list(range(16))), train=True)
    images = batch_images(batch)
    torch.manual_seed(0)
    loss, stats = task.training_step(model.train(), batch)
    f = model.encode(images)
    f_hat, vq_loss = model.quantize(f)
    rec = model.decode(f if continuous_prob else f_hat)
    assert loss.item() == pytest.approx((F.mse_loss(rec, images) + vq_loss).item(), rel=1e-5)
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None
    metrics = task.evaluate(model.eval(), [batch])
    assert math.isfinite(metrics["psnr_continuous"]) and "continuous f" in task.format_report(metrics)
    with pytest.raises(ValueError, match="continuous_prob"):
        build_task("vq", {"continuous_prob": 1.5})


def test_vq_then_ar_train_end_to_end_and_eval_through_the_cli(tmp_path, capsys):
    """Stage 1 trains the tokenizer on digits, stage 2 a generator on its codes; `vitkit eval` / `predict` go
    through the ar task with the run's tokenizer."""
    from vitkit.cli import main as cli_main

    common = ["data.name=digits", "train.batch_size=64", "train.progress=false", "train.epochs=1",
              "schedule.warmup_epochs=0.2"]
    vq_args = [f"model.args.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY_VQ.items()]
    vq = train(None, [*common, "task.name=vq", "model.name=vq_fmnist_tiny", *vq_args, "optim.lr=2e-3",
                      f"output_dir={tmp_path / 'vq'}"])
    assert vq["primary_metric"] == "psnr" and vq["mode"] == "max" and vq["final"]["psnr"] > 5
    assert (tmp_path / "vq" / "vq_reconstruction.png").is_file()
    row = json.loads((tmp_path / "vq" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_codes_restarted"] > 0 and row["eval_codebook_usage"] > 0.5  # dead codes were restarted
    ar = train(None, [*common, "task.name=ar", f"task.args.tokenizer={tmp_path / 'vq'}",
                      "task.args.samples_per_class=2", "model.name=ar_fmnist_tiny", "model.args.embed_dim=32",
                      "model.args.depth=2", "model.args.num_heads=2", f"output_dir={tmp_path / 'ar'}"])
    assert ar["primary_metric"] == "nll" and ar["mode"] == "min" and ar["final"]["nll"] < math.log(V)
    assert (tmp_path / "ar" / "ar_samples.png").is_file()
    saved = json.loads((tmp_path / "ar" / "checkpoints" / "best" / "config.json").read_text())
    assert saved["pretrained_cfg"]["task"] == "ar" and saved["pretrained_cfg"]["input_size"] == [1, 8, 8]

    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "ar"), "--data", "digits"]) == 0
    assert "bits per token" in capsys.readouterr().out
    from PIL import Image

    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), mode="L").save(tmp_path / "x.png")
    assert cli_main(["predict", str(tmp_path / "ar"), str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "bits_per_token" in out and "likeliest_class" in out
    assert cli_main(["predict", str(tmp_path / "vq"), str(tmp_path / "x.png")]) == 0
    assert "psnr" in capsys.readouterr().out


def test_frechet_distance_matches_closed_forms():
    """FD of two Gaussians: zero against itself; with commuting (here diagonal) covariances
    ‖μ1 − μ2‖² + Σ(√a − √b)²; invariant to a common rotation; symmetric. ``gaussian`` is mean + unbiased cov."""
    from vitkit.tasks.generative import frechet_distance, gaussian

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(mu1, a.diag(), mu2, b.diag()) == pytest.approx(expected.item(), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    rotated = frechet_distance(q @ mu1, q @ a.diag() @ q.T, q @ mu2, q @ b.diag() @ q.T)
    assert rotated == pytest.approx(expected.item(), rel=1e-7)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = m @ m.T, (m + 0.5).T @ (m + 0.5)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-7)
    x = torch.randn(50, 3, generator=g)
    mean, cov = gaussian(x)
    assert torch.allclose(mean, x.double().mean(0))
    assert torch.allclose(cov, torch.from_numpy(np.cov(x.double().numpy(), rowvar=False)))
