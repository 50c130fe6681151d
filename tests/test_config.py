"""GrassConfig validation: one clear error per bad field, naming it and the allowed range."""

from __future__ import annotations

import pytest

from grass_llm import ConfigError, GrassConfig


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("active_layers", 0, "integer >= 1"),
        ("active_layers", 1.5, "integer >= 1"),
        ("period", 0, "integer >= 1"),
        ("probe_steps", -1, "integer >= 0"),
        ("seed", -3, "integer >= 0"),
        ("temperature", 0.0, "float > 0"),
        ("temperature", -1.0, "float > 0"),
        ("temperature", float("inf"), "float > 0"),
        ("ema", 0.0, r"\(0, 1\]"),
        ("ema", 1.5, r"\(0, 1\]"),
        ("policy", "lisa", "grass, static, uniform"),
        ("on_reactivation", "drop", "keep, reset"),
        ("max_grad_norm", 0.0, "float > 0"),
        ("offload", "yes", "auto, period, step, off, true, false"),
        ("train_head", "yes", "true or false"),
    ],
)
def test_bad_values_name_the_field(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"^{field}=.*allowed: .*{allowed}"):
        GrassConfig(**{field: value})


def test_paper_defaults_and_round_trip():
    cfg = GrassConfig()
    assert (cfg.active_layers, cfg.period, cfg.probe_steps) == (2, 25, 150)
    assert GrassConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.warns(UserWarning, match="future_key"):
        assert GrassConfig.from_dict({**cfg.to_dict(), "future_key": 1}) == cfg
    assert all(GrassConfig.help().values()), "every field has help text"


def test_gamma_bounded_by_model():
    cfg = GrassConfig(active_layers=5)
    with pytest.raises(ConfigError, match=r"active_layers=5 .* allowed: 1\.\.4"):
        cfg.validate(num_layers=4)
