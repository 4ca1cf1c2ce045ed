"""Data: tokenizers, prepared memmaps, deterministic resumable loading, synthetic tasks."""

from __future__ import annotations

import json

import pytest
import torch
from longshard.errors import ConfigError
from longshard.models import IGNORE_INDEX
from longshard.train.data import (
    ByteTokenizer,
    DistributedLoader,
    MQARDataset,
    PasskeyDataset,
    TokenWindows,
    prepare,
    prepare_default,
    read_meta,
)
from longshard.train.data.prepare import iter_documents


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.vocab_size == 259


def test_prepare_and_windows(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third!"}) + "\n")
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert docs == ["first document", "second", "third!"]
    meta = prepare(tmp_path / "data", docs, ByteTokenizer(), val_fraction=0.0)
    assert meta["splits"]["train"]["n_tokens"] == sum(len(d) + 2 for d in docs)
    ds = TokenWindows(tmp_path / "data", "train", seq_len=8)
    s = ds[0]
    assert s.tokens[0] == 256 and torch.equal(s.labels[:-1], s.tokens[1:])
    flat = torch.cat([ds[i].tokens for i in range(len(ds))])
    starts = (flat == 256).nonzero().flatten().tolist()
    assert len(ds) == (32 - 1) // 8 and starts == [0, 16]  # BOS + 14 bytes + EOS, then BOS + 6 + EOS
    # document ids step up exactly at BOS tokens
    assert ds[2].doc_ids.tolist() == [1, 1, 1, 1, 1, 1, 1, 1]  # window 16..23 is the second document


def test_truncated_and_missing_data_errors(tmp_path):
    with pytest.raises(ConfigError, match="meta.json does not exist"):
        read_meta(tmp_path)
    prepare(tmp_path / "d", ["abc" * 10], ByteTokenizer(), val_fraction=0.0)
    with open(tmp_path / "d" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError, match="truncated"):
        read_meta(tmp_path / "d")
    with pytest.raises(ConfigError, match="no documents"):
        prepare(tmp_path / "e", [], ByteTokenizer())


def test_default_corpus_is_deterministic(tmp_path):
    a = prepare_default(tmp_path / "a", 50_000)
    b = prepare_default(tmp_path / "b", 50_000)
    assert a["splits"] == b["splits"] and a["splits"]["val"]["n_docs"] >= 1
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


class _Ids:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from longshard.train.data import Sample

        t = torch.full((4,), i)
        return Sample(t, t)


def _global_batches(dp, accum, steps, n=100):
    loaders = [DistributedLoader(_Ids(n), micro_batch_size=2, grad_accum=accum, dp_rank=r, dp_size=dp, seed=3)
               for r in range(dp)]
    out = []
    for _ in range(steps):
        ids = [int(x) for ld in loaders for b in ld.next_step() for x in b["tokens"][:, 0]]
        out.append(sorted(ids))
    return out


def test_loader_same_global_batches_for_any_layout():
    ref = _global_batches(1, 4, 30)  # crosses epochs (100 samples / 8 per step)
    assert _global_batches(2, 2, 30) == ref
    assert _global_batches(4, 1, 30) == ref
    assert len(set(ref[0])) == 8


def test_loader_resume():
    a = DistributedLoader(_Ids(50), micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1, seed=1)
    first = [a.next_step() for _ in range(30)]
    b = DistributedLoader(_Ids(50), micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1, seed=1)
    for _ in range(17):
        b.next_step()
    c = DistributedLoader(_Ids(50), micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1, seed=1)
    c.load_state_dict(b.state_dict())
    for i in range(17, 30):
        assert torch.equal(c.next_step()[0]["tokens"], first[i][0]["tokens"])
    bad = DistributedLoader(_Ids(50), micro_batch_size=4, grad_accum=1, dp_rank=0, dp_size=1, seed=1)
    with pytest.raises(ConfigError, match="global batch"):
        bad.load_state_dict(b.state_dict())


def test_passkey_sample():
    tok = ByteTokenizer()
    ds = PasskeyDataset(tok, 300, 4, seed=0)
    s = ds[0]
    assert s.tokens.shape == (300,)
    sel = s.labels != IGNORE_INDEX
    answer = tok.decode(s.labels[sel].tolist())
    assert len(answer) == 5 and answer.isdigit()
    text = tok.decode(s.tokens.tolist())
    assert f"The pass key is {answer}" in text and text.endswith(answer)
    assert ds[0].tokens.equal(PasskeyDataset(tok, 300, 4, seed=0)[0].tokens)


def test_mqar_sample():
    """Zoology's layout: distinct keys and values, each key queried once at an even position after the
    prefix, the label its value, the answer never shown after the query, the filler free of keys."""
    ds = MQARDataset(64, 100, 6, 10, seed=0)
    for i in range(10):
        s = ds[i]
        keys, values = s.tokens[0:12:2], s.tokens[1:12:2]
        assert len(set(keys.tolist())) == 6 and len(set(values.tolist())) == 6
        assert bool((keys >= 1).all() and (keys < 50).all() and (values >= 50).all() and (values < 100).all())
        kv = dict(zip(keys.tolist(), values.tolist()))
        q = (s.labels != IGNORE_INDEX).nonzero().flatten()
        assert len(q) == 6 and bool((q >= 12).all()) and bool((q % 2 == 0).all())
        assert sorted(int(s.tokens[p]) for p in q) == sorted(kv)
        for p in q.tolist():
            assert kv[int(s.tokens[p])] == int(s.labels[p])
        rest = torch.ones(64, dtype=torch.bool)
        rest[:12] = False
        rest[q] = False
        assert not any(int(t) in kv for t in s.tokens[rest])  # the filler never repeats a key


def test_hf_tokenizer_from_local_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from longshard.train.data import HFTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the pass key is 12345", "hello world"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    assert (hf.bos_id, hf.eos_id) == (1, 2)
    meta = prepare(tmp_path / "d", ["hello world", "the pass key"], hf, val_fraction=0.0)
    assert meta["vocab_size"] == hf.vocab_size and meta["tokenizer"].endswith("tokenizer.json")
    ds = TokenWindows(tmp_path / "d", "train", 4)
    assert int(ds[0].tokens[0]) == 1
    with pytest.raises(ConfigError, match="does not exist"):
        HFTokenizer(tmp_path / "nope.json")


def test_prepare_refuses_outputs_that_would_destroy_inputs(tmp_path):
    """--output equal to an input, its parent, inside an input folder, or an unrelated non-empty
    folder: refused before any work, inputs intact. A bad jsonl line is named with file:line and leaves
    no temporary folder behind. A previous prepare output is replaced."""
    from longshard.errors import ConfigError
    from longshard.train.data import build_tokenizer, prepare
    from longshard.train.data.prepare import iter_documents

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello world")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    tok = build_tokenizer(None)
    for out, why in ((texts, "is or contains the input"), (tmp_path, "is or contains the input"),
                     (texts / "sub", "lies inside the input folder"), (other, "is not a prepared data folder")):
        with pytest.raises(ConfigError, match=why):
            prepare(out, iter_documents([texts]), tok, inputs=[texts])
    assert (texts / "a.txt").read_text() == "hello world" and (other / "notes.txt").read_text() == "mine"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2 is not valid JSON"):
        prepare(tmp_path / "out", iter_documents([bad]), tok, inputs=[bad])
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # no output, no .tmpPID left

    first = prepare(tmp_path / "out", iter_documents([texts]), tok, inputs=[texts])
    (texts / "b.txt").write_text("a second document, longer than the first one")
    second = prepare(tmp_path / "out", iter_documents([texts]), tok, inputs=[texts])
    assert second["splits"]["train"]["n_tokens"] + second["splits"]["val"]["n_tokens"] > \
        first["splits"]["train"]["n_tokens"] + first["splits"]["val"]["n_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "other", "out", "texts"]


def test_damaged_prepared_data_is_named(tmp_path):
    """Invalid meta.json, and a token id beyond the vocabulary inside train.bin: a ConfigError naming
    the file (and the token's position), never a JSON traceback or an IndexError inside the embedding."""
    import numpy as np
    from longshard.train.data import prepare_default
    from longshard.train.data.loader import TokenWindows
    from longshard.train.data.prepare import read_meta

    data = tmp_path / "d"
    prepare_default(data, 50_000)
    meta = (data / "meta.json").read_text()
    (data / "meta.json").write_text(meta[: len(meta) // 2])
    with pytest.raises(ConfigError, match=r"meta\.json is not a valid `data prepare` metadata file"):
        read_meta(data)
    (data / "meta.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(ConfigError, match="dtype is None, not an integer token type"):
        read_meta(data)
    (data / "meta.json").write_text(meta)
    windows = TokenWindows(data, "train", 64)
    tokens = np.memmap(data / "train.bin", dtype=windows.meta["dtype"], mode="r+")
    tokens[64 * 3 + 5] = windows.vocab_size + 7
    tokens.flush()
    windows = TokenWindows(data, "train", 64)
    windows[2]  # untouched windows still load
    with pytest.raises(ConfigError, match=rf"train\.bin holds token id {windows.vocab_size + 7} \(at token 197\)"):
        windows[3]


def test_prepare_on_a_full_or_read_only_disk_is_named(small_disk):
    """ENOSPC while writing the token files and a read-only --output are ConfigErrors naming the folder
    (was a raw OSError traceback); nothing is left on the disk, a previous output stays."""
    full = small_disk("1m")
    prepare_default(full / "small", 100_000)  # fits: ~0.2 MB of tokens
    with pytest.raises(ConfigError, match=r"--output: no space left on device writing \S+big\.tmp\w+: [\d.]+ MB "
                                          r"written when the disk filled"):
        prepare_default(full / "big", 3_000_000)
    assert sorted(p.name for p in full.iterdir()) == ["small"]
    read_meta(full / "small")
    ro = small_disk("1m", read_only=True)
    with pytest.raises(ConfigError, match=r"--output: cannot create \S+: Read-only file system \(errno 30\)"):
        prepare_default(ro / "d", 100_000)


def test_batched_encoding_writes_the_files_of_one_document_at_a_time(tmp_path, monkeypatch):
    """`data prepare` encodes documents in batches (tokenizers' encode_batch); with batches of a few hundred
    bytes (so 40 documents span many) the train/val files and meta.json equal those of encoding one document
    at a time, the held-out split included."""
    tokenizers = pytest.importorskip("tokenizers")
    import importlib

    from longshard.train.data.prepare import prepare

    prepare_mod = importlib.import_module("longshard.train.data.prepare")
    from longshard.train.data.tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog"] * 50,
                            tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    docs = [f"document {i}: " + "the quick brown fox jumps " * (1 + i % 7) for i in range(40)]

    class OneByOne:
        name, vocab_size, bos_id, eos_id = hf.name, hf.vocab_size, hf.bos_id, hf.eos_id

        def encode_batch(self, texts):
            assert len(texts) == 1
            return [hf.encode(t) for t in texts]

    monkeypatch.setattr(prepare_mod, "BATCH_BYTES", 1)  # one document per batch
    prepare(tmp_path / "one", docs, OneByOne(), val_fraction=0.1)
    monkeypatch.setattr(prepare_mod, "BATCH_BYTES", 300)
    assert max(map(len, prepare_mod._batches(docs))) > 1
    prepare(tmp_path / "batched", docs, hf, val_fraction=0.1)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "batched" / name).read_bytes(), name
    assert json.loads((tmp_path / "batched" / "meta.json").read_text())["splits"]["val"]["n_docs"] > 0
