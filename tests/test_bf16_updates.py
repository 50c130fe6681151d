"""bf16 updates that are not lost: fp32 masters (host memory under offload), Kahan, stochastic rounding."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import make_tiny_llama
from test_optim import batches, train

from grass_llm import ConfigError, GrassConfig, GrassOptimizer

ALL = dict(active_layers=4, period=100, probe_steps=0, seed=0)


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.model.layers.parameters()])


def _held(opt: GrassOptimizer, model) -> torch.Tensor:
    """The fp32 value the optimizer holds for each layer weight (master, weight + compensation, weight)."""
    state = opt.state_dict()["state"]
    index = {id(q): i for i, q in enumerate(q for g in opt.param_groups for q in g["params"])}
    out = []
    for p in model.model.layers.parameters():
        st = state.get(index[id(p)], {})
        if "master" in st:
            out.append(st["master"].reshape(-1))
        elif "compensation" in st:
            out.append((p.detach().float() + st["compensation"].float()).reshape(-1))
        else:
            out.append(p.detach().float().reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("offload", [False, True])
def test_bf16_weights_with_fp32_masters_and_bf16_moments(offload):
    """Issue #10 item 10: this combination crashed with a dtype mismatch in the update."""
    model = make_tiny_llama().to(torch.bfloat16)
    opt = GrassOptimizer(model, GrassConfig(fp32_master_weights=True, offload=offload, **ALL), lr=1e-2)
    train(model, opt, batches(3))
    assert opt.precision == "master"
    states = [st for st in opt.state_dict()["state"].values() if "exp_avg" in st]
    assert states and all(st["exp_avg"].dtype == torch.bfloat16 for st in states)
    assert all(st["master"].dtype == torch.float32 for st in states)
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in opt.state_dict()["state"].items():
        if "master" in st:
            assert torch.equal(st["master"].to(torch.bfloat16), params[idx].detach())


def test_updates_below_bf16_resolution_are_kept():
    """At a learning rate whose updates are below half a bf16 step, round-to-nearest loses most of them;
    fp32 masters, Kahan and stochastic rounding follow the fp32 run."""
    data = batches(10)
    base = make_tiny_llama()  # weights of mean magnitude 0.03: a bf16 step is 1.2e-4 to 2.4e-4
    ref = copy.deepcopy(base)
    ref_opt = GrassOptimizer(ref, GrassConfig(**ALL), lr=3e-5)
    start = _weights(ref)
    train(ref, ref_opt, data)
    target = _weights(ref) - start
    errors, changed = {}, {}
    for name, cfg in {
        "nearest": dict(fp32_master_weights=False, update_rounding="nearest"),
        "kahan": dict(fp32_master_weights=False, update_rounding="kahan"),
        "stochastic": dict(fp32_master_weights=False, update_rounding="stochastic"),
        "master": dict(offload=True),  # the GPU default: fp32 masters in host memory
    }.items():
        model = copy.deepcopy(base).to(torch.bfloat16)
        opt = GrassOptimizer(model, GrassConfig(**ALL, **cfg), lr=3e-5)
        assert opt.precision == name
        w0 = _weights(model)
        train(model, opt, data)
        changed[name] = float((_weights(model) != w0).float().mean())
        errors[name] = float((_held(opt, model) - w0 - target).norm() / target.norm())
    assert changed["nearest"] < 0.5 < min(changed[k] for k in ("kahan", "stochastic", "master"))
    assert errors["nearest"] > 0.8  # most of the update is gone
    assert max(errors["kahan"], errors["master"]) < 0.1  # the update is kept (bf16 forward aside)
    # stochastic rounding keeps the update in expectation, with noise of about a bf16 step per weight
    assert errors["stochastic"] < 2


def test_stochastic_rounding_is_unbiased_and_reproducible():
    model = make_tiny_llama().to(torch.bfloat16)
    opt = GrassOptimizer(model, GrassConfig(update_rounding="stochastic", **ALL), lr=1e-3)
    lo, hi = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0078125, dtype=torch.bfloat16)
    x = torch.full((200_000,), 1.0 + 0.25 * 0.0078125)  # a quarter of the way up
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    opt.store.precision.stochastic_round_(out, x, (3, 0), opt.global_step)
    assert set(out.unique().tolist()) == {lo.item(), hi.item()}
    assert float((out == hi).float().mean()) == pytest.approx(0.25, abs=0.005)
    again = torch.empty_like(out)
    opt.store.precision.stochastic_round_(again, x, (3, 0), opt.global_step)
    assert torch.equal(out, again)  # keyed by (seed, step, parameter, element): reproducible
    halves = torch.empty(100_000, dtype=torch.bfloat16), torch.empty(100_000, dtype=torch.bfloat16)
    opt.store.precision.stochastic_round_(halves[0], x[:100_000], (3, 0), opt.global_step)
    opt.store.precision.stochastic_round_(halves[1], x[100_000:], (3, 100_000), opt.global_step)
    assert torch.equal(torch.cat(halves), out)  # the same bits however the tensor is cut into pieces


def test_resume_into_the_other_precision_keeps_the_exact_weights():
    """A checkpoint with fp32 masters (offload) resumes without offload as weight + Kahan compensation."""
    model = make_tiny_llama().to(torch.bfloat16)
    opt = GrassOptimizer(model, GrassConfig(offload=True, **ALL), lr=1e-2)
    train(model, opt, batches(4))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    masters = _held(opt, model)
    model2 = make_tiny_llama().to(torch.bfloat16)
    model2.load_state_dict(ckpt["model"])
    opt2 = GrassOptimizer(model2, GrassConfig(offload=False, **ALL), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.precision == "kahan"
    train(model2, opt2, batches(1))  # the first update converts master -> compensation
    assert any("compensation" in st for st in opt2.state.values())
    # and back: a Kahan checkpoint into an offloaded (master) optimizer
    model3 = make_tiny_llama().to(torch.bfloat16)
    model3.load_state_dict(ckpt["model"])
    opt3 = GrassOptimizer(model3, GrassConfig(offload=True, **ALL), lr=1e-2)
    buf = io.BytesIO()
    torch.save(opt2.state_dict(), buf)
    buf.seek(0)
    model3.load_state_dict(model2.state_dict())
    kahan_held = _held(opt2, model2)
    opt3.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.allclose(_held(opt3, model3), kahan_held, rtol=0, atol=1e-6)
    assert masters.shape == kahan_held.shape


def test_precision_settings_are_checked():
    with pytest.raises(ConfigError, match="update_rounding"):
        GrassConfig(update_rounding="up")
    with pytest.raises(ConfigError, match="fp32_master_weights"):
        GrassConfig(fp32_master_weights="yes")
    fp16 = make_tiny_llama().to(torch.float16)
    with pytest.raises(ValueError, match="stochastic"):
        GrassOptimizer(fp16, GrassConfig(update_rounding="stochastic", **ALL))
    fp32 = make_tiny_llama()
    assert GrassOptimizer(fp32, GrassConfig(offload=True, **ALL)).precision == "nearest"  # exact anyway
