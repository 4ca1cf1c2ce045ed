"""Tiny transformers causal LMs for the tests of longshard inside transformers (every weight random)."""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_hf(arch: str, heads: tuple[int, int] = (4, 2), attention: dict | list | None = None, vocab: int = 97,
            **extra):
    """A 2-layer transformers ``arch`` causal LM (head_dim 16) with every weight drawn at random (HF zero-inits
    biases: each one must matter) and ``longshard_attention`` set to ``attention`` when given."""
    import transformers

    h, kv = heads
    common = dict(vocab_size=vocab, hidden_size=16 * h, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=h, num_key_value_heads=kv, max_position_embeddings=256, rms_norm_eps=1e-6,
                  head_dim=16)
    common.update(extra)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    if arch == "mistral":
        common.setdefault("sliding_window", None)
    cfg = cls[0](**common)
    if attention is not None:
        cfg.longshard_attention = attention
    torch.manual_seed(0)
    model = cls[1](cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == 16 else 0.0))
    return model
