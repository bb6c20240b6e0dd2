"""Closed-form refit error curves: for every kept width k of one layer, the output error that is left
when the layer keeps its k best-ranked neurons and the kept down_proj columns are refitted (pure).

For ``y = W x`` (W: hidden × intermediate) with ``H = S + λI``, ``S = E[x xᵀ]``, keeping the set K
and removing R leaves the error ``tr(W_R (H_RR - H_RK H_KK⁻¹ H_KR) W_Rᵀ)``: with ``λ = 0`` it is
``min_W' E||W x - W' x_K||²`` (the least-squares refit); with ``λ > 0`` it is the optimal-brain-surgeon
objective ``E||(W - V) x||² + λ||W - V||²`` over the V that are zero on R.

With the neurons in rank order (kept first) and ``L`` the Cholesky factor of H in that order, the
Schur complement of the first k neurons is ``L[k:, k:] L[k:, k:]ᵀ``, and since L is lower triangular
``W_R L[k:, k:] = (W_P L)[:, k:]``: the error of keeping the first k is ``Σ_{j ≥ k} ||u_j||²`` with
``u_j`` the columns of ``W_P L``. One Cholesky factor per layer gives the error at every width. With
an output metric G (e.g. the second moment of the loss gradient at the layer's output) the terms
are ``u_jᵀ G u_j``: the error measured as ``E[eᵀ G e]``.
"""

from __future__ import annotations

import torch

from calibrate.errors import GluPruneError

DEFAULT_DAMPING = 1e-3  # λ / mean diag S: the ridge the held-out choice picks for most SmolLM2 layers


def kept_order(scores: torch.Tensor) -> torch.Tensor:
    """Neurons from the most to the least important (highest score first; ties to the lower index),
    so that the first k are exactly what :func:`pruning.plan.top_k` keeps."""
    return torch.sort(-scores.double(), stable=True).indices


def error_curve(weight: torch.Tensor, second: torch.Tensor, order: torch.Tensor,
                damping: float = DEFAULT_DAMPING, metric: torch.Tensor | None = None) -> torch.Tensor:
    """``errors[k]`` for k = 0 … n (float64, length n + 1): the refit error of keeping ``order[:k]``.

    ``weight``: the down projection (hidden × n); ``second``: ``E[x xᵀ]`` of its input (n × n);
    ``damping``: λ as a fraction of ``mean diag S``; ``metric``: a hidden × hidden positive
    semi-definite matrix to measure the output error in (None: the plain squared norm).
    ``errors[n]`` is 0 and the curve never rises with k.
    """
    n = second.shape[0]
    if weight.shape[1] != n or order.numel() != n:
        raise GluPruneError(f"the down projection has {weight.shape[1]} inputs, the second moment {n} and the "
                            f"order {order.numel()}: they must agree")
    s = second.double()[order][:, order]
    ridge = damping * s.diagonal().mean().clamp_min(1e-12) if damping > 0 else 0.0
    factor, info = torch.linalg.cholesky_ex(s + ridge * torch.eye(n, dtype=torch.float64))
    if info != 0:
        raise GluPruneError("the second moment is singular: use more calibration tokens or a damping above 0")
    u = weight.double()[:, order] @ factor
    terms = u.square().sum(0) if metric is None else ((metric.double() @ u) * u).sum(0)
    suffix = terms.flip(0).cumsum(0).flip(0)
    return torch.cat([suffix, torch.zeros(1, dtype=torch.float64)])
