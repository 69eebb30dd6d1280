"""The typed scale record stored on every analysed node under ``node.meta[META_KEY]``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import sympy

__all__ = ["META_KEY", "Stat", "ScaleRecord", "evaluate"]

#: The one ``node.meta`` key unitscale_fx writes.
META_KEY = "unitscale"


@dataclass(frozen=True)
class Stat:
    """Second-moment statistics of one tensor (a value or its gradient).

    Attributes:
        rms: root-mean-square over all elements (the mean is included), a sympy expression in the
            graph's shape symbols and in input/parameter scales.
        corr: average correlation between two different tokens of the same sequence,
            ``E[<x_i, x_j>] / E[<x_i, x_i>]`` for ``i != j``: 0 for independent tokens, 1 when every
            token carries the same vector. Attention averages over tokens, so this decides how much
            of its input survives the averaging.
        mean: the expected value of an element (e.g. GELU outputs have a positive mean). Reductions
            over features keep the mean and average away the rest.
        trace: for values that are an elementwise function of one earlier tensor, ``(source node,
            function)``; lets rules integrate composite functions (a hand-written tanh-GELU) exactly.
    """

    rms: sympy.Expr
    corr: sympy.Expr = sympy.Integer(0)
    mean: sympy.Expr = sympy.Integer(0)
    trace: Any = field(default=None, compare=False, repr=False)

    def scaled(self, factor: Any) -> "Stat":
        """Statistics of ``factor * x`` for a constant ``factor``."""
        f = sympy.sympify(factor)
        return Stat(sympy.Abs(f) * self.rms, self.corr, f * self.mean)


@dataclass
class ScaleRecord:
    """What the analysis and the rewrite passes know about one node.

    Attributes:
        rule: name of the scale rule that produced ``fwd``/``bwd`` (``None``: no rule, see ``missing``).
        fwd: statistics of the node's output value (a tuple for multi-output ops).
        bwd: statistics of the *true* gradient of the loss w.r.t. the node's output, for the
            graph's current forward (loss not scaled).
        grad: statistics of the gradient actually computed at the output once backward-only scales
            are in place (``grad.rms = bwd.rms * grad_factor``).
        grad_factor: ``D(node)``: the positive factor between the computed and the true gradient.
        factors: scale factors a pass inserted for this node, e.g. ``{"fwd": 1/sqrt(d)}``.
        role: a short tag set by the passes (``"matmul"``, ``"residual"``, ``"scale"``...).
        missing: the op has no scale rule; its statistics were not predicted.
        note: free text explaining a choice (shown in dumps).
    """

    rule: str | None = None
    fwd: Stat | tuple[Stat | None, ...] | None = None
    bwd: Stat | None = None
    grad: Stat | None = None
    grad_factor: sympy.Expr | None = None
    factors: dict[str, sympy.Expr] = field(default_factory=dict)
    role: str | None = None
    missing: bool = False
    note: str = ""


def evaluate(expr: Any, hints: Mapping[sympy.Symbol, int] | None = None) -> float | None:
    """Numeric value of ``expr`` with shape symbols replaced by ``hints`` (None if not numeric)."""
    if expr is None:
        return None
    e = sympy.sympify(expr)
    if hints:
        e = e.xreplace({k: sympy.Integer(v) for k, v in hints.items()})
    try:
        return float(e.evalf())
    except (TypeError, ValueError):
        return None
