"""Scale annotations of a captured graph: what the analysis predicts (and, optionally, what one
training step measured) for every edge, as text, a ``rich`` tree, JSON or a plot.

    res = unitscale_fx.analyse(model, batch)          # or transform(...).result
    report = build_report(res)                        # predictions only
    report = unitscale_fx.track(model, batch)         # predictions + measurements
    print_report(report)                              # rich on a terminal, plain text otherwise
    report.to_json("scales.json")

The JSON layout is versioned (:data:`SCHEMA`) and documented in ``docs/report_schema.md``.
"""
from __future__ import annotations

import json
import math
import operator
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import sympy
import torch
import torch.fx as fx

from .analysis.evaluate import Evaluator
from .analysis.record import META_KEY, ScaleRecord, Stat

__all__ = [
    "SCHEMA", "FORMATS", "Report", "NodeReport", "StatEntry", "FactorEntry", "build_report",
    "print_report", "format_expr", "eval_expr", "band_of", "percentile", "validate",
]

#: Version tag of the JSON layout; bumped on any incompatible change.
SCHEMA = "unitscale_fx.report/1"

#: Formats of the headroom columns, in display order.
FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16")

_DIRS = ("fwd", "bwd")
_TEXT_EXPR_MAX = 48  # longest symbolic expression shown inline in the text dump
_JSON_EXPR_NODES = 400  # sympy tree nodes printed in JSON before eliding with "…"
_TEXT_EXPR_NODES = 40


# ============================================================================================
# expressions: evaluation and printing
# ============================================================================================

class _Scan:
    """Free symbols and "has a Float" of sympy expression DAGs, each distinct sub-expression visited
    once (sympy's own ``free_symbols`` / ``has`` walk the tree, exponential on shared DAGs)."""

    def __init__(self) -> None:
        self.memo: dict[int, tuple[Any, frozenset, bool]] = {}

    def __call__(self, e: Any) -> tuple[frozenset, bool]:
        memo = self.memo
        hit = memo.get(id(e))
        if hit is not None and hit[0] is e:
            return hit[1], hit[2]
        stack: list[tuple[Any, bool]] = [(e, False)]
        while stack:
            x, done = stack.pop()
            h = memo.get(id(x))
            if h is not None and h[0] is x:
                continue
            args = getattr(x, "args", ())
            if not isinstance(args, tuple):
                args = ()
            if not done:
                stack.append((x, True))
                for a in args:
                    ha = memo.get(id(a))
                    if ha is None or ha[0] is not a:
                        stack.append((a, False))
                continue
            if isinstance(x, sympy.Symbol):
                syms, flt = frozenset((x,)), False
            elif isinstance(x, sympy.Float):
                syms, flt = frozenset(), True
            else:
                syms, flt = frozenset(), False
                for a in args:
                    ha = memo[id(a)]
                    if ha[1]:
                        syms = syms | ha[1] if syms else ha[1]
                    flt = flt or ha[2]
                bound = getattr(x, "bound_symbols", None)
                if bound and not isinstance(x, sympy.Symbol):
                    syms = syms - frozenset(bound)
            memo[id(x)] = (x, syms, flt)
        h = memo[id(e)]
        return h[1], h[2]

    def symbols(self, e: Any) -> frozenset:
        return self(e)[0]


def eval_expr(expr: Any, env: Mapping[Any, float] | None = None) -> float | None:
    """Float value of a sympy expression with symbols bound by ``env`` (``None`` if not numeric)."""
    return Evaluator(env or {})(expr)


def _num(v: float, digits: int = 4) -> str:
    """A float with ``digits`` significant digits, no trailing zeros (``1.0 -> "1"``)."""
    if v is None:
        return "?"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    s = f"{v:.{digits}g}"
    if "e" in s:
        mant, exp = s.split("e")
        s = f"{mant}e{int(exp)}"
    return s


def _tree_size(e: Any, limit: int) -> int:
    n, stack = 0, [e]
    while stack:
        x = stack.pop()
        n += 1
        if n > limit:
            return n
        stack.extend(getattr(x, "args", ()))
    return n


_FN_NAMES = {"Abs": "abs", "Min": "min", "Max": "max", "ceiling": "ceil", "loggamma": "lgamma"}


