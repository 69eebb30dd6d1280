"""Runtime ops inserted by the rewrite passes.

* :func:`grad_scale` is the identity in the forward pass and multiplies the gradient by a
  positive factor in the backward pass (an ``autograd.Function``, traced by ``torch.compile``).
* :func:`scale_value` turns a symbolic scale (a sympy expression in shape symbols) into a 0-d
  tensor computed from the runtime sizes with torch ops, so that ``torch.compile(dynamic=True)``
  keeps the sizes symbolic instead of specialising on them.
* :func:`dropout` reads the owning module's ``training`` flag, so ``train()``/``eval()`` work on
  the captured graph.
"""
from __future__ import annotations

import math
from typing import Any

import sympy
import torch
import torch.nn.functional as F

__all__ = ["grad_scale", "scale_value", "dropout", "ModeFlag", "compile_expr"]


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: Any) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        f = ctx.factor
        if isinstance(f, torch.Tensor):
            f = f.to(g.dtype)
        return g * f, None


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


_FUNCS = {
    sympy.exp: torch.exp,
    sympy.log: torch.log,
    sympy.sqrt: torch.sqrt,
    sympy.Abs: torch.abs,
}


def compile_expr(expr: sympy.Expr, symbols: list[sympy.Symbol]):
    """A function ``f(*sizes) -> 0-d float64 tensor`` evaluating ``expr`` with torch ops."""

    def ev(e: sympy.Expr, env: dict) -> torch.Tensor:
        if e.is_Number:
            return torch.tensor(float(e), dtype=torch.float64)
        if e.is_Symbol:
            return env[e]
        if e.is_Add:
            out = ev(e.args[0], env)
            for a in e.args[1:]:
                out = out + ev(a, env)
            return out
        if e.is_Mul:
            out = ev(e.args[0], env)
            for a in e.args[1:]:
                out = out * ev(a, env)
            return out
        if e.is_Pow:
            base, exp = e.args
            b = ev(base, env)
            if exp.is_Number:
                return b ** float(exp)
            return b ** ev(exp, env)
        if isinstance(e, sympy.polygamma) and e.args[0] == 0:
            return torch.special.digamma(ev(e.args[1], env))
        if isinstance(e, sympy.harmonic) and len(e.args) == 1:
            return torch.special.digamma(ev(e.args[0], env) + 1) + 0.5772156649015329
        if isinstance(e, sympy.Max):
            out = ev(e.args[0], env)
            for a in e.args[1:]:
                out = torch.maximum(out, ev(a, env))
            return out
        if isinstance(e, sympy.Min):
            out = ev(e.args[0], env)
            for a in e.args[1:]:
                out = torch.minimum(out, ev(a, env))
            return out
        fn = _FUNCS.get(type(e)) or _FUNCS.get(e.func)
        if fn is not None:
            return fn(ev(e.args[0], env))
        # anything else: evaluate numerically through sympy at trace time (shape-independent)
        if not e.free_symbols:
            return torch.tensor(float(e.evalf()), dtype=torch.float64)
        raise NotImplementedError(f"cannot compile scale expression {e} ({type(e).__name__})")

    def f(*sizes: Any) -> torch.Tensor:
        env = {
            s: (torch.scalar_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) else v.double())
            for s, v in zip(symbols, sizes)
        }
        return ev(expr, env)

    return f


def scale_value(key: int, *sizes: Any) -> torch.Tensor:
    """Evaluate registered scale expression ``key`` at runtime sizes (see ``compile_expr``)."""
    return _EXPRS[key](*sizes)


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
