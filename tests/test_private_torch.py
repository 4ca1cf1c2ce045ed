"""Every private torch symbol longshard uses still exists, so a torch upgrade that removes or renames one
fails here, in CI, instead of in a user's run (several are reached lazily, or their absence falls back
silently to a slower path: the fused CPU attention kernels).

When this fails after a torch upgrade: find the new name (or the public replacement) and update the module
named in the failure, then this list.
"""

from __future__ import annotations

import importlib

import pytest
import torch

PRIVATE = [  # (module, name, where longshard uses it)
    ("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset", "parallel/sharded_load.py"),
    ("torch.distributed.checkpoint._traverse", "set_element", "train/checkpoint_read.py"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo", "train/safe_pickle.py (allowed record)"),
    ("torch.serialization", "_get_layout", "train/safe_pickle.py (allowed callable)"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "train/safe_pickle.py (allowed callable)"),
    ("torch.utils._python_dispatch", "TorchDispatchMode", "train/memory.py"),
    ("torch.utils._pytree", "tree_leaves", "train/memory.py"),
]
ATEN = [  # private ATen ops, reached through torch.ops.aten
    ("_scaled_dot_product_flash_attention_for_cpu", "kernels/attention/fused_cpu.py"),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", "kernels/attention/fused_cpu.py"),
]


@pytest.mark.parametrize("module,name,where", PRIVATE, ids=[f"{m}.{n}" for m, n, _ in PRIVATE])
def test_private_torch_symbol_exists(module, name, where):
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"torch {torch.__version__} has no {module}.{name}, which {where} uses"


@pytest.mark.parametrize("name,where", ATEN, ids=[n for n, _ in ATEN])
def test_private_aten_op_exists_and_returns_the_log_sum_exp(name, where):
    assert hasattr(torch.ops.aten, name), f"torch {torch.__version__} has no aten.{name}, which {where} uses"
    from longshard.kernels.attention.fused_cpu import fused_cpu_ops

    fwd, bwd = fused_cpu_ops()
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, lse = fwd(q, k, v, 0.0, True)[:2]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    # one kernel family (SDPA's CPU flash path) on both sides: fp32 rounding only
    assert torch.allclose(out, ref, atol=1e-5) and lse.shape == (1, 2, 5)


def test_every_torch_global_the_checkpoint_unpickler_allows_exists():
    from longshard.train import safe_pickle

    for table in (safe_pickle._RECORDS, safe_pickle._CALLABLES):
        for module, names in table.items():
            if not module.startswith("torch"):
                continue
            mod = importlib.import_module(module)
            for name in names:
                assert hasattr(mod, name), f"torch {torch.__version__} has no {module}.{name} (train/safe_pickle.py)"
