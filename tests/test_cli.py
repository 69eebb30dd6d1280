"""The ``unitscale-fx`` command line, end to end (issue 4): ``inspect`` (zoo names and
``module:factory`` specs, ``--original``/``--transformed``, ``--measure``, ``--json``, ``--plot``),
``models``, and clear errors with exit status 2 for bad model names."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unitscale_fx import zoo
from unitscale_fx.cli import main
from unitscale_fx.report import SCHEMA, Report, validate

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--layers", "1", "--batch", "2", "--seq", "4", "--seed", "0"]
NANO = ["--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "16", "--batch", "2", "--vocab", "64"]


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    """``tinyzoo.py`` (the golden tiny models) importable as ``tinyzoo:build``."""
    shutil.copy(GOLDEN / "tiny_models.py", tmp_path / "tinyzoo.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tinyzoo", None)


def _json(path: Path) -> dict:
    d = json.loads(path.read_text(encoding="utf-8"))
    validate(d)
    return d


def test_inspect_factory_measure_json_plot(factory_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["inspect", "tinyzoo:build", *TINY, "--measure", "--json", str(out_json), "--plot", str(out_png)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    # plain text (stdout is not a terminal), the transformed graph by default, measured
    assert "\x1b[" not in cap.out
    assert cap.out.startswith("unitscale_fx report: tinyzoo:build (transformed graph, measured)")
    assert "symbols: batch=2, seq=4" in cap.out
    assert "  blocks.0\n    blocks.0.ln\n" in cap.out and "lost " in cap.out
    d = _json(out_json)
    assert d["schema"] == SCHEMA and d["graph"] == "transformed" and d["measured"] is True
    assert d["symbols"] == {"batch": 2, "seq": 4}
    acts = [n for n in d["nodes"] if n["kind"] == "activation" and n["fwd"] is not None]
    assert acts and all(n["fwd"]["measured"] is not None for n in acts)
    assert all(n["headroom"] and set(n["headroom"]["fwd"]) == {"fp8_e4m3", "fp8_e5m2", "fp16", "bf16"}
               for n in acts)
    # the inserted scales are in the JSON: forward scales on the <matmul> multiplies, grad_scale factors
    assert any(n["role"] == "matmul" and n["factors"]["fwd"]["value"] > 0 for n in d["nodes"])
    assert any(n["op"] == "grad_scale" and "grad" in n["factors"] for n in d["nodes"])
    # shapes use the symbol names
    ln = next(n for n in d["nodes"] if n["op"] == "aten.layer_norm")
    assert ln["shape"] == ["batch", "seq", "16"] and ln["module"] == "blocks.0.ln"
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"wrote {out_json}" in cap.err and f"wrote {out_png}" in cap.err


def test_inspect_original_text_matches_report(factory_dir, tmp_path, capsys):
    import unitscale_fx
    from unitscale_fx.report import build_report

    text_file = tmp_path / "dump.txt"
    rc = main(["inspect", "tinyzoo:build", *TINY, "--original", "--text", str(text_file), "--json",
               str(tmp_path / "o.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    _, model, inputs = zoo.resolve("tinyzoo:build", hidden=16, layers=1, batch=2, seq=4, seed=0)
    expected = build_report(unitscale_fx.analyse(model, inputs), model="tinyzoo:build").to_text()
    assert cap.out == expected == text_file.read_text(encoding="utf-8")
    assert "(original graph, predicted)" in cap.out and "grad_scale" not in cap.out
    d = _json(tmp_path / "o.json")
    assert d["graph"] == "original" and d["measured"] is False
    assert not any(n["factors"] for n in d["nodes"])  # nothing inserted in the original graph
    assert Report.from_dict(d).to_text() == expected  # the JSON holds everything the dump shows


def test_inspect_zoo_model_quiet_and_source(tmp_path, capsys):
    rc = main(["inspect", "nanogpt", *NANO, "--quiet", "--json", str(tmp_path / "n.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.startswith("summary\n") and "inserted by the transform" in cap.out
    d = _json(tmp_path / "n.json")
    assert d["model"] == "nanogpt" and d["symbols"]["batch"] == 2 and d["symbols"]["seq"] == 16
    attn = [n for n in d["nodes"] if n["module"].startswith("transformer.h.0.attn")]
    assert attn, "nodes are attributed to their module paths"
    # the user's source line is kept (the model's file, not torch's)
    srcs = [n["source"] for n in d["nodes"] if n["source"]]
    assert srcs and all(s.startswith("nanogpt.py:") for s in srcs)
    rc = main(["inspect", "nanogpt", *NANO, "--original", "--source"])
    out = capsys.readouterr().out
    assert rc == 0 and "at nanogpt.py:" in out and "sparse.py" not in out


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(zoo.names()) == listed
    assert "nanogpt" in listed


@pytest.mark.parametrize("spec, needle", [
    ("nanogtp", "Did you mean nanogpt"),
    ("no_such_model", "unitscale-fx models"),
    ("no_such_pkg.mod:build", "cannot import 'no_such_pkg.mod'"),
    ("tinyzoo:nope", "has no attribute 'nope'"),
    ("bad spec:x", "bad factory spec"),
])
def test_bad_model_is_a_usage_error(spec, needle, factory_dir, capsys):
    rc = main(["inspect", spec])
    cap = capsys.readouterr()
    assert rc == 2
    assert cap.err.startswith("unitscale-fx: error: ") and needle in cap.err
    assert "Traceback" not in cap.err and cap.out == ""


def test_usage_errors(capsys):
    assert main(["inspect"]) == 2  # MODEL missing
    assert main(["inspect", "nanogpt", "--original", "--transformed"]) == 2
    assert main(["inspect", "nanogpt", "--no-such-flag"]) == 2
    assert main(["--version"]) == 0
    assert "unitscale-fx" in capsys.readouterr().out


def test_python_dash_m_with_factory_from_cwd(tmp_path):
    """``python -m unitscale_fx inspect mod:factory`` resolves ``mod`` from the working directory."""
    shutil.copy(GOLDEN / "tiny_models.py", tmp_path / "tinyzoo.py")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "unitscale_fx", "inspect", "tinyzoo:build", *TINY, "--json", "out.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(transformed graph, predicted)" in proc.stdout
    d = _json(tmp_path / "out.json")
    assert d["model"] == "tinyzoo:build"
    bad = subprocess.run([sys.executable, "-m", "unitscale_fx", "inspect", "nosuchmodel"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown model 'nosuchmodel'" in bad.stderr


@pytest.mark.slow
def test_inspect_nanogpt_measure_json_under_a_minute(tmp_path):
    """Issue 4's budget: ``inspect nanogpt --measure --json`` at the zoo's default sizes in < 60 s."""
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "unitscale_fx", "inspect", "nanogpt", "--measure", "--json",
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    d = _json(tmp_path / "out.json")
    assert d["symbols"]["batch"] == 4 and d["symbols"]["seq"] == 128
    assert elapsed < 60, f"took {elapsed:.1f} s"
