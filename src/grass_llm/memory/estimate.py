"""Peak device memory of one training step, estimated without a GPU.

The model is built under :class:`torch._subclasses.fake_tensor.FakeTensorMode` (fake CPU tensors:
shapes and dtypes, no data), two real training steps are run on it (forward, backward, optimizer
step, zero_grad) and :class:`LiveBytesTracker`, a ``TorchDispatchMode``, counts the bytes of every
live tensor storage. Each storage is rounded up to 512 bytes, the granularity of the CUDA caching
allocator, so the peak is comparable with ``torch.cuda.max_memory_allocated`` (which, like this
estimate, leaves out the CUDA context and the allocator's cached-but-free blocks).

What is modelled, per method (weights in ``dtype``, bf16 by default, as in the paper's pure-bf16
baseline):

* ``fft``: every parameter trained; AdamW states (``exp_avg``, ``exp_avg_sq``) on the device.
* ``grass`` (gamma active layers): only the active decoder layers require grad; embeddings, final
  norm and head are frozen and no input-require-grads hook is installed, so backward stops at the
  lowest active layer and activations are saved from there upward. The estimate uses the WORST
  case, layers ``0 .. gamma-1`` active. The optimizer states of all layers live in host memory; the
  step brings in the states of one layer (and prefetches the next: at most two layers' states on
  the device), steps it, sends the states back and frees that layer's gradients.
* ``lisa`` (gamma): the same active layers plus embeddings, final norm and head trained; all their
  AdamW states stay on the device (no offload).
* ``lora`` / ``dora`` (rank r, alpha 2r): peft adapters on ``grass-llm train``'s default target
  modules (q, k, v, up, down projections, LLM-Adapters'), no dropout; adapters in ``adapter_dtype``
  (bf16 by default, as in the paper; peft's own default is fp32 adapters, ``adapter_dtype="fp32"``).

The AdamW update is written out in torch ops with the allocation pattern of
``torch.optim.AdamW``: ``optimizer_impl="fused"`` (the default: ``torch._fused_adamw_``, no
temporaries; what the transformers ``Trainer`` uses by default with torch >= 2.8), ``"foreach"``
(one temporary per parameter of a group at once, ``torch.optim.AdamW``'s default on CUDA) or
``"for-loop"`` (temporaries of one parameter at a time).

``estimate_memory(..., fake=False)`` runs the same steps on real CPU tensors; the tests use it to
check that the fake run counts the same bytes as a real one.

Only torch is imported at module import time; transformers and peft are imported when needed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grass_llm.memory.tracker import ALLOCATOR_ROUND, CATEGORIES, LiveBytesTracker

__all__ = [
    "CATEGORIES",
    "METHODS",
    "OPTIMIZER_IMPLS",
    "MemoryEstimate",
    "MemoryEstimateError",
    "add_cli_arguments",
    "cli_main",
    "estimate_memory",
    "format_table",
    "load_config",
    "measure_cuda_step",
]

#: Fine-tuning methods the estimator models.
METHODS = ("grass", "lisa", "fft", "lora", "dora")
#: How the AdamW update allocates its temporaries (see the module docstring).
OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")
_CATEGORY_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations + temporaries",
}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class MemoryEstimateError(ValueError):
    """An argument of the estimator is invalid. The message names it and what is allowed."""


# ---------------------------------------------------------------------------------------------
# configuration and model construction
# ---------------------------------------------------------------------------------------------


def load_config(model: Any):
    """Resolve ``model`` to a transformers ``PretrainedConfig``.

    ``model`` may be a ``PretrainedConfig``, a path to a ``config.json`` file or to a directory
    holding one, or a hub name that is already in the local cache (no download is attempted).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if not isinstance(model, (str, Path)):
        raise MemoryEstimateError(
            f"model={model!r} is invalid; allowed: a PretrainedConfig, a config.json path or directory, "
            "or a hub name in the local cache"
        )
    path = Path(model).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
        ) as err:  # (a binary file: UnicodeDecodeError)
            raise MemoryEstimateError(f"model={str(model)!r}: cannot read a JSON config: {err}") from err
        model_type = data.pop("model_type", None)
        if not model_type:
            raise MemoryEstimateError(f"model={str(model)!r}: the config has no 'model_type' field")
        try:
            return AutoConfig.for_model(model_type, **data)
        except ValueError as err:
            raise MemoryEstimateError(f"model={str(model)!r}: {err}") from err
    if path.is_dir() and not (path / "config.json").is_file():
        raise MemoryEstimateError(f"model={str(model)!r} is a directory without a config.json")
    try:
        return AutoConfig.from_pretrained(str(model), local_files_only=True)
    except (OSError, ValueError) as err:
        raise MemoryEstimateError(
            f"model={str(model)!r} not found: it is neither a config.json file, a directory with one, nor a hub "
            f"name in the local cache (no download is attempted): {err}"
        ) from err


