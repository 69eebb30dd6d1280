"""Size functions: scales computed by Python code from the sizes (analysis/sizefn.py) and the opaque
``unitscale_fx::size_scale`` op that evaluates scale expressions containing them at runtime."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from unitscale_fx.analysis import sizefn
from unitscale_fx.analysis.evaluate import Evaluator
from unitscale_fx.runtime import register_size_scale

S, B = sympy.symbols("seq batch", positive=True, integer=True)


def _demo_slot() -> int:
    return sizefn.register(("test_sizefn", "sqrt-sum"), "demo", lambda s: math.sqrt(s[0] + s[1]))


def test_evaluation_paths_agree():
    slot = _demo_slot()
    e = 2 / sizefn.SizeFunction(slot, S, S) + sympy.sqrt(B)
    want = 2 / math.sqrt(32) + 2
    assert Evaluator({S: 16, B: 4})(e) == pytest.approx(want, rel=1e-12)
    assert float(e.xreplace({S: sympy.Integer(16), B: sympy.Integer(4)})) == pytest.approx(want, rel=1e-12)
    assert float(e.subs({S: 16, B: 4}).evalf()) == pytest.approx(want, rel=1e-12)
    assert "demo[" in str(e)  # readable in graph dumps


def test_one_slot_per_key_and_memo():
    calls = []
    key = ("test_sizefn", "memo")
    slot = sizefn.register(key, "memo", lambda s: calls.append(s) or float(s[0]))
    assert sizefn.register(key, "memo", lambda s: 0.0) == slot
    assert sizefn.value(slot, [7]) == 7.0 and sizefn.value(slot, [7]) == 7.0
    assert calls == [(7,)]


def test_slot_must_be_an_integer():
    with pytest.raises(TypeError):
        sizefn.SizeFunction(S, S)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_size_scale_op_is_one_frame_and_follows_the_sizes(backend):
    slot = _demo_slot()
    e = sympy.sqrt(B) / sizefn.SizeFunction(slot, S, S)
    key = register_size_scale(e, [B, S])

    def f(x):
        s = torch.ops.unitscale_fx.size_scale(key, [x.shape[0], x.shape[1]])
        return (x * s.to(x.dtype)).sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    g = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for shape in ((3, 5), (4, 7), (6, 9)):
        x = torch.ones(*shape, requires_grad=True)
        got = g(x)
        got.backward()
        want = shape[0] * shape[1] * math.sqrt(shape[0]) / math.sqrt(2 * shape[1])
        assert got.item() == pytest.approx(want, rel=1e-6)
        assert x.grad[0, 0].item() == pytest.approx(math.sqrt(shape[0]) / math.sqrt(2 * shape[1]), rel=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()
