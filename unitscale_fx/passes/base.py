"""Pass infrastructure: small named passes, run in an explicit order with checks after each.

A pass is a frozen dataclass with a ``name``; its fields are its options. ``pass_(gm, state)``
returns a :class:`PassResult`. The :class:`PassManager` lints the graph after every pass and wraps
failures in :class:`~unitscale_fx.errors.PassError` naming the pass and those that ran before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import sympy
import torch
import torch.fx as fx

from ..analysis.sizefn import SizeFunction
from ..errors import PassError, UnitScaleError
from ..runtime import register_expr, register_size_scale, scale_value

__all__ = ["Pass", "PassResult", "PassManager", "TransformState", "materialize"]


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    #: the pass kept ``state.final_analysis`` current (it visited every node it inserted)
    analysis_current: bool = False


@dataclass
class TransformState:
    """What passes share: the capture, the config, and what earlier passes found."""

    capture: Any
    config: Any
    hints: dict[sympy.Symbol, int] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    param_roles: dict[str, str] = field(default_factory=dict)
    param_stats: dict[str, Any] = field(default_factory=dict)
    #: a forward analysis of the graph as it stands, handed from pass to pass (and to the final
    #: report) instead of analysing from scratch each time. A pass that changes the graph either
    #: keeps it current (visiting what it inserts) and sets it again, or the PassManager drops it.
    final_analysis: Any = None
    skipped_nodes: set = field(default_factory=set)
    _size_nodes: dict[sympy.Symbol, fx.Node] = field(default_factory=dict)
    _opaque_nodes: dict[sympy.Expr, fx.Node] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:  # pragma: no cover
        raise NotImplementedError


class PassManager:
    """Runs passes in order; lints after each, recompiles once at the end; names the failing pass.

    (Passes work on the graph, never on the generated code, so one ``recompile`` suffices; it is
    the slow step for a graph of thousands of nodes.)"""

    def __init__(self, passes: Sequence[Pass], on_done: Callable[[Pass, TransformState], None] | None = None):
        self.passes = list(passes)
        self.on_done = on_done  # called after each pass that succeeded (e.g. to start work it enables)

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> fx.GraphModule:
        ran: list[str] = []
        for p in self.passes:
            handed = state.final_analysis
            try:
                res = p(gm, state)
                gm = res.gm
                gm.graph.lint()
                if res.modified and not res.analysis_current and state.final_analysis is handed:
                    state.final_analysis = None  # the graph changed under it
            except UnitScaleError:
                raise
            except Exception as e:
                raise PassError(
                    f"pass {p.name!r} failed (after: {', '.join(ran) or 'none'}): {type(e).__name__}: {e}"
                ) from e
            state.counts[p.name] = dict(res.counts)
            ran.append(p.name)
            if self.on_done is not None:
                self.on_done(p, state)
        gm.recompile()
        return gm


def _size_node(gm: fx.GraphModule, state: TransformState, s: sympy.Symbol) -> fx.Node:
    if s in state._size_nodes:
        return state._size_nodes[s]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, dim in enumerate(val.shape):
            if isinstance(dim, torch.SymInt) and dim.node.expr == s:
                with gm.graph.inserting_after(placeholders[-1]):
                    node = gm.graph.call_function(torch.ops.aten.sym_size.int, (ph, d))
                node.meta["val"] = dim
                state._size_nodes[s] = node
                return node
    raise UnitScaleError(f"no input dimension carries the shape symbol {s}")


def _opaque(e: sympy.Expr) -> bool:
    """Evaluate ``e`` in Python (``size_scale``) rather than as traced torch ops: it has size
    functions, or powers other than square roots, squares and reciprocals (``seq ** 0.48`` from a
    power-law fit), which inductor would recompute for every element of the kernels using them."""
    if e.atoms(SizeFunction):
        return True
    cheap = {sympy.Rational(k, 2) for k in (-4, -3, -2, -1, 1, 2, 3, 4)}
    return any(p.exp not in cheap for p in e.atoms(sympy.Pow) if p.free_symbols)


def materialize(gm: fx.GraphModule, state: TransformState, expr: Any, before: fx.Node) -> Any:
    """A graph value for the scale ``expr``: a float, or a node computing it from input sizes.

    A closed form in the sizes becomes torch ops (``runtime.scale_value``) that ``torch.compile``
    traces and fuses. An expression with size functions (:mod:`~unitscale_fx.analysis.sizefn`,
    e.g. an attention scale of the sequence length) is evaluated whole, in Python, by the opaque
    custom op ``unitscale_fx::size_scale`` (once per step and memoised per sizes): inlined into the
    kernels that use it, its powers and reciprocals would be recomputed for every element."""
    e = sympy.sympify(expr)
    if not e.free_symbols:
        return float(e.evalf())
    syms = sorted(e.free_symbols, key=str)
    sizes = [_size_node(gm, state, s) for s in syms]
    if _opaque(e):
        node = state._opaque_nodes.get(e)
        if node is not None:
            return node
        key = register_size_scale(e, syms)
        # at the top, with the size nodes (it depends on nothing else): an extern call in the
        # middle of the graph would split inductor's kernels, and in the backward graph it is then
        # a saved scalar instead of a call
        setup = set(state._size_nodes.values()) | set(state._opaque_nodes.values())
        last = None
        for n in gm.graph.nodes:
            if n.op == "placeholder" or n in setup:
                last = n
        with gm.graph.inserting_after(last):
            node = gm.graph.call_function(torch.ops.unitscale_fx.size_scale.default, (key, sizes))
        state._opaque_nodes[e] = node
    else:
        key = register_expr(e, syms)
        with gm.graph.inserting_before(before):
            node = gm.graph.call_function(scale_value, (key, *sizes))
    node.meta["val"] = torch.empty((), dtype=torch.float64, device="meta")
    node.meta["_us_expr"] = e
    return node
