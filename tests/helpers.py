"""Test helpers: relative-error checks and gloo process launching."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp64; an all-zero reference falls back to max |out| (absolute)."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    denom = ref64.abs().max()
    err = (out64 - ref64).abs().max()
    return float(err / denom) if denom > 0 else float(err)


def assert_rel(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """Named relative-error assertion (max-abs-error over max-abs-reference)."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(ref, out)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """A ``torchrun`` command line on a free local port."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        *args,
    ]


def train_tiny(model: torch.nn.Module, steps: int = 5, vocab: int = 64, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps of next-token prediction on one fixed random batch; returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def tiny_llama_checkpoint(path: Path) -> None:
    """Save a random Hugging Face Llama (2 layers, 4 query / 2 KV heads, dim 64, vocab 97) to ``path``."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
