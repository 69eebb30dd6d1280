"""Tests of ``unitscale-fx check`` (:mod:`unitscale_fx.check`).

The models are a tiny Transformer LM written into a temporary directory that is put on the path,
as a user's package would be: ``usfx_check_models:factory`` (every op has a scale rule) and
``usfx_check_models:custom_factory`` (its MLP uses a custom ``torch.library`` op that the analysis
has no rule for).
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from unitscale_fx import check
from unitscale_fx.check import Criteria

TINY = dict(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64)

MODELS_SRC = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if not hasattr(torch.ops.usfx_check, "wiggle"):  # importable twice in one process
        @torch.library.custom_op("usfx_check::wiggle", mutates_args=())
        def _wiggle(x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x)

        @_wiggle.register_fake
        def _(x):
            return torch.empty_like(x)

        def _setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        def _backward(ctx, grad):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return grad * (s + x * s * (1 - s))

        _wiggle.register_autograd(_backward, setup_context=_setup)


    class SplitQKV(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden)  # its bias has a structurally zero gradient
            self.v = nn.Linear(hidden, hidden)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


    class Block(nn.Module):
        def __init__(self, hidden, heads, custom, split=False):
            super().__init__()
            self.heads, self.custom = heads, custom
            self.ln1 = nn.LayerNorm(hidden)
            self.qkv = SplitQKV(hidden) if split else nn.Linear(hidden, 3 * hidden)
            self.proj = nn.Linear(hidden, hidden)
            self.ln2 = nn.LayerNorm(hidden)
            self.fc = nn.Linear(hidden, 4 * hidden)
            self.out = nn.Linear(4 * hidden, hidden)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            h = self.fc(self.ln2(x))
            h = torch.ops.usfx_check.wiggle(h) if self.custom else F.gelu(h)  # THE CUSTOM OP
            return x + self.out(h)


    class TinyLM(nn.Module):
        def __init__(self, vocab, hidden, layers, heads, seq, custom=False, split=False):
            super().__init__()
            self.tok = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(seq, hidden)
            self.blocks = nn.ModuleList([Block(hidden, heads, custom, split) for _ in range(layers)])
            self.ln = nn.LayerNorm(hidden)
            self.head = nn.Linear(hidden, vocab, bias=False)

        def forward(self, idx, targets):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            logits = self.head(self.ln(x))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


    def _make(custom, hidden, layers, heads, seq, batch, vocab, split=False):
        model = TinyLM(vocab, hidden, layers, heads, seq, custom, split)
        idx = torch.randint(0, vocab, (batch, seq))
        return model, (idx, torch.roll(idx, -1, 1))


    def factory(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64):
        return _make(False, hidden, layers, heads, seq, batch, vocab)


    def custom_factory(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64):
        return _make(True, hidden, layers, heads, seq, batch, vocab)


    def split_factory(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64):
        return _make(False, hidden, layers, heads, seq, batch, vocab, split=True)
''')

MOD = "usfx_check_models"
GOOD = f"{MOD}:factory"
CUSTOM = f"{MOD}:custom_factory"
CUSTOM_OP = "usfx_check.wiggle.default"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    (d / f"{MOD}.py").write_text(MODELS_SRC)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop(MOD, None)


def _custom_line(models_dir: Path) -> tuple[str, int]:
    path = str(models_dir / f"{MOD}.py")
    lines = MODELS_SRC.splitlines()
    lineno = next(i for i, ln in enumerate(lines, 1) if "THE CUSTOM OP" in ln)
    return path, lineno


@pytest.fixture(scope="module")
def report(models_dir):
    """Both models checked once (non-strict, default criteria)."""
    return check.check_models([GOOD, CUSTOM], sizes=TINY)


def _env(models_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(models_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------------------
# criteria and settings (no model)
# ------------------------------------------------------------------------------------------------


def test_criteria_defaults_are_the_documented_ones():
    c = Criteria()
    assert (c.min_coverage, c.band, c.outer) == (1.0, 2.0, 8.0)
    assert (c.min_forward, c.min_backward, c.min_grads) == (0.95, 0.90, 0.90)
    assert c.min_cosine == 0.9999
    assert (c.lo, c.hi) == (0.5, 2.0)
    assert 0 < c.loss_tolerance <= 0.05  # "within a few % of ln(vocab)"
    assert c.zero_grad == 2.0 ** -16


@pytest.mark.parametrize("bad", [dict(min_forward=1.5), dict(band=0.5), dict(outer=1.5), dict(min_cosine=2),
                                 dict(loss_tolerance=-1), dict(min_grads="x"), dict(band=True),
                                 dict(zero_grad=0.5)])
def test_criteria_reject_bad_values(bad):
    with pytest.raises(ValueError):
        Criteria(**bad)


def test_criteria_from_mapping_accepts_dashes_and_rejects_unknown_keys():
    assert Criteria.from_mapping({"min-forward": 0.5}).min_forward == 0.5
    with pytest.raises(ValueError, match="unknown criterion 'min_fwd'"):
        Criteria.from_mapping({"min_fwd": 0.5})


def test_load_settings_from_the_nearest_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.unitscale_fx]
        band = 3.0
        something_for_another_tool = 1

        [tool.unitscale_fx.check]
        min-forward = 0.8
        hidden = 48
        models = ["a.b:c", "nanogpt"]
        strict = true
    """))
    sub = tmp_path / "pkg" / "deeper"
    sub.mkdir(parents=True)
    s = check.load_settings(sub)
    assert s["path"] == str(tmp_path / "pyproject.toml")
    assert s["criteria"] == {"band": 3.0, "min_forward": 0.8}
    assert s["sizes"] == {"hidden": 48}
    assert s["models"] == ["a.b:c", "nanogpt"] and s["strict"] is True
    crit = Criteria.from_mapping(s["criteria"])
    assert (crit.band, crit.min_forward, crit.min_backward) == (3.0, 0.8, 0.9)


