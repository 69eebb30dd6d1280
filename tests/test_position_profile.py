"""Per-position energy profiles (unitscale_fx.analysis.position_profile) and their use in the analysis:
a loss read from one token (a classifier's CLS position) keeps the gradient on that token, and each
norm's backward divides it by that token's own RMS, not by the average over tokens."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
from unitscale_fx.analysis import position_profile as pp
from unitscale_fx.analysis.propagate import GraphAnalysis


# ------------------------------------------------------------------------------ the profile algebra
def test_concentrated_and_sliced_profiles_have_mean_one():
    p = pp.concentrated(8, 3)
    assert float(p.mean()) == pytest.approx(1.0) and int((p > 0).sum()) == 1 and p[3] == 8
    s = pp.sliced(8, 0, 7, 1, None)  # x[:, :-1]: the shifted logits of a causal LM
    assert float(s.mean()) == pytest.approx(1.0) and s[7] == 0 and s[0] == pytest.approx(8 / 7)
    assert pp.sliced(8, 5, 5, 1, None) is None  # an empty slice carries no gradient


def test_pieces_and_mix_conserve_energy():
    p = pp.normalized(torch.arange(1.0, 9.0))
    a, b = pp.pieces(p, [3, 5])
    assert float(a.mean()) == pytest.approx(1.0) and float(b.mean()) == pytest.approx(1.0)
    assert pp.pieces(p, [4, 5]) == [None, None]  # lengths that do not add up: flat
    # two contributions of energies 1 and 3, one concentrated, one flat
    m = pp.mix([(1.0, pp.concentrated(4, 0)), (3.0, None)])
    assert m.tolist() == pytest.approx([(4 + 3) / 4, 3 / 4, 3 / 4, 3 / 4])
    assert pp.mix([(1.0, None), (2.0, None)]) is None
    assert pp.mix([(1.0, pp.concentrated(4, 0)), (1.0, pp.concentrated(5, 0))]) is None


def test_norm_backward_factor_matches_a_monte_carlo_layer_norm():
    """``sqrt(mean(p / k))``: the RMS of a LayerNorm's input gradient over the closed form's ``g / sigma``
    (sigma the RMS over all rows) when rows have unequal variances ``k`` and the gradient unequal
    energies ``p``."""
    torch.manual_seed(0)
    s, d = 16, 512
    k = pp.normalized(torch.linspace(0.05, 2.0, s, dtype=torch.float64))
    p = pp.normalized(torch.linspace(3.0, 0.2, s, dtype=torch.float64))
    x = (torch.randn(64, s, d, dtype=torch.float64) * k.sqrt()[:, None]).requires_grad_(True)
    g = torch.randn(64, s, d, dtype=torch.float64) * p.sqrt()[:, None]
    y = F.layer_norm(x, (d,))
    (gx,) = torch.autograd.grad(y, x, g)
    closed = float(g.pow(2).mean().sqrt() / x.detach().pow(2).mean().sqrt())
    measured = float(gx.pow(2).mean().sqrt())
    f, prof = pp.norm_backward(p, k)
    assert f == pytest.approx(math.sqrt(float((p / k).mean())))
    assert math.log2(measured / (closed * f)) == pytest.approx(0.0, abs=0.03)
    rows = gx.pow(2).mean(dim=(0, 2))
    assert (rows / rows.mean()).tolist() == pytest.approx(prof.tolist(), rel=0.05)
    # flat gradient and flat input: no change
    assert pp.norm_backward(None, None) == (1.0, None)
    assert pp.norm_backward(None, torch.ones(4, dtype=torch.float64))[0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ a CLS classifier
class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        b, s, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # not causal: every token sees the CLS token
        h = h + self.out(a.transpose(1, 2).reshape(b, s, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class _ClsClassifier(nn.Module):
    """ViT-like: a small learned CLS token in front of much larger patch embeddings, pre-LN blocks, the
    loss read from the CLS position only (``h[:, 0]``)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 3, patches: int = 31, classes: int = 5):
        super().__init__()
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches + 1, d))
        self.proj = nn.Linear(48, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        for blk in self.blocks:  # a standard small init: near-uniform attention, small branches
            for m in (blk.qkv, blk.out, blk.fc1, blk.fc2):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, labels):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return F.cross_entropy(self.head(self.ln(h)[:, 0]), labels)


