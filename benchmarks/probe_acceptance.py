"""The scale probe on the seven models of the core transform issue (issue 2's acceptance figures).

For each model, built from the zoo at the acceptance size (hidden 256, 4 layers, 4 heads, seq 128, batch 4,
vocab 1024, random init, loss inside the model): ``transform(model)`` with no example inputs (capture at the
first call, ``compile=False`` because the probe needs eager ops), one training step under
:func:`unitscale_fx.measure_step`, and the fractions of forward / backward multiplicands and parameter gradients
with RMS in [1/2, 2] (acceptance: >= 95 / 90 / 90 %), those outside [1/8, 8] (acceptance: none), the worst
``max(RMS, 1/RMS)`` and the initial loss (language models: within 2 % of ln V). ``--original`` adds the same
figures for the untransformed model.

    python benchmarks/probe_acceptance.py
    python benchmarks/probe_acceptance.py gpt2 llama --original
"""
from __future__ import annotations

import argparse
import math
import time

MODELS = ("nanogpt", "transformer_encoder_lm", "gpt2", "bert", "llama", "vit", "t5")
GROUPS = ("forward", "backward", "grads")
VOCAB = 1024
NEED = {"forward": 0.95, "backward": 0.90, "grads": 0.90}


def measure(name: str, original: bool) -> list[dict]:
    import torch

    import unitscale_fx
    from unitscale_fx import zoo
    from unitscale_fx.probe import _extract_loss, measure_step

    model, kw = zoo.get(name, vocab=VOCAB)
    rows = []
    subjects = [("original", model)] if original else []
    for label, subject in subjects + [("transformed", None)]:
        if subject is None:
            subject = unitscale_fx.transform(model, config=unitscale_fx.Config(compile=False))
        t0 = time.perf_counter()
        with torch.no_grad():
            loss = float(_extract_loss(subject(**kw)))
        res = measure_step(subject, kw)
        classes = model.config.num_labels if zoo.spec(name).family == "vision" else VOCAB
        row = {"model": name, "graph": label, "loss": loss, "ln_classes": math.log(classes),
               "seconds": time.perf_counter() - t0}
        for g in GROUPS:
            ents = res.entries(g)
            row[g] = {
                "in_band": res.fraction_in_band(g),
                "outside": [n for n, _, _ in res.out_of_band(g, 1 / 8, 8)],
                "worst": max((max(r, 1 / r) if r > 0 else math.inf) for _, _, r in ents) if ents else None,
            }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--original", action="store_true", help="also measure the untransformed models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    head = (f"{'model':24s} {'graph':12s} {'fwd':>7s} {'bwd':>7s} {'grads':>7s} {'outside 1/8..8':>15s} "
            f"{'worst f/b/g':>20s} {'loss':>7s} {'ln C':>6s}  ok")
    print(head)
    print("-" * len(head))
    ok_all = True
    for name in args.models:
        for r in measure(name, args.original):
            outside = [len(r[g]["outside"]) for g in GROUPS]
            ok = all(r[g]["in_band"] >= NEED[g] for g in GROUPS) and not any(outside)
            ok_all &= ok or r["graph"] == "original"
            worst = "/".join(f"{r[g]['worst']:.3g}" for g in GROUPS)
            print(f"{name:24s} {r['graph']:12s} " + " ".join(f"{100 * r[g]['in_band']:6.1f}%" for g in GROUPS)
                  + f" {'/'.join(map(str, outside)):>15s} {worst:>20s} {r['loss']:7.3f} {r['ln_classes']:6.3f}"
                  + f"  {'yes' if ok else 'NO'}", flush=True)
            for g in GROUPS:
                out = r[g]["outside"]
                if out:
                    more = f" ... and {len(out) - 6} more" if len(out) > 6 else ""
                    print(f"    {g} outside [1/8, 8]: {', '.join(out[:6])}{more}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
