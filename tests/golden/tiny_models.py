"""Tiny hand-written models for the report golden tests and the CLI tests.

The golden dumps quote source lines of this file (``tiny_models.py:NN``): append new code at the
end, and regenerate the golden files (UPDATE_GOLDEN=1) if a line of a model moves.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-LayerNorm MLP block with a residual connection."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(self.ln(x)))
        return x + self.fc2(h)


class TinyMLP(nn.Module):
    """``layers`` residual MLP blocks and a classification head with a cross-entropy loss."""

    def __init__(self, d: int = 32, layers: int = 2, classes: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return F.cross_entropy(logits.transpose(1, 2), y)  # ties the shapes of y to those of x


def build(hidden: int = 32, layers: int = 2, batch: int = 4, seq: int = 8, vocab: int = 16, seed: int = 0):
    """``(TinyMLP, (x, y))``: the factory the CLI tests load as ``tests/golden/tiny_models.py:build``."""
    g = torch.Generator().manual_seed(seed)
    model = TinyMLP(hidden, layers, vocab)
    x = torch.randn(batch, seq, hidden, generator=g)
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    return model, (x, y)


class SplitNet(nn.Module):
    """A fused projection split in three (a multi-output node), gated, with a scalar loss."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.qkv(x).split(x.shape[-1], dim=-1)
        return (torch.sigmoid(a) * b + c).pow(2).mean()
