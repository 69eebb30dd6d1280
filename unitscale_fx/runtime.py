"""Runtime ops inserted by the rewrite passes.

* :func:`grad_scale` is the identity in the forward pass and multiplies the gradient by a
  positive factor in the backward pass (an ``autograd.Function``, traced by ``torch.compile``).
* :func:`scale_value` turns a symbolic scale (a sympy expression in shape symbols) into a 0-d
  tensor computed from the runtime sizes with torch ops, so that ``torch.compile(dynamic=True)``
  keeps the sizes symbolic instead of specialising on them.
* :func:`size_scale` evaluates a scale expression with size functions (scales computed by Python
  code from the sizes, see :mod:`unitscale_fx.analysis.sizefn`) in Python floats: a custom op,
  opaque to ``torch.compile``, memoised per sizes.
* :func:`dropout` reads the owning module's ``training`` flag, so ``train()``/``eval()`` work on
  the captured graph.
"""
from __future__ import annotations

import itertools
import linecache
import math
from typing import Any, Callable

import sympy
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["grad_scale", "scale_value", "dropout", "batch_norm", "ModeFlag", "compile_expr",
           "size_scale", "register_size_scale", "size_scales", "register_size_scale_group"]


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: Any) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        # a 0-d factor (float64) does not promote g: the product has g's dtype; no separate
        # conversion of the factor (a one-element kernel of its own under inductor)
        return g * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: Any) -> torch.Tensor:
    """Identity forward; gradient multiplied by ``factor`` (a float or a 0-d tensor) backward."""
    if isinstance(factor, torch.Tensor):
        factor = factor.detach()
    return _GradScale.apply(x, factor)


class ModeFlag(torch.nn.Module):
    """Holds the ``training`` flag the rewritten graph reads (kept in sync by the wrapper)."""

    def forward(self) -> bool:  # pragma: no cover - never called
        return self.training


