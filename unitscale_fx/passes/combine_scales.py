"""One opaque call for all the scales that are evaluated in Python.

``materialize`` gives each scale with size functions (or awkward powers) its own
``unitscale_fx::size_scale`` node; under ``torch.compile`` each is a Python call per step (~9 us).
This pass, run last, replaces them by one ``unitscale_fx::size_scales`` node returning every value
(``getitem`` picks each), at the same place (with the size nodes at the top of the graph). Same
values, same graph semantics; the analysis handed on by the previous pass stays current (the new
nodes are visited).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..analysis.record import META_KEY
from ..runtime import register_size_scale_group
from .base import Pass, PassResult, TransformState

__all__ = ["CombineSizeScales"]


@dataclass(frozen=True)
class CombineSizeScales(Pass):
    name: ClassVar[str] = "combine_size_scales"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        op = torch.ops.unitscale_fx.size_scale.default
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op and n.users]
        if len(nodes) < 2:
            return PassResult(gm, False, {"combined": 0})
        sizes: list[fx.Node | int] = []
        index: dict = {}
        keys, positions = [], []
        for n in nodes:
            key, args = n.args
            pos = []
            for a in args:
                k = a if isinstance(a, fx.Node) else ("int", a)
                if k not in index:
                    index[k] = len(sizes)
                    sizes.append(a)
                pos.append(index[k])
            keys.append(key)
            positions.append(pos)
        group = register_size_scale_group(keys, positions)
        ga = state.final_analysis
        with gm.graph.inserting_before(nodes[0]):
            combined = gm.graph.call_function(torch.ops.unitscale_fx.size_scales.default, (group, sizes))
        combined.meta["val"] = [n.meta["val"] for n in nodes]
        combined.meta["_us_exprs"] = [n.meta["_us_expr"] for n in nodes]
        if ga is not None:
            ga.visit(combined)
        for i, n in enumerate(nodes):
            with gm.graph.inserting_after(combined):
                g = gm.graph.call_function(operator.getitem, (combined, i))
            for k in ("val", "_us_expr"):
                g.meta[k] = n.meta[k]
            if META_KEY in n.meta:
                g.meta[META_KEY] = n.meta[META_KEY]
            n.replace_all_uses_with(g)
            gm.graph.erase_node(n)
            if ga is not None:
                ga.visit(g)
        state._opaque_nodes.clear()
        state.final_analysis = ga  # visited: still the analysis of the graph as it stands
        return PassResult(gm, True, {"combined": len(nodes)}, analysis_current=ga is not None)
