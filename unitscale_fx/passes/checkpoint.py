"""Activation-checkpoint regions of the user's forward, called through ``checkpoint`` again.

``torch.export`` (non-strict) runs ``torch.utils.checkpoint.checkpoint(fn, ...)`` inline: the captured
graph would save every activation of ``fn`` for the backward, and the memory the user asked to save
is lost. :func:`~unitscale_fx.capture.capture` tags the nodes traced inside each checkpoint
(``node.meta["custom"][CHECKPOINT_KEY]``); this pass moves each region into a submodule and calls it
with ``torch.utils.checkpoint.checkpoint(region, *inputs, use_reentrant=False)`` (the RNG state is
preserved, so dropout draws the same mask when the backward recomputes it).

A region is the span of the graph, in node order, from its first to its last tagged node: the scale
ops the passes inserted next to the region's nodes belong to it, and a contiguous span of a
topologically ordered graph is convex (no path leaves it and comes back). Parameters, buffers and
other module attributes enter the region as inputs.

This is a lowering for execution: ``UnitScaledModule`` runs the graph it returns; the graph that
reports and the analysis read keeps every node at the top level. The input graph is not modified.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.utils.checkpoint

from ..capture import CHECKPOINT_KEY
from .base import Pass, PassResult, TransformState

__all__ = ["OutlineCheckpoints", "checkpoint_regions", "outline_checkpoints"]


def _region_of(n: fx.Node) -> int | None:
    custom = n.meta.get("custom")
    return custom.get(CHECKPOINT_KEY) if isinstance(custom, dict) else None


def checkpoint_regions(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The regions of ``gm`` in graph order, each the ``call_function`` nodes of its span.

    Spans that overlap (not produced by sequential checkpoints, but cheap to guard) are merged.
    """
    nodes = list(gm.graph.nodes)
    spans: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        r = _region_of(n)
        if r is not None and n.op == "call_function":
            spans.setdefault(r, [i, i])[1] = i
    merged: list[list[int]] = []
    for a, b in sorted(spans.values()):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [[n for n in nodes[a:b + 1] if n.op == "call_function"] for a, b in merged]


def outline_checkpoints(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A new graph module computing the same function as ``gm``, each checkpoint region called through
    ``torch.utils.checkpoint.checkpoint``; and the number of regions. ``gm`` itself is unchanged; the new
    module shares its attributes (the same parameters, buffers and mode flags)."""
    regions = checkpoint_regions(gm)
    if not regions:
        return gm, 0
    first_of = {r[0]: r for r in regions}
    member = {n for r in regions for n in r}
    new = fx.Graph()
    new._codegen = gm.graph._codegen  # the same calling convention (pytree in/out specs of export)
    env: dict[fx.Node, Any] = {}
    subs: dict[str, fx.GraphModule] = {}
    for n in gm.graph.nodes:
        if n in env:
            continue
        if n in first_of:
            _emit_region(gm, new, env, first_of[n], member, subs)
            continue
        if n in member:
            raise AssertionError(f"checkpoint region node {n.name} reached outside its region")
        env[n] = new.node_copy(n, lambda x: env[x])
    root = torch.nn.Module()
    for name in _attr_roots(new) - subs.keys():
        setattr(root, name, getattr(gm, name))
    for name, sub in subs.items():
        setattr(root, name, sub)
    out = fx.GraphModule(root, new, class_name=type(gm).__name__)
    out.meta.update(getattr(gm, "meta", {}))
    return out, len(regions)


def _attr_roots(g: fx.Graph) -> set[str]:
    return {str(n.target).split(".")[0] for n in g.nodes if n.op in ("get_attr", "call_module")}


def _emit_region(gm: fx.GraphModule, new: fx.Graph, env: dict, region: list[fx.Node], member: set,
                 subs: dict[str, fx.GraphModule]) -> None:
    inside = set(region)
    inputs: list[fx.Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                if a in member and env.get(a) is None:  # from a region not emitted yet: not convex
                    raise AssertionError(f"checkpoint region input {a.name} comes from a later region")
                inputs.append(a)
    for a in inputs:  # a module attribute read inside the span (e.g. a mode flag a pass inserted there)
        if a not in env and a.op == "get_attr":
            env[a] = new.node_copy(a, lambda x: env[x])
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        ph = sub.placeholder(a.name)
        ph.meta.update({k: v for k, v in a.meta.items() if k in ("val", "tensor_meta")})
        senv[a] = ph
    for n in region:
        senv[n] = sub.node_copy(n, lambda x: senv[x])
    sub.output(tuple(senv[o] for o in outputs))
    name = f"_us_checkpoint_{len(subs)}"
    subs[name] = fx.GraphModule(torch.nn.Module(), sub, class_name="CheckpointRegion")
    fn = new.get_attr(name)
    call = new.call_function(torch.utils.checkpoint.checkpoint, (fn, *[env[a] for a in inputs]),
                             {"use_reentrant": False})
    call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
    for k in ("stack_trace", "nn_module_stack"):
        if k in region[0].meta:
            call.meta[k] = region[0].meta[k]
    for i, o in enumerate(outputs):
        g = new.call_function(operator.getitem, (call, i))
        g.meta.update(o.meta)
        env[o] = g
    for n in region:
        env.setdefault(n, None)  # consumed: only its outputs are visible outside


@dataclass(frozen=True)
class OutlineCheckpoints(Pass):
    """:func:`outline_checkpoints` as a pass (count ``regions``)."""

    name: ClassVar[str] = "outline_checkpoints"

    def __call__(self, gm: fx.GraphModule, state: TransformState | None = None) -> PassResult:
        out, k = outline_checkpoints(gm)
        return PassResult(out, k > 0, {"regions": k})
