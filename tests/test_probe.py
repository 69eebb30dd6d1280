"""Tests for unitscale_fx.probe (the scale probe).

Every expected RMS is computed independently from the tensors involved, never
copied from the probe's output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from unitscale_fx.probe import (
    OperandRecord,
    ProbeResult,
    ScaleProbe,
    in_band,
    measure_step,
    tensor_rms,
)


def rms(t: torch.Tensor) -> float:
    """Reference RMS, exactly as the spec defines it."""
    return t.detach().double().pow(2).mean().sqrt().item()


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def find(records: list[OperandRecord], rms_value: float, rel: float = 1e-9, **attrs: object) -> list[OperandRecord]:
    out = []
    for r in records:
        if all(getattr(r, k) == v for k, v in attrs.items()) and close(r.rms, rms_value, rel):
            out.append(r)
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# ---------------------------------------------------------------------------
# (1) Linear: unit-RMS weight on N(0, 1) input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("give_model", [True, False])
def test_linear_forward_and_backward(with_bias: bool, give_model: bool) -> None:
    K, N, B = 256, 64, 32
    lin = torch.nn.Linear(K, N, bias=with_bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K))
        lin.weight.div_(lin.weight.pow(2).mean().sqrt())  # exactly unit RMS
    x = torch.randn(B, K, requires_grad=True)
    c = torch.randn(B, N) * 3.0  # upstream gradient: d(loss)/d(y) = c

    probe = ScaleProbe(lin) if give_model else ScaleProbe()
    with probe:
        y = lin(x)
        loss = (y * c).sum()
        loss.backward()
    res = probe.result()

    assert close(rms(lin.weight), 1.0, 1e-6)
    assert abs(rms(x) - 1.0) < 0.05

    # forward: input and weight operands; linear was decomposed into t + addmm/mm
    fwd = res.forward
    assert fwd and all(r.phase == "forward" for r in fwd)
    assert {r.op for r in fwd} <= {"aten.addmm", "aten.mm"}
    assert len(find(fwd, rms(x), shape=(B, K))) == 1
    w_recs = find(fwd, rms(lin.weight), shape=(K, N))  # transposed weight view
    assert len(w_recs) == 1
    assert close(w_recs[0].rms, 1.0, 1e-6)
    assert w_recs[0].param == "weight"  # identified as the parameter although it is t(weight)
    assert w_recs[0].module == "" and w_recs[0].module_type == "Linear"
    assert w_recs[0].role == "mat2"
    # the bias is not a multiplicand
    if with_bias:
        assert not find(res.records, rms(lin.bias))

    # backward: grad_out (= c) appears in both grad mms, grad-input uses W again
    bwd = res.backward
    assert bwd and all(r.phase == "backward" for r in bwd)
    assert all(r.op == "aten.mm" for r in bwd)
    assert len(bwd) == 4  # grad_input = c @ W ; grad_weight = c^T @ x
    assert len(find(bwd, rms(c))) == 2
    assert find(bwd, rms(lin.weight), shape=(N, K), param="weight")
    assert find(bwd, rms(x), shape=(B, K))
    assert all(r.module == "" for r in bwd)  # backward attributed to the Linear
    # calls are numbered in execution order, forward before backward
    assert max(r.call for r in fwd) < min(r.call for r in bwd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_low_precision(dtype: torch.dtype) -> None:
    lin = torch.nn.Linear(64, 32, dtype=dtype)
    x = torch.randn(4, 7, 64, dtype=dtype)
    probe = ScaleProbe(lin)
    with probe:
        y = lin(x)
        g = torch.randn_like(y)
        y.backward(g)
    res = probe.result()
    assert all(r.dtype == str(dtype).removeprefix("torch.") for r in res.records)
    assert find(res.forward, rms(x), shape=(28, 64))
    assert find(res.forward, rms(lin.weight), param="weight")
    assert find(res.backward, rms(g))


def test_no_grad_records_forward_only() -> None:
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    probe = ScaleProbe()
    with torch.no_grad(), probe:
        lin(x)
    res = probe.result()
    assert len(res.forward) == 2 and res.backward == []
    assert find(res.forward, rms(x))


# ---------------------------------------------------------------------------
# (2) SDPA on CPU, training mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_cpu_forward_backward(dtype: torch.dtype, causal: bool) -> None:
    B, H, T, D = 2, 3, 9, 16
    q = (torch.randn(B, H, T, D) * 2.0).to(dtype).requires_grad_()
    k = (torch.randn(B, H, T, D) * 0.5).to(dtype).requires_grad_()
    v = torch.randn(B, H, T, D).to(dtype).requires_grad_()
    c = torch.randn(B, H, T, D).to(dtype)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return (out.float() * c.float()).pow(2).sum() / 7.0

    # independent reference for grad_out = d loss / d out
    out_ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    (g_ref,) = torch.autograd.grad(loss_of(out_ref), out_ref)

    probe = ScaleProbe()
    with probe:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        loss_of(out).backward()
    res = probe.result()

    fwd = [r for r in res.forward if "scaled_dot_product" in r.op]
    assert [r.role for r in fwd] == ["query", "key", "value"]
    for r, t in zip(fwd, (q, k, v)):
        assert close(r.rms, rms(t)), (r, rms(t))
        assert r.shape == (B, H, T, D)

    bwd = [r for r in res.backward if "scaled_dot_product" in r.op]
    assert bwd and all(r.op.endswith("_backward") for r in bwd)
    roles = {r.role: r for r in bwd}
    assert set(roles) >= {"grad_out", "query", "key", "value"}
    assert close(roles["grad_out"].rms, rms(g_ref), rel=1e-6)
    for name, t in (("query", q), ("key", k), ("value", v)):
        assert close(roles[name].rms, rms(t))
    assert all(r.phase == "backward" for r in bwd)


@pytest.mark.parametrize("mask_kind", ["float_bias", "none"])
def test_sdpa_math_path_is_recorded_as_one_attention_op(mask_kind: str) -> None:
    """With dropout, CPU SDPA runs the math fallback, whose pieces (``bmm`` of ``q*sqrt(scale)``,
    of the probabilities...) a fused kernel never exposes. The probe records the call as the
    attention op (q, k, v forward; grad_out, q, k, v backward) and none of the pieces, and the
    step computes exactly what it computes without the probe."""
    B, H, T, D = 2, 3, 9, 16
    q = (torch.randn(B, H, T, D) * 2.0).requires_grad_()
    k = (torch.randn(B, H, T, D) * 0.5).requires_grad_()
    v = torch.randn(B, H, T, D).requires_grad_()
    bias = torch.randn(H, T, T).requires_grad_() if mask_kind == "float_bias" else None
    c = torch.randn(B, H, T, D)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    assert torch._fused_sdp_choice(q, k, v, bias, 0.1, False) == 0  # the math backend

    def step(probe: ScaleProbe | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for t in leaves:
            t.grad = None
        torch.manual_seed(1)
        with probe if probe is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1)
            (out * c).pow(2).sum().backward()
        return out.detach(), [t.grad.clone() for t in leaves]

    out_ref, grads_ref = step(None)
    torch.manual_seed(1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1)
    (g_ref,) = torch.autograd.grad((ref * c).pow(2).sum(), ref)
    probe = ScaleProbe()
    out, grads = step(probe)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    res = probe.result()
    assert {r.op for r in res.records} == {"aten.scaled_dot_product_attention"}
    assert [(r.phase, r.role) for r in res.records] == [
        ("forward", "query"), ("forward", "key"), ("forward", "value"),
        ("backward", "grad_out"), ("backward", "query"), ("backward", "key"), ("backward", "value")]
    for r, t in zip(res.records, (q, k, v, g_ref, q, k, v)):
        assert close(r.rms, rms(t), rel=1e-6), (r, rms(t))


# ---------------------------------------------------------------------------
# (3) parameter gradients
# ---------------------------------------------------------------------------


def test_param_grads_match_manual() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.LayerNorm(20), torch.nn.Linear(20, 5)
    )
    model[2].bias.requires_grad_(False)  # a parameter without grad is skipped
    x = torch.randn(6, 12)
    probe = ScaleProbe(model)
    with probe:
        model(x).pow(2).mean().backward()
    got = dict(probe.record_param_grads(model))
    res = probe.result()

    expected = {n: rms(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    assert "2.bias" not in expected and "2.bias" not in got
    assert set(got) == set(expected) == {"0.weight", "0.bias", "2.weight", "3.weight", "3.bias"}
    for n, v in expected.items():
        assert close(got[n], v)
    assert dict(res.param_grads) == got
    assert res.summary()["grads"]["count"] == 5


# ---------------------------------------------------------------------------
# (4) summary on a hand-made result
# ---------------------------------------------------------------------------


def _rec(call: int, rms_value: float, phase: str = "forward", role: str = "self") -> OperandRecord:
    return OperandRecord(
        call=call, op="aten.mm", overload="default", role=role, phase=phase,
        rms=rms_value, shape=(2, 2), dtype="float32",
    )


def test_summary_hand_made() -> None:
    res = ProbeResult(
        forward=[_rec(0, 1.0), _rec(0, 0.5, role="mat2"), _rec(1, 2.0), _rec(1, 0.25, role="mat2"), _rec(2, 16.0)],
        backward=[_rec(3, 0.1, "backward"), _rec(3, 1.0, "backward", "mat2")],
        param_grads=[("a", 1.0), ("b", 0.0), ("c", 3.0)],
    )
    s = res.summary()
    assert set(s) == {"forward", "backward", "grads"}
    f = s["forward"]
    assert f["count"] == 5 and f["in_band"] == 3
    assert f["fraction_in_band"] == pytest.approx(3 / 5)
    assert f["outside_outer"] == 1  # 16 > 8 ; 0.25 is inside [1/8, 8]
    assert f["worst"]["rms"] == 16.0 and f["worst"]["log2_rms"] == pytest.approx(4.0)
    assert f["worst"]["op"] == "aten.mm" and f["worst"]["name"].startswith("#2")
    b = s["backward"]
    assert (b["count"], b["in_band"], b["outside_outer"]) == (2, 1, 1)
    assert b["worst"]["rms"] == 0.1
    g = s["grads"]
    assert (g["count"], g["in_band"], g["outside_outer"]) == (3, 1, 1)
    assert g["worst"]["name"] == "b" and g["worst"]["op"] is None  # rms 0 is the worst possible

    # other bands
    s2 = res.summary(lo=0.25, hi=4.0, outer_lo=0.5, outer_hi=2.0)
    assert s2["forward"]["in_band"] == 4 and s2["forward"]["outside_outer"] == 2
    assert s2["grads"]["in_band"] == 2  # 1.0 and 3.0

    # helpers
    assert res.fraction_in_band("backward") == 0.5
    assert [e[2] for e in res.out_of_band("forward")] == [16.0, 0.25]
    assert len(res.in_band("grads")) == 1
    assert in_band(0.5) and in_band(2.0) and not in_band(2.0001) and not in_band(math.nan)
    assert ProbeResult().summary()["forward"] == {
        "count": 0, "in_band": 0, "fraction_in_band": None, "outside_outer": 0,
        "min_rms": None, "max_rms": None, "worst": None,
    }

    # serialisation: strict JSON, round trip
    res.backward.append(_rec(4, math.inf, "backward"))
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = ProbeResult.from_dict(json.loads(text))
    assert back == res
    assert "forward" in str(res) and "in-band" in str(res)


def test_table_renders() -> None:
    pytest.importorskip("rich")
    from rich.console import Console
    from rich.table import Table

    res = ProbeResult(forward=[_rec(0, 1.0)], param_grads=[("w", 0.01)])
    for detail in (False, True):
        t = res.table(detail=detail)
        assert isinstance(t, Table)
        console = Console(record=True, width=200)
        console.print(t)
        assert "aten.mm" in console.export_text() or not detail


# ---------------------------------------------------------------------------
# (5) measure_step has no side effects
# ---------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        logits = self.fc(h.flatten(1))
        out = {"logits": logits}
        if target is not None:
            out["loss"] = F.cross_entropy(logits, target)
        return out


def test_measure_step_no_side_effects() -> None:
    model = _Net().train()
    x = torch.randn(4, 3, 6, 6)
    target = torch.tensor([0, 1, 2, 3])
    old_grad = torch.randn_like(model.fc.weight)
    model.fc.weight.grad = old_grad
    model.conv.weight.grad = None
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads_before = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    bufs_before = {n: b.clone() for n, b in model.named_buffers()}
    rng_before = torch.get_rng_state()

    res = measure_step(model, {"x": x, "target": target})

    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
        if grads_before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads_before[n]), n
    assert model.fc.weight.grad is old_grad
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs_before[n]), n
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training

    # the step really happened: compare with an independent run from the same RNG state
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    torch.set_rng_state(rng_before)
    ref(x, target)["loss"].backward()
    ref_grads = {n: rms(p.grad) for n, p in ref.named_parameters()}
    got = dict(res.param_grads)
    assert set(got) == set(ref_grads)
    for n in got:
        assert close(got[n], ref_grads[n], 1e-6), n
    conv_fwd = res.select(op="convolution", phase="forward")
    assert [r.role for r in conv_fwd] == ["input", "weight"]
    assert close(conv_fwd[0].rms, rms(x)) and conv_fwd[1].param == "conv.weight"
    assert res.select(op="convolution_backward", phase="backward")


def test_measure_step_loss_extraction() -> None:
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    # scalar output
    r1 = measure_step(torch.nn.Sequential(lin, torch.nn.Flatten(0), _Sum()), (x,))
    assert r1.backward and len(r1.param_grads) == 2
    # tuple output with scalar first element, single-tensor input
    r2 = measure_step(_TupleOut(lin), x)
    assert r2.backward
    # explicit loss_fn
    r3 = measure_step(lin, (x,), loss_fn=lambda out: out.pow(2).mean())
    g = 2 * lin(x) / lin(x).numel()  # d mean(y^2) / dy
    assert find(r3.backward, rms(g), rel=1e-6)
    with pytest.raises(ValueError):
        measure_step(lin, (x,))  # non-scalar output, no loss_fn


class _Sum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class _TupleOut(torch.nn.Module):
    def __init__(self, lin: torch.nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y.pow(2).mean(), y


# ---------------------------------------------------------------------------
# (6) bmm / matmul / conv2d and the other aten ops
# ---------------------------------------------------------------------------


def test_bmm_and_matmul() -> None:
    a = torch.randn(3, 5, 7, requires_grad=True)
    b = (torch.randn(3, 7, 4) * 0.3).requires_grad_()
    m = (torch.randn(7, 6) * 5).requires_grad_()
    c1 = torch.randn(3, 5, 4)
    c2 = torch.randn(3, 5, 6)
    probe = ScaleProbe()
    with probe:
        y1 = torch.bmm(a, b)
        y2 = torch.matmul(a, m)  # 3-D @ 2-D: folded into a single mm
        ((y1 * c1).sum() + (y2 * c2).sum()).backward()
    res = probe.result()
    bmm = res.select(op="bmm", phase="forward")
    assert [r.role for r in bmm] == ["self", "mat2"]
    assert close(bmm[0].rms, rms(a)) and close(bmm[1].rms, rms(b))
    mm = res.select(op="mm", phase="forward")
    assert [r.shape for r in mm] == [(15, 7), (7, 6)]
    assert close(mm[0].rms, rms(a)) and close(mm[1].rms, rms(m))
    assert len(find(res.backward, rms(c1))) == 2  # grad of both bmm operands
    assert len(find(res.backward, rms(c2))) == 2


def test_conv2d() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 10, 10, requires_grad=True) * 1.5
    probe = ScaleProbe(conv)
    with probe:
        y = conv(x)
        c = torch.randn_like(y)
        (y * c).sum().backward()
    res = probe.result()
    fwd = res.select(op="convolution")
    assert [(r.role, r.phase) for r in fwd] == [("input", "forward"), ("weight", "forward")]
    assert close(fwd[0].rms, rms(x)) and close(fwd[1].rms, rms(conv.weight))
    assert fwd[1].param == "weight"
    bwd = res.select(op="convolution_backward")
    assert [(r.role, r.phase) for r in bwd] == [("grad_output", "backward"), ("input", "backward"), ("weight", "backward")]
    assert close(bwd[0].rms, rms(c)) and close(bwd[1].rms, rms(x)) and close(bwd[2].rms, rms(conv.weight))


def test_direct_aten_ops() -> None:
    A = torch.randn(4, 6)
    B = torch.randn(6, 3) * 2
    v = torch.randn(6) * 0.5
    w = torch.randn(6) * 3
    bias = torch.randn(4, 3) * 100
    P = torch.randn(5, 4, 6)
    Q = torch.randn(5, 6, 3) * 0.1
    probe = ScaleProbe()
    with probe:
        torch.dot(v, w)
        torch.mv(A, v)
        torch.addmm(bias, A, B)
        torch.baddbmm(bias, P, Q)
        torch.addbmm(bias, P, Q)
        torch.mm(A, B)
    res = probe.result()
    expect = [
        ("aten.dot", "self", v), ("aten.dot", "tensor", w),
        ("aten.mv", "self", A), ("aten.mv", "vec", v),
        ("aten.addmm", "mat1", A), ("aten.addmm", "mat2", B),
        ("aten.baddbmm", "batch1", P), ("aten.baddbmm", "batch2", Q),
        ("aten.addbmm", "batch1", P), ("aten.addbmm", "batch2", Q),
        ("aten.mm", "self", A), ("aten.mm", "mat2", B),
    ]
    assert [(r.op, r.role) for r in res.forward] == [(o, ro) for o, ro, _ in expect]
    for r, (_, _, t) in zip(res.forward, expect):
        assert close(r.rms, rms(t))
    assert [r.call for r in res.forward] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert not find(res.forward, rms(bias))
    # non-floating and empty operands are skipped
    with probe:
        torch.mm(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))
        torch.mm(torch.ones(0, 3), torch.ones(3, 2))
    assert len(probe.result().forward) == 12 + 1  # only the non-empty (3, 2) operand


# ---------------------------------------------------------------------------
# phase handling, modules, compile
# ---------------------------------------------------------------------------


def test_forced_phase_and_autograd_grad() -> None:
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    probe = ScaleProbe()
    with probe:
        with probe.phase("backward"):
            y = lin(x)
        (gx,) = torch.autograd.grad(y.sum(), x)  # backward detected without loss.backward()
    res = probe.result()
    assert res.forward == []
    assert len(res.backward) == 4
    assert find(res.backward, rms(torch.ones(2, 4)))  # grad_out of y.sum()
    assert probe.current_phase() == "forward"
    with pytest.raises(ValueError):
        probe.set_phase("sideways")  # type: ignore[arg-type]


def test_nested_modules_attribution() -> None:
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.nn.Linear(8, 2)
    )
    x = torch.randn(3, 8)
    res = measure_step(model, (x,), loss_fn=lambda o: o.sum())
    assert {r.module for r in res.forward} == {"0.0", "1"}
    assert {r.module for r in res.backward} == {"0.0", "1"}
    assert {r.param for r in res.records} >= {"0.0.weight", "1.weight"}


def test_hooks_removed_after_exit() -> None:
    from torch.nn.modules import module as module_mod

    n_pre = len(module_mod._global_forward_pre_hooks)
    n_post = len(module_mod._global_forward_hooks)
    probe = ScaleProbe()
    with probe:
        assert len(module_mod._global_forward_pre_hooks) == n_pre + 1
        torch.nn.Linear(2, 2)(torch.randn(1, 2))
    assert len(module_mod._global_forward_pre_hooks) == n_pre
    assert len(module_mod._global_forward_hooks) == n_post
    with pytest.raises(RuntimeError), probe:
        raise RuntimeError("boom")
    assert len(module_mod._global_forward_pre_hooks) == n_pre


@pytest.mark.filterwarnings("ignore:Using `torch.compile")
def test_compiled_model_runs_eagerly_under_probe() -> None:
    """A compiled model runs eagerly under the probe, is recorded, and still compiles afterwards."""
    compiles: list[int] = []
    runs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiles.append(1)

        def run(*args: object) -> object:
            runs.append(1)
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 8)
    compiled = torch.compile(lin, backend=backend)
    x = torch.randn(4, 16)
    try:
        for warm in (False, True):
            n_compiles, n_runs = len(compiles), len(runs)
            probe = ScaleProbe()
            with probe:
                compiled(x).sum().backward()
            res = probe.result()
            assert (len(compiles), len(runs)) == (n_compiles, n_runs)  # nothing compiled nor run compiled
            assert find(res.forward, rms(x)) and find(res.forward, rms(lin.weight), param="_orig_mod.weight")
            assert len(res.backward) == 2  # grad_weight mm (x does not require grad)
            if not warm:
                # the probe run must not stop Dynamo from compiling the model later
                compiled(x)
                assert len(compiles) == 1 and len(runs) == 1
    finally:
        torch._dynamo.reset()


def test_tensor_rms_matches_definition() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = (torch.randn(33, 17) * 7).to(dtype)
        assert close(tensor_rms(t).item(), rms(t), 1e-12)
