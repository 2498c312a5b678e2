"""A small per-token diffusion head: MAR's "DiffLoss" as HART uses it for its residual tokens, in plain PyTorch.

Each token carries a continuous target x₀ (N, C) and a condition vector z (N, D) (for HART: the transformer's last
hidden state of that position). A few-layer MLP learns p(x₀ | z) by denoising:

    x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε,      t ~ U{0, ..., T−1},  ε ~ N(0, I)
    loss = ‖net(x_t, t, z) − target‖²     target = ε ("eps"), v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀ ("v") or x₀ ("x0")

The network (:class:`DiffusionMLP`, the official ``SimpleMLPAdaLN``): input Linear, then residual blocks
LayerNorm -> shift/scale -> Linear-SiLU-Linear -> gate, whose shift/scale/gate come from SiLU(emb(t) + Linear(z)),
then an AdaLN final layer. The modulations and the output layer start at zero, so an untrained head predicts 0.

Sampling runs a handful of steps (HART: 8) on an evenly respaced subsequence of the T training steps (the
improved-DDPM ``space_timesteps`` rule): ``"ddpm"`` = ancestral steps with the posterior ("small") or β ("large")
variance of the respaced chain, ``"ddim"`` = Song et al.'s update with ``eta`` (0 = deterministic). ``temperature``
scales the noise injected at each step (as MAR/HART do); the starting x_T is always unit Gaussian, so DDIM with
eta = 0 ignores it. Classifier-free guidance mixes the outputs for z and for an unconditional z' as
(1 + w)·out(z) − w·out(z') (VAR/HART's convention: w = 0 is no guidance); since x₀ and ε are affine in the network
output with coefficients summing to one, mixing outputs is the same as mixing ε or x₀ for every parametrisation.

Differences from the official code (mit-han-lab/hart ``hart/modules/diffusion``, itself MAR's), all deliberate:

* No learned variance: the official net outputs 2C channels (ε and an interpolation between the two fixed
  variances, trained with an extra variational-bound term); here C channels and a fixed variance.
* The default parametrisation here is v, not ε. With the cosine schedule ᾱ at the last step is ~2e-9, so turning
  a predicted ε into x₀ multiplies its error by ~2e4; the official code survives that by clipping x₀ to [−1, 1]
  (``clip_denoised``) after dividing the targets by a latent-specific 0.6. ``prediction="eps", target_scale=0.6,
  clip_x0=1.0`` reproduces that setting; v needs neither a clip nor a known range.
* Everything is CPU-friendly PyTorch; the schedule is kept in float64 and cast at use (never stored as a buffer,
  so ``.half()`` cannot round it and checkpoints do not carry it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import Mlp

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v", "x0")
SAMPLERS = ("ddpm", "ddim")
VARIANCES = ("small", "large")


# ---------------------------------------------------------------------- noise schedule
def beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """β_t (float64, length T): ``"linear"`` = Ho et al.'s 1e-4..0.02 rescaled by 1000/T, ``"cosine"`` = Nichol &
    Dhariwal's ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) discretised, each β capped at 0.999 (improved-DDPM's rules)."""
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 2:
        raise ValueError(f"num_timesteps={num_timesteps!r} must be an integer >= 2")
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` training timesteps spread evenly over [0, T−1], both ends included (improved-DDPM's
    ``space_timesteps(T, [steps])``: round(i·(T−1)/(steps−1))); one step uses T−1 alone."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps!r} must be an integer in [1, {num_timesteps}]")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


class NoiseSchedule:
    """The forward process q(x_t | x₀) of a DDPM with T steps, and the conversions between parametrisations."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine") -> None:
        self.num_timesteps, self.schedule = num_timesteps, schedule
        self.betas = beta_schedule(schedule, num_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # float64, ᾱ_t for t = 0 .. T−1

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (N, 1, ...) to broadcast against ``like`` (N, ...), in its dtype and device."""
        out = values[t.cpu()].to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._coef(self.alphas_cumprod, t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What the network is trained to output at x_t for the given parametrisation."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        if prediction == "v":
            ab = self.alpha_bar(t, x0)
            return ab.sqrt() * noise - (1 - ab).sqrt() * x0
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")

    def x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x₀, ε) implied by the network output ``out`` at x_t."""
        ab = self.alpha_bar(t, x_t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if prediction == "eps":
            return (x_t - s * out) / a, out
        if prediction == "x0":
            return out, (x_t - a * out) / s
        if prediction == "v":
            return a * x_t - s * out, s * x_t + a * out
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


@torch.no_grad()
def sample_loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                x_T: torch.Tensor, steps: int, prediction: str = "v", sampler: str = "ddpm", eta: float = 0.0,
                temperature: float = 1.0, clip_x0: float | None = None, variance: str = "small",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the reverse process from ``x_T`` over ``steps`` respaced timesteps; ``denoise(x_t, t)`` returns the
    network output (t: (N,) int64 training timesteps). Returns x₀."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    timesteps = respaced_timesteps(schedule.num_timesteps, steps)
    x = x_T
    N = x.shape[0]
    for i in reversed(range(len(timesteps))):
        t = torch.full((N,), timesteps[i], dtype=torch.long, device=x.device)
        ab_t = schedule.alphas_cumprod[timesteps[i]].item()
        ab_prev = schedule.alphas_cumprod[timesteps[i - 1]].item() if i > 0 else 1.0
        x0, eps = schedule.x0_eps(denoise(x, t), x, t, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        if sampler == "ddim":
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        else:  # the posterior q(x_prev | x_t, x₀) of the respaced chain
            alpha = ab_t / ab_prev
            beta = 1 - alpha
            x = (beta * math.sqrt(ab_prev) / (1 - ab_t)) * x0 + ((1 - ab_prev) * math.sqrt(alpha) / (1 - ab_t)) * x
            sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab_t) if variance == "small" else beta)
        if i > 0 and sigma > 0 and temperature > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + (sigma * temperature) * noise
    return x


# ---------------------------------------------------------------------- the denoiser
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of (possibly fractional) timesteps: [cos(t·f), sin(t·f)],
    f_i = max_period^(−i/half) (GLIDE/DiT's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """Timestep -> vector: the sinusoidal features through Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class AdaLNResBlock(nn.Module):
    """x + gate ⊙ MLP(LayerNorm(x)·(1 + scale) + shift), with (shift, scale, gate) = Linear(SiLU(y))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = Mlp(channels, channels, act="silu")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by y, then Linear to the output channels."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """net(x_t (N, C), t (N,), z (N, D)) -> (N, C): residual AdaLN MLP blocks conditioned on emb(t) + Linear(z)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_dim: int, depth: int) -> None:
        super().__init__()
        self.in_channels, self.width, self.out_channels, self.depth = in_channels, width, out_channels, depth
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([AdaLNResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official (DiT) scheme: Xavier-uniform Linears with zero bias, N(0, 0.02) time MLP, and zero
        modulations and output layer so that every block starts as the identity and the output as 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(z)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


# ---------------------------------------------------------------------- loss + sampler
class DiffusionHead(nn.Module):
    """Per-token conditional diffusion: ``head(target (N, C), cond (N, D)) -> loss``, ``head.sample(cond)``.

    ``target_scale``: targets are divided by it before diffusing (and samples multiplied back), to bring them
    to roughly unit scale (the official uses 0.6 for its latents). ``clip_x0``: clamp predicted x₀ to ±clip_x0
    (in scaled units) while sampling, None = no clamp.
    """

    def __init__(self, target_channels: int, cond_dim: int, width: int = 1024, depth: int = 6,
                 num_timesteps: int = 1000, schedule: str = "cosine", prediction: str = "v",
                 sampling_steps: int = 8, sampler: str = "ddpm", target_scale: float = 1.0,
                 clip_x0: float | None = None, variance: str = "small") -> None:
        super().__init__()
        sizes = dict(target_channels=target_channels, cond_dim=cond_dim, width=width, depth=depth)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if prediction not in PREDICTIONS:
            bad.append(f"prediction={prediction!r} (one of {PREDICTIONS})")
        if sampler not in SAMPLERS:
            bad.append(f"sampler={sampler!r} (one of {SAMPLERS})")
        if variance not in VARIANCES:
            bad.append(f"variance={variance!r} (one of {VARIANCES})")
        if not (isinstance(target_scale, (int, float)) and target_scale > 0):
            bad.append(f"target_scale={target_scale!r} (must be > 0)")
        if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and clip_x0 > 0):
            bad.append(f"clip_x0={clip_x0!r} (must be > 0 or None)")
        if bad:
            raise ValueError("invalid DiffusionHead argument(s): " + ", ".join(bad))
        self.schedule = NoiseSchedule(num_timesteps, schedule)  # validates schedule and T
        respaced_timesteps(num_timesteps, sampling_steps)  # validates the default step count
        self.in_channels = target_channels
        self.prediction, self.sampling_steps, self.sampler = prediction, sampling_steps, sampler
        self.target_scale, self.clip_x0, self.variance = float(target_scale), clip_x0, variance
        self.net = DiffusionMLP(target_channels, width, target_channels, cond_dim, depth)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def forward(self, target: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean denoising loss over tokens (weighted by ``mask`` (N,) if given): one random timestep and noise
        per token, MSE between the network output and the parametrisation's target."""
        x0 = target / self.target_scale
        N = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (N,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        out = self.net(self.schedule.q_sample(x0, t, noise), t, cond)
        loss = (out - self.schedule.target(x0, noise, t, self.prediction)).square().mean(dim=-1)
        if mask is not None:
            return (loss * mask).sum() / mask.sum().clamp_min(1)
        return loss.mean()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int | None = None, temperature: float = 1.0, cfg: float = 0.0,
               uncond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               sampler: str | None = None, eta: float = 0.0) -> torch.Tensor:
        """Targets (N, C) for conditions ``cond`` (N, D), with ``steps`` (default ``sampling_steps``) reverse steps.

        Guidance: with ``uncond`` (N, D) and ``cfg`` != 0 the output is (1 + cfg)·out(cond) − cfg·out(uncond).
        """
        if uncond is not None and uncond.shape != cond.shape:
            raise ValueError(f"uncond {tuple(uncond.shape)} must match cond {tuple(cond.shape)}")
        guided = uncond is not None and cfg != 0

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.net(x, t, cond)
            out_c, out_u = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
            return (1 + cfg) * out_c - cfg * out_u

        weight = self.net.input_proj.weight
        x_T = torch.randn(cond.shape[0], self.in_channels, generator=generator, device=weight.device,
                          dtype=weight.dtype)
        x0 = sample_loop(denoise, self.schedule, x_T, self.sampling_steps if steps is None else steps,
                         self.prediction, sampler or self.sampler, eta, temperature, self.clip_x0, self.variance,
                         generator)
        return x0 * self.target_scale
