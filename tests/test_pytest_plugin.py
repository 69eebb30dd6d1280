"""Tests of the pytest plugin (:mod:`unitscale_fx.pytest_plugin`), run with ``pytester``.

The plugin is loaded through its ``pytest11`` entry point when unitscale_fx is installed; otherwise
(a source checkout) the inner test sessions load it explicitly with ``-p``.
"""
from __future__ import annotations

import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

TINY = dict(hidden=32, layers=1, heads=2, seq=16, batch=2, vocab=64)
OP = "usfx_plugin.wiggle.default"

MODELS_SRC = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if not hasattr(torch.ops.usfx_plugin, "wiggle"):  # the inner sessions import this module again
        @torch.library.custom_op("usfx_plugin::wiggle", mutates_args=())
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


    class TinyLM(nn.Module):
        def __init__(self, vocab, hidden, heads, seq, custom):
            super().__init__()
            self.heads, self.custom = heads, custom
            self.tok = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(seq, hidden)
            self.ln1 = nn.LayerNorm(hidden)
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.proj = nn.Linear(hidden, hidden)
            self.ln2 = nn.LayerNorm(hidden)
            self.fc = nn.Linear(hidden, 4 * hidden)
            self.out = nn.Linear(4 * hidden, hidden)
            self.ln = nn.LayerNorm(hidden)
            self.head = nn.Linear(hidden, vocab, bias=False)

        def forward(self, idx, targets):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            h = self.fc(self.ln2(x))
            h = torch.ops.usfx_plugin.wiggle(h) if self.custom else F.gelu(h)
            x = x + self.out(h)
            logits = self.head(self.ln(x))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


    def _make(custom, hidden, heads, seq, batch, vocab):
        model = TinyLM(vocab, hidden, heads, seq, custom)
        idx = torch.randint(0, vocab, (batch, seq))
        return model, (idx, torch.roll(idx, -1, 1))


    def factory(hidden=32, heads=2, seq=16, batch=2, vocab=64):
        return _make(False, hidden, heads, seq, batch, vocab)


    def custom_factory(hidden=32, heads=2, seq=16, batch=2, vocab=64):
        return _make(True, hidden, heads, seq, batch, vocab)
