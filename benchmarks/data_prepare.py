"""`data prepare` with a Hugging Face tokenizer: documents encoded one at a time (``encode`` in a Python loop,
as before) against ``encode_batch`` (tokenizers' Rust threads), on the embedded corpus (Python standard
library sources), in one run. Both write byte-identical data (checked); printed: seconds each, the ratio.

    python benchmarks/data_prepare.py --bytes 20000000 --vocab 8000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# this folder's siblings are not packages the tokenizers import should find under generic names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


class OneByOne:
    """The tokenizer as data preparation used it before: ``encode`` per document."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.name, self.vocab_size, self.bos_id, self.eos_id = tok.name, tok.vocab_size, tok.bos_id, tok.eos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tok.encode(t) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=20_000_000, help="bytes of the embedded corpus to prepare")
    ap.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary trained on the corpus first")
    args = ap.parse_args()

    import tokenizers
    from longshard.train.data.corpus import default_documents
    from longshard.train.data.prepare import prepare
    from longshard.train.data.tokenizer import HFTokenizer

    docs = list(default_documents(args.bytes))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
        bpe.train_from_iterator(docs[:2000], tokenizers.trainers.BpeTrainer(
            vocab_size=args.vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
        bpe.save(str(tmp / "tokenizer.json"))
        tok = HFTokenizer(tmp / "tokenizer.json")
        t0 = time.perf_counter()
        meta = prepare(tmp / "one", docs, OneByOne(tok))
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(tmp / "batch", docs, tok)
        batch = time.perf_counter() - t0
        for split in ("train.bin", "val.bin"):
            assert (tmp / "one" / split).read_bytes() == (tmp / "batch" / split).read_bytes(), split
    tokens = meta["splits"]["train"]["n_tokens"] + meta["splits"]["val"]["n_tokens"]
    print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {tokens} tokens (vocab {args.vocab})")
    print(f"encode one by one: {one:.2f} s   encode_batch: {batch:.2f} s   speed-up x{one / batch:.2f} "
          "(identical files)")


if __name__ == "__main__":
    main()
