"""How an AdamW update reaches a bf16/fp16 weight, settled once from the config.

* ``master``: an fp32 master copy of each trained weight in the optimizer state; AdamW updates the master
  and the weight takes its rounded value (no update is lost).
* ``kahan``: a compensation buffer in the weight's dtype carries each rounding error into the next update.
* ``stochastic``: the new value is rounded up or down with probability proportional to the distance
  (bf16 only), with counter-based random bits: reproducible, and the same whichever way a parameter is
  cut into pieces.
* ``nearest``: round to nearest (the paper's pure-bf16 setting); also the name for fp32 weights, which are
  updated exactly.

A state loaded from a run with the other setting is converted (master <-> compensation) on first use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from grass_llm.config import GrassConfig

__all__ = ["LOW_PRECISION", "PrecisionPolicy", "exact_value", "hash32"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def hash32(x: Any) -> Any:
    """A 32-bit integer hash, of a Python int or elementwise of an int64 tensor (no product exceeds 2**59)."""
    x = x & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def exact_value(p: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | None:
    """The fp32 value a master or a compensation buffer in ``state`` says ``p`` has (on ``p``'s device),
    else None."""
    if "master" in state:
        return state["master"].to(p.device, torch.float32)
    if "compensation" in state:
        return p.detach().float() + state["compensation"].to(p.device).float()
    return None


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """``use_master``: fp32 masters; else ``rounding`` (kahan / stochastic / nearest) for low-precision
    weights. ``fp32_states``: AdamW moments in fp32 whatever the weights' dtype."""

    use_master: bool
    rounding: str
    fp32_states: bool
    seed: int
    #: on CUDA, update bf16/fp16 weights with Kahan or masters in one fused kernel (``_optim.fused_adamw``)
    fused: bool = False

    @classmethod
    def settle(cls, config: GrassConfig, dtypes: set[torch.dtype], residency: str) -> PrecisionPolicy:
        """From the config, the trainable weights' dtypes and the state residency (``off`` / ``step`` /
        ``period``): by default fp32 masters only when states stream per step (they then live in host
        memory and cost no device memory), else Kahan compensation (half the bytes on the device)."""
        low = set(dtypes) & set(LOW_PRECISION)
        master = config.fp32_master_weights
        use_master = bool(low) and (master is True or (master == "auto" and residency == "step"))
        rounding = config.update_rounding if low and not use_master else "nearest"
        if rounding == "stochastic" and torch.float16 in low:
            raise ValueError(
                "update_rounding='stochastic' supports bf16 weights, the model has fp16 ones; allowed for fp16: "
                "kahan, nearest, or fp32_master_weights=True"
            )
        return cls(use_master, rounding, config.fp32_optimizer_states, config.seed, config.fused_update)

    @property
    def name(self) -> str:
        return "master" if self.use_master else self.rounding

    def compensates(self, dtype: torch.dtype) -> bool:
        """Whether weights of ``dtype`` carry a Kahan compensation buffer."""
        return not self.use_master and self.rounding == "kahan" and dtype in LOW_PRECISION

    def state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self.fp32_states else p.dtype

    def state_keys(self, dtypes: set[torch.dtype]) -> set[str]:
        """The state tensors of a unit whose weights have these dtypes."""
        keys = {"exp_avg", "exp_avg_sq"}
        if self.use_master:
            keys.add("master")
        if any(self.compensates(d) for d in dtypes):
            keys.add("compensation")
        return keys

    def ensure_state(self, state: dict[str, Any], p: torch.Tensor) -> None:
        """An in-memory state for weight ``p``: the moments, and the master or compensation its precision
        needs, converting a state saved with the other setting."""
        if "exp_avg" not in state:
            dtype = self.state_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        exact = exact_value(p, state)
        if self.use_master:
            if "master" not in state:
                state["master"] = exact if exact is not None else p.detach().to(torch.float32, copy=True)
            state.pop("compensation", None)
            return
        state.pop("master", None)
        if self.compensates(p.dtype):
            if "compensation" not in state:
                state["compensation"] = (
                    torch.zeros_like(p, memory_format=torch.preserve_format)
                    if exact is None
                    else (exact - p.detach().float()).to(p.dtype)
                )
        elif "compensation" in state:
            p.detach().copy_(exact)  # fold the owed rounding error into the weight
            state.pop("compensation")

    def stochastic_round_(
        self, dst: torch.Tensor, src: torch.Tensor, where: tuple[int, int], global_step: int
    ) -> None:
        """``dst`` (bf16) <- ``src`` (fp32) rounded up or down with probability proportional to the distance.

        The random bits are a hash of (seed, step, parameter number, element index)."""
        index, start = where
        key = (self.seed * 1_000_003 + global_step) * 1_000_003 + index
        base = hash32(key)
        n = src.numel()
        x = torch.arange(start, start + n, dtype=torch.int64, device=src.device)
        rand = hash32(x + base) & 0xFFFF
        bits = src.contiguous().view(-1).view(torch.int32) + rand.to(torch.int32)
        bits &= -65536  # clear the 16 bits bf16 drops: truncating after the random carry
        dst.copy_(bits.view(torch.float32).view(dst.shape))
