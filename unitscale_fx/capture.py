"""Capture: a model becomes one ``torch.fx`` graph through ``torch.export.export(strict=False)``.

The graph is the training IR (``aten.linear``, ``aten.scaled_dot_product_attention`` stay whole),
with the batch and sequence dimensions of the inputs marked dynamic (``Dim.AUTO``: export keeps a
dimension symbolic unless the model's code forces it to a constant). Parameters appear as
``get_attr`` nodes that hold the very same ``nn.Parameter`` objects as the model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim
import torch.utils._pytree as pytree
from torch.utils._pytree import tree_flatten, tree_map

from .errors import CaptureError, _is_library_file, user_frame_of_exception

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


#: ``node.meta["custom"][CHECKPOINT_KEY]``: the activation-checkpoint region (an int) a node was traced in
CHECKPOINT_KEY = "unitscale_fx.checkpoint"


@contextlib.contextmanager
def _tag_checkpoint_regions():
    """Mark the nodes traced inside ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)``.

    Non-strict export runs the checkpointed function inline, so the captured graph would save every
    activation. While exporting, torch's non-reentrant checkpoint generator is wrapped: the nodes the
    tracer adds between its pre- and post-forward steps get ``node.meta["custom"][CHECKPOINT_KEY]``
    (a region number; the outermost region wins for nested checkpoints). The runner later calls each
    region through ``checkpoint`` again (:mod:`unitscale_fx.passes.checkpoint`). Outside a trace the
    wrapper only delegates.
    """
    import itertools

    import torch.utils.checkpoint as tuc
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    orig = tuc._checkpoint_without_reentrant_generator
    regions = itertools.count()

    def tagged(*args: Any, **kwargs: Any):
        mode = get_proxy_mode()
        graph = getattr(getattr(mode, "tracer", None), "graph", None)
        before = set(graph.nodes) if graph is not None else None
        region = next(regions)
        result = yield from orig(*args, **kwargs)
        if graph is not None:
            for n in graph.nodes:
                if n not in before and n.op == "call_function":
                    n.meta.setdefault("custom", {})[CHECKPOINT_KEY] = region
        return result

    orig_reentrant = tuc.CheckpointFunction

    class _Reentrant:
        """``checkpoint(..., use_reentrant=True)`` during the capture: export traces the reentrant
        variant's forward under ``no_grad``, which would cut the gradient silently. Refused."""

        @staticmethod
        def apply(*args: Any) -> Any:
            if get_proxy_mode() is not None:
                raise _ReentrantCheckpoint("torch.utils.checkpoint(..., use_reentrant=True) inside the captured forward")
            return orig_reentrant.apply(*args)

    tuc._checkpoint_without_reentrant_generator = tagged
    tuc.CheckpointFunction = _Reentrant
    try:
        yield
    finally:
        tuc._checkpoint_without_reentrant_generator = orig
        tuc.CheckpointFunction = orig_reentrant


# ---- SDPA with dropout, opaque while tracing --------------------------------------------------------
# With dropout (a training-mode capture of most HF models), ``aten.scaled_dot_product_attention`` takes
# its math path, and FakeTensorMode computes the output by running that decomposition on fake tensors
# with symbolic shapes: matmuls, softmax, dropout, reshapes, each with dozens of SymInt operations
# (GPT-2-small, 12 calls: 0.7-1.2 s of a 2.9-3.4 s export in a fresh process). While capturing, such a
# call traces as the opaque op below instead, whose fake kernel gives the math path's output (the query's
# shape with the value's last dim, contiguous, the query's dtype); right after the export each one is
# replaced by the ``aten.scaled_dot_product_attention`` node export would have recorded (same arguments,
# name and metadata; tests/test_capture.py compares the graphs). Without dropout the CPU kernel may be
# the flash one, whose output has another layout and whose fake kernel is cheap anyway: left alone.
@torch.library.custom_op("unitscale_fx::captured_sdpa", mutates_args=())
def _captured_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
    """Only traced (see above); run eagerly it is plain SDPA."""
    return torch.ops.aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                       enable_gqa=enable_gqa)


