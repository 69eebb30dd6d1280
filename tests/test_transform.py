"""End-to-end properties of ``unitscale_fx.transform`` on small models.

Sizes are small to keep the suite fast; the acceptance sizes (hidden 256, 4 layers, seq 128) run in
``test_acceptance.py`` (marked slow).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitscale_fx
from unitscale_fx import Config, zoo
from unitscale_fx.probe import measure_step

SMALL = dict(hidden=64, layers=2, heads=2, seq=32, batch=2, vocab=256)
EAGER = Config(compile=False)


def _loss(out):
    if isinstance(out, tuple):
        return next(t for t in out if isinstance(t, torch.Tensor) and t.dim() == 0)
    if isinstance(out, dict) and not hasattr(out, "loss"):
        return out["loss"]
    return out.loss


def _grads(model, kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    _loss(model(**kw)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(name: str, **overrides):
    """The same transformed model twice: default config, and ``overrides`` - identical parameters."""
    model, kw = zoo.get(name, **SMALL)
    other = copy.deepcopy(model)
    a = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    b = unitscale_fx.transform(other, example_inputs=kw, config=EAGER.replace(**overrides))
    b.load_state_dict(a.state_dict())
    return a, b, kw


@pytest.mark.parametrize("name", ["nanogpt", "gpt2", "llama"])
def test_gradient_is_exact_up_to_positive_scalar_per_parameter(name):
    """Backward-only scales never change a gradient's direction (the cut-edge rule)."""
    a, b, kw = _pair(name, scale_backward=False)
    ga, gb = _grads(a, kw), _grads(b, kw)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        cos = F.cosine_similarity(ga[n].flatten().double(), gb[n].flatten().double(), dim=0).item()
        assert cos >= 0.9999, (n, cos)
        ratio = (ga[n].double().norm() / gb[n].double().norm()).item()
        assert ratio > 0 and math.isfinite(ratio), (n, ratio)


@pytest.mark.parametrize("name", ["nanogpt", "gpt2"])
def test_forward_identical_with_and_without_backward_scales(name):
    a, b, kw = _pair(name, scale_backward=False)
    a.eval(), b.eval()
    with torch.no_grad():
        la, lb = _loss(a(**kw)), _loss(b(**kw))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


def test_fused_and_unfused_configs_both_unit_scale_the_same_model():
    a, b, kw = _pair("nanogpt", fuse_attention=False)
    assert a.result.counts["fuse_attention"]["fused"] == SMALL["layers"]
    assert "fuse_attention" not in b.result.counts
    a.eval(), b.eval()
    with torch.no_grad():
        la, lb = _loss(a(**kw)).item(), _loss(b(**kw)).item()
    # different graphs (fused SDPA vs matmul/softmax) with their own unit scales: both start at ln(V)
    assert la == pytest.approx(math.log(SMALL["vocab"]), rel=0.02)
    assert lb == pytest.approx(math.log(SMALL["vocab"]), rel=0.02)


def test_state_dict_and_parameters_are_the_original_ones():
    model, kw = zoo.get("gpt2", **SMALL)
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    assert list(m.state_dict().keys()) == list(ref.state_dict().keys())
    assert all(p is params[n] for n, p in m.named_parameters())
    # a checkpoint of either loads into the other strictly
    ref.load_state_dict(m.state_dict(), strict=True)
    m.load_state_dict(ref.state_dict(), strict=True)
    # tied weights stay tied after the unit re-init
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_outputs_keep_their_structure_and_later_shapes_run_without_retrace():
    model, kw = zoo.get("gpt2", **SMALL)
    m = unitscale_fx.transform(model, config=EAGER)  # lazy capture at the first call
    out = m(**kw)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert out.logits.shape == (SMALL["batch"], SMALL["seq"], SMALL["vocab"])
    gm = m.result.gm
    ids = kw["input_ids"][:1, :24]
    out2 = m(input_ids=ids, labels=ids)
    assert out2.logits.shape == (1, 24, SMALL["vocab"])
    assert m.result.gm is gm


def test_train_and_eval_switch_dropout():
    model, kw = zoo.get("gpt2", **SMALL)  # HF GPT-2 has residual/embedding dropout 0.1
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    m.eval()
    with torch.no_grad():
        a, b = m(**kw).logits, m(**kw).logits
    torch.testing.assert_close(a, b)
    m.train()
    with torch.no_grad():
        c, d = m(**kw).logits, m(**kw).logits
    assert not torch.equal(c, d)
    assert model.training and m.training