class _Printer:
    """A small, readable printer: ``d_model**(-1/2)``, ``sqrt(batch*seq)``, floats to 4 digits,
    export symbols (``s72``) renamed (``batch``). ``budget`` bounds the number of sub-expressions
    printed; what is left over prints as ``…``."""

    def __init__(self, names: Mapping[str, str], budget: int | None = None, digits: int = 4,
                 scan: "_Scan | None" = None):
        self.names = dict(names)
        self.budget = budget
        self.digits = digits
        self.ordered = True
        self.scan = scan if scan is not None else _Scan()

    def __call__(self, e: Any) -> str:
        if e is None:
            return ""
        if isinstance(e, (int, float)) and not isinstance(e, bool):
            return _num(float(e), self.digits)
        try:
            e = sympy.sympify(e)
        except (sympy.SympifyError, TypeError):
            return str(e)
        if self.budget is not None:
            self.ordered = _tree_size(e, self.budget) <= self.budget
        syms, has_float = self.scan(e)
        if not syms and not e.is_Number and has_float:
            v = eval_expr(e)
            if v is not None:
                return _num(v, self.digits)
        try:
            return self._p(e)
        except RecursionError:
            return "…"

    # -- helpers
    def _take(self) -> bool:
        if self.budget is None:
            return True
        self.budget -= 1
        return self.budget >= 0

    def _paren(self, e: Any, s: str) -> str:
        if e.is_Add or e.is_Mul or e.is_Pow or (e.is_Rational and not e.is_Integer) or (
            e.is_Number and e.is_negative
        ) or isinstance(e, sympy.Float) and "e" in s:
            return f"({s})"
        return s

    def _p(self, e: Any) -> str:
        if not self._take():
            return "…"
        if e.is_Integer:
            return str(int(e))
        if e.is_Rational:
            return f"{e.p}/{e.q}"
        if e.is_Float:
            return _num(float(e), self.digits)
        if isinstance(e, sympy.NumberSymbol) or e in (sympy.oo, sympy.S.NegativeInfinity, sympy.zoo, sympy.nan):
            return str(e)
        if e.is_Symbol:
            return self.names.get(e.name, e.name)
        if e.is_Add:
            return self._add(e)
        if e.is_Mul:
            return self._mul(e)
        if e.is_Pow:
            return self._pow(e.args[0], e.args[1])
        if isinstance(e, sympy.polygamma) and e.args[0] == 0:
            return f"digamma({self._p(e.args[1])})"
        if isinstance(e, sympy.Function) or isinstance(e, sympy.Min) or isinstance(e, sympy.Max):
            name = type(e).__name__
            name = _FN_NAMES.get(name, name)
            return f"{name}({', '.join(self._p(a) for a in e.args)})"
        renamed = e.xreplace({s: sympy.Symbol(self.names[s.name]) for s in self.scan.symbols(e)
                              if isinstance(s, sympy.Symbol) and s.name in self.names})
        return sympy.sstr(renamed)

    def _add(self, e: sympy.Add) -> str:
        terms = list(e.as_ordered_terms()) if self.ordered else list(e.args)
        if any(t.is_Float for t in terms):  # inexact: fold the numeric terms into one number
            const = [t for t in terms if not self.scan.symbols(t)]
            if len(const) > 1 or (const and not const[0].is_Number):
                v = eval_expr(sympy.Add(*const))
                if v is not None:
                    terms = [t for t in terms if self.scan.symbols(t)] + ([sympy.Float(v)] if v != 0 else [])
        out = ""
        for i, t in enumerate(terms):
            neg = t.could_extract_minus_sign()
            s = self._p(-t if neg else t)
            if (-t if neg else t).is_Add:
                s = f"({s})"
            if i == 0:
                out = f"-{s}" if neg else s
            else:
                out += f" - {s}" if neg else f" + {s}"
            if out.endswith("…") and self.budget is not None and self.budget < 0:
                if i < len(terms) - 1:
                    out += " + …"
                break
        return out

    def _mul(self, e: sympy.Mul) -> str:
        coeff, factors = e.as_coeff_mul()
        factors = list(factors)
        if coeff.is_Float or any(f.is_Float for f in factors):
            # inexact: fold symbol-free factors (sqrt(2)) into the coefficient
            c = float(coeff)
            keep = []
            for f in factors:
                v = eval_expr(f) if not self.scan.symbols(f) else None
                if v is not None:
                    c *= v
                else:
                    keep.append(f)
            factors = keep
            coeff = sympy.Float(c)
        sign = ""
        if coeff.is_negative:
            sign, coeff = "-", -coeff
        num: list[str] = []
        den: list[str] = []
        if coeff != 1 and not (coeff.is_Float and abs(float(coeff) - 1) < 5e-5 and factors):
            if coeff.is_Rational and not coeff.is_Integer:
                if coeff.p != 1:
                    num.append(str(coeff.p))
                den.append(str(coeff.q))
            else:
                num.append(self._p(coeff))
        # group powers with the same non-integer exponent: sqrt(a)*sqrt(b) -> sqrt(a*b)
        by_exp: dict[Any, list[Any]] = {}
        for f in factors:
            if f.is_Pow and f.args[1].is_Rational and not f.args[1].is_Integer:
                by_exp.setdefault(f.args[1], []).append(f.args[0])
            elif f.is_Pow and f.args[1].is_Integer and f.args[1] < 0:
                den.append(self._pow(f.args[0], -f.args[1]) if f.args[1] != -1 else self._paren(f.args[0], self._p(f.args[0])))
            else:
                num.append(self._paren(f, self._p(f)) if f.is_Add else self._p(f))
        for x, bases in by_exp.items():
            if len(bases) == 1:
                num.append(self._pow(bases[0], x))
                continue
            inner = "*".join(sorted(self._paren(b, self._p(b)) if b.is_Add else self._p(b) for b in bases))
            num.append(f"sqrt({inner})" if x == sympy.Rational(1, 2) else f"({inner})**({x.p}/{x.q})")
        lead = num[:1] if num and num[0] and (num[0][0].isdigit() or num[0].startswith("(")) and coeff != 1 else []
        num = lead + sorted(num[len(lead):])
        s = "*".join(num) if num else "1"
        if den:
            s += "/" + (den[0] if len(den) == 1 else "(" + "*".join(den) + ")")
        return sign + s

    def _pow(self, b: Any, x: Any) -> str:
        bs = self._p(b)
        if x == sympy.Rational(1, 2):
            return f"sqrt({bs})"
        if x == -1:
            return f"1/{self._paren(b, bs)}"
        if x.is_Integer and x > 0:
            return f"{self._paren(b, bs)}**{int(x)}"
        if x.is_Rational:
            return f"{self._paren(b, bs)}**({x.p}/{x.q})"
        xs = self._p(x)
        return f"{self._paren(b, bs)}**{self._paren(x, xs)}"


def format_expr(expr: Any, names: Mapping[Any, Any] | None = None, *, max_nodes: int | None = None) -> str:
    """Readable text of a scale expression.

    ``names`` maps export symbols (``s72`` or the symbol) to readable names (``batch``); floats are
    shown with 4 significant digits; ``max_nodes`` bounds the work and the length (``…`` elides).
    """
    nm = {str(k): str(v) for k, v in (names or {}).items()}
    return _Printer(nm, max_nodes)(expr)


def band_of(sigma: float | None) -> str | None:
    """``"green"`` within [1/2, 2], ``"yellow"`` within [1/8, 8], ``"red"`` outside (or inf/nan)."""
    if sigma is None:
        return None
    if not math.isfinite(sigma) or sigma <= 0:
        return "red" if sigma != 0 else "red"
    a = abs(math.log2(sigma))
    return "green" if a <= 1 else ("yellow" if a <= 3 else "red")


# ============================================================================================
# the report
# ============================================================================================


_CONSTANTS = {"pi", "E", "oo", "zoo", "nan", "inf", "I", "EulerGamma"}