@pytest.mark.parametrize("body, match", [
    ("[tool.unitscale_fx.check]\nmin_fwd = 1\n", "unknown key 'min_fwd'"),
    ("[tool.unitscale_fx.check]\nmin_forward = 2\n", "fraction"),
    ("[tool.unitscale_fx.check]\nmodels = 'nanogpt'\n", "list of strings"),
    ("[tool.unitscale_fx\n", "invalid TOML"),
])
def test_load_settings_errors_name_the_file(tmp_path, body, match):
    (tmp_path / "pyproject.toml").write_text(body)
    with pytest.raises(ValueError, match=match) as info:
        check.load_settings(tmp_path)
    assert "pyproject.toml" in str(info.value)


def test_no_pyproject_gives_empty_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "find_pyproject", lambda start=None: None)
    assert check.load_settings(tmp_path) == {"path": None, "criteria": {}, "sizes": {}}


# ------------------------------------------------------------------------------------------------
# one passing and one failing model
# ------------------------------------------------------------------------------------------------


def test_tiny_model_from_a_directory_on_the_path_passes(report):
    good = report.models[0]
    assert good.name == GOOD
    assert good.passed, good.explanation()
    assert good.coverage == 1.0 and good.missing_ops == [] and good.n_ops > 20
    c = Criteria()
    assert good.forward_in_band >= c.min_forward
    assert good.backward_in_band >= c.min_backward
    assert good.grads_in_band >= c.min_grads
    assert sum(good.outside_outer.values()) == 0
    assert good.counts["forward"] > 0 and good.counts["backward"] > 0 and good.counts["grads"] > 0
    # gradient validity against Config(scale_backward=False) with the same weights: exact up to rounding
    assert good.min_cosine >= 0.9999999
    assert good.reference_loss == pytest.approx(good.loss, rel=1e-6)
    # initial loss: the cross-entropy of the graph, judged against ln(vocab)
    assert [t["classes"] for t in good.loss_terms] == [TINY["vocab"]]
    assert good.expected_loss == pytest.approx(math.log(TINY["vocab"]))
    assert abs(good.loss / good.expected_loss - 1) <= c.loss_tolerance
    assert good.nonfinite == [] and good.failures == [] and good.error is None


