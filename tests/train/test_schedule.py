"""Learning-rate schedules."""

from __future__ import annotations

import pytest
from longshard.train.config import OptimConfig
from longshard.train.schedule import lr_factor


def test_cosine():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)


def test_wsd():
    cfg = OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(2, cfg, 100) == pytest.approx(0.6)
    assert lr_factor(50, cfg, 100) == 1.0 and lr_factor(79, cfg, 100) == 1.0
    assert lr_factor(89, cfg, 100) == pytest.approx(0.5)
    assert lr_factor(99, cfg, 100) == pytest.approx(0.0)
