"""Check that models are unit-scaled after the transform: one training step each, judged against criteria.

``unitscale-fx check`` (or ``python -m unitscale_fx.check``) runs, for every model it is given
(a zoo name or a ``package.module:factory`` spec), in a fresh copy built with a fixed seed:

1. the transform (:func:`unitscale_fx.transform` with ``Config(compile=False)``, ``strict`` as
   asked): capture, analysis, rewrite. Eager on purpose: the scale probe is a dispatch mode and
   must see every aten op of the forward and the backward pass, which compiled kernels hide;
2. coverage, from the analysis of the graph the transform produced (the nodes it inserted left
   out): which ops have no scale rule (node, op, user source line; ops downstream of them apart).
   When the transform raises (strict mode, a failing pass) the original model is captured and
   analysed (:func:`unitscale_fx.analyse`) instead, to name the ops without a rule;
3. one training step of the transformed graph under the scale probe
   (:func:`unitscale_fx.probe.measure_step`): the RMS of every forward and backward GEMM
   multiplicand and of every parameter gradient. Each op of the graph runs inside a small module
   (:func:`_scoped_runner`) so that every measurement is attributed to the module path of the
   original model and to the FX node that ran it; the cross-entropy losses of the graph are
   tapped for the initial-loss check;
4. gradient validity: the same transformed graph with its backward-only scales bypassed (every
   ``grad_scale`` node, the identity in the forward pass, replaced by its input: what
   ``Config(compile=False, scale_backward=False)`` builds) runs the same step with the same
   parameters and RNG seed (same dropout masks); its loss must be the same and every parameter's
   gradient must point the same way (cosine similarity);
5. the verdict against :class:`Criteria` (see its docstring and ``docs/check.md``).

Python API: :func:`check_model` -> :class:`ModelCheck`, :func:`check_models` -> :class:`CheckReport`.
Command line: :func:`add_arguments` / :func:`run` (wired into ``unitscale-fx check``) and :func:`main`.
Criteria defaults are overridden by ``[tool.unitscale_fx.check]`` (or ``[tool.unitscale_fx]``) in the
nearest ``pyproject.toml`` and then by command-line flags.

This module imports only the standard library at import time; torch is imported when a model is
checked.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "Criteria",
    "ModelCheck",
    "CheckReport",
    "Edge",
    "MissingOpInfo",
    "SCHEMA",
    "DEFAULT_SIZES",
    "check_model",
    "check_models",
    "zoo_models",
    "load_settings",
    "find_pyproject",
    "add_arguments",
    "run",
    "main",
]

#: Value of the ``"schema"`` key of the ``--json`` report.
SCHEMA = "unitscale_fx.check/1"

#: Model sizes used by the checker unless told otherwise (small enough for CPU CI).
DEFAULT_SIZES: dict[str, Any] = {
    "hidden": 128,
    "layers": 2,
    "heads": 4,
    "seq": 64,
    "batch": 4,
    "vocab": 1024,
    "seed": 0,
    "device": "cpu",
}
_SIZE_KEYS = ("hidden", "layers", "heads", "seq", "batch", "vocab", "seed", "device")


# ------------------------------------------------------------------------------------------------
# criteria
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criteria:
    """What a model must satisfy to pass :func:`check_model`. Frozen; validated on construction.

    Attributes:
        min_coverage: fraction of the captured ops that must have a scale rule. Default ``1.0``:
            every op has a rule; the ones without are named (node, op, source line).
        band: the "unit" band is ``[1/band, band]``. Default ``2.0``: RMS in ``[1/2, 2]``.
        min_forward: fraction of forward GEMM multiplicands (matmul/bmm/linear/SDPA/conv operands,
            activations and weights) whose RMS is in the band. Default ``0.95``.
        min_backward: the same for the backward GEMM multiplicands (gradients flowing back and the
            saved operands they multiply). Default ``0.90``.
        min_grads: the same for the parameter gradients. Default ``0.90``.
        outer: no forward/backward multiplicand and no parameter gradient may have an RMS outside
            ``[1/outer, outer]`` (NaN counts as outside). Default ``8.0``.
        min_cosine: gradient validity: the cosine similarity between each parameter's unit-scaled
            gradient and the exact gradient of the transformed forward must be at least this.
            Default ``0.9999``.
        loss_tolerance: initial loss sanity: every cross-entropy-type loss of the graph (mean
            reduction) satisfies ``|loss / ln(classes) - 1| <= loss_tolerance``; without one, a
            model whose output has logits over the vocabulary is judged on the loss it returns
            against ``ln(vocab)``. Default ``0.02``.
        zero_grad: a parameter gradient whose unit-scaled RMS is below this is *structurally zero*
            (the loss does not depend on the parameter, e.g. attention key biases, to which softmax
            is invariant: what is measured is rounding noise). Such gradients are listed in
            ``zero_grads`` and left out of ``min_grads``, ``outer`` and ``min_cosine``; unit
            scaling aims every gradient at RMS 1, 16 binades above the default ``2**-16``.
            ``0`` judges every gradient.

    In every case the loss and all gradients must be finite (no NaN/Inf).
    """

    min_coverage: float = 1.0
    band: float = 2.0
    min_forward: float = 0.95
    min_backward: float = 0.90
    min_grads: float = 0.90
    outer: float = 8.0
    min_cosine: float = 0.9999
    loss_tolerance: float = 0.02
    zero_grad: float = 2.0 ** -16

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                raise ValueError(f"Criteria.{f.name} must be a number, got {v!r}")
            object.__setattr__(self, f.name, float(v))
        for name in ("min_coverage", "min_forward", "min_backward", "min_grads"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Criteria.{name} is a fraction in [0, 1], got {getattr(self, name)!r}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"Criteria.min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if self.band < 1.0:
            raise ValueError(f"Criteria.band must be >= 1 (the band is [1/band, band]), got {self.band!r}")
        if self.outer < self.band:
            raise ValueError(f"Criteria.outer ({self.outer!r}) must be >= Criteria.band ({self.band!r})")
        if self.loss_tolerance < 0:
            raise ValueError(f"Criteria.loss_tolerance must be >= 0, got {self.loss_tolerance!r}")
        if not 0.0 <= self.zero_grad < 1.0 / self.outer:
            raise ValueError(f"Criteria.zero_grad must be in [0, 1/outer), got {self.zero_grad!r}")

    @property
    def lo(self) -> float:
        return 1.0 / self.band

    @property
    def hi(self) -> float:
        return self.band

    def replace(self, **changes: Any) -> "Criteria":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: "Criteria | None" = None) -> "Criteria":
        """``base`` (default: the defaults) with the criteria keys of ``data`` applied; ``-`` in keys
        is accepted for ``_``. Unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        changes = {}
        for k, v in data.items():
            key = k.replace("-", "_")
            if key not in names:
                raise ValueError(f"unknown criterion {k!r}; known: {', '.join(sorted(names))}")
            changes[key] = v
        return dataclasses.replace(base or cls(), **changes)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


@dataclass
class MissingOpInfo:
    """An op without a scale rule: FX node name, op name and the user's source line (if known)."""

    node: str
    op: str
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        s = f"{self.op} (node{'s' if ', ' in self.node else ''} {self.node})"
        if self.source:
            s += "\n      " + "\n      ".join(ln.strip() for ln in self.source.strip().splitlines())
        return s


@dataclass
class Edge:
    """One measured tensor: a GEMM multiplicand (``phase`` forward/backward) or a parameter gradient
    (``phase == "grad"``, ``param`` set)."""

    phase: str
    rms: float
    module: str | None = None
    op: str | None = None
    role: str | None = None
    param: str | None = None
    module_type: str | None = None
    node: str | None = None
    """The FX node of the transformed graph that ran the op (see ``unitscale-fx inspect``)."""

    @property
    def log2_rms(self) -> float:
        if math.isnan(self.rms):
            return math.nan
        return math.log2(self.rms) if self.rms > 0 else -math.inf

    @property
    def badness(self) -> float:
        if not math.isfinite(self.rms) or self.rms <= 0:
            return math.inf
        return abs(math.log2(self.rms))

    @property
    def where(self) -> str:
        """``module path + op``, e.g. ``"blocks.0.attn aten.bmm.self"`` or ``"head.weight (grad)"``."""
        if self.phase == "grad":
            return f"{self.param} (grad)"
        mod = self.module if self.module else ("<root>" if self.module == "" else "<unknown module>")
        s = f"{mod} {self.op}.{self.role}"
        if self.param:
            s += f" [{self.param}]"
        if self.node:
            s += f" (node {self.node})"
        return s

    def short(self, node: bool = True) -> str:
        tag = {"forward": "fwd", "backward": "bwd", "grad": "grad"}.get(self.phase, self.phase)
        where = self.where if self.phase != "grad" else str(self.param)
        if not node and self.node:
            where = where.replace(f" (node {self.node})", "")
        return f"{where} ({tag}) rms={_fmt_rms(self.rms)}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rms"] = _json_float(self.rms)
        d["log2_rms"] = _json_float(self.log2_rms)
        d["where"] = self.where
        return d


