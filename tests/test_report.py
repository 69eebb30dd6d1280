"""Scale reports (issue 4): text dumps (golden files), JSON schema, measured values, rendering."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
from pathlib import Path

import pytest
import sympy
import torch

import unitscale_fx
from unitscale_fx.analysis.record import META_KEY, Stat
from unitscale_fx.report import (
    SCHEMA,
    Report,
    band_of,
    build_report,
    eval_expr,
    format_expr,
    print_report,
)
from unitscale_fx.track import headroom_of, measure_graph, track

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def _tiny():
    spec = importlib.util.spec_from_file_location("_us_tiny_models", GOLDEN / "tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tiny = _tiny()


def _build(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny.build(**kw)


@pytest.fixture(scope="module")
def original():
    model, inputs = _build()
    return model, inputs, unitscale_fx.analyse(model, inputs)


@pytest.fixture(scope="module")
def transformed():
    model, inputs = _build()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        res = unitscale_fx.transform(model, inputs, compile=False).result
    return model, inputs, res


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it")
        path.write_text(text, encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "actual", n=1))
        pytest.fail(f"text dump differs from golden/{name} (UPDATE_GOLDEN=1 regenerates it):\n{diff[:6000]}")


# ------------------------------------------------------------------------------------ golden


def test_golden_original_text(original):
    _, _, res = original
    text = build_report(res, model="TinyMLP").to_text()
    _check_golden("tiny_mlp_original.txt", text)


def test_golden_transformed_text(transformed):
    _, _, res = transformed
    text = build_report(res, model="TinyMLP").to_text()
    _check_golden("tiny_mlp_transformed.txt", text)


def test_text_is_deterministic_and_normalised(original):
    _, _, res = original
    a = build_report(res).to_text()
    b = build_report(res).to_text()
    assert a == b
    assert "/work/" not in a and "0x" not in a  # no absolute paths, no addresses
    assert all(line == line.rstrip() for line in a.splitlines())
    assert not any(f"s{i}" in a.split() for i in range(200))  # export symbols renamed


def test_text_groups_under_module_paths(original):
    _, _, res = original
    text = build_report(res).to_text()
    lines = text.splitlines()
    i = lines.index("  blocks.0")
    assert lines[i + 1] == "    blocks.0.ln"
    assert lines[i + 2].startswith("      layer_norm = aten.layer_norm(x, ")
    assert "fwd σ = 1" in lines[i + 2]


# ------------------------------------------------------------------------------------ JSON

_NODE_KEYS = {
    "index": int, "name": str, "op": str, "kind": str, "module": str, "shape": (list, type(None)),
    "dtype": (str, type(None)), "call": str, "fwd": (dict, type(None)), "bwd": (dict, type(None)),
    "factors": dict, "rule": (str, type(None)), "role": (str, type(None)), "missing": bool, "note": str,
    "source": (str, type(None)), "headroom": (dict, type(None)), "nonfinite": (dict, type(None)),
    "module_stack": list,
}
_NUM = (int, float, type(None))


def _check_stat(st):
    assert set(st) == {"expr", "predicted", "measured"}
    assert isinstance(st["expr"], (str, type(None)))
    assert isinstance(st["predicted"], _NUM) or st["predicted"] in ("nan", "inf", "-inf")
    assert isinstance(st["measured"], _NUM) or st["measured"] in ("nan", "inf", "-inf")


def _check_schema(d, *, measured: bool):
    assert d["schema"] == SCHEMA == "unitscale_fx.report/1"
    assert set(d) == {"schema", "model", "graph", "measured", "symbols", "nodes", "summary"}
    assert d["graph"] in ("original", "transformed")
    assert d["measured"] is measured
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in d["symbols"].items())
    assert d["nodes"]
    for i, n in enumerate(d["nodes"]):
        assert set(_NODE_KEYS) <= set(n) <= set(_NODE_KEYS) | {"outputs"}, n["name"]
        for k, t in _NODE_KEYS.items():
            assert isinstance(n[k], t), (n["name"], k, n[k])
        assert n["index"] == i
        assert n["kind"] in ("input", "parameter", "activation", "scale_value")
        if n["shape"] is not None:
            assert all(isinstance(s, str) for s in n["shape"])
        for key in ("fwd", "bwd"):
            if n[key] is not None:
                _check_stat(n[key])
        for k, f in n["factors"].items():
            assert k in ("fwd", "bwd", "grad") and set(f) == {"expr", "value"}
            assert isinstance(f["expr"], str) and isinstance(f["value"], _NUM)
        if n["headroom"] is not None:
            assert measured
            for direction, fmts in n["headroom"].items():
                assert direction in ("fwd", "bwd")
                assert set(fmts) == {"fp8_e4m3", "fp8_e5m2", "fp16", "bf16"}
                for h in fmts.values():
                    assert set(h) == {"underflow", "overflow"}
                    assert 0.0 <= h["underflow"] <= 1.0 and 0.0 <= h["overflow"] <= 1.0
        if not measured:
            for key in ("fwd", "bwd"):
                assert n[key] is None or n[key]["measured"] is None
    s = d["summary"]
    for key in ("nodes", "edges", "missing", "inserted", "in_band", "max_abs_log2", "worst"):
        assert key in s
    assert s["nodes"] == len(d["nodes"])
    assert ("headroom" in s) is measured and ("prediction_error" in s) is measured


def test_json_schema_predicted(original, transformed):
    for _, _, res in (original, transformed):
        rep = build_report(res)
        d = json.loads(rep.to_json())
        _check_schema(d, measured=False)
        assert d["graph"] == res.title
        assert d["symbols"]["batch"] == 4 and d["symbols"]["seq"] == 8


def test_json_schema_measured_and_round_trip(transformed, tmp_path):
    _, _, res = transformed
    rep = track(res)
    path = tmp_path / "r.json"
    text = rep.to_json(path)
    d = json.loads(path.read_text())
    assert json.loads(text) == d
    _check_schema(d, measured=True)
    assert any(n["headroom"] for n in d["nodes"])
    back = Report.from_json(str(path))
    assert back.to_dict() == rep.to_dict()
    with pytest.raises(ValueError, match="schema"):
        Report.from_dict({**d, "schema": "unitscale_fx.report/999"})


DOC = Path(__file__).resolve().parents[1] / "docs" / "report_schema.md"


def _doc_table_keys(text: str, heading: str) -> set[str]:
    """The first-column keys (`` `key` ``) of the table under ``heading`` in the schema doc."""
    import re

    part = text.split(heading, 1)[1]
    keys = set()
    started = False
    for line in part.splitlines():
        if line.startswith("|"):
            started = True
            m = re.match(r"\|\s*`([a-z_]+)`\s*\|", line)
            if m:
                keys.add(m.group(1))
        elif started:
            break
    return keys


def test_schema_version_and_fields_are_documented():
    """docs/report_schema.md documents this schema version and exactly the fields the writer emits."""
    from unitscale_fx.report import _NODE_FIELDS, FORMATS

    text = DOC.read_text(encoding="utf-8")
    assert SCHEMA == "unitscale_fx.report/1"
    assert f"# Scale report JSON, schema `{SCHEMA}`" in text
    assert _doc_table_keys(text, "## Top level") == {"schema", "model", "graph", "measured", "symbols", "nodes",
                                                     "summary"}
    assert _doc_table_keys(text, "## Node") == set(_NODE_FIELDS) | {"outputs"}
    assert set(_NODE_KEYS) == set(_NODE_FIELDS)
    assert _doc_table_keys(text, "### stat") == {"expr", "predicted", "measured"}
    assert _doc_table_keys(text, "### factors") == {"fwd", "bwd", "grad"}
    assert _doc_table_keys(text, "### headroom") == {"underflow", "overflow"}
    assert {"prediction_error", "headroom", "in_band", "worst", "missing", "inserted"} <= _doc_table_keys(
        text, "## summary")
    for fmt in FORMATS:
        assert f"`{fmt}`" in text or f'"{fmt}"' in text


def test_validate_names_the_offending_field(transformed):
    """``validate`` (and ``Report.from_dict``) reject a wrong schema version, missing or mistyped
    fields, and accept keys they do not know (keys are only added within a version)."""
    import copy

    from unitscale_fx.report import validate

    _, _, res = transformed
    d = json.loads(track(res).to_json())
    validate(d)
    i = next(k for k, n in enumerate(d["nodes"]) if n["headroom"] and n["bwd"] and n["factors"])

    def broken(edit):
        x = copy.deepcopy(d)
        edit(x)
        return x

    cases = [
        (lambda x: x.update(schema="unitscale_fx.report/2"), "schema"),
        (lambda x: x.pop("nodes"), "nodes"),
        (lambda x: x.update(graph="other"), "graph"),
        (lambda x: x["nodes"][i].pop("module"), "missing fields ['module']"),
        (lambda x: x["nodes"][i].update(shape="4x8"), ".shape"),
        (lambda x: x["nodes"][i]["fwd"].pop("measured"), ".fwd"),
        (lambda x: x["nodes"][i]["bwd"].update(predicted="big"), ".bwd.predicted"),
        (lambda x: x["nodes"][i].update(index=i + 1), ".index"),
        (lambda x: x["nodes"][i]["headroom"]["bwd"].pop("fp16"), ".headroom.bwd"),
        (lambda x: x["nodes"][i]["headroom"]["fwd"]["bf16"].update(underflow=1.5), ".headroom.fwd.bf16"),
        (lambda x: x["nodes"][i]["factors"][next(iter(x["nodes"][i]["factors"]))].pop("value"), ".factors."),
        (lambda x: x.update(measured=False), "measured"),
        (lambda x: x["summary"].pop("worst"), "summary"),
    ]
    for edit, needle in cases:
        with pytest.raises(ValueError, match="report JSON") as e:
            validate(broken(edit))
        assert needle in str(e.value), (needle, str(e.value))
    with pytest.raises(ValueError, match="unsupported report schema"):
        Report.from_dict(broken(cases[0][0]))
    # a newer writer of the same major version may add keys anywhere
    newer = broken(lambda x: (x.update(extra=1), x["nodes"][i].update(new_field="x"),
                              x["nodes"][i]["fwd"].update(p99=2.0), x["summary"].update(more={})))
    validate(newer)
    assert Report.from_dict(newer).to_dict()["nodes"][i] == d["nodes"][i]


def test_transformed_report_shows_inserted_scales(transformed):
    _, _, res = transformed
    rep = build_report(res)
    roles = {n.role for n in rep.nodes if n.role}
    assert roles & {"matmul", "head", "operand", "residual_branch", "residual_skip"}
    for n in rep.nodes:
        if n.role is not None:
            assert n.op == "aten.mul" and "fwd" in n.factors and n.factors["fwd"].value is not None
    gs = [n for n in rep.nodes if n.op == "grad_scale"]
    assert gs and all("grad" in n.factors for n in gs)
    # a scale node's predicted output is (close to) unit, and the × factor is shown in the dump
    text = rep.to_text()
    assert "<matmul>" in text and "(× " in text and "grad × " in text


# ------------------------------------------------------------------------------------ measured


def _rms(t):
    return float(t.detach().double().pow(2).mean().sqrt())


def test_measured_equals_independent_rms(original):
    model, (x, y), res = original
    rep = track(res)
    assert rep.measured
    # independent forward/backward of the eager model
    with torch.enable_grad():
        ln = model.blocks[0].ln(x)
        ln.retain_grad()
        h = torch.nn.functional.gelu(model.blocks[0].fc1(ln))
        h.retain_grad()
        x1 = x + model.blocks[0].fc2(h)
        x1.retain_grad()
        x2 = model.blocks[1](x1)
        logits = model.head(x2)
        logits.retain_grad()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        gw = torch.autograd.grad(loss, [ln, h, x1, logits, model.head.weight])

    def node(module, op):
        found = [n for n in rep.nodes if n.module == module and n.op == op]
        assert len(found) == 1, (module, op, [n.name for n in found])
        return found[0]

    pairs = [
        (node("blocks.0.ln", "aten.layer_norm"), ln, gw[0]),
        (node("blocks.0", "aten.gelu"), h, gw[1]),
        (node("head", "aten.linear"), logits, gw[3]),
    ]
    adds = [n for n in rep.nodes if n.module == "blocks.0" and n.op == "aten.add"]
    pairs.append((adds[-1], x1, gw[2]))
    for n, value, grad in pairs:
        assert n.fwd.measured == pytest.approx(_rms(value), rel=1e-5), n.name
        assert n.bwd.measured == pytest.approx(_rms(grad), rel=1e-5), n.name
    w = rep.node("head_weight")
    assert w.fwd.measured == pytest.approx(_rms(model.head.weight), rel=1e-6)
    assert w.bwd.measured == pytest.approx(_rms(gw[4]), rel=1e-5)
    loss_node = [n for n in rep.nodes if n.op == "aten.cross_entropy_loss"][0]
    assert loss_node.fwd.measured == pytest.approx(loss.item(), rel=1e-5)
    assert loss_node.bwd.measured == pytest.approx(1.0)
    # predictions and measurements agree on this model (a sanity check of the analysis)
    assert n.fwd.predicted == pytest.approx(n.fwd.measured, rel=0.2)


def test_track_leaves_model_untouched():
    model, inputs = _build()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    sentinel = {k: torch.full_like(v, 7.0) for k, v in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = sentinel[k]
    model.head.bias.grad = None
    rng = torch.get_rng_state()
    rep = track(model, inputs)  # transforms a copy
    assert rep.graph == "transformed" and rep.measured
    rep0 = track(model, inputs, original=True)
    assert rep0.graph == "original" and rep0.measured
    assert torch.equal(torch.get_rng_state(), rng)
    assert not getattr(model, "_unitscale_fx_transformed", False)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), params[k]), k
        if k == "head.bias":
            assert p.grad is None
        else:
            assert p.grad is sentinel[k], k
        assert not p._backward_hooks, k  # measurement hooks removed


def test_track_transform_result_and_module(transformed):
    model, inputs, res = transformed
    rep = track(res)
    assert rep.graph == "transformed"
    acts = rep.edges()
    assert sum(n.fwd.measured is not None for n in acts) == len(acts)
    assert sum(n.bwd is not None and n.bwd.measured is not None for n in acts) >= len(acts) - 2
    with pytest.raises(ValueError, match="original"):
        track(res, original=True)


def test_track_with_other_batch_rebinds_symbols(original):
    model, _, res = original
    _, (x, y) = _build(batch=2, seq=4)
    rep = track(res, (x, y))
    assert rep.symbols["batch"] == 2 and rep.symbols["seq"] == 4
    ln = [n for n in rep.nodes if n.op == "aten.layer_norm"][0]
    assert ln.shape == ["batch", "seq", "32"]
    assert ln.fwd.measured == pytest.approx(_rms(model.blocks[0].ln(x)), rel=1e-5)


def test_measure_graph_without_loss_and_nonfinite():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            s = self.lin(x)
            mask = torch.ones(8, 8, dtype=torch.bool).tril()[: s.shape[0]]
            return torch.softmax(s.masked_fill(~mask, float("-inf")), -1)

    torch.manual_seed(0)
    model = Masked()
    x = torch.randn(3, 8)
    res = unitscale_fx.analyse(model, (x,))
    out = measure_graph(res.gm, (x,), {}, headroom=True)
    mf = next(v for k, v in out.items() if k.startswith("masked_fill"))
    assert math.isfinite(mf.fwd) and mf.nonfinite["fwd"] > 0
    assert mf.headroom["fwd"]["fp16"]["overflow"] == 0.0  # -inf is masking, not overflow
    assert model.lin.weight.grad is None
    lin = next(v for k, v in out.items() if k.startswith("linear"))
    assert lin.bwd is not None and lin.bwd > 0  # unit random gradient at the output


def test_headroom_of():
    t = torch.tensor([0.0, 1e-9, 5e-4, 1e-3, 500.0, 7e4])
    h = headroom_of(t)
    n = t.numel()
    assert h["fp8_e4m3"] == {"underflow": 2 / n, "overflow": 2 / n}  # 1e-9, 5e-4 (1e-3 rounds up to 2**-9) | 500, 7e4
    assert h["fp8_e5m2"] == {"underflow": 1 / n, "overflow": 1 / n}
    assert h["fp16"] == {"underflow": 1 / n, "overflow": 1 / n}
    assert h["bf16"] == {"underflow": 0.0, "overflow": 0.0}


# ------------------------------------------------------------------------------------ robustness


def test_missing_ops_none_predictions_and_tuples():
    torch.manual_seed(0)
    model = tiny.SplitNet()
    x = torch.randn(2, 5, 16)
    res = unitscale_fx.analyse(model, (x,))
    nodes = [n for n in res.gm.graph.nodes if n.op == "call_function"]
    multi = [n for n in nodes if isinstance(n.meta.get(META_KEY).fwd, tuple)]
    assert multi, "expected a multi-output split node"
    # simulate rough edges of the analysis: an unknown symbol, a missing op, no prediction at all
    sig = [n for n in nodes if "sigmoid" in str(n.target)][0]
    sig.meta[META_KEY].fwd = Stat(sympy.Symbol("mystery", positive=True))
    mul = [n for n in nodes if "mul" in str(n.target)][0]
    mul.meta[META_KEY].fwd, mul.meta[META_KEY].bwd = None, None
    mul.meta[META_KEY].missing, mul.meta[META_KEY].note = True, "testing"
    rep = track(res)
    d = json.loads(rep.to_json())
    _check_schema(d, measured=True)
    split = rep.node(multi[0].name)
    assert split.outputs is not None and len(split.outputs) == 3 and split.fwd is None
    assert all(o["fwd"]["measured"] is not None for o in split.outputs)
    s = rep.node(sig.name)
    assert s.fwd.predicted is None and s.fwd.expr == "mystery" and s.fwd.measured is not None
    m = rep.node(mul.name)
    assert m.missing and m.fwd.predicted is None and m.fwd.measured is not None
    text = rep.to_text()
    assert "no scale rule" in text and "testing" in text and "σ = ?" in text
    buf = io.StringIO()
    from rich.console import Console

    Console(file=buf, width=160, force_terminal=False).print(rep.to_rich())
    assert "worst edges" in buf.getvalue()


# ------------------------------------------------------------------------------------ printing


def test_format_expr():
    d = sympy.Symbol("d_model", positive=True)
    s72 = sympy.Symbol("s72", positive=True, integer=True)
    s5 = sympy.Symbol("s5", positive=True, integer=True)
    names = {s72: sympy.Symbol("seq"), "s5": "batch"}
    assert format_expr(1 / sympy.sqrt(d)) == "d_model**(-1/2)"
    assert format_expr(sympy.sqrt(2) / 8) == "sqrt(2)/8"
    assert format_expr(sympy.Float(0.0625000001)) == "0.0625"
    assert format_expr(sympy.Float(0.70710678118) * sympy.sqrt(2)) == "1"
    assert format_expr(sympy.sqrt(s72) * sympy.sqrt(s5), names) == "sqrt(batch*seq)"
    assert format_expr(sympy.Float(0.041666667) / sympy.sqrt(s72), names) == "0.04167*seq**(-1/2)"
    assert format_expr(1 / (s72 * s5), names) == "1/(batch*seq)"
    assert format_expr(s72 - 1, names) == "seq - 1"
    assert format_expr(sympy.polygamma(0, s72 + 1), names) == "digamma(seq + 1)"
    big = sympy.Add(*[sympy.Symbol(f"x{i}") ** 2 for i in range(100)])
    short = format_expr(big, max_nodes=20)
    assert "…" in short and len(short) < 200
    assert format_expr(3) == "3" and format_expr(1e-7) == "1e-7"


def test_eval_expr():
    n = sympy.Symbol("n", positive=True)
    env = {n: 7}
    for e in (1 / sympy.sqrt(n), sympy.polygamma(0, n + 1), sympy.harmonic(n), sympy.Min(n, 3) + sympy.Max(1, n),
              sympy.exp(-n / 10) * sympy.log(n), sympy.erf(n / 9), sympy.Piecewise((n, n > 3), (0, True))):
        assert eval_expr(e, env) == pytest.approx(float(e.subs(n, 7).evalf()), rel=1e-10), e
    assert eval_expr(sympy.Symbol("unknown")) is None
    assert eval_expr(None) is None
    # a shared DAG whose printed tree is 2**60 nodes: evaluated and printed in linear time (built
    # unevaluated: sympy's own simplification of such a DAG is exponential)
    e = n
    for _ in range(60):
        num = sympy.Pow(sympy.Add(sympy.Mul(e, e, evaluate=False), e, evaluate=False), sympy.Rational(1, 2),
                        evaluate=False)
        e = sympy.Mul(num, sympy.Pow(sympy.Add(e, 1, evaluate=False), -1, evaluate=False), evaluate=False)
    assert eval_expr(e, env) == pytest.approx((math.sqrt(5) - 1) / 2, rel=1e-9)  # the fixed point
    assert len(format_expr(e, max_nodes=50)) < 400


def test_band_of():
    assert band_of(1.0) == band_of(0.5) == band_of(2.0) == "green"
    assert band_of(0.2) == band_of(8.0) == "yellow"
    assert band_of(0.1) == band_of(9.0) == band_of(float("inf")) == band_of(float("nan")) == "red"
    assert band_of(None) is None


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_print_report_plain_vs_rich(original):
    _, _, res = original
    rep = build_report(res)
    plain = io.StringIO()
    print_report(rep, plain)
    assert plain.getvalue() == rep.to_text()
    tty = _TTY()
    print_report(rep, tty)
    out = tty.getvalue()
    assert "worst edges" in out and "\x1b[" in out  # rich, with colours
    assert "blocks.0.ln" in out


def test_plot_scales(original, transformed, tmp_path):
    pytest.importorskip("matplotlib")
    from unitscale_fx.plot import plot_scales

    path = plot_scales([track(original[2]), build_report(transformed[2])], tmp_path / "s.png")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_sets_pre_scale_intermediates_apart(original, transformed):
    """On a transformed graph the values right before an inserted scale (and grad_scale's
    identity copies / unscaled incoming gradients) are drawn apart; the original graph has none."""
    from unitscale_fx.plot import _series, is_intermediate

    orig, tr = build_report(original[2]), build_report(transformed[2])
    assert not any(is_intermediate(n, d) for n in orig.edges() for d in ("fwd", "bwd"))
    gs = [n for n in tr.edges() if n.op == "grad_scale"]
    scaled = [n for n in tr.edges() if "fwd" in n.factors and n.role is None]
    inserted = [n for n in tr.edges() if n.role is not None]
    assert gs and scaled and inserted
    assert all(is_intermediate(n, "fwd") and is_intermediate(n, "bwd") for n in gs)
    assert all(is_intermediate(n, "fwd") and not is_intermediate(n, "bwd") for n in scaled)
    assert not any(is_intermediate(n, d) for n in inserted for d in ("fwd", "bwd"))
    for d in ("fwd", "bwd"):
        allx = _series(tr, d, "predicted")[0]
        main, inter = _series(tr, d, "predicted", "main")[0], _series(tr, d, "predicted", "intermediate")[0]
        assert sorted(main + inter) == allx and not set(main) & set(inter)


def test_plot_without_matplotlib(monkeypatch, original, tmp_path):
    import sys

    from unitscale_fx import plot

    rep = build_report(original[2])
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"unitscale_fx\[plot\]"):
        plot.plot_scales([rep], tmp_path / "x.png")
