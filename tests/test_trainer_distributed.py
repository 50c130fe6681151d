"""The HF Trainer under torchrun with 2 gloo processes (launched once; this module is also the worker).

The Trainer wraps the model in DistributedDataParallel; GRASS switches DDP's gradient reduction off
and all-reduces the active layers itself, so gradients are reduced once, and 2 ranks x batch 4 equal
1 process x batch 8.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RandomTokens, make_tiny_llama

transformers = pytest.importorskip("transformers")

STEPS = 6


def run(out: Path, batch: int, probe_steps: int, count=None):
    """A Trainer run; returns (weights, log of active layers, MGN, DDP bucket reductions seen)."""
    from grass_llm import GrassConfig
    from grass_llm.integrations.hf import create_grass_optimizer_and_scheduler

    model = make_tiny_llama(num_layers=4, seed=0)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=batch,
        learning_rate=1e-2,
        max_steps=STEPS,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",  # the same global batches on 1 and 2 processes
    )
    cfg = GrassConfig(active_layers=2, period=2, probe_steps=probe_steps, seed=3, train_head=True)
    opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(64), optimizers=(opt, sched)
    )
    ddp_buckets = [0]
    prepare = trainer.accelerator.prepare_model

    def prepare_counting(m, *a, **kw):  # count every bucket DDP would all-reduce
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        wrapped = prepare(m, *a, **kw)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):

            def hook(state, bucket):
                ddp_buckets[0] += 1
                return allreduce_hook(None, bucket)

            wrapped.register_comm_hook(None, hook)
        return wrapped

    trainer.accelerator.prepare_model = prepare_counting
    log = []

    class Log(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            log.append(opt.active_layers)

    trainer.add_callback(Log())
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "params": params,
        "log": log,
        "mgn": opt.importance,
        "ddp_buckets": ddp_buckets[0],
        "wrapped": wrapped,
    }


def _worker(out: Path) -> None:
    import torch.distributed as dist

    results = {name: run(out / name, 4, probe) for name, probe in (("exact", 0), ("probing", 2))}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_trainer_on_two_ranks_reduces_once_and_equals_one_process(two_ranks, tmp_path):
    ref = run(tmp_path, 8, 0)
    r0, r1 = two_ranks[0]["exact"], two_ranks[1]["exact"]
    assert r0["wrapped"] == "DistributedDataParallel", "the Trainer wraps the model in DDP under torchrun"
    assert r0["ddp_buckets"] == r1["ddp_buckets"] == 0, "DDP must not reduce: GRASS does, once"
    assert r0["log"] == r1["log"] == ref["log"] and len({tuple(a) for a in ref["log"]}) > 1
    for n, p in ref["params"].items():
        assert torch.equal(r0["params"][n], r1["params"][n]), n  # the ranks stay identical
        # float summation order differs (two halves of the batch): compare by mean difference
        assert (r0["params"][n] - p).abs().mean() < 1e-5, n
    torch.testing.assert_close(r0["mgn"], ref["mgn"], rtol=1e-4, atol=0)


def test_trainer_probing_on_two_ranks_keeps_them_identical(two_ranks):
    r0, r1 = two_ranks[0]["probing"], two_ranks[1]["probing"]
    assert r0["ddp_buckets"] == r1["ddp_buckets"] == 0
    assert r0["log"][0] == [] and r0["log"][1] and r0["log"] == r1["log"]  # 2 probing steps, then a draw
    assert torch.equal(r0["mgn"], r1["mgn"])
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
