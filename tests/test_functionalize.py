"""FunctionalizeInPlace: in-place ops on fresh intermediates become out-of-place, exactly.

It must fire where the rewrite is the same computation (and later readers follow the new value),
and must not fire on inputs, buffers, views, or when an alias taken before the op is read after.
The MoE router of HF Mixtral (``router_top_value /= router_top_value.sum(...)``) is the case that
needed it: without it the backward-only scale inserted on the ``div_`` edge failed in autograd.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import unitscale_fx
from unitscale_fx import Config
from unitscale_fx.capture import capture
from unitscale_fx.passes.base import TransformState
from unitscale_fx.passes.functionalize import FunctionalizeInPlace


def _run_pass(model: nn.Module, *args: torch.Tensor):
    cap = capture(model, args)
    gm = cap.gm
    res = FunctionalizeInPlace()(gm, TransformState(capture=cap, config=Config()))
    gm.graph.lint()
    gm.recompile()
    return gm, res.counts


def _in_place_ops(gm) -> list[str]:
    """Nodes whose aten schema writes its first argument."""
    out = []
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.arguments:
            alias = schema.arguments[0].alias_info
            if alias is not None and alias.is_write:
                out.append(str(n.target))
    return out


def _same_step(model: nn.Module, gm, *args: torch.Tensor) -> None:
    """Same output and same parameter gradients as the eager model."""
    ref = model(*args)
    ref.sum().backward()
    ref_g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = gm(*args)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_g[n], msg=n)


class _Router(nn.Module):
    """Top-k renormalisation written in place (as HF Mixtral's router), read again afterwards."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.out = nn.Linear(2, 3)

    def forward(self, x):
        p = self.gate(x).softmax(-1)
        top, _ = torch.topk(p, 2, dim=-1)
        top /= top.sum(-1, keepdim=True)
        return self.out(top) + top.sum(-1, keepdim=True)  # read after the in-place op


def test_fires_on_a_fresh_intermediate_and_later_readers_follow():
    torch.manual_seed(0)
    model, x = _Router(), torch.randn(5, 8)
    gm, counts = _run_pass(model, x)
    assert counts["functionalized"] == 1
    assert not _in_place_ops(gm), _in_place_ops(gm)
    _same_step(model, gm, x)


class _AddBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6, bias=False)
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = self.lin(x)
        y += self.b
        y.mul_(2.0)
        return y * y


def test_chains_of_in_place_ops():
    torch.manual_seed(0)
    model, x = _AddBias(), torch.randn(4, 6)
    gm, counts = _run_pass(model, x)
    assert counts["functionalized"] == 2
    _same_step(model, gm, x)


class _Aliased(nn.Module):
    """A view taken before the in-place op and read after it: the mutation shows through it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        flat = y.view(-1)
        y.mul_(3.0)
        return flat * 1.0 + y.sum()


def test_must_not_fire_when_an_earlier_view_is_read_after():
    torch.manual_seed(0)
    model, x = _Aliased(), torch.randn(3, 4)
    gm, counts = _run_pass(model, x)
    assert counts == {"functionalized": 0, "kept_in_place": 1}
    _same_step(model, gm, x)


class _SliceWrite(nn.Module):
    """In-place on a view (a slice): the base tensor is what changes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        y[:, :2].mul_(0.5)
        return y


def test_must_not_fire_on_a_view():
    torch.manual_seed(0)
    model, x = _SliceWrite(), torch.randn(3, 4)
    gm, counts = _run_pass(model, x)
    assert counts == {"functionalized": 0, "kept_in_place": 1}
    _same_step(model, gm, x)


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps.add_(1)
        return self.lin(x)


def test_buffer_mutation_stays():
    torch.manual_seed(0)
    model = _Counter()
    m = unitscale_fx.transform(model, example_inputs=(torch.randn(2, 4),), config=Config(compile=False))
    m(torch.randn(2, 4))
    m(torch.randn(3, 4))
    assert int(model.steps) == 2


def test_transform_of_the_in_place_router_is_valid_and_scaled():
    """End to end: the transform (scaling passes on the functionalised graph) trains the router."""
    torch.manual_seed(0)
    model = _Router()
    x = torch.randn(16, 8)
    m = unitscale_fx.transform(model, example_inputs=(x,), config=Config(compile=False))
    assert m.result.counts["functionalize_in_place"]["functionalized"] == 1
    out = m(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