def _config_name(config) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    return name or getattr(config, "model_type", "model")


@contextlib.contextmanager
def _fake_mode_patches(mode):
    """Two patches, active only during a fake run, that make it follow the path of a real one.

    1. ``nn.Module.to`` on fake parameters: ``Module._apply`` swaps them with
       ``torch.utils.swap_tensors``, which refuses a tensor that has weak references, and the fake
       mode's meta converter keeps weak memos of the tensors it has seen (torch 2.13). The memos
       only speed up converting real tensors (none are converted here), so they are dropped
       before each swap.
    2. transformers' packed-sequence detection reads tensor values and, seeing fake tensors,
       assumes packing: it then materialises a (B, T, T) mask and SDPA takes its masked path. The
       synthetic batch is one unpadded sequence per row, for which a real run finds no packing
       (``None``) and calls SDPA with ``is_causal=True``; the patch returns that ``None``.
    """
    if mode is None:
        yield
        return
    import torch.utils

    original_swap = torch.utils.swap_tensors

    def swap(t1, t2):
        converter = mode.fake_tensor_converter.meta_converter
        converter.tensor_memo.clear()
        converter.describer.lookup_tensor.clear()
        return original_swap(t1, t2)

    masking_utils = None
    with contextlib.suppress(ImportError):
        from transformers import masking_utils
    original_find = getattr(masking_utils, "find_packed_sequence_indices", None)

    torch.utils.swap_tensors = swap
    if original_find is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.utils.swap_tensors = original_swap
        if original_find is not None:
            masking_utils.find_packed_sequence_indices = original_find


def _build_model(config, dtype: torch.dtype, device: torch.device | str):
    from transformers import AutoModelForCausalLM

    config = config.__class__.from_dict(config.to_dict())  # never mutate the caller's config
    config.use_cache = False
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        with contextlib.suppress(Exception):
            config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------
