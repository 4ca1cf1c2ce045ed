"""Careless or hostile command-line input: each is a named error before any work (exit 2), never a
traceback or a silently different run. Infinite learning rates, negative or NaN temperatures, path
names the OS refuses, ``eval --plot`` with nothing to plot, and ``launch slurm`` values that would
be expanded twice or written where a folder or file is expected."""

from __future__ import annotations

import json

import pytest
from attack_helpers import SMALL_RUN, run_sbatch_with_stub_srun
from longshard.errors import EXIT_INVALID_INPUT, ConfigError

LONG = "a" * 300


@pytest.mark.parametrize("override,field", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.weight_decay=inf", "optim.weight_decay"),
    ("train.grad_clip=inf", "train.grad_clip"), ("optim.eps=inf", "optim.eps"),
    (f"output_dir=/tmp/{LONG}", "output_dir"), (f"name={LONG}", "name"),
    (f"data.tokenizer=/tmp/{LONG}", "data.tokenizer"),
    (f"checkpoint.dir=/tmp/{LONG}/c", "checkpoint.dir"),
])
def test_values_the_run_cannot_use_are_refused_before_any_work(override, field, caplog, tmp_path):
    from longshard.cli import main

    out = [] if field in ("name", "output_dir") else [f"output_dir={tmp_path / 'o'}"]
    assert main(["train", *SMALL_RUN, *out, override, "--dry-run"]) == EXIT_INVALID_INPUT
    assert f"invalid input: {field}:" in caplog.text, caplog.text[-1500:]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("temperature", ["-1", "nan", "inf"])
def test_generate_refuses_a_temperature_it_would_ignore(small_run, temperature, caplog):
    """``--temperature -1`` and ``nan`` decoded greedily without a word."""
    from longshard.cli import main

    ckpt = small_run / "checkpoints" / "step_00000002"
    rc = main(["generate", str(ckpt), "--prompt", "a", "--max-new-tokens", "1", "--temperature", temperature])
    assert rc == EXIT_INVALID_INPUT and "--temperature: must be a finite number >= 0" in caplog.text


def test_eval_plot_with_nothing_to_plot_still_prints_and_writes_the_results(small_run, tmp_path, capsys, caplog):
    pytest.importorskip("matplotlib")
    from longshard.cli import main

    ckpt = small_run / "checkpoints" / "step_00000002"
    out = tmp_path / "eval.json"
    rc = main(["eval", str(ckpt), "eval.passkey_samples=0", "logging.wandb=disabled", "--output", str(out),
               "--plot", str(tmp_path / "p.png")])
    assert rc == EXIT_INVALID_INPUT
    printed = json.loads(capsys.readouterr().out)
    assert "val_loss" in printed and json.loads(out.read_text()) == printed
    assert "--plot: nothing to plot" in caplog.text and "add --grid" in caplog.text


def test_slurm_placeholders_are_filled_once(tmp_path):
    """``{{overrides}}`` inside ``--python`` (or a recipe file name) was expanded again by the later
    substitution: an override's ``$(touch X)`` then stood unquoted in the job script."""
    from longshard.launch.slurm import fill_template, render_sbatch

    marker = tmp_path / "PWNED"
    nasty = [f"logging.run_name=x';touch {marker};'"]
    python = "/opt/{{overrides}}/python3"
    text = render_sbatch("tiny_lm", nodes=1, gpus_per_node=2, overrides=nasty, python=python)
    assert "'/opt/{{overrides}}/python3'" in text
    argv = run_sbatch_with_stub_srun(text, tmp_path)
    assert not marker.exists() and python in argv and nasty[0] in argv
    assert fill_template("{{a}}{{b}}", {"a": "{{b}}", "b": "x"}) == "{{b}}x"
    with pytest.raises(ConfigError, match=r"placeholders without values: \['c'\]"):
        fill_template("{{c}}", {})


def test_slurm_log_dir_and_output_must_be_what_they_name(tmp_path, caplog):
    from longshard.cli import main

    base = ["launch", "slurm", "tiny_lm", "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "1"]
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cases = {("--log-dir", str(a_file)): "--log-dir: ", ("--log-dir", f"{tmp_path}/{LONG}"): "--log-dir: the path",
             ("--output", str(tmp_path)): f"--output: {tmp_path} is a folder",
             ("--output", f"{tmp_path}/{LONG}.sbatch"): "--output: the path"}
    for (flag, value), expect in cases.items():
        caplog.clear()
        extra = [flag, value] + (["--output", str(tmp_path / "j.sbatch")] if flag == "--log-dir" else [])
        assert main([*base, *extra]) == EXIT_INVALID_INPUT, (flag, value)
        assert expect in caplog.text and "Traceback" not in caplog.text, caplog.text[-1000:]
    assert a_file.read_text() == "x"


def test_data_prepare_names_the_missing_input_first_and_the_special_tokens_with_the_fix(tmp_path, caplog):
    tokenizers = pytest.importorskip("tokenizers")
    from longshard.cli import main

    rc = main(["data", "prepare", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
               "--tokenizer", str(tmp_path / "no-tokenizer.json")])
    assert rc == EXIT_INVALID_INPUT and f"--input: {tmp_path / 'nope'} does not exist" in caplog.text
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox"] * 20, tokenizers.trainers.BpeTrainer(vocab_size=280,
                                                                                         special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.txt").write_text("a document")
    caplog.clear()
    rc = main(["data", "prepare", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o"),
               "--tokenizer", str(tmp_path / "tokenizer.json")])
    assert rc == EXIT_INVALID_INPUT
    assert "has no beginning-of-document token" in caplog.text and "Fix:" in caplog.text and "EOS" in caplog.text


def test_a_corpus_smaller_than_one_global_batch_is_refused_before_any_worker(tmp_path, caplog):
    """It passed --dry-run, started the workers, and every rank printed the same error."""
    from longshard.cli import main

    (tmp_path / "small.txt").write_text("a short corpus " * 12)  # ~180 tokens: 2 samples of 64
    assert main(["data", "prepare", "--input", str(tmp_path / "small.txt"), "--output", str(tmp_path / "d")]) == 0
    rc = main(["train", *SMALL_RUN, "data.source=prepared", f"data.path={tmp_path / 'd'}", "train.seq_len=64",
               f"output_dir={tmp_path / 'o'}", "--dry-run"])
    assert rc == EXIT_INVALID_INPUT
    assert "train.global_batch_size:" in caplog.text and "fewer than one global batch (4)" in caplog.text
