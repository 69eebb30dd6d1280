"""How well the scale analysis predicts the real scales: issue 4's acceptance figure.

For every model and for the original and the unit-scaled graph, one training step is measured
(:func:`unitscale_fx.track`) and, over all floating activation edges, forward and backward, the
error ``|log2(measured RMS / predicted RMS)|`` is summarised by its median and 90th percentile
(acceptance: median <= 0.15 and p90 <= 0.5 everywhere). Edges are the graph's nodes that produce a
floating tensor (each output of a multi-output node counts); predicted and measured both zero is
skipped (a zero bias), one of them zero is an infinite error, and an edge with no numeric
prediction is counted as "unpredicted" (it does not enter the percentiles). Parameters and inputs
are left out (their predictions are read off the tensors themselves).

    python benchmarks/prediction_accuracy.py                      # the seven models of issue 2
    python benchmarks/prediction_accuracy.py nanogpt gpt2 --worst 5
    python benchmarks/prediction_accuracy.py nanogpt --hidden 64 --layers 2 --json acc.json

Model sizes default to the zoo's (hidden 256, 4 layers, 4 heads, seq 128, batch 4, vocab 1024).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Any

MODELS = ("nanogpt", "transformer_encoder_lm", "gpt2", "bert", "llama", "vit", "t5")
MEDIAN_MAX = 0.15
P90_MAX = 0.5
_SIZES = ("hidden", "layers", "heads", "seq", "batch", "vocab", "seed")


def accuracy(report: Any, kinds: tuple[str, ...] = ("activation",)) -> dict[str, dict[str, Any]]:
    """``{"fwd"|"bwd": {"edges", "median", "p90", "max", "unpredicted", "worst": [(edge, err)]}}``
    of one measured :class:`~unitscale_fx.report.Report`."""
    from unitscale_fx.report import percentile

    out = {}
    for d, pe in report.prediction_errors(kinds).items():
        errs = [e for _, e in pe["errors"]]
        out[d] = {
            "edges": len(errs),
            "median": percentile(errs, 50),
            "p90": percentile(errs, 90),
            "max": max(errs) if errs else None,
            "unpredicted": len(pe["unpredicted"]),
            "unpredicted_edges": list(pe["unpredicted"]),
            "worst": sorted(pe["errors"], key=lambda t: -t[1]),
        }
    return out


def measure_model(name: str, sizes: dict[str, int], graphs: tuple[str, ...] = ("original", "transformed"),
                  kinds: tuple[str, ...] = ("activation",)) -> dict[str, Any]:
    """Build ``name`` (a zoo name or ``module:factory``) and measure the accuracy of each graph."""
    import torch

    from unitscale_fx import zoo
    from unitscale_fx.track import track

    _, model, inputs = zoo.resolve(name, **sizes)
    out: dict[str, Any] = {}
    for graph in graphs:
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            subject = model if graph == "original" else copy.deepcopy(model)
            rep = track(subject, inputs, original=graph == "original", headroom=False, model_name=name)
        out[graph] = {"accuracy": accuracy(rep, kinds), "seconds": time.perf_counter() - t0}
    return out


def _f(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'model':24s} {'graph':12s} {'dir':4s} {'edges':>6s} {'median':>7s} {'p90':>7s} {'max':>7s} " \
           f"{'unpred':>6s} {'sec':>6s}  ok"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        if "error" in res:
            lines.append(f"{name:24s} error: {res['error']}")
            continue
        for graph, g in res.items():
            for d, a in g["accuracy"].items():
                ok = a["median"] is not None and a["median"] <= MEDIAN_MAX and a["p90"] <= P90_MAX
                lines.append(
                    f"{name:24s} {graph:12s} {d:4s} {a['edges']:6d} {_f(a['median']):>7s} {_f(a['p90']):>7s} "
                    f"{_f(a['max']):>7s} {a['unpredicted']:6d} {g['seconds']:6.1f}  {'yes' if ok else 'NO'}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("models", nargs="*", default=list(MODELS), help=f"zoo names or module:factory (default: {' '.join(MODELS)})")
    for s in _SIZES:
        p.add_argument(f"--{s}", type=int, default=None)
    p.add_argument("--graph", choices=("original", "transformed", "both"), default="both")
    p.add_argument("--worst", type=int, default=0, metavar="N", help="also list the N worst edges of each graph")
    p.add_argument("--json", metavar="FILE", help="write the figures (and every edge's error) as JSON")
    args = p.parse_args(argv)
    sizes = {s: getattr(args, s) for s in _SIZES if getattr(args, s) is not None}
    graphs = ("original", "transformed") if args.graph == "both" else (args.graph,)
    results: dict[str, Any] = {}
    failed = False
    for name in args.models:
        try:
            results[name] = measure_model(name, sizes, graphs)
        except Exception as e:  # noqa: BLE001 - one broken model must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            failed = True
        print(f"# {name} done", file=sys.stderr, flush=True)
    print(table(results))
    if args.worst:
        for name, res in results.items():
            for graph, g in res.items() if "error" not in res else ():
                for d, a in g["accuracy"].items():
                    w = ", ".join(f"{e}={_f(v, 2)}" for e, v in a["worst"][: args.worst])
                    unp = f"; unpredicted: {', '.join(a['unpredicted_edges'][:args.worst])}" if a["unpredicted"] else ""
                    print(f"{name} {graph} {d} worst: {w}{unp}")
    if args.json:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return "inf" if v > 0 else ("nan" if math.isnan(v) else "-inf")
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"sizes": sizes, "median_max": MEDIAN_MAX, "p90_max": P90_MAX, "results": clean(results)}, f,
                      indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
