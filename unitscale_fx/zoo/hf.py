"""Hugging Face ``transformers`` architectures, built from small configs (never downloaded).

Each factory builds ``ModelClass(Config(...))`` with

* ``hidden_size = hidden``, ``layers`` layers, ``heads`` heads, intermediate size ``4 * hidden``,
  ``vocab_size = vocab`` and room for ``2 * seq`` positions (``2 * seq + 2`` for RoBERTa's
  offset positions);
* ``use_cache=False``; every dropout / attention implementation left at the library default;
* pad / bos / eos / decoder-start ids inside the vocabulary (0, 1, 2 unless the family needs
  otherwise); random input tokens avoid the first four ids (when ``vocab > 8``), so no padding
  logic is triggered;
* labels passed in the inputs, so the model computes its loss itself: causal LMs get
  ``labels = input_ids`` (shifted inside), masked LMs random targets at 15% of positions (-100
  elsewhere), encoder-decoders a random target sequence, classifiers random classes.

``transformers`` is imported lazily, inside the factories.
"""
from __future__ import annotations

from typing import Any

import torch

from . import _generator, _mlm_labels, _tokens, register

__all__ = ["causal_lm_inputs", "mlm_inputs"]

_REQ = ("transformers",)
_SPECIAL = 4  # ids 0..3 are reserved for pad/bos/eos/mask; random tokens are drawn from [4, vocab)


def _low(vocab: int) -> int:
    return _SPECIAL if vocab > 2 * _SPECIAL else 0


def _special_ids(vocab: int) -> dict[str, int]:
    """pad=0, bos=1, eos=2 (clamped into tiny vocabularies)."""
    top = vocab - 1
    return {"pad_token_id": min(0, top), "bos_token_id": min(1, top), "eos_token_id": min(2, top)}


def _max_pos(seq: int) -> int:
    return 2 * seq


