"""Megatron-core plug-in: a megatron-core GPTModel whose core attention is a longshard variant gives
our own model's logits and gradients for the same weights (CPU, one gloo process), also under
Megatron tensor parallel x longshard sequence parallel over Megatron's context-parallel group
(4 gloo processes), and the example trains the same losses on every layout."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import REPO, assert_rel, torchrun_cmd
from longshard.models import ModelConfig, Transformer

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'longshard[megatron]')")

VARIANTS = [
    ("dense", {}),
    ("s2", {"block": 4, "local_blocks": 1, "vert_stride": 2, "path": "gather"}),
    ("streaming", {"block": 4, "sink": 2, "window": 5, "retrieval_heads": [0], "path": "gather"}),
    ("linear", {"chunk": 8}),
]
# fp32; same math in another order (fused QKV projection, Megatron's RoPE and norms) -> ~1e-6
TOL = 1e-5


@pytest.fixture(scope="module")
def megatron_cpu():
    """A 1-process gloo group with Megatron's model-parallel state (TP = PP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _copy_weights(mg, ours: Transformer, heads: int, groups: int, head_dim: int) -> None:
    """Our weights into Megatron's layout (fused per-group QKV, fused gate/up)."""
    sd = {}
    sd["embedding.word_embeddings.weight"] = ours.tok_embeddings.weight
    for i, layer in enumerate(ours.layers):
        pre = f"decoder.layers.{i}."
        a = layer.attention
        G = heads // groups
        q = a.wq.weight.view(groups, G * head_dim, -1)
        k = a.wk.weight.view(groups, head_dim, -1)
        v = a.wv.weight.view(groups, head_dim, -1)
        sd[pre + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, q.shape[-1])
        sd[pre + "self_attention.linear_proj.weight"] = a.wo.weight
        sd[pre + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[pre + "pre_mlp_layernorm.weight"] = layer.ffn_norm.weight
        ff = layer.feed_forward
        sd[pre + "mlp.linear_fc1.weight"] = torch.cat([ff.w1.weight, ff.w3.weight], 0)
        sd[pre + "mlp.linear_fc2.weight"] = ff.w2.weight
    sd["decoder.final_layernorm.weight"] = ours.norm.weight
    sd["output_layer.weight"] = ours.output.weight
    missing, unexpected = mg.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)


@pytest.mark.parametrize("name,opts", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_megatron_gpt_with_longshard_attention_matches_our_model(name, opts, megatron_cpu, monkeypatch):
    from longshard.parallel.megatron import MegatronCoreAttention, longshard_layer_spec, megatron_config
    from megatron.core.models.gpt import GPTModel

    if not torch.cuda.is_available():  # Megatron's RoPE moves its table to the "current" CUDA device
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    heads, groups, dim, head_dim = 4, 2, 64, 16
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(vocab_size=64, dim=dim, n_layers=2, n_heads=heads, n_kv_heads=groups,
                                   max_seq_len=128, attention=[{"name": name, "options": opts}]))
    cfg = megatron_config(ours.cfg)
    mg = GPTModel(cfg, transformer_layer_spec=longshard_layer_spec(name, opts), vocab_size=64,
                  max_sequence_length=128, position_embedding_type="rope", rotary_base=10000,
                  share_embeddings_and_output_weights=False)
    assert all(isinstance(layer.self_attention.core_attention, MegatronCoreAttention) for layer in mg.decoder.layers)
    _copy_weights(mg, ours, heads, groups, head_dim)
    tokens = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))  # odd length
    pos = torch.arange(23)[None].expand(2, -1)
    ref = ours(tokens)
    out = mg(tokens, pos, None)
    assert_rel(f"{name} logits", ref, out, TOL)
    ref.square().mean().backward()
    out.square().mean().backward()
    assert_rel("embedding grad", ours.tok_embeddings.weight.grad, mg.embedding.word_embeddings.weight.grad, TOL)
    assert_rel("layer-0 out-proj grad", ours.layers[0].attention.wo.weight.grad,
               mg.decoder.layers[0].self_attention.linear_proj.weight.grad, TOL)


@pytest.mark.dist
def test_megatron_tensor_parallel_x_sequence_parallel(env_cpu):
    """TP 2 x CP 2: dense/S2/linear over the ring and dense/S2 under Ulysses, logits and every
    parameter gradient equal our unsharded model (tests/dist/megatron_check.py)."""
    proc = subprocess.run(torchrun_cmd(4, str(REPO / "tests" / "dist" / "megatron_check.py")), env=env_cpu,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.dist
@pytest.mark.slow  # ~35 s; the GPTModel unit tests stay in the default suite
def test_megatron_example_losses_equal_across_layouts(tmp_path, env_cpu):
    """launch/megatron_gpt.py: 1 process and TP 2 x CP 2 (Ulysses, sliding window) train the same losses."""
    reports = {}
    for nproc, layout in ((1, []), (4, ["--tp", "2", "--cp", "2"])):
        out = tmp_path / f"{nproc}.json"
        proc = subprocess.run(torchrun_cmd(nproc, str(REPO / "launch" / "megatron_gpt.py"), *layout,
                                           "--attention", "sliding_window", "--sp-mode", "ulysses", "--steps", "4",
                                           "--report", str(out)),
                              env=env_cpu, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        reports[nproc] = json.loads(out.read_text())["losses"]
    # fp32; the same sums regrouped over ranks (~1e-7 observed)
    for a, b in zip(reports[1], reports[4]):
        assert abs(a - b) / a <= 1e-5, reports
    assert reports[1][-1] < reports[1][0]


def test_module_level_specs_for_megatron_dash_dash_spec():
    """`pretrain_gpt.py --spec longshard.parallel.megatron_specs s2_layer_spec`: megatron-core's own
    import_module reads a ModuleSpec per registered variant (its default options) whose core attention is
    ours."""
    from longshard.models.attention import available_attention
    from longshard.parallel.megatron import MegatronCoreAttention
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    for variant in available_attention():
        spec = import_module(("longshard.parallel.megatron_specs", f"{variant}_layer_spec"))
        assert isinstance(spec, ModuleSpec)
        core = spec.submodules.self_attention.submodules.core_attention
        assert core.module is MegatronCoreAttention and core.params["attention"] == variant
