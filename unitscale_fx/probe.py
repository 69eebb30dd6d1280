"""Scale probe: measure the RMS of every matmul multiplicand during one training step.

Unit scaling aims to keep every tensor that enters a matrix multiplication at
RMS ~ 1, in the forward pass (activations and weights) *and* in the backward
pass (gradients flowing back), so that low-precision formats are used in their
well-represented range.  The :class:`ScaleProbe` checks that empirically for any
model, transformed or not.  It is a
:class:`torch.utils._python_dispatch.TorchDispatchMode`, i.e. it sees every aten
op that reaches the dispatcher while it is active, and for the ops of the
matrix-multiply family (see :data:`PROBED_OPS`) it records, for each multiplicand

* ``op`` / ``role``: the aten op (``"aten.addmm"``) and the schema name of the
  argument (``"mat1"``, ``"mat2"``, ``"query"``, ``"grad_out"``, ...);
* ``phase``: ``"forward"`` or ``"backward"``;
* ``rms``: ``sqrt(mean(x**2))`` computed in float64;
* ``shape``, ``dtype``, the index ``call`` of the op call (execution order);
* ``module``: the innermost ``nn.Module`` owning the op, where known.  In the
  forward pass it is tracked with global module forward hooks (installed only
  while the probe is active); in the backward pass it is the module whose
  forward created the autograd node being executed (the forward hook walks the
  autograd graph of each module's outputs back to the nodes created before the
  module started, using autograd sequence numbers);
* ``param``: the parameter the operand is (a view of, e.g. a transposed
  weight), where known.

Biases of ``addmm``/``baddbmm``/``convolution`` are *not* multiplicands and are
not recorded.  :meth:`ScaleProbe.record_param_grads` adds the RMS of every
parameter gradient.  Only the listed ops pay for an RMS reduction, everything
else passes straight through; the RMS values stay on the tensors' device until
:meth:`ScaleProbe.result` is called, so there is no host sync per op.

What the dispatch mode sees
---------------------------
``nn.Linear`` / ``F.linear`` and ``torch.matmul`` are CompositeImplicit ops: they
are decomposed *above* the dispatch mode, which therefore sees ``aten.t`` +
``aten.addmm``/``aten.mm``/``aten.bmm``.  The weight is then recorded as the
``mat2`` operand (with its transposed shape); ``param`` names it when the
probe knows the model.  ``F.scaled_dot_product_attention`` reaches the mode as
the backend-specific op (``aten._scaled_dot_product_flash_attention_for_cpu``
on CPU, flash/efficient/cudnn variants on CUDA).  When the call would take the
*math* fallback (CPU with dropout, some masks or GQA layouts), the pieces it
decomposes into (``bmm`` of ``q * sqrt(scale)`` and ``k * sqrt(scale)``, of the
probabilities and ``v``) are backend internals that a fused kernel never
exposes: the probe then records the call itself, like a fused kernel - ``q``,
``k``, ``v`` in the forward pass, ``grad_out``, ``q``, ``k``, ``v`` in the
backward pass, as ``aten.scaled_dot_product_attention`` - and does not record
its pieces, so results do not depend on the backend that happens to run.
Convolutions arrive as ``aten.convolution`` and ``aten.convolution_backward``.

Phase detection
---------------
The phase is detected automatically: while the autograd engine executes a
backward node it sets a thread-local "current node", exposed as
``torch._C._current_autograd_node()``.  It is ``None`` for every op of the
forward pass and not ``None`` for every op run by a backward function
(``loss.backward()``, ``torch.autograd.grad``, including CPU SDPA backward and
the ``AccumulateGrad`` nodes); the engine propagates it, together with the
dispatch-mode stack, to its worker threads (CUDA backward).  Verified on torch
2.13.  Caveat: with activation checkpointing the *recomputed* forward ops run
inside the backward pass and are therefore recorded as ``"backward"``.  The
phase can be forced with :meth:`ScaleProbe.phase` / :meth:`ScaleProbe.set_phase`.

Eager models and ``torch.compile``
----------------------------------
The probe needs an eager model to see the backward ops: compiled graphs run as
fused kernels that a dispatch mode cannot look into.  What happens with a
``torch.compile``-d model (checked on torch 2.13): Dynamo refuses to compile,
and does not run cached compiled code for, frames executed while a non-infra
``TorchDispatchMode`` is active, so the model falls back to eager execution and
*is* fully recorded - the probe measures the eager equivalent of the compiled
model (same multiplicands; fused kernels may round differently).  However,
Dynamo's refusal permanently marks the refused code objects (e.g. the shared
``nn.Linear.forward``) as "skip", so a model first called under a bare dispatch
mode would never be compiled afterwards.  To avoid that side effect the probe
enters ``torch.compiler.set_stance("force_eager")`` while it is active (only if
``torch._dynamo`` is already imported, i.e. if anything could be compiled),
which makes compiled callables run their original code without consulting
Dynamo at all.  Custom compiled artifacts (AOT-exported/packaged models) are
opaque to the probe.

Example::

    probe = ScaleProbe(model)
    with probe:
        loss = model(x).pow(2).mean()
        loss.backward()
    probe.record_param_grads(model)
    print(probe.result())

or simply ``print(measure_step(model, (x,), loss_fn=...))``.

This module depends on torch and the standard library only (``rich`` is
imported lazily by :meth:`ProbeResult.table`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "PROBED_OPS",
    "OperandRecord",
    "ProbeResult",
    "ScaleProbe",
    "in_band",
    "measure_step",
    "tensor_rms",
]

Phase = Literal["forward", "backward"]
Group = Literal["forward", "backward", "grads"]

_SDPA_FWD = ("query", "key", "value")
_SDPA_BWD = ("grad_out", "query", "key", "value")

#: aten op name -> schema names of the arguments that are multiplicands.
#: Ops missing from the running torch build are ignored.
PROBED_OPS: dict[str, tuple[str, ...]] = {
    "mm": ("self", "mat2"),
    "bmm": ("self", "mat2"),
    "addmm": ("mat1", "mat2"),
    "baddbmm": ("batch1", "batch2"),
    "addbmm": ("batch1", "batch2"),
    "matmul": ("self", "other"),
    "linear": ("input", "weight"),
    "dot": ("self", "tensor"),
    "mv": ("self", "vec"),
    "addmv": ("mat", "vec"),
    "convolution": ("input", "weight"),
    "convolution_backward": ("grad_output", "input", "weight"),
    "scaled_dot_product_attention": _SDPA_FWD,
    "_scaled_dot_product_flash_attention_for_cpu": _SDPA_FWD,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _SDPA_BWD,
    "_scaled_dot_product_flash_attention": _SDPA_FWD,
    "_scaled_dot_product_flash_attention_backward": _SDPA_BWD,
    "_scaled_dot_product_efficient_attention": _SDPA_FWD,
    # the efficient-attention backward schema calls it ``grad_out_``
    "_scaled_dot_product_efficient_attention_backward": ("grad_out_", "query", "key", "value"),
    "_scaled_dot_product_cudnn_attention": _SDPA_FWD,
    "_scaled_dot_product_cudnn_attention_backward": _SDPA_BWD,
    "_scaled_dot_product_fused_attention_overrideable": _SDPA_FWD,
    "_scaled_dot_product_fused_attention_overrideable_backward": _SDPA_BWD,
    "_grouped_mm": ("self", "mat2"),
    "_scaled_mm": ("self", "mat2"),
    "_scaled_grouped_mm": ("self", "mat2"),
}


def _resolve_packets() -> dict[Any, tuple[str, ...]]:
    """Map the ``OpOverloadPacket`` objects of :data:`PROBED_OPS` to their operand names."""
    packets: dict[Any, tuple[str, ...]] = {}
    for name, roles in PROBED_OPS.items():
        try:
            packet = getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            continue
        packets[packet] = roles
    return packets


def tensor_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of ``x`` as a float64 0-d tensor on ``x``'s device (no host sync).

    Equal to ``x.detach().double().pow(2).mean().sqrt()``; uses
    ``torch.linalg.vector_norm(..., dtype=float64)`` so that no float64 copy of
    ``x`` is materialised where the backend supports it.
    """
    x = x.detach()
    if x.is_sparse:
        vals = x.coalesce().values()
        return torch.linalg.vector_norm(vals, dtype=torch.float64) / math.sqrt(x.numel())
    try:
        return torch.linalg.vector_norm(x, dtype=torch.float64) / math.sqrt(x.numel())
    except (RuntimeError, NotImplementedError, TypeError):  # e.g. float8 dtypes
        return x.double().pow(2).mean().sqrt()


