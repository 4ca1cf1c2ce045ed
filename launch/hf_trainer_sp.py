"""transformers.Trainer training a transformers causal LM with longshard's attention and sequence parallelism.

Every rank of a sequence group reads the same batch and keeps its shard of each sequence (zigzag for
ring and hybrid); the loss of a shard is its share of the global token mean, so the gradients the
Trainer's DDP averages over the ranks are those of the unsharded batch. Runs as is on CPU (gloo) or
GPUs (nccl)::

    torchrun --nproc-per-node 2 launch/hf_trainer_sp.py --sp 2 --mode ring --output runs/hf_trainer
    accelerate launch --multi_gpu --num_processes 2 launch/hf_trainer_sp.py --sp 2 --output runs/hf_acc
    python launch/hf_trainer_sp.py --sp 1 --output runs/hf_trainer_sp1      # the same run on one process

(``accelerate launch --multi_gpu`` on a machine without GPUs runs the processes on CPU over gloo.)

Without ``--model`` a small random Qwen2 (14 query / 2 KV heads) is trained on a copy task; with
``--model PATH`` that local checkpoint. ``--attention`` sets each layer's variant (the schema of
``model.attention`` in recipes, as JSON). The losses of every step are written to
``<output>/losses.json``. ``--grad-accum N`` accumulates N micro-batches per optimizer step: each
micro-batch's loss is its share of the step's token mean (the Trainer's ``num_items_in_batch``, which
counts every rank's copy of a sequence, divided by the sequence-parallel degree), so the step trains
what one micro-batch of N times the sequences would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# this folder's siblings are not packages transformers should find under generic names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


class CopyTask(torch.utils.data.Dataset):
    """Sequences made of a random 8-token pattern repeated: learnable, deterministic per index."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        pattern = torch.randint(0, self.vocab, (8,), generator=g)
        ids = pattern.repeat(self.seq_len // 8 + 1)[: self.seq_len]
        return {"input_ids": ids, "labels": ids.clone()}


def build_model(args: argparse.Namespace):
    import longshard.models.hf_attention  # noqa: F401  (registers "longshard")
    import transformers

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="longshard")
    else:
        cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=224, intermediate_size=448, num_hidden_layers=2,
                                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                       use_sliding_window=False)
        torch.manual_seed(args.seed)
        model = transformers.Qwen2ForCausalLM(cfg)
    if args.attention:
        model.config.longshard_attention = json.loads(args.attention)
    model.set_attn_implementation("longshard")
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sp", type=int, default=1, help="sequence-parallel degree (divides the world size)")
    ap.add_argument("--mode", default="ring", choices=["ulysses", "ring"])
    ap.add_argument("--model", default=None, help="local transformers checkpoint (default: a small random Qwen2)")
    ap.add_argument("--attention", default=None, help='JSON, e.g. \'{"name": "s2", "options": {"block": 16}}\'')
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per data-parallel rank")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)

    import transformers
    from longshard.parallel.hf import sequence_parallel, shard_inputs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.sp:
        raise SystemExit(f"--sp {args.sp} does not divide the {world} processes")
    targs = transformers.TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, gradient_accumulation_steps=args.grad_accum,
        disable_tqdm=True)
    model = build_model(args)
    shard = None
    if args.sp > 1:
        rank = dist.get_rank()
        groups = [dist.new_group(list(range(g * args.sp, (g + 1) * args.sp))) for g in range(world // args.sp)]
        shard = sequence_parallel(model, groups[rank // args.sp], args.mode)
    dp, dp_rank = world // args.sp, (dist.get_rank() // args.sp if world > 1 else 0)
    data = CopyTask(args.steps * args.batch * args.grad_accum * dp, args.seq_len, model.config.vocab_size)

    class SequenceParallelTrainer(transformers.Trainer):
        """Every rank of a sequence group gets the same batches (split over the data-parallel ranks only)
        and runs its shard; the loss is its share of the global token mean."""

        def get_train_dataloader(self):
            indices = list(range(dp_rank, len(data), dp))
            return torch.utils.data.DataLoader(torch.utils.data.Subset(data, indices), batch_size=args.batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if shard is None:  # transformers' own loss (its token count over the ranks and micro-batches)
                return super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)
            else:  # the Trainer counted each sequence once per rank of its sequence group
                step = num_items_in_batch / args.sp if args.grad_accum > 1 else None
                outputs = model(**shard_inputs(shard, inputs["input_ids"], inputs["labels"],
                                               loss_group=dist.group.WORLD, step_tokens=step))
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    trainer = SequenceParallelTrainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if trainer.is_world_process_zero():
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "losses.json").write_text(json.dumps({"sp": args.sp, "mode": args.mode,
                                                                   "world": world, "losses": losses}))
    if dist.is_initialized():  # every rank leaves together; an undestroyed gloo group can abort at exit
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
