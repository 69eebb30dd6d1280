"""Scale rules for aten ops: the one place where an op's effect on scale is written down.

Conventions (see docs/design.md, "The analysis"): every tensor is summarised by a
:class:`~unitscale_fx.analysis.record.Stat` (RMS, mean, cross-token correlation). Rules assume
that, at initialisation, different weights are independent of each other and of the activations,
and that the operands of a binary op are independent unless they are elementwise functions of the
same tensor (then the composite function is integrated exactly, see ``_pointwise``).
"""
from __future__ import annotations

import dataclasses
import functools

import math
import operator
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from . import sizefn
from .context import RuleContext, prod, sym
from .record import Stat
from .registry import Unsupported, lookup, register

aten = torch.ops.aten
ZERO = sympy.Integer(0)
ONE = sympy.Integer(1)


def _S(x: Any) -> sympy.Expr:
    return sympy.sympify(x) if not isinstance(x, (torch.SymInt, torch.SymFloat)) else sym(x)


def _require(s: Stat | None) -> Stat:
    if s is None:
        raise Unsupported("an input's scale is unknown")
    return s


def _seq_corr_factor(ctx: RuleContext, in_shape: Any, out_shape: Any, corr: Any) -> sympy.Expr:
    """Extra RMS factor when summing broadcast copies (or token rows) that are correlated.

    Summing ``n`` rows whose pairwise correlation is ``c`` within a sequence of ``S`` tokens
    (and 0 across sequences) has variance ``n * (1 + (S - 1) c)`` instead of ``n``. The copies
    summed are the dims of ``out_shape`` that ``in_shape`` broadcasts over; they include the
    sequence when their product covers the tokens of one sample (``ctx.analysis.tokens_per_sample``).
    Both shapes end with the feature dim (a parameter gradient's rows: pass ``rows + [1]``).
    """
    c = ctx.analysis.value_of(corr) if corr is not None else None
    if not c or c <= 0:
        return ONE
    S = ctx.analysis.tokens_per_sample(out_shape)
    if S is None or S <= 1:
        return ONE
    ins = list(in_shape)
    ins = [1] * (len(out_shape) - len(ins)) + ins
    copies = 1.0
    # the last dim is the feature dim: a sum over it (a per-token scale broadcast over the features,
    # as in a hand-written norm's ``x * rsqrt(mean(x^2))``) is not a sum over tokens, even when the
    # width happens to be a multiple of the sequence length
    for di, do in zip(ins[:-1], list(out_shape)[:-1]):
        vi, vo = ctx.analysis.value_of(di), ctx.analysis.value_of(do)
        if vi is not None and vo is not None and vi == 1 and vo > 1:
            copies *= vo
    if copies < S or copies % S:
        return ONE
    return sympy.sqrt(sympy.Float(1 + (S - 1) * min(float(c), 1.0), 6))


def _var(s: Stat) -> sympy.Expr:
    """Variance of an element (second moment minus squared mean)."""
    return sympy.Max(s.rms**2 - s.mean**2, ZERO) if s.mean != 0 else s.rms**2


def _numeric(ctx: RuleContext, e: Any) -> float:
    v = ctx.analysis.value_of(e)
    if v is None or not math.isfinite(v):
        raise Unsupported(f"could not evaluate {e} numerically")
    return v


def _safe_div(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    return a / b if b != 0 else ZERO


# ============================================================================ view-like ops
def _same(ctx: RuleContext) -> Stat:
    return _require(ctx.stat(0))


def _same_grad(ctx: RuleContext, g: Stat) -> dict:
    return {ctx.name_of(0): g}


def _numel_ratio_grad(ctx: RuleContext, g: Stat) -> dict:
    """Gradient of an op that picks/zero-pads elements: zeros where not picked."""
    ratio = _safe_div(ctx.numel(), ctx.numel(0))
    return {ctx.name_of(0): Stat(g.rms * sympy.sqrt(ratio), g.corr)}


_VIEW_OPS = [
    aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.t, aten.numpy_T,
    aten.unsqueeze, aten.squeeze, aten.flatten, aten.unflatten, aten.contiguous, aten.clone,
    aten.alias, aten.view_as, aten.reshape_as, aten.movedim, aten.swapaxes, aten.lift_fresh_copy,
    aten.roll, aten.flip, aten.expand_as if hasattr(aten, "expand_as") else aten.alias_copy,
    aten.detach_copy if hasattr(aten, "detach_copy") else aten.view_copy,
]
register(*_VIEW_OPS, name="view", kind="view", backward=_same_grad)(_same)


def _cast_fwd(ctx: RuleContext) -> Stat | None:
    s = ctx.stat(0)
    if s is None:
        return None
    return Stat(s.rms, s.corr, s.mean, s.trace)


register(aten.to, aten._to_copy, aten.type_as, name="cast", kind="view", backward=_same_grad)(_cast_fwd)


def _detach_fwd(ctx: RuleContext) -> Stat:
    return _require(ctx.stat(0))


register(aten.detach, name="detach", kind="view")(_detach_fwd)


def _expand_bwd(ctx: RuleContext, g: Stat) -> dict:
    # the gradient of a broadcast input is a sum over the broadcast copies
    ratio = _safe_div(ctx.numel(), ctx.numel(0))
    f = _seq_corr_factor(ctx, ctx.shape(0), ctx.shape(), g.corr)
    return {ctx.name_of(0): Stat(g.rms * sympy.sqrt(ratio) * f, g.corr)}


register(aten.expand, aten.repeat, aten.repeat_interleave, name="expand", kind="view", backward=_expand_bwd)(_same)

register(aten.slice, aten.select, aten.narrow, aten.diagonal, name="slice", kind="view",
         backward=_numel_ratio_grad)(_same)


def _index_fwd(ctx: RuleContext) -> Stat:
    return _require(ctx.stat(0))


def _index_bwd(ctx: RuleContext, g: Stat) -> dict:
    # rows picked once each on average: like an embedding lookup
    ratio = _safe_div(ctx.numel(), ctx.numel(0))
    return {ctx.name_of(0): Stat(g.rms * sympy.sqrt(ratio), g.corr)}


register(aten.index, aten.gather, aten.index_select, aten.take_along_dim, name="gather", kind="view",
         backward=_index_bwd)(_index_fwd)


def _pad_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    value = ctx.arg("value", 0.0) or 0.0
    if value != 0:
        raise Unsupported("non-zero constant padding")
    ratio = _safe_div(ctx.numel(0), ctx.numel())
    return Stat(s.rms * sympy.sqrt(ratio), s.corr, s.mean * ratio)


def _pad_bwd(ctx: RuleContext, g: Stat) -> dict:
    return {ctx.name_of(0): g}


register(aten.pad, aten.constant_pad_nd, name="pad", kind="view", backward=_pad_bwd)(_pad_fwd)


def _split_fwd(ctx: RuleContext) -> tuple:
    s = _require(ctx.stat(0))
    n = len(ctx.out_val)
    return tuple(Stat(s.rms, s.corr, s.mean) for _ in range(n))


def _split_bwd(ctx: RuleContext, grads: Any) -> dict:
    vals = ctx.out_val
    parts, weights = [], []
    for g, v in zip(grads, vals):
        n = prod(v.shape)
        weights.append(n)
        parts.append(g.rms**2 * n if g is not None else ZERO)
    total = sympy.Add(*weights)
    energy = sympy.Add(*parts)
    rms = sympy.sqrt(energy / total)
    # energy-weighted correlation of the concatenated gradient
    corr = _safe_div(sympy.Add(*[p * g.corr for p, g in zip(parts, grads) if g is not None]), energy)
    return {ctx.name_of(0): Stat(rms, corr)}


register(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.unsafe_split,
         name="split", kind="view", backward=_split_bwd)(_split_fwd)


def _getitem_fwd(ctx: RuleContext) -> Stat | None:
    parent, idx = ctx.node.args[0], ctx.node.args[1]
    rec = parent.meta.get("unitscale") if isinstance(parent, fx.Node) else None
    if rec is None or not isinstance(rec.fwd, tuple):
        return None
    return rec.fwd[idx]


register(operator.getitem, name="getitem", kind="view")(_getitem_fwd)


def _cat_fwd(ctx: RuleContext) -> Stat:
    tensors = ctx.arg("tensors")
    stats = ctx.stats("tensors")
    num, den, corr_num, mean_num = [], [], [], []
    for t, s in zip(tensors, stats):
        n = prod(t.meta["val"].shape)
        s = _require(s)
        num.append(s.rms**2 * n)
        corr_num.append(s.rms**2 * s.corr * n)
        mean_num.append(s.mean * n)
        den.append(n)
    total = sympy.Add(*den)
    sq = sympy.Add(*num)
    return Stat(sympy.sqrt(sq / total), _safe_div(sympy.Add(*corr_num), sq), sympy.Add(*mean_num) / total)


def _cat_bwd(ctx: RuleContext, g: Stat) -> dict:
    # each piece gets its positions' share of the gradient's energy (position_profile.py; flat: g)
    shares = ctx.analysis.cat_energy_shares(ctx.node)
    if shares is None:
        return {"tensors": [g for _ in ctx.arg("tensors")]}
    return {"tensors": [Stat(g.rms * sympy.Float(math.sqrt(f), 8), g.corr) if f != 1.0 else g for f in shares]}


register(aten.cat, aten.stack, aten.concat, name="cat", kind="view", backward=_cat_bwd)(_cat_fwd)


# ============================================================================ pointwise
def _std_normal_nodes_stat(ctx: RuleContext, s: Stat) -> tuple[float, float, float]:
    rms = _numeric(ctx, s.rms)
    mean = _numeric(ctx, s.mean)
    corr = min(max(_numeric(ctx, s.corr), 0.0), 0.999)
    std = math.sqrt(max(rms * rms - mean * mean, 0.0))
    return std, mean, corr


def _moments(ctx: RuleContext, fn: Callable, src_stat: Stat, key: Any = None):
    std, mean, corr = _std_normal_nodes_stat(ctx, src_stat)
    if isinstance(key, tuple) and len(key) == 3 and key[0] == "scale" and key[2] == "x":
        # ``c * x``: exact moments, no quadrature
        c, ms = float(key[1]), std * std + mean * mean
        return abs(c) * math.sqrt(ms), c * mean, abs(c), (std * std * corr + mean * mean) / ms if ms else 1.0, 1.0
    if key is None:
        return _moments_uncached(fn, std, mean, corr)
    # same elementwise chain at (nearly) the same input statistics: every layer of a model
    ck = (key, float(f"{std:.4g}"), float(f"{mean:.4g}"), float(f"{corr:.3g}"))
    hit = _MOMENTS_MEMO.get(ck)
    if hit is None:
        hit = _MOMENTS_MEMO[ck] = _moments_uncached(fn, std, mean, corr)
    return hit


#: memo of elementwise-chain moments keyed by the chain's structure and rounded input statistics
_MOMENTS_MEMO: dict = {}


def _moments_uncached(fn: Callable, std: float, mean: float, corr: float):
    from .gaussian import pointwise_moments

    if std == 0.0:
        with torch.no_grad():
            v = float(fn(torch.tensor([mean], dtype=torch.float64))[0])
        return v, v, 0.0, 1.0, 0.0
    if mean > 0 and std < _DELTA_CV * mean:
        # a concentrated positive value (a mean of squares, a variance): the Gaussian's tails would
        # reach negative values where rsqrt/log/sqrt are undefined; linearise around the mean
        return _delta_moments(fn, mean, std, corr)
    try:
        # 16 panels: within 1e-9 of the 64-panel default for the activations of the zoo, ~4x faster
        m = pointwise_moments(fn, std, corr=corr, mean=mean, n=16)
    except ValueError:
        if mean > 0:
            return _delta_moments(fn, mean, std, corr)
        raise
    return m.rms, m.mean, m.grad_rms, m.corr, m.grad_corr


#: coefficient of variation under which a positive input is treated with the delta method
_DELTA_CV = 0.25


def _delta_moments(fn: Callable, mean: float, std: float, corr: float):
    """First-order (delta-method) moments of ``fn(x)`` for ``x`` concentrated around ``mean > 0``."""
    h = max(mean * 1e-4, 1e-12)
    with torch.no_grad():
        x = torch.tensor([mean - h, mean, mean + h], dtype=torch.float64)
        y = fn(x)
    f0, d = float(y[1]), float(y[2] - y[0]) / (2 * h)
    var = (d * std) ** 2
    ms = f0 * f0 + var
    out_corr = (f0 * f0 + var * corr) / ms if ms > 0 else 0.0
    return math.sqrt(ms), f0, abs(d), out_corr, 1.0


def _source(ctx: RuleContext, name: str | int) -> tuple[fx.Node, Callable[[torch.Tensor], torch.Tensor]]:
    a = ctx.arg(name)
    s = ctx.analysis.fwd_of(a)
    if s is not None and s.trace is not None:
        return s.trace
    return a, (lambda x: x), "x"


def _op_key(ctx: RuleContext, children: tuple) -> tuple:
    """Structural key of an elementwise op applied to traced children (for the moments cache)."""
    consts = tuple(repr(a) for a in ctx.node.args if not isinstance(a, fx.Node))
    consts += tuple(f"{k}={v!r}" for k, v in ctx.node.kwargs.items() if not isinstance(v, fx.Node))
    return (str(ctx.node.target), consts, children)


def _pointwise(ctx: RuleContext, op: Callable[..., torch.Tensor], tensor_args: list[str]) -> Stat:
    """Statistics of ``op(*tensor_args)`` when all tensor args are functions of one tensor."""
    srcs = [_source(ctx, n) for n in tensor_args]
    src = srcs[0][0]
    if any(s[0] is not src for s in srcs):
        raise _NotSingleSource
    fns = [s[1] for s in srcs]
    key = _op_key(ctx, tuple(s[2] for s in srcs))

    def composite(x: torch.Tensor) -> torch.Tensor:
        return op(*[f(x) for f in fns])

    src_stat = _require(ctx.analysis.fwd_of(src))
    rms, mean, _, corr, _ = _moments(ctx, composite, src_stat, key)
    return Stat(sympy.Float(rms, 6), sympy.Float(min(max(corr, 0.0), 1.0), 6), sympy.Float(mean, 6),
                trace=(src, composite, key))


def _pointwise_bwd(ctx: RuleContext, g: Stat) -> dict:
    rec = ctx.node.meta.get("unitscale")
    s: Stat | None = rec.fwd if rec is not None else None
    if s is None or s.trace is None:
        return {}
    src, fn, key = s.trace
    src_stat = _require(ctx.analysis.fwd_of(src))
    _, _, grad_rms, _, grad_corr = _moments(ctx, fn, src_stat, key)
    return {src: Stat(g.rms * sympy.Float(grad_rms, 6), g.corr)}


class _NotSingleSource(Exception):
    pass


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[RuleContext], Stat]:
    def forward(ctx: RuleContext) -> Stat:
        return _pointwise(ctx, fn, [ctx.name_of(0)])

    return forward


