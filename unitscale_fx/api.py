"""Public entry points: :func:`transform` and :func:`analyse`."""
from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from .analysis.propagate import GraphAnalysis, MissingOp, missing_in_graph, missing_message
from .capture import Capture, capture, normalize_inputs
from .config import Config
from .errors import ConfigError, MissingRuleError, MissingRuleWarning
from .passes.base import PassManager, TransformState
from .passes.canonicalize import ModeAwareOps, SplitBias
from .passes.combine_scales import CombineSizeScales
from .passes.functionalize import FunctionalizeInPlace
from .passes.reinit import PlanInit, apply_init
from .passes.scale_backward import UnitScaleBackward
from .passes.scale_forward import UnitScaleForward

__all__ = ["transform", "analyse", "TransformResult", "AnalysisResult", "build_passes"]


@dataclass
class AnalysisResult:
    """Predicted scales of every edge of a captured graph (see :mod:`unitscale_fx.report`)."""

    gm: fx.GraphModule
    capture: Capture
    analysis: GraphAnalysis
    title: str = "original"

    @property
    def missing(self) -> list[MissingOp]:
        return list(self.analysis.missing)

    @property
    def hints(self) -> dict[sympy.Symbol, int]:
        return self.capture.hints

    @property
    def symbol_names(self) -> dict[sympy.Symbol, sympy.Symbol]:
        return self.capture.symbol_names


class _LazyAnalysis:
    """Stands for the :class:`GraphAnalysis` of a transformed graph and builds it on first use: the
    predicted scales of the final graph serve reports, ``track`` and ``check``, never training."""

    __slots__ = ("_build", "_ga")

    def __init__(self, build: Any) -> None:
        self._build, self._ga = build, None

    @property
    def built(self) -> bool:
        return self._ga is not None

    def get(self) -> GraphAnalysis:
        if self._ga is None:
            self._ga, self._build = self._build(), None
        return self._ga

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    def __repr__(self) -> str:
        return repr(self._ga) if self._ga is not None else "<GraphAnalysis of the transformed graph, not built yet>"


@dataclass
class TransformResult(AnalysisResult):
    """The transformed graph and what was done. ``analysis`` (the predicted scales of the transformed
    graph) is built on first use: training never needs it."""

    state: TransformState | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_ops: list[MissingOp] | None = field(default=None, repr=False)

    @property
    def missing(self) -> list[MissingOp]:
        lazy = self.analysis
        if isinstance(lazy, _LazyAnalysis) and not lazy.built and self.missing_ops is not None:
            return list(self.missing_ops)
        return list(lazy.missing)

    def summary(self) -> str:
        lines = ["unit-scaled graph:"]
        for pname, c in self.counts.items():
            nz = {k: v for k, v in c.items() if v}
            if nz:
                lines.append(f"  {pname}: " + ", ".join(f"{k}={v}" for k, v in nz.items()))
        if self.missing:
            lines.append(f"  ops without a scale rule ({len(self.missing)}, left unscaled):")
            lines += [f"    - {m}" for m in self.missing]
        else:
            lines.append("  every op has a scale rule")
        return "\n".join(lines)


def build_passes(config: Config):
    """The pipeline, in order. Each pass is a small named unit (see unitscale_fx.passes)."""
    passes: list = [FunctionalizeInPlace(), ModeAwareOps()]
    if config.fuse_norms:
        from .passes.fuse_norm import FuseRMSNorm

        passes.append(FuseRMSNorm())
    if config.fuse_attention:
        from .passes.fuse_attention import FuseAttention

        passes.append(FuseAttention())
    passes += [SplitBias(), PlanInit(init=config.init), UnitScaleForward(residual=config.residual)]
    if config.scale_backward:
        passes.append(UnitScaleBackward())
    passes.append(CombineSizeScales())
    return passes


