"""SDPA with a learned additive bias in the logits (T5's relative position bias, a learned ALiBi):
the gradients of q, k, v and of the bias itself, predicted against one measured step.

The bias concentrates the attention weights like any logit variance, but it is no part of ``q``:
``grad_k = scale * sum_i dS_ij q_i`` scales with ``q``'s own RMS (the rule used to fold the bias into
``q``'s scale and over-predicted ``grad_k`` by 2^1.6 at bias std 1 and 2^3.1 at std 3). A bias shared
by the batch sums the logits' gradients of every sequence (it was predicted for one sequence:
2^-1.5 at batch 8). The same holds for a constant bias (ALiBi), which the rule folds into an
effective logit variance: ``grad_k`` was over-predicted by 2^1.4 (slopes x1) and 2^2.3 (x4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unitscale_fx.track import track

D, H, S, B, V = 256, 4, 64, 8, 500


class BiasedAttention(nn.Module):
    """Embedding -> SDPA with a learned bias (one per head and position pair, or a relative-offset table
    gathered into one) -> output projection -> per-token logits."""

    def __init__(self, std: float, relative: bool, alibi: float = 0.0):
        super().__init__()
        self.relative, self.alibi = relative, alibi
        self.emb = nn.Embedding(V, D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        shape = (H, 2 * S - 1) if relative else (H, S, S)
        self.bias = nn.Parameter(torch.randn(*shape) * std)
        self.head = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.alibi:  # a constant bias (ALiBi's slopes times the distance): no parameter
            slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)]) * self.alibi
            dist = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).abs().float()
            mask = -(slopes[:, None, None] * dist)
        elif self.relative:
            offsets = torch.arange(t)[None, :] - torch.arange(t)[:, None] + S - 1
            mask = self.bias[:, offsets]
        else:
            mask = self.bias[:, :t, :t]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, D)
        return F.cross_entropy(self.head(self.o(y)).view(-1, V), ids.view(-1))


def _errors(model: nn.Module) -> dict[str, float]:
    torch.manual_seed(1)
    ids = torch.randint(0, V, (B, S))
    rep = track(model, (ids,), original=True, headroom=False)
    return {f"{n.module}:{n.name}": math.log2(n.bwd.measured / n.bwd.predicted)
            for n in rep.nodes
            if n.bwd is not None and n.bwd.predicted and n.bwd.measured and n.kind in ("activation", "parameter")}


CASES = [pytest.param(std, rel, id=f"{'relative-table' if rel else 'per-pair'}-std{std}")
         for rel in (False, True) for std in (0.3, 1.0, 3.0) if not (rel and std == 3.0)]
CASES.append(pytest.param(3.0, True, id="relative-table-std3.0", marks=pytest.mark.xfail(
    strict=True, reason="a relative-offset table at bias std 3 (one offset takes nearly all the weight): "
                        "the table's gradient is measured 2^0.59 the prediction (the gather's backward sums "
                        "the gradients of every pair at one offset as independent); q, k, v and the mask's "
                        "gradient are within 0.1")))


@pytest.mark.parametrize("std,relative", CASES)
def test_q_k_v_and_bias_gradients_are_predicted(std, relative):
    torch.manual_seed(0)
    errs = _errors(BiasedAttention(std, relative))
    for proj in ("q", "k", "v"):
        (e,) = [v for k, v in errs.items() if k.startswith(f"{proj}:linear")]
        assert abs(e) < 0.25, (proj, e, errs)
    (bias_grad,) = [v for k, v in errs.items() if k.endswith(":bias")]
    assert abs(bias_grad) < 0.25, (bias_grad, errs)
    worst = max(errs.items(), key=lambda kv: abs(kv[1]))
    assert abs(worst[1]) < 0.5, worst


@pytest.mark.parametrize("slopes", [1.0, 4.0])
def test_constant_bias_key_gradient_is_predicted(slopes):
    torch.manual_seed(0)
    errs = _errors(BiasedAttention(0.0, False, alibi=slopes))
    for proj in ("q", "k", "v"):
        (e,) = [v for k, v in errs.items() if k.startswith(f"{proj}:linear")]
        assert abs(e) < 0.2, (proj, e, errs)
