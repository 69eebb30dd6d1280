"""Scale rules for CNN ops (batch norm, average pooling) and MoE routers (``topk``): predicted against
measured RMS, forward and backward, on random inputs; gradient validity of a transformed CNN.

Each op is analysed on its own graph (``track(..., original=True)``: the captured graph, no
rewrite) behind ``x * a`` with a parameter ``a = 1``, so that the edge feeding the op carries a
gradient: its backward entry is the op's input gradient. Tensors are large enough (>= 16k
elements, >= 2k outputs) for the sampling error of a measured RMS to be ~1-2 %; rules that are exact in expectation
must be within ``EXACT`` (|log2| 0.05, 3.5 %).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
from unitscale_fx import Config
from unitscale_fx.analysis.rules import _order_stat_moments, _softmax_topk_moments
from unitscale_fx.track import track

EAGER = Config(compile=False)
EXACT = 0.05


class _Op(nn.Module):
    """``fn(x * a)`` (``a`` a parameter, 1): the op's input is a graph edge with a gradient."""

    def __init__(self, fn, pre=None):
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))
        self.fn, self.pre = fn, pre

    def forward(self, x):
        h = x * self.a
        if self.pre is not None:
            h = self.pre(h)
        return self.fn(h)


def _measure(module: nn.Module, x: torch.Tensor, seed: int = 0) -> dict:
    """``{node name: (fwd predicted, fwd measured, bwd predicted, bwd measured)}`` for a loss
    ``sum(out * g)`` with a unit Gaussian ``g`` (a unit gradient at the output)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    rep = track(module, (x,), original=True, loss_fn=lambda o: (o * g).sum(), headroom=False)
    res = {}
    for n in rep.nodes:
        f = (n.fwd.predicted, n.fwd.measured) if n.fwd is not None else (None, None)
        b = (n.bwd.predicted, n.bwd.measured) if n.bwd is not None else (None, None)
        res[n.name] = f + b
    return res


def _err(pred, meas) -> float:
    assert pred is not None and meas is not None, (pred, meas)
    return abs(math.log2(meas / pred))


def _node(res: dict, prefix: str) -> tuple:
    names = [n for n in res if n.startswith(prefix)]
    assert len(names) == 1, (prefix, list(res))
    return res[names[0]]


def _check(res: dict, op: str, fwd: bool = True, bwd: bool = True, tol: float = EXACT) -> None:
    """The op's output (forward) and its input's gradient (backward, on the ``mul`` feeding it)."""
    f = _node(res, op)
    if fwd:
        assert _err(f[0], f[1]) <= tol, (op, "fwd", f)
    if bwd:
        b = res["mul"]
        assert _err(b[2], b[3]) <= tol, (op, "bwd", b)


# =========================================================================== average pooling
POOLS = {
    "adaptive_avg_pool2d_global": (lambda h: F.adaptive_avg_pool2d(h, 1), (64, 64, 8, 8), "adaptive_avg_pool2d"),
    "adaptive_avg_pool2d_uneven": (lambda h: F.adaptive_avg_pool2d(h, (3, 5)), (16, 16, 7, 11), "adaptive_avg_pool2d"),
    "adaptive_avg_pool1d": (lambda h: F.adaptive_avg_pool1d(h, 4), (16, 32, 24), "adaptive_avg_pool1d"),
    "adaptive_avg_pool3d": (lambda h: F.adaptive_avg_pool3d(h, 2), (16, 32, 6, 6, 6), "adaptive_avg_pool3d"),
    "avg_pool2d": (lambda h: F.avg_pool2d(h, 2), (16, 16, 8, 8), "avg_pool2d"),
    "avg_pool2d_overlap_pad": (lambda h: F.avg_pool2d(h, 3, stride=2, padding=1), (16, 16, 9, 9), "avg_pool2d"),
    "avg_pool2d_no_pad_count": (lambda h: F.avg_pool2d(h, 3, stride=2, padding=1, count_include_pad=False),
                                (16, 16, 9, 9), "avg_pool2d"),
    "avg_pool2d_ceil": (lambda h: F.avg_pool2d(h, 3, stride=2, ceil_mode=True), (16, 16, 8, 8), "avg_pool2d"),
    "avg_pool2d_divisor": (lambda h: F.avg_pool2d(h, 2, divisor_override=3), (16, 16, 8, 8), "avg_pool2d"),
    "avg_pool1d": (lambda h: F.avg_pool1d(h, 4, stride=3, padding=1), (16, 32, 30), "avg_pool1d"),
    "avg_pool3d": (lambda h: F.avg_pool3d(h, 2), (4, 16, 6, 6, 6), "avg_pool3d"),
}


@pytest.mark.parametrize("case", sorted(POOLS))
def test_average_pooling_of_independent_elements(case):
    """Zero-mean independent input: RMS / sqrt(window), exactly (averaged over uneven windows)."""
    fn, shape, op = POOLS[case]
    torch.manual_seed(0)
    res = _measure(_Op(fn), torch.randn(shape))
    _check(res, op)


def test_average_pooling_keeps_the_mean_of_relu_outputs():
    """A ReLU output has mean 1/sqrt(2 pi): the pooled RMS is sqrt(mean^2 + var / n), not RMS / sqrt(n)."""
    torch.manual_seed(0)
    res = _measure(_Op(lambda h: F.avg_pool2d(h, 4), pre=torch.relu), torch.randn(16, 16, 16, 16))
    f = _node(res, "avg_pool2d")
    assert _err(f[0], f[1]) <= EXACT, f
    independent = math.sqrt(0.5 / 16)
    assert f[1] > 2 * independent  # the mean survives the averaging
    b = _node(res, "relu")  # the gradient at the pooling's input
    assert _err(b[2], b[3]) <= EXACT, b


# =========================================================================== batch norm
@pytest.mark.parametrize("shape", [(16, 8, 8, 8), (64, 16)])
def test_batch_norm_train_mode_forward_backward_and_parameter_grads(shape):
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    torch.manual_seed(0)
    x = 3.0 * torch.randn(shape)  # not unit: the rule must normalise
    m = _Op(bn)
    res = _measure(m, x)
    _check(res, "batch_norm", tol=0.1)  # BatchNorm1d: 16 channels of 64 elements, ~5 % sampling error
    # parameter gradients: sum over the N * spatial elements of a channel, RMS g * sqrt(M)
    M = x.numel() // shape[1]
    for p in ("fn_weight", "fn_bias"):
        pred, meas = res[p][2], res[p][3]
        assert _err(pred, meas) <= 0.5, (p, pred, meas)  # only C = 8 / 16 samples of each: noisy
        assert abs(pred - math.sqrt(M)) < 1e-3 * math.sqrt(M)


def test_batch_norm_backward_with_few_elements_per_channel():
    """M = 8 elements per channel: the projection keeps (M - 2) / M of the gradient's energy and
    the sample variance's E[1 / s^2] = M / (M - 3): RMS sqrt((M - 2) / (M - 3)) = sqrt(6 / 5)."""
    torch.manual_seed(0)
    x = torch.randn(8, 4096)
    res = _measure(_Op(nn.BatchNorm1d(4096)), x)
    b = res["mul"]
    assert abs(b[2] / res["x"][1] * res["x"][1] - math.sqrt(6 / 5) / res["x"][1]) < 0.01, b
    assert _err(b[2], b[3]) <= 0.1, b  # heavy-tailed 1 / s^2: ~4 % sampling error with 4096 channels


