"""Tokenizers: byte-level (embedded default) and Hugging Face ``tokenizers`` from a local file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from longshard.errors import ConfigError
from longshard.files import read_json


class Tokenizer(Protocol):
    """What training and evaluation need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    name: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab 259)."""

    name = "bytes"

    def __init__(self) -> None:
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a local ``tokenizer.json``.

    Args:
        path: tokenizer.json file, or a folder containing one.
        bos_token, eos_token: special tokens to use; looked up among common names when None.
    """

    def __init__(self, path: str | Path, bos_token: str | None = None, eos_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError("data.tokenizer", "the `tokenizers` package is not installed.",
                              "pip install 'longshard[hf]'.") from e
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError("data.tokenizer", f"{path} does not exist.", "give a local tokenizer.json.")
        try:
            read_json(path)
            self._tok = _Tok.from_file(str(path))
        except json.JSONDecodeError as e:
            raise ConfigError("data.tokenizer", f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg}); the file is cut short or damaged.", "re-copy the tokenizer.json.") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("data.tokenizer", f"{path} is not a tokenizer file we accept ({e}).",
                              "re-copy the tokenizer.json.") from None
        except Exception as e:  # tokenizers' own parse error (valid JSON, not a tokenizer)
            raise ConfigError("data.tokenizer", f"{path} is not a tokenizers file ({str(e)[:200]}).",
                              "give the tokenizer.json of a Hugging Face tokenizer.") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(bos_token, ("<|begin_of_text|>", "<s>", "<|endoftext|>", "<bos>"), "beginning")
        self.eos_id = self._find(eos_token, ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"), "end")

    def _find(self, given: str | None, candidates: tuple[str, ...], which: str) -> int:
        tried = (given,) if given else candidates
        for tok in tried:
            idx = self._tok.token_to_id(tok)
            if idx is not None:
                return idx
        raise ConfigError("data.tokenizer", f"{self.name} has no {which}-of-document token (looked for "
                          f"{', '.join(tried)}); every document is wrapped in a beginning and an end token.",
                          "use a tokenizer whose vocabulary holds one of each (BOS: <|begin_of_text|>, <s>, "
                          "<|endoftext|> or <bos>; EOS: <|end_of_text|>, </s>, <|endoftext|> or <eos>), or add "
                          "them as special tokens when training it.")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once: tokenizers encodes them in parallel (Rust threads)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def build_tokenizer(path: str | None) -> Tokenizer:
    """Byte-level tokenizer when ``path`` is None, else the HF tokenizer at ``path``."""
    return ByteTokenizer() if not path else HFTokenizer(path)
