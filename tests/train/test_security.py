"""Attacks on what longshard loads and writes, as an attacker or a careless user would make them.

- Checkpoints whose pickles would run code: each payload runs a command under Python's own unpickler
  (checked, so the gadget is real) and must be refused by name, with nothing run, by the restricted
  reader and by every command that loads a checkpoint.
- Runs sharing folders, the Slurm script, malformed state files, a different model in a used folder.
  (Tampered safetensors headers, exports, outputs, overrides and moved checkpoints: test_security_files.py.)
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from attack_helpers import run_sbatch_with_stub_srun
from attack_helpers import tamper as _tamper
from longshard.errors import EXIT_CHECKPOINT, CheckpointError, UnsafeCheckpointError
from longshard.train.safe_pickle import DCP_METADATA_GLOBALS, UnsafePickleError, restricted_loads

DOTTED = ("torch.distributed.checkpoint._async_executor", "os.system")  # resolves to os.system under protocol 4


def _s(text: str) -> bytes:
    """SHORT_BINUNICODE (or BINUNICODE) opcode pushing ``text``."""
    b = text.encode()
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + len(b).to_bytes(4, "little")) + b


def gadget(genuine: bytes, module: str, name: str, command: str) -> bytes:
    """A pickle that calls ``module.name(command)``, drops the result and goes on with ``genuine``: under
    a plain unpickler the checkpoint then loads normally and nobody notices."""
    return b"\x80\x04" + _s(module) + _s(name) + b"\x93" + _s(command) + b"\x85R0" + genuine


@pytest.fixture
def genuine(tmp_path) -> Path:
    """A real DCP checkpoint folder (tensors, a bf16 tensor, optimizer-like bytes entries)."""
    folder = tmp_path / "genuine"
    dcp.save({"w": torch.randn(3, 2), "h": torch.zeros(5, dtype=torch.bfloat16),
              "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]}, checkpoint_id=str(folder))
    return folder


def test_the_dotted_gadget_runs_under_plain_pickle_and_is_refused_here(genuine, tmp_path):
    data = (genuine / ".metadata").read_bytes()
    assert type(restricted_loads(data)).__name__ == "Metadata"
    assert restricted_loads(data) == pickle.loads(data)  # the same object as DCP's own reader builds
    marker = tmp_path / "PWNED"
    payload = gadget(data, *DOTTED, f"touch {marker}")
    assert type(pickle.loads(payload)).__name__ == "Metadata" and marker.exists()  # the attack is real
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=r"refusing to load global \('torch\.distributed\.checkpoint\."
                                                r"_async_executor', 'os\.system'\) \(a dotted name\)"):
        restricted_loads(payload)
    assert not marker.exists()


@pytest.mark.parametrize("module", sorted({m for m, _ in DCP_METADATA_GLOBALS}))
@pytest.mark.parametrize("name", ["os.system", "os", "system", "__builtins__", "Size.__init__"])
def test_a_gadget_through_every_allowed_module_is_refused(genuine, tmp_path, module, name):
    marker = tmp_path / "PWNED"
    with pytest.raises(UnsafePickleError, match=r"refusing to load global"):
        restricted_loads(gadget((genuine / ".metadata").read_bytes(), module, name, f"touch {marker}"))
    assert not marker.exists()


class _Reduce:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def _ops(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts) + b"."


OPCODE_ATTACKS = {
    # __reduce__ of an object: GLOBAL os.system + REDUCE
    "reduce": (pickle.dumps(_Reduce()), r"refusing to load global (posix|os)\.system"),
    # protocol 0/1 instantiation opcodes (they call find_class and then the class)
    "INST": (b"(S'true'\nios\nsystem\n.", r"refusing opcode INST"),
    "OBJ": (_ops(b"(", _s("pathlib"), _s("PosixPath"), b"\x93", _s("x"), b"o"), r"refusing opcode OBJ"),
    # the copyreg extension registry and persistent ids
    "EXT1": (_ops(b"\x82\x01"), r"refusing opcode EXT1"),
    "EXT2": (_ops(b"\x83\x01\x00"), r"refusing opcode EXT2"),
    "PERSID": (b"P0\n.", r"persistent id"),
    # BUILD on a class object: plain pickle would setattr on pathlib.PosixPath itself (class poisoning)
    "BUILD on a class": (_ops(_s("pathlib"), _s("PosixPath"), b"\x93N}", _s("poisoned"), b"\x88s\x86b"),
                         r"refusing BUILD of <class 'type'>"),
    # REDUCE on a record class (only the listed constructors may be called)
    "REDUCE of a record": (_ops(_s("torch.distributed.checkpoint.metadata"), _s("Metadata"), b"\x93)R"),
                           r"refusing REDUCE of <class"),
    # NEWOBJ of a callable that is not a record class
    "NEWOBJ of a callable": (_ops(_s("torch.serialization"), _s("_get_layout"), b"\x93)\x81"), r"refusing NEWOBJ"),
    # APPEND / SETITEM on something that is not a list / dict calls its own method
    "SETITEM on a path": (_ops(_s("pathlib"), _s("PosixPath"), b"\x93", _s("x"), b"\x85R", _s("k"), _s("v"), b"s"),
                          r"refusing SETITEM on a PosixPath"),
}


@pytest.mark.parametrize("attack", sorted(OPCODE_ATTACKS))
def test_every_code_running_opcode_is_refused_by_name(attack):
    data, message = OPCODE_ATTACKS[attack]
    with pytest.raises(UnsafePickleError, match=message):
        restricted_loads(data)
    assert not hasattr(__import__("pathlib").PosixPath, "poisoned")


def test_build_on_a_class_poisons_it_under_plain_pickle():
    """The BUILD attack above is real: Python's unpickler sets an attribute on the class itself."""
    import pathlib

    data, _ = OPCODE_ATTACKS["BUILD on a class"]
    try:
        pickle.loads(data)
        assert pathlib.PosixPath.poisoned is True
    finally:
        if hasattr(pathlib.PosixPath, "poisoned"):
            del pathlib.PosixPath.poisoned