# =========================================================================== the CNN
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.avg_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_cnn_has_every_rule_and_its_gradients_are_exact_up_to_positive_scalars():
    """Backward-only scales never change a gradient's direction: every parameter gradient of the
    transformed CNN is a positive multiple of the gradient of its (new) forward."""
    torch.manual_seed(0)
    model = _CNN()
    other = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8)
    a = unitscale_fx.transform(model, example_inputs=(x,), config=EAGER)
    b = unitscale_fx.transform(other, example_inputs=(x,), config=EAGER.replace(scale_backward=False))
    b.load_state_dict(a.state_dict())
    assert not a.result.missing
    g = torch.randn(8, 10)
    grads = []
    for m in (a, b):
        m.zero_grad(set_to_none=True)
        (m(x) * g).sum().backward()
        grads.append({n: p.grad.detach().double().clone() for n, p in m.named_parameters() if p.grad is not None})
    ga, gb = grads
    assert ga.keys() == gb.keys() and len(ga) == 8
    for n in ga:
        if n == "c1.bias":  # a bias right before a batch norm: its gradient is 0 in exact arithmetic
            assert gb[n].norm() < 1e-4 * gb["c1.weight"].norm()
            continue
        cos = F.cosine_similarity(ga[n].flatten(), gb[n].flatten(), dim=0).item()
        assert cos >= 0.9999, (n, cos)
        ratio = (ga[n].norm() / gb[n].norm()).item()
        assert ratio > 0 and math.isfinite(ratio), (n, ratio)
    probe = unitscale_fx.measure_step(a, (x,), loss_fn=lambda o: (o * g).sum())
    assert probe.fraction_in_band("forward") == 1.0


# =========================================================================== topk
def test_gaussian_order_statistics():
    # the larger of two standard normals has mean 1/sqrt(pi); all n of n have mean 0, mean square 1
    m1, m2 = _order_stat_moments(lambda z: z, 0.0, 1.0, 2, 1)
    assert abs(m1 - 1 / math.sqrt(math.pi)) < 1e-9 and abs(m2 - 1) < 1e-9
    m1, m2 = _order_stat_moments(lambda z: z, 0.0, 1.0, 8, 8)
    assert abs(m1) < 1e-9 and abs(m2 - 1) < 1e-9


