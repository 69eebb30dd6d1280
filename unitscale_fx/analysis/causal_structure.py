"""Position structure that causal attention leaves in the token covariance.

A causal attention output is close to a running mean of the values, ``out_i ~ mean_{j <= i} v_j``: the
first positions enter every later one and the variance falls with the position (for independent values
the covariance is ``1 / (max(i, j) + 1)``). That structure survives projections and residual adds, and
the next causal attention, averaging it again, keeps far more of it than an exchangeable correlation of
the same average would. One correlation number cannot carry it.

So for the tensors downstream of a causal attention the analysis also carries the token covariance
itself, numerically at the hinted sequence length: ``K[i, j] = E<x_i, x_j> / mean_i E|x_i|^2`` (an
``S x S`` float32 matrix, mean diagonal 1; ``GraphAnalysis.tokcov``, dropped when the forward analysis
ends). Causal attention creates it,
token-wise ops pass it on (by reference), adds mix it by energy, per-token normalisations rescale it,
elementwise functions and products transform it (``GraphAnalysis._propagate_tokcov``). The causal
attention rule uses the values' covariance for the part of its output energy the closed forms take
from an exchangeable correlation (:func:`structure_correction`). Lengths above :data:`MAX_LEN` are not
tracked (the closed forms alone are used). docs/prediction_accuracy.md has the measurements behind it.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["MAX_LEN", "exchangeable", "normalize_rows", "causal_output", "corr_of", "structure_correction", "with_average_corr"]

#: the longest sequence whose token covariance is carried (S x S float32: 4 MB at 1024)
MAX_LEN = 1024
#: precision of the carried covariances (sums of S^2 terms of similar size: float32 is ample)
DTYPE = torch.float32


def exchangeable(c: float, s: int) -> torch.Tensor:
    """The covariance of an exchangeable correlation ``c`` (unit variance at every position)."""
    k = torch.full((s, s), float(c), dtype=DTYPE)
    k.fill_diagonal_(1.0)
    return k


def normalize_mean_diag(k: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(k).mean()
    return k / d if float(d) > 0 else k


def normalize_rows(k: torch.Tensor) -> torch.Tensor:
    """Each position scaled to unit variance (a per-token normalisation: LayerNorm, RMSNorm)."""
    d = torch.diagonal(k).clamp_min(1e-300).sqrt()
    return (k / d.unsqueeze(0)).div_(d.unsqueeze(1))


def corr_of(k: torch.Tensor) -> float:
    """Average correlation of two different positions (the analysis' ``corr``)."""
    s = k.shape[0]
    if s < 2:
        return 0.0
    diag = torch.diagonal(k)
    return float((k.sum() - diag.sum()) / (s * (s - 1)) / diag.mean())


def with_average_corr(k: torch.Tensor, c: float) -> torch.Tensor:
    """``k`` (mean diagonal 1) plus the exchangeable component that makes its average pair correlation
    ``c``: the analysis' ``corr`` also carries shared parts (biases, means) that the covariance's own
    propagation approximates; the position structure is what the covariance adds."""
    s = k.shape[0]
    shift = c - corr_of(k)
    out = k + shift
    out.diagonal().sub_(shift)
    return out


def causal_output(k: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Covariance of ``out_i = sum_{j <= i} p_ij x_j`` for exchangeable weights with ``E sum_j p_ij^2 = f[i]``.

    Position ``i`` averages ``n = i + 1`` keys: ``E|out_i|^2 = f_i dbar_i + (1 - f_i) obar_i`` (diagonal and
    off-diagonal means of ``K`` over its keys); two positions: the running means' covariance ``M K M^T``,
    i.e. ``C[i, j] / (n_i n_j)`` with ``C`` the two-dimensional prefix sum of ``K``. Normalised to mean
    diagonal 1.
    """
    s = k.shape[0]
    n = torch.arange(1, s + 1, dtype=k.dtype)
    f = f.to(k.dtype)
    out = torch.cumsum(k, 0).cumsum_(1)  # C[i, j] = sum_{i' <= i, j' <= j} K[i', j']
    tot = torch.diagonal(out).clone()  # sum over the first i + 1 positions, pairs included
    dia = torch.cumsum(torch.diagonal(k), 0)
    dbar = dia / n
    obar = torch.where(n > 1, (tot - dia) / (n * (n - 1)).clamp_min(1.0), torch.zeros_like(n))
    out.div_(n.unsqueeze(1)).div_(n.unsqueeze(0))
    out.diagonal().copy_(f * dbar + (1 - f) * obar)
    return out


def structure_correction(k_v: torch.Tensor, c_v: float, f: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """What the values' position structure changes in a causal attention output.

    Returns ``(d_ms, d_corr, k_out)``: the output's mean square (in units of the values' mean square)
    and correlation minus what an exchangeable correlation ``c_v`` gives, and the output's covariance.
    """
    k_out = causal_output(k_v, f)
    ms_exch, corr_exch = _exchangeable_output(c_v, f)
    return float(torch.diagonal(k_out).mean()) - ms_exch, corr_of(k_out) - corr_exch, normalize_mean_diag(k_out)


def _exchangeable_output(c: float, f: torch.Tensor) -> tuple[float, float]:
    """:func:`causal_output` of :func:`exchangeable` ``c`` in closed form: mean square and correlation.

    Diagonal ``f_i + (1 - f_i) c`` (``f_0`` at the first position: one key, no pairs); positions ``i < i'``:
    ``c + (1 - c) / (i' + 1)``, whose sum over the ordered pairs is ``c S (S - 1) + 2 (1 - c) (S - H_S)``.
    """
    s = f.shape[0]
    f = f.to(torch.float64)
    diag = f + (1 - f) * c
    diag[0] = f[0]
    ms = float(diag.mean())
    if s < 2:
        return ms, 0.0
    h = sum(1.0 / m for m in range(1, s + 1))
    pair = c + (1 - c) * 2 * (s - h) / (s * (s - 1))
    return ms, pair / ms
