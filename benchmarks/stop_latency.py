"""Time from SIGTERM to a clean exit (code 0, checkpoint written) for a run whose optimizer step is long.

A CPU run of tiny_lm whose step is made of many micro-batches (``--micro-batches``, one sample each, a
step of about a minute on 2 cores) gets SIGTERM ``--into`` seconds into its second step. Printed: the
step time, the micro-batch time, the seconds from the signal to the process's exit, its exit code and
the checkpoint it left. Run it once against each version to compare (``PYTHONPATH`` pointing at a
folder whose ``longshard`` is the other checkout).

    python benchmarks/stop_latency.py --micro-batches 96 --into 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", type=int, default=96, help="micro-batches (samples) per optimizer step")
    ap.add_argument("--into", type=float, default=20.0, help="seconds into step 2 at which SIGTERM is sent")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="stop-latency-")) / "run"
    cmd = [sys.executable, "-m", "longshard.train.main", "tiny_lm", "train.nproc=1", "train.steps=4",
           "train.micro_batch_size=1", f"train.global_batch_size={args.micro_batches}", f"train.seq_len={args.seq_len}",
           "train.log_every=1", "checkpoint.every=0", "checkpoint.save_final=false", "eval.at_end=false",
           "eval.passkey_samples=0", "logging.wandb=disabled", "logging.progress=false",
           "data.default_corpus_bytes=1000000", f"output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    step1 = json.loads(metrics.read_text().splitlines()[0])
    time.sleep(args.into)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    latency = time.perf_counter() - sent
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    stopped = next((ln for ln in err.splitlines() if "pre-empted" in ln), "")
    print(json.dumps({
        "step_time_s": round(step1["step_time_s"], 1),
        "micro_batch_s": round(step1["step_time_s"] / args.micro_batches, 2),
        "sigterm_into_step2_s": args.into, "term_to_exit_s": round(latency, 1), "exit_code": proc.returncode,
        "checkpoints": ckpts, "message": stopped.split("WARNING", 1)[-1].strip()[:240],
    }, indent=2))


if __name__ == "__main__":
    main()