_UNARY: dict[Any, tuple[str, Callable]] = {
    aten.gelu: ("gelu", None),  # approximate= handled below
    aten.silu: ("silu", torch.nn.functional.silu),
    aten.relu: ("relu", torch.relu),
    aten.tanh: ("tanh", torch.tanh),
    aten.sigmoid: ("sigmoid", torch.sigmoid),
    aten.exp: ("exp", torch.exp),
    aten.log: ("log", torch.log),
    aten.rsqrt: ("rsqrt", torch.rsqrt),
    aten.sqrt: ("sqrt", torch.sqrt),
    aten.neg: ("neg", torch.neg),
    aten.abs: ("abs", torch.abs),
    aten.erf: ("erf", torch.erf),
    aten.sin: ("sin", torch.sin),
    aten.cos: ("cos", torch.cos),
    aten.reciprocal: ("reciprocal", torch.reciprocal),
    aten.square: ("square", torch.square),
    aten.softplus: ("softplus", torch.nn.functional.softplus),
    aten.mish: ("mish", torch.nn.functional.mish),
    aten.elu: ("elu", torch.nn.functional.elu),
    aten.hardtanh: ("hardtanh", torch.nn.functional.hardtanh),
    aten.leaky_relu: ("leaky_relu", torch.nn.functional.leaky_relu),
    aten.relu6: ("relu6", torch.nn.functional.relu6),
}


def _gelu_fwd(ctx: RuleContext) -> Stat:
    approx = ctx.arg("approximate", "none") or "none"
    return _pointwise(ctx, lambda x: torch.nn.functional.gelu(x, approximate=approx), [ctx.name_of(0)])


register(aten.gelu, name="gelu", kind="pointwise", backward=_pointwise_bwd)(_gelu_fwd)
for _op, (_name, _fn) in _UNARY.items():
    if _op is aten.gelu:
        continue
    register(_op, name=_name, kind="pointwise", backward=_pointwise_bwd)(_unary(_fn))


def _pow_fwd(ctx: RuleContext) -> Stat:
    e = ctx.arg("exponent")
    if isinstance(e, fx.Node):
        raise Unsupported("tensor exponent")
    return _pointwise(ctx, lambda x: torch.pow(x, e), [ctx.name_of(0)])


register(aten.pow, name="pow", kind="pointwise", backward=_pointwise_bwd)(_pow_fwd)


def _clamp_fwd(ctx: RuleContext) -> Stat:
    lo, hi = ctx.arg("min"), ctx.arg("max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        raise Unsupported("tensor clamp bounds")
    return _pointwise(ctx, lambda x: torch.clamp(x, lo, hi), [ctx.name_of(0)])


register(aten.clamp, aten.clip, name="clamp", kind="pointwise", backward=_pointwise_bwd)(_clamp_fwd)


# ---- binary arithmetic ----------------------------------------------------------------------
def _size_operand(x: Any) -> sympy.Expr | None:
    """A graph value that is a size (``x.sum(1) / x.shape[1]`` divides by a ``sym_size`` node), as an
    expression in the shape symbols; None for anything else."""
    from .context import sym

    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    if isinstance(v, (torch.SymInt, torch.SymFloat)) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return sympy.sympify(sym(v))
    return None


def _sized_scale(ctx: RuleContext, kind: str) -> tuple[str, sympy.Expr] | None:
    """``(tensor operand name, factor)`` for a product or quotient of a floating tensor and a size."""
    a_name, b_name = ctx.name_of(0), ctx.name_of(1)
    a, b = ctx.arg(a_name), ctx.arg(b_name)
    if kind not in ("mul", "div") or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    sb = _size_operand(b)
    if sb is not None and _is_float(a):
        return a_name, (sb if kind == "mul" else 1 / sb)
    sa = _size_operand(a)
    if sa is not None and kind == "mul" and _is_float(b):
        return b_name, sa
    return None


def _binary_fwd(kind: str) -> Callable[[RuleContext], Stat]:
    def forward(ctx: RuleContext) -> Stat:
        a_name, b_name = ctx.name_of(0), ctx.name_of(1)
        a, b = ctx.arg(a_name), ctx.arg(b_name)
        alpha = ctx.arg("alpha", 1)
        a_t, b_t = isinstance(a, fx.Node), isinstance(b, fx.Node)
        sized = _sized_scale(ctx, kind)
        if sized is not None:
            return _require(ctx.analysis.fwd_of(ctx.arg(sized[0]))).scaled(sized[1])
        if a_t and b_t and not (ctx.analysis.fwd_of(a) and ctx.analysis.fwd_of(b)):
            # one side has no floating statistics (e.g. an integer tensor): unsupported
            if not (_is_float(a) and _is_float(b)):
                raise Unsupported("binary op with a non-floating tensor operand")
        op = _BINARY_TORCH[kind]
        if kind in ("mul", "div") and a_t and not b_t and isinstance(b, (int, float)):
            sa = _require(ctx.analysis.fwd_of(a))
            c = b if kind == "mul" else 1.0 / b
            st = sa.scaled(c)
            if sa.trace is not None:
                src, f, k = sa.trace
                return Stat(st.rms, st.corr, st.mean, trace=(src, lambda x, f=f, c=c: f(x) * c, ("scale", c, k)))
            return Stat(st.rms, st.corr, st.mean, trace=(a, lambda x, c=c: x * c, ("scale", c, "x")))
        tensors = [n for n, t in ((a_name, a_t), (b_name, b_t)) if t]
        # elementwise function of one source (e.g. x * tanh(x)): integrate exactly
        try:
            if kind in ("add", "sub"):
                f = (lambda x, y: op(x, y, alpha=alpha)) if (a_t and b_t) else None
            else:
                f = None
            if a_t and b_t:
                return _pointwise(ctx, f or op, tensors)
            if a_t:
                return _pointwise(ctx, (lambda x: op(x, b, alpha=alpha)) if kind in ("add", "sub") else (lambda x: op(x, b)), tensors)
            if b_t:
                return _pointwise(ctx, (lambda y: op(a, y, alpha=alpha)) if kind in ("add", "sub") else (lambda y: op(a, y)), tensors)
        except (_NotSingleSource, Unsupported):
            pass
        return _independent(ctx, kind, a, b, alpha)

    return forward


def _is_float(n: Any) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point()


_BINARY_TORCH: dict[str, Callable] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
}


def _scalar_stat(x: Any) -> Stat:
    v = sympy.sympify(float(x))
    return Stat(sympy.Abs(v), ONE, v)


def _as_broadcast(ctx: RuleContext, name: str, st: Stat) -> Stat:
    """``st`` as the op sees the operand: one broadcast over every dim but the last (a per-feature
    gain, scale or bias) is the same vector at every token, i.e. token correlation 1, whatever the
    correlation of its own rows (a parameter's Stat has 0 there)."""
    out = list(ctx.shape())
    dims = list(ctx.shape(name))
    rows_out = out[:-1]
    if not rows_out or all(d == 1 for d in rows_out) or st.corr == 1:
        return st
    if all(d == 1 for d in dims[:-1]):
        return Stat(st.rms, ONE, st.mean, st.trace)
    return st


def _independent(ctx: RuleContext, kind: str, a: Any, b: Any, alpha: Any) -> Stat:
    sa = _require(ctx.analysis.fwd_of(a)) if isinstance(a, fx.Node) else _scalar_stat(a)
    sb = _require(ctx.analysis.fwd_of(b)) if isinstance(b, fx.Node) else _scalar_stat(b)
    if isinstance(a, fx.Node):
        sa = _as_broadcast(ctx, ctx.name_of(0), sa)
    if isinstance(b, fx.Node):
        sb = _as_broadcast(ctx, ctx.name_of(1), sb)
    if kind in ("add", "sub"):
        al = sympy.sympify(alpha) * (-1 if kind == "sub" else 1)
        va, vb = _var(sa), _var(sb) * al**2
        mean = sa.mean + al * sb.mean
        rms2 = va + vb + mean**2
        corr_num = (sa.rms**2 * sa.corr) + al**2 * sb.rms**2 * sb.corr + 2 * al * sa.mean * sb.mean
        return Stat(sympy.sqrt(rms2), _clip01(_safe_div(corr_num, rms2)), mean)
    if kind == "mul":
        return Stat(sa.rms * sb.rms, sa.corr * sb.corr, sa.mean * sb.mean)
    if kind == "div":
        if isinstance(b, fx.Node):
            rinv, minv, _, cinv, _ = _moments(ctx, torch.reciprocal, sb)
            return Stat(sa.rms * rinv, sa.corr * cinv, sa.mean * minv)
        return sa.scaled(1 / sympy.sympify(float(b)))
    raise Unsupported(kind)


def _clip01(e: sympy.Expr) -> sympy.Expr:
    if e.is_number:
        return sympy.Float(min(max(float(e), 0.0), 1.0), 6)
    return e


def _binary_bwd(kind: str):
    def backward(ctx: RuleContext, g: Stat) -> dict:
        rec = ctx.node.meta.get("unitscale")
        s: Stat | None = rec.fwd if rec is not None else None
        if s is not None and s.trace is not None:
            return _pointwise_bwd(ctx, g)
        a_name, b_name = ctx.name_of(0), ctx.name_of(1)
        a, b = ctx.arg(a_name), ctx.arg(b_name)
        sized = _sized_scale(ctx, kind)
        if sized is not None:  # a tensor times / over a size: the size carries no gradient
            return {sized[0]: Stat(g.rms * sympy.Abs(sized[1]), g.corr)}
        alpha = sympy.sympify(ctx.arg("alpha", 1))
        out: dict = {}
        out_numel = ctx.numel()

        def bcast(name: str, st: Stat, other: Stat | None = None) -> Stat:
            ratio = _safe_div(out_numel, ctx.numel(name))
            if ratio == 1:
                return st
            # the copies summed are g * other: correlated as g times other
            c = st.corr * other.corr if other is not None else st.corr
            f = _seq_corr_factor(ctx, ctx.shape(name), ctx.shape(), c)
            return Stat(st.rms * sympy.sqrt(ratio) * f, st.corr)

        sa = ctx.analysis.fwd_of(a) if isinstance(a, fx.Node) else _scalar_stat(a)
        sb = ctx.analysis.fwd_of(b) if isinstance(b, fx.Node) else _scalar_stat(b)
        if kind in ("add", "sub"):
            if isinstance(a, fx.Node):
                out[a_name] = bcast(a_name, g)
            if isinstance(b, fx.Node):
                out[b_name] = bcast(b_name, Stat(g.rms * sympy.Abs(alpha), g.corr))
        elif kind == "mul":
            # (a constant that differs by position meets a gradient that does: position_profile.py)
            tf = ctx.analysis.table_profile_factor
            if isinstance(a, fx.Node) and sb is not None:
                out[a_name] = bcast(a_name, Stat(g.rms * sb.rms * tf(ctx.node, b), g.corr), sb)
            if isinstance(b, fx.Node) and sa is not None:
                out[b_name] = bcast(b_name, Stat(g.rms * sa.rms * tf(ctx.node, a), g.corr), sa)
        elif kind == "div":
            if isinstance(b, fx.Node):
                rinv, _, _, _, _ = _moments(ctx, torch.reciprocal, _require(sb))
                out[a_name] = bcast(a_name, Stat(g.rms * rinv, g.corr))
                # d(a/b)/db = -a/b^2
                r2, _, _, _, _ = _moments(ctx, lambda x: x ** -2, _require(sb))
                out[b_name] = bcast(b_name, Stat(g.rms * _require(sa).rms * r2, g.corr))
            elif isinstance(a, fx.Node):
                out[a_name] = Stat(g.rms / sympy.Abs(sympy.sympify(float(b))), g.corr)
        return out

    return backward


# the in-place forms appear in training-IR graphs on fresh intermediates (HF's ``x += bias``): the
# value they produce follows the same rule
for _k, _ops in {
    "add": (aten.add, aten.add_),
    "sub": (aten.sub, aten.sub_),
    "mul": (aten.mul, aten.mul_),
    "div": (aten.div, aten.div_),
}.items():
    register(*_ops, name=_k, kind="add" if _k in ("add", "sub") else "mul", backward=_binary_bwd(_k))(_binary_fwd(_k))


def _rsub_fwd(ctx: RuleContext) -> Stat:
    other = ctx.arg("other")
    alpha = ctx.arg("alpha", 1)
    if isinstance(other, fx.Node):
        raise Unsupported("rsub with two tensors")
    return _pointwise(ctx, lambda x: other - alpha * x, [ctx.name_of(0)])


register(aten.rsub, name="rsub", kind="pointwise", backward=_pointwise_bwd)(_rsub_fwd)


def _where_fwd(ctx: RuleContext) -> Stat:
    cond = ctx.const("condition")
    x, y = ctx.arg("input"), ctx.arg("other")
    frac = float(cond.float().mean()) if isinstance(cond, torch.Tensor) else 0.5
    sx = ctx.analysis.fwd_of(x) if isinstance(x, fx.Node) else _scalar_stat(x)
    sy = ctx.analysis.fwd_of(y) if isinstance(y, fx.Node) else _scalar_stat(y)
    sx, sy = _require(sx), _require(sy)
    if not all(math.isfinite(_numeric(ctx, s.rms)) for s in (sx, sy)):
        raise Unsupported("where with an infinite branch")
    rms2 = frac * sx.rms**2 + (1 - frac) * sy.rms**2
    return Stat(sympy.sqrt(rms2), sx.corr, frac * sx.mean + (1 - frac) * sy.mean)


def _where_bwd(ctx: RuleContext, g: Stat) -> dict:
    cond = ctx.const("condition")
    frac = float(cond.float().mean()) if isinstance(cond, torch.Tensor) else 0.5
    out = {}
    if isinstance(ctx.arg("input"), fx.Node):
        out["input"] = Stat(g.rms * math.sqrt(frac), g.corr)
    if isinstance(ctx.arg("other"), fx.Node):
        out["other"] = Stat(g.rms * math.sqrt(1 - frac), g.corr)
    return out


