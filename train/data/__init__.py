"""Tokenizers, the embedded default corpus, packed memmap preparation, synthetic tasks, loaders."""

from longshard.train.data.loader import (
    DistributedLoader,
    MQARDataset,
    PasskeyDataset,
    Sample,
    TokenWindows,
    collate,
)
from longshard.train.data.prepare import prepare, prepare_default, read_meta
from longshard.train.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DistributedLoader",
    "HFTokenizer",
    "MQARDataset",
    "PasskeyDataset",
    "Sample",
    "TokenWindows",
    "build_tokenizer",
    "collate",
    "prepare",
    "prepare_default",
    "read_meta",
]