def test_exact_gradient_reference_is_the_scale_backward_false_graph(models_dir):
    """The gradient-validity reference bypasses the grad_scale nodes of the checked graph; that is
    the graph Config(scale_backward=False) builds: same loss, same gradients (up to rounding), while
    the unit-scaled gradients differ from them by a positive factor per parameter."""
    import copy
    import importlib

    import torch

    import unitscale_fx
    from unitscale_fx.runtime import grad_scale

    torch.manual_seed(0)
    model, inputs = importlib.import_module(MOD).factory(**TINY)
    ref_model = copy.deepcopy(model)
    us = unitscale_fx.transform(model, inputs, compile=False)
    ref = unitscale_fx.transform(ref_model, inputs, compile=False, scale_backward=False)
    ref.load_state_dict(model.state_dict())
    gm = us.graph_module
    bypassed = check._exact_gradient_graph(gm)
    assert any(n.target is grad_scale for n in gm.graph.nodes)
    assert not any(n.target is grad_scale for n in bypassed.graph.nodes)
    assert dict(bypassed.named_parameters()).keys() <= dict(gm.named_parameters()).keys()
    assert all(p is dict(gm.named_parameters())[k] for k, p in bypassed.named_parameters())  # shared
    _, loss, grads = check._step(us, inputs, None, 0)
    _, ref_loss, ref_grads = check._step(ref, inputs, None, 0)
    object.__setattr__(us, "_us_runner", bypassed)
    _, byp_loss, byp_grads = check._step(us, inputs, None, 0)
    assert float(byp_loss) == pytest.approx(float(ref_loss), rel=1e-6) == pytest.approx(float(loss), rel=1e-6)
    assert byp_grads.keys() == ref_grads.keys() == grads.keys()
    ratios = []
    for k in ref_grads:
        torch.testing.assert_close(byp_grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
        assert check._cosine(grads[k], byp_grads[k]) > 0.9999999
        ratios.append(float(grads[k].norm() / byp_grads[k].norm()))
    assert max(ratios) / min(ratios) > 2  # the backward scales do change the gradients' sizes


def test_worst_edges_name_module_path_op_and_node(report):
    good = report.models[0]
    assert 1 <= len(good.worst_edges) <= 5
    badness = [e.badness for e in good.worst_edges]
    assert badness == sorted(badness, reverse=True)
    known = {"", "tok", "pos", "ln", "head", "blocks.0", "blocks.0.ln1", "blocks.0.qkv", "blocks.0.proj",
             "blocks.0.ln2", "blocks.0.fc", "blocks.0.out"}
    for e in good.worst_edges:
        assert e.module in known, e
        if e.phase != "grad":
            assert e.op.startswith("aten.") and e.role and e.node, e


def test_the_check_is_deterministic(report, models_dir):
    again = check.check_model(GOOD, sizes=TINY)
    assert again.passed
    assert again.loss == report.models[0].loss
    assert again.forward_in_band == report.models[0].forward_in_band


def test_custom_op_without_rule_fails_naming_the_op_and_the_source_line(report, models_dir):
    bad = report.models[1]
    assert bad.name == CUSTOM and not bad.passed
    path, lineno = _custom_line(models_dir)
    # the root cause only: the op itself, once per layer; downstream ops are summarised apart
    assert {m.op for m in bad.missing_ops} == {CUSTOM_OP}
    assert all(f'File "{path}", line {lineno}' in m.source for m in bad.missing_ops)
    assert bad.unanalysed_ops and CUSTOM_OP not in {m.op for m in bad.unanalysed_ops}
    assert bad.coverage < 1.0
    text = bad.explanation()
    assert text.startswith(f"{CUSTOM}: FAILED")
    assert "coverage" in text and CUSTOM_OP in text
    assert f'File "{path}", line {lineno}' in text
    assert "torch.ops.usfx_check.wiggle(h)" in text  # the user's code line
    # non-strict: the op is left unscaled and everything else is still measured
    assert bad.forward_in_band is not None and bad.min_cosine is not None
    assert "worst edges" in text


def test_strict_mode_stops_at_the_transform(models_dir):
    bad = check.check_model(CUSTOM, sizes=TINY, strict=True)
    assert not bad.passed and bad.strict
    assert any(f.startswith("strict: the transform raised MissingRuleError") for f in bad.failures)
    assert {m.op for m in bad.missing_ops} == {CUSTOM_OP}
    assert bad.forward_in_band is None and bad.min_cosine is None and bad.loss is None
    path, lineno = _custom_line(models_dir)
    assert f'File "{path}", line {lineno}' in bad.explanation()


def test_strict_passes_a_model_with_full_coverage(report, models_dir):
    good = check.check_model(GOOD, sizes=TINY, strict=True)
    assert good.passed and good.strict
    assert good.loss == report.models[0].loss


def test_non_strict_with_relaxed_coverage_judges_the_rest(models_dir):
    res = check.check_model(CUSTOM, sizes=TINY, criteria=Criteria(min_coverage=0.5))
    assert not any(f.startswith("coverage") for f in res.failures)
    assert res.missing_ops  # still reported
    assert not res.passed  # the unscaled op throws the scales out of band
    assert any(f.startswith(("forward", "backward", "grads", "initial loss")) for f in res.failures)


def test_structurally_zero_gradients_are_reported_not_judged(models_dir):
    """A key projection's bias gets no gradient (softmax is invariant to it): rounding noise, whose
    RMS and direction mean nothing. It is listed, and judged only with zero_grad=0."""
    res = check.check_model(f"{MOD}:split_factory", sizes=TINY)
    assert res.passed, res.explanation()
    assert res.zero_grads == ["blocks.0.qkv.k.bias"]
    import importlib

    model, _ = importlib.import_module(MOD).split_factory()
    assert res.counts["grads"] == len(list(model.parameters())) - 1  # one not judged
    res0 = check.check_model(f"{MOD}:split_factory", sizes=TINY, criteria=Criteria(zero_grad=0))
    assert not res0.passed and res0.zero_grads == []
    assert "blocks.0.qkv.k.bias" in res0.explanation()


def test_stricter_criteria_change_the_verdict(report, models_dir):
    strict_band = check.check_model(GOOD, sizes=TINY, criteria=Criteria(band=1.05, outer=8.0))
    assert not strict_band.passed
    assert any("have RMS in [1/1.05, 1.05]" in f for f in strict_band.failures)


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------

MODEL_KEYS = {
    "name", "passed", "skipped", "strict", "coverage", "n_ops", "missing_ops", "unanalysed_ops",
    "forward_in_band", "backward_in_band", "grads_in_band", "counts", "outside_outer", "min_cosine",
    "min_cosine_param", "low_cosine_params", "zero_grads", "loss", "expected_loss", "loss_terms", "reference_loss",
    "nonfinite", "worst_edge", "worst_edges", "failures", "error", "explanation", "warnings", "sizes",
    "seconds", "timings",
}


def test_json_report_schema(report):
    d = json.loads(report.to_json())
    assert d["schema"] == check.SCHEMA == "unitscale_fx.check/1"
    assert set(d) == {"schema", "passed", "criteria", "sizes", "strict", "seconds", "versions", "models"}
    assert d["passed"] is False
    assert d["criteria"] == Criteria().to_dict()
    assert {k: d["sizes"][k] for k in TINY} == TINY
    assert [m["name"] for m in d["models"]] == [GOOD, CUSTOM]
    for m in d["models"]:
        assert set(m) == MODEL_KEYS
        assert isinstance(m["passed"], bool)
    good, bad = d["models"]
    assert good["passed"] and good["failures"] == [] and good["worst_edge"]["where"]
    assert set(good["worst_edge"]) == {"phase", "rms", "log2_rms", "module", "module_type", "op", "role",
                                       "param", "node", "where"}
    assert set(good["timings"]) == {"build", "analyse", "transform", "probe", "reference"}
    assert not bad["passed"] and bad["failures"]
    assert set(bad["missing_ops"][0]) == {"node", "op", "source"}
    assert bad["missing_ops"][0]["op"] == CUSTOM_OP


def test_junit_report_parses(report):
    root = ET.fromstring(report.to_junit())
    assert root.tag == "testsuites" and root.get("tests") == "2"
    assert (root.get("failures"), root.get("errors"), root.get("skipped")) == ("1", "0", "0")
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == [GOOD, CUSTOM]
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message").startswith("coverage")
    assert CUSTOM_OP in failure.text
    props = {p.get("name"): p.get("value") for p in root.findall("./testsuite/properties/property")}
    assert props["criteria.min_forward"] == "0.95" and props["sizes.hidden"] == "32"


def test_exit_code_is_zero_only_when_every_model_passes(report):
    assert report.exit_code == 1 and not report.passed and [m.name for m in report.failed] == [CUSTOM]
    only_good = check.CheckReport(models=report.models[:1], criteria=report.criteria)
    assert only_good.exit_code == 0
    skipped = check.ModelCheck(name="x", skipped=True)
    assert check.CheckReport(models=[report.models[0], skipped], criteria=report.criteria).exit_code == 0
    assert check.CheckReport(models=[skipped], criteria=report.criteria).exit_code == 1  # nothing ran


def test_render_prints_table_and_explanations(report):
    from rich.console import Console

    buf = io.StringIO()
    report.render(Console(file=buf, width=250, color_system=None))
    out = buf.getvalue()
    assert GOOD in out and CUSTOM in out and "pass" in out and "FAIL" in out
    assert report.models[1].explanation().splitlines()[1] in out
    assert "1/2 models passed" in out


# ------------------------------------------------------------------------------------------------
# errors become verdicts
# ------------------------------------------------------------------------------------------------


def test_unknown_zoo_model_and_bad_spec_fail_with_a_message():
    r = check.check_model("nanogtp", sizes=TINY)
    assert not r.passed and "UnknownModelError" in r.failures[0] and "nanogpt" in r.failures[0]
    r = check.check_model("no_such_pkg.models:factory", sizes=TINY)
    assert not r.passed and "cannot import 'no_such_pkg.models'" in r.failures[0]
    root = ET.fromstring(check.CheckReport(models=[r], criteria=Criteria()).to_junit())
    assert root.find("./testsuite/testcase/error") is not None


def test_factory_may_return_a_loss_function(models_dir):
    import importlib

    mod = importlib.import_module(MOD)

    def with_loss_fn(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64):
        model, inputs = mod.factory(hidden, layers, heads, seq, batch, vocab)
        return model, inputs, lambda out: out * 1.0

    r = check.check_model(with_loss_fn, sizes=TINY)
    assert r.passed, r.explanation()
    assert r.name.endswith("with_loss_fn")


def test_timeout_abandons_the_model(models_dir):
    r = check.check_model(GOOD, sizes=TINY, timeout=0.05)
    assert not r.passed and any(f.startswith("timeout") for f in r.failures)


def _swallowing_factory(work_after: float):
    """A factory that swallows the first alarm (as a weakref callback or ``__del__`` would) and goes on."""
    import importlib

    mod = importlib.import_module(MOD)

    def factory(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64):
        try:
            time.sleep(0.5)
        except BaseException:  # noqa: BLE001 - deliberately swallowed, as an unraisable hook does
            pass
        time.sleep(work_after)
        return mod.factory(hidden, layers, heads, seq, batch, vocab)

    return factory


@pytest.mark.parametrize("work_after", [0.0, 2.0])
def test_timeout_is_reported_even_if_the_alarm_is_swallowed(models_dir, work_after):
    # work_after=0: the build finishes right after swallowing; the overrun is still a timeout, not a pass.
    # work_after=2: the repeated alarm interrupts the remaining work long before it ends.
    t0 = time.perf_counter()
    r = check.check_model(_swallowing_factory(work_after), sizes=TINY, timeout=0.05)
    assert not r.passed and any(f.startswith("timeout") for f in r.failures), r.failures
    if work_after:
        assert "stage 'build'" in r.error  # the repeated alarm landed inside the remaining build work
    assert time.perf_counter() - t0 < 1.5
    # the alarm is off again: nothing fires after the check
    time.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def test_cli_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    from unitscale_fx.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert main(["check"]) == 2
    assert "no model given" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text("[tool.unitscale_fx.check]\nbogus = 1\n")
    assert main(["check", "nanogpt"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["check", "nanogpt", "--no-config", "--min-forward", "3"]) == 2
    assert main(["check", "nanogpt", "--no-config", "--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err


def test_threads_are_set_while_checking_and_restored(monkeypatch):
    """check_models runs the checks with 1 torch thread by default (``threads=0``: torch's
    default) and restores the caller's setting afterwards."""
    import torch

    seen = []

    def fake(m, **kw):
        seen.append(torch.get_num_threads())
        return check.ModelCheck(name=m)

    monkeypatch.setattr(check, "check_model", fake)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        check.check_models(["a", "b"])
        assert seen == [1, 1] and torch.get_num_threads() == 2
        check.check_models(["a"], threads=0)
        check.check_models(["a"], threads=3)
        assert seen[2:] == [2, 3] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            check.check_models(["a"], threads=-1)
    finally:
        torch.set_num_threads(before)


def test_cli_pyproject_settings_and_flags(models_dir, tmp_path, monkeypatch, capsys):
    """Criteria and sizes come from pyproject.toml, flags override them; a strict failure exits 1."""
    from unitscale_fx.cli import main

    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(f"""
        [tool.unitscale_fx]
        band = 2.5

        [tool.unitscale_fx.check]
        min_forward = 0.8
        min_grads = 0.6
        hidden = {TINY['hidden']}
        layers = 1
        heads = 2
        seq = 16
        batch = 2
        vocab = {TINY['vocab']}
        models = ["{CUSTOM}"]
        strict = true
    """))
    monkeypatch.chdir(tmp_path)
    rc = main(["check", "--min-grads", "0.7", "--json", "out.json", "--junit", "out.xml", "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    d = json.loads((tmp_path / "out.json").read_text())
    assert d["criteria"]["band"] == 2.5 and d["criteria"]["min_forward"] == 0.8
    assert d["criteria"]["min_grads"] == 0.7  # the flag wins over pyproject
    assert d["criteria"]["min_backward"] == 0.9  # default
    assert {k: d["sizes"][k] for k in TINY} == TINY
    assert d["strict"] is True and [m["name"] for m in d["models"]] == [CUSTOM]
    ET.parse(tmp_path / "out.xml")
    path, lineno = _custom_line(models_dir)
    assert CUSTOM_OP in out and f"line {lineno}" in out and "strict" in out
    # --no-strict on the command line overrides strict = true
    assert main(["check", "--no-strict", "--json", "out2.json", "-q", "--min-coverage", "0"]) == 1
    d2 = json.loads((tmp_path / "out2.json").read_text())
    assert d2["strict"] is False and d2["models"][0]["forward_in_band"] is not None


@pytest.mark.slow
def test_cli_end_to_end_in_a_subprocess(models_dir, tmp_path):
    """``python -m unitscale_fx check pkg.mod:factory`` from a directory on PYTHONPATH: exit 0 and
    reports; with the custom-op model: exit 1 and the op and source line in the output."""
    sizes = [f"--{k}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-m", "unitscale_fx", "check", GOOD, *sizes, "--json", "ok.json", "--junit", "ok.xml"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(models_dir), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1/1 models passed" in p.stdout
    d = json.loads((tmp_path / "ok.json").read_text())
    assert d["passed"] and d["models"][0]["name"] == GOOD
    assert ET.parse(tmp_path / "ok.xml").getroot().get("failures") == "0"

    cmd = [sys.executable, "-m", "unitscale_fx", "check", GOOD, CUSTOM, *sizes, "--strict"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(models_dir), capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    path, lineno = _custom_line(models_dir)
    assert CUSTOM_OP in p.stdout and f'File "{path}", line {lineno}' in p.stdout
    assert "1/2 models passed" in p.stdout


@pytest.mark.slow
def test_workers_run_models_in_processes(models_dir):
    rep = check.check_models([CUSTOM, "nanogtp"], sizes=TINY, strict=True, workers=2)
    assert [m.name for m in rep.models] == [CUSTOM, "nanogtp"]
    assert not rep.models[0].passed and rep.models[0].missing_ops
    assert "UnknownModelError" in rep.models[1].failures[0]
