"""GRASS on torch.distributed: 2 CPU ranks (gloo, launched once through torchrun) against 1 process.

The module is also the worker script: ``torchrun --nproc_per_node 2 tests/test_distributed.py OUT``
runs every scenario on each rank and writes the results under OUT; the tests compare them with
single-process references computed here. The launch is shared by all tests of the module (one
torchrun start, ~10 s of imports per rank on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_llama
from torch.testing import assert_close

from grass_llm import GrassConfig, GrassOptimizer
from grass_llm.distributed import LocalBackend, ReplicatedBackend, resolve_backend

VOCAB = 64
NUM_LAYERS = 4
LR = 1e-2
# probe_steps=0: the MGN then comes from all-reduced gradients only, so 2 ranks and 1 process sample
# the same layers; probing is checked against its documented estimator separately
CFG = dict(active_layers=2, period=2, probe_steps=0, seed=3, train_head=True, train_norm=True)
PROBE_CFG = dict(active_layers=2, period=2, probe_steps=3, seed=5)
STEPS = 8  # 4 sampling periods
SPLIT = 5  # checkpoint mid-period (period_pos == 1)


def global_batches(n: int, bs: int = 4, seq: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, seq), generator=g) for _ in range(n)]


def make_model():
    return make_tiny_llama(num_layers=NUM_LAYERS, seed=0)


def make_opt(model, cfg=CFG, distributed="auto"):
    # eps well above the smallest gradient entries: AdamW divides by sqrt(v) + eps, which turns the
    # float32 rounding differences between a batch of 2b and two averaged batches of b into visible
    # weight differences for entries whose gradient is ~0; a larger eps keeps the update Lipschitz
    return GrassOptimizer(
        model, GrassConfig(**cfg), lr=LR, eps=1e-4, weight_decay=0.01, distributed=distributed
    )


def train(model, opt, data, rank=0, world=1, accum=1, no_sync=True, backward_flag=None):
    """Each rank takes its slice of the global batch; the loss is a mean, so gradients are averaged."""
    log = []
    for x in data:
        micro = x.chunk(world)[rank].chunk(accum)
        for i, chunk in enumerate(micro):
            sync = not no_sync or i == len(micro) - 1
            with contextlib.nullcontext() if sync else opt.no_sync():
                loss = model(input_ids=chunk, labels=chunk).loss / accum
                if backward_flag is not None:
                    backward_flag[0] = True
                loss.backward()
                if backward_flag is not None:
                    backward_flag[0] = False
        opt.step()
        opt.zero_grad()
        log.append(opt.active_layers)
    return log


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(a: dict, b: dict, exact: bool = False):
    assert a.keys() == b.keys()
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), n
        else:
            assert_close(a[n], b[n], msg=lambda m, n=n: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------
# the worker: runs under torchrun, one process per rank


def _worker(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = global_batches(STEPS)
    results: dict = {}

    # record every all-reduce: size, and whether it was launched inside backward (overlap)
    in_backward = [False]
    calls: list[tuple[int, bool]] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append((tensor.numel(), in_backward[0]))
        return real_all_reduce(tensor, *args, **kwargs)

    # (name, shard, accum, no_sync)
    for name, shard, accum, no_sync in (
        ("plain", False, 1, True),
        ("sharded", True, 1, True),
        ("accum_no_sync", False, 2, True),
        ("sharded_accum_sync_every_micro", True, 2, False),
        ("accum_all_no_sync", False, 2, "all"),
        ("sharded_period", True, 1, True),
    ):
        model = make_model()
        cfg = {**CFG, "offload": "period"} if name.endswith("period") else CFG  # states kept per period (CPU path)
        opt = make_opt(model, cfg=cfg, distributed=ReplicatedBackend(shard_optimizer_states=shard))
        if name == "plain":
            dist.all_reduce = counting_all_reduce
            per_step, log = [], []
            for x in data:
                calls.clear()
                log += train(model, opt, [x], rank, world, backward_flag=in_backward)
                per_step.append(list(calls))
            dist.all_reduce = real_all_reduce
            results["plain_calls"] = per_step
        elif no_sync == "all":  # every micro-batch under no_sync: step() reduces, without overlap
            log = []
            for x in data:
                for chunk in x.chunk(world)[rank].chunk(accum):
                    with opt.no_sync():
                        (model(input_ids=chunk, labels=chunk).loss / accum).backward()
                opt.step()
                opt.zero_grad()
                log.append(opt.active_layers)
        else:
            log = train(model, opt, data, rank, world, accum=accum, no_sync=no_sync)
        results[name] = {"params": params_of(model), "log": log, "importance": opt.importance}
        if shard:
            owned = {g["unit"] for j, g in enumerate(opt.param_groups) if opt.backend.owns(j)}
            held = {g["unit"] for g in opt.param_groups if any(p in opt.state for p in g["params"])}
            results[name]["owned"], results[name]["held"] = owned, held

    # probing with different data per rank: the exact MGN of the global batch
    model = make_model()
    opt = make_opt(model, cfg=PROBE_CFG)
    results["probe_auto"] = type(opt.backend).__name__
    log = train(model, opt, data[: PROBE_CFG["probe_steps"]], rank, world)
    results["probe"] = {"importance_after_probe": opt.importance, "log": log}
    log += train(model, opt, data[PROBE_CFG["probe_steps"] :], rank, world)
    results["probe"].update(params=params_of(model), log=log)

    # checkpoint from 2 sharded ranks (gathered to rank 0), resumed on 1 process by the test
    model = make_model()
    opt = make_opt(model, distributed=ReplicatedBackend(shard_optimizer_states=True))
    train(model, opt, data[:SPLIT], rank, world)
    sd = opt.state_dict()  # collective: every rank calls it
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": sd}, out / "ckpt_2ranks.pt")
    else:
        torch.save(sd, out / "partial.pt")

    # checkpoint from 1 process (written by the test), resumed on 2 sharded ranks
    ckpt = torch.load(out / "ckpt_1rank.pt", weights_only=False)
    model = make_model()
    model.load_state_dict(ckpt["model"])
    opt = make_opt(model, distributed=ReplicatedBackend(shard_optimizer_states=True))
    opt.load_state_dict(ckpt["opt"])
    held_after_load = {g["unit"] for g in opt.param_groups if any(p in opt.state for p in g["params"])}
    log = train(model, opt, data[SPLIT:], rank, world)
    results["resumed_on_2"] = {"params": params_of(model), "log": log, "held": held_after_load}

    # DDP-wrapped models are refused with an explanation
    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    try:
        make_opt(ddp)
        results["ddp_error"] = None
    except TypeError as e:
        results["ddp_error"] = str(e)

    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """Single process, global batch 2b: the run every 2-rank variant must reproduce."""
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model, distributed=None)
    log = train(model, opt, global_batches(STEPS)[:SPLIT])
    at_split = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    log += train(model, opt, global_batches(STEPS)[SPLIT:])
    return {"params": params_of(model), "log": log, "at_split": at_split}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, reference):
    out = tmp_path_factory.mktemp("dist")
    torch.save(reference["at_split"], out / "ckpt_1rank.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        __file__,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


VARIANTS = ["plain", "sharded", "accum_no_sync", "sharded_accum_sync_every_micro", "accum_all_no_sync", "sharded_period"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_equal_one_process_with_double_batch(two_ranks, reference, variant):
    _, ranks = two_ranks
    r0, r1 = ranks[0][variant], ranks[1][variant]
    # every rank holds bit-identical weights, active sets and MGN
    assert_params_close(r0["params"], r1["params"], exact=True)
    assert torch.equal(r0["importance"], r1["importance"])
    assert r0["log"] == r1["log"] == reference["log"]
    assert len({tuple(a) for a in reference["log"]}) > 1, "the run must switch layers"
    assert_params_close(r0["params"], reference["params"])


def test_sharded_equals_unsharded_bitwise_and_owns_its_units(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert_params_close(r["sharded"]["params"], r["plain"]["params"], exact=True)
        assert_params_close(r["sharded_period"]["params"], r["plain"]["params"], exact=True)
        assert r["sharded_period"]["held"] <= r["sharded_period"]["owned"]
    owned0, owned1 = ranks[0]["sharded"]["owned"], ranks[1]["sharded"]["owned"]
    assert owned0.isdisjoint(owned1) and {"layer.0", "layer.2"} <= owned0 and {"layer.1", "layer.3"} <= owned1
    for r in ranks:  # a rank holds AdamW states only for units it owns
        assert r["sharded"]["held"] and r["sharded"]["held"] <= r["sharded"]["owned"]


def test_gradient_traffic_is_the_active_units_and_overlaps_backward(two_ranks, reference):
    _, ranks = two_ranks
    model = make_model()
    opt = make_opt(model, distributed=None)
    numel = {g["unit"]: (sum(p.numel() for p in g["params"]), len(g["params"])) for g in opt.param_groups}
    total = sum(n for n, _ in numel.values())
    for step, calls in enumerate(ranks[0]["plain_calls"]):
        active = reference["log"][step]
        units = [f"layer.{i}" for i in active] + ["norm", "head"]
        expected = sorted(numel[u][0] + numel[u][1] for u in units)  # gradients + presence flags
        grad_calls = [(n, inside) for n, inside in calls if n != NUM_LAYERS]
        assert sorted(n for n, _ in grad_calls) == expected, step
        assert all(inside for _, inside in grad_calls), "gradient all-reduce must start inside backward"
        assert sum(expected) < 0.9 * total
        # no MGN all-reduce in training: it is read from all-reduced gradients, the same on every rank
        assert not any(n == NUM_LAYERS for n, _ in calls)


def test_probe_mgn_is_exact_on_the_global_batch(two_ranks):
    """Probing all-reduces each layer's gradient before reading its norm: the MGN is eq. 2 of the global
    batch's gradient (the mean of the ranks' gradients), not of any rank's own."""
    _, ranks = two_ranks
    r0, r1 = ranks[0]["probe"], ranks[1]["probe"]
    assert torch.equal(r0["importance_after_probe"], r1["importance_after_probe"])
    probing = PROBE_CFG["probe_steps"] - 1  # the last probing step ends with a draw
    assert r0["log"] == r1["log"] and r0["log"][:probing] == [[]] * probing and r0["log"][probing]
    assert_params_close(r0["params"], r1["params"], exact=True)
    assert ranks[0]["probe_auto"] == "ReplicatedBackend", "distributed='auto' must switch on under torchrun"

    model = make_model()  # probing changes no weight, so every probing step sees the initial model
    blocks = model.model.layers
    numel = torch.tensor([sum(p.numel() for p in b.parameters()) for b in blocks], dtype=torch.float64)
    obs, own = [], []
    for x in global_batches(STEPS)[: PROBE_CFG["probe_steps"]]:
        grads = []
        for chunk in x.chunk(2):
            model.zero_grad()
            model(input_ids=chunk, labels=chunk).loss.backward()
            grads.append([[p.grad.clone() for p in b.parameters()] for b in blocks])
        sumsq = torch.tensor(
            [sum(((a + b) / 2).double().pow(2).sum() for a, b in zip(*layer)) for layer in zip(*grads)]
        )
        obs.append((sumsq / numel).sqrt())
        own_sq = torch.tensor([sum(g.double().pow(2).sum() for g in layer) for layer in grads[0]])
        own.append((own_sq / numel).sqrt())
    expected = torch.stack(obs).mean(0)
    assert_close(r0["importance_after_probe"].double(), expected, rtol=1e-5, atol=0)
    # not what rank 0 would have estimated from its own gradients alone
    assert not torch.allclose(torch.stack(own).mean(0), expected, rtol=1e-3)


