"""LayerStateOffloader: bit-exact equivalence with in-memory AdamW, bounded residency, checkpoints.

CPU tests exercise the full copy-in / copy-out path (the CPU "device" buffers are separate
copies); the ``gpu`` tests check pinning, the copy stream and the event ordering on CUDA.
"""

from __future__ import annotations

import io
import itertools
import time

import pytest
import torch
from torch.optim.adam import adam

from grass_llm.offload import STATE_KEYS, LayerStateOffloader

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Heterogeneous units (different sizes, a 0-d and an empty parameter) so slot sizing,
# alignment and eviction are exercised, not just identical layers.
SHAPES = [
    [(8, 16), (16,), ()],
    [(4, 4), (3, 5, 7)],
    [(32, 8), (8,), (0, 3)],
    [(5,), (6, 2)],
]


def make_units(dtype=torch.float32, device="cpu", shapes=SHAPES):
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in unit] for unit in shapes]


def adamw_step(params, grads, state, step, fp32_master):
    """One functional AdamW step on ``params`` using the state dict layout of the offloader."""
    target = state["master"] if fp32_master else params
    grads = [g.to(t.dtype) for g, t in zip(grads, target)]
    step += 1
    adam(
        target,
        grads,
        state["exp_avg"],
        state["exp_avg_sq"],
        [],
        [step] * len(target),
        foreach=False,
        amsgrad=False,
        beta1=0.9,
        beta2=0.95,
        lr=1e-2,
        weight_decay=0.1,
        eps=1e-8,
        maximize=False,
        decoupled_weight_decay=True,
    )
    if fp32_master:
        for p, m in zip(params, target):
            p.copy_(m)


def fresh_state(params, fp32_states, fp32_master):
    sdt = (lambda p: torch.float32) if fp32_states else (lambda p: p.dtype)
    state = {
        "exp_avg": [torch.zeros_like(p, dtype=sdt(p)) for p in params],
        "exp_avg_sq": [torch.zeros_like(p, dtype=sdt(p)) for p in params],
    }
    if fp32_master:
        state["master"] = [p.detach().float().clone() for p in params]
    return state


def schedule(n_steps, n_units, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_units, generator=g)[:k].tolist() for _ in range(n_steps)]


def grads_for(units, step, device):
    g = torch.Generator().manual_seed(1000 + step)
    return [[torch.randn(p.shape, generator=g).to(device=device, dtype=p.dtype) for p in u] for u in units]


