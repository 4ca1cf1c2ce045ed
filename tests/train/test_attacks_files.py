"""Attacks through file contents: each must be a named error (exit 3 for checkpoints), never a crash,
a hang, a RecursionError or a multi-GB allocation. DCP ``.metadata`` pickles (deep nesting, announced
lengths, BUILD state, fields of the wrong type, storage entries that are links), deeply nested JSON in
every JSON file we read, and a safetensors header with very many names."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from attack_helpers import SMALL_RUN, tamper
from longshard.errors import EXIT_CHECKPOINT, CheckpointError, ConfigError, UnsafeCheckpointError
from longshard.train.safe_pickle import UnsafePickleError, restricted_loads

DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def genuine(tmp_path) -> Path:
    folder = tmp_path / "genuine"
    dcp.save({"w": torch.randn(3, 2), "param_groups": [{"lr": 1e-3}]}, checkpoint_id=str(folder))
    return folder


def _in_subprocess(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a segfault or an allocation shows there, not in pytest)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_two_million_deep_metadata_is_refused_without_crashing(genuine):
    """It used to SIGSEGV eval and resume; now a named refusal, in a fresh interpreter, exit 0."""
    (genuine / ".metadata").write_bytes(b"\x80\x02N" + b"\x85" * 2_000_000 + b".")
    r = _in_subprocess(f"""
from pathlib import Path
from longshard.train.checkpoint import read_metadata_safe
from longshard.errors import UnsafeCheckpointError
try:
    read_metadata_safe(Path({str(genuine)!r}))
except UnsafeCheckpointError as e:
    print("refused:", e)
""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and "nests more than 32 levels deep" in r.stdout


def test_an_announced_two_gigabytes_is_refused_before_allocating(genuine):
    """13 bytes announcing a 2 GB BYTEARRAY8 allocated 2.3 GB before refusing; now the length is
    checked against the data first (peak RSS of the reading interpreter stays small)."""
    (genuine / ".metadata").write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 2 * 10**9) + b"..")
    r = _in_subprocess(f"""
import resource
from pathlib import Path
from longshard.train.checkpoint import read_metadata_safe
from longshard.errors import UnsafeCheckpointError
try:
    read_metadata_safe(Path({str(genuine)!r}))
except UnsafeCheckpointError as e:
    print("refused:", e)
print("peak_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")
    assert "BYTEARRAY8 announces 2000000000 bytes in 13 bytes of data" in r.stdout, r.stdout + r.stderr[-2000:]
    assert int(r.stdout.split("peak_mb")[1]) < 1500  # torch itself is ~600 MB; the 2 GB never happened


@pytest.mark.parametrize("op", ["BINBYTES8", "BINUNICODE8", "FRAME"])
def test_every_announced_length_is_checked(op):
    code = {"BINBYTES8": b"\x8e", "BINUNICODE8": b"\x8d", "FRAME": b"\x95"}[op]
    with pytest.raises(UnsafePickleError, match=f"{op} announces"):
        restricted_loads(b"\x80\x05" + code + struct.pack("<Q", 2**40) + b".")


def test_build_may_set_only_the_records_own_fields(genuine):
    """BUILD with slot state setting ``__class__`` (or a dict state with ``__class__``) was accepted."""
    data = (genuine / ".metadata").read_bytes()
    meta = pickle.loads(data)
    index = next(iter(meta.storage_data))
    assert restricted_loads(data) == meta
    for state in ({"__class__": dict}, ({}, {"__class__": dict}), {"fqn": "w", "__dict__": {}}):
        class Evil:  # pickles as the genuine record class, with a hostile BUILD state
            def __reduce__(self, state=state):
                return (object.__new__, (type(index),), state)

        with pytest.raises(UnsafePickleError, match="refusing|not an allowed"):
            restricted_loads(pickle.dumps(Evil(), protocol=2))


@pytest.mark.parametrize("field,value,expect", [
    ("storage_data", ["not", "a", "dict"], "storage_data is a list, not a dict"),
    ("state_dict_metadata", {"w": 5}, r"state_dict_metadata\['w'\] is a int"),
    ("version", 3.0, "version is not a string"),
])
def test_metadata_fields_of_the_wrong_type_are_named(genuine, field, value, expect):
    from longshard.train.checkpoint import read_metadata_safe

    meta = pickle.loads((genuine / ".metadata").read_bytes())
    setattr(meta, field, value)
    (genuine / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=expect):
        read_metadata_safe(genuine)


def test_a_storage_entry_linked_to_another_runs_shard_is_refused(genuine, tmp_path):
    from longshard.train.checkpoint import read_metadata_safe

    other = tmp_path / "other"
    dcp.save({"w": torch.ones(3, 2), "param_groups": [{"lr": 1e-3}]}, checkpoint_id=str(other))
    shard = next(genuine.glob("*.distcp"))
    shard.unlink()
    shard.symlink_to(other / shard.name)
    with pytest.raises(UnsafeCheckpointError, match="a link or not a regular file"):
        read_metadata_safe(genuine)


def test_a_linked_shard_stops_eval_with_exit_3(small_run, tmp_path, caplog):
    """The same attack through ``longshard eval``: exit 3 naming the file (another run's weights would load)."""
    from longshard.cli import main

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    ckpt, other = out / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000001"
    shard = next(ckpt.glob("*.distcp"))
    shard.unlink()
    shard.symlink_to(other / shard.name)
    assert main(["eval", str(ckpt), "eval.passkey_samples=0", "logging.wandb=disabled"]) == EXIT_CHECKPOINT
    assert "is a link or not a regular file" in caplog.text


def test_deep_json_in_the_newest_state_falls_back_to_the_previous_checkpoint(small_run, tmp_path, caplog):
    from longshard.cli import main

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    (out / "checkpoints" / "step_00000002" / "trainer_state.json").write_text(DEEP_JSON)
    assert main(["train", *SMALL_RUN, "train.steps=3", "checkpoint.every=1", f"output_dir={out}"]) == 0
    assert "nested more than 64 levels deep" in caplog.text
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 1


def test_deep_json_in_a_checkpoint_given_by_name_is_exit_3(small_run, tmp_path, caplog):
    from longshard.cli import main

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    ckpt = out / "checkpoints" / "step_00000002"
    (ckpt / "trainer_state.json").write_text(DEEP_JSON)
    assert main(["eval", str(ckpt), "eval.passkey_samples=0", "logging.wandb=disabled"]) == EXIT_CHECKPOINT
    assert "trainer_state.json is corrupt" in caplog.text


def _hf_folder(tmp_path: Path) -> Path:
    from longshard.models import ModelConfig, Transformer
    from longshard.models.hf_export import export_hf

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, max_seq_len=32)
    return export_hf(Transformer(cfg), tmp_path / "hf", max_shard_bytes=4_000)


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json", "safetensors header"])
def test_deep_json_in_an_hf_checkpoint_is_a_config_error(tmp_path, where):
    from longshard.models.hf import check_hf_checkpoint, read_hf_config, safetensors_header

    hf = _hf_folder(tmp_path)
    if where == "safetensors header":
        body = DEEP_JSON.encode()
        shard = next(hf.glob("model-*.safetensors"))
        shard.write_bytes(struct.pack("<Q", len(body)) + body)
        with pytest.raises(ConfigError, match="nested more than 8 levels deep"):
            safetensors_header(shard)
        return
    (hf / where).write_text(DEEP_JSON)
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        read_hf_config(hf)
        check_hf_checkpoint(hf)


def test_deep_json_in_prepared_data_and_inputs_is_a_config_error(tmp_path, data_dir):
    from longshard.train.data.prepare import iter_documents, read_meta
    from longshard.train.data.tokenizer import build_tokenizer

    prepared = tmp_path / "prepared"
    shutil.copytree(data_dir, prepared)
    (prepared / "meta.json").write_text(DEEP_JSON)
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        read_meta(prepared)
    lines = tmp_path / "docs.jsonl"
    lines.write_text('{"text": "fine"}\n' + DEEP_JSON + "\n")
    with pytest.raises(ConfigError, match=r"docs\.jsonl:2 is not valid JSON \(nested more than 64"):
        list(iter_documents([lines]))
    (tmp_path / "tokenizer.json").write_text(DEEP_JSON)
    with pytest.raises(ConfigError, match="data.tokenizer.*nested more than 64"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))


