"""Scales that are functions of the input sizes, computed by Python code instead of a sympy tree.

Some predicted scales depend on a dynamic size through a closed form too large to carry around as
a sympy expression: the attention statistics are sums over the poles of the softmax, hundreds of
``polygamma`` terms in the sequence length (see docs/attention_scaling.md). Building them
symbolically made the analysis of a 12-layer model ten times slower; evaluating them at the
capture-time lengths made the scale a constant, wrong as soon as the sequence length changes.

A :class:`SizeFunction` is the middle way. ``SizeFunction(slot, seq, seq)`` is a small sympy
expression (it prints as ``attention_out_rms[3](seq, seq)``) whose value at given sizes comes from
the Python function registered under ``slot``:

* the analysis evaluates it at the shape hints (:class:`~unitscale_fx.analysis.evaluate.Evaluator`
  knows it, and sympy evaluates it as soon as its arguments are numbers);
* a scale containing one is evaluated in Python by the custom op ``unitscale_fx::size_scale``
  (:mod:`unitscale_fx.runtime`, inserted by ``passes.base.materialize``), opaque to
  ``torch.compile``: the sizes stay symbolic (no specialisation, no recompilation when they change)
  and the value is computed, and memoised, per distinct sizes.

Registrations live in this process (like the compiled scale expressions of the runtime): a
transformed graph module is used in the process that transformed it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import sympy

__all__ = ["SizeFunction", "register", "value"]


@dataclass
class _Entry:
    name: str
    fn: Callable[[tuple[int, ...]], float]
    memo: dict[tuple[int, ...], float] = field(default_factory=dict)


_ENTRIES: list[_Entry] = []
_BY_KEY: dict[Hashable, int] = {}
_LOCK = threading.Lock()
_MAX_MEMO = 4096  # distinct sizes remembered per function


def register(key: Hashable, name: str, fn: Callable[[tuple[int, ...]], float]) -> int:
    """The slot of ``fn`` (a function of a tuple of ints returning a float); one slot per ``key``.

    ``key`` identifies what ``fn`` computes (e.g. the attention statistics' parameters and the
    field), so the layers of a model that share them share one slot and one memo.
    """
    with _LOCK:
        slot = _BY_KEY.get(key)
        if slot is None:
            slot = len(_ENTRIES)
            _ENTRIES.append(_Entry(name, fn))
            _BY_KEY[key] = slot
        return slot


def value(slot: int, sizes: Sequence[int]) -> float:
    """``fn(sizes)`` for the function registered under ``slot`` (memoised)."""
    entry = _ENTRIES[slot]
    sizes = tuple(int(s) for s in sizes)
    v = entry.memo.get(sizes)
    if v is None:
        v = float(entry.fn(sizes))
        with _LOCK:
            if len(entry.memo) >= _MAX_MEMO:
                entry.memo.clear()
            entry.memo[sizes] = v
    return v


def name_of(slot: int) -> str:
    return _ENTRIES[slot].name


class SizeFunction(sympy.Function):
    """``SizeFunction(slot, *sizes)``: the registered function ``slot`` at ``sizes`` (see module doc).

    Positive by construction (it stands for an RMS). With numeric sizes it evaluates to a Float.
    """

    is_real = True
    is_positive = True
    is_finite = True

    @classmethod
    def eval(cls, slot: sympy.Expr, *sizes: sympy.Expr) -> sympy.Expr | None:
        if not slot.is_Integer:
            raise TypeError(f"SizeFunction: the slot must be an integer, got {slot}")
        if sizes and all(s.is_Integer for s in sizes):
            return sympy.Float(value(int(slot), [int(s) for s in sizes]), 15)
        return None

    @property
    def slot(self) -> int:
        return int(self.args[0])

    @property
    def sizes(self) -> tuple[sympy.Expr, ...]:
        return tuple(self.args[1:])

    def _eval_evalf(self, prec: int) -> sympy.Expr | None:
        sizes = [s.evalf(prec) for s in self.sizes]
        if all(s.is_Number and float(s) == int(float(s)) for s in sizes):
            return sympy.Float(value(self.slot, [int(float(s)) for s in sizes]), prec)
        return None

    def _sympystr(self, printer: sympy.printing.StrPrinter) -> str:
        args = ", ".join(printer.doprint(s) for s in self.sizes)
        return f"{name_of(self.slot)}[{self.slot}]({args})"
