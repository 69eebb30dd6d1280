"""Backward unit scaling: backward-only gradient scales that keep every gradient valid.

For every node ``n`` the pass chooses a positive factor ``D(n)``: the gradient computed at ``n``
will be ``D(n)`` times the true gradient of the (rewritten) forward. It wants ``D(n) = 1/T(n)``,
``T(n)`` being the predicted RMS of the true gradient, so that every gradient is unit-scaled.
On each edge ``n -> c`` where ``D(n) != D(c)`` it inserts ``grad_scale(n, D(n)/D(c))``: the
identity forward, a multiply by the ratio backward.

Why the gradient stays valid: by induction in reverse topological order, the gradient reaching
``n`` is ``sum_c (D(n)/D(c)) * D(c) * true_contribution_c = D(n) * true_gradient(n)``. So every
parameter's gradient is the true gradient times the positive constant ``D(p)``. Nodes with several
outputs (``split``) share one factor across their outputs; ``D`` of the loss is 1, so the loss
value and the gradient a user sends into the outputs are untouched. Validity does not depend on
the predictions being accurate; only unit-ness does.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import sympy
import torch.fx as fx

from ..analysis.propagate import GraphAnalysis
from ..analysis.record import META_KEY
from ..runtime import grad_scale
from .base import Pass, PassResult, TransformState, materialize

__all__ = ["UnitScaleBackward"]

_SNAP = 0.1  # |log2| within which a node reuses a consumer's factor instead of a new scale


@dataclass(frozen=True)
class UnitScaleBackward(Pass):
    name: ClassVar[str] = "unit_scale_backward"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        cap = state.capture
        ga = state.final_analysis
        if ga is None or ga.gm is not gm:
            ga = GraphAnalysis(gm, hints=dict(state.hints), param_stats=dict(state.param_stats),
                               example_values=dict(cap.example_values))
            ga.run_forward()
        ga.run_backward()
        D: dict[fx.Node, sympy.Expr] = {}
        edges: list[tuple[fx.Node, fx.Node, sympy.Expr]] = []
        one = sympy.Integer(1)

        def val(e: Any) -> float | None:
            return ga.value_of(e)

        def consumers(n: fx.Node) -> list[fx.Node]:
            return [u for u in n.users if u.op == "output" or (u.op == "call_function" and ga.requires_grad(u))]

        def d_of(c: fx.Node) -> sympy.Expr:
            if c.op == "output":
                return one
            return D.get(c, one)

        nodes = list(gm.graph.nodes)
        for n in reversed(nodes):
            if not ga.requires_grad(n) or n.op == "output":
                continue
            if n.op == "call_function" and n.target is operator.getitem:
                continue  # handled with its parent
            rec = n.meta.get(META_KEY)
            if isinstance(rec.fwd, tuple):
                getitems = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem]
                grads = n.meta.get("_us_bwd_multi") or ()
                tvals = [g.rms for g in grads if g is not None and (val(g.rms) or 0) > 0]
                want = None
                if tvals:
                    w = 1 / math.prod(val(t) for t in tvals) ** (1 / len(tvals))
                    want = (w, lambda: 1 / sympy.sqrt(sympy.Mul(*tvals) ** sympy.Rational(2, len(tvals))))
                cons = [(gi, c) for gi in getitems for c in consumers(gi)]
                dn = self._choose(want, [d_of(c) for _, c in cons], val)
                D[n] = dn
                for gi in getitems:
                    D[gi] = dn
                    for c in consumers(gi):
                        if _differs(dn, d_of(c), val):
                            edges.append((gi, c, dn / d_of(c)))
                continue
            cons = consumers(n)
            if not cons:
                continue
            t = rec.bwd.rms if rec is not None and rec.bwd is not None else None
            tv = val(t) if t is not None else None
            want = (1 / tv, lambda t=t: 1 / t) if tv is not None and tv > 0 and math.isfinite(tv) else None
            if n in state.skipped_nodes and n.op == "call_function":
                want = None
            # a parameter keeps its own factor: snapping it to a consumer's (an activation's, whose
            # factor follows the batch differently) would make the factor a parameter gets depend on
            # which side of the snap tolerance the captured batch size puts it - per-rank and global
            # captures would then differ by more than their one common multiple (tests/test_distributed.py)
            snap = n.op != "get_attr" or want is None
            dn = self._choose(want, [d_of(c) for c in cons] if snap else [], val)
            D[n] = dn
            for c in cons:
                if _differs(dn, d_of(c), val):
                    edges.append((n, c, dn / d_of(c)))

        count = 0
        for n, c, ratio in edges:
            with gm.graph.inserting_before(c if c.op != "output" else c):
                g = gm.graph.call_function(grad_scale, (n, 1.0))
            factor = materialize(gm, state, ratio, g)
            g.args = (n, factor)
            for k in ("val", "nn_module_stack", "stack_trace"):
                if k in n.meta:
                    g.meta[k] = n.meta[k]
            c.replace_input_with(n, g)
            if isinstance(factor, fx.Node):
                ga.visit(factor)
            ga.visit(g)  # its record (the identity forward); the final report re-analyses the graph
            count += 1
        for n, dn in D.items():
            rec = n.meta.get(META_KEY)
            if rec is not None:
                rec.grad_factor = dn
                if dn != 1:
                    rec.factors["bwd"] = dn
        # not current: a grad_scale inserted inside an elementwise chain makes the traced records of the
        # chain's later nodes (their source node) stale, so the final report analyses afresh
        return PassResult(gm, count > 0, {"grad_scale": count})

    @staticmethod
    def _choose(want: tuple[float, Callable[[], sympy.Expr]] | None, cons_d: list[sympy.Expr], val) -> sympy.Expr:
        """The backward factor of a node: a consumer's within :data:`_SNAP` of the one it wants, else
        the one it wants. ``want`` is ``(value, build)``: the expression is built only when used
        (sympy divisions were a good part of this pass's time)."""
        if want is None:
            return cons_d[0] if cons_d else sympy.Integer(1)
        w, build = want
        best, best_err = None, None
        for d in cons_d:
            dv = val(d)
            if dv is None or dv <= 0 or w is None:
                continue
            err = abs(math.log2(w / dv))
            if best_err is None or err < best_err:
                best, best_err = d, err
        if best is not None and best_err is not None and best_err < _SNAP:
            return best
        return build()


def _differs(a: sympy.Expr, b: sympy.Expr, val) -> bool:
    if a == b:
        return False
    av, bv = val(a), val(b)
    if av is not None and bv is not None and av == bv and not (sympy.sympify(a).free_symbols or sympy.sympify(b).free_symbols):
        return False
    return True
