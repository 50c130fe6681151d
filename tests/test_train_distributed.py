"""`grass-llm train` under torchrun: 2 CPU ranks (gloo) equal one process, replicated and on FSDP2
(``distributed.strategy=fsdp2``, also picked from accelerate's FSDP2 environment), checkpoints are
written once (sharded on FSDP2) and resume on another world size, and a killed rank leaves the last
checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.timeout(240)

# 40 steps: 6 probing, then draws every 5 steps (7 periods), fp32. The ranks sum in another order, and AdamW
# turns last-bit differences of near-zero gradients into visible ones (m / sqrt(v) of two tiny numbers), on
# a handful of weights: the weights are compared to a tenth of one AdamW step (lr), while the losses and the
# MGN (which, unlike AdamW, sees the gradient's scale) are compared tightly.
COMMON = [
    "model=builtin:tiny",  # the random tiny Llama (the demo's base model is the pretrained one)
    "eval_heldout=0",
    "max_steps=40",
    "grass.probe_steps=6",
    "grass.period=5",
    "dtype=fp32",
    "device=cpu",
    "plots=false",
    "tensorboard=false",
    "lr=3e-3",
]
LR = 3e-3
# Losses of runs that differ in summation order only (2 ranks against 1 process; another CPU's kernels): 40
# AdamW steps amplify last-bit differences unevenly, so they are compared as the weights are, by their mean
# difference, with a looser bound on each. Measured with this job: 2 ranks vs 1 process 6e-7 mean / 5e-6 max
# relative here, one loss of 40 off by 1.4e-4 (3e-5 relative) on another CPU; the same 2-rank run with
# torch.distributed.all_reduce made a no-op: 3.9e-3 mean / 3.8e-2 max relative, 200x / 130x over the bounds.
LOSS_MEAN_RTOL = 2e-5
LOSS_MAX_RTOL = 3e-4


def _env(tag: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GRASS_TEST_TAG": tag, **(extra or {})}


def _torchrun(
    cwd: Path, args: list[str], tag: str = "", env: dict[str, str] | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*cmd, "-m", "grass_llm", "train", *args],
        cwd=cwd,
        env=_env(tag, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(
    cwd: Path, args: list[str], ranks: int = 1, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    if ranks == 2:
        proc = _torchrun(cwd, args, env=env)
        out, err = proc.communicate(timeout=200)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return subprocess.run(
        [sys.executable, "-m", "grass_llm", "train", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=200,
    )


def _losses(log: list[dict]) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in log], dtype=torch.float64)


def _assert_losses_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Per-step losses of two runs that differ in summation order only: equal to LOSS_MEAN_RTOL on average
    (relative to the mean loss), each to LOSS_MAX_RTOL."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs()
    mean = float(diff.mean() / b.abs().mean())
    worst = int((diff / b.abs()).argmax())
    assert mean < LOSS_MEAN_RTOL, f"losses differ by {mean:.2e} on average (relative)"
    assert float(diff[worst] / b[worst].abs()) < LOSS_MAX_RTOL, (
        f"step {worst + 1}: loss {float(a[worst])} against {float(b[worst])}"
    )


def _assert_mgn_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """MGN of two runs that differ in summation order only: equal to 1e-4 on average (AdamW turns the
    order's last bits into small weight differences that the later MGN see), to 1e-3 everywhere."""
    assert float((a - b).abs().mean() / b.abs().mean()) < 1e-4
    assert_close(a, b, rtol=1e-3, atol=0)


def _assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Weights of two runs that differ in summation order only: AdamW's m / sqrt(v) turns last-bit
    differences of a near-zero gradient into a different step on a few weights (up to a few lr over
    the run), so each tensor is compared by its mean difference (below a hundredth of one step) and
    by the share of weights more than a tenth of a step apart (below 0.5%)."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name].float() - b[name].float()).abs()
        assert float(diff.mean()) < LR / 100, name
        assert float((diff > LR / 10).float().mean()) < 5e-3, name


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same GRASS job (ZeRO-1 sharding, accumulation) on 2 ranks and on one process."""
    root = tmp_path_factory.mktemp("dist")
    grass = [*COMMON, "distributed.shard_optimizer_states=true", "save_every=10"]
    two = _run(root, [*grass, "batch_size=8", "grad_accum=2", "out_dir=two"], ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # one process, same rows per step: 2 ranks x 4 rows x 2 micro-batches == 1 x 4 rows x 4 micro-batches
    one = _run(root, [*grass, "batch_size=4", "grad_accum=4", "out_dir=one"])
    assert one.returncode == 0, one.stderr[-3000:]
    return root, two


def test_two_ranks_equal_one_process(runs):
    root, two = runs
    log2, log1 = _log(root / "two"), _log(root / "one")
    assert len(log2) == 40  # rank 0 alone wrote the log
    assert [r["active_layers"] for r in log2] == [r["active_layers"] for r in log1]
    assert len({tuple(r["active_layers"]) for r in log2}) > 2  # several draws
    _assert_losses_close(_losses(log2), _losses(log1))
    mgn2, mgn1 = (torch.tensor([r["importance"] for r in log]) for log in (log2, log1))
    _assert_mgn_close(mgn2, mgn1)
    _assert_weights_close(_weights(root / "two"), _weights(root / "one"))
    ckpts = list((root / "two" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000040"] and (ckpts[0] / "COMPLETE").is_file()
    assert two.stdout.count("done: 40 steps") == 1  # the summary is printed once
    assert two.stdout.count("grass-llm train:") == 1  # rank 1 prints nothing


def test_fft_through_ddp_equals_one_process(tmp_path):
    two = _run(tmp_path, [*COMMON, "method=fft", "batch_size=8", "out_dir=two", "save_every=0"], ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run(
        tmp_path, [*COMMON, "method=fft", "batch_size=4", "grad_accum=2", "out_dir=one", "save_every=0"]
    )
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_weights_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"))


def test_checkpoint_resumes_on_another_world_size(runs, tmp_path):
    """2 ranks -> 1 process -> 2 ranks (ZeRO-1 on, checkpoints mid-period) equals the uninterrupted 2-rank run:
    a sharded checkpoint is complete, and a one-process checkpoint loads into sharded ranks."""
    root, _ = runs
    grass = [
        *COMMON,
        "distributed.shard_optimizer_states=true",
        "save_every=10",
        "batch_size=8",
        "grad_accum=2",
    ]
    ckpts = tmp_path / "r" / "checkpoints"
    first = _run(tmp_path, [*grass, "out_dir=r", "stop_at_step=13"], ranks=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [c.name for c in ckpts.iterdir()] == ["step-000013"]
    assert (ckpts / "step-000013" / "COMPLETE").is_file()
    middle = _run(tmp_path, [*grass, "out_dir=r", "stop_at_step=27", "--resume"])  # one process
    assert middle.returncode == 0, middle.stderr[-3000:]
    assert f"resumed from {Path('r') / 'checkpoints' / 'step-000013'} at step 13" in middle.stdout
    last = _run(tmp_path, [*grass, "out_dir=r", "--resume"], ranks=2)
    assert last.returncode == 0, last.stderr[-3000:]
    assert last.stdout.count("resumed from") == 1 and "at step 27" in last.stdout  # rank 0 alone prints
    log, ref = _log(tmp_path / "r"), _log(root / "two")
    assert [r["step"] for r in log] == list(range(1, 41))
    assert [r["active_layers"] for r in log] == [r["active_layers"] for r in ref]
    _assert_losses_close(_losses(log), _losses(ref))
    _assert_weights_close(_weights(tmp_path / "r"), _weights(root / "two"))


def _pids_of_rank(tag: str, rank: int) -> list[int]:
    """Processes started with GRASS_TEST_TAG=tag and RANK=rank (torchrun's workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"GRASS_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the rank")
@pytest.mark.parametrize("strategy", [pytest.param("replicated", marks=pytest.mark.slow), "fsdp2"])
def test_killed_rank_leaves_last_checkpoint_intact(tmp_path, strategy):
    tag = uuid.uuid4().hex
    args = [
        *COMMON,
        "max_steps=2000",
        "save_every=5",
        "batch_size=8",
        "out_dir=k",
        f"distributed.strategy={strategy}",
    ]
    proc = _torchrun(tmp_path, args, tag)
    ckpts = tmp_path / "k" / "checkpoints"
    deadline = time.time() + 150

    def reached_step_10() -> bool:
        # any complete checkpoint of step >= 10: saving step 15 deletes step 10, so a poll may miss it
        return any(int(d.name[5:11]) >= 10 for d in ckpts.glob("step-??????") if (d / "COMPLETE").is_file())

    while not reached_step_10():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint at step >= 10"
        time.sleep(0.2)
    victims = _pids_of_rank(tag, 1)
    assert victims, "rank 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = sorted(d for d in ckpts.iterdir() if (d / "COMPLETE").is_file())
    assert done, "no complete checkpoint left"
    last = done[-1]
    step = int(last.name.split("-")[1])
    assert step >= 10
    if strategy == "fsdp2":  # every rank's shards are in the manifest
        assert any(
            n.startswith("sharded/__1_") for n in json.loads((last / "MANIFEST.json").read_text())["files"]
        )
    # the checkpoint loads and training goes on from it, on one process
    rest = _run(tmp_path, [*args, f"stop_at_step={step + 5}", "--resume"])
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert f"resumed from {Path('k') / 'checkpoints' / last.name} at step {step}" in rest.stdout
    assert (ckpts / f"step-{step + 5:06d}" / "COMPLETE").is_file()


def test_batch_size_must_divide_among_ranks(tmp_path):
    bad = _run(tmp_path, [*COMMON, "batch_size=3", "out_dir=x"], ranks=2)
    assert bad.returncode != 0 and "batch_size=3" in bad.stderr and "multiple of 2" in bad.stderr


# ------------------------------------------------------------------------------------------------
# FSDP2 (distributed.strategy=fsdp2): every decoder block and the root fully_shard-ed over the 2 ranks
FSDP2 = ["distributed.strategy=fsdp2", "save_every=10", "batch_size=8", "grad_accum=2"]


@pytest.fixture(scope="module")
def fsdp2_run(runs):
    """The `runs` GRASS job on FSDP2 (no ZeRO-1 key: FSDP2 shards the states like the weights)."""
    root, _ = runs
    two = _run(root, [*COMMON, *FSDP2, "out_dir=fsdp2"], ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, two


def test_fsdp2_equals_one_process(fsdp2_run):
    root, two = fsdp2_run
    log2, log1 = _log(root / "fsdp2"), _log(root / "one")
    assert [r["active_layers"] for r in log2] == [r["active_layers"] for r in log1]
    _assert_losses_close(_losses(log2), _losses(log1))
    mgn2, mgn1 = (torch.tensor([r["importance"] for r in log]) for log in (log2, log1))
    _assert_mgn_close(mgn2, mgn1)
    # the final model is gathered into one ordinary checkpoint
    _assert_weights_close(_weights(root / "fsdp2"), _weights(root / "one"))
    last = root / "fsdp2" / "checkpoints" / "step-000040"
    files = json.loads((last / "MANIFEST.json").read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "state.pt"} <= set(files)
    assert "model.safetensors" not in files  # each rank wrote its own shards
    assert two.stdout.count("done: 40 steps") == 1


def test_fsdp2_resumes_two_one_two(fsdp2_run, tmp_path):
    """FSDP2 2 ranks -> 1 process (reads the sharded checkpoint, writes an ordinary one) -> FSDP2 2 ranks
    (shards it) equals the uninterrupted FSDP2 run."""
    root, _ = fsdp2_run
    args = [*COMMON, *FSDP2, "out_dir=r"]
    first = _run(tmp_path, [*args, "stop_at_step=13"], ranks=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "r" / "checkpoints" / "step-000013" / "sharded" / ".metadata").is_file()
    middle = _run(tmp_path, [*args, "stop_at_step=27", "--resume"])
    assert middle.returncode == 0, middle.stderr[-3000:]
    assert (tmp_path / "r" / "checkpoints" / "step-000027" / "model.safetensors").is_file()
    last = _run(tmp_path, [*args, "--resume"], ranks=2)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "at step 27" in last.stdout
    log, ref = _log(tmp_path / "r"), _log(root / "fsdp2")
    assert [r["step"] for r in log] == list(range(1, 41))
    assert [r["active_layers"] for r in log] == [r["active_layers"] for r in ref]
    _assert_losses_close(_losses(log), _losses(ref))
    _assert_weights_close(_weights(tmp_path / "r"), _weights(root / "fsdp2"))


@pytest.mark.parametrize("method", ["fft", pytest.param("lora", marks=pytest.mark.slow)])
def test_fsdp2_baselines_equal_one_process(tmp_path, method):
    """FFT and LoRA (peft) on FSDP2 (accumulation without reduce-scatter, clipping over the shards),
    picked by accelerate's FSDP2 environment, equal one process; LoRA is also stopped and resumed."""
    # eval_heldout: greedy generation on the sharded model (every rank in step), before and after
    args = [
        *COMMON,
        f"method={method}",
        "max_steps=12",
        "max_grad_norm=0.05",
        "save_every=6",
        "eval_heldout=4",
    ]
    accelerate_fsdp2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what accelerate launch exports
    two_rank = [*args, "batch_size=8", "grad_accum=2", "out_dir=two"]
    if method == "lora":  # stopped and resumed (the adapter method's sharded checkpoint); fft in one go
        two = _run(tmp_path, [*two_rank, "stop_at_step=6"], 2, accelerate_fsdp2)
        assert two.returncode == 0, two.stderr[-3000:]
        assert (tmp_path / "two" / "checkpoints" / "step-000006" / "sharded" / ".metadata").is_file()
        two_rank.append("--resume")
    two = _run(tmp_path, two_rank, 2, accelerate_fsdp2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "step-000012" / "sharded" / ".metadata").is_file()
    one = _run(tmp_path, [*args, "batch_size=4", "grad_accum=4", "out_dir=one"])
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_losses_close(_losses(_log(tmp_path / "two")), _losses(_log(tmp_path / "one")))
    # the final model is gathered (LoRA: merged, and the adapter alone), as on one process
    _assert_weights_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
    heldout = [line for line in two.stdout.splitlines() if "held-out accuracy:" in line]
    assert len(heldout) == 1 and heldout[0] in one.stdout  # same answers as one process
    if method == "lora":
        assert (tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_accelerate_fsdp1_is_refused(tmp_path):
    bad = _run(
        tmp_path,
        [*COMMON, "batch_size=8", "out_dir=x"],
        2,
        {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
    )
    assert bad.returncode != 0 and "fsdp_version: 2" in bad.stderr  # (torchrun exits 1 when a worker fails)


def test_strategy_resolution():
    from grass_llm.recipes.launch import Launch, resolve_strategy
    from grass_llm.recipes.train_config import TrainConfigError, load_train_config

    two = Launch(world_size=2)
    assert resolve_strategy("fsdp2", Launch(), {}) == "single"  # one process: nothing to shard over
    assert resolve_strategy("auto", two, {}) == "replicated"  # torchrun
    assert resolve_strategy("auto", two, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    assert (
        resolve_strategy("replicated", two, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
        == "replicated"
    )
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        resolve_strategy("auto", two, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(
        TrainConfigError, match=r"distributed\.strategy='fsdp' is unknown .*allowed: auto, replicated, fsdp2"
    ):
        load_train_config(overrides=["distributed.strategy=fsdp"])
    with pytest.raises(
        TrainConfigError, match=r"shard_optimizer_states=true is for distributed\.strategy=replicated"
    ):
        load_train_config(overrides=["distributed.strategy=fsdp2", "distributed.shard_optimizer_states=true"])


def test_loss_tolerance_takes_another_cpu_and_catches_a_missing_all_reduce():
    """The loss comparison passes what summation order does on any CPU and fails what a missing all-reduce does
    (the magnitudes measured with this job; see LOSS_MEAN_RTOL)."""
    g = torch.Generator().manual_seed(0)
    ref = (
        5.5
        - torch.linspace(0, 0.55, 40, dtype=torch.float64)
        + 0.01 * torch.rand(40, generator=g, dtype=torch.float64)
    )
    other_cpu = ref + 5e-6 * torch.randn(40, generator=g, dtype=torch.float64)
    other_cpu[30] += 1.4e-4  # the loss of step 31 that failed the old rtol=2e-5 / atol=1e-5 on another CPU
    _assert_losses_close(other_cpu, ref)
    with pytest.raises(AssertionError):
        assert_close(other_cpu, ref, rtol=2e-5, atol=1e-5)  # the old tolerance
    no_all_reduce = ref * (1 + 4e-3 * torch.randn(40, generator=g, dtype=torch.float64))
    with pytest.raises(AssertionError, match="on average"):
        _assert_losses_close(no_all_reduce, ref)
    one_bad_step = ref.clone()
    one_bad_step[20] *= 1.01  # one step's reduction missing: its loss 1% off
    with pytest.raises(AssertionError):
        _assert_losses_close(one_bad_step, ref)
    one_step_off = ref.clone()
    one_step_off[20] *= 1 + 6e-4  # within the mean bound, not within the bound on each step
    with pytest.raises(AssertionError, match="step 21"):
        _assert_losses_close(one_step_off, ref)
