"""Optimizer-state offloading inside GrassOptimizer, streamed per step or kept per period: the same numbers
as in memory, exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_tiny_llama
from test_optim import assert_models_equal, batches, train

from grass_llm import GrassConfig, GrassOptimizer


def _run(offload, steps=20, dtype=torch.float32, split=None, load_offload=None, **cfg):
    base = dict(active_layers=2, period=3, probe_steps=2, seed=11, offload=offload, train_head=True)
    base.update(cfg)
    data = batches(steps)
    model = make_tiny_llama(num_layers=5).to(dtype)
    opt = GrassOptimizer(model, GrassConfig(**base), lr=1e-2, weight_decay=0.01)
    if split is None:
        return model, opt, train(model, opt, data)
    log = train(model, opt, data[:split])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = make_tiny_llama(num_layers=5).to(dtype)
    model2.load_state_dict(ckpt["model"])
    base["offload"] = offload if load_offload is None else load_offload
    opt2 = GrassOptimizer(model2, GrassConfig(**base), lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(ckpt["opt"])
    return model2, opt2, log + train(model2, opt2, data[split:])


@pytest.mark.parametrize(
    "precision",
    [
        dict(),
        dict(dtype=torch.bfloat16, fp32_master_weights=False, update_rounding="nearest"),
        dict(dtype=torch.bfloat16, fp32_master_weights=False, update_rounding="kahan"),
        dict(dtype=torch.bfloat16, fp32_master_weights=False, update_rounding="stochastic"),
        dict(dtype=torch.bfloat16, fp32_master_weights=True),
        dict(dtype=torch.bfloat16, fp32_optimizer_states=True, fp32_master_weights=False),
        dict(dtype=torch.bfloat16, fp32_optimizer_states=True, fp32_master_weights=True),
    ],
    ids=[
        "fp32",
        "bf16-nearest",
        "bf16-kahan",
        "bf16-stochastic",
        "bf16+fp32-master",
        "bf16+fp32-states",
        "bf16+fp32-states+master",
    ],
)
@pytest.mark.parametrize("residency", ["step", "period"])
def test_offload_equals_in_memory_bit_for_bit(precision, residency):
    m_mem, o_mem, log_mem = _run("off", **precision)
    m_off, o_off, log_off = _run(residency, **precision)
    assert o_mem.offloader is None and o_off.offloader is not None
    assert log_mem == log_off and len({tuple(a) for a in log_off}) > 2  # several layer switches
    assert_models_equal(m_mem, m_off)
    sd_mem, sd_off = o_mem.state_dict(), o_off.state_dict()
    assert sd_mem["state"].keys() == sd_off["state"].keys()
    for idx, st in sd_mem["state"].items():
        for key, value in st.items():
            assert torch.equal(value, sd_off["state"][idx][key]), (idx, key)
            assert value.dtype == sd_off["state"][idx][key].dtype


def test_offload_keeps_at_most_two_units_on_device():
    _model, opt, _ = _run(True, steps=12, active_layers=4)
    off = opt.offloader
    largest = max(off.unit_nbytes(u) for u in off.units())
    assert 0 < off.device_bytes() <= 2 * largest
    assert off.host_bytes() >= 5 * off.unit_nbytes("layer.0")  # every layer that trained is in host memory


@pytest.mark.parametrize(
    ("save_offload", "load_offload"),
    [("step", "step"), ("step", "off"), ("off", "step"), ("period", "period"), ("period", "step"), ("off", "period")],
)
def test_resume_with_offloaded_states(save_offload, load_offload):
    m_full, _o_full, log_full = _run(save_offload, steps=14)
    m_res, _o_res, log_res = _run(save_offload, steps=14, split=8, load_offload=load_offload)
    assert log_res == log_full
    assert_models_equal(m_res, m_full)


def test_fp32_master_precision_and_state_dtypes():
    _model, opt, _ = _run(
        True, steps=8, dtype=torch.bfloat16, fp32_optimizer_states=True, fp32_master_weights=True
    )
    states = [st for st in opt.state_dict()["state"].values() if "exp_avg" in st]
    assert states and all(
        st["exp_avg"].dtype == torch.float32 and st["master"].dtype == torch.float32 for st in states
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in opt.state_dict()["state"].items():
        if "master" in st:
            assert torch.equal(st["master"].to(torch.bfloat16), params[idx].detach())


@pytest.mark.parametrize("residency", ["step", "period"])
def test_reset_with_offload_matches_in_memory(residency):
    m_mem, _, log_mem = _run("off", steps=16, on_reactivation="reset", active_layers=1, period=2)
    m_off, _, log_off = _run(residency, steps=16, on_reactivation="reset", active_layers=1, period=2)
    assert log_mem == log_off
    assert_models_equal(m_mem, m_off)


def test_frozen_embeddings_and_head_take_no_device_slot_whatever_the_vocabulary():
    """Only units that can train are registered: two decoder layers' states at most, for any vocabulary."""
    device_bytes = {}
    for vocab in (64, 4096):
        model = make_tiny_llama(num_layers=4, vocab=vocab).to(torch.bfloat16)
        opt = GrassOptimizer(
            model, GrassConfig(active_layers=2, period=2, probe_steps=0, offload=True), lr=1e-3
        )
        train(model, opt, batches(5))
        off = opt.offloader
        assert set(off.units()) == {f"layer.{i}" for i in range(4)}
        layer = max(off.unit_nbytes(u) for u in off.units())
        assert 0 < off.device_bytes() <= 2 * layer
        device_bytes[vocab] = off.device_bytes()
    assert device_bytes[64] == device_bytes[4096]


