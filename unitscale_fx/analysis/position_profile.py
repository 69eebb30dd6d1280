"""Where along the sequence a tensor's energy sits: per-position energy profiles.

The closed-form rules describe a tensor by its RMS over *all* elements. That is enough where every
position carries the same share of the energy, and misleading where one does not:

* **forward**: a classification token (ViT's CLS, concatenated in front of the patches) or the first
  positions of a causal running mean can have a very different norm from the rest. A per-token
  normalisation divides each position by its own RMS, so its backward scales the gradient at a
  position by ``1 / sigma_i``: what counts is ``mean_i E|g_i|^2 / sigma_i^2``, not
  ``mean_i E|g_i|^2 / mean_i sigma_i^2``.
* **backward**: a loss read from one position (``hidden[:, 0]``: the CLS token) puts the whole gradient
  on that position. Through the residual stream it stays there, each norm's backward dividing it by
  that position's (small) RMS.

A *profile* is a float64 vector over the positions of one sequence, ``p_i = E|x_i|^2 / mean_j E|x_j|^2``
(mean 1), at the hinted length. The forward one is the diagonal of the token covariance
(``GraphAnalysis.tokdiag``, analysis/causal_structure.py); the backward one is the gradient's
(``GraphAnalysis.gradprof``): born where a value is read at some positions only (``select`` / ``slice``
of the token dimension), passed on by the ops that act on each position alone (views, elementwise
ops, matmuls with a weight, adds), split at concatenations along the tokens, mixed by energy where
gradient contributions meet, and divided by the forward profile at norms. Attention's key and value
gradients gather from every query: their profile is taken as flat.

Profiles are numbers at the hinted length, like ``corr``: a constant factor on the closed forms.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["normalized", "concentrated", "sliced", "pieces", "mix", "norm_backward", "causal_attention"]

DTYPE = torch.float64


def normalized(p: torch.Tensor | None) -> torch.Tensor | None:
    """``p`` scaled to mean 1; None (flat) when it has no energy or is not finite."""
    if p is None or p.numel() == 0:
        return None
    m = float(p.mean())
    if not (m > 0 and math.isfinite(m)):
        return None
    return p.to(DTYPE) / m


def concentrated(length: int, index: int) -> torch.Tensor:
    """All the energy at one position (the gradient of ``x.select(token_dim, index)``)."""
    p = torch.zeros(length, dtype=DTYPE)
    p[index] = float(length)
    return p


def sliced(length: int, start: int, end: int, step: int, inner: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of ``x[start:end:step]`` along the tokens, ``inner`` the profile of the slice's own."""
    p = torch.zeros(length, dtype=DTYPE)
    idx = torch.arange(length)[start:end:step]
    if idx.numel() == 0:
        return None
    if inner is not None and inner.numel() == idx.numel():
        p[idx] = inner.to(DTYPE)
    else:
        p[idx] = 1.0
    return normalized(p)


def pieces(p: torch.Tensor | None, lengths: Sequence[int]) -> list[torch.Tensor | None]:
    """The profiles of the pieces of a concatenation along the tokens (None: flat)."""
    if p is None or sum(lengths) != p.numel():
        return [None] * len(lengths)
    out, at = [], 0
    for n in lengths:
        out.append(normalized(p[at : at + n]) if n > 1 else None)
        at += n
    return out


def mix(parts: Sequence[tuple[float | None, torch.Tensor | None]]) -> torch.Tensor | None:
    """The profile of a sum of independent contributions ``(energy, profile)`` (None profile: flat)."""
    if not parts or all(p is None for _, p in parts):
        return None
    sizes = {p.numel() for _, p in parts if p is not None}
    if len(sizes) != 1 or any(e is None or not math.isfinite(e) or e < 0 for e, _ in parts):
        return None
    n = sizes.pop()
    total = torch.zeros(n, dtype=DTYPE)
    for e, p in parts:
        total += e * (p if p is not None else 1.0)
    return normalized(total)


def norm_backward(p: torch.Tensor | None, k: torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
    """A per-position normalisation's backward: ``(factor, profile)``.

    ``factor`` multiplies the closed form's ``g / sigma`` (sigma the RMS over all positions): it is
    ``sqrt(mean_i p_i / k_i)``, ``p`` the gradient's profile and ``k`` the input's (both mean 1). The
    gradient's profile becomes ``p / k``. 1 and ``p`` when either is unknown or their lengths differ.
    """
    if k is None or (p is not None and p.numel() != k.numel()):
        return 1.0, p
    pk = (p if p is not None else torch.ones_like(k)) / k.clamp_min(1e-12)
    f = float(pk.mean())
    if not (f > 0 and math.isfinite(f)):
        return 1.0, p
    return math.sqrt(f), pk / f


def causal_attention(f: torch.Tensor, e: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The profiles of a causal attention's query, key and value gradients.

    ``f_i = E sum_j p_ij^2`` over the ``i + 1`` keys of query ``i`` (exchangeable weights), ``e`` the output
    gradient's profile (None: flat). ``E|dq_i|^2 ~ f_i (1 - f_i) e_i`` (0 at the first position: a softmax
    over one key is constant); ``E|dv_j|^2 ~ sum_{i >= j} f_i / (i + 1) e_i`` and
    ``E|dk_j|^2 ~ sum_{i >= j} f_i (1 - f_i) / (i + 1) e_i``: the first keys are read by every query.
    """
    n = f.numel()
    f = f.to(DTYPE)
    e = e.to(DTYPE) if e is not None and e.numel() == n else torch.ones(n, dtype=DTYPE)
    keys = torch.arange(1, n + 1, dtype=DTYPE)

    def suffix_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(torch.cumsum(torch.flip(x, [0]), 0), [0])

    q = normalized(f * (1 - f) * e)
    k = normalized(suffix_sum(f * (1 - f) / keys * e))
    v = normalized(suffix_sum(f / keys * e))
    return q, k, v
