"""Hand-written attention left unfused (soft-capped or disentangled logits, or ``fuse_attention=False``;
ALiBi through ``baddbmm`` is fused by default): the analysis reads its masks and constant biases, and the
transform makes every matmul operand unit-scaled, probabilities included.

Expected values come from measurement (``track.measure_graph``, the probe), never from the analysis.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import unitscale_fx
from unitscale_fx import Config
from unitscale_fx.analysis.record import META_KEY
from unitscale_fx.probe import measure_step
from unitscale_fx.track import measure_graph

EAGER = Config(compile=False)
B, S, D, H = 4, 64, 64, 4


def _alibi(seq: int, heads: int) -> torch.Tensor:
    slopes = torch.tensor([2.0 ** -h for h in range(heads)])  # steeper than BLOOM's, for a clear effect
    return (slopes[:, None] * torch.arange(seq)[None, :]).repeat(B, 1).unsqueeze(1)  # [B*H, 1, S]


class _Attention(nn.Module):
    """``mask``: "masked_fill" | "additive"; ``bias``: "none" | "alibi"; ``v_bias``: projection biases."""

    def __init__(self, mask: str = "masked_fill", bias: str = "none", logit_div: float | None = None):
        super().__init__()
        self.mask, self.bias, self.logit_div = mask, bias, logit_div
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)
        self.register_buffer("alibi", _alibi(S, H), persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, H, -1).transpose(1, 2).reshape(b * H, s, -1) for t in self.qkv(x).chunk(3, -1))
        d = q.shape[-1]
        if self.bias == "alibi":
            logits = torch.baddbmm(self.alibi[: b * H, :, :s], q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(d))
        elif self.logit_div is not None:  # DeBERTa: q @ (k^T / sqrt(d * 3))
            logits = torch.bmm(q, k.transpose(1, 2) / self.logit_div)
        else:
            logits = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        if self.mask == "additive":
            logits = logits + torch.zeros(s, s).masked_fill(causal, torch.finfo(torch.float32).min)
        else:
            logits = logits.masked_fill(causal, float("-inf"))
        a = torch.softmax(logits, -1) @ v
        return self.o(a.reshape(b, H, s, d).transpose(1, 2).reshape(b, s, -1))


def _softmax_prediction(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(predicted, measured) RMS of the softmax output of the original model."""
    res = unitscale_fx.analyse(model, (x,))
    (node,) = [n for n in res.gm.graph.nodes if getattr(n.target, "overloadpacket", None) is torch.ops.aten.softmax]
    meas = measure_graph(res.gm, (x,), {})
    return res.analysis.value_of(node.meta[META_KEY].fwd.rms), meas[node.name].fwd


@pytest.mark.parametrize("mask", ["masked_fill", "additive"])
def test_softmax_rule_reads_additive_masks(mask):
    """``logits + mask`` (values the dtype's lowest, as eager HF attention and Gemma 2 write it) is a
    causal mask like ``masked_fill(-inf)``: the probabilities' RMS is predicted from the logits'
    own statistics and the allowed keys, not from the mask's huge values."""
    torch.manual_seed(0)
    model = _Attention(mask=mask)
    nn.init.normal_(model.qkv.weight, std=1 / math.sqrt(D))
    pred, meas = _softmax_prediction(model, torch.randn(B, S, D))
    assert abs(math.log2(meas / pred)) < 0.15, (pred, meas)


def test_softmax_rule_includes_a_constant_logit_bias():
    """ALiBi adds a constant (position) bias to the logits: with steep slopes the weights
    concentrate near the diagonal, which a logit variance alone cannot predict."""
    torch.manual_seed(0)
    model = _Attention(bias="alibi")
    pred, meas = _softmax_prediction(model, torch.randn(B, S, D))
    uniform_causal = math.sqrt(sum(1 / n for n in range(1, S + 1)) / S / S)
    assert meas > 1.5 * uniform_causal  # the bias matters here
    assert abs(math.log2(meas / pred)) < 0.15, (pred, meas)


