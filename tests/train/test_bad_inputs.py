"""Bad input from a careless user or a damaged file: each one a named error (file, field, fix) before
any work, never a raw traceback or a silent wrong result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from longshard.errors import ConfigError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from longshard.train.data import prepare_default

    out = tmp_path_factory.mktemp("data") / "default"
    prepare_default(out, 50_000, 0.1)
    return out


def _variant(prepared, tmp_path, edit) -> str:
    folder = tmp_path / "data"
    shutil.copytree(prepared, folder)
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta, folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def _int32_with_negative(meta, folder):
    for split in ("train", "val"):
        tokens = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]).astype(np.int32)
        if split == "train":
            tokens[5] = -3
        tokens.tofile(folder / f"{split}.bin")
    meta["dtype"] = "int32"


META_EDITS = {
    "float dtype": (lambda m, f: m.update(dtype="float16"), r"dtype is 'float16', not an integer token type"),
    "missing val": (lambda m, f: m["splits"].pop("val"), r"splits has \['train'\], not train and val"),
    "missing bos_id": (lambda m, f: m.pop("bos_id"), r"bos_id is None, not a token id below vocab_size=259"),
    "bos_id outside": (lambda m, f: m.update(bos_id=400), r"bos_id is 400, not a token id below"),
    "string n_tokens": (lambda m, f: m["splits"]["train"].update(n_tokens=str(m["splits"]["train"]["n_tokens"])),
                        r"splits\.train\.n_tokens is '\d+', not a non-negative integer"),
    "a list": (lambda m, f: m.clear(), r"dtype is None"),
}


@pytest.mark.parametrize("case", sorted(META_EDITS))
def test_damaged_prepared_metadata_is_named(prepared, tmp_path, case):
    from longshard.train.data import TokenWindows

    edit, message = META_EDITS[case]
    path = _variant(prepared, tmp_path, edit)
    with pytest.raises(ConfigError, match=r"data\.path: .*meta\.json is not a valid `data prepare` metadata file: "
                                          + message):
        TokenWindows(path, "train", 64)


def test_negative_token_ids_are_named_not_an_index_error(prepared, tmp_path):
    from longshard.train.data import TokenWindows

    windows = TokenWindows(_variant(prepared, tmp_path, _int32_with_negative), "train", 64)
    with pytest.raises(ConfigError, match=r"train\.bin holds token id -3 \(at token 5\), but its vocabulary has ids "
                                          r"0-258"):
        windows[0]
    windows[1]  # the other windows are fine


@pytest.mark.parametrize("line,message", [
    (b'{"text": null}\n', r"corpus\.jsonl:2: 'text' is null, not a string"),
    (b'{"text": 42}\n', r"corpus\.jsonl:2: 'text' is 42, not a string"),
    (b'{"text": "caf\xe9"}\n', r"corpus\.jsonl:2 is not valid UTF-8 \(byte 14 of the line\)"),
])
def test_bad_jsonl_lines_are_named_with_file_and_line(tmp_path, line, message):
    from longshard.train.data import build_tokenizer, prepare
    from longshard.train.data.prepare import iter_documents

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n' + line)
    with pytest.raises(ConfigError, match=message):
        prepare(tmp_path / "out", iter_documents([corpus]), build_tokenizer(None))
    assert not (tmp_path / "out").exists()


def test_a_truncated_tokenizer_file_is_named(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from longshard.train.data import build_tokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(["a b c"] * 5, tokenizers.trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    build_tokenizer(str(path))
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .*tokenizer\.json is not valid JSON \(line \d+, column "
                                          r"\d+: .*\); the file is cut short or damaged"):
        build_tokenizer(str(path))
    path.write_text('{"version": "1.0"}')
    with pytest.raises(ConfigError, match=r"tokenizer\.json is not a tokenizers file"):
        build_tokenizer(str(path))


@pytest.mark.parametrize("key,value,message", [
    ("rope_scaling", "yarn", r"config\.json: rope_scaling is \"yarn\", not an object"),
    ("rope_parameters", [4.0], r"config\.json: rope_parameters is \[4\.0\], not an object"),
    ("rope_parameters", {"rope_type": 3}, r"rope_type is 3, not a string"),
    ("rope_theta", "1e4", r"config\.json: rope_theta='1e4' is not a number"),
])
def test_wrongly_typed_hf_rope_settings_are_named(key, value, message):
    from longshard.models.hf import config_from_hf

    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          key: value}
    with pytest.raises(ConfigError, match=message):
        config_from_hf(hf)


def test_a_non_file_in_weight_map_is_named(tmp_path):
    from longshard.models.hf import weight_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": 3}}))
    with pytest.raises(ConfigError, match=r"maps 'a\.weight' to 3, not a file name in"):
        weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../x"}}))
    with pytest.raises(ConfigError, match=r"maps 'a\.weight' to '\.\./x'"):
        weight_files(tmp_path)


@pytest.mark.parametrize("value", ["inf", "nan", "1e12"])
def test_an_unbounded_collective_timeout_is_named(value):
    from longshard.train.config import load_config

    with pytest.raises(ConfigError, match=r"parallel\.collective_timeout_s: must be > 0 and at most 604800 seconds"):
        load_config("tiny_lm", [f"parallel.collective_timeout_s={value}"])


def test_eval_passkey_too_short_and_generate_past_the_context(tmp_path, caplog):
    """`eval` refuses a passkey length too short for its prompt before loading; `generate` warns when
    the prompt and new tokens run past the trained length."""
    import torch.distributed.checkpoint as dcp
    from longshard.cli import main
    from longshard.errors import EXIT_INVALID_INPUT
    from longshard.models.model import Transformer
    from longshard.train.config import dump_config, load_config

    cfg = load_config("tiny_lm", ["model.n_layers=1", "train.seq_len=64", f"output_dir={tmp_path}"])
    ckpt = tmp_path / "step_00000001"
    dcp.save({"model": Transformer(cfg.model).state_dict()}, checkpoint_id=str(ckpt))
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    assert main(["eval", str(ckpt), "eval.passkey_lengths=[64]", "logging.wandb=disabled"]) == EXIT_INVALID_INPUT
    assert "eval.passkey_lengths: passkey length 64 is too short for the prompt" in caplog.text
    caplog.clear()
    assert main(["generate", str(ckpt), "--prompt", "x" * 60, "--max-new-tokens", "8"]) == 0
    assert "the prompt (60 tokens) plus --max-new-tokens 8 exceeds the trained length 64" in caplog.text