def test_optimizer_step_runs_and_loss_is_finite():
    model, kw = zoo.get("llama", **SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the transform
    m = unitscale_fx.transform(model, config=EAGER)
    for _ in range(2):
        opt.zero_grad()
        loss = m(**kw).loss
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["nanogpt", "gpt2", "llama", "transformer_encoder_lm"])
def test_initial_loss_is_near_ln_vocab(name):
    model, kw = zoo.get(name, **SMALL)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    with torch.no_grad():
        loss = _loss(m(**kw)).item()
    assert abs(loss - math.log(SMALL["vocab"])) / math.log(SMALL["vocab"]) < 0.02


@pytest.mark.parametrize("name", ["nanogpt", "gpt2", "llama"])
def test_probe_in_band_after_transform(name):
    model, kw = zoo.get(name, **SMALL)
    before = measure_step(model, kw)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    after = measure_step(m, kw)
    assert after.fraction_in_band("forward") >= 0.95
    assert after.fraction_in_band("backward") >= 0.90
    assert after.fraction_in_band("grads") >= 0.85  # small models: fewer tokens per gradient sum
    assert not after.out_of_band("forward", 1 / 8, 8) and not after.out_of_band("backward", 1 / 8, 8)
    assert after.fraction_in_band("forward") > before.fraction_in_band("forward")


def test_user_model_is_not_modified_until_called_and_init_keep_keeps_weights():
    model, kw = zoo.get("nanogpt", **SMALL)
    ref = copy.deepcopy(model.state_dict())
    m = unitscale_fx.transform(model, config=EAGER.replace(init="keep"))
    m(**kw)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_transforming_twice_is_refused():
    model, kw = zoo.get("nanogpt", **SMALL)
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    with pytest.raises(unitscale_fx.AlreadyTransformedError):
        unitscale_fx.transform(m, example_inputs=kw, config=EAGER)


# --------------------------------------------------------------------------- errors and strictness
class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.ops.unitscale_test.odd(self.lin(x)).pow(2).mean()


@pytest.fixture(scope="module")
def odd_op():
    lib = torch.library.Library("unitscale_test", "FRAGMENT")
    lib.define("odd(Tensor x) -> Tensor")
    lib.impl("odd", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("odd", lambda x: torch.empty_like(x), "Meta")
    yield
    lib._destroy()


def test_op_without_rule_is_reported_with_source_line(odd_op):
    res = unitscale_fx.analyse(_Odd(), (torch.randn(4, 16),))
    assert any("unitscale_test.odd" in m.op for m in res.missing)
    assert any("test_transform.py" in (m.source or "") for m in res.missing)


def test_non_strict_transform_warns_with_op_and_source_line(odd_op):
    with pytest.warns(unitscale_fx.MissingRuleWarning) as record:
        m = unitscale_fx.transform(_Odd(), example_inputs=(torch.randn(4, 16),), config=EAGER)
    msg = str(record[0].message)
    assert "unitscale_test.odd" in msg and "test_transform.py" in msg
    assert [x.op for x in m.result.missing if "odd" in x.op]  # and the result lists it too


def test_strict_mode_raises_missing_rule_error(odd_op):
    with pytest.raises(unitscale_fx.MissingRuleError) as e:
        unitscale_fx.transform(_Odd(), example_inputs=(torch.randn(4, 16),), config=EAGER.replace(strict=True))
    assert "unitscale_test.odd" in str(e.value) and "test_transform.py" in str(e.value)


@pytest.mark.parametrize("bad", [dict(init="zeros"), dict(compile="yes"), dict(residual="sum"),
                                 dict(exclude=("",)), dict(filter_fn=3)])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(unitscale_fx.ConfigError):
        Config(**bad)


def test_capture_error_names_the_problem():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(unitscale_fx.CaptureError) as e:
        unitscale_fx.transform(DataDependent(), example_inputs=(torch.randn(3, 4),), config=EAGER)
    assert "test_transform.py" in str(e.value)


def test_analyse_on_meta_device_predicts_without_weights():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 512, (2, 16))
    res = unitscale_fx.analyse(model, {"input_ids": ids, "labels": ids})
    assert res.gm is not None
    assert all(p.device.type == "meta" for p in model.parameters())