def _has_symbol(expr: str | None) -> bool:
    """Whether a printed expression names a symbol (an identifier that is not a function call)."""
    if not expr:
        return False
    for m in re.finditer(r"(?<![0-9.A-Za-z_])([A-Za-z_][A-Za-z_0-9]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1) not in _CONSTANTS:
            return True
    return False


@dataclass
class StatEntry:
    """One direction (value or gradient) of one edge."""

    expr: str | None = None
    predicted: float | None = None
    measured: float | None = None
    symbolic: bool = False

    def value(self) -> float | None:
        """The measured RMS if there is one, else the predicted one."""
        return self.measured if self.measured is not None else self.predicted

    def to_dict(self) -> dict[str, Any]:
        return {"expr": self.expr, "predicted": _jf(self.predicted), "measured": _jf(self.measured)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "StatEntry | None":
        if d is None:
            return None
        expr = d.get("expr")
        return cls(expr, _unjf(d.get("predicted")), _unjf(d.get("measured")), _has_symbol(expr))


@dataclass
class FactorEntry:
    """A scale factor inserted by the transform."""

    expr: str
    value: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"expr": self.expr, "value": _jf(self.value)}


@dataclass
class NodeReport:
    """Scale annotations of one graph node (see ``docs/report_schema.md``)."""

    index: int
    name: str
    op: str
    kind: str
    module: str
    shape: list[str] | None
    dtype: str | None
    call: str
    fwd: StatEntry | None
    bwd: StatEntry | None
    factors: dict[str, FactorEntry] = field(default_factory=dict)
    rule: str | None = None
    role: str | None = None
    missing: bool = False
    note: str = ""
    source: str | None = None
    headroom: dict[str, dict[str, dict[str, float]]] | None = None
    nonfinite: dict[str, float] | None = None
    outputs: list[dict[str, Any]] | None = None
    module_stack: list[str] = field(default_factory=list, repr=False)

    @property
    def is_edge(self) -> bool:
        """A floating value that the scale plot / summary count (not a scale-factor computation)."""
        return self.kind in ("activation", "input", "parameter") and self.fwd is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "op": self.op,
            "kind": self.kind,
            "module": self.module,
            "shape": self.shape,
            "dtype": self.dtype,
            "call": self.call,
            "fwd": self.fwd.to_dict() if self.fwd is not None else None,
            "bwd": self.bwd.to_dict() if self.bwd is not None else None,
            "factors": {k: v.to_dict() for k, v in self.factors.items()},
            "rule": self.rule,
            "role": self.role,
            "missing": self.missing,
            "note": self.note,
            "source": self.source,
            "headroom": self.headroom,
            "nonfinite": self.nonfinite,
            "module_stack": list(self.module_stack),
        }
        if self.outputs is not None:
            d["outputs"] = self.outputs
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NodeReport":
        return cls(
            index=int(d["index"]), name=d["name"], op=d["op"], kind=d["kind"], module=d["module"],
            shape=d.get("shape"), dtype=d.get("dtype"), call=d.get("call", ""),
            fwd=StatEntry.from_dict(d.get("fwd")), bwd=StatEntry.from_dict(d.get("bwd")),
            factors={k: FactorEntry(v["expr"], _unjf(v["value"])) for k, v in (d.get("factors") or {}).items()},
            rule=d.get("rule"), role=d.get("role"), missing=bool(d.get("missing")), note=d.get("note") or "",
            source=d.get("source"), headroom=d.get("headroom"), nonfinite=d.get("nonfinite"),
            outputs=d.get("outputs"),
            module_stack=list(d.get("module_stack") or ([d["module"]] if d["module"] else [])),
        )


def _jf(v: float | None) -> float | str | None:
    if v is None:
        return None
    v = float(v)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _unjf(v: Any) -> float | None:
    if v is None:
        return None
    return float(v)


