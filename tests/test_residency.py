"""Where GrassOptimizer's AdamW states live (GrassConfig.offload), and the bytes each residency moves.

On the CPU the offloader keeps separate "device" buffers and really copies, so the traffic counted here is
what a GPU run moves: per period, nothing inside a period and exactly the leaving and arriving units' states
at a resample; per step, every trained unit's state in and out at every step."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_optim import batches

from grass_llm import GrassConfig, GrassOptimizer


def _stepwise(opt, model, data):
    """(active layers before, after, bytes to device, bytes to host) of each step."""
    out = []
    for x in data:
        before = (list(opt.active_layers), opt.offloader.bytes_to_device, opt.offloader.bytes_to_host)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(
            (before[0], list(opt.active_layers), opt.offloader.bytes_to_device - before[1], opt.offloader.bytes_to_host - before[2])
        )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_period_residency_moves_state_only_at_resamples(dtype, one_thread):
    model = make_tiny_llama(num_layers=6).to(dtype)
    opt = GrassOptimizer(model, GrassConfig(active_layers=2, period=3, probe_steps=2, offload="period"), lr=1e-2)
    off = opt.offloader
    nbytes = {i: off.unit_nbytes(f"layer.{i}") for i in range(6)}
    steps = _stepwise(opt, model, batches(2 + 3 * 6))
    resamples = 0
    for i, (old, new, to_device, to_host) in enumerate(steps):
        arriving, leaving = set(new) - set(old), set(old) - set(new)
        assert to_device == sum(nbytes[u] for u in arriving), i
        assert to_host == sum(nbytes[u] for u in leaving), i
        resamples += old != new
        if i >= 2 and (i - 2) % 3 != 2:  # inside a period: nothing moves
            assert (to_device, to_host) == (0, 0), i
    assert resamples >= 4
    assert off.kept_units() == tuple(f"layer.{i}" for i in opt.active_layers)
    assert off.device_bytes() == sum(nbytes[i] for i in opt.active_layers)


def test_step_residency_streams_every_trained_unit_every_step(monkeypatch, one_thread):
    import grass_llm._optim.state_store as state_store

    monkeypatch.setattr(state_store, "OFFLOAD_CHUNK_BYTES", 1024)  # many chunks: no chunk is still cached
    model = make_tiny_llama(num_layers=4)
    opt = GrassOptimizer(model, GrassConfig(active_layers=2, period=3, probe_steps=1, offload="step"), lr=1e-2)
    off = opt.offloader
    assert off.num_chunks("layer.0") > 4
    for i, (old, _, to_device, to_host) in enumerate(_stepwise(opt, model, batches(8))):
        if i == 0:  # probing moves no state
            assert (to_device, to_host) == (0, 0)
            continue
        moved = sum(off.unit_nbytes(f"layer.{u}") for u in old)
        assert to_device == moved and to_host == moved, i
    assert off.device_bytes() <= 2 * 1024


def test_period_residency_keeps_the_state_across_a_checkpoint(one_thread):
    """state_dict() mid-period writes the kept units back (and keeps them); a resumed run continues bit for bit."""
    import io

    data = batches(14)
    runs = []
    for split in (None, 7):
        model = make_tiny_llama(num_layers=5).to(torch.bfloat16)
        cfg = GrassConfig(active_layers=2, period=3, probe_steps=2, seed=3, offload="period")
        opt = GrassOptimizer(model, cfg, lr=1e-2)
        for i, x in enumerate(data):
            if i == split:
                buf = io.BytesIO()
                torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf, weights_only=False)
                model = make_tiny_llama(num_layers=5).to(torch.bfloat16)
                model.load_state_dict(ck["m"])
                opt = GrassOptimizer(model, cfg, lr=1e-2)
                opt.load_state_dict(ck["o"])
                assert opt.offloader.kept_units() == tuple(f"layer.{i}" for i in opt.active_layers)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append(model)
    for (n, p), (_, q) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
        assert torch.equal(p, q), n


def test_residency_names_and_precision_defaults():
    model = make_tiny_llama(num_layers=2).to(torch.bfloat16)
    for offload, residency, precision in [
        ("off", "off", "kahan"),
        (False, "off", "kahan"),
        ("step", "step", "master"),
        (True, "step", "master"),
        ("period", "period", "kahan"),
        ("auto", "off", "kahan"),  # on the CPU
    ]:
        opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0, offload=offload), lr=1e-2)
        assert (opt.residency, opt.precision) == (residency, precision), offload
        opt.close()
