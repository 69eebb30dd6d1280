"""Closed-form statistics of scaled dot-product attention at initialisation.

``out = softmax(scale * q @ k^T + mask) @ v`` (per head). Given the RMS and the cross-token
correlation of ``q``, ``k``, ``v`` and of the gradient reaching ``out``, :func:`attention_stats`
returns sympy expressions, symbolic in the shape symbols (sequence lengths, head dimension), for

* the RMS of ``out`` and its cross-token correlation;
* the RMS of the gradients w.r.t. ``q``, ``k`` and ``v``;
* the variance of the logits across keys (``logit_var``) and ``E[sum_j p_j^2]`` (``sum_p2``).

The derivation, the approximations and the accuracy measured against Monte Carlo are written up in
``docs/attention_scaling.md``. In short, for ``n`` keys whose logits (for one query) are i.i.d.
``N(., s2)``, the softmax moments are written as mixtures of simple poles in ``n``,

    E[sum_j p_j^2]                              ~=  sum_k w_k a_k / (n - 1 + a_k)
    E[sum_j p_j^2 - 2 p_j^3 + (sum_j p_j^2)^2]  ~=  sum_k w_k a_k (n - 1) / ((n - 1 + a_k)(n - 1 + c_k))

(exact at ``n = 1`` and at ``s2 = 0``, ``e^{s2} / n`` tail), so that the average over the query
positions of a causal mask (``n = 1 ... S``) has a closed form in digamma functions of ``S``. The
``a_k`` are the 8 Gauss-Hermite nodes of a shifted log-normal law of mean ``e^{s2}``, the ``c_k``
a power of them; their six shape constants were fitted once to a numerically exact evaluation
of the softmax moments (``n = 1 ... 4096``, ``s2`` in ``[0, 4]``); see the doc for the residuals.

Arguments may be numbers, symbols or expressions; results are sympy. With all arguments numeric the
arithmetic runs in Python floats (same formulas, see :func:`_dual`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import sympy
from sympy.integrals.quadrature import gauss_hermite

from .evaluate import digamma, harmonic, trigamma

__all__ = [
    "AttentionStats",
    "attention_stats",
    "logit_variance",
    "sum_p2_full",
    "sum_p2_causal",
    "backward_weight_full",
    "backward_weight_causal",
    "overlap_full",
    "overlap_causal",
]

# ---------------------------------------------------------------------------------------------
# Fitted constants of the softmax-moment model (docs/attention_scaling.md, "Pole-mixture model").
# a = 1 + (e^{s2} - 1) * LN,     ln LN ~ N(-tau^2 / 2, tau^2),  tau^2 = 1.21 + 1.05 s2 + 0.022 s2^2
# c = 1 + gamma (a - 1)^p,        gamma = 3.1 s2^0.1,            p = 0.757
# ---------------------------------------------------------------------------------------------
_GH_ORDER = 8
_TAU_A = (1.21, 1.05, 0.022)
_GAMMA = (3.1, 0.1)
_P = 0.757
#: Causal overlap: sum_{n < n'} g(n) ~= (n' - 1) g(LAMBDA * n') (see the doc).
_LAMBDA = 0.42


def _s(x: Any) -> sympy.Expr:
    return sympy.sympify(x)


# Every function below is written once and runs in one of two number systems: Python floats (all
# arguments numeric: the analysis' usual case, about 100x faster than sympy Floats) or sympy
# expressions (some argument symbolic). The public functions (:func:`_dual`) pick the system from
# their arguments and always return sympy; the helpers here dispatch on the type of their argument.
Num = Any  # float | sympy.Expr


def _isf(x: Any) -> bool:
    return isinstance(x, float)


def _is_number(x: Num) -> bool:
    return _isf(x) or bool(x.is_number)


def _exp(x: Num) -> Num:
    return math.exp(x) if _isf(x) else sympy.exp(x)


def _cosh(x: Num) -> Num:
    return math.cosh(x) if _isf(x) else sympy.cosh(x)


def _root(x: Num) -> Num:
    return math.sqrt(x) if _isf(x) else sympy.sqrt(x)


@lru_cache(maxsize=None)
def _gh_nodes() -> tuple[tuple[sympy.Float, sympy.Float], ...]:
    """Gauss-Hermite nodes/weights for a standard normal variable (weights sum to 1)."""
    xs, ws = gauss_hermite(_GH_ORDER, 20)
    root2 = sympy.sqrt(2)
    out = []
    for x, w in zip(xs, ws):
        out.append((sympy.Float((root2 * x).evalf(20), 20), sympy.Float((w / sympy.sqrt(sympy.pi)).evalf(20), 20)))
    return tuple(out)


@lru_cache(maxsize=None)
def _gh_nodes_float() -> tuple[tuple[float, float], ...]:
    return tuple((float(z), float(w)) for z, w in _gh_nodes())


def _poly(coeffs: tuple[float, ...], x: Num) -> Num:
    if _isf(x):
        return sum(c * x**i for i, c in enumerate(coeffs))
    return sum((sympy.Float(c) * x**i for i, c in enumerate(coeffs)), sympy.Integer(0))


def _shifted_lognormal(mean_minus_one: Num, tau2: Num) -> list[tuple[Num, Num]]:
    """``[(weight, 1 + mean_minus_one * exp(tau z - tau^2 / 2))]`` over the Gauss-Hermite nodes."""
    tau = _root(tau2)
    if _isf(tau2):
        return [(w, 1.0 + mean_minus_one * math.exp(tau * z - tau2 / 2)) for z, w in _gh_nodes_float()]
    return [(w, _tidy(1 + mean_minus_one * sympy.exp(tau * z - tau2 / 2))) for z, w in _gh_nodes()]


def _f_poles(s2: Num) -> list[tuple[Num, Num]]:
    """Poles ``(w_k, a_k)`` of ``E[sum p^2] ~= sum_k w_k a_k / (n - 1 + a_k)``."""
    return _shifted_lognormal(_exp(s2) - 1, _poly(_TAU_A, s2))


def _t_poles(s2: Num) -> list[tuple[Num, Num, Num]]:
    """``(w_k, a_k, c_k)`` of the backward weight ``sum_k w_k a_k (n - 1) / ((n - 1 + a_k)(n - 1 + c_k))``."""
    if _isf(s2):
        gamma = _GAMMA[0] * s2 ** _GAMMA[1]
        return [(w, a, 1.0 + gamma * (a - 1) ** _P) for w, a in _f_poles(s2)]
    gamma = sympy.Float(_GAMMA[0]) * s2 ** sympy.Float(_GAMMA[1])
    return [(w, a, _tidy(1 + gamma * (a - 1) ** sympy.Float(_P))) for w, a in _f_poles(s2)]


def _tidy(e: Any) -> Num:
    """Evaluate every purely numeric sub-expression (a Float when nothing symbolic is left)."""
    if _isf(e):
        return e
    e = sympy.sympify(e)
    if not e.free_symbols:
        return e.evalf(15)

    def walk(x: sympy.Basic) -> sympy.Basic:
        if not x.args:
            return x.evalf(15) if isinstance(x, sympy.NumberSymbol) else x
        if not x.free_symbols and not x.is_Number:
            return x.evalf(15)
        return x.func(*[walk(a) for a in x.args])

    return walk(e)


def _sqrt(e: Num) -> Num:
    """Square root without sympy's (slow, here useless) sign analysis of large symbolic radicands."""
    if _isf(e):
        return math.sqrt(e)
    e = sympy.sympify(e)
    return sympy.sqrt(e) if not e.free_symbols else sympy.Pow(e, sympy.S.Half, evaluate=False)


