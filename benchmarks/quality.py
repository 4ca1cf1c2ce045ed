"""Model quality per attention variant: the tiny_lm model trained with each, same data and steps.

Reports final training loss, held-out loss relative to dense, and passkey accuracy at the trained
length. Each variant is one `longshard.train.main tiny_lm ...` run (2 processes).

    python benchmarks/quality.py --quick --json quality.json
    python benchmarks/quality.py --passkey --variants dense s2_hybrid   # retrieval, trained on passkey prompts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

S2 = {"block": 16, "local_blocks": 4, "vert_stride": 2}
VARIANTS: dict[str, list[str]] = {
    "dense": ["model.attention=[{name: dense}]"],
    "s2": [f"model.attention=[{{name: s2, options: {json.dumps(S2)}}}]"],
    "s2_hybrid": [f"model.attention=[{{name: s2, options: {json.dumps(dict(S2, dense_every_n_layers=2))}}}]"],
    "streaming": ["model.attention=[{name: streaming, options: {sink: 16, window: 64, retrieval_heads: [0]}}]"],
    "sliding_window": ["model.attention=[{name: sliding_window, options: {window: 64}}]"],
    "nsa": ["model.attention=[{name: nsa, options: {compress_block: 16, compress_stride: 8, select_block: 32, "
            "n_select: 4, n_local: 2, window: 64}}]"],
    "linear": ["model.attention=[{name: linear}]"],
    "linear_gated": ["model.attention=[{name: linear, gate: elementwise}]"],
    "linear_hybrid": ["model.attention=[{name: linear},{name: dense},{name: linear},{name: dense}]"],
    "gated": ["model.attention=[{name: dense, gate: elementwise}]"],
    "mixed_dense_s2": ["model.attention=[{name: mixed, options: {groups: [{name: dense, heads: 3}, "
                       f"{{name: s2, heads: 3, options: {json.dumps(S2)}}}]}}}}]"],
    "sqa": ["model.attention=[{name: dense}]", "model.n_query_heads=3", "model.n_kv_heads=1"],
    # DMA: 4 blocks of 16 per query block (kept fraction 0.39 at 256); MoH: 4 of the 6 heads per token;
    # PowerAttention: 2 local blocks of 16 + power-of-two distances
    "dma": ["model.attention=[{name: dma, options: {block: 16, keep_blocks: 4}}]"],
    "moh": ["model.attention=[{name: moh, options: {shared_heads: 2, top_k: 2}}]"],
    "power": ["model.attention=[{name: power, options: {block: 16, local_blocks: 2}}]"],
    # passkey at 128 tokens, equal kept fraction 0.289: PowerAttention on blocks of 4 tokens (the last
    # query reaches 97% of the prompt through the 4 layers) vs a 20-token window (60%: 4 x 20 tokens)
    "power_b4": ["model.attention=[{name: power, options: {block: 4, local_blocks: 2}}]"],
    "sliding_window_20": ["model.attention=[{name: sliding_window, options: {window: 20}}]"],
}


PASSKEY_LEN = 128  # retrieval training: the tiny_lm model learns it at this length within a few thousand steps


def run(name: str, overrides: list[str], steps: int, out: Path, passkey: bool = False) -> dict:
    """Train the tiny_lm model with ``overrides`` and return its report.

    Args:
        passkey: train on passkey prompts only (answer tokens carry the loss) at ``PASSKEY_LEN``,
            one process of batch 16, and test 32 held-out prompts at that length; otherwise the
            corpus at 256 tokens, 2 processes, 8 prompts at 256.
    """
    if passkey:
        data = ["data.source=passkey", f"train.seq_len={PASSKEY_LEN}", "train.nproc=1", "train.micro_batch_size=16",
                f"eval.passkey_lengths=[{PASSKEY_LEN}]", "eval.passkey_samples=32"]
        launch = ["-m", "longshard.train.main"]
    else:
        data = [f"data.path={out / 'data'}", "data.source=prepared", "eval.passkey_lengths=[256]",
                "eval.passkey_samples=8"]
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "longshard.train.main"]
    cmd = [sys.executable, *launch, "tiny_lm", *overrides, f"train.steps={steps}",
           f"output_dir={out / name}", "logging.wandb=disabled", "logging.progress=false",
           "checkpoint.save_final=false", "checkpoint.every=100000", *data]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / name / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="60 steps per variant (about 8 minutes on 2 cores)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--passkey", action="store_true",
                    help=f"retrieval instead: train on passkey prompts at {PASSKEY_LEN} tokens (default 4000 steps, "
                         "about 25 minutes per variant on one core) and report passkey accuracy")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.passkey:
        return passkey_main(args)
    steps = args.steps or (60 if args.quick else 300)
    from longshard.train.data import prepare_default

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare_default(out / "data", 3_000_000)
        names = ["dense", *[v for v in args.variants if v != "dense"]]
        reports = {name: run(name, VARIANTS[name], steps, out) for name in names}
    dense = reports["dense"]
    records = []
    sys.stdout.write(f"{'variant':16s} {'train loss':>10s} {'val loss':>9s} {'vs dense':>9s} {'passkey@256':>11s}\n")
    for name in args.variants:
        r = reports[name]
        rec = {"variant": name, "steps": steps, "final_loss": r["final_loss"], "val_loss": r.get("val_loss"),
               "val_loss_vs_dense": r["val_loss"] / dense["val_loss"] - 1, "passkey_acc": r.get("passkey_acc@256")}
        records.append(rec)
        sys.stdout.write(f"{name:16s} {rec['final_loss']:10.4f} {rec['val_loss']:9.4f} "
                         f"{100 * rec['val_loss_vs_dense']:+8.2f}% {rec['passkey_acc']:11.2f}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0


def passkey_main(args: argparse.Namespace) -> int:
    """Each variant trained on passkey prompts only; held-out passkey accuracy at the trained length."""
    steps = args.steps or 4000
    records = []
    sys.stdout.write(f"{'variant':16s} {'steps':>6s} {'val loss':>9s} {f'passkey@{PASSKEY_LEN}':>12s}\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            r = run(name, VARIANTS[name], steps, Path(tmp), passkey=True)
            rec = {"variant": name, "steps": steps, "seq_len": PASSKEY_LEN, "final_loss": r["final_loss"],
                   "val_loss": r.get("val_loss"), "passkey_acc": r.get(f"passkey_acc@{PASSKEY_LEN}")}
            records.append(rec)
            sys.stdout.write(f"{name:16s} {steps:6d} {rec['val_loss']:9.4f} {rec['passkey_acc']:12.2f}\n")
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
