"""How well the scale analysis predicts the real scales: issue 4's acceptance figure.

For every model and for the original and the unit-scaled graph, one training step is measured
(:func:`unitscale_fx.track`) and, over all floating activation edges, forward and backward, the
error ``|log2(measured RMS / predicted RMS)|`` is summarised by its median and 90th percentile
(acceptance: median <= 0.15 and p90 <= 0.5 everywhere). The core transform issue's own figure is
narrower: median <= 0.2 over the *matmul operands* - forward, the activations fed to a matmul-family
op (linear, mm/bmm/addmm, conv, einsum, SDPA's q, k, v); backward, the gradient arriving at its
output (the ``grad_out`` multiplicand of its backward matmuls) - reported as ``mm-fwd``/``mm-bwd``. Edges are the graph's nodes that produce a
floating tensor (each output of a multi-output node counts); predicted and measured both zero is
skipped (a zero bias), one of them zero is an infinite error, and an edge with no numeric
prediction is counted as "unpredicted" (it does not enter the percentiles). Parameters and inputs
are left out of ``fwd``/``bwd`` (their values are read off the tensors themselves); the gradients
of the parameters are a third figure, ``grads`` (on the transformed graph the ``grad_scale`` nodes
applied to parameters, whose gradient is the parameter's before scaling, count there too, once).

    python benchmarks/prediction_accuracy.py                      # the seven models of issue 2
    python benchmarks/prediction_accuracy.py nanogpt gpt2 --worst 5 --roots 10
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
MM_MEDIAN_MAX = 0.2  # issue 2: median over the matmul operands
_SIZES = ("hidden", "layers", "heads", "seq", "batch", "vocab", "seed")


def accuracy(report: Any, kinds: tuple[str, ...] = ("activation",),
             exclude: frozenset[str] | set[str] = frozenset(),
             matmul_edges: tuple[set[str], set[str]] | None = None) -> dict[str, dict[str, Any]]:
    """``{"fwd"|"bwd"|"grads": {"edges", "median", "p90", "max", "unpredicted", "worst": [(edge, err)]}}``
    of one measured :class:`~unitscale_fx.report.Report`: ``fwd``/``bwd`` over the edges of
    ``kinds`` (nodes named in ``exclude`` left out), ``grads`` over the parameters' gradients;
    with ``matmul_edges`` (see :func:`matmul_edges`) also ``mm-fwd``/``mm-bwd`` over those edges."""
    from unitscale_fx.report import percentile

    nodes = {n.name: n for n in report.nodes}
    pes = report.prediction_errors(kinds)
    pes["grads"] = report.prediction_errors(("parameter",))["bwd"]
    if matmul_edges is not None:
        for d, names in zip(("fwd", "bwd"), matmul_edges):
            pe = pes[d]
            pes[f"mm-{d}"] = {"errors": [(e, v) for e, v in pe["errors"] if e in names],
                              "unpredicted": [e for e in pe["unpredicted"] if e in names]}
    out = {}
    for d, pe in pes.items():
        sd = {"grads": "bwd", "mm-fwd": "fwd", "mm-bwd": "bwd"}.get(d, d)
        errors = [(e, v) for e, v in pe["errors"] if e.partition("[")[0] not in exclude]
        unpred = [e for e in pe["unpredicted"] if e.partition("[")[0] not in exclude]
        errs = [v for _, v in errors]
        worst = sorted(errors, key=lambda t: -t[1])
        out[d] = {
            "edges": len(errs),
            "median": percentile(errs, 50),
            "p90": percentile(errs, 90),
            "max": max(errs) if errs else None,
            "unpredicted": len(unpred),
            "unpredicted_edges": unpred,
            "worst": worst,
            "details": {e: _details(nodes, e, sd) for e, _ in worst[:50]},
        }
    return out


def matmul_edges(gm: Any) -> tuple[set[str], set[str]]:
    """The edges issue 2's figure is about: (activations multiplied by a matmul-family op, the
    outputs of those ops, whose gradient is the ``grad_out`` multiplicand of the backward)."""
    import torch

    from unitscale_fx.analysis.registry import lookup

    aten = torch.ops.aten
    scaled = _param_grad_scales(gm)
    inputs: set[str] = set()
    outputs: set[str] = set()
    for n in gm.graph.nodes:
        rule = lookup(n.target) if n.op == "call_function" else None
        if rule is None or rule.kind not in ("matmul", "attention"):
            continue
        packet = getattr(n.target, "overloadpacket", None)
        operands = n.args[1:3] if packet in (aten.addmm, aten.baddbmm) else n.args[:3] if rule.kind == "attention" \
            else n.args[:2]
        if packet is aten.einsum:
            operands = tuple(n.args[1]) if len(n.args) > 1 else ()
        for a in operands:
            if getattr(a, "op", None) in ("call_function", "placeholder") and a.name not in scaled:
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor) and val.is_floating_point():
                    inputs.add(a.name)
        outputs.add(n.name)
    return inputs, outputs


def _param_grad_scales(gm: Any) -> set[str]:
    """``grad_scale`` nodes applied to a parameter: their gradient is the parameter's gradient
    before scaling (counted once, with the parameters, under ``grads``)."""
    from unitscale_fx.runtime import grad_scale

    return {n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is grad_scale
            and n.args and getattr(n.args[0], "op", None) == "get_attr"}


def _details(nodes: dict[str, Any], edge: str, d: str) -> dict[str, Any]:
    """``{op, module, predicted, measured}`` of an edge (``name`` or ``name[i]``)."""
    name, _, idx = edge.partition("[")
    n = nodes.get(name)
    if n is None:
        return {}
    pred = meas = None
    if idx and n.outputs is not None:
        o = n.outputs[int(idx.rstrip("]"))].get(d) or {}
        pred, meas = o.get("predicted"), o.get("measured")
    elif getattr(n, d) is not None:
        pred, meas = getattr(n, d).predicted, getattr(n, d).measured
    return {"op": n.op, "module": n.module, "predicted": pred, "measured": meas, "rule": n.rule}


def measure_model(name: str, sizes: dict[str, int], graphs: tuple[str, ...] = ("original", "transformed"),
                  kinds: tuple[str, ...] = ("activation",)) -> dict[str, Any]:
    """Build ``name`` (a zoo name or ``module:factory``) and measure the accuracy of each graph."""
    import torch

    from unitscale_fx import zoo
    from unitscale_fx.track import track

    from unitscale_fx.track import _result_of

    _, model, inputs = zoo.resolve(name, **sizes)
    out: dict[str, Any] = {}
    for graph in graphs:
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            subject = model if graph == "original" else copy.deepcopy(model)
            result = _result_of(subject, inputs, graph == "original", None)
            rep = track(result, inputs, original=graph == "original", headroom=False, model_name=name)
        out[graph] = {"accuracy": accuracy(rep, kinds, _param_grad_scales(result.gm), matmul_edges(result.gm)),
                      "roots": roots(rep, result.gm),
                      "seconds": time.perf_counter() - t0}
    return out


def roots(report: Any, gm: Any, n: int = 40) -> dict[str, list[dict[str, Any]]]:
    """Where the prediction errors come from: per direction, the nodes that *introduce* the largest
    error, worst first.

    The signed error of an edge is ``e = log2(measured / predicted)``. Views, copies and most
    pointwise ops pass an error on unchanged, so the error of one mispredicting op shows on every
    edge after it; what a node introduces is its error minus the error it received: in the forward
    pass from the floating input whose error is closest to its own, in the backward pass from the
    user (whose gradient flows into it) closest to its own, that user's error possibly multiplied or
    divided by the forward error of an input of the user (``grad_a = grad_y * b`` inherits the
    error of ``b``; a norm's input gradient is divided by its input's RMS). A node whose inputs
    (users) were not measured or predicted introduces its whole error.
    """
    import torch.fx as fx

    nodes = {x.name: x for x in report.nodes}
    param_gs = _param_grad_scales(gm)

    def err(name: str, d: str) -> float | None:
        x = nodes.get(name)
        st = getattr(x, d, None) if x is not None else None
        if st is None or st.predicted is None or st.measured is None:
            return None
        if not (st.predicted > 0 and st.measured > 0 and math.isfinite(st.predicted) and math.isfinite(st.measured)):
            return None
        return math.log2(st.measured / st.predicted)

    out: dict[str, list[dict[str, Any]]] = {"fwd": [], "bwd": [], "grads": []}
    for node in gm.graph.nodes:
        rep_node = nodes.get(node.name)
        if rep_node is None or rep_node.kind not in ("activation", "parameter"):
            continue
        for d in ("fwd", "bwd"):
            if (rep_node.kind == "parameter" or node.name in param_gs) and d == "fwd":
                continue
            e = err(node.name, d)
            if e is None:
                continue
            if d == "fwd":
                near = [err(a.name, d) for a in node.all_input_nodes if isinstance(a, fx.Node)]
            else:
                # the gradient a user sends back is its own gradient times (or over) a forward value:
                # the node's (a norm divides by the RMS of its input) or another input's (a product)
                near = []
                for u in node.users:
                    eb = err(u.name, "bwd")
                    if eb is None:
                        continue
                    near.append(eb)
                    for x in [node, *[a for a in u.all_input_nodes if a is not node]]:
                        ef = err(x.name, "fwd")
                        if ef is not None:
                            near += [eb + ef, eb - ef]
            near = [x for x in near if x is not None]
            base = min(near, key=lambda x: abs(e - x)) if near else 0.0
            intro = e - base
            st = getattr(rep_node, d)
            key = "grads" if rep_node.kind == "parameter" or node.name in param_gs else d
            out[key].append({"node": node.name, "op": rep_node.op, "rule": rep_node.rule, "module": rep_node.module,
                           "predicted": st.predicted, "measured": st.measured, "error": e, "introduced": intro})
    for d in out:
        out[d] = sorted(out[d], key=lambda r: -abs(r["introduced"]))[:n]
    return out


def _f(v: float | str | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _g(v: float | str | None) -> str:
    """4 significant digits (predicted / measured RMS)."""
    if v is None or isinstance(v, str):
        return _f(v)
    return f"{v:.4g}"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'model':24s} {'graph':12s} {'dir':6s} {'edges':>6s} {'median':>7s} {'p90':>7s} {'max':>7s} " \
           f"{'unpred':>6s} {'sec':>6s}  ok"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        if "error" in res:
            lines.append(f"{name:24s} error: {res['error']}")
            continue
        for graph, g in res.items():
            for d, a in g["accuracy"].items():
                if d.startswith("mm-"):
                    ok = a["median"] is not None and a["median"] <= MM_MEDIAN_MAX
                else:
                    ok = a["median"] is not None and a["median"] <= MEDIAN_MAX and a["p90"] <= P90_MAX
                lines.append(
                    f"{name:24s} {graph:12s} {d:6s} {a['edges']:6d} {_f(a['median']):>7s} {_f(a['p90']):>7s} "
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
    p.add_argument("--roots", type=int, default=0, metavar="N",
                   help="also list the N nodes that introduce the largest error (see roots())")
    p.add_argument("--json", metavar="FILE", help="write the figures (and every edge's error) as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: fastest for these sizes, and on shared machines; 0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
                    det = a.get("details", {})

                    def one(e: str, v: float) -> str:
                        x = det.get(e) or {}
                        if not x:
                            return f"{e}={_f(v, 2)}"
                        return (f"{e} ({x['op']} @ {x['module'] or '<root>'}: pred {_g(x['predicted'])}, "
                                f"meas {_g(x['measured'])})={_f(v, 2)}")

                    w = ", ".join(one(e, v) for e, v in a["worst"][: args.worst])
                    unp = f"; unpredicted: {', '.join(a['unpredicted_edges'][:args.worst])}" if a["unpredicted"] else ""
                    print(f"{name} {graph} {d} worst: {w}{unp}")
    if args.roots:
        for name, res in results.items():
            for graph, g in res.items() if "error" not in res else ():
                for d, rows in g["roots"].items():
                    print(f"{name} {graph} {d} error introduced at (log2 measured/predicted, signed):")
                    for r in rows[: args.roots]:
                        print(f"    {r['introduced']:+7.2f} (edge {r['error']:+6.2f}) {r['node']:28s} {r['op']:36s} "
                              f"rule={r['rule']} @ {r['module'] or '<root>'}  pred {_g(r['predicted'])} "
                              f"meas {_g(r['measured'])}")
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
