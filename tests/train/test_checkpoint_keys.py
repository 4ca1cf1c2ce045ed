"""Checkpoint keys do not depend on the parallel layout: a model trained under sequence parallelism
(its cores wrapped, live names with ``.inner``) writes the unwrapped model's names, so its checkpoint
loads into one process (``longshard eval`` / ``export-hf``: found broken for NSA trained under Ulysses)
and a checkpoint written without wrappers resumes a wrapped model, weights and optimizer state exact;
a checkpoint written before the rule (wrapped names) still loads unwrapped."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from longshard.models import ModelConfig, Transformer
from longshard.train.checkpoint import DCPStates, checkpoint_keys, load_model_weights
from longshard.train.checkpoint_keys import canonical_fqn, file_names

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  attention=[{"name": "dma", "options": {"block": 8, "keep_blocks": 2}},
                             {"name": "nsa", "options": {"compress_block": 8, "compress_stride": 4,
                                                         "select_block": 8, "n_select": 3, "n_local": 1,
                                                         "window": 16}}])


@pytest.fixture
def one_rank_group():
    fresh = not dist.is_initialized()
    if fresh:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if fresh:
        dist.destroy_process_group()


def _trained(model: torch.nn.Module, seed: int = 1) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed))
    model(tokens, labels_BS=tokens, position_ids_BS=torch.arange(32)[None].expand(2, 32)).loss_sum.backward()
    opt.step()
    return opt


def _wrapped(one_rank_group) -> torch.nn.Module:
    from longshard.parallel.ulysses import apply_ulysses

    torch.manual_seed(0)
    return apply_ulysses(Transformer(CFG), one_rank_group)


def test_names_lose_the_wrappers():
    assert canonical_fqn("layers.3.attention.core_attention.inner.inner.a") == "layers.3.attention.core_attention.a"
    assert canonical_fqn("layers.3.attention.wq.weight") == "layers.3.attention.wq.weight"
    old = ["model.layers.0.attention.core_attention.inner.a", "optim.state.x"]
    to_file = file_names(old)
    assert to_file("layers.0.attention.core_attention.a") == "layers.0.attention.core_attention.inner.a"
    assert to_file("layers.1.attention.core_attention.inner.delta") == "layers.1.attention.core_attention.delta"


def test_wrapped_checkpoint_loads_unwrapped_and_back(tmp_path, one_rank_group):
    wrapped = _wrapped(one_rank_group)
    assert any(".inner." in n for n, _ in wrapped.named_parameters())  # the live names carry the wrapper
    opt = _trained(wrapped)
    states = DCPStates(wrapped, opt)
    states.write(tmp_path / "ckpt", states.snapshot())
    assert not any(".inner." in k for k in checkpoint_keys(tmp_path / "ckpt"))
    plain = Transformer(CFG)
    load_model_weights(tmp_path / "ckpt", plain)  # what `longshard eval` does
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b), name
    # and a wrapped model resumes from it, optimizer state included
    again = _wrapped(one_rank_group)
    opt2 = _trained(again, seed=2)  # other weights and optimizer state, to be overwritten
    DCPStates(again, opt2).read(tmp_path / "ckpt")
    for (name, a), b in zip(again.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(opt2.state[a]["exp_avg"], opt.state[b]["exp_avg"]), name


def test_checkpoint_with_wrapped_names_still_loads(tmp_path, one_rank_group):
    """Written as before (live names, ``.inner`` included), read into a one-process model."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    wrapped = _wrapped(one_rank_group)
    opt = _trained(wrapped)
    model_sd, optim_sd = get_state_dict(wrapped, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "old"))
    assert any(".core_attention.inner." in k for k in checkpoint_keys(tmp_path / "old"))
    plain = Transformer(CFG)
    load_model_weights(tmp_path / "old", plain)
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b), name
    unwrapped_twin = copy.deepcopy(plain)
    DCPStates(unwrapped_twin, torch.optim.AdamW(unwrapped_twin.parameters())).read(tmp_path / "old")
    assert torch.equal(unwrapped_twin.layers[1].attention.core_attention.compress_k,
                       wrapped.layers[1].attention.core_attention.inner.compress_k)
