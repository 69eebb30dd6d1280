"""Train a unit-scaled nanoGPT next to the same model untransformed, on text that ships offline.

The corpus is the standard library's ``pydoc_data.topics`` (about 465 KB of English); tokens are
bytes (vocab 256). Both models get the same data order and the same AdamW settings except the
learning rate, which is the usual one for each parametrisation (unit-scaled models take larger
steps because their weights have unit scale).

    python examples/train_nanogpt.py --steps 300

prints a table of the two loss curves (every ``--every`` steps) and ``ln(vocab)`` for reference.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import unitscale_fx
from unitscale_fx.zoo.nanogpt import GPT, GPTConfig


def corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + seq] for i in ix])
        y = torch.stack([data[i + 1:i + seq + 1] for i in ix])
        yield x, y


def train(model, lr: float, data, args) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    losses = []
    for step, (x, y) in enumerate(batches(data, args.steps, args.batch, args.seq, args.seed)):
        frac = min(1.0, (step + 1) / args.warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr * frac
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr-standard", type=float, default=3e-3)
    p.add_argument("--lr-unit", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="hand the unit-scaled graph to torch.compile")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = corpus()
    cfg = GPTConfig(block_size=2 * args.seq, vocab_size=256, n_layer=args.layers, n_head=args.heads,
                    n_embd=args.hidden, dropout=0.0)

    torch.manual_seed(args.seed)
    standard = GPT(cfg)
    torch.manual_seed(args.seed)
    unit = unitscale_fx.transform(GPT(cfg), config=unitscale_fx.Config(compile=args.compile))

    t0 = time.time()
    curve_std = train(standard, args.lr_standard, data, args)
    t1 = time.time()
    curve_unit = train(unit, args.lr_unit, data, args)
    t2 = time.time()

    print(f"corpus: pydoc_data.topics, {len(data)} bytes; ln(vocab) = {math.log(256):.3f}")
    print(f"{'step':>6} {'standard':>10} {'unit-scaled':>12}")
    for i in range(0, args.steps, args.every):
        w = slice(max(0, i - args.every + 1), i + 1)  # mean over the last `every` steps
        a = sum(curve_std[w]) / len(curve_std[w])
        b = sum(curve_unit[w]) / len(curve_unit[w])
        print(f"{i + 1:>6} {a:>10.3f} {b:>12.3f}")
    last = slice(-args.every, None)
    print(f"{'final':>6} {sum(curve_std[last]) / args.every:>10.3f} {sum(curve_unit[last]) / args.every:>12.3f}")
    print(f"time: standard {t1 - t0:.0f} s, unit-scaled {t2 - t1:.0f} s (includes capture + analysis)")


if __name__ == "__main__":
    main()