register(aten.where, name="where", kind="view", backward=_where_bwd)(_where_fwd)


def _masked_fill_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    value = ctx.arg("value")
    mask = ctx.const("mask")
    frac_kept = 1.0 - float(mask.float().mean()) if isinstance(mask, torch.Tensor) else 1.0
    if _is_mask_value(value):
        # attention-score masking (-inf or the dtype's lowest value, as HF writes it): the
        # statistics describe the entries that are not masked out
        return Stat(s.rms, s.corr, s.mean)
    if isinstance(value, (int, float)) and value != 0:
        raise Unsupported("masked_fill with a finite non-zero value")
    return Stat(s.rms * math.sqrt(frac_kept), s.corr, s.mean * frac_kept)


def _masked_fill_bwd(ctx: RuleContext, g: Stat) -> dict:
    mask = ctx.const("mask")
    frac_kept = 1.0 - float(mask.float().mean()) if isinstance(mask, torch.Tensor) else 1.0
    return {ctx.name_of(0): Stat(g.rms * math.sqrt(frac_kept), g.corr)}


register(aten.masked_fill, name="masked_fill", kind="view", backward=_masked_fill_bwd)(_masked_fill_fwd)


# ============================================================================ dropout
def _dropout_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    p = float(ctx.arg("p", 0.0))
    train = bool(ctx.arg("train", True))
    if not train or p == 0.0:
        return Stat(s.rms, s.corr, s.mean)
    k = 1 / math.sqrt(1 - p)
    return Stat(s.rms * sympy.Float(k, 8), s.corr * (1 - p), s.mean)


def _dropout_bwd(ctx: RuleContext, g: Stat) -> dict:
    p = float(ctx.arg("p", 0.0))
    train = bool(ctx.arg("train", True))
    if not train or p == 0.0:
        return {ctx.name_of(0): g}
    return {ctx.name_of(0): Stat(g.rms * sympy.Float(1 / math.sqrt(1 - p), 8), g.corr * (1 - p))}


register(aten.dropout, aten.feature_dropout, aten.alpha_dropout, name="dropout", kind="dropout",
         backward=_dropout_bwd)(_dropout_fwd)


# ============================================================================ matmuls
def _contract(sa: Stat, sb: Stat, k: sympy.Expr) -> sympy.Expr:
    """RMS of sum_k a_k b_k for independent operands."""
    return sympy.sqrt(k) * sa.rms * sb.rms


def _mm_fwd(ctx: RuleContext) -> Stat:
    a, b = ctx.name_of(0), ctx.name_of(1)
    sa, sb = _require(ctx.stat(a)), _require(ctx.stat(b))
    k = ctx.shape(a)[-1]
    # probabilities @ values (hand-written attention): the values' shared part survives averaging
    probs = _softmax_probs_scaled(ctx.arg(a), ctx)
    if probs is not None:
        p2, factor = probs
        return Stat(factor * sb.rms * sympy.sqrt(sb.corr + (1 - sb.corr) * p2), _att_out_corr(sb, p2), ZERO)
    return Stat(_contract(sa, sb, k), _mm_corr(ctx, a, b, sa, sb), ZERO)


def _mm_corr(ctx: RuleContext, a: str, b: str, sa: Stat, sb: Stat) -> sympy.Expr:
    # x @ W keeps x's token correlation; bias-free contraction of two activations: product
    if ctx.analysis.requires_grad(ctx.arg(b)) and _is_param_like(ctx.arg(b)):
        return sa.corr
    if _is_param_like(ctx.arg(a)):
        return sb.corr
    return sa.corr


def _is_param_like(n: Any) -> bool:
    """Whether ``n`` is a parameter, possibly behind view ops (transpose, reshape...)."""
    seen = 0
    while isinstance(n, fx.Node) and seen < 8:
        if n.op == "get_attr":
            return True
        if n.op == "call_function" and n.target in _PASS_THROUGH and n.args:
            n = n.args[0]
            seen += 1
            continue
        return False
    return False


_PASS_THROUGH = set()


def _mm_bwd(ctx: RuleContext, g: Stat) -> dict:
    a, b = ctx.name_of(0), ctx.name_of(1)
    sa, sb = _require(ctx.stat(a)), _require(ctx.stat(b))
    sa_shape, sb_shape = ctx.shape(a), ctx.shape(b)
    n = sb_shape[-1]
    # tokens contracted in the weight gradient: every dim of ``a`` but the last, divided by the
    # batch dims that ``b`` has too (bmm)
    batch_b = prod(sb_shape[:-2])
    rows = _safe_div(prod(sa_shape[:-1]), batch_b)
    out = {}
    probs = _softmax_probs_scaled(ctx.arg(a), ctx)
    out[a] = Stat(g.rms * sympy.sqrt(n) * sb.rms, g.corr)
    if probs is not None:
        # grad_v_j = factor * sum_i p_ij g_i: per key, E|grad_v_j|^2 = g^2 (sq p2 + gc sq (sq - 1) O) / sk,
        # O = sum_j p_ij p_i'j the overlap of two queries' weights, ~1/sk for diffuse rows (gc: the
        # gradient's token correlation: 1 behind a mean over the tokens, where every query sends the
        # same g and each key collects its column sum of weights)
        p2, factor = probs
        sq = sa_shape[-2]
        sk = sa_shape[-1]
        ms = sq * p2 / sk + g.corr * sq * (sq - 1) / (sk * sk)
        out[b] = Stat(factor * g.rms * sympy.sqrt(ms), _probs_grad_v_corr(ctx, ms * sk / sq, g.corr, sq, sk))
    else:
        f = _seq_corr_factor(ctx, [1] * len(sa_shape), list(sa_shape[:-1]) + [1], g.corr * sa.corr)
        out[b] = Stat(g.rms * sympy.sqrt(rows) * sa.rms * f, ZERO)
    return out


register(aten.mm, aten.bmm, aten.matmul, name="matmul", kind="matmul", backward=_mm_bwd)(_mm_fwd)


def _linear_fwd(ctx: RuleContext) -> Stat:
    sx, sw = _require(ctx.stat("input")), _require(ctx.stat("weight"))
    k = ctx.shape("input")[-1]
    rms2 = k * sx.rms**2 * sw.rms**2
    corr_num = rms2 * sx.corr
    b = ctx.stat("bias")
    if b is not None:
        rms2 = rms2 + b.rms**2
        corr_num = corr_num + b.rms**2
    return Stat(sympy.sqrt(rms2), _clip01(_safe_div(corr_num, rms2)), ZERO)


def _linear_bwd(ctx: RuleContext, g: Stat) -> dict:
    sx, sw = _require(ctx.stat("input")), _require(ctx.stat("weight"))
    n = ctx.shape("weight")[0]
    tokens = ctx.tokens("input")
    rows = list(ctx.shape("input"))[:-1]
    fw = _seq_corr_factor(ctx, [1] * (len(rows) + 1), rows + [1], g.corr * sx.corr)
    out = {"input": Stat(g.rms * sympy.sqrt(n) * sw.rms, g.corr),
           "weight": Stat(g.rms * sympy.sqrt(tokens) * sx.rms * fw, ZERO)}
    if ctx.is_tensor("bias"):
        fb = _seq_corr_factor(ctx, [1] * (len(rows) + 1), rows + [1], g.corr)
        out["bias"] = Stat(g.rms * sympy.sqrt(tokens) * fb, ZERO)
    return out


register(aten.linear, name="linear", kind="matmul", backward=_linear_bwd)(_linear_fwd)


def _addmm_fwd(ctx: RuleContext) -> Stat:
    # positions, not names: addmm calls its operands (self, mat1, mat2), baddbmm (self, batch1, batch2)
    sb = _require(ctx.stat(0))
    s1, s2 = _require(ctx.stat(1)), _require(ctx.stat(2))
    beta, alpha = sympy.sympify(ctx.arg("beta", 1)), sympy.sympify(ctx.arg("alpha", 1))
    k = ctx.shape(1)[-1]
    mm2 = alpha**2 * k * s1.rms**2 * s2.rms**2
    rms2 = mm2 + beta**2 * sb.rms**2
    # a bias broadcast over the rows is the same for every token (correlation 1); a full-size
    # input (ALiBi scores in baddbmm) keeps its own correlation
    bc = ONE if len(ctx.shape(0)) < len(ctx.shape()) or ctx.shape(0)[-2:-1] in ([], [ONE]) else sb.corr
    corr = _safe_div(mm2 * s1.corr + beta**2 * sb.rms**2 * bc, rms2)
    return Stat(sympy.sqrt(rms2), _clip01(corr), ZERO)


def _addmm_bwd(ctx: RuleContext, g: Stat) -> dict:
    s1, s2 = _require(ctx.stat(1)), _require(ctx.stat(2))
    alpha, beta = sympy.sympify(ctx.arg("alpha", 1)), sympy.sympify(ctx.arg("beta", 1))
    n = ctx.shape(2)[-1]
    rows = ctx.shape(1)[-2]
    out = {ctx.name_of(1): Stat(g.rms * sympy.Abs(alpha) * sympy.sqrt(n) * s2.rms, g.corr),
           ctx.name_of(2): Stat(g.rms * sympy.Abs(alpha) * sympy.sqrt(rows) * s1.rms, ZERO)}
    if ctx.is_tensor(0):
        ratio = _safe_div(ctx.numel(), ctx.numel(0))
        out[ctx.name_of(0)] = Stat(g.rms * sympy.Abs(beta) * sympy.sqrt(ratio), ZERO)
    return out


register(aten.addmm, aten.baddbmm, name="addmm", kind="matmul", backward=_addmm_bwd)(_addmm_fwd)


def _conv_fwd(ctx: RuleContext) -> Stat:
    sx, sw = _require(ctx.stat("input")), _require(ctx.stat("weight"))
    wshape = ctx.shape("weight")
    k = prod(wshape[1:])  # in_channels/groups * kernel elements
    rms2 = k * sx.rms**2 * sw.rms**2
    b = ctx.stat("bias")
    if b is not None:
        rms2 = rms2 + b.rms**2
    return Stat(sympy.sqrt(rms2), ZERO, ZERO)


def _conv_bwd(ctx: RuleContext, g: Stat) -> dict:
    sx, sw = _require(ctx.stat("input")), _require(ctx.stat("weight"))
    wshape = ctx.shape("weight")
    out_shape = ctx.shape()
    positions = _safe_div(ctx.numel(), out_shape[1])  # batch * spatial outputs
    n_out = wshape[0]
    kernel = prod(wshape[2:])
    # each input element is used by ~kernel/stride^d output positions
    stride = ctx.arg("stride", [1])
    spread = _safe_div(kernel, prod(stride)) if stride else kernel
    # parameter gradients sum over the output positions of a sample, whose gradients (and inputs)
    # correlate across positions: sqrt(1 + (P - 1) c) as for token rows
    per_sample = ctx.analysis.value_of(_safe_div(positions, out_shape[0]))

    def coherent(c: Any) -> sympy.Expr:
        cv = ctx.analysis.value_of(c)
        if not cv or cv <= 0 or not per_sample or per_sample <= 1:
            return ONE
        return sympy.sqrt(sympy.Float(1 + (per_sample - 1) * min(cv, 1.0), 6))

    out = {"input": Stat(g.rms * sympy.sqrt(n_out * spread) * sw.rms, ZERO),
           "weight": Stat(g.rms * sympy.sqrt(positions) * sx.rms * coherent(g.corr * sx.corr), ZERO)}
    if ctx.is_tensor("bias"):
        out["bias"] = Stat(g.rms * sympy.sqrt(positions) * coherent(g.corr), ZERO)
    return out


register(aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten._convolution,
         name="conv", kind="matmul", backward=_conv_bwd)(_conv_fwd)


def _einsum_fwd(ctx: RuleContext) -> Stat:
    eq = ctx.arg("equation")
    ops = ctx.arg("tensors")
    if len(ops) != 2:
        raise Unsupported("einsum with other than two operands")
    lhs, rhs = eq.replace(" ", "").split("->")
    ia, ib = lhs.split(",")
    contracted = [c for c in ia if c in ib and c not in rhs]
    va = ops[0].meta["val"]
    k = prod([va.shape[ia.index(c)] for c in contracted])
    sa, sb = [_require(s) for s in ctx.stats("tensors")]
    return Stat(_contract(sa, sb, k), sa.corr if not _is_param_like(ops[0]) else sb.corr, ZERO)


def _einsum_bwd(ctx: RuleContext, g: Stat) -> dict:
    eq = ctx.arg("equation")
    ops = ctx.arg("tensors")
    lhs, rhs = eq.replace(" ", "").split("->")
    ia, ib = lhs.split(",")
    va, vb = ops[0].meta["val"], ops[1].meta["val"]
    sa, sb = [_require(s) for s in ctx.stats("tensors")]
    # grad_a sums over the indices of b that are not in a
    kb = prod([vb.shape[ib.index(c)] for c in ib if c not in ia])
    ka = prod([va.shape[ia.index(c)] for c in ia if c not in ib])
    return {"tensors": [Stat(g.rms * sympy.sqrt(kb) * sb.rms, g.corr), Stat(g.rms * sympy.sqrt(ka) * sa.rms, ZERO)]}


register(aten.einsum, name="einsum", kind="matmul", backward=_einsum_bwd)(_einsum_fwd)


# ============================================================================ embedding
def _embedding_fwd(ctx: RuleContext) -> Stat:
    sw = _require(ctx.stat("weight"))
    idx = ctx.const("indices")
    corr = ZERO
    if isinstance(idx, torch.Tensor) and idx.numel() > 1 and idx.dim() >= 1:
        flat = idx.reshape(-1, idx.shape[-1]) if idx.dim() > 1 else idx.reshape(1, -1)
        # probability that two tokens of the same sequence are the same token
        same = 0.0
        for row in flat[: min(len(flat), 64)]:
            counts = torch.bincount(row.long().clamp_min(0)).double()
            n = float(row.numel())
            same += float(((counts * (counts - 1)).sum()) / max(n * (n - 1), 1.0))
        corr = sympy.Float(same / min(len(flat), 64), 6)
    return Stat(sw.rms, corr, ZERO)


