"""End-to-end check of the attention scale rule with the scale probe (issue 3, "Unit-scaled attention").

Each model is one attention block: q/k/v ``nn.Linear`` projections, attention through
``F.scaled_dot_product_attention`` or written by hand (``softmax(q @ k^T / sqrt(d)) @ v``, which the
FuseAttention pass fuses), and an output projection. The model is transformed with
``unitscale_fx.transform(..., Config(compile=False))`` and one training step is measured with
``unitscale_fx.measure_step``; the loss is ``(out * G).sum()`` with a fixed ``G ~ N(0, 1)``, so the
gradient arriving at the model output has RMS 1 and no token correlation.

What is asserted, for each case, to lie in ``BAND = [0.8, 1.25]`` (tighter than the probe's default [0.5, 2]):

* ``q``, ``k``, ``v``: the SDPA operands (forward record of the SDPA op);
* ``out``: the attention output, after the attention scale, as it enters the output projection
  (the ``self`` operand of the forward ``mm`` whose ``mat2`` is ``o.weight``);
* ``grad_out``: the gradient reaching the attention output (``grad_out`` of the SDPA backward);
* ``grad_q``, ``grad_k``, ``grad_v``: the gradient of ``q``/``k``/``v`` as it enters the backward
  matmul of their projection (the ``self`` operand of the backward ``mm`` whose ``mat2`` is
  ``q.weight``/``k.weight``/``v.weight``; the inputs require grad so that this ``mm`` exists).
  Between the SDPA and that matmul there are only views and a forward scale with its matching
  backward-only scale (product 1 in the generated graphs inspected), so this
  is the gradient of ``q``/``k``/``v`` in the rewritten graph (backward-only scales included: it is
  what the low-precision backward matmul sees).

Measured figures (torch 2.13 CPU, seed 0) are in docs/attention_scaling.md, "Probe-tested across
attention cases", and are reproduced by ``python tests/test_attention_probe.py``.

Every case is in band; a case found out of band gets ``xfail(strict=True)`` with the measured figure
and its cause, never a looser band.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
from unitscale_fx.probe import ProbeResult, measure_step

EAGER = unitscale_fx.Config(compile=False)
BAND = (0.8, 1.25)  # tighter than the probe default [0.5, 2]: measured 0.907 ... 1.076
D_MODEL = 128
HEADS = 2  # head dim 64
BATCH = 2
QUANTITIES = ("q", "k", "v", "out", "grad_q", "grad_k", "grad_v", "grad_out")


class AttnBlock(nn.Module):
    """One attention block: q/k/v projections, attention, output projection.

    ``impl``: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"hand"`` (softmax(q k^T / sqrt d) v).
    ``kv_heads < heads``: grouped-query attention, with ``gqa="repeat"`` (k/v heads repeated as
    HF's ``repeat_kv`` does) or ``gqa="enable"`` (``enable_gqa=True``, SDPA only).
    ``forward(x, mem=None, mask=None)``: keys/values come from ``mem`` when given (cross-attention);
    ``mask`` is a boolean ``[batch, keys]`` key-padding mask, ``True`` for a valid key; ``vsrc``, when
    given, is the input of the value projection (a control: values independent of the keys).
    """

    def __init__(self, *, impl: str = "sdpa", causal: bool = False, heads: int = HEADS,
                 kv_heads: int | None = None, gqa: str = "repeat", d_model: int = D_MODEL):
        super().__init__()
        self.impl, self.causal, self.gqa = impl, causal, gqa
        self.h, self.kvh = heads, kv_heads or heads
        self.hd = d_model // heads
        self.q = nn.Linear(d_model, heads * self.hd, bias=False)
        self.k = nn.Linear(d_model, self.kvh * self.hd, bias=False)
        self.v = nn.Linear(d_model, self.kvh * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, d_model, bias=False)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, vsrc: torch.Tensor | None = None) -> torch.Tensor:
        src = x if mem is None else mem
        vsrc = src if vsrc is None else vsrc
        B, Sq, _ = x.shape
        Sk = src.shape[1]
        q = self.q(x).view(B, Sq, self.h, self.hd).transpose(1, 2)
        k = self.k(src).view(B, Sk, self.kvh, self.hd).transpose(1, 2)
        v = self.v(vsrc).view(B, Sk, self.kvh, self.hd).transpose(1, 2)
        enable_gqa = False
        if self.kvh != self.h:
            if self.gqa == "repeat":  # transformers' repeat_kv
                r = self.h // self.kvh
                k = k[:, :, None].expand(B, self.kvh, r, Sk, self.hd).reshape(B, self.h, Sk, self.hd)
                v = v[:, :, None].expand(B, self.kvh, r, Sk, self.hd).reshape(B, self.h, Sk, self.hd)
            else:
                enable_gqa = True
        if self.impl == "sdpa":
            attn_mask = None if mask is None else mask[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal,
                                               enable_gqa=enable_gqa)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            if self.causal:
                s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            if mask is not None:
                s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
            y = F.softmax(s, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, Sq, self.h * self.hd))


# --------------------------------------------------------------------------- inputs and measurement
def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """Key-padding mask: sequence 0 unpadded, sequence ``b >= 1`` keeps its first
    ``(seq // 4) * (b % 4 or 1)`` keys (at least one; with BATCH = 2: a quarter of the keys)."""
    mask = torch.ones(batch, seq, dtype=torch.bool)
    for b in range(1, batch):
        valid = max(1, (seq // 4) * (b % 4 or 1))
        mask[b, valid:] = False
    return mask


def make_inputs(case: dict, seq: int, seed: int) -> tuple:
    # own streams, far from the global one: weights re-initialised by the transform come from the
    # global generator seeded with ``seed``; inputs drawn from the same seed would repeat the weights'
    # random numbers (a token equal to a weight row gets a huge logit)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(BATCH, seq, D_MODEL, generator=g)
    mem = None
    if case.get("cross"):
        mem = torch.randn(BATCH, case["cross"](seq), D_MODEL, generator=g)
    mask = padding_mask(BATCH, seq) if case.get("pad") else None
    vsrc = torch.randn(BATCH, seq, D_MODEL, generator=g) if case.get("indep_v") else None
    return (x, mem, mask, vsrc)


def _with_grad(inputs: tuple) -> tuple:
    return tuple(t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in inputs)


def _loss_fn(seed: int):
    def loss(out: torch.Tensor) -> torch.Tensor:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(20_000 + seed))
        return (out * g).sum()
    return loss


def attention_rms(res: ProbeResult) -> dict[str, float]:
    """The RMS of q, k, v, out and of their gradients, picked from the probe's records."""
    fwd_sdpa = [r for r in res.forward if "scaled_dot_product" in r.op]
    bwd_sdpa = [r for r in res.backward if "scaled_dot_product" in r.op]
    assert {r.call for r in fwd_sdpa} and len({r.call for r in fwd_sdpa}) == 1, "expected exactly one SDPA call"
    got = {r.role[0]: r.rms for r in fwd_sdpa}  # query/key/value -> q/k/v
    got["grad_out"] = next(r.rms for r in bwd_sdpa if r.role == "grad_out")

    def partner(phase: str, param: str) -> float:
        recs = res.forward if phase == "forward" else res.backward
        calls = [r.call for r in recs if r.op == "aten.mm" and r.role == "mat2" and r.param == param]
        assert len(calls) == 1, (phase, param, calls)
        return next(r.rms for r in recs if r.call == calls[0] and r.role == "self")

    got["out"] = partner("forward", "o.weight")
    for name in ("q", "k", "v"):
        got["grad_" + name] = partner("backward", f"{name}.weight")
    return {k: got[k] for k in QUANTITIES}


def transformed(case: dict, seq: int, seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    model = AttnBlock(**case["block"])
    inputs = make_inputs(case, seq, seed)
    m = unitscale_fx.transform(model, example_inputs=inputs, config=EAGER)
    return m, inputs


def measure(m: nn.Module, inputs: tuple, seed: int = 0) -> dict[str, float]:
    return attention_rms(measure_step(m, _with_grad(inputs), loss_fn=_loss_fn(seed)))


def assert_in_band(rms: dict[str, float], what: str) -> None:
    lo, hi = BAND
    bad = {k: round(v, 3) for k, v in rms.items() if not lo <= v <= hi}
    assert not bad, f"{what}: out of [{lo}, {hi}]: {bad} (all: { {k: round(v, 3) for k, v in rms.items()} })"


# --------------------------------------------------------------------------- the cases
CASES: dict[str, dict] = {
    "full-sdpa": dict(block=dict(impl="sdpa")),
    "causal-sdpa": dict(block=dict(impl="sdpa", causal=True)),
    "full-hand": dict(block=dict(impl="hand")),
    "causal-hand": dict(block=dict(impl="hand", causal=True)),
    "pad-sdpa": dict(block=dict(impl="sdpa"), pad=True),
    "pad-hand": dict(block=dict(impl="hand"), pad=True),
    "gqa-repeat-causal": dict(block=dict(impl="sdpa", causal=True, heads=4, kv_heads=2, gqa="repeat")),
    "gqa-enable-full": dict(block=dict(impl="sdpa", heads=4, kv_heads=2, gqa="enable")),
    "cross-sdpa": dict(block=dict(impl="sdpa"), cross=lambda s: 2 * s),
    "cross-hand": dict(block=dict(impl="hand"), cross=lambda s: s // 2),
    # control: values from an input independent of the keys' (see the xfail reasons)
    "full-sdpa-indep-v": dict(block=dict(impl="sdpa"), indep_v=True),
}

SEQS = (32, 128, 512, 2048)
SLOW_SEQS = {2048}
# cases run at every length; the others at 128 only (and 2048 when slow tests run)
ALL_LENGTHS = ("full-sdpa", "causal-sdpa", "full-hand", "causal-hand")

# Long non-causal attention is where the k-v coupling term of the rule matters: k and v are
# projections of the same input (width D_MODEL), so the keys a query favours carry a common part of
# v (mean square (1 - F)^2 s2 / D next to the diffuse F ~ e^{s2} / n_keys). Without that term
# (kv_coupling=0) the S=2048 cases measured out 2.644 / grad_q 2.648 (full), 2.532 / 2.546 (GQA,
# enable_gqa), 3.591 / 3.575 (cross, 2048 x 4096 keys); "full-sdpa-indep-v" is the control (no
# coupling: out 1.063 at 2048). docs/attention_scaling.md, "k-v coupling".


def _params():
    out = []
    for name, case in CASES.items():
        seqs = SEQS if name in ALL_LENGTHS else (128, 2048)
        for s in seqs:
            marks = []
            if s in SLOW_SEQS:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(name, s, marks=marks, id=f"{name}-S{s}"))
    return out


@pytest.mark.parametrize("name,seq", _params())
def test_attention_operands_and_gradients_in_band(name: str, seq: int) -> None:
    m, inputs = transformed(CASES[name], seq)
    if CASES[name]["block"]["impl"] == "hand":
        assert m.result.counts["fuse_attention"]["fused"] == 1
    assert_in_band(measure(m, inputs), f"{name} S={seq}")


# --------------------------------------------------------------------------- dynamic sequence length
CAPTURE_SEQ = 128
DYN_SEQS = (64, 1024, 2048)
DYN_CASES = ("full-sdpa", "causal-sdpa")
# The attention scales are functions of the sequence-length symbol (analysis/sizefn.py): the
# graph evaluates them at the runtime length. Before (scales frozen at the capture length) the
# 1024 cases measured grad_k 0.400 / grad_v 0.380 (full) and grad_v 0.463 (causal).


@pytest.fixture(scope="module")
def dynamic_models():
    """Each dynamic case transformed once, at ``CAPTURE_SEQ``; ``captures`` counts the captures."""
    import unitscale_fx.api as api

    counter = {"n": 0}
    real = api.capture

    def counting(*a, **k):
        counter["n"] += 1
        return real(*a, **k)

    api.capture = counting
    try:
        models = {name: transformed(CASES[name], CAPTURE_SEQ) for name in DYN_CASES}
    finally:
        api.capture = real
    assert counter["n"] == len(DYN_CASES)
    return models, counter, counting


def _dyn_params():
    out = []
    for name in DYN_CASES:
        for s in DYN_SEQS:
            marks = [pytest.mark.slow] if s in SLOW_SEQS else []
            out.append(pytest.param(name, s, marks=marks, id=f"{name}-S{s}"))
    return out


@pytest.mark.parametrize("name,seq", _dyn_params())
def test_dynamic_sequence_length_no_recapture_and_in_band(dynamic_models, monkeypatch, name: str, seq: int) -> None:
    """Captured at one length, run at another: same graph (no new capture), RMS still in band."""
    import unitscale_fx.api as api

    models, counter, counting = dynamic_models
    m, _ = models[name]
    gm = m.result.gm
    monkeypatch.setattr(api, "capture", counting)
    before = counter["n"]
    inputs = make_inputs(CASES[name], seq, seed=1)
    rms = measure(m, inputs, seed=1)
    assert counter["n"] == before, "the model was captured again"
    assert m.result.gm is gm
    assert_in_band(rms, f"{name} captured at S={CAPTURE_SEQ}, run at S={seq}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("corr", [0.3, 0.6])
def test_weight_gradients_with_token_correlated_inputs(corr: float, causal: bool) -> None:
    """Inputs whose tokens share a component (``x = sqrt(c) a + sqrt(1 - c) e_t``, as embeddings
    with a common part): the input's correlation is read from the example, and the weight
    gradients' sums over correlated token rows are predicted (the v projection's gradient was 4.4x
    (c = 0.3) and 7.0x (c = 0.6) too large when that factor was dropped; measured now 0.71-1.07)."""
    torch.manual_seed(0)
    model = AttnBlock(impl="sdpa", causal=causal)
    g = torch.Generator().manual_seed(123)
    shared = torch.randn(BATCH, 1, D_MODEL, generator=g)
    x = math.sqrt(corr) * shared + math.sqrt(1 - corr) * torch.randn(BATCH, 128, D_MODEL, generator=g)
    m = unitscale_fx.transform(model, example_inputs=(x, None, None, None), config=EAGER)
    res = measure_step(m, (x.clone().requires_grad_(), None, None, None), loss_fn=_loss_fn(0))
    grads = {n: r for n, _, r in res.out_of_band("grads", lo=1.0, hi=1.0)}
    assert set(grads) == {"q.weight", "k.weight", "v.weight", "o.weight"}
    bad = {n: round(r, 3) for n, r in grads.items() if not 0.5 <= r <= 2.0}
    assert not bad, grads


def test_attention_scales_are_functions_of_the_sequence_length(dynamic_models) -> None:
    """The forward attention scale is a size function of the sequence-length symbol, not a number."""
    from unitscale_fx.analysis.sizefn import SizeFunction

    models, _, _ = dynamic_models
    for name in DYN_CASES:
        gm = models[name][0].result.gm
        exprs = [n.meta["_us_expr"] for n in gm.graph.nodes if "_us_expr" in n.meta]
        fns = [f for e in exprs for f in e.atoms(SizeFunction)]
        assert fns, f"{name}: no scale depends on the sequence length"
        assert all(f.sizes[0].is_Symbol for f in fns), fns


if __name__ == "__main__":  # print the table of docs/attention_scaling.md
    print("| case | S | " + " | ".join(QUANTITIES) + " |")
    print("|---|---|" + "---|" * len(QUANTITIES))
    for name, case in CASES.items():
        for s in (SEQS if name in ALL_LENGTHS else (128, 2048)):
            m, inputs = transformed(case, s)
            r = measure(m, inputs)
            print(f"| {name} | {s} | " + " | ".join(f"{r[k]:.3f}" for k in QUANTITIES) + " |", flush=True)
    for name in DYN_CASES:
        m, _ = transformed(CASES[name], CAPTURE_SEQ)
        for s in DYN_SEQS:
            r = measure(m, make_inputs(CASES[name], s, seed=1), seed=1)
            print(f"| {name}, captured at {CAPTURE_SEQ} | {s} | " + " | ".join(f"{r[k]:.3f}" for k in QUANTITIES) + " |",
                  flush=True)
