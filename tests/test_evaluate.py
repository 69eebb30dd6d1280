"""The analysis' fast float evaluator agrees with sympy's arbitrary-precision ``evalf``."""
from __future__ import annotations

import math

import pytest
import sympy

from unitscale_fx.analysis.evaluate import Evaluator, digamma, trigamma

n = sympy.Symbol("n", positive=True, integer=True)
x = sympy.Symbol("x", positive=True)

CASES = [
    1 / sympy.sqrt(n),
    sympy.polygamma(0, n + sympy.Float(1.37)) - sympy.polygamma(0, sympy.Float(1.37)),
    sympy.polygamma(1, n + sympy.Float(0.5)),
    sympy.harmonic(n),
    sympy.harmonic(n, 2),
    sympy.Min(n, 3) + sympy.Max(x, n),
    sympy.exp(-n / 10) * sympy.log(n) + sympy.erf(x / 9),
    sympy.Piecewise((n, n > 3), (0, True)),
    sympy.cosh(x) * sympy.tanh(x) / (1 + sympy.Abs(x - n)),
    sympy.sqrt(sympy.Float(0.4) + sympy.Float(0.35) * (sympy.polygamma(0, n + sympy.Float(3.42)) - 0.58) / n),
]


@pytest.mark.parametrize("expr", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("nv,xv", [(1, 0.3), (7, 2.5), (128, 0.9), (4096, 11.0)])
def test_matches_evalf(expr, nv, xv):
    ref = float(expr.subs({n: nv, x: xv}).evalf(30))
    assert Evaluator({n: nv, x: xv})(expr) == pytest.approx(ref, rel=1e-12, abs=1e-300)


def test_special_functions_against_mpmath_values():
    for v in (0.1, 0.5, 1.0, 1.5, 5.9, 6.0, 37.2, 1e4):
        assert digamma(v) == pytest.approx(float(sympy.polygamma(0, v).evalf(30)), rel=1e-13, abs=1e-14)
        assert trigamma(v) == pytest.approx(float(sympy.polygamma(1, v).evalf(30)), rel=1e-13)
    assert digamma(-0.5) == pytest.approx(float(sympy.polygamma(0, -0.5).evalf(30)), rel=1e-13)
    with pytest.raises(ZeroDivisionError):
        digamma(0.0)


def test_unknown_symbols_and_non_numbers_are_none():
    ev = Evaluator({n: 3})
    assert ev(x + n) is None
    assert ev(None) is None
    assert ev(sympy.sqrt(-1 - n)) is None  # complex
    assert ev(2) == 2.0 and ev(sympy.Rational(1, 3)) == pytest.approx(1 / 3)


def test_shared_dag_is_linear_time():
    e = x
    for _ in range(80):  # printed tree of 2**80 nodes
        sq = sympy.Mul(e, e, evaluate=False)  # built unevaluated: sympy's own canonicalisation is exponential
        e = sympy.Mul(sympy.Add(e, sq, evaluate=False),
                      sympy.Pow(sympy.Add(e, 1, evaluate=False), -1, evaluate=False), evaluate=False)
    v = Evaluator({x: 0.5})(e)
    assert v is not None and math.isfinite(v)


def test_unknown_function_falls_back_to_evalf():
    expr = sympy.besselj(0, x)  # not in the fast table
    assert Evaluator({x: 1.3})(expr) == pytest.approx(float(sympy.besselj(0, 1.3).evalf()), rel=1e-12)