def _embedding_bwd(ctx: RuleContext, g: Stat) -> dict:
    """A row's gradient sums the gradients of the tokens that look it up: ``n / rows`` of them on
    average. Tokens of one sequence whose gradients correlate (``g.corr``) add coherently when they
    share a row (BERT's token-type table: every token hits row 0): ``E|grad_v|^2 = sum_s n_vs (1 +
    (n_vs - 1) c)`` over the sequences ``s``, read off the example's indices."""
    rows = ctx.shape("weight")[0]
    n = ctx.numel("indices")
    idx = ctx.const("indices")
    factor = sympy.sqrt(_safe_div(n, rows))
    c = ctx.analysis.value_of(g.corr)
    if isinstance(idx, torch.Tensor) and idx.numel() > 1 and c and c > 0:
        seqs = idx.reshape(-1, idx.shape[-1]) if idx.dim() > 1 else idx.reshape(1, -1)
        pairs = 0.0
        for seq in seqs[:256]:
            counts = torch.bincount(seq.long().clamp_min(0)).double()
            pairs += float((counts * (counts - 1)).sum())
        pairs_per_token = pairs / float(seqs[:256].numel())
        factor = factor * sympy.sqrt(sympy.Float(1 + min(c, 1.0) * pairs_per_token, 6))
    return {"weight": Stat(g.rms * factor, ZERO)}


register(aten.embedding, name="embedding", kind="embedding", backward=_embedding_bwd)(_embedding_fwd)


# ============================================================================ norms
def _layer_norm_fwd(ctx: RuleContext) -> Stat:
    sx = _require(ctx.stat("input"))
    sw = ctx.stat("weight")
    sb = ctx.stat("bias")
    w2 = sw.rms**2 if sw is not None else ONE
    b2 = sb.rms**2 if sb is not None else ZERO
    rms2 = w2 + b2
    corr = _safe_div(w2 * sx.corr + b2, rms2)
    return Stat(sympy.sqrt(rms2), _clip01(corr), ZERO)


def _layer_norm_bwd(ctx: RuleContext, g: Stat) -> dict:
    sx = _require(ctx.stat("input"))
    sw = ctx.stat("weight")
    w = sw.rms if sw is not None else ONE
    mean = sx.mean
    std = sympy.sqrt(_var(sx)) if mean != 0 else sx.rms
    tokens = ctx.tokens("input", feature_dims=len(ctx.arg("normalized_shape") or [1]))
    f = ctx.analysis.norm_profile_factor(ctx.node, ctx.arg("input"))  # unequal positions (position_profile.py)
    out = {"input": Stat(g.rms * w / std * f * _norm_width_factor(ctx, centred=True), g.corr)}
    out.update(_norm_param_grads(ctx, g, sx, tokens))
    return out


def _norm_param_grads(ctx: RuleContext, g: Stat, sx: Stat, tokens: Any) -> dict:
    """Gain and bias gradients of a norm: sums over the token rows of ``g * x_hat`` and ``g``."""
    shp = list(ctx.shape("input"))
    nf = len(ctx.arg("normalized_shape") or [1])
    rows = shp[: len(shp) - nf] + [1]
    out = {}
    if ctx.is_tensor("weight"):
        f = _seq_corr_factor(ctx, [1] * len(rows), rows, g.corr * sx.corr)
        out["weight"] = Stat(g.rms * sympy.sqrt(tokens) * f, ZERO)
    if ctx.is_tensor("bias"):
        f = _seq_corr_factor(ctx, [1] * len(rows), rows, g.corr)
        out["bias"] = Stat(g.rms * sympy.sqrt(tokens) * f, ZERO)
    return out


register(aten.layer_norm, name="layer_norm", kind="norm", backward=_layer_norm_bwd)(_layer_norm_fwd)


def _rms_norm_fwd(ctx: RuleContext) -> Stat:
    sx = _require(ctx.stat("input"))
    sw = ctx.stat("weight")
    w2 = sw.rms**2 if sw is not None else ONE
    return Stat(sympy.sqrt(w2), sx.corr, ZERO)


def _rms_norm_bwd(ctx: RuleContext, g: Stat) -> dict:
    sx = _require(ctx.stat("input"))
    sw = ctx.stat("weight")
    w = sw.rms if sw is not None else ONE
    tokens = ctx.tokens("input", feature_dims=len(ctx.arg("normalized_shape") or [1]))
    f = ctx.analysis.norm_profile_factor(ctx.node, ctx.arg("input"))
    out = {"input": Stat(g.rms * w / sx.rms * f * _norm_width_factor(ctx, centred=False), g.corr)}
    out.update(_norm_param_grads(ctx, g, sx, tokens))
    return out


def _norm_width_factor(ctx: RuleContext, centred: bool) -> sympy.Expr:
    """Finite-width gain of a norm's input gradient over ``g / sigma``, for Gaussian rows of ``n`` features
    and a gradient independent of them. RMS norm: the per-row ``1 / ms`` averages to ``n / (n - 2)`` times
    ``1 / E[ms]`` (Jensen) and removing the radial component keeps ``(n - 1) / n`` of the gradient's
    energy: ``sqrt((n - 1) / (n - 2))``. LayerNorm: the row variance has ``n - 1`` degrees of freedom,
    ``E[1 / var] = n / ((n - 3) sigma^2)``, and removing the mean and the radial part keeps ``(n - 2) / n``:
    ``sqrt((n - 2) / (n - 3))``. 2^0.05 at n = 16, 2^0.003 at 256 (both checked by Monte Carlo)."""
    shape = ctx.arg("normalized_shape") or []
    n = ctx.analysis.value_of(prod(list(shape))) if shape else None
    lost = 3 if centred else 2
    if n is None or n <= lost:
        return ONE
    return sympy.Float(math.sqrt((n - lost + 1) / (n - lost)), 8)


register(aten.rms_norm, name="rms_norm", kind="norm", backward=_rms_norm_bwd)(_rms_norm_fwd)


# ============================================================================ reductions
def _reduced(ctx: RuleContext) -> sympy.Expr:
    return _safe_div(ctx.numel(0), ctx.numel())


def _mean_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    n = _reduced(ctx)
    var = _var(s)
    rms2 = s.mean**2 + var * (s.corr + (1 - s.corr) / n) if _reduces_tokens(ctx) else s.mean**2 + var / n
    return Stat(sympy.sqrt(rms2), s.corr, s.mean)


def _reduces_tokens(ctx: RuleContext) -> bool:
    dims = ctx.arg("dim")
    shp = ctx.shape(0)
    if dims is None or dims == []:
        return True
    dims = [dims] if isinstance(dims, int) else list(dims)
    last = len(shp) - 1
    return any((d % len(shp)) != last for d in dims)


def _reduces_every_token(ctx: RuleContext) -> bool:
    """The reduction covers every dim between the batch and the features, and keeps the features: a
    pooled representation, whose gradient is the same vector at every token of a sequence (token
    correlation 1). A reduction to a scalar (a loss) is not one: the gradient it sends back is a
    constant that the ops before it multiply by their own, token-dependent, derivatives."""
    dims = ctx.arg("dim")
    shp = ctx.shape(0)
    if dims is None or dims == []:
        return False
    nd = len(shp)
    red = {d % nd for d in ([dims] if isinstance(dims, int) else list(dims))}
    if nd < 3 or nd - 1 in red or 0 in red:
        return False
    # the reduced dims must hold every token of a sample: not, e.g., the top-k experts of an MoE's
    # ``[tokens, k, features]`` combine, whose leading dim holds the (flattened) tokens
    tokens = ctx.analysis.tokens_per_sample(shp)
    sizes = [ctx.analysis.value_of(shp[d]) for d in red]
    if tokens is None or any(v is None for v in sizes):
        return False
    reduced = math.prod(sizes)
    return reduced >= tokens and reduced % tokens == 0


def _broadcast_grad_corr(ctx: RuleContext, g: Stat) -> Any:
    """Token correlation of a reduction's gradient, which is ``g`` broadcast back over the reduced dims."""
    return ONE if _reduces_every_token(ctx) else g.corr


def _mean_bwd(ctx: RuleContext, g: Stat) -> dict:
    n = _reduced(ctx)
    return {ctx.name_of(0): Stat(g.rms / n, _broadcast_grad_corr(ctx, g))}


def _sum_fwd(ctx: RuleContext) -> Stat:
    topk_sum = _topk_row_sum(ctx)
    if topk_sum is not None:
        return topk_sum
    s = _mean_fwd(ctx)
    n = _reduced(ctx)
    return Stat(s.rms * n, s.corr, s.mean * n)


def _sum_bwd(ctx: RuleContext, g: Stat) -> dict:
    return {ctx.name_of(0): Stat(g.rms, _broadcast_grad_corr(ctx, g), g.mean)}


register(aten.mean, name="mean", kind="reduction", backward=_mean_bwd)(_mean_fwd)
register(aten.sum, name="sum", kind="reduction", backward=_sum_bwd)(_sum_fwd)


# ============================================================================ softmax / attention
def _softmax_probs(node: Any, ctx: Any) -> sympy.Expr | None:
    """E[sum_j p_j^2] if ``node`` is a softmax output (through dropout/casts/views/scalings)."""
    found = _softmax_probs_scaled(node, ctx)
    return found[0] if found is not None else None




def _is_scale_value(x: Any) -> bool:
    """A scalar scale the transform computed (``scale_value``, ``size_scale``, a pick of ``size_scales``)."""
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return False
    if x.target is operator.getitem and x.args and isinstance(x.args[0], fx.Node):
        x = x.args[0]
        if x.op != "call_function":
            return False
    rule = lookup(x.target)
    return rule is not None and rule.kind == "scale" and rule.name != "grad_scale"


def _softmax_probs_scaled(node: Any, ctx: Any) -> tuple[sympy.Expr, sympy.Expr] | None:
    """``(E[sum_j p_j^2], factor)`` if ``node`` is ``factor *`` a softmax output, through dropout,
    casts, views, ``grad_scale`` and multiplies by a scale value (the unit-scaling pass multiplies
    the probabilities of a hand-written attention to unit RMS). ``ctx``: a rule context or the
    graph analysis."""
    an = getattr(ctx, "analysis", ctx)
    factor = ONE
    seen = 0
    while isinstance(node, fx.Node) and seen < 8 and node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", None)
        if packet in (aten.softmax, aten._softmax):
            p2 = node.meta.get("_us_sum_p2")
            return (p2, factor) if p2 is not None else None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        rule = lookup(node.target)
        passes = packet in _VIEW_PACKETS or packet is aten.dropout
        if passes or (rule is not None and rule.name in ("dropout", "grad_scale")):
            node, seen = node.args[0], seen + 1
            continue
        if packet is aten.mul and len(node.args) == 2:
            other = node.args[1]
            if isinstance(other, (int, float)) and not isinstance(other, bool) and other > 0:
                factor = factor * sympy.sympify(other)
            elif _is_scale_value(other):
                st = an.fwd_of(other)
                if st is None:
                    return None
                factor = factor * st.rms
            else:
                return None
            node, seen = node.args[0], seen + 1
            continue
        return None
    return None


def _att_out_corr(sv: Stat, p2: sympy.Expr) -> sympy.Expr:
    out2 = sv.corr + (1 - sv.corr) * p2
    return _clip01(_safe_div(sv.corr + (1 - sv.corr) * sympy.Min(p2, ONE) * sympy.Float(0.5), out2))


#: an additive mask value at or below this masks a logit out (-inf, or the dtype's lowest value as HF writes it)
_MASKED_BELOW = -1e30


def _is_mask_value(x: Any) -> bool:
    """A scalar fill/branch value that masks logits out rather than contributing a value."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (not math.isfinite(x) or x < _MASKED_BELOW)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The boolean 'allowed' form of a boolean or additive mask."""
    if mask.dtype == torch.bool:
        return mask
    m = mask > _MASKED_BELOW
    return m & torch.isfinite(mask) if mask.is_floating_point() else m


#: logit variances up to which the softmax-moment closed forms are fitted (docs/attention_scaling.md)
_FITTED_S2 = 4.0

_VIEW_PACKETS = (aten.view, aten.reshape, aten._unsafe_view, aten.to, aten._to_copy, aten.clone,
                 aten.contiguous, aten.expand)


def _constant_logit_bias(ctx: RuleContext, node: Any) -> tuple[torch.Tensor, Any] | None:
    """``(bias, s2)`` for softmax logits ``random + constant bias`` (``baddbmm(alibi, q, k^T)``, ``l +
    bias``), masks applied after it included in ``bias`` as ``-inf``; ``s2`` the variance across
    keys of the random part. ``None`` when there is no finite non-zero constant part."""
    shape = tuple(int(_numeric(ctx, d)) for d in ctx.shape(0))
    masks: list[torch.Tensor] = []
    cur = node
    for _ in range(8):
        if not (isinstance(cur, fx.Node) and cur.op == "call_function" and cur.args):
            return None
        packet = getattr(cur.target, "overloadpacket", None)
        if packet is aten.masked_fill:
            m = ctx.analysis.const_value(cur.args[1])
            if m is None:
                return None
            masks.append(~m.bool())
            cur = cur.args[0]
            continue
        additive = _additive_mask(ctx, cur)
        if additive is not None:
            masks.append(_allowed(additive[1]))
            cur = additive[0]
            continue
        if packet in _VIEW_PACKETS:
            cur = cur.args[0]
            continue
        bias = random = None
        if packet is aten.baddbmm and isinstance(cur.args[0], fx.Node) and not ctx.analysis.requires_grad(cur.args[0]):
            cv = ctx.analysis.const_value(cur.args[0])
            s1, s2_ = ctx.analysis.fwd_of(cur.args[1]), ctx.analysis.fwd_of(cur.args[2])
            if cv is None or s1 is None or s2_ is None:
                return None
            beta, alpha = float(cur.kwargs.get("beta", 1)), float(cur.kwargs.get("alpha", 1))
            k = _numeric(ctx, sym(cur.args[1].meta["val"].shape[-1]))
            bias = beta * cv
            random = alpha ** 2 * k * s1.rms ** 2 * s2_.rms ** 2 * (1 - s2_.corr)
        elif packet is aten.add and len(cur.args) >= 2:
            for x, y in ((cur.args[0], cur.args[1]), (cur.args[1], cur.args[0])):
                if isinstance(x, fx.Node) and isinstance(y, fx.Node) and ctx.analysis.requires_grad(x) \
                        and not ctx.analysis.requires_grad(y):
                    cv = ctx.analysis.const_value(y)
                    sx = ctx.analysis.fwd_of(x)
                    if isinstance(cv, torch.Tensor) and cv.is_floating_point() and sx is not None:
                        bias, random = cv, _var(sx) * (1 - sx.corr)
                        break
        if bias is None or not bool(torch.isfinite(bias).all()) or not bool((bias != 0).any()):
            return None
        try:
            here = tuple(int(_numeric(ctx, sym(d))) for d in cur.meta["val"].shape)
            full = bias.double().expand(here).reshape(shape).clone()
            for m in masks:
                full = full.masked_fill(~m.expand(shape), float("-inf"))
        except (RuntimeError, TypeError):
            return None
        return full, random
    return None


