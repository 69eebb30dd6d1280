"""Propagation of scale statistics through an FX graph, forward and backward.

:class:`GraphAnalysis` walks the graph like ``torch.fx.passes.fake_tensor_prop``: no real compute
on activations (it reads the fake values ``node.meta["val"]`` that ``torch.export`` left there),
one :class:`~unitscale_fx.analysis.record.ScaleRecord` per node under ``node.meta[META_KEY]``.

* forward: for every floating edge, the RMS and the cross-token correlation of the value;
* backward: for every floating edge that carries a gradient, the RMS (and correlation) of the
  true gradient of the loss, seeded with ``d loss / d loss = 1`` at the graph's scalar outputs.

Small integer/boolean side computations that do not depend on parameters (attention masks, position
ids) are evaluated concretely from the example inputs when they are available, so that rules can
read e.g. the actual attention mask.
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import MissingRuleError, UnitScaleError, describe_node, source_line
from . import rules as _rules  # noqa: F401  (registers the rules)
from .context import RuleContext, is_float_node, normalized_kwargs, sym
from .evaluate import Evaluator
from .record import META_KEY, ScaleRecord, Stat, evaluate
from .registry import Unsupported as _Unsupported, lookup
from ..runtime import grad_scale

__all__ = ["GraphAnalysis", "MissingOp", "analyse_graph"]

# Ops that never need a rule: they have no floating output that carries a scale.
_IGNORED = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


@dataclass(frozen=True)
class MissingOp:
    """An op without a scale rule."""

    node: str
    op: str
    source: str | None

    def __str__(self) -> str:
        return f"{self.node} = {self.op}" + (f"  ({self.source.splitlines()[0]})" if self.source else "")


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else f"{target.namespace}.{target.__name__}"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


@dataclass
class GraphAnalysis:
    """Scale analysis of one graph.

    Args:
        gm: the graph module (parameters are ``get_attr`` nodes).
        hints: concrete values of the shape symbols (for numeric predictions).
        param_stats: statistics of parameters/buffers by fqn; missing ones are measured from the
            tensor when it holds data, else a symbol ``sigma_<fqn>`` is used.
        input_stats: statistics of floating user inputs by placeholder name (default: measured
            from ``example_values`` when given, else a symbol).
        example_values: concrete values of the placeholders (by name), used to evaluate masks and
            position ids; optional.
        strict: raise :class:`MissingRuleError` when an op has no rule.
    """

    gm: fx.GraphModule
    hints: dict[sympy.Symbol, int] = field(default_factory=dict)
    param_stats: dict[str, Stat] = field(default_factory=dict)
    input_stats: dict[str, Stat] = field(default_factory=dict)
    example_values: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    missing: list[MissingOp] = field(default_factory=list)
    symbol_hints: dict[sympy.Symbol, float] = field(default_factory=dict)
    batch_size: int | None = None
    _const: dict[fx.Node, Any] = field(default_factory=dict)
    _const_failed: set = field(default_factory=set)
    _mutations: list | None = field(default=None, repr=False)  # (graph position, in-place node)
    _order: dict | None = field(default=None, repr=False)
    _mutations_done: int = field(default=0, repr=False)
    _evaluator: Evaluator | None = field(default=None, repr=False)
    _doubled: dict = field(default_factory=dict, repr=False)  # evaluators with one size doubled
    _evaluator_key: tuple = field(default=(), repr=False)
    #: per node: the token covariance left by causal attention, at the hinted length (an S x S float32
    #: matrix, analysis/causal_structure.py); absent where only the exchangeable ``corr`` is known.
    #: Needed while the forward analysis runs only: dropped at its end
    tokcov: dict = field(default_factory=dict, repr=False)
    #: per node: the diagonal of its token covariance (its forward position profile, mean 1; float64
    #: ``[S]``, analysis/position_profile.py), kept after the forward analysis for the backward one
    tokdiag: dict = field(default_factory=dict, repr=False)
    #: per node: the position profile of the gradient at its output (set by the backward analysis;
    #: absent: flat)
    gradprof: dict = field(default_factory=dict, repr=False)
    #: per causal attention node: ``E sum_j p_ij^2`` at each query position (float64 ``[S]``, set by its
    #: forward rule), which decides where along the sequence its input gradients sit
    attn_f: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ helpers for rules
    def fwd_of(self, node: fx.Node) -> Stat | None:
        rec: ScaleRecord | None = node.meta.get(META_KEY)
        if rec is None or rec.fwd is None:
            return None
        if isinstance(rec.fwd, tuple):
            return None
        return rec.fwd

    def value_of(self, expr: Any) -> float | None:
        """Float value of ``expr`` at the shape hints (and the hints of input-scale symbols)."""
        key = (len(self.hints), len(self.symbol_hints))
        if self._evaluator is None or self._evaluator_key != key:
            self._evaluator = Evaluator({**self.hints, **self.symbol_hints})
            self._evaluator_key = key
            self._doubled = {}
        return self._evaluator(expr)

    def power_law(self, e: Any) -> Any:
        """``v0 * prod_s (s / h_s) ** p_s``: the value ``v0`` of ``e`` at the hints ``h``, and for each
        free symbol the exponent ``p_s = log2(e(2 h_s) / e(h_s))`` (rounded to a multiple of 1/2
        when within 0.02 of one). Exact at the hints; follows ``e``'s scaling in every size.
        Falls back to the value at the hints when ``e`` is not positive there."""
        v0 = self.value_of(e)  # (also resets the doubled evaluators when the hints change)
        if v0 is None or not (v0 > 0 and math.isfinite(v0)):
            return _num(v0, e)
        env = {**self.hints, **self.symbol_hints}
        out = sympy.Float(v0, 8)
        for s in sorted(e.free_symbols, key=str):
            h = env.get(s)
            if h is None:
                return sympy.Float(v0, 6)
            ev = self._doubled.get(s)
            if ev is None:
                ev = self._doubled[s] = Evaluator({**env, s: 2 * h})
            v1 = ev(e)
            if v1 is None or not (v1 > 0 and math.isfinite(v1)):
                return sympy.Float(v0, 6)
            p = math.log2(v1 / v0)
            half = round(2 * p)
            p_e = sympy.Rational(half, 2) if abs(p - half / 2) < 0.02 else sympy.Float(round(p, 4), 6)
            if p_e != 0:
                out = out * (s / sympy.Integer(int(h))) ** p_e if float(h).is_integer() else out * (s / h) ** p_e
        return out

    def tame(self, st: Any) -> Any:
        """Keep a statistic's expressions small enough for sympy.

        The correlation and mean are model parameters of the rules, not user-facing scales: they
        are evaluated to numbers at the shape hints. The RMS stays symbolic (dynamic dims remain
        symbols) unless its expression tree exceeds :data:`MAX_EXPR_NODES` nodes (deep graphs
        would otherwise grow expressions exponentially with depth), in which case it is replaced by
        the power law that matches it at the hints (:meth:`power_law`): the dependence on the
        batch and sequence sizes survives, so scale factors built from it still cancel (e.g. a
        mean loss's ``sqrt(batch * seq)`` against a weight gradient's ``1/sqrt(batch * seq)``).
        """
        if isinstance(st, (tuple, list)):
            return type(st)(self.tame(s) for s in st)
        if not isinstance(st, Stat):
            return st
        rms, corr, mean = st.rms, st.corr, st.mean
        if not _is_num(corr):
            corr = _num(self.value_of(corr), corr)
        if not _is_num(mean):
            mean = _num(self.value_of(mean), mean)
        if not _is_num(rms) and _too_big(rms):
            rms = self.power_law(rms)
        if rms is st.rms and corr is st.corr and mean is st.mean:
            return st
        return Stat(rms, corr, mean, st.trace)

    def tokens_per_sample(self, shape: Any) -> float | None:
        """Tokens of one sample among the rows of ``shape`` (all dims but the last).

        The batch size is the leading dim of the first tensor input; a shape whose rows do not
        divide by it counts as one sample.
        """
        if self.batch_size is None:
            for v in self.example_values.values():
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    self.batch_size = int(v.shape[0])
                    break
            else:
                self.batch_size = 1
        rows = 1.0
        for d in list(shape)[:-1]:
            v = self.value_of(d)
            if v is None:
                return None
            rows *= v
        b = self.batch_size or 1
        return rows / b if rows % b == 0 and rows >= b else rows

    def requires_grad(self, node: fx.Node) -> bool:
        return bool(node.meta.get("_us_rg", False))

    def const_value(self, node: fx.Node) -> Any:
        """Concrete value of ``node`` if it depends only on example inputs and shapes."""
        if node in self._const:
            return self._const[node]
        if node in self._const_failed:
            return None
        self._apply_mutations_before(node)
        if node in self._const:  # evaluated while applying them
            return self._const[node]
        value = self._eval_const(node)
        if value is None:
            self._const_failed.add(node)
        else:
            self._const[node] = value
        return value

    def _apply_mutations_before(self, node: fx.Node) -> None:
        """Evaluate, in graph order, the in-place ops that run before ``node``.

        Constants are evaluated lazily, on demand, but a value built in place (``new_zeros`` then
        ``copy_`` into a slice, ``masked_fill_``: HF's ``shift_tokens_right``) is only right once
        the mutations that precede its use have run on the cached tensor. Every in-place node
        before ``node`` is therefore evaluated first (those that are not constants are no-ops).
        """
        if self._mutations is None:
            self._order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
            self._mutations = [(i, n) for n, i in self._order.items() if _is_inplace(n)]
        pos = self._order.get(node)
        while self._mutations_done < len(self._mutations):
            i, m = self._mutations[self._mutations_done]
            if pos is None or i >= pos:
                return
            self._mutations_done += 1  # before evaluating: the evaluation re-enters here
            self.const_value(m)

    def _eval_const(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            v = self.example_values.get(node.name)
            if isinstance(v, torch.Tensor) and v.device.type != "meta":
                return v.clone()  # in-place ops of the graph must not reach the user's data
            return v if isinstance(v, (int, float, bool)) else None
        if node.op == "get_attr":
            try:
                t = _fetch_attr(self.gm, str(node.target))
            except AttributeError:
                return None
            if isinstance(t, torch.nn.Parameter) or not isinstance(t, torch.Tensor):
                return None
            return t.clone() if t.device.type != "meta" else None  # nor the module's buffers
        if node.op != "call_function" or self.requires_grad(node):
            return None
        if is_float_node(node) and any(
            isinstance(a, fx.Node) and is_float_node(a) and a.op == "placeholder"
            for a in node.all_input_nodes
        ):
            return None
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.numel() > 2**24:
            return None

        def conv(a: Any) -> Any:
            if isinstance(a, fx.Node):
                v = self.const_value(a)
                if v is None:
                    raise _NotConst
                return v
            if isinstance(a, (torch.SymInt, torch.SymFloat)):
                v = evaluate(a.node.expr, self.hints)
                if v is None:
                    raise _NotConst
                return int(v) if isinstance(a, torch.SymInt) else v
            if isinstance(a, torch.device) and a.type == "meta":
                return torch.device("cpu")
            return a

        try:
            args = tree_map(conv, node.args)
            kwargs = tree_map(conv, dict(node.kwargs))
            if "device" in kwargs and isinstance(kwargs["device"], torch.device):
                kwargs["device"] = torch.device("cpu")
            with torch.no_grad():
                return node.target(*args, **kwargs)
        except _NotConst:
            return None
        except Exception:
            return None

    # ------------------------------------------------------------------ forward
    def run_forward(self, before: Any = None, after: Any = None) -> "GraphAnalysis":
        """Forward analysis. ``before(node)``/``after(node)`` hooks let a pass rewrite as it goes;
        nodes a hook inserts must be analysed by the hook (``self.visit``)."""
        with _one_thread():
            return self._run_forward(before, after)

    def _run_forward(self, before: Any, after: Any) -> "GraphAnalysis":
        for node in list(self.gm.graph.nodes):
            if node.graph is not self.gm.graph:  # erased by a hook
                continue
            if before is not None and node.op == "call_function":
                before(node)
            self.visit(node)
            if after is not None and node.op == "call_function":
                after(node)
        self._keep_token_diagonals()
        self.tokcov.clear()  # S x S matrices, only the forward propagation reads them
        if self.strict and self.missing:
            raise MissingRuleError(self.missing_message(), [(m.node, m.op, m.source) for m in self.missing])
        return self

    def visit(self, node: fx.Node) -> ScaleRecord:
        """Compute the forward record of one node (its inputs must have been visited)."""
        old = node.meta.get(META_KEY)
        rec = ScaleRecord()
        if isinstance(old, ScaleRecord):  # keep what the passes wrote (inserted factors, roles)
            rec.factors, rec.role, rec.grad_factor = dict(old.factors), old.role, old.grad_factor
        node.meta[META_KEY] = rec
        self._mark_requires_grad(node)
        if node.op == "placeholder":
            if is_float_node(node):
                rec.rule = "input"
                rec.fwd = self.input_stats.get(node.name) or self._input_stat(node)
            return rec
        if node.op == "get_attr":
            if isinstance(node.meta.get("val"), torch.Tensor) or _is_tensor_attr(self.gm, node):
                rec.rule = "parameter"
                rec.fwd = self._param_stat(node)
            return rec
        if node.op == "output":
            return rec
        if node.op != "call_function":
            if is_float_node(node) or isinstance(node.meta.get("val"), (tuple, list)):
                self._missing(node, rec)
            return rec
        if node.target in _IGNORED:
            return rec
        has_float_out = _has_float(node.meta.get("val"))
        rule = lookup(node.target)
        if (has_float_out and not self.requires_grad(node) and not _forward_scale(node, rule)
                and _float_inputs_are_constant(self, node)):
            value = self.const_value(node)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                # a constant of the shapes and buffers (RoPE tables, ALiBi slopes...): measured
                rec.rule = "constant"
                rec.fwd = _measured_stat(value)
                return rec
        if rule is None:
            if has_float_out and (
                self.requires_grad(node)
                or any(self.fwd_of(a) is not None for a in node.all_input_nodes if isinstance(a, fx.Node))
            ):
                self._missing(node, rec)
            return rec
        rec.rule = rule.name
        if not has_float_out and rule.kind != "view" and rule.kind != "scale":
            return rec
        ctx = RuleContext(node, self)
        try:
            rec.fwd = self.tame(rule.forward(ctx))
            self._propagate_tokcov(node, rule, rec.fwd)
        except _Unsupported as e:
            if has_float_out:  # integer/bool values (ids, masks) carry no scale
                self._missing(node, rec, reason=str(e))
        except UnitScaleError:
            raise
        except Exception as e:  # a bug in a rule: name the node and the op
            raise UnitScaleError(
                f"scale rule {rule.name!r} failed on node\n  {describe_node(node)}\n"
                f"{type(e).__name__}: {e}"
            ) from e
        return rec

    def missing_message(self) -> str:
        return missing_message(self.missing)

    # ------------------------------------------------------------------ position structure
    def _propagate_tokcov(self, node: fx.Node, rule: Any, st: Any) -> None:
        """``tokcov[node]`` from its inputs' (analysis/causal_structure.py), unless the rule set it.

        Views, casts, scales, dropout, a matmul with a weight, a product with something the same at
        every token: passed on. Per-token normalisations (norm ops, ``x * rsqrt(mean(x^2))``): each
        position rescaled to unit variance. Adds: mixed by energy. Elementwise functions: the
        covariance part scaled like the correlation. Products of two activations: elementwise
        product. Anything else drops it (the exchangeable ``corr`` stands alone again).
        """
        from . import causal_structure as cs

        if node in self.tokcov:
            return
        if node.target is torch.ops.aten.cat.default:  # pieces along the tokens (a CLS token and patches)
            k = self._tokcov_cat(node)
            if k is not None:
                self.tokcov[node] = k
                return
        if not any(a in self.tokcov for a in node.all_input_nodes):
            return
        first = node.args[0] if node.args else None
        if not isinstance(st, Stat):  # split / unbind / chunk: the pieces are read through getitem
            if isinstance(st, (tuple, list)) and rule.kind == "view" and isinstance(first, fx.Node) \
                    and first in self.tokcov:
                self.tokcov[node] = self.tokcov[first]
            return
        k = None
        if isinstance(first, (list, tuple)):  # cat / stack of pieces of one tensor (RoPE halves)
            ks = [self.tokcov.get(a) for a in first if isinstance(a, fx.Node)]
            k = ks[0] if ks and all(x is ks[0] for x in ks) else None
        elif rule.kind == "norm" and isinstance(first, fx.Node) and first in self.tokcov:
            k = cs.normalize_rows(self.tokcov[first])
        elif rule.kind in ("view", "scale", "dropout", "reduction") or rule.name in ("cast", "grad_scale"):
            k = self.tokcov.get(first) if isinstance(first, fx.Node) else None
        elif rule.kind == "matmul":
            acts = [a for a in node.all_input_nodes
                    if a in self.tokcov or self.requires_grad(a) and not self._param_like(a)]
            k = self.tokcov.get(acts[0]) if len(acts) == 1 else None
        elif rule.name in ("add", "sub", "mul", "div"):
            k = self._tokcov_binary(node, rule.name)
        elif rule.kind == "pointwise" and isinstance(first, fx.Node) and first in self.tokcov:
            k = self._tokcov_pointwise(self.tokcov[first], self.fwd_of(first), st)
        if k is not None:
            self.tokcov[node] = k

    @staticmethod
    def _behind_views(n: fx.Node) -> fx.Node:
        """``n`` with the views, casts and backward-only scales above it walked through."""
        for _ in range(8):
            rule = lookup(n.target) if n.op == "call_function" else None
            if rule is None or not (rule.kind == "view" or rule.name in ("cast", "grad_scale")) or not n.args \
                    or not isinstance(n.args[0], fx.Node):
                return n
            n = n.args[0]
        return n

    def _param_like(self, n: fx.Node) -> bool:
        """A parameter, possibly behind views, casts and backward-only scales."""
        return self._behind_views(n).op == "get_attr"

    def _numbers(self, s: Stat) -> tuple[float, float, float] | None:
        vals = [self.value_of(x) for x in (s.rms ** 2, s.corr, s.mean)]
        return None if any(v is None for v in vals) else (vals[0], vals[1], vals[2])

    def _tokcov_of(self, n: fx.Node, size: int) -> Any:
        """``n``'s carried covariance, or the exchangeable one of its ``corr``."""
        from . import causal_structure as cs

        if n in self.tokcov:
            return self.tokcov[n]
        st = self.fwd_of(n)
        num = self._numbers(st) if st is not None else None
        return None if num is None else cs.exchangeable(min(max(num[1], 0.0), 1.0), size)

    def _tokcov_pointwise(self, k: Any, si: Stat | None, so: Stat) -> Any:
        from . import causal_structure as cs

        ni, no = (self._numbers(si) if si is not None else None), self._numbers(so)
        if ni is None or no is None or ni[0] <= ni[2] ** 2 or no[0] <= 0:
            return None
        m_in, m_out = ni[2] ** 2 / ni[0], no[2] ** 2 / no[0]
        rho_in = (ni[1] - m_in) / (1 - m_in)
        rho_out = (no[1] - m_out) / (1 - m_out) if m_out < 1 else 0.0
        if rho_in <= 1e-9:
            return None
        # the covariance part (k - m_in) / (1 - m_in) (mean diagonal 1), its off-diagonal scaled by
        # rho_out / rho_in, plus the output's mean part m_out; then mean diagonal 1. All affine in k:
        # off-diagonal a k + b, diagonal a_d k + b_d, written once (S x S matrices: no temporaries)
        a_d = (1 - m_out) / (1 - m_in)
        a = a_d * max(rho_out, 0.0) / rho_in
        b, b_d = m_out - a * m_in, m_out - a_d * m_in
        diag = torch.diagonal(k)
        d = a_d * float(diag.mean()) + b_d
        if d <= 0:
            d = 1.0
        out = k.mul(a / d).add_(b / d)
        out.diagonal().copy_(diag * (a_d / d) + b_d / d)
        return out

    def _tokcov_binary(self, node: fx.Node, kind: str) -> Any:
        from . import causal_structure as cs

        nodes = [a for a in node.args[:2] if isinstance(a, fx.Node) and self.fwd_of(a) is not None]
        if len(nodes) < 2:
            return self.tokcov.get(nodes[0]) if nodes else None
        a, b = nodes
        sizes = {self.tokcov[x].shape[0] for x in (a, b) if x in self.tokcov}
        if len(sizes) != 1:  # two different sequences (or none carried): keep corr alone
            return None
        size = sizes.pop()
        out = node.meta.get("val")
        rows_out = list(out.shape[:-1]) if isinstance(out, torch.Tensor) else []

        def shared(n: fx.Node) -> bool:  # broadcast over the tokens: the same at every one (a gain, a bias)
            v = n.meta.get("val")
            return not isinstance(v, torch.Tensor) or v.dim() <= 1 or all(d == 1 for d in v.shape[:-1])

        def per_token(n: fx.Node) -> bool:  # one number per token, e.g. rsqrt(mean(x^2))
            v = n.meta.get("val")
            return isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[-1] == 1 and len(rows_out) > 0

        if kind in ("add", "sub"):
            ea, eb = self.value_of(self.fwd_of(a).rms ** 2), self.value_of(self.fwd_of(b).rms ** 2)
            if ea is None or eb is None or ea + eb <= 0:
                return None
            out, const, diag = None, 0.0, 0.0
            for e, n in ((ea, a), (eb, b)):
                w = e / (ea + eb)
                if n in self.tokcov:
                    out = self.tokcov[n] * w if out is None else out.add_(self.tokcov[n], alpha=w)
                elif shared(n):  # a bias: the same vector at every token, correlation 1
                    const += w
                else:  # exchangeable: c everywhere, 1 on the diagonal
                    num = self._numbers(self.fwd_of(n))
                    if num is None:
                        return None
                    c = min(max(num[1], 0.0), 1.0)
                    const, diag = const + w * c, diag + w * (1.0 - c)
            if out is None:
                return None
            out.add_(const)
            out.diagonal().add_(diag)
            return out
        for x, y in ((a, b), (b, a)):
            if x in self.tokcov and (shared(y) or not self.requires_grad(y) and y not in self.tokcov):
                return self.tokcov[x]  # times a gain, or a constant (RoPE tables: approximately)
            if x in self.tokcov and per_token(y):
                # a normalisation (times rsqrt / reciprocal, or over sqrt, of a mean square): each
                # position to unit variance; another per-token factor is taken to keep the structure
                names = ("sqrt",) if kind == "div" else ("rsqrt", "reciprocal")
                is_norm = getattr(self._behind_views(y).target, "__name__", "").startswith(names)
                return cs.normalize_rows(self.tokcov[x]) if is_norm else self.tokcov[x]
        ka, kb = self._tokcov_of(a, size), self._tokcov_of(b, size)
        if ka is None or kb is None or kind == "div":
            return None
        return cs.normalize_mean_diag(ka * kb)

    def _tokcov_cat(self, node: fx.Node) -> Any:
        """The token covariance of a concatenation along the tokens: each piece's own (its carried one,
        or the exchangeable one of its ``corr``) times its mean square on the diagonal blocks; pieces
        are independent, so two positions of different pieces share only their means. None where the
        concatenation is not along the tokens (e.g. RoPE's halves, along the features)."""
        from . import causal_structure as cs

        tensors = node.args[0] if node.args else None
        if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
            return None
        lengths = self._cat_token_lengths(node)
        if lengths is None or not 2 <= sum(lengths) <= cs.MAX_LEN or min(lengths) < 1:
            return None
        blocks = []
        for a, n in zip(tensors, lengths):
            st = self.fwd_of(a) if isinstance(a, fx.Node) else None
            num = self._numbers(st) if st is not None else None
            if num is None:
                return None
            blocks.append((n, num, self.tokcov.get(a)))
        means = torch.cat([torch.full((n,), float(m), dtype=cs.DTYPE) for n, (_, _, m), _ in blocks])
        k = torch.outer(means, means)
        at = 0
        for n, (ms, c, _), kc in blocks:
            own = kc if kc is not None and kc.shape[0] == n else cs.exchangeable(min(max(c, 0.0), 1.0), n)
            k[at : at + n, at : at + n] = own * ms
            at += n
        return cs.normalize_mean_diag(k)

    # ------------------------------------------------------------------ position profiles
    def _keep_token_diagonals(self) -> None:
        """``tokdiag`` from ``tokcov`` (the matrices are dropped, their diagonals kept)."""
        from . import position_profile as pp

        memo: dict[int, Any] = {}
        self.tokdiag = {}
        for n, k in self.tokcov.items():
            if id(k) not in memo:
                memo[id(k)] = pp.normalized(torch.diagonal(k).to(pp.DTYPE))
            if memo[id(k)] is not None:
                self.tokdiag[n] = memo[id(k)]

    def norm_profile_factor(self, node: fx.Node, x: Any) -> sympy.Expr:
        """What a per-position normalisation's backward gains over ``g / sigma`` from the position
        profiles of its gradient and its input (analysis/position_profile.py): 1 when both are flat."""
        from . import position_profile as pp

        k = self.tokdiag.get(x) if isinstance(x, fx.Node) else None
        f, _ = pp.norm_backward(self.gradprof.get(node), k)
        return sympy.Integer(1) if abs(f - 1.0) < 1e-9 else sympy.Float(f, 8)

    def _hint_dims(self, node: fx.Node) -> list[int | None]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return []
        out = []
        for d in val.shape:
            v = d if isinstance(d, int) else self.value_of(sym(d))
            out.append(int(v) if v is not None else None)
        return out

    def _int_hint(self, v: Any) -> int | None:
        """An int argument's value at the hints (a literal, a SymInt, or a node computing one)."""
        if v is None or isinstance(v, bool):
            return None
        if isinstance(v, fx.Node):
            v = v.meta.get("val")
        if isinstance(v, int):
            return v
        if isinstance(v, torch.SymInt):
            h = self.value_of(sym(v))
            return int(h) if h is not None else None
        return None

    def _token_dim(self, x: fx.Node, dim: Any) -> int | None:
        """``dim`` normalised when it is a token dim of ``x`` (neither the batch nor the features)."""
        val = x.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 3 or not isinstance(dim, int):
            return None
        dim %= val.dim()
        return dim if dim not in (0, val.dim() - 1) else None

    def _route_profile(self, node: fx.Node, rule: Any, a: Any, prof: Any) -> Any:
        """The position profile of the gradient ``node``'s backward sends to its input ``a``."""
        from . import position_profile as pp

        aten = torch.ops.aten
        t = node.target
        x = node.args[0] if node.args else None
        if t is aten.select.int and a is x:
            dim = self._token_dim(x, node.args[1])
            if dim is not None:
                n, idx = self._hint_dims(x)[dim], self._int_hint(node.args[2] if len(node.args) > 2 else None)
                if n is None or idx is None or not -n <= idx < n:
                    return None
                return pp.concentrated(n, idx % n)
        elif t is aten.slice.Tensor and a is x:
            dim = self._token_dim(x, node.args[1] if len(node.args) > 1 else 0)
            if dim is not None:
                n = self._hint_dims(x)[dim]
                bounds = [node.args[i] if len(node.args) > i else dflt for i, dflt in ((2, None), (3, None), (4, 1))]
                vals = [self._int_hint(b) for b in bounds]
                if n is None or any(v is None for v, b in zip(vals, bounds) if b is not None):
                    return None
                start, end, step = (None if v is None else int(v) for v in vals)
                if len(range(n)[start:end:step]) == n:
                    return prof
                return pp.sliced(n, start, end, step or 1, prof)
        elif t is aten.cat.default:
            return None  # (routed piece by piece: _route_cat)
        kind, name = rule.kind, rule.name
        if kind == "attention" and isinstance(a, fx.Node):
            return self._attention_profile(node, a, prof)
        if prof is None or not isinstance(a, fx.Node):
            return None
        if kind == "norm":
            if a is not x:
                return None
            return pp.norm_backward(prof, self.tokdiag.get(x))[1]
        if kind == "matmul":
            others = [o for o in node.all_input_nodes if o is not a]
            if not (others and all(self._param_like(o) or not self.requires_grad(o) for o in others)):
                return None
        elif not (kind in ("view", "scale", "dropout", "pointwise") or name in ("add", "sub", "mul", "div", "cast",
                                                                              "grad_scale")):
            return None
        if name == "mul":
            other = [o for o in node.args[:2] if isinstance(o, fx.Node) and o is not a]
            table = self._position_table(other[0], prof.numel()) if len(other) == 1 else None
            if table is not None:  # times a constant that differs by position (RoPE's sin / cos)
                return pp.normalized(prof * table)
        return prof if prof.numel() in self._hint_dims(a) else None

    def _attention_profile(self, node: fx.Node, a: fx.Node, prof: Any) -> Any:
        """Where a causal attention's query / key / value gradients sit along the sequence.

        With ``f_i = E sum_j p_ij^2`` over the ``i + 1`` keys of query ``i`` (exchangeable weights),
        ``E|dq_i|^2 ~ f_i (1 - f_i) e_i`` (``e`` the output gradient's profile; 0 at the first
        position, whose softmax over one key is constant), ``E|dv_j|^2 ~ sum_{i >= j} f_i / (i + 1) e_i``
        and ``E|dk_j|^2 ~ sum_{i >= j} f_i (1 - f_i) / (i + 1) e_i``: the first keys are read by every
        query. Non-causal attention (or one without the forward's ``f``): the query keeps the output's
        profile, keys and values are flat."""
        from . import position_profile as pp

        args = list(node.args[:3])
        f = self.attn_f.get(node)
        if f is None:
            return prof if args and a is args[0] else None
        if a not in args:
            return None
        return pp.causal_attention(f, prof)[args.index(a)]

    def _position_table(self, other: fx.Node, length: int) -> Any:
        """A constant operand's mean square per position (mean 1; positions along dim -2), when it
        differs by position; None for parameters, activations, or a table the same at every position."""
        from . import position_profile as pp

        if self.requires_grad(other):
            return None
        t = self.const_value(other)
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-2] != length or length < 2:
            return None
        dims = [d for d in range(t.dim()) if d != t.dim() - 2]
        s = pp.normalized(t.detach().to(pp.DTYPE).pow(2).mean(dim=dims))
        if s is None or float((s - 1).abs().max()) < 1e-6:
            return None
        return s

    def table_profile_factor(self, node: fx.Node, other: Any) -> sympy.Expr:
        """The gradient of ``x * table`` (``table`` a constant that differs by position, e.g. RoPE's)
        when the gradient at the product sits on some positions: ``sqrt(mean_i p_i s_i)`` times the
        independent estimate ``g * rms(table)``, ``s`` the table's mean square per position."""
        prof = self.gradprof.get(node)
        if prof is None or not isinstance(other, fx.Node):
            return sympy.Integer(1)
        table = self._position_table(other, prof.numel())
        if table is None:
            return sympy.Integer(1)
        f = math.sqrt(max(float((prof * table).mean()), 0.0))
        return sympy.Integer(1) if abs(f - 1.0) < 1e-9 else sympy.Float(f, 8)

    def _cat_token_lengths(self, node: fx.Node) -> list[int] | None:
        """The pieces' lengths at the hints for a concatenation along a token dim; None otherwise."""
        val = node.meta.get("val")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(val, torch.Tensor) or not isinstance(dim, int) or self._token_dim(node, dim) is None:
            return None
        dim %= val.dim()
        lengths = [self._hint_dims(t)[dim] if isinstance(t, fx.Node) else None for t in node.args[0]]
        return None if any(n is None for n in lengths) else lengths

    def cat_energy_shares(self, node: fx.Node) -> list[float] | None:
        """For a concatenation along the tokens whose gradient has a position profile: each piece's
        mean square over the whole gradient's (the profile's mean over the piece's positions)."""
        prof = self.gradprof.get(node)
        lengths = self._cat_token_lengths(node) if prof is not None else None
        if lengths is None or sum(lengths) != prof.numel():
            return None
        out, at = [], 0
        for n in lengths:
            out.append(float(prof[at : at + n].mean()) if n else 1.0)
            at += n
        return out

    def _route_cat(self, node: fx.Node, prof: Any) -> list:
        """The profiles of the gradients a concatenation sends to its pieces: split along the tokens, or
        the whole profile for each piece when it concatenates along another dim."""
        from . import position_profile as pp

        tensors = node.args[0]
        if prof is None:
            return [None] * len(tensors)
        lengths = self._cat_token_lengths(node)
        if lengths is not None:
            return pp.pieces(prof, lengths)
        return [prof if isinstance(t, fx.Node) and prof.numel() in self._hint_dims(t) else None for t in tensors]

    def _missing(self, node: fx.Node, rec: ScaleRecord, reason: str = "") -> None:
        rec.missing = True
        rec.rule = None
        rec.note = reason
        self.missing.append(MissingOp(node.name, _op_name(node.target), source_line(node)))

    def _mark_requires_grad(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            try:
                t = _fetch_attr(self.gm, str(node.target))
            except AttributeError:
                t = None
            rg = isinstance(t, torch.nn.Parameter) and t.requires_grad
        elif node.op == "placeholder":
            v = node.meta.get("val")
            rg = bool(getattr(v, "requires_grad", False))
        elif node.op == "call_function":
            if node.target in _NO_GRAD_OPS:
                rg = False
            else:
                rg = _has_float(node.meta.get("val")) and any(
                    a.meta.get("_us_rg", False) for a in node.all_input_nodes
                )
        else:
            rg = False
        node.meta["_us_rg"] = rg

    def _input_stat(self, node: fx.Node) -> Stat:
        v = self.example_values.get(node.name)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta":
            return Stat(sympy.Float(_rms(v), 6), sympy.Float(_token_corr(node, v), 6))
        s = sympy.Symbol(f"sigma_{node.name}", positive=True)
        self.symbol_hints.setdefault(s, 1.0)
        return Stat(s, sympy.Integer(0))

    def _param_stat(self, node: fx.Node) -> Stat:
        fqn = str(node.target)
        if fqn in self.param_stats:
            return self.param_stats[fqn]
        try:
            t = _fetch_attr(self.gm, fqn)
        except AttributeError:
            t = None
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.is_floating_point():
            return Stat(sympy.Float(_rms(t), 6), sympy.Integer(0))
        s = sympy.Symbol(f"sigma[{fqn}]", nonnegative=True)
        self.symbol_hints.setdefault(s, 1.0)
        return Stat(s, sympy.Integer(0))

    # ------------------------------------------------------------------ backward
    def run_backward(self, seeds: Mapping[fx.Node, Stat] | None = None) -> "GraphAnalysis":
        """Predict the true gradient statistics of every edge that carries a gradient."""
        with _one_thread():
            return self._run_backward(seeds)

    def _run_backward(self, seeds: Mapping[fx.Node, Stat] | None) -> "GraphAnalysis":
        nodes = list(self.gm.graph.nodes)
        for node in nodes:  # a re-run (after a pass changed the graph) starts from nothing
            rec = node.meta.get(META_KEY)
            if isinstance(rec, ScaleRecord):
                rec.bwd = None
            node.meta.pop("_us_bwd_multi", None)
        pending: dict[tuple[fx.Node, int | None], list[Stat]] = {}
        # the position profile of each pending contribution (analysis/position_profile.py), None: flat
        profiles: dict[tuple[fx.Node, int | None], list[Any]] = {}
        self.gradprof = {}

        def push(key: tuple[fx.Node, int | None], st: Stat, prof: Any = None) -> None:
            pending.setdefault(key, []).append(st)
            profiles.setdefault(key, []).append(prof)

        if seeds is None:
            seeds = self.default_seeds()
        for n, s in seeds.items():
            push((n, None), s)
        for node in reversed(nodes):
            rec: ScaleRecord | None = node.meta.get(META_KEY)
            if rec is None or not self.requires_grad(node):
                continue
            prof = None
            if isinstance(rec.fwd, tuple):
                grads = tuple(self.tame(_combine(pending.get((node, i), []))) for i in range(len(rec.fwd)))
                if all(g is None for g in grads):
                    continue
                rec.bwd = None
                grad_in: Any = grads
                rec.note = rec.note
                node.meta["_us_bwd_multi"] = grads
                prof = self._multi_output_profile(node, grads, pending, profiles)
            else:
                g = self.tame(_combine(pending.get((node, None), [])))
                if g is None:
                    continue
                rec.bwd = g
                grad_in = g
                prof = self._mix_profiles(pending.get((node, None), []), profiles.get((node, None), []))
                if prof is not None:
                    self.gradprof[node] = prof
            if node.op != "call_function" or rec.rule is None:
                continue
            if node.target is operator.getitem:
                parent, idx = node.args[0], node.args[1]
                if isinstance(parent, fx.Node) and isinstance(grad_in, Stat):
                    push((parent, idx), grad_in, prof)
                continue
            rule = lookup(node.target)
            if rule is None:
                continue
            ctx = RuleContext(node, self)
            try:
                contribs = rule.backward(ctx, grad_in)
            except _Unsupported:
                continue
            except UnitScaleError:
                raise
            except Exception as e:
                raise UnitScaleError(
                    f"backward scale rule {rule.name!r} failed on node\n  {describe_node(node)}\n"
                    f"{type(e).__name__}: {e}"
                ) from e
            for key, st in contribs.items():
                st = self.tame(st)
                a = key if isinstance(key, fx.Node) else ctx.arg(key)
                if isinstance(a, (list, tuple)):
                    profs = self._route_cat(node, prof) if node.target is torch.ops.aten.cat.default \
                        else [None] * len(a)
                    for ai, si, pi in zip(a, st, profs):
                        if isinstance(ai, fx.Node) and si is not None and self.requires_grad(ai):
                            push((ai, None), si, pi)
                elif isinstance(a, fx.Node) and st is not None and self.requires_grad(a):
                    push((a, None), st, self._route_profile(node, rule, a, prof))
        return self

    def _multi_output_profile(self, node: fx.Node, grads: tuple, pending: dict, profiles: dict) -> Any:
        """The profile of the gradient into a split / chunk / unbind along the features or heads (q, k, v
        out of one projection): its outputs' profiles mixed by energy. None for a split along the tokens
        and for other multi-output ops."""
        from . import position_profile as pp

        aten = torch.ops.aten
        splits = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_split.Tensor)
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if node.target in splits:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        elif node.target is aten.unbind.int:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        else:
            return None
        if not isinstance(dim, int) or self._token_dim(node.args[0], dim) is not None:
            return None
        parts = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            p = self._mix_profiles(pending.get((node, i), []), profiles.get((node, i), []))
            parts.append((self.value_of(g.rms**2), p))
        return pp.mix(parts)

    def _mix_profiles(self, stats: list[Stat], profs: list[Any]) -> Any:
        """The position profile of a gradient summed from ``stats`` (each with its profile)."""
        if all(p is None for p in profs):
            return None
        from . import position_profile as pp

        return pp.mix([(self.value_of(s.rms**2) if s is not None else 0.0, p) for s, p in zip(stats, profs)])

    def loss_nodes(self) -> list[fx.Node]:
        """Scalar floating outputs that carry a gradient (the loss), in output order."""
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        leaves, _ = tree_flatten(out.args[0])
        found = []
        for leaf in leaves:
            if isinstance(leaf, fx.Node) and is_float_node(leaf) and self.requires_grad(leaf):
                if leaf.meta["val"].dim() == 0:
                    found.append(leaf)
        return found

    def output_nodes(self) -> list[fx.Node]:
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        leaves, _ = tree_flatten(out.args[0])
        return [l for l in leaves if isinstance(l, fx.Node) and is_float_node(l) and self.requires_grad(l)]

    def default_seeds(self) -> dict[fx.Node, Stat]:
        losses = self.loss_nodes()
        if losses:
            return {losses[0]: Stat(sympy.Integer(1), sympy.Integer(0))}
        # no loss inside the model: assume a unit gradient arrives at every floating output
        return {n: Stat(sympy.Integer(1), sympy.Integer(0)) for n in self.output_nodes()}


