"""Attacks on what longshard loads and writes, as an attacker or a careless user would make them.

- Checkpoints whose pickles would run code: each payload runs a command under Python's own unpickler
  (checked, so the gadget is real) and must be refused by name, with nothing run, by the restricted
  reader and by every command that loads a checkpoint.
- Tampered safetensors headers, refused by both HF loaders.
- Runs sharing folders, exports into used folders, outputs that cannot be written, overrides that
  would change a saved model, checkpoints moved to another machine.
"""

from __future__ import annotations

import json
import pickle
import re
import zlib
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


# --- tampered safetensors headers -----------------------------------------------------------------

def _tiny_llama(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)


def _rewrite_header(file: Path, edit) -> None:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = edit(header)
    raw = (text if isinstance(text, str) else json.dumps(header)).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _set(key_part: str, field: str, value_of):
    def edit(h: dict) -> None:
        key = next(k for k in h if key_part in k)
        h[key][field] = value_of(h, key)
    return edit


TAMPERINGS = {
    # the output head read from the embedding's bytes (same shape, same span)
    "overlapping offsets": (_set("lm_head", "data_offsets",
                                 lambda h, k: h["model.embed_tokens.weight"]["data_offsets"]),
                            r"overlaps the tensor before it"),
    "negative offset": (_set("lm_head", "data_offsets", lambda h, k: [-64, h[k]["data_offsets"][1] - 64]),
                        r"not \[begin, end\] with 0 <= begin <= end"),
    "span shorter than dtype x shape": (_set("lm_head", "shape", lambda h, k: [h[k]["shape"][0] * 2, h[k]["shape"][1]]),
                                        r"spans \d+ bytes, its dtype and shape \(F32 x \[128, 32\]\) need \d+"),
    "unknown dtype": (_set("lm_head", "dtype", lambda h, k: "F128"), r"unknown dtype 'F128'"),
    "float offsets": (_set("lm_head", "data_offsets", lambda h, k: [float(x) for x in h[k]["data_offsets"]]),
                      r"not \[begin, end\]"),
    "duplicate name": (lambda h: json.dumps(h)[:-1] + ', "lm_head.weight": ' + json.dumps(h["lm_head.weight"]) + "}",
                       r"'lm_head\.weight' is listed twice"),
    "gap": (_set("model.norm", "data_offsets", lambda h, k: [h[k]["data_offsets"][0] + 4, h[k]["data_offsets"][1] + 4]),
            r"(leaves a gap|overlaps)"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_tampered_safetensors_headers_are_refused_by_both_loaders(tmp_path, tampering):
    """The whole-model loader (DDP) and the shard-by-shard loader (FSDP2) read the same validated header."""
    from longshard.errors import ConfigError
    from longshard.models.hf import check_hf_checkpoint, config_from_hf, load_hf_model, read_hf_config
    from longshard.models.model import Transformer
    from longshard.parallel.sharded_load import load_hf_sharded, parameters_on_meta

    folder = tmp_path / "hf"
    _tiny_llama(folder)
    model_cfg = config_from_hf(read_hf_config(folder))
    edit, message = TAMPERINGS[tampering]
    _rewrite_header(folder / "model.safetensors", edit)
    with pytest.raises(ConfigError, match=message):
        check_hf_checkpoint(folder)
    with pytest.raises(ConfigError, match=message):
        load_hf_model(folder)
    with parameters_on_meta():
        meta_model = Transformer(model_cfg)
    with pytest.raises(ConfigError, match=message):
        load_hf_sharded(meta_model, folder, torch.device("cpu"))


@pytest.mark.parametrize("dp_mode", ["ddp", "fsdp2"])
def test_training_from_a_tampered_checkpoint_stops_before_any_step(tmp_path, caplog, dp_mode):
    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT

    folder = tmp_path / "hf"
    _tiny_llama(folder)
    _rewrite_header(folder / "model.safetensors", TAMPERINGS["overlapping offsets"][0])
    rc = main(["train", "tiny_lm", f"init.hf_path={folder}", "train.nproc=1", "train.steps=2",
               "train.global_batch_size=4", "train.seq_len=64", "data.default_corpus_bytes=100000",
               "logging.wandb=disabled", f"parallel.dp_mode={dp_mode}", f"output_dir={tmp_path / 'run'}"])
    assert rc == EXIT_INVALID_INPUT
    assert re.search(r"model\.safetensors is not a valid safetensors file: tensor '[^']+' at bytes .* overlaps",
                     caplog.text)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# --- exports, outputs, overrides, portability -----------------------------------------------------

def _logits_agree(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from longshard.models.hf import load_hf_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = load_hf_model(folder).eval()
    tokens = torch.randint(0, 259, (1, 17))
    with torch.no_grad():
        a, b = hf(tokens).logits, ours(tokens)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5  # fp32, the same weights on both sides


def test_export_hf_never_mixes_with_what_a_folder_holds(small_run, tmp_path, caplog):
    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT
    from longshard.models.hf import load_hf_model
    from longshard.models.hf_export import export_hf

    ckpt = small_run / "checkpoints" / "step_00000002"
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    assert main(["export-hf", str(ckpt), "--output", str(out)]) == EXIT_INVALID_INPUT
    assert re.search(r"--output: .*hf is not empty \(it holds config\.json\).*--overwrite", caplog.text)
    assert (out / "config.json").read_text() == '{"mine": true}'  # untouched

    # an older sharded export (index + shards) of another model, and a file of the user's
    other = load_hf_model(_write_tiny(tmp_path / "other"))
    export_hf(other, tmp_path / "old", max_shard_bytes=20_000)
    old = tmp_path / "old"
    assert (old / "model.safetensors.index.json").is_file() and len(list(old.glob("model-*.safetensors"))) > 1
    (old / "NOTES.md").write_text("mine")
    assert main(["export-hf", str(ckpt), "--output", str(old), "--overwrite"]) == 0
    assert sorted(p.name for p in old.iterdir()) == ["NOTES.md", "config.json", "model.safetensors"]
    _logits_agree(old)  # transformers (single file first) and longshard (index first) load the same model
    import stat

    for f in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((old / f).stat().st_mode) == 0o666 & ~_umask(), f


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_tiny(folder: Path) -> Path:
    _tiny_llama(folder)
    return folder


def test_outputs_are_checked_before_the_work(small_run, tmp_path, caplog, monkeypatch):
    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT

    ckpt = small_run / "checkpoints" / "step_00000002"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loaded = []
    import longshard.train.checkpoint as ck

    monkeypatch.setattr(ck, "load_model_weights", lambda *a: loaded.append(a))
    for argv, flag in [(["eval", str(ckpt), "--output", str(blocker / "r.json")], "--output"),
                       (["eval", str(ckpt), "--plot", str(blocker / "p.png")], "--plot"),
                       (["generate", str(ckpt), "--prompt", "x", "--output", str(blocker / "g.json")], "--output"),
                       (["export-hf", str(ckpt), "--output", str(blocker)], "--output")]:
        caplog.clear()
        assert main(argv) == EXIT_INVALID_INPUT, argv
        assert f"invalid input: {flag}: " in caplog.text, caplog.text[-500:]
    assert loaded == []  # refused before the checkpoint was read
    monkeypatch.undo()
    # a missing folder is created (results are never lost after the work)
    deep = tmp_path / "new" / "sub"
    assert main(["generate", str(ckpt), "--prompt", "Once", "--max-new-tokens", "2",
                 "--output", str(deep / "g.json")]) == 0
    assert json.loads((deep / "g.json").read_text())["new_tokens"] == 2


def test_model_overrides_on_a_checkpoint_are_refused(small_run, caplog):
    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT

    ckpt = small_run / "checkpoints" / "step_00000002"
    for command in (["eval", str(ckpt)], ["generate", str(ckpt), "--prompt", "x"]):
        caplog.clear()
        assert main([*command, "model.n_layers=1"]) == EXIT_INVALID_INPUT
        assert "model.n_layers: would change the saved model" in caplog.text
        caplog.clear()
        assert main([*command, "optim.lr=1"]) == EXIT_INVALID_INPUT and "optim.lr: would change" in caplog.text


def test_a_checkpoint_moved_to_another_machine_still_works(small_run, tmp_path, caplog):
    """Only the checkpoint folder travels: no data, no run folder, no tokenizer file of the old machine."""
    import shutil

    from longshard.cli import main

    moved = tmp_path / "elsewhere" / "step_00000002"
    shutil.copytree(small_run / "checkpoints" / "step_00000002", moved)
    cfg = (moved / "config.yaml").read_text()
    assert str(small_run) in cfg  # the saved config names the old machine's folders
    run = tmp_path / "run_copy"  # the old run folder, gone (a copy stands in for it here)
    shutil.copytree(small_run, run)
    text = cfg.replace(str(small_run), str(run))
    (moved / "config.yaml").write_text(text)
    state = json.loads((moved / "trainer_state.json").read_text())
    state["files"]["config.yaml"] = [len(text.encode()), zlib.crc32(text.encode())]
    (moved / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(run)
    assert main(["eval", str(moved), "eval.passkey_samples=1", "eval.passkey_lengths=[256]",
                 "logging.wandb=disabled", "--output", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert "passkey_acc@256" in result and "val_loss" not in result
    assert "no held-out loss: the training data" in caplog.text
    assert main(["generate", str(moved), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert main(["export-hf", str(moved), "--output", str(tmp_path / "hf")]) == 0
    assert main(["eval", str(moved), f"data.path={tmp_path / 'nope'}", "data.source=prepared"]) == 2


@pytest.mark.parametrize("given", ["file", "folder"])
def test_a_saved_tokenizer_travels_with_the_checkpoint(tmp_path, monkeypatch, given):
    """A run with data.tokenizer (a tokenizer.json, or a folder holding one) copies it into each
    checkpoint (listed in its manifest); eval/generate use that copy once the original is gone or
    changed (a folder was not copied before: generate read whatever it held later)."""
    tokenizers = pytest.importorskip("tokenizers")
    import torch.distributed as dist
    from longshard.cli_checkpoint import _load_checkpoint_model
    from longshard.models.model import Transformer
    from longshard.train.checkpoint import TOKENIZER_FILE, Checkpointer, DCPStates
    from longshard.train.config import dump_config, load_config

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox"] * 20, tokenizers.trainers.BpeTrainer(vocab_size=280))
    tok_file = tmp_path / "tok" / "tokenizer.json"
    tok_file.parent.mkdir()
    tok.save(str(tok_file))
    named = tok_file if given == "file" else tok_file.parent
    cfg = load_config("tiny_lm", [f"data.tokenizer={named}", "model.n_layers=1", f"output_dir={tmp_path}"])
    model = Transformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        path = Checkpointer(tmp_path / "ck", 1, 0, dump_config(cfg), tokenizer=named).save(
            1, DCPStates(model, optimizer), sched, {"loader": {"epoch": 0, "index": 0}})
    finally:
        dist.destroy_process_group()
    assert (path / TOKENIZER_FILE).read_bytes() == tok_file.read_bytes()
    assert TOKENIZER_FILE in json.loads((path / "trainer_state.json").read_text())["files"]
    saved = tok_file.read_bytes()
    tok_file.write_text("{}") if given == "folder" else tok_file.unlink()
    assert (path / TOKENIZER_FILE).read_bytes() == saved
    loaded_cfg, loaded = _load_checkpoint_model(str(path), [])
    assert loaded_cfg.data.tokenizer == str(path / TOKENIZER_FILE)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


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
