"""Benchmark 2 of issue 3: manual-attention nanoGPT at seq 1024, unit-scaled (fused SDPA) vs original.

The zoo's ``nanogpt`` writes attention out by hand (``q @ k.T``, scale, ``masked_fill`` with a
registered tril buffer, softmax, ``@ v``), so the original materialises a ``batch x heads x seq x
seq`` score matrix per layer and keeps the probabilities for the backward pass. The transform
fuses it into one ``F.scaled_dot_product_attention(is_causal=True)`` call. Four variants, built
from the same factory and seed, timed interleaved in one process:

* ``original eager``          the model as written
* ``original compiled``       ``torch.compile(model)``
* ``unit-scaled eager``       ``unitscale_fx.transform(model, config=Config(compile=False))``
* ``unit-scaled compiled``    ``unitscale_fx.transform(model)`` (the default: inductor)
* ``sdpa-original eager`` / ``sdpa-original compiled``: the same model written with
  ``F.scaled_dot_product_attention(is_causal=True)`` (zoo ``nanogpt_sdpa``, same weights), not
  unit-scaled: what the fusion alone gives, so the remainder is the cost of the scale ops.

A step is forward + backward + ``AdamW.step()`` + ``zero_grad``.

Peak memory, how it is measured:

* CPU: one extra step per variant runs under ``torch.profiler`` with ``profile_memory=True``; every
  tensor allocation and free of the c10 CPU allocator (eager ops, inductor's buffers, the SDPA
  kernel's scratch) is an event with a signed size. Sorted by time, their running sum is the live
  tensor memory relative to the start of the step; its maximum is the step's *peak additional
  tensor memory* (activations kept for backward, temporaries, gradients). It does not depend on
  how glibc caches freed pages, which makes a process's RSS high-water mark useless for comparing
  variants in one process (and the compile itself would dominate a fresh process's ``ru_maxrss``).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation at the start of the step,
  after ``reset_peak_memory_stats()`` (the same quantity, from the caching allocator's counters).

Examples::

    python benchmarks/attention_memory.py                       # seq 1024, batch 4, CPU float32
    python benchmarks/attention_memory.py --seq 512 --rounds 3  # quicker
    python benchmarks/attention_memory.py --device cuda --dtype bfloat16
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

import torch
import torch.nn as nn

import unitscale_fx
from unitscale_fx import Config, zoo

VARIANTS = ("original eager", "original compiled", "unit-scaled eager", "unit-scaled compiled",
            "sdpa-original eager", "sdpa-original compiled")


@dataclass
class Variant:
    """A model variant, its optimizer, timings and peak memory."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    first_s: float = math.nan
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, opt: torch.optim.Optimizer, inputs: dict | tuple) -> None:
    loss = zoo.loss_of(zoo.call(model, inputs))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _build(variant: str, sizes: dict, device: torch.device, dtype: torch.dtype) -> Variant:
    """A fresh nanoGPT (seed 0) wrapped as ``variant``: manual attention unless ``sdpa-`` variant."""
    zoo_name = "nanogpt_sdpa" if variant.startswith("sdpa-") else "nanogpt"  # "nanogpt": attention="manual"
    model, _ = zoo.get(zoo_name, **sizes, device=str(device))
    model = model.to(dtype=dtype).train()
    if variant.endswith("original eager"):
        wrapped: nn.Module = model
    elif variant.endswith("original compiled"):
        wrapped = torch.compile(model)
    elif variant == "unit-scaled eager":
        wrapped = unitscale_fx.transform(model, config=Config(compile=False))
    else:
        wrapped = unitscale_fx.transform(model)
    return Variant(variant, wrapped, torch.optim.AdamW(model.parameters(), lr=1e-4))


def _cpu_peak_bytes(fn) -> int:
    """Peak of live tensor bytes (relative to the start) while ``fn()`` runs, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    alloc_type = torch._C._profiler._EventType.Allocation
    while stack:
        node = stack.pop()
        kind, extra = node.typed
        if kind == alloc_type and extra.device.type == "cpu":
            allocs.append((node.start_time_ns, extra.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak


def _peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    return _cpu_peak_bytes(fn)


def run(args: argparse.Namespace) -> list[Variant]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, seq=args.seq,
                 batch=args.batch, vocab=args.vocab)
    _, inputs = zoo.get("nanogpt", **sizes, device=str(device))
    variants = []
    for name in args.variants:
        torch.manual_seed(0)
        v = _build(name, sizes, device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        _step(v.model, v.opt, inputs)           # capture / compile
        _sync(device)
        v.first_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            _step(v.model, v.opt, inputs)
        gc.collect()
        v.peak_bytes = _peak_bytes(lambda: _step(v.model, v.opt, inputs), device)
        print(f"  {name:21s} first step {v.first_s:7.1f} s, peak {v.peak_bytes / 2**20:8.1f} MiB", flush=True)
        variants.append(v)
    for _ in range(args.rounds):
        for v in variants:
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            _step(v.model, v.opt, inputs)
            _sync(device)
            v.times.append(time.perf_counter() - t0)
    return variants


def table(variants: list[Variant], args: argparse.Namespace) -> str:
    """Markdown: per variant median step time and peak memory, ratios against the originals."""
    by = {v.name: v for v in variants}

    def ratios(v: Variant, ref_name: str) -> tuple[str, str]:
        ref = by.get(ref_name)
        if ref is None or ref is v:
            return "", ""
        t = statistics.median(v.times) / statistics.median(ref.times)
        m = v.peak_bytes / ref.peak_bytes if ref.peak_bytes else math.nan
        return f"{t:.3f}", f"{m:.3f}"

    lines = ["| variant | median s/step | IQR s | peak MiB | time / original | memory / original | "
             "time / sdpa-original | memory / sdpa-original |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        med = statistics.median(v.times)
        q = statistics.quantiles(v.times, n=4) if len(v.times) >= 2 else [med, med, med]
        mode = "eager" if v.name.endswith("eager") else "compiled"
        to, mo = ratios(v, f"original {mode}") if not v.name.startswith("original") else ("", "")
        ts, ms = ratios(v, f"sdpa-original {mode}") if v.name.startswith("unit-scaled") else ("", "")
        lines.append(f"| {v.name} | {med:.3f} | {q[0]:.3f}-{q[2]:.3f} | {v.peak_bytes / 2**20:.1f} | "
                     f"{to} | {mo} | {ts} | {ms} |")
    elt = torch.finfo(getattr(torch, args.dtype)).bits // 8
    att = args.batch * args.heads * args.seq * args.seq * elt
    lines.append(f"\none materialised score matrix (batch x heads x seq x seq): {att / 2**20:.1f} MiB per layer, "
                 f"{args.layers} layers")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Ratios compare variants in the same mode (eager or compiled).")
    p.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    p.add_argument("--layers", type=int, default=4, help="number of blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                   help=f"variants to run (default: all of {', '.join(map(repr, VARIANTS))})")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds, one step each (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter and activation dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# attention_memory: torch {torch.__version__}, {platform.machine()} {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible")
    print(f"# nanogpt (manual attention): hidden {args.hidden}, layers {args.layers}, heads {args.heads}, "
          f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}; {args.rounds} interleaved rounds")
    variants = run(args)
    print("\n" + table(variants, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