def _finish(e: Any) -> Num:
    """A Float when nothing symbolic is left; symbolic results are returned as built (their numeric
    pieces were evaluated on construction, see :func:`_pg`)."""
    if _isf(e):
        return e
    e = sympy.sympify(e)
    return e.evalf(15) if not e.free_symbols else e


def _prod(*factors: Any) -> Num:
    """Product of the factors, left unevaluated when symbolic (sympy's flattening of a coefficient
    into a large symbolic square root runs a slow sign analysis that gains nothing here)."""
    if all(_isf(f) for f in factors):
        return math.prod(factors)
    fs = [sympy.sympify(f) for f in factors]
    fs = [f for f in fs if f != 1]
    if not fs:
        return sympy.Integer(1)
    if len(fs) == 1 or not any(f.free_symbols for f in fs):
        return sympy.Mul(*fs)
    return sympy.Mul(*fs, evaluate=False)


def _pg(order: int, x: Num) -> Num:
    """``polygamma(order, x)``, evaluated right away when ``x`` is a positive number (in floats:
    :func:`~unitscale_fx.analysis.evaluate.digamma` / ``trigamma``, |error| < 1e-14; sympy's
    arbitrary-precision evaluation was most of the analysis time of a causal model)."""
    if _isf(x) and x > 0 and order in (0, 1):
        return digamma(x) if order == 0 else trigamma(x)
    x = sympy.sympify(x)
    if not x.free_symbols:
        xf = float(x)
        if xf > 0 and order in (0, 1):
            return sympy.Float(digamma(xf) if order == 0 else trigamma(xf), 15)
        return sympy.polygamma(order, x).evalf(15)
    return sympy.polygamma(order, x)


