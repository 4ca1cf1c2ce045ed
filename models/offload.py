"""Decoding with the KV cache in host memory and a fixed-size block cache on the compute device.

:class:`OffloadedCache` replaces :class:`~longshard.models.model.InferenceCache` for generation.
For every layer whose core attention exposes its block selection (``supports_offload``: NOSA,
S2, sink + window streaming, sliding window) it keeps:

* every complete key/value block in (pinned, when the device is CUDA) host memory,
* the current incomplete block ("tail") and one mean key per complete block on the device,
* a device cache of ``cache_blocks`` blocks per (batch row, KV head), least recently used out.

Each decoding step asks the variant which complete blocks the new query reads
(``decode_plan``), copies the missing ones from host memory (counted in :class:`OffloadStats`),
gathers the listed blocks plus the tail and lets the variant attend over them
(``attend_blocks``). The result is the attention the variant computes with the full cache
(same keys, same mask and bias). A block that completes on the device enters the cache without
a copy. Layers whose variant reads every block (dense, linear state, NSA, retrieval heads) keep
their full KV on the device as :class:`InferenceCache` does.

On CUDA, host->device copies come from pinned memory on a side stream (asynchronous, waited on
just before the attention that needs them); on CPU the same code runs with the copies counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from longshard.errors import ConfigError
from longshard.kernels.nosa.select import block_summaries
from longshard.models.attention.registry import AttentionBatch, CoreAttention
from longshard.models.model import InferenceCache
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class OffloadStats:
    """Transfer counters of an :class:`OffloadedCache`, summed over layers and steps.

    Args:
        h2d_bytes: host -> device bytes (block fetches).
        d2h_bytes: device -> host bytes (completed blocks written back once).
        hits: listed blocks found in the device cache.
        misses: listed blocks fetched from host memory.
        decode_steps: decoding forward calls seen.
        full_kv_layers: layers that keep their full KV on the device (variant not offloadable).
    """

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    hits: int = 0
    misses: int = 0
    decode_steps: int = 0
    full_kv_layers: set[int] = field(default_factory=set)

    @property
    def hit_rate(self) -> float | None:
        """Share of listed blocks found on the device; None when no block was looked up (e.g. every
        layer dense, so nothing was offloaded)."""
        total = self.hits + self.misses
        return self.hits / total if total else None

    def snapshot(self) -> dict[str, float]:
        return {"h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hit_rate}


class _LayerStore:
    """Host KV store, device tail, block summaries and the device block cache of one layer."""

    def __init__(self, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, block: int, cache_blocks: int,
                 stats: OffloadStats, pin: bool) -> None:
        B, Hkv, S, D = k_BKSD.shape
        self.block, self.cache_blocks, self.stats = block, cache_blocks, stats
        self.device, self.dtype = k_BKSD.device, k_BKSD.dtype
        self.pin = pin
        n = S // block
        cap = max(n * block, block) * 2
        self.host_k = self._host_empty(B, Hkv, cap, D)
        self.host_v = self._host_empty(B, Hkv, cap, D)
        self.n_blocks = 0
        self._write_host(k_BKSD[:, :, : n * block], v_BKSD[:, :, : n * block])
        self.kbar = block_summaries(k_BKSD, block)  # (B, Hkv, n, D) on the device
        self.tail_k, self.tail_v = k_BKSD[:, :, n * block :].clone(), v_BKSD[:, :, n * block :].clone()
        self.slot_k = torch.zeros(B, Hkv, cache_blocks, block, D, dtype=self.dtype, device=self.device)
        self.slot_v = torch.zeros_like(self.slot_k)
        self.slot_block = [[[-1] * cache_blocks for _ in range(Hkv)] for _ in range(B)]
        self.slot_used = [[[0] * cache_blocks for _ in range(Hkv)] for _ in range(B)]
        self.where = [[{} for _ in range(Hkv)] for _ in range(B)]  # block -> slot
        self.clock = 0
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def length(self) -> int:
        return self.n_blocks * self.block + self.tail_k.shape[2]

    def _host_empty(self, B: int, Hkv: int, cap: int, D: int) -> torch.Tensor:
        return torch.empty(B, Hkv, cap, D, dtype=self.dtype, device="cpu", pin_memory=self.pin)

    def _write_host(self, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor) -> None:
        """Append complete blocks to the host store (growing it by doubling)."""
        start, add = self.n_blocks * self.block, k_BKSD.shape[2]
        if start + add > self.host_k.shape[2]:
            B, Hkv, cap, D = self.host_k.shape
            new_cap = max(2 * cap, start + add)
            for name in ("host_k", "host_v"):
                grown = self._host_empty(B, Hkv, new_cap, D)
                grown[:, :, :start].copy_(getattr(self, name)[:, :, :start])
                setattr(self, name, grown)
        self.host_k[:, :, start : start + add].copy_(k_BKSD)
        self.host_v[:, :, start : start + add].copy_(v_BKSD)
        self.n_blocks += add // self.block
        self.stats.d2h_bytes += 2 * k_BKSD.numel() * k_BKSD.element_size()

    def append(self, k_BK1D: torch.Tensor, v_BK1D: torch.Tensor) -> None:
        """Add the new position; a block that completes goes to host memory and into the device cache."""
        self.tail_k = torch.cat([self.tail_k, k_BK1D], dim=2)
        self.tail_v = torch.cat([self.tail_v, v_BK1D], dim=2)
        if self.tail_k.shape[2] < self.block:
            return
        j = self.n_blocks
        self._write_host(self.tail_k, self.tail_v)
        self.kbar = torch.cat([self.kbar, self.tail_k.mean(dim=2, keepdim=True)], dim=2)
        B, Hkv = self.tail_k.shape[:2]
        for b in range(B):
            for h in range(Hkv):
                s = self._free_slot(b, h, keep=set())
                self._assign(b, h, s, j)
                self.slot_k[b, h, s].copy_(self.tail_k[b, h])
                self.slot_v[b, h, s].copy_(self.tail_v[b, h])
        self.tail_k, self.tail_v = self.tail_k[:, :, :0], self.tail_v[:, :, :0]

    def _free_slot(self, b: int, h: int, keep: set[int]) -> int:
        """An empty slot, else the least recently used one whose block is not in ``keep``."""
        blocks, used = self.slot_block[b][h], self.slot_used[b][h]
        best = None
        for s in range(self.cache_blocks):
            if blocks[s] < 0:
                return s
            if blocks[s] not in keep and (best is None or used[s] < used[best]):
                best = s
        if best is None:
            raise ConfigError("offload.cache_blocks",
                              f"a decoding step reads {len(keep)} blocks per KV head, more than the "
                              f"{self.cache_blocks} the device cache holds.",
                              f"raise cache_blocks to at least {len(keep)}.")
        return best

    def _assign(self, b: int, h: int, s: int, j: int) -> None:
        old = self.slot_block[b][h][s]
        if old >= 0:
            del self.where[b][h][old]
        self.slot_block[b][h][s] = j
        self.where[b][h][j] = s
        self.clock += 1
        self.slot_used[b][h][s] = self.clock

    def fetch(self, blocks_BKN: torch.Tensor) -> torch.Tensor:
        """Make every listed block device-resident; returns the (B, Hkv, N) slot of each (-1 = unused)."""
        B, Hkv, N = blocks_BKN.shape
        listed = blocks_BKN.tolist()
        slots = [[[-1] * N for _ in range(Hkv)] for _ in range(B)]
        copies: list[tuple[int, int, int, int]] = []
        for b in range(B):
            for h in range(Hkv):
                want = [j for j in listed[b][h] if j >= 0]
                keep = set(want)
                for n, j in enumerate(listed[b][h]):
                    if j < 0:
                        continue
                    s = self.where[b][h].get(j)
                    if s is None:
                        s = self._free_slot(b, h, keep)
                        self._assign(b, h, s, j)
                        copies.append((b, h, s, j))
                        self.stats.misses += 1
                    else:
                        self.clock += 1
                        self.slot_used[b][h][s] = self.clock
                        self.stats.hits += 1
                    slots[b][h][n] = s
        if copies:
            self._copy_in(copies)
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _copy_in(self, copies: list[tuple[int, int, int, int]]) -> None:
        blk = self.block
        stream = self.copy_stream
        if stream is not None:  # the slots being overwritten may still be read by queued compute work
            stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with ctx:
            for b, h, s, j in copies:
                self.slot_k[b, h, s].copy_(self.host_k[b, h, j * blk : (j + 1) * blk], non_blocking=True)
                self.slot_v[b, h, s].copy_(self.host_v[b, h, j * blk : (j + 1) * blk], non_blocking=True)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        D, es = self.slot_k.shape[-1], self.slot_k.element_size()
        self.stats.h2d_bytes += len(copies) * 2 * blk * D * es

    def gather(self, slots_BKN: torch.Tensor, blocks_BKN: torch.Tensor, bias_BKN: torch.Tensor | None):
        """Keys/values of the listed blocks followed by the tail, their positions (-1 = padding) and bias."""
        B, Hkv, N = slots_BKN.shape
        blk, dev = self.block, self.device
        bi = torch.arange(B, device=dev)[:, None, None]
        hi = torch.arange(Hkv, device=dev)[None, :, None]
        s = slots_BKN.clamp_min(0)
        D = self.slot_k.shape[-1]
        k = torch.cat([self.slot_k[bi, hi, s].reshape(B, Hkv, N * blk, D), self.tail_k], dim=2)
        v = torch.cat([self.slot_v[bi, hi, s].reshape(B, Hkv, N * blk, D), self.tail_v], dim=2)
        pos = blocks_BKN[..., None] * blk + torch.arange(blk, device=dev)
        pos = torch.where(blocks_BKN[..., None] >= 0, pos, -1).reshape(B, Hkv, N * blk)
        t = self.tail_k.shape[2]
        tail_pos = (self.n_blocks * blk + torch.arange(t, device=dev)).expand(B, Hkv, t)
        pos = torch.cat([pos, tail_pos], dim=2)
        bias = None
        if bias_BKN is not None:
            bias = torch.cat([bias_BKN.float().repeat_interleave(blk, dim=-1),
                              bias_BKN.new_zeros(B, Hkv, t, dtype=torch.float32)], dim=2)
        return k, v, pos, bias


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class OffloadedCache(InferenceCache):
    """Decoding state with past keys/values in host memory (see the module docstring).

    Args:
        cache_blocks: device-resident blocks per (batch row, KV head) and layer.
        pin_memory: pin the host store (default: when the keys live on CUDA).
    """

    def __init__(self, cache_blocks: int, pin_memory: bool | None = None) -> None:
        super().__init__()
        if cache_blocks < 1:
            raise ConfigError("offload.cache_blocks", f"must be >= 1, got {cache_blocks}.")
        self.cache_blocks = cache_blocks
        self.pin_memory = pin_memory
        self.stores: dict[int, _LayerStore] = {}
        self.stats = OffloadStats()

    def attend(self, layer_idx: int, core: CoreAttention, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor,
               v_BHSD: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        if not core.supports_offload:
            if layer_idx not in self.stats.full_kv_layers:
                self.stats.full_kv_layers.add(layer_idx)
                log.info("layer %d (%s) keeps its full KV on the device", layer_idx, type(core).__name__)
            return super().attend(layer_idx, core, q_BHSD, k_BHSD, v_BHSD, batch)
        store = self.stores.get(layer_idx)
        if store is None:  # prefill: attend with the prompt's keys on the device, then move them out
            budget = core.decode_block_budget()
            if budget is not None and budget > self.cache_blocks:
                raise ConfigError("offload.cache_blocks",
                                  f"layer {layer_idx} ({type(core).__name__}) reads up to {budget} blocks per KV "
                                  f"head and decoding step, more than the {self.cache_blocks} the device cache holds.",
                                  f"raise cache_blocks to at least {budget}.")
            out = core(q_BHSD, k_BHSD, v_BHSD, batch)
            pin = self.pin_memory if self.pin_memory is not None else k_BHSD.is_cuda
            self.stores[layer_idx] = _LayerStore(k_BHSD, v_BHSD, core.block, self.cache_blocks, self.stats, pin)
            return out
        if q_BHSD.shape[2] != 1:
            raise ValueError("OffloadedCache decodes one position per call after the prefill")
        if layer_idx == min(self.stores):
            self.stats.decode_steps += 1
        store.append(k_BHSD, v_BHSD)
        plan = core.decode_plan(q_BHSD, store.kbar, store.length)
        slots = store.fetch(plan.blocks_BKN)
        k, v, pos, bias = store.gather(slots, plan.blocks_BKN, plan.bias_BKN)
        return core.attend_blocks(q_BHSD, k, v, pos, bias, store.length)

    def host_bytes(self) -> int:
        """Bytes of keys/values held in host memory."""
        return sum(2 * s.n_blocks * s.block * s.host_k.shape[0] * s.host_k.shape[1] * s.host_k.shape[3]
                   * s.host_k.element_size() for s in self.stores.values())

    def device_kv_bytes(self) -> int:
        """Bytes of keys/values (cache slots, tails, summaries) on the compute device."""
        total = 0
        for s in self.stores.values():
            for t in (s.slot_k, s.slot_v, s.tail_k, s.tail_v, s.kbar):
                total += t.numel() * t.element_size()
        return total


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    cache: InferenceCache | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy (or sampled) continuation of ``prompt_BS``; returns the (B, max_new_tokens) new tokens.

    Args:
        model: a :class:`~longshard.models.model.Transformer`.
        prompt_BS: prompt token ids.
        max_new_tokens: tokens to generate.
        cache: decoding state (e.g. :class:`OffloadedCache`); default a plain device cache.
        temperature: 0 = greedy, else softmax sampling at this temperature.
        generator: random generator for sampling.
    """
    return torch.cat(list(generate_steps(model, prompt_BS, max_new_tokens, cache, temperature, generator)), dim=1)


@torch.no_grad()
def generate_steps(
    model: nn.Module,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    cache: InferenceCache | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Like :func:`generate`, yielding each new (B, 1) token as soon as it exists."""
    cache = InferenceCache() if cache is None else cache
    logits = model(prompt_BS, cache=cache)[:, -1]
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator)
        else:
            tok = logits.argmax(-1, keepdim=True)
        yield tok
        if step + 1 < max_new_tokens:
            logits = model(tok, cache=cache)[:, -1]