#: RMS expressions with more nodes than this are evaluated at the shape hints (see ``tame``).
MAX_EXPR_NODES = 48


def _is_num(e: Any) -> bool:
    return not isinstance(e, sympy.Basic) or e.is_number


def _num(v: float | None, fallback: Any) -> Any:
    return fallback if v is None else sympy.Float(v, 6)


def _too_big(e: sympy.Basic, limit: int = MAX_EXPR_NODES) -> bool:
    n = 0
    for _ in sympy.preorder_traversal(e):
        n += 1
        if n > limit:
            return True
    return False


def _float_inputs_are_constant(ga: "GraphAnalysis", node: fx.Node) -> bool:
    """No floating input is a user input or carries a gradient (only buffers/int-derived values)."""
    for a in node.all_input_nodes:
        if a.op == "placeholder" and is_float_node(a):
            return False
        if ga.requires_grad(a):
            return False
    return True


def _measured_stat(t: torch.Tensor) -> Stat:
    """RMS, mean and token correlation (rows along dim -2) of a concrete tensor."""
    x = t.detach().double()
    ms = float(x.pow(2).mean()) if x.numel() else 0.0
    corr = 0.0
    if x.dim() >= 2 and x.shape[-2] > 1 and ms > 0:
        rows = x.reshape(-1, x.shape[-2], x.shape[-1])
        tot = rows.sum(-2).pow(2).sum()
        diag = rows.pow(2).sum()
        n = rows.shape[-2]
        corr = float((tot - diag) / ((n - 1) * diag))
    return Stat(sympy.Float(math.sqrt(ms), 6), sympy.Float(min(max(corr, 0.0), 1.0), 6),
                sympy.Float(float(x.mean()) if x.numel() else 0.0, 6))