def _harmonic(S: Num, m: int = 1) -> Num:
    if _isf(S) and S >= 0 and m in (1, 2):
        return harmonic(S, m)
    S = sympy.sympify(S)
    if not S.free_symbols:
        sf = float(S)
        if sf >= 0 and m in (1, 2):  # H_S = psi(S + 1) + gamma; H_S^(2) = zeta(2) - psi'(S + 1)
            return sympy.Float(harmonic(sf, m), 15)
        return sympy.harmonic(S, m).evalf(15)
    return sympy.harmonic(S) if m == 1 else sympy.harmonic(S, m)


def _to_systems(args: list[Any]) -> tuple[list[Any], list[Any] | None]:
    """The arguments as sympy, and as floats when every one is a finite real number and one at
    least is inexact (a float; else ``None``): exact numbers (integers, rationals) keep exact
    results, symbols symbolic ones. ``None`` and ``bool`` pass through."""
    conv = [a if a is None or isinstance(a, bool) else _s(a) for a in args]
    nums = [a for a in conv if a is not None and not isinstance(a, bool)]
    if any(a.is_Float for a in nums) and all(not a.free_symbols and a.is_real is not False for a in nums):
        try:
            floats = [float(a) for a in nums]
        except (TypeError, ValueError):
            return conv, None
        if all(math.isfinite(f) for f in floats):
            it = iter(floats)
            return conv, [a if a is None or isinstance(a, bool) else next(it) for a in conv]
    return conv, None