def _bwd_errors(monkeypatch=None) -> dict[str, float]:
    torch.manual_seed(0)
    model = _ClsClassifier()
    x, labels = torch.randn(8, 31, 48), torch.randint(0, 5, (8,))
    res = unitscale_fx.analyse(model, (x, labels))
    rep = unitscale_fx.track(res)
    out = {}
    for n in rep.nodes:
        if n.bwd is not None and n.bwd.measured and n.bwd.predicted and n.op == "aten.add":
            out[n.name] = math.log2(n.bwd.measured / n.bwd.predicted)
    return out


def test_gradient_read_from_the_cls_token_is_predicted_along_the_residual_stream():
    """The residual stream's gradient (every residual add) within 0.3 (log2) of the measurement."""
    errs = _bwd_errors()
    assert len(errs) >= 6
    assert max(abs(e) for e in errs.values()) < 0.3, errs


def test_without_the_profiles_the_cls_gradient_is_mispredicted(monkeypatch):
    """The same graph with the norms' profile factor switched off: the residual-stream gradient of the
    first layers is under-predicted several times over (the CLS token's RMS is ~10x below the
    patches'). This is what the profiles fix."""
    monkeypatch.setattr(GraphAnalysis, "norm_profile_factor", lambda self, node, x: 1)
    errs = _bwd_errors()
    assert max(errs.values()) > 1.5, errs


def test_a_concatenation_along_the_tokens_carries_the_pieces_variances():
    torch.manual_seed(0)
    model = _ClsClassifier()
    res = unitscale_fx.analyse(model, (torch.randn(8, 31, 48), torch.randint(0, 5, (8,))))
    ga = res.analysis
    cat = next(n for n in res.gm.graph.nodes if n.target is torch.ops.aten.cat.default)
    k = ga.tokdiag[cat]
    assert k.numel() == 32 and float(k.mean()) == pytest.approx(1.0)
    assert float(k[0]) < 0.05 * float(k[1:].mean())  # the CLS token: 0.02-std against the patches
    # the loss reads position 0: the gradient arriving at the final norm sits there
    ln = [n for n in res.gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default][-1]
    assert ga.gradprof[ln].argmax().item() == 0 and float(ga.gradprof[ln][1:].abs().max()) == 0.0


def test_no_profile_where_every_token_enters_the_loss():
    """Must not fire: a loss over every position (and a concatenation along the features, like RoPE's
    halves) leaves every profile flat, i.e. the closed forms as they were."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = _Block(32, 2)
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            h = self.blk(x)
            h = torch.cat([h[..., :16], self.lin(h[..., 16:])], dim=-1)
            return h.pow(2).mean()

    res = unitscale_fx.analyse(Tokens(), (torch.randn(4, 16, 32),))
    assert res.analysis.gradprof == {}
    assert res.analysis.tokdiag == {}


def test_vit_original_backward_within_the_acceptance():
    """The zoo's ViT at its standard init and issue 4's size (hidden 256, 4 layers; the model whose
    backward this fixed): every floating edge's gradient, median <= 0.15 and 90th percentile <= 0.5."""
    from unitscale_fx import zoo

    model, inputs = zoo.get("vit")
    res = unitscale_fx.analyse(model, inputs)
    rep = unitscale_fx.track(res)
    errs = [abs(math.log2(n.bwd.measured / n.bwd.predicted)) for n in rep.nodes
            if n.op not in ("placeholder", "get_attr") and n.bwd is not None
            and n.bwd.measured and n.bwd.predicted]
    assert len(errs) > 30
    errs.sort()
    assert statistics.median(errs) <= 0.15 and errs[int(0.9 * len(errs))] <= 0.5, (statistics.median(errs), errs[-5:])


