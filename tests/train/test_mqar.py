"""MQAR measures recall (Zoology's definition): a strategy that does not recall scores at chance.

The former layout showed each answer right after its query and asked every key once, so a model could
answer by elimination (a value of the prefix not yet shown as an answer) without recall:
(1 + 1/2 + ... + 1/K) / K = 34% at K = 8. Here the answers are hidden.
"""

from __future__ import annotations

import torch
from longshard.models import IGNORE_INDEX
from longshard.train.data import MQARDataset
from longshard.train.data.synthetic import mqar_distances


def _eliminate(tokens: torch.Tensor, labels: torch.Tensor, k: int, g: torch.Generator) -> tuple[int, int]:
    """The best no-recall strategy: guess uniformly among the prefix's values not yet seen after it."""
    values = tokens[1 : 2 * k : 2].tolist()
    right = asked = 0
    for p in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        seen = set(tokens[2 * k : p + 1].tolist())
        pool = [v for v in values if v not in seen] or values
        guess = pool[int(torch.randint(len(pool), (1,), generator=g))]
        right += guess == int(labels[p])
        asked += 1
    return right, asked


def _shown_answers(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The former layout: each answer written into the input right after its query."""
    shown = tokens.clone()
    q = (labels != IGNORE_INDEX).nonzero().flatten()
    shown[q + 1] = labels[q]
    return shown


def test_a_no_recall_guesser_scores_at_chance_not_at_the_elimination_rate():
    k, n = 8, 400
    ds = MQARDataset(256, 512, k, n, seed=1)
    g = torch.Generator().manual_seed(0)
    hidden = shown = asked = 0
    for i in range(n):
        s = ds[i]
        r, a = _eliminate(s.tokens, s.labels, k, g)
        hidden, asked = hidden + r, asked + a
        shown += _eliminate(_shown_answers(s.tokens, s.labels), s.labels, k, g)[0]
    chance, elimination = 1 / k, sum(1 / j for j in range(1, k + 1)) / k  # 0.125, 0.340
    # 3200 queries: the standard error of a rate near 0.125 is 0.006, so 0.03 is five of them
    assert abs(hidden / asked - chance) < 0.03, hidden / asked
    assert abs(shown / asked - elimination) < 0.03, shown / asked  # the layout this replaced leaked


def test_query_gaps_follow_a_power_law():
    """Zoology's power law (a = 0.01): most queries sit near the prefix, with a long tail."""
    k, seq = 8, 512
    ds = MQARDataset(seq, 1024, k, 300, seed=2)
    d = torch.cat([mqar_distances(ds[i].tokens, ds[i].labels, k) for i in range(300)]).float()
    slot = torch.cat([((ds[i].labels != IGNORE_INDEX).nonzero().flatten() - 2 * k) // 2 for i in range(300)]).float()
    assert bool((d > 0).all())
    slots = (seq - 2 * k) // 2
    # slot s (0-based) has weight ~ (s+1)^-0.99: P(s < slots/8) ~ H(31)/H(248) = 0.66 for 248 slots (uniform: 0.125);
    # queries are drawn without replacement, which flattens it a little
    near = (slot < slots / 8).float().mean()
    assert 0.5 < near < 0.78, near
    assert float(d.max()) > seq / 2  # the tail reaches far


def test_curriculum_packs_short_documents_first_with_the_same_query_density():
    """A sequence-length warmup: phase i of equal share packs seq_len / L_i independent documents, each a
    whole MQAR instance (its own keys, K * L / S pairs, its queries after its own pairs)."""
    S, k, total = 64, 8, 30
    ds = MQARDataset(S, 320, k, 100, seed=3, curriculum=[16, 32, 64], curriculum_samples=total)
    assert [ds.doc_len(i) for i in (0, 9, 10, 19, 20, 29, 99)] == [16, 16, 32, 32, 64, 64, 64]
    for i, L in ((0, 16), (15, 32), (25, 64)):
        s = ds[i]
        assert s.tokens.shape == s.labels.shape == s.doc_ids.shape == (S,)
        assert s.doc_ids.tolist() == [d for d in range(S // L) for _ in range(L)]
        for d in range(S // L):
            tok, lab = s.tokens[d * L:(d + 1) * L], s.labels[d * L:(d + 1) * L]
            pairs = k * L // S
            asked = (lab != IGNORE_INDEX).nonzero().flatten()
            assert len(asked) == pairs and bool((asked >= 2 * pairs).all())  # queries follow the pairs
            keys, values = tok[0:2 * pairs:2], tok[1:2 * pairs:2]
            for p in asked.tolist():  # each query asks a key of this document and wants its value
                j = keys.tolist().index(int(tok[p]))
                assert int(lab[p]) == int(values[j])
    assert torch.equal(ds[7].tokens, ds[7].tokens) and not torch.equal(ds[7].tokens, ds[8].tokens)
    plain = MQARDataset(S, 320, k, 10, seed=3)[0]
    assert plain.doc_ids is None and int((plain.labels != IGNORE_INDEX).sum()) == k


def test_curriculum_settings_are_checked_by_name():
    import pytest
    from longshard.errors import ConfigError
    from longshard.train.config import load_config

    base = ["data.source=mqar", "data.mqar_num_kv_pairs=16", "train.seq_len=256", "model.max_seq_len=256"]
    for extra, message in (
        (["data.mqar_curriculum=[64,256]", "data.source=default"], "applies to data.source=mqar"),
        (["data.mqar_curriculum=[64,128]"], "must ascend and end with train.seq_len=256"),
        (["data.mqar_curriculum=[128,64,256]"], "must ascend"),
        (["data.mqar_curriculum=[96,256]"], "96: each length must divide train.seq_len=256"),
        (["data.mqar_curriculum=[2,256]"], "2: each length must divide train.seq_len=256 and hold its 1 pair(s) (>= 4"),
        (["data.mqar_curriculum=[64,256]", "data.doc_mask=false"], "needs data.doc_mask=true"),
        (["data.mqar_curriculum=[64,256]", "data.synthetic_samples=100"], "data.synthetic_samples: 100 samples"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config("quickstart", base + extra)
        assert message in str(e.value), str(e.value)
    cfg = load_config("quickstart", base + ["data.mqar_curriculum=[64,128,256]"])
    assert cfg.data.mqar_curriculum == [64, 128, 256]
