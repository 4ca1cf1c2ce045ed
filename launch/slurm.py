"""Render the multi-node Slurm sbatch template for a recipe."""

from __future__ import annotations

import re
import shlex
from importlib import resources
from pathlib import Path

from longshard.errors import ConfigError, require_positive
from longshard.files import check_path_names, default_mode, write_file
from longshard.launch.stop_budget import DEFAULT_LEAD_S

# What each value written into an ``#SBATCH`` line may hold. Those lines are read by sbatch, and a
# newline in a value would start a shell line of the script; quotes, ``$`` and ``%`` would be read by
# sbatch or Slurm's filename patterns. Values that reach the shell command line are shlex-quoted instead.
_SBATCH_VALUES = {
    "--job-name": (r"[A-Za-z0-9._+-]{1,200}", "letters, digits and . _ + -"),
    "--time": (r"[0-9]+(-[0-9]+)?(:[0-9]+){0,2}|[0-9]+(:[0-9]+){0,2}|UNLIMITED|INFINITE",
               "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    "--partition": (r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", "a partition name (or a comma list)"),
    "--account": (r"[A-Za-z0-9._-]+", "letters, digits and . _ -"),
    "--mem": (r"[0-9]+[KMGT]?", "a number with an optional K/M/G/T suffix, e.g. 480G (0 = all)"),
    "--log-dir": (r"[A-Za-z0-9._/+-]+", "a path of letters, digits and . _ / + - (no spaces, quotes, $ or %)"),
}


def _check_sbatch_value(flag: str, value: str | None) -> None:
    if value is None:
        return
    pattern, allowed = _SBATCH_VALUES[flag]
    if not re.fullmatch(pattern, value):
        raise ConfigError(flag, f"{value!r} cannot be written into an #SBATCH line safely.", f"use {allowed}.")


