"""What a scale rule sees of the node it is applied to."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import sympy
import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from .record import META_KEY, ScaleRecord, Stat

if TYPE_CHECKING:  # pragma: no cover
    from .propagate import GraphAnalysis

__all__ = ["RuleContext", "sym", "is_float_node", "normalized_kwargs"]


def sym(x: Any) -> sympy.Expr:
    """A shape entry (int or SymInt) or a number as a sympy expression."""
    if isinstance(x, torch.SymInt) or isinstance(x, torch.SymFloat):
        return sympy.sympify(x.node.expr)
    if isinstance(x, sympy.Basic):
        return x
    return sympy.sympify(x)


def is_float_node(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def normalized_kwargs(node: fx.Node) -> dict[str, Any] | None:
    """All arguments of an aten ``call_function`` node by schema name (None if not an aten op)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    try:
        pair = normalize_function(
            node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
        )
    except Exception:
        return None
    if pair is None:
        return None
    return dict(pair.kwargs)


class RuleContext:
    """Arguments of one node, their statistics and shapes, for a rule to read."""

    def __init__(self, node: fx.Node, analysis: "GraphAnalysis"):
        self.node = node
        self.analysis = analysis
        self.kwargs = normalized_kwargs(node)
        if self.kwargs is None:
            self.kwargs = {str(i): a for i, a in enumerate(node.args)}
            self.kwargs.update(node.kwargs)
        self._names = list(self.kwargs)

    # ---- arguments -----------------------------------------------------------------------
    def arg(self, name: str | int, default: Any = None) -> Any:
        """Raw argument by schema name or by position in the schema."""
        if isinstance(name, int):
            name = self._names[name] if name < len(self._names) else None
            if name is None:
                return default
        return self.kwargs.get(name, default)

    def name_of(self, index: int) -> str:
        return self._names[index]

    def stat(self, name: str | int) -> Stat | None:
        a = self.arg(name)
        return self.analysis.fwd_of(a) if isinstance(a, fx.Node) else None

    def stats(self, name: str | int) -> list[Stat | None]:
        return [self.analysis.fwd_of(a) if isinstance(a, fx.Node) else None for a in self.arg(name)]

    def is_tensor(self, name: str | int) -> bool:
        a = self.arg(name)
        return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)

    def value(self, name: str | int) -> Any:
        """Fake value (``meta['val']``) of a node argument, or the argument itself."""
        a = self.arg(name)
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    def const(self, name: str | int) -> torch.Tensor | None:
        """Concrete value of an argument that does not depend on parameters, when known."""
        a = self.arg(name)
        if isinstance(a, fx.Node):
            return self.analysis.const_value(a)
        return None

    # ---- shapes ----------------------------------------------------------------------------
    def shape(self, name: str | int | None = None) -> list[sympy.Expr]:
        val = self.node.meta.get("val") if name is None else self.value(name)
        if isinstance(val, (tuple, list)):
            val = val[0]
        return [sym(s) for s in val.shape]

    def numel(self, name: str | int | None = None) -> sympy.Expr:
        return sympy.Mul(*self.shape(name)) if self.shape(name) else sympy.Integer(1)

    def dim(self, d: int, name: str | int | None = None) -> sympy.Expr:
        return self.shape(name)[d]

    @property
    def out_val(self) -> Any:
        return self.node.meta.get("val")

    def record_of(self, node: fx.Node) -> ScaleRecord | None:
        return node.meta.get(META_KEY)

    def tokens(self, name: str | int | None = None, feature_dims: int = 1) -> sympy.Expr:
        """Number of independent rows: numel / prod(last ``feature_dims`` dims)."""
        shp = self.shape(name)
        return sympy.Mul(*shp[: len(shp) - feature_dims]) if len(shp) > feature_dims else sympy.Integer(1)


def prod(xs: Sequence[Any]) -> sympy.Expr:
    return sympy.Mul(*[sym(x) for x in xs]) if xs else sympy.Integer(1)


_ = math  # keep import for rules that use math constants through this module
