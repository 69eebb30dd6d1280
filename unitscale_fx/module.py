"""The module :func:`unitscale_fx.transform` returns.

:class:`UnitScaledModule` shares its parameters, buffers and submodules with the user's model
(the very same objects), so ``state_dict()`` keys, ``parameters()`` and optimizers are exactly the
model's. It captures the graph at the first call (or at construction when example inputs are
given), runs the pipeline, and from then on calls the rewritten graph (compiled by default).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .config import Config
from .errors import AlreadyTransformedError

__all__ = ["UnitScaledModule"]


class UnitScaledModule(nn.Module):
    """A unit-scaled view of a model (see :func:`unitscale_fx.transform`)."""

    def __init__(self, model: nn.Module, config: Config):
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
            result = _run_pipeline(self._us_model, args, kwargs, self._us_config)
            object.__setattr__(self, "_us_result", result)
            object.__setattr__(self._us_model, "_unitscale_fx_transformed", True)
            self._sync_mode()
            object.__setattr__(self, "_us_runner", self._make_runner())
        return self

    def _make_runner(self):
        gm = self._us_result.gm
        cfg = self._us_config
        if not cfg.compile:
            return gm
        return torch.compile(gm, backend=cfg.compile_backend, dynamic=True if cfg.dynamic else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._us_result is None:
            self.prepare(*args, **kwargs)
        return self._us_runner(*args, **kwargs)

    # ---------------------------------------------------------------------------- nn.Module
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