def assert_bitwise(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def check_bounded(off):
    assert len(off.resident_units()) <= 2
    biggest = max(off.unit_nbytes(u) for u in off.units())
    assert off.device_bytes() <= 2 * biggest


def run_offloaded(off, units, steps, sched, fp32_master, device, start=0):
    """Steps the scheduled units through the offloader, prefetching the next one."""
    order = [u for step_units in sched for u in step_units]
    pos = 0
    if order:
        off.prefetch(order[0])
    for i, active in enumerate(sched, start=start):
        grads = grads_for(units, i, device)
        for uid in active:
            state = off.acquire(uid)
            check_bounded(off)
            if pos + 1 < len(order) and order[pos + 1] != uid:
                off.prefetch(order[pos + 1])
                check_bounded(off)
            adamw_step(units[uid], grads[uid], state, steps[uid], fp32_master)
            off.release(uid)
            check_bounded(off)
            pos += 1


def run_reference(states, units, steps, sched, fp32_master, device, start=0):
    for i, active in enumerate(sched, start=start):
        grads = grads_for(units, i, device)
        for uid in active:
            adamw_step(units[uid], grads[uid], states[uid], steps[uid], fp32_master)


def build(units, device, fp32_states, fp32_master, **kw):
    off = LayerStateOffloader(device, **kw)
    for uid, params in enumerate(units):
        off.register(uid, params, fp32_states=fp32_states, fp32_master=fp32_master)
    return off


CONFIGS = [
    pytest.param(torch.float32, False, False, id="fp32"),
    pytest.param(torch.bfloat16, False, False, id="bf16-states"),
    pytest.param(torch.bfloat16, True, True, id="bf16-params-fp32-states-master"),
]


# ---------------------------------------------------------------------------- CPU tests
def test_lazy_allocation_and_layout():
    units = make_units(torch.bfloat16)
    off = build(units, "cpu", fp32_states=True, fp32_master=True)
    assert off.host_bytes() == 0 and off.device_bytes() == 0
    assert off.units() == (0, 1, 2, 3) and len(off) == 4
    state = off.acquire(1)
    assert set(state) == {"exp_avg", "exp_avg_sq", "master"}
    assert off.host_bytes() == off.unit_nbytes(1)
    for key in ("exp_avg", "exp_avg_sq", "master"):
        assert [t.shape for t in state[key]] == [p.shape for p in units[1]]
        assert all(t.dtype == torch.float32 for t in state[key])
    assert all(t.device.type == "cpu" for ts in state.values() for t in ts)
    for t in state["exp_avg"] + state["exp_avg_sq"]:
        assert not t.any()
    # master starts as the exact fp32 value of the bf16 parameter
    for m, p in zip(state["master"], units[1]):
        assert_bitwise(m, p.float())
    for ts in state.values():
        for t in ts:
            assert t.data_ptr() % 16 == 0
    off.release(1)


def test_default_state_dtype_follows_params():
    units = make_units(torch.bfloat16)
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    state = off.acquire(0)
    assert set(state) == {"exp_avg", "exp_avg_sq"}
    assert all(t.dtype == torch.bfloat16 for ts in state.values() for t in ts)


def test_round_trip_bit_exact_and_host_allocated_once():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=True)
    steps = [torch.tensor(0.0) for _ in units]
    host_ptrs = None
    expected = None
    for cycle in range(4):
        state = off.acquire(0)
        if expected is not None:
            for key in state:
                for got, want in zip(state[key], expected[key]):
                    assert_bitwise(got, want)
        host_views = off.state_dict()["units"][0]
        # the device copy is separate memory from the host buffer (copy path is exercised)
        assert state["exp_avg"][0].data_ptr() != host_views["exp_avg"][0].data_ptr()
        grads = [torch.randn_like(p) for p in units[0]]
        adamw_step(units[0], grads, state, steps[0], fp32_master=True)
        expected = {k: [t.clone() for t in v] for k, v in state.items()}
        off.release(0)
        # evict unit 0 from both slots so the next acquire copies from host memory
        for other in (1, 2):
            off.acquire(other)
            off.release(other)
        assert 0 not in off.resident_units()
        ptrs = {k: [t.data_ptr() for t in v] for k, v in off.state_dict()["units"][0].items()}
        if host_ptrs is None:
            host_ptrs, host_bytes = ptrs, off.host_bytes()
        assert ptrs == host_ptrs, f"host buffers reallocated in cycle {cycle}"
        assert off.host_bytes() == host_bytes
        for key, ts in off.state_dict()["units"][0].items():
            for got, want in zip(ts, expected[key]):
                assert_bitwise(got, want)


def test_release_then_reacquire_hits_cached_slot():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    state = off.acquire(2)
    state["exp_avg"][0].fill_(3.0)
    ptr = state["exp_avg"][0].data_ptr()
    off.release(2)
    assert off.resident_units() == (2,)
    again = off.acquire(2)
    assert again["exp_avg"][0].data_ptr() == ptr  # same slot, no transfer
    assert (again["exp_avg"][0] == 3.0).all()
    off.release(2)
    assert (off.state_dict()["units"][2]["exp_avg"][0] == 3.0).all()


