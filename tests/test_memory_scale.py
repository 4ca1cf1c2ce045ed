"""Memory that grows linearly in S: bytes each core attention saves for backward, per token, at S and 2S."""

from __future__ import annotations

import pytest
import torch
from longshard.models import ModelConfig, Transformer
from longshard.train.memory import saved_attention_bytes

PATHS = {
    "dense": [{"name": "dense"}],
    "dense_packed": [{"name": "dense"}],  # with 256-token documents
    "s2": [{"name": "s2", "options": {"block": 32, "local_blocks": 2, "vert_stride": 4,
                                      "allow_incomplete_coverage": True}}],
    "sliding_window": [{"name": "sliding_window", "options": {"block": 32, "window": 64}}],
    "linear": [{"name": "linear", "options": {"chunk": 32}}],
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_attention_saved_bytes_per_token_flat(path, dtype):
    per_token = []
    for S in (512, 1024):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                        max_seq_len=S, attention=PATHS[path]))
        tokens = torch.randint(0, 64, (1, S))
        doc = torch.arange(S)[None] // 256 if path == "dense_packed" else None
        per_token.append(saved_attention_bytes(model, tokens, doc, dtype) / S)
    assert per_token[0] > 0
    assert per_token[1] <= 1.05 * per_token[0], per_token  # O(S) in total, not O(S^2)
