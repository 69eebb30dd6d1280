"""Canonicalisation before scaling: mode-aware dropout and biases split off their matmuls.

* ``aten.dropout(x, p, True)`` -> ``runtime.dropout(x, p, mode)`` where ``mode`` is a
  :class:`~unitscale_fx.runtime.ModeFlag` the wrapper keeps in sync with ``train()``/``eval()``.
* ``aten.linear(x, W, b)`` -> ``aten.linear(x, W) + b`` and ``aten.addmm(b, x, W)`` ->
  ``aten.mm(x, W) + b``, so the matmul's scale does not rescale the bias (exactly the same values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..analysis.context import normalized_kwargs
from ..runtime import ModeFlag, dropout
from .base import Pass, PassResult, TransformState

aten = torch.ops.aten

__all__ = ["ModeAwareDropout", "SplitBias"]


@dataclass(frozen=True)
class ModeAwareDropout(Pass):
    name: ClassVar[str] = "mode_aware_dropout"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        n = 0
        mode_node = None
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.dropout.default:
                continue
            x, p, train = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if not train:
                continue
            if mode_node is None:
                if not hasattr(gm, "_us_mode"):
                    gm.add_submodule("_us_mode", ModeFlag())
                first = next(nd for nd in gm.graph.nodes if nd.op != "placeholder")
                with gm.graph.inserting_before(first):
                    mode_node = gm.graph.get_attr("_us_mode")
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(dropout, (x, float(p), mode_node))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            n += 1
        return PassResult(gm, n > 0, {"dropout": n})


@dataclass(frozen=True)
class SplitBias(Pass):
    name: ClassVar[str] = "split_bias"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        n = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node in state.skipped_nodes:
                continue
            if node.target is aten.linear.default:
                kw = normalized_kwargs(node) or {}
                bias = kw.get("bias")
                if not isinstance(bias, fx.Node):
                    continue
                with gm.graph.inserting_before(node):
                    mm = gm.graph.call_function(aten.linear.default, (kw["input"], kw["weight"]))
                    add = gm.graph.call_function(aten.add.Tensor, (mm, bias))
            elif node.target is aten.addmm.default:
                kw = normalized_kwargs(node) or {}
                if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
                    continue
                with gm.graph.inserting_before(node):
                    mm = gm.graph.call_function(aten.mm.default, (kw["mat1"], kw["mat2"]))
                    add = gm.graph.call_function(aten.add.Tensor, (mm, kw["input"]))
            else:
                continue
            mm.meta.update(node.meta)
            add.meta.update(node.meta)
            node.replace_all_uses_with(add)
            gm.graph.erase_node(node)
            n += 1
        return PassResult(gm, n > 0, {"bias_split": n})
