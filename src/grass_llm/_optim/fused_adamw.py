"""One fused Triton kernel for AdamW on bf16/fp16 weights with Kahan compensation or fp32 masters (CUDA).

PyTorch's functional AdamW over such weights runs about a dozen passes over memory per element: casts of
the weight, its compensation, its gradient and both moments to fp32 temporaries, the multi-tensor AdamW
kernels, and the casts back. This kernel reads each element's weight, gradient, moments and compensation
(or master) once and writes them once (18 bytes per element with bf16 moments against about 170), in the
same order of operations as ``torch.optim.adam.adam`` with decoupled weight decay, in fp32:

    x = p + c                 (or x = master)
    x = x * (1 - lr * wd)
    m = m + (1 - beta1) * (g - m)                  (lerp; stored in the moments' dtype)
    v = v * beta2 + (1 - beta2) * g * g
    x = x - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    p = round(x);  c = round(x - p)                (or master = x)

Results equal the unfused update up to fp32 rounding (fused multiply-adds): the kernel is not bit-identical to
it, and is used only where no bit-exact reference applies (low-precision weights on CUDA). It is checked
against the unfused update once per process (:func:`fused_update_is_sound`); a failure or a mismatch turns it
off with a warning. Only with ``GrassConfig.fused_update=True`` (opt-in: it has run in Triton's CPU
interpreter, not yet on a GPU). Triton is optional: without it (or on the CPU) the unfused update runs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

__all__ = ["fused_adamw_", "usable"]

_LOW = (torch.bfloat16, torch.float16)
#: the self-check's verdict per kind of update (weight, moment and compensation-or-master dtypes); a kind not
#: in it has not been checked yet in this process
_CHECKED: dict[tuple, bool] = {}
_BLOCK = 1024

try:  # Triton is optional (CUDA builds of torch bring it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


if triton is not None:

    @triton.jit
    def _store(ptr, offs, x, mask, BF16: tl.constexpr):
        """Store fp32 ``x`` in the buffer's dtype, rounding to nearest even (bf16 by its bits, so that every
        Triton backend, the CPU interpreter included, rounds alike; values are finite: non-finite steps are
        skipped before any update)."""
        if BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, n,
        lr, beta1, beta2, eps, decay, step_size, bc2_sqrt,
        MASTER: tl.constexpr, P_BF16: tl.constexpr, M_BF16: tl.constexpr, X_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        extra = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        if MASTER:
            x = extra
        else:
            x = tl.load(p_ptr + offs, mask=mask).to(tl.float32) + extra
        x = x * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2
        v = v + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bc2_sqrt + eps
        x = x - step_size * (m / denom)
        _store(p_ptr, offs, x, mask, P_BF16)
        _store(m_ptr, offs, m, mask, M_BF16)
        _store(v_ptr, offs, v, mask, M_BF16)
        if MASTER:
            _store(x_ptr, offs, x, mask, X_BF16)
        else:
            new_p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
            _store(x_ptr, offs, x - new_p, mask, X_BF16)


def usable(params: list[torch.Tensor], state_keys: set[str], rounding: str, enabled: bool) -> bool:
    """Whether the fused kernel can update these pieces: CUDA, bf16/fp16 weights, Kahan compensation or fp32
    masters, contiguous tensors, Triton importable, the config allows it and the self-check did not fail."""
    if not enabled or triton is None or not params:
        return False
    p = params[0]
    if p.device.type != "cuda" or p.dtype not in _LOW:
        return False
    return "master" in state_keys or (rounding == "kahan" and "compensation" in state_keys)


def _launch(p, g, m, v, x, *, lr, beta1, beta2, eps, weight_decay, step, master: bool) -> None:
    n = p.numel()
    if n == 0:
        return
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    bf16 = torch.bfloat16
    _adamw_kernel[(triton.cdiv(n, _BLOCK),)](
        p, g, m, v, x, n, lr, beta1, beta2, eps, 1.0 - lr * weight_decay, lr / bc1, bc2_sqrt,
        MASTER=master, P_BF16=p.dtype == bf16, M_BF16=m.dtype == bf16, X_BF16=x.dtype == bf16, BLOCK=_BLOCK,
    )  # fmt: skip


def fused_adamw_(pieces: list[Any], group: dict[str, Any], weight_decay: float) -> None:
    """The update of ``pieces`` (``grass_llm._optim.adamw.Piece``: weight, gradient, state pieces, step) in
    one kernel each, in place."""
    beta1, beta2 = group["betas"]
    for piece in pieces:
        master = "master" in piece.state
        x = piece.state["master"] if master else piece.state["compensation"]
        tensors = [piece.param, piece.grad, piece.state["exp_avg"], piece.state["exp_avg_sq"], x]
        flat = [t if t.is_contiguous() else None for t in tensors]
        if any(t is None for t in flat):
            raise ValueError("fused AdamW needs contiguous pieces")
        _launch(
            *(t.view(-1) for t in flat), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=weight_decay, step=float(piece.step), master=master,
        )  # fmt: skip


def fused_update_is_sound(pieces: list[Any], group: dict[str, Any], weight_decay: float, reference) -> bool:
    """Once per process and kind of update (dtypes, master or compensation): run the fused kernel and the
    unfused ``reference(pieces)`` on copies of the first piece and compare (bf16 results within one unit in the last place, moments within their rounding). On a
    failure or a mismatch the kernel is turned off for this kind in this process, with a warning. A bucket
    mixes no kinds (``adamw_pieces`` buckets by dtype)."""
    first = pieces[0]
    key = _kind(first)
    if key in _CHECKED:
        return _CHECKED[key]
    copies = [
        type(first)(
            param=first.param.clone(), grad=first.grad.clone(), state={k: t.clone() for k, t in first.state.items()},
            step=first.step, decay=first.decay, where=first.where,
        )
        for _ in range(2)
    ]  # fmt: skip
    try:
        fused_adamw_([copies[0]], group, weight_decay)
        reference([copies[1]])
        ok = _close(copies[0], copies[1])
    except Exception as e:  # a Triton / driver problem must not stop training
        warnings.warn(f"fused AdamW kernel failed ({type(e).__name__}: {e}); using PyTorch's AdamW", RuntimeWarning, stacklevel=3)
        ok = False
    else:
        if not ok:
            warnings.warn("fused AdamW kernel disagrees with PyTorch's AdamW; using PyTorch's AdamW", RuntimeWarning, stacklevel=3)
    _CHECKED[key] = ok
    return ok


def _kind(piece: Any) -> tuple:
    extra = piece.state.get("master", piece.state.get("compensation"))
    return (piece.param.dtype, piece.grad.dtype, piece.state["exp_avg"].dtype, extra.dtype, "master" in piece.state)


def _close(a: Any, b: Any) -> bool:
    """The fused and the unfused update agree: the exact new value (master, or weight + compensation) to fp32
    rounding, the weight and the moments within about one unit in the last place of their dtype."""

    def near(x: torch.Tensor, y: torch.Tensor, ulps: float, normwise: bool = False) -> bool:
        x32, y32 = x.float(), y.float()
        scale = y32.abs().max() if normwise else torch.maximum(x32.abs(), y32.abs())
        return bool(((x32 - y32).abs() <= ulps * torch.finfo(x.dtype).eps * scale + 1e-30).all())

    if "master" in a.state:
        exact = near(a.state["master"], b.state["master"], 8)
    else:  # the compensation itself is rounded to the weight's dtype: about 2**-17 of the value
        exact = near(a.param.float() + a.state["compensation"].float(), b.param.float() + b.state["compensation"].float(), 128)
    # the moments normwise: the first moment's lerp can cancel to values far below its inputs
    moments = all(near(a.state[k], b.state[k], 4, normwise=True) for k in ("exp_avg", "exp_avg_sq"))
    return exact and moments and near(a.param, b.param, 1)