@pytest.mark.parametrize("residency", ["step", "period"])
def test_trained_embeddings_and_head_are_staged_in_chunks(monkeypatch, residency):
    """LISA-style: a 4096 x 16 embedding and head, staged in 2 KiB chunks, same numbers as in memory."""
    import grass_llm._optim.state_store as state_store

    monkeypatch.setattr(state_store, "OFFLOAD_CHUNK_BYTES", 2048)
    cfg = dict(
        active_layers=2,
        period=2,
        probe_steps=0,
        train_embeddings=True,
        train_head=True,
        fp32_master_weights=True,
    )
    models, opts = [], []
    for offload in ("off", residency):
        model = make_tiny_llama(num_layers=4, vocab=4096).to(torch.bfloat16)
        opt = GrassOptimizer(model, GrassConfig(offload=offload, **cfg), lr=1e-3, weight_decay=0.01)
        train(model, opt, batches(6))
        models.append(model)
        opts.append(opt)
    off = opts[1].offloader
    assert off.num_chunks("embeddings") > 10 and off.num_chunks("head") > 10
    if residency == "step":
        assert 0 < off.device_bytes() <= 2 * 2048
    else:  # the active layers, the embeddings and the head stay on the device
        kept = ["embeddings", "head", *(f"layer.{i}" for i in opts[1].active_layers)]
        assert off.device_bytes() == sum(off.unit_nbytes(u) for u in kept)
    assert_models_equal(*models)
    for (idx, st), st_off in zip(
        opts[0].state_dict()["state"].items(), opts[1].state_dict()["state"].values()
    ):
        for key, value in st.items():
            assert torch.equal(value, st_off[key]), (idx, key)


@pytest.mark.parametrize("residency", ["step", "period"])
def test_state_dict_leaves_the_offloaded_state_where_it_lives(residency):
    """state_dict() copies the offloaded moments into its result only: the optimizer's own per-parameter
    state keeps just the step counter (the moments stay in the offloader's buffers, once)."""
    _, opt, _ = _run(residency, steps=6)
    sd = opt.state_dict()
    assert any("exp_avg" in st for st in sd["state"].values())
    assert all(set(st) == {"step"} for st in opt.state.values())