def test_checkpoint_from_two_sharded_ranks_resumes_on_one_process(two_ranks, reference):
    out, _ = two_ranks
    ckpt = torch.load(out / "ckpt_2ranks.pt", weights_only=False)
    ref_state = reference["at_split"]["opt"]["state"]
    # rank 0's state_dict holds every rank's shard: the same states as the single-process run
    assert ckpt["opt"]["state"].keys() == ref_state.keys()
    for idx, st in ref_state.items():
        for k, v in st.items():
            assert_close(ckpt["opt"]["state"][idx][k], v, msg=lambda m, idx=idx, k=k: f"{idx}.{k}: {m}")
    assert ckpt["opt"]["grass"]["active"] == reference["at_split"]["opt"]["grass"]["active"]

    model = make_model()
    model.load_state_dict(ckpt["model"])
    opt = make_opt(model, distributed=None)
    opt.load_state_dict(ckpt["opt"])
    log = train(model, opt, global_batches(STEPS)[SPLIT:])
    assert log == reference["log"][SPLIT:]
    assert_params_close(params_of(model), reference["params"])

    # another rank's part of a sharded state_dict is refused, not silently loaded
    with pytest.raises(ValueError, match="rank 1's part of a sharded optimizer"):
        make_opt(make_model(), distributed=None).load_state_dict(
            torch.load(out / "partial.pt", weights_only=False)
        )


