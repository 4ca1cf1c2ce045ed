"""Training: :func:`train`, run on every rank (torchrun or plain python), builds the run and hands it to
:class:`~longshard.train.loop.TrainLoop`."""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from longshard.errors import ConfigError, require
from longshard.files import write_file
from longshard.launch.stop_budget import measured_save_s, slurm_budget_warnings
from longshard.models.config import ModelConfig
from longshard.models.model import Transformer
from longshard.parallel import (
    DistEnv,
    apply_sequence_parallel,
    build_mesh,
    init_distributed,
    parallelize,
)
from longshard.parallel.deepspeed_engine import deepspeed_config, import_deepspeed
from longshard.parallel.deepspeed_engine import initialize as ds_initialize
from longshard.parallel.env import all_agree, all_sum
from longshard.parallel.layout import CommCounter
from longshard.parallel.ring import sparse_exchange_traffic
from longshard.parallel.tensor_parallel import check_tensor_parallel
from longshard.train.checkpoint import Checkpointer, CheckpointError
from longshard.train.config import Config, dump_config
from longshard.train.data import (
    DistributedLoader,
    MQARDataset,
    PasskeyDataset,
    TokenWindows,
    build_tokenizer,
    prepare_default,
    read_meta,
)
from longshard.train.engine import DeepSpeedTrainEngine, NativeEngine, TrainEngine, load_checkpoint
from longshard.train.evaluate import evaluate_config
from longshard.train.faults import (
    CollectiveError,
    PreemptionWatch,
    maybe_inject_fault,
)
from longshard.train.fingerprint import fingerprint
from longshard.train.hf_init import build_model, finish_after_parallelize, load_whole
from longshard.train.loop import NonFiniteLossError, StepInputs, TrainLoop, TrainState
from longshard.train.metrics import MetricsLogger, flops_per_token, flops_per_token_torchtitan, peak_tflops
from longshard.train.precision import activation_bytes, compute_dtype, warn_if_slow_cpu_bf16
from longshard.train.resolve import check_layout, check_passkey_lengths, resolve_model_config
from longshard.train.resolve import passkey_lengths as default_passkey_lengths
from longshard.train.run import TrainingRun
from longshard.train.run_lock import RunLocks, set_aside_previous_run
from longshard.train.schedule import build_scheduler