class _NotConst(Exception):
    pass


def _combine(stats: list[Stat]) -> Stat | None:
    """Sum of independent gradient contributions."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    if len(stats) == 1:
        return stats[0]
    total = sympy.Add(*[s.rms**2 for s in stats])
    corr = sympy.Add(*[s.rms**2 * s.corr for s in stats]) / total if total != 0 else sympy.Integer(0)
    return Stat(sympy.sqrt(total), corr)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the analysis' small-tensor numerics (quadrature, constant folding) on one intra-op
    thread: on a busy machine, OpenMP barriers made them ten times slower with two threads."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _token_corr(node: fx.Node, v: torch.Tensor) -> float:
    """Cross-token correlation of a float input ``[batch, tokens, features]`` (embeddings fed to
    the model): ``E[x_i . x_j] / E[x_i . x_i]`` over token pairs of one sample, from the example
    value. 0 for other layouts (a convolution's ``[batch, channels, length]`` has no tokens on dim 1).
    A shared component across a sequence changes attention outputs and weight gradients a lot."""
    if v.dim() != 3 or v.shape[1] < 2 or v.numel() == 0:
        return 0.0
    if any(u.op == "call_function" and getattr(lookup(u.target), "name", None) == "conv" for u in node.users):
        return 0.0
    with torch.no_grad():
        x = v.detach().double()
        ms = x.pow(2).sum(-1).mean()
        if ms <= 0:
            return 0.0
        S = x.shape[1]
        pair = (x.sum(1).pow(2).sum(-1).mean() - S * ms) / (S * (S - 1))
        return float(min(max(pair / ms, 0.0), 1.0))


def _forward_scale(node: fx.Node, rule: Any) -> bool:
    """A scale value that multiplies a forward activation: it keeps its symbolic expression (its
    value at the hints would lose the dependence on the runtime sizes, e.g. of an attention scale
    on the sequence length, and downstream predictions would no longer cancel it). Backward-only
    factors (``grad_scale`` arguments) are constants of the prediction at the hints."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        parent = lookup(node.args[0].target) if node.args[0].op == "call_function" else None
        if parent is not None and parent.kind == "scale":  # one value of combined scales
            rule = parent
    if rule is None or rule.kind != "scale":
        return False
    return any(u.op != "call_function" or u.target is not grad_scale for u in node.users)


def _has_float(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    if isinstance(val, (tuple, list)):
        return any(_has_float(v) for v in val)
    return False


def _rms(t: torch.Tensor) -> float:
    with torch.no_grad():
        return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _is_tensor_attr(root: torch.nn.Module, node: fx.Node) -> bool:
    try:
        return isinstance(_fetch_attr(root, str(node.target)), torch.Tensor)
    except AttributeError:
        return False


def _fetch_attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_NO_GRAD_OPS = {
    torch.ops.aten.detach.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.ones_like.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.full_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.new_ones.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_full.default,
}


def analyse_graph(
    gm: fx.GraphModule,
    *,
    hints: Mapping[sympy.Symbol, int] | None = None,
    example_values: Mapping[str, Any] | None = None,
    param_stats: Mapping[str, Stat] | None = None,
    strict: bool = False,
    backward: bool = True,
) -> GraphAnalysis:
    """Run the forward (and backward) scale analysis on ``gm`` and return it."""
    ga = GraphAnalysis(
        gm,
        hints=dict(hints or {}),
        example_values=dict(example_values or {}),
        param_stats=dict(param_stats or {}),
        strict=strict,
    )
    ga.run_forward()
    if backward:
        ga.run_backward()
    return ga


_ = (math, Iterable, normalized_kwargs)


def missing_message(missing: list[MissingOp]) -> str:
    """The message listing ops without a scale rule, and how to fix it."""
    lines = [f"{len(missing)} op(s) have no scale rule:"]
    lines += [f"  - {m}" for m in missing]
    lines.append(
        "Register a rule with unitscale_fx.analysis.register(...) (see docs/design.md) or exclude "
        "the owning module with Config(exclude=(...)); Config(strict=False), the default, leaves them "
        "unscaled, strict=True raises."
    )
    return "\n".join(lines)


def missing_in_graph(gm: fx.GraphModule) -> list[MissingOp]:
    """The ops an analysis of ``gm`` found without a rule, read off the nodes' records."""
    return [MissingOp(n.name, _op_name(n.target), source_line(n)) for n in gm.graph.nodes
            if getattr(n.meta.get(META_KEY), "missing", False)]


def _is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` calls an aten op that mutates one of its arguments."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.is_mutable
