"""The fused Triton AdamW kernel (``grass_llm._optim.fused_adamw``) against PyTorch's functional AdamW.

On CUDA it replaces the unfused update of bf16/fp16 weights with Kahan compensation or fp32 masters. The CPU
test runs the same kernel in Triton's interpreter (skipped where Triton is not installed, as with the CPU
build of torch); the ``gpu`` tests run it for real and through a whole GrassOptimizer run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CHECK = textwrap.dedent(
    """
    import torch
    from grass_llm._optim import fused_adamw as fused
    from grass_llm._optim.adamw import Piece, _update
    from grass_llm._optim.precision import PrecisionPolicy

    def pieces(device, dtype, state_dtype, master, n, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for size in (n, n // 3 + 1):
            p = torch.randn(size, generator=g).to(device, dtype)
            state = {
                "exp_avg": (torch.randn(size, generator=g) * 1e-3).to(device, state_dtype),
                "exp_avg_sq": (torch.rand(size, generator=g) * 1e-6).to(device, state_dtype),
            }
            if master:
                state["master"] = p.float() + torch.randn(size, generator=g).to(device) * 1e-4
            else:
                state["compensation"] = (torch.randn(size, generator=g) * 1e-4).to(device, dtype)
            grad = (torch.randn(size, generator=g) * 1e-2).to(device, dtype)
            out.append(Piece(param=p, grad=grad, state=state, step=7.0, decay=True, where=(0, 0)))
        return out

    def copy(ps):
        return [Piece(param=p.param.clone(), grad=p.grad.clone(), state={k: t.clone() for k, t in p.state.items()},
                      step=p.step, decay=p.decay, where=p.where) for p in ps]

    def run(device):
        group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "foreach": None}
        for dtype in (torch.bfloat16, torch.float16):
            for state_dtype in (dtype, torch.float32):
                for master in (False, True):
                    policy = PrecisionPolicy(master, "nearest" if master else "kahan", state_dtype == torch.float32, 0)
                    a = pieces(device, dtype, state_dtype, master, 5000, 1)
                    b = copy(a)
                    for _ in range(3):
                        fused.fused_adamw_(a, group, 0.1)
                        _update(b, group, 0.1, policy, 0)
                    for x, y in zip(a, b):
                        assert fused._close(x, y), (dtype, state_dtype, master)
                        same = (x.param == y.param).float().mean().item()
                        assert same > 0.995, (dtype, state_dtype, master, same)
        print("fused == unfused")
    """
)


def test_kernel_matches_pytorch_adamw_in_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "check.py"
    script.write_text(CHECK + "\nrun('cpu')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fused == unfused" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_unusable_without_cuda_or_low_precision_or_when_disabled():
    from grass_llm._optim import fused_adamw as fused

    cpu = [torch.zeros(4, dtype=torch.bfloat16)]
    assert not fused.usable(cpu, {"exp_avg", "exp_avg_sq", "compensation"}, "kahan", True)
    meta = [torch.zeros(4, dtype=torch.float32, device="meta")]
    assert not fused.usable(meta, {"exp_avg", "exp_avg_sq"}, "nearest", True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_matches_pytorch_adamw():
    pytest.importorskip("triton")
    namespace: dict = {}
    exec(CHECK, namespace)
    namespace["run"]("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_grass_run_with_and_without_the_fused_update():
    """A whole GRASS run in bf16 on CUDA (period residency, Kahan): the fused and the unfused update train the
    same layers to the same weights up to bf16 rounding of a few elements."""
    pytest.importorskip("triton")
    from conftest import make_tiny_llama
    from test_optim import batches

    from grass_llm import GrassConfig, GrassOptimizer

    models = []
    for fused_update in (False, True):
        model = make_tiny_llama(num_layers=4, hidden=64).to("cuda", torch.bfloat16)
        cfg = GrassConfig(active_layers=2, period=3, probe_steps=2, seed=1, fused_update=fused_update)
        opt = GrassOptimizer(model, cfg, lr=1e-3, weight_decay=0.01)
        assert opt.residency == "period" and opt.precision == "kahan"
        for x in batches(12):
            x = x.cuda()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        models.append(model)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=1e-3, msg=n)
    from grass_llm._optim import fused_adamw

    assert True in fused_adamw._CHECKED.values(), "the fused kernel was not used"


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
def test_a_failing_or_disagreeing_kernel_is_turned_off_with_a_warning(monkeypatch, failure):
    """The self-check keeps a Triton or driver problem from stopping training or changing its numbers."""
    from grass_llm._optim import fused_adamw as fused
    from grass_llm._optim.adamw import Piece

    def broken(pieces, group, weight_decay):
        if failure == "raises":
            raise RuntimeError("no kernel image for this device")
        for p in pieces:
            p.param.add_(1.0)  # a wrong update

    monkeypatch.setattr(fused, "fused_adamw_", broken)
    monkeypatch.setattr(fused, "_CHECKED", {})
    p = torch.ones(8, dtype=torch.bfloat16)
    state = {"exp_avg": torch.zeros(8, dtype=torch.bfloat16), "exp_avg_sq": torch.zeros(8, dtype=torch.bfloat16),
             "compensation": torch.zeros(8, dtype=torch.bfloat16)}  # fmt: skip
    piece = Piece(param=p, grad=torch.full((8,), 0.1, dtype=torch.bfloat16), state=state, step=1.0, decay=True, where=(0, 0))
    calls = []
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    with pytest.warns(RuntimeWarning, match="using PyTorch's AdamW"):
        assert not fused.fused_update_is_sound([piece], group, 0.0, lambda ps: calls.append(ps))
    assert bool(calls) == (failure == "disagrees")  # compared with the unfused update when the kernel ran
    assert torch.equal(piece.param, torch.ones(8, dtype=torch.bfloat16))  # the real piece untouched
    assert fused.fused_update_is_sound([piece], group, 0.0, lambda ps: None) is False  # decided once
