"""Sampling policies: the registry, the cyclic (BAdam-style) policy, a user policy, resumable state."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from grass_llm import POLICIES, GrassConfig, GrassOptimizer, LayerSampler, SamplingPolicy, register_policy


def test_builtin_policies_are_registered():
    assert set(POLICIES) >= {"grass", "static", "uniform", "cyclic"}
    assert GrassConfig(policy="grass").probe_steps == 150
    assert GrassConfig(policy="uniform").probe_steps == 0
    assert GrassConfig(policy="cyclic").probe_steps == 0


def test_cyclic_visits_every_layer_once_per_cycle_and_resumes():
    sampler = LayerSampler(6, 2, "cyclic", seed=4)
    cycles = [[sampler.draw() for _ in range(3)] for _ in range(2)]
    for cycle in cycles:
        assert sorted(i for draw in cycle for i in draw) == list(range(6))
    assert cycles[0] != cycles[1]  # a new random order every cycle

    a = LayerSampler(7, 3, "cyclic", seed=1)
    a.draw()
    state = a.state_dict()
    b = LayerSampler(7, 3, "cyclic", seed=99)
    b.load_state_dict(state)
    assert [a.draw() for _ in range(5)] == [b.draw() for _ in range(5)]


def test_a_registered_policy_drives_the_optimizer():
    class TopLayers(SamplingPolicy):
        name = "test-top"

        def draw(self, sampler):
            return list(range(sampler.num_layers - sampler.k, sampler.num_layers))

    register_policy(TopLayers)
    try:
        model = make_tiny_llama(num_layers=4)
        opt = GrassOptimizer(model, GrassConfig(active_layers=2, period=1, policy="test-top"), lr=0.1)
        assert opt.active_layers == [2, 3]
        with pytest.raises(ValueError, match="already registered"):
            register_policy(type("Other", (SamplingPolicy,), {"name": "test-top"}))
    finally:
        POLICIES.pop("test-top")


def test_sampler_state_loads_from_any_device():
    """accelerate moves an optimizer's whole state dict to the accelerator, generator state included."""
    a = LayerSampler(5, 2, "grass", seed=3)
    a.end_probe(torch.arange(1.0, 6.0))
    state = a.state_dict()
    state = {
        **state,
        "generator": state["generator"].to(torch.int64),
        "probabilities": state["probabilities"].float(),
    }
    b = LayerSampler(5, 2, "grass", seed=0)
    b.load_state_dict(state)
    assert torch.allclose(b.probabilities, a.probabilities.float().double())
    assert [a.draw() for _ in range(4)] == [b.draw() for _ in range(4)]


def test_static_without_probing_fixes_the_first_period():
    sampler = LayerSampler(4, 1, "static")
    first = sampler.end_period(torch.tensor([1.0, 2.0, 3.0, 4.0])).clone()
    assert not torch.allclose(first, torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(sampler.end_period(torch.tensor([9.0, 1.0, 1.0, 1.0])), first)