# the step, per method
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What one method trains and how its optimizer states are held."""

    trainable: list[list[nn.Parameter]]  # parameter groups, stepped group by group
    offload: bool  # GRASS: states brought in per group, at most two groups resident


def _adamw_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: int,
    impl: str,
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """AdamW on ``params``, with the allocation pattern of ``torch.optim.AdamW`` (``impl``)."""
    with torch.no_grad():
        _adamw_update_(params, grads, exp_avgs, exp_avg_sqs, step, impl, lr, betas, eps, weight_decay)


def _adamw_update_(params, grads, exp_avgs, exp_avg_sqs, step, impl, lr, betas, eps, weight_decay) -> None:
    beta1, beta2 = betas
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bc1
    if impl == "fused":
        steps = [torch.full((), float(step), dtype=torch.float32, device=p.device) for p in params]
        torch._fused_adamw_(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return
    if impl == "foreach":
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)
        return
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        del denom


class _StepRunner:
    """Runs training steps of one method and models where its optimizer states live."""

    def __init__(
        self, plan: _Plan, state_dtype: torch.dtype | None, impl: str, tracker: LiveBytesTracker | None
    ):
        self.plan = plan
        self.state_dtype = state_dtype
        self.impl = impl
        self.tracker = tracker
        self.step_count = 0
        self.resident: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # GRASS: the host copy of every group's states (real runs only; host memory is not counted)
        self.host: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.copy_stream = None

    def _tag(self, category: str):
        return self.tracker.tagging(category) if self.tracker is not None else contextlib.nullcontext()

    def _new_states(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with self._tag("optimizer_states"):
            m = [torch.zeros_like(p, dtype=self.state_dtype or p.dtype) for p in params]
            v = [torch.zeros_like(p, dtype=self.state_dtype or p.dtype) for p in params]
        return m, v

    def _fetch(self, gi: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Bring group ``gi``'s states onto the device (GRASS offload)."""
        params = self.plan.trainable[gi]
        host = self.host.get(gi)
        if host is None or params[0].device.type != "cuda":
            return self._new_states(params)  # the device buffers the host copy lands in
        stream = self.copy_stream or torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            m = [h.to(p.device, non_blocking=True) for h, p in zip(host[0], params)]
            v = [h.to(p.device, non_blocking=True) for h, p in zip(host[1], params)]
        # invariant: the compute stream waits for the copies before the update reads m, v, and the
        # buffers are recorded on the compute stream so the allocator does not reuse them early
        torch.cuda.current_stream().wait_stream(stream)
        for t in (*m, *v):
            t.record_stream(torch.cuda.current_stream())
        return m, v

    def _store(self, gi: int, states: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        """Send group ``gi``'s states back to the host (real CUDA runs keep them there)."""
        params = self.plan.trainable[gi]
        if params[0].device.type != "cuda":
            return
        host = self.host.get(gi)
        if host is None:
            pin = torch.cuda.is_available()
            host = tuple([torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in ts] for ts in states)
            self.host[gi] = host
        for hs, ds in zip(host, states):
            for h, d in zip(hs, ds):
                h.copy_(d, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def optimizer_step(self) -> None:
        self.step_count += 1
        groups = self.plan.trainable
        if not self.plan.offload:
            for gi, params in enumerate(groups):
                if gi not in self.resident:
                    self.resident[gi] = self._new_states(params)
            all_p = [p for params in groups for p in params if p.grad is not None]
            ids = {id(p) for p in all_p}
            m = [
                t
                for gi, params in enumerate(groups)
                for t, p in zip(self.resident[gi][0], params)
                if id(p) in ids
            ]
            v = [
                t
                for gi, params in enumerate(groups)
                for t, p in zip(self.resident[gi][1], params)
                if id(p) in ids
            ]
            with self._tag("activations"):
                _adamw_update(all_p, [p.grad for p in all_p], m, v, self.step_count, self.impl)
            return
        # GRASS: one group (layer) on the device at a time, plus the prefetched next one
        order = [gi for gi, params in enumerate(groups) if any(p.grad is not None for p in params)]
        pending = self._fetch(order[0]) if order else None
        for k, gi in enumerate(order):
            states, pending = pending, None
            if k + 1 < len(order):
                pending = self._fetch(order[k + 1])  # prefetch: at most two layers' states resident
            params = [p for p in groups[gi] if p.grad is not None]
            with self._tag("activations"):
                _adamw_update(
                    params, [p.grad for p in params], states[0], states[1], self.step_count, self.impl
                )
            self._store(gi, states)
            del states
            for p in groups[gi]:
                p.grad = None  # this layer is stepped: its gradients are freed now

    def zero_grad(self) -> None:
        for params in self.plan.trainable:
            for p in params:
                p.grad = None


def _plan_method(model, method: str, active: Sequence[int]) -> tuple[nn.Module, _Plan]:
    from grass_llm.layers import discover_layers

    if method in ("lora", "dora"):
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, _Plan([trainable], offload=False)
    groups = discover_layers(model)
    for p in model.parameters():
        p.requires_grad_(method == "fft")
    if method == "fft":
        return model, _Plan([[p for p in model.parameters()]], offload=False)
    layer_groups = [groups.block_params[i] for i in active]
    for params in layer_groups:
        for p in params:
            p.requires_grad_(True)
    if method == "grass":
        return model, _Plan(layer_groups, offload=True)
    # lisa: embeddings, final norm and head are always trained; all states resident
    extra = [p for p in (*groups.embeddings, *groups.norm, *groups.head)]
    for p in extra:
        p.requires_grad_(True)
    return model, _Plan([*layer_groups, extra], offload=False)


def _apply_peft(model, method: str, rank: int, adapter_dtype: torch.dtype):
    """LoRA / DoRA as ``grass-llm train`` builds it (its default target modules), alpha = 2r, no dropout."""
    from grass_llm.recipes.methods import wrap_lora
    from grass_llm.recipes.train_config import LoraSection

    targets = LoraSection().target_modules
    model = wrap_lora(model, rank, 2 * rank, targets, 0.0, method == "dora", adapter_dtype)
    for n, p in model.named_parameters():
        if "lora_" not in n and p.requires_grad:
            p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Peak device memory of one training step and its breakdown (bytes)."""

    model: str
    method: str
    batch_size: int
    seq_len: int
    dtype: str
    active_layers: int | None = None
    active_layer_ids: list[int] | None = None
    rank: int | None = None
    adapter_dtype: str | None = None
    state_dtype: str | None = None
    gradient_checkpointing: bool = False
    optimizer_impl: str = "fused"
    num_layers: int = 0
    total_params: int = 0
    trainable_params: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    peak: int = 0
    fake: bool = True
    measured_peak: int | None = None  # torch.cuda.max_memory_allocated, when measured
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short method label: ``GRASS γ=2``, ``LoRA r=128``, ``FFT``."""
        if self.method in ("grass", "lisa"):
            return f"{self.method.upper()} γ={self.active_layers}"
        if self.method in ("lora", "dora"):
            return f"{'LoRA' if self.method == 'lora' else 'DoRA'} r={self.rank}"
        return "FFT"

    def breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak (they sum to ``peak``)."""
        return {c: getattr(self, c) for c in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        d["peak_gib"] = self.peak / 2**30
        d["peak_gb"] = self.peak / 1e9
        return d


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MemoryEstimateError(f"{name}={value!r} is invalid; allowed: an integer >= {minimum}")
    return value


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise MemoryEstimateError(f"{name}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")
    return value


def estimate_memory(
    model: Any,
    method: str = "grass",
    *,
    active_layers: int = 2,
    active_layer_ids: Sequence[int] | None = None,
    rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    state_dtype: str | None = None,
    adapter_dtype: str = "bf16",
    gradient_checkpointing: bool = False,
    optimizer_impl: str = "fused",
    steps: int = 2,
    fake: bool = True,
    round_to: int = ALLOCATOR_ROUND,
) -> MemoryEstimate:
    """Estimate the peak device memory of a training step of ``model`` with ``method``.

    Args:
        model: a ``PretrainedConfig``, a config.json path or directory, or a cached hub name.
        method: one of :data:`METHODS`.
        active_layers: gamma for ``grass`` / ``lisa``.
        active_layer_ids: the active decoder layers; default ``0 .. gamma-1``, the worst case
            (activations are saved from the lowest active layer upward).
        rank: LoRA / DoRA rank r (alpha = 2r).
        batch_size, seq_len: the batch of one step (B, T).
        dtype: weight dtype, ``bf16`` (pure bf16, the paper's setting) or ``fp32``.
        state_dtype: AdamW state dtype; default the parameter dtype. ``fp32`` for fp32 states.
        adapter_dtype: LoRA / DoRA adapter dtype (``bf16`` as in the paper, or ``fp32``).
        gradient_checkpointing: recompute each block in backward (non-reentrant checkpointing).
        optimizer_impl: allocation pattern of the AdamW update, one of :data:`OPTIMIZER_IMPLS`.
        steps: training steps run (>= 2: the first step creates the resident optimizer states).
        fake: build the model from fake tensors (no memory, any size); ``False`` runs real CPU
            tensors (small models only; used to validate the fake run).
        round_to: storages are rounded up to this many bytes (CUDA caching allocator: 512).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_choice("method", method, METHODS)
    _check_choice("dtype", dtype, ("bf16", "fp32"))
    _check_choice("adapter_dtype", adapter_dtype, ("bf16", "fp32"))
    if state_dtype is not None:
        _check_choice("state_dtype", state_dtype, ("bf16", "fp32"))
    _check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("steps", steps, 1)
    if method in ("grass", "lisa"):
        _check_int("active_layers", active_layers, 1)
    if method in ("lora", "dora"):
        _check_int("rank", rank, 1)
    config = load_config(model)
    num_layers = getattr(config, "num_hidden_layers", None)
    if method in ("grass", "lisa"):
        if active_layer_ids is None:
            active_layer_ids = list(range(active_layers))
        active_layer_ids = sorted({int(i) for i in active_layer_ids})
        if len(active_layer_ids) != active_layers:
            raise MemoryEstimateError(
                f"active_layer_ids={active_layer_ids!r} has {len(active_layer_ids)} distinct layers; "
                f"allowed: exactly active_layers={active_layers}"
            )
        if num_layers is not None and (active_layer_ids[0] < 0 or active_layer_ids[-1] >= num_layers):
            raise MemoryEstimateError(
                f"active_layer_ids={active_layer_ids!r} is invalid; allowed: layers 0..{num_layers - 1}"
            )
    else:
        active_layer_ids = None
    torch_dtype = _DTYPES[dtype]

    mode = FakeTensorMode() if fake else None
    with mode or contextlib.nullcontext(), _fake_mode_patches(mode):
        net = _build_model(config, torch_dtype, "cpu")
        if method in ("lora", "dora"):
            net = _apply_peft(net, method, rank, _DTYPES[adapter_dtype])
        net, plan = _plan_method(net, method, active_layer_ids or [])
        if gradient_checkpointing:
            _enable_checkpointing(net)
        net.train()
        tracker = LiveBytesTracker(round_to=round_to)
        tracker.track(list(net.parameters()) + list(net.buffers()), "weights")
        for params in plan.trainable:
            for p in params:
                p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "gradients"))
        runner = _StepRunner(plan, _DTYPES[state_dtype] if state_dtype else None, optimizer_impl, tracker)
        vocab = int(getattr(config, "vocab_size", 32000))
        with tracker:
            for _ in range(steps):
                ids = torch.randint(0, vocab, (batch_size, seq_len))  # (B, T)
                loss = net(input_ids=ids, labels=ids).loss
                loss.backward()
                del loss, ids
                runner.optimizer_step()
                runner.zero_grad()
        breakdown = tracker.peak_breakdown()
        total = sum(p.numel() for p in net.parameters())
        trainable = sum(p.numel() for params in plan.trainable for p in params)

    return MemoryEstimate(
        model=_config_name(config) if not isinstance(model, (str, Path)) else str(model),
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        active_layers=active_layers if method in ("grass", "lisa") else None,
        active_layer_ids=active_layer_ids,
        rank=rank if method in ("lora", "dora") else None,
        adapter_dtype=adapter_dtype if method in ("lora", "dora") else None,
        state_dtype=state_dtype or dtype,
        gradient_checkpointing=gradient_checkpointing,
        optimizer_impl=optimizer_impl,
        num_layers=int(num_layers or 0),
        total_params=total,
        trainable_params=trainable,
        peak=tracker.peak,
        fake=fake,
        **breakdown,
    )


def _enable_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers installs an input-require-grads hook on the embeddings; non-reentrant
    # checkpointing does not need it, and it would make backward run down to the embeddings
    # (saving activations below the lowest active layer), which GRASS avoids.
    with contextlib.suppress(Exception):
        model.disable_input_require_grads()


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

_UNITS = {"GiB": 2**30, "GB": 1e9}


def format_table(
    estimates: Sequence[MemoryEstimate],
    paper: dict[str, float] | None = None,
    unit: str = "GiB",
) -> str:
    """A Markdown table of ``estimates``: the peak and its breakdown in ``unit`` (``GiB`` or ``GB``).

    ``paper`` maps a method label (``MemoryEstimate.label``) to a reference figure shown beside the
    estimate.
    """
    _check_choice("unit", unit, tuple(_UNITS))
    scale = _UNITS[unit]
    cols = ["model", "method", "B", "T", *(_CATEGORY_LABELS[c] for c in CATEGORIES), f"peak ({unit})"]
    if paper is not None:
        cols.append("paper")
    measured = any(e.measured_peak is not None for e in estimates)
    if measured:
        cols.append(f"measured max_memory_allocated ({unit})")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for e in estimates:
        row = [
            e.model,
            e.label + (" +GC" if e.gradient_checkpointing else ""),
            str(e.batch_size),
            str(e.seq_len),
        ]
        row += [f"{getattr(e, c) / scale:.2f}" for c in CATEGORIES]
        row.append(f"**{e.peak / scale:.2f}**")
        if paper is not None:
            ref = paper.get(e.label)
            row.append("" if ref is None else f"{ref:.2f}")
        if measured:
            row.append("" if e.measured_peak is None else f"{e.measured_peak / scale:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# real measurement on a CUDA device
# ---------------------------------------------------------------------------------------------


def measure_cuda_step(
    model: Any,
    method: str = "grass",
    *,
    active_layers: int = 2,
    active_layer_ids: Sequence[int] | None = None,
    rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    state_dtype: str | None = None,
    adapter_dtype: str = "bf16",
    gradient_checkpointing: bool = False,
    optimizer_impl: str = "fused",
    steps: int = 2,
    device: str = "cuda",
) -> int:
    """Run the same training steps on a real CUDA device; return ``torch.cuda.max_memory_allocated``.

    The model is randomly initialised from its config (no weights are downloaded). GRASS keeps its
    optimizer states in pinned host memory and copies them in on a side stream, one layer at a time
    with the next one prefetched. Raises :class:`MemoryEstimateError` without CUDA.
    """
    if not torch.cuda.is_available():
        raise MemoryEstimateError("measure_cuda_step needs a CUDA device; torch.cuda.is_available() is False")
    _check_choice("method", method, METHODS)
    _check_choice("dtype", dtype, ("bf16", "fp32"))
    _check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    config = load_config(model)
    if active_layer_ids is None:
        active_layer_ids = list(range(active_layers))
    dev = torch.device(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    net = _build_model(config, _DTYPES[dtype], dev)
    if method in ("lora", "dora"):
        net = _apply_peft(net, method, rank, _DTYPES[adapter_dtype])
    net, plan = _plan_method(net, method, active_layer_ids if method in ("grass", "lisa") else [])
    if gradient_checkpointing:
        _enable_checkpointing(net)
    net.train()
    runner = _StepRunner(plan, _DTYPES[state_dtype] if state_dtype else None, optimizer_impl, None)
    if plan.offload:
        runner.copy_stream = torch.cuda.Stream(dev)
    vocab = int(getattr(config, "vocab_size", 32000))
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch_size, seq_len), device=dev)  # (B, T)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss, ids
        runner.optimizer_step()
        runner.zero_grad()
    torch.cuda.synchronize(dev)
    peak = int(torch.cuda.max_memory_allocated(dev))
    del net, runner, plan
    torch.cuda.empty_cache()
    return peak


# ---------------------------------------------------------------------------------------------
# command line: ``grass-llm memory``
# ---------------------------------------------------------------------------------------------


def _methods(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for m in v.split(","):
            m = m.strip().lower()
            if not m:
                continue
            if m not in METHODS:
                raise MemoryEstimateError(f"--method {m!r} is invalid; allowed: {', '.join(METHODS)}")
            if m not in out:
                out.append(m)
    return out or ["grass"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``grass-llm memory`` to ``parser``."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_PATH",
        help="config.json file, directory holding one, or hub name already in the local cache (never downloaded)",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"method(s) to estimate, repeatable or comma separated: {', '.join(METHODS)} (default grass)",
    )
    parser.add_argument("--active-layers", type=int, default=2, help="gamma for grass / lisa (default 2)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA / DoRA rank r, alpha = 2r (default 128)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length T (default 1024)")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="weight dtype (default bf16)"
    )
    parser.add_argument(
        "--state-dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="AdamW state dtype (default: the weight dtype)",
    )
    parser.add_argument(
        "--adapter-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="LoRA / DoRA adapter dtype (default bf16)",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=OPTIMIZER_IMPLS,
        default="fused",
        help="allocation pattern of the AdamW update (default fused, the transformers Trainer default)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument(
        "--unit", choices=tuple(_UNITS), default="GiB", help="unit of the table (default GiB)"
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the estimates as JSON here")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also run the step on the CUDA device and report torch.cuda.max_memory_allocated",
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm memory``: print a Markdown table, optionally write JSON. Returns the exit code."""
    try:
        methods = _methods(args.method or [])
        if args.measure and not torch.cuda.is_available():
            raise MemoryEstimateError("--measure needs a CUDA device; torch.cuda.is_available() is False")
        estimates = []
        for method in methods:
            kwargs = dict(
                active_layers=args.active_layers,
                rank=args.rank,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                dtype=args.dtype,
                state_dtype=args.state_dtype,
                adapter_dtype=args.adapter_dtype,
                gradient_checkpointing=args.gradient_checkpointing,
                optimizer_impl=args.optimizer_impl,
            )
            est = estimate_memory(args.model, method, **kwargs)
            if args.measure:
                est.measured_peak = measure_cuda_step(args.model, method, **kwargs)
            estimates.append(est)
    except MemoryEstimateError as err:
        print(f"grass-llm memory: error: {err}", file=sys.stderr)
        return 2
    print(format_table(estimates, unit=args.unit))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([e.to_dict() for e in estimates], indent=2) + "\n")
        print(f"wrote {path}")
    return 0
