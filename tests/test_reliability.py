"""Reliability of ``unitscale_fx.transform`` (issue 6): bad input gets a clear error, the user's model
is never corrupted, nothing is lost.

Every case either works or raises an exported ``unitscale_fx`` exception whose message names the
op, the user's source line and the fix. Cases already covered by ``test_transform.py`` (state_dict
keys of GPT-2, strict ``MissingRuleError``, transforming a ``UnitScaledModule``, train/eval
dropout, a later batch on GPT-2, bad ``Config`` values) are not repeated here.

Models are tiny (hidden <= 32, one layer, seq <= 16) and everything runs eagerly
(``Config(compile=False)``; compilation is tested elsewhere).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
from unitscale_fx import Config, zoo
from unitscale_fx.errors import InputMismatchError

EAGER = Config(compile=False)
TINY = dict(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64)
THIS_FILE = "test_reliability.py"


def _line_of(marker: str) -> int:
    """Line number (1-based) of the source line of this file containing ``marker``."""
    with open(__file__, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if marker in line and "_line_of(" not in line:
                return i
    raise AssertionError(marker)


def _nanogpt(seed: int = 0, **over):
    torch.manual_seed(seed)
    return zoo.get("nanogpt", **{**TINY, "seed": seed, **over})


def _snapshot(model: nn.Module) -> dict:
    """Everything a transform could change in ``model``, by value and by identity."""
    mods = dict(model.named_modules())
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: (b, b.detach().clone()) for n, b in model.named_buffers(remove_duplicate=False)},
        "training": {n: m.training for n, m in mods.items()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks))
                  for n, m in mods.items()},
        "attrs": {n: sorted(m.__dict__) for n, m in mods.items()},
        "keys": [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()],
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now["keys"] == snap["keys"]
    assert now["params"].keys() == snap["params"].keys()
    for n, (p, v, rg) in snap["params"].items():
        q, w, rg2 = now["params"][n]
        assert q is p, n
        assert torch.equal(w, v), n
        assert rg2 == rg, n
    for n, (b, v) in snap["buffers"].items():
        assert now["buffers"][n][0] is b and torch.equal(now["buffers"][n][1], v), n
    assert now["training"] == snap["training"]
    assert now["hooks"] == snap["hooks"]
    assert now["attrs"] == snap["attrs"]
    assert not getattr(model, "_unitscale_fx_transformed", False)


def _loss(out):
    return out[1] if isinstance(out, tuple) else out.loss


# =========================================================================== models export rejects
class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # MARK:data-dependent-if
            return h * 2
        return h


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.gate = _Branchy()

    def forward(self, x):
        return self.gate(self.pre(x))


class _ItemToInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        n = int(x.abs().max().item() * 3) + 1  # MARK:item-to-int
        return self.lin(x)[:, :n]


def test_data_dependent_control_flow_names_op_source_line_module_and_fix():
    model = _Outer()
    snap = _snapshot(model)
    with pytest.raises(unitscale_fx.CaptureError) as e:
        unitscale_fx.transform(model, example_inputs=(torch.randn(3, 8),), config=EAGER)
    msg = str(e.value)
    assert f'{THIS_FILE}", line {_line_of("MARK:data-dependent-if")}' in msg
    assert "if h.sum() > 0" in msg  # the code itself
    assert "aten.item" in msg  # the op
    assert "module: gate" in msg  # the submodule (fqn)
    assert "torch.where" in msg and "torch.cond" in msg  # the fix
    _assert_unchanged(model, snap)


def test_tensor_value_as_python_number_names_op_and_line():
    with pytest.raises(unitscale_fx.CaptureError) as e:
        unitscale_fx.transform(_ItemToInt(), example_inputs=(torch.randn(3, 8),), config=EAGER)
    msg = str(e.value)
    assert f'{THIS_FILE}", line {_line_of("MARK:item-to-int")}' in msg
    assert ".item()" in msg and "aten._local_scalar_dense" in msg


class _SideEffects(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0
        self.seen: list = []

    def forward(self, x):
        self.calls += 1
        self.seen.append(x.shape[0])
        return self.lin(x)


def test_python_side_effects_are_refused_not_silently_dropped():
    """Export runs the forward once on fake tensors (and undoes attribute changes); the graph would
    never count again. Refused, naming the attributes; the model is untouched."""
    model = _SideEffects()
    hook = model.lin.register_forward_hook(lambda m, i, o: None)
    snap = _snapshot(model)
    with pytest.raises(unitscale_fx.CaptureError) as e:
        unitscale_fx.transform(model, example_inputs=(torch.randn(3, 8),), config=EAGER)
    msg = str(e.value)
    assert "side effects" in msg and "calls" in msg and "0 -> 1" in msg and "seen" in msg
    assert "register_buffer" in msg  # the fix
    _assert_unchanged(model, snap)
    assert model.calls == 0 and model.seen == []
    hook.remove()


class _Opaque:
    def __init__(self, t):
        self.t = t


class _ReturnsOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return _Opaque(self.lin(x))


def test_unflattenable_output_type_names_the_fix():
    with pytest.raises(unitscale_fx.CaptureError) as e:
        unitscale_fx.transform(_ReturnsOpaque(), example_inputs=(torch.randn(3, 8),), config=EAGER)
    assert "register_pytree_node" in str(e.value)


# =========================================================================== ops without a rule
class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.ops.unitscale_rel.odd(self.l1(x))  # MARK:odd-op
        return self.l2(h)


@pytest.fixture(scope="module")
def odd_op():
    lib = torch.library.Library("unitscale_rel", "FRAGMENT")
    lib.define("odd(Tensor x) -> Tensor")
    lib.impl("odd", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("odd", lambda x: torch.empty_like(x), "Meta")

    def backward(ctx, g):
        return g * 2

    torch.library.register_autograd("unitscale_rel::odd", backward, setup_context=lambda ctx, inputs, output: None)
    yield
    lib._destroy()


def test_op_without_rule_non_strict_is_reported_left_unscaled_and_trains(odd_op):
    m = unitscale_fx.transform(_Odd(), example_inputs=(torch.randn(4, 16),), config=EAGER)
    summary = m.summary()
    line = _line_of("MARK:odd-op")
    assert "unitscale_rel.odd" in summary and f"line {line}" in summary and "left unscaled" in summary
    missing = m.result.missing
    assert [mo.op for mo in missing if "unitscale_rel" in mo.op] and all(THIS_FILE in (mo.source or "") for mo in missing)
    # the rest of the model still runs and trains
    x = torch.randn(6, 16)
    out = m(x)
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_strict_missing_rule_leaves_model_untouched_and_lists_ops(odd_op):
    model = _Odd()
    snap = _snapshot(model)
    with pytest.raises(unitscale_fx.MissingRuleError) as e:
        unitscale_fx.transform(model, example_inputs=(torch.randn(4, 16),), config=EAGER.replace(strict=True))
    ops = e.value.ops
    assert any("unitscale_rel.odd" in op and THIS_FILE in (src or "") for _, op, src in ops), ops
    _assert_unchanged(model, snap)  # nothing re-initialised: strict failed before the init
    unitscale_fx.transform(model, example_inputs=(torch.randn(4, 16),), config=EAGER)  # and it can be retried


# =========================================================================== non-Transformer models
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def test_mlp_is_unit_scaled_and_accepts_other_batch_sizes():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    m = unitscale_fx.transform(_MLP(), example_inputs=(x,), config=EAGER)
    assert "every op has a scale rule" in m.summary()
    g = torch.randn(64, 4)  # a unit gradient at the output: the analysis' assumption for external losses
    probe = unitscale_fx.measure_step(m, (x,), loss_fn=lambda out: (out * g).sum())
    assert probe.fraction_in_band("forward") == 1.0
    assert probe.fraction_in_band("backward") == 1.0
    assert probe.fraction_in_band("grads") == 1.0
    assert m(torch.randn(5, 16)).shape == (5, 4)
    assert m(x=torch.randn(1, 16)).shape == (1, 4)  # by keyword, though captured positionally


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_cnn_transforms_trains_and_reports_what_it_left_unscaled():
    torch.manual_seed(0)
    model = _CNN()
    x = torch.randn(4, 3, 8, 8)
    m = unitscale_fx.transform(model, example_inputs=(x,), config=EAGER.replace(init="keep"))
    # export runs on fake tensors: capturing must not move BatchNorm's running statistics
    assert torch.equal(model.bn.running_mean, torch.zeros(8)) and int(model.bn.num_batches_tracked) == 0
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    y = torch.randint(0, 10, (6,))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(m(torch.randn(6, 3, 8, 8)), y)  # another batch size
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert int(model.bn.num_batches_tracked) == 3  # the graph updates the running statistics (train mode)
    for op in m.result.missing:  # whatever has no rule is named with its source line
        assert THIS_FILE in (op.source or ""), op


def test_cnn_every_op_has_a_rule_and_forward_is_in_band():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    m = unitscale_fx.transform(_CNN(), example_inputs=(x,), config=EAGER)
    assert not m.result.missing
    g = torch.randn(8, 10)
    assert unitscale_fx.measure_step(m, (x,), loss_fn=lambda o: (o * g).sum()).fraction_in_band("forward") == 1.0


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_batchnorm_follows_eval_mode():
    torch.manual_seed(0)
    model = _BN()
    model.bn.running_mean.fill_(3.0)
    m = unitscale_fx.transform(model, example_inputs=(torch.randn(16, 8),), config=EAGER.replace(init="keep"))
    m.eval()
    with torch.no_grad():
        y = m(torch.randn(4, 8))
    assert torch.equal(model.bn.running_mean, torch.full((8,), 3.0))  # running statistics not updated
    assert y.mean(0).abs().min() > 1.0  # normalised with the running mean (3), not the batch's
    m.train()
    m(torch.randn(16, 8))
    assert not torch.equal(model.bn.running_mean, torch.full((8,), 3.0))  # training updates them again


# =========================================================================== inputs and outputs
@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    aux: torch.Tensor


class _KwOnly(nn.Module):
    """Keyword-only signature, integer ids, a boolean mask, a buffer, one Linear used twice."""

    def __init__(self, kind: str):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20)
        self.register_buffer("gain", torch.tensor(2.0))
        self.kind = kind

    def forward(self, *, ids, mask, temperature=None):
        h = self.emb(ids) * mask.unsqueeze(-1).to(torch.float32)
        h = self.lin(F.gelu(self.lin(h) * self.gain))  # the same module called twice
        logits = self.head(h)
        if self.kind == "tensor":
            return logits
        if self.kind == "tuple":
            return logits, h.mean()
        if self.kind == "dict":
            return {"logits": logits, "aux": h.mean()}
        if self.kind == "dataclass":
            return _Out(logits, h.mean())
        from transformers.modeling_outputs import MaskedLMOutput

        return MaskedLMOutput(logits=logits)


def _kw_inputs(batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(ids=torch.randint(0, 20, (batch, seq), generator=g), mask=torch.rand(batch, seq, generator=g) > 0.3)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "dataclass", "model_output"])
def test_kwargs_only_int_and_bool_inputs_and_every_output_structure(kind):
    import transformers.modeling_outputs  # noqa: F401 - registers ModelOutput pytrees before capture

    torch.manual_seed(0)
    model = _KwOnly(kind)
    ref = copy.deepcopy(model)
    m = unitscale_fx.transform(model, example_inputs=_kw_inputs(), config=EAGER.replace(init="keep"))
    for batch, seq in [(2, 8), (3, 5), (1, 1)]:  # later batches of other sizes
        inp = _kw_inputs(batch, seq, seed=batch)
        out, out_ref = m(**inp), ref(**inp)
        assert type(out) is type(out_ref)
        if kind == "tensor":
            assert out.shape == (batch, seq, 20)
        elif kind == "tuple":
            assert len(out) == 2 and out[0].shape == (batch, seq, 20)
        elif kind == "dict":
            assert out.keys() == out_ref.keys()
        else:
            assert out.logits.shape == (batch, seq, 20)
    # the boolean mask is used: masking everything zeroes the embedding path
    inp = _kw_inputs()
    full = m(**{**inp, "mask": torch.ones_like(inp["mask"])})
    none = m(**{**inp, "mask": torch.zeros_like(inp["mask"])})
    def first(o):
        if isinstance(o, torch.Tensor):
            return o
        return o[0] if isinstance(o, tuple) else (o["logits"] if isinstance(o, dict) else o.logits)

    assert not torch.allclose(first(full), first(none))
    # passing a default explicitly is the same call
    torch.testing.assert_close(first(m(**inp)), first(m(**inp, temperature=None)))


def test_module_called_twice_and_buffer_gradients_are_valid():
    """The Linear used twice gets the sum of both contributions; backward-only scales keep it exact
    up to one positive factor."""
    torch.manual_seed(0)
    model = _KwOnly("tensor")
    other = copy.deepcopy(model)
    inp = _kw_inputs(batch=4, seq=8)
    a = unitscale_fx.transform(model, example_inputs=inp, config=EAGER)
    b = unitscale_fx.transform(other, example_inputs=inp, config=EAGER.replace(scale_backward=False))
    b.load_state_dict(a.state_dict())
    g = torch.randn(4, 8, 20)
    grads = []
    for mod in (a, b):
        mod.zero_grad()
        (mod(**inp) * g).sum().backward()
        grads.append({n: p.grad.clone() for n, p in mod.named_parameters()})
    for n in grads[0]:
        cos = F.cosine_similarity(grads[0][n].flatten().double(), grads[1][n].flatten().double(), dim=0).item()
        assert cos >= 0.9999, (n, cos)
    assert "gain" in dict(model.named_buffers()) and float(model.gain) == 2.0


def test_positional_and_keyword_calls_are_interchangeable():
    model, kw = _nanogpt()
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)  # captured with keywords
    m.eval()
    with torch.no_grad():
        a = m(**kw)[1]
        b = m(kw["idx"], kw["targets"])
        c = m(kw["idx"], targets=kw["targets"])
    torch.testing.assert_close(a, b[1])
    torch.testing.assert_close(a, c[1])


def test_lazy_capture_from_a_mixed_positional_and_keyword_call_keeps_sizes_dynamic():
    model, kw = _nanogpt()
    m = unitscale_fx.transform(model, config=EAGER)
    m(kw["idx"], targets=kw["targets"])  # captured from positional + keyword arguments
    ids = kw["idx"][:1, :8]
    out = m(ids, targets=ids)
    assert out[0].shape == (1, 8, TINY["vocab"])
    torch.testing.assert_close(m(idx=ids, targets=ids)[1], out[1])


class _Temp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, temperature: float = 1.0):
        return self.lin(x) / temperature


def test_calls_that_do_not_fit_the_captured_graph_raise_input_mismatch():
    model, kw = _nanogpt()
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    with pytest.raises(InputMismatchError) as e:  # targets were given at capture
        m(kw["idx"])
    msg = str(e.value)
    assert "missing now: targets" in msg and "captured call: GPT(idx=Tensor[2, 16]" in msg and "fix:" in msg
    assert isinstance(e.value, unitscale_fx.CaptureError)
    ids = torch.randint(0, TINY["vocab"], (2, 2 * TINY["seq"] + 1))
    with pytest.raises(InputMismatchError, match="shape"):  # nanoGPT slices its causal mask: seq <= block_size
        m(idx=ids, targets=ids)

    t = unitscale_fx.transform(_Temp(), example_inputs=(torch.randn(2, 6, 8), 2.0), config=EAGER)
    assert t(torch.randn(3, 4, 8), 2.0).shape == (3, 4, 8)
    with pytest.raises(InputMismatchError, match="non-tensor arguments"):  # a Python float is a graph constant
        t(torch.randn(2, 6, 8), 4.0)
    with pytest.raises(InputMismatchError, match="not given at capture"):
        unitscale_fx.transform(_Temp(), example_inputs=(torch.randn(2, 6, 8),), config=EAGER)(torch.randn(2, 6, 8), 3.0)


# =========================================================================== modes, dtypes
def test_eval_no_grad_and_inference_mode_agree_and_keep_no_graph():
    model, kw = _nanogpt()
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    m.eval()
    assert not model.training and all(not mod.training for mod in model.modules())
    with torch.no_grad():
        a = m(**kw)
    with torch.inference_mode():
        b = m(**kw)
    c = m(**kw)
    assert not a[1].requires_grad and b[1].is_inference()
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[0], c[0].detach())
    m.train()
    assert model.training and m.training
    _loss(m(**kw)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_model_stays_bf16_and_is_unit_scaled():
    model, kw = _nanogpt()
    model = model.to(torch.bfloat16)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits, loss = m(**kw)
    assert logits.dtype == torch.bfloat16
    assert abs(loss.item() - math.log(TINY["vocab"])) / math.log(TINY["vocab"]) < 0.05
    probe = unitscale_fx.measure_step(m, kw)
    assert probe.fraction_in_band("forward") >= 0.95 and probe.fraction_in_band("backward") >= 0.9
    assert all(p.grad is None for p in model.parameters())  # measure_step put the old grads back


# =========================================================================== parameters
def test_frozen_parameters_get_no_gradient_and_keep_their_values_with_init_keep():
    model, kw = _nanogpt()
    frozen = ["transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"]
    for n in frozen:
        model.get_parameter(n).requires_grad_(False)
    before = {n: model.get_parameter(n).detach().clone() for n in frozen}
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER.replace(init="keep"))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        _loss(m(**kw)).backward()
        opt.step()
    for n in frozen:
        p = model.get_parameter(n)
        assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def _transformed_and_trained(model, kw, steps: int = 2):
    """``model`` transformed eagerly and trained ``steps`` AdamW steps on ``kw``."""
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        _loss(m(**kw)).backward()
        opt.step()
    return m


def test_tied_weights_stay_tied_through_training_and_checkpoints():
    model, kw = _nanogpt()
    m = _transformed_and_trained(model, kw)
    assert m.lm_head.weight is m.transformer.wte.weight
    sd = m.state_dict()
    assert "lm_head.weight" in sd and "transformer.wte.weight" in sd  # both keys, as in the original
    fresh, _ = _nanogpt(seed=1)
    fresh.load_state_dict(sd, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


# =========================================================================== transform twice
def test_two_lazy_wrappers_of_one_model_the_second_is_refused_without_reinit():
    model, kw = _nanogpt()
    first = unitscale_fx.transform(model, config=EAGER)
    second = unitscale_fx.transform(model, config=EAGER)  # both lazy: nothing captured yet
    first(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # "training" through the first wrapper
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(unitscale_fx.AlreadyTransformedError):
        second(**kw)
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n]), n  # never re-initialised a second time


def test_transform_refuses_a_model_containing_a_transformed_one():
    model, kw = _nanogpt()
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    with pytest.raises(unitscale_fx.AlreadyTransformedError, match="scale it twice"):
        unitscale_fx.transform(nn.Sequential(m), config=EAGER)
    with pytest.raises(unitscale_fx.AlreadyTransformedError):
        unitscale_fx.transform(model, config=EAGER)  # the original itself
    with pytest.raises(unitscale_fx.AlreadyTransformedError):
        unitscale_fx.transform(copy.deepcopy(model), config=EAGER)  # a copy carries the re-initialised weights


# =========================================================================== failure half-way
def _inject(monkeypatch, exc: type = RuntimeError):
    """Make the backward-scale pass (the last pass) vandalise the model, then fail."""
    from unitscale_fx.passes import scale_backward

    def broken(self, gm, state):
        root = state.capture.gm  # what a buggy pass could reach: the bound, shared modules
        blk = root.transformer.h[0]
        blk.register_forward_hook(lambda *a: None)
        blk.attn.training = False
        blk.mlp.register_buffer("junk", torch.ones(1))
        blk.attn.c_attn.weight.requires_grad_(False)
        root.transformer.stray = 1
        raise exc("injected failure")

    monkeypatch.setattr(scale_backward.UnitScaleBackward, "__call__", broken)


def test_failure_in_a_pass_leaves_the_model_exactly_as_it_was(monkeypatch):
    model, kw = _nanogpt()
    model.transformer.h[0].register_forward_pre_hook(lambda *a: None)  # the user's own hook stays
    model.transformer.h[0].mlp.eval()  # a mixed training flag stays mixed
    snap = _snapshot(model)
    _inject(monkeypatch)
    with pytest.raises(unitscale_fx.PassError, match="unit_scale_backward"):
        unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    _assert_unchanged(model, snap)
    monkeypatch.undo()
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)  # a retry works
    assert torch.isfinite(_loss(m(**kw)))


def test_interrupt_during_lazy_capture_leaves_the_model_as_it_was(monkeypatch):
    model, kw = _nanogpt()
    snap = _snapshot(model)
    m = unitscale_fx.transform(model, config=EAGER)
    _inject(monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        m(**kw)
    _assert_unchanged(model, snap)
    assert m.result is None
    monkeypatch.undo()
    assert torch.isfinite(_loss(m(**kw)))  # the same wrapper captures at its next call


def test_failure_during_reinit_restores_the_parameters_already_written(monkeypatch):
    import unitscale_fx.api as api

    real = api.apply_init

    def half_then_fail(model, roles, generator=None):
        half = dict(list(roles.items())[: len(roles) // 2])
        real(model, half)
        raise MemoryError("injected: out of memory half-way through the re-init")

    model, kw = _nanogpt()
    snap = _snapshot(model)
    monkeypatch.setattr(api, "apply_init", half_then_fail)
    with pytest.raises(MemoryError):
        unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    _assert_unchanged(model, snap)


# =========================================================================== nothing lost
def test_state_dict_round_trips_through_torch_save_weights_only_and_both_ways():
    model, kw = _nanogpt()
    ref, _ = _nanogpt(seed=3)
    keys = [(k, tuple(v.shape), v.dtype) for k, v in ref.state_dict().items()]
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    assert [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()] == keys
    assert [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()] == keys
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    ref.load_state_dict(loaded, strict=True)  # transformed -> original
    for k, v in m.state_dict().items():
        torch.testing.assert_close(ref.state_dict()[k], v)
    ref2, _ = _nanogpt(seed=4)
    m.load_state_dict(ref2.state_dict(), strict=True)  # original -> transformed
    for k, v in ref2.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v)


def test_resume_from_checkpoint_continues_the_same_function():
    """Save after training; a fresh model transformed with the same example inputs, then loaded
    (eagerly, or lazily before its first call), computes exactly what the trained one does."""
    model, kw = _nanogpt()
    m = _transformed_and_trained(model, kw)
    ckpt = copy.deepcopy(m.state_dict())
    m.eval()
    with torch.no_grad():
        expect = m(**kw)[1]
    eager = unitscale_fx.transform(_nanogpt(seed=7)[0], example_inputs=kw, config=EAGER)
    eager.load_state_dict(ckpt)
    lazy = unitscale_fx.transform(_nanogpt(seed=8)[0], config=EAGER)
    lazy.load_state_dict(ckpt)  # before the first call: the capture must not re-initialise it
    for r in (eager, lazy):
        r.eval()
        with torch.no_grad():
            torch.testing.assert_close(r(**kw)[1], expect)


def test_deepcopy_is_independent_and_pickling_is_refused_with_the_alternative():
    model, kw = _nanogpt()
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    c = copy.deepcopy(m)
    assert c.result is not None and c.result.gm is not m.result.gm
    assert all(p is not q for p, q in zip(c.parameters(), m.parameters()))
    assert c.lm_head.weight is c.transformer.wte.weight  # tying survives the copy
    opt = torch.optim.SGD(c.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _loss(c(**kw)).backward()
    opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n  # the copy trains alone
    m.eval(), c.eval()
    with torch.no_grad():
        assert not torch.equal(m(**kw)[0], c(**kw)[0])
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(m)
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(m, io.BytesIO())
    # the original model pickles as before (it is a plain nn.Module) and stays marked as transformed
    again = pickle.loads(pickle.dumps(model))
    with pytest.raises(unitscale_fx.AlreadyTransformedError):
        unitscale_fx.transform(again, config=EAGER)


def test_init_overlapping_the_analysis_draws_what_a_serial_init_draws():
    """The re-init runs on a worker thread beside the analysis passes (api._InitJob) from a private
    generator: the parameters get the values a serial init from the global generator gives, and the
    global generator ends where that serial init leaves it."""
    from unitscale_fx.passes.reinit import apply_init

    model, kw = _nanogpt(seed=5)
    ref = copy.deepcopy(model)
    torch.manual_seed(7)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    after = torch.random.get_rng_state()
    torch.manual_seed(7)
    assert apply_init(ref, m.result.state.param_roles) > 0
    assert torch.equal(torch.random.get_rng_state(), after)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_same_seed_gives_the_same_init_and_the_same_losses():
    runs = []
    for _ in range(2):
        model, kw = _nanogpt(seed=5)
        torch.manual_seed(123)
        m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = _loss(m(**kw))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((init, losses))
    (ia, la), (ib, lb) = runs
    assert ia.keys() == ib.keys() and all(torch.equal(ia[n], ib[n]) for n in ia)
    assert la == lb
