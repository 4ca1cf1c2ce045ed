"""The training engines: fp16 dynamic loss scaling (overflow skips the update and lowers the scale,
the scale survives a checkpoint), and the engine-free training loop's contract."""

from __future__ import annotations

import pytest
import torch
from longshard.errors import ConfigError
from longshard.models import ModelConfig, Transformer
from longshard.train.config import load_config
from longshard.train.engine import NativeEngine


def _setup(loss_scaling: bool):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, NativeEngine(model, opt, sched, grad_clip=1.0, loss_scaling=loss_scaling)


def _objective(model, factor: float = 1.0) -> torch.Tensor:
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(tokens, labels_BS=tokens)
    return out.loss_sum / out.n_tokens * factor


def test_fp16_overflow_skips_the_update_and_backs_off():
    model, engine = _setup(loss_scaling=True)
    before = [p.detach().clone() for p in model.parameters()]
    scale0 = engine.loss_scale()
    # a loss this large overflows fp16 once scaled (65504 is fp16's largest value)
    engine.backward(_objective(model, 1e8), last=True)
    outcome = engine.step()
    assert outcome.overflow and not outcome.applied
    assert engine.loss_scale() == scale0 / 2, "the scale backs off by half"
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "no update reached the weights"
    assert all(p.grad is None for p in model.parameters()), "the overflowed gradients were dropped"
    engine.backward(_objective(model), last=True)  # a normal step then applies
    outcome = engine.step()
    assert outcome.applied and not outcome.overflow and outcome.grad_norm > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_fp16_unscaled_gradients_match_fp32_scaling():
    """The gradients the optimizer sees are unscaled: the step equals an unscaled fp16 step's
    (fp16 rounding of scaled vs unscaled products: ~1e-3 relative on these gradients)."""
    model, engine = _setup(loss_scaling=True)
    ref, plain = _setup(loss_scaling=False)
    engine.backward(_objective(model), last=True)
    plain.backward(_objective(ref), last=True)
    engine.scaler.unscale_(engine.optimizer)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        err = float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12))
        assert err < 1e-2, (name, err)


def test_loss_scale_state_round_trips():
    model, engine = _setup(loss_scaling=True)
    engine.backward(_objective(model, 1e8), last=True)
    engine.step()  # one overflow: the scale is now half the initial one
    state = engine.state()
    assert state["grad_scaler"]["scale"] == engine.loss_scale()
    _, fresh = _setup(loss_scaling=True)
    fresh.load_state(state)
    assert fresh.loss_scale() == engine.loss_scale()
    _, fp32 = _setup(loss_scaling=False)
    assert fp32.state() == {} and fp32.loss_scale() is None


def test_fp16_with_deepspeed_is_refused():
    with pytest.raises(ConfigError, match="train.dtype.*native engine"):
        load_config("tiny_lm", ["train.dtype=fp16", "train.engine=deepspeed"])
    assert load_config("tiny_lm", ["train.dtype=fp16"]).train.dtype == "fp16"


def test_engines_implement_the_protocol_without_inheriting():
    """Both engines provide every member the loop and checkpointer use (TrainEngine is a Protocol)."""
    from longshard.train.engine import DeepSpeedTrainEngine, NativeEngine, TrainEngine

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for engine in (NativeEngine(model, opt, None, 1.0), DeepSpeedTrainEngine(model, opt, None)):
        assert isinstance(engine, TrainEngine)
        assert TrainEngine not in type(engine).__mro__
    assert not isinstance(object(), TrainEngine)
