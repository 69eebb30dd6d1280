"""Property-based tests (issue 6): random small Transformers, built here, are unit-scaled correctly.

``hypothesis`` draws a :class:`Arch` - depth 1-2, width 16-48, heads, grouped-query attention,
pre- / post-norm, ``nn.LayerNorm`` / ``nn.RMSNorm`` / a hand-written RMS norm, GELU / SiLU / ReLU /
SwiGLU, parallel attention + MLP, tied embeddings, biases on / off, hand-written or SDPA attention -
and for each model asserts:

* capture + transform succeed and every op has a scale rule;
* the scale probe's bands hold (``unitscale_fx.measure_step``; the thresholds of
  ``test_transform.py::test_probe_in_band_after_transform``);
* gradients are valid: each parameter's gradient is the exact gradient of the new forward times one
  positive scalar (the same graph run with the backward-only scales switched off);
* predicted scales match measured ones (``unitscale_fx.track``; median / p90 of
  ``|log2(measured / predicted)|`` within the acceptance figure of ``benchmarks/prediction_accuracy.py``),
  except at width < 32, where the analysis is known to miss (pinned by a strict xfail test).

Gradients that are zero in exact arithmetic (a key projection's bias: softmax ignores ``q . b_k``)
have no direction and no unit scale; they are left out of the gradient checks.

CI runs a fast, derandomised profile (8 examples); ``UNITSCALE_FX_HYPOTHESIS_EXAMPLES=200`` runs a
longer, random one. A failing example is printed as an ``Arch(...)``; ``build(arch)`` rebuilds it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import unitscale_fx  # noqa: E402
from unitscale_fx import Config  # noqa: E402

EAGER = Config(compile=False)
VOCAB, BATCH = 64, 8  # 8 x (16 or 32) tokens: fewer make measured gradient RMS too noisy to compare
_EXAMPLES = int(os.environ.get("UNITSCALE_FX_HYPOTHESIS_EXAMPLES", "0") or 0)
PROFILE = settings(
    max_examples=_EXAMPLES or 8,
    deadline=None,
    derandomize=not _EXAMPLES,  # CI: the same 8 examples every run; a long run explores
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# acceptance bands (test_transform.py) and prediction accuracy (benchmarks/prediction_accuracy.py)
FWD_IN_BAND, BWD_IN_BAND, GRADS_IN_BAND = 0.95, 0.90, 0.85
MEDIAN_MAX, P90_MAX = 0.15, 0.5
MAX_UNPREDICTED = 0.10  # edges with no numeric prediction (counted apart, as in the benchmark)


# =========================================================================== the architectures
@dataclass(frozen=True)
class Arch:
    depth: int = 1
    width: int = 32
    heads: int = 2
    kv_heads: int = 2
    norm: str = "layernorm"  # layernorm | rmsnorm | hand
    pre_norm: bool = True
    act: str = "gelu"  # gelu | silu | relu | swiglu
    parallel: bool = False
    tied: bool = False
    bias: bool = True
    attention: str = "sdpa"  # sdpa | manual
    seq: int = 32
    seed: int = 0


class HandRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(a: Arch) -> nn.Module:
    if a.norm == "layernorm":
        return nn.LayerNorm(a.width, bias=a.bias)
    if a.norm == "rmsnorm":
        return nn.RMSNorm(a.width, eps=1e-6)
    return HandRMSNorm(a.width)


class Attention(nn.Module):
    def __init__(self, a: Arch, max_seq: int):
        super().__init__()
        self.h, self.kv, self.hd = a.heads, a.kv_heads, a.width // a.heads
        self.q = nn.Linear(a.width, self.h * self.hd, bias=a.bias)
        self.k = nn.Linear(a.width, self.kv * self.hd, bias=a.bias)
        self.v = nn.Linear(a.width, self.kv * self.hd, bias=a.bias)
        self.o = nn.Linear(self.h * self.hd, a.width, bias=a.bias)
        self.manual = a.attention == "manual"
        self.register_buffer("mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.kv != self.h:  # grouped-query attention
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        if self.manual:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        hidden = 2 * a.width
        self.act = a.act
        self.up = nn.Linear(a.width, hidden, bias=a.bias)
        self.gate = nn.Linear(a.width, hidden, bias=a.bias) if a.act == "swiglu" else None
        self.down = nn.Linear(hidden, a.width, bias=a.bias)

    def forward(self, x):
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        f = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[self.act]
        return self.down(f(self.up(x)))


class Block(nn.Module):
    def __init__(self, a: Arch, max_seq: int):
        super().__init__()
        self.a = a
        self.n1, self.attn, self.mlp = _norm(a), Attention(a, max_seq), MLP(a)
        self.n2 = None if a.parallel else _norm(a)

    def forward(self, x):
        a = self.a
        if a.parallel:
            if a.pre_norm:
                h = self.n1(x)
                return x + self.attn(h) + self.mlp(h)
            return self.n1(x + self.attn(x) + self.mlp(x))
        if a.pre_norm:
            x = x + self.attn(self.n1(x))
            return x + self.mlp(self.n2(x))
        x = self.n1(x + self.attn(x))
        return self.n2(x + self.mlp(x))


class LM(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, a.width)
        self.blocks = nn.ModuleList([Block(a, 2 * a.seq) for _ in range(a.depth)])
        self.norm = _norm(a) if a.pre_norm else nn.Identity()
        self.head = nn.Linear(a.width, VOCAB, bias=False)
        if a.tied:
            self.head.weight = self.emb.weight

    def forward(self, ids, labels):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.norm(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def build(a: Arch) -> tuple[LM, dict]:
    torch.manual_seed(a.seed)
    model = LM(a)
    g = torch.Generator().manual_seed(a.seed)
    data = torch.randint(0, VOCAB, (BATCH, a.seq + 1), generator=g)
    return model, {"ids": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}


@st.composite
def archs(draw) -> Arch:
    width = draw(st.sampled_from([16, 24, 32, 48]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0 and width // h >= 8]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    return Arch(
        depth=draw(st.integers(1, 2)),
        width=width,
        heads=heads,
        kv_heads=kv_heads,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm", "hand"])),
        pre_norm=draw(st.booleans()),
        act=draw(st.sampled_from(["gelu", "silu", "relu", "swiglu"])),
        parallel=draw(st.booleans()),
        tied=draw(st.booleans()),
        bias=draw(st.booleans()),
        attention=draw(st.sampled_from(["sdpa", "manual"])),
        seq=draw(st.sampled_from([16, 32])),
        seed=draw(st.integers(0, 3)),
    )


# =========================================================================== the checks
def _grads(m, kw) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    m(**kw)[1].backward()
    out = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return out


def _exact_grads(m, kw) -> dict[str, torch.Tensor]:
    """The gradients of the same graph with every backward-only scale set to 1."""
    from unitscale_fx import runtime

    real = runtime._GradScale.backward
    try:
        runtime._GradScale.backward = staticmethod(lambda ctx, g: (g, None))
        return _grads(m, kw)
    finally:
        runtime._GradScale.backward = staticmethod(real) if not isinstance(real, staticmethod) else real


def _zero_in_exact_arithmetic(exact: dict[str, torch.Tensor]) -> set[str]:
    """Parameters whose exact gradient is rounding noise: e.g. a key bias (softmax ignores ``q . b_k``,
    the same for every key of a row). No scale makes such a gradient unit, nor gives it a direction."""
    rms = {n: g.double().pow(2).mean().sqrt().item() for n, g in exact.items()}
    typical = sorted(rms.values())[len(rms) // 2]
    return {n for n, r in rms.items() if r <= 1e-4 * typical}


def _fraction(probe, group: str, skip: set[str]) -> tuple[float, list]:
    entries = [e for e in probe.entries(group) if e[0] not in skip]
    inside = [e for e in entries if 0.5 <= e[2] <= 2.0]
    return len(inside) / max(len(entries), 1), [e for e in entries if not 0.5 <= e[2] <= 2.0]


def check_arch(a: Arch) -> None:
    model, kw = build(a)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    res = m.result

    # capture + transform: one graph, every op with a rule
    assert not res.missing, f"{a}: ops without a rule: {[str(x) for x in res.missing]}"
    if a.norm == "hand":  # each written-out norm became one aten.rms_norm (passes/fuse_norm.py)
        ops = [n.target for n in m.graph_module.graph.nodes if n.op == "call_function"]
        assert torch.ops.aten.rsqrt.default not in ops, a
        assert res.counts["fuse_rms_norm"]["fused"] == ops.count(torch.ops.aten.rms_norm.default) > 0, a

    # gradient validity: a positive multiple of the exact gradient of the new forward, per parameter
    scaled, exact = _grads(m, kw), _exact_grads(m, kw)
    assert scaled.keys() == exact.keys() and scaled
    zero = _zero_in_exact_arithmetic(exact)
    for n in scaled:
        assert torch.isfinite(scaled[n]).all(), (a, n)
        if n in zero:
            continue
        cos = F.cosine_similarity(scaled[n].flatten().double(), exact[n].flatten().double(), dim=0).item()
        assert cos >= 0.9999, (a, n, cos)

    # the probe's bands (gradients that are zero in exact arithmetic left out)
    probe = unitscale_fx.measure_step(m, kw)
    fwd, bwd = probe.fraction_in_band("forward"), probe.fraction_in_band("backward")
    grads, bad = _fraction(probe, "grads", zero)
    assert fwd >= FWD_IN_BAND, (a, "forward", fwd, probe.out_of_band("forward"))
    assert bwd >= BWD_IN_BAND, (a, "backward", bwd, probe.out_of_band("backward"))
    assert grads >= GRADS_IN_BAND, (a, "grads", grads, bad)
    assert not probe.out_of_band("forward", 1 / 8, 8), (a, probe.out_of_band("forward", 1 / 8, 8))
    assert not probe.out_of_band("backward", 1 / 8, 8), (a, probe.out_of_band("backward", 1 / 8, 8))

    # predicted scales match measured ones (the known gap at width < 32 is left to its xfail test)
    if predictions_expected_to_hold(a):
        check_predictions(a, m, zero)


def predictions_expected_to_hold(a: Arch) -> bool:
    """False where the analysis is known to miss (see the xfail tests below): width < 32 (backward
    predictions biased by ~1.2x at width 16-24). (A hand-written norm in post-norm position was
    excluded too until the transform fused it into ``aten.rms_norm``: the backward of its
    mean-of-squares branch was over-predicted 2-9x.)"""
    return a.width >= 32


def check_predictions(a: Arch, m, zero: set[str]) -> None:
    acc = prediction_accuracy(m, zero)
    for d, r in acc.items():
        assert r["median"] <= MEDIAN_MAX and r["p90"] <= P90_MAX, (a, d, r)
        assert r["unpredicted"] <= MAX_UNPREDICTED * r["edges"], (a, d, r)


def prediction_accuracy(m, zero: set[str]) -> dict[str, dict]:
    """``{"fwd"|"bwd": {median, p90, edges, unpredicted, worst}}`` of ``|log2(measured / predicted)|``
    over the graph's activation edges (as ``benchmarks/prediction_accuracy.py``), leaving out the
    backward-only scale edges of parameters whose gradient is zero in exact arithmetic."""
    from unitscale_fx.report import percentile
    from unitscale_fx.track import track

    gm = m.graph_module
    skip = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in zero:
            skip |= {u.name for u in node.users}
    rep = track(m, headroom=False)
    out = {}
    for d, pe in rep.prediction_errors().items():
        errs = [(n, v) for n, v in pe["errors"] if n not in skip]
        vals = [v for _, v in errs]
        out[d] = {
            "median": percentile(vals, 50), "p90": percentile(vals, 90), "edges": len(vals) + len(pe["unpredicted"]),
            "unpredicted": len(pe["unpredicted"]), "unpredicted_edges": pe["unpredicted"][:6],
            "worst": [(n, round(v, 2)) for n, v in sorted(errs, key=lambda t: -t[1])[:4]],
        }
    return out


# =========================================================================== the tests
@PROFILE
@given(archs())
def test_random_transformers_are_unit_scaled(arch):
    check_arch(arch)


# corners of the space, always run (8 derandomised examples need not draw them)
CORNERS = [
    Arch(depth=2, width=48, heads=4, kv_heads=1, norm="rmsnorm", act="swiglu", bias=False, tied=True, attention="manual"),
    Arch(depth=2, width=32, heads=2, kv_heads=2, parallel=True, pre_norm=False, norm="layernorm", act="relu", seq=16),
    Arch(depth=1, width=16, heads=2, kv_heads=1, norm="hand", act="silu", attention="manual", tied=True, seq=16),
]


def _id(a: Arch) -> str:
    return (f"d{a.depth}w{a.width}h{a.heads}kv{a.kv_heads}-{a.norm}-{'pre' if a.pre_norm else 'post'}-{a.act}-"
            f"{'par' if a.parallel else 'seq'}-{'tied' if a.tied else 'untied'}-{'bias' if a.bias else 'nobias'}-"
            f"{a.attention}-s{a.seq}")


@pytest.mark.parametrize("arch", CORNERS, ids=_id)
def test_corner_architectures_are_unit_scaled(arch):
    check_arch(arch)


def _predictions_of(a: Arch) -> None:
    model, kw = build(a)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    check_predictions(a, m, _zero_in_exact_arithmetic(_exact_grads(m, kw)))


@pytest.mark.xfail(strict=True, reason="analysis: backward RMS predictions are biased at width 16 (depth 2): bwd "
                                       "median 0.162 > 0.15, p90 0.38 (0.237 / 0.45 before the rules' finite-width "
                                       "norm factor). Measured at each RMSNorm: |dx| / (|g| / rms) is 2^0.10-0.22, of "
                                       "which the Gaussian-row factor sqrt((n-1)/(n-2)) = 2^0.05 is now predicted; "
                                       "the rest is the row mean-square's spread beyond a chi-square's (its Jensen "
                                       "gain 2^0.11-0.17 against 2^0.10), compounded up the residual stream")
def test_width_16_backward_predictions():
    _predictions_of(Arch(depth=2, width=16, heads=1, kv_heads=1, norm="rmsnorm", act="gelu", bias=True, seq=32, seed=3))


def test_hand_written_post_norm_backward_predictions():
    """Post-norm at width 32 with a hand-written RMS norm (fused into aten.rms_norm by the transform).

    Was a strict xfail: first on the norm's pow / mean / rsqrt edges (mispredicted 2-9x, bwd p90 0.94), then,
    once fused, on the backward median (2^0.19). Measured cause of the latter: the residual adds feeding the last
    two norms have forward RMS 2^-0.08 and 2^-0.12 of the prediction for this draw of the weights, and each
    norm's backward gained the finite-width factor ``sqrt((n - 1) / (n - 2))`` the rule left out. With that
    factor: bwd median 0.129, p90 0.251 (2026-11-29)."""
    _predictions_of(Arch(depth=2, width=32, heads=2, kv_heads=2, norm="hand", pre_norm=False, act="gelu", bias=False,
                         attention="sdpa", seq=16, seed=2))


def test_one_head_post_norm_backward_predictions():
    """Found by a 30-example run: width 32, one head, post-norm LayerNorm, seed 2.

    Was a strict xfail (backward median 2^0.18). Measured: the residual add feeding the last LayerNorm has
    forward RMS 2^-0.12 of the prediction for this seed (seeds 0-7: -0.12 to +0.08; width 128: -0.05 to
    +0.04), a fluctuation of one draw of the weights that the analysis does not see, and each LayerNorm's
    backward gained ``sqrt((n - 2) / (n - 3))`` over ``g / sigma`` at ``n`` features, which the rule left out.
    With that factor: bwd median 0.140, p90 0.247 (2026-11-29): inside the figure, with a small margin."""
    _predictions_of(Arch(depth=2, width=32, heads=1, kv_heads=1, norm="layernorm", pre_norm=False, act="gelu",
                         bias=False, attention="sdpa", seq=16, seed=2))
