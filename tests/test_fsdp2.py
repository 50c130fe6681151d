"""GRASS on FSDP2 (fully_shard), 2 CPU ranks with gloo against 1 process. This module is also the worker
(``torchrun --nproc_per_node 2 tests/test_fsdp2.py OUT PHASE``), launched twice by the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_llama

from grass_llm import GrassConfig, GrassOptimizer

VOCAB = 64
CFG = dict(active_layers=2, period=2, probe_steps=2, seed=3, train_head=True)
STEPS, SPLIT1, SPLIT2 = 10, 4, 7
VARIANTS = {
    "plain": {},
    "offload": {"offload": "step"},
    "period": {"offload": "period"},
    "clip": {"max_grad_norm": 0.05},
}
# the one-process references on one thread, as the ranks run (OMP_NUM_THREADS=1): the same kernels, and no
# contention with the other tests' threads on a 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def global_batches(n: int, bs: int = 8, seq: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, seq), generator=g) for _ in range(n)]


def make_opt(model, **kw):
    return GrassOptimizer(model, GrassConfig(**{**CFG, **kw}), lr=1e-2, eps=1e-4, weight_decay=0.01)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def train(model, opt, data, rank=0, world=1, accum=1):
    log = []
    for x in data:
        micro = x.chunk(world)[rank].chunk(accum)
        for i, chunk in enumerate(micro):
            with opt.no_sync() if i + 1 < len(micro) else contextlib.nullcontext():
                (model(input_ids=chunk, labels=chunk).loss / accum).backward()
        opt.step()
        opt.zero_grad()
        log.append(opt.active_layers)
    return log


def full_params(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def state_numel(opt):
    n = sum(
        (v.to_local() if hasattr(v, "to_local") else v).numel()
        for st in opt.state.values()
        for k, v in st.items()
        if k != "step"
    )
    if opt.offloader is not None:
        n += opt.offloader.host_bytes() // 4  # fp32 models: 4 bytes per element
    return n


# ----------------------------------------------------------------------------------------------
# the worker


def _worker(out: Path, phase: str) -> None:
    from grass_llm.distributed.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = global_batches(STEPS)
    results: dict = {}
    if phase == "first":
        for name, kw in VARIANTS.items():
            model = shard(make_tiny_llama(num_layers=4, seed=0))
            opt = make_opt(model, **kw)
            log = train(model, opt, data, rank, world)
            results[name] = {
                "log": log,
                "mgn": opt.importance,
                "params": full_params(model),
                "state_numel": state_numel(opt),
                "backend": type(opt.backend).__name__,
            }
        model = shard(make_tiny_llama(num_layers=4, seed=0))
        opt = make_opt(model)
        log = train(model, opt, data, rank, world, accum=2)
        results["accum"] = {"log": log, "mgn": opt.importance, "params": full_params(model)}
        # 2 ranks -> checkpoint at SPLIT1 (resumed by one process in the test)
        model = shard(make_tiny_llama(num_layers=4, seed=0))
        opt = make_opt(model)
        results["resume_log"] = train(model, opt, data[:SPLIT1], rank, world)
        save_sharded_checkpoint(out / "ckpt_2ranks", model, opt)
    else:  # "second": the 1-process checkpoint at SPLIT2, resumed on 2 ranks to the end
        model = shard(make_tiny_llama(num_layers=4, seed=0))
        opt = make_opt(model)
        load_sharded_checkpoint(out / "ckpt_1rank", model, opt)
        log = train(model, opt, data[SPLIT2:], rank, world)
        results = {"log": log, "mgn": opt.importance, "params": full_params(model)}
    torch.save(results, out / f"{phase}_rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, phase: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, str(out), phase,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"{phase}_rank{r}.pt", weights_only=False) for r in range(2)]


# ----------------------------------------------------------------------------------------------
# the tests


def reference(**kw):
    model = make_tiny_llama(num_layers=4, seed=0)
    opt = make_opt(model, **kw)
    log = train(model, opt, global_batches(STEPS))
    return {"log": log, "mgn": opt.importance, "params": full_params(model), "state_numel": state_numel(opt)}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return out, _launch(out, "first")


def _assert_same_run(got: dict, ref: dict) -> None:
    """Same draws, MGN to float tolerance, weights by mean difference (AdamW turns summation-order
    noise on near-zero gradients into visible differences of single entries)."""
    assert got["log"] == ref["log"] and len({tuple(a) for a in ref["log"]}) > 1
    torch.testing.assert_close(got["mgn"], ref["mgn"], rtol=1e-4, atol=0)
    for n, p in ref["params"].items():
        assert (got["params"][n] - p).abs().mean() < 1e-5, n


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_equals_one_process(first, variant):
    _, ranks = first
    r0, r1 = ranks[0][variant], ranks[1][variant]
    assert r0["backend"] == "FSDP2Backend", "distributed='auto' picks FSDP2 for a fully_shard model"
    assert r0["log"] == r1["log"] and torch.equal(r0["mgn"], r1["mgn"])
    _assert_same_run(r0, reference(**VARIANTS[variant]))


def test_fsdp2_accumulation_equals_one_process(first):
    _, ranks = first
    _assert_same_run(ranks[0]["accum"], reference())


def test_fsdp2_each_rank_holds_half_the_states(first):
    _, ranks = first
    ref = reference()["state_numel"]
    for r in ranks:
        assert abs(r["plain"]["state_numel"] / ref - 0.5) < 0.05, (r["plain"]["state_numel"], ref)


def test_fsdp2_resume_two_one_two_equals_uninterrupted(first):
    from grass_llm.distributed.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

    out, ranks = first
    data = global_batches(STEPS)
    model = make_tiny_llama(num_layers=4, seed=0)  # one process, no process group
    opt = make_opt(model)
    load_sharded_checkpoint(out / "ckpt_2ranks", model, opt)
    assert opt.global_step == SPLIT1
    log = ranks[0]["resume_log"] + train(model, opt, data[SPLIT1:SPLIT2])
    save_sharded_checkpoint(out / "ckpt_1rank", model, opt)
    second = _launch(out, "second")
    log += second[0]["log"]
    assert second[0]["log"] == second[1]["log"]
    _assert_same_run({**second[0], "log": log}, reference())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