@pytest.mark.parametrize("kind,fuse", [("alibi", False), ("alibi", True), ("logit_div", True)])
def test_unfused_attention_operands_are_unit_scaled(kind, fuse):
    """After the transform every matmul operand - probabilities, and ``k^T / scale`` - has RMS in
    [1/2, 2] forward and backward, and so does every parameter gradient (biases included: the value
    gradients of a local ALiBi attention are correlated across keys). Fused, ALiBi becomes SDPA with
    the bias in a float mask, and the SDPA rule folds the bias' concentration into the logit scale."""
    torch.manual_seed(0)
    model = _Attention(bias="alibi") if kind == "alibi" else _Attention(logit_div=math.sqrt(3 * D // H))
    x = torch.randn(B, S, D)
    m = unitscale_fx.transform(model, example_inputs=(x,), config=EAGER.replace(fuse_attention=fuse))
    fused = m.result.state.counts.get("fuse_attention", {}).get("fused", 0)
    assert fused == (1 if kind == "alibi" and fuse else 0)
    loss_fn = lambda out: (out * torch.randn_like(out)).sum()  # noqa: E731
    res = measure_step(m, (x,), loss_fn=loss_fn)
    assert res.fraction_in_band("forward") == 1.0, res.out_of_band("forward")
    assert res.fraction_in_band("backward") == 1.0, res.out_of_band("backward")
    assert res.fraction_in_band("grads") == 1.0, res.out_of_band("grads")
    counts = m.result.state.counts["unit_scale_forward"]
    assert counts["attention"] == 1
    assert counts["compensate"] == (1 if kind == "logit_div" else 0)


def test_activation_matmul_compensation_keeps_the_softmax_temperature():
    """``q @ (k^T / c)``: both operands are made unit and the product is multiplied back, so the
    logits keep the model's temperature - RMS ``sqrt(d) / c`` for unit q and k (measured)."""
    torch.manual_seed(0)
    c = math.sqrt(3 * D // H)
    x = torch.randn(B, S, D)
    m = unitscale_fx.transform(_Attention(logit_div=c), example_inputs=(x,), config=EAGER)
    m(x)
    gm = m.result.gm
    (softmax,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is torch.ops.aten.softmax]
    logits = softmax.args[0].args[0]  # masked_fill(logits, ...)
    meas = measure_graph(gm, (x,), {}, loss_fn=lambda out: (out * torch.randn_like(out)).sum())
    assert meas[logits.name].fwd == pytest.approx(math.sqrt(D // H) / c, rel=0.1)


class _RawLogits(nn.Module):
    def forward(self, q, k):
        logits = q @ k.transpose(-1, -2)
        logits = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(logits, -1) @ k


@pytest.mark.parametrize("logit_std", [1.0, 3.0, 8.0])
def test_softmax_prediction_beyond_the_fitted_logit_variance(logit_std):
    """The closed forms are fitted for logit variances up to 4; past it (an untransformed model with
    large logits) the softmax moments are sampled, and the prediction stays right."""
    torch.manual_seed(0)
    q = (torch.randn(B, S, 16) * logit_std / 4).requires_grad_()
    k = torch.randn(B, S, 16).requires_grad_()
    res = unitscale_fx.analyse(_RawLogits(), (q, k))
    (node,) = [n for n in res.gm.graph.nodes if getattr(n.target, "overloadpacket", None) is torch.ops.aten.softmax]
    pred = res.analysis.value_of(node.meta[META_KEY].fwd.rms)
    meas = measure_graph(res.gm, (q, k), {})[node.name].fwd
    assert abs(math.log2(meas / pred)) < 0.15, (pred, meas)


def test_fused_alibi_attention_output_is_predicted():
    """Fused, the ALiBi bias sits in SDPA's float mask; the SDPA rule folds the concentration the bias
    gives the weights into the logit scale, so the output RMS (before its unit-scaling multiply)
    matches the measurement (without the fold: 0.62 of the measured value here)."""
    torch.manual_seed(0)
    x = torch.randn(B, S, D)
    m = unitscale_fx.transform(_Attention(bias="alibi"), example_inputs=(x,), config=EAGER)
    m(x)
    res = m.result
    (node,) = [n for n in res.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    meas = measure_graph(res.gm, (x,), {}, loss_fn=lambda out: (out * torch.randn_like(out)).sum())
    pred = res.analysis.value_of(node.meta[META_KEY].fwd.rms)
    assert abs(math.log2(meas[node.name].fwd / pred)) < 0.15, (pred, meas[node.name].fwd)
