"""Evaluation metrics against models whose answers are known: MQAR, passkey grid, perplexity by length."""

from __future__ import annotations

import math

import pytest
import torch
from longshard.errors import ConfigError
from longshard.models.model import loss_from_logits
from longshard.train.data import ByteTokenizer
from longshard.train.data.loader import Sample
from longshard.train.evaluate import mqar_accuracy, passkey_grid, perplexity_by_length, plot_results
from torch import nn

V = 64


class LogitsModel(nn.Module):
    """Stand-in models define ``logits``; the evaluation calls the loss head (``labels_BS``)."""

    def forward(self, tokens_BS, doc_ids_BS=None, position_ids_BS=None, labels_BS=None, want_correct=False):
        logits = self.logits(tokens_BS, doc_ids_BS, position_ids_BS)
        return logits if labels_BS is None else loss_from_logits(logits, labels_BS, want_correct)


class MQAROracle(LogitsModel):
    """Answers every MQAR query from the key/value prefix; ``wrong_every`` > 0 spoils every n-th query."""

    def __init__(self, pairs: int, wrong_every: int = 0) -> None:
        super().__init__()
        self.pairs, self.wrong_every = pairs, wrong_every
        self.cfg = type("Cfg", (), {"vocab_size": V})()

    def logits(self, tokens_BS, doc_ids_BS=None, position_ids_BS=None):
        B, S = tokens_BS.shape
        logits = torch.zeros(B, S, V)
        for b in range(B):
            table = {int(tokens_BS[b, 2 * i]): int(tokens_BS[b, 2 * i + 1]) for i in range(self.pairs)}
            n = 0
            for t in range(2 * self.pairs, S):
                k = int(tokens_BS[b, t])
                if k in table and t % 2 == 0:  # queries sit at even positions after the prefix
                    n += 1
                    spoil = self.wrong_every and n % self.wrong_every == 0
                    logits[b, t, (table[k] + 1) % V if spoil else table[k]] = 1.0
        return logits


def test_mqar_accuracy_counts_queries():
    dev = torch.device("cpu")
    right = mqar_accuracy(MQAROracle(4), 64, V, 4, 3, dev, None)
    assert right["mqar_acc"] == 1.0 and all(v == 1.0 for k, v in right.items())
    half = mqar_accuracy(MQAROracle(4, wrong_every=2), 64, V, 4, 3, dev, None)
    assert half["mqar_acc"] == 0.5  # 4 queries a row, every second one wrong
    assert set(half) - {"mqar_acc"} <= {"mqar_acc@16", "mqar_acc@32", "mqar_acc@64"} and len(half) > 1


class Copier(LogitsModel):
    """Predicts, at every position, the token that follows the previous occurrence of the current token's
    suffix 'key is ' -> reads the passkey from the needle (a perfect retriever on these prompts)."""

    def __init__(self, tok: ByteTokenizer, broken: bool = False) -> None:
        super().__init__()
        self.tok, self.broken = tok, broken

    def logits(self, tokens_BS, doc_ids_BS=None, position_ids_BS=None):
        B, S = tokens_BS.shape
        logits = torch.zeros(B, S, 260)
        text = self.tok.decode([int(t) for t in tokens_BS[0]])
        key = text.split("The pass key is ")[1][:5]
        answer = self.tok.encode(key)
        start = S - len(answer)  # the prompt ends with the answer
        for j, a in enumerate(answer):
            logits[0, start - 1 + j, (a + 1 if self.broken else a)] = 1.0
        return logits


def test_passkey_grid_shape_and_values():
    tok = ByteTokenizer()
    dev = torch.device("cpu")
    grid = passkey_grid(Copier(tok), tok, [200, 300], [0.0, 0.5, 1.0], 2, dev, None)
    assert set(grid) == {"200", "300"} and all(set(r) == {"0", "0.5", "1"} for r in grid.values())
    assert all(v == 1.0 for r in grid.values() for v in r.values())
    bad = passkey_grid(Copier(tok, broken=True), tok, [200], [0.5], 2, dev, None)
    assert bad == {"200": {"0.5": 0.0}}


class Uniform(LogitsModel):
    def logits(self, tokens_BS, doc_ids_BS=None, position_ids_BS=None):
        return torch.zeros(*tokens_BS.shape, V)


def test_perplexity_by_length_of_a_uniform_model_is_the_vocab():
    windows = lambda n: [Sample(torch.randint(0, V, (n,)), torch.randint(0, V, (n,))) for _ in range(3)]
    ppl = perplexity_by_length(Uniform(), windows, [8, 32], 3, torch.device("cpu"), None)
    assert set(ppl) == {"8", "32"} and all(math.isclose(v, V, rel_tol=1e-5) for v in ppl.values())


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"passkey_grid": {"256": {"0": 1.0, "1": 0.5}, "512": {"0": 0.0, "1": 0.25}}, "ppl@64": 9.0, "ppl@128": 7.5}
    path = plot_results(res, str(tmp_path / "eval.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_config_errors():
    from longshard.train.config import load_config

    with pytest.raises(ConfigError, match="eval.passkey_depths"):
        load_config("tiny_lm", ["eval.passkey_depths=[1.5]"])
    with pytest.raises(ConfigError, match="eval.ppl_lengths"):
        load_config("tiny_lm", ["eval.ppl_lengths=[7]"])
    with pytest.raises(ConfigError, match="eval.ppl_lengths.*max_seq_len"):
        load_config("tiny_lm", ["eval.ppl_lengths=[1048576]"])
    with pytest.raises(ConfigError, match="eval.mqar_num_kv_pairs"):
        load_config("tiny_lm", ["eval.mqar_samples=2", "eval.mqar_num_kv_pairs=1000"])