def _biased_sum_p2(bias: torch.Tensor, s2: float, rows: int = 512, draws: int = 8) -> float:
    """``E[sum_j p_j^2]`` for ``softmax(bias + N(0, s2))`` over the last dim (Monte Carlo, fixed seed,
    up to ``rows`` rows of ``bias`` evenly spaced; ``-inf`` entries are masked keys)."""
    flat = bias.reshape(-1, bias.shape[-1])
    if flat.shape[0] > rows:
        flat = flat[torch.linspace(0, flat.shape[0] - 1, rows).long()]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((draws,) + tuple(flat.shape), generator=gen, dtype=torch.float64) * math.sqrt(max(s2, 0.0))
    p = torch.softmax(flat.unsqueeze(0) + noise, -1)
    return float(p.pow(2).sum(-1).mean())


def _additive_mask(ctx: RuleContext, node: Any) -> tuple[fx.Node, torch.Tensor] | None:
    """``(logits, mask)`` if ``node`` is ``logits + mask`` with a constant mask holding masking values
    (-inf or the dtype's lowest) and zeros; ``None`` otherwise (a finite constant bias is not a mask)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and getattr(node.target, "overloadpacket", None) is aten.add and len(node.args) >= 2):
        return None
    for x, y in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not (isinstance(x, fx.Node) and isinstance(y, fx.Node) and ctx.analysis.requires_grad(x)):
            continue
        cv = ctx.analysis.const_value(y)
        if not isinstance(cv, torch.Tensor) or not cv.is_floating_point() or cv.dim() < 2:
            continue
        masked = cv <= _MASKED_BELOW
        if bool(masked.any()) and bool((cv[~masked] == 0).all()):
            return x, cv
    return None


def _mask_rows(mask: torch.Tensor | None, sq: int, sk: int) -> tuple[str, torch.Tensor | None]:
    """Classify a boolean or additive mask of broadcastable shape [..., sq, sk]."""
    if mask is None:
        return "full", None
    m = _allowed(mask)
    m = m.reshape(-1, m.shape[-2], m.shape[-1]) if m.dim() >= 2 else m.reshape(1, 1, -1)
    m = m.expand(m.shape[0], sq, sk) if m.shape[-2] == 1 else m
    if bool(m.all()):
        return "full", None
    tril = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    if m.shape[-2:] == tril.shape and bool((m == tril).all()):
        return "causal", None
    return "general", m.sum(-1).double()  # allowed keys per query


#: attention statistics by (mask kind, rounded input statistics, shapes)
_ATTENTION_MEMO: dict = {}


def _attention_numeric(mask_kind: str, hm: Any, kw: dict) -> Any:
    """:func:`attention_stats` with numeric arguments (memoised)."""
    from .attention_stats import attention_stats

    memo_key = (mask_kind, hm, tuple(sorted(kw.items(), key=lambda kv: kv[0])))
    st = _ATTENTION_MEMO.get(memo_key)
    if st is None:
        if mask_kind == "causal":
            st = attention_stats(causal=True, **kw)
        elif mask_kind == "general":
            st = attention_stats(causal=False, valid_keys=hm, **kw)
        else:
            st = attention_stats(causal=False, **kw)
        _ATTENTION_MEMO[memo_key] = st
    return st


def _attention_field(mask_kind: str, base: tuple, field_name: str, sizes: tuple[int, ...]) -> float:
    """One RMS field of the attention statistics at query/key lengths ``sizes`` (a size function)."""
    sq, sk = sizes
    kw = dict(base, sq=sympy.Integer(sq), sk=sympy.Integer(sk))
    return float(getattr(_attention_numeric(mask_kind, None, kw), field_name))


def _attention_stats(ctx: RuleContext, q: Stat, k: Stat, v: Stat, sq, sk, d, scale, mask_kind,
                     counts, kv_repeat, g: Stat | None = None, bias_var: Any = ZERO):
    from .attention_stats import attention_stats, sum_p2_full

    # q/k scales enter the softmax non-linearly: use their values at the hints (keeps the
    # expressions small); v and grad_out scales are pure factors and stay symbolic.
    def num(e):
        v_ = ctx.analysis.value_of(e)
        return sympy.Float(v_, 6) if v_ is not None else e

    # The closed forms in the sequence length (digamma sums over the softmax poles) run to
    # hundreds of sympy nodes, past what ``tame`` keeps symbolic: build them at the hinted lengths
    # directly (about 10x faster than building them symbolically and evaluating afterwards).
    def count(e):
        v_ = ctx.analysis.value_of(e)
        return sympy.Integer(int(round(v_))) if v_ is not None else e

    sym_sq, sym_sk = sympy.sympify(sq), sympy.sympify(sk)
    sq, sk, d = count(sq), count(sk), count(d)
    kw = dict(sq=sq, sk=sk, d=d, scale=num(scale), q_rms=num(q.rms), k_rms=num(k.rms), v_rms=ONE,
              q_corr=num(q.corr), k_corr=num(k.corr), v_corr=num(v.corr),
              grad_out_rms=ONE, grad_out_corr=num(g.corr) if g is not None else ZERO,
              kv_repeat=kv_repeat, kv_coupling=_kv_coupling(ctx))
    if bias_var != 0:  # (only then: the memo keys and size functions of other attentions stay as they were)
        kw["logit_bias_var"] = bias_var
    def rounded(v):
        return sympy.Float(float(f"{float(v):.3g}"), 6) if isinstance(v, sympy.Basic) and v.is_number else v

    kw = {k: rounded(v) if k not in ("sq", "sk", "d", "kv_repeat") else v for k, v in kw.items()}
    hm = None
    if mask_kind == "general":
        # average over the distinct allowed-key counts (padding, sliding windows...): harmonic mean
        hm = sympy.Float(float(1.0 / (1.0 / counts.clamp(min=1)).mean()), 6)
    st = _attention_numeric(mask_kind, hm, kw)
    dynamic = (sym_sq.free_symbols or sym_sk.free_symbols) and all(
        x.is_Symbol or x.is_Integer for x in (sym_sq, sym_sk))
    if dynamic and mask_kind in ("causal", "full"):
        # the RMS fields as functions of the (symbolic) lengths, evaluated by the same code at
        # other lengths (analysis/sizefn.py): the scales follow the sequence length at runtime.
        # (A general mask's allowed-key counts come from the example inputs: they stay constant.)
        base = tuple(sorted((k_, v_) for k_, v_ in kw.items() if k_ not in ("sq", "sk")))
        fields = {}
        for f in ("out_rms", "grad_q_rms", "grad_k_rms", "grad_v_rms"):
            slot = sizefn.register(("attention", mask_kind, f, base), f"attention_{f}",
                                   functools.partial(_attention_field, mask_kind, base, f))
            fields[f] = sizefn.SizeFunction(slot, sym_sq, sym_sk)
        st = dataclasses.replace(st, **fields)
    gr = g.rms if g is not None else ONE

    def small(e):  # expressions past the size limit are evaluated at the hints (as ``tame`` does)
        return ctx.analysis.tame(Stat(e)).rms

    st = dataclasses.replace(st, out_rms=small(st.out_rms), grad_q_rms=small(st.grad_q_rms),
                             grad_k_rms=small(st.grad_k_rms), grad_v_rms=small(st.grad_v_rms))
    v = Stat(small(v.rms), v.corr)
    gr = small(gr)
    return dataclasses.replace(
        st, out_rms=v.rms * st.out_rms, grad_q_rms=gr * v.rms * st.grad_q_rms,
        grad_k_rms=gr * v.rms * st.grad_k_rms, grad_v_rms=gr * st.grad_v_rms)


def _projection_source(node: Any) -> fx.Node | None:
    """The activation that ``node`` is a linear projection of: walking up through views, splits,
    head repeats, casts, backward-only scales, scalar multiplies and bias adds to a matmul with a
    weight, then through the same kind of ops on its activation operand. ``None`` otherwise (e.g.
    a rotary embedding on the way: its position-dependent multiplies end the walk)."""
    cur, through_matmul = node, False
    for _ in range(64):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return cur if through_matmul and isinstance(cur, fx.Node) else None
        rule = lookup(cur.target)
        name = rule.name if rule is not None else None
        tensors = [a for a in cur.args if isinstance(a, fx.Node)]
        if rule is not None and rule.kind == "matmul" and not through_matmul:
            acts = [a for a in cur.all_input_nodes if not _is_param_like(a)]
            if len(acts) != 1 or len(acts) == len(cur.all_input_nodes):
                return None
            cur, through_matmul = acts[0], True
            continue
        if rule is not None and (rule.kind == "view" or name in ("grad_scale", "dropout")) and tensors:
            cur = tensors[0]
            continue
        if name in ("mul", "div") and len(cur.args) >= 2:
            a0, a1 = cur.args[0], cur.args[1]
            if isinstance(a0, fx.Node) and (not isinstance(a1, fx.Node) or (name == "mul" and _is_scale_value(a1))):
                cur = a0  # times a number or a scale value
                continue
        if name == "add" and len(tensors) == 2 and not through_matmul:
            act = [a for a in tensors if not _is_param_like(a)]
            if len(act) == 1:
                cur = act[0]  # a bias
                continue
        return cur if through_matmul else None
    return None


def _is_scale_value(n: fx.Node) -> bool:
    rule = lookup(n.target) if n.op == "call_function" else None
    return rule is not None and rule.kind == "scale"


def _kv_coupling(ctx: RuleContext) -> sympy.Expr:
    """``1/D`` when the attention's keys and values are projections of one activation of width
    ``D`` (self-attention, fused or separate k/v projections, cross-attention on one memory),
    else 0 (see ``kv_coupling`` in :func:`~unitscale_fx.analysis.attention_stats.attention_stats`)."""
    k, v = ctx.arg("key"), ctx.arg("value")
    if not (isinstance(k, fx.Node) and isinstance(v, fx.Node)):
        return ZERO
    ks, vs = _projection_source(k), _projection_source(v)
    if ks is None or ks is not vs:
        return ZERO
    val = ks.meta.get("val")
    width = ctx.analysis.value_of(sym(val.shape[-1])) if isinstance(val, torch.Tensor) and val.dim() else None
    return sympy.Float(1.0 / width, 8) if width else ZERO


def _sdpa_parts(ctx: RuleContext):
    q, k, v = (_require(ctx.stat(n)) for n in ("query", "key", "value"))
    qs, ks = ctx.shape("query"), ctx.shape("key")
    sq, sk, d = qs[-2], ks[-2], qs[-1]
    scale = ctx.arg("scale")
    scale = sympy.sympify(scale) if scale is not None else 1 / sympy.sqrt(d)
    kv_repeat, bias_var = ONE, ZERO
    if ctx.arg("enable_gqa", False):
        kv_repeat = _safe_div(qs[-3], ks[-3])
    if ctx.arg("is_causal", False):
        kind, counts = "causal", None
    elif ctx.arg("attn_mask") is None:
        kind, counts = "full", None
    else:
        mask = ctx.const("attn_mask")
        if mask is not None:
            n_q, n_k = int(_numeric(ctx, sq)), int(_numeric(ctx, sk))
            kind, counts = _mask_rows(mask, n_q, n_k)
            if mask.is_floating_point() and bool((torch.isfinite(mask) & (mask != 0)).any()):
                # a constant bias in the mask (ALiBi): the logit variance that gives the weights the
                # concentration the bias gives them, folded into the query scale
                q, bias_var = _fold_constant_bias(ctx, q, k, d, scale, mask, kind, counts, n_q, n_k)
        else:
            # a learned additive bias (T5/ALiBi-style position bias), possibly plus a constant mask
            bias, const_part = _split_learned_mask(ctx, ctx.arg("attn_mask"))
            if bias is None:
                raise Unsupported("attention mask could not be evaluated from the example inputs")
            kind, counts = "full", None
            if const_part is not None:
                kind, counts = _mask_rows(const_part, int(_numeric(ctx, sq)), int(_numeric(ctx, sk)))
            # the bias adds its variance to the logits (attention_stats' ``logit_bias_var``): it
            # concentrates the weights, but is no part of q (folding it into q's scale, as before,
            # over-predicted grad_k = scale * sum_i dS_ij q_i by sqrt(1 + b^2 / s2) and more)
            b = ctx.analysis.value_of(bias.rms) or 0.0
            if b > 0 and math.isfinite(b):
                bias_var = sympy.Float(b * b, 6)
    return q, k, v, sq, sk, d, scale, kind, counts, kv_repeat, bias_var


def _p2_numeric(kind: str, n_q: int, n_k: int, s2: float) -> float:
    """``E[sum_j p_j^2]`` of the closed forms for a full or causal mask, as a float."""
    from .attention_stats import sum_p2_causal, sum_p2_full

    if kind == "causal":
        return float(sum_p2_causal(n_q, s2))
    return float(sum_p2_full(n_k, s2))


@functools.lru_cache(maxsize=256)
def _effective_s2(kind: str, n_q: int, n_k: int, target: float) -> float:
    """The logit variance whose closed-form ``E[sum p^2]`` is ``target`` (bisection, full/causal)."""
    lo, hi = 0.0, _FITTED_S2
    if target <= _p2_numeric(kind, n_q, n_k, lo):
        return 0.0
    if target >= _p2_numeric(kind, n_q, n_k, hi):
        return hi
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if _p2_numeric(kind, n_q, n_k, mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _fold_constant_bias(ctx: RuleContext, q: Stat, k: Stat, d: Any, scale: Any, mask: torch.Tensor, kind: str,
                        counts: Any, n_q: int, n_k: int) -> tuple[Stat, Any]:
    """``(q, bias_var)`` such that the closed forms see the weights' concentration under ``mask``'s bias:
    the extra logit variance ``s2_eff - s2`` the bias stands for (``attention_stats``' ``logit_bias_var``),
    or, when the bias spreads the weights instead (``s2_eff < s2``), ``q`` rescaled."""
    vals = [ctx.analysis.value_of(x) for x in (scale, d, q.rms, k.rms, k.corr)]
    if any(v is None for v in vals) or kind == "general":
        return q, ZERO
    sc, dd, qr, kr, kc = vals
    s2 = sc * sc * dd * qr * qr * kr * kr * (1 - kc)
    if s2 <= 0:
        return q, ZERO
    full = mask.double().expand(*mask.shape[:-2], n_q, n_k) if mask.dim() >= 2 else mask.double().expand(n_q, n_k)
    target = _biased_sum_p2(full, s2)
    s2_eff = _effective_s2(kind, n_q, n_k, round(target, 6))
    if s2_eff >= s2:
        return q, sympy.Float(s2_eff - s2, 6)
    return Stat(q.rms * sympy.Float(math.sqrt(max(s2_eff, 1e-12) / s2), 6), q.corr, q.mean), ZERO


def _split_learned_mask(ctx: RuleContext, node: Any) -> tuple[Stat | None, torch.Tensor | None]:
    """For ``mask = bias (+ constant)``: the statistics of the learned part and the constant part."""
    const_part = None
    cur = node
    for _ in range(8):
        if not isinstance(cur, fx.Node):
            return None, None
        st = ctx.analysis.fwd_of(cur) if ctx.analysis.requires_grad(cur) else None
        rms = ctx.analysis.value_of(st.rms) if st is not None else None
        if rms is not None and math.isfinite(rms) and rms < 1e4:  # not polluted by mask values
            return st, const_part
        if cur.op == "call_function" and getattr(cur.target, "overloadpacket", None) is aten.add:
            a, b = cur.args[0], cur.args[1]
            for x, y in ((a, b), (b, a)):
                cv = ctx.analysis.const_value(y) if isinstance(y, fx.Node) else None
                if cv is not None and isinstance(x, fx.Node) and ctx.analysis.requires_grad(x):
                    const_part, cur = cv, x
                    break
            else:
                return None, None
            continue
        if cur.op == "call_function" and getattr(cur.target, "overloadpacket", None) is aten.where:
            # where(allowed, bias, -big) (T5's decoder: a causal mask applied to the position bias)
            cond, a, b = cur.args[0], cur.args[1], cur.args[2]
            cv = ctx.analysis.const_value(cond) if isinstance(cond, fx.Node) else None
            if cv is None or cv.dtype != torch.bool:
                return None, None
            for keep, other, allowed in ((a, b, cv), (b, a, ~cv)):
                if isinstance(keep, fx.Node) and ctx.analysis.requires_grad(keep) and _is_mask_value(other):
                    const_part = allowed if const_part is None else _allowed(const_part) & allowed
                    cur = keep
                    break
            else:
                return None, None
            continue
        if cur.op == "call_function" and cur.args and isinstance(cur.args[0], fx.Node):
            cur = cur.args[0]  # views, slices, casts, expands of the mask
            continue
        return None, None
    return None, None


def _sdpa_fwd(ctx: RuleContext) -> Stat:
    q, k, v, sq, sk, d, scale, kind, counts, rep, bv = _sdpa_parts(ctx)
    st = _attention_stats(ctx, q, k, v, sq, sk, d, scale, kind, counts, rep, bias_var=bv)
    p = float(ctx.arg("dropout_p", 0.0) or 0.0)
    rms, corr = st.out_rms, st.out_corr
    if kind == "causal":
        rms, corr = _causal_position_structure(ctx, v, st, sq)
    if p > 0:
        rms = rms * sympy.Float(1 / math.sqrt(1 - p), 8)
    ctx.node.meta["_us_attention"] = dict(kind=kind, sum_p2=st.sum_p2)
    return Stat(rms, _clip01(corr), ZERO)


def _causal_position_structure(ctx: RuleContext, v: Stat, st: Any, sq: Any) -> tuple[Any, Any]:
    """Causal attention's output RMS and correlation with the values' position structure, and the
    output's token covariance (``analysis.tokcov``, see analysis/causal_structure.py).

    The closed forms take the values' token correlation as exchangeable. Where the values carry a
    covariance left by an earlier causal attention, the difference it makes to the output's mean
    square and correlation (exchangeable attention weights with the closed form's ``E sum p^2`` at
    each position) is added. Numbers at the hinted length, like ``corr``: a constant factor on the
    closed form, which keeps its dependence on the sequence length.
    """
    from . import causal_structure as cs
    from .attention_stats import _f_poles, _qnorm_nodes

    an = ctx.analysis
    vals = [an.value_of(x) for x in (sq, st.out_rms, v.rms, v.corr, st.out_corr, st.logit_var, ctx.shape("query")[-1])]
    if any(x is None for x in vals) or not 2 <= vals[0] <= cs.MAX_LEN or not vals[2]:
        return st.out_rms, st.out_corr
    n, out_rms, v_rms, cv, oc, s2, d = vals
    if s2 > _FITTED_S2:  # peaked attention: each query keeps a few keys, the values' structure hardly matters
        return st.out_rms, st.out_corr
    n = int(round(n))
    # E sum p^2 over n = 1 ... S keys (sum_p2_full's pole mixture, vectorised over n; query-norm nodes)
    keys = torch.arange(1, n + 1, dtype=torch.float64)
    f = torch.zeros(n, dtype=torch.float64)
    for x, w in _qnorm_nodes(float(d)):
        for wk, ak in _f_poles(float(s2) * float(x)):
            f += float(w) * float(wk) * float(ak) / (keys - 1 + float(ak))
    vnode = ctx.arg("value")
    k_v = an.tokcov.get(vnode) if isinstance(vnode, fx.Node) else None
    cv = min(max(cv, 0.0), 1.0)
    if k_v is None or k_v.shape[0] != n:
        k_v = cs.exchangeable(cv, n)
    else:  # the Stat's average correlation stands; the carried covariance adds its shape
        k_v = cs.with_average_corr(k_v, cv)
    an.attn_f[ctx.node] = f  # where along the sequence its input gradients sit (propagate._attention_profile)
    d_ms, d_corr, k_out = cs.structure_correction(k_v, cv, f)
    an.tokcov[ctx.node] = k_out
    ms = (out_rms / v_rms) ** 2
    if d_ms == 0.0 and d_corr == 0.0 or ms <= 0:
        return st.out_rms, st.out_corr
    new_ms = max(ms + d_ms, 1e-12)
    corr = min(max(oc + d_corr, 0.0), 1.0)
    return st.out_rms * sympy.Float(math.sqrt(new_ms / ms), 8), sympy.Float(corr, 6)


def _sdpa_bwd(ctx: RuleContext, g: Stat) -> dict:
    q, k, v, sq, sk, d, scale, kind, counts, rep, bv = _sdpa_parts(ctx)
    p = float(ctx.arg("dropout_p", 0.0) or 0.0)
    if p > 0:
        g = Stat(g.rms * sympy.Float(1 / math.sqrt(1 - p), 8), g.corr)
    st = _attention_stats(ctx, q, k, v, sq, sk, d, scale, kind, counts, rep, g=g, bias_var=bv)
    out = {"query": Stat(st.grad_q_rms, _clip01(sympy.sympify(st.grad_q_corr))), "key": Stat(st.grad_k_rms, ZERO),
           "value": Stat(st.grad_v_rms, _grad_v_corr(ctx, st, g, sq, sk, rep))}
    mask = ctx.arg("attn_mask")
    if isinstance(mask, fx.Node) and ctx.analysis.requires_grad(mask):
        # d loss / d bias = d loss / d logits; grad_q = scale * grad_logits @ k gives its scale. A mask
        # broadcast over the batch (or the heads) sums the logits' gradients of the copies, which are
        # independent: sqrt(copies)
        per_logit = _safe_div(st.grad_q_rms, sympy.Abs(scale) * k.rms * sympy.sqrt(sk))
        qs = ctx.shape("query")
        logits = prod(list(qs[:-1])) * sk  # [batch..., heads, sq, sk]
        copies = _safe_div(logits, ctx.numel("attn_mask"))
        out["attn_mask"] = Stat(per_logit * sympy.sqrt(sympy.Max(copies, ONE)), ZERO)
    return out


def _probs_grad_v_corr(ctx: RuleContext, p2: Any, gc: Any, sq: Any, sk: Any) -> sympy.Expr:
    """:func:`_grad_v_corr` for a hand-written ``probs @ v``: ``E|grad_v|^2 = sq * p2 / sk`` per key
    (units of ``g^2``), i.e. ``p2`` per query."""
    vals = [ctx.analysis.value_of(x) for x in (p2, gc, sq, sk)]
    if any(v is None for v in vals):
        return ZERO
    p2_, gc_, nq, nk = vals
    return _key_corr(p2_, gc_, nq, nk)


def _grad_v_corr(ctx: RuleContext, st: Any, g: Stat, sq: Any, sk: Any, rep: Any) -> sympy.Expr:
    """Correlation between the value gradients of two keys, ``grad_v_j = sum_i p_ij g_i`` (SDPA)."""
    vals = [ctx.analysis.value_of(x) for x in (st.grad_v_rms, g.rms, sq, sk, rep, g.corr)]
    if any(v is None for v in vals) or not vals[1]:
        return ZERO
    gv, gr, nq, nk, r, gc = vals
    return _key_corr((gv / gr) ** 2 * nk / (r * nq), gc, nq, nk)


def _key_corr(diag: float, gc: float, nq: float, nk: float) -> sympy.Expr:
    """Rows of ``p`` sum to one, so summed over all key pairs the value gradients carry ``sq (1 + gc
    (sq - 1))`` (in units of ``g^2``); the diagonal part is ``sq * diag`` (``diag``: ``sk ms(grad_v) /
    (sq g^2)``, the per-query share). The off-diagonal remainder, spread over ``sk (sk - 1)`` pairs, is
    the correlation: 1 for uniform non-causal attention (every key gets the same gradient), about
    ``1 / ln(sq)`` for causal."""
    if nk <= 1 or diag <= 0:
        return ZERO
    corr = (1 + gc * (nq - 1) - diag) / ((nk - 1) * diag)
    return sympy.Float(min(max(corr, 0.0), 1.0), 6)


register(aten.scaled_dot_product_attention, name="sdpa", kind="attention", backward=_sdpa_bwd)(_sdpa_fwd)


def _softmax_fwd(ctx: RuleContext) -> Stat:
    from .attention_stats import sum_p2_causal, sum_p2_full

    s = _require(ctx.stat(0))
    shp = ctx.shape(0)
    sk = shp[-1]
    sq = shp[-2] if len(shp) >= 2 else ONE
    # logits variance across keys (the shared part shifts every logit equally)
    s2 = _var(s) * (1 - s.corr)
    x = ctx.arg(0)
    kind = "full"
    counts = None
    src = x
    # find a -inf masked_fill, or an additive mask (``logits + mask``, mask values -inf or the
    # dtype's lowest: Gemma 2, eager HF attention), feeding the softmax to read the mask
    for _ in range(4):
        if isinstance(src, fx.Node) and getattr(src.target, "overloadpacket", None) is aten.masked_fill:
            mask = ctx.analysis.const_value(src.args[1])
            if mask is None:
                raise Unsupported("attention mask could not be evaluated")
            kind, counts = _mask_rows(~mask.bool(), int(_numeric(ctx, sq)), int(_numeric(ctx, sk)))
            break
        additive = _additive_mask(ctx, src)
        if additive is not None:
            logits, mask = additive
            kind, counts = _mask_rows(mask, int(_numeric(ctx, sq)), int(_numeric(ctx, sk)))
            s = _require(ctx.analysis.fwd_of(logits))  # the logits' own statistics, not the mask's
            s2 = _var(s) * (1 - s.corr)
            break
        if isinstance(src, fx.Node) and src.op == "call_function" and src.args:
            src = src.args[0]
    biased = _constant_logit_bias(ctx, x)
    s2_value = ctx.analysis.value_of(s2)
    if biased is not None:
        # a constant bias (ALiBi) shapes the weights beyond what a logit variance can say
        bias, s2 = biased
        p2 = sympy.Float(_biased_sum_p2(bias, _numeric(ctx, s2)), 6)
    elif kind in ("full", "causal") and s2_value is not None and s2_value > _FITTED_S2:
        # past the range the closed forms are fitted on: sample the softmax instead
        n_q, n_k = int(_numeric(ctx, sq)), int(_numeric(ctx, sk))
        bias = torch.zeros(n_q, n_k, dtype=torch.float64)
        if kind == "causal":
            bias = bias.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q), float("-inf"))
        p2 = sympy.Float(_biased_sum_p2(bias, s2_value), 6)
    elif kind == "causal":
        p2 = sum_p2_causal(sq, s2)
    elif kind == "general":
        p2 = sympy.Float(float(sum(float(sum_p2_full(int(c), _numeric(ctx, s2))) for c in counts.reshape(-1)[:4096])) / min(counts.numel(), 4096), 6)
    else:
        p2 = sum_p2_full(sk, s2)
    ctx.node.meta["_us_sum_p2"] = p2
    return Stat(sympy.sqrt(p2 / sk), ZERO, 1 / sk)


def _softmax_bwd(ctx: RuleContext, g: Stat) -> dict:
    p2 = ctx.node.meta.get("_us_sum_p2")
    sk = ctx.shape(0)[-1]
    # grad_x = p * (g - sum_j p_j g_j): RMS ~ g * sqrt(E[sum p^2]/sk) * sqrt(1 - E[sum p^2])
    return {ctx.name_of(0): Stat(g.rms * sympy.sqrt(p2 / sk) * sympy.sqrt(sympy.Max(1 - p2, ZERO)), g.corr)}


register(aten.softmax, aten._softmax, name="softmax", kind="softmax", backward=_softmax_bwd)(_softmax_fwd)


def _log_softmax_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    v = ctx.shape(0)[-1]
    lv = sympy.log(v) + _var(s) / 2
    return Stat(sympy.sqrt(lv**2 + _var(s)), ZERO, -lv)


def _log_softmax_bwd(ctx: RuleContext, g: Stat) -> dict:
    return {ctx.name_of(0): g}


register(aten.log_softmax, aten._log_softmax, name="log_softmax", kind="softmax",
         backward=_log_softmax_bwd)(_log_softmax_fwd)


# ============================================================================ losses
def _ce_counts(ctx: RuleContext) -> tuple[sympy.Expr, sympy.Expr]:
    """(valid targets, all targets) of a cross-entropy."""
    total = ctx.numel("target")
    if ctx.value("target").is_floating_point():
        return total, total  # probabilities as targets
    tgt = ctx.const("target")
    ignore = ctx.arg("ignore_index", -100)
    if isinstance(tgt, torch.Tensor):
        valid = int((tgt != ignore).sum())
        return sympy.Integer(max(valid, 1)), total
    return total, total


def _ce_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat("input"))
    v = ctx.shape("input")[1] if len(ctx.shape("input")) > 1 else ctx.shape("input")[0]
    loss = sympy.log(v) + _var(s) * (1 - s.corr) / 2
    return Stat(loss, ZERO, loss)


def _ce_bwd(ctx: RuleContext, g: Stat) -> dict:
    s = _require(ctx.stat("input"))
    shp = ctx.shape("input")
    v = shp[1] if len(shp) > 1 else shp[0]
    valid, total = _ce_counts(ctx)
    reduction = ctx.arg("reduction", 1)
    s2 = _var(s) * (1 - s.corr)
    # per valid row |p - onehot|^2 ~ 1 - 2/V + e^{s2}/V; spread over V entries
    row = (1 - 2 / v + sympy.exp(s2) / v) / v
    per_elem = sympy.sqrt(row * valid / total)
    if reduction == 1:  # mean
        per_elem = per_elem / valid
    return {"input": Stat(g.rms * per_elem, ZERO)}


register(aten.cross_entropy_loss, name="cross_entropy", kind="loss", backward=_ce_bwd)(_ce_fwd)


def _nll_fwd(ctx: RuleContext) -> tuple | Stat:
    s = _require(ctx.stat("input"))
    val = ctx.out_val
    st = Stat(sympy.Abs(s.mean), ZERO, -s.mean)
    if isinstance(val, (tuple, list)):
        return (st, None)
    return st


def _nll_bwd(ctx: RuleContext, g: Any) -> dict:
    if isinstance(g, tuple):
        g = g[0]
    valid, total = _ce_counts(ctx)
    v = ctx.shape("input")[-1]
    per_elem = sympy.sqrt(valid / (total * v)) / valid
    return {"input": Stat(g.rms * per_elem, ZERO)}


register(aten.nll_loss, aten.nll_loss_forward, aten.nll_loss_nd, name="nll_loss", kind="loss",
         backward=_nll_bwd)(_nll_fwd)


def _mse_fwd(ctx: RuleContext) -> Stat:
    a, b = _require(ctx.stat("input")), _require(ctx.stat("target"))
    val = a.rms**2 + b.rms**2
    return Stat(val, ZERO, val)


def _mse_bwd(ctx: RuleContext, g: Stat) -> dict:
    a, b = _require(ctx.stat("input")), _require(ctx.stat("target"))
    n = ctx.numel("input")
    reduction = ctx.arg("reduction", 1)
    d = 2 * sympy.sqrt(a.rms**2 + b.rms**2)
    if reduction == 1:
        d = d / n
    out = {"self": Stat(g.rms * d, ZERO)}
    if ctx.is_tensor("target"):
        out["target"] = Stat(g.rms * d, ZERO)
    return out


register(aten.mse_loss, name="mse_loss", kind="loss", backward=_mse_bwd)(_mse_fwd)


# ============================================================================ creation
def _const_fwd(ctx: RuleContext) -> Stat | None:
    v = ctx.analysis.const_value(ctx.node)
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 0:
        vv = v.double()
        fin = vv[torch.isfinite(vv)]
        if fin.numel() == 0:
            return None
        return Stat(sympy.Float(float(fin.pow(2).mean().sqrt()), 6), ONE, sympy.Float(float(fin.mean()), 6))
    return None


register(aten.arange, aten.zeros, aten.ones, aten.full, aten.zeros_like, aten.ones_like, aten.full_like,
         aten.new_ones, aten.new_zeros, aten.new_full, aten.scalar_tensor, aten.lift_fresh, aten.tril,
         aten.triu, aten.cumsum, aten.tensor if hasattr(aten, "tensor") else aten.empty,
         name="constant", kind="other")(_const_fwd)

for _op in (aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.t, aten.numpy_T,
            aten.unsqueeze,
            aten.squeeze, aten.flatten, aten.unflatten, aten.contiguous, aten.clone, aten.alias, aten.to,
            aten._to_copy, aten.expand, aten.slice, aten.select):
    _PASS_THROUGH.add(_op)
_PASS_THROUGH.update(
    {op for packet in list(_PASS_THROUGH) for op in [getattr(packet, o) for o in packet.overloads()]}
)

# a parameter gathered along its leading dims (``experts.gate_up_proj[expert_ids]``: one weight
# matrix per routed token, MoE experts as batched matmul) holds the parameter's values: a matmul
# with it is a matmul with a weight (scaled by its fan-in like a linear)
_PASS_THROUGH.update({aten.index, *[getattr(aten.index, o) for o in aten.index.overloads()]})

_ = (Any, _S)


# ============================================================================ unitscale_fx runtime ops
from .. import runtime as _rt  # noqa: E402


def _scale_value_fwd(ctx: RuleContext) -> Stat:
    e = ctx.node.meta.get("_us_expr")
    if e is None:
        raise Unsupported("scale value without expression")
    return Stat(sympy.Abs(e), ONE, e)


register(_rt.scale_value, name="scale_value", kind="scale")(_scale_value_fwd)
register(torch.ops.unitscale_fx.size_scale.default, name="size_scale", kind="scale")(_scale_value_fwd)


def _size_scales_fwd(ctx: RuleContext) -> tuple:
    return tuple(Stat(sympy.Abs(e), ONE, e) for e in ctx.node.meta.get("_us_exprs", ()))


register(torch.ops.unitscale_fx.size_scales.default, name="size_scales", kind="scale")(_size_scales_fwd)


def _grad_scale_factor(ctx: RuleContext) -> sympy.Expr:
    f = ctx.node.args[1]
    if isinstance(f, fx.Node):
        return f.meta["_us_expr"]
    return sympy.sympify(f)


def _grad_scale_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    return Stat(s.rms, s.corr, s.mean)


def _grad_scale_bwd(ctx: RuleContext, g: Stat) -> dict:
    return {"0": Stat(g.rms * _grad_scale_factor(ctx), g.corr)}


register(_rt.grad_scale, name="grad_scale", kind="scale", backward=_grad_scale_bwd)(_grad_scale_fwd)


def _rt_dropout_fwd(ctx: RuleContext) -> Stat:
    s = _require(ctx.stat(0))
    p = float(ctx.node.args[1])
    k = 1 / math.sqrt(1 - p) if p < 1 else 1.0
    return Stat(s.rms * sympy.Float(k, 8), s.corr * (1 - p), s.mean)


def _rt_dropout_bwd(ctx: RuleContext, g: Stat) -> dict:
    p = float(ctx.node.args[1])
    return {"0": Stat(g.rms * sympy.Float(1 / math.sqrt(1 - p), 8), g.corr * (1 - p))}


register(_rt.dropout, name="dropout", kind="dropout", backward=_rt_dropout_bwd)(_rt_dropout_fwd)
register(_rt.attention, name="sdpa", kind="attention", backward=_sdpa_bwd)(_sdpa_fwd)


# ============================================================================ vision: batch norm
def _bn_fwd(ctx: RuleContext, x: Any, w: Any, b: Any, eps: float) -> Stat:
    """Batch norm in training mode: ``y = w_c * x_hat + b_c`` with ``x_hat`` normalised per channel.

    Derivation: ``x_hat`` has, per channel, mean 0 and mean square ``var_c / (var_c + eps)`` over
    the ``M = N * spatial`` elements it is normalised over (exactly, by construction). The cross
    term ``2 w_c b_c x_hat`` averages to 0 per channel, so ``E[y^2] = E_c[w_c^2] var/(var+eps) +
    E_c[b_c^2]``, the layer-norm result with the eps term kept. ``var`` is the variance of the whole
    input standing for each channel's (exact when channels share their variance; the
    per-channel ``var_c / (var_c + eps)`` differs from it only by ``O(eps / var)``). The mean is
    the bias' mean; the correlation between positions is the layer-norm one (the gain keeps the
    input's, the bias is shared by every position).
    """
    sx = _require(ctx.analysis.fwd_of(x))
    sw = ctx.analysis.fwd_of(w) if isinstance(w, fx.Node) else None
    sb = ctx.analysis.fwd_of(b) if isinstance(b, fx.Node) else None
    var = _var(sx)
    keep = var / (var + sympy.Float(eps, 8)) if eps else ONE
    w2 = sw.rms**2 if sw is not None else ONE
    b2 = sb.rms**2 if sb is not None else ZERO
    rms2 = w2 * keep + b2
    corr = _safe_div(w2 * keep * sx.corr + b2, rms2)
    return Stat(sympy.sqrt(rms2), _clip01(corr), sb.mean if sb is not None else ZERO)


def _bn_bwd(ctx: RuleContext, g: Stat, x: Any, w: Any, b: Any, eps: float) -> dict:
    """Backward of training-mode batch norm (per channel ``c``, over its ``M = numel / C`` elements).

    ``dx = (w_c / s_c) * (g - mean_M(g) - x_hat * mean_M(g * x_hat))`` with ``s_c = sqrt(var_c + eps)``:
    ``g`` projected off the two unit directions ``1 / sqrt(M)`` and ``x_hat / sqrt(M)`` (orthogonal,
    since ``x_hat`` has mean 0 and mean square 1 per channel). For ``g`` with independent zero-mean
    elements independent of ``x_hat`` the projection keeps ``(M - 2) / M`` of the energy, and a
    mean of ``g`` is removed entirely. ``s_c^2`` is the channel's *sample* variance: for Gaussian
    ``x`` it is ``var * chi2_{M-1} / M``, independent of the projection, and
    ``E[1 / s_c^2] = M / ((M - 3) var)``; together
    ``RMS(dx) = w * sqrt(var_g (M - 2) / (M - 3)) / sqrt(var + eps)`` (eps only in the mean
    variance; unsupported for ``M <= 3``, where ``E[1 / s_c^2]`` diverges).
    Parameter gradients: ``dw_c = sum_M g x_hat`` and ``db_c = sum_M g``, sums of ``M`` independent
    terms of mean square ``E[g^2]`` (``x_hat`` has unit mean square): RMS ``g * sqrt(M)`` each.
    Correlated ``g`` within a channel (e.g. behind a global average pool) is not modelled here.
    """
    sx = _require(ctx.analysis.fwd_of(x))
    sw = ctx.analysis.fwd_of(w) if isinstance(w, fx.Node) else None
    shp = ctx.shape(ctx.name_of(0))
    if len(shp) < 2:
        raise Unsupported("batch_norm of a tensor without a channel dim")
    m = _safe_div(prod(shp), shp[1])
    wr = sw.rms if sw is not None else ONE
    mv = ctx.analysis.value_of(m)
    if mv is None or mv <= 3:
        raise Unsupported("batch_norm over <= 3 elements per channel: E[1 / sample variance] diverges")
    frac = (m - 2) / (m - 3)
    out = {ctx.name_of(0): Stat(wr * sympy.sqrt(_var(g) * frac) / sympy.sqrt(_var(sx) + sympy.Float(eps, 8)), g.corr)}
    if isinstance(w, fx.Node):
        out[ctx.name_of(1)] = Stat(g.rms * sympy.sqrt(m), ZERO)
    if isinstance(b, fx.Node):
        out[ctx.name_of(2)] = Stat(g.rms * sympy.sqrt(m), ZERO)
    return out


def _rt_bn_fwd(ctx: RuleContext) -> Stat:
    # runtime.batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, mode): the
    # analysis predicts the training step (as for runtime.dropout), i.e. batch statistics
    a = ctx.node.args
    return _bn_fwd(ctx, a[0], a[1], a[2], float(a[6]))


def _rt_bn_bwd(ctx: RuleContext, g: Stat) -> dict:
    a = ctx.node.args
    return _bn_bwd(ctx, g, a[0], a[1], a[2], float(a[6]))


def _aten_bn_check(ctx: RuleContext) -> None:
    if not bool(ctx.arg("training", False)):
        raise Unsupported("batch_norm with running statistics (captured in eval mode): its output depends "
                          "on the running mean/variance per channel, not on the input's scale alone")


def _aten_bn_fwd(ctx: RuleContext) -> Stat:
    _aten_bn_check(ctx)
    return _bn_fwd(ctx, ctx.arg("input"), ctx.arg("weight"), ctx.arg("bias"), float(ctx.arg("eps", 1e-5)))


def _aten_bn_bwd(ctx: RuleContext, g: Stat) -> dict:
    _aten_bn_check(ctx)
    return _bn_bwd(ctx, g, ctx.arg("input"), ctx.arg("weight"), ctx.arg("bias"), float(ctx.arg("eps", 1e-5)))


# kind "other", not "norm": passes/reinit.py reads a "norm" op's gain from layer_norm's argument
# positions (weight third), which would swap batch_norm's weight and bias roles. BatchNorm's
# default init (weight 1, bias 0) is already unit-scaled, so the parameters keep their values.
register(_rt.batch_norm, name="batch_norm", kind="other", backward=_rt_bn_bwd)(_rt_bn_fwd)
register(aten.batch_norm, name="batch_norm", kind="other", backward=_aten_bn_bwd)(_aten_bn_fwd)


# ============================================================================ vision: average pooling
def _pool_dim_windows(L: int, O: int, k: int | None, s: int, p: int, ceil_mode: bool,
                      count_include_pad: bool) -> list[tuple[int, int]]:
    """``(elements summed, divisor)`` of each output position along one dim (PyTorch's windows).

    ``k is None``: adaptive pooling, window ``[floor(i L / O), ceil((i + 1) L / O))``.
    """
    out = []
    for i in range(O):
        if k is None:
            start, end = (i * L) // O, -((-(i + 1) * L) // O)
            out.append((end - start, end - start))
            continue
        start = i * s - p
        end = min(start + k, L + p)
        pool = end - start
        start, end = max(start, 0), min(end, L)
        n = max(end - start, 0)
        out.append((n, pool if count_include_pad else n))
    return out


def _pool_factors(ctx: RuleContext, adaptive: bool) -> tuple[float, float, float, float]:
    """Averages over the output grid of ``n/d``, ``n^2/d^2``, ``n/d^2`` (``n`` elements summed,
    ``d`` divisor) and, over the input grid, of ``sum_{windows containing j} 1/d^2``.

    The output grid is the product of per-dim grids and ``n``, ``d`` are products of per-dim
    counts (a ``divisor_override`` is a constant), so each average is the product of per-dim ones.
    """
    xs, ys = ctx.shape(0), ctx.shape()
    nd = 1 if ctx.node.target in _POOL_DIMS[1] else 2 if ctx.node.target in _POOL_DIMS[2] else 3
    in_sp = [int(_numeric(ctx, v)) for v in xs[-nd:]]
    out_sp = [int(_numeric(ctx, v)) for v in ys[-nd:]]

    def per_dim(val: Any, i: int, default: int) -> int:
        if val is None or val == []:
            return default
        if isinstance(val, int):
            return val
        val = list(val)
        return int(val[i] if len(val) > 1 else val[0])

    ks = ctx.arg("kernel_size") if not adaptive else None
    stride = ctx.arg("stride", []) if not adaptive else None
    pad = ctx.arg("padding", 0) if not adaptive else None
    cip = bool(ctx.arg("count_include_pad", True)) if not adaptive else True
    override = ctx.arg("divisor_override", None) if not adaptive else None
    a1 = a2 = a3 = back = 1.0
    for i, (L, O) in enumerate(zip(in_sp, out_sp)):
        k = None if adaptive else per_dim(ks, i, 1)
        s = 1 if adaptive else per_dim(stride, i, k)
        p = 0 if adaptive else per_dim(pad, i, 0)
        win = _pool_dim_windows(L, O, k, s, p, bool(ctx.arg("ceil_mode", False)), cip)
        if override:
            win = [(n, 1) for n, _ in win]
        a1 *= sum(n / d for n, d in win) / O
        a2 *= sum(n * n / (d * d) for n, d in win) / O
        a3 *= sum(n / (d * d) for n, d in win) / O
        back *= sum(n / (d * d) for n, d in win) / L
    if override:
        D = float(override)
        a1, a2, a3, back = a1 / D, a2 / D**2, a3 / D**2, back / D**2
    return a1, a2, a3, back


def _centered_corr(s: Stat) -> sympy.Expr:
    """Correlation coefficient of two positions from ``corr = E[x_i x_j] / E[x^2]`` (mean included)."""
    var = _var(s)
    return _clip01(_safe_div(s.corr * s.rms**2 - s.mean**2, var))


def _avg_pool(adaptive: bool) -> Callable[[RuleContext], Stat]:
    def forward(ctx: RuleContext) -> Stat:
        """Average pooling: each output is ``(1/d) * sum`` of ``n`` input elements of one window.

        With input mean ``mu``, variance ``v`` and correlation ``rho`` between the positions of a
        window, ``E[y^2] = mu^2 n^2/d^2 + v (rho n^2 + (1 - rho) n) / d^2``, averaged over the
        output positions (padding and ``count_include_pad``/``divisor_override`` give ``n != d``).
        ``rho`` is read from the input Stat's correlation (for image tensors the rules read it as
        the correlation between positions of one channel; the conv rule writes 0, elementwise
        functions add their mean): with no correlation recorded this is the independent-element
        result ``mu^2 + v / n``. Exact for equicorrelated elements.
        """
        s = _require(ctx.stat(0))
        a1, a2, a3, _ = _pool_factors(ctx, adaptive)
        var, rho = _var(s), _centered_corr(s)
        mean = s.mean * sympy.Float(a1, 10)
        rms2 = s.mean**2 * sympy.Float(a2, 10) + var * (rho * sympy.Float(a2, 10) + (1 - rho) * sympy.Float(a3, 10))
        # two outputs of disjoint windows share the mean and the correlated part
        corr = _safe_div((s.mean**2 + var * rho) * sympy.Float(a1 * a1, 10), rms2)
        return Stat(sympy.sqrt(rms2), _clip01(corr), mean)

    return forward


def _avg_pool_bwd(adaptive: bool):
    def backward(ctx: RuleContext, g: Stat) -> dict:
        """``dx_j = sum_{windows i containing j} g_i / d_i``; for independent ``g_i`` its mean square,
        averaged over the input positions, is ``E[g^2] * mean_j sum_{i containing j} 1/d_i^2``
        (``1/n^2`` for non-overlapping windows of ``n``). Overlapping windows with correlated
        ``g`` would add cross terms, not modelled."""
        _, _, _, back = _pool_factors(ctx, adaptive)
        return {ctx.name_of(0): Stat(g.rms * sympy.sqrt(sympy.Float(back, 10)), g.corr)}

    return backward


_POOL_DIMS = {
    1: {aten.adaptive_avg_pool1d, aten.avg_pool1d, aten.max_pool1d, aten.max_pool1d_with_indices},
    2: {aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d,
        aten.max_pool2d_with_indices},
    3: {aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d, aten.avg_pool3d, aten.max_pool3d,
        aten.max_pool3d_with_indices},
}
for _d in list(_POOL_DIMS):
    _POOL_DIMS[_d] |= {getattr(p, o) for p in list(_POOL_DIMS[_d]) for o in p.overloads()}

register(aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
         aten._adaptive_avg_pool3d, name="adaptive_avg_pool", kind="reduction",
         backward=_avg_pool_bwd(True))(_avg_pool(True))
register(aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, name="avg_pool", kind="reduction",
         backward=_avg_pool_bwd(False))(_avg_pool(False))


# ============================================================================ order statistics: topk
#: memo of top-k moments keyed by (kind, n, k, rounded parameters)
_TOPK_MEMO: dict = {}


def _order_stat_moments(fn: Callable[[torch.Tensor], torch.Tensor], mean: float, std: float, n: int,
                        k: int) -> tuple[float, float]:
    """``(E[y], E[y^2])`` averaged over the ``k`` largest of ``n`` i.i.d. ``y = fn(mean + std * Z)``,
    ``Z ~ N(0, 1)``, for a nondecreasing ``fn`` (then the ``r``-th largest ``y`` is ``fn`` of the
    ``r``-th largest ``Z``).

    The ``r``-th largest of ``n`` standard normals has density
    ``n! / ((r-1)! (n-r)!) * Phi(x)^(n-r) * (1 - Phi(x))^(r-1) * phi(x)``; the moments are its
    integrals against ``y`` and ``y^2`` (trapezoid rule on [-12, 12], 4801 points, in log space).
    """
    x = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)
    with torch.no_grad():
        y = fn(mean + std * x).to(torch.float64)
    logF, log1F = torch.special.log_ndtr(x), torch.special.log_ndtr(-x)
    logphi = -0.5 * x * x - 0.5 * math.log(2 * math.pi)
    s1 = s2 = 0.0
    for r0 in range(0, k, 256):
        r = torch.arange(r0 + 1, min(k, r0 + 256) + 1, dtype=torch.float64)[:, None]
        logc = math.lgamma(n + 1) - torch.lgamma(r) - torch.lgamma(n - r + 1)
        dens = torch.exp(logc + (n - r) * logF + (r - 1) * log1F + logphi)
        s1 += float(torch.trapezoid(dens * y, x, dim=-1).sum())
        s2 += float(torch.trapezoid(dens * y * y, x, dim=-1).sum())
    return s1 / k, s2 / k


def _softmax_topk_moments(n: int, k: int, s2: float) -> tuple[float, float, float, float, float]:
    """``(E[v], E[v^2], standard error of E[v^2], E[S], E[S^2])`` over the ``k`` largest
    probabilities ``v`` of ``softmax(l)``, ``l`` ``n`` i.i.d. ``N(0, s2)`` logits, and their row sum
    ``S`` (the top-k values of one row are dependent: ``S`` is not a sum of independent terms).

    No closed form: the expectation is evaluated by Monte Carlo with a fixed seed (``M`` rows,
    ``M * n`` up to 2^22 draws, at least 4096 rows); the returned standard error is that of the
    estimate (well under 1 % for the router sizes of the zoo).
    """
    key = ("softmax", n, k, round(s2, 4))
    hit = _TOPK_MEMO.get(key)
    if hit is not None:
        return hit
    rows = max(4096, min(65536, (1 << 22) // max(n, 1)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = torch.randn(rows, n, generator=gen, dtype=torch.float64) * math.sqrt(max(s2, 0.0))
        v = torch.topk(torch.softmax(logits, -1), k, dim=-1).values
        sq = (v * v).mean(-1)
        rs = v.sum(-1)
        hit = (float(v.mean()), float(sq.mean()), float(sq.std() / math.sqrt(rows)), float(rs.mean()),
               float((rs * rs).mean()))
    _TOPK_MEMO[key] = hit
    return hit


def _softmax_input(node: Any) -> fx.Node | None:
    """The softmax node ``node`` is the output of (through casts and views), if any."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 6:
        packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
        if packet in (aten.softmax, aten._softmax):
            return node
        if packet in (aten.to, aten._to_copy, aten.view, aten.reshape, aten.clone, aten.contiguous) and node.args:
            node = node.args[0]
            seen += 1
            continue
        return None
    return None