@dataclass
class Report:
    """Predicted (and measured) scales of every edge of one graph.

    Attributes:
        model: the model's name (its class).
        graph: ``"original"`` or ``"transformed"``.
        symbols: readable shape symbols and their values (``{"batch": 4, "seq": 128}``).
        nodes: one :class:`NodeReport` per node that carries a scale, in graph order.
        measured: whether a training step filled in ``measured`` values.
    """

    model: str
    graph: str
    symbols: dict[str, int]
    nodes: list[NodeReport]
    measured: bool = False

    # ---------------------------------------------------------------------------- access
    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> NodeReport:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in this report")

    def edges(self, kinds: Iterable[str] = ("activation",)) -> list[NodeReport]:
        """Floating edges of these kinds, in graph order."""
        ks = set(kinds)
        return [n for n in self.nodes if n.kind in ks and n.fwd is not None]

    @property
    def missing(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.missing]

    def worst(self, n: int = 10, kinds: Iterable[str] = ("activation", "parameter")) -> list[tuple[NodeReport, str, float]]:
        """The ``n`` edges farthest from unit scale: ``(node, "fwd"|"bwd", sigma)`` by ``|log2 sigma|``.

        Uses the measured RMS where there is one; zero-valued tensors (zero-initialised biases)
        are skipped, NaN/inf come first.
        """
        rows = []
        for node in self.edges(kinds):
            for d in _DIRS:
                st = getattr(node, d)
                v = st.value() if st is not None else None
                if v is None or v == 0:
                    continue
                rows.append((node, d, v))
        rows.sort(key=lambda r: -_abs_log2(r[2]))
        return rows[:n]

    def summary(self) -> dict[str, Any]:
        """The ``summary`` object of the JSON (counts, band fractions, worst edges, missing ops)."""
        acts = self.edges()
        out: dict[str, Any] = {
            "nodes": len(self.nodes),
            "edges": {d: sum(1 for n in acts if getattr(n, d) is not None) for d in _DIRS},
            "missing": [{"node": n.name, "op": n.op, "source": n.source} for n in self.missing],
            "inserted": {
                "scales": sum(1 for n in self.nodes if n.role is not None and "fwd" in n.factors),
                "grad_scales": sum(1 for n in self.nodes if n.op == "grad_scale"),
            },
            "in_band": {},
            "max_abs_log2": {},
            "worst": [
                {"node": n.name, "module": n.module, "dir": d, "sigma": _jf(v), "abs_log2": _jf(_abs_log2(v))}
                for n, d, v in self.worst(10)
            ],
        }
        for d in _DIRS:
            entry: dict[str, Any] = {}
            mx: dict[str, Any] = {}
            for src in ("predicted", "measured"):
                vals = [getattr(getattr(n, d), src) for n in acts if getattr(n, d) is not None]
                vals = [v for v in vals if v is not None and v != 0]
                entry[src] = (sum(1 for v in vals if band_of(v) == "green") / len(vals)) if vals else None
                mx[src] = _jf(max((_abs_log2(v) for v in vals), default=None)) if vals else None
            out["in_band"][d] = entry
            out["max_abs_log2"][d] = mx
        if self.measured:
            pe = self.prediction_errors()
            allv = [v for d in _DIRS for _, v in pe[d]["errors"]]
            out["prediction_error"] = {**_error_stats(allv), **{d: {**_error_stats([v for _, v in pe[d]["errors"]]),
                                                                    "unpredicted": len(pe[d]["unpredicted"])}
                                                                for d in _DIRS}}
            worst_fmt: dict[str, dict[str, Any]] = {}
            for fmt in FORMATS:
                w: dict[str, Any] = {"underflow": 0.0, "overflow": 0.0, "underflow_edge": None, "overflow_edge": None}
                for n in self.nodes:
                    for d in _DIRS:
                        h = ((n.headroom or {}).get(d) or {}).get(fmt)
                        for k in ("underflow", "overflow") if h else ():
                            if h[k] > w[k]:
                                w[k], w[f"{k}_edge"] = h[k], f"{n.name}.{d}"
                worst_fmt[fmt] = w
            out["headroom"] = worst_fmt
        return out

    def prediction_errors(self, kinds: Iterable[str] = ("activation",)) -> dict[str, dict[str, list]]:
        """How far the predictions are from the measurements, per direction.

        Returns ``{"fwd"|"bwd": {"errors": [(edge, |log2(measured / predicted)|)], "unpredicted":
        [edge]}}`` over the floating edges of these kinds (the outputs of multi-output nodes are
        edges ``name[i]``). An edge counts when it was measured with a finite RMS; predicted and
        measured both zero is skipped (exact, e.g. a zero bias), exactly one of them zero is an
        infinite error; no (or a non-numeric) prediction is ``unpredicted``.
        """
        ks = set(kinds)
        out: dict[str, dict[str, list]] = {d: {"errors": [], "unpredicted": []} for d in _DIRS}

        def add(name: str, d: str, pred: float | None, meas: float | None) -> None:
            if meas is None or not math.isfinite(meas):
                return
            if pred is None or not math.isfinite(pred):
                out[d]["unpredicted"].append(name)
                return
            if pred == 0 and meas == 0:
                return
            if pred <= 0 or meas <= 0:
                out[d]["errors"].append((name, math.inf))
                return
            out[d]["errors"].append((name, abs(math.log2(meas / pred))))

        for n in self.nodes:
            if n.kind not in ks:
                continue
            if n.outputs is not None and n.fwd is None:
                for i, o in enumerate(n.outputs):
                    for d in _DIRS:
                        st = StatEntry.from_dict(o.get(d))
                        if st is not None:
                            add(f"{n.name}[{i}]", d, st.predicted, st.measured)
                continue
            for d in _DIRS:
                st = getattr(n, d)
                if st is not None:
                    add(n.name, d, st.predicted, st.measured)
        return out

    # ---------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "graph": self.graph,
            "measured": self.measured,
            "symbols": dict(self.symbols),
            "nodes": [n.to_dict() for n in self.nodes],
            "summary": self.summary(),
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int | None = 1) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Report":
        schema = d.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"unsupported report schema {schema!r} (this version reads {SCHEMA!r})")
        validate(d)
        return cls(model=d["model"], graph=d["graph"], symbols=dict(d.get("symbols") or {}),
                   nodes=[NodeReport.from_dict(n) for n in d["nodes"]], measured=bool(d.get("measured")))

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "Report":
        s = str(text_or_path)
        if not s.lstrip().startswith("{") and os.path.exists(s):
            with open(s, encoding="utf-8") as f:
                s = f.read()
        return cls.from_dict(json.loads(s))

    # ---------------------------------------------------------------------------- text
    def to_text(self, *, source: bool = False, headroom: bool = True) -> str:
        """Plain-text dump grouped under module paths (deterministic: golden-testable).

        Args:
            source: add the user's source line under every op.
            headroom: on a measured report, add a line under each node with the fraction of its value
                (fwd) and gradient (bwd) that FP8 E4M3 / E5M2, FP16, BF16 would flush to zero (↓) or
                overflow (↑); formats that lose nothing are left out.
        """
        lines = [f"unitscale_fx report: {self.model} ({self.graph} graph"
                 + (", measured)" if self.measured else ", predicted)")]
        if self.symbols:
            lines.append("symbols: " + ", ".join(f"{k}={v}" for k, v in self.symbols.items()))
        lines += _legend(self)
        leaves = [n for n in self.nodes if n.kind in ("input", "parameter")]
        if leaves:
            lines.append("")
            lines.append("inputs and parameters")
            namew = max(len(n.name) for n in leaves)
            for n in leaves:
                lines.append(("  " + n.name.ljust(namew) + "  " + _shape_str(n.shape).ljust(16)
                              + "  " + _stats_text(n, self.measured)).rstrip())
                h = _headroom_text(n) if headroom and self.measured else ""
                if h:
                    lines.append("  " + " " * namew + "  lost " + h)
        lines.append("")
        lines.append("graph")
        open_stack: list[str] = []
        for n in self.nodes:
            if n.kind in ("input", "parameter", "scale_value"):
                continue
            stack = n.module_stack
            common = 0
            while common < min(len(stack), len(open_stack)) and stack[common] == open_stack[common]:
                common += 1
            for depth in range(common, len(stack)):
                lines.append("  " * (depth + 1) + stack[depth])
            open_stack = list(stack)
            ind = "  " * (len(stack) + 1)
            head = f"{n.name} = {n.call}"
            if n.role:
                head += f"  <{n.role}>"
            lines.append((f"{ind}{head}  {_shape_str(n.shape)}  {_stats_text(n, self.measured)}").rstrip())
            if n.missing:
                why = f": {n.note}" if n.note else ""
                lines.append(f"{ind}  !! no scale rule for {n.op}{why}")
                if n.source:
                    lines.append(f"{ind}     at {n.source}")
            elif source and n.source:
                lines.append(f"{ind}  at {n.source}")
            if headroom and self.measured:
                h = _headroom_text(n)
                if h:
                    lines.append(f"{ind}  lost {h}")
        lines.append("")
        lines += _summary_text(self)
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_text()

    # ---------------------------------------------------------------------------- rich
    def to_rich(self, *, worst: int = 10, source: bool = False):
        """A ``rich`` renderable: a tree by module, σ coloured by distance from 1
        (green within [1/2, 2], yellow within [1/8, 8], red outside), and a "worst edges" table."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        from rich.tree import Tree

        title = Text.assemble((f"{self.model}", "bold"), f"  {self.graph} graph",
                              ("  (measured)" if self.measured else "  (predicted)", "dim"))
        if self.symbols:
            title.append("   " + ", ".join(f"{k}={v}" for k, v in self.symbols.items()), style="dim")
        root = Tree(title)
        leaves = [n for n in self.nodes if n.kind in ("input", "parameter")]
        if leaves:
            branch = root.add(Text("inputs and parameters", style="bold blue"))
            for n in leaves:
                branch.add(_rich_line(n, self.measured))
        graph = root.add(Text("graph", style="bold blue"))
        trees: list[tuple[str, Any]] = []
        for n in self.nodes:
            if n.kind in ("input", "parameter", "scale_value"):
                continue
            stack = n.module_stack
            common = 0
            while common < min(len(stack), len(trees)) and stack[common] == trees[common][0]:
                common += 1
            trees = trees[:common]
            for depth in range(common, len(stack)):
                parent = trees[-1][1] if trees else graph
                trees.append((stack[depth], parent.add(Text(stack[depth], style="bold"))))
            line = _rich_line(n, self.measured)
            if source and n.source:
                line.append(f"\n  at {n.source}", style="dim italic")
            (trees[-1][1] if trees else graph).add(line)
        table = Table(title="worst edges (farthest from unit scale)", title_justify="left")
        for col, just in (("node", "left"), ("module", "left"), ("dir", "left"), ("predicted σ", "right"),
                          ("measured σ", "right"), ("|log2 σ|", "right")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for node, d, v in self.worst(worst):
            st = getattr(node, d)
            table.add_row(node.name, node.module or "(root)", d, _num(st.predicted) if st.predicted is not None else "-",
                          _num(st.measured) if st.measured is not None else "-",
                          Text(_num(_abs_log2(v), 3), style=band_of(v) or ""))
        parts: list[Any] = [root, table]
        if self.missing:
            t = Text(f"{len(self.missing)} op(s) without a scale rule: ", style="bold red")
            t.append(", ".join(f"{n.name} ({n.op})" for n in self.missing))
            parts.append(t)
        return Group(*parts)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated (numpy's default)."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi or v[hi] == v[lo]:
        return v[lo]
    if math.isinf(v[hi]):
        return math.inf
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _error_stats(errs: list[float]) -> dict[str, Any]:
    return {
        "edges": len(errs),
        "median_abs_log2": _jf(percentile(errs, 50)),
        "p90_abs_log2": _jf(percentile(errs, 90)),
        "max_abs_log2": _jf(max(errs)) if errs else None,
    }


_NUMBER = (int, float)
_NODE_FIELDS: dict[str, tuple[type, ...]] = {
    "index": (int,), "name": (str,), "op": (str,), "kind": (str,), "module": (str,),
    "shape": (list, type(None)), "dtype": (str, type(None)), "call": (str,), "fwd": (dict, type(None)),
    "bwd": (dict, type(None)), "factors": (dict,), "rule": (str, type(None)), "role": (str, type(None)),
    "missing": (bool,), "note": (str,), "source": (str, type(None)), "headroom": (dict, type(None)),
    "nonfinite": (dict, type(None)), "module_stack": (list,),
}
_KINDS = ("input", "parameter", "activation", "scale_value")


def _is_num(v: Any, nullable: bool = True) -> bool:
    if v is None:
        return nullable
    if isinstance(v, bool):
        return False
    return isinstance(v, _NUMBER) or v in ("nan", "inf", "-inf")


def validate(d: Mapping[str, Any]) -> None:
    """Check that ``d`` (a parsed report JSON) follows :data:`SCHEMA`; raise ``ValueError`` naming
    the first offending field. The layout is documented in ``docs/report_schema.md``.

    Every documented key must be there with its type; keys this version does not know are accepted
    (within a schema version keys are only ever added, so a newer writer's file still validates)."""

    def fail(where: str, why: str) -> None:
        raise ValueError(f"report JSON, {where}: {why}")

    if not isinstance(d, Mapping):
        fail("top level", f"expected an object, got {type(d).__name__}")
    if d.get("schema") != SCHEMA:
        fail("schema", f"unsupported {d.get('schema')!r} (this version reads {SCHEMA!r})")
    for key, t in (("model", str), ("graph", str), ("measured", bool), ("symbols", dict), ("nodes", list),
                   ("summary", dict)):
        if not isinstance(d.get(key), t):
            fail(key, f"expected {t.__name__}, got {type(d.get(key)).__name__}")
    if d["graph"] not in ("original", "transformed"):
        fail("graph", f"{d['graph']!r} is neither 'original' nor 'transformed'")
    for k, v in d["symbols"].items():
        if not isinstance(v, int) or isinstance(v, bool):
            fail(f"symbols.{k}", "expected an integer")
    names: set[str] = set()

    def stat(where: str, st: Any) -> None:
        if st is None:
            return
        if not isinstance(st, Mapping) or not {"expr", "predicted", "measured"} <= set(st):
            fail(where, 'expected {"expr", "predicted", "measured"}')
        if not isinstance(st["expr"], (str, type(None))):
            fail(f"{where}.expr", "expected a string or null")
        for k in ("predicted", "measured"):
            if not _is_num(st[k]):
                fail(f"{where}.{k}", f"expected a number, 'nan', 'inf' or null, got {st[k]!r}")
        if st["measured"] is not None and not d["measured"]:
            fail(f"{where}.measured", "a measured value in a report with measured = false")

    for i, n in enumerate(d["nodes"]):
        where = f"nodes[{i}]"
        if not isinstance(n, Mapping):
            fail(where, "expected an object")
        missing = set(_NODE_FIELDS) - set(n)
        if missing:
            fail(where, f"missing fields {sorted(missing)}")
        # keys are only ever added within a schema version: unknown ones are a newer writer's
        where = f"nodes[{i}] ({n['name']})"
        for k, t in _NODE_FIELDS.items():
            if not isinstance(n[k], t) or (k == "index" and isinstance(n[k], bool)):
                fail(f"{where}.{k}", f"expected {' or '.join(x.__name__ for x in t)}, got {type(n[k]).__name__}")
        if n["index"] != i:
            fail(f"{where}.index", f"expected {i}")
        if n["name"] in names:
            fail(f"{where}.name", "duplicate node name")
        names.add(n["name"])
        if n["kind"] not in _KINDS:
            fail(f"{where}.kind", f"{n['kind']!r} is not one of {_KINDS}")
        if n["shape"] is not None and not all(isinstance(x, str) for x in n["shape"]):
            fail(f"{where}.shape", "expected a list of strings")
        stat(f"{where}.fwd", n["fwd"])
        stat(f"{where}.bwd", n["bwd"])
        for k, f in n["factors"].items():
            if not isinstance(f, Mapping) or not {"expr", "value"} <= set(f):
                fail(f"{where}.factors.{k}", 'expected {"expr", "value"}')
            if not isinstance(f["expr"], str) or not _is_num(f["value"]):
                fail(f"{where}.factors.{k}", "expected a string expr and a numeric (or null) value")
        if n["headroom"] is not None:
            if not d["measured"]:
                fail(f"{where}.headroom", "headroom in a report with measured = false")
            for direction, fmts in n["headroom"].items():
                if direction not in _DIRS or not isinstance(fmts, Mapping) or not set(FORMATS) <= set(fmts):
                    fail(f"{where}.headroom.{direction}", f"expected fwd/bwd with formats {FORMATS}")
                for fmt in FORMATS:
                    h = fmts[fmt]
                    if not isinstance(h, Mapping) or not {"underflow", "overflow"} <= set(h) or not all(
                            _is_num(h[k], False) and 0.0 <= float(h[k]) <= 1.0 for k in ("underflow", "overflow")):
                        fail(f"{where}.headroom.{direction}.{fmt}", "expected underflow/overflow fractions in [0, 1]")
        for j, o in enumerate(n.get("outputs") or ()):
            if not isinstance(o, Mapping) or not {"shape", "fwd", "bwd"} <= set(o):
                fail(f"{where}.outputs[{j}]", 'expected {"shape", "fwd", "bwd"}')
            stat(f"{where}.outputs[{j}].fwd", o["fwd"])
            stat(f"{where}.outputs[{j}].bwd", o["bwd"])
    s = d["summary"]
    for key in ("nodes", "edges", "missing", "inserted", "in_band", "max_abs_log2", "worst"):
        if key not in s:
            fail("summary", f"missing {key!r}")
    if s["nodes"] != len(d["nodes"]):
        fail("summary.nodes", "does not match the number of nodes")
    for key in ("headroom", "prediction_error"):
        if (key in s) != d["measured"]:
            fail(f"summary.{key}", "present exactly when measured is true")


def _abs_log2(v: float) -> float:
    if v is None or not math.isfinite(v):
        return math.inf
    if v <= 0:
        return math.inf
    return abs(math.log2(v))


def _pct(frac: float) -> str:
    v = 100 * frac
    return "0%" if v == 0 else (f"{v:.3g}%" if v >= 0.01 else "<0.01%")


def _shape_str(shape: list[str] | None) -> str:
    return "[" + ", ".join(shape) + "]" if shape is not None else ""


def _stat_text(label: str, st: StatEntry | None, factor: FactorEntry | None, measured: bool,
               nonfinite: float | None = None) -> str:
    if st is None:
        return ""
    if st.predicted is None and st.expr is None:
        s = f"{label} σ = ?"
    elif st.symbolic and st.expr is not None and len(st.expr) <= _TEXT_EXPR_MAX and "…" not in st.expr:
        s = f"{label} σ = {st.expr} ≈ {_num(st.predicted)}" if st.predicted is not None else f"{label} σ = {st.expr}"
    else:
        s = f"{label} σ = {_num(st.predicted)}" if st.predicted is not None else f"{label} σ = ?"
    if measured:
        nf = f", {_pct(nonfinite)} inf/nan" if nonfinite else ""
        s += f" [{_num(st.measured)}{nf}]" if st.measured is not None else " [-]"
    if factor is not None:
        s += f" (× {_factor_text(factor)})"
    return s


def _factor_text(f: FactorEntry) -> str:
    if f.expr and len(f.expr) <= _TEXT_EXPR_MAX and "…" not in f.expr:
        if f.value is not None and _num(f.value) != f.expr and re.search(r"[A-Za-z]", f.expr):
            return f"{f.expr} ≈ {_num(f.value)}"
        return f.expr
    return _num(f.value) if f.value is not None else "?"


def _stats_text(n: NodeReport, measured: bool) -> str:
    parts = []
    if n.outputs is not None and n.fwd is None:
        vals = [o.get("fwd") or {} for o in n.outputs]
        parts.append("fwd σ = (" + ", ".join(_num(_unjf(v.get("predicted"))) if v.get("predicted") is not None
                                              else "?" for v in vals) + ")")
    for d in _DIRS:
        s = _stat_text(d, getattr(n, d), n.factors.get(d), measured, (n.nonfinite or {}).get(d))
        if s:
            parts.append(s)
        elif d in n.factors:
            parts.append(f"{d} (× {_factor_text(n.factors[d])})")
    if "grad" in n.factors:
        parts.append(f"grad × {_factor_text(n.factors['grad'])}")
    return "   ".join(parts)


_FMT_SHORT = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2", "fp16": "fp16", "bf16": "bf16"}


def _headroom_parts(n: NodeReport) -> list[tuple[str, list[tuple[str, float]]]]:
    """``[(dir, [(label, fraction), ...]), ...]``: the non-zero losses of one node, per direction."""
    out = []
    for d in _DIRS:
        h = (n.headroom or {}).get(d)
        if not h:
            continue
        items = []
        for fmt in FORMATS:
            e = h.get(fmt) or {}
            if e.get("underflow"):
                items.append((f"{_FMT_SHORT[fmt]} ↓", e["underflow"]))
            if e.get("overflow"):
                items.append((f"{_FMT_SHORT[fmt]} ↑", e["overflow"]))
        if items:
            out.append((d, items))
    return out


def _headroom_text(n: NodeReport) -> str:
    """``fwd: e4m3 ↓0.08%; bwd: e4m3 ↓12%, e5m2 ↓0.01%`` (empty when nothing is lost)."""
    return "; ".join(f"{d}: " + ", ".join(f"{lab}{_pct(v)}" for lab, v in items)
                     for d, items in _headroom_parts(n))


def _legend(r: Report) -> list[str]:
    lines = ["σ = predicted RMS" + (" [measured RMS]" if r.measured else "")
             + " of the node's value (fwd) and of the gradient computed at its output (bwd)"]
    if r.graph == "transformed" or any(n.factors for n in r.nodes):
        lines.append("(× f) on fwd: scale the transform applies to the value; on bwd: computed gradient / true "
                     "gradient; grad × f: what a grad_scale multiplies the gradient by")
    if r.measured:
        lines.append("lost: fraction of the value / gradient flushed to zero (↓) or overflowing (↑) in "
                     "FP8 E4M3, FP8 E5M2, FP16, BF16")
    return lines


def _summary_text(r: Report) -> list[str]:
    s = r.summary()
    lines = ["summary"]
    lines.append(f"  nodes: {s['nodes']}, activation edges: fwd {s['edges']['fwd']}, bwd {s['edges']['bwd']}")
    ins = s["inserted"]
    if r.graph == "transformed" or ins["scales"] or ins["grad_scales"]:
        lines.append(f"  inserted by the transform: {ins['scales']} forward scales, {ins['grad_scales']} grad_scale")
    for d in _DIRS:
        b = s["in_band"][d]
        parts = []
        for src in ("predicted", "measured"):
            if b[src] is not None:
                parts.append(f"{src} {100 * b[src]:.0f}%")
        if parts:
            lines.append(f"  {d} edges with σ in [1/2, 2]: " + ", ".join(parts))
    if s["worst"]:
        lines.append("  worst edges: " + ", ".join(f"{w['node']}.{w['dir']} σ={_num(_unjf(w['sigma']))}"
                                                for w in s["worst"][:5]))
    if "prediction_error" in s and s["prediction_error"]["edges"]:
        lines.append("  |log2(measured / predicted)|:")
        for d in _DIRS:
            pe = s["prediction_error"][d]
            if not pe["edges"] and not pe["unpredicted"]:
                continue
            unp = f", {pe['unpredicted']} not predicted" if pe["unpredicted"] else ""
            lines.append(f"    {d}: median {_num(_unjf(pe['median_abs_log2']), 2)}, "
                         f"p90 {_num(_unjf(pe['p90_abs_log2']), 2)}, max {_num(_unjf(pe['max_abs_log2']), 2)} "
                         f"over {pe['edges']} edges{unp}")
    if "headroom" in s:
        hs = []
        for fmt, h in s["headroom"].items():
            parts = []
            for k, arrow in (("underflow", "↓"), ("overflow", "↑")):
                edge = f" ({h[k + '_edge']})" if h.get(k + "_edge") else ""
                parts.append(f"{arrow}{_pct(h[k])}{edge}")
            hs.append(f"    {fmt}: " + " ".join(parts))
        lines.append("  worst loss of one tensor (flushed to zero ↓ / overflow ↑):")
        lines += hs
    if s["missing"]:
        lines.append(f"  ops without a scale rule ({len(s['missing'])}): "
                     + ", ".join(f"{m['node']} ({m['op']})" for m in s["missing"]))
    else:
        lines.append("  every op has a scale rule")
    return lines


def _rich_line(n: NodeReport, measured: bool):
    from rich.text import Text

    t = Text()
    t.append(n.name, style="cyan")
    if n.kind not in ("input", "parameter"):
        t.append(" = ")
        t.append(n.call if len(n.call) <= 60 else n.call[:59] + "…", style="dim")
    if n.role:
        t.append(f" <{n.role}>", style="magenta")
    if n.shape is not None:
        t.append("  " + _shape_str(n.shape), style="dim")
    for d in _DIRS:
        st = getattr(n, d)
        if st is None:
            continue
        v = st.value()
        t.append(f"  {d} σ=")
        t.append(_num(st.predicted) if st.predicted is not None else "?",
                 style=band_of(st.predicted) or "" if st.measured is None else "")
        if measured:
            t.append(" [")
            t.append(_num(st.measured) if st.measured is not None else "-", style=band_of(st.measured) or "")
            t.append("]")
        f = n.factors.get(d)
        if f is not None:
            t.append(f" (× {_factor_text(f)})", style="dim")
        _ = v
    if "grad" in n.factors:
        t.append(f"  grad × {_factor_text(n.factors['grad'])}", style="dim")
    if n.missing:
        t.append("  no scale rule", style="bold red")
    if measured:
        parts = _headroom_parts(n)
        if parts:
            t.append("  lost", style="dim")
            for d, items in parts:
                t.append(f" {d}:", style="dim")
                for lab, v in items:
                    t.append(f" {lab}{_pct(v)}", style="red" if v >= 0.1 else ("yellow" if v >= 0.01 else "dim"))
    return t


def print_report(report: Report, file: Any = None, *, source: bool = False) -> None:
    """Print ``report``: a ``rich`` tree when ``file`` (default stdout) is a terminal, else plain text
    (``source``: with the user's source line under every op)."""
    stream = file if file is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from rich.console import Console

        Console(file=stream).print(report.to_rich(source=source))
        return
    text = report.to_text(source=source)
    try:
        stream.write(text)
    except UnicodeEncodeError:
        enc = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(enc, "replace").decode(enc))
    if hasattr(stream, "flush"):
        stream.flush()


