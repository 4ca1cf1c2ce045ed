"""The commands that read a checkpoint: ``eval``, ``generate``, ``heads`` and ``export-hf`` (their
argument parsing lives in :mod:`longshard.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from longshard.errors import ConfigError
from longshard.files import write_file

log = logging.getLogger("longshard")


def _require_module(module: str, flag: str, extra: str) -> None:
    """An optional dependency a flag needs, checked before any work (ConfigError with the install line)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(flag, f"needs the optional package {module}, which is not installed.",
                          f"pip install 'longshard[{extra}]' (or pip install {module}).")


def _check_outputs(args: argparse.Namespace, *flags: str) -> None:
    """Before any work: each output file named by ``flags`` (``--output``, ``--plot``) can be written:
    its folder is created if missing and a probe file written there, or a ConfigError names the flag."""
    from longshard.train.run_lock import check_writable

    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        target = Path(value)
        if target.is_dir():
            raise ConfigError(flag, f"{target} is a folder; a file name is expected.", f"give {flag} a file path.")
        check_writable(target.parent, flag)


# What may be overridden on a saved checkpoint: how it is evaluated, never what the model is
CHECKPOINT_OVERRIDABLE = ("eval.", "logging.", "data.", "train.micro_batch_size", "train.seq_len", "train.dtype",
                          "train.device", "model.max_seq_len")


def _load_checkpoint_model(ckpt: str, overrides: list[str]):
    """The saved config (with evaluation-only overrides) and the model with the checkpoint's weights.
    Nothing of the training machine is needed: files the config names are not checked unless an
    override names them (data for a held-out loss), and the tokenizer saved in the checkpoint is used."""
    from longshard.models.model import Transformer
    from longshard.train.checkpoint import CONFIG_FILE, TOKENIZER_FILE, load_model_weights
    from longshard.train.config import load_config

    for o in overrides:
        key = o.split("=", 1)[0]
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in CHECKPOINT_OVERRIDABLE):
            raise ConfigError(key, "would change the saved model or its training settings; a checkpoint is "
                              "evaluated, generated from and exported as it was trained.",
                              f"drop {key}= (settings that may change here: "
                              f"{', '.join(a + ('*' if a.endswith('.') else '') for a in CHECKPOINT_OVERRIDABLE)}).")
    cfg_file = Path(ckpt) / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError("checkpoint", f"{cfg_file} is missing.", "give a checkpoint folder written by longshard.")
    given = {o.split("=", 1)[0] for o in overrides}
    saved_tokenizer = Path(ckpt) / TOKENIZER_FILE
    if saved_tokenizer.is_file() and "data.tokenizer" not in given:
        overrides = [*overrides, f"data.tokenizer={saved_tokenizer}"]
    cfg = load_config(cfg_file, overrides, check_files=False)
    if "data.path" in given and cfg.data.path and not Path(cfg.data.path).is_dir():
        raise ConfigError("data.path", f"{cfg.data.path} does not exist.", "give a folder made by `longshard data "
                          "prepare`, or leave data.path out (no held-out loss then).")
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).exists():
        raise ConfigError("data.tokenizer", f"{cfg.data.tokenizer} does not exist (the checkpoint holds no copy "
                          "of it).", "pass data.tokenizer=PATH to the tokenizer the model was trained with.")
    if cfg.init.hf_model == "transformers":  # the architecture is the folder's config.json; weights are ours
        from longshard.models import hf_causal
        from longshard.train.resolve import resolve_model_config

        model = hf_causal.build(cfg.init.hf_path, resolve_model_config(cfg), cfg.init.rope_scaling,
                                cfg.init.rope_factor, weights=False)
    else:
        model = Transformer(cfg.model)
    load_model_weights(ckpt, model)
    return cfg, model


