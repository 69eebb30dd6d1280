"""Measure the real scale of every edge of a captured graph during one training step.

:func:`measure_graph` runs a graph module node by node (a ``torch.fx.Interpreter``), records the RMS of
every floating value and registers a hook on it that records the RMS of its gradient during
``backward()``. The result is keyed by node name, so it can be set beside the analysis'
predictions (see :mod:`unitscale_fx.report`).

:func:`track` is the user-facing entry point (exported as ``unitscale_fx.track``): it analyses or
transforms a model, runs one forward + backward on the captured graph (eager) and returns a
:class:`~unitscale_fx.report.Report` with predicted *and* measured scales of every edge, plus how much
of each tensor would underflow / overflow in FP8 / FP16 / BF16. The user's parameters, their
``.grad``, the buffers and the global RNG state are left exactly as they were.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

__all__ = ["EdgeMeasurement", "FORMATS", "measure_graph", "headroom_of", "track"]

#: Number formats checked for headroom: (smallest positive subnormal, largest finite value).
FORMATS: dict[str, tuple[float, float]] = {
    "fp8_e4m3": (2.0**-9, 448.0),
    "fp8_e5m2": (2.0**-16, 57344.0),
    "fp16": (2.0**-24, 65504.0),
    "bf16": (2.0**-133, 3.3895313892515355e38),
}

_SAMPLE = 1 << 20  # headroom is estimated on at most this many elements (a fixed random subset)


@dataclass
class EdgeMeasurement:
    """Measured statistics of one node's output (and of the gradient arriving at it).

    Attributes:
        fwd: RMS of the value (``None``: not a floating tensor).
        bwd: RMS of the gradient that reached the value in ``backward()`` (``None``: no gradient).
        headroom: ``{"fwd"|"bwd": {format: {"underflow": frac, "overflow": frac}}}`` when asked for
            (see :func:`headroom_of`).
        nonfinite: ``{"fwd"|"bwd": fraction of inf/NaN elements}``, only where there are some
            (``fwd``/``bwd`` are then the RMS of the finite elements).
        outputs: for nodes that return several tensors (``split``), one measurement per output.
    """

    fwd: float | None = None
    bwd: float | None = None
    headroom: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    nonfinite: dict[str, float] = field(default_factory=dict)
    outputs: list["EdgeMeasurement"] | None = None


def _as_float(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rms(t: torch.Tensor) -> float:
    """RMS over the finite elements (a masked ``-inf`` score is not a scale); NaN if none is finite."""
    n = t.numel()
    if n == 0:
        return 0.0
    x = _as_float(t)
    norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))  # one pass; inf/nan if any element is
    if math.isfinite(norm):
        return norm / math.sqrt(n)
    x = x.double()
    fin = torch.isfinite(x)
    if bool(fin.all()):
        return float(x.pow(2).mean().sqrt())
    k = int(fin.sum())
    if k == 0:
        return math.nan
    return float(x[fin].pow(2).mean().sqrt())


def _nonfinite(t: torch.Tensor) -> float:
    n = t.numel()
    if n == 0 or not t.is_floating_point():
        return 0.0
    x = _as_float(t)
    if math.isfinite(float(x.sum())):  # fast path: a sum is finite when every element is
        return 0.0
    return float((~torch.isfinite(x)).sum()) / n


def headroom_of(t: torch.Tensor) -> dict[str, dict[str, float]]:
    """Fraction of the elements of ``t`` that a cast to each of :data:`FORMATS` would lose.

    ``underflow``: non-zero elements that round to zero (``|x| <= smallest subnormal / 2``);
    ``overflow``: finite elements beyond the largest finite value (``|x| > max``). Elements that are
    already inf / NaN (masked attention scores) count in neither (see ``EdgeMeasurement.nonfinite``).
    Both are fractions of *all* elements. Tensors of more than 2**20 elements are sampled.
    """
    a = t.detach().reshape(-1)
    n = a.numel()
    out = {fmt: {"underflow": 0.0, "overflow": 0.0} for fmt in FORMATS}
    if n == 0:
        return out
    if n > _SAMPLE:
        g = torch.Generator(device="cpu").manual_seed(0)
        idx = torch.randint(0, n, (_SAMPLE,), generator=g).to(a.device)
        a = a[idx]
        n = _SAMPLE
    a = _as_float(a).abs()
    if not math.isfinite(float(a.sum())):  # inf / nan are neither underflow nor overflow
        a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    amax = float(a.max())
    zeros = n - int(torch.count_nonzero(a))
    # the thresholds are nested: once a count is zero, the counts of the wider formats are too
    for fmt, (lo, _) in sorted(FORMATS.items(), key=lambda kv: -kv[1][0]):  # largest threshold first
        under = int(torch.count_nonzero(a <= lo / 2)) - zeros
        out[fmt]["underflow"] = under / n
        if under == 0:
            break
    for fmt, (_, hi) in sorted(FORMATS.items(), key=lambda kv: kv[1][1]):  # smallest max first
        if amax <= hi:
            break
        out[fmt]["overflow"] = int(torch.count_nonzero(a > hi)) / n
    return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, out: dict[str, EdgeMeasurement], headroom: bool):
        super().__init__(gm)
        self.out = out
        self.headroom = headroom
        self.handles: list[Any] = []

    def _watch(self, m: EdgeMeasurement, t: torch.Tensor) -> None:
        m.fwd = _rms(t)
        nf = _nonfinite(t)
        if nf:
            m.nonfinite["fwd"] = nf
        if self.headroom:
            m.headroom["fwd"] = headroom_of(t)
        if t.requires_grad:

            def hook(g: torch.Tensor, m: EdgeMeasurement = m) -> None:
                # a value with several uses: the hook sees the summed gradient once
                m.bwd = _rms(g)
                nf = _nonfinite(g)
                if nf:
                    m.nonfinite["bwd"] = nf
                if self.headroom:
                    m.headroom["bwd"] = headroom_of(g)

            self.handles.append(t.register_hook(hook))

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op in ("output", "placeholder") and not isinstance(result, torch.Tensor):
            return result
        if isinstance(result, torch.Tensor):
            if result.is_floating_point() and n.op != "output":
                if result.requires_grad and result.grad_fn is not None and _is_input_of(result, n, self):
                    # an op that returned one of its inputs (contiguous on a contiguous tensor):
                    # give it its own autograd node so the two edges are measured separately
                    result = result.view_as(result)
                m = self.out.setdefault(n.name, EdgeMeasurement())
                self._watch(m, result)
        elif isinstance(result, (tuple, list)) and n.op == "call_function" and any(
            isinstance(r, torch.Tensor) and r.is_floating_point() for r in result
        ):
            m = self.out.setdefault(n.name, EdgeMeasurement())
            m.outputs = []
            for r in result:
                mm = EdgeMeasurement()
                m.outputs.append(mm)
                if isinstance(r, torch.Tensor) and r.is_floating_point():
                    mm.fwd = _rms(r)
            # the gradients of the outputs are measured at the getitem nodes that read them
        return result


def _is_input_of(t: torch.Tensor, n: fx.Node, interp: fx.Interpreter) -> bool:
    for a in n.all_input_nodes:
        v = interp.env.get(a)
        if v is t:
            return True
    return False


@contextlib.contextmanager
def _preserved(params: list[torch.Tensor], buffers: list[torch.Tensor], seed: int | None) -> Iterator[None]:
    """Restore parameter ``.grad``, buffer contents and the RNG state on exit."""
    saved_grads = [p.grad for p in params]
    saved_bufs = []
    with torch.no_grad():
        for b in buffers:
            if b.device.type != "meta":
                saved_bufs.append((b, b.detach().clone()))
    devices = sorted({t.device.index or 0 for t in params + buffers if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for p in params:
                p.grad = None
            yield
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
            with torch.no_grad():
                for b, c in saved_bufs:
                    if b.shape == c.shape:
                        b.copy_(c)


def _graph_tensors(gm: fx.GraphModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    buffers: list[torch.Tensor] = []
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            (params if isinstance(t, nn.Parameter) else buffers).append(t)
    for node in gm.graph.nodes:  # get_attr tensors that are plain attributes
        if node.op != "get_attr":
            continue
        try:
            obj: Any = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.Tensor) and id(obj) not in seen:
            seen.add(id(obj))
            (params if isinstance(obj, nn.Parameter) else buffers).append(obj)
    return params, buffers


def measure_graph(
    gm: fx.GraphModule,
    args: tuple,
    kwargs: dict | None = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    headroom: bool = False,
    seed: int | None = 0,
) -> dict[str, EdgeMeasurement]:
    """Run one forward + backward of ``gm`` and measure every floating edge.

    The loss is ``loss_fn(output)``, else the model's own loss (``output.loss``, ``output["loss"]``
    or the first scalar output that requires grad). A graph without a loss gets a unit-RMS random
    gradient at every floating output, as the analysis assumes. Nothing is left behind: parameter
    ``.grad`` and buffers are restored, the hooks removed, and the RNG runs on a fork seeded with
    ``seed`` (``None``: the current state), so dropout masks are reproducible.
    """
    out: dict[str, EdgeMeasurement] = {}
    params, buffers = _graph_tensors(gm)
    with _preserved(params, buffers, seed), torch.enable_grad():
        recorder = _Recorder(gm, out, headroom)
        try:
            flat_args = _flatten_inputs(gm, args, kwargs or {})
            result = recorder.run(*flat_args, enable_io_processing=False)
            result = _unflatten_outputs(gm, result)
            loss = loss_fn(result) if loss_fn is not None else _find_loss(result)
            if loss is not None:
                if loss.requires_grad:
                    loss.reshape(()).backward() if loss.numel() == 1 else loss.backward(torch.ones_like(loss))
            else:
                outs = [t for t in tree_flatten(result)[0]
                        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
                if outs:
                    g = torch.Generator(device="cpu").manual_seed(0)
                    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]
                    torch.autograd.backward(outs, grads)
        finally:
            for h in recorder.handles:
                h.remove()
    return out


def _flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    codegen = gm.graph._codegen
    if hasattr(codegen, "pytree_info") and codegen.pytree_info is not None and codegen.pytree_info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((list(args), kwargs), codegen.pytree_info.in_spec))
    return list(args) + list(kwargs.values())


def _unflatten_outputs(gm: fx.GraphModule, result: Any) -> Any:
    codegen = gm.graph._codegen
    if hasattr(codegen, "pytree_info") and codegen.pytree_info is not None and codegen.pytree_info.out_spec is not None:
        from torch.utils._pytree import tree_unflatten

        leaves = list(result) if isinstance(result, (tuple, list)) else [result]
        return tree_unflatten(leaves, codegen.pytree_info.out_spec)
    return result


def _find_loss(result: Any) -> torch.Tensor | None:
    loss = getattr(result, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(result, dict) and isinstance(result.get("loss"), torch.Tensor):
        return result["loss"]
    leaves, _ = tree_flatten(result)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() == 0 and leaf.requires_grad:
            return leaf
    return None


# --------------------------------------------------------------------------------------------
# track
# --------------------------------------------------------------------------------------------


def _result_of(model_or_result: Any, example_inputs: Any, original: bool, config: Any):
    """The analysis / transform result to measure (never transforms the caller's model in place)."""
    from .api import AnalysisResult, analyse, transform
    from .capture import normalize_inputs
    from .module import UnitScaledModule

    if isinstance(model_or_result, AnalysisResult):
        if original and model_or_result.title != "original":
            raise ValueError(
                "track(result, original=True) needs the original model: pass the model (or the "
                "UnitScaledModule) instead of a TransformResult"
            )
        return model_or_result
    if isinstance(model_or_result, UnitScaledModule):
        if original:
            if example_inputs is None:
                res = model_or_result.result
                if res is None:
                    raise ValueError("track(original=True): pass example_inputs (the module has not run yet)")
                example_inputs = res.capture.kwargs if not res.capture.args else res.capture.args
            return analyse(model_or_result.original_model, example_inputs)
        if model_or_result.result is not None:
            return model_or_result.result
        if example_inputs is None:
            raise ValueError("track(): this UnitScaledModule has not run yet; pass example_inputs")
        # transform a copy: preparing the user's wrapper would re-initialise their model now
        with torch.random.fork_rng():
            wrapped = copy.deepcopy(model_or_result)
            args, kwargs = normalize_inputs(example_inputs)
            wrapped.prepare(*args, **kwargs)
        return wrapped.result
    if isinstance(model_or_result, nn.Module):
        if example_inputs is None:
            raise ValueError("track(model, example_inputs): example_inputs are needed to capture the model")
        if original:
            return analyse(model_or_result, example_inputs)
        # the transform re-initialises parameters: work on a copy, leave the user's model alone
        with torch.random.fork_rng():
            model = copy.deepcopy(model_or_result)
            options = {} if config is not None else {"compile": False}
            return transform(model, example_inputs, config=config, **options).result
    raise TypeError(
        "track() expects an nn.Module, a UnitScaledModule or an AnalysisResult/TransformResult, "
        f"got {type(model_or_result).__name__}"
    )


def track(
    model_or_result: Any,
    example_inputs: Any = None,
    *,
    original: bool = False,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    headroom: bool = True,
    seed: int | None = 0,
    config: Any = None,
    model_name: str | None = None,
):
    """Predicted and measured scales of every edge after one training step.

    Args:
        model_or_result: an ``nn.Module`` (transformed on a copy, or analysed as is with
            ``original=True``), a :class:`~unitscale_fx.module.UnitScaledModule`, or the result of
            :func:`unitscale_fx.analyse` / ``transform(...).result``.
        example_inputs: a tuple of positional args or a dict of keyword args (the batch). Optional
            for results (their capture inputs are used); the shape symbols are re-bound to its sizes.
        original: report on the original graph instead of the unit-scaled one.
        loss_fn: turns the graph's output into the loss (default: the model's own loss; a unit
            random gradient at every output when there is none).
        headroom: also measure the fraction of each tensor (and gradient) that would underflow /
            overflow in FP8 E4M3 / E5M2, FP16 and BF16.
        seed: the forward runs on a forked RNG seeded with this (dropout masks); ``None``: current.
        config: a :class:`~unitscale_fx.Config` for the transform of a plain module.

    Returns:
        a :class:`~unitscale_fx.report.Report` whose ``fwd``/``bwd`` entries have ``measured``
        filled in. The step runs eagerly on the captured graph (not compiled); the parameters, their
        ``.grad``, the buffers and the RNG state are unchanged afterwards (no optimizer step).
    """
    from .capture import normalize_inputs
    from .report import build_report

    result = _result_of(model_or_result, example_inputs, original, config)
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
    else:
        args, kwargs = tuple(result.capture.args), dict(result.capture.kwargs)
    gm = result.gm
    mode = getattr(gm, "_us_mode", None)
    prev = mode.training if mode is not None else None
    try:
        if mode is not None:
            mode.training = True  # a training step: dropout on, as at capture time
        measured = measure_graph(gm, args, kwargs, loss_fn=loss_fn, headroom=headroom, seed=seed)
    finally:
        if mode is not None:
            mode.training = prev
    hints = _bound_hints(gm, args, kwargs)
    return build_report(result, measured, model=model_name, hints=hints)


def _bound_hints(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict:
    """Shape-symbol values for these inputs (the capture's hints are for the capture's inputs)."""
    import sympy

    hints: dict = {}
    try:
        flat = _flatten_inputs(gm, args, kwargs)
    except Exception:  # noqa: BLE001 - fall back to the capture's hints
        return hints
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(phs, flat):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        for s, real in zip(val.shape, value.shape):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                hints[s.node.expr] = int(real)
    return hints


_ = math
