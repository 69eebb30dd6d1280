"""The attention-fusion pass alone: what it fires on, what it must not fire on, and equivalence."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unitscale_fx import Config
from unitscale_fx.api import _bind
from unitscale_fx.capture import capture
from unitscale_fx.passes.base import PassManager, TransformState
from unitscale_fx.passes.canonicalize import ModeAwareOps
from unitscale_fx.passes.fuse_attention import FuseAttention

aten = torch.ops.aten


class Attn(nn.Module):
    """Hand-written attention with switchable variants."""

    def __init__(self, d=32, heads=2, seq=32, variant="causal_masked_fill"):
        super().__init__()
        self.h, self.variant = heads, variant
        self.qkv = nn.Linear(d, 3 * d)
        self.bias_param = nn.Parameter(torch.zeros(heads, seq, seq))
        self.register_buffer("tril", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.variant == "causal_masked_fill":
            att = att.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
        elif self.variant == "divide_no_mask":
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        elif self.variant == "softcap":
            att = torch.tanh(att / 30.0) * 30.0
        elif self.variant == "learned_bias":
            att = att + self.bias_param[:, :T, :T]
        elif self.variant == "float_upcast":
            att = att.float()
        p = F.softmax(att, dim=-1)
        if self.variant == "float_upcast":
            p = p.to(x.dtype)
        y = p @ v
        out = y.transpose(1, 2).contiguous().view(B, T, C)
        if self.variant == "return_weights":
            return out, p
        return out


def _fuse(model, x):
    cap = capture(model, (x,), {})
    gm = cap.gm
    _bind(gm, model)
    state = TransformState(capture=cap, config=Config(compile=False), hints=dict(cap.hints))
    ref = torch.fx.GraphModule(gm, gm.graph)  # noqa: F841  (same graph object before the pass)
    gm = PassManager([ModeAwareOps(), FuseAttention()])(gm, state)
    return gm, state.counts.get("fuse_attention", {})


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.scaled_dot_product_attention.default,)
            or getattr(n.target, "__name__", "") == "attention"]


def _assert_same_function(model, gm):
    """Same function, forward and gradients, at the example shape and at another sequence length."""
    for T in (16, 8):
        xi = torch.randn(2, T, 32, requires_grad=True)
        ref = model(xi)
        got = gm(xi)
        got = got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        g_ref = torch.autograd.grad(ref.sum(), [xi, model.qkv.weight])
        g_got = torch.autograd.grad(got.sum(), [xi, model.qkv.weight])
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,causal", [("causal_masked_fill", True), ("divide_no_mask", False),
                                            ("float_upcast", False)])
def test_fires_and_computes_the_same_function(variant, causal):
    torch.manual_seed(0)
    model = Attn(variant=variant)
    x = torch.randn(2, 16, 32, requires_grad=True)
    gm, counts = _fuse(model, x)
    nodes = _sdpa_nodes(gm)
    assert counts.get("fused") == 1 and len(nodes) == 1
    assert bool(nodes[0].kwargs.get("is_causal")) is causal
    assert not [n for n in gm.graph.nodes if "softmax" in str(n.target)]
    _assert_same_function(model, gm)


@pytest.mark.parametrize("variant", ["softcap", "learned_bias", "return_weights"])
def test_must_not_fire(variant):
    model = Attn(variant=variant)
    gm, counts = _fuse(model, torch.randn(2, 16, 32))
    assert counts.get("fused", 0) == 0
    assert not _sdpa_nodes(gm)
    assert [n for n in gm.graph.nodes if "softmax" in str(n.target)]


class AlibiAttn(nn.Module):
    """BLOOM's layout: ``alibi.baddbmm(q, k^T)`` on ``[B*H, S, d]``, a view to ``[B, H, S, S]`` for the
    additive mask, softmax in float32, a view back and ``bmm`` with v. ``learned=True`` makes the
    bias a parameter (must not fire: SDPA's mask would need a gradient)."""

    def __init__(self, d=32, heads=2, seq=32, learned=False):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        slopes = torch.tensor([0.5 ** (i + 1) for i in range(heads)])
        alibi = (slopes[:, None] * torch.arange(seq)[None, :]).unsqueeze(1)  # [H, 1, S]
        if learned:
            self.alibi = nn.Parameter(alibi)
        else:
            self.register_buffer("alibi", alibi)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2).reshape(B * self.h, T, -1) for t in (q, k, v))
        bias = self.alibi[:, :, :T].repeat(B, 1, 1)
        s = bias.baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=1 / math.sqrt(C // self.h))
        s = s.view(B, self.h, T, -1)
        causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
        s = s + causal
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(x.dtype)
        y = torch.bmm(p.view(B * self.h, T, -1), v)
        return y.view(B, self.h, T, -1).transpose(1, 2).reshape(B, T, C)


def test_fires_on_alibi_through_baddbmm_and_computes_the_same_function():
    torch.manual_seed(0)
    model = AlibiAttn()
    x = torch.randn(2, 16, 32, requires_grad=True)
    gm, counts = _fuse(model, x)
    nodes = _sdpa_nodes(gm)
    assert counts.get("fused") == 1 and counts.get("bias") == 1 and len(nodes) == 1
    assert not [n for n in gm.graph.nodes if "softmax" in str(n.target) or "baddbmm" in str(n.target)]
    _assert_same_function(model, gm)


def test_must_not_fire_on_a_learned_baddbmm_bias():
    model = AlibiAttn(learned=True)
    gm, counts = _fuse(model, torch.randn(2, 16, 32))
    assert counts.get("fused", 0) == 0
    assert not _sdpa_nodes(gm)
