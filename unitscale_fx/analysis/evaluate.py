"""Fast float evaluation of the analysis' sympy expressions.

``sympy.evalf`` follows the *printed* tree of an expression, which for the scale expressions of a
deep model is far larger than the DAG of distinct sub-expressions (they share sub-terms), and it
works in arbitrary precision. The analysis only needs a float at the shape hints, so
:class:`Evaluator` walks each distinct sub-expression once with ``math`` functions and caches
every value (keyed by the sub-expression, so one evaluator serves a whole analysis).

Anything it does not know (an unusual function, a relation it cannot decide) falls back to
``evalf`` on that sub-expression alone, so the result never depends on the fast path knowing
every sympy class.
"""
from __future__ import annotations

import math
import operator
import sys
from typing import Any, Callable, Mapping

import sympy

from .sizefn import value as _sizefn_value

__all__ = ["Evaluator", "digamma", "trigamma", "harmonic"]

_EULER_GAMMA = 0.5772156649015329
_ZETA2 = math.pi**2 / 6


def digamma(x: float) -> float:
    """psi(x) by upward recurrence to x >= 10, then the asymptotic series (|error| < 1e-14)."""
    if x <= 0 and x == math.floor(x):
        raise ZeroDivisionError("digamma has a pole at non-positive integers")
    acc = 0.0
    if x < 0:  # reflection
        return digamma(1.0 - x) - math.pi / math.tan(math.pi * x)
    while x < 10.0:
        acc -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    series = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f * (1 / 132 - f * 691 / 32760)))))
    return acc + math.log(x) - 0.5 / x - series


def trigamma(x: float) -> float:
    """psi'(x) for x > 0: recurrence to x >= 10, then the asymptotic series (|error| < 1e-14)."""
    if x <= 0:
        raise ValueError("trigamma is evaluated for positive arguments only")
    acc = 0.0
    while x < 10.0:
        acc += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    # 1/x + 1/(2x^2) + 1/(6x^3) - 1/(30x^5) + 1/(42x^7) - 1/(30x^9) + 5/(66x^11)
    return acc + 1.0 / x + 0.5 * f + (1.0 / x) * f * (1 / 6 - f * (1 / 30 - f * (1 / 42 - f * (1 / 30 - f * 5 / 66))))


def _polygamma(n: float, x: float) -> float:
    if n == 0:
        return digamma(x)
    if n == 1:
        return trigamma(x)
    raise ValueError("only polygamma of order 0 and 1 is evaluated in floats")


def harmonic(n: float, m: float = 1.0) -> float:
    """Harmonic number ``H_n`` (``m = 1``) or ``H_n^(2)`` (``m = 2``) of a real ``n >= 0``, in floats."""
    if m == 1:
        return digamma(n + 1.0) + _EULER_GAMMA
    if m == 2:
        return _ZETA2 - trigamma(n + 1.0)
    raise ValueError("only harmonic numbers of order 1 and 2 are evaluated in floats")


def _over_args(fn: Callable[[list], float]) -> Callable[..., float]:
    return lambda *args: fn(args)


_FUNCTIONS: dict[str, Callable[..., float]] = {
    "exp": math.exp,
    "log": lambda x, base=None: math.log(x) if base is None else math.log(x) / math.log(base),
    "Abs": abs,
    "sin": math.sin,
    "cos": math.cos,
    "tanh": math.tanh,
    "cosh": math.cosh,
    "sinh": math.sinh,
    "atan": math.atan,
    "erf": math.erf,
    "erfc": math.erfc,
    "gamma": math.gamma,
    "loggamma": math.lgamma,
    "floor": math.floor,
    "ceiling": math.ceil,
    "sign": lambda x: float((x > 0) - (x < 0)),
    "Min": _over_args(min),
    "Max": _over_args(max),
    "digamma": digamma,
    "polygamma": _polygamma,
    "harmonic": harmonic,
    "SizeFunction": lambda slot, *sizes: _sizefn_value(int(slot), [int(round(x)) for x in sizes]),
}

_RELATIONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}


