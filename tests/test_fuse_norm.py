"""The RMS-norm fusion pass alone: what it fires on, what it must not fire on, and equivalence."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from unitscale_fx import Config
from unitscale_fx.api import _bind
from unitscale_fx.capture import capture
from unitscale_fx.passes.base import PassManager, TransformState
from unitscale_fx.passes.canonicalize import ModeAwareOps
from unitscale_fx.passes.fuse_norm import FuseRMSNorm

aten = torch.ops.aten
D = 32


class HandNorm(nn.Module):
    """A hand-written RMS norm in one of its usual spellings, between two linears."""

    def __init__(self, variant: str = "t5", eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.variant, self.eps = variant, eps
        self.inp = nn.Linear(D, D, dtype=dtype)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D, dtype=dtype))
        self.out = nn.Linear(D, D, dtype=dtype)

    def norm(self, x: torch.Tensor):
        v = self.variant
        if v == "t5":  # T5LayerNorm
            var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + self.eps))
        if v == "llama":  # LlamaRMSNorm: up-cast, normalise, cast back, gain
            dt = x.dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(dt)
        if v == "square_div":  # x / sqrt(mean(x * x) + eps), gain on the right
            return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        if v == "no_gain":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if v == "gemma_gain":  # (1 + w): the gain is not a parameter itself: the multiply stays
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)
        # ---- must not fire
        if v == "returns_variance":
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + self.eps)), var
        if v == "eps_outside":  # x / (sqrt(mean) + eps): another function
            return self.weight * (x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + self.eps))
        if v == "mean_over_tokens":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps))
        if v == "other_operand":  # normalises a tensor other than the one whose squares were taken
            return self.weight * ((x + 1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        if v == "learned_eps":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.weight[:1].abs()))
        if v == "cube":
            return self.weight * (x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + self.eps))
        raise ValueError(v)

    def forward(self, x: torch.Tensor):
        h = self.norm(self.inp(x))
        if isinstance(h, tuple):
            return self.out(h[0]), h[1]
        return self.out(h)


def _fuse(model: nn.Module, x: torch.Tensor):
    cap = capture(model, (x,), {})
    gm = cap.gm
    _bind(gm, model)
    state = TransformState(capture=cap, config=Config(compile=False), hints=dict(cap.hints))
    gm = PassManager([ModeAwareOps(), FuseRMSNorm()])(gm, state)
    return gm, state.counts.get("fuse_rms_norm", {})


def _rms_norms(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is aten.rms_norm.default]


def _assert_same_function(model: nn.Module, gm, dtype=torch.float32, tol=1e-5) -> None:
    """Same function, forward and gradients (input, gain, both linears), at two shapes."""
    for shape in ((2, 16, D), (3, 5, D)):
        x = torch.randn(*shape, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref, got = model(xa), gm(xb)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
        params = [p for p in (model.weight, model.inp.weight, model.out.weight) if p.requires_grad]
        if model.variant == "no_gain":
            params = params[1:]
        g = torch.randn_like(ref)
        g_ref = torch.autograd.grad(ref, [xa, *params], g)
        g_got = torch.autograd.grad(got, [xb, *params], g)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("variant,gain", [("t5", True), ("llama", True), ("square_div", True), ("no_gain", False),
                                          ("gemma_gain", False)])
def test_fires_and_computes_the_same_function(variant, gain):
    torch.manual_seed(0)
    model = HandNorm(variant)
    gm, counts = _fuse(model, torch.randn(2, 16, D))
    (rn,) = _rms_norms(gm)
    assert counts["fused"] == 1 and counts["gain"] == int(gain)
    assert (rn.args[2] is not None) == gain
    assert rn.args[1] == [D] and rn.args[3] == pytest.approx(1e-6)
    # every piece of the written-out form is gone
    left = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not left & {aten.rsqrt.default, aten.sqrt.default, aten.mean.dim, aten.pow.Tensor_Scalar}
    assert "inp" in str(rn.meta.get("stack_trace", "")) or rn.meta.get("stack_trace")
    _assert_same_function(model, gm)


def test_half_precision_input_with_float32_upcast():
    torch.manual_seed(0)
    model = HandNorm("llama", dtype=torch.bfloat16)
    gm, counts = _fuse(model, torch.randn(2, 16, D, dtype=torch.bfloat16))
    (rn,) = _rms_norms(gm)
    # normalised in float32 (the up-cast is its input), cast back, then the bf16 gain (not folded)
    assert rn.args[0].meta["val"].dtype == torch.float32 and rn.args[2] is None
    assert counts["fused"] == 1 and counts["gain"] == 0
    _assert_same_function(model, gm, dtype=torch.bfloat16, tol=1e-2)


@pytest.mark.parametrize("variant", ["returns_variance", "eps_outside", "mean_over_tokens", "other_operand",
                                     "learned_eps", "cube"])
def test_must_not_fire(variant):
    torch.manual_seed(0)
    model = HandNorm(variant)
    gm, counts = _fuse(model, torch.randn(2, 16, D))
    assert not _rms_norms(gm)
    assert counts.get("fused", 0) == 0
    _assert_same_function(model, gm)


def test_rejections_are_counted():
    gm, counts = _fuse(HandNorm("returns_variance"), torch.randn(2, 16, D))
    assert counts["rejected"] == 1


def test_transform_fuses_by_default_and_config_turns_it_off():
    import unitscale_fx

    torch.manual_seed(0)
    model = HandNorm("t5")
    x = torch.randn(2, 16, D)
    a = unitscale_fx.transform(copy.deepcopy(model), example_inputs=(x,), config=Config(compile=False))
    b = unitscale_fx.transform(copy.deepcopy(model), example_inputs=(x,),
                               config=Config(compile=False, fuse_norms=False))
    assert a.result.counts["fuse_rms_norm"]["fused"] == 1
    assert "fuse_rms_norm" not in b.result.counts
    assert _rms_norms(a.graph_module) and not _rms_norms(b.graph_module)
    assert "fuse_rms_norm: fused=1, gain=1" in a.result.summary()