def test_metadata_naming_files_outside_the_checkpoint_is_refused(genuine):
    from longshard.train.checkpoint import read_metadata_safe

    meta = restricted_loads((genuine / ".metadata").read_bytes())
    for bad in ("../../etc/passwd", "/etc/passwd", ".."):
        for info in meta.storage_data.values():
            info.relative_path = bad
        (genuine / ".metadata").write_bytes(pickle.dumps(meta))
        with pytest.raises(UnsafeCheckpointError, match="not a file of this checkpoint folder"):
            read_metadata_safe(genuine)


def test_a_file_swapped_after_the_check_is_still_refused(genuine, tmp_path, monkeypatch):
    """DCP never unpickles .metadata itself: the safe reader's one read is the check and the use."""
    import longshard.train.checkpoint as ck
    from longshard.train.checkpoint import SafeFileSystemReader, SafeLoadPlanner

    marker = tmp_path / "PWNED"
    data = (genuine / ".metadata").read_bytes()
    ck.check_metadata_safe(genuine)  # passes: the genuine file
    (genuine / ".metadata").write_bytes(gadget(data, *DOTTED, f"touch {marker}"))  # the attacker wins the race
    state = {"w": torch.zeros(3, 2), "h": torch.ones(5, dtype=torch.bfloat16), "param_groups": None}
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata would run code.*a dotted name"):
        ck.read_dcp(state, genuine)
    reader = SafeFileSystemReader(str(genuine))
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException):  # DCP's own load with our reader: refused too (DCP wraps it)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    assert isinstance(reader.refused, UnsafeCheckpointError)
    assert not marker.exists()
    (genuine / ".metadata").write_bytes(data)
    state = {"w": torch.zeros(3, 2), "h": torch.ones(5, dtype=torch.bfloat16),
             "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(genuine)), planner=SafeLoadPlanner())
    assert state["param_groups"] == [{"lr": 1e-3, "betas": (0.9, 0.95)}] and not state["h"].any()


# --- through the commands -------------------------------------------------------------------------

COMMANDS = {
    "train (resume)": lambda out, ck, tmp: ["train", "tiny_lm", "train.nproc=1", "train.steps=3",
                                            "checkpoint.every=1", "train.global_batch_size=4",
                                            "data.default_corpus_bytes=100000", "eval.passkey_samples=0",
                                            "eval.val_batches=1", "logging.wandb=disabled", f"output_dir={out}"],
    "eval": lambda out, ck, tmp: ["eval", str(ck), "eval.passkey_samples=0", "logging.wandb=disabled"],
    "generate": lambda out, ck, tmp: ["generate", str(ck), "--prompt", "Once", "--max-new-tokens", "2"],
    "export-hf": lambda out, ck, tmp: ["export-hf", str(ck), "--output", str(tmp / "hf")],
}


def _zip_with_gadget(data: bytes, command: str) -> bytes:
    """``data`` (a torch.save zip) with its pickle replaced by one that calls os.system first."""
    import io
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename.endswith("data.pkl"):  # protocol 2, GLOBAL: what torch.save writes
                body = b"\x80\x02cos\nsystem\n" + _s(command) + b"\x85R0" + body[2:]
            dst.writestr(info, body)
    return buf.getvalue()


def _rewrite_dcp_entry(ckpt: Path, kind: str, command: str) -> None:
    """Replace the first DCP entry of ``kind`` (``tensor``: a model weight; ``bytes``: an optimizer
    param_groups value) by a gadget zip, moving the other entries and fixing .metadata and the manifest."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = restricted_loads((ckpt / ".metadata").read_bytes())
    want = BytesStorageMetadata if kind == "bytes" else type(meta.state_dict_metadata[
        next(k for k in meta.state_dict_metadata if k.startswith("model."))])
    target = next(i for i in meta.storage_data if isinstance(meta.state_dict_metadata[i.fqn], want)
                  and i.fqn.startswith("model." if kind == "tensor" else "optim."))
    files: dict[str, bytes] = {}
    for name in {info.relative_path for info in meta.storage_data.values()}:
        old = (ckpt / name).read_bytes()
        parts = sorted((info.offset, i) for i, info in meta.storage_data.items() if info.relative_path == name)
        out = b""
        for _, index in parts:
            info = meta.storage_data[index]
            piece = old[info.offset:info.offset + info.length]
            if index == target:
                piece = _zip_with_gadget(piece, command)
            info.offset, info.length = len(out), len(piece)
            out += piece
        files[name] = out
    files[".metadata"] = pickle.dumps(meta)
    for name, data in files.items():
        _tamper(ckpt, name, data)


@pytest.mark.parametrize("file", [".metadata", "rank_0.pt", "tensor entry", "bytes entry"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_code_running_checkpoint(small_run, tmp_path, monkeypatch, caplog, command, file):
    """Each tampered file is refused by name by every command that reads it, with nothing run; a command
    that never reads that file (eval does not read the optimizer) is unaffected and runs nothing."""
    import re
    import shutil

    from longshard.cli import main

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    ckpt = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "PWNED"
    if file == ".metadata":
        _tamper(ckpt, file, gadget((ckpt / file).read_bytes(), *DOTTED, f"touch {marker}"))
        expect = r"\.metadata would run code.*a dotted name"
    elif file == "rank_0.pt":
        _tamper(ckpt, file, _zip_with_gadget((ckpt / file).read_bytes(), f"touch {marker}"))
        expect = r"rank_0\.pt would import more than tensors.*GLOBAL (posix|os)\.system"
    else:
        _rewrite_dcp_entry(ckpt, file.split()[0], f"touch {marker}")
        expect = r"step_00000002: .*GLOBAL (posix|os)\.system"
    monkeypatch.chdir(tmp_path)
    rc = main(COMMANDS[command](out, ckpt, tmp_path))
    assert not marker.exists()
    if not command.startswith("train") and file in ("rank_0.pt", "bytes entry"):
        assert rc == 0  # weights only: the training state is never read
        return
    assert rc == EXIT_CHECKPOINT
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(re.search(expect, m) for m in errors), [m[:400] for m in errors]
    assert not (tmp_path / "hf").exists()
    if command.startswith("train"):  # no fall back to step 1 past a tampered checkpoint, nothing new written
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_loading_a_tmp_folder_or_a_malformed_state_is_refused(small_run, tmp_path):
    import shutil

    from longshard.models.model import Transformer
    from longshard.train.checkpoint import load_model_weights
    from longshard.train.config import load_config

    src = small_run / "checkpoints" / "step_00000002"
    model = Transformer(load_config(src / "config.yaml", []).model)
    tmp = tmp_path / "step_00000002.tmp"
    shutil.copytree(src, tmp)
    with pytest.raises(CheckpointError, match=r"an unfinished write"):
        load_model_weights(tmp, model)
    for case, (field, value, message) in enumerate([
        ("files", {"x": "12"}, r"files\['x'\] is '12'"),
        ("files", {"../../etc/passwd": [1, 2]}, r"files\['\.\./\.\./etc/passwd'\]"),
        ("loader", [1, 2], r"loader is \[1, 2\]"),
        ("step", 7, r"step is 7, the folder says 2"),
        (None, [1, 2], r"the file holds a list"),
    ]):
        bad = tmp_path / f"case{case}" / "step_00000002"
        shutil.copytree(src, bad)
        state = json.loads((bad / "trainer_state.json").read_text())
        if field is None:
            state = value
        else:
            state[field] = value
        (bad / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match=message):
            load_model_weights(bad, model)


# --- runs sharing folders -------------------------------------------------------------------------

def test_a_second_run_on_a_used_checkpoint_dir_is_refused_before_writing(small_run, tmp_path, caplog):
    """Run A (a live holder) writes its checkpoints under A/checkpoints; run B with another output_dir
    and checkpoint.dir=A/checkpoints is refused naming A's process, and writes nothing anywhere."""
    import os
    import shutil

    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT
    from longshard.train.run_lock import RunLocks

    a = tmp_path / "a"
    shutil.copytree(small_run, a)
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    held = RunLocks([(a, "output_dir"), (a / "checkpoints", "checkpoint.dir")])
    held.acquire()  # run A, alive (this process)
    try:
        b = tmp_path / "b"
        rc = main(["train", "tiny_lm", "train.nproc=1", "train.steps=3", "train.global_batch_size=4",
                   "data.default_corpus_bytes=100000", "logging.wandb=disabled", f"output_dir={b}",
                   f"checkpoint.dir={a / 'checkpoints'}"])
        assert rc == EXIT_INVALID_INPUT
        errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert f"checkpoint.dir: {a / 'checkpoints'} is in use by another run (pid {os.getpid()}" in errors
        assert not b.exists() or not any(p.is_file() for p in b.rglob("*"))  # B wrote nothing
        # and the other way round: B's output_dir is A's checkpoint folder
        caplog.clear()
        rc = main(["train", "tiny_lm", "train.nproc=1", "train.steps=3", "logging.wandb=disabled",
                   f"output_dir={a / 'checkpoints'}"])
        assert rc == EXIT_INVALID_INPUT and "is in use by another run" in caplog.text
    finally:
        held.release()
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == before  # A's files untouched
    assert not (a / ".lock").exists() and not (a / "checkpoints" / ".lock").exists()


# --- the Slurm script -----------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("--job-name", "x\ntouch PWNED"), ("--job-name", "a b"), ("--log-dir", "$(touch PWNED)"),
    ("--log-dir", "logs\ntouch PWNED"), ("--log-dir", "a'b"), ("--time", "1:00:00\nrm -rf /"),
    ("--partition", "gpu;touch PWNED"), ("--account", "`id`"), ("--mem", "1G\ntouch PWNED"),
])
def test_slurm_values_that_would_become_shell_lines_are_refused(flag, value, caplog):
    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT

    rc = main(["launch", "slurm", "tiny_lm", "--nodes", "1", "--gpus-per-node", "2", flag, value, "--dry-run"])
    assert rc == EXIT_INVALID_INPUT
    assert f"{flag}: {value!r} cannot be written into an #SBATCH line safely" in caplog.text