log = logging.getLogger(__name__)


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler, cfg: Config) -> None:
    """Put the configured lr, betas, eps and weight decay into a resumed optimizer and scheduler (whose
    loaded state carries the checkpoint's): the base lr of every group, then the lr of the current step
    under the configured schedule; weight decay only where it applies (not on norms and biases)."""
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.optim.lr
        g["betas"], g["eps"] = (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps
        if g.get("weight_decay", 0.0) > 0:
            g["weight_decay"] = cfg.optim.weight_decay
    scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
    for g, lam in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        g["lr"] = cfg.optim.lr * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def build_datasets(cfg: Config, env: DistEnv, mcfg: ModelConfig):
    """Training and validation datasets plus the tokenizer; rank 0 prepares the default corpus."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    S = cfg.train.seq_len
    if cfg.data.source in ("default", "prepared"):
        path = cfg.data_dir
        if cfg.data.source == "default" and env.is_main and not (path / "meta.json").is_file():
            prepare_default(path, cfg.data.default_corpus_bytes)
        dist.barrier()
        meta = read_meta(path)
        if meta["tokenizer"] != tokenizer.name and cfg.data.source == "prepared" and cfg.data.tokenizer:
            log.warning("data was prepared with tokenizer %s, evaluation uses %s", meta["tokenizer"], tokenizer.name)
        if cfg.data.source == "prepared" and not cfg.data.tokenizer and meta["tokenizer"] != "bytes":
            tokenizer = build_tokenizer(meta["tokenizer"])
        require(meta["vocab_size"] <= mcfg.vocab_size, "model.vocab_size",
                f"{mcfg.vocab_size} is smaller than the data's tokenizer vocabulary ({meta['vocab_size']}).",
                "raise model.vocab_size or prepare the data with the model's tokenizer.")
        return TokenWindows(path, "train", S), TokenWindows(path, "val", S), tokenizer
    require(tokenizer.vocab_size <= mcfg.vocab_size, "model.vocab_size",
            f"{mcfg.vocab_size} is smaller than the tokenizer vocabulary ({tokenizer.vocab_size}).")
    n = cfg.data.synthetic_samples
    if cfg.data.source == "passkey":
        return (PasskeyDataset(tokenizer, S, n, cfg.train.seed), PasskeyDataset(tokenizer, S, 64, cfg.train.seed + 1),
                tokenizer)
    k = cfg.data.mqar_num_kv_pairs
    return (MQARDataset(S, mcfg.vocab_size, k, n, cfg.train.seed, cfg.data.mqar_curriculum,
                        cfg.train.steps * cfg.train.global_batch_size),
            MQARDataset(S, mcfg.vocab_size, k, 64, cfg.train.seed + 1), tokenizer)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norms, biases).

    Multi-tensor updates: ``fused`` on CUDA, ``foreach`` elsewhere (on CPU the same per-element
    arithmetic as the single-tensor loop, so fp32 losses are unchanged).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **impl)


def sp_traffic_report(run: TrainingRun, cfg: Config, grad_accum: int, last_comm: dict[str, int]) -> dict | None:
    """This rank's sequence-parallel K/V traffic per optimizer step in the layers that exchange only the
    blocks their pattern reads, measured (the last step's counter) and analytic, against what a dense
    ring would send for the same layers; None without such layers."""
    el = activation_bytes(cfg.train.dtype)
    t = sparse_exchange_traffic(run.model, cfg.train.micro_batch_size, cfg.train.seq_len, el)
    if t is None:
        return None
    sparse, dense = grad_accum * t["sparse_exchange_bytes"], grad_accum * t["dense_ring_bytes"]
    return {"sparse_exchange_layers": t["layers"], "sparse_exchange_bytes_per_step": sparse,
            "measured_sparse_exchange_bytes_per_step": last_comm.get("sparse_kv_bytes"),
            "dense_ring_bytes_per_step": dense, "saved_bytes_per_step": dense - sparse,
            "saved_fraction": (1 - sparse / dense) if dense else 0.0}


def attention_kept_fraction(model: Transformer, seq_len: int) -> float:
    """Mean over layers of the fraction of causal (query block, key block) pairs the attention keeps
    at ``seq_len`` (as each variant declares: 1.0 for dense and linear, block-sparse from its pattern)."""
    fracs = [layer.attention.core_attention.kept_fraction(seq_len) for layer in model.layers]
    return sum(fracs) / len(fracs)


def build_training(cfg: Config, env: DistEnv, layout: RunLayout, val_ds) -> TrainingRun:
    """Build the model, load or convert its weights, parallelize it (TP -> SP -> AC -> DP) and wrap it
    in its engine (native, or DeepSpeed with ZeRO over every rank)."""
    mcfg, use_ds, grad_accum = layout.mcfg, layout.use_ds, layout.grad_accum
    mode, sp_size = cfg.parallel.sp_mode, cfg.parallel.sp_degree
    uly = cfg.parallel.sp_ulysses_degree if mode == "hybrid" else 1
    tp_size = cfg.parallel.tp_degree
    model, sharded_hf = build_model(cfg, mcfg, use_ds, tp_size)  # whole, or on meta for sharded HF reads
    maybe_inject_fault(0, env.rank)  # drill hook for "signalled during start-up"
    kept_fraction = attention_kept_fraction(model, cfg.train.seq_len)  # before any parallel wrapper
    fpt = flops_per_token(mcfg, cfg.train.seq_len, model)  # the attention FLOPs each variant performs
    if cfg.init.hf_path is not None and not sharded_hf:  # weights (whole checkpoints) before parallelizing
        load_whole(model, cfg, mcfg)
    model.set_activation_offload(cfg.train.activation_offload)
    model.set_loss_chunking(None if cfg.train.loss_chunk_tokens < 0 else cfg.train.loss_chunk_tokens)
    if not sharded_hf:
        model.to(env.device)
    if tp_size > 1:  # heads and variants checked before the mesh's groups are created
        check_tensor_parallel(model, tp_size)
    mesh = build_mesh(env, sp_size, uly, tp_size)
    comm = CommCounter()
    # TP -> SP -> activation checkpointing -> data parallel (DeepSpeed does its own data parallelism)
    dmodel, sp = parallelize(model, mesh, cfg.parallel, comm, dtype=compute_dtype(cfg.train.dtype),
                             data_parallel_wrap=not use_ds, activation_checkpointing=cfg.train.activation_checkpointing)
    if use_ds:  # ZeRO over every rank replaces DDP/FSDP2; the schedule stays ours
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        dmodel = ds_initialize(model, optimizer, deepspeed_config(
            cfg.train.micro_batch_size, grad_accum, env.world_size, cfg.train.grad_clip, cfg.deepspeed.zero_stage,
            cfg.deepspeed.offload_optimizer, cfg.deepspeed.config_file))
    # sharded checkpoint reads, then the conversion gap on the model as it trains
    conversion = finish_after_parallelize(
        dmodel, model, cfg, sharded=sharded_hf, val_ds=val_ds, device=env.device, sp=sp,
        wrap_reference=(lambda m: apply_sequence_parallel(m, mesh, mode)) if sp is not None else None)
    if use_ds:
        engine = DeepSpeedTrainEngine(dmodel, optimizer, scheduler)
    else:
        optimizer = build_optimizer(dmodel, cfg)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        engine = NativeEngine(dmodel, optimizer, scheduler, cfg.train.grad_clip, loss_scaling=cfg.train.dtype == "fp16",
                              sharded=cfg.parallel.dp_mode == "fsdp2")
    return TrainingRun(model, dmodel, sp, engine, mesh, comm, conversion, kept_fraction, fpt)


def resume_training(cfg: Config, engine: TrainEngine, ckpt: Checkpointer,
                    loader: DistributedLoader) -> tuple[Path | None, int, list[float]]:
    """Load the checkpoint ``checkpoint.resume`` names (``auto``: the newest that loads) into the engine
    and the loader; returns (its path or None, the step it holds, the losses so far).

    Raises:
        ConfigError: the checkpoint is already past ``train.steps``.
    """
    start_step, history = 0, []
    resume_from, state = None, None
    if cfg.checkpoint.resume != "none":
        where = None if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
        resume_from, state = load_checkpoint(engine, ckpt, where)
    if state is not None:
        if any(k.startswith("optim.") for k in state.get("changed", [])):
            apply_optim_settings(engine.optimizer, engine.scheduler, cfg)
            log.info("applied the changed optimizer settings %s (checkpoint.allow_changes)",
                     [k for k in state["changed"] if k.startswith("optim.")])
        start_step = state["step"]
        if start_step > cfg.train.steps:  # nothing to train; saving would relabel those weights as an earlier step
            raise ConfigError("train.steps", f"{resume_from} is step {start_step}, beyond train.steps="
                              f"{cfg.train.steps}: this run is already past the steps asked for.",
                              f"raise train.steps above {start_step} to train on, or give a new output_dir for a "
                              "fresh run (the checkpoints here are kept).")
        loader.load_state_dict(state["loader"])
        history = state.get("losses", [])
    return resume_from, start_step, history


def check_shared_output(lock: RunLocks, env) -> None:
    """Every rank must read the lock rank 0 just wrote into each locked folder: output_dir and
    checkpoint.dir are one folder that all nodes share, or checkpoints, metrics and resumes split
    per node (and a later collective read fails with a raw backend error)."""
    if env.world_size == 1:
        return
    for one in lock.locks:
        stamp = all_sum((one.started or 0.0) if env.is_main else 0.0, env.device)  # rank 0's start time, everywhere
        ok = one.seen_started() == stamp
        if not all_agree(ok, env.device):
            if not ok:
                log.error("rank %d on %s does not see rank 0's lock %s in %s", env.rank, socket.gethostname(),
                          one.path.name, one.path.parent.resolve())
            raise ConfigError(one.field, f"{one.path.parent} is not the same folder on every node: some ranks do "
                              "not see the lock rank 0 wrote there (their names are in the log).",
                              f"put {one.field} on a filesystem every node mounts at the same path (NFS, Lustre, "
                              "GPFS) and give it as an absolute path.")


@dataclass(frozen=True)
class RunLayout:
    """What :func:`train` resolves before taking the output directory's lock.

    Args:
        mcfg: the resolved model config (an HF checkpoint's architecture filled in).
        use_ds: the DeepSpeed engine trains (``train.engine=deepspeed``).
        dp_size: data-parallel ranks.
        grad_accum: micro-batches per optimizer step on each data-parallel rank.
        t0: wall-clock start of the run (``report.json``'s ``wall_s``).
    """

    mcfg: ModelConfig
    use_ds: bool
    dp_size: int
    grad_accum: int
    t0: float


def train(cfg: Config, watch: PreemptionWatch | None = None) -> dict[str, Any]:
    """Run training as described by ``cfg`` on this rank; returns the final report (all ranks).

    Call once per process (torchrun starts one per device). Works without a launcher too.

    Args:
        cfg: the validated configuration.
        watch: the pre-emption watch, installed by the entry point as early as it can (a SIGTERM during
            start-up then stops the run cleanly before its first step); created here when None.
    """
    t0 = time.time()
    use_ds = cfg.train.engine == "deepspeed"
    if use_ds:
        import_deepspeed()  # a missing install is a config error, raised before any process group work
    env = init_distributed(cfg.train.device, cfg.parallel.collective_timeout_s)
    if env.is_main:
        warn_if_slow_cpu_bf16(cfg.train.dtype, env.device.type)
    mcfg = resolve_model_config(cfg)
    layout = RunLayout(mcfg, use_ds, *check_layout(cfg, mcfg, env.world_size), t0)
    out_dir = Path(cfg.output_dir)
    # checkpoint.dir is locked too, even inside output_dir: another run may point its checkpoint.dir here
    lock = RunLocks([(out_dir, "output_dir"), (cfg.checkpoint.dir, "checkpoint.dir")],
                    stale_s=max(900.0, 2 * cfg.parallel.collective_timeout_s))
    problem = None
    if env.is_main:  # one holder per run; every rank learns the verdict before anything is written
        try:
            lock.acquire()
        except ConfigError as e:
            problem = e
    if not all_agree(problem is None, env.device):
        lock.release()
        raise problem or ConfigError("output_dir", f"rank 0 could not lock {out_dir} (see its log).")
    try:
        check_shared_output(lock, env)
        if env.is_main and cfg.checkpoint.resume == "none":
            set_aside_previous_run(out_dir, cfg.checkpoint.dir)
        if env.is_main:  # on Slurm: would a stop's save fit in the time Slurm gives it? (the last run measured it)
            for warning in slurm_budget_warnings(measured_save_s(cfg.checkpoint.dir)):
                log.warning("%s", warning)
        return _train_locked(cfg, env, layout, lock, watch or PreemptionWatch())
    finally:
        lock.release()


def _train_locked(cfg: Config, env: DistEnv, layout: RunLayout, lock: RunLocks,
                  watch: PreemptionWatch) -> dict[str, Any]:
    """The body of :func:`train` once this run holds its output directory's lock: config written ->
    data -> model, weights, parallel form and engine -> loader -> checkpointer (resume) -> metrics ->
    the loop -> final evaluation and report."""
    mcfg, grad_accum, out_dir = layout.mcfg, layout.grad_accum, Path(cfg.output_dir)
    # converted weights live in the checkpoints from now on; a transformers model keeps the folder whose
    # config.json defines its architecture
    init = replace(cfg.init, hf_path=None) if cfg.init.hf_model == "convert" else cfg.init
    resolved_yaml = dump_config(replace(cfg, model=mcfg, init=init))
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_file(out_dir / "config.yaml", resolved_yaml)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train.seed)

    train_ds, val_ds, tokenizer = build_datasets(cfg, env, mcfg)
    passkey_lengths = default_passkey_lengths(cfg)
    check_passkey_lengths(tokenizer, passkey_lengths if cfg.eval.passkey_samples else [])
    run = build_training(cfg, env, layout, val_ds)
    loader = DistributedLoader(
        train_ds, micro_batch_size=cfg.train.micro_batch_size, grad_accum=grad_accum,
        dp_rank=run.mesh["dp"].get_local_rank(), dp_size=layout.dp_size, seed=cfg.train.seed,
        shuffle=cfg.data.shuffle and not cfg.data.mqar_curriculum,  # a curriculum is read in order (its phases)
    )
    run_print = fingerprint(cfg, mcfg, Path(cfg.data.path) if cfg.data.source == "prepared" and cfg.data.path else None)
    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last, env.rank, resolved_yaml, run_print,
                        cfg.checkpoint.allow_changes, tokenizer=cfg.data.tokenizer)
    resume_from, start_step, history = resume_training(cfg, run.engine, ckpt, loader)

    with MetricsLogger(
        out_dir, enabled=env.is_main, total_steps=cfg.train.steps, start_step=start_step,
        wandb_mode=cfg.logging.wandb, project=cfg.logging.project, run_name=cfg.logging.run_name or cfg.name,
        group=cfg.name, config=cfg.to_dict(), progress=cfg.logging.progress,
    ) as metrics:  # closed (progress bar, wandb run) however the run ends
        autocast = compute_dtype(cfg.train.dtype)
        run_eval = partial(evaluate_config, run.dmodel, cfg, val_dataset=val_ds, tokenizer=tokenizer, device=env.device,
                           sp=run.sp)
        inputs = StepInputs(autocast, cfg.train.global_batch_size * cfg.train.seq_len, run.flops_per_token,
                            peak_tflops(env.device, cfg.train.peak_tflops), run.kept_fraction,
                            flops_per_token_torchtitan(mcfg, cfg.train.seq_len))
        state = TrainState(start_step, history, resume_from)
        TrainLoop(cfg, env, run, loader, ckpt, metrics, state, inputs, run_eval).fit(watch, lock)

        eval_results: dict[str, Any] = {}
        if cfg.eval.at_end and state.preempted_at is None:
            eval_results = run_eval()
            metrics.log(cfg.train.steps, eval_results)
        report = {
            "name": cfg.name,
            "sp_traffic": sp_traffic_report(run, cfg, grad_accum, state.last_comm),
            "steps": cfg.train.steps,
            "resumed_from_step": start_step,
            "preempted_at_step": state.preempted_at,
            "losses": state.history,
            "final_loss": state.history[-1] if state.history else None,
            "skipped_steps": len(state.skipped),  # updates left out (non-finite loss/gradient, fp16 overflow)
            "skipped_at": state.skipped,
            "conversion": run.conversion,
            "mfu_conventions": {"mfu": "fraction; 6N + 3 x the attention each variant performs (causal half, kept "
                                "blocks)", "mfu_pct": "percent; torchtitan's 6N + 12*L*H*D*S (full attention)"},
            **eval_results,
            "world_size": env.world_size,
            "seq_len": cfg.train.seq_len,
            "data_source": cfg.data.source,
            "dp_mode": cfg.parallel.dp_mode,
            "sp_degree": cfg.parallel.sp_degree,
            "tp_degree": cfg.parallel.tp_degree,
            "device": str(env.device),
            "wall_s": time.time() - layout.t0,
            "checkpoint": str(state.last_ckpt) if state.last_ckpt else None,
            "metrics_file": str(metrics.path),
            "wandb_dir": metrics.wandb_dir,
        }
        metrics.summary(report)
    if env.is_main:
        write_file(out_dir / "report.json", json.dumps(report, indent=2))
    return report


__all__ = ["CheckpointError", "CollectiveError", "NonFiniteLossError", "train"]
