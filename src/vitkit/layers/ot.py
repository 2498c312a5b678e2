"""Optimal transport between word and patch features: ViLT's word-patch alignment (WPA) distance.

ViLT (Kim et al., 2021) adds to image-text matching a loss that pulls the words of a matching pair towards its
patches: the optimal-transport distance between the two token sets under the cosine cost, with the plan found by
IPOT (Xie et al., 2018, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance"). The functions
keep the names and argument order of the official ``vilt/modules/objectives.py`` so that code written against it
ports unchanged, and they reproduce its numbers (see ``tests/test_vilt.py``).

Shapes: text ``M`` tokens, image ``N`` tokens, batch ``B``. Pad masks are True where a token does NOT take part
(padding, and whatever the caller excludes, e.g. CLS and SEP). Both marginals are uniform over the valid tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cost_matrix_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cosine distance ``1 - cos(x_i, y_j)`` for every pair: (B, Lx, D), (B, Ly, D) -> (B, Lx, Ly).

    ``eps`` bounds the norm from below (``F.normalize``), so an all-zero feature gives distance 1, not NaN.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"cost_matrix_cosine expects (B, Lx, D) and (B, Ly, D), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x_norm = F.normalize(x, p=2, dim=-1, eps=eps)
    y_norm = F.normalize(y, p=2, dim=-1, eps=eps)
    return 1 - x_norm.matmul(y_norm.transpose(1, 2))


def trace(x: torch.Tensor) -> torch.Tensor:
    """Batched trace: (B, n, n) -> (B,)."""
    if x.dim() != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"trace expects a batch of square matrices (B, n, n), got {tuple(x.shape)}")
    return x.diagonal(dim1=1, dim2=2).sum(-1)


@torch.no_grad()
def ipot(C: torch.Tensor, x_len: torch.Tensor, x_pad: torch.Tensor, y_len: torch.Tensor, y_pad: torch.Tensor,
         joint_pad: torch.Tensor, beta: float, iteration: int, k: int) -> torch.Tensor:
    """The IPOT transport plan for costs ``C`` (B, M, N); returns T of shape (B, **N, M**) (image x text, as the
    official code), zero at padded pairs.

    ``x_len``/``y_len`` (B,) count the valid text/image tokens, ``x_pad`` (B, M) / ``y_pad`` (B, N) mark the
    padded ones and ``joint_pad`` (B, M, N) their union. Each of the ``iteration`` outer steps is a proximal
    point step: Q = exp(-C/beta) ⊙ T (a KL proximity term towards the previous plan), followed by ``k``
    Sinkhorn updates of the scalings δ (image side, target 1/len_img) and σ (text side, target 1/len_txt) that
    project Q onto the two marginals; then T = diag(δ) Q diag(σ). Padded positions get a 1e4 term in the
    denominators, so their scalings stay near 0 instead of dividing by zero.

    Why the official code only runs with k = 1: it reshapes σ to a column (B, M, 1) once per *outer* step, but
    the σ update ``1 / (x_len * δ @ Q + x_mask)`` returns a row (B, 1, M). The second inner step then computes
    ``Q @ σ`` with Q (B, N, M) and σ (B, 1, M), a shape error (unless M = 1). Here σ is brought back to a column
    after every inner update, which changes nothing for k = 1 (the same operations in the same order, so the
    same numbers) and makes k > 1 the textbook IPOT: more Sinkhorn steps per proximal step solve each
    sub-problem more exactly. After every update the text marginal of T is exact (σ was updated last); the
    image marginal approaches 1/len_img as k (and the number of outer steps) grows.
    """
    if k < 1 or iteration < 1:
        raise ValueError(f"ipot needs iteration >= 1 and k >= 1, got iteration={iteration}, k={k}")
    b, m, n = C.size()
    sigma = torch.ones(b, m, dtype=C.dtype, device=C.device) / x_len.unsqueeze(1)
    T = torch.ones(b, n, m, dtype=C.dtype, device=C.device)
    A = torch.exp(-C.transpose(1, 2) / beta)

    sigma = sigma.masked_fill(x_pad, 0)
    joint_pad = joint_pad.transpose(1, 2)  # (B, N, M), the plan's orientation
    T = T.masked_fill(joint_pad, 0)
    A = A.masked_fill(joint_pad, 0)

    x_len = x_len.view(b, 1, 1)
    y_len = y_len.view(b, 1, 1)
    x_mask = (x_pad.to(C.dtype) * 1e4).unsqueeze(1)  # (B, 1, M)
    y_mask = (y_pad.to(C.dtype) * 1e4).unsqueeze(1)  # (B, 1, N)

    sigma = sigma.view(b, m, 1)
    for _ in range(iteration):
        Q = A * T  # (B, N, M)
        for _ in range(k):
            delta = 1 / (y_len * Q.matmul(sigma).view(b, 1, n) + y_mask)  # (B, 1, N)
            sigma = (1 / (x_len * delta.matmul(Q) + x_mask)).view(b, m, 1)  # (B, 1, M) -> column
        T = delta.view(b, n, 1) * Q * sigma.view(b, 1, m)
    return T.masked_fill(joint_pad, 0)


def transport_plan(txt_emb: torch.Tensor, img_emb: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor,
                   beta: float = 0.5, iteration: int = 50, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine cost C (B, M, N) with padded pairs zeroed, IPOT plan T (B, N, M), computed without gradient) of
    word and patch features: (B, M, D), (B, N, D), (B, M), (B, N) pad masks."""
    cost = cost_matrix_cosine(txt_emb, img_emb)
    joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)
    cost = cost.masked_fill(joint_pad, 0)

    txt_len = (txt_pad.size(1) - txt_pad.sum(dim=1)).to(dtype=cost.dtype)
    img_len = (img_pad.size(1) - img_pad.sum(dim=1)).to(dtype=cost.dtype)
    T = ipot(cost.detach(), txt_len, txt_pad, img_len, img_pad, joint_pad, beta, iteration, k)
    return cost, T.detach()


def optimal_transport_dist(txt_emb: torch.Tensor, img_emb: torch.Tensor, txt_pad: torch.Tensor,
                           img_pad: torch.Tensor, beta: float = 0.5, iteration: int = 50, k: int = 1
                           ) -> torch.Tensor:
    """Word-patch OT distance per pair: (B, M, D), (B, N, D), (B, M), (B, N) -> (B,).

    The plan is computed without gradient (IPOT under ``no_grad``, as in ViLT); the distance trace(C T) is
    differentiable in the features through the cost C only.
    """
    cost, T = transport_plan(txt_emb, img_emb, txt_pad, img_pad, beta, iteration, k)
    return trace(cost.matmul(T))


__all__ = ["cost_matrix_cosine", "trace", "ipot", "transport_plan", "optimal_transport_dist"]