class Evaluator:
    """Float value of sympy expressions with symbols bound by ``env``; ``None`` if not numeric.

    Sub-expression values are cached for the evaluator's lifetime: make a new one when the
    bindings change.
    """

    def __init__(self, env: Mapping[Any, float]):
        self.env = {k: float(v) for k, v in env.items()}
        self._by_name = {str(k): v for k, v in self.env.items()}
        self._cache: dict[Any, float | None] = {}

    def __call__(self, expr: Any) -> float | None:
        if expr is None:
            return None
        if isinstance(expr, bool):
            return float(expr)
        if isinstance(expr, (int, float)):
            return float(expr)
        try:
            e = sympy.sympify(expr)
        except (sympy.SympifyError, TypeError):
            return None
        limit = sys.getrecursionlimit()
        try:
            sys.setrecursionlimit(max(limit, 20000))
            value = self._value(e)
        except RecursionError:
            value = self._evalf(e)
        finally:
            sys.setrecursionlimit(limit)
        return value

    # ---------------------------------------------------------------- internals
    def _value(self, e: Any) -> float | None:
        try:
            return self._cache[e]
        except KeyError:
            pass
        except TypeError:  # unhashable
            return self._evalf(e)
        v = self._compute(e)
        if v is not None and not isinstance(v, float):
            v = None if isinstance(v, complex) else float(v)
        self._cache[e] = v
        return v

    def _symbol(self, s: sympy.Symbol) -> float | None:
        v = self.env.get(s)
        return self._by_name.get(s.name) if v is None else v

    def _evalf(self, e: Any) -> float | None:
        """The slow, general path for one sub-expression."""
        try:
            # every bound symbol (a handful), not ``e.free_symbols``: that walks the printed tree
            subs = {s: sympy.Float(v) for s, v in self.env.items() if isinstance(s, sympy.Basic)}
            c = complex(e.xreplace(subs).evalf())
        except (TypeError, ValueError, OverflowError, AttributeError, ZeroDivisionError):
            return None
        if abs(c.imag) > 1e-12 * max(1.0, abs(c.real)):
            return None
        return c.real

    def _compute(self, e: Any) -> float | None:
        if e is sympy.true or e is sympy.false:
            return float(e is sympy.true)
        if e.is_Symbol:
            return self._symbol(e)
        if e is sympy.oo:
            return math.inf
        if e is sympy.S.NegativeInfinity:
            return -math.inf
        if e is sympy.zoo or e is sympy.nan:
            return math.nan
        if e.is_Number or isinstance(e, sympy.NumberSymbol):
            try:
                return float(e)
            except (TypeError, ValueError, OverflowError):
                return None
        try:
            if e.is_Add or e.is_Mul:
                acc = 0.0 if e.is_Add else 1.0
                for a in e.args:
                    v = self._value(a)
                    if v is None:
                        return None
                    acc = acc + v if e.is_Add else acc * v
                return acc
            if e.is_Pow:
                b, x = self._value(e.args[0]), self._value(e.args[1])
                if b is None or x is None:
                    return None
                if b == 0 and x < 0:
                    return math.inf
                r = b**x
                return None if isinstance(r, complex) else float(r)
            if isinstance(e, sympy.Piecewise):
                for piece, cond in e.args:
                    c = self._value(cond)
                    if c is None:
                        return self._evalf(e)
                    if c:
                        return self._value(piece)
                return None
            if isinstance(e, sympy.core.relational.Relational):
                a, b = self._value(e.lhs), self._value(e.rhs)
                rel = _RELATIONS.get(e.rel_op)
                if a is None or b is None or rel is None:
                    return None
                return float(rel(a, b))
            if isinstance(e, (sympy.And, sympy.Or, sympy.Not)):
                vals = [self._value(a) for a in e.args]
                if any(v is None for v in vals):
                    return None
                if isinstance(e, sympy.Not):
                    return float(not vals[0])
                return float(all(vals) if isinstance(e, sympy.And) else any(vals))
            fn = _FUNCTIONS.get(type(e).__name__)
            if fn is not None:
                args = [self._value(a) for a in e.args]
                if any(a is None for a in args):
                    return None
                return float(fn(*args))
        except (ValueError, ZeroDivisionError, OverflowError, TypeError):
            return self._evalf(e)
        return self._evalf(e)
