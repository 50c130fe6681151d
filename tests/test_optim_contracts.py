"""GrassOptimizer's contracts at its edges: skipped steps (with step_in_backward too), a step without a
backward pass, clipping with no gradient, refusing to pickle, and load_state_dict validating everything
before it changes anything."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import make_tiny_llama
from test_optim import batches, params_of

from grass_llm import GrassConfig, GrassOptimizer


def _run(model, opt, data):
    for x in data:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def test_step_in_backward_after_a_skipped_step_trains_on(one_thread):
    """A non-finite gradient makes the in-backward update skip its unit and step() skip the step; the next
    backward must start afresh (it raised 'a second backward pass reached ...')."""
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(model, GrassConfig(active_layers=2, probe_steps=0, step_in_backward=True), lr=1e-2)
    x = batches(1)[0]
    loss = model(input_ids=x, labels=x).loss * float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loss.backward()
        opt.step()
    assert opt.skipped_steps == 1
    before = params_of(model)
    _run(model, opt, batches(2))
    assert opt.global_step == 2 and not opt.last_step_skipped
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("probe_steps", [0, 2])
def test_step_without_backward_changes_nothing(probe_steps, one_thread):
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, period=2, probe_steps=probe_steps), lr=1e-2)
    _run(model, opt, batches(1))
    state = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="no backward pass since the last step"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    after = opt.state_dict()
    for key in ("probe_done", "period_pos", "active", "global_step"):
        assert after["grass"][key] == state["grass"][key], key
    assert torch.equal(after["grass"]["importance"]["period_sum"], state["grass"]["importance"]["period_sum"])


def test_clip_grad_norm_without_gradients_is_zero_on_the_parameters_device():
    model = make_tiny_llama(num_layers=2).to("meta")
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0), lr=1e-2)
    norm = opt.clip_grad_norm_(1.0)
    assert norm.device.type == "meta" and norm.shape == ()


def test_pickle_and_deepcopy_are_refused_with_a_clear_error():
    model = make_tiny_llama(num_layers=2)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0), lr=1e-2)
    for attempt in (lambda: pickle.dumps(opt), lambda: copy.deepcopy(opt)):
        with pytest.raises(TypeError, match=r"cannot be pickled or deep-copied.*state_dict"):
            attempt()
    torch.save(opt.state_dict(), io.BytesIO())  # what to do instead works


def _trained(**cfg):
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(model, GrassConfig(**{"active_layers": 1, "period": 2, "probe_steps": 1, **cfg}), lr=1e-2)
    _run(model, opt, batches(3))
    return model, opt


def _snapshot(opt):
    sd = opt.state_dict()
    return {
        "lr": [g["lr"] for g in opt.param_groups],
        "state": {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()},
        "grass": copy.deepcopy(sd["grass"]),
    }


def _same(a, b):
    assert a["lr"] == b["lr"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    for key in ("global_step", "probe_done", "period_pos", "active"):
        assert a["grass"][key] == b["grass"][key]


def _damaged():
    """(description, how to damage a saved state dict, what the error says)."""

    def drop(path):
        def f(sd):
            d = sd
            for k in path[:-1]:
                d = d[k]
            del d[path[-1]]

        return f

    def reshape(sd):
        i = next(iter(sd["state"]))
        sd["state"][i]["exp_avg"] = torch.zeros(3, 3)

    def more_groups(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    return [
        ("no state entry", drop(["state"]), "no 'state' entry"),
        ("no sampler", drop(["grass", "sampler"]), "no 'sampler'"),
        ("no importance", drop(["grass", "importance"]), "no 'importance'"),
        ("a moment of the wrong shape", reshape, "has shape"),
        ("other param groups", more_groups, "param groups do not match"),
    ]


@pytest.mark.parametrize(("what", "damage", "message"), _damaged(), ids=[d[0] for d in _damaged()])
def test_load_state_dict_refuses_a_damaged_state_and_changes_nothing(what, damage, message):
    _, source = _trained(seed=1)
    sd = copy.deepcopy(source.state_dict())
    for g in sd["param_groups"]:
        g["lr"] = 0.5  # a load that got as far as the param groups would change the LR
    damage(sd)
    _, target = _trained(seed=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(sd)
    _same(before, _snapshot(target))


@pytest.mark.parametrize(("field", "value"), [("active_layers", 2), ("policy", "uniform"), ("temperature", 2.0)])
def test_load_state_dict_refuses_another_config_unless_told(field, value):
    _, source = _trained()
    sd = source.state_dict()
    model = make_tiny_llama(num_layers=3)
    other = GrassOptimizer(model, GrassConfig(**{"active_layers": 1, "period": 2, "probe_steps": 1, field: value}), lr=1e-2)
    with pytest.raises(ValueError, match=f"another GrassConfig \\({field}: saved"):
        other.load_state_dict(sd)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        other.load_state_dict(sd, strict=False)
    assert any(f"changed GrassConfig ({field}" in str(m.message) for m in w)
    assert other.global_step == source.global_step


def test_load_state_dict_accepts_a_changed_residency_and_precision():
    """Where the states live and how updates are rounded may change on resume (states are converted)."""
    _, source = _trained()
    other = GrassOptimizer(
        make_tiny_llama(num_layers=3), GrassConfig(active_layers=1, period=2, probe_steps=1, offload=True), lr=1e-2
    )
    other.load_state_dict(source.state_dict())
    assert other.global_step == source.global_step and other.residency == "step"
