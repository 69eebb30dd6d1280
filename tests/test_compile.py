"""The ``torch.compile`` hand-off of a unit-scaled model (issue 3).

* the backend ladder ``eager`` -> ``aot_eager`` -> ``inductor`` on ``transform(..., compile=False)``:
  one frame with ``fullgraph=True`` (no graph break), no recompilation when batch or sequence
  length change (``dynamic=True``, as the default hand-off uses), and the compiled step agrees
  with the eager one (loss and every parameter gradient);
* the default ``transform(model)`` (``Config(compile=True)``, inductor) trains and matches
  ``Config(compile=False)``;
* a census of inductor's kernels: the scale multiplies should fuse into neighbouring kernels.

The model is a 1-layer nanoGPT (hidden 32), so that the inductor compiles (the slow part: C++
kernels on a CPU runner) stay within about a minute for the whole file.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import unitscale_fx
from unitscale_fx import Config, zoo

SIZES = dict(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64)
EAGER = Config(compile=False)
# float32; the compiled step reorders reductions (layer norm, cross-entropy, weight gradients)
TOL = dict(rtol=1e-4, atol=1e-5)

# Measured with torch 2.13.0 on CPU for SIZES (docs/benchmarks.md, "kernel census"): inductor
# leaves 14 loop nests that only scale (15 before this session's changes). Forward (2): the
# attention output entering c_proj (one nest, scale + the layout copy: the multiply sits after the
# transpose/reshape, it used to take two nests) and the logits (a graph output, after the head mm).
# Backward (12): 6 weight gradients after their extern mm, 3 activation gradients entering an mm,
# and the q, k, v gradients between the SDPA backward and the qkv mm (the layout copy the original
# needs too, plus the scale). Scales that depend on the sequence length through the attention
# statistics are one opaque call each (``unitscale_fx::size_scale``, computed once per step); the
# partitioner puts the backward-only ones in the backward graph, where those extern calls split
# the q/k/v nest in three. The compiled original (nanogpt_sdpa) has 0 of 60. Each sits next to an
# extern kernel (mm, SDPA) that inductor cannot fuse a pointwise op into on this backend. The
# bound guards against regressions; the cost is measured by benchmarks/train_step.py.
MAX_STANDALONE_SCALE_NESTS = 14


@pytest.fixture(autouse=True)
def _reset_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss(out: Any) -> torch.Tensor:
    return zoo.loss_of(out)


def _step(model: nn.Module, kw: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward: the loss and a copy of every parameter gradient."""
    model.zero_grad(set_to_none=True)
    loss = _loss(model(**kw))
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # no "_orig_mod." prefix
    grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    return loss.detach(), grads


def _assert_same_step(got: tuple, want: tuple, what: str) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    torch.testing.assert_close(loss_a, loss_b, **TOL, msg=lambda m: f"{what}: loss differs\n{m}")
    assert grads_a.keys() == grads_b.keys() and grads_a, what
    for name in grads_b:
        assert torch.isfinite(grads_a[name]).all(), (what, name)
        torch.testing.assert_close(grads_a[name], grads_b[name], **TOL,
                                   msg=lambda m, n=name: f"{what}: gradient of {n} differs\n{m}")


@pytest.fixture(scope="module")
def eager_model() -> tuple[nn.Module, dict, tuple]:
    """``transform(compile=False)`` of the tiny nanoGPT, its inputs and its eager step (the reference)."""
    model, kw = zoo.get("nanogpt", **SIZES)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    return m, kw, _step(m, kw)


def _fresh(kw: dict) -> dict:
    """The same batch as new tensors (as a training loop passes them)."""
    return {k: v.clone() for k, v in kw.items()}


