"""Capture: a model becomes one ``torch.fx`` graph through ``torch.export.export(strict=False)``.

The graph is the training IR (``aten.linear``, ``aten.scaled_dot_product_attention`` stay whole),
with the batch and sequence dimensions of the inputs marked dynamic (``Dim.AUTO``: export keeps a
dimension symbolic unless the model's code forces it to a constant). Parameters appear as
``get_attr`` nodes that hold the very same ``nn.Parameter`` objects as the model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim
from torch.utils._pytree import tree_flatten, tree_map

from .errors import CaptureError

__all__ = ["Capture", "capture", "normalize_inputs"]


@dataclass
class Capture:
    """A captured model.

    Attributes:
        gm: the graph module (unlifted: parameters are ``get_attr`` nodes; pytree in/out specs are
            kept in its codegen so it is called exactly like the model).
        args, kwargs: the example inputs it was captured with.
        hints: concrete value of every shape symbol at capture time.
        symbol_names: readable names of the shape symbols (``batch``, ``seq``...).
        example_values: example value of every placeholder, by placeholder name.
    """

    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    hints: dict[sympy.Symbol, int] = field(default_factory=dict)
    symbol_names: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)
    example_values: dict[str, Any] = field(default_factory=dict)


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``: a tuple is positional args, a dict is kwargs."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, list):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise CaptureError(
        "example_inputs must be a tuple of positional args, a dict of keyword args or a single tensor, "
        f"got {type(example_inputs).__name__}"
    )


def _dynamic_spec(x: Any) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    spec = {0: Dim.AUTO}
    if x.dim() >= 2 and (not x.is_floating_point() or x.dim() == 3):
        spec[1] = Dim.AUTO  # token ids / masks / embeddings: [batch, seq, ...]
    return spec


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    flags = {m: m.training for m in model.modules()}
    model.train()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool = True) -> Capture:
    """Export ``model`` in training mode and return the cleaned graph module."""
    kwargs = dict(kwargs or {})
    dyn = None
    if dynamic:
        dyn_args = tuple(tree_map(_dynamic_spec, a) for a in args)
        dyn_kwargs = {k: tree_map(_dynamic_spec, v) for k, v in kwargs.items()}
        dyn = dyn_kwargs if not args else (dyn_args if not kwargs else None)
        if args and kwargs:
            dyn = {**{f"_arg{i}": None for i in range(0)}, **dyn_kwargs}
            dyn = None  # mixed positional + keyword: fall back to export's default handling
            dynamic = False
    try:
        with _train_mode(model):
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        msg = str(e)
        hint = ""
        if "not a known type" in msg and "Cache" in msg:
            hint = "\nHint: the model returns a KV cache; build it with use_cache=False (config.use_cache = False)."
        elif "data-dependent" in msg or "GuardOnDataDependent" in type(e).__name__:
            hint = (
                "\nHint: the model has data-dependent control flow; rewrite that part with torch.cond / "
                "torch.where, or exclude the module with Config(exclude=(...))."
            )
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} as one graph: {type(e).__name__}: "
            f"{msg.strip().splitlines()[0] if msg.strip() else ''}{hint}\n--- export said ---\n{msg[:4000]}"
        ) from e
    gm = ep.module()
    _strip_guards(gm)
    cap = Capture(gm=gm, args=args, kwargs=kwargs)
    _collect_symbols(cap)
    return cap


def _strip_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()


def _collect_symbols(cap: Capture) -> None:
    from torch.fx._pytree import tree_flatten_spec

    gm = cap.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    codegen = gm.graph._codegen
    in_spec = getattr(getattr(codegen, "pytree_info", None), "in_spec", None)
    if in_spec is not None:
        flat = list(tree_flatten_spec((list(cap.args), cap.kwargs), in_spec))
    else:
        flat, _ = tree_flatten((cap.args, cap.kwargs))
    names_used: set[str] = set()
    for node, value in zip(placeholders, flat):
        cap.example_values[node.name] = value
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        for d, (s, real) in enumerate(zip(val.shape, value.shape)):
            if isinstance(s, torch.SymInt):
                e = s.node.expr
                if isinstance(e, sympy.Symbol) and e not in cap.hints:
                    cap.hints[e] = int(real)
                    if d == 0 and "batch" not in names_used:
                        nm = "batch"
                    elif d == 1 and "seq" not in names_used:
                        nm = "seq"
                    else:
                        nm = f"{node.name}_d{d}"
                    names_used.add(nm)
                    cap.symbol_names[e] = sympy.Symbol(nm, positive=True, integer=True)
    # symbols that appear only in intermediate shapes (rare): use the shape env's hints
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    for fs in s.node.expr.free_symbols:
                        if fs not in cap.hints:
                            hint = s.node.shape_env.var_to_val.get(fs) if s.node.shape_env else None
                            if hint is not None:
                                cap.hints[fs] = int(hint)
                                cap.symbol_names.setdefault(fs, sympy.Symbol(str(fs), positive=True, integer=True))
