"""Capture's opaque SDPA (``capture._opaque_sdpa``): with dropout, ``F.scaled_dot_product_attention`` traces as
an opaque op whose fake kernel only computes the output, and is turned back into
``aten.scaled_dot_product_attention`` after the export. The captured graph must be the one export produces
without it: same ops, same arguments, same shapes, strides and shape symbols."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
import unitscale_fx.capture as C
from unitscale_fx import zoo


def _structure(gm: torch.fx.GraphModule) -> list[tuple]:
    """Every node as (op, target, args and kwargs with nodes replaced by their position, shape, stride)."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return ("node", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        return repr(a)

    out = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        out.append((n.op, str(n.target) if n.op != "placeholder" else n.name, arg(n.args),
                    tuple(sorted((k, arg(x)) for k, x in n.kwargs.items())),
                    tuple(str(d) for d in v.shape) if isinstance(v, torch.Tensor) else None,
                    tuple(str(d) for d in v.stride()) if isinstance(v, torch.Tensor) else None))
    return out


def _both(model, inputs, monkeypatch):
    """The capture, and the reference capture without the opaque op; asserts the first used it."""
    args, kwargs = C.normalize_inputs(inputs)
    opaque = []
    restore = C._restore_sdpa

    def counting(gm):
        opaque.extend(n for n in gm.graph.nodes if n.target is torch.ops.unitscale_fx.captured_sdpa.default)
        return restore(gm)

    with monkeypatch.context() as mp:
        mp.setattr(C, "_restore_sdpa", counting)
        fast = C.capture(model, args, kwargs)
    assert opaque, "the opaque SDPA path was not taken"
    with monkeypatch.context() as mp:
        mp.setattr(C, "_opaque_sdpa", contextlib.nullcontext)
        reference = C.capture(model, args, kwargs)
    return fast, reference


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_graph_is_the_one_export_produces(name, monkeypatch):
    """HF models whose attention has dropout (GPT-2, BERT; T5 with its cross-attention, whose batch export
    must tie to the encoder's) capture to the same graph with and without the opaque op."""
    model, inputs = zoo.get(name, layers=2)
    fast, reference = _both(model, inputs, monkeypatch)
    assert _structure(fast.gm) == _structure(reference.gm)
    assert {str(k): v for k, v in fast.hints.items()} == {str(k): v for k, v in reference.hints.items()}
    targets = [n.target for n in fast.gm.graph.nodes]
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) >= 2
    assert all("captured_sdpa" not in str(t) for t in targets)


class _Attention(nn.Module):
    def __init__(self, dropout: float, causal: bool, mask: bool, gqa: bool):
        super().__init__()
        self.dropout, self.causal, self.mask, self.gqa = dropout, causal, mask, gqa
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 32 if gqa else 64)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
        kv_heads = 2 if self.gqa else 4
        k, v = self.kv(x).view(b, s, 2, kv_heads, 8).permute(2, 0, 3, 1, 4)
        mask = torch.ones(s, s, dtype=torch.bool).tril() if self.mask else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout, is_causal=self.causal,
                                             scale=0.3 if self.mask else None, enable_gqa=self.gqa)
        return out.transpose(1, 2).reshape(b, s, 32).pow(2).mean()


@pytest.mark.parametrize("causal,mask,gqa", [(True, False, False), (False, True, False), (False, False, True)])
def test_options_survive_the_round_trip(causal, mask, gqa, monkeypatch):
    torch.manual_seed(0)
    model = _Attention(0.1, causal, mask, gqa)
    fast, reference = _both(model, (torch.randn(2, 16, 32),), monkeypatch)
    assert _structure(fast.gm) == _structure(reference.gm)


def _opaque_calls(dropout: float) -> int:
    """How many opaque SDPA nodes the export produced (counted before they are turned back)."""
    seen = []
    restore = C._restore_sdpa

    def counting(gm):
        seen.extend(n for n in gm.graph.nodes if n.target is torch.ops.unitscale_fx.captured_sdpa.default)
        return restore(gm)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "_restore_sdpa", counting)
        C.capture(_Attention(dropout, True, False, False), (torch.randn(2, 16, 32),))
    return len(seen)


def test_without_dropout_sdpa_is_left_alone():
    """No dropout: the CPU flash kernel may be chosen, with another output layout; export's own path runs.
    (With dropout the opaque op is used: the control.)"""
    assert _opaque_calls(0.0) == 0
    assert _opaque_calls(0.1) == 1


def test_sdpa_is_restored_and_delegates_outside_a_trace():
    original = F.scaled_dot_product_attention
    q = torch.randn(2, 4, 8, 16)
    with C._opaque_sdpa():
        assert F.scaled_dot_product_attention is not original
        torch.manual_seed(1)
        inside = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # not tracing: the original
    torch.manual_seed(1)
    assert torch.equal(inside, original(q, q, q, dropout_p=0.5))
    assert F.scaled_dot_product_attention is original

    class Broken(nn.Module):
        def forward(self, x):
            y = F.scaled_dot_product_attention(x, x, x, dropout_p=0.1)
            if y.sum() > 0:  # data-dependent control flow: export fails
                return y
            return -y

    with pytest.raises(unitscale_fx.CaptureError):
        C.capture(Broken(), (q,))
    assert F.scaled_dot_product_attention is original


def test_the_opaque_op_run_eagerly_is_sdpa():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    out = torch.ops.unitscale_fx.captured_sdpa(q, k, v, None, 0.0, True, None, False)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