def render_sbatch(
    recipe: str,
    *,
    nodes: int,
    gpus_per_node: int,
    procs_per_node: int | None = None,
    overrides: list[str] | None = None,
    job_name: str = "longshard",
    time: str = "24:00:00",
    cpus_per_task: int | None = None,
    mem: str | None = None,
    exclusive: bool = False,
    port: int | None = None,
    max_restarts: int = 0,
    log_dir: str = "logs",
    partition: str | None = None,
    account: str | None = None,
    python: str | None = None,
    signal_lead: int = DEFAULT_LEAD_S,
) -> str:
    """The sbatch script text for ``recipe`` on ``nodes`` nodes of ``gpus_per_node`` GPUs (0: CPU nodes).

    Args:
        recipe: recipe path or shipped name (passed to ``longshard.train.main``).
        nodes: Slurm nodes (one task each).
        gpus_per_node: GPUs per node, one process each; 0 for CPU nodes (no GPU request is written).
        procs_per_node: processes torchrun starts per node (default: ``gpus_per_node``; required on
            CPU nodes).
        overrides: ``key=value`` recipe overrides; a ``checkpoint.resume=...`` among them is used by
            the first launch, re-queued launches resume from their own newest checkpoint.
        job_name, time, partition, account: Slurm settings.
        cpus_per_task, mem, exclusive: node resources (omitted: the cluster's defaults); OpenMP
            threads per process = cpus per task / processes.
        port: c10d rendezvous port on the first node; default derived from the job id (20000-39999),
            so two jobs sharing a node do not collide.
        max_restarts: torchrun restarts on worker failure (resume is automatic).
        log_dir: folder for Slurm's output file (created by :func:`write_sbatch`).
        python: interpreter on the compute nodes; default ``$LONGSHARD_PYTHON`` or ``python3`` there.
        signal_lead: seconds before the time limit at which Slurm sends USR1 (the stop's checkpoint must
            fit: see :func:`~longshard.launch.stop_budget.signal_lead_for`).
    """
    for flag, value in (("--job-name", job_name), ("--time", time), ("--partition", partition),
                        ("--account", account), ("--mem", mem), ("--log-dir", log_dir)):
        _check_sbatch_value(flag, value)
    require_positive(nodes, "--nodes")
    if not 30 <= signal_lead <= 65535:  # Slurm's own upper bound on the --signal time
        raise ConfigError("--signal-lead", f"{signal_lead} s is not a usable warning time.", "give 30-65535 seconds.")
    if gpus_per_node < 0:
        raise ConfigError("--gpus-per-node", f"must be >= 0, got {gpus_per_node}.", "give 0 for CPU nodes.")
    procs = procs_per_node if procs_per_node is not None else gpus_per_node
    require_positive(procs, "--procs-per-node")
    if gpus_per_node and procs != gpus_per_node:
        raise ConfigError("--procs-per-node", f"{procs} processes on nodes of {gpus_per_node} GPUs (one process per "
                          "GPU).", "omit --procs-per-node on GPU nodes.")
    if cpus_per_task is not None:
        require_positive(cpus_per_task, "--cpus-per-task")
    if port is not None and not 1024 <= port <= 65535:
        raise ConfigError("--port", f"{port} is not a usable TCP port.", "give 1024-65535, or omit it.")
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    extra += [f"#SBATCH --cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    extra += [f"#SBATCH --mem={mem}"] if mem else []
    extra += ["#SBATCH --exclusive"] if exclusive else []
    rest = [o for o in overrides or [] if not o.startswith("checkpoint.resume=")]
    first = [o for o in overrides or [] if o.startswith("checkpoint.resume=")]
    values = {
        "job_name": job_name, "nodes": nodes, "procs": procs,
        "gpu_line": f"#SBATCH --gpus-per-node={gpus_per_node}" if gpus_per_node else "# CPU nodes: no GPU request",
        "time": time, "log_dir": log_dir, "signal_lead": signal_lead, "extra_sbatch": "\n".join(extra),
        "port": port if port is not None else "$(( 20000 + SLURM_JOB_ID % 20000 ))",
        "max_restarts": max_restarts, "python": shlex.quote(python) if python else '"${LONGSHARD_PYTHON:-python3}"',
        "recipe": shlex.quote(recipe), "overrides": " ".join(shlex.quote(o) for o in rest),
        "first_resume": shlex.quote(first[-1] if first else "checkpoint.resume=auto"),
    }
    template = (resources.files("longshard") / "launch" / "slurm.sbatch").read_text()
    return fill_template(template, values)


def fill_template(template: str, values: dict[str, object]) -> str:
    """Every ``{{name}}`` of ``template`` replaced by ``values[name]`` in one pass over the template: a
    value that itself holds ``{{...}}`` (an override, a --python path, a recipe file name) is written as
    it is, never expanded again (raises ConfigError for a placeholder without a value)."""
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values))
    if missing:
        raise ConfigError("launch slurm", f"template placeholders without values: {missing}.")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), template)


def write_sbatch(path: str | Path, text: str, log_dir: str | Path | None = None) -> Path:
    """Write the script (executable) and create ``log_dir`` (Slurm does not create its output folder:
    a job whose folder is missing fails without a log). A relative ``log_dir`` is relative to the
    folder ``sbatch`` is run from, as Slurm resolves it; here the current one."""
    p = Path(path)
    check_path_names(p, "--output")
    if p.is_dir():
        raise ConfigError("--output", f"{p} is a folder.", "give the path of the script file to write, e.g. "
                          f"{p / 'job.sbatch'}.")
    if log_dir is not None:
        check_path_names(Path(log_dir), "--log-dir")
        if Path(log_dir).exists() and not Path(log_dir).is_dir():
            raise ConfigError("--log-dir", f"{log_dir} is a file, not a folder.", "give a folder for Slurm's logs.")
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("--log-dir", f"cannot create {log_dir}: {e.strerror or e}.",
                              "give a folder you can write.") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    write_file(p, text, mode=default_mode(0o755))  # a fresh file, renamed into place: never through a link
    return p
