"""Attacks on what longshard loads and writes (continued from test_security.py): tampered safetensors
headers, refused by both HF loaders and before any training step; exports into used folders, outputs that
cannot be written, overrides that would change a saved model, checkpoints moved to another machine,
tokenizers travelling with their checkpoint."""


import json
import re
import zlib
from pathlib import Path

import pytest
import torch

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
