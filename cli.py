"""The ``longshard`` command: train, data, launch, eval, generate, heads, export-hf, plan, recipes, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from longshard.cli_checkpoint import _eval, _export_hf, _generate, _heads
from longshard.cli_recipes import add_parsers as add_recipe_parsers
from longshard.errors import EXIT_CHECKPOINT, EXIT_INVALID_INPUT, CheckpointError, ConfigError

log = logging.getLogger("longshard")


def _train(args: argparse.Namespace) -> int:
    from longshard.train.config import load_config
    from longshard.train.resolve import check_layout, resolve_model_config

    cfg = load_config(args.recipe, args.overrides)  # validate before starting any process
    nproc = args.nproc or cfg.train.nproc
    local = "WORLD_SIZE" not in os.environ  # launched here: the processes must fit this host
    if local:
        _check_host(nproc, cfg.train.device, args.nproc is not None)
    mcfg = resolve_model_config(cfg)  # an HF checkpoint's config and weight files, checked now
    dp, accum = check_layout(cfg, mcfg, nproc)  # the whole layout, before any worker exists
    resumes = _check_resumable(cfg, mcfg)  # a different run's checkpoints: one message now, not a worker's traceback
    _check_data(cfg)  # what only the data decides (enough samples for one global batch), before any worker
    if local:
        _warn_memory(cfg, mcfg, nproc, dp, args.recipe)
    if args.dry_run:
        tp, sp = cfg.parallel.tp_degree, cfg.parallel.sp_degree
        sys.stdout.write(f"ok: {nproc} processes = dp {dp} x sp {sp} ({cfg.parallel.sp_mode}) x tp {tp}, "
                         f"{accum} accumulation steps, {mcfg.n_layers} layers, {mcfg.n_query_heads} query / "
                         f"{mcfg.n_kv_heads} KV heads, seq_len {cfg.train.seq_len}; output {cfg.output_dir}\n")
        sys.stdout.write(f"resumes from {resumes} (step {int(resumes.name.split('_')[-1])})\n" if resumes else
                         "fresh start (no checkpoint to resume" + (": checkpoint.resume=none)\n"
                                                                   if cfg.checkpoint.resume == "none" else ")\n"))
        return 0
    if nproc == 1 and "WORLD_SIZE" not in os.environ:
        from longshard.train.main import main as train_main

        return train_main([args.recipe, *args.overrides])
    cmd = [sys.executable, "-m", "longshard.launch.agent", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "longshard.train.main", args.recipe, *args.overrides]
    log.info("launching: %s", " ".join(cmd))
    from longshard.launch.local import run_forwarding_signals

    rc, killed = run_forwarding_signals(cmd)
    if killed:
        log.error("a worker was killed by SIGKILL (exit -9): on a healthy host that is most often the kernel's "
                  "out-of-memory killer (see `dmesg`). Use fewer processes (train.nproc), a smaller "
                  "train.micro_batch_size or train.seq_len, or train.activation_checkpointing=full; "
                  "`longshard plan` estimates the memory per process.")
    return rc


def _check_data(cfg) -> None:
    """A prepared corpus holds at least one global batch of ``train.seq_len`` samples (every worker would
    otherwise stop with the same error after starting)."""
    if cfg.data.source != "prepared":
        return
    from longshard.train.data.prepare import read_meta

    n = read_meta(cfg.data.path)["splits"]["train"]["n_tokens"]
    samples = max((n - 1) // cfg.train.seq_len, 0)
    if samples < cfg.train.global_batch_size:
        raise ConfigError("train.global_batch_size", f"{cfg.data.path} holds {n} training tokens: {samples} samples of "
                          f"seq_len {cfg.train.seq_len}, fewer than one global batch ({cfg.train.global_batch_size}).",
                          "lower train.global_batch_size or train.seq_len, or prepare more data.")


def _check_resumable(cfg, mcfg) -> Path | None:
    """What the workers check first when they resume, checked here (``--dry-run`` too): the checkpoint
    ``checkpoint.resume`` picks (``auto``: the newest complete one in ``checkpoint.dir``) was written by
    this run's model and settings (:func:`~longshard.train.fingerprint.check_resume`). A checkpoint whose
    state cannot be read is left to the workers (they name it and fall back). Returns the checkpoint the
    run would resume from (None: a fresh start)."""
    from longshard.train.checkpoint import CheckpointError, complete_checkpoints, read_trainer_state
    from longshard.train.fingerprint import check_resume, fingerprint

    if cfg.checkpoint.resume == "none":
        return None
    resume = cfg.checkpoint.resume
    found = complete_checkpoints(cfg.checkpoint.dir) if resume == "auto" else [Path(resume)]
    if not found:
        return None
    try:
        saved = read_trainer_state(found[-1]).get("fingerprint")
    except CheckpointError:
        return found[-1]
    data = Path(cfg.data.path) if cfg.data.source == "prepared" and cfg.data.path else None
    check_resume(saved, fingerprint(cfg, mcfg, data), cfg.checkpoint.allow_changes, str(found[-1]))
    return found[-1]


def _check_host(nproc: int, device: str, from_flag: bool) -> None:
    """Refuse more local processes than this host has GPUs; warn when CPU processes outnumber the cores
    (that runs, slowly: the tests do it on purpose)."""
    import torch

    where = "--nproc" if from_flag else "train.nproc"
    if device != "cpu" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ConfigError(where, f"{nproc} processes on a host with {gpus} GPUs (one process per GPU).",
                              f"set {where}={gpus} or fewer (the layout must then fit it: dp x sp x tp), or "
                              "launch across nodes with `longshard launch slurm`.")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if nproc > cores:
        log.warning("%s=%d CPU processes on %d cores (no GPU): they share the cores and run slowly; set %s=%d "
                    "for a quick run", where, nproc, cores, where, cores)


def _warn_memory(cfg, mcfg, nproc: int, dp: int, recipe: str) -> None:
    """Warn when the planner's per-process estimate times the local processes exceeds what the host
    (CPU runs) or each GPU has, so an out-of-memory kill does not come as a surprise."""
    import torch
    from longshard.train.plan import Layout, estimate

    try:
        layout = Layout(dp, cfg.parallel.sp_degree, cfg.parallel.sp_mode, cfg.parallel.dp_mode,
                        cfg.train.activation_checkpointing, cfg.train.activation_offload, cfg.parallel.tp_degree)
        per = estimate(cfg, mcfg, layout, nproc).total
    except Exception as e:  # an estimate must never stop a run
        log.debug("no memory estimate: %s", e)
        return
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        have, what, need = torch.cuda.get_device_properties(0).total_memory, "per GPU", per
    else:
        have, what, need = _host_available_bytes(), "of host memory free", per * nproc
    if have and need > 0.9 * have:
        log.warning("the planner estimates %.1f GB (%d process(es) x %.1f GB) against %.1f GB %s: expect an "
                    "out-of-memory kill; `longshard plan %s` lists layouts that fit", need / 1e9,
                    nproc if need != per else 1, per / 1e9, have / 1e9, what, recipe)


def _host_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from longshard.train.data import build_tokenizer, prepare, prepare_default
    from longshard.train.data.prepare import iter_documents

    if args.default:
        meta = prepare_default(args.output, args.max_bytes, args.val_fraction)
    else:
        if not args.input:
            raise ConfigError("--input", "no input files given.", "pass --input FILES or --default.")
        missing = [p for p in args.input if not Path(p).exists()]
        if missing:  # before the tokenizer (a missing tokenizers package came first)
            raise ConfigError("--input", f"{missing[0]} does not exist.", "give existing files or folders.")
        meta = prepare(args.output, iter_documents(args.input, args.text_field), build_tokenizer(args.tokenizer),
                       args.val_fraction, sources=[str(p) for p in args.input], inputs=args.input)
    sys.stdout.write(json.dumps(meta, indent=2) + "\n")
    return 0


def _launch_slurm(args: argparse.Namespace) -> int:
    from longshard.launch.slurm import render_sbatch, write_sbatch
    from longshard.train.config import load_config
    from longshard.train.resolve import check_layout, resolve_model_config

    cfg = load_config(args.recipe, args.overrides)  # reject a bad recipe before it reaches the queue
    procs = args.procs_per_node or args.gpus_per_node or cfg.train.nproc
    world = args.nodes * procs
    try:  # the whole layout at this world size, as `train` will check it on the nodes
        check_layout(cfg, resolve_model_config(cfg), world)
    except ConfigError as e:
        raise ConfigError(e.field, f"with --nodes {args.nodes} x {procs} processes per node = {world} processes: "
                          f"{e.problem}", e.fix or "change --nodes / --gpus-per-node or the recipe's layout.") from None
    lead = args.signal_lead
    if lead is None:
        from longshard.launch.stop_budget import measured_save_s, signal_lead_for

        save_s = measured_save_s(cfg.checkpoint.dir)
        lead = signal_lead_for(save_s)
        log.info("signal lead %d s (%s)", lead, f"twice the {save_s:.1f} s save measured in {cfg.checkpoint.dir} + 60 s"
                 if save_s is not None else "no checkpoint measured yet: the default; the run warns at its first "
                 "save if that is too short")
    text = render_sbatch(
        args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=procs,
        overrides=args.overrides,
        job_name=args.job_name, time=args.time, partition=args.partition, account=args.account, port=args.port,
        max_restarts=args.max_restarts, cpus_per_task=args.cpus_per_task, mem=args.mem, exclusive=args.exclusive,
        log_dir=args.log_dir, python=args.python, signal_lead=lead,
    )
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    path = write_sbatch(args.output, text, args.log_dir)
    sys.stdout.write(f"wrote {path}; submit with: sbatch {path}\n")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from longshard.train.plan import as_records, format_plan, parse_bytes, plan

    mem = parse_bytes(args.gpu_mem)
    rows, best = plan(args.recipe, args.overrides, args.gpus, mem, headroom=args.headroom)
    if args.json:
        sys.stdout.write(json.dumps({"gpus": args.gpus, "gpu_mem_bytes": mem, "layouts": as_records(rows),
                                     "recommended": as_records([best])[0] if best else None}, indent=2) + "\n")
    else:
        sys.stdout.write(format_plan(rows, best, mem, show_invalid=args.all) + "\n")
    return 0 if best is not None else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longshard", description="Long-context LM training toolkit.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a recipe (starts torchrun for train.nproc local processes)")
    t.add_argument("recipe", help="recipe YAML path or shipped name (e.g. quickstart)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--nproc", type=int, default=None, help="local processes (default: train.nproc)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the config, the host and the whole layout, print it, and start nothing")
    t.set_defaults(func=_train)

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="text/jsonl files -> packed token memmap + meta.json")
    dp.add_argument("--input", nargs="*", default=[], help="files or folders (.jsonl: one document per line)")
    dp.add_argument("--output", required=True, help="output folder")
    dp.add_argument("--tokenizer", default=None, help="local tokenizer.json (default: byte-level)")
    dp.add_argument("--text-field", default="text", help="jsonl field holding the text")
    dp.add_argument("--val-fraction", type=float, default=0.01, help="share of tokens held out (whole documents)")
    dp.add_argument("--default", action="store_true", help="prepare the embedded default corpus")
    dp.add_argument("--max-bytes", type=int, default=3_000_000, help="size of the default corpus")
    dp.set_defaults(func=_data_prepare)

    la = sub.add_parser("launch", help="write launcher scripts")
    lsub = la.add_subparsers(dest="launch_command", required=True)
    sl = lsub.add_parser("slurm", help="multi-node Slurm sbatch file (srun + torchrun c10d)")
    sl.add_argument("recipe")
    sl.add_argument("overrides", nargs="*")
    sl.add_argument("--nodes", type=int, required=True)
    sl.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (one process each); 0 = CPU nodes")
    sl.add_argument("--procs-per-node", type=int, default=None,
                    help="processes per node on CPU nodes (default: the recipe's train.nproc)")
    sl.add_argument("--output", default="longshard.sbatch", help="the sbatch script to write (a file path)")
    sl.add_argument("--job-name", default="longshard", help="Slurm job name (letters, digits and . _ + -)")
    sl.add_argument("--time", default="24:00:00",
                    help="time limit (MM, HH:MM:SS, D-HH:MM...); the job checkpoints and re-queues before it")
    sl.add_argument("--partition", default=None, help="Slurm partition(s), comma-separated (default: the cluster's)")
    sl.add_argument("--account", default=None, help="Slurm account to charge (default: yours)")
    sl.add_argument("--port", type=int, default=None, help="rendezvous port (default: from the job id)")
    sl.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node task (default: cluster's)")
    sl.add_argument("--mem", default=None, help="memory per node, e.g. 480G or 0 for all (default: cluster's)")
    sl.add_argument("--exclusive", action="store_true", help="whole nodes only")
    sl.add_argument("--log-dir", default="logs", help="Slurm output folder (created)")
    sl.add_argument("--python", default=None,
                    help="interpreter on the compute nodes (default: $LONGSHARD_PYTHON or python3 there)")
    sl.add_argument("--max-restarts", type=int, default=0,
                    help="torchrun restarts of failed workers inside one job (each resumes from the newest checkpoint)")
    sl.add_argument("--signal-lead", type=int, default=None,
                    help="seconds before the time limit at which the job checkpoints and stops (default: twice the "
                    "save time measured in checkpoint.dir + 60 s, at least 120)")
    sl.add_argument("--dry-run", action="store_true", help="print the script instead of writing it")
    sl.set_defaults(func=_launch_slurm)

    e = sub.add_parser("eval", help="held-out loss, perplexity vs length, passkey grid, MQAR of a checkpoint")
    e.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX)")
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.passkey_lengths=[512,1024]")
    e.add_argument("--output", default=None, help="also write the JSON here")
    e.add_argument("--grid", action="store_true",
                   help="passkey accuracy over eval.passkey_lengths x eval.passkey_depths (passkey_grid in the JSON)")
    e.add_argument("--plot", default=None, help="write a PNG: passkey heatmap and perplexity vs context length")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="generate text from a checkpoint (optionally with the KV cache in host memory)")
    g.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX)")
    g.add_argument("overrides", nargs="*", help="key=value overrides of the saved config")
    g.add_argument("--prompt", default=None, help="prompt text")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--offload-cache-blocks", type=int, default=0,
                   help="keep the KV cache in host memory with this many device blocks per KV head "
                        "(layers whose attention reads every block keep their KV on the device); 0 = off")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--output", default=None, help="also write the JSON result here")
    g.set_defaults(func=_generate)

    pl = sub.add_parser("plan", help="per-GPU memory and communication of each parallel layout for a recipe")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key=value overrides (e.g. train.seq_len=131072)")
    pl.add_argument("--gpus", type=int, required=True, help="total GPUs")
    pl.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB")
    pl.add_argument("--headroom", type=float, default=0.9, help="share of gpu-mem the estimate may use")
    pl.add_argument("--all", action="store_true", help="also list layouts the config rejects, with the reason")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_plan)

    hd = sub.add_parser("heads", help="export retrieval/streaming head assignment from learned gates (DuoAttention)")
    hd.add_argument("checkpoint")
    hd.add_argument("--threshold", type=float, default=0.5, help="alpha above this -> retrieval (full) head")
    hd.add_argument("--output", default=None, help="also write the YAML here (merge into a recipe)")
    hd.set_defaults(func=_heads)

    x = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face folder")
    x.add_argument("checkpoint")
    x.add_argument("--output", required=True)
    x.add_argument("--arch", default=None, choices=["llama", "qwen2", "qwen3"])
    x.add_argument("--tokenizer-dir", default=None)
    x.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty folder, removing its weight files, index and config.json first")
    x.add_argument("--drop-gates", action="store_true",
                   help="export a gated model without its output gates (transformers has none; changes the model)")
    x.add_argument("--verify", action="store_true",
                   help="load the export with transformers (attn_implementation=longshard for a sparse model) and "
                   "check it gives the checkpoint's logits")
    x.set_defaults(func=_export_hf)
    add_recipe_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides may also come after the flags: `launch slurm R --nodes 2 train.steps=9`
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    try:
        return args.func(args)
    except ConfigError as e:
        log.error("invalid input: %s", e)
        return EXIT_INVALID_INPUT
    except CheckpointError as e:
        log.error("checkpoint refused: %s", e)
        return EXIT_CHECKPOINT


if __name__ == "__main__":
    sys.exit(main())