@dataclass
class ModelCheck:
    """The verdict on one model. ``None`` figures were not measured (e.g. the transform failed).

    Attributes:
        name: the zoo name or factory spec.
        passed: every criterion holds.
        skipped: the model could not be built because an optional dependency is missing (only for
            models selected with ``--zoo``); a skipped model does not fail the run.
        coverage: fraction of the captured ops (of the original model's graph) that have a scale
            rule.
        n_ops: number of ops the analysis judged (those with a rule plus those without).
        missing_ops: the ops without a scale rule (node, op, user source line): the root causes.
        unanalysed_ops: ops that have a rule but no predicted scale because an input comes from
            an op without a rule (downstream of ``missing_ops``).
        forward_in_band / backward_in_band / grads_in_band: fractions in ``[1/band, band]``.
        counts: number of measured entries per group (forward, backward, grads).
        outside_outer: number of entries outside ``[1/outer, outer]`` per group.
        min_cosine / min_cosine_param: the smallest gradient cosine similarity and its parameter.
        zero_grads: parameters whose gradient is structurally zero (see ``Criteria.zero_grad``),
            not judged.
        loss: the measured initial loss (what the model returns).
        loss_terms: the cross-entropy-type losses found in the graph, each ``{"node", "op",
            "classes", "value", "expected"}`` with ``expected = ln(classes)``.
        expected_loss: ``ln(classes)`` of the judged loss (``None``: not a classification loss).
        reference_loss: the loss of the exact-gradient reference (must equal ``loss``).
        worst_edges: the entries furthest from RMS 1 (``|log2 rms|``), worst first (at most 5).
        failures: one line per failed criterion.
        error: a traceback summary when a step raised (the model then fails).
        seconds: wall-clock time of the check.
        timings: seconds per stage (build, transform, analyse = coverage, probe, reference).
    """

    name: str
    passed: bool = False
    skipped: bool = False
    strict: bool = False
    coverage: float | None = None
    n_ops: int | None = None
    missing_ops: list[MissingOpInfo] = field(default_factory=list)
    unanalysed_ops: list[MissingOpInfo] = field(default_factory=list)
    forward_in_band: float | None = None
    backward_in_band: float | None = None
    grads_in_band: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    outside_outer: dict[str, int] = field(default_factory=dict)
    min_cosine: float | None = None
    min_cosine_param: str | None = None
    low_cosine_params: list[tuple[str, float]] = field(default_factory=list)
    zero_grads: list[str] = field(default_factory=list)
    loss: float | None = None
    expected_loss: float | None = None
    loss_terms: list[dict[str, Any]] = field(default_factory=list)
    reference_loss: float | None = None
    nonfinite: list[str] = field(default_factory=list)
    worst_edges: list[Edge] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    sizes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def worst_edge(self) -> Edge | None:
        return self.worst_edges[0] if self.worst_edges else None

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.passed else "FAIL")

    def explanation(self) -> str:
        """Why the model failed (or a one-line summary when it passed)."""
        if self.skipped:
            return f"{self.name}: skipped: {self.error or ''}".rstrip()
        head = f"{self.name}: {'passed' if self.passed else 'FAILED'}"
        if self.passed:
            return head
        lines = [head]
        for f in self.failures:
            lines.append(f"  - {f}")
        if self.missing_ops:
            lines.append(f"  ops without a scale rule ({len(self.missing_ops)}):")
            groups: dict[tuple[str, str | None], list[str]] = {}
            for m in self.missing_ops:
                groups.setdefault((m.op, m.source), []).append(m.node)
            for (op, source), nodes in groups.items():
                lines.append("    - " + str(MissingOpInfo(", ".join(nodes), op, source)))
        if self.unanalysed_ops:
            ops = sorted({m.op for m in self.unanalysed_ops})
            lines.append(f"  {len(self.unanalysed_ops)} op(s) downstream of them have no predicted scale "
                         f"(an input has none): {', '.join(ops[:8])}{' ...' if len(ops) > 8 else ''}")
        if self.worst_edges:
            lines.append("  worst edges (furthest from RMS 1):")
            for e in self.worst_edges[:5]:
                lines.append(f"    - {e.short()}")
        if self.low_cosine_params:
            lines.append("  gradients not parallel to the exact gradient (cosine):")
            for n, c in self.low_cosine_params[:5]:
                lines.append(f"    - {n}: {c:.6f}")
        if self.zero_grads:
            shown = ", ".join(self.zero_grads[:5]) + (" ..." if len(self.zero_grads) > 5 else "")
            lines.append(f"  structurally zero gradients, not judged ({len(self.zero_grads)}): {shown}")
        if self.error:
            lines.append("  error:")
            lines += ["    " + ln for ln in self.error.rstrip().splitlines()]
        return "\n".join(lines)

    def assert_passed(self) -> "ModelCheck":
        """Raise ``AssertionError`` with :meth:`explanation` unless the model passed."""
        if not self.passed:
            raise AssertionError(self.explanation())
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "skipped": self.skipped,
            "strict": self.strict,
            "coverage": self.coverage,
            "n_ops": self.n_ops,
            "missing_ops": [m.to_dict() for m in self.missing_ops],
            "unanalysed_ops": [m.to_dict() for m in self.unanalysed_ops],
            "forward_in_band": self.forward_in_band,
            "backward_in_band": self.backward_in_band,
            "grads_in_band": self.grads_in_band,
            "counts": dict(self.counts),
            "outside_outer": dict(self.outside_outer),
            "min_cosine": _json_float(self.min_cosine),
            "min_cosine_param": self.min_cosine_param,
            "low_cosine_params": [[n, _json_float(c)] for n, c in self.low_cosine_params],
            "zero_grads": list(self.zero_grads),
            "loss": _json_float(self.loss),
            "expected_loss": _json_float(self.expected_loss),
            "loss_terms": [{k: (_json_float(v) if isinstance(v, float) else v) for k, v in t.items()}
                           for t in self.loss_terms],
            "reference_loss": _json_float(self.reference_loss),
            "nonfinite": list(self.nonfinite),
            "worst_edge": self.worst_edge.to_dict() if self.worst_edge else None,
            "worst_edges": [e.to_dict() for e in self.worst_edges],
            "failures": list(self.failures),
            "error": self.error,
            "explanation": self.explanation(),
            "warnings": list(self.warnings),
            "sizes": dict(self.sizes),
            "seconds": self.seconds,
            "timings": dict(self.timings),
        }


