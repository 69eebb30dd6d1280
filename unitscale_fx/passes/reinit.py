"""Unit initialisation: decide each parameter's role from how the graph uses it.

* ``weight``: operand of a matmul, convolution or embedding, or a learned token / table of 2+
  dims added to or concatenated with the activations (a CLS token, a position table) -> ``N(0, 1)``
  (unit RMS);
* ``gain``: the weight of a (hand-written) norm, a 1-D multiplier -> ones;
* ``bias``: added to an activation -> zeros;
* anything else is left as it is.

:class:`PlanInit` only decides (and tells the analysis the resulting scales); :func:`apply_init`
writes the values in place, last, once every pass has succeeded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy
import torch
import torch.fx as fx

from ..analysis.record import Stat
from ..analysis.registry import lookup
from .base import Pass, PassResult, TransformState

aten = torch.ops.aten

__all__ = ["PlanInit", "apply_init", "param_roles"]

_VIEW_KINDS = ("view",)


def _uses(node: fx.Node, depth: int = 0):
    """Users of ``node`` seen through view-like ops, as (user, the input node it reads)."""
    for u in node.users:
        rule = lookup(u.target) if u.op == "call_function" else None
        if rule is not None and rule.kind in _VIEW_KINDS and rule.name != "getitem" and depth < 6 and u.args and u.args[0] is node:
            yield from _uses(u, depth + 1)
        else:
            yield u, node


def param_roles(gm: fx.GraphModule) -> dict[str, str]:
    roles: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            t = gm.get_parameter(str(node.target))
        except AttributeError:
            continue
        role = None
        for u, via in _uses(node):
            rule = lookup(u.target) if u.op == "call_function" else None
            kind = rule.kind if rule else None
            if kind in ("matmul", "embedding"):
                role = "weight"
            elif kind == "norm":
                kw_w = u.kwargs.get("weight") if "weight" in u.kwargs else (u.args[2] if len(u.args) > 2 else None)
                role = role or ("gain" if kw_w is via else "bias")
            elif rule is not None and rule.name == "mul" and t.dim() == 1:
                role = role or "gain"
            elif rule is not None and rule.name in ("add", "sub") and t.dim() == 1:
                role = role or "bias"
            elif rule is not None and rule.name in ("add", "cat") and t.dim() >= 2 and t.is_floating_point():
                # a learned token or table added to / concatenated with the activations (ViT's CLS
                # token and position table): an embedding, so unit like one. Left at a small init
                # (0.02), the CLS row of the stream has a tiny norm, and the first LayerNorm's
                # backward (divided by the row's sigma) blew its gradient up 20x
                role = role or "weight"
        roles[str(node.target)] = role or "keep"
    return roles


@dataclass(frozen=True)
class PlanInit(Pass):
    name: ClassVar[str] = "plan_init"
    init: str = "unit"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        roles = param_roles(gm)
        state.param_roles = roles
        if self.init == "unit":
            one, zero = sympy.Integer(1), sympy.Integer(0)
            for fqn, role in roles.items():
                if role == "weight":
                    state.param_stats[fqn] = Stat(one, zero, zero)
                elif role == "gain":
                    state.param_stats[fqn] = Stat(one, one, one)
                elif role == "bias":
                    state.param_stats[fqn] = Stat(zero, one, zero)
        counts: dict[str, int] = {}
        for r in roles.values():
            counts[r] = counts.get(r, 0) + 1
        return PassResult(gm, False, counts)


@torch.no_grad()
def apply_init(model: torch.nn.Module, roles: dict[str, str], generator: torch.Generator | None = None) -> int:
    """Write unit-scale values into ``model``'s parameters in place; returns how many changed."""
    done: set[int] = set()
    n = 0
    for fqn, role in roles.items():
        try:
            p = model.get_parameter(fqn)
        except AttributeError:
            continue
        if id(p) in done or role == "keep":
            continue
        done.add(id(p))
        if role == "weight":
            if p.device.type == "meta":
                continue
            if p.dtype == torch.float32 and p.device.type == "cpu":
                p.normal_(generator=generator)  # the same values as randn, without a temporary
            else:  # drawn in float32 on the CPU, as for CPU float32 weights: the init does not depend on where
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype))
        elif role == "gain":
            p.fill_(1.0)
        elif role == "bias":
            p.zero_()
        n += 1
    return n