def _bind(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make ``gm`` read parameters, buffers and submodules from ``model`` itself.

    Constants that export lifted onto *its copy* of a submodule (``encoder.lifted_tensor_0``: a
    tensor created in ``forward``) are not on the user's submodule: they move to ``gm`` itself
    (the user's modules are never given new attributes).
    """
    own = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    own |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in own or "." not in node.target:
            continue
        try:
            model.get_submodule(node.target)
            continue  # a submodule of the user's model
        except AttributeError:
            pass
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        flat = "_us_const_" + node.target.replace(".", "_")
        object.__setattr__(gm, flat, value) if not isinstance(value, nn.Module) else gm.add_module(flat, value)
        node.target = flat
    gm.recompile()
    for name, mod in model._modules.items():
        gm._modules[name] = mod
    gm._parameters = model._parameters
    gm._buffers = model._buffers


def _skipped_nodes(gm: fx.GraphModule, model: nn.Module, config: Config) -> set:
    if not config.exclude and config.filter_fn is None:
        return set()
    excluded: set[str] = set()
    matched = {p: False for p in config.exclude}
    for fqn, mod in model.named_modules():
        if not config.owns(mod, fqn):
            excluded.add(fqn)
        for p in config.exclude:
            if fqn == p or fqn.startswith(p + "."):
                matched[p] = True
    for p, ok in matched.items():
        if not ok:
            warnings.warn(f"Config.exclude entry {p!r} matches no module of {type(model).__name__}", stacklevel=3)
    if config.filter_fn is not None and not excluded:
        warnings.warn("Config.filter_fn excludes no module: every op is unit-scaled", stacklevel=3)
    skipped = set()
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            fqn = _clean_fqn(path)
            if fqn in excluded:
                skipped.add(node)
                break
    return skipped


def _clean_fqn(path: str) -> str:
    # export records paths like "L['self'].transformer.h[0]" or "transformer.h.0"
    p = path
    for pre in ("L['self'].", "L['self']"):
        if p.startswith(pre):
            p = p[len(pre):]
    return p.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def _run_pipeline(model: nn.Module, args: tuple, kwargs: dict, config: Config, *,
                  init_weights: bool = True) -> TransformResult:
    """Capture, analyse and rewrite ``model``. ``init_weights=False`` plans the scales for
    ``config.init`` but leaves the parameter values alone (a checkpoint was loaded before capture)."""
    cap = capture(model, args, kwargs, dynamic=config.dynamic)
    gm = cap.gm
    _bind(gm, model)
    state = TransformState(capture=cap, config=config, hints=dict(cap.hints))
    state.skipped_nodes = _skipped_nodes(gm, model, config)
    job: _InitJob | None = None

    def start_init(p: Any, st: TransformState) -> None:
        nonlocal job
        if isinstance(p, PlanInit) and config.init == "unit" and init_weights and job is None:
            job = _InitJob(model, dict(st.param_roles))

    try:
        gm = PassManager(build_passes(config), on_done=start_init)(gm, state)
        # every node was visited by an analysis of a pass: the ops without a rule are marked on them
        missing = missing_in_graph(gm)
        if config.strict and missing:
            raise MissingRuleError(missing_message(missing), [(m.node, m.op, m.source) for m in missing])
        if missing:
            warnings.warn(missing_message(missing), MissingRuleWarning, stacklevel=4)
    except BaseException:
        if job is not None:
            job.cancel()
        raise
    if job is not None:
        job.finish()
    handed = state.final_analysis if state.final_analysis is not None and state.final_analysis.gm is gm else None
    state.final_analysis = None  # do not keep the passes' analysis alive beside the result's

    def final_analysis() -> GraphAnalysis:
        """Forward and backward analysis of the transformed graph (reports, ``track``, ``check``)."""
        final = handed
        if final is None:
            final = GraphAnalysis(gm, hints=dict(cap.hints), param_stats=dict(state.param_stats),
                                  example_values=dict(cap.example_values))
            final.run_forward()
        final.run_backward()
        return final

    return TransformResult(gm=gm, capture=cap, analysis=_LazyAnalysis(final_analysis), title="transformed",
                           state=state, counts=dict(state.counts), missing_ops=missing)


class _InitJob:
    """:func:`apply_init`, all or nothing, on a worker thread.

    The re-init of the weights (drawing ~100 M normal numbers for a GPT-2-small) overlaps the scale
    analysis: it starts as soon as :class:`~unitscale_fx.passes.reinit.PlanInit` has planned the
    roles, and the passes after it never read the values it writes (they use the planned unit
    statistics; the analysis does not evaluate parameters). The torch kernels release the GIL, so
    on a machine with two cores or more the init is nearly free (see docs/design.md).

    All or nothing: the old values are copied to the CPU first; :meth:`cancel` (the transform failed
    after the job started) and a failure inside the job put them back. The draws come from a private
    generator started at the global CPU generator's state, and :meth:`finish` leaves the global
    generator where drawing the values directly from it would have left it: the same values and
    the same state afterwards as a serial init, whatever the other thread does meanwhile.
    """

    def __init__(self, model: nn.Module, roles: dict[str, str]):
        self.model, self.roles = model, roles
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.error: BaseException | None = None
        self.gen = torch.Generator()
        self.gen.set_state(torch.random.get_rng_state())
        self.thread = threading.Thread(target=self._run, name="unitscale_fx-init", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.no_grad():
                seen: set[int] = set()
                for fqn, role in self.roles.items():
                    if role == "keep":
                        continue
                    try:
                        p = self.model.get_parameter(fqn)
                    except AttributeError:
                        continue
                    if id(p) not in seen and p.device.type != "meta":
                        seen.add(id(p))
                        self.saved.append((p, p.detach().to("cpu", copy=True)))
                apply_init(self.model, self.roles, generator=self.gen)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            self.error = e

    def _restore(self) -> None:
        with torch.no_grad():
            for p, old in self.saved:
                p.copy_(old.to(p.device))
        self.saved = []

    def finish(self) -> None:
        """Wait for the init; on failure restore the parameters and raise its error here."""
        self.thread.join()
        if self.error is not None:
            self._restore()
            raise self.error
        self.saved = []
        torch.random.set_rng_state(self.gen.get_state())

    def cancel(self) -> None:
        """The transform failed: wait for the init, then put every parameter back."""
        self.thread.join()
        self._restore()


def _rebind(res: TransformResult, model: nn.Module, memo: dict) -> TransformResult:
    new = copy.copy(res)
    new.gm = copy.deepcopy(res.gm, memo)
    _bind(new.gm, model)
    return new


def transform(model: nn.Module, example_inputs: Any = None, config: Config | None = None, **options: Any):
    """Make ``model`` unit-scaled.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture (non-strict).
        example_inputs: a tuple of positional args or a dict of keyword args, as the model is
            called. ``None`` (default): capture happens at the first call.
        config: a :class:`Config`; keyword ``options`` are a shortcut for ``Config(**options)``.

    Returns:
        a :class:`~unitscale_fx.module.UnitScaledModule` sharing the model's parameters.
    """
    from .module import UnitScaledModule

    if not isinstance(model, nn.Module):
        raise ConfigError(f"transform expects an nn.Module, got {type(model).__name__}")
    if config is not None and options:
        raise ConfigError("pass either config=Config(...) or keyword options, not both")
    cfg = config if config is not None else Config(**options)
    wrapped = UnitScaledModule(model, cfg)
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
        wrapped.prepare(*args, **kwargs)
    return wrapped


def analyse(model: nn.Module, example_inputs: Any, *, strict: bool = False, backward: bool = True) -> AnalysisResult:
    """Predict the forward and backward scale of every edge of ``model``, changing nothing.

    Works on models built on the ``meta`` device (no weights needed): parameter scales then stay
    symbols ``sigma[<fqn>]``.
    """
    from .module import UnitScaledModule

    if isinstance(model, UnitScaledModule):
        res = model.result
        if res is None:
            raise ConfigError("this UnitScaledModule has not run yet; call it once or pass example_inputs to transform")
        return res
    args, kwargs = normalize_inputs(example_inputs)
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    cap_args, cap_kwargs = args, kwargs
    if on_meta:
        to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
        cap_args = tuple(torch.utils._pytree.tree_map(to_meta, args))
        cap_kwargs = torch.utils._pytree.tree_map(to_meta, kwargs)
    cap = capture(model, cap_args, cap_kwargs)
    if on_meta:
        from torch.fx._pytree import tree_flatten_spec

        phs = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
        spec = cap.gm.graph._codegen.pytree_info.in_spec
        for n, v in zip(phs, tree_flatten_spec((list(args), kwargs), spec)):
            cap.example_values[n.name] = v
    ga = GraphAnalysis(cap.gm, hints=dict(cap.hints), example_values=dict(cap.example_values), strict=strict)
    ga.run_forward()
    if backward:
        ga.run_backward()
    return AnalysisResult(gm=cap.gm, capture=cap, analysis=ga, title="original")