def _kv_heads(heads: int, ratio: int = 2) -> int:
    """Grouped-query attention: the largest divisor of ``heads`` not above ``heads // ratio``."""
    want = max(1, heads // ratio)
    while heads % want:
        want -= 1
    return want


def causal_lm_inputs(seed: int, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = _tokens(_generator(seed), batch, seq, vocab, _low(vocab))
    return {"input_ids": ids, "labels": ids.clone()}


def mlm_inputs(seed: int, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = _generator(seed)
    ids = _tokens(gen, batch, seq, vocab, _low(vocab))
    return {"input_ids": ids, "labels": _mlm_labels(gen, ids, vocab, 0.15, _low(vocab))}


def _seq2seq_inputs(seed: int, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = _generator(seed)
    return {
        "input_ids": _tokens(gen, batch, seq, vocab, _low(vocab)),
        "labels": _tokens(gen, batch, seq, vocab, _low(vocab)),
    }


def _decoder_common(hidden: int, layers: int, heads: int, seq: int, vocab: int) -> dict[str, Any]:
    """Llama-style config keywords shared by most modern decoder-only families."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=_max_pos(seq),
        use_cache=False,
        **_special_ids(vocab),
    )


def _causal(model_cls_name: str, config_cls_name: str, config: dict, seed: int, batch: int, seq: int, vocab: int):
    import transformers

    cfg = getattr(transformers, config_cls_name)(**config)
    model = getattr(transformers, model_cls_name)(cfg)
    return model, causal_lm_inputs(seed, batch, seq, vocab)


# ---------------------------------------------------------------------------------------------
# decoder-only language models
# ---------------------------------------------------------------------------------------------


@register("gpt2", family="decoder", description="GPT2LMHeadModel (learned positions, Conv1D, tied head)", requires=_REQ)
def gpt2(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = dict(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=4 * hidden,
        n_positions=_max_pos(seq),
        use_cache=False,
        **_special_ids(vocab),
    )
    return _causal("GPT2LMHeadModel", "GPT2Config", cfg, seed, batch, seq, vocab)


@register("llama", family="decoder", description="LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, GQA kv=heads/2)", requires=_REQ)
def llama(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg["num_key_value_heads"] = _kv_heads(heads)
    return _causal("LlamaForCausalLM", "LlamaConfig", cfg, seed, batch, seq, vocab)


@register("mistral", family="decoder", description="MistralForCausalLM (Llama + sliding-window attention, GQA)", requires=_REQ)
def mistral(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=_kv_heads(heads), head_dim=hidden // heads)
    return _causal("MistralForCausalLM", "MistralConfig", cfg, seed, batch, seq, vocab)


@register("qwen2", family="decoder", description="Qwen2ForCausalLM (Llama + qkv bias, GQA)", requires=_REQ)
def qwen2(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg["num_key_value_heads"] = _kv_heads(heads)
    return _causal("Qwen2ForCausalLM", "Qwen2Config", cfg, seed, batch, seq, vocab)


@register("qwen3", family="decoder", description="Qwen3ForCausalLM (Llama + q/k RMSNorm, GQA)", requires=_REQ)
def qwen3(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=_kv_heads(heads), head_dim=hidden // heads)
    return _causal("Qwen3ForCausalLM", "Qwen3Config", cfg, seed, batch, seq, vocab)


@register("gemma", family="decoder", description="GemmaForCausalLM (scaled embedding, (1+w) RMSNorm, GeGLU, MQA)", requires=_REQ)
def gemma(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=1, head_dim=hidden // heads)
    return _causal("GemmaForCausalLM", "GemmaConfig", cfg, seed, batch, seq, vocab)


@register("phi3", family="decoder", description="Phi3ForCausalLM (fused qkv and gate_up projections)", requires=_REQ)
def phi3(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=heads, original_max_position_embeddings=_max_pos(seq))
    return _causal("Phi3ForCausalLM", "Phi3Config", cfg, seed, batch, seq, vocab)


@register("gpt_neox", family="decoder", description="GPTNeoXForCausalLM (parallel residual, partial RoPE)", requires=_REQ)
def gpt_neox(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    return _causal("GPTNeoXForCausalLM", "GPTNeoXConfig", cfg, seed, batch, seq, vocab)


@register("opt", family="decoder", description="OPTForCausalLM (learned offset positions, ReLU MLP)", requires=_REQ)
def opt(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=_max_pos(seq),
        use_cache=False,
        **_special_ids(vocab),
    )
    return _causal("OPTForCausalLM", "OPTConfig", cfg, seed, batch, seq, vocab)


@register("falcon", family="decoder", description="FalconForCausalLM (parallel attention+MLP, multi-query, RoPE)", requires=_REQ)
def falcon(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        max_position_embeddings=_max_pos(seq),
        use_cache=False,
        **_special_ids(vocab),
    )
    return _causal("FalconForCausalLM", "FalconConfig", cfg, seed, batch, seq, vocab)


@register("gemma2", family="decoder", description="Gemma2ForCausalLM (logit soft-capping, sandwich norms, local/global layers)", requires=_REQ)
def gemma2(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=_kv_heads(heads), head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads)
    return _causal("Gemma2ForCausalLM", "Gemma2Config", cfg, seed, batch, seq, vocab)


@register("gemma3", family="decoder", description="Gemma3ForCausalLM, text only (q/k norms, sandwich norms, local/global layers)", requires=_REQ)
def gemma3(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=_kv_heads(heads), head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads)
    return _causal("Gemma3ForCausalLM", "Gemma3TextConfig", cfg, seed, batch, seq, vocab)


@register("olmo2", family="decoder", description="Olmo2ForCausalLM (post-sublayer RMSNorm, q/k norms)", requires=_REQ)
def olmo2(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    return _causal("Olmo2ForCausalLM", "Olmo2Config", cfg, seed, batch, seq, vocab)


@register("starcoder2", family="decoder", description="Starcoder2ForCausalLM (LayerNorm with bias, GELU MLP, GQA)", requires=_REQ)
def starcoder2(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg["num_key_value_heads"] = _kv_heads(heads)
    return _causal("Starcoder2ForCausalLM", "Starcoder2Config", cfg, seed, batch, seq, vocab)


@register("bloom", family="decoder", description="BloomForCausalLM (ALiBi, embedding LayerNorm)", requires=_REQ)
def bloom(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = dict(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, use_cache=False, **_special_ids(vocab))
    return _causal("BloomForCausalLM", "BloomConfig", cfg, seed, batch, seq, vocab)


@register("mixtral", family="moe", description="MixtralForCausalLM (4 experts, top-2, GQA; experts as batched matmul)", requires=_REQ)
def mixtral(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(num_key_value_heads=_kv_heads(heads), head_dim=hidden // heads, num_local_experts=4, num_experts_per_tok=2)
    model, inputs = _causal("MixtralForCausalLM", "MixtralConfig", cfg, seed, batch, seq, vocab)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
    return model, inputs


@register("qwen3_moe", family="moe", description="Qwen3MoeForCausalLM (4 experts, top-2, normalised top-k; experts as batched matmul)", requires=_REQ)
def qwen3_moe(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _decoder_common(hidden, layers, heads, seq, vocab)
    cfg.update(
        num_key_value_heads=_kv_heads(heads),
        head_dim=hidden // heads,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=4 * hidden,
    )
    model, inputs = _causal("Qwen3MoeForCausalLM", "Qwen3MoeConfig", cfg, seed, batch, seq, vocab)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
    return model, inputs


# ---------------------------------------------------------------------------------------------
# encoders (masked LM)
# ---------------------------------------------------------------------------------------------


def _mlm(model_cls_name: str, config_cls_name: str, config: dict, seed: int, batch: int, seq: int, vocab: int):
    import transformers

    cfg = getattr(transformers, config_cls_name)(**config)
    model = getattr(transformers, model_cls_name)(cfg)
    return model, mlm_inputs(seed, batch, seq, vocab)


def _bert_like(hidden: int, layers: int, heads: int, vocab: int, max_pos: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_pos,
        use_cache=False,
        **_special_ids(vocab),
    )


@register("bert", family="encoder", description="BertForMaskedLM (post-LN encoder, 15% masked-LM labels)", requires=_REQ)
def bert(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _bert_like(hidden, layers, heads, vocab, _max_pos(seq))
    return _mlm("BertForMaskedLM", "BertConfig", cfg, seed, batch, seq, vocab)


@register("roberta", family="encoder", description="RobertaForMaskedLM (BERT with padding-offset positions)", requires=_REQ)
def roberta(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _bert_like(hidden, layers, heads, vocab, _max_pos(seq) + 2)
    cfg.update(pad_token_id=min(1, vocab - 1), bos_token_id=0, type_vocab_size=1)
    return _mlm("RobertaForMaskedLM", "RobertaConfig", cfg, seed, batch, seq, vocab)


@register("distilbert", family="encoder", description="DistilBertForMaskedLM (6-layer-style BERT, no token types)", requires=_REQ)
def distilbert(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = dict(
        vocab_size=vocab,
        dim=hidden,
        hidden_dim=4 * hidden,
        n_layers=layers,
        n_heads=heads,
        max_position_embeddings=_max_pos(seq),
        **_special_ids(vocab),
    )
    return _mlm("DistilBertForMaskedLM", "DistilBertConfig", cfg, seed, batch, seq, vocab)


@register("modernbert", family="encoder", description="ModernBertForMaskedLM (pre-LN, RoPE, GeGLU, local/global attention)", requires=_REQ)
def modernbert(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    top = vocab - 1
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=_max_pos(seq),
        pad_token_id=min(0, top),
        bos_token_id=min(1, top),
        cls_token_id=min(1, top),
        eos_token_id=min(2, top),
        sep_token_id=min(2, top),
    )
    return _mlm("ModernBertForMaskedLM", "ModernBertConfig", cfg, seed, batch, seq, vocab)


@register("deberta_v2", family="encoder", description="DebertaV2ForMaskedLM (disentangled relative attention)", requires=_REQ)
def deberta_v2(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    cfg = _bert_like(hidden, layers, heads, vocab, _max_pos(seq))
    cfg.pop("use_cache")
    cfg.update(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], type_vocab_size=0)
    return _mlm("DebertaV2ForMaskedLM", "DebertaV2Config", cfg, seed, batch, seq, vocab)


# ---------------------------------------------------------------------------------------------
# encoder-decoder, vision, speech
# ---------------------------------------------------------------------------------------------


@register("t5", family="encoder-decoder", description="T5ForConditionalGeneration (relative position bias, RMSNorm)", requires=_REQ)
def t5(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    import transformers

    cfg = transformers.T5Config(
        vocab_size=vocab,
        d_model=hidden,
        d_kv=hidden // heads,
        d_ff=4 * hidden,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        use_cache=False,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=min(1, vocab - 1),
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    return model, _seq2seq_inputs(seed, batch, seq, vocab)


@register("bart", family="encoder-decoder", description="BartForConditionalGeneration (post-LN, learned offset positions)", requires=_REQ)
def bart(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    import transformers

    ids = _special_ids(vocab)
    cfg = transformers.BartConfig(
        vocab_size=vocab,
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * hidden,
        decoder_ffn_dim=4 * hidden,
        max_position_embeddings=_max_pos(seq),
        decoder_start_token_id=ids["eos_token_id"],
        forced_eos_token_id=ids["eos_token_id"],
        use_cache=False,
        **ids,
    )
    model = transformers.BartForConditionalGeneration(cfg)
    return model, _seq2seq_inputs(seed, batch, seq, vocab)


@register("vit", family="vision", description="ViTForImageClassification (64x64 images, 8x8 patches, 10 classes)", requires=_REQ)
def vit(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    import transformers

    num_labels = 10
    cfg = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=64,
        patch_size=8,
        num_channels=3,
        num_labels=num_labels,
    )
    model = transformers.ViTForImageClassification(cfg)
    gen = _generator(seed)
    pixel_values = torch.randn(batch, 3, 64, 64, generator=gen, device="cpu")
    labels = torch.randint(0, num_labels, (batch,), generator=gen, device="cpu")
    return model, {"pixel_values": pixel_values, "labels": labels}


@register("whisper", family="speech", description="WhisperForConditionalGeneration (32 mel bins, 2*seq frames)", requires=_REQ)
def whisper(*, hidden=256, layers=4, heads=4, seq=128, batch=4, vocab=1024, seed=0, device="cpu"):
    import transformers

    num_mel_bins = 32
    ids = _special_ids(vocab)
    cfg = transformers.WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=num_mel_bins,
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * hidden,
        decoder_ffn_dim=4 * hidden,
        max_source_positions=seq,  # the conv stem halves 2*seq mel frames to seq positions
        max_target_positions=_max_pos(seq),
        decoder_start_token_id=ids["bos_token_id"],
        suppress_tokens=[],
        begin_suppress_tokens=[],
        use_cache=False,
        **ids,
    )
    model = transformers.WhisperForConditionalGeneration(cfg)
    gen = _generator(seed)
    features = torch.randn(batch, num_mel_bins, 2 * seq, generator=gen, device="cpu")
    labels = _tokens(gen, batch, seq, vocab, _low(vocab))
    return model, {"input_features": features, "labels": labels}
