"""HART: hybrid tokens (VAR's discrete multi-scale tokens + a continuous residual) and the small residual diffusion
head. There are no reference vectors for HART (the official code is text-to-image and CUDA-only): these tests pin
the decomposition, the diffusion maths and learning on a toy target, and HART's equality with VAR where they
share parts."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import InputShapeError
from vitkit.layers.diffusion import (
    DiffusionHead,
    NoiseSchedule,
    beta_schedule,
    respaced_timesteps,
    sample_loop,
)
from vitkit.models import create_model, model_family
from vitkit.models.hart import HART, HART_FMNIST_TINY, hart_training_inputs, hybrid_tokens, hybrid_vqvae_loss
from vitkit.models.var import VAR, VAR_FMNIST_TINY
from vitkit.models.vqvae import MultiScaleVQVAE

# A tokenizer of 8x8 gray images (4x4x4 latent, 16 codes, scales 1-4) and a HART that fits it.
VAE_ARGS = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, in_channels=1,
                patch_nums=(1, 2, 3, 4))
VAR_ARGS = dict(vocab_size=16, c_vae=4, patch_nums=(1, 2, 3, 4), num_classes=5, depth=2, embed_dim=32, num_heads=2)
HART_ARGS = dict(VAR_ARGS, diff_width=32, diff_depth=2, diffusion_batch_mul=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: a second thread only adds synchronisation (several times slower on a busy
    machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vae(seed: int = 0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    return MultiScaleVQVAE(**VAE_ARGS).eval()


def _hart(seed: int = 0, **over) -> HART:
    torch.manual_seed(seed)
    return HART(**{**HART_ARGS, **over})


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(vae: MultiScaleVQVAE, n: int = 3, seed: int = 1):
    x, gt, residual = hart_training_inputs(vae, _images(n, seed))
    labels = torch.arange(n) % VAR_ARGS["num_classes"]
    return labels, x, gt, residual


def _randomise_diffusion_output(model: HART) -> None:
    """The head starts with zero modulations and output (an untrained head predicts 0 whatever its inputs);
    give them weights so that its output depends on everything upstream."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.diffloss.net.named_parameters():
        if "adaLN_modulation" in name or "final_layer" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------- hybrid tokenizer
def test_hybrid_split_is_lossless():
    vae = _vae()
    img = _images(4, 0)
    idx, residual = hybrid_tokens(vae, img)
    with torch.no_grad():
        f = vae.encode(img)
        f_hat = vae.idx_to_fhat(idx, last_one=True)
        quantiser_f_hat = vae.f_to_idx_or_fhat(f, to_fhat=True)[-1]
    assert [tuple(i.shape) for i in idx] == [(4, pn * pn) for pn in VAE_ARGS["patch_nums"]]
    assert all(torch.equal(a, b) for a, b in zip(idx, vae.img_to_idx(img)))
    assert residual.shape == f.shape == (4, 4, 4, 4)
    # the discrete tokens are lossy, the hybrid split is not: f̂ + r = f up to one rounding of f - f̂
    assert residual.abs().max() > 1e-2
    ulp = torch.finfo(torch.float32).eps * f.abs().max().item()
    assert (f_hat + residual - f).abs().max().item() <= 2 * ulp
    # f̂ rebuilt from the tokens is the quantiser's own f̂ (what sampling reproduces from sampled tokens)
    torch.testing.assert_close(f_hat, quantiser_f_hat, rtol=0, atol=1e-6)
    x, gt, residual_again = hart_training_inputs(vae, img)
    assert torch.equal(x, vae.idx_to_var_input(idx)) and torch.equal(gt, torch.cat(idx, dim=1))
    assert torch.equal(residual_again, residual)


def test_residual_lowers_reconstruction_error():
    """A tokenizer trained HART's way (the decoder sees f̂ or f, alternating) reconstructs better from f̂ + r
    than from f̂. Random images cannot be generalised from, so the check is on the images it was fitted to."""
    vae = _vae().train()
    img = _images(8, 0)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    coin = random.Random(0)
    for _ in range(40):
        out = hybrid_vqvae_loss(vae, img, discrete_prob=0.5, generator=coin)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vae.eval()
    idx, residual = hybrid_tokens(vae, img)
    with torch.no_grad():
        f_hat = vae.idx_to_fhat(idx, last_one=True)
        err_discrete = F.mse_loss(vae.decode(f_hat), img).item()
        err_hybrid = F.mse_loss(vae.decode(f_hat + residual), img).item()
    assert err_hybrid < 0.8 * err_discrete, (err_hybrid, err_discrete)