def _is_nondecreasing(fn: Callable[[torch.Tensor], torch.Tensor], mean: float, std: float) -> bool:
    x = mean + std * torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)
    with torch.no_grad():
        y = fn(x).to(torch.float64)
    return bool(torch.isfinite(y).all()) and bool((y[1:] - y[:-1] >= -1e-12 * (1 + y.abs().max())).all())


def _topk_fwd(ctx: RuleContext) -> tuple:
    """``topk(x, k, dim)``: values are the ``k`` largest (smallest) order statistics of ``n`` elements.

    * ``x`` a softmax output along ``dim`` (a MoE router's top-k over the expert probabilities):
      the moments of the ``k`` largest of ``softmax(l)``, ``l`` i.i.d. Gaussian logits whose
      variance is the one the softmax rule uses (its input's variance times ``1 - corr``),
      evaluated by a seeded Monte Carlo (``_softmax_topk_moments``).
    * otherwise ``x`` is ``f(z)`` for a Gaussian ``z`` (``f`` the identity, or the elementwise
      chain the trace records, which must be nondecreasing, else unsupported): the exact order
      statistics of ``n`` i.i.d. Gaussians pushed through ``f`` (``_order_stat_moments``); the
      smallest ``k`` are the largest of ``-z``.

    Assumes the ``n`` elements along ``dim`` independent. Tokens stay independent of each other:
    the correlation of two tokens' values is that of their means, ``E[v]^2 / E[v^2]``. The indices
    carry no scale.
    """
    s = _require(ctx.stat(0))
    dim = int(ctx.arg("dim", -1))
    shp = ctx.shape(0)
    n = int(_numeric(ctx, shp[dim] if shp else ONE))
    k = int(_numeric(ctx, _S(ctx.arg("k"))))
    if k <= 0:
        raise Unsupported("topk with k = 0")
    largest = bool(ctx.arg("largest", True))
    sm = _softmax_input(ctx.arg(0))
    sm_dim = None
    if sm is not None:
        sm_dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
        nd = len(sm.meta["val"].shape)
        if not (isinstance(sm_dim, int) and sm_dim % nd == nd - 1 and dim % max(len(shp), 1) == len(shp) - 1):
            sm = None
    if sm is not None and largest:
        si = ctx.analysis.fwd_of(sm.args[0])
        if si is None:
            raise Unsupported("the softmax input's scale is unknown")
        s2 = _numeric(ctx, _var(si) * (1 - si.corr))
        m1, m2, _, rs1, rs2 = _softmax_topk_moments(n, k, s2)
        ctx.node.meta["_us_topk_sum"] = (dim, rs1, rs2)
    else:
        src_stat, fn = s, (lambda z: z)
        if s.trace is not None:
            src, fn, _key = s.trace
            src_stat = _require(ctx.analysis.fwd_of(src))
        std, mean, _ = _std_normal_nodes_stat(ctx, src_stat)
        if not _is_nondecreasing(fn, mean, std):
            raise Unsupported("topk of a non-monotone elementwise function of a Gaussian (no order statistics)")
        f = fn if largest else (lambda z, fn=fn: -fn(-z))
        key = ("gauss", n, k, largest, float(f"{mean:.4g}"), float(f"{std:.4g}"), s.trace[2] if s.trace else "x")
        hit = _TOPK_MEMO.get(key)
        if hit is None:
            hit = _TOPK_MEMO[key] = _order_stat_moments(f, mean if largest else -mean, std, n, k)
        m1, m2 = hit
        m1 = m1 if largest else -m1
    rms = sympy.Float(math.sqrt(max(m2, 0.0)), 6)
    corr = sympy.Float(min(m1 * m1 / m2, 1.0), 6) if m2 > 0 else ZERO
    return (Stat(rms, corr, sympy.Float(m1, 6)), None)