def test_checkpoint_from_one_process_resumes_on_two_sharded_ranks(two_ranks, reference):
    _, ranks = two_ranks
    r0, r1 = ranks[0]["resumed_on_2"], ranks[1]["resumed_on_2"]
    assert r0["log"] == r1["log"] == reference["log"][SPLIT:]
    assert_params_close(r0["params"], r1["params"], exact=True)
    assert_params_close(r0["params"], reference["params"])
    assert r0["held"].isdisjoint(r1["held"]), "after loading, each rank keeps only the states it owns"


def test_ddp_wrapped_model_is_refused(two_ranks):
    _, ranks = two_ranks
    assert ranks[0]["ddp_error"] is not None and "do not wrap it in DDP" in ranks[0]["ddp_error"]


# ----------------------------------------------------------------------------------------------
# single process


def test_resolution_without_a_process_group():
    model = make_model()
    assert isinstance(resolve_backend("auto", model), LocalBackend)
    assert isinstance(resolve_backend(None, model), LocalBackend)
    with pytest.raises(RuntimeError, match="init_process_group"):
        resolve_backend(True, model)
    with pytest.raises(ValueError, match="distributed='yes' is invalid"):
        resolve_backend("yes", model)
    opt = make_opt(model)
    assert isinstance(opt.backend, LocalBackend)
    with opt.no_sync():  # a no-op on one process
        model(input_ids=global_batches(1)[0], labels=global_batches(1)[0]).loss.backward()
    assert any(p.grad is not None for p in opt.trainable_parameters())


def test_world_size_one_group_is_bitwise_identical_to_no_group(tmp_path):
    data = global_batches(6)
    ref = make_model()
    ref_log = train(ref, make_opt(ref, cfg={**CFG, "probe_steps": 2}, distributed=None), data, accum=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_model()
        opt = make_opt(
            model, cfg={**CFG, "probe_steps": 2}, distributed=ReplicatedBackend(shard_optimizer_states=True)
        )
        assert opt.backend.world_size == 1
        assert isinstance(make_opt(make_model()).backend, LocalBackend)  # auto: one process for 1 rank
        log = train(model, opt, data, accum=2)
    finally:
        dist.destroy_process_group()
    assert log == ref_log
    assert_params_close(params_of(model), params_of(ref))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
