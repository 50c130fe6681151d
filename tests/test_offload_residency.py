"""LayerStateOffloader's residency per period (``keep_on_device``): bit-exact equivalence with in-memory
AdamW across departures and arrivals, the exact bytes moved, checkpoints and freeing with kept units.

The CPU "device" buffers are separate copies, so every transfer is a real copy here; the ``gpu`` test
runs the same loop on CUDA with the copy stream."""

from __future__ import annotations

import pytest
import torch
from test_offload import (
    SHAPES,
    adamw_pieces,
    assert_bitwise,
    fresh_state,
    grads_for,
    make_units,
    requires_cuda,
)

from grass_llm.offload import LayerStateOffloader


def build(units, device="cpu", chunk_bytes=None, **kw):
    off = LayerStateOffloader(device, chunk_bytes=chunk_bytes, **kw)
    for uid, params in enumerate(units):
        off.register(uid, params, fp32_states=True, fp32_master=True)
    return off


def periods(n_periods, period, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(len(SHAPES), generator=g)[:k].tolist() for _ in range(n_periods)], period


def step_kept(off, units, steps, active, grads):
    for uid in active:
        for c in range(off.num_chunks(uid)):
            state = off.acquire(uid, c)
            pieces = off.chunk_pieces(uid, c)
            params = [units[uid][i].view(-1)[a:b] if b - a != units[uid][i].numel() else units[uid][i]
                      for i, a, b in pieces]  # fmt: skip
            gs = [grads[uid][i].reshape(-1)[a:b] if b - a != grads[uid][i].numel() else grads[uid][i]
                  for i, a, b in pieces]  # fmt: skip
            adamw_pieces(params, gs, state, steps[uid] + 1, fp32_master=True)
            off.release(uid, c)
        steps[uid] += 1


@pytest.mark.parametrize("chunk_bytes", [None, 1024])
def test_kept_units_match_in_memory_adamw_and_move_only_at_resamples(chunk_bytes):
    sched, period = periods(6, 3)
    ref_units, off_units = make_units(torch.bfloat16), make_units(torch.bfloat16)
    ref_states = [fresh_state(u, True, True) for u in ref_units]
    ref_steps = [0] * len(SHAPES)
    off_steps = [0] * len(SHAPES)
    off = build(off_units, chunk_bytes=chunk_bytes)
    step = 0
    previous: list[int] = []
    for active in sched:
        before = (off.bytes_to_device, off.bytes_to_host)
        off.keep_on_device(active)
        arriving = [u for u in active if u not in previous]
        leaving = [u for u in previous if u not in active]
        assert off.bytes_to_device - before[0] == sum(off.unit_nbytes(u) for u in arriving)
        assert off.bytes_to_host - before[1] == sum(off.unit_nbytes(u) for u in leaving)
        assert set(off.kept_units()) == set(active)
        for _ in range(period):
            moved = (off.bytes_to_device, off.bytes_to_host)
            grads = grads_for(off_units, step, "cpu")
            step_kept(off, off_units, off_steps, active, grads)
            assert (off.bytes_to_device, off.bytes_to_host) == moved  # nothing inside a period
            for uid in active:
                adamw_pieces(ref_units[uid], grads[uid], ref_states[uid], ref_steps[uid] + 1, fp32_master=True)
                ref_steps[uid] += 1
            step += 1
        previous = active
        assert off.device_bytes() == sum(off.unit_nbytes(u) for u in active)
    for uid in range(len(SHAPES)):
        for got, want in zip(off_units[uid], ref_units[uid]):
            assert_bitwise(got, want)
    stored = off.state_dict()["units"]  # kept units are written back first
    for uid, state in stored.items():
        for key, ts in state.items():
            for got, want in zip(ts, ref_states[uid][key]):
                assert_bitwise(got, want)


