"""Canonicalisation before scaling: mode-aware dropout / batch norm and biases split off their matmuls.

* ``aten.dropout(x, p, True)`` -> ``runtime.dropout(x, p, mode)`` and ``aten.batch_norm(..., True, ...)``
  -> ``runtime.batch_norm(..., mode)``, where ``mode`` is a :class:`~unitscale_fx.runtime.ModeFlag` the
  wrapper keeps in sync with ``train()``/``eval()`` (the graph is captured in training mode).
* ``aten.linear(x, W, b)`` -> ``aten.linear(x, W) + b`` and ``aten.addmm(b, x, W)`` ->
  ``aten.mm(x, W) + b``, so the matmul's scale does not rescale the bias (exactly the same values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..analysis.context import normalized_kwargs
from ..runtime import ModeFlag, batch_norm, dropout
from .base import Pass, PassResult, TransformState

aten = torch.ops.aten

__all__ = ["ModeAwareOps", "SplitBias"]


@dataclass(frozen=True)
class ModeAwareOps(Pass):
    name: ClassVar[str] = "mode_aware_ops"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        counts = {"dropout": 0, "batch_norm": 0}
        mode_node = None

        def mode() -> fx.Node:
            nonlocal mode_node
            if mode_node is None:
                if not hasattr(gm, "_us_mode"):
                    gm.add_submodule("_us_mode", ModeFlag())
                first = next(nd for nd in gm.graph.nodes if nd.op != "placeholder")
                with gm.graph.inserting_before(first):
                    mode_node = gm.graph.get_attr("_us_mode")
            return mode_node

        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.dropout.default:
                x, p = node.args[0], node.args[1]
                train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
                if not train:
                    continue
                m = mode()
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(dropout, (x, float(p), m))
                kind = "dropout"
            elif node.target is aten.batch_norm.default:
                kw = normalized_kwargs(node) or {}
                if not kw.get("training", False):
                    continue
                m = mode()
                args = tuple(kw.get(k) for k in ("input", "weight", "bias", "running_mean", "running_var"))
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(
                        batch_norm, args + (float(kw.get("momentum", 0.1)), float(kw.get("eps", 1e-5)), m))
                kind = "batch_norm"
            else:
                continue
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            counts[kind] += 1
        return PassResult(gm, any(counts.values()), {k: v for k, v in counts.items() if v})


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