# ------------------------------------------------------------------------------ causal attention, RoPE
@pytest.mark.parametrize("q_std", [0.02, 0.5])
def test_causal_attention_gradient_profiles_match_monte_carlo(q_std):
    """The first keys are read by every query: their key and value gradients carry most of the energy;
    the first query's gradient is exactly 0 (a softmax over one key is constant)."""
    torch.manual_seed(0)
    b, h, s, d = 64, 2, 32, 32
    q = (q_std * torch.randn(b, h, s, d)).requires_grad_(True)
    k = (q_std * torch.randn(b, h, s, d)).requires_grad_(True)
    v = torch.randn(b, h, s, d).requires_grad_(True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    with torch.no_grad():
        logits = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
        f = logits.softmax(-1).pow(2).sum(-1).mean(dim=(0, 1)).double()
    predicted = pp.causal_attention(f, None)
    for g, p in zip(grads, predicted):
        measured = pp.normalized(g.pow(2).mean(dim=(0, 1, 3)).double())
        assert float((measured - p).abs().mean()) < 0.15, (measured[:6], p[:6])
    assert float(predicted[0][0]) == 0.0 and float(predicted[2][0]) > 8  # 12.7 measured at q_std 0.02


class _RopeAttention(nn.Module):
    """A causal attention layer with hand-written rotary embeddings (HF Llama's ``rotate_half``), at a
    standard small init; the loss reads every position."""

    def __init__(self, d: int = 64, heads: int = 4, seq: int = 64):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        for m in (self.q, self.k, self.v, self.o):
            nn.init.normal_(m.weight, std=0.02)
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(seq).float()[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, x):
        b, s, d = x.shape
        h = self.ln(x)
        q, k, v = (m(h).view(b, s, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        cos, sin = self.cos[:s], self.sin[:s]
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return y.pow(2).mean()


def _rope_errors() -> dict[str, float]:
    torch.manual_seed(0)
    model = _RopeAttention()
    res = unitscale_fx.analyse(model, (torch.randn(8, 64, 64),))
    rep = unitscale_fx.track(res)
    return {n.name: math.log2(n.bwd.measured / n.bwd.predicted) for n in rep.nodes
            if n.op in ("aten.neg", "aten.cat") and n.bwd is not None and n.bwd.measured and n.bwd.predicted}


def test_rope_gradients_follow_where_the_key_gradient_sits():
    """``k * cos + rotate_half(k) * sin``: the key gradient sits on the first positions, where ``sin`` is
    near 0, so the gradient through ``rotate_half`` is far below ``g * rms(sin)``. Predicted within 0.3."""
    errs = _rope_errors()
    assert len(errs) == 4, errs  # neg and cat of the query's and the key's rotate_half
    assert max(abs(e) for e in errs.values()) < 0.3, errs


def test_without_the_table_factor_rope_gradients_are_over_predicted(monkeypatch):
    """The same graph with the table factor switched off: the key path's ``rotate_half`` gradients are
    over-predicted by 2^0.35 or more (and by 2^0.6-0.85 in the zoo's Llama, 128 tokens, 4 layers)."""
    with_factor = _rope_errors()
    monkeypatch.setattr(GraphAnalysis, "table_profile_factor", lambda self, node, other: 1)
    errs = _rope_errors()
    assert min(errs.values()) < -0.3, errs
    worst = min(errs, key=errs.get)
    assert abs(with_factor[worst]) < 0.5 * abs(errs[worst]), (with_factor, errs)


def test_llama_original_backward_within_the_acceptance():
    """The zoo's Llama at its standard init and issue 4's size (RoPE tables meet key gradients that sit on
    the first positions): every floating edge's gradient, median <= 0.15 and 90th percentile <= 0.5."""
    from unitscale_fx import zoo

    model, inputs = zoo.get("llama")
    res = unitscale_fx.analyse(model, inputs)
    rep = unitscale_fx.track(res)
    errs = sorted(abs(math.log2(n.bwd.measured / n.bwd.predicted)) for n in rep.nodes
                  if n.op not in ("placeholder", "get_attr") and n.bwd is not None
                  and n.bwd.measured and n.bwd.predicted)
    assert len(errs) > 100
    assert statistics.median(errs) <= 0.15 and errs[int(0.9 * len(errs))] <= 0.5, (statistics.median(errs), errs[-5:])


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [8, 16])
def test_norm_backward_at_small_width_matches_a_monte_carlo(norm, n):
    """At a few features the per-row ``1 / sigma`` and the components a norm removes do not cancel: the
    input gradient is ``sqrt((n - 1) / (n - 2))`` (RMS norm) or ``sqrt((n - 2) / (n - 3))`` (LayerNorm)
    times ``g / sigma`` for Gaussian rows (2^0.11 / 2^0.13 at n = 8; the rules used to leave it out)."""
    from unitscale_fx.track import track

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.randn(64, 128, n))

        def forward(self, dummy):
            return F.layer_norm(self.x, (n,)) if norm == "layer_norm" else F.rms_norm(self.x, (n,))

    torch.manual_seed(0)
    g = torch.randn(64, 128, n)
    rep = track(M(), (torch.zeros(1),), original=True, loss_fn=lambda o: (o * g).sum(), headroom=False)
    (x,) = [e for e in rep.nodes if e.kind == "parameter"]
    assert math.log2(x.bwd.measured / x.bwd.predicted) == pytest.approx(0.0, abs=0.04)