def in_band(rms: float, lo: float = 0.5, hi: float = 2.0) -> bool:
    """True iff ``lo <= rms <= hi`` (NaN is never in band)."""
    return lo <= rms <= hi


def _abs_log2(rms: float) -> float:
    """``|log2(rms)|``; ``inf`` for zero, infinite or NaN RMS (so it sorts as worst)."""
    if not math.isfinite(rms) or rms <= 0.0:
        return math.inf
    return abs(math.log2(rms))


def _json_float(v: float) -> float | str:
    """Floats stay floats; non-finite values become ``"inf"``/``"-inf"``/``"nan"`` (strict JSON)."""
    return v if math.isfinite(v) else str(v)


def _from_json_float(v: float | str) -> float:
    return float(v)


@dataclass(frozen=True)
class OperandRecord:
    """One multiplicand of one matmul-family op call."""

    call: int
    """Index of the recorded op call, in execution order (shared by the operands of one call)."""
    op: str
    """Op packet name, e.g. ``"aten.addmm"``."""
    overload: str
    """Overload name, e.g. ``"default"``."""
    role: str
    """Schema name of the argument, e.g. ``"mat2"``, ``"query"``, ``"grad_out"``."""
    phase: str
    """``"forward"`` or ``"backward"``."""
    rms: float
    shape: tuple[int, ...]
    dtype: str
    """dtype without the ``torch.`` prefix, e.g. ``"bfloat16"``."""
    module: str | None = None
    """Qualified name of the innermost module owning the op (``""`` = root), if known.

    Forward: the module whose ``forward`` is running.  Backward: the module
    whose forward created the autograd node now executing (best effort)."""
    module_type: str | None = None
    """Class name of that module."""
    param: str | None = None
    """Name of the parameter this operand is (a view of), if known."""

    @property
    def log2_rms(self) -> float:
        """``log2(rms)`` (``-inf`` for 0, ``nan`` for NaN)."""
        if math.isnan(self.rms):
            return math.nan
        return math.log2(self.rms) if self.rms > 0 else -math.inf

    @property
    def name(self) -> str:
        """Human-readable identifier: ``"#12 layers.0.fc1 aten.addmm.mat2 [layers.0.fc1.weight]"``."""
        parts = [f"#{self.call}"]
        if self.module:
            parts.append(self.module)
        parts.append(f"{self.op}.{self.role}")
        if self.param:
            parts.append(f"[{self.param}]")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["rms"] = _json_float(self.rms)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OperandRecord:
        """Inverse of :meth:`to_dict`."""
        kw = dict(d)
        kw["shape"] = tuple(kw["shape"])
        kw["rms"] = _from_json_float(kw["rms"])
        return cls(**kw)


