"""The module :func:`unitscale_fx.transform` returns.

:class:`UnitScaledModule` shares its parameters, buffers and submodules with the user's model
(the very same objects), so ``state_dict()`` keys, ``parameters()`` and optimizers are exactly the
model's. It captures the graph at the first call (or at construction when example inputs are
given), runs the pipeline, and from then on calls the rewritten graph (compiled by default).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .config import Config
from .errors import AlreadyTransformedError, InputMismatchError

__all__ = ["UnitScaledModule"]

_MISSING = object()


def _refuse_transformed(model: nn.Module) -> None:
    """Raise :class:`AlreadyTransformedError` if ``model`` or a submodule is already unit-scaled."""
    if isinstance(model, UnitScaledModule):
        raise AlreadyTransformedError(
            "this model is already unit-scaled (unitscale_fx.transform was called on it); "
            "transform the original model once"
        )
    if getattr(model, "_unitscale_fx_transformed", False):
        raise AlreadyTransformedError(
            f"{type(model).__name__} has already been transformed by unitscale_fx; "
            "its parameters were re-initialised and are shared with the first result. "
            "Use that result, or transform a fresh copy of the model."
        )
    for name, sub in model.named_modules():
        if not name:
            continue
        if isinstance(sub, UnitScaledModule) or getattr(sub, "_unitscale_fx_transformed", False):
            raise AlreadyTransformedError(
                f"submodule {name!r} ({type(sub).__name__}) of {type(model).__name__} is already unit-scaled; "
                "transforming the outer model would scale it twice. Transform the outer model built from the "
                "original (untransformed) submodules instead."
            )


# nn.Module dicts restored (same dict objects, old contents) when a transform fails
_MODULE_DICTS = (
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class _Transaction:
    """Snapshot of everything a transform could touch in a model; restored if the transform fails.

    Per module: the training flag, the other attributes in ``__dict__`` (by identity, and the
    contents of lists / dicts / sets), and the contents of the parameter / buffer / submodule /
    hook dicts. Per parameter: ``requires_grad`` and ``.grad``. Buffer values are cloned (export runs on fake tensors, so a captured BatchNorm
    must not move its running statistics). Parameter values are not cloned here: no pass writes
    them; the unit re-initialisation (:class:`unitscale_fx.api._InitJob`, overlapping the analysis)
    restores what it wrote if it or anything after it fails.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.mods = list(model.modules())
        self.attrs = [dict(m.__dict__) for m in self.mods]
        self.dicts = [{k: copy.copy(getattr(m, k)) for k in _MODULE_DICTS if hasattr(m, k)} for m in self.mods]
        # the user's own containers (a forward that appends to a list during capture)
        self.containers = [(v, copy.copy(v)) for attrs in self.attrs for k, v in attrs.items()
                           if k not in _MODULE_DICTS and type(v) in (list, dict, set)]
        params = {id(p): p for m in self.mods for p in m._parameters.values() if p is not None}
        self.params = [(p, p.requires_grad, p.grad) for p in params.values()]
        bufs = {id(b): b for m in self.mods for b in m._buffers.values() if b is not None}
        with torch.no_grad():
            self.bufs = [(b, b.detach().clone()) for b in bufs.values() if b.device.type != "meta"]

    def restore(self) -> None:
        for m, attrs, dicts in zip(self.mods, self.attrs, self.dicts):
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)  # same objects as before (the training flag included)
            for k, old in dicts.items():
                live = attrs[k]  # the very dict / set the module had: old contents back in
                live.clear()
                live.update(old)
        for live, old in self.containers:
            live.clear()
            if isinstance(live, list):
                live.extend(old)
            else:
                live.update(old)
        with torch.no_grad():
            for p, rg, g in self.params:
                p.requires_grad_(rg)
                p.grad = g
            for b, v in self.bufs:
                if b.shape == v.shape:
                    b.copy_(v)


