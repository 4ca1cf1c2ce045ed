"""Run under torchrun with 4 processes: a megatron-core GPTModel with tensor parallel 2 x context
parallel 2 (Megatron's zigzag layout) whose core attention is a longshard variant running
sequence-parallel over Megatron's CP group, against our own unsharded model with the same weights
(logits of this rank's tokens and every parameter gradient). Exits 1 on a mismatch.

On CPU, ``cpu_compat()`` points megatron-core's two hard-coded CUDA calls (RoPE table, its CP
slicing index) at the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import TOL, finish, rel
from longshard.parallel.env import exit_worker

TP, CP = 2, 2
HEADS, GROUPS, DIM, VOCAB, L = 4, 2, 64, 64, 16  # L: local tokens (2 zigzag chunks of 8)
CASES = [
    ("ring", "dense", {}),
    ("ring", "s2", {"block": 4, "local_blocks": 1, "vert_stride": 2, "path": "gather"}),  # sparsity-aware exchange
    ("ring", "linear", {"chunk": 4}),  # zigzag state passing
    ("ulysses", "dense", {}),
    ("ulysses", "s2", {"block": 4, "local_blocks": 1, "vert_stride": 2, "path": "gather"}),
]


def megatron_shard(get, ours, t: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank ``t``'s part, in Megatron's layout, of ``get(param)`` for our parameters
    (``get`` = weight or gradient): vocab and column-parallel rows, row-parallel columns."""
    def rows(x):
        return x.chunk(TP, 0)[t]

    def cols(x):
        return x.chunk(TP, 1)[t]

    hd, G = DIM // HEADS, HEADS // GROUPS
    sd = {"embedding.word_embeddings.weight": rows(get(ours.tok_embeddings.weight)),
          "decoder.final_layernorm.weight": get(ours.norm.weight),
          "output_layer.weight": rows(get(ours.output.weight))}
    for i, layer in enumerate(ours.layers):
        pre, a, ff = f"decoder.layers.{i}.", layer.attention, layer.feed_forward
        q = get(a.wq.weight).view(GROUPS, G * hd, -1)
        k = get(a.wk.weight).view(GROUPS, hd, -1)
        v = get(a.wv.weight).view(GROUPS, hd, -1)
        sd[pre + "self_attention.linear_qkv.weight"] = rows(torch.cat([q, k, v], 1).reshape(-1, DIM))
        sd[pre + "self_attention.linear_proj.weight"] = cols(get(a.wo.weight))
        sd[pre + "input_layernorm.weight"] = get(layer.attention_norm.weight)
        sd[pre + "pre_mlp_layernorm.weight"] = get(layer.ffn_norm.weight)
        sd[pre + "mlp.linear_fc1.weight"] = torch.cat([rows(get(ff.w1.weight)), rows(get(ff.w3.weight))], 0)
        sd[pre + "mlp.linear_fc2.weight"] = cols(get(ff.w2.weight))
    return sd


def main() -> int:
    from longshard.models import ModelConfig, Transformer
    from longshard.parallel.layout import zigzag_positions
    from longshard.parallel.megatron import MegatronCoreAttention, cpu_compat, longshard_layer_spec, megatron_config
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    dist.init_process_group("gloo")
    cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, context_parallel_size=CP)
    t, c = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank()
    cp_group = parallel_state.get_context_parallel_group()
    failures = []
    for sp_mode, name, opts in CASES:
        torch.manual_seed(0)
        ours = Transformer(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=HEADS, n_kv_heads=GROUPS,
                                       max_seq_len=128, attention=[{"name": name, "options": opts}]))
        cfg = megatron_config(ours.cfg, tensor_model_parallel_size=TP, context_parallel_size=CP)
        mg = GPTModel(cfg, transformer_layer_spec=longshard_layer_spec(name, opts, sp_mode=sp_mode),
                      vocab_size=VOCAB, max_sequence_length=128, position_embedding_type="rope", rotary_base=10000,
                      share_embeddings_and_output_weights=False, parallel_output=False)
        assert all(isinstance(x.self_attention.core_attention, MegatronCoreAttention) for x in mg.decoder.layers)
        missing, unexpected = mg.load_state_dict(
            {k: v.detach().clone() for k, v in megatron_shard(lambda p: p, ours, t).items()}, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

        tokens = torch.randint(0, VOCAB, (2, L * CP), generator=torch.Generator().manual_seed(1))
        index = zigzag_positions(c, CP, L)  # Megatron's CP layout: chunks c and 2*CP-1-c
        ref = ours(tokens)
        out = mg(tokens[:, index], None, None)
        label = f"tp={TP} cp={CP} {sp_mode} {name}"
        if (e := rel(ref[:, index], out)) > TOL:
            failures.append(f"{label} logits {e:.2e}")
        ref.square().sum().backward()
        out.square().sum().backward()
        want = megatron_shard(lambda p: p.grad, ours, t)
        for n, p in mg.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=cp_group)  # each CP rank's gradient covers its tokens
            if (e := rel(want[n], grad)) > TOL:
                failures.append(f"{label} grad {n} {e:.2e}")
        counters = [getattr(x.self_attention.core_attention, "counter", None) for x in mg.decoder.layers]
        comm = sum(sum(k.bytes.values()) for k in counters if k is not None)
        if comm <= 0:
            failures.append(f"{label}: no sequence-parallel traffic counted")
    parallel_state.destroy_model_parallel()
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