@dataclass
class ProbeResult:
    """Everything a :class:`ScaleProbe` measured."""

    forward: list[OperandRecord] = field(default_factory=list)
    backward: list[OperandRecord] = field(default_factory=list)
    param_grads: list[tuple[str, float]] = field(default_factory=list)

    # ---------------------------------------------------------------- access
    @property
    def records(self) -> list[OperandRecord]:
        """Forward and backward records, in execution order."""
        return sorted(self.forward + self.backward, key=lambda r: r.call)

    def select(
        self,
        *,
        op: str | None = None,
        role: str | None = None,
        phase: str | None = None,
        module: str | None = None,
        param: str | None = None,
    ) -> list[OperandRecord]:
        """Records matching all given filters (``op`` may omit the ``aten.`` prefix)."""
        if op is not None and not op.startswith("aten."):
            op = "aten." + op
        out = []
        for r in self.records:
            if op is not None and r.op != op:
                continue
            if role is not None and r.role != role:
                continue
            if phase is not None and r.phase != phase:
                continue
            if module is not None and r.module != module:
                continue
            if param is not None and r.param != param:
                continue
            out.append(r)
        return out

    def entries(self, group: Group) -> list[tuple[str, str | None, float]]:
        """``(name, op, rms)`` for every entry of ``group`` (``"forward"``, ``"backward"``, ``"grads"``)."""
        if group == "grads":
            return [(n, None, v) for n, v in self.param_grads]
        if group not in ("forward", "backward"):
            raise ValueError(f"group must be 'forward', 'backward' or 'grads', not {group!r}")
        recs = self.forward if group == "forward" else self.backward
        return [(r.name, r.op, r.rms) for r in recs]

    def in_band(self, group: Group, lo: float = 0.5, hi: float = 2.0) -> list[tuple[str, str | None, float]]:
        """Entries of ``group`` with ``lo <= rms <= hi``."""
        return [e for e in self.entries(group) if in_band(e[2], lo, hi)]

    def out_of_band(self, group: Group, lo: float = 0.5, hi: float = 2.0) -> list[tuple[str, str | None, float]]:
        """Entries of ``group`` outside ``[lo, hi]`` (NaN included), worst first."""
        out = [e for e in self.entries(group) if not in_band(e[2], lo, hi)]
        return sorted(out, key=lambda e: _abs_log2(e[2]), reverse=True)

    def fraction_in_band(self, group: Group, lo: float = 0.5, hi: float = 2.0) -> float | None:
        """Fraction of ``group``'s entries in ``[lo, hi]``; ``None`` if the group is empty."""
        ents = self.entries(group)
        if not ents:
            return None
        return sum(in_band(e[2], lo, hi) for e in ents) / len(ents)

    # --------------------------------------------------------------- summary
    def summary(
        self,
        lo: float = 0.5,
        hi: float = 2.0,
        outer_lo: float = 1 / 8,
        outer_hi: float = 8.0,
    ) -> dict[str, dict[str, Any]]:
        """Per-group statistics for ``"forward"``, ``"backward"`` and ``"grads"``.

        Each value is a dict with ``count``, ``in_band`` (number in ``[lo, hi]``),
        ``fraction_in_band`` (``None`` if empty), ``outside_outer`` (number
        outside ``[outer_lo, outer_hi]``, NaN counted as outside), ``min_rms``,
        ``max_rms`` and ``worst`` (the entry with the largest ``|log2 rms|``, as a
        dict ``{name, op, rms, log2_rms}``, or ``None``).
        """
        out: dict[str, dict[str, Any]] = {}
        for group in ("forward", "backward", "grads"):
            ents = self.entries(group)  # type: ignore[arg-type]
            n = len(ents)
            n_in = sum(in_band(e[2], lo, hi) for e in ents)
            n_out = sum(not in_band(e[2], outer_lo, outer_hi) for e in ents)
            worst = None
            if ents:
                wn, wop, wr = max(ents, key=lambda e: _abs_log2(e[2]))
                worst = {
                    "name": wn,
                    "op": wop,
                    "rms": wr,
                    "log2_rms": (math.log2(wr) if wr > 0 else -math.inf) if not math.isnan(wr) else math.nan,
                }
            finite = [e[2] for e in ents if not math.isnan(e[2])]
            out[group] = {
                "count": n,
                "in_band": n_in,
                "fraction_in_band": (n_in / n) if n else None,
                "outside_outer": n_out,
                "min_rms": min(finite) if finite else None,
                "max_rms": max(finite) if finite else None,
                "worst": worst,
            }
        return out

    def table(
        self,
        lo: float = 0.5,
        hi: float = 2.0,
        outer_lo: float = 1 / 8,
        outer_hi: float = 8.0,
        detail: bool = False,
    ) -> Any:
        """A ``rich.table.Table``: the summary, or every record if ``detail``."""
        from rich.table import Table  # lazy: rich is optional

        def style(rms: float) -> str:
            if in_band(rms, lo, hi):
                return "green"
            return "yellow" if in_band(rms, outer_lo, outer_hi) else "red"

        if detail:
            t = Table(title="Scale probe: operand RMS")
            for col in ("call", "phase", "module", "op", "role", "param", "shape", "dtype", "rms"):
                t.add_column(col, justify="right" if col in ("call", "rms") else "left")
            for r in self.records:
                t.add_row(
                    str(r.call),
                    r.phase,
                    r.module or "",
                    r.op,
                    r.role,
                    r.param or "",
                    "x".join(map(str, r.shape)),
                    r.dtype,
                    f"[{style(r.rms)}]{r.rms:.4g}[/]",
                )
            for n, v in self.param_grads:
                t.add_row("", "grad", "", "", "", n, "", "", f"[{style(v)}]{v:.4g}[/]")
            return t

        s = self.summary(lo, hi, outer_lo, outer_hi)
        t = Table(title=f"Scale probe: RMS in [{lo:g}, {hi:g}]")
        for col in ("group", "count", f"in [{lo:g},{hi:g}]", f"outside [{outer_lo:g},{outer_hi:g}]", "worst", "worst rms"):
            t.add_column(col, justify="left" if col in ("group", "worst") else "right")
        for g, st in s.items():
            frac = st["fraction_in_band"]
            w = st["worst"]
            t.add_row(
                g,
                str(st["count"]),
                "-" if frac is None else f"{100 * frac:.1f}%",
                str(st["outside_outer"]),
                "" if w is None else w["name"],
                "" if w is None else f"[{style(w['rms'])}]{w['rms']:.4g}[/]",
            )
        return t

    def __str__(self) -> str:
        s = self.summary()
        lines = ["ScaleProbe result (RMS in [0.5, 2]; outliers outside [1/8, 8]):"]
        for g, st in s.items():
            frac = st["fraction_in_band"]
            line = f"  {g:<8} n={st['count']:<5d}"
            if frac is not None:
                line += f" in-band {100 * frac:5.1f}%  outliers {st['outside_outer']}"
                w = st["worst"]
                line += f"  worst {w['rms']:.4g} ({w['name']})"
            lines.append(line)
        return "\n".join(lines)

    # ---------------------------------------------------------------- serde
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (non-finite floats are written as strings)."""

        def clean(obj: Any) -> Any:
            if isinstance(obj, float):
                return _json_float(obj)
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            return obj

        return {
            "forward": [r.to_dict() for r in self.forward],
            "backward": [r.to_dict() for r in self.backward],
            "param_grads": [[n, _json_float(v)] for n, v in self.param_grads],
            "summary": clean(self.summary()),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeResult:
        """Inverse of :meth:`to_dict` (the summary is recomputed, not read)."""
        return cls(
            forward=[OperandRecord.from_dict(r) for r in d.get("forward", [])],
            backward=[OperandRecord.from_dict(r) for r in d.get("backward", [])],
            param_grads=[(n, _from_json_float(v)) for n, v in d.get("param_grads", [])],
        )


@dataclass
class _Pending:
    """A record whose RMS is still a device tensor."""

    call: int
    op: str
    overload: str
    role: str
    phase: str
    rms: torch.Tensor
    shape: tuple[int, ...]
    dtype: str
    module: str | None
    module_type: str | None
    param: str | None


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in nested tuples/lists/mappings (e.g. HF ``ModelOutput``) and dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors_in(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors_in(getattr(obj, f.name, None))


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (subclasses, functional wrappers)
        return None
    if ptr == 0:
        return None
    return (str(t.device), ptr)


_SDPA_FUNCS = {torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_MATH_BACKEND = 0  # torch._fused_sdp_choice: 0 = math fallback


def _sdpa_call(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    call = dict(zip(_SDPA_ARGS, args))
    call.update(kwargs)
    return call


def _takes_math_path(call: Mapping[str, Any]) -> bool:
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.device.type == "meta":
        return False
    chooser = getattr(torch, "_fused_sdp_choice", None)
    if chooser is None:
        return False
    try:
        extra = {n: call[n] for n in ("scale", "enable_gqa") if n in call}
        return int(chooser(q, k, v, call.get("attn_mask"), call.get("dropout_p", 0.0),
                           call.get("is_causal", False), **extra)) == _MATH_BACKEND
    except Exception:  # an unknown signature: record the pieces as before
        return False


class _MathAttention(torch.autograd.Function):
    """Runs a math-path SDPA with the probe's piece-recording off; records it as one op."""

    @staticmethod
    def forward(ctx: Any, probe: ScaleProbe, fn: Any, call: dict[str, Any], *tensors: torch.Tensor) -> torch.Tensor:
        names = [n for n in ("query", "key", "value", "attn_mask") if isinstance(call.get(n), torch.Tensor)]
        with torch.enable_grad():
            detached = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            inner = dict(call, **dict(zip(names, detached)))
            with probe._pieces_hidden():
                out = fn(**inner)
        ctx.probe, ctx.inputs, ctx.out = probe, detached, out
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        probe, inputs, out = ctx.probe, ctx.inputs, ctx.out
        q, k, v = inputs[:3]
        probe._record_tensors("aten.scaled_dot_product_attention", "backward",
                              [("grad_out", grad_out), ("query", q), ("key", k), ("value", v)])
        wanted = [t for t in inputs if t.requires_grad]
        with probe._pieces_hidden():
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
        ctx.inputs = ctx.out = None
        return (None, None, None) + tuple(next(grads) if t.requires_grad else None for t in inputs)