def dropout(x: torch.Tensor, p: float, mode: ModeFlag) -> torch.Tensor:
    """``F.dropout`` that follows ``mode.training``."""
    return F.dropout(x, p, mode.training)


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               momentum: float, eps: float, mode: ModeFlag) -> torch.Tensor:
    """``F.batch_norm`` that follows ``mode.training``: batch statistics (and running-statistics
    updates) in training, the running statistics in evaluation."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, mode.training, momentum, eps)


@torch.library.custom_op("unitscale_fx::size_scale", mutates_args=())
def size_scale(key: int, sizes: list[int]) -> torch.Tensor:
    """Scale expression ``key`` (registered by :func:`register_size_scale`) at ``sizes``, evaluated
    in Python floats and memoised: a 0-d float64 tensor. Opaque to ``torch.compile`` (the sizes stay
    symbolic; the value is one scalar the kernels load, not a formula they recompute per element)."""
    fn = _SIZE_SCALES[key]
    sizes = tuple(int(s) for s in sizes)
    v = fn.memo.get(sizes)
    if v is None:
        if len(fn.memo) >= _MAX_VALUES:
            fn.memo.clear()
        v = fn.memo[sizes] = fn(sizes)
    return torch.tensor(v, dtype=torch.float64)


@size_scale.register_fake
def _size_scale_fake(key: int, sizes: list[int]) -> torch.Tensor:
    return torch.empty((), dtype=torch.float64)


@torch.library.custom_op("unitscale_fx::size_scales", mutates_args=())
def size_scales(group: int, sizes: list[int]) -> list[torch.Tensor]:
    """Every scale of group ``group`` (see :func:`register_size_scale_group`) at ``sizes``: one call
    per graph instead of one per scale (each opaque call costs ~9 us of Python per step)."""
    keys, positions = _GROUPS[group]
    sizes = [int(s) for s in sizes]
    return [size_scale(k, [sizes[i] for i in pos]) for k, pos in zip(keys, positions)]


@size_scales.register_fake
def _size_scales_fake(group: int, sizes: list[int]) -> list[torch.Tensor]:
    return [torch.empty((), dtype=torch.float64) for _ in _GROUPS[group][0]]


_GROUPS: list[tuple[list[int], list[list[int]]]] = []


def register_size_scale_group(keys: list[int], positions: list[list[int]]) -> int:
    """Group the :func:`size_scale` keys ``keys``; ``positions[i]``: indices into the group's sizes
    of the sizes of ``keys[i]``."""
    _GROUPS.append((list(keys), [list(p) for p in positions]))
    return len(_GROUPS) - 1


class _SizeScale:
    """A scale expression as a function of the sizes, in floats (``analysis.evaluate.Evaluator``)."""

    def __init__(self, expr: sympy.Expr, symbols: list[sympy.Symbol]):
        self.expr, self.symbols, self.memo = expr, list(symbols), {}

    def __call__(self, sizes: tuple[int, ...]) -> float:
        from .analysis.evaluate import Evaluator

        v = Evaluator(dict(zip(self.symbols, sizes)))(self.expr)
        if v is None or not math.isfinite(v):
            raise ValueError(f"unitscale_fx: scale {self.expr} is not a finite number at sizes {sizes}")
        return float(v)


_SIZE_SCALES: list[_SizeScale] = []


def register_size_scale(expr: sympy.Expr, symbols: list[sympy.Symbol]) -> int:
    """Register ``expr`` (in ``symbols``, with size functions) for :func:`size_scale`; its key."""
    _SIZE_SCALES.append(_SizeScale(sympy.sympify(expr), symbols))
    return len(_SIZE_SCALES) - 1


#: sympy function -> name of the torch function computing it on a float64 tensor.
_FUNCS: dict[Any, str] = {
    sympy.exp: "torch.exp",
    sympy.log: "torch.log",
    sympy.sqrt: "torch.sqrt",
    sympy.Abs: "torch.abs",
}
_EULER_GAMMA = 0.5772156649015329


def _lit(c: float) -> str:
    """A float as a Python literal (``inf``/``nan`` spelled so that they parse)."""
    return repr(c) if math.isfinite(c) else f"float('{c}')"


def _const(e: sympy.Expr) -> str:
    return _lit(float(e.evalf()))


def _source(e: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """Python source of ``e``: torch ops on the float64 size tensors ``names`` and float literals.

    Every sub-expression without free symbols is folded to a float *literal*, so the generated
    function holds no sympy object and no float read from a closure or a global: under
    ``torch.compile(dynamic=True)`` a float read from an object would become a symbolic float
    input (and force a restart of the analysis), a literal stays a constant. Every sub-expression
    with free symbols evaluates to a tensor.
    """
    if not e.free_symbols:
        return _const(e)
    if e.is_Symbol:
        return names[e]
    if e.is_Add or e.is_Mul:
        op = " + " if e.is_Add else " * "
        const = [a for a in e.args if not a.free_symbols]
        parts = [_source(a, names) for a in e.args if a.free_symbols]
        if const:
            c = float((sympy.Add if e.is_Add else sympy.Mul)(*const).evalf())
            if c != (0.0 if e.is_Add else 1.0):
                parts.append(_lit(c))
        return "(" + op.join(parts) + ")"
    if e.is_Pow:
        base, exp = e.args
        b = _source(base, names)
        if exp.free_symbols:
            return f"torch.pow({b}, {_source(exp, names)})"
        p = float(exp.evalf())
        special = {0.5: "torch.sqrt", -0.5: "torch.rsqrt", -1.0: "torch.reciprocal"}
        if p in special:
            return f"{special[p]}({b})"
        if p == 1.0:
            return b
        return f"torch.pow({b}, {_lit(p)})"
    if isinstance(e, sympy.polygamma) and e.args[0] == 0:
        return f"torch.special.digamma({_source(e.args[1], names)})"
    if isinstance(e, sympy.harmonic) and len(e.args) == 1:
        return f"(torch.special.digamma({_source(e.args[0], names)} + 1.0) + {_EULER_GAMMA!r})"
    if isinstance(e, (sympy.Max, sympy.Min)):
        is_max = isinstance(e, sympy.Max)
        const = [a for a in e.args if not a.free_symbols]
        parts = [_source(a, names) for a in e.args if a.free_symbols]
        out = parts[0]
        for p in parts[1:]:
            out = f"torch.{'maximum' if is_max else 'minimum'}({out}, {p})"
        if const:
            c = float((sympy.Max if is_max else sympy.Min)(*const).evalf())
            out = f"torch.{'clamp_min' if is_max else 'clamp_max'}({out}, {_lit(c)})"
        return out
    fn = _FUNCS.get(type(e)) or _FUNCS.get(e.func)
    if fn is not None:
        return f"{fn}({_source(e.args[0], names)})"
    raise NotImplementedError(f"cannot compile scale expression {e} ({type(e).__name__})")


_N_COMPILED = itertools.count()


def compile_expr(expr: sympy.Expr, symbols: list[sympy.Symbol]) -> Callable[..., torch.Tensor]:
    """A function ``f(*sizes) -> 0-d float64 tensor`` evaluating ``expr`` with torch ops.

    ``sizes`` are ints (eager) or ``SymInt`` s (under ``torch.compile(dynamic=True)``), one per
    symbol of ``symbols``. The expression is turned into Python source once, here (see
    :func:`_source`), so that ``torch.compile`` traces it as a few tensor ops on the sizes, with
    ``fullgraph=True``, and the eager graph pays no sympy evaluation per call.
    """
    e = sympy.sympify(expr)
    names = {s: f"x{i}" for i, s in enumerate(symbols)}
    params = ", ".join(names[s] for s in symbols)
    lines = [f"def scale_expr({params}):", f"    # {e}"]
    lines += [f"    {n} = _as_f64({n})" for n in names.values()]
    body = _source(e, names)
    if not e.free_symbols:
        body = f"torch.tensor({body}, dtype=torch.float64)"
    lines.append(f"    return {body}")
    code = "\n".join(lines) + "\n"
    filename = f"<unitscale_fx scale expression {next(_N_COMPILED)}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    namespace: dict[str, Any] = {"torch": torch, "_as_f64": _as_f64}
    exec(compile(code, filename, "exec"), namespace)  # noqa: S102 - source generated above from sympy
    return namespace["scale_expr"]


def _as_f64(v: Any) -> torch.Tensor:
    """A size (int, ``SymInt`` or tensor) as a 0-d float64 tensor."""
    if isinstance(v, torch.Tensor):
        return v.double()
    return torch.scalar_tensor(v, dtype=torch.float64)


def scale_value(key: int, *sizes: Any) -> torch.Tensor:
    """Evaluate registered scale expression ``key`` at runtime sizes (see ``compile_expr``).

    Eagerly (plain int sizes or size-function values, no ``torch.compile`` tracing, no
    fake/dispatch mode, not in inference mode) the 0-d result is memoised per ``(key, sizes)``, so the eager graph does not
    recompute every scale value at every call. Under ``torch.compile`` the expression is always
    traced (sizes stay symbolic).
    """
    if (
        not torch.compiler.is_compiling()
        and all(type(s) is int or _plain_scalar(s) for s in sizes)
        and not torch.is_inference_mode_enabled()
        and _get_current_dispatch_mode() is None
    ):
        k = (key, tuple(s if type(s) is int else float(s) for s in sizes))
        v = _VALUES.get(k)
        if v is None:
            v = _EXPRS[key](*sizes)
            if type(v) is torch.Tensor and not v.requires_grad:  # never cache fake/functional tensors
                if len(_VALUES) >= _MAX_VALUES:
                    _VALUES.clear()
                _VALUES[k] = v
        return v
    return _EXPRS[key](*sizes)


def _plain_scalar(s: Any) -> bool:
    """A 0-d CPU tensor of this process (a size function's value), usable as a memo key."""
    return type(s) is torch.Tensor and s.dim() == 0 and s.device.type == "cpu" and not s.requires_grad


#: eager memo of :func:`scale_value` (0-d float64 CPU tensors), bounded
_VALUES: dict[tuple, torch.Tensor] = {}
_MAX_VALUES = 65536


_EXPRS: dict[int, Any] = {}


def register_expr(expr: sympy.Expr, symbols: list[sympy.Symbol]) -> int:
    key = len(_EXPRS)
    _EXPRS[key] = compile_expr(expr, symbols)
    return key


_ = math


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
              dropout_p: float = 0.0, mode: Any = None, is_causal: bool = False, scale: Any = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` whose dropout follows ``mode.training``."""
    p = dropout_p if (mode is None or mode.training) else 0.0
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=p,
                                          is_causal=is_causal, scale=scale)
