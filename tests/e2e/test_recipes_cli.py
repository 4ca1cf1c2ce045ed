"""`longshard recipes` (list / show / copy) and `longshard config` (the resolved YAML; `--fields`: every field
with its type, default and meaning), run in this process."""

from __future__ import annotations

import dataclasses
import os
import typing

import yaml
from longshard.cli import main
from longshard.errors import EXIT_INVALID_INPUT
from longshard.train.config import Config, load_config, recipe_path


def _run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().out


def _leaves(cls: type = Config, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def test_recipes_list_show_and_copy(tmp_path, capsys):
    from longshard.cli_recipes import shipped_recipes

    rc, out = _run(capsys, "recipes")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(shipped_recipes()) and {"quickstart", "tiny_lm", "continue_transformers_s2"} <= set(names)
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines())  # every recipe says what it trains
    rc, out = _run(capsys, "recipes", "show", "quickstart")
    assert rc == 0 and out == recipe_path("quickstart").read_text()

    rc, _ = _run(capsys, "recipes", "copy", "tiny_lm", str(tmp_path))
    assert rc == 0 and (tmp_path / "tiny_lm.yaml").read_text() == recipe_path("tiny_lm").read_text()
    assert load_config(tmp_path / "tiny_lm.yaml").name == "tiny_lm"
    assert main(["recipes", "copy", "quickstart", str(tmp_path / "tiny_lm.yaml")]) == EXIT_INVALID_INPUT
    assert (tmp_path / "tiny_lm.yaml").read_text() == recipe_path("tiny_lm").read_text()  # not replaced
    # --force replaces a link at the destination, never what it points at
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "linked.yaml")
    assert main(["recipes", "copy", "quickstart", str(tmp_path / "linked.yaml"), "--force"]) == 0
    assert victim.read_text() == "keep" and not (tmp_path / "linked.yaml").is_symlink()
    assert main(["recipes", "show", "no_such_recipe"]) == EXIT_INVALID_INPUT


def test_config_prints_the_resolved_yaml_and_every_field(capsys):
    rc, out = _run(capsys, "config", "quickstart", "train.steps=10", "parallel.sp_mode=auto")
    assert rc == 0
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 10 and printed["parallel"]["sp_mode"] == "ring"  # auto resolved
    assert printed == yaml.safe_load(yaml.safe_dump(load_config("quickstart", ["train.steps=10"]).to_dict()))
    assert main(["config", "quickstart", "train.stepz=10"]) == EXIT_INVALID_INPUT

    rc, out = _run(capsys, "config", "--fields")
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert _leaves() <= set(rows)
    for name in _leaves():  # each leaf: name, type, default, then its meaning from the dataclass docstring
        assert len(rows[name].split("  ")) >= 3 and len(rows[name].split()) >= 4, rows[name]
    assert "init.hf_model" in rows and "'convert'" in rows["init.hf_model"] and "transformers" in rows["init.hf_model"]