class _AttentionCalls(TorchFunctionMode):
    """Routes math-path SDPA calls through :class:`_MathAttention` while the probe is active."""

    def __init__(self, probe: ScaleProbe) -> None:
        super().__init__()
        self._probe = probe

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _SDPA_FUNCS and not self._probe._hiding():
            call = _sdpa_call(args, kwargs)
            if _takes_math_path(call):
                names = [n for n in ("query", "key", "value", "attn_mask") if isinstance(call.get(n), torch.Tensor)]
                tensors = [call[n] for n in names]
                if names[:3] == ["query", "key", "value"]:
                    self._probe._record_tensors("aten.scaled_dot_product_attention", None,
                                                [(n, call[n]) for n in names[:3]])
                    fn = torch.nn.functional.scaled_dot_product_attention
                    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
                        return _MathAttention.apply(self._probe, fn, call, *tensors)
                    with self._probe._pieces_hidden():
                        return fn(**call)
        return func(*args, **kwargs)


class ScaleProbe(TorchDispatchMode):
    """Dispatch mode recording the RMS of matmul-family multiplicands (see module docstring).

    Args:
        model: optional root module; used to name parameters (``param`` field)
            and modules (``module`` field).  Without it, every top-level module
            called inside the probe is adopted as a root for naming.
        track_modules: install global module forward hooks while active, to fill
            the ``module`` field of the records.
        force_eager: run ``torch.compile``-d callables eagerly while active
            (see the module docstring); leave on unless you know better.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        track_modules: bool = True,
        force_eager: bool = True,
    ) -> None:
        super().__init__()
        self._force_eager = force_eager
        self._stance_ctx: Any = None
        self._packets = _resolve_packets()
        self._arg_cache: dict[Any, list[tuple[str, int, str]]] = {}
        self._track_modules = track_modules
        self._pending: list[_Pending] = []
        self._records: list[OperandRecord] = []
        self._param_grads: list[tuple[str, float]] = []
        self._call = 0
        self._forced_phase: str | None = None
        self._tls = threading.local()
        self._hook_handles: list[Any] = []
        self._param_names: dict[tuple[str, int], str] = {}
        self._module_names: dict[int, str] = {}
        self._roots: set[int] = set()
        self._node_modules: dict[Any, tuple[str | None, str]] = {}
        self._depth = 0
        self._warned = False
        self._attention_mode: _AttentionCalls | None = None
        if model is not None:
            self._adopt_root(model)

    # ------------------------------------------------------------ naming
    def _adopt_root(self, model: torch.nn.Module) -> None:
        if id(model) in self._roots:
            return
        self._roots.add(id(model))
        for name, mod in model.named_modules():
            self._module_names.setdefault(id(mod), name)
        for name, p in model.named_parameters():
            key = _storage_key(p)
            if key is not None:
                self._param_names.setdefault(key, name)

    def _stack(self) -> list[tuple[torch.nn.Module, int]]:
        st = getattr(self._tls, "stack", None)
        if st is None:
            st = self._tls.stack = []
        return st

    def _pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        st = self._stack()
        if not st and id(module) not in self._module_names:
            self._adopt_root(module)
        st.append((module, torch._C._autograd._get_sequence_nr()))

    def _post_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        st = self._stack()
        # pop up to and including ``module`` (robust to a missing pop after an exception)
        for i in range(len(st) - 1, -1, -1):
            if st[i][0] is module:
                seq_start = st[i][1]
                del st[i:]
                break
        else:
            return
        if torch.is_grad_enabled() and torch._C._current_autograd_node() is None:
            try:
                self._claim_nodes(module, output, seq_start)
            except Exception:  # attribution is best effort
                pass

    def _claim_nodes(self, module: torch.nn.Module, output: Any, seq_start: int) -> None:
        """Attribute the autograd nodes created by ``module``'s forward to it.

        Walks the graph from the outputs' ``grad_fn`` back to nodes created
        before the module started (autograd sequence numbers are increasing per
        thread).  Inner modules finish first, so the innermost module wins.
        """
        name = self._module_names.get(id(module))
        info = (name, type(module).__name__)
        todo = [t.grad_fn for t in _tensors_in(output) if t.grad_fn is not None]
        seen: set[int] = set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node._sequence_nr() < seq_start:
                continue
            if node not in self._node_modules:
                self._node_modules[node] = info
            todo.extend(nf for nf, _ in node.next_functions if nf is not None)

    # ------------------------------------------------------------ context
    def __enter__(self) -> ScaleProbe:
        if self._depth == 0 and self._track_modules:
            from torch.nn.modules.module import (
                register_module_forward_hook,
                register_module_forward_pre_hook,
            )

            self._hook_handles = [
                register_module_forward_pre_hook(self._pre_hook),
                register_module_forward_hook(self._post_hook, always_call=True),
            ]
        if self._depth == 0 and self._force_eager and "torch._dynamo" in sys.modules:
            ctx = torch.compiler.set_stance("force_eager")
            ctx.__enter__()
            self._stance_ctx = ctx
        self._depth += 1
        try:
            if self._depth == 1:
                self._attention_mode = _AttentionCalls(self)
                self._attention_mode.__enter__()
            return super().__enter__()
        except BaseException:
            self._depth -= 1
            self._teardown(None, None, None)
            raise

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        try:
            super().__exit__(exc_type, exc_val, exc_tb)
        finally:
            self._depth -= 1
            self._teardown(exc_type, exc_val, exc_tb)

    def _teardown(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self._depth != 0:
            return
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        if self._attention_mode is not None:
            mode, self._attention_mode = self._attention_mode, None
            mode.__exit__(exc_type, exc_val, exc_tb)
        self._stack().clear()
        self._node_modules.clear()  # drop references to autograd nodes
        if self._stance_ctx is not None:
            ctx, self._stance_ctx = self._stance_ctx, None
            ctx.__exit__(exc_type, exc_val, exc_tb)

    # ------------------------------------------------------------ phase
    def set_phase(self, phase: Phase | None) -> None:
        """Force the phase of subsequent records (``None`` = automatic detection)."""
        if phase not in (None, "forward", "backward"):
            raise ValueError(f"phase must be 'forward', 'backward' or None, not {phase!r}")
        self._forced_phase = phase

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Context manager forcing the phase of records made inside it."""
        old = self._forced_phase
        self.set_phase(phase)
        try:
            yield
        finally:
            self._forced_phase = old

    def current_phase(self) -> str:
        """The phase an op dispatched now would be recorded with."""
        if self._forced_phase is not None:
            return self._forced_phase
        return "backward" if torch._C._current_autograd_node() is not None else "forward"

    # ------------------------------------------------------------ dispatch
    def _operand_positions(self, func: Any, roles: tuple[str, ...]) -> list[tuple[str, int, str]]:
        pos = self._arg_cache.get(func)
        if pos is None:
            pos = []
            names = [a.name for a in func._schema.arguments]
            for role in roles:
                if role in names:
                    pos.append((role.rstrip("_"), names.index(role), role))
            self._arg_cache[func] = pos
        return pos

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        roles = self._packets.get(func.overloadpacket)
        if roles is not None and not self._hiding():
            try:
                self._record(func, roles, args, kwargs)
            except Exception as e:  # never break the user's step because of the probe
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"ScaleProbe: could not record {func}: {e!r}", stacklevel=2)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def _pieces_hidden(self) -> Iterator[None]:
        """Ops dispatched inside are not recorded (the pieces of a math-path SDPA)."""
        self._tls.hidden = getattr(self._tls, "hidden", 0) + 1
        try:
            yield
        finally:
            self._tls.hidden -= 1

    def _hiding(self) -> bool:
        return getattr(self._tls, "hidden", 0) > 0

    def _record(self, func: Any, roles: tuple[str, ...], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        operands = []
        for role, idx, schema_name in self._operand_positions(func, roles):
            operands.append((role, args[idx] if idx < len(args) else kwargs.get(schema_name)))
        self._record_tensors(f"aten.{func.overloadpacket.__name__}", None, operands, func._overloadname)

    def _record_tensors(self, op: str, phase: str | None, operands: Sequence[tuple[str, Any]],
                        overload: str = "default") -> None:
        """Record the RMS of each floating-point tensor in ``operands`` (``(role, tensor)``) as one call."""
        phase = self._forced_phase or phase or self.current_phase()
        module = module_type = None
        node = torch._C._current_autograd_node()
        if node is None:
            st = self._stack()
            if st:
                m = st[-1][0]
                module = self._module_names.get(id(m))
                module_type = type(m).__name__
        elif self._node_modules:
            module, module_type = self._node_modules.get(node, (None, None))
        call = self._call
        recorded = False
        for role, x in operands:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
                continue
            if x.device.type == "meta":
                continue
            key = _storage_key(x) if self._param_names else None
            self._pending.append(
                _Pending(
                    call=call,
                    op=op,
                    overload=overload,
                    role=role,
                    phase=phase,
                    rms=tensor_rms(x),
                    shape=tuple(x.shape),
                    dtype=str(x.dtype).removeprefix("torch."),
                    module=module,
                    module_type=module_type,
                    param=self._param_names.get(key) if key is not None else None,
                )
            )
            recorded = True
        if recorded:
            self._call += 1

    # ------------------------------------------------------------ results
    def _materialise(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with torch.no_grad():
            by_dev: dict[torch.device, list[int]] = {}
            for i, p in enumerate(pending):
                by_dev.setdefault(p.rms.device, []).append(i)
            values: list[float] = [math.nan] * len(pending)
            for idxs in by_dev.values():
                vals = torch.stack([pending[i].rms for i in idxs]).cpu().tolist()
                for i, v in zip(idxs, vals):
                    values[i] = float(v)
        for p, v in zip(pending, values):
            self._records.append(
                OperandRecord(
                    call=p.call,
                    op=p.op,
                    overload=p.overload,
                    role=p.role,
                    phase=p.phase,
                    rms=v,
                    shape=p.shape,
                    dtype=p.dtype,
                    module=p.module,
                    module_type=p.module_type,
                    param=p.param,
                )
            )

    def record_param_grads(self, model: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, float]]:
        """Record the RMS of ``p.grad`` for every named parameter that has a gradient.

        ``model`` is a module or an iterable of ``(name, parameter)`` pairs.
        Returns the new ``(name, rms)`` entries (also added to the result).
        """
        named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
        names: list[str] = []
        vals: list[torch.Tensor] = []
        with torch.no_grad():
            for name, p in named:
                g = p.grad
                if g is None or not g.is_floating_point() or g.numel() == 0:
                    continue
                names.append(name)
                vals.append(tensor_rms(g))
            floats = [float(v) for v in vals]
        new = list(zip(names, floats))
        self._param_grads.extend(new)
        return new

    def result(self) -> ProbeResult:
        """The records made so far, as a :class:`ProbeResult`."""
        self._materialise()
        return ProbeResult(
            forward=[r for r in self._records if r.phase == "forward"],
            backward=[r for r in self._records if r.phase == "backward"],
            param_grads=list(self._param_grads),
        )

    def reset(self) -> None:
        """Forget all records (naming information is kept)."""
        self._pending.clear()
        self._records.clear()
        self._param_grads.clear()
        self._call = 0


# ---------------------------------------------------------------------------
# one-call API
# ---------------------------------------------------------------------------


def _extract_loss(output: Any) -> torch.Tensor:
    def scalar(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.numel() == 1

    loss = getattr(output, "loss", None)
    if scalar(loss):
        return loss
    if isinstance(output, Mapping) and scalar(output.get("loss")):
        return output["loss"]
    if scalar(output):
        return output
    if isinstance(output, (tuple, list)):
        # (loss, logits) as HF with return_dict=False, (logits, loss) as nanoGPT: the first
        # floating scalar
        for t in output:
            if scalar(t) and t.is_floating_point():
                return t
    raise ValueError(
        "measure_step: cannot find a scalar loss in the model output "
        f"(type {type(output).__name__}); pass loss_fn=... (e.g. lambda out: out.logits.float().pow(2).mean())"
    )


def measure_step(
    model: torch.nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    restore_buffers: bool = True,
    preserve_rng: bool = True,
) -> ProbeResult:
    """Run one forward + backward step of ``model`` under a :class:`ScaleProbe`.

    ``example_inputs`` is a tuple/list of positional args, a dict of keyword
    args, or a single tensor.  The loss is ``loss_fn(output)`` if given, else
    ``output.loss`` / ``output["loss"]`` / ``output`` (scalar tensor) /
    ``output[0]`` (scalar tensor).  Gradients are zeroed (set to ``None``)
    before the step and the previous ``.grad`` tensors are put back afterwards;
    parameters are not modified.  With ``restore_buffers`` the buffers (e.g.
    BatchNorm running statistics) are restored too, and with ``preserve_rng``
    the CPU (and the model's CUDA devices') RNG state is restored, so the call
    has no side effect on the model or on later random numbers.  The model's
    train/eval mode is left as is.
    """
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_bufs: list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]] = []
    if restore_buffers:
        with torch.no_grad():
            for mod in model.modules():
                for bname, b in mod._buffers.items():
                    if b is not None:
                        saved_bufs.append((mod, bname, b, b.clone()))
    cuda_devices = sorted({t.device.index or 0 for t in params if t.device.type == "cuda"})
    rng = torch.random.fork_rng(devices=cuda_devices) if preserve_rng else contextlib.nullcontext()
    probe = ScaleProbe(model)
    try:
        for p in params:
            p.grad = None
        with rng, torch.enable_grad():
            with probe:
                if isinstance(example_inputs, Mapping):
                    output = model(**example_inputs)
                elif isinstance(example_inputs, (tuple, list)):
                    output = model(*example_inputs)
                else:
                    output = model(example_inputs)
                loss = loss_fn(output) if loss_fn is not None else _extract_loss(output)
                if loss.numel() != 1:
                    raise ValueError(f"measure_step: loss must be a scalar, got shape {tuple(loss.shape)}")
                if loss.requires_grad:
                    loss.reshape(()).backward()
                else:
                    warnings.warn("measure_step: the loss does not require grad; only the forward pass was measured")
        probe.record_param_grads(model)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for mod, bname, b, copy in saved_bufs:
                b.copy_(copy)
                mod._buffers[bname] = b
    return probe.result()
