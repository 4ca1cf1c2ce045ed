"""Full and read-only disks: named errors, and the previous checkpoint survives."""

from __future__ import annotations

import re

import pytest
from train_runs import _run

pytestmark = pytest.mark.dist


def test_full_disk_is_named_and_the_previous_checkpoint_survives(tmp_path, data_dir, env_cpu, small_disk):
    """A 3 MB disk holds one ~1.9 MB checkpoint: the second is refused before a byte is written, with
    an error naming the folder, the MB needed and free, and the fix (was torch's "unexpected pos N vs
    M"); no temp folder is left, the first checkpoint is complete and its weights load."""
    from longshard.train.checkpoint import complete_checkpoints

    out = small_disk("3m") / "r"
    proc = _run(2, out, data_dir, ["train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=1"], env_cpu,
                check=False)
    assert proc.returncode != 0
    found = re.search(r"no space left on device writing \S+step_00000002\.tmp: about ([\d.]+) MB needed, "
                      r"([\d.]+) MB free before writing", proc.stderr)
    assert found, proc.stderr[-3000:]
    assert float(found.group(1)) > float(found.group(2))
    assert "checkpoint.keep_last" in proc.stderr and "step_00000001) is intact" in proc.stderr
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000001"]
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.fixture
def one_gloo_rank():
    """A gloo process group of one rank for a checkpoint save in this process (left as found)."""
    import torch.distributed as dist

    fresh = not dist.is_initialized()
    if fresh:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if fresh:
        dist.destroy_process_group()


def test_disk_full_while_writing_is_named(tmp_path, small_disk, monkeypatch, one_gloo_rank):
    """When the estimate misses (another writer filled the disk), the failure inside DCP / torch.save is
    recognised as ENOSPC, the partial folder removed and the error names it (one gloo rank, 512 KB disk,
    a 1 MB model, the pre-flight estimate forced to 0)."""
    import torch
    from longshard.train.checkpoint import Checkpointer, CheckpointError, DCPStates

    root = small_disk("512k") / "ckpt"
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = Checkpointer(root, keep_last=1, rank=0)
    monkeypatch.setattr(Checkpointer, "_bytes_needed", lambda self, states, snapshot: 0)
    with pytest.raises(CheckpointError, match=r"no space left on device writing \S+step_00000001\.tmp"):
        ckpt.save(1, DCPStates(model, opt), sched, {})
    assert not (root / "step_00000001.tmp").exists() and not (root / "step_00000001").exists()


@pytest.mark.parametrize("last", ["config.yaml", "trainer_state.json"])
def test_disk_full_on_the_last_kilobytes_is_named(tmp_path, monkeypatch, last, one_gloo_rank):
    """With 12-16 KB of slack the disk filled while rank 0 wrote config.yaml or the state file after the
    shards: a raw ENOSPC and a ``.tmp`` folder were left. Now the same named error, nothing left."""
    import errno

    import torch
    from longshard.train import checkpoint as ck

    real = ck.write_file

    def full(path, data, *a, **k):
        if path.name == last:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, *a, **k)

    monkeypatch.setattr(ck, "write_file", full)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ck.CheckpointError, match=r"no space left on device writing \S+step_00000001\.tmp"):
        ck.Checkpointer(tmp_path / "c", 1, 0, "a: 1").save(1, ck.DCPStates(model, opt), sched, {"loader": {}})
    assert list((tmp_path / "c").iterdir()) == []


def test_read_only_output_dir_is_named_before_work(tmp_path, data_dir, env_cpu, small_disk):
    """A read-only output_dir (or checkpoint.dir) is a ConfigError naming the field and errno, not a
    PermissionError traceback from the first write."""
    ro = small_disk("1m", read_only=True)
    proc = _run(2, ro / "r", data_dir, ["train.steps=2"], env_cpu, check=False)
    assert proc.returncode != 0
    assert re.search(r"invalid configuration: output_dir: cannot write to \S+/r: Read-only file system", proc.stderr), \
        proc.stderr[-3000:]
    proc = _run(1, tmp_path / "ok", data_dir, ["train.steps=2", f"checkpoint.dir={ro}/ckpt"], env_cpu, check=False)
    assert proc.returncode == 2 and "invalid configuration: checkpoint.dir: cannot write to" in proc.stderr
    assert not (tmp_path / "ok" / ".lock").exists()  # the lock taken before the check is released