@pytest.mark.parametrize(("dtype", "fp32_states", "fp32_master"), CONFIGS)
def test_switching_loop_matches_in_memory_adamw(dtype, fp32_states, fp32_master):
    n_steps = 20
    sched = schedule(n_steps, len(SHAPES))
    ref_units, off_units = make_units(dtype), make_units(dtype)
    ref_states = [fresh_state(u, fp32_states, fp32_master) for u in ref_units]
    ref_steps = [torch.tensor(0.0) for _ in SHAPES]
    off_steps = [torch.tensor(0.0) for _ in SHAPES]

    off = build(off_units, "cpu", fp32_states, fp32_master)
    run_reference(ref_states, ref_units, ref_steps, sched, fp32_master, "cpu")
    run_offloaded(off, off_units, off_steps, sched, fp32_master, "cpu")

    for uid in range(len(SHAPES)):
        for got, want in zip(off_units[uid], ref_units[uid]):
            assert_bitwise(got, want)
        assert_bitwise(off_steps[uid], ref_steps[uid])
    stored = off.state_dict()["units"]
    stepped = {u for s in sched for u in s}
    assert set(stored) == stepped
    for uid in stepped:
        for key, ts in stored[uid].items():
            for got, want in zip(ts, ref_states[uid][key]):
                assert_bitwise(got, want)
    assert off.device_bytes() <= 2 * max(off.unit_nbytes(u) for u in off.units())
    assert off.host_bytes() == sum(off.unit_nbytes(u) for u in stepped)


def test_residency_never_exceeds_two_units():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    biggest = max(off.unit_nbytes(u) for u in off.units())
    off.acquire(0)
    off.prefetch(1)
    off.prefetch(2)  # evicts the never-acquired prefetch of unit 1, not the acquired unit 0
    assert set(off.resident_units()) == {0, 2}
    off.acquire(3)  # evicts prefetched unit 2
    assert set(off.resident_units()) == {0, 3}
    with pytest.raises(RuntimeError, match="both device slots"):
        off.prefetch(1)
    off.release(0)
    off.prefetch(1)  # evicts the released unit 0
    assert set(off.resident_units()) == {1, 3}
    off.release(3)
    off.prefetch(2)  # a released unit goes before a pending prefetch (1 is about to be used)
    assert set(off.resident_units()) == {1, 2}
    assert off.device_bytes() <= 2 * biggest


def test_slot_grows_for_unit_registered_later():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    off.acquire(0)
    off.release(0)
    big = [torch.randn(64, 64)]
    off.register("big", big)
    state = off.acquire("big")
    state["exp_avg"][0].copy_(big[0])
    off.release("big")
    for uid in (1, 2):
        off.acquire(uid)
        off.release(uid)
    assert_bitwise(off.state_dict()["units"]["big"]["exp_avg"][0], big[0])
    assert off.device_bytes() <= 2 * off.unit_nbytes("big")


@pytest.mark.parametrize(("dtype", "fp32_states", "fp32_master"), CONFIGS)
def test_state_dict_save_load_continue_matches_uninterrupted(dtype, fp32_states, fp32_master):
    sched = schedule(20, len(SHAPES), seed=3)
    units_a = make_units(dtype)
    steps_a = [torch.tensor(0.0) for _ in SHAPES]
    off_a = build(units_a, "cpu", fp32_states, fp32_master)
    run_offloaded(off_a, units_a, steps_a, sched[:10], fp32_master, "cpu")

    buf = io.BytesIO()
    sd = off_a.state_dict()
    assert all(t.device.type == "cpu" for s in sd["units"].values() for ts in s.values() for t in ts)
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    units_b = [[p.clone() for p in u] for u in units_a]
    steps_b = [s.clone() for s in steps_a]
    off_b = build(units_b, "cpu", fp32_states, fp32_master)
    off_b.load_state_dict(loaded)

    run_offloaded(off_a, units_a, steps_a, sched[10:], fp32_master, "cpu", start=10)
    run_offloaded(off_b, units_b, steps_b, sched[10:], fp32_master, "cpu", start=10)
    for pa, pb in zip(units_a, units_b):
        for a, b in zip(pa, pb):
            assert_bitwise(a, b)
    sda, sdb = off_a.state_dict()["units"], off_b.state_dict()["units"]
    assert sda.keys() == sdb.keys()
    for uid in sda:
        for key in sda[uid]:
            for a, b in zip(sda[uid][key], sdb[uid][key]):
                assert_bitwise(a, b)


