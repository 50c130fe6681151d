"""step_in_backward: each trained unit is updated from a gradient-ready hook during backward.

Same numbers as stepping after backward (bit for bit on CPU), gradients freed as it goes, accumulation
through no_sync(), exact resume, clear errors."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_tiny_llama
from test_optim import assert_models_equal, batches

from grass_llm import ConfigError, GrassConfig, GrassOptimizer


def _train(model, opt, data, accum=1, sched=None, check_freed=False):
    log = []
    for x in data:
        chunks = x.chunk(accum)
        for i, chunk in enumerate(chunks):
            loss = model(input_ids=chunk, labels=chunk).loss / accum
            if i + 1 < len(chunks):
                with opt.no_sync():
                    loss.backward()
            else:
                loss.backward()
        if check_freed and not opt.probing:
            # the update already happened in backward and freed every trained gradient
            assert all(p.grad is None for p in opt.trainable_parameters())
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        log.append((opt.active_layers, opt.probabilities.tolist()))
    return log


def _pair(sib: bool, dtype=torch.float32, **cfg):
    base = dict(active_layers=2, period=3, probe_steps=2, seed=5, train_head=True, train_norm=True)
    base.update(cfg)
    model = make_tiny_llama(num_layers=5).to(dtype)
    return model, GrassOptimizer(model, GrassConfig(step_in_backward=sib, **base), lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(offload=True),
        dict(offload="period"),
        dict(offload=True, dtype=torch.bfloat16, fp32_optimizer_states=True, fp32_master_weights=True),
        dict(offload="period", dtype=torch.bfloat16),
        dict(train_embeddings=True, policy="uniform"),
        dict(accum=2),
    ],
    ids=["fp32", "offload", "period", "bf16-offload-fp32-master", "bf16-period", "embeddings-uniform", "accum2"],
)
def test_step_in_backward_equals_step_after_backward(setting):
    setting = dict(setting)
    accum = setting.pop("accum", 1)
    data = batches(20, bs=4)
    runs = []
    for sib in (False, True):
        model, opt = _pair(sib, **setting)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the applied LR changes
        log = _train(model, opt, data, accum=accum, sched=sched, check_freed=sib)
        runs.append((model, opt, log))
    (m0, o0, log0), (m1, o1, log1) = runs
    assert log0 == log1 and len({tuple(a) for a, _ in log1}) > 2  # same draws, several switches
    assert_models_equal(m0, m1)
    assert torch.equal(o0.importance, o1.importance)
    sd0, sd1 = o0.state_dict(), o1.state_dict()
    for idx, st in sd0["state"].items():
        for key, value in st.items():
            assert torch.equal(value, sd1["state"][idx][key]), (idx, key)


def test_each_unit_is_updated_while_backward_runs():
    """The top active layer is updated before the lower one's gradients exist: at most one unit's
    gradients are alive when an update runs."""
    model, opt = _pair(True, probe_steps=0, active_layers=3, train_head=False, train_norm=False)
    alive_at_update = []
    original = opt.in_backward._step_unit

    def spy(gi):
        alive_at_update.append(
            sorted(i for i, ps in enumerate(opt.groups.block_params) if any(p.grad is not None for p in ps))
        )
        original(gi)

    opt.in_backward._step_unit = spy
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    active = opt.active_layers
    assert alive_at_update == [[i] for i in sorted(active, reverse=True)]
    opt.step()


def test_resume_with_step_in_backward_is_exact():
    data = batches(16)
    model, opt = _pair(True, offload=True)
    ref_log = _train(model, opt, data)

    model_a, opt_a = _pair(True, offload=True)
    log = _train(model_a, opt_a, data[:7])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_b, opt_b = _pair(True, offload=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    log += _train(model_b, opt_b, data[7:])
    assert log == ref_log
    assert_models_equal(model, model_b)


def test_second_backward_without_no_sync_is_an_error():
    model, _ = _pair(True, probe_steps=0)
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        model(input_ids=x, labels=x).loss.backward()


def test_step_in_backward_refuses_clipping():
    with pytest.raises(ConfigError, match=r"step_in_backward.*max_grad_norm"):
        GrassConfig(step_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="step_in_backward"):
        GrassConfig(step_in_backward="yes")