def test_state_dict_load_and_free_with_kept_units():
    units = make_units()
    off = build(units)
    off.keep_on_device([1, 2])
    state = off.acquire(1)
    state["exp_avg"][0].fill_(5.0)
    off.release(1)
    saved = {uid: {k: [t.clone() for t in ts] for k, ts in st.items()} for uid, st in off.state_dict()["units"].items()}
    assert (saved[1]["exp_avg"][0] == 5.0).all() and set(saved) == {1, 2}

    other = build(make_units())
    other.keep_on_device([1, 3])
    other.load_state_dict({"units": saved})  # the kept copies take the loaded state (and 3 starts afresh)
    assert (other.acquire(1)["exp_avg"][0] == 5.0).all()
    other.release(1)
    assert not other.acquire(3)["exp_avg"][0].any()
    other.release(3)

    other.free_device_buffers()  # written back, dropped, still kept: copied in again on use
    assert other.device_bytes() == 0 and set(other.kept_units()) == {1, 3}
    assert (other.acquire(1)["exp_avg"][0] == 5.0).all()
    other.release(1)


def test_discard_drops_without_write_back_and_reset_starts_afresh():
    units = make_units()
    off = build(units)
    off.keep_on_device([0])
    off.acquire(0)["exp_avg"][0].fill_(2.0)
    off.release(0)
    before = off.bytes_to_host
    with pytest.raises(RuntimeError, match="kept on the device"):
        off.reset(0)
    off.keep_on_device([1], discard=[0])
    assert off.bytes_to_host == before  # no write-back
    off.reset(0)
    off.keep_on_device([0, 1])
    assert not off.acquire(0)["exp_avg"][0].any()
    off.release(0)


def test_kept_protocol_errors():
    off = build(make_units())
    off.keep_on_device([0])
    off.acquire(0)
    with pytest.raises(RuntimeError, match="already acquired"):
        off.acquire(0)
    with pytest.raises(RuntimeError, match="while one of its chunks is acquired"):
        off.keep_on_device([1])
    off.release(0)
    with pytest.raises(RuntimeError, match="not acquired"):
        off.release(0)
    with pytest.raises(KeyError, match="not registered"):
        off.keep_on_device([9])


def test_streamed_copy_of_an_arriving_unit_is_dropped():
    """A unit streamed earlier and then kept: the kept copy is the state (R2); the slot's is dropped."""
    units = make_units()
    off = build(units)
    state = off.acquire(2)
    state["exp_avg"][0].fill_(7.0)
    off.release(2)
    assert off.resident_units() == (2,)
    off.keep_on_device([2])
    assert (off.acquire(2)["exp_avg"][0] == 7.0).all()
    assert off.device_bytes() == off.unit_nbytes(2) + sum(b.numel() for b in off.device_buffers()[:-1])
    off.release(2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("overlap", [True, False])
def test_gpu_kept_units_match_in_memory_adamw(overlap):
    sched, period = periods(5, 2)
    ref_units, off_units = make_units(torch.bfloat16, "cuda"), make_units(torch.bfloat16, "cuda")
    ref_states = [fresh_state(u, True, True) for u in ref_units]
    ref_steps, off_steps = [0] * len(SHAPES), [0] * len(SHAPES)
    off = build(off_units, "cuda", chunk_bytes=1024, overlap=overlap)
    step = 0
    for active in sched:
        off.keep_on_device(active)
        for _ in range(period):
            grads = grads_for(off_units, step, "cuda")
            step_kept(off, off_units, off_steps, active, grads)
            for uid in active:
                adamw_pieces(ref_units[uid], grads[uid], ref_states[uid], ref_steps[uid] + 1, fp32_master=True)
                ref_steps[uid] += 1
            step += 1
    torch.cuda.synchronize()
    for uid in range(len(SHAPES)):
        for got, want in zip(off_units[uid], ref_units[uid]):
            assert_bitwise(got, want)
    for uid, state in off.state_dict()["units"].items():
        for key, ts in state.items():
            for got, want in zip(ts, ref_states[uid][key]):
                assert_bitwise(got.cuda(), want)