def test_hybrid_vqvae_loss_paths():
    vae = _vae()
    img = _images(2, 3)
    with torch.no_grad():
        discrete = hybrid_vqvae_loss(vae, img, discrete_prob=1.0)
        continuous = hybrid_vqvae_loss(vae, img, discrete_prob=0.0)
        assert torch.equal(discrete.loss, vae(img).loss)  # the discrete path is VAR's tokenizer training step
        assert torch.equal(continuous.rec, vae.decode(vae.encode(img)))
    with pytest.raises(ValueError, match="discrete_prob"):
        hybrid_vqvae_loss(vae, img, discrete_prob=1.5)


# ---------------------------------------------------------------------- diffusion maths
def test_noise_schedules():
    for name in ("cosine", "linear"):
        betas = beta_schedule(name, 1000)
        assert betas.dtype == torch.float64 and betas.shape == (1000,)
        assert (betas > 0).all() and (betas <= 0.999).all()
        ab = NoiseSchedule(1000, name).alphas_cumprod
        assert (ab[1:] < ab[:-1]).all() and 0.99 < ab[0] < 1 and ab[-1] < 1e-4
    linear = beta_schedule("linear", 1000)
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    ab = NoiseSchedule(1000, "cosine").alphas_cumprod  # ᾱ(t) = f(t)/f(0), f(s) = cos²((s + 0.008)/1.008 · π/2)
    f = lambda s: torch.cos(torch.tensor((s + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2
    assert ab[499].item() == pytest.approx((f(0.5) / f(0.0)).item(), rel=1e-9)
    # improved-DDPM's space_timesteps(1000, [8]): round(i * 999 / 7)
    assert respaced_timesteps(1000, 8) == [0, 143, 285, 428, 571, 714, 856, 999]
    assert respaced_timesteps(1000, 1) == [999] and respaced_timesteps(10, 10) == list(range(10))
    with pytest.raises(ValueError, match="unknown noise schedule"):
        beta_schedule("sigmoid", 1000)
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(1000, 0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parametrisations_invert(prediction):
    """The training target of each parametrisation, read back as a network output, gives back x₀ and ε."""
    sched = NoiseSchedule(1000, "cosine")
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(64, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = sched.q_sample(x0, t, noise)
    got_x0, got_eps = sched.x0_eps(sched.target(x0, noise, t, prediction), x_t, t, prediction)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_eps, noise, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_with_an_exact_denoiser(sampler):
    """Data that is one point x*: the exact denoiser returns x* from any x_t, and both samplers must land on it
    (any step count, any temperature)."""
    sched = NoiseSchedule(1000, "cosine")
    x_star = torch.tensor([[0.3, -1.2]], dtype=torch.float64)

    def denoise(x, t):  # the exact v for x₀ = x*
        ab = sched.alpha_bar(t, x)
        eps = (x - ab.sqrt() * x_star) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x_star

    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 8, 25):
        out = sample_loop(denoise, sched, x_T, steps, "v", sampler, eta=1.0, temperature=0.7,
                          generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, x_star.expand(5, 2), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------- diffusion head on a toy target
# Two conditions, each a mixture of two equally likely Gaussians (std 0.2) placed so that every coordinate's spread
# comes mostly from the mode separation.
TOY_CONDS = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
TOY_CENTRES = torch.tensor([[[-1.0, -1.0], [1.0, 1.0]], [[1.5, -1.5], [2.5, -0.5]]])
TOY_STD = 0.2


def _toy_draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torch.randint(0, 2, (n,), generator=g)
    comp = torch.randint(0, 2, (n,), generator=g)
    return TOY_CENTRES[cls, comp] + TOY_STD * torch.randn(n, 2, generator=g), TOY_CONDS[cls]


@pytest.fixture(scope="module")
def toy_head() -> tuple[DiffusionHead, float, float]:
    """A head trained for 400 Adam steps (learning rate decayed linearly to 0, which settles the last iterate) on
    the toy mixture; (head, held-out loss before, after)."""
    torch.manual_seed(0)
    head = DiffusionHead(2, 4, width=64, depth=2, prediction="v", sampling_steps=8)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 400)
    x_eval, c_eval = _toy_draw(1024, torch.Generator().manual_seed(123))

    def held_out() -> float:
        with torch.no_grad():
            return head(x_eval, c_eval, generator=torch.Generator().manual_seed(5)).item()

    before = held_out()
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x, c = _toy_draw(256, g)
        loss = head(x, c, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return head.eval(), before, held_out()


def test_diffusion_loss_falls(toy_head):
    _, before, after = toy_head
    # untrained (output 0) the v-loss is E[v²] ≈ 1.5 here; the trained head's is about 0.5
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_diffusion_samples_match_the_target(toy_head, sampler):
    """8-step samples per condition: mean, std and mode occupancy against the mixture's.

    Tolerances: with N = 2000 the sampling error is ~0.02 on a mean and ~0.015 on a std (σ/√N, σ/√2N, σ ≤ 1);
    the rest is model error after 400 tiny steps and the bias of 8 coarse steps with a fixed variance (measured
    over three training seeds: means within 0.09, stds 4-19% low, the most for the ancestral sampler, whose
    posterior variance under-disperses at coarse steps; with 50 steps the stds are within 6%). Mean within 0.15,
    std within 25% and each mode holding 40-60% of the samples leave room for that and still fail a head that
    ignores its condition (the two conditions' means are 2.2 apart) or collapses onto one mode."""
    head, _, _ = toy_head
    for k in range(2):
        samples = head.sample(TOY_CONDS[k].expand(2000, 4), generator=torch.Generator().manual_seed(k), sampler=sampler)
        target_mean = TOY_CENTRES[k].mean(0)
        target_std = (TOY_CENTRES[k].var(0, unbiased=False) + TOY_STD**2).sqrt()
        assert (samples.mean(0) - target_mean).abs().max() < 0.15, (k, samples.mean(0), target_mean)
        assert ((samples.std(0) - target_std).abs() / target_std).max() < 0.25, (k, samples.std(0), target_std)
        nearest = (samples[:, None] - TOY_CENTRES[k][None]).norm(dim=-1).argmin(1).float().mean()
        assert 0.4 < nearest < 0.6, (k, nearest)


def test_diffusion_sampling_is_seeded(toy_head):
    head, _, _ = toy_head
    cond = TOY_CONDS[[0, 1, 1]]
    for sampler in ("ddpm", "ddim"):
        a = head.sample(cond, generator=torch.Generator().manual_seed(3), sampler=sampler, eta=0.5)
        b = head.sample(cond, generator=torch.Generator().manual_seed(3), sampler=sampler, eta=0.5)
        c = head.sample(cond, generator=torch.Generator().manual_seed(4), sampler=sampler, eta=0.5)
        assert torch.equal(a, b) and not torch.equal(a, c)
    # guidance with the same condition on both sides changes nothing; temperature 0 removes the per-step noise
    torch.testing.assert_close(head.sample(cond, cfg=2.0, uncond=cond, generator=torch.Generator().manual_seed(3)),
                               head.sample(cond, generator=torch.Generator().manual_seed(3)), rtol=0, atol=1e-5)
    cold = [head.sample(cond, temperature=0.0, generator=torch.Generator().manual_seed(s)) for s in (3, 3)]
    assert torch.equal(*cold)


def test_diffusion_head_arguments():
    with pytest.raises(ValueError, match="prediction"):
        DiffusionHead(2, 4, width=8, depth=1, prediction="score")
    with pytest.raises(ValueError, match="clip_x0"):
        DiffusionHead(2, 4, width=8, depth=1, clip_x0=-1.0)
    with pytest.raises(ValueError, match="steps"):
        DiffusionHead(2, 4, width=8, depth=1, num_timesteps=10, sampling_steps=20)
    with pytest.raises(ValueError, match="unknown sampler"):
        DiffusionHead(2, 4, width=8, depth=1).sample(torch.zeros(1, 4), sampler="euler")


# ---------------------------------------------------------------------- HART
def test_training_loss_backpropagates_everywhere():
    vae = _vae()
    model = _hart().train()
    labels, x, gt, residual = _batch(vae)
    ce, diff = model.training_loss(labels, x, gt, residual, generator=torch.Generator().manual_seed(0))
    assert ce.ndim == diff.ndim == 0 and torch.isfinite(ce) and torch.isfinite(diff)
    assert ce.item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.1)  # near-uniform at init
    (ce + diff).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # the per-scale index list and the residual as tokens are accepted too, and give the same losses
    idx = list(gt.split([pn * pn for pn in VAR_ARGS["patch_nums"]], dim=1))
    tokens = residual.flatten(2).transpose(1, 2)
    model.eval()
    with torch.no_grad():
        a = model.training_loss(labels, x, gt, residual, generator=torch.Generator().manual_seed(0))
        b = model.training_loss(labels, x, idx, tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(a), torch.stack(b))


def test_diffusion_loss_reaches_the_transformer():
    """Once the head's output depends on its condition, the diffusion loss alone trains the transformer (the
    last-scale hidden states), the token embedding and the norm: the residual is a joint prediction."""
    vae = _vae()
    model = _hart().eval()
    _randomise_diffusion_output(model)
    labels, x, gt, residual = _batch(vae)
    _, diff = model.training_loss(labels, x, gt, residual, generator=torch.Generator().manual_seed(0))
    diff.backward()
    for name in ("blocks.1.ffn.fc2.weight", "class_emb.weight", "word_embed.weight", "diff_token_embed.weight",
                 "decoder_norm.weight", "diffloss.net.res_blocks.0.mlp.fc1.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.head.weight.grad is None  # the logits are not part of the diffusion loss


def test_sample_shapes_parts_and_seed():
    vae = _vae()
    model = _hart().eval().attach_vae(vae)
    _randomise_diffusion_output(model)
    img, idx, residual = model.sample(3, labels=None, cfg=1.5, top_k=5, generator=torch.Generator().manual_seed(0),
                                      return_parts=True)
    assert img.shape == (3, 1, 8, 8) and img.min() >= 0 and img.max() <= 1
    assert [tuple(i.shape) for i in idx] == [(3, pn * pn) for pn in VAR_ARGS["patch_nums"]]
    assert residual.shape == (3, 4, 4, 4) and residual.abs().max() > 0
    with torch.no_grad():  # the image is the decoded f̂(tokens) + r
        expected = vae.fhat_to_img(vae.idx_to_fhat(idx, last_one=True) + residual).add(1).mul(0.5)
    torch.testing.assert_close(img, expected, rtol=0, atol=1e-5)
    again = model.sample(3, labels=None, cfg=1.5, top_k=5, generator=torch.Generator().manual_seed(0))
    other = model.sample(3, labels=None, cfg=1.5, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(img, again) and not torch.equal(img, other)
    for labels in (2, -1, torch.tensor([0, 4, 1])):
        out = model.sample(3, labels=labels, diffusion_steps=2, sampler="ddim",
                           generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 1, 8, 8)
    _, _, none = model.sample(2, labels=1, diffusion_steps=0, generator=torch.Generator().manual_seed(0),
                              return_parts=True)
    assert torch.equal(none, torch.zeros_like(none))


def test_without_diffusion_head_hart_is_var():
    """The shared parts are VAR's: with the head disabled HART has VAR's exact state, logits and samples; with it,
    the discrete logits still equal VAR's for the same transformer weights."""
    vae = _vae()
    plain = _hart(residual_diffusion=False)
    var = VAR(**VAR_ARGS)
    assert set(plain.state_dict()) == set(var.state_dict())
    var.load_state_dict(plain.state_dict())
    labels, x, _, _ = _batch(vae)
    full = _hart(seed=3)
    var_of_full = VAR(**VAR_ARGS)
    missing, unexpected = var_of_full.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(("diffloss.", "decoder_norm.", "diff_token_embed.")) for k in unexpected)
    for hart, reference in ((plain, var), (full, var_of_full)):
        for train in (False, True):  # in training the class-dropout draw is the same too
            hart.train(train)
            reference.train(train)
            torch.manual_seed(11)
            expected = reference(labels, x)
            torch.manual_seed(11)
            logits = hart(labels, x)
            torch.manual_seed(11)
            from_hidden = hart.get_logits(*hart.forward_hidden(labels, x))
            assert torch.equal(logits, expected) and torch.equal(from_hidden, expected)
    for hart, reference, steps in ((plain, var, None), (full, var_of_full, 0)):
        hart.eval()
        reference.eval()
        ref_img, ref_idx = reference.autoregressive_infer_cfg(4, None, g_seed=5, cfg=2.0, top_k=4, vae=vae,
                                                              return_idx=True)
        img, idx, _ = hart.sample(4, None, cfg=2.0, top_k=4, diffusion_steps=steps, vae=vae,
                                  generator=torch.Generator().manual_seed(5), return_parts=True)
        assert all(torch.equal(a, b) for a, b in zip(idx, ref_idx))
        torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-6)
    _, zero = plain.training_loss(labels, x, *_batch(vae)[2:])
    assert zero.item() == 0.0


def test_save_load_round_trip(tmp_path):
    vae = _vae()
    model = _hart().eval()
    _randomise_diffusion_output(model)
    model.save_pretrained(tmp_path / "hart")
    loaded = vitkit.from_pretrained(tmp_path / "hart").eval()
    assert type(loaded) is HART and loaded.model_args == model.model_args
    assert loaded.model_args["diff_width"] == 32 and loaded.model_args["residual_diffusion"] is True
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    batch = _batch(vae)
    with torch.no_grad():
        a = model.training_loss(*batch, generator=torch.Generator().manual_seed(0))
        b = loaded.training_loss(*batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(a), torch.stack(b))
    samples = [m.sample(2, 1, vae=vae, generator=torch.Generator().manual_seed(0)) for m in (model, loaded)]
    assert torch.equal(*samples)


def test_registered_config_fits_the_tokenizer():
    assert model_family("hart_fmnist_tiny") == "hart"
    torch.manual_seed(0)
    model = create_model("hart_fmnist_tiny").eval()
    assert isinstance(model, HART) and model.model_name == "hart_fmnist_tiny"
    assert {k: model.model_args[k] for k in VAR_FMNIST_TINY} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in VAR_FMNIST_TINY.items()}
    assert model.diffloss.net.width == HART_FMNIST_TINY["diff_width"] == 128 and len(model.diffloss.net.res_blocks) == 3
    assert len(model.pretrained_cfg["class_names"]) == 10
    vae = create_model("vqvae_fmnist_tiny").eval()
    img = model.sample(2, labels=torch.tensor([0, 7]), top_k=20, vae=vae, generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 1, 28, 28) and torch.isfinite(img).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="diffusion_batch_mul"):
        HART(**{**HART_ARGS, "diffusion_batch_mul": 0})
    with pytest.raises(ValueError, match="diff_prediction"):
        HART(**{**HART_ARGS, "diff_prediction": "score"})
    vae = _vae()
    model = _hart()
    labels, x, gt, residual = _batch(vae)
    with pytest.raises(InputShapeError, match="residual"):
        model.training_loss(labels, x, gt, residual[:, :, :2])
    with pytest.raises(InputShapeError, match="gt_idx"):
        model.training_loss(labels, x, gt[:, :-1], residual)
    with pytest.raises(InputShapeError, match="x_BLCv_wo_first_l"):
        model.training_loss(labels, x[:, :-1], gt, residual)
    with pytest.raises(ValueError, match="sampling needs the VQ-VAE"):
        model.sample(1)
    with pytest.raises(ValueError, match="does not fit"):
        model.sample(1, vae=MultiScaleVQVAE(**{**VAE_ARGS, "vocab_size": 8}))
    with pytest.raises(InputShapeError, match="labels"):
        model.sample(2, labels=torch.tensor([1, 2, 3]), vae=vae)
