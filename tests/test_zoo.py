"""Tests of the built-in model zoo (``unitscale_fx.zoo``)."""
from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
import types

import pytest
import torch

from unitscale_fx import zoo

SMALL = dict(hidden=64, layers=2, heads=4, seq=16, batch=2, vocab=1024)

ALL = zoo.names()

# Models whose initial loss is a uniform guess over the vocabulary (small-std init, tied or
# near-zero logits). T5 is *not* one of them: its unit-scale (factor 1.0) init of the LM head
# gives logits of O(1) and a first loss well above ln(vocab). ViT classifies into 10 classes.
NOT_NEAR_LN_VOCAB = {"t5", "vit"}


def _needs(name: str) -> None:
    for mod in zoo.spec(name).requires:
        pytest.importorskip(mod)


def _build(name: str, **kw):
    _needs(name)
    return zoo.get(name, **{**SMALL, **kw})


def _loss(model, inputs, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # dropout is active in train mode
    return zoo.loss_of(zoo.call(model, inputs))


def _tensors(inputs):
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_names_sorted_and_many():
    assert ALL == sorted(ALL)
    assert len(ALL) >= 15
    for expected in ("nanogpt", "transformer_encoder_lm", "gpt2", "bert", "llama", "t5", "mixtral", "vit", "whisper"):
        assert expected in ALL


def test_spec_fields():
    s = zoo.spec("nanogpt")
    assert s.name == "nanogpt" and s.family == "decoder" and s.requires == () and callable(s.factory)
    assert s.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]
    assert zoo.spec("llama").requires == ("transformers",)
    assert zoo.spec("mixtral").family == "moe"
    assert zoo.spec("t5").family == "encoder-decoder"
    assert zoo.spec("vit").family == "vision"
    assert zoo.spec("whisper").family == "speech"
    assert zoo.spec("bert").family == "encoder"
    for name in ALL:
        assert zoo.spec(name).family in zoo.FAMILIES


def test_unknown_name_is_a_clear_error():
    with pytest.raises(zoo.UnknownModelError, match="Did you mean 'nanogpt'") as info:
        zoo.get("nanogtp")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.spec("no_such_model")


def test_bad_sizes():
    with pytest.raises(ValueError, match="heads .* must divide hidden"):
        zoo.get("nanogpt", hidden=30, heads=4)
    with pytest.raises(ValueError, match="seq must be a positive int"):
        zoo.get("nanogpt", seq=0)


def test_register_custom_and_duplicate(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))

    @zoo.register("tiny_custom_lm", family="custom", description="an embedding and a head")
    def build(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab))
        return model, (torch.randint(0, vocab, (batch, seq)),)

    assert "tiny_custom_lm" in zoo.names()
    model, inputs = zoo.get("tiny_custom_lm", hidden=8, vocab=32, seq=5, batch=3)
    assert model.training and inputs[0].shape == (3, 5)
    with pytest.raises(ValueError, match="already registered"):
        zoo.register("tiny_custom_lm", family="custom")(lambda **kw: None)
    with pytest.raises(ValueError, match="family"):
        zoo.register("x", family="rnn")
    with pytest.raises(ValueError, match="zoo name"):
        zoo.register("a:b", family="custom")


