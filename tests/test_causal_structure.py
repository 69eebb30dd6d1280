"""Token covariance left by causal attention (unitscale_fx.analysis.causal_structure) and its use in the
analysis: a running mean's structure survives projections, residual adds and norms, and the next causal
attention keeps much more of it than an exchangeable correlation of the same average would."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
from unitscale_fx.analysis import causal_structure as cs
from unitscale_fx.analysis.record import META_KEY

S = 64


def test_uniform_causal_weights_on_independent_tokens_give_the_running_mean_kernel():
    f = 1.0 / torch.arange(1, S + 1, dtype=torch.float64)  # E sum p^2 = 1/n: uniform weights
    out = cs.causal_output(cs.exchangeable(0.0, S), f)
    i = torch.arange(S, dtype=torch.float64)
    k1 = 1.0 / (torch.maximum(i.unsqueeze(0), i.unsqueeze(1)) + 1.0)
    torch.testing.assert_close(out, k1.to(out.dtype))
    assert float(torch.diagonal(out).mean()) == pytest.approx(sum(1 / n for n in range(1, S + 1)) / S)


def test_exchangeable_values_need_no_correction():
    f = torch.full((S,), 0.2, dtype=torch.float64)
    d_ms, d_corr, k = cs.structure_correction(cs.exchangeable(0.3, S), 0.3, f)
    assert d_ms == pytest.approx(0.0, abs=1e-6) and d_corr == pytest.approx(0.0, abs=1e-6)  # float32 kernels
    assert float(torch.diagonal(k).mean()) == pytest.approx(1.0)


def test_causal_output_matches_monte_carlo_for_structured_values():
    """Exchangeable random weights (a softmax of i.i.d. logits) over values with a running-mean
    covariance: the predicted output energy against a simulation."""
    g = torch.Generator().manual_seed(0)
    n_s, d = 400, 16
    u = torch.randn(n_s, S, d, generator=g, dtype=torch.float64)
    x = torch.cumsum(u, 1) / torch.arange(1, S + 1, dtype=torch.float64).view(1, S, 1)
    x = x + 0.3 * torch.randn(n_s, S, d, generator=g, dtype=torch.float64)
    k = torch.einsum("sid,sjd->ij", x, x) / (n_s * d)
    k = k / torch.diagonal(k).mean()
    logits = torch.randn(n_s, S, S, generator=g, dtype=torch.float64)
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    out = p @ x
    measured = float(out.pow(2).mean() / x.pow(2).mean())
    f = (p.pow(2).sum(-1)).mean(0)  # E sum_j p_ij^2 per position
    predicted = float(torch.diagonal(cs.causal_output(k, f)).mean())
    assert predicted == pytest.approx(measured, rel=0.05)
    # an exchangeable correlation of the same average misses most of it
    exch = float(torch.diagonal(cs.causal_output(cs.exchangeable(cs.corr_of(k), S), f)).mean())
    assert exch < 0.8 * measured


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        for lin in (self.qkv, self.o):
            nn.init.normal_(lin.weight, std=0.02)  # near-uniform attention, as at a standard init

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        return x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))


class _Stack(nn.Module):
    def __init__(self, d: int = 64, depth: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(d) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


def test_second_causal_attention_output_is_predicted_with_the_structure():
    """Three pre-norm causal attention blocks at a standard (0.02) init: the second and third
    attentions average values carrying the first one's running mean. Predicted within 0.15 (log2)."""
    torch.manual_seed(0)
    model = _Stack()
    x = 0.02 * torch.randn(8, S, 64)
    res = unitscale_fx.analyse(model, (x,))
    sdpa = [n for n in res.gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 3
    outs, captured = [], []
    orig = F.scaled_dot_product_attention

    def spy(*a, **k):
        out = orig(*a, **k)
        captured.append(out.detach())
        return out

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        F.scaled_dot_product_attention = orig
    for node, out in zip(sdpa, captured):
        pred = res.analysis.value_of(node.meta[META_KEY].fwd.rms)
        meas = float(out.pow(2).mean().sqrt())
        outs.append(math.log2(meas / pred))
    assert all(abs(e) < 0.15 for e in outs), outs


@pytest.mark.parametrize("c", [0.0, 0.35, 0.9])
def test_exchangeable_output_closed_form(c):
    f = torch.linspace(1.0, 0.05, S, dtype=torch.float64)
    ex = torch.full((S, S), c, dtype=torch.float64)
    ex.fill_diagonal_(1.0)
    k = cs.causal_output(ex, f)
    ms, corr = cs._exchangeable_output(c, f)
    assert ms == pytest.approx(float(torch.diagonal(k).mean()), rel=1e-12)
    assert corr == pytest.approx(cs.corr_of(k), rel=1e-10)


def test_covariances_of_two_sequence_lengths_do_not_meet():
    """An add of two tensors carrying covariances of different lengths (prefix and full sequence of
    causal attentions) keeps ``corr`` alone instead of failing."""

    class TwoLengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 48, bias=False)

        def forward(self, x):
            q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 1, 16).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, 1, S, 16]
            h = S // 2
            b = F.scaled_dot_product_attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], is_causal=True)
            return (a[:, :, :h] + b).sum()

    model = TwoLengths()
    res = unitscale_fx.analyse(model, (torch.randn(2, S, 16),))
    add = next(n for n in res.gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    assert add.meta[META_KEY].fwd is not None
