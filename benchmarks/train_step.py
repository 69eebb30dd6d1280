"""Benchmark 1 of issue 3: one training step, unit-scaled and compiled vs ``torch.compile(original)``.

A step is forward + backward + ``AdamW.step()`` + ``zero_grad``. For each model the variants are
built from the same zoo factory (same seed), compiled, warmed up, then timed *interleaved*: each
round times one block of steps of every variant in turn, so that the load of a shared machine
hits all of them alike. The table reports the median step time over rounds and the ratio of
medians against ``torch.compile(original)``.

Variants:

* ``original``            ``torch.compile(model)`` (inductor, default settings: static shapes first)
* ``original dynamic``    ``torch.compile(model, dynamic=True)`` (the same shape setting as the
                          transform's hand-off, so the ratio isolates the scale ops)
* ``unit-scaled``         ``unitscale_fx.transform(model)``: the default config (inductor, dynamic)

Examples::

    python benchmarks/train_step.py --threads 1                       # CPU, float32, all models
    python benchmarks/train_step.py --models nanogpt_sdpa --rounds 5  # quicker
    python benchmarks/train_step.py --device cuda --dtype bfloat16    # on a GPU
    python benchmarks/train_step.py --census                          # also count scale-only kernels

Target (issue 3): ``unit-scaled / original <= 1.03`` once compiled.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

import unitscale_fx
from unitscale_fx import zoo

MODELS = ("nanogpt", "nanogpt_sdpa", "llama")
VARIANTS = ("original", "original dynamic", "unit-scaled")


@dataclass
class Variant:
    """One compiled model with its optimizer and its timings."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    compile_s: float = math.nan
    times: list[float] = field(default_factory=list)   # seconds per step, one entry per round
    census: Any = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, opt: torch.optim.Optimizer, inputs: dict | tuple) -> torch.Tensor:
    loss = zoo.loss_of(zoo.call(model, inputs))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _build(name: str, variant: str, sizes: dict, device: torch.device, dtype: torch.dtype) -> Variant:
    """A fresh zoo model (seed 0) wrapped as ``variant``, with its own AdamW."""
    model, _ = zoo.get(name, **sizes, device=str(device))
    model = model.to(dtype=dtype).train()
    if variant == "unit-scaled":
        compiled = unitscale_fx.transform(model)  # default Config: inductor, dynamic shapes
    elif variant == "original dynamic":
        compiled = torch.compile(model, dynamic=True)
    else:
        compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Variant(variant, compiled, opt)


def _float_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _float_inputs(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_float_inputs(v, dtype) for v in inputs)
    return inputs


def _load_census() -> Callable[[], Any]:
    """``kernel_census`` from tests/test_compile.py (the scheduler hook the test uses)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "test_compile.py")
    spec = importlib.util.spec_from_file_location("_unitscale_test_compile", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.kernel_census


def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Variant]:
    """Build, compile, warm up and time every variant of zoo model ``name`` (interleaved)."""
    sizes = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, seq=args.seq,
                 batch=args.batch, vocab=args.vocab)
    _, inputs = zoo.get(name, **sizes, device=str(device))
    inputs = _float_inputs(inputs, dtype)
    census_cm = _load_census() if args.census else None
    variants = []
    for v in args.variants:
        torch.manual_seed(0)
        var = _build(name, v, sizes, device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        if census_cm is not None:
            with census_cm() as census:
                _step(var.model, var.opt, inputs)
            var.census = census
        else:
            _step(var.model, var.opt, inputs)   # capture (transform) + compile fwd and bwd
        _sync(device)
        var.compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            _step(var.model, var.opt, inputs)
        _sync(device)
        variants.append(var)
        print(f"  {name:13s} {v:17s} first step (capture + compile) {var.compile_s:7.1f} s", flush=True)
    for _ in range(args.rounds):
        for var in variants:
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(var.model, var.opt, inputs)
            _sync(device)
            var.times.append((time.perf_counter() - t0) / args.steps)
    return variants


def _fmt_census(var: Variant) -> str:
    c = var.census
    if c is None:
        return ""
    fwd = sum(1 for n in c.standalone_scale if n.graph == 0)
    return f"{len(c.standalone_scale)} ({fwd} fwd) of {len(c.nests)} nests"


def report(name: str, variants: list[Variant]) -> list[str]:
    """Markdown table rows for ``name``: median step time, spread, ratio to ``original``."""
    by_name = {v.name: v for v in variants}
    base = by_name.get("original") or variants[0]
    base_med = statistics.median(base.times)
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        q = statistics.quantiles(v.times, n=4) if len(v.times) >= 2 else [med, med, med]
        paired = [a / b for a, b in zip(v.times, base.times)]
        row = (f"| {name} | {v.name} | {med * 1e3:8.1f} | {q[0] * 1e3:7.1f}-{q[2] * 1e3:<7.1f} | "
               f"{med / base_med:5.3f} | {statistics.median(paired):5.3f} | {v.compile_s:6.1f} |")
        if any(x.census is not None for x in variants):
            row += f" {_fmt_census(v)} |"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Prints a markdown table; paste it into docs/benchmarks.md.")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=zoo.names(), metavar="NAME",
                   help=f"zoo models to benchmark (default: {' '.join(MODELS)})")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                   help="variants to time, the first is the ratio's reference unless 'original' is present "
                        f"(default: all of {', '.join(map(repr, VARIANTS))})")
    p.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    p.add_argument("--layers", type=int, default=4, help="number of blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4; Llama uses heads/2 kv heads)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter and activation dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--census", action="store_true",
                   help="count inductor loop nests that only scale (the hook of tests/test_compile.py; "
                        "bypasses the FX graph cache, so the first step is slower)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# train_step: torch {torch.__version__}, {platform.machine()} {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible")
    print(f"# sizes: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, seq {args.seq}, "
          f"batch {args.batch}, vocab {args.vocab}; {args.rounds} rounds x {args.steps} steps, interleaved")
    if device.type == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name(device)}")
    rows: list[str] = []
    for name in args.models:
        torch._dynamo.reset()
        variants = bench_model(name, args, device, dtype)
        rows += report(name, variants)
        del variants
        gc.collect()
    head = ("| model | variant | median ms/step | IQR ms | ratio of medians | median paired ratio | "
            "first step s |")
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if args.census:
        head += " scale-only nests |"
        sep += "---|"
    print("\n" + head + "\n" + sep + "\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