# ============================================================================================
# building
# ============================================================================================


def _computes_scale(node: fx.Node) -> bool:
    """A scale value evaluated in Python (``unitscale_fx::size_scale(s)``) or one picked from them."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    ns = getattr(node.target, "namespace", None)
    return ns == "unitscale_fx" and "size_scale" in str(node.target)


def _op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "get_attr"
    if node.op == "call_module":
        return f"module:{node.target}"
    if node.op == "call_method":
        return f"method:{node.target}"
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        name = t._schema.name.split("::", 1)[-1]
        return f"{t.namespace}.{name}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"aten.{t.__name__}"
    if t is operator.getitem:
        return "getitem"
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", None) or str(t)
    if mod.startswith("unitscale_fx"):
        return name
    if mod in ("_operator", "operator"):
        return name
    return f"{mod.rsplit('.', 1)[-1]}.{name}" if mod else name


def _arg_text(a: Any, depth: int = 0, sym: Any = None) -> str:
    if isinstance(a, fx.Node):
        if sym is not None:  # a shape read (sym_size_int_3): shown as its symbol (seq)
            v = a.meta.get("val")
            if isinstance(v, torch.SymInt):
                s = sym(v.node.expr)
                if s:
                    return s
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg_text(x, depth + 1, sym) for x in a[:6]) + (", …" if len(a) > 6 else "")
        return f"[{inner}]"
    if isinstance(a, float):
        return _num(a)
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, torch.device):
        return repr(str(a))
    if isinstance(a, (torch.SymInt, torch.SymFloat)):
        return str(a)
    s = repr(a)
    return s if len(s) <= 24 else s[:23] + "…"


def _call_text(node: fx.Node, op: str, sym: Any = None) -> str:
    if node.op in ("placeholder", "get_attr"):
        return str(node.target)
    args = [_arg_text(a, 0, sym) for a in node.args]
    args += [f"{k}={_arg_text(v, 0, sym)}" for k, v in node.kwargs.items()]
    s = f"{op}({', '.join(args)})"
    return s if len(s) <= 96 else s[:95] + "…"


def _clean_path(path: str) -> str:
    p = str(path)
    for pre in ("L['self'].", "L['self']", "L__self__."):
        if p.startswith(pre):
            p = p[len(pre):]
    p = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", p)
    p = p.replace("getattr(", "").replace(")", "")
    return p.strip(".")


def _module_stack(node: fx.Node) -> list[str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    out = []
    for key, val in stack.items():
        path = val[0] if isinstance(val, (tuple, list)) and val else key
        if str(key).startswith("_empty") or str(path).startswith("_empty"):
            continue
        p = _clean_path(path)
        if p and (not out or out[-1] != p):
            out.append(p)
    return out


def _root_class(gm: fx.GraphModule) -> str | None:
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, val in stack.items():
            path = val[0] if isinstance(val, (tuple, list)) and val else key
            if _clean_path(path) == "" and isinstance(val, (tuple, list)) and len(val) > 1:
                t = val[1]
                name = t if isinstance(t, str) else getattr(t, "__qualname__", str(t))
                return str(name).rsplit(".", 1)[-1]
    return None


def _is_library_frame(path: str) -> bool:
    p = path.replace("\\", "/")
    if "/torch/" in p or p.startswith("<"):
        return True
    return "/unitscale_fx/" in p and "/unitscale_fx/zoo/" not in p  # the zoo's models are user code


def _source(node: fx.Node) -> str | None:
    """``file.py:LINE  code`` of the innermost frame of the model's own code that made ``node``."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in str(trace).strip().splitlines()]
    frames = [(i, m) for i, ln in enumerate(lines) if (m := re.match(r'File "([^"]+)", line (\d+)', ln))]
    if not frames:
        return None
    pick = next(((i, m) for i, m in reversed(frames) if not _is_library_frame(m.group(1))), frames[-1])
    i, m = pick
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith('File "') else ""
    return f"{os.path.basename(m.group(1))}:{m.group(2)}  {code}".strip()


