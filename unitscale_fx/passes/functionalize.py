"""In-place ops on fresh intermediates become their out-of-place forms.

Training-IR graphs keep in-place ops that models write on their own intermediates (HF's
``router_top_value /= router_top_value.sum(...)``, ``x += bias``). The rewrite passes insert scale
multiplies and backward-only scales on the edges into an op; on the ``self`` edge of an in-place op
that would mutate the inserted node instead of the tensor the model meant (later readers would see
the old values) or, with an autograd view in between, fail in the backward. So, first:

``y = x.div_(s)`` -> ``y = aten.div(x, s)``, and every *later* reader of ``x`` reads ``y``.

Only where this is exactly the same computation:

* ``x`` is produced by a non-view op in the graph (not an input, parameter or buffer: their
  mutations are the point, and stay), or by ``getitem`` of such an op's outputs;
* no view of ``x`` (nor of a view of it) taken before the in-place op is read after it (the
  mutation would show through the alias);
* the op's schema says it writes its first argument, and the out-of-place overload exists.

Everything else is left as it was (and the scaling passes treat it as before).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from .base import Pass, PassResult, TransformState

aten = torch.ops.aten

__all__ = ["FunctionalizeInPlace"]


def _functional_overload(target: object) -> object | None:
    """``aten.div_.Tensor`` -> ``aten.div.Tensor`` when the op writes its first argument."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.arguments:
        return None
    alias = schema.arguments[0].alias_info
    if alias is None or not alias.is_write or not schema.name.endswith("_") or schema.name.endswith("__"):
        return None
    ns, _, name = schema.name.partition("::")
    if ns != "aten":
        return None
    packet = getattr(aten, name[:-1], None)
    overload = getattr(packet, target._overloadname, None) if packet is not None else None  # type: ignore[attr-defined]
    if overload is None:
        return None
    fschema = overload._schema
    if [a.name for a in fschema.arguments] != [a.name for a in schema.arguments]:
        return None
    return overload


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return False
    return bool(schema.returns) and any(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _fresh(x: fx.Node) -> bool:
    """``x`` owns its storage: the output of a non-view op (or an element of one's outputs)."""
    if x.op != "call_function":
        return False
    if x.target is operator.getitem:
        parent = x.args[0]
        return isinstance(parent, fx.Node) and parent.op == "call_function" and not _is_view(parent)
    return not _is_view(x)


def _views_of(x: fx.Node) -> list[fx.Node]:
    out, stack = [], [x]
    while stack:
        n = stack.pop()
        for u in n.users:
            if _is_view(u):
                out.append(u)
                stack.append(u)
    return out


@dataclass(frozen=True)
class FunctionalizeInPlace(Pass):
    name: ClassVar[str] = "functionalize_in_place"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        count, kept = 0, 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            functional = _functional_overload(node.target)
            if functional is None:
                continue
            x = node.args[0] if node.args else None
            if not isinstance(x, fx.Node) or not _fresh(x):
                kept += 1
                continue
            here = order[node]
            aliased = any(order[u] > here for v in _views_of(x) if order[v] < here for u in v.users)
            if aliased:
                kept += 1
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(functional, node.args, dict(node.kwargs))
            new.meta.update(node.meta)
            order[new] = here
            for u in list(x.users):
                if u is not node and u is not new and order.get(u, -1) > here:
                    u.replace_input_with(x, new)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
        counts = {"functionalized": count}
        if kept:
            counts["kept_in_place"] = kept
        return PassResult(gm, count > 0, counts)