def _is_input_check(e: BaseException) -> bool:
    """Whether ``e`` was raised by export's check of the inputs against the captured graph."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("_check_input_constraints_for_module", "_check_inputs_match",
                                          "_check_input_constraints_pre_hook", "reorder_kwargs"):
            return True
        tb = tb.tb_next
    return False


class UnitScaledModule(nn.Module):
    """A unit-scaled view of a model (see :func:`unitscale_fx.transform`)."""

    def __init__(self, model: nn.Module, config: Config):
        _refuse_transformed(model)
        super().__init__()
        object.__setattr__(self, "_us_model", model)
        object.__setattr__(self, "_us_config", config)
        object.__setattr__(self, "_us_result", None)
        object.__setattr__(self, "_us_runner", None)
        # share state with the user's model: same dicts, same objects
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self._modules = model._modules
        self.training = model.training

    # ---------------------------------------------------------------------------- calling
    @property
    def config(self) -> Config:
        return self._us_config

    @property
    def result(self):
        """The :class:`~unitscale_fx.api.TransformResult` (``None`` until captured)."""
        return self._us_result

    @property
    def graph_module(self) -> fx.GraphModule | None:
        return None if self._us_result is None else self._us_result.gm

    @property
    def original_model(self) -> nn.Module:
        return self._us_model

    def prepare(self, *args: Any, **kwargs: Any) -> "UnitScaledModule":
        """Capture and transform now, with these example inputs (done at the first call otherwise)."""
        from .api import _run_pipeline

        if self._us_result is None:
            model = self._us_model
            # another (lazy) wrapper of the same model may have been prepared since this one was built
            _refuse_transformed(model)
            txn = _Transaction(model)
            try:
                result = _run_pipeline(model, args, kwargs, self._us_config,
                                       init_weights=not self.__dict__.get("_us_loaded", False))
                object.__setattr__(self, "_us_result", result)
                self._sync_mode()
                object.__setattr__(self, "_us_runner", self._make_runner())
            except BaseException:
                object.__setattr__(self, "_us_result", None)
                object.__setattr__(self, "_us_runner", None)
                txn.restore()
                raise
            object.__setattr__(model, "_unitscale_fx_transformed", True)
        return self

    # ---------------------------------------------------------------------------- inputs
    def _conform(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` in the captured calling convention (positional vs keyword).

        A call may pass an argument by position or by keyword, whichever way it was captured, and
        may leave out an argument whose value equals its default (or was ``None`` at capture).
        Anything else (an argument that was not given at capture, or one missing now) raises
        :class:`InputMismatchError`.
        """
        # the captured convention as plain values (reading the captured example tensors here would
        # make a torch.compile of this wrapper guard on them and recompile for every new shape)
        shape = self.__dict__.get("_us_call_shape")
        cap = self._us_result.capture
        if shape is None or shape[0] is not cap:
            shape = (cap, len(cap.args), frozenset(cap.kwargs))
            object.__setattr__(self, "_us_call_shape", shape)
        if len(args) == shape[1] and frozenset(kwargs) == shape[2]:
            return args, kwargs
        try:
            sig = inspect.signature(self._us_model.forward)
            bound = sig.bind(*args, **kwargs)
            cap_bound = sig.bind(*cap.args, **cap.kwargs)
        except (TypeError, ValueError) as e:
            raise InputMismatchError(self._mismatch_message(args, kwargs, str(e))) from e
        params = sig.parameters
        if any(params[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               for n in list(bound.arguments) + list(cap_bound.arguments)):
            raise InputMismatchError(self._mismatch_message(args, kwargs, "*args/**kwargs differ from the capture"))
        pos_names = list(params)[: len(cap.args)]
        needed = pos_names + list(cap.kwargs)
        got = dict(bound.arguments)
        missing, values = [], {}
        for n in needed:
            if n in got:
                values[n] = got.pop(n)
                continue
            captured = cap_bound.arguments.get(n, _MISSING)
            default = params[n].default
            if captured is None or (default is not inspect.Parameter.empty and captured is default):
                values[n] = captured
            else:
                missing.append(n)
        extra = [n for n, v in got.items() if not (v is params[n].default or (v is None and params[n].default is None))]
        if missing or extra:
            why = []
            if missing:
                why.append(f"missing now: {', '.join(missing)}")
            if extra:
                why.append(f"not given at capture: {', '.join(extra)}")
            raise InputMismatchError(self._mismatch_message(args, kwargs, "; ".join(why)))
        return tuple(values[n] for n in pos_names), {n: values[n] for n in cap.kwargs}

    def _captured_call(self) -> str:
        cap = self._us_result.capture

        def show(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                return f"Tensor{list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
            return repr(v) if len(repr(v)) < 40 else type(v).__name__
        parts = [show(a) for a in cap.args] + [f"{k}={show(v)}" for k, v in cap.kwargs.items()]
        return f"{type(self._us_model).__name__}({', '.join(parts)})"

    def _mismatch_message(self, args: tuple, kwargs: dict, why: str) -> str:
        return (
            f"this call does not fit the graph unitscale_fx captured: {why}\n"
            f"  captured call: {self._captured_call()}\n"
            f"  this call: {len(args)} positional argument(s), keywords {sorted(kwargs)}\n"
            "  fix: call the model with the same arguments as at capture (a tensor may change its batch and "
            "sequence sizes; e.g. keep passing labels and ignore the loss), or transform with example inputs "
            "that have the arguments you will pass"
        )

    def _run(self, args: tuple, kwargs: dict) -> Any:
        try:
            return self._us_runner(*args, **kwargs)
        except (RuntimeError, ValueError, TypeError, AssertionError) as e:
            if not _is_input_check(e):
                raise
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputMismatchError(
                f"this call does not fit the graph unitscale_fx captured: {text}\n"
                f"  captured call: {self._captured_call()}\n"
                "  fix: non-tensor arguments (Python numbers, strings, flags) are constants of the captured "
                "graph: pass the value used at capture, or make it a tensor; a dimension can only vary within "
                "the range torch.export derived from the model's code (e.g. not beyond a position table)"
            ) from e

    def _make_runner(self):
        from .passes.checkpoint import outline_checkpoints

        # the user's activation-checkpoint regions run through checkpoint again (the result's own
        # graph, which reports read, keeps every node at the top level)
        gm, _ = outline_checkpoints(self._us_result.gm)
        cfg = self._us_config
        if not cfg.compile:
            return gm
        return torch.compile(gm, backend=cfg.compile_backend, dynamic=True if cfg.dynamic else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._us_result is None:
            self.prepare(*args, **kwargs)
        args, kwargs = self._conform(args, kwargs)
        return self._run(args, kwargs)

    # ---------------------------------------------------------------------------- nn.Module
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; loading *before* the first call (lazy capture) keeps the
        loaded values: the capture then plans the unit scales without re-initialising the weights."""
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._us_result is None:
            object.__setattr__(self, "_us_loaded", True)
        return out

    def train(self, mode: bool = True) -> "UnitScaledModule":
        super().train(mode)
        self._us_model.training = mode
        self._sync_mode()
        return self

    def _sync_mode(self) -> None:
        res = self._us_result
        if res is not None and hasattr(res.gm, "_us_mode"):
            res.gm._us_mode.training = self.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_us_model")
            if model is not None and not name.startswith("_us_"):
                return getattr(model, name)
            raise

    def __deepcopy__(self, memo: dict) -> "UnitScaledModule":
        model = copy.deepcopy(self._us_model, memo)
        new = UnitScaledModule.__new__(UnitScaledModule)
        nn.Module.__init__(new)
        object.__setattr__(new, "_us_model", model)
        object.__setattr__(new, "_us_config", self._us_config)
        new._parameters = model._parameters
        new._buffers = model._buffers
        new._non_persistent_buffers_set = model._non_persistent_buffers_set
        new._modules = model._modules
        new.training = self.training
        res = self._us_result
        if res is not None:
            from .api import _rebind

            res = _rebind(res, model, memo)
        object.__setattr__(new, "_us_result", res)
        object.__setattr__(new, "_us_runner", new._make_runner() if res is not None else None)
        return new

    def __getstate__(self) -> dict:
        raise TypeError(
            "a UnitScaledModule cannot be pickled whole (it holds a compiled graph); save "
            "model.state_dict() and call unitscale_fx.transform on a fresh model to load it"
        )

    def summary(self) -> str:
        """What the transform did: counts of rewrites per kind and ops without a scale rule."""
        if self._us_result is None:
            return "UnitScaledModule (not captured yet: runs the transform at the first call)"
        return self._us_result.summary()

    def extra_repr(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"UnitScaledModule({type(self._us_model).__name__})\n  " + self.summary().replace("\n", "\n  ")