def test_t5_masked_position_bias_has_a_rule():
    """T5's decoder applies its causal mask to the learned position bias with ``where(allowed, bias,
    -big)``: the SDPA rule separates the two (a learned bias with a causal mask), so every op of
    the encoder-decoder has a scale rule and the attention records a causal mask."""
    model, kw = zoo.get("t5", hidden=32, layers=1, heads=2, seq=8, batch=2, vocab=64)
    res = unitscale_fx.analyse(model, kw)
    assert [m.op for m in res.missing] == []
    kinds = sorted(n.meta["_us_attention"]["kind"] for n in res.gm.graph.nodes if "_us_attention" in n.meta)
    assert kinds == ["causal", "full", "full"]  # decoder self, encoder self, cross attention


def test_constants_lifted_onto_submodules_stay_in_the_graph_module():
    """Falcon creates a tensor in a submodule's forward; export lifts it onto its copy of that
    submodule. The transform keeps it on the graph module and adds nothing to the user's modules."""
    model, kw = zoo.get("falcon", hidden=32, layers=1, heads=2, seq=8, batch=2, vocab=64)
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    m = unitscale_fx.transform(model, example_inputs=kw, config=EAGER)
    loss = _loss(m(**kw))
    loss.backward()
    assert torch.isfinite(loss)
    changed = {n: set(vars(mod)) ^ attrs[n] for n, mod in model.named_modules() if set(vars(mod)) != attrs[n]}
    assert set(changed) <= {""} and changed.get("", {"_unitscale_fx_transformed"}) == {"_unitscale_fx_transformed"}


@pytest.mark.parametrize("name", ["bloom", "deberta_v2", "falcon"])
def test_every_op_has_a_rule(name):
    """Ops these families write differently: ALiBi through ``baddbmm`` (bloom), ``masked_fill``
    with the dtype's lowest value and in-place adds (DeBERTa), ``numpy_T`` and ``add_`` (Falcon)."""
    model, kw = zoo.get(name, hidden=32, layers=1, heads=2, seq=8, batch=2, vocab=64)
    res = unitscale_fx.analyse(model, kw)
    assert [(m.node, m.op) for m in res.missing] == []


class _TokenModel(nn.Module):
    """A CLS token and a position table (ViT style), small-initialised as HF does."""

    def __init__(self, d: int = 32, n: int = 8):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1) + self.pos
        h = h + h.mean(1, keepdim=True)  # the CLS row sees the others (as attention would)
        return self.head(self.norm(h)[:, 0])


def test_learned_tokens_and_position_tables_get_unit_init():
    """Parameters concatenated with / added to the activations are embeddings: unit RMS, not their
    0.02 init (a tiny CLS row made the first LayerNorm's backward blow its gradient up: ViT's CLS
    token gradient measured 139x, 4.6x after this)."""
    torch.manual_seed(0)
    model = _TokenModel()
    x = torch.randn(4, 8, 32)
    m = unitscale_fx.transform(model, example_inputs=(x,), config=Config(compile=False))
    roles = m.result.state.param_roles
    assert roles["cls"] == roles["pos"] == "weight"
    for p in (model.cls, model.pos):
        assert 0.7 < p.detach().pow(2).mean().sqrt().item() < 1.3
    res = unitscale_fx.measure_step(m, (x,), loss_fn=lambda o: (o * torch.randn_like(o)).sum())
    assert res.fraction_in_band("forward") == 1.0
    # within [1/8, 8] (ViT's CLS gradient was 139x): the head reading one token concentrates the
    # gradient on that row, which the tensor-wide rules do not model, so not yet within [1/2, 2]
    far = {n: r for n, _, r in res.out_of_band("grads", lo=1 / 8, hi=8)}
    assert not far, far


class _BiasedAttention(nn.Module):
    """One attention block with a learned position bias and a given SDPA ``scale`` (T5 passes 1.0
    and keeps its logits O(1) through the init of ``q``)."""

    def __init__(self, d: int = 64, heads: int = 2, seq: int = 16, scale: float | None = 1.0):
        super().__init__()
        self.h, self.scale = heads, scale
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(heads, seq, seq) * 0.1)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (f(x).view(b, s, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, :s, :s], scale=self.scale)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, s, d)))