@_captured_sdpa.register_fake
def _captured_sdpa_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # the shape relations the math path's matmuls impose (export turns them into the same guards: a
    # decoder's batch is the encoder's in cross-attention), then its output
    lead = query.shape[:-3] if enable_gqa else query.shape[:-2]
    kv_lead = key.shape[:-3] if enable_gqa else key.shape[:-2]
    batch = torch.broadcast_shapes(lead, kv_lead, value.shape[: len(kv_lead)])
    torch._check(query.shape[-1] == key.shape[-1])
    torch._check(key.shape[-2] == value.shape[-2])
    heads = (query.shape[-3],) if enable_gqa else ()
    if attn_mask is not None:
        torch.broadcast_shapes(attn_mask.shape, (*batch, *heads, query.shape[-2], key.shape[-2]))
    return query.new_empty((*batch, *heads, query.shape[-2], value.shape[-1]))


_SDPA_DEFAULTS = (None, 0.0, False)  # attn_mask, dropout_p, is_causal: what export leaves out at the end


@contextlib.contextmanager
def _opaque_sdpa():
    """While exporting, ``F.scaled_dot_product_attention`` with dropout and plain Python options traces
    as ``unitscale_fx::captured_sdpa``; anything else (or outside a trace, e.g. another thread) is the
    original function."""
    import torch.nn.functional as F
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    orig = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        plain = (isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and dropout_p > 0
                 and isinstance(is_causal, bool) and isinstance(enable_gqa, bool)
                 and (scale is None or isinstance(scale, (int, float)))
                 and (attn_mask is None or isinstance(attn_mask, torch.Tensor))
                 and all(isinstance(t, torch.Tensor) for t in (query, key, value)))
        if not plain or get_proxy_mode() is None:
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        return torch.ops.unitscale_fx.captured_sdpa(query, key, value, attn_mask, float(dropout_p), is_causal,
                                                    None if scale is None else float(scale), enable_gqa)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def _restore_sdpa(gm: fx.GraphModule) -> None:
    """Each ``unitscale_fx::captured_sdpa`` node becomes the ``aten.scaled_dot_product_attention`` node
    export would have recorded: the same arguments (trailing defaults left out; ``scale`` / ``enable_gqa``
    as keywords when set), a name of its own, the old node's metadata (value, stack trace, module stack,
    checkpoint tag)."""
    from torch.fx.operator_schemas import normalize_function

    target = torch.ops.unitscale_fx.captured_sdpa.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        pair = normalize_function(target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
        kw = dict(pair.kwargs)
        args = [kw["query"], kw["key"], kw["value"], kw.get("attn_mask"), kw.get("dropout_p", 0.0),
                kw.get("is_causal", False)]
        while len(args) > 3 and not isinstance(args[-1], fx.Node) and args[-1] == _SDPA_DEFAULTS[len(args) - 4]:
            args.pop()
        kwargs = {}
        if kw.get("scale") is not None:
            kwargs["scale"] = kw["scale"]
        if kw.get("enable_gqa"):
            kwargs["enable_gqa"] = True
        with gm.graph.inserting_before(node):
            new = gm.graph.create_node("call_function", torch.ops.aten.scaled_dot_product_attention.default,
                                       tuple(args), kwargs, name="scaled_dot_product_attention")
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


class _ReentrantCheckpoint(RuntimeError):
    """Raised inside the capture for a reentrant checkpoint (turned into a :class:`CaptureError`)."""


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    flags = {m: m.training for m in model.modules()}
    model.train()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``dynamic_shapes`` for export: a tuple (positional only), or a dict by parameter name."""
    if not args:
        return {k: tree_map(_dynamic_spec, v) for k, v in kwargs.items()}
    if not kwargs:
        return tuple(tree_map(_dynamic_spec, a) for a in args)
    # positional and keyword arguments mixed: export takes a dict keyed by the forward's parameter names
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = sig.parameters
    if any(params[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for n in bound.arguments):
        return None
    return {n: tree_map(_dynamic_spec, v) for n, v in bound.arguments.items()}


# nn.Module internals that export itself (and hooks) touch; everything else in a module's __dict__
# is the user's Python state
_MODULE_INTERNALS = frozenset({
    "_backward_hooks", "_backward_pre_hooks", "_buffers", "_forward_hooks", "_forward_hooks_always_called",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_is_full_backward_hook",
    "_load_state_dict_post_hooks", "_load_state_dict_pre_hooks", "_modules", "_non_persistent_buffers_set",
    "_parameters", "_state_dict_hooks", "_state_dict_pre_hooks", "training", "_initialize_hook", "_load_hook",
    "_compiled_call_impl", "_unitscale_fx_transformed",
})
_SIMPLE = (int, float, bool, str, bytes, type(None), complex)


def _same_value(old: Any, new: Any) -> bool:
    if new is old:
        return True
    if type(old) is type(new) and isinstance(old, _SIMPLE):
        return old == new
    if type(old) is type(new) and isinstance(old, tuple) and len(old) == len(new):
        return all(_same_value(a, b) for a, b in zip(old, new))
    return False


def _shallow(v: Any) -> Any:
    if type(v) in (list, dict, set):
        return copy.copy(v)
    return None


def _same_content(old: Any, new: Any) -> bool:
    if type(old) is list:
        return len(old) == len(new) and all(_same_value(a, b) for a, b in zip(old, new))
    if type(old) is dict:
        return old.keys() == new.keys() and all(_same_value(old[k], new[k]) for k in old)
    if type(old) is set:
        try:
            return old == new
        except Exception:  # noqa: BLE001 - elements without a usable ==
            return False
    return True


def _short(v: Any) -> str:
    text = repr(v) if isinstance(v, _SIMPLE + (tuple, list, dict, set)) else f"<{type(v).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


class _CaptureWatch:
    """Temporary hooks on the root module while export traces it (removed afterwards).

    * the pre-hook (first of all) snapshots the Python attributes of every submodule, the
      post-hook (last of all) compares: an attribute the forward changed is a *Python side effect*
      that the captured graph would silently drop (export runs the forward once, on fake tensors,
      and restores the attributes afterwards);
    * the post-hook registers dataclass outputs that ``torch.utils._pytree`` does not know as pytree
      nodes (``torch.export.register_dataclass``), so a model may return its own dataclass.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.changes: list[str] = []
        self.registered: list[type] = []
        self._snap: list[tuple[str, nn.Module, str, Any, Any]] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "_CaptureWatch":
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, prepend=True),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        snap = []
        for name, mod in self.model.named_modules():
            for k, v in mod.__dict__.items():
                if k in _MODULE_INTERNALS or k.startswith("_us_"):
                    continue
                snap.append((name, mod, k, v, _shallow(v)))
        self._snap = snap

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._register_dataclasses(output, 0)
        if self._snap is None:
            return
        for name, mod, k, old, content in self._snap:
            where = f"{name + '.' if name else ''}{k}"
            if k not in mod.__dict__:
                self.changes.append(f"{where} (of {type(mod).__name__}) was deleted")
                continue
            new = mod.__dict__[k]
            if not _same_value(old, new):
                self.changes.append(f"{where} (of {type(mod).__name__}) changed: {_short(old)} -> {_short(new)}")
            elif content is not None and not _same_content(content, new):
                self.changes.append(f"{where} (of {type(mod).__name__}) was modified in place: "
                                    f"{_short(content)} -> {_short(new)}")
        known = {(n, k) for n, _, k, _, _ in self._snap}
        for name, mod in self.model.named_modules():
            for k in mod.__dict__:
                if k not in _MODULE_INTERNALS and not k.startswith("_us_") and (name, k) not in known:
                    self.changes.append(f"{name + '.' if name else ''}{k} (of {type(mod).__name__}) was set "
                                        f"by the forward: {_short(mod.__dict__[k])}")
        self._snap = None

    def _register_dataclasses(self, obj: Any, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(obj, (list, tuple)):
            for x in obj:
                self._register_dataclasses(x, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                self._register_dataclasses(x, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            if cls not in pytree.SUPPORTED_NODES:
                try:
                    torch.export.register_dataclass(cls)
                    self.registered.append(cls)
                except Exception:  # noqa: BLE001 - export then reports the unknown type itself
                    return
            for f in dataclasses.fields(obj):
                self._register_dataclasses(getattr(obj, f.name, None), depth + 1)


def _module_of_frame(exc: BaseException, model: nn.Module) -> str | None:
    """The fqn of the module whose code (``self``) raised, innermost user frame first."""
    tb = exc.__traceback__
    found = None
    names = {id(m): n for n, m in model.named_modules()}
    while tb is not None:
        fr = tb.tb_frame
        code = fr.f_code
        obj = fr.f_locals.get(code.co_varnames[0]) if code.co_argcount > 0 else None  # ``self``
        if isinstance(obj, nn.Module) and id(obj) in names and not _is_library_file(fr.f_code.co_filename):
            found = names[id(obj)]
        tb = tb.tb_next
    return found


def _explain(exc: BaseException, model: nn.Module) -> tuple[str, str, str]:
    """``(what, op, fix)`` for a failed export."""
    msg = str(exc)
    _, calls = user_frame_of_exception(exc)
    calls = calls or ""
    if isinstance(exc, _ReentrantCheckpoint):
        return ("torch.utils.checkpoint(..., use_reentrant=True) inside the forward: export traces the reentrant "
                "variant as a no-grad region, so the captured graph would carry no gradient through it",
                "torch.utils.checkpoint.CheckpointFunction (use_reentrant=True)",
                "pass use_reentrant=False (torch's recommended variant; for Hugging Face models "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})): "
                "non-reentrant regions are kept and still save memory (docs/distributed.md)")
    if "not a known type" in msg and "Cache" in msg:
        return ("the model returns a KV cache object", "output flattening (torch.utils._pytree)",
                "build the model with use_cache=False (config.use_cache = False)")
    if "not a known type" in msg:
        return ("the model returns an object torch.utils._pytree cannot flatten", "output flattening",
                "register its class with torch.utils._pytree.register_pytree_node (dataclasses are registered "
                "automatically), or return a tuple / dict / dataclass")
    if "data-dependent" in msg or "GuardOnDataDependent" in type(exc).__name__:
        if "guard_bool" in calls or "__bool__" in calls or "Eq(" in msg.split("\n")[0]:
            what = "data-dependent control flow: a Python if/while/and/or/assert/bool() on a tensor's value"
            op = "aten.item (Tensor.__bool__: the tensor's value becomes a Python bool)"
        else:
            what = "data-dependent value: a tensor's value becomes a Python number"
            op = "aten.item / aten._local_scalar_dense (.item(), int(), float() or .tolist() of a tensor)"
        fix = ("compute both branches and select with torch.where, or use torch.cond(pred, true_fn, false_fn, "
               "operands); a value that is only checked can be asserted with torch._check(...); shapes must not "
               "depend on tensor values")
        return what, op, fix
    return (f"{type(exc).__name__}", "see the export message below",
            "check that torch.export.export(model, args, kwargs, strict=False) works on this model "
            "(torch.export.draft_export lists every problem at once)")


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool = True) -> Capture:
    """Export ``model`` in training mode and return the cleaned graph module.

    Raises :class:`CaptureError` when export fails (the message names what failed, the user's
    source line, the module and the fix) or when the forward has Python side effects (attributes it
    changes), which the captured graph would silently drop. The model is left as it was either way.
    """
    kwargs = dict(kwargs or {})
    dyn = _dynamic_shapes(model, args, kwargs) if dynamic else None
    watch = _CaptureWatch(model)
    try:
        with _train_mode(model), watch, _tag_checkpoint_regions(), _opaque_sdpa():
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        msg = str(e)
        what, op, fix = _explain(e, model)
        where, _ = user_frame_of_exception(e)
        fqn = _module_of_frame(e, model)
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        lines = [f"torch.export could not capture {type(model).__name__} as one graph: {what}"]
        if where:
            lines.append("  at " + where.replace("\n", "\n  "))
        if fqn is not None:
            lines.append(f"  module: {fqn or '(the root module)'}")
        lines.append(f"  op: {op}")
        lines.append(f"  fix: {fix}")
        lines.append(f"  ({type(e).__name__}: {first})")
        lines.append(f"--- export said ---\n{msg[:4000]}")
        raise CaptureError("\n".join(lines)) from e
    if watch.changes:
        shown = watch.changes[:8] + ([f"... and {len(watch.changes) - 8} more"] if len(watch.changes) > 8 else [])
        raise CaptureError(
            f"{type(model).__name__}.forward has Python side effects that a captured graph cannot repeat "
            "(export runs the forward once, at capture, and the graph never runs Python code):\n"
            + "\n".join(f"  - {c}" for c in shown)
            + "\n  fix: keep such state out of forward, or make it a registered buffer updated in place "
            "(e.g. self.steps.add_(1) with self.register_buffer('steps', torch.zeros((), dtype=torch.long))); "
            "the model was left unchanged"
        )
    gm = ep.module()
    _restore_sdpa(gm)
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