def _eval(args: argparse.Namespace) -> int:
    import torch
    from longshard.train.data import TokenWindows, build_tokenizer
    from longshard.train.evaluate import evaluate_config, passkey_grid, plot_results
    from longshard.train.precision import compute_dtype
    from longshard.train.resolve import check_passkey_lengths, passkey_lengths

    _check_outputs(args, "--output", "--plot")
    if args.plot:
        _require_module("matplotlib", "--plot", "eval")
    cfg, model = _load_checkpoint_model(args.checkpoint, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    val = None
    data = cfg.data_dir
    has_data = data is not None and (data / "meta.json").is_file()
    if has_data:
        val = TokenWindows(data, "val", cfg.train.seq_len)
    elif data is not None:
        log.warning("no held-out loss: the training data (%s) is not on this machine; pass data.path=DIR (a "
                    "`longshard data prepare` folder) to measure it", data)
    autocast = compute_dtype(cfg.train.dtype)  # what the trainer evaluated in (fp16 too)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    lengths = passkey_lengths(cfg)
    check_passkey_lengths(tokenizer, lengths if cfg.eval.passkey_samples else [])
    res = evaluate_config(model, cfg, val_dataset=val, tokenizer=tokenizer, device=device, passkey=not args.grid)
    if args.grid and cfg.eval.passkey_samples:
        model.eval()
        grid = passkey_grid(model, tokenizer, lengths, list(cfg.eval.passkey_depths), cfg.eval.passkey_samples,
                            device, autocast)
        res["passkey_grid"] = grid
        for n, row in grid.items():
            res[f"passkey_acc@{n}"] = sum(row.values()) / len(row)
    no_plot = None
    if args.plot:
        try:
            res["plot"] = plot_results(res, args.plot)
        except ValueError as e:  # the results are still printed and written below
            no_plot = ConfigError("--plot", f"{e}: the evaluation above has no passkey grid and no ppl@L.",
                                  "add --grid (passkey heatmap) or eval.ppl_lengths=[...] (perplexity by length).")
    if cfg.logging.wandb != "disabled":
        _eval_to_wandb(cfg, args.checkpoint, res)
    text = json.dumps({"checkpoint": args.checkpoint, **res}, indent=2)
    if args.output:
        write_file(args.output, text + "\n")
    sys.stdout.write(text + "\n")
    if no_plot is not None:
        raise no_plot
    return 0


def _eval_to_wandb(cfg, checkpoint: str, res: dict) -> None:
    """The scalars, the passkey grid as a table and the plot as an image, logged to the training run's own
    wandb run when its folder holds one (its id: no second run in the training folder), else to a new run
    grouped with the recipe's."""
    import wandb
    from longshard.train.metrics import wandb_run_id

    # the training folder: the checkpoint's grandparent (output_dir/checkpoints/step_N) or the saved output_dir
    folders = [Path(checkpoint).resolve().parent.parent, Path(cfg.output_dir)]
    found = next(((f, i) for f in folders if f.is_dir() and (i := wandb_run_id(f, create=False))), None)
    if found is not None:
        run = wandb.init(mode=cfg.logging.wandb, dir=str(found[0]), project=cfg.logging.project, id=found[1],
                         resume="allow", settings=wandb.Settings(quiet=True))
    else:
        run = wandb.init(mode=cfg.logging.wandb, dir=str(cfg.output_dir), project=cfg.logging.project,
                         name=f"eval-{Path(checkpoint).name}", group=cfg.name, job_type="eval",
                         settings=wandb.Settings(quiet=True))
    # the names training logs (val_loss, mqar_acc, passkey_acc@L, ...): one name per figure in both
    run.log({k: v for k, v in res.items() if isinstance(v, (int, float))})
    grid = res.get("passkey_grid")
    if grid:
        rows = [[int(n), float(d), acc] for n, row in grid.items() for d, acc in row.items()]
        run.log({"passkey_grid": wandb.Table(columns=["length", "depth", "accuracy"], data=rows)})
    if res.get("plot"):
        run.log({"passkey_grid_plot": wandb.Image(res["plot"])})
    run.finish()


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch
    from longshard.models.model import InferenceCache
    from longshard.models.offload import OffloadedCache, generate_steps
    from longshard.train.data import build_tokenizer

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}.")
    if not 0 <= args.temperature < float("inf"):  # nan and negatives used to decode greedily without a word
        raise ConfigError("--temperature", f"must be a finite number >= 0 (0: greedy), got {args.temperature}.")
    if args.prompt is None and args.prompt_file is None:
        raise ConfigError("--prompt", "no prompt given.", "pass --prompt TEXT or --prompt-file PATH.")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise ConfigError("--prompt-file", f"{args.prompt_file} does not exist.")
    _check_outputs(args, "--output")
    cfg, model = _load_checkpoint_model(args.checkpoint, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    tok = build_tokenizer(cfg.data.tokenizer)
    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    ids = tok.encode(text)
    if not ids:
        raise ConfigError("--prompt", "the prompt encodes to no tokens.")
    trained, limit = cfg.train.seq_len, cfg.model.max_seq_len
    if len(ids) + args.max_new_tokens > trained:
        log.warning("the prompt (%d tokens) plus --max-new-tokens %d exceeds the trained length %d%s: beyond it "
                    "the model extrapolates and its output is not what it learned", len(ids), args.max_new_tokens,
                    trained, f" (and model.max_seq_len {limit})" if len(ids) + args.max_new_tokens > limit else "")
    cache = OffloadedCache(args.offload_cache_blocks) if args.offload_cache_blocks else InferenceCache()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    new = [int(t) for t in torch.cat(list(generate_steps(
        model, torch.tensor([ids], device=device), args.max_new_tokens, cache, args.temperature, gen)), 1)[0]]
    elapsed = time.perf_counter() - start
    result = {"checkpoint": args.checkpoint, "prompt_tokens": len(ids), "new_tokens": len(new),
              "text": tok.decode(new), "seconds": round(elapsed, 3), "tokens_per_s": round(len(new) / elapsed, 2)}
    if isinstance(cache, OffloadedCache):
        steps = max(cache.stats.decode_steps, 1)
        result["offload"] = {**cache.stats.snapshot(), "bytes_per_step": cache.stats.h2d_bytes / steps,
                             "host_kv_bytes": cache.host_bytes(), "device_kv_bytes": cache.device_kv_bytes(),
                             "full_kv_layers": sorted(cache.stats.full_kv_layers)}
    out = json.dumps(result, indent=2)
    if args.output:
        write_file(args.output, out + "\n")
    sys.stdout.write(out + "\n")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from longshard.models.hf_causal import HFCausalLM
    from longshard.models.hf_export import export_hf, export_transformers_model, prepare_export_dir

    prepare_export_dir(args.output, args.overwrite, check_only=True)  # refused before the checkpoint is read
    _, model = _load_checkpoint_model(args.checkpoint, [])
    if args.verify:
        _require_module("transformers", "--verify", "transformers")
    if isinstance(model, HFCausalLM):  # trained as a transformers model: written back as one
        if args.arch or args.drop_gates:
            raise ConfigError("--arch" if args.arch else "--drop-gates", "does not apply to a model trained with "
                              "init.hf_model=transformers (it is written as the architecture it was loaded as).",
                              "leave it out.")
        path = export_transformers_model(model, args.output, tokenizer_dir=args.tokenizer_dir,
                                         overwrite=args.overwrite)
    else:
        path = export_hf(model, args.output, arch=args.arch, tokenizer_dir=args.tokenizer_dir,
                         drop_gates=args.drop_gates, overwrite=args.overwrite)
    sys.stdout.write(f"wrote Hugging Face checkpoint {path}\n")
    if args.verify:
        from longshard.models.hf_attention import verify_export

        impl, err = verify_export(model, path)
        sys.stdout.write(f"transformers (attn_implementation={impl}) gives the checkpoint's logits: max relative "
                         f"error {err:.1e}\n")
    return 0


def _heads(args: argparse.Namespace) -> int:
    import yaml
    from longshard.models.attention.streaming import retrieval_assignment

    _check_outputs(args, "--output")
    cfg, model = _load_checkpoint_model(args.checkpoint, [])
    assignment = retrieval_assignment(model, args.threshold)
    if not assignment:
        raise ConfigError("checkpoint", "the model has no streaming_gated layers (learned gates to export).")
    attention = []
    for i in range(cfg.model.n_layers):
        spec = cfg.model.layer_attention(i)
        if i in assignment:
            opts = {k: v for k, v in spec.options.items() if k != "gate_l1"}
            attention.append({"name": "streaming", "options": {**opts, "retrieval_heads": assignment[i]},
                              "gate": spec.gate})
        else:
            attention.append({"name": spec.name, "options": dict(spec.options), "gate": spec.gate})
    class _PlainDumper(yaml.SafeDumper):  # no &id001 anchors for values that appear twice
        def ignore_aliases(self, data):  # noqa: ARG002 - yaml's signature
            return True

    text = yaml.dump({"retrieval_heads": assignment, "model": {"attention": attention}}, Dumper=_PlainDumper,
                     sort_keys=False)
    if args.output:
        write_file(args.output, text)
    sys.stdout.write(text)
    return 0