@pytest.mark.parametrize("k,largest", [(1, True), (4, True), (4, False)])
def test_topk_of_gaussian_values_and_gradient(k, largest):
    torch.manual_seed(0)
    x = torch.randn(2048, 32)  # zero mean: the analysis measures an input's RMS, not its mean
    res = _measure(_Op(lambda h: torch.topk(h, k, dim=-1, largest=largest).values), x)
    _check(res, "getitem", bwd=False)  # the values: the topk node's first output
    b = res["mul"]  # scattered into k of n positions: exactly sqrt(k / n) of the values' gradient
    assert abs(b[2] - math.sqrt(k / 32) * _node(res, "getitem")[2]) < 1e-6, b
    assert _err(b[2], b[3]) <= EXACT, b


def test_topk_of_a_monotone_function_and_refusal_of_a_non_monotone_one():
    torch.manual_seed(0)
    res = _measure(_Op(lambda h: torch.topk(h, 3, dim=-1).values, pre=F.silu), torch.randn(512, 16))
    assert _node(res, "getitem")[0] is None  # silu is not monotone below -1.28: refused
    res = _measure(_Op(lambda h: torch.topk(h, 3, dim=-1).values, pre=torch.tanh), torch.randn(512, 16))
    # forward only: the gradient then meets tanh' at the selected (largest) positions, which the
    # elementwise backward rule averages over all positions (a known limit of composing the rules)
    _check(res, "getitem", bwd=False)


class _Router(nn.Module):
    """A Mixtral-style router: softmax over expert logits, top-k, renormalised in place."""

    def __init__(self, hidden=64, experts=8, k=2):
        super().__init__()
        self.w = nn.Linear(hidden, experts, bias=False)
        nn.init.normal_(self.w.weight, std=hidden ** -0.5)
        self.k = k

    def forward(self, x):
        probs = torch.softmax(self.w(x).float(), dim=-1)
        top, _ = torch.topk(probs, self.k, dim=-1)
        return top, top / top.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("experts,k", [(4, 2), (8, 2), (16, 4)])
def test_router_topk_over_softmax_probabilities(experts, k):
    torch.manual_seed(0)
    r = _Router(64, experts, k)
    x = torch.randn(4096, 64)
    torch.manual_seed(1)
    rep = track(r, (x,), original=True, loss_fn=lambda o: (o[0] * torch.randn_like(o[0])).sum(), headroom=False)
    nodes = {n.name: n for n in rep.nodes}
    top = nodes["getitem"]  # topk values
    assert _err(top.fwd.predicted, top.fwd.measured) <= EXACT, (top.fwd.predicted, top.fwd.measured)
    s = next(n for name, n in nodes.items() if name.startswith("sum"))  # row sum of dependent values
    assert _err(s.fwd.predicted, s.fwd.measured) <= EXACT, (s.fwd.predicted, s.fwd.measured)
    d = next(n for name, n in nodes.items() if name.startswith("div"))  # renormalised weights
    assert _err(d.fwd.predicted, d.fwd.measured) <= 0.15, (d.fwd.predicted, d.fwd.measured)


def test_softmax_topk_monte_carlo_is_precise_and_consistent():
    m1, m2, se, s1, s2 = _softmax_topk_moments(8, 8, 1.0)
    assert abs(s1 - 1) < 1e-9 and abs(s2 - 1) < 1e-9  # all of them sum to one
    assert abs(m1 - 1 / 8) < 1e-9
    _, m2, se, _, _ = _softmax_topk_moments(8, 2, 1.0)
    assert se < 0.01 * m2


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_routers_have_rules(name):
    pytest.importorskip("transformers")
    from unitscale_fx import zoo

    model, kw = zoo.get(name, hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64)
    res = unitscale_fx.analyse(model, kw)
    assert not res.missing, res.missing


def test_shared_rows_and_conv_biases_sum_correlated_gradients():
    """Parameter gradients that sum many positions' correlated gradients: a BERT token-type table
    whose one used row collects every token (E|grad|^2 = sum_s n_s (1 + (n_s - 1) c)), a ViT patch
    projection's bias (a sum over the patches of a sample). Both were predicted as sums of
    independent terms and read 3.5-4.6x after the transform."""
    import unitscale_fx
    from unitscale_fx import Config, zoo

    for name, param in (("bert", "bert.embeddings.token_type_embeddings.weight"),
                        ("vit", "vit.embeddings.patch_embeddings.projection.bias")):
        model, kw = zoo.get(name)
        m = unitscale_fx.transform(model, example_inputs=kw, config=Config(compile=False))
        res = unitscale_fx.measure_step(m, kw)
        (rms,) = [r for n, _, r in res.entries("grads") if n == param]
        assert 0.5 <= rms <= 2.0, (name, param, rms)