class _Builder:
    def __init__(self, result: Any, measured: Mapping[str, Any] | None, hints: Mapping[Any, int] | None):
        self.result = result
        cap = result.capture
        ga = result.analysis
        env: dict[Any, float] = {}
        env.update({k: float(v) for k, v in (getattr(ga, "symbol_hints", None) or {}).items()})
        env.update({k: float(v) for k, v in (cap.hints or {}).items()})
        env.update({k: float(v) for k, v in (hints or {}).items()})
        self.ev = Evaluator(env)
        self.scan = _Scan()
        self.names = {str(k): str(v) for k, v in (cap.symbol_names or {}).items()}
        self.symbols: dict[str, int] = {}
        for k, v in sorted((cap.hints or {}).items(), key=lambda kv: str(self.names.get(str(kv[0]), kv[0]))):
            v = (hints or {}).get(k, v)
            self.symbols[self.names.get(str(k), str(k))] = int(v)
        self.measured = measured or {}
        self.expr_cache: dict[tuple[Any, int], str] = {}

    def expr(self, e: Any, budget: int = _JSON_EXPR_NODES) -> str | None:
        if e is None:
            return None
        key = (e, budget)
        try:
            return self.expr_cache[key]
        except (KeyError, TypeError):
            pass
        s = _Printer(self.names, budget, scan=self.scan)(e)
        try:
            self.expr_cache[key] = s
        except TypeError:
            pass
        return s

    def stat(self, st: Any, measured: float | None) -> StatEntry | None:
        if st is None and measured is None:
            return None
        if isinstance(st, Stat):
            e = st.rms
            try:
                symbolic = bool(self.scan.symbols(sympy.sympify(e)))
            except (sympy.SympifyError, TypeError):
                symbolic = False
            return StatEntry(self.expr(e), self.ev(e), measured, symbolic)
        return StatEntry(None, None, measured, False)

    def shape(self, val: Any) -> list[str] | None:
        if not isinstance(val, torch.Tensor):
            return None
        out = []
        for s in val.shape:
            if isinstance(s, torch.SymInt):
                out.append(self.expr(s.node.expr, 40) or str(s))
            else:
                out.append(str(int(s)))
        return out

    def build(self, model: str | None) -> Report:
        gm = self.result.gm
        nodes: list[NodeReport] = []
        modules: dict[fx.Node, list[str]] = {}
        known: set[str] = set()  # module paths that some node's nn_module_stack names
        for node in gm.graph.nodes:
            known.update(_module_stack(node) or ())
        for node in gm.graph.nodes:
            rec = node.meta.get(META_KEY)
            stack = _module_stack(node)
            if stack is None:
                if node.op == "get_attr":  # a parameter: its owner, nested like the ops that call it
                    parts = str(node.target).split(".")[:-1]
                    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                    stack = [p for p in prefixes[:-1] if p in known] + prefixes[-1:]
                elif node.op == "placeholder":
                    stack = []
                else:  # an inserted node without metadata: inherit from an input
                    stack = next((modules[a] for a in node.all_input_nodes if modules.get(a)), [])
            modules[node] = stack
            if node.op == "output" or not isinstance(rec, ScaleRecord):
                continue
            m = self.measured.get(node.name)
            has_fwd = rec.fwd is not None or (m is not None and getattr(m, "fwd", None) is not None)
            if not (has_fwd or rec.missing or rec.factors or rec.bwd is not None):
                continue
            nodes.append(self.node_report(len(nodes), node, rec, stack, m))
        return Report(model=model or _root_class(gm) or type(gm).__name__,
                      graph=getattr(self.result, "title", None) or "original",
                      symbols=self.symbols, nodes=nodes, measured=bool(self.measured))

    def node_report(self, index: int, node: fx.Node, rec: ScaleRecord, stack: list[str], m: Any) -> NodeReport:
        op = _op_name(node)
        val = node.meta.get("val")
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "get_attr":
            kind = "parameter"
        elif op == "scale_value" or _computes_scale(node):
            kind = "scale_value"
        else:
            kind = "activation"
        m_fwd = getattr(m, "fwd", None) if m is not None else None
        m_bwd = getattr(m, "bwd", None) if m is not None else None
        outputs = None
        if isinstance(rec.fwd, tuple):
            grads = node.meta.get("_us_bwd_multi") or ()
            mouts = (getattr(m, "outputs", None) or []) if m is not None else []
            vals = val if isinstance(val, (tuple, list)) else [None] * len(rec.fwd)
            outputs = []
            for i, st in enumerate(rec.fwd):
                g = grads[i] if i < len(grads) else None
                mo = mouts[i] if i < len(mouts) else None
                fe = self.stat(st, getattr(mo, "fwd", None))
                be = self.stat(g, getattr(mo, "bwd", None))
                outputs.append({
                    "shape": self.shape(vals[i]) if i < len(vals) else None,
                    "fwd": fe.to_dict() if fe else None,
                    "bwd": be.to_dict() if be else None,
                })
            fwd = None
            bwd = None
        else:
            fwd = self.stat(rec.fwd, m_fwd)
            bwd = self.stat(rec.bwd, m_bwd)
        factors = {}
        for k, e in (rec.factors or {}).items():
            if e is None:
                continue
            factors[str(k)] = FactorEntry(self.expr(e, 60) or "", self.ev(e))
        if op == "grad_scale" and len(node.args) > 1:  # the multiplier its backward applies
            f = node.args[1]
            e = f.meta.get("_us_expr") if isinstance(f, fx.Node) else f
            if isinstance(e, (int, float, sympy.Basic)) and not isinstance(e, bool):
                factors["grad"] = FactorEntry(self.expr(e, 60) or "", self.ev(e))
        headroom = None
        if m is not None and getattr(m, "headroom", None):
            headroom = {d: h for d, h in m.headroom.items() if h}
        nonfinite = dict(getattr(m, "nonfinite", None) or {}) or None
        dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None
        return NodeReport(
            index=index, name=node.name, op=op, kind=kind, module=stack[-1] if stack else "",
            shape=self.shape(val), dtype=dtype, call=_call_text(node, op, lambda e: self.expr(e, 20)), fwd=fwd, bwd=bwd,
            factors=factors, rule=rec.rule, role=rec.role, missing=bool(rec.missing), note=rec.note or "",
            source=_source(node) if node.op == "call_function" else None,
            headroom=headroom or None, nonfinite=nonfinite, outputs=outputs, module_stack=list(stack),
        )


def build_report(result: Any, measured: Mapping[str, Any] | None = None, *, model: str | None = None,
                 hints: Mapping[Any, int] | None = None) -> Report:
    """The :class:`Report` of an :class:`~unitscale_fx.api.AnalysisResult` / ``TransformResult``.

    Args:
        result: ``unitscale_fx.analyse(...)`` or ``transform(...).result``.
        measured: ``{node name: EdgeMeasurement}`` from :func:`unitscale_fx.track.measure_graph`
            (fills the ``measured`` columns and the headroom).
        model: the name shown in the header (default: the model's class).
        hints: shape-symbol values overriding the capture's (when measuring another batch size).
    """
    return _Builder(result, measured, hints).build(model)
