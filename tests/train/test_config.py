"""Recipe/config validation: each class of bad input is rejected naming the field, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from longshard.errors import ConfigError
from longshard.train.config import load_config, recipe_path

RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_load(recipe, tmp_path):
    # recipes point at user data / checkpoints; give them stand-in folders
    (tmp_path / "config.json").write_text("{}")
    overrides = [f"data.path={tmp_path}"]
    if recipe.startswith("continue"):
        with pytest.raises(ConfigError, match="init.hf_path"):  # required, no silent default
            load_config(recipe, overrides)
        overrides.append(f"init.hf_path={tmp_path}")
    cfg = load_config(recipe, overrides)
    assert cfg.name == recipe  # recipes are named after their file (wandb group)


BAD = [
    (["train.foo=1"], "train.foo", "unknown key"),
    (["train.steps=abc"], "train.steps", "could not be converted"),
    (["train.steps=0"], "train.steps", "must be > 0"),
    (["model.dim=-8"], "model.dim", "must be > 0"),
    (["train.seq_len=4096"], "train.seq_len", "exceeds model.max_seq_len"),
    (["model.attention=[{name: nope}]"], "model.attention[0].name", "unknown attention variant 'nope'.*dense"),
    (["model.attention=[{name: dense, options: {backend: magic}}]"], "backend", "unknown dense backend"),
    (["model.attention=[{name: dense, options: {blocksize: 3}}]"], "options.blocksize", "unknown option"),
    (["model.attention=[{name: dense, options: {softmax_scale: fast}}]"], "options.softmax_scale", "expected"),
    (["model.n_heads=6", "model.n_kv_heads=4", "model.dim=96"], "model.n_kv_heads", "not a multiple"),
    (["model.attention=[{name: dense},{name: dense}]", "model.n_layers=4"], "model.attention", "2 entries"),
    (["data.source=prepared", "data.path=/nonexistent/data"], "data.path", "does not exist"),
    (["data.source=prepared"], "data.path", "is required"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size", "not a multiple"),
    (["optim.schedule=linear-ish"], "optim.schedule", "not a valid choice"),
    (["parallel.dp_mode=zero9"], "parallel.dp_mode", "not a valid choice"),
    (["init.hf_path=/nonexistent/ckpt"], "init.hf_path", "not a Hugging Face checkpoint"),
    (["model.rope.scaling=yarn", "model.rope.factor=4"], "model.rope.original_max_seq_len", "pre-extension"),
    (["checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume", "does not exist"),
    (["train.steps"], "train.steps", "key=value"),
    (["parallel.collective_timeout_s=0"], "parallel.collective_timeout_s", "must be > 0"),
    # torch's errors after the model is built, OmegaConf jargon, paths lost
    (["optim.beta2=1.5"], "optim.beta2", r"must be in \[0, 1\)"),
    (["optim.beta1=-0.1"], "optim.beta1", r"must be in \[0, 1\)"),
    (["optim.eps=0"], "optim.eps", "must be > 0"),
    (["model.rope=[1,2]"], "model.rope", "expects a mapping of RopeConfig fields, got a list"),
    (["model.attention={name: dense}"], "model.attention", "expects a list, got a mapping"),
    (["model.attention=[{name: s2, option: {block: 16}}]"], "model.attention[0].option", "Did you mean 'options'"),
    (["train.steps=[3]"], "train.steps", "expects a single int"),
    (["model.attention=[{name: dense"], "model.attention", "does not parse"),
]


@pytest.mark.parametrize("overrides,field,pattern", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_input_names_field(overrides, field, pattern):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_lm", overrides)
    msg = str(info.value)
    assert field in msg, msg
    assert pytest.importorskip("re").search(pattern, msg), msg


def test_unknown_recipe_lists_shipped():
    with pytest.raises(ConfigError, match="tiny_lm"):
        recipe_path("no_such_recipe")


def test_overrides_apply_and_roundtrip(tmp_path):
    from longshard.train.config import dump_config

    cfg = load_config("tiny_lm", ["train.steps=7", "model.n_layers=2", "model.attention=[{name: dense}]"])
    assert cfg.train.steps == 7 and cfg.model.n_layers == 2
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_derived_model_fields_follow_overrides():
    """head_dim, ffn width, KV/query heads are derived from the *final* sizes, not the defaults."""
    cfg = load_config("tiny_lm", ["model.dim=96", "model.n_heads=3", "model.n_kv_heads=null"])
    m = cfg.model
    assert (m.head_dim, m.n_query_heads, m.n_kv_heads) == (32, 3, 3)
    assert m.ffn_hidden_dim == 256  # 8/3 * 96 = 256, already a multiple of 64
    q = load_config("tiny_lm").model
    assert (q.dim, q.n_heads, q.head_dim, q.n_kv_heads) == (192, 6, 32, 2)


def test_allow_changes_names_only_changeable_settings():
    from longshard.errors import ConfigError
    from longshard.train.config import load_config

    assert load_config("tiny_lm", ["checkpoint.allow_changes=[optim.lr, data]"]).checkpoint.allow_changes == [
        "optim.lr", "data"]
    with pytest.raises(ConfigError, match=r"checkpoint.allow_changes.*'model.dim' is not a setting"):
        load_config("tiny_lm", ["checkpoint.allow_changes=[model.dim]"])


def test_recipe_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {dim: 64\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: is not valid YAML at line \d+, column \d+"):
        load_config(bad)


def test_silent_settings_now_warn_and_the_engine_implies_data_parallel(caplog):
    """Friction 6: warmup longer than the run and passkey lengths past the model's context are named;
    DeepSpeed replaces a recipe's dp_mode instead of refusing it (launch/deepspeed.sh pretrain_small)."""
    with caplog.at_level("WARNING"):
        load_config("tiny_lm", ["train.steps=5"])
        load_config("tiny_lm", ["eval.passkey_lengths=[256,2048]"])
    assert "optim.warmup_steps=15 exceeds train.steps=5: the learning rate only reaches 33% of optim.lr" in caplog.text
    assert "eval.passkey_lengths: 2048 exceeds model.max_seq_len=1024" in caplog.text
    cfg = load_config("tiny_lm", ["train.engine=deepspeed", "parallel.dp_mode=fsdp2"])
    assert cfg.parallel.dp_mode == "ddp"


@pytest.mark.parametrize("attention,mode", [
    (None, "ring"),  # the quickstart's S2 / dense hybrid: every layer has a ring form
    ("[{name: power}]", "ring"),  # the sparsity-aware exchange
    ("[{name: linear}]", "ring"),  # state passing
    ("[{name: dma}]", "ulysses"),  # its selection needs all of a head's keys
    ("[{name: moh}]", "ulysses"),
    ("[{name: s2}, {name: nsa}]", "ulysses"),  # one layer without a ring form decides
])
def test_sp_mode_auto_picks_ring_where_every_layer_has_one(attention, mode, caplog):
    """The quickstart says ``sp_mode: auto``: `longshard train quickstart 'model.attention=[{name: dma}]'`
    runs (Ulysses, logged) instead of stopping on the ring; the resolved mode is what the config holds."""
    overrides = [] if attention is None else [f"model.attention={attention}"]
    with caplog.at_level("INFO", logger="longshard.train.config"):
        cfg = load_config("quickstart", overrides)
    assert cfg.parallel.sp_mode == mode
    assert ("sp_mode=auto -> ulysses" in caplog.text) == (mode == "ulysses")
    assert load_config("quickstart", [*overrides, "parallel.sp_mode=ulysses"]).parallel.sp_mode == "ulysses"
