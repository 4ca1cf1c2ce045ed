"""Render the multi-node Slurm sbatch template for a recipe."""

from __future__ import annotations

import re
import shlex
import sys
from importlib import resources
from pathlib import Path

from longshard.errors import ConfigError, require_positive


def render_sbatch(
    recipe: str,
    *,
    nodes: int,
    gpus_per_node: int,
    overrides: list[str] | None = None,
    job_name: str = "longshard",
    time: str = "24:00:00",
    cpus_per_task: int = 32,
    port: int = 29500,
    max_restarts: int = 0,
    log_dir: str = "logs",
    partition: str | None = None,
    account: str | None = None,
    python: str | None = None,
) -> str:
    """The sbatch script text for ``recipe`` on ``nodes`` x ``gpus_per_node`` GPUs.

    Args:
        recipe: recipe path or shipped name (passed to ``longshard.train.main``).
        nodes: Slurm nodes (one task each).
        gpus_per_node: processes torchrun starts per node.
        overrides: ``key=value`` recipe overrides.
        job_name, time, cpus_per_task, partition, account: Slurm settings.
        port: c10d rendezvous port on the first node.
        max_restarts: torchrun restarts on worker failure (resume is automatic).
        log_dir: folder for Slurm's output file.
        python: interpreter on the compute nodes; default the current one.
    """
    require_positive(nodes, "--nodes")
    require_positive(gpus_per_node, "--gpus-per-node")
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    values = {
        "job_name": job_name, "nodes": nodes, "gpus_per_node": gpus_per_node, "cpus_per_task": cpus_per_task,
        "time": time, "log_dir": log_dir, "extra_sbatch": "\n".join(extra), "port": port,
        "max_restarts": max_restarts, "python": python or sys.executable, "recipe": shlex.quote(recipe),
        "overrides": " ".join(shlex.quote(o) for o in overrides or []),
    }
    text = (resources.files("longshard") / "launch" / "slurm.sbatch").read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{(\w+)\}\}", text)
    if left:
        raise ConfigError("launch slurm", f"template placeholders without values: {left}.")
    return text


def write_sbatch(path: str | Path, text: str) -> Path:
    """Write the script (executable)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(0o755)
    return p
