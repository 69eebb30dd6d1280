"""The one options object of :func:`unitscale_fx.transform`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch.nn as nn

from .errors import ConfigError

__all__ = ["Config", "FilterFn"]

#: ``filter_fn(module, fqn) -> bool``: ``True`` means "unit-scale the ops owned by this module".
FilterFn = Callable[[nn.Module, str], bool]

_INIT = ("unit", "keep")
_RESIDUAL = ("running_mean", "equal")
_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class Config:
    """Options of :func:`unitscale_fx.transform`. Frozen and validated on construction.

    Attributes:
        compile: hand the rewritten graph to ``torch.compile`` (``compile_backend``). ``False`` runs
            the rewritten graph eagerly.
        compile_backend: ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"``.
        init: ``"unit"`` re-initialises weights in place to unit scale (matmul/embedding weights
            unit RMS, norm gains 1, biases 0); ``"keep"`` leaves every parameter as it is.
        strict: raise :class:`~unitscale_fx.MissingRuleError` when an op has no scale rule, instead of
            reporting it and leaving it unscaled.
        fuse_attention: replace hand-written attention with ``F.scaled_dot_product_attention``.
        fuse_norms: replace hand-written RMS norms (``x * rsqrt(mean(x**2) + eps) * w``: T5, Llama...)
            with ``aten.rms_norm`` (see :mod:`unitscale_fx.passes.fuse_norm`).
        dynamic: capture with dynamic batch and sequence dimensions (``torch.export.Dim.AUTO``).
        residual: how residual adds are weighted. ``"running_mean"`` (default) gives every branch the
            same share of the residual stream, the embedding included (tau_i = 1/sqrt(i), the u-muP
            depth rule for a running sum); ``"equal"`` normalises ``a + b`` by its predicted RMS.
        filter_fn: ``filter_fn(module, fqn) -> bool``; ops owned by a module for which it returns
            ``False`` (and by its children) are left exactly as they were.
        exclude: module fqn prefixes to leave untouched (same effect as a ``filter_fn``). A prefix
            that matches no module raises a warning.
        scale_backward: insert the backward-only gradient scales. ``False`` gives the exact gradient
            of the rewritten forward (used to prove gradient validity).
    """

    compile: bool = True
    compile_backend: str = "inductor"
    init: Literal["unit", "keep"] = "unit"
    strict: bool = False
    fuse_attention: bool = True
    fuse_norms: bool = True
    dynamic: bool = True
    residual: Literal["running_mean", "equal"] = "running_mean"
    filter_fn: FilterFn | None = field(default=None, compare=False)
    exclude: tuple[str, ...] = ()
    scale_backward: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):
            raise ConfigError(f"Config.compile must be a bool, got {self.compile!r}")
        if self.compile_backend not in _BACKENDS:
            raise ConfigError(
                f"Config.compile_backend must be one of {_BACKENDS}, got {self.compile_backend!r}"
            )
        if self.init not in _INIT:
            raise ConfigError(f"Config.init must be one of {_INIT}, got {self.init!r}")
        if self.residual not in _RESIDUAL:
            raise ConfigError(f"Config.residual must be one of {_RESIDUAL}, got {self.residual!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError("Config.filter_fn must be callable as filter_fn(module, fqn) -> bool")
        if isinstance(self.exclude, str):
            raise ConfigError(
                "Config.exclude is a tuple of module fqn prefixes, e.g. exclude=('lm_head',), "
                f"not the string {self.exclude!r}"
            )
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for item in self.exclude:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"Config.exclude entries must be non-empty strings, got {item!r}")
        for name in ("strict", "fuse_attention", "fuse_norms", "dynamic", "scale_backward"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Config.{name} must be a bool, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "Config":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- named presets -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Config":
        """Named presets: ``"default"``, ``"eager"`` (no torch.compile), ``"keep_init"``."""
        presets = {
            "default": cls(),
            "eager": cls(compile=False),
            "keep_init": cls(init="keep"),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return presets[name]

    def owns(self, module: nn.Module, fqn: str) -> bool:
        """Whether ops owned by ``module`` (at ``fqn``) are unit-scaled under this config."""
        for prefix in self.exclude:
            if fqn == prefix or fqn.startswith(prefix + "."):
                return False
        if self.filter_fn is not None and not self.filter_fn(module, fqn):
            return False
        return True