def _other_shape(kw: dict) -> dict:
    """Inputs with another batch (3) and sequence length (8): no recompile, sizes are symbols.

    (Sizes 0 and 1 are specialised by ``torch.compile``, so the other shape avoids them.)
    """
    return {k: torch.cat([v, v[:1]])[:, : SIZES["seq"] // 2].contiguous() for k, v in kw.items()}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_ladder_fullgraph_one_frame_and_same_numbers(eager_model, backend: str) -> None:
    """The hand-off: the rewritten graph module, compiled as ``transform`` compiles it (dynamic)."""
    m, kw, ref = eager_model
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(m.graph_module, backend=counter, fullgraph=True, dynamic=True)
    got = _step(compiled, kw)
    assert counter.frame_count == 1, f"{backend}: {counter.frame_count} frames (graph break or restart)"
    _assert_same_step(got, ref, backend)
    # batch and sequence length are symbols: another shape reuses the frame
    small = _other_shape(kw)
    _assert_same_step(_step(compiled, small), _step(m, small), f"{backend}, other shape")
    assert counter.frame_count == 1, f"{backend}: recompiled for another batch/sequence length"


def test_compiling_the_wrapper_is_one_frame_with_same_numbers(eager_model) -> None:
    """``torch.compile(transform(model, compile=False), fullgraph=True)``: the wrapper traces too."""
    m, kw, ref = eager_model
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, backend=counter, fullgraph=True, dynamic=True)
    got = _step(compiled, _fresh(kw))
    assert counter.frame_count == 1, f"{counter.frame_count} frames (graph break or restart)"
    _assert_same_step(got, ref, "compiled wrapper")


def test_compiling_the_wrapper_keeps_sizes_symbolic(eager_model) -> None:
    m, kw, _ = eager_model
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(m, backend=counter, fullgraph=True, dynamic=True)
    for inputs in (_fresh(kw), _other_shape(kw), kw):
        compiled(**inputs)
    assert counter.frame_count == 1, f"{counter.frame_count} frames for three calls"


# ------------------------------------------------------------------------------------------ inductor
_aten, _prims = torch.ops.aten, torch.ops.prims
#: ops a scale computation consists of (a multiply, the scale value itself, a dtype conversion)
_SCALE_OPS = {_aten.mul, _aten.div, _aten.reciprocal, _aten.rsqrt, _aten.sqrt, _aten.pow,
              _aten.scalar_tensor, _aten._to_copy, _prims.convert_element_type}
#: ops that only move or view data
_VIEW_OPS = {_aten.view, _aten._unsafe_view, _aten.reshape, _aten.transpose, _aten.permute, _aten.t,
             _aten.expand, _aten.squeeze, _aten.unsqueeze, _aten.slice, _aten.select, _aten.as_strided,
             _aten.clone, _aten.alias}


@dataclass
class Nest:
    """One post-fusion scheduler node: a loop nest of generated code."""

    graph: int                       # 0: forward module, 1: backward module (in compile order)
    kinds: list[str]                 # per buffer: "scale", "compute" or "other" (extern, nop)
    buffers: list[tuple[str, str, list[str]]]  # (name, size, origin ops)
    scalar: bool                     # every buffer is 0-d / one element (a scale value)

    @property
    def scale_only(self) -> bool:
        return bool(self.kinds) and set(self.kinds) == {"scale"}


@dataclass
class KernelCensus:
    """What inductor's scheduler made of each graph, recorded after fusion.

    Each post-fusion scheduler node is one loop nest of generated code (on CPU several nests may
    share one ``cpp_fused_*`` function). A nest is *scale-only* when every buffer it computes comes
    from scale ops and views alone (its FX origins): the multiply found no kernel to fuse into.
    Scalar (one element) nests that compute a scale value from the sizes are counted apart.
    """

    nests: list[Nest] = field(default_factory=list)
    graphs: int = 0

    @staticmethod
    def _ops(snode: Any) -> set:
        return {getattr(o.target, "overloadpacket", o.target) for o in snode.node.origins if o.op == "call_function"}

    @classmethod
    def _kind(cls, snode: Any) -> str:
        if type(snode).__name__ != "SchedulerNode":
            return "other"
        ops = cls._ops(snode)
        return "scale" if ops and ops <= _SCALE_OPS | _VIEW_OPS and ops & _SCALE_OPS else "compute"

    def record(self, nodes: list) -> list:
        """The ``_post_fusion_custom_pass`` hook: record, change nothing."""
        for fused in nodes:
            parts = [n for n in fused.get_nodes()]
            bufs = [
                (n.node.get_name(), str(list(n.node.get_size())), sorted(str(o) for o in self._ops(n)))
                if type(n).__name__ == "SchedulerNode" else (n.get_name(), "?", [type(n).__name__])
                for n in parts
            ]
            scalar = all(type(n).__name__ == "SchedulerNode" and n.node.get_numel() == 1 for n in parts)
            self.nests.append(Nest(self.graphs, [self._kind(n) for n in parts], bufs, scalar))
        self.graphs += 1
        return nodes

    @property
    def standalone_scale(self) -> list[Nest]:
        """Loop nests over more than one element that do nothing but scale."""
        return [n for n in self.nests if n.scale_only and not n.scalar]

    @property
    def scalar_scale(self) -> list[Nest]:
        """One-element nests computing scale values (from the sizes)."""
        return [n for n in self.nests if n.scale_only and n.scalar]


@contextlib.contextmanager
def kernel_census() -> Iterator[KernelCensus]:
    """Record inductor's post-fusion schedule (a custom scheduler pass; bypasses the FX graph cache)."""
    from torch._inductor import config as inductor_config

    census = KernelCensus()
    with inductor_config.patch(_post_fusion_custom_pass=census.record):
        yield census


@pytest.fixture(scope="module")
def inductor_run(eager_model) -> dict:
    """One inductor compile (fwd + bwd) of the hand-off graph: step, frame count, code, census."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    m, kw, _ = eager_model
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(m.graph_module, backend=counter, fullgraph=True, dynamic=True)
    with kernel_census() as census:
        got, code = run_and_get_code(_step, compiled, kw)
    small = _other_shape(kw)
    other = (_step(compiled, small), _step(m, small))
    run = dict(step=got, frames=counter.frame_count, code=code, census=census, other=other)
    torch._dynamo.reset()
    return run


@pytest.mark.slow
def test_ladder_inductor_fullgraph_one_frame_and_same_numbers(eager_model, inductor_run) -> None:
    _, _, ref = eager_model
    assert inductor_run["frames"] == 1, f"inductor: {inductor_run['frames']} frames (graph break or restart)"
    _assert_same_step(inductor_run["step"], ref, "inductor")
    got_small, want_small = inductor_run["other"]
    _assert_same_step(got_small, want_small, "inductor, other shape")
    assert len(inductor_run["code"]) == 2, "expected one forward and one backward module"


@pytest.mark.slow
def test_inductor_standalone_scale_kernels_bounded(inductor_run) -> None:
    census: KernelCensus = inductor_run["census"]
    kernels = [k for code in inductor_run["code"] for k in re.findall(r"^(\w+) = async_compile\.\w+\(", code, re.M)]
    assert census.nests and kernels
    standalone = census.standalone_scale
    detail = "\n".join(f"  {'fwd' if n.graph == 0 else 'bwd'} {n.buffers}" for n in standalone)
    assert len(standalone) <= MAX_STANDALONE_SCALE_NESTS, (
        f"{len(standalone)} loop nests only scale (bound {MAX_STANDALONE_SCALE_NESTS}):\n{detail}\n"
        f"kernels: {kernels}"
    )
    # scale values computed from the sizes: at most one small scalar nest per graph
    assert len(census.scalar_scale) <= 2, [n.buffers for n in census.scalar_scale]


@pytest.mark.slow
def test_default_transform_compiles_trains_and_matches_eager(eager_model) -> None:
    """``transform(model)`` (inductor, dynamic) == ``transform(model, compile=False)``, then it trains."""
    from torch._dynamo.utils import counters

    m_eager, kw, ref = eager_model
    model, _ = zoo.get("nanogpt", **SIZES)  # same seed: same architecture and inputs
    m = unitscale_fx.transform(model)       # capture at the first call, inductor by default
    assert m.config.compile and m.config.compile_backend == "inductor"
    counters.clear()
    m(**kw)                                  # capture + re-init + compile happen here
    m.load_state_dict(m_eager.state_dict())  # identical parameters to the reference
    _assert_same_step(_step(m, kw), ref, "default transform")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = _loss(m(**kw))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert counters["stats"]["unique_graphs"] == 1, "recompiled during training"