def test_factory_returning_garbage(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    zoo.register("broken_factory", family="custom")(lambda **kw: "not a model")
    with pytest.raises(TypeError, match="must return"):
        zoo.get("broken_factory")


class _FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"fake.module:{name}", obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def _tiny_factory(**kw):
    """A linear layer."""
    return torch.nn.Linear(2, 2), (torch.zeros(1, 2),)


def test_entry_points(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    monkeypatch.setattr(zoo, "_entry_points_loaded", False)

    def register_zoo():
        zoo.register("ep_registered", family="custom")(_tiny_factory)
        return {"ep_returned": _tiny_factory}

    eps = [
        _FakeEntryPoint("a", {"ep_dict": _tiny_factory}),
        _FakeEntryPoint("b", register_zoo),
        _FakeEntryPoint("c", ImportError("boom")),
    ]
    monkeypatch.setattr(zoo, "_iter_entry_points", lambda: eps)
    with pytest.warns(RuntimeWarning, match="boom"):
        found = zoo.names()
    for name in ("ep_dict", "ep_registered", "ep_returned", "nanogpt"):
        assert name in found
    assert zoo.spec("ep_dict").family == "custom"
    assert zoo.spec("ep_dict").description == "A linear layer."
    model, inputs = zoo.get("ep_dict")
    assert isinstance(model, torch.nn.Linear)


# ---------------------------------------------------------------------------------------------
# every model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_builds_with_finite_loss_and_grads(name):
    model, inputs = _build(name)
    assert isinstance(model, torch.nn.Module) and model.training
    assert isinstance(inputs, (dict, tuple))
    loss = _loss(model, inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # the labels are in the inputs: the loss is computed inside the model
    if isinstance(inputs, dict):
        assert {"labels", "targets"} & set(inputs)


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    m1, i1 = _build(name, seed=3)
    m2, i2 = _build(name, seed=3)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(i1), _tensors(i2), strict=True))
    assert torch.equal(_loss(m1, i1), _loss(m2, i2))
    m3, i3 = _build(name, seed=4)
    s3 = m3.state_dict()
    differs = any(not torch.equal(s1[k], s3[k]) for k in s1 if s1[k].is_floating_point())
    differs |= any(not torch.equal(a, b) for a, b in zip(_tensors(i1), _tensors(i3), strict=True))
    assert differs


def test_get_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    zoo.get("nanogpt", **SMALL)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", [n for n in ALL if n not in NOT_NEAR_LN_VOCAB])
def test_initial_loss_is_near_ln_vocab(name):
    if zoo.spec(name).family == "custom":
        pytest.skip("third-party model")
    model, inputs = _build(name)
    assert _loss(model, inputs).item() == pytest.approx(math.log(SMALL["vocab"]), abs=0.4)


def test_vit_initial_loss_is_near_ln_classes():
    model, inputs = _build("vit")
    assert _loss(model, inputs).item() == pytest.approx(math.log(10), abs=0.4)


def test_sizes_are_honoured():
    model, inputs = zoo.get("nanogpt", hidden=32, layers=3, heads=2, seq=12, batch=5, vocab=100)
    assert inputs["idx"].shape == (5, 12) and inputs["targets"].shape == (5, 12)
    assert int(inputs["idx"].max()) < 100
    assert torch.equal(inputs["idx"][:, 1:], inputs["targets"][:, :-1])  # next-token targets
    assert len(model.transformer.h) == 3 and model.config.n_head == 2 and model.config.n_embd == 32
    assert model.lm_head.out_features == 100
    logits, _ = model(**inputs)
    assert logits.shape == (5, 12, 100)


def test_hf_sizes_and_use_cache():
    pytest.importorskip("transformers")
    model, inputs = _build("llama", hidden=64, heads=4)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.num_key_value_heads == 2 and cfg.intermediate_size == 256 and cfg.use_cache is False
    assert cfg.max_position_embeddings >= SMALL["seq"] and inputs["input_ids"].shape == (2, 16)
    model, inputs = _build("bert")
    labelled = (inputs["labels"] != -100).sum(dim=1)
    assert torch.all(labelled >= 1) and torch.all(labelled <= 4)  # ~15% of 16 positions


# ---------------------------------------------------------------------------------------------
# nanoGPT specifics
# ---------------------------------------------------------------------------------------------


def test_nanogpt_weight_tying():
    model, inputs = zoo.get("nanogpt", **SMALL)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names or "transformer.wte.weight" not in names  # one parameter
    _loss(model, inputs).backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_nanogpt_manual_matches_sdpa():
    from unitscale_fx.zoo.nanogpt import GPTConfig

    manual, inputs = zoo.get("nanogpt", **SMALL)
    sdpa, inputs2 = zoo.get("nanogpt_sdpa", **SMALL)
    assert manual.config.attention == "manual" and sdpa.config.attention == "sdpa"
    assert isinstance(manual.config, GPTConfig)
    torch.testing.assert_close(_loss(manual, inputs), _loss(sdpa, inputs2))
    assert hasattr(manual.transformer.h[0].attn, "bias")  # the registered tril buffer


def test_nanogpt_forward_without_targets():
    model, inputs = zoo.get("nanogpt", **SMALL)
    logits, loss = model(inputs["idx"])
    assert loss is None and logits.shape == (2, 16, SMALL["vocab"])


# ---------------------------------------------------------------------------------------------
# meta device and export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nanogpt", "transformer_encoder_lm", "llama"])
def test_meta_device(name):
    model, inputs = _build(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(t.device.type == "meta" for t in _tensors(inputs))


def _export(model, inputs, dynamic=False):
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
    dyn = None
    if dynamic:
        def spec(t):
            d = {0: torch.export.Dim.AUTO}
            if t.dim() == 2 and not t.is_floating_point():
                d[1] = torch.export.Dim.AUTO
            return d
        dyn = {k: spec(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(spec(v) for v in inputs)
    return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)


def test_nanogpt_exports_on_cpu_and_meta():
    model, inputs = zoo.get("nanogpt", **SMALL)
    ep = _export(model, inputs)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.masked_fill.Scalar", "aten.softmax.int", "aten.embedding.default"} <= targets
    model, inputs = zoo.get("nanogpt", **SMALL, device="meta")
    _export(model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_exports_static_and_dynamic(name):
    model, inputs = _build(name)
    _export(model, inputs)
    model, inputs = _build(name)
    _export(model, inputs, dynamic=True)


# ---------------------------------------------------------------------------------------------
# "module:factory" specs
# ---------------------------------------------------------------------------------------------

_FACTORY_MODULE = textwrap.dedent(
    """
    import torch

    class Model(torch.nn.Module):
        def __init__(self, hidden, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, hidden)
            self.head = torch.nn.Linear(hidden, vocab)

        def forward(self, input_ids, labels):
            logits = self.head(self.emb(input_ids))
            return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    def build(hidden=16, seq=8, vocab=50):
        ids = torch.randint(0, vocab, (2, seq))
        return Model(hidden, vocab), {"input_ids": ids, "labels": ids}

    def build_no_args():
        return build()

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = "zoo_test_factories_mod"
    (tmp_path / f"{name}.py").write_text(_FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_resolve_module_factory(factory_module):
    name, model, inputs = zoo.resolve(f"{factory_module}:build", hidden=12, seq=6, batch=9, layers=3)
    assert name == f"{factory_module}:build"
    assert model.emb.embedding_dim == 12 and inputs["input_ids"].shape == (2, 6)  # batch not accepted
    assert torch.isfinite(zoo.loss_of(zoo.call(model, inputs)))
    _, model, inputs = zoo.resolve(f"{factory_module}:build_no_args", hidden=12)
    assert model.emb.embedding_dim == 16
    # seeded like zoo.get when a seed is given
    _, m1, i1 = zoo.resolve(f"{factory_module}:build", seed=1)
    _, m2, i2 = zoo.resolve(f"{factory_module}:build", seed=1)
    assert torch.equal(m1.emb.weight, m2.emb.weight) and torch.equal(i1["input_ids"], i2["input_ids"])


def test_resolve_file_path_and_zoo_name(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(_FACTORY_MODULE)
    _, model, _ = zoo.resolve(f"{path}:build", hidden=10)
    assert model.emb.embedding_dim == 10
    name, model, inputs = zoo.resolve("nanogpt", **SMALL)
    assert name == "nanogpt" and model.config.n_embd == SMALL["hidden"]


def test_load_factory(factory_module):
    fn = zoo.load_factory(f"{factory_module}:build")
    assert isinstance(fn, types.FunctionType) and fn.__name__ == "build"


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ("no_colon_here", ValueError, "expected 'package.module:factory'"),
        ("some.module:", ValueError, "expected 'package.module:factory'"),
        (":factory", ValueError, "expected 'package.module:factory'"),
        ("bad module:f", ValueError, "neither a dotted module name"),
        ("some.module:not-a-name", ValueError, "not a \\(dotted\\) Python name"),
        ("definitely_not_a_module_xyz:build", ImportError, "definitely_not_a_module_xyz:build"),
        ("/nonexistent/dir/file.py:build", ImportError, "no such file"),
    ],
)
def test_load_factory_bad_specs(bad, exc, match):
    with pytest.raises(exc, match=match):
        zoo.load_factory(bad)


def test_load_factory_missing_or_uncallable_attribute(factory_module):
    with pytest.raises(ValueError, match=f"{factory_module}:nope.*no attribute"):
        zoo.load_factory(f"{factory_module}:nope")
    with pytest.raises(ValueError, match="not callable"):
        zoo.load_factory(f"{factory_module}:NOT_CALLABLE")


def test_resolve_bad_input(factory_module):
    with pytest.raises(zoo.UnknownModelError):
        zoo.resolve("not_a_zoo_model")
    with pytest.raises(TypeError, match="unknown size keywords"):
        zoo.resolve("nanogpt", width=3)
    with pytest.raises(ValueError):
        zoo.resolve("")


def test_missing_requirement_is_an_import_error(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    zoo.register("needs_missing", family="custom", requires=("surely_not_installed_pkg_123",))(_tiny_factory)
    assert not zoo.spec("needs_missing").available
    with pytest.raises(ImportError, match="surely_not_installed_pkg_123"):
        zoo.get("needs_missing")
