"""Tests of unitscale_fx.analysis.gaussian: quadrature rules, pointwise moments, sympy functions."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn.functional as F

from unitscale_fx.analysis import gaussian as G
from unitscale_fx.analysis.gaussian import (
    STANDARD,
    LRUCache,
    PointwiseMoments,
    clear_cache,
    gauss_legendre_nodes,
    hermite_nodes,
    hermite_nodes_2d,
    pointwise_grad_rms_function,
    pointwise_moments,
    pointwise_rms_function,
)

DT = torch.float64


def _Phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _double_factorial(k: int) -> int:
    return math.prod(range(k, 0, -2)) if k > 0 else 1


# ------------------------------------------------------------------------------------------------
# Quadrature rules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 10, 64])
def test_hermite_nodes_moments(n):
    z, w = hermite_nodes(n)
    assert z.dtype == DT and w.dtype == DT and z.shape == (n,) == w.shape
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    assert bool((w > 0).all())
    assert torch.allclose(z, -z.flip(0), atol=1e-12)
    for k in range(0, min(2 * n, 24)):  # exact for degree <= 2n - 1
        exact = 0 if k % 2 else _double_factorial(k - 1)
        got = float((w * z**k).sum())
        size = float((w * z.abs() ** k).sum())  # round-off scale of the sum
        assert abs(got - exact) <= 1e-12 * size, (n, k, got, exact)


def test_hermite_nodes_cached_and_copied():
    z1, w1 = hermite_nodes(16)
    z1.zero_()  # callers may not corrupt the cache
    z2, w2 = hermite_nodes(16)
    assert float(z2.abs().max()) > 1.0
    assert torch.equal(w1, w2)
    assert G._hermite_cached.cache_info().hits >= 1
    with pytest.raises(ValueError):
        hermite_nodes(0)


@pytest.mark.parametrize("rho", [-0.8, 0.0, 0.5, 1.0])
def test_hermite_nodes_2d(rho):
    z1, z2, w = hermite_nodes_2d(rho, 20)
    assert z1.shape == z2.shape == w.shape == (400,)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float((w * z1 * z1).sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((w * z2 * z2).sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((w * z1 * z2).sum()) == pytest.approx(rho, abs=1e-12)
    assert float((w * z1**2 * z2**2).sum()) == pytest.approx(1 + 2 * rho**2, abs=1e-11)
    assert float((w * z1**3 * z2).sum()) == pytest.approx(3 * rho, abs=1e-11)
    with pytest.raises(ValueError):
        hermite_nodes_2d(1.5)


def test_gauss_legendre_nodes():
    t, w = gauss_legendre_nodes(8)
    assert float(w.sum()) == pytest.approx(2.0, abs=1e-14)
    for k in range(16):
        exact = 0.0 if k % 2 else 2.0 / (k + 1)
        assert float((w * t**k).sum()) == pytest.approx(exact, abs=1e-13)


def test_lru_cache_helper():
    c = LRUCache(maxsize=2)
    calls = []
    assert c.get_or_compute(("a", 1), lambda: calls.append(1) or 10) == 10
    assert c.get_or_compute(("a", 1), lambda: calls.append(2) or 20) == 10
    c.put("b", 2)
    c.get(("a", 1))  # refresh: "b" becomes the oldest
    c.put("c", 3)
    assert c.get("b") is None and c.get(("a", 1)) == 10 and c.get("c") == 3
    assert calls == [1] and len(c) == 2


# ------------------------------------------------------------------------------------------------
# Known values and closed forms
# ------------------------------------------------------------------------------------------------

KNOWN = {  # x ~ N(0, 1): (rms, grad_rms)
    "gelu": (0.652, 0.675),
    "silu": (0.597, 0.616),
    "relu": (0.707, 0.707),
    "tanh": (0.628, 0.682),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_values(name):
    r = pointwise_moments(STANDARD[name], 1.0)
    assert isinstance(r, PointwiseMoments)
    assert all(isinstance(v, float) for v in (r.rms, r.mean, r.grad_rms, r.corr, r.grad_corr))
    assert r.rms == pytest.approx(KNOWN[name][0], abs=2e-3)
    assert r.grad_rms == pytest.approx(KNOWN[name][1], abs=2e-3)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("corr", [-0.5, 0.0, 0.3, 0.9, 1.0])
def test_identity(sigma, corr):
    r = pointwise_moments(lambda x: x, sigma, corr)
    assert r.rms == pytest.approx(sigma, rel=1e-12)
    assert r.mean == pytest.approx(0.0, abs=1e-12 * sigma)
    assert r.grad_rms == pytest.approx(1.0, rel=1e-12)
    assert r.corr == pytest.approx(corr, abs=1e-12)
    assert r.grad_corr == pytest.approx(1.0, abs=1e-12)


def test_identity_with_mean():
    s, m, rho = 0.7, 0.4, 0.25
    r = pointwise_moments(lambda x: x, s, rho, mean=m)
    assert r.rms == pytest.approx(math.hypot(s, m), rel=1e-12)
    assert r.mean == pytest.approx(m, rel=1e-12)
    assert r.corr == pytest.approx((m * m + rho * s * s) / (m * m + s * s), rel=1e-12)


@pytest.mark.parametrize("sigma,mean", [(1.0, 0.0), (0.3, 0.2), (2.5, -1.0), (1000.0, 3.0)])
def test_relu_closed_form_1d(sigma, mean):
    a = mean / sigma
    e_f = mean * _Phi(a) + sigma * _phi(a)
    e_f2 = (mean * mean + sigma * sigma) * _Phi(a) + mean * sigma * _phi(a)
    r = pointwise_moments(F.relu, sigma, 0.0, mean)
    assert r.mean == pytest.approx(e_f, rel=1e-10)
    assert r.rms == pytest.approx(math.sqrt(e_f2), rel=1e-10)
    assert r.grad_rms == pytest.approx(math.sqrt(_Phi(a)), rel=1e-10)
    assert r.corr == pytest.approx(e_f * e_f / e_f2, rel=1e-10)
    assert r.grad_corr == pytest.approx(_Phi(a), rel=1e-10)


@pytest.mark.parametrize("rho", [-0.9, -0.2, 0.3, 0.5, 0.999])
def test_relu_and_abs_closed_form_2d(rho):
    # arc-cosine kernels: E[relu(x)relu(y)], E[1(x>0)1(y>0)]; E[|x||y|], E[sign(x)sign(y)]
    th = math.acos(rho)
    r = pointwise_moments(F.relu, 1.3, rho)
    assert r.corr == pytest.approx((math.sqrt(1 - rho * rho) + (math.pi - th) * rho) / math.pi, abs=1e-10)
    assert r.grad_corr == pytest.approx((math.pi - th) / math.pi, abs=1e-10)
    a = pointwise_moments(torch.abs, 0.8, rho)
    assert a.corr == pytest.approx(2 / math.pi * (math.sqrt(1 - rho * rho) + rho * math.asin(rho)), abs=1e-10)
    assert a.grad_corr == pytest.approx(2 / math.pi * math.asin(rho), abs=1e-10)


def test_smooth_closed_forms():
    s, m, rho = 0.8, 0.3, 0.4
    e = pointwise_moments(torch.exp, s, rho, m)  # log-normal
    assert e.mean == pytest.approx(math.exp(m + s * s / 2), rel=1e-11)
    assert e.rms == pytest.approx(math.exp(m + s * s), rel=1e-11)
    assert e.grad_rms == pytest.approx(e.rms, rel=1e-11)
    assert e.corr == pytest.approx(math.exp((rho - 1) * s * s), rel=1e-11)
    q = pointwise_moments(torch.square, s, rho)
    assert q.rms == pytest.approx(math.sqrt(3) * s * s, rel=1e-12)
    assert q.grad_rms == pytest.approx(2 * s, rel=1e-12)
    assert q.corr == pytest.approx((1 + 2 * rho * rho) / 3, rel=1e-12)
    assert q.grad_corr == pytest.approx(rho, rel=1e-12)
    big = pointwise_moments(torch.exp, 3.0)  # mass far in the tail: the domain is extended
    assert big.rms == pytest.approx(math.exp(9.0), rel=1e-9)


@pytest.mark.parametrize("name", ["hardtanh", "clamp", "leaky_relu"])
@pytest.mark.parametrize("sigma,mean", [(0.5, 0.0), (1.0, 0.4), (1000.0, 0.0), (2.0, -3.0)])
def test_nonsmooth_grad_closed_form(name, sigma, mean):
    # E[f'^2] is a probability of an interval: any quadrature error at the kinks shows here
    if name == "hardtanh":
        f, lo, hi, inside, outside = F.hardtanh, -1.0, 1.0, 1.0, 0.0
    elif name == "clamp":
        f, lo, hi, inside, outside = (lambda x: x.clamp(-0.5, 2.0)), -0.5, 2.0, 1.0, 0.0
    else:
        f, lo, hi, inside, outside = F.leaky_relu, 0.0, math.inf, 1.0, 1e-4
    p = _Phi((hi - mean) / sigma) - _Phi((lo - mean) / sigma)
    r = pointwise_moments(f, sigma, 0.0, mean)
    assert r.grad_rms == pytest.approx(math.sqrt(inside * p + outside * (1 - p)), rel=1e-8)


def test_gelu_large_sigma_tends_to_relu():
    # a smooth function much narrower than sigma (gelu at sigma=1e4) is resolved too
    r, q = pointwise_moments(F.gelu, 1e4, 0.5), pointwise_moments(F.relu, 1e4, 0.5)
    assert r.rms == pytest.approx(q.rms, rel=1e-6)
    assert r.grad_rms == pytest.approx(q.grad_rms, rel=1e-4)
    assert r.corr == pytest.approx(q.corr, rel=1e-6)
    assert r.grad_corr == pytest.approx(q.grad_corr, rel=1e-4)


def test_gelu_erf_closed_form():
    # E[gelu(x)] for x ~ N(0, s^2) = s^2 / sqrt(2 pi (1 + s^2))
    for s in (0.5, 1.0, 4.0):
        r = pointwise_moments(F.gelu, s)
        assert r.mean == pytest.approx(s * s / math.sqrt(2 * math.pi * (1 + s * s)), rel=1e-11)


@pytest.mark.parametrize("name", ["gelu", "tanh", "silu", "relu", "elu"])
@pytest.mark.parametrize("sigma,mean", [(1.0, 0.0), (0.4, 0.3), (3.0, -0.5)])
def test_against_mpmath(name, sigma, mean):
    """Independent reference: mpmath tanh-sinh quadrature at 25 digits, split at 0."""
    import mpmath

    mp = mpmath.mp
    fns = {
        "gelu": (lambda x: x * (1 + mp.erf(x / mp.sqrt(2))) / 2,
                 lambda x: (1 + mp.erf(x / mp.sqrt(2))) / 2 + x * mp.npdf(x)),
        "tanh": (mp.tanh, lambda x: 1 / mp.cosh(x) ** 2),
        "silu": (lambda x: x / (1 + mp.exp(-x)),
                 lambda x: 1 / (1 + mp.exp(-x)) + x * mp.exp(-x) / (1 + mp.exp(-x)) ** 2),
        "relu": (lambda x: max(x, 0), lambda x: 1 if x > 0 else 0),
        "elu": (lambda x: x if x > 0 else mp.exp(x) - 1, lambda x: 1 if x > 0 else mp.exp(x)),
    }
    f, df = fns[name]

    def expect(h):
        dens = lambda x: h(x) * mp.npdf(x, mean, sigma)  # noqa: E731
        return mp.quad(dens, [-mp.inf, mean - 8 * sigma, 0, mean + 8 * sigma, mp.inf])

    with mpmath.workdps(25):  # local precision: the global mpmath context is left alone
        e_f = float(expect(f))
        rms = float(mp.sqrt(expect(lambda x: f(x) ** 2)))
        grad_rms = float(mp.sqrt(expect(lambda x: df(x) ** 2)))
    r = pointwise_moments(STANDARD[name], sigma, 0.0, mean)
    assert r.mean == pytest.approx(e_f, rel=1e-9, abs=1e-12)
    assert r.rms == pytest.approx(rms, rel=1e-9)
    assert r.grad_rms == pytest.approx(grad_rms, rel=1e-9)


def test_agrees_with_plain_hermite_for_smooth_functions():
    for name in ("gelu", "silu", "tanh", "sigmoid", "mish", "softplus"):
        f = STANDARD[name]
        z, w = hermite_nodes(64)
        y, g = G._eval(f, z)
        z1, z2, w2 = hermite_nodes_2d(0.5, 64)
        y1, g1 = G._eval(f, z1)
        y2, g2 = G._eval(f, z2)
        r = pointwise_moments(f, 1.0, 0.5)
        e_f2 = float((w * y * y).sum())
        # (64-node Gauss-Hermite itself is only ~1e-7 accurate for tanh: poles at +-i pi/2)
        assert r.rms == pytest.approx(math.sqrt(e_f2), rel=1e-6), name
        assert r.grad_rms == pytest.approx(math.sqrt(float((w * g * g).sum())), rel=1e-6), name
        assert r.corr == pytest.approx(float((w2 * y1 * y2).sum()) / e_f2, rel=1e-6), name


# ------------------------------------------------------------------------------------------------
# Monte Carlo
# ------------------------------------------------------------------------------------------------

N_MC = 2_000_000


@pytest.fixture(scope="module")
def normals():
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(N_MC, generator=gen, dtype=DT), torch.randn(N_MC, generator=gen, dtype=DT)


def _mc_close(quad: float, samples: torch.Tensor, what: str) -> None:
    est = float(samples.mean())
    se = float(samples.std()) / math.sqrt(samples.numel())
    assert abs(quad - est) <= 5.0 * se + 1e-12, f"{what}: quadrature {quad} vs MC {est} +- {se}"


def _hand_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


MC_FUNCS = {
    "gelu": F.gelu,
    "gelu_tanh": STANDARD["gelu_tanh"],
    "silu": F.silu,
    "relu": F.relu,
    "tanh": torch.tanh,
}


@pytest.mark.parametrize("name", sorted(MC_FUNCS))
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("corr", [0.0, 0.5])
def test_monte_carlo(normals, name, sigma, corr):
    f = MC_FUNCS[name]
    u, v = normals
    x = sigma * u
    y = sigma * (corr * u + math.sqrt(1 - corr * corr) * v)
    fx, gx = G._eval(f, x)
    fy, gy = G._eval(f, y)
    r = pointwise_moments(f, sigma, corr)
    _mc_close(r.mean, fx, "mean")
    _mc_close(r.rms**2, fx * fx, "E[f^2]")
    _mc_close(r.grad_rms**2, gx * gx, "E[f'^2]")
    _mc_close(r.corr * r.rms**2, fx * fy, "E[f(x)f(y)]")
    _mc_close(r.grad_corr * r.grad_rms**2, gx * gy, "E[f'(x)f'(y)]")


def test_hand_written_subgraphs():
    a = pointwise_moments(_hand_gelu_tanh, 1.3, 0.5)
    b = pointwise_moments(STANDARD["gelu_tanh"], 1.3, 0.5)
    for k in ("rms", "mean", "grad_rms", "corr", "grad_corr"):
        assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-9), k
    q = pointwise_moments(lambda x: x * torch.sigmoid(1.702 * x), 1.0)
    assert q.rms == pytest.approx(pointwise_moments(F.gelu, 1.0).rms, rel=2e-2)


# ------------------------------------------------------------------------------------------------
# Non-differentiable f, edge cases, errors, cache
# ------------------------------------------------------------------------------------------------


def test_finite_difference_fallback():
    det = pointwise_moments(lambda x: torch.tanh(x).detach(), 1.5, 0.5)
    ref = pointwise_moments(torch.tanh, 1.5, 0.5)
    assert det.grad_rms == pytest.approx(ref.grad_rms, rel=1e-7)
    assert det.grad_corr == pytest.approx(ref.grad_corr, rel=1e-6)
    # a step function: f' = 0 almost everywhere, the jump is located exactly
    step = pointwise_moments(lambda x: (x > 0.3).to(x.dtype), 1.0, 0.5, mean=0.1)
    p = 1 - _Phi(0.2)
    assert step.mean == pytest.approx(p, rel=1e-10)
    assert step.rms == pytest.approx(math.sqrt(p), rel=1e-10)
    assert step.grad_rms == 0.0
    detached_relu = pointwise_moments(lambda x: F.relu(x).detach(), 2.0, 0.0, 0.5)
    assert detached_relu.grad_rms == pytest.approx(math.sqrt(_Phi(0.25)), rel=1e-9)


def test_in_place_functions():
    ref = pointwise_moments(F.relu, 1.0, 0.5)
    for f in (torch.nn.ReLU(inplace=True), lambda x: x.relu_()):
        r = pointwise_moments(f, 1.0, 0.5)
        assert r.rms == pytest.approx(ref.rms, rel=1e-12)
        assert r.grad_rms == pytest.approx(ref.grad_rms, rel=1e-12)
        assert r.grad_corr == pytest.approx(ref.grad_corr, rel=1e-12)


def test_all_standard_functions_finite():
    assert {"gelu", "gelu_tanh", "silu", "relu", "tanh", "sigmoid", "softplus", "mish", "elu",
            "leaky_relu", "hardtanh", "abs", "square", "exp"} <= set(STANDARD)
    for name, f in STANDARD.items():
        r = pointwise_moments(f, 1.0, 0.5)
        vals = (r.rms, r.mean, r.grad_rms, r.corr, r.grad_corr)
        assert all(math.isfinite(v) for v in vals), name
        assert r.rms > 0 and r.grad_rms > 0 and -1 <= r.corr <= 1 + 1e-12, name


def test_sigma_zero_and_errors():
    r = pointwise_moments(F.gelu, 0.0, 0.3, mean=1.0)
    assert r.rms == pytest.approx(float(F.gelu(torch.tensor(1.0, dtype=DT))), rel=1e-14)
    assert r.corr == 1.0
    with pytest.raises(ValueError):
        pointwise_moments(F.gelu, -1.0)
    with pytest.raises(ValueError):
        pointwise_moments(F.gelu, 1.0, corr=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        pointwise_moments(torch.log, 1.0)  # nan for x < 0


def test_cache():
    clear_cache()
    f = lambda x: torch.tanh(2 * x)  # noqa: E731
    g = lambda x: torch.tanh(3 * x)  # noqa: E731
    a = pointwise_moments(f, 1.0, 0.5)
    assert pointwise_moments(f, 1.0 + 1e-15, 0.5) is a  # sigma is rounded for the key
    assert pointwise_moments(g, 1.0, 0.5) is not a
    k = pointwise_moments(f, 1.0, key="tanh2x")
    assert pointwise_moments(lambda x: x, 1.0, key="tanh2x") is k  # the key identifies f
    clear_cache()
    assert pointwise_moments(f, 1.0, 0.5) is not a


# ------------------------------------------------------------------------------------------------
# sympy
# ------------------------------------------------------------------------------------------------


def test_sympy_function():
    gelu_rms = pointwise_rms_function("gelu", F.gelu)
    gelu_grad_rms = pointwise_grad_rms_function("gelu", F.gelu)
    assert gelu_rms.__name__ == "gelu_rms" and gelu_grad_rms.__name__ == "gelu_grad_rms"
    assert pointwise_rms_function("gelu", F.gelu) is gelu_rms  # one class per (name, f)

    v = gelu_rms(1)
    assert isinstance(v, sympy.Float) and float(v) == pytest.approx(0.65209, abs=1e-4)
    assert float(gelu_grad_rms(sympy.Float(1.0))) == pytest.approx(0.67517, abs=1e-4)
    assert isinstance(gelu_rms(sympy.sqrt(2)), sympy.Float)

    sigma, d = sympy.symbols("sigma d", positive=True)
    e = gelu_rms(sigma)
    assert not e.is_number and str(e) == "gelu_rms(sigma)"
    assert e.is_nonnegative
    assert str(gelu_grad_rms(sigma)) == "gelu_grad_rms(sigma)"
    assert isinstance(e.subs(sigma, 1), sympy.Float)
    expr = 3 * gelu_rms(sigma / sympy.sqrt(d))
    val = float(expr.xreplace({sigma: sympy.Integer(2), d: sympy.Integer(4)}).evalf())
    assert val == pytest.approx(3 * 0.65209, abs=1e-3)
    assert float(gelu_rms(sympy.sqrt(d) / 2).subs(d, 4)) == pytest.approx(0.65209, abs=1e-4)
    lam = sympy.lambdify(sigma, 2 * gelu_rms(sigma), modules="math")
    assert lam(1.0) == pytest.approx(2 * 0.65209, abs=1e-3)

    c = pointwise_rms_function("relu", F.relu, "corr")
    assert float(c(1, 0)) == pytest.approx(1 / math.pi, abs=1e-10)
    rho = sympy.Symbol("rho")
    assert str(c(sigma, rho)) == "relu_corr(sigma, rho)"
    assert float(c(sigma, rho).subs({sigma: 2, rho: 1})) == pytest.approx(1.0, abs=1e-12)
