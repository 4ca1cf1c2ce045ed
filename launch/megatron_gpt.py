"""Example: a megatron-core GPT whose core attention is a longshard variant, trained with Megatron
tensor parallel x longshard sequence parallel over Megatron's context-parallel group.

    torchrun --nproc-per-node 4 launch/megatron_gpt.py --tp 2 --cp 2 --attention s2 --sp-mode ring

On GPUs it uses NCCL; without one it runs on CPU with gloo (``cpu_compat``). The data is
synthetic counting sequences (each token is the previous one plus a stride, mod the vocabulary),
so the loss visibly falls in a few steps; weights are initialised on the CPU from one seed, so
every (tp, cp) layout trains the same model and gives the same losses. Each rank feeds Megatron
its zigzag shard of every sequence (chunks c and 2*cp-1-c), the layout Megatron's RoPE and
longshard's ring both expect.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from longshard.parallel.env import exit_worker

log = logging.getLogger("megatron_gpt")

EXAMPLE_OPTIONS = {
    "dense": {},
    "s2": {"block": 8, "local_blocks": 2, "vert_stride": 2},
    "sliding_window": {"block": 8, "window": 32},
    "linear": {"chunk": 16},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    ap.add_argument("--cp", type=int, default=1, help="context (sequence) parallel size")
    ap.add_argument("--attention", default="s2", choices=sorted(EXAMPLE_OPTIONS))
    ap.add_argument("--sp-mode", default="ring", choices=["ring", "ulysses"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--report", default=None, help="write {'losses': [...]} as JSON here (rank 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from longshard.parallel.layout import zigzag_positions
    from longshard.parallel.megatron import cpu_compat, longshard_layer_spec
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    cpu_compat()
    if dist.get_world_size() % (args.tp * args.cp):
        raise SystemExit(f"--tp {args.tp} x --cp {args.cp} does not divide the {dist.get_world_size()} processes")
    if args.seq_len % (2 * args.cp):
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of 2 x cp = {2 * args.cp}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if cuda:
        model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    vocab, dim, heads = 64, 128, 8
    cfg = TransformerConfig(
        num_layers=2, hidden_size=dim, num_attention_heads=heads, num_query_groups=4, ffn_hidden_size=4 * dim,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, bias_activation_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        tensor_model_parallel_size=args.tp, context_parallel_size=args.cp)
    model = GPTModel(cfg, transformer_layer_spec=longshard_layer_spec(args.attention, EXAMPLE_OPTIONS[args.attention],
                                                                      sp_mode=args.sp_mode),
                     vocab_size=vocab, max_sequence_length=args.seq_len, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False, parallel_output=False)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    c, S = parallel_state.get_context_parallel_rank(), args.seq_len
    index = zigzag_positions(c, args.cp, S // args.cp).to(device)
    gen = torch.Generator().manual_seed(1 + parallel_state.get_data_parallel_rank())  # same data per TP/CP group
    losses = []
    for step in range(args.steps):
        start = torch.randint(0, vocab, (4, 1), generator=gen)
        stride = torch.randint(1, 4, (4, 1), generator=gen)
        tokens = ((start + stride * torch.arange(S)) % vocab).to(device)
        labels = torch.roll(tokens, -1, 1)
        labels[:, -1] = -100
        logits = model(tokens[:, index], None, None)  # (4, S / cp, vocab): this rank's zigzag shard
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, index].flatten(), reduction="sum")
        n = torch.tensor(float((labels[:, index] != -100).sum()), device=device)
        dist.all_reduce(n, group=dp_group)
        opt.zero_grad()
        (loss_sum / n).backward()
        for p in model.parameters():  # the CP ranks (and data-parallel replicas) each hold part of the gradient
            dist.all_reduce(p.grad, group=dp_group)
        opt.step()
        total = loss_sum.detach().clone()
        dist.all_reduce(total, group=dp_group)
        losses.append(float(total / n))
        if dist.get_rank() == 0:
            log.info("step %d loss %.4f", step, losses[-1])
    if dist.get_rank() == 0 and args.report:
        with open(args.report, "w") as f:
            json.dump({"losses": losses, "tp": args.tp, "cp": args.cp, "attention": args.attention,
                       "sp_mode": args.sp_mode}, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_worker(main())
