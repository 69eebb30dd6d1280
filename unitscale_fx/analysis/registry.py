"""The scale-rule registry: one rule per aten op, looked up by op overload or overload packet.

A rule says how an op transforms the statistics (:class:`~unitscale_fx.analysis.record.Stat`) of
its inputs into those of its output (``forward``) and how the statistics of the gradient at its
output turn into those of the gradients at its inputs (``backward``). Adding support for an op is
one ``@register(...)`` in :mod:`unitscale_fx.analysis.rules`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from .context import RuleContext
    from .record import Stat

__all__ = ["Rule", "register", "lookup", "registered_ops", "KINDS", "Unsupported"]


class Unsupported(Exception):
    """Raised by a rule when this use of its op is not covered; the node is reported as missing."""

#: What a pass needs to know about an op besides its statistics.
KINDS = (
    "view",  # data movement only: reshape/permute/slice/cat/... (no arithmetic)
    "matmul",  # a contraction with a weight or another activation
    "norm",  # layer/RMS norm (possibly hand-written pieces)
    "pointwise",  # elementwise function of one tensor
    "add",  # sum of tensors
    "mul",  # elementwise product of tensors
    "attention",  # scaled dot-product attention
    "softmax",
    "embedding",
    "loss",
    "reduction",
    "dropout",
    "scale",  # a scale inserted by unitscale_fx itself
    "other",
)

ForwardFn = Callable[["RuleContext"], Any]
BackwardFn = Callable[["RuleContext", "Stat"], dict[int | str, "Stat"]]


@dataclass(frozen=True)
class Rule:
    """A scale rule.

    Attributes:
        name: short name shown in dumps (``"matmul"``, ``"layer_norm"``...).
        kind: one of :data:`KINDS`; passes use it to decide what to rewrite.
        forward: ``forward(ctx) -> Stat | tuple[Stat | None, ...] | None``.
        backward: ``backward(ctx, grad) -> {arg_index_or_kwarg_name: Stat}``: the statistics of the
            gradient reaching each differentiable input through this op.
    """

    name: str
    kind: str
    forward: ForwardFn
    backward: BackwardFn


_RULES: dict[Any, Rule] = {}


def register(*ops: Any, name: str, kind: str, backward: BackwardFn | None = None):
    """Decorator registering ``forward`` (the decorated function) for ``ops``.

    ``ops`` are ``torch.ops.aten.<op>`` packets (all overloads) or specific overloads or Python
    callables used as ``call_function`` targets.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown rule kind {kind!r}")

    def deco(forward: ForwardFn) -> ForwardFn:
        bwd = backward if backward is not None else _no_grad
        rule = Rule(name=name, kind=kind, forward=forward, backward=bwd)
        for op in ops:
            if op in _RULES:
                raise ValueError(f"a scale rule for {op} is already registered ({_RULES[op].name})")
            _RULES[op] = rule
        return forward

    return deco


def _no_grad(ctx: "RuleContext", grad: "Stat") -> dict[int | str, "Stat"]:
    return {}


def lookup(target: Any) -> Rule | None:
    """The rule for an FX ``call_function`` target (overload first, then its packet)."""
    rule = _RULES.get(target)
    if rule is not None:
        return rule
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return _RULES.get(packet)
    return None


def registered_ops() -> Iterable[Any]:
    return tuple(_RULES)