def test_slurm_values_on_the_command_line_arrive_as_one_word(tmp_path, capsys):
    """Overrides, the recipe path and --python reach srun quoted: a newline, $(...) or quotes in them
    run nothing and arrive whole (the script is run with a stub srun that records its arguments)."""

    from longshard.launch.slurm import render_sbatch

    marker = tmp_path / "PWNED"
    nasty = [f"logging.run_name=$(touch {marker})", f"logging.project=a\ntouch {marker}", "logging.run_name='\"x"]
    text = render_sbatch("tiny_lm", nodes=1, gpus_per_node=2, overrides=nasty, python=f"python3 $(touch {marker})")
    argv = run_sbatch_with_stub_srun(text, tmp_path)
    assert not marker.exists()
    assert f"python3 $(touch {marker})" in argv and all(o in argv for o in nasty)


def test_a_malformed_state_file_falls_back_to_the_previous_checkpoint(small_run, tmp_path, caplog):
    """Damaged (not tampered): the newest checkpoint's state file lists a file as a string; resume names
    it and takes the previous checkpoint instead of stopping with a traceback."""
    import shutil

    from longshard.cli import main

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    state_file = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"][".metadata"] = "12"
    state_file.write_text(json.dumps(state))
    rc = main(["train", "tiny_lm", "train.nproc=1", "train.steps=3", "checkpoint.every=1",
               "train.global_batch_size=4", "data.default_corpus_bytes=100000", "eval.passkey_samples=0",
               "eval.val_batches=1", "logging.wandb=disabled", f"output_dir={out}"])
    assert rc == 0
    assert re.search(r"skipping damaged checkpoint: .*step_00000002/trainer_state\.json is corrupt: "
                     r"files\['\.metadata'\] is '12'", caplog.text)
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 1


def test_a_different_model_in_a_used_output_dir_is_one_message_before_any_worker(small_run, tmp_path, caplog):
    """`--dry-run` checks what the run checks: the checkpoints already in output_dir belong to another
    model -> one named message (and the fix), from the command itself, with or without --dry-run."""
    import shutil

    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    for extra in (["--dry-run"], []):
        caplog.clear()
        rc = main(["train", "tiny_lm", "train.nproc=1", "model.n_layers=2", "train.steps=3",
                   "train.global_batch_size=4", "data.default_corpus_bytes=100000", "logging.wandb=disabled",
                   f"output_dir={out}", *extra])
        assert rc == EXIT_INVALID_INPUT
        assert re.search(r"model: the checkpoint .*step_00000002 was trained with a different model "
                         r"\(model\.n_layers: checkpoint 4, now 2\)\. Fix: .*new output_dir", caplog.text), caplog.text
        assert "launching" not in caplog.text
    assert main(["train", "tiny_lm", "train.nproc=1", "model.n_layers=2", "train.steps=3",
                 "train.global_batch_size=4", "logging.wandb=disabled", "checkpoint.resume=none",
                 f"output_dir={out}", "--dry-run"]) == 0