def _sdpa_nodes(m):
    return [n for n in m.result.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


def test_attention_scale_above_unit_temperature_is_lowered():
    """With unit q and k, ``scale=1`` gives logits of standard deviation ``sqrt(head_dim)`` (here
    ~5.7): an almost one-hot softmax. The transform puts the ``1/sqrt(head_dim)`` that T5 keeps in
    its ``q`` init back into the op, and the measured logits then have unit variance."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64)
    m = unitscale_fx.transform(_BiasedAttention(scale=1.0), example_inputs=(x,), config=EAGER)
    m(x)
    (node,) = _sdpa_nodes(m)
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(32))
    assert m.result.state.counts["unit_scale_forward"]["temperature"] == 1
    # the measured logits of the rewritten graph: unit q, k and the new scale
    from unitscale_fx.track import measure_graph

    meas = measure_graph(m.result.gm, (x,), {})
    q_rms, k_rms = (meas[a.name].fwd for a in node.args[1:3])
    assert 0.8 < q_rms < 1.25 and 0.8 < k_rms < 1.25
    assert 0.8 < node.kwargs["scale"] * math.sqrt(32) * q_rms * k_rms < 1.25


@pytest.mark.parametrize("scale", [None, 1 / math.sqrt(32), 1 / 32])
def test_attention_scale_at_or_below_unit_temperature_is_kept(scale):
    """Must not fire: the default scale, an explicit ``1/sqrt(d)`` and muP's ``1/d`` are the model's."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64)
    m = unitscale_fx.transform(_BiasedAttention(scale=scale), example_inputs=(x,), config=EAGER)
    m(x)
    (node,) = _sdpa_nodes(m)
    assert node.kwargs.get("scale") == scale
    assert m.result.state.counts["unit_scale_forward"]["temperature"] == 0


class _ShiftRight(nn.Module):
    """Decoder inputs built in place, as HF's ``shift_tokens_right`` does."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, labels):
        ids = labels.new_zeros(labels.shape)
        ids[:, 1:] = labels[:, :-1].clone()
        ids[:, 0] = 3
        ids.masked_fill_(ids == -100, 0)
        return self.head(self.emb(ids))


def test_constants_built_in_place_are_evaluated_in_graph_order():
    """The analysis evaluates integer constants lazily; a value built by in-place writes must
    include them (T5's decoder ids were read as all zeros, i.e. every token the same, token
    correlation 1, and the decoder's gradients were mispredicted up to 18x). The example input
    itself is never written to."""
    torch.manual_seed(0)
    labels = torch.randint(0, 64, (2, 16))
    labels[0, 5] = -100
    before = labels.clone()
    res = unitscale_fx.analyse(_ShiftRight(), (labels,))
    (emb,) = [n for n in res.gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
    expected = torch.cat([torch.full((2, 1), 3), labels[:, :-1]], 1).masked_fill(
        torch.cat([torch.full((2, 1), 3), labels[:, :-1]], 1) == -100, 0)
    assert torch.equal(res.analysis.const_value(emb.args[1]), expected)
    assert torch.equal(labels, before)
    corr = res.analysis.value_of(emb.meta[unitscale_fx.analysis.record.META_KEY].fwd.corr)
    assert corr < 0.1  # random tokens: about 1/16 of the pairs in a row repeat, not all of them


class _SoftCapLM(nn.Module):
    """Gemma-2-style: soft-capped attention logits (which no fused kernel computes, so the
    attention stays hand-written) and soft-capped final logits."""

    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 2, cap: float = 30.0):
        super().__init__()
        self.h, self.cap = heads, cap
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, labels):
        b, s = ids.shape
        x = self.emb(ids)
        q, k, v = (t.view(b, s, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        logits = torch.tanh(logits / 50.0) * 50.0
        logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.softmax(logits, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        out = self.head(self.norm(x))
        out = torch.tanh(out / self.cap) * self.cap
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))


def test_unfused_attention_probabilities_and_soft_capped_head_are_unit_scaled():
    """The probabilities of an attention that stays unfused are a matmul operand of RMS ~1/keys:
    they are multiplied to unit RMS before ``probs @ v`` (and the output multiply takes the factor
    back). A head behind logit soft-capping is still the head (1/fan_in, loss ~ ln(vocab))."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 64))
    kw = {"ids": ids, "labels": torch.randint(0, 256, (4, 64))}
    m = unitscale_fx.transform(_SoftCapLM(), example_inputs=kw, config=EAGER)
    with torch.no_grad():
        loss = m(**kw).item()
    assert abs(loss - math.log(256)) / math.log(256) < 0.02
    counts = m.result.state.counts["unit_scale_forward"]
    assert counts["head"] == 1 and counts["attention"] == 1
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in m.result.gm.graph.nodes)
    res = measure_step(m, kw)
    probs = [r for r in res.forward if r.op == "aten.bmm" and r.shape[-1] == 64 and r.shape[-2] == 64 and r.role == "self"]
    assert probs and all(0.5 <= r.rms <= 2 for r in probs), probs
    assert res.fraction_in_band("forward") == 1.0
    assert not res.out_of_band("backward", 1 / 8, 8)
