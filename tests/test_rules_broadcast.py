"""Gradients of values broadcast over other dims: the sum over the copies is coherent over correlated
*tokens* only, never over the feature dim (``rules._seq_corr_factor``)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import sympy

from unitscale_fx.analysis import rules

B, S, D = 4, 32, 64  # a width that is a multiple of the sequence length


class _Analysis:
    """The two things ``_seq_corr_factor`` asks of the graph analysis."""

    batch_size = B

    def value_of(self, e):
        return float(sympy.sympify(e))

    def tokens_per_sample(self, shape):
        rows = math.prod(float(d) for d in list(shape)[:-1])
        return rows / B


def _factor(in_shape, out_shape, corr):
    ctx = SimpleNamespace(analysis=_Analysis())
    return float(rules._seq_corr_factor(ctx, in_shape, out_shape, corr))


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
def test_a_sum_over_token_rows_is_coherent(c):
    """A bias-like ``[D]`` broadcast over ``[B, S, D]``: its gradient sums ``B * S`` rows, coherent
    within a sample: ``sqrt(1 + (S - 1) c)`` on top of ``sqrt(B * S)``."""
    assert _factor([D], [B, S, D], c) == pytest.approx(math.sqrt(1 + (S - 1) * c), rel=1e-5)


def test_a_sum_over_the_feature_dim_is_not_a_token_sum():
    """A per-token scale ``[B, S, 1]`` (a hand-written norm's ``rsqrt(mean(x^2))``) broadcast over the
    features: its gradient sums ``D`` products within one token. With ``D`` a multiple of ``S`` the
    rule took them for correlated tokens and multiplied by ``sqrt(1 + (S - 1) c)``, which made the
    gradients inside the transformed Llama's and T5's RMSNorms read 0.2-0.6 of their prediction
    (``docs/prediction_accuracy.md``)."""
    assert _factor([B, S, 1], [B, S, D], 0.6) == 1.0
    assert _factor([B, S, 1], [B, S, D], 1.0) == 1.0


def test_a_per_feature_gain_keeps_the_token_correlation():
    """``x * w`` with a ``[D]`` parameter broadcast over the tokens: ``w`` is the same vector at every
    token, so the product keeps ``x``'s token correlation. The rule took the parameter's own Stat
    (correlation 0) and predicted 0 behind every hand-written RMSNorm of an original Llama / T5
    (their fwd p90 was 1.2 / 1.3 from it, docs/prediction_accuracy.md)."""
    import torch
    import torch.nn as nn

    import unitscale_fx
    from unitscale_fx.analysis.record import META_KEY

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(D))

        def forward(self, x):
            return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * self.w

    g = torch.Generator().manual_seed(0)
    x = math.sqrt(0.7) * torch.randn(B, 1, D, generator=g) + math.sqrt(0.3) * torch.randn(B, S, D, generator=g)
    model = Norm()
    res = unitscale_fx.analyse(model, (x,))
    out = next(n for n in res.gm.graph.nodes if n.op == "output").args[0][0]
    predicted = res.analysis.value_of(out.meta[META_KEY].fwd.corr)
    with torch.no_grad():
        y = model(x).double()
    sums = y.sum(1).pow(2).sum(-1) - y.pow(2).sum((1, 2))  # sum over token pairs i != j of <y_i, y_j>
    measured = float(sums.sum() / (B * S * (S - 1)) / y.pow(2).sum(-1).mean())
    assert measured == pytest.approx(0.7, abs=0.1)
    assert predicted == pytest.approx(measured, abs=0.05)