def _to_sympy(x: Any) -> Any:
    if _isf(x):
        return sympy.Float(x, 15)
    if isinstance(x, AttentionStats):
        return AttentionStats(**{f.name: _to_sympy(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return sympy.sympify(x)


def _dual(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Public face of a generic function: arguments in one number system (:func:`_to_systems`),
    results as sympy (Floats when numeric). Where floats fail (``exp`` of a logit variance past 709
    overflows) the same formulas run again in sympy's arbitrary-precision numbers. ``fn.generic`` is the
    raw function, for internal calls."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def public(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        keys = list(bound.arguments)
        exact, floats = _to_systems([bound.arguments[k] for k in keys])
        if floats is not None:
            try:
                return _to_sympy(fn(**dict(zip(keys, floats))))
            except (OverflowError, ZeroDivisionError, ValueError):  # ValueError: math domain error
                pass
        return _to_sympy(fn(**dict(zip(keys, exact))))

    public.generic = fn  # type: ignore[attr-defined]
    return public


# ---------------------------------------------------------------------------------------------
# softmax moments for i.i.d. N(0, s2) logits
# ---------------------------------------------------------------------------------------------
@_dual
def logit_variance(*, d: Any, scale: Any, q_rms: Any, k_rms: Any, k_corr: Any = 0) -> Num:
    """Variance across keys of one query's logits: ``scale^2 d q_rms^2 k_rms^2 (1 - k_corr)``.

    The part of ``k`` shared by all tokens shifts every logit of a query equally and cannot change
    the softmax, hence the ``(1 - k_corr)``.
    """
    return scale**2 * d * q_rms**2 * k_rms**2 * (1 - k_corr)


@_dual
def sum_p2_full(n: Any, s2: Any) -> Num:
    """``E[sum_j p_j^2]`` for a softmax over ``n`` keys with i.i.d. ``N(0, s2)`` logits.

    Pole mixture ``sum_k w_k a_k / (n - 1 + a_k)``: exactly 1 at ``n = 1``, ``1/n`` at ``s2 = 0``,
    ``~ e^{s2} / n`` for ``n >> e^{2 s2}``; within 1.2 % (``s2 <= 1``) and 5 % (``s2 <= 4``) of the
    exact value for ``n = 1 ... 16384``.
    """
    return _finish(sum(w * a / (n - 1 + a) for w, a in _f_poles(s2)))


@_dual
def sum_p2_causal(S: Any, s2: Any) -> Num:
    """Average of :func:`sum_p2_full` over the query positions of a causal mask (``n = 1 ... S``).

    ``(1/S) sum_k w_k a_k (digamma(S + a_k) - digamma(a_k))``.
    """
    total = sum(w * a * (_pg(0, S + a) - _pg(0, a)) for w, a in _f_poles(s2))
    return _finish(total / S)


@_dual
def backward_weight_full(n: Any, s2: Any) -> Num:
    """``E[sum_j p_j^2 - 2 sum_j p_j^3 + (sum_j p_j^2)^2]`` over ``n`` keys (i.i.d. ``N(0, s2)`` logits).

    This is ``E[sum_j p_j^2 (u_j - sum_l p_l u_l)^2] / Var(u)`` for i.i.d. ``u`` independent of
    ``p``: the factor by which the softmax backward shrinks the gradient reaching the logits. It is
    0 at ``n = 1``, ``(n - 1) / n^2`` at ``s2 = 0``, ``~ e^{s2} / n`` for large ``n``. Modelled as
    ``sum_k w_k f_k(n) (1 - g_k(n))`` with ``f_k = a_k / (n - 1 + a_k)`` (the poles of
    :func:`sum_p2_full`) and ``g_k = c_k / (n - 1 + c_k)``: positive and below ``sum_p2`` by
    construction; within 3.2 % of the exact value for ``s2 <= 4``, ``n <= 4096``.
    """
    return _finish(sum(w * a * (n - 1) / ((n - 1 + a) * (n - 1 + c)) for w, a, c in _t_poles(s2)))


@_dual
def backward_weight_causal(S: Any, s2: Any) -> Num:
    """Average of :func:`backward_weight_full` over ``n = 1 ... S`` (digamma closed form)."""
    total = 0
    for w, a, c in _t_poles(s2):
        da = _pg(0, S + a) - _pg(0, a)
        diff = c - a
        if _is_number(diff) and abs(float(diff)) < 1e-6 * float(a):
            # confluent limit c -> a: sum_{m<S} a m / (m + a)^2
            total += w * a * (da - a * (_pg(1, a) - _pg(1, S + a)))
        else:
            dc = _pg(0, S + c) - _pg(0, c)
            total += w * a / diff * (c * dc - a * da)
    return _finish(total / S)


def _kappa(s2: Num, rho: Num, d: Any) -> Num:
    """Fraction of the excess ``E[sum p^2] - 1/n`` shared by the weights of two different queries.

    Two queries' logits for the same key have correlation ``C`` (mean ``rho = q_corr``, spread
    ``(1 - rho^2)/sqrt(d)`` from the finite head dimension); to leading order
    ``E[n^2 p_i p_i'] = E[e^{C s2}]``, so ``kappa = (E[e^{C s2}] - 1) / (e^{s2} - 1)``.
    """
    if s2 == 0:
        return rho
    spread = _cosh(s2 * (1 - rho**2) / _root(d)) if d is not None else 1
    return _tidy((_exp(rho * s2) * spread - 1) / (_exp(s2) - 1))


@_dual
def overlap_full(n: Any, s2: Any, rho: Any = 0, d: Any = None) -> Num:
    """``E[sum_j p_ij p_i'j]`` for two different queries ``i != i'`` over the same ``n`` keys.

    ``1/n + kappa (E[sum p^2] - 1/n)``: exactly ``1/n`` for independent logits, ``E[sum p^2]`` for
    identical ones. ``rho`` is the correlation of the two queries (``q_corr``); ``d`` (optional) the
    head dimension, which adds the small overlap due to the random overlap of two query directions.
    """
    return _finish(1 / n + _kappa(s2, rho, d) * (sum_p2_full.generic(n, s2) - 1 / n))


@_dual
def overlap_causal(S: Any, s2: Any, rho: Any = 0, d: Any = None) -> Num:
    """:func:`overlap_full` averaged over the ordered pairs ``i != i'`` of a causal ``S x S`` mask.

    Queries with ``n < n'`` keys share ``n`` keys; ``O(n, n') ~= (1 + kappa (n F(n) - 1)) / n'`` with
    ``F = sum_p2_full``. The independent part sums to ``2 (S - H_S) / (S (S - 1))`` exactly; the
    shared part uses ``sum_{n < n'} (n F(n) - 1) ~= (n' - 1) (x F(x) - 1)|_{x = 0.42 n'}`` (within 6 %
    of the double sum for ``S = 32 ... 2048``, ``s2 <= 4``), which keeps a digamma closed form.
    """
    if _is_number(S) and S <= 1:
        return 0.0 if _isf(S) else sympy.Integer(0)
    H = _harmonic(S)
    lam = _LAMBDA
    poles = _f_poles(s2)
    m1 = sum(w * a for w, a in poles)
    shared = (m1 - 1) * (S - H)
    for w, a in poles:
        b = (a - 1) / lam
        shared -= w * a * ((1 + b) * (_pg(0, S + 1 + b) - _pg(0, 1 + b)) - H)
    return _finish(2 * ((S - H) + _kappa(s2, rho, d) * shared) / (S * (S - 1)))


def _inv_n_weighted_causal(S: Num, s2: Num) -> Num:
    """``sum_{n=1}^S F(n) / n`` with ``F = sum_p2_full``."""
    H = _harmonic(S)
    total = 0
    for w, a in _f_poles(s2):
        b = a - 1
        if _is_number(b) and abs(float(b)) < 1e-9:
            total += w * a * _harmonic(S, 2)
        else:
            total += w * a / b * (H - _pg(0, S + a) + _pg(0, a))
    return total


def _log_weighted_causal(S: Num, s2: Num) -> Num:
    """``sum_{n=1}^S F(n) (H_S - H_n)``, with ``H_S - H_n ~= h(S + a - 1) - h(n + a - 1)`` per pole.

    ``h(x) = digamma(x + 1) + EulerGamma``; exact for ``a = 1`` (``(H_S^2 - H_S^(2)) / 2``), within
    ~6 % for the fitted poles. Uses ``sum_{m=a}^{M} h(m) / m = (h(M)^2 - h(a-1)^2 + sum 1/m^2) / 2``.
    """
    total = 0
    for w, a in _f_poles(s2):
        delta = _pg(0, S + a) - _pg(0, a)
        delta2 = _pg(1, a) - _pg(1, S + a)
        total += w * a * (delta**2 - delta2) / 2
    return total


def _bracketed_overlap(causal: bool, n_or_S: Num, s2: Num, O: Num, F: Num) -> Num:
    """Average over query pairs of ``E[sum_j p_ij p_i'j (1 - p_ij - p_i'j + O_ii')]``.

    The weight of the cross-query terms of ``grad_k`` (the gradients reaching the logits are
    centred per query, which removes ``p_ij`` from the shared part). Non-causal:
    ``O (1 - 2F + O)``; causal: the pair sums of ``F(n)/n'`` and ``F(n')/n'`` in closed form, and
    the ``O^2`` term kept for the pairs where one query sees a single key (it makes the ``S = 2``
    value exact, 0).
    """
    if not causal:
        return O * (1 - 2 * F + O)
    S = n_or_S
    if _is_number(S) and S <= 1:
        return 0.0 if _isf(S) else sympy.Integer(0)
    q = _inv_n_weighted_causal(S, s2)
    corr = _log_weighted_causal(S, s2) + S * F - 2 * q + 1
    out = O - 2 * corr / (S * (S - 1))
    if _isf(out):
        out = max(out, 0.0)
    elif out.is_number:
        out = sympy.Max(out, 0)
    return out


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionStats:
    """Predicted statistics of one attention call at initialisation (sympy expressions).

    Attributes:
        out_rms: RMS of ``out``.
        out_corr: average correlation of two different tokens (queries) of ``out``.
        grad_q_rms / grad_k_rms / grad_v_rms: RMS of the gradient w.r.t. ``q`` / ``k`` / ``v``
            given the gradient at ``out`` (for grouped-query attention, ``k``/``v`` are the shared
            heads: their gradient sums ``kv_repeat`` query heads). RMS over the whole tensor,
            padded keys (zero gradient) included.
        logit_var: variance of one query's logits across keys, ``s2`` (the part of the logits that
            the softmax sees; not the raw second moment of the scores).
        sum_p2: ``E[sum_j p_j^2]`` averaged over queries (``1/n_eff``: the inverse of the effective
            number of keys a query attends to).
        grad_q_corr: cross-token correlation of ``grad_q``: the k-v coupling part is linear in the
            output gradient ``g_i`` and carries its correlation; the diffuse part carries none.
    """

    out_rms: sympy.Expr
    out_corr: sympy.Expr
    grad_q_rms: sympy.Expr
    grad_k_rms: sympy.Expr
    grad_v_rms: sympy.Expr
    logit_var: sympy.Expr
    sum_p2: sympy.Expr
    grad_q_corr: sympy.Expr = sympy.Integer(0)


def _qnorm_nodes(d: Num) -> list[tuple[Num, Num]]:
    """2-point Gauss rule for ``X = |q|^2 / (d q_rms^2) ~ Gamma(d/2, 2/d)`` (exact up to cubics)."""
    al = d / 2
    r = _root(al + 1)
    nodes = [((al + 1 + r) / al, (1 - 1 / r) / 2), ((al + 1 - r) / al, (1 + 1 / r) / 2)]
    return [(_tidy(x), _tidy(w)) for x, w in nodes]


@_dual
def attention_stats(
    *,
    sq: Any,
    sk: Any,
    d: Any,
    scale: Any,
    q_rms: Any,
    k_rms: Any,
    v_rms: Any,
    q_corr: Any = 0,
    k_corr: Any = 0,
    v_corr: Any = 0,
    grad_out_rms: Any = 1,
    grad_out_corr: Any = 0,
    causal: bool,
    valid_keys: Any = None,
    kv_repeat: Any = 1,
    kv_coupling: Any = 0,
    logit_bias_var: Any = 0,
) -> AttentionStats:
    """Statistics of ``out = softmax(scale * q @ k^T + mask) @ v`` and of its gradients at init.

    Args:
        sq, sk: number of queries / keys per sequence (``sq != sk``: cross-attention).
        d: head dimension.
        scale: the logit scale (``1/sqrt(d)`` for standard attention).
        q_rms, k_rms, v_rms, q_corr, k_corr, v_corr: RMS and cross-token correlation of the inputs
            (``q``, ``k``, ``v`` independent of each other, as at random initialisation).
        grad_out_rms, grad_out_corr: RMS and cross-token correlation of the gradient at ``out``
            (assumed independent of ``q``, ``k``, ``v``).
        causal: causal mask (query ``i`` sees keys ``0 ... i``); needs ``sq == sk``.
        valid_keys: non-causal only: average number of unmasked keys per query (key padding);
            ``sk`` when ``None``. The statistics are ~``1/n`` in the number of keys, so the
            harmonic mean of the per-sequence counts is the exact choice, the arithmetic mean a
            slight under-estimate of ``sum_p2`` when the counts differ a lot.
        kv_repeat: grouped-query attention: number of query heads sharing one ``k``/``v`` head.
        kv_coupling: ``1/D`` when ``k`` and ``v`` are linear projections of one input of width
            ``D`` (the usual case), 0 when independent. For one draw of the weights, the keys a
            query favours then carry a common part of ``v``: the output gains a coherent term of
            mean square ``(1 - F)^2 s2 / D`` next to the diffuse ``F = E[sum p^2]``, which
            dominates at long sequences (see docs/attention_scaling.md, "k-v coupling").
        logit_bias_var: variance across keys of an additive bias in the logits that does not come
            from ``q . k`` (a learned position bias, T5's): it concentrates the weights like any
            logit variance, but not more for a query of larger norm, and neither tilts the keys
            toward ``q_i`` nor scales ``grad_k`` (which is ``scale * sum_i dS_ij q_i``).

    Returns:
        :class:`AttentionStats`.
    """
    qc, kc, vc, g, gc, r = q_corr, k_corr, v_corr, grad_out_rms, grad_out_corr, kv_repeat
    if causal:
        if valid_keys is not None:
            raise ValueError("attention_stats: valid_keys (key padding) is only modelled for non-causal attention")
        diff = sq - sk if _isf(sq) and _isf(sk) else sympy.expand(sq - sk)
        if _is_number(diff) and diff != 0:
            raise ValueError(f"attention_stats: a causal mask needs sq == sk, got sq={sq}, sk={sk}")
    n = sk if valid_keys is None else valid_keys

    s2 = _tidy(logit_variance.generic(d=d, scale=scale, q_rms=q_rms, k_rms=k_rms, k_corr=kc))

    # Average over the query-norm fluctuation: logits of query i have variance s2 * X_i.
    F = TQ = TX = O = Ob = onemF = C1 = C2 = 0
    bv = logit_bias_var
    for x, w in _qnorm_nodes(d):
        s2x = _tidy(s2 * x + bv) if not (_is_number(bv) and bv == 0) else _tidy(s2 * x)
        s2q = _tidy(s2 * x)  # the q . k part: the softmax tilts the keys along q_i by this much
        if causal:
            Fx = sum_p2_causal.generic(sq, s2x)
            Tx = backward_weight_causal.generic(sq, s2x)
            Ox = overlap_causal.generic(sq, s2x, qc, d)
        else:
            Fx = sum_p2_full.generic(n, s2x)
            Tx = backward_weight_full.generic(n, s2x)
            Ox = overlap_full.generic(n, s2x, qc, d)
        Obx = _bracketed_overlap(causal, sq if causal else n, s2x, Ox, Fx)
        F += w * Fx
        Ob += w * Obx
        # grad_q: the key component along q_i is tilted by the softmax: (d + s2) / d for many keys,
        # ~1 when few keys dominate; (T/F)^5 interpolates (empirical, see the doc).
        TQ += w * Tx * (1 + s2q * (Tx / Fx) ** 5 / d)
        TX += w * x * Tx
        O += w * Ox
        onemF += w * x * (1 - Fx)
        C1 += w * (1 - Fx) ** 2          # k-v coupling of grad_q
        C2 += w * x * (1 - Fx) ** 2      # k-v coupling of out (the tilt grows with |q_i|^2)

    # Alignment of q_i with the keys it attends to (Stein: E[p_j x_j] = s2 E[p_j (1 - p_j)]):
    # sum over keys j and query pairs i != i' that see j of E[p_ij u_i] E[p_i'j u_i'] / (beta q_rms^2)^2,
    # times the same centring factor as the cross-query term (Ob / O).
    if causal:
        align = onemF**2 * 2 * (sq - _harmonic(sq))
    else:
        align = onemF**2 * sq * (sq - 1) / n
    align = align * Ob / O if not (_is_number(O) and O == 0) else 0

    # k-v coupling: the softmax tilts the keys' shared input x_j along a = scale Wk q_i
    # (|a|^2 = s2 x): E_p[v_j] = (1 - F) Wv^T a, of mean square s2 x (1 - F)^2 / D per component
    # (correlated across queries as q is); the same tilt gives grad_q the coherent part
    # scale Wk Cov_p(x) Wv^T g, of mean square scale^2 d k^2 g^2 v^2 (1 - F)^2 / D.
    kvc = kv_coupling
    coh_out = (1 - vc) * kvc * s2 * C2
    coh_q = d * (1 - kc) * (1 - vc) * kvc * C1

    # Mean squares, with the input scales pulled out of the square roots (RMS values are >= 0).
    out_ms = vc + (1 - vc) * F + coh_out
    out_corr = (vc + (1 - vc) * O + qc * coh_out) / out_ms
    gq_ms = d * (1 - kc) * (1 - vc) * TQ + coh_q
    gk_ms = r * (1 - vc) * (d * sq * (TX + qc * gc * (sq - 1) * Ob) + s2 * gc * align) / sk
    gv_ms = r * sq * (F + gc * (sq - 1) * O) / sk
    abs_scale = abs(scale) if _isf(scale) else sympy.Abs(scale)

    return AttentionStats(
        out_rms=_finish(_prod(v_rms, _sqrt(out_ms))),
        out_corr=_finish(out_corr),
        grad_q_rms=_finish(_prod(abs_scale, k_rms, g, v_rms, _sqrt(gq_ms))),
        grad_k_rms=_finish(_prod(abs_scale, q_rms, g, v_rms, _sqrt(gk_ms))),
        grad_v_rms=_finish(_prod(g, _sqrt(gv_ms))),
        logit_var=_tidy(s2 + bv),
        sum_p2=_finish(F),
        grad_q_corr=_finish(gc * coh_q / gq_ms) if not (_is_number(kvc) and kvc == 0) else 0.0,
    )
