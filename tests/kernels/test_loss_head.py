"""The chunked loss head: equal to the plain head (loss and every gradient), never holds all logits."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.models import IGNORE_INDEX, ModelConfig, Transformer
from longshard.models.model import cross_entropy_sum

# fp32: the chunked head runs the same per-token ops; only the order of the sum over chunks (loss, dW)
# changes -> ~1e-7 relative.
TOL_FP32 = 1e-6
# bf16 autocast: chunked and plain round the same bf16 logits; the fp32 sums differ in order only, but
# gradients pass through bf16 matmuls whose blocking depends on the chunk shape -> a few bf16 eps.
TOL_BF16 = 2e-2


def _model(tie: bool, vocab: int = 97) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                   tie_embeddings=tie))


def _batch(S: int = 33, vocab: int = 97):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, S), generator=g)
    labels = torch.randint(0, vocab, (2, S), generator=g)
    labels[0, :5] = IGNORE_INDEX  # ignored labels inside and across chunk boundaries
    labels[1, 10:20] = IGNORE_INDEX
    return tokens, labels


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_chunked_head_equals_plain(tie, chunk, dtype):
    model = _model(tie)
    tokens, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        plain_loss, plain = _grads(model, lambda: cross_entropy_sum(model(tokens), labels)[0])
        model.set_loss_chunking(chunk)
        out = model(tokens, labels_BS=labels)
        assert out.n_tokens == (labels != IGNORE_INDEX).sum()
        loss, grads = _grads(model, lambda: model(tokens, labels_BS=labels).loss_sum)
    tol = TOL_FP32 if dtype is None else TOL_BF16
    assert loss.dtype == torch.float32
    assert_rel("loss", plain_loss, loss, tol)
    for n, g in plain.items():
        assert_rel(f"grad {n}", g, grads[n], tol)


def test_correct_matches_argmax_and_eval_loss():
    model = _model(False).eval()
    tokens, labels = _batch()
    model.set_loss_chunking(5)
    with torch.no_grad():
        logits = model(tokens)
        out = model(tokens, labels_BS=labels, want_correct=True)
    want = (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)
    assert torch.equal(out.correct_BS, want)
    assert_rel("eval loss", cross_entropy_sum(logits, labels)[0], out.loss_sum, TOL_FP32)


def _saved_bytes(model, tokens, labels) -> int:
    """Bytes autograd saves for backward in the loss head (everything after the final norm), each saved
    tensor counted once per distinct (storage, offset, shape): the weight every chunk saves is one tensor."""
    h = torch.randn(*tokens.shape, model.cfg.dim, requires_grad=True)
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    from longshard.models.model import chunked_lm_loss

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_lm_loss(h, model.output.weight, labels, model.loss_chunk_tokens)
    return sum(seen.values())


def test_head_memory_does_not_hold_logits():
    """Saved-for-backward bytes per token stay at the hidden state's size (no logits), at S and 2S."""
    vocab = 4096
    model = _model(False, vocab)
    model.set_loss_chunking(16)
    per_token = []
    for S in (256, 512):
        tokens, labels = _batch(S, vocab)
        per_token.append(_saved_bytes(model, tokens, labels) / tokens.numel())
    # checkpointed chunks save their h slice and labels (dim x 4 + 8 bytes per token) and the shared weight
    # (amortised over S); the plain head's fp32 logits alone would be vocab x 4 = 16 KB per token
    assert per_token[1] <= per_token[0] * 1.05, per_token
    assert per_token[1] < 0.05 * vocab * 4, per_token
    model.set_loss_chunking(None)
    tokens, labels = _batch(256, vocab)
    assert _saved_bytes(model, tokens, labels) / tokens.numel() >= vocab * 4  # the plain head holds the logits
