"""Synthetic long-context tasks: passkey retrieval and multi-query associative recall (MQAR)."""

from __future__ import annotations

import torch
from longshard.models.model import IGNORE_INDEX
from longshard.train.data.tokenizer import Tokenizer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_sample(
    tokenizer: Tokenizer, length: int, depth: float, generator: torch.Generator, digits: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """One passkey-retrieval prompt of exactly ``length`` tokens, ending with the answer.

    The key sentence is placed at relative ``depth`` (0 = start, 1 = end) of the filler; labels
    are ``IGNORE_INDEX`` except for the answer tokens, so teacher-forced argmax accuracy on the
    labels equals greedy-decoding exact match.

    Args:
        tokenizer: tokenizer used to encode the pieces.
        length: total tokens.
        depth: relative position of the key in the haystack, in [0, 1].
        generator: RNG for the key.
        digits: number of digits of the key.

    Returns:
        ``(tokens (length,), labels (length,))`` where labels[t] is the target for position t.
    """
    key = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
    key = str(int(key[0]) % 9 + 1) + key[1:]  # no leading zero
    enc = tokenizer.encode
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc(" What is the pass key? The pass key is ")
    answer = enc(key)
    filler_unit = enc(FILLER)
    n_fill = length - 1 - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"passkey length {length} is too short for the prompt ({length - n_fill} tokens needed)")
    fill = (filler_unit * (n_fill // max(len(filler_unit), 1) + 1))[:n_fill]
    cut = int(round(depth * n_fill))
    ids = [tokenizer.bos_id, *fill[:cut], *needle, *fill[cut:], *question, *answer]
    tokens = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    a0 = length - len(answer)
    labels[a0 - 1 : length - 1] = tokens[a0:length]
    return tokens, labels


def mqar_sample(
    seq_len: int, vocab_size: int, num_kv_pairs: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One multi-query associative recall sequence (Zoology).

    Key/value pairs ``k1 v1 k2 v2 ...`` open the sequence; the rest holds queries ``k_i v_i`` of
    previously seen keys at random slots among filler tokens (id 0). Labels ask for ``v_i`` after
    each queried ``k_i`` and are ``IGNORE_INDEX`` elsewhere.

    Args:
        seq_len: tokens per sequence.
        vocab_size: ids used: 0 filler, keys in [1, V/2), values in [V/2, V).
        num_kv_pairs: pairs to memorise (<= keys available and 4*pairs <= seq_len).
        generator: RNG.
    """
    half = vocab_size // 2
    if num_kv_pairs > half - 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR: {num_kv_pairs} pairs do not fit vocab {vocab_size} / seq_len {seq_len}")
    keys = torch.randperm(half - 1, generator=generator)[:num_kv_pairs] + 1
    values = torch.randint(half, vocab_size, (num_kv_pairs,), generator=generator)
    tokens = torch.zeros(seq_len, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    tokens[0 : 2 * num_kv_pairs : 2] = keys
    tokens[1 : 2 * num_kv_pairs : 2] = values
    n_slots = (seq_len - 2 * num_kv_pairs) // 2
    slots = torch.randperm(n_slots, generator=generator)[:num_kv_pairs].sort().values
    order = torch.randperm(num_kv_pairs, generator=generator)
    pos = 2 * num_kv_pairs + 2 * slots
    tokens[pos] = keys[order]
    tokens[pos + 1] = values[order]
    labels[pos] = values[order]
    return tokens, labels
