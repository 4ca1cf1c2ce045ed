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


MQAR_POWER_A = 0.01  # Zoology's default: query gaps p(g) ~ g^(a-1), most queries near their key


def mqar_sample(
    seq_len: int, vocab_size: int, num_kv_pairs: int, generator: torch.Generator, power_a: float = MQAR_POWER_A,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One multi-query associative recall sequence as Zoology defines it (Arora et al., 2023;
    ``zoology/data/multiquery_ar.py``).

    ``K`` key/value pairs ``k1 v1 ... kK vK`` open the sequence: keys drawn without replacement from
    ``[1, V/2)``, values without replacement from ``[V/2, V)``. The rest is ``(S - 2K) / 2`` slots of two
    tokens; each key is queried once, in the first token of a slot drawn without replacement with
    probability ~ slot^(a-1) (a power law: most queries near the start, a long tail far away). The
    answer is never shown: the label of a query position is its value, and the token after it, like
    every other free position, is random filler, so no answer can be inferred from earlier answers
    (a model that does not recall scores 1/K, not the elimination rate of a shown-answer layout).
    The filler excludes this sequence's keys (Zoology's filler may repeat a key; here every query has
    one answer).

    Args:
        seq_len: tokens per sequence.
        vocab_size: ids used: keys in [1, V/2), values in [V/2, V), filler anywhere but the keys.
        num_kv_pairs: pairs to memorise (K <= V/2 - 1, K <= V - V/2 and 4K <= seq_len).
        generator: RNG.
        power_a: the power law's exponent parameter (1.0 = uniform slots).
    """
    half = vocab_size // 2
    slots = (seq_len - 2 * num_kv_pairs) // 2
    if num_kv_pairs > half - 1 or num_kv_pairs > vocab_size - half or num_kv_pairs > slots:
        raise ValueError(f"MQAR: {num_kv_pairs} pairs do not fit vocab {vocab_size} / seq_len {seq_len}")
    keys = torch.randperm(half - 1, generator=generator)[:num_kv_pairs] + 1
    values = torch.randperm(vocab_size - half, generator=generator)[:num_kv_pairs] + half
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights / weights.sum(), num_kv_pairs, replacement=False, generator=generator)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[keys] = False
    fill_ids = allowed.nonzero().flatten()
    tokens = fill_ids[torch.randint(len(fill_ids), (seq_len,), generator=generator)]
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    tokens[0 : 2 * num_kv_pairs : 2] = keys
    tokens[1 : 2 * num_kv_pairs : 2] = values
    pos = 2 * num_kv_pairs + 2 * gaps
    tokens[pos] = keys  # key i queried in slot gaps[i]; the answer position keeps its filler
    labels[pos] = values
    return tokens, labels


def mqar_pairs_for(num_kv_pairs: int, doc_len: int, seq_len: int) -> int:
    """Pairs of a ``doc_len``-token MQAR document with the query density of ``num_kv_pairs`` per ``seq_len``."""
    return max(1, num_kv_pairs * doc_len // seq_len)


def mqar_distances(tokens: torch.Tensor, labels: torch.Tensor, num_kv_pairs: int) -> torch.Tensor:
    """Distance from each query (labelled position, in order) back to its key's pair in the prefix."""
    pos = (labels != IGNORE_INDEX).nonzero().flatten()
    prefix = tokens[0 : 2 * num_kv_pairs : 2]
    index = (prefix[None, :] == tokens[pos][:, None]).int().argmax(1)
    return pos - 2 * index
