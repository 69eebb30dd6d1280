"""A causal language model built from PyTorch's own ``nn.TransformerEncoder``.

Token embedding + learned positions -> ``nn.TransformerEncoder`` (``batch_first=True``,
``norm_first=True`` i.e. pre-LayerNorm, GELU feed-forward of width 4x, causal mask from
``nn.Transformer.generate_square_subsequent_mask``) -> final LayerNorm -> LM head.
``forward(input_ids, labels=None)`` returns ``{"logits": ..., "loss": ...}`` with the next-token
cross-entropy (labels are shifted inside, as in Hugging Face causal LMs; -100 is ignored).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _generator, _tokens, register

__all__ = ["EncoderLM", "build"]


class EncoderLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, max_seq: int, dropout: float = 0.1):
        super().__init__()
        self.max_seq = max_seq
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(max_seq, hidden)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=hidden,
            nhead=heads,
            dim_feedforward=4 * hidden,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters for padded inference; it warns with norm_first=True
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        # GPT-style small init of the embeddings and the head, so the initial loss is ~ln(vocab)
        for w in (self.tok_emb.weight, self.pos_emb.weight, self.head.weight):
            nn.init.normal_(w, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        seq = input_ids.size(1)
        pos = torch.arange(seq, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=input_ids.device, dtype=x.dtype)
        x = self.encoder(x, mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1)
            out["loss"] = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return out


@register(
    "transformer_encoder_lm",
    family="decoder",
    description="nn.TransformerEncoder (pre-LN, GELU, causal mask) as a causal LM",
)
def build(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    model = EncoderLM(vocab=vocab, hidden=hidden, layers=layers, heads=heads, max_seq=seq, dropout=0.0)
    ids = _tokens(_generator(seed), batch, seq, vocab)
    return model, {"input_ids": ids, "labels": ids.clone()}