def _topk_bwd(ctx: RuleContext, grads: Any) -> dict:
    """The values' gradient is scattered into ``k`` of the ``n`` positions along ``dim``, zeros
    elsewhere: ``RMS = g * sqrt(k / n)`` exactly."""
    g = grads[0] if isinstance(grads, (tuple, list)) else grads
    if g is None:
        return {}
    dim = int(ctx.arg("dim", -1))
    shp = ctx.shape(0)
    k = _S(ctx.arg("k"))
    n = shp[dim] if shp else ONE
    return {ctx.name_of(0): Stat(g.rms * sympy.sqrt(_safe_div(k, n)), g.corr)}


register(aten.topk, name="topk", kind="other", backward=_topk_bwd)(_topk_fwd)


def _topk_row_sum(ctx: RuleContext) -> Stat | None:
    """``sum`` over the ``dim`` of a softmax ``topk``'s values (a router's renormalisation
    ``v / v.sum(-1, keepdim=True)``): the values of one row are dependent order statistics, so the
    row sum's moments are those the topk rule evaluated jointly (``_softmax_topk_moments``), not
    those of a sum of independent terms."""
    x = ctx.arg(0)
    if not (isinstance(x, fx.Node) and x.target is operator.getitem and x.args[1] == 0
            and isinstance(x.args[0], fx.Node) and "_us_topk_sum" in x.args[0].meta):
        return None
    dim, rs1, rs2 = x.args[0].meta["_us_topk_sum"]
    dims = ctx.arg("dim")
    nd = len(ctx.shape(0))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if [d % nd for d in dims] != [dim % nd] or ctx.arg("dtype") is not None:
        return None
    return Stat(sympy.Float(math.sqrt(rs2), 6), sympy.Float(min(rs1 * rs1 / rs2, 1.0), 6), sympy.Float(rs1, 6))