def test_a_safetensors_file_with_forty_thousand_names_validates_in_linear_time(tmp_path):
    """40,000 zero-size tensors took 69 s (a list count per name); the library loads it in about 2 s."""
    from longshard.models.hf import safetensors_header
    from safetensors.torch import save_file

    file = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(0) for i in range(40_000)}, str(file))
    start = time.perf_counter()
    meta, _ = safetensors_header(file)
    assert len(meta) == 40_000 and time.perf_counter() - start < 10  # generous: a loaded 2-core runner
    os.unlink(file)


def test_the_dcp_tamper_helper_still_produces_a_loadable_checkpoint(small_run, tmp_path):
    """Control for the tests above: a checkpoint rewritten by the helper with its own bytes loads."""
    from longshard.train.checkpoint import read_metadata_safe, read_trainer_state

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    ckpt = out / "checkpoints" / "step_00000002"
    tamper(ckpt, ".metadata", (ckpt / ".metadata").read_bytes())
    read_metadata_safe(ckpt)
    assert read_trainer_state(ckpt)["step"] == 2


def test_changed_mqar_settings_are_refused_on_resume(tmp_path, caplog):
    """Resuming an MQAR run with other ``data.mqar_num_kv_pairs`` or curriculum resumed silently (the
    fingerprint covered the data source, tokenizer and corpus bytes only). Now it is named, and
    ``checkpoint.allow_changes=[data]`` accepts it; a checkpoint written before these fields were
    recorded still resumes (nothing to compare)."""
    from longshard.cli import main
    from longshard.train.fingerprint import STEP_DATA_FIELDS, check_resume

    out = tmp_path / "run"
    mqar = [*SMALL_RUN, "data.source=mqar", "data.mqar_num_kv_pairs=4", "train.seq_len=64", f"output_dir={out}"]
    assert main(["train", *mqar, "train.steps=1", "checkpoint.every=1"]) == 0
    for change in ("data.mqar_num_kv_pairs=6", "data.mqar_curriculum=[32,64]", "data.synthetic_samples=999"):
        caplog.clear()
        assert main(["train", *mqar, "train.steps=2", change, "--dry-run"]) == 2
        field = change.split("=")[0]
        assert re.search(rf"resuming .* with changed settings \({re.escape(field)}: checkpoint ", caplog.text), \
            caplog.text[-2000:]
        assert main(["train", *mqar, "train.steps=2", change, "checkpoint.allow_changes=[data]", "--dry-run"]) == 0
    state = json.loads((out / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    old = json.loads(json.dumps(state["fingerprint"]))
    for f in STEP_DATA_FIELDS:
        old["data"].pop(f)
    now = json.loads(json.dumps(state["fingerprint"]))
    now["data"]["mqar_num_kv_pairs"] = 6
    assert check_resume(old, now, [], "old") == []
