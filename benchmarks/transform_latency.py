"""Benchmark 3 of issue 3: how long the transform takes (capture + analysis + rewrite, no compile).

Each configuration runs in a fresh Python process (``--child``), which builds the model, then times
``unitscale_fx.transform(model, example_inputs=..., config=Config(compile=False))`` and reports
JSON: wall seconds (with a breakdown: capture, the rewrite passes with their analyses, and the rest:
mostly the wait for the unit re-init, which runs on a worker thread beside the passes), the peak RSS of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
which includes the interpreter, torch and the model) and the RSS just before the transform.
The parent enforces a per-run timeout, so the benchmark always finishes.

Configurations:

* ``gpt2-small``: zoo ``gpt2`` with hidden 768, 12 layers, 12 heads, vocab 50257, 1024 positions,
  real weights on the CPU (the re-init of 124M parameters is part of the transform);
  ``gpt2-small@meta``: the same on the ``meta`` device (``--gpt2-meta``).
* ``llama7b-L``: ``LlamaForCausalLM`` at Llama-2-7B width (hidden 4096, 32 heads, 32 kv heads,
  intermediate 11008, vocab 32000) with L layers, built on the ``meta`` device (no weights). The
  example inputs (token ids, batch 2 x seq 128) stay on the CPU: the transform captures the meta
  model with them and the analysis reads their values (with meta inputs it cannot evaluate masks
  or positions and leaves most ops unscaled; the table's "ops without rule" column shows it).

``--mode analyse`` times ``unitscale_fx.analyse`` (capture + analysis of the original graph)
instead, for comparison.

Then a least-squares line of seconds (and of peak RSS) against depth for the Llama runs.
Targets (issue 3): GPT-2-small < 5 s; Llama-7B 32 layers < 30 s and < 3 GB.

Examples::

    python benchmarks/transform_latency.py                       # gpt2-small + llama 2/4/8/16/32
    python benchmarks/transform_latency.py --layers 2 4 --no-gpt2   # quick
    python benchmarks/transform_latency.py --timeout 300
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

GPT2_TARGET_S = 5.0
LLAMA32_TARGET_S = 30.0
LLAMA32_TARGET_RSS_GB = 3.0


# ------------------------------------------------------------------------------------------- child
def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc/self/status."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _peak_rss_mib() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _build(config: str, seq: int, batch: int) -> tuple[Any, dict]:
    """The model and example inputs of ``config`` ("gpt2-small" or "llama7b-<layers>")."""
    import torch

    if config in ("gpt2-small", "gpt2-small@meta"):
        from unitscale_fx import zoo

        # positions = 2 * seq in the zoo factory: seq 512 gives GPT-2's 1024
        device = "meta" if config.endswith("@meta") else "cpu"
        model, inputs = zoo.get("gpt2", hidden=768, layers=12, heads=12, seq=512, batch=batch, vocab=50257,
                                device=device)
        if device == "meta":  # example values stay on the CPU (see the module docstring)
            ids = torch.randint(4, 50257, (batch, 512), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "labels": ids.clone()}
        return model, inputs
    if config.startswith("llama7b-"):
        import transformers

        layers = int(config.split("-", 1)[1])
        cfg = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model.train()
        # the example inputs stay on the CPU: their values feed the analysis (masks, positions);
        # with meta inputs the analysis has no values and most rules cannot evaluate
        ids = torch.randint(4, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
        return model, {"input_ids": ids, "labels": ids.clone()}
    raise ValueError(f"unknown configuration {config!r}")


def child(config: str, mode: str, seq: int, batch: int) -> dict:
    """Build ``config`` and time the transform (or the analysis); the JSON-able result."""
    t_import = time.perf_counter()
    import torch

    import unitscale_fx
    import unitscale_fx.api as api
    from unitscale_fx import Config

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, inputs = _build(config, seq, batch)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    stages: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - s
        return wrapper

    # instrumentation only: the library's own functions, wrapped for timing
    api.capture = timed("capture", api.capture)
    api.PassManager.__call__ = timed("passes", api.PassManager.__call__)
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    if mode == "transform":
        m = unitscale_fx.transform(model, example_inputs=inputs, config=Config(compile=False))
        n_nodes = len(m.graph_module.graph.nodes)
    else:
        res = unitscale_fx.analyse(model, inputs)
        n_nodes = len(res.gm.graph.nodes)
    total = time.perf_counter() - t0
    stages["init wait + rest" if mode == "transform" else "analysis"] = (
        total - stages.get("capture", 0.0) - stages.get("passes", 0.0))
    missing = len((m.result if mode == "transform" else res).missing)
    return dict(config=config, mode=mode, seconds=total, stages=stages, build_s=build_s, missing=missing,
                import_s=t0 - t_import - build_s, rss_before_mib=rss_before, peak_rss_mib=_peak_rss_mib(),
                nodes=n_nodes, params=n_params, device=str(next(model.parameters()).device))


# ------------------------------------------------------------------------------------------ parent
def run_one(config: str, args: argparse.Namespace) -> dict:
    """``config`` in a fresh process, under ``args.timeout``; ``{"error": ...}`` on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--mode", args.mode,
           "--seq", str(args.seq), "--batch", str(args.batch)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(config=config, error=f"timed out after {args.timeout} s")
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            out["process_s"] = wall
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(config=config, error=f"exit {proc.returncode}: " + " | ".join(tail))


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: ``(a, b, r2)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | - | - | - | - | - | - | {r['error']} |"
    st = r["stages"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in st.items())
    return (f"| {r['config']} | {r['seconds']:.1f} | {parts} | {r['peak_rss_mib'] / 1024:.2f} | "
            f"{r['rss_before_mib'] / 1024:.2f} | {r['nodes']} | {r['missing']} | {r['device']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                   help="Llama-7B-width depths to run (default: 2 4 8 16 32)")
    p.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-small run")
    p.add_argument("--gpt2-meta", action="store_true", help="also run GPT-2-small on the meta device")
    p.add_argument("--mode", choices=("transform", "analyse"), default="transform",
                   help="time transform(compile=False) (default) or analyse")
    p.add_argument("--seq", type=int, default=128, help="example sequence length for the Llama capture (default 128)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2; 1 would be specialised)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed (default 900)")
    p.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.mode, args.seq, args.batch)), flush=True)
        return 0

    import torch

    print(f"# transform_latency ({args.mode}): torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, 1 thread per run, per-run timeout {args.timeout:.0f} s")
    configs = ([] if args.no_gpt2 else ["gpt2-small"]) + (["gpt2-small@meta"] if args.gpt2_meta else [])
    configs += [f"llama7b-{n}" for n in args.layers]
    results = []
    for c in configs:
        r = run_one(c, args)
        results.append(r)
        print("  " + (f"{c}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB"
                      if "error" not in r else f"{c}: {r['error']}"), flush=True)
    print("\n| config | seconds | stages (s) | peak RSS GiB | RSS before GiB | graph nodes | ops without rule | params on |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        print(_row(r))
    llama = [r for r in results if r["config"].startswith("llama7b-") and "error" not in r]
    if len(llama) >= 2:
        xs = [float(r["config"].split("-")[1]) for r in llama]
        a, b, r2 = linear_fit(xs, [r["seconds"] for r in llama])
        ra, rb, rr2 = linear_fit(xs, [r["peak_rss_mib"] / 1024 for r in llama])
        print(f"\nseconds  = {a:.2f} + {b:.3f} * layers   (R^2 = {r2:.4f})")
        print(f"peak GiB = {ra:.2f} + {rb:.4f} * layers   (R^2 = {rr2:.4f})")
        for r, x in zip(llama, xs):
            print(f"  {r['config']}: measured {r['seconds']:.1f} s, fit {a + b * x:.1f} s")
    verdicts = []
    g = next((r for r in results if r["config"] == "gpt2-small" and "error" not in r), None)
    if g:
        verdicts.append(f"GPT-2-small {g['seconds']:.1f} s (target < {GPT2_TARGET_S:.0f} s): "
                        f"{'met' if g['seconds'] < GPT2_TARGET_S else 'NOT met'}")
    l32 = next((r for r in results if r["config"] == "llama7b-32"), None)
    if l32 and "error" not in l32:
        gb = l32["peak_rss_mib"] * 2**20 / 1e9
        ok = l32["seconds"] < LLAMA32_TARGET_S and gb < LLAMA32_TARGET_RSS_GB
        verdicts.append(f"Llama-7B 32 layers {l32['seconds']:.1f} s, peak RSS {gb:.2f} GB "
                        f"(target < {LLAMA32_TARGET_S:.0f} s and < {LLAMA32_TARGET_RSS_GB:.0f} GB): "
                        f"{'met' if ok else 'NOT met'}")
    elif l32:
        verdicts.append(f"Llama-7B 32 layers: {l32['error']} (target NOT met)")
    if verdicts:
        print("\n" + "\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