def test_load_state_dict_resets_absent_units_and_invalidates_slots():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=True)
    state = off.acquire(0)
    state["exp_avg"][0].fill_(1.0)
    state["master"][0].fill_(7.0)
    off.release(0)
    ptr = off.state_dict()["units"][0]["exp_avg"][0].data_ptr()
    off.load_state_dict({"units": {}})
    assert off.resident_units() == ()
    assert off.state_dict()["units"] == {}
    state = off.acquire(0)
    assert not state["exp_avg"][0].any()
    assert_bitwise(state["master"][0], units[0][0].float())  # re-initialised from the param
    off.release(0)
    assert off.state_dict()["units"][0]["exp_avg"][0].data_ptr() == ptr  # buffer reused


def test_reset_reinitialises_lazily_in_place():
    units = make_units(torch.bfloat16)
    off = build(units, "cpu", fp32_states=True, fp32_master=True)
    steps = [torch.tensor(0.0) for _ in units]
    state = off.acquire(0)
    adamw_step(units[0], [torch.randn_like(p) for p in units[0]], state, steps[0], fp32_master=True)
    off.release(0)
    ptr = off.state_dict()["units"][0]["exp_avg"][0].data_ptr()
    off.reset(3)  # never used: nothing to forget
    off.reset(0)
    assert 0 not in off.resident_units()  # the cached device copy is dropped
    assert 0 not in off.state_dict()["units"]
    state = off.acquire(0)
    for t in state["exp_avg"] + state["exp_avg_sq"]:
        assert not t.any()
    for m, p in zip(state["master"], units[0]):
        assert_bitwise(m, p.float())  # master re-taken from the (updated) parameter
    with pytest.raises(RuntimeError, match="acquired"):
        off.reset(0)
    off.release(0)
    assert off.state_dict()["units"][0]["exp_avg"][0].data_ptr() == ptr


def test_reset_in_loop_matches_in_memory():
    sched = schedule(20, len(SHAPES), seed=5)
    ref_units, off_units = make_units(), make_units()
    ref_states = [fresh_state(u, False, True) for u in ref_units]
    ref_steps = [torch.tensor(0.0) for _ in SHAPES]
    off_steps = [torch.tensor(0.0) for _ in SHAPES]
    off = build(off_units, "cpu", fp32_states=False, fp32_master=True)
    for i in range(0, 20, 5):
        run_reference(ref_states, ref_units, ref_steps, sched[i : i + 5], True, "cpu", start=i)
        run_offloaded(off, off_units, off_steps, sched[i : i + 5], True, "cpu", start=i)
        leaving = sched[i + 4][0]
        ref_states[leaving] = fresh_state(ref_units[leaving], False, True)
        ref_steps[leaving].zero_()
        off_steps[leaving].zero_()
        off.reset(leaving)
    for got_u, want_u in zip(off_units, ref_units):
        for got, want in zip(got_u, want_u):
            assert_bitwise(got, want)


def test_load_state_dict_validates():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    off.acquire(1)
    off.release(1)
    good = {k: [t.clone() for t in v] for k, v in off.state_dict()["units"][1].items()}
    with pytest.raises(ValueError, match="not registered"):
        off.load_state_dict({"units": {"nope": good}})
    with pytest.raises(ValueError, match="state keys"):
        off.load_state_dict({"units": {1: {**good, "master": good["exp_avg"]}}})
    with pytest.raises(ValueError, match="expected"):
        off.load_state_dict({"units": {1: {**good, "exp_avg": [t.double() for t in good["exp_avg"]]}}})
    with pytest.raises(ValueError, match="expected"):
        off.load_state_dict({"units": {0: good}})
    off.acquire(2)
    with pytest.raises(RuntimeError, match="acquired"):
        off.load_state_dict({"units": {1: good}})