''')

PYPROJECT = textwrap.dedent(f"""
    [tool.unitscale_fx.check]
    hidden = {TINY['hidden']}
    layers = {TINY['layers']}
    heads = {TINY['heads']}
    seq = {TINY['seq']}
    batch = {TINY['batch']}
    vocab = {TINY['vocab']}
""")


@pytest.fixture(scope="module", autouse=True)
def _warm_up(tmp_path_factory):
    """Run one full check in this process before any inner session.

    ``runpytest_inprocess`` removes, after the inner session, the modules first imported during it;
    torch submodules that register ``TORCH_LIBRARY`` namespaces cannot be imported a second time. So
    everything a check imports is imported here first (which also warms the analysis caches)."""
    from unitscale_fx import check

    d = tmp_path_factory.mktemp("warm")
    (d / "plugmodels_warm.py").write_text(MODELS_SRC)
    sys.path.insert(0, str(d))
    try:
        check.check_model("plugmodels_warm:custom_factory", sizes=TINY)
    finally:
        sys.path.remove(str(d))


@pytest.fixture
def project(pytester):
    """A user project: its models module and a pyproject.toml with tiny sizes."""
    pytester.makepyfile(plugmodels=MODELS_SRC)
    pytester.makefile(".toml", pyproject=PYPROJECT)
    pytester.syspathinsert()
    yield pytester
    sys.modules.pop("plugmodels", None)  # the next test writes its own copy


def _installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "unitscale_fx.pytest_plugin" for ep in entry_points(group="pytest11"))


def _run(pytester, *args):
    # installed: the entry point loads the plugin (loading it again with -p would be an error)
    load = [] if _installed() else ["-p", "unitscale_fx.pytest_plugin"]
    return pytester.runpytest_inprocess(*load, "-p", "no:cacheprovider", *args)


def test_plugin_is_registered_through_the_pytest11_entry_point():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="pytest11") if ep.value == "unitscale_fx.pytest_plugin"]
    if not eps:
        pytest.skip("unitscale_fx is not installed (source checkout): no entry points")
    assert eps[0].name == "unitscale_fx"


def test_plugin_import_is_cheap():
    """Loading the plugin (in every pytest session once unitscale_fx is installed) costs no more than
    ``import unitscale_fx``: the checker and the zoo are imported when a test uses the fixture."""
    import subprocess

    code = ("import sys, pytest, unitscale_fx; before = set(sys.modules); import unitscale_fx.pytest_plugin; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['unitscale_fx.pytest_plugin']"


def test_fixture_passes_a_unit_scaled_model_and_fails_with_the_cli_explanation(project):
    project.makepyfile(test_models=textwrap.dedent("""
        import pytest

        def test_good(unitscale_check):
            result = unitscale_check("plugmodels:factory")
            assert result.passed and result.coverage == 1.0
            assert result.sizes["hidden"] == 32  # from pyproject.toml

        def test_custom_op(unitscale_check):
            unitscale_check("plugmodels:custom_factory")

        @pytest.mark.unitscale_fx(strict=True)
        def test_custom_op_strict(unitscale_check):
            unitscale_check("plugmodels:custom_factory")
    """))
    from unitscale_fx import check

    # the explanation `unitscale-fx check` prints (ModelCheck.explanation) for the strict failure
    expl = check.check_model("plugmodels:custom_factory", sizes=TINY, strict=True).explanation()
    result = _run(project, "-rA")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    for line in expl.splitlines():
        if "FAILED" in line or "op(s)" in line or "File" in line or "wiggle(h)" in line:
            assert line.strip() in out, expl
    assert OP in out
    assert 'plugmodels.py", line' in out and "h = torch.ops.usfx_plugin.wiggle(h)" in out
    assert "strict: the transform raised MissingRuleError" in out  # only the marked test
    # only the marked test ran the transform strictly: the non-strict failure section measured everything
    plain = out.split(" test_custom_op ")[1].split(" test_custom_op_strict ")[0]
    strict = out.split(" test_custom_op_strict ")[1]
    assert "strict: the transform raised" not in plain and "backward:" in plain
    assert "strict: the transform raised MissingRuleError" in strict
    assert "Traceback" not in out  # a plain explanation, not a stack trace


def test_options_override_pyproject_and_marker(project):
    project.makepyfile(test_opts=textwrap.dedent("""
        import pytest

        pytestmark = pytest.mark.unitscale_fx(band=1.01)

        def test_module_marker_applies(unitscale_check):
            unitscale_check("plugmodels:factory")

        @pytest.mark.unitscale_fx(band=2.0, min_coverage=0.5)
        def test_function_marker_wins(unitscale_check):
            unitscale_check("plugmodels:factory")

        def test_call_options_win(unitscale_check):
            r = unitscale_check("plugmodels:factory", band=2.0, vocab=128)
            assert r.sizes["vocab"] == 128 and r.expected_loss > 4.8

        def test_unknown_option(unitscale_check):
            unitscale_check("plugmodels:factory", min_fwd=0.5)
    """))
    result = _run(project, "-rA")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert "have RMS in [1/1.01, 1.01]" in out
    assert "unknown option 'min_fwd'" in out


def test_criteria_from_pyproject_reach_the_fixture(pytester):
    pytester.makepyfile(plugmodels=MODELS_SRC)
    pytester.makefile(".toml", pyproject=PYPROJECT + "min_forward = 1.0\nband = 1.01\n")
    pytester.syspathinsert()
    pytester.makepyfile(test_crit="""
        def test_good(unitscale_check):
            unitscale_check("plugmodels:factory")
    """)
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    assert "need >= 100.0%" in result.stdout.str()
