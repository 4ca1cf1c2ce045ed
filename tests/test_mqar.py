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