@dataclass
class CheckReport:
    """The verdicts on several models (see :func:`check_models`)."""

    models: list[ModelCheck]
    criteria: Criteria
    sizes: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """``True`` iff every model that was not skipped passed (and at least one ran)."""
        ran = [m for m in self.models if not m.skipped]
        return bool(ran) and all(m.passed for m in ran)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def failed(self) -> list[ModelCheck]:
        return [m for m in self.models if not m.skipped and not m.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "criteria": self.criteria.to_dict(),
            "sizes": dict(self.sizes),
            "strict": self.strict,
            "seconds": self.seconds,
            "versions": _versions(),
            "models": [m.to_dict() for m in self.models],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_junit(self) -> str:
        """JUnit XML: one ``<testcase>`` per model; a failed model has a ``<failure>`` (criteria)
        or an ``<error>`` (an exception), whose message and text are :meth:`ModelCheck.explanation`."""
        import xml.etree.ElementTree as ET

        n_fail = sum(1 for m in self.models if not m.skipped and not m.passed and not m.error)
        n_err = sum(1 for m in self.models if not m.skipped and not m.passed and m.error)
        n_skip = sum(1 for m in self.models if m.skipped)
        root = ET.Element("testsuites", name="unitscale_fx.check", tests=str(len(self.models)),
                          failures=str(n_fail), errors=str(n_err), skipped=str(n_skip),
                          time=f"{self.seconds:.3f}")
        suite = ET.SubElement(root, "testsuite", name="unitscale_fx.check", tests=str(len(self.models)),
                              failures=str(n_fail), errors=str(n_err), skipped=str(n_skip),
                              time=f"{self.seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for k, v in self.criteria.to_dict().items():
            ET.SubElement(props, "property", name=f"criteria.{k}", value=repr(v))
        for k, v in self.sizes.items():
            ET.SubElement(props, "property", name=f"sizes.{k}", value=str(v))
        ET.SubElement(props, "property", name="strict", value=str(self.strict).lower())
        for m in self.models:
            case = ET.SubElement(suite, "testcase", classname="unitscale_fx.check", name=m.name,
                                 time=f"{m.seconds:.3f}")
            text = _xml_safe(m.explanation())
            if m.skipped:
                ET.SubElement(case, "skipped", message=_xml_safe(m.error or "skipped"))
            elif not m.passed:
                tag = "error" if m.error else "failure"
                msg = m.failures[0] if m.failures else _first_line(m.error or "failed")
                if len(m.failures) > 1:
                    msg += f" (and {len(m.failures) - 1} more)"
                el = ET.SubElement(case, tag, message=_xml_safe(msg),
                                   type="MissingRuleError" if (m.error and "MissingRuleError" in m.error) else
                                   ("Error" if m.error else "UnitScaleCheckFailure"))
                el.text = text
            out = ET.SubElement(case, "system-out")
            out.text = _xml_safe(_figures_line(m))
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"

    def table(self) -> Any:
        """The summary as a ``rich.table.Table``."""
        from rich.table import Table

        c = self.criteria
        t = Table(title=f"unitscale_fx check: RMS in [1/{c.band:g}, {c.band:g}], none outside "
                        f"[1/{c.outer:g}, {c.outer:g}], cosine >= {c.min_cosine:g}")
        t.add_column("model", no_wrap=True)
        t.add_column("result", no_wrap=True)
        t.add_column("coverage", justify="right")
        t.add_column(f"fwd >= {c.min_forward:.0%}", justify="right")
        t.add_column(f"bwd >= {c.min_backward:.0%}", justify="right")
        t.add_column(f"grads >= {c.min_grads:.0%}", justify="right")
        t.add_column("min cos", justify="right")
        t.add_column("loss", justify="right")
        t.add_column("worst edge")
        t.add_column("time", justify="right")
        for m in self.models:
            res = ("[yellow]skip[/]" if m.skipped else ("[green]pass[/]" if m.passed else "[red]FAIL[/]"))
            cov = "-" if m.coverage is None else (
                f"{100 * m.coverage:.1f}%" + (f" ({len(m.missing_ops)} missing)" if m.missing_ops else ""))
            w = m.worst_edge
            t.add_row(
                m.name, res, cov,
                _pct(m.forward_in_band, c.min_forward),
                _pct(m.backward_in_band, c.min_backward),
                _pct(m.grads_in_band, c.min_grads),
                "-" if m.min_cosine is None else _styled(f"{m.min_cosine:.6f}", m.min_cosine >= c.min_cosine),
                "-" if m.loss is None else (f"{m.loss:.3f}" + (f" (ln C={m.expected_loss:.3f})" if m.expected_loss else "")),
                "" if w is None else _escape(w.short(node=False)),
                f"{m.seconds:.1f}s",
            )
        return t

    def render(self, console: Any = None, *, explain: bool = True) -> None:
        """Print the table, then the explanation of every failed model."""
        from rich.console import Console

        if console is None:
            console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(self.table())
        if explain:
            for m in self.failed:
                console.print()
                console.print(_escape(m.explanation()), highlight=False)
        ran = [m for m in self.models if not m.skipped]
        n_pass = sum(m.passed for m in ran)
        console.print()
        console.print(
            f"{n_pass}/{len(ran)} models passed"
            + (f", {len(self.models) - len(ran)} skipped" if len(ran) != len(self.models) else "")
            + f" in {self.seconds:.1f}s", highlight=False)

    def explanation(self) -> str:
        return "\n\n".join(m.explanation() for m in self.models if not m.passed or m.skipped)


# ------------------------------------------------------------------------------------------------
# checking one model
# ------------------------------------------------------------------------------------------------


class _Timeout(BaseException):
    """Raised by the SIGALRM handler (a BaseException so that ``except Exception`` in user or
    library code does not swallow it)."""


@dataclass
class _Built:
    name: str
    model: Any
    inputs: Any
    loss_fn: Callable | None
    accepted: set[str]


def _label(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    mod = getattr(spec, "__module__", None) or "?"
    qn = getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None) or repr(spec)
    return f"{mod}:{qn}"


def _build(spec: Any, sizes: dict[str, Any]) -> _Built:
    """Build ``(model, inputs, loss_fn)`` from a zoo name, a ``module:factory`` spec or a callable."""
    from . import zoo

    label = _label(spec)
    if isinstance(spec, str) and ":" not in spec:
        name, model, inputs = zoo.resolve(spec.strip(), **sizes)
        return _Built(name, model, inputs, None, set(sizes))
    factory = zoo.load_factory(spec) if isinstance(spec, str) else spec
    if not callable(factory):
        raise TypeError(f"a model is a zoo name, a 'package.module:factory' spec or a callable, got {spec!r}")
    holder: dict[str, Any] = {}

    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        res = factory(*args, **kwargs)
        if isinstance(res, tuple) and len(res) == 3:
            if not callable(res[2]):
                raise TypeError(f"factory {label!r} returned a 3-tuple whose third item is not a loss "
                                f"function loss_fn(output) -> tensor: {res[2]!r}")
            holder["loss_fn"] = res[2]
            res = (res[0], res[1])
        return res

    kwargs = zoo._accepted_kwargs(factory, sizes)
    model, inputs = zoo._build(wrapped, kwargs, sizes.get("seed", 0), sizes.get("device", "cpu"), label)
    return _Built(label, model, inputs, holder.get("loss_fn"), set(kwargs))


def _find_logits(output: Any) -> Any:
    import torch

    def ok(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2

    logits = getattr(output, "logits", None)
    if ok(logits):
        return logits
    if isinstance(output, Mapping):
        return output["logits"] if ok(output.get("logits")) else None
    if isinstance(output, (tuple, list)):
        for t in output:
            if ok(t):
                return t
    return None


def _vocab_of(built: _Built, sizes: dict[str, Any]) -> int | None:
    if "vocab" in built.accepted:
        return int(sizes["vocab"])
    cfg = getattr(built.model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _loss(output: Any, loss_fn: Callable | None) -> Any:
    """The scalar loss of a model output: ``loss_fn(output)``, else ``output.loss`` /
    ``output["loss"]`` / the output itself / the first (then the last) scalar of a tuple."""
    import torch

    from . import zoo
    from .probe import _extract_loss

    if loss_fn is not None:
        loss = loss_fn(output)
    else:
        try:
            loss = _extract_loss(output)
        except ValueError:
            loss = zoo.loss_of(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}; return (model, inputs, loss_fn) "
                         "from the factory to say how to reduce the output")
    return loss.reshape(())


def _step(model: Any, inputs: Any, loss_fn: Callable | None, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """One plain forward + backward with the RNG seeded by ``seed`` (restored afterwards).

    Returns ``(output, loss, grads)``, ``grads`` a detached copy of every parameter's gradient; the
    parameters' ``.grad`` are left as they were before the call."""
    import torch

    params = list(model.named_parameters())
    saved = [p.grad for _, p in params]
    devices = sorted({p.device.index or 0 for _, p in params if p.device.type == "cuda"})
    try:
        for _, p in params:
            p.grad = None
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.enable_grad():
                output = _call(model, inputs)
                loss = _loss(output, loss_fn)
                if loss.requires_grad:
                    loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    finally:
        for (_, p), g in zip(params, saved):
            p.grad = g
    return output, loss.detach(), grads


# ---- attributing probe records to the module (path) and the FX node that ran the op -------------


def _clean_fqn(path: str) -> str:
    p = str(path)
    for pre in ("L['self'].", "L['self']"):
        if p.startswith(pre):
            p = p[len(pre):]
    return p.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def _node_owner(node: Any) -> tuple[str, str] | None:
    """``(module path, module class name)`` of the innermost module that owns ``node``, from the
    ``nn_module_stack`` that ``torch.export`` records (``None`` when absent)."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, value in reversed(list(stack.items())):
        if str(key).startswith("_empty_nn_module_stack"):
            continue
        try:
            path, typ = value
        except (TypeError, ValueError):
            continue
        tname = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
        return _clean_fqn(path), tname.rsplit(".", 1)[-1]
    return None


@functools.lru_cache(maxsize=None)
def _scope_class() -> type:
    import torch

    class _NodeScope(torch.nn.Module):
        """Runs one op of the graph as a module call, so the probe's module hooks name it (and
        claim the autograd nodes it creates)."""

        def __init__(self, fn: Callable, tap: bool = False) -> None:
            super().__init__()
            self.fn = fn
            self.tap = tap
            self.value: Any = None
            self.inputs: Any = None

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = self.fn(*args, **kwargs)
            if self.tap:
                first = out[0] if isinstance(out, (tuple, list)) and out else out
                if isinstance(first, torch.Tensor):
                    self.value = first.detach()
                    det = lambda a: a.detach() if isinstance(a, torch.Tensor) else a  # noqa: E731
                    self.inputs = (tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()})
            return out

    return _NodeScope


_SCOPES = "_us_check_scopes"
_CE_OPS = ("cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward",
           "nll_loss_nd", "binary_cross_entropy_with_logits")


def _loss_classes(node: Any) -> int | None:
    """Number of classes of a cross-entropy-type node with ``reduction="mean"`` (``None`` otherwise)."""
    import torch

    packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
    if packet not in _CE_OPS:
        return None
    schema_args = [a.name for a in node.target._schema.arguments]
    if "reduction" in schema_args:
        i = schema_args.index("reduction")
        red = node.args[i] if i < len(node.args) else node.kwargs.get("reduction", 1)
        if red != 1:  # torch's Reduction.Mean
            return None
    if packet == "binary_cross_entropy_with_logits":
        return 2
    inp = node.args[0] if node.args else None
    val = getattr(inp, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    c = val.shape[1] if val.dim() >= 2 else val.shape[0]
    try:
        return int(c)
    except (TypeError, ValueError):
        return None


def _loss_spread(fn: Any, inputs: Any) -> tuple[float, int] | None:
    """``(standard error of the mean, number of terms)`` of a mean-reduced loss op, recomputed
    per element (``reduction="none"``, ignored targets left out); ``None`` when it cannot be."""
    import torch

    if inputs is None:
        return None
    args, kwargs = list(inputs[0]), dict(inputs[1])
    names = [a.name for a in fn._schema.arguments]
    if "reduction" not in names:
        return None
    i = names.index("reduction")
    if i < len(args):
        args[i] = 0
    else:
        kwargs["reduction"] = 0
    try:
        with torch.no_grad():
            per = fn(*args, **kwargs)
        per = per[0] if isinstance(per, (tuple, list)) else per
        per = per.detach().double().flatten()
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if "ignore_index" in names and isinstance(target, torch.Tensor) and not target.is_floating_point():
            j = names.index("ignore_index")
            ignore = args[j] if j < len(args) else kwargs.get("ignore_index", -100)
            keep = (target.flatten() != ignore)
            if keep.numel() == per.numel():
                per = per[keep]
    except Exception:  # noqa: BLE001 - best effort
        return None
    n = per.numel()
    if n < 2:
        return None
    return float(per.std() / math.sqrt(n)), int(n)


def _scoped_runner(gm: Any) -> tuple[Any, dict[str, tuple[str, str, str]], dict[str, tuple[str, str, int]]]:
    """A copy of the transformed graph module in which every op runs inside its own small module.

    Returns ``(runner, owners, taps)``: ``owners`` maps a scope's module name (as the probe
    reports it) to ``(module path, module class, FX node name)`` of the original model, and
    ``taps`` maps the scope name of every cross-entropy-type node to ``(node name, op, classes)``;
    the runner records the value of those nodes (``runner.get_submodule(scope).value``). The
    runner shares parameters, buffers and submodules with ``gm`` and computes exactly the same ops
    in the same order.
    """
    import operator

    import torch.fx as fx

    Scope = _scope_class()
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    graph._codegen = gm.graph._codegen
    root: dict[str, Any] = {}  # every attribute the graph reads, the very objects of gm
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            obj: Any = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            root[str(node.target)] = obj
    owners: dict[str, tuple[str, str, str]] = {}
    taps: dict[str, tuple[str, str, int]] = {}
    owner_of: dict[Any, tuple[str, str]] = {}
    skip = {operator.getitem}
    for node in list(graph.nodes):
        own = _node_owner(node)
        if own is None:  # nodes the passes inserted: the owner of their first input
            own = next((owner_of[a] for a in node.all_input_nodes if a in owner_of), None)
        if own is not None:
            owner_of[node] = own
        if node.op != "call_function" or node.target in skip:
            continue
        classes = _loss_classes(node)
        key = f"n_{node.name}"  # never an nn.Module attribute ("to", "train"...)
        name = f"{_SCOPES}.{key}"
        root[name] = Scope(node.target, tap=classes is not None)
        owners[name] = (*(own or ("", "")), node.name)
        if classes is not None:
            taps[name] = (node.name, str(node.target), classes)
        with graph.inserting_before(node):
            new = graph.call_module(name, node.args, node.kwargs)
        new.meta = node.meta
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    runner = fx.GraphModule(root, graph, class_name="UnitScaleCheckRunner")
    runner.train(gm.training)
    return runner, owners, taps


def _distinct(edges: Sequence[Edge], n: int) -> list[Edge]:
    """The first ``n`` edges that do not repeat a (phase, where, rms) already listed: one tensor
    multiplied in two ops of the backward pass (grad_input and grad_weight) is shown once."""
    out, seen = [], set()
    for e in edges:
        key = (e.phase, e.where, e.rms if math.isfinite(e.rms) else str(e.rms))
        if key not in seen:
            seen.add(key)
            out.append(e)
            if len(out) == n:
                break
    return out


def _edges(result: Any, owners: Mapping[str, tuple[str, str, str]], param_owner: Callable[[str], str]) -> list[Edge]:
    edges = []
    for r in list(result.forward) + list(result.backward):
        node = None
        module, mtype = r.module, r.module_type
        if module and module.startswith(_SCOPES + "."):
            module, mtype, node = owners.get(module, (None, None, None))
        elif module is not None and module.startswith(_SCOPES):
            module, mtype = None, None
        if module is None and r.param:
            module = param_owner(r.param)
        edges.append(Edge(r.phase, r.rms, module, r.op, r.role, r.param, mtype, node))
    edges += [Edge("grad", v, param=n, module=param_owner(n)) for n, v in result.param_grads]
    return edges


# ---- coverage -------------------------------------------------------------------------------------


def _missing_infos(missing: Iterable[Any]) -> list[MissingOpInfo]:
    out, seen = [], set()
    for m in missing:
        if isinstance(m, (tuple, list)):
            node, op, src = (list(m) + [None, None, None])[:3]
        else:
            node, op, src = m.node, m.op, m.source
        key = (str(node), str(op))
        if key in seen:
            continue
        seen.add(key)
        out.append(MissingOpInfo(str(node), str(op), src))
    return out


def _split_missing(gm: Any, missing: Sequence[MissingOpInfo]) -> tuple[list[MissingOpInfo], list[MissingOpInfo]]:
    """``(root causes, downstream)``: an op without a registered rule, or whose inputs all have a
    scale, is a root cause; an op that has a rule but an input without a scale is downstream."""
    from .analysis.record import META_KEY
    from .analysis.registry import lookup

    import operator

    nodes = {n.name: n for n in gm.graph.nodes}

    def is_missing(n: Any) -> bool:
        if n.op == "call_function" and n.target is operator.getitem and n.args:
            return is_missing(n.args[0])
        return bool(getattr(n.meta.get(META_KEY), "missing", False))

    roots, downstream = [], []
    for m in missing:
        node = nodes.get(m.node)
        if node is not None and _inserted(node):
            continue  # a scale the transform put after an unscaled op: not the user's op
        if node is None or node.op != "call_function" or lookup(node.target) is None:
            roots.append(m)
        elif any(is_missing(a) for a in node.all_input_nodes):
            downstream.append(m)
        else:
            roots.append(m)
    return roots, downstream


def _inserted(node: Any) -> bool:
    """A node the transform inserted (a forward scale, a ``grad_scale``, a run-time scale value)."""
    from . import runtime
    from .analysis.record import META_KEY

    if node.op == "call_function" and node.target in (runtime.grad_scale, runtime.scale_value):
        return True
    return getattr(node.meta.get(META_KEY), "role", None) is not None


def _coverage(gm: Any) -> tuple[float | None, int]:
    """``(fraction of judged ops with a scale rule, number of judged ops)``; an op that has a rule
    but no scale because of an upstream op without one still counts as covered. Nodes the
    transform inserted (:func:`_inserted`) are not judged."""
    from .analysis.record import META_KEY

    missing = [MissingOpInfo(n.name, "") for n in gm.graph.nodes
               if getattr(n.meta.get(META_KEY), "missing", False)]
    roots = {m.node for m in _split_missing(gm, missing)[0]}
    n_rule = n_missing = 0
    for node in gm.graph.nodes:
        rec = node.meta.get(META_KEY)
        if rec is None or node.op in ("placeholder", "get_attr", "output") or _inserted(node):
            continue
        if node.name in roots:
            n_missing += 1
        elif getattr(rec, "missing", False) or getattr(rec, "rule", None) is not None:
            n_rule += 1
    total = n_rule + n_missing
    if total == 0:
        return None, 0
    return n_rule / total, total


def _original_coverage(mc: ModelCheck, model: Any, inputs: Any) -> None:
    """Coverage and ops without a rule from the analysis of the *original* graph: used when the
    transform raised (strict mode, or a pass failed), so there is no transformed graph to judge."""
    from .api import analyse

    a = analyse(model, inputs, backward=False)
    mc.coverage, mc.n_ops = _coverage(a.gm)
    mc.missing_ops, mc.unanalysed_ops = _split_missing(a.gm, _missing_infos(a.missing))


def _cosine(a: Any, b: Any) -> float:
    import torch

    a = a.detach().double().flatten()
    b = b.detach().double().flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 and float(nb) == 0.0:
        return 1.0
    if float(na) == 0.0 or float(nb) == 0.0:
        return 0.0
    return float(torch.dot(a, b) / (na * nb))


def _err_text(exc: BaseException, limit: int = 12) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tb).rstrip().splitlines()
    # keep the head of the message (most informative for our own errors) and the last frames
    if len(text) > 2 * limit:
        text = text[:3] + ["  ..."] + text[-(2 * limit - 3):]
    return "\n".join(text)


def check_model(
    name_or_factory: Any,
    *,
    criteria: Criteria | None = None,
    sizes: Mapping[str, Any] | None = None,
    strict: bool = False,
    timeout: float | None = None,
    loss_fn: Callable | None = None,
    skip_unavailable: bool = False,
) -> ModelCheck:
    """Check one model; never raises for a model problem (the verdict says what went wrong).

    Args:
        name_or_factory: a zoo name (``"nanogpt"``), a ``"package.module:factory"`` /
            ``"path/to/file.py:factory"`` spec, or the factory itself. The factory accepts (some of)
            the size keywords and returns ``(model, example_inputs)`` with the loss computed in the
            model, or ``(model, example_inputs, loss_fn)`` with ``loss_fn(output) -> scalar tensor``.
        criteria: the :class:`Criteria` (default: the documented defaults; :func:`load_settings`
            reads the ones of a ``pyproject.toml``).
        sizes: ``hidden, layers, heads, seq, batch, vocab, seed, device`` (missing keys:
            :data:`DEFAULT_SIZES`).
        strict: transform with ``Config(strict=True)``: an op without a rule makes the transform
            raise :class:`~unitscale_fx.MissingRuleError` and nothing else is measured. Otherwise
            such ops are reported (the coverage criterion fails) and every other figure is measured.
        timeout: seconds after which the check is abandoned (main thread only; ``None``: no limit).
        loss_fn: ``loss_fn(output) -> tensor``, overriding the factory's.
        skip_unavailable: a zoo model whose optional dependency is missing is marked skipped
            instead of failed.
    """
    criteria = criteria if criteria is not None else Criteria()
    sz = _merge_sizes(sizes)
    label = _label(name_or_factory)
    mc = ModelCheck(name=label, strict=bool(strict), sizes={k: v for k, v in sz.items()})
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _deadline(timeout):
                _check_into(mc, name_or_factory, criteria, sz, strict, loss_fn, skip_unavailable)
        except _Timeout:
            stage = next((s for s in _STAGES if s not in mc.timings), "?")
            mc.error = f"timed out after {timeout:g} s during stage {stage!r} (the check was abandoned)"
            mc.failures.append(f"timeout: the check did not finish within {timeout:g} s (stage {stage!r})")
        except _Skip as e:
            mc.skipped = True
            mc.error = str(e)
        except Exception as e:  # noqa: BLE001 - every problem becomes a verdict
            mc.error = _err_text(e)
            mc.failures.append(f"error: {type(e).__name__}: {_first_line(str(e))}")
    seen: set[str] = set()
    for w in caught:
        msg = f"{w.category.__name__}: {_first_line(str(w.message))}"
        if msg not in seen and len(seen) < 10:
            seen.add(msg)
            mc.warnings.append(msg)
    mc.seconds = time.perf_counter() - t0
    mc.passed = not mc.skipped and not mc.failures and mc.error is None
    return mc


_STAGES = ("build", "transform", "analyse", "probe", "reference")


class _Skip(Exception):
    """The model cannot be built here (optional dependency missing)."""


def _merge_sizes(sizes: Mapping[str, Any] | None) -> dict[str, Any]:
    sz = dict(DEFAULT_SIZES)
    for k, v in (sizes or {}).items():
        if k not in _SIZE_KEYS:
            raise ValueError(f"unknown size {k!r}; known: {', '.join(_SIZE_KEYS)}")
        if v is not None:
            sz[k] = v
    return sz


def _deadline(seconds: float | None):
    """Context manager raising :class:`_Timeout` after ``seconds`` (SIGALRM; main thread only).

    A signal handler's exception is lost when the signal lands while Python runs a weakref callback or a
    ``__del__`` (it is printed as "Exception ignored in ..."). So the alarm repeats every
    :data:`_TIMEOUT_RETRY` seconds until an exception gets through, and a block that finishes after its
    deadline raises :class:`_Timeout` on exit anyway: a check that overran is never reported as passed.
    """
    import contextlib

    @contextlib.contextmanager
    def cm():
        usable = (seconds is not None and seconds > 0 and hasattr(signal, "SIGALRM")
                  and threading.current_thread() is threading.main_thread())
        if not usable:
            yield
            return
        state = {"fired": False, "active": True}

        def handler(signum: int, frame: Any) -> None:
            if state["active"]:
                state["fired"] = True
                raise _Timeout()

        old_handler = signal.signal(signal.SIGALRM, handler)
        old_timer = signal.setitimer(signal.ITIMER_REAL, float(seconds), _TIMEOUT_RETRY)
        try:
            yield
        except Exception as e:
            if state["fired"]:  # an error that followed a swallowed alarm: the deadline is the cause
                raise _Timeout() from e
            raise
        finally:
            state["active"] = False
            signal.setitimer(signal.ITIMER_REAL, 0.0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_timer[0] > 0:  # re-arm an outer timer (approximately)
                signal.setitimer(signal.ITIMER_REAL, *old_timer)
        if state["fired"]:  # the alarm went off but its exception was swallowed somewhere
            raise _Timeout()

    return cm()


_TIMEOUT_RETRY = 0.05
"""Seconds between repeated alarms once a check's deadline has passed (see :func:`_deadline`)."""


def _check_into(mc: ModelCheck, spec: Any, criteria: Criteria, sz: dict[str, Any], strict: bool,
                loss_fn: Callable | None, skip_unavailable: bool) -> None:
    import torch

    from . import zoo

    c = criteria
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        mc.timings[stage] = round(now - clock[0], 3)
        clock[0] = now

    if skip_unavailable and isinstance(spec, str) and ":" not in spec:
        entry = zoo.spec(spec.strip())
        missing_req = zoo._missing_requirements(entry.requires)
        if missing_req:
            raise _Skip(f"needs {', '.join(missing_req)}")
    seed = int(sz.get("seed", 0))
    devices = [torch.device(sz["device"]).index or 0] if torch.device(sz["device"]).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the whole check is deterministic given the seed
        torch.manual_seed(seed)
        _check_built(mc, spec, c, sz, strict, loss_fn, lap)


def _check_built(mc: ModelCheck, spec: Any, c: Criteria, sz: dict[str, Any], strict: bool,
                 loss_fn: Callable | None, lap: Callable[[str], None]) -> None:
    import torch

    from .api import transform
    from .config import Config
    from .errors import MissingRuleError
    from .probe import measure_step

    built = _build(spec, sz)
    mc.name = built.name
    lf = loss_fn or built.loss_fn
    model, inputs = built.model, built.inputs
    seed = int(sz.get("seed", 0))

    lap("build")

    # 1. the transform, eager: the probe must see every op of the forward and the backward pass
    cfg = Config(compile=False, strict=bool(strict))
    try:
        us = transform(model, inputs, config=cfg)
    except MissingRuleError as e:
        lap("transform")
        _original_coverage(mc, model, inputs)
        lap("analyse")
        if not mc.missing_ops:
            mc.missing_ops = _missing_infos(e.ops)
        mc.failures.append(_coverage_failure(mc, c, force=True))
        mc.failures.append(f"strict: the transform raised MissingRuleError ({len(e.ops)} op(s) of the "
                           "transformed graph without a scale); nothing else was measured")
        return
    except Exception:
        lap("transform")
        try:  # name the ops without a rule too: they are often why a pass gave up
            _original_coverage(mc, model, inputs)
        except Exception:  # noqa: BLE001 - the transform's error is the one to report
            pass
        lap("analyse")
        raise
    lap("transform")

    # 2. coverage, judged on the analysis of the graph the transform produced (the nodes it
    #    inserted, scales and grad_scales, left out): no second capture of the model
    res = us.result
    mc.coverage, mc.n_ops = _coverage(res.gm)
    mc.missing_ops, mc.unanalysed_ops = _split_missing(res.gm, _missing_infos(res.analysis.missing))
    lap("analyse")
    cov_fail = _coverage_failure(mc, c)
    if cov_fail:
        mc.failures.append(cov_fail)
    gm = us.graph_module

    # 3. the measured step: one forward + backward under the scale probe, on the transformed graph
    runner, owners, taps = _scoped_runner(gm)
    p_owner: dict[str, str] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            p_owner[f"{mname}.{pname}" if mname else pname] = mname

    def param_owner(name: str) -> str:
        return p_owner.get(name, name.rpartition(".")[0])

    holder: dict[str, Any] = {}

    def probe_loss(output: Any) -> Any:
        holder["output"] = output
        holder["loss"] = _loss(output, lf)
        return holder["loss"]

    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        result = measure_step(runner, inputs, loss_fn=probe_loss)
    mc.loss = float(holder["loss"].detach())
    output = holder.pop("output")
    mc.zero_grads = [n for n, v in result.param_grads if math.isfinite(v) and v < c.zero_grad]
    if mc.zero_grads:
        zero = set(mc.zero_grads)
        result = type(result)(forward=result.forward, backward=result.backward,
                              param_grads=[(n, v) for n, v in result.param_grads if n not in zero])
    summ = result.summary(c.lo, c.hi, 1.0 / c.outer, c.outer)
    mc.forward_in_band = summ["forward"]["fraction_in_band"]
    mc.backward_in_band = summ["backward"]["fraction_in_band"]
    mc.grads_in_band = summ["grads"]["fraction_in_band"]
    mc.counts = {g: summ[g]["count"] for g in ("forward", "backward", "grads")}
    mc.outside_outer = {g: summ[g]["outside_outer"] for g in ("forward", "backward", "grads")}
    edges = sorted(_edges(result, owners, param_owner), key=lambda e: e.badness, reverse=True)
    mc.worst_edges = _distinct(edges, 5)
    need = {"forward": c.min_forward, "backward": c.min_backward, "grads": c.min_grads}
    what = {"forward": "forward GEMM multiplicands", "backward": "backward GEMM multiplicands",
            "grads": "parameter gradients"}
    for g in ("forward", "backward", "grads"):
        frac, n = summ[g]["fraction_in_band"], summ[g]["count"]
        if frac is None:
            mc.failures.append(f"{g}: no {what[g]} were measured")
        elif frac < need[g]:
            mc.failures.append(f"{g}: {100 * frac:.1f}% of {n} {what[g]} have RMS in [1/{c.band:g}, {c.band:g}] "
                               f"(need >= {100 * need[g]:.1f}%)")
    for g in ("forward", "backward", "grads"):
        k = summ[g]["outside_outer"]
        if k:
            phase = "grad" if g == "grads" else g
            bad = [e for e in edges if e.phase == phase]
            mc.failures.append(f"{g}: {k} of {summ[g]['count']} {what[g]} have RMS outside [1/{c.outer:g}, "
                               f"{c.outer:g}] (worst: {bad[0].short() if bad else '?'})")

    # 4. finiteness, and the initial loss
    _, step_loss, grads = _step(us, inputs, lf, seed)  # the same step, without the probe
    if not math.isfinite(mc.loss):
        mc.nonfinite.append("loss")
    mc.nonfinite += [f"{e.where} ({e.phase})" for e in edges if e.phase != "grad" and not math.isfinite(e.rms)]
    mc.nonfinite += [f"{n} (grad)" for n, g in grads.items() if not bool(torch.isfinite(g).all())]
    if mc.nonfinite:
        shown = ", ".join(mc.nonfinite[:5]) + (" ..." if len(mc.nonfinite) > 5 else "")
        mc.failures.append(f"non-finite values (NaN/Inf) in {len(mc.nonfinite)} tensor(s): {shown}")
    if not _same_loss(float(step_loss), mc.loss):
        mc.failures.append(f"the transformed model is not deterministic: the same step gave loss {mc.loss:.6f} "
                           f"under the probe and {float(step_loss):.6f} without it")
    _judge_loss(mc, c, runner, taps, built, sz, output)
    del output, runner
    lap("probe")

    # 5. gradient validity: the exact gradient of the same transformed forward, i.e. the same graph
    #    with its backward-only scales (grad_scale nodes, identities in the forward pass) bypassed,
    #    which is what Config(scale_backward=False) builds; same parameters, same RNG (dropout masks)
    ref_gm = _exact_gradient_graph(gm)
    saved_runner = us._us_runner
    object.__setattr__(us, "_us_runner", ref_gm)
    try:
        _, ref_loss, ref_grads = _step(us, inputs, lf, seed)
    finally:
        object.__setattr__(us, "_us_runner", saved_runner)
    del ref_gm
    mc.reference_loss = float(ref_loss)
    lap("reference")
    if not _same_loss(mc.reference_loss, mc.loss):
        mc.failures.append(f"gradient validity: the graph without its backward-only scales (grad_scale "
                           f"bypassed, same weights) gives loss {mc.reference_loss:.6f}, not {mc.loss:.6f}: "
                           "the forward pass depends on the backward scales")
    cos: list[tuple[str, float]] = []
    for n in sorted((set(grads) | set(ref_grads)) - set(mc.zero_grads)):
        cos.append((n, _cosine(grads[n], ref_grads[n]) if n in grads and n in ref_grads else math.nan))
    if not cos:
        mc.failures.append("gradient validity: no parameter has a gradient")
        return
    order = lambda t: (not math.isnan(t[1]), t[1])  # noqa: E731 - NaN first, then smallest
    mc.min_cosine_param, mc.min_cosine = min(cos, key=order)
    low = sorted([t for t in cos if not (t[1] >= c.min_cosine)], key=order)
    mc.low_cosine_params = low
    if low:
        n0, v0 = low[0]
        mc.failures.append(f"gradient validity: {len(low)} of {len(cos)} parameter gradients have cosine "
                           f"similarity < {c.min_cosine:g} with the exact gradient (worst {n0}: "
                           + ("missing in one of the two runs" if math.isnan(v0) else f"{v0:.6f}") + ")")


def _exact_gradient_graph(gm: Any) -> Any:
    """A copy of the transformed graph module with every ``grad_scale`` node bypassed.

    ``grad_scale`` is the identity in the forward pass and multiplies the gradient in the backward
    pass; the backward pass (:class:`~unitscale_fx.passes.scale_backward.UnitScaleBackward`) is the
    last of the pipeline and inserts nothing else, so this is the graph that
    ``Config(scale_backward=False)`` builds: the same forward, its exact gradient. It shares
    parameters, buffers and submodules with ``gm`` (the factors' own nodes are left, unused).
    """
    import torch.fx as fx

    from .runtime import grad_scale

    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is grad_scale:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    ref = fx.GraphModule(gm, graph, class_name="UnitScaleExactGradient")
    ref.train(gm.training)
    return ref


def _same_loss(a: float, b: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return True  # reported as non-finite
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def _judge_loss(mc: ModelCheck, c: Criteria, runner: Any, taps: Mapping[str, tuple[str, str, int]],
                built: _Built, sz: dict[str, Any], output: Any) -> None:
    """Initial-loss sanity: every cross-entropy-type loss of the graph (mean reduction) within
    ``loss_tolerance * ln(classes)`` of ``ln(classes)``, plus three standard errors of its mean
    (the spread of the per-example losses: a batch of 4 images is a noisy estimate, 256 tokens are
    not); with none in the graph, a model whose output has logits
    over the vocabulary is judged on the loss it returns, against ``ln(vocab)``."""
    terms = []
    for scope, (node, op, classes) in taps.items():
        mod = runner.get_submodule(scope)
        value = mod.value
        if value is None or value.numel() != 1 or classes < 2:
            continue
        spread = _loss_spread(mod.fn, mod.inputs)
        mod.inputs = mod.value = None
        terms.append({"node": node, "op": op, "classes": int(classes), "value": float(value),
                      "expected": math.log(classes), "stderr": spread[0] if spread else 0.0,
                      "count": spread[1] if spread else None})
    if not terms:
        vocab = _vocab_of(built, sz)
        logits = _find_logits(output)
        if vocab and vocab > 1 and logits is not None and logits.shape[-1] == vocab and mc.loss is not None:
            terms.append({"node": None, "op": "loss", "classes": int(vocab), "value": mc.loss,
                          "expected": math.log(vocab), "stderr": 0.0, "count": None})
    mc.loss_terms = terms
    if not terms:
        return
    mc.expected_loss = terms[0]["expected"]
    for t in terms:
        v, e, se = t["value"], t["expected"], t["stderr"]
        if not math.isfinite(v):
            continue  # reported as non-finite
        if abs(v - e) > c.loss_tolerance * e + 3.0 * se:
            where = f"{t['op']} (node {t['node']})" if t["node"] else "the loss"
            noise = f" + 3 x {se:.3g} (standard error over {t['count']} terms)" if se else ""
            mc.failures.append(f"initial loss: {where} is {v:.4f} = {v / e:.3f} x ln({t['classes']}) = {e:.4f} "
                               f"(need within +-{100 * c.loss_tolerance:g}%{noise})")


def _coverage_failure(mc: ModelCheck, c: Criteria, force: bool = False) -> str | None:
    cov = mc.coverage
    n_missing = len(mc.missing_ops)
    if force or (cov is not None and cov < c.min_coverage) or (n_missing and c.min_coverage >= 1.0):
        ops = ", ".join(sorted({m.op for m in mc.missing_ops})) or "?"
        cov_s = "?" if cov is None else f"{100 * cov:.1f}%"
        return (f"coverage {cov_s} (need >= {100 * c.min_coverage:g}%): {n_missing} op(s) without a scale rule: "
                f"{ops}")
    return None


# ------------------------------------------------------------------------------------------------
# checking many models
# ------------------------------------------------------------------------------------------------


def zoo_models(which: str = "builtin") -> list[str]:
    """Names of the zoo models: ``"builtin"`` (shipped with unitscale_fx) or ``"all"`` (plus the
    entry-point ones)."""
    from . import zoo

    if which == "all":
        return zoo.names()
    if which == "builtin":
        return [s.name for s in zoo.specs()
                if s.factory is not None and getattr(s.factory, "__module__", "").startswith("unitscale_fx.zoo")]
    raise ValueError(f"--zoo must be 'builtin' or 'all', got {which!r}")


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def check_models(
    models: Sequence[Any],
    *,
    criteria: Criteria | None = None,
    sizes: Mapping[str, Any] | None = None,
    strict: bool = False,
    workers: int = 1,
    timeout: float | None = None,
    skip_unavailable: bool | Sequence[bool] = False,
    callback: Callable[[str, str, ModelCheck | None], None] | None = None,
    threads: int | None = None,
) -> CheckReport:
    """Check every model of ``models`` (see :func:`check_model`); results in the given order.

    ``workers > 1`` runs the models in that many processes (``ProcessPoolExecutor``, ``spawn``; a
    process checks one model after the other, as the sequential run does, and keeps its warm
    caches); factories given as callables must then be picklable (module-level functions).
    ``threads``: torch intra-op threads per process while checking (``torch.set_num_threads``,
    restored afterwards). Default ``1``: the check's models are small, most of the time goes to
    single-threaded Python (capture, analysis), and on a shared CI runner OpenMP threads that wait
    for each other make the measured steps several times slower. ``0``: torch's default
    (``cpu_count // workers`` per worker process). ``skip_unavailable`` (one flag, or
    one per model) marks zoo models whose optional dependency is missing as skipped instead of
    failed. ``callback(event, name, result)`` is called with ``("start", name, None)`` and
    ``("done", name, ModelCheck)``.
    """
    criteria = criteria if criteria is not None else Criteria()
    sz = _merge_sizes(sizes)
    models = list(models)
    skips = list(skip_unavailable) if isinstance(skip_unavailable, (list, tuple)) else [bool(skip_unavailable)] * len(models)
    if len(skips) != len(models):
        raise ValueError("skip_unavailable: one flag per model")
    t0 = time.perf_counter()
    results: list[ModelCheck | None] = [None] * len(models)
    cb = callback or (lambda *a: None)
    workers = max(1, int(workers or 1))
    threads = 1 if threads is None else int(threads)
    if threads < 0:
        raise ValueError("threads must be >= 0 (0: torch's default)")
    if workers == 1 or len(models) <= 1:
        import torch

        saved_threads = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            for i, m in enumerate(models):
                cb("start", _label(m), None)
                results[i] = check_model(m, criteria=criteria, sizes=sz, strict=strict, timeout=timeout,
                                         skip_unavailable=skips[i])
                cb("done", results[i].name, results[i])
        finally:
            torch.set_num_threads(saved_threads)
    else:
        import concurrent.futures as cf
        import importlib
        import multiprocessing as mp

        mod = importlib.import_module("unitscale_fx.check")  # not __main__ under python -m
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(models)), mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(threads,)) as pool:
            futs = {}
            for i, m in enumerate(models):
                futs[pool.submit(mod.check_model, m, criteria=criteria, sizes=sz, strict=strict, timeout=timeout,
                                 skip_unavailable=skips[i])] = i
                cb("start", _label(m), None)
            for fut in cf.as_completed(futs):
                i = futs[fut]
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001 - e.g. BrokenProcessPool, unpicklable factory
                    r = ModelCheck(name=_label(models[i]), strict=bool(strict), sizes=dict(sz))
                    r.error = _err_text(e)
                    r.failures.append(f"error: the worker process failed: {type(e).__name__}: {_first_line(str(e))}"
                                      + (" (rerun with --workers 1 to find the culprit)" if "Broken" in type(e).__name__ else ""))
                results[i] = r
                cb("done", r.name, r)
    return CheckReport(models=[r for r in results if r is not None], criteria=criteria, sizes=sz,
                       strict=bool(strict), seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# settings: pyproject.toml
# ------------------------------------------------------------------------------------------------

_SETTING_KEYS = {"models", "zoo", "strict", "workers", "threads", "timeout", *_SIZE_KEYS}


def find_pyproject(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` in ``start`` (default: the current directory) or above."""
    p = Path(start or os.getcwd()).resolve()
    if p.is_file():
        return p
    for d in (p, *p.parents):
        f = d / "pyproject.toml"
        if f.is_file():
            return f
    return None


def load_settings(start: str | os.PathLike | None = None) -> dict[str, Any]:
    """Checker settings from the nearest ``pyproject.toml`` (see ``docs/check.md``).

    Returns ``{"path": str | None, "criteria": {...}, "sizes": {...}, "models": [...], "zoo": ...,
    "strict": ..., "workers": ..., "threads": ..., "timeout": ...}`` with only the keys that are set. Criteria keys
    are read from ``[tool.unitscale_fx]`` (other keys there are ignored: they belong to other
    tools) and then ``[tool.unitscale_fx.check]`` (where an unknown key is an error).
    """
    import tomllib

    path = find_pyproject(start)
    out: dict[str, Any] = {"path": str(path) if path else None, "criteria": {}, "sizes": {}}
    if path is None:
        return out
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    tool = data.get("tool", {}).get("unitscale_fx", {})
    if not isinstance(tool, dict):
        raise ValueError(f"{path}: [tool.unitscale_fx] must be a table")
    crit_names = {f.name for f in dataclasses.fields(Criteria)}
    for k, v in tool.items():
        if k.replace("-", "_") in crit_names:
            out["criteria"][k.replace("-", "_")] = v
    section = tool.get("check", {})
    if not isinstance(section, dict):
        raise ValueError(f"{path}: [tool.unitscale_fx.check] must be a table")
    for k, v in section.items():
        key = k.replace("-", "_")
        if key in crit_names:
            out["criteria"][key] = v
        elif key in _SIZE_KEYS:
            out["sizes"][key] = v
        elif key in _SETTING_KEYS:
            out[key] = v
        else:
            known = sorted(crit_names | _SETTING_KEYS)
            raise ValueError(f"{path}: unknown key {k!r} in [tool.unitscale_fx.check]; known: {', '.join(known)}")
    try:
        Criteria.from_mapping(out["criteria"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: [tool.unitscale_fx]: {e}") from e
    if "models" in out and (not isinstance(out["models"], list) or not all(isinstance(m, str) for m in out["models"])):
        raise ValueError(f"{path}: [tool.unitscale_fx.check] models must be a list of strings")
    return out


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

_CRITERIA_FLAGS = (
    ("--min-coverage", "min_coverage", "fraction of ops that must have a scale rule (default 1.0)"),
    ("--band", "band", "the unit band is [1/BAND, BAND] (default 2)"),
    ("--min-forward", "min_forward", "min fraction of forward GEMM multiplicands in band (default 0.95)"),
    ("--min-backward", "min_backward", "min fraction of backward GEMM multiplicands in band (default 0.90)"),
    ("--min-grads", "min_grads", "min fraction of parameter gradients in band (default 0.90)"),
    ("--outer", "outer", "nothing may be outside [1/OUTER, OUTER] (default 8)"),
    ("--min-cosine", "min_cosine", "min cosine similarity with the exact gradient (default 0.9999)"),
    ("--loss-tolerance", "loss_tolerance", "max |loss/ln(classes) - 1| of cross-entropy losses (default 0.02)"),
    ("--zero-grad", "zero_grad", "gradients with RMS below this are structurally zero, not judged (default 2**-16)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``check`` options to ``parser`` (used by ``unitscale-fx check``)."""
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="zoo name or 'package.module:factory' (also 'path/to/file.py:factory')")
    parser.add_argument("--zoo", choices=("builtin", "all"), default=None,
                        help="check every built-in zoo model (or 'all': plus entry-point models); "
                             "models whose optional dependency is missing are skipped")
    parser.add_argument("--json", metavar="FILE", dest="json_file", default=None,
                        help=f"write the results as JSON (schema {SCHEMA!r}, see docs/check.md)")
    parser.add_argument("--junit", metavar="FILE", dest="junit_file", default=None,
                        help="write JUnit XML (one testcase per model)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="check models in N processes (default 1)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads per process (default 1: fastest for the check's small models, "
                             "and on shared CI runners; 0: torch's default)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                        help="an op without a scale rule makes the transform raise MissingRuleError "
                             "(default: reported, model fails coverage, the rest is still measured)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a model after this many seconds (default: no limit)")
    g = parser.add_argument_group("model sizes (default: " + ", ".join(
        f"{k}={v}" for k, v in DEFAULT_SIZES.items() if k != "device") + ")")
    for k in ("hidden", "layers", "heads", "seq", "batch", "vocab", "seed"):
        g.add_argument(f"--{k}", type=int, default=None)
    g.add_argument("--device", default=None, help="device to build and run the models on (default cpu)")
    cg = parser.add_argument_group("criteria (override [tool.unitscale_fx] in pyproject.toml)")
    for flag, dest, help_ in _CRITERIA_FLAGS:
        cg.add_argument(flag, dest=f"crit_{dest}", type=float, default=None, metavar="X", help=help_)
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="pyproject.toml to read (default: the nearest one from the current directory up)")
    parser.add_argument("--no-config", action="store_true", help="ignore pyproject.toml")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output on stderr")
    return parser


def _progress(total: int, quiet: bool):
    """(callback, context manager) showing progress on stderr: a rich bar on a terminal, one line
    per finished model otherwise."""
    import contextlib

    done = {"n": 0}
    if sys.stderr.isatty() and not quiet:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(TextColumn("[bold]check[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
        task = prog.add_task("", total=total)
        running: list[str] = []

        def cb(event: str, name: str, res: ModelCheck | None) -> None:
            if event == "start":
                running.append(name)
            else:
                if name in running:
                    running.remove(name)
                prog.advance(task)
                mark = "[green]pass[/]" if res and res.passed else ("[yellow]skip[/]" if res and res.skipped else "[red]FAIL[/]")
                prog.console.print(f"{_escape(name)}: {mark} ({res.seconds:.1f}s)" if res else name)
            prog.update(task, description=_escape(", ".join(running[-3:])))

        return cb, prog

    def cb_plain(event: str, name: str, res: ModelCheck | None) -> None:
        if quiet or event != "done" or res is None:
            return
        done["n"] += 1
        print(f"[{done['n']}/{total}] {name}: {res.status} ({res.seconds:.1f}s)", file=sys.stderr, flush=True)

    return cb_plain, contextlib.nullcontext()


def run(args: argparse.Namespace) -> int:
    """Run ``unitscale-fx check`` with parsed ``args``; returns the exit code (0: every model passed,
    1: a model failed, 2: a usage or configuration error)."""
    try:
        settings = {"criteria": {}, "sizes": {}} if getattr(args, "no_config", False) else load_settings(args.config)
        crit = Criteria.from_mapping(settings["criteria"])
        overrides = {d: getattr(args, f"crit_{d}") for _, d, _ in _CRITERIA_FLAGS
                     if getattr(args, f"crit_{d}", None) is not None}
        crit = crit.replace(**overrides) if overrides else crit
        sizes = dict(settings["sizes"])
        sizes.update({k: getattr(args, k) for k in _SIZE_KEYS if getattr(args, k, None) is not None})
        _merge_sizes(sizes)
        models: list[str] = list(args.models or [])
        skips = [False] * len(models)
        zoo_sel = args.zoo or (settings.get("zoo") if not models else None)
        if not models and not zoo_sel:
            models = list(settings.get("models") or [])
            skips = [False] * len(models)
        if zoo_sel:
            extra = [m for m in zoo_models(zoo_sel) if m not in models]
            models += extra
            skips += [True] * len(extra)
        if not models:
            print("unitscale-fx check: no model given: pass MODEL names / 'module:factory' specs, --zoo builtin, "
                  "or set models = [...] in [tool.unitscale_fx.check]", file=sys.stderr)
            return 2
        strict = bool(args.strict if args.strict is not None else settings.get("strict", False))
        workers = int(args.workers if args.workers is not None else settings.get("workers", 1))
        threads = getattr(args, "threads", None)
        threads = int(threads if threads is not None else settings.get("threads", 1))
        timeout = args.timeout if args.timeout is not None else settings.get("timeout")
        if workers < 1:
            raise ValueError("--workers must be >= 1")
        if threads < 0:
            raise ValueError("--threads must be >= 0 (0: torch's default)")
    except (ValueError, TypeError, OSError) as e:
        print(f"unitscale-fx check: {e}", file=sys.stderr)
        return 2

    cb, ctx = _progress(len(models), bool(getattr(args, "quiet", False)))
    with ctx:
        report = check_models(models, criteria=crit, sizes=sizes, strict=strict, workers=workers,
                              timeout=timeout, skip_unavailable=skips, callback=cb, threads=threads)
    report.render()
    try:
        if args.json_file:
            Path(args.json_file).write_text(report.to_json() + "\n")
        if args.junit_file:
            Path(args.junit_file).write_text(report.to_junit())
    except OSError as e:
        print(f"unitscale-fx check: cannot write a report: {e}", file=sys.stderr)
        return 2
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unitscale_fx.check [options]``: the same as ``unitscale-fx check``."""
    parser = argparse.ArgumentParser(prog="unitscale-fx check", description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    return run(args)


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------


def _first_line(s: str) -> str:
    s = s.strip()
    return s.splitlines()[0] if s else ""


def _json_float(v: float | None) -> float | str | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _fmt_rms(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _styled(text: str, ok: bool) -> str:
    return f"[{'green' if ok else 'red'}]{text}[/]"


def _pct(frac: float | None, need: float) -> str:
    if frac is None:
        return "-"
    return _styled(f"{100 * frac:.1f}%", frac >= need)


def _figures_line(m: ModelCheck) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    cos = "-" if m.min_cosine is None else f"{m.min_cosine:.6f}"
    return (f"coverage={f(m.coverage)} forward_in_band={f(m.forward_in_band)} "
            f"backward_in_band={f(m.backward_in_band)} grads_in_band={f(m.grads_in_band)} "
            f"min_cosine={cos} loss={m.loss} seconds={m.seconds:.2f}")


def _xml_safe(s: str) -> str:
    return "".join(ch for ch in s if ch in "\t\n\r" or ord(ch) >= 0x20)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    try:
        from importlib.metadata import version

        out["unitscale_fx"] = version("unitscale_fx")
    except Exception:  # noqa: BLE001
        pass
    t = sys.modules.get("torch")
    if t is not None:
        out["torch"] = getattr(t, "__version__", "?")
    return out


if __name__ == "__main__":
    from unitscale_fx.check import main as _main  # the importable module, not __main__ (spawn workers)

    sys.exit(_main())