def test_protocol_errors():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    with pytest.raises(ValueError, match="already registered"):
        off.register(0, units[0])
    with pytest.raises(ValueError, match="no parameters"):
        off.register("empty", [])
    with pytest.raises(TypeError, match="non-float"):
        off.register("int", [torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(KeyError, match="not registered"):
        off.acquire(42)
    with pytest.raises(RuntimeError, match="not acquired"):
        off.release(0)
    off.acquire(0)
    with pytest.raises(RuntimeError, match="already acquired"):
        off.acquire(0)
    off.acquire(1)
    with pytest.raises(RuntimeError, match="both device slots"):
        off.acquire(2)
    with pytest.raises(RuntimeError, match="acquired"):
        off.free_device_buffers()
    with pytest.raises(ValueError, match="pin_memory"):
        LayerStateOffloader("cpu", pin_memory="yes")
    with pytest.raises(ValueError, match="unsupported device"):
        LayerStateOffloader("mps")
    with pytest.raises(ValueError, match="chunk_bytes"):
        LayerStateOffloader("cpu", chunk_bytes=8)
    with pytest.raises(IndexError, match="chunks"):
        off.acquire(2, chunk=1)


def test_free_device_buffers_then_continue():
    units = make_units()
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    state = off.acquire(0)
    state["exp_avg_sq"][1].fill_(2.0)
    off.release(0)
    off.prefetch(1)
    off.free_device_buffers()
    assert off.device_bytes() == 0 and off.resident_units() == ()
    state = off.acquire(0)
    assert (state["exp_avg_sq"][1] == 2.0).all()
    off.release(0)


def test_cpu_device_never_pins_or_streams():
    off = LayerStateOffloader("cpu", pin_memory=True)
    off.register(0, [torch.randn(4)])
    off.acquire(0)
    off.release(0)
    off.synchronize()
    assert off.copy_stream is None
    assert not off.state_dict()["units"][0]["exp_avg"][0].is_pinned()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_raises():
    with pytest.raises(ValueError, match="CUDA is not available"):
        LayerStateOffloader("cuda")


# ---------------------------------------------------------------------------- chunks
CHUNK = 1024  # bytes: splits most SHAPES parameters into several pieces


def _piece(t, i, a, b, params):
    p = params[i]
    return t if (a, b) == (0, p.numel()) else t.reshape(-1)[a:b]


def adamw_pieces(params, grads, state, step, fp32_master):
    """AdamW step number ``step`` on tensors (whole parameters or pieces), each with its own step count."""
    target = state["master"] if fp32_master else params
    adam(
        target,
        [g.to(t.dtype) for g, t in zip(grads, target)],
        state["exp_avg"],
        state["exp_avg_sq"],
        [],
        [torch.tensor(step - 1.0) for _ in target],
        foreach=False,
        amsgrad=False,
        beta1=0.9,
        beta2=0.95,
        lr=1e-2,
        weight_decay=0.1,
        eps=1e-8,
        maximize=False,
        decoupled_weight_decay=True,
    )
    if fp32_master:
        for p, m in zip(params, target):
            p.copy_(m)


def run_chunked(off, units, steps, sched, fp32_master, device, start=0):
    """Like run_offloaded, chunk by chunk: prefetch the next chunk (or the next unit's first one)."""
    order = [(u, c) for step_units in sched for u in step_units for c in range(off.num_chunks(u))]
    pos = 0
    if order:
        off.prefetch(*order[0])
    for i, active in enumerate(sched, start=start):
        grads = grads_for(units, i, device)
        for uid in active:
            step = steps[uid].add_(1).item()
            for c in range(off.num_chunks(uid)):
                state = off.acquire(uid, c)
                assert off.device_bytes() <= 2 * CHUNK
                if pos + 1 < len(order):
                    off.prefetch(*order[pos + 1])
                pieces = off.chunk_pieces(uid, c)
                params = [_piece(units[uid][i], i, a, b, units[uid]) for i, a, b in pieces]
                gs = [_piece(grads[uid][i], i, a, b, units[uid]) for i, a, b in pieces]
                adamw_pieces(params, gs, state, step, fp32_master)
                off.release(uid, c)
                pos += 1


@pytest.mark.parametrize(("dtype", "fp32_states", "fp32_master"), CONFIGS)
def test_chunked_staging_matches_in_memory_adamw_and_bounds_the_slots(dtype, fp32_states, fp32_master):
    sched = schedule(12, len(SHAPES), seed=7)
    ref_units, off_units = make_units(dtype), make_units(dtype)
    ref_states = [fresh_state(u, fp32_states, fp32_master) for u in ref_units]
    ref_steps = [torch.tensor(0.0) for _ in SHAPES]
    off_steps = [torch.tensor(0.0) for _ in SHAPES]
    off = build(off_units, "cpu", fp32_states, fp32_master, chunk_bytes=CHUNK)
    assert max(off.num_chunks(u) for u in off.units()) > 1
    for uid, params in enumerate(off_units):  # the pieces cover every element exactly once
        covered = {i: [] for i in range(len(params))}
        for c in range(off.num_chunks(uid)):
            assert off.chunk_nbytes(uid, c) <= CHUNK
            for i, a, b in off.chunk_pieces(uid, c):
                covered[i].append((a, b))
        for i, ranges in covered.items():
            ranges.sort()
            assert ranges[0][0] == 0 and ranges[-1][1] == params[i].numel()
            assert all(r[1] == q[0] for r, q in itertools.pairwise(ranges))
    for i, active in enumerate(sched):
        grads = grads_for(ref_units, i, "cpu")
        for uid in active:
            step = ref_steps[uid].add_(1).item()
            adamw_pieces(ref_units[uid], grads[uid], ref_states[uid], step, fp32_master)
    run_chunked(off, off_units, off_steps, sched, fp32_master, "cpu")
    for got_u, want_u in zip(off_units, ref_units):
        for got, want in zip(got_u, want_u):
            assert_bitwise(got, want)
    stored = off.state_dict()["units"]
    for uid in stored:  # checkpoints hold whole tensors in the parameters' shapes
        for key, ts in stored[uid].items():
            for got, want in zip(ts, ref_states[uid][key]):
                assert_bitwise(got, want)
    # a chunked checkpoint loads into an unchunked offloader (the format does not depend on chunking)
    plain = build([[p.clone() for p in u] for u in off_units], "cpu", fp32_states, fp32_master)
    plain.load_state_dict(off.state_dict())
    for uid in stored:
        for key, ts in plain.state_dict()["units"][uid].items():
            for got, want in zip(ts, stored[uid][key]):
                assert_bitwise(got, want)


def test_compensation_state_starts_at_zero_in_the_weight_dtype():
    units = make_units(torch.bfloat16)
    off = build(units, "cpu", fp32_states=False, fp32_master=False)
    off.register("kahan", units[0], compensation=True)
    state = off.acquire("kahan")
    assert set(state) == set(STATE_KEYS) - {"master"}
    assert all(t.dtype == torch.bfloat16 and not t.any() for t in state["compensation"])
    off.release("kahan")


def test_meta_device_keeps_host_buffers_on_the_cpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params = [torch.empty(64, 64, device="meta", dtype=torch.bfloat16)]
        off = LayerStateOffloader("meta", chunk_bytes=4096)
        off.register(0, params, fp32_master=True)
        for c in range(off.num_chunks(0)):
            state = off.acquire(0, c)
            assert all(t.device.type == "meta" for ts in state.values() for t in ts)
            off.release(0, c)
        assert off.copy_stream is None
        assert all(b.device.type == "meta" for b in off.device_buffers())
        assert off.state_dict()["units"][0]["master"][0].device.type == "cpu"
        assert off.device_bytes() <= 2 * 4096 < off.host_bytes()


# ---------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@requires_cuda
def test_gpu_pinned_host_and_copy_stream():
    units = make_units(torch.bfloat16, "cuda")
    off = build(units, "cuda", fp32_states=True, fp32_master=True)
    assert off.copy_stream is not None
    state = off.acquire(0)
    assert all(t.is_cuda for ts in state.values() for t in ts)
    off.release(0)
    sd = off.state_dict()
    assert all(t.device.type == "cpu" and t.is_pinned() for ts in sd["units"][0].values() for t in ts)
    off_unpinned = build(make_units(device="cuda"), "cuda", False, False, pin_memory=False)
    off_unpinned.acquire(0)
    off_unpinned.release(0)
    assert not off_unpinned.state_dict()["units"][0]["exp_avg"][0].is_pinned()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize(("dtype", "fp32_states", "fp32_master"), CONFIGS)
def test_gpu_switching_loop_matches_in_memory_adamw(dtype, fp32_states, fp32_master, overlap, monkeypatch):
    def no_device_sync(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize() must not be used by the offloader")

    sched = schedule(20, len(SHAPES))
    ref_units, off_units = make_units(dtype, "cuda"), make_units(dtype, "cuda")
    ref_states = [fresh_state(u, fp32_states, fp32_master) for u in ref_units]
    ref_steps = [torch.tensor(0.0) for _ in SHAPES]
    off_steps = [torch.tensor(0.0) for _ in SHAPES]
    off = build(off_units, "cuda", fp32_states, fp32_master, overlap=overlap)
    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    run_reference(ref_states, ref_units, ref_steps, sched, fp32_master, "cuda")
    run_offloaded(off, off_units, off_steps, sched, fp32_master, "cuda")
    sd = off.state_dict()["units"]
    monkeypatch.undo()
    for uid in range(len(SHAPES)):
        for got, want in zip(off_units[uid], ref_units[uid]):
            assert_bitwise(got, want)
    for uid, state in sd.items():
        for key, ts in state.items():
            for got, want in zip(ts, ref_states[uid][key]):
                assert_bitwise(got, want.cpu())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize(("dtype", "fp32_states", "fp32_master"), CONFIGS)
def test_gpu_chunked_staging_matches_in_memory_adamw(dtype, fp32_states, fp32_master, overlap):
    sched = schedule(12, len(SHAPES), seed=7)
    ref_units, off_units = make_units(dtype, "cuda"), make_units(dtype, "cuda")
    ref_states = [fresh_state(u, fp32_states, fp32_master) for u in ref_units]
    ref_steps = [torch.tensor(0.0) for _ in SHAPES]
    off = build(off_units, "cuda", fp32_states, fp32_master, overlap=overlap, chunk_bytes=CHUNK)
    for i, active in enumerate(sched):
        grads = grads_for(ref_units, i, "cuda")
        for uid in active:
            step = ref_steps[uid].add_(1).item()
            adamw_pieces(ref_units[uid], grads[uid], ref_states[uid], step, fp32_master)
    run_chunked(off, off_units, [torch.tensor(0.0) for _ in SHAPES], sched, fp32_master, "cuda")
    for got_u, want_u in zip(off_units, ref_units):
        for got, want in zip(got_u, want_u):
            assert_bitwise(got, want)
    for uid, state in off.state_dict()["units"].items():
        for key, ts in state.items():
            for got, want in zip(ts, ref_states[uid][key]):
                assert_bitwise(got, want.cpu())


def _big_units(n=3, numel=4 << 20):
    return [[torch.zeros(numel, device="cuda")] for _ in range(n)]


@pytest.mark.gpu
@requires_cuda
def test_gpu_write_back_waits_for_slow_update():
    """S3: the D2H copy must not start before a long-running update on the compute stream."""
    units = _big_units()
    off = build(units, "cuda", False, False)
    for k in range(1, 4):
        state = off.acquire(0)
        torch.cuda._sleep(200_000_000)  # delay the update by ~0.1 s on the compute stream
        state["exp_avg"][0].fill_(float(k))
        off.release(0)
        off.prefetch(1)
        off.prefetch(2)  # both slots now reused by other units; unit 0 must come from host
        off.synchronize()
        assert (off.state_dict()["units"][0]["exp_avg"][0] == k).all()


@pytest.mark.gpu
@requires_cuda
def test_gpu_reset_waits_for_pending_write_back():
    """S4: re-initialising a reset unit must not be overwritten by its late write-back."""
    units = _big_units()
    off = build(units, "cuda", False, False)
    state = off.acquire(0)
    state["exp_avg"][0].fill_(9.0)
    with torch.cuda.stream(off.copy_stream):
        torch.cuda._sleep(200_000_000)  # the write-back queued next is late
    off.release(0)
    off.reset(0)
    state = off.acquire(0)
    assert state["exp_avg"][0].abs().sum().item() == 0.0
    off.release(0)
    off.synchronize()
    assert not off.state_dict()["units"][0]["exp_avg"][0].any()


@pytest.mark.gpu
@requires_cuda
def test_gpu_acquire_waits_for_slow_prefetch():
    """S2: the compute stream must not read a slot before its delayed H2D copy landed."""
    units = _big_units()
    off = build(units, "cuda", False, False)
    off.load_state_dict(
        {
            "units": {
                1: {
                    "exp_avg": [torch.full_like(units[1][0], 5.0, device="cpu")],
                    "exp_avg_sq": [torch.zeros_like(units[1][0], device="cpu")],
                }
            }
        }
    )
    with torch.cuda.stream(off.copy_stream):
        torch.cuda._sleep(200_000_000)  # the H2D copy queued next starts late
    state = off.acquire(1)
    total = state["exp_avg"][0].sum()
    assert total.item() == 5.0 * units[1][0].numel()
    off.release(1)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cached_reacquire_waits_for_write_back():
    """S2 on a cache hit: a new update must not race the write-back still reading the slot."""
    units = _big_units()
    off = build(units, "cuda", False, False)
    state = off.acquire(0)
    state["exp_avg"][0].fill_(1.0)
    with torch.cuda.stream(off.copy_stream):
        torch.cuda._sleep(200_000_000)  # the write-back queued next is late
    off.release(0)
    state = off.acquire(0)  # cache hit on the same slot
    state["exp_avg"][0].fill_(2.0)
    off.synchronize()
    assert (off.state_dict()["units"][0]["exp_avg"][0] == 1.0).all()
    off.release(0)
    off.synchronize()
    assert (off.state_dict()["units"][0]["exp_avg"][0] == 2.0).all()


@pytest.mark.gpu
@requires_cuda
def test_gpu_prefetch_overlaps_compute():
    """The H2D copy of the next unit completes while the compute stream is still busy."""
    units = _big_units()
    off = build(units, "cuda", False, False)
    for uid in (1, 2, 0):  # allocate host buffers and both slots outside the timed region
        off.acquire(uid)
        if uid != 0:
            off.release(uid)
    assert set(off.resident_units()) == {0, 2}  # unit 1 was evicted: its prefetch must copy
    off.synchronize()
    compute = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of work queued on the compute stream
    busy = compute.record_event()
    off.prefetch(1)
    deadline = time.monotonic() + 0.5
    while not off.copy_stream.query() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert off.copy_stream.query(), "prefetch did not finish while compute was busy"
    assert not busy.query(), "compute finished first: cannot tell overlap apart"
    off.release(0)
    off.synchronize()
