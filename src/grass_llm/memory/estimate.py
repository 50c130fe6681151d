"""Peak device memory of one training step, estimated without a GPU, by the code that trains.

``estimate_memory`` builds the model under
:class:`torch._subclasses.fake_tensor.FakeTensorMode` on the ``meta`` device (fake tensors: shapes
and dtypes, no data), builds the method with ``grass_llm.recipes.methods.build_method`` from a
``TrainConfig``, exactly as ``grass-llm train`` does on a CUDA device, and runs training steps
(forward, the loss as ``grass-llm train`` computes it, backward, gradient clipping, the optimizer's
``step()``, ``zero_grad``). There is no model of the optimizer: ``GrassOptimizer`` steps with its real
``LayerStateOffloader`` (host buffers on the CPU, device slots on ``meta``), FFT and LoRA/DoRA with the
``torch.optim.AdamW`` (and peft adapters) the registry builds. :class:`LiveBytesTracker`, a
``TorchDispatchMode``, counts the bytes of every live tensor storage on the model's device (``meta``),
so host-side buffers are left out by the same placement that keeps them in host memory on CUDA. Each
storage is rounded up to 512 bytes, the granularity of the CUDA caching allocator, so the peak is
comparable with ``torch.cuda.max_memory_allocated`` (which, like this estimate, leaves out the CUDA
context and the allocator's cached-but-free blocks). Two things a CUDA run holds beyond the ops' outputs
are modelled by the tracker: PyTorch's cuBLAS workspaces (one per thread that runs matmuls, forward and
autograd's backward thread: 2 x 32 MiB on a Hopper GPU, the default ``gpu="hopper"``; ``CUBLAS_WORKSPACE_CONFIG``
sizes them when set), and autograd summing two gradients of one tensor in place (a tied embedding and
head), which it does out of place under any dispatch mode. Checked against an H200 on 2026-12-04: Gemma-2B
FFT, LoRA r=128, LISA and GRASS + frozen-block checkpointing, and the 512-wide test model's FFT and GRASS,
within 0.6% of ``max_memory_allocated`` (``tests/test_memory.py`` pins those measurements).

A run of a layer-wise method has two kinds of step: probing steps (backward through every layer) and
training steps. ``phase="run"`` is the whole run's peak: the larger of the two, and with ``offload=off``
the training step plus the AdamW states of every trainable layer, which such a run keeps on the device
once it has trained them (:func:`whole_run`). ``grass-llm memory`` reports it first.

The settings are ``grass-llm train``'s (``TrainConfig`` keys, ``overrides``) with the device taken to be
CUDA: weights in ``dtype`` (bf16 by default), offload on (``grass.offload: auto``: the active layers'
states kept on the device for a period, every state in host memory), the chunked loss, no activation
checkpointing unless asked. Two things are set for the measurement: GRASS-style methods run their
training phase (``grass.probe_steps: 0``) with the WORST-case active layers, ``0 .. gamma-1``
(activations are saved from the lowest active layer upward), forced with
``GrassOptimizer.activate``; and ``torch.optim``'s AdamW runs the implementation ``grass-llm train``
builds on a CUDA device, fused (``optimizer_impl="auto"``; on ``meta`` torch would pick the for-loop).

``estimate_memory(..., fake=False)`` runs the same steps on real CPU tensors (the device is then the
CPU, where ``offload: auto`` is off); the tests use it to check that the fake run counts the same bytes
as a real one. :func:`measure_cuda_step` runs them on a real CUDA device and returns
``torch.cuda.max_memory_allocated``.

Only torch is imported at module import time; transformers and peft are imported when needed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grass_llm.memory.tracker import ALLOCATOR_ROUND, CATEGORIES, LiveBytesTracker
from grass_llm.memory.workspaces import GPUS, cublas_workspace_bytes, cublaslt_workspace_bytes

__all__ = [
    "CATEGORIES",
    "GPUS",
    "OPTIMIZER_IMPLS",
    "PHASES",
    "MemoryEstimate",
    "MemoryEstimateError",
    "TrainingStep",
    "add_cli_arguments",
    "cli_main",
    "cuda_gpu",
    "estimate_memory",
    "format_table",
    "load_config",
    "measure_cuda_step",
    "methods",
    "training_step",
    "whole_run",
]

#: How torch.optim's AdamW allocates its temporaries: ``auto`` (what ``grass-llm train`` builds on CUDA: the
#: fused kernel, no temporaries), ``fused``, ``foreach`` (one temporary per parameter of a group at once),
#: ``for-loop`` (one parameter at a time). GrassOptimizer's update runs on bounded pieces either way.
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")
#: What is estimated: a training step, a probing step (backward through every layer, no update), or a whole
#: run (the larger of the two, with what a run keeps on the device beyond one step: :func:`whole_run`).
PHASES = ("train", "probe", "run")
#: Probing steps a measured whole run (``measure_cuda_step(phase="run")``) runs before its training steps
RUN_PROBE_STEPS = 2
_CATEGORY_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations + temporaries",
    "workspaces": "cuBLAS workspaces",
}
_STEP_LABELS = {"train": "training step", "probe": "probing step", "run": "whole run"}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def methods() -> tuple[str, ...]:
    """The methods ``grass-llm train`` knows (``grass_llm.recipes.methods``), all of which can be estimated."""
    from grass_llm.recipes.methods import METHODS

    return tuple(METHODS)


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


def _cuda_sdpa(original, device_type: str = "meta"):
    """``F.scaled_dot_product_attention`` for ``meta`` tensors as a CUDA device runs it: the flash kernel for
    bf16/fp16 (head dim <= 256, multiple of 8, no mask), else the memory-efficient one (no mask, no grouped
    heads), else the math path. On ``meta`` SDPA would take the math path, which saves the (B, H, T, T)
    attention weights that a CUDA run never allocates. Both kernels have meta implementations and derivatives."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type == device_type and attn_mask is None and query.dim() == 4:
            head_dim = query.shape[-1]
            grouped = key.shape[-3] != query.shape[-3]
            if query.dtype in (torch.bfloat16, torch.float16) and head_dim <= 256 and head_dim % 8 == 0:
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, dropout_p, is_causal, False, scale=scale
                )[0]
            if not grouped:
                grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    query, key, value, None, grad, dropout_p, is_causal, scale=scale
                )[0]
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    return sdpa


@contextlib.contextmanager
def _fake_mode_patches(mode, device_type: str = "meta"):
    """Patches, active only during a fake run, that make it follow the path of a real CUDA one.

    1. ``nn.Module.to`` on fake parameters: ``Module._apply`` swaps them with
       ``torch.utils.swap_tensors``, which refuses a tensor that has weak references, and the fake
       mode's meta converter keeps weak memos of the tensors it has seen (torch 2.13). The memos
       only speed up converting real tensors (none are converted here), so they are dropped
       before each swap.
    2. transformers' packed-sequence detection reads tensor values and, seeing fake tensors,
       assumes packing: it then materialises a (B, T, T) mask and SDPA takes its masked path. The
       synthetic batch is one unpadded sequence per row, for which a real run finds no packing
       (``None``) and calls SDPA with ``is_causal=True``; the patch returns that ``None``.
    3. SDPA takes the kernel a CUDA device would take (:func:`_cuda_sdpa`), on ``device_type``: the
       device that stands for CUDA (``meta``, or the fake CPU of an FSDP2 estimate).
    4. torch.optim's fused AdamW, which ``grass-llm train`` builds on CUDA, accepts that device.
    """
    if mode is None:
        yield
        return
    import torch.nn.functional as F
    import torch.optim.optimizer as torch_optimizer
    import torch.utils

    original_swap = torch.utils.swap_tensors
    original_fused = torch_optimizer._get_fused_kernels_supported_devices

    def swap(t1, t2):
        converter = mode.fake_tensor_converter.meta_converter
        converter.tensor_memo.clear()
        converter.describer.lookup_tensor.clear()
        return original_swap(t1, t2)

    masking_utils = None
    with contextlib.suppress(ImportError):
        from transformers import masking_utils
    original_find = getattr(masking_utils, "find_packed_sequence_indices", None)
    original_sdpa = F.scaled_dot_product_attention

    torch.utils.swap_tensors = swap
    F.scaled_dot_product_attention = _cuda_sdpa(original_sdpa, device_type)
    torch_optimizer._get_fused_kernels_supported_devices = lambda: [*original_fused(), "meta"]
    if original_find is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.utils.swap_tensors = original_swap
        F.scaled_dot_product_attention = original_sdpa
        torch_optimizer._get_fused_kernels_supported_devices = original_fused
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
# the steps, exactly as grass-llm train runs them
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
    activation_checkpointing: str = "none"
    chunked_loss: bool = True
    optimizer_impl: str = "auto"
    num_layers: int = 0
    total_params: int = 0
    trainable_params: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    workspaces: int = 0  # cuBLAS / cuBLASLt workspaces (CUDA: one per thread that runs matmuls)
    peak: int = 0
    fake: bool = True
    measured_peak: int | None = None  # torch.cuda.max_memory_allocated, when measured
    world_size: int = 1  # > 1: one rank of an FSDP2 run
    phase: str = "train"  # train, probe, or run (the whole run: whole_run())
    settings: dict[str, Any] = field(default_factory=dict)  # the TrainConfig keys given (overrides)
    #: the GPU the estimate stands for (sizes the cuBLAS workspaces): hopper, other, or None (a CPU)
    gpu: str | None = "hopper"
    #: a training step with offload=off and on_reactivation=keep: the device bytes of the AdamW states of the
    #: trainable layers this step does not train, which a run keeps once it has trained them (whole_run adds
    #: them); 0 where the states live in host memory
    other_layers_states: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short label of the method and what the peak is of: ``GRASS γ=2``, ``GRASS γ=2, probing``,
        ``GRASS γ=2, whole run``, ``LoRA r=128``, ``FFT``."""
        return self.method_label + {"train": "", "probe": ", probing", "run": ", whole run"}[self.phase]

    @property
    def method_label(self) -> str:
        """Short method label: ``GRASS γ=2``, ``LoRA r=128``, ``FFT`` (with FSDP2, the world size)."""
        names = {"grass": "GRASS", "grass-static": "GRASS*", "lisa": "LISA", "badam": "BAdam"}
        if self.method in names:
            label = f"{names[self.method]} γ={self.active_layers}"
        elif self.method in ("lora", "dora"):
            label = f"{'LoRA' if self.method == 'lora' else 'DoRA'} r={self.rank}"
        else:
            label = self.method.upper()
        if self.world_size > 1:
            label += f", FSDP2 x{self.world_size} (per rank)"
        return label

    @property
    def step(self) -> str:
        """What the peak is of: ``training step``, ``probing step``, or ``whole run``."""
        return _STEP_LABELS[self.phase]

    def breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak (they sum to ``peak``)."""
        return {c: getattr(self, c) for c in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        d["method_label"] = self.method_label
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


def _train_config(model_name: str, method: str, settings: dict[str, Any]):
    """The ``TrainConfig`` ``grass-llm train`` would run (``TrainConfigError`` -> ``MemoryEstimateError``)."""
    import warnings

    from grass_llm.recipes.train_config import TrainConfig, TrainConfigError, _nest

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a method overriding a key given to all methods
            return TrainConfig.from_dict(_nest({"model": model_name, **settings, "method": method}))
    except TrainConfigError as e:
        raise MemoryEstimateError(str(e)) from None


class TrainingStep:
    """One method built as ``grass-llm train`` builds it, on ``device``, and its training step.

    ``run(B, T)`` is one optimizer step of ``FinetuneRecipe.train_step`` on a batch of B unpadded random
    rows of T tokens. Built by :func:`training_step` on a real device, or by :func:`estimate_memory` on
    fake tensors. ``model`` and ``opt`` are what ``build_method`` returned. ``active``: the decoder layers a
    layer-wise method trains, forced with ``GrassOptimizer.activate`` from its first training step on (after
    probing, when it probes); ``None`` keeps the method's own draws.
    """

    def __init__(
        self, config, cfg, device: torch.device, fake_mode, active: list[int] | None, impl: str, mesh=None
    ):
        from grass_llm.activation_checkpointing import apply_activation_checkpointing
        from grass_llm.loss import chunked_loss_for
        from grass_llm.recipes.methods import build_method, get_method

        self.cfg, self.device = cfg, device
        self.method = get_method(cfg.method)
        fake = fake_mode if fake_mode is not None else contextlib.nullcontext()
        with fake:
            model = _build_model(config, _DTYPES[cfg.dtype], device)
            apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.grass.layers)
        shard = None
        if mesh is not None:  # FSDP2 on ``mesh``, as grass-llm train shards with distributed.strategy=fsdp2
            from grass_llm.distributed.fsdp2 import apply_fsdp2

            def shard(m):
                return apply_fsdp2(m, cfg.grass.layers, mesh)

        # GrassOptimizer draws its layers with real host-side tensors (sampler RNG): built outside the
        # fake mode, it steps the fake model inside it. peft's adapters must be fake: built inside.
        if self.method.layer_wise:
            if shard is not None:
                with fake:
                    model = shard(model)
            self.model, self.opt = build_method(model, cfg)
        else:
            with fake:
                self.model, self.opt = build_method(model, cfg, shard=shard)
        off = getattr(self.opt, "offloader", None)
        if mesh is not None and off is not None:
            off.host_device = torch.device("meta")  # host buffers out of the count (the model is on fake CPU)
        with fake:
            self.loss_fn = chunked_loss_for(self.model) if cfg.chunked_loss else None
        self.active = list(active) if active is not None and self.method.layer_wise else None
        if self.active is not None and not self.opt.probing:
            self.opt.activate(self.active)
        if fake_mode is not None and off is not None:
            # The states kept on the device (residency per period) were made outside the fake mode, as real
            # meta tensors, which the fake mode would convert into new storages at their first use and the
            # tracker count twice. Made again inside it: written back, and copied in at their acquire (R4).
            with fake:
                off.free_device_buffers()
                for uid in off.kept_units():
                    off.acquire(uid)
                    off.release(uid)
        # the AdamW implementation: what grass-llm train gets on the device the run stands for (CUDA for
        # fake runs: fused for torch.optim, foreach pieces for GrassOptimizer; a real CPU: neither)
        cuda = device.type != "cpu" or mesh is not None
        if impl == "auto":
            impl = ("foreach" if self.method.layer_wise else "fused") if cuda else "for-loop"
        for group in self.opt.param_groups:
            fused = impl == "fused" and not self.method.layer_wise
            group["fused"] = True if fused else None
            group["foreach"] = impl == "foreach" or (impl == "fused" and self.method.layer_wise)
        self.vocab = int(getattr(config, "vocab_size", 32000))

    def run(self, batch_size: int, seq_len: int, tracker: LiveBytesTracker | None = None) -> None:
        """One optimizer step of ``FinetuneRecipe.train_step``: ``grad_accum`` micro-batches of unpadded rows."""
        from grass_llm.loss import causal_lm_loss

        cfg, dev = self.cfg, self.device

        def section(name: str):
            return tracker.section(name) if tracker is not None else contextlib.nullcontext()

        accum = max(int(getattr(cfg, "grad_accum", 1)), 1)
        for i in range(accum):  # grad_accum micro-batches, all but the last under no_sync() as the recipe runs them
            final = i + 1 == accum
            sync = contextlib.nullcontext() if final or not hasattr(self.opt, "no_sync") else self.opt.no_sync()
            with section("forward"):
                ids = torch.randint(0, self.vocab, (batch_size, seq_len), device=dev)  # (B, T)
                n_items = torch.tensor(max(accum * batch_size * (seq_len - 1), 1), device=dev)
                batch = {"input_ids": ids, "labels": ids}
                with sync:
                    loss = causal_lm_loss(self.model, batch, self.loss_fn, n_items, cfg.compact_activations)
            backward_of = tracker.backward_of(loss) if tracker is not None else contextlib.nullcontext()
            with section("backward"), backward_of, sync:
                loss.backward()
            del loss, ids
        if not self.method.layer_wise and cfg.max_grad_norm is not None:
            with section("clip"):
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm
                )
        was_probing = self.method.layer_wise and self.opt.probing
        with section("optimizer"):
            self.opt.step()
            if was_probing and not self.opt.probing and self.active is not None:
                self.opt.activate(self.active)  # probing is over: the layers asked for train from now on
        with section("zero_grad"):
            self.opt.zero_grad(set_to_none=True)
        if tracker is not None:  # what outlives the step is optimizer state (the rest: temporaries)
            tracker.retag(self.state_tensors(), "optimizer_states")

    def state_tensors(self) -> list[torch.Tensor]:
        """The optimizer's device-resident state: torch.optim's ``state`` and the offloader's slots."""
        out = [t for st in self.opt.state.values() for t in st.values() if torch.is_tensor(t)]
        off = getattr(self.opt, "offloader", None)
        return out + (off.device_buffers() if off is not None else [])


def estimate_memory(
    model: Any,
    method: str = "grass",
    *,
    active_layers: int | None = None,
    active_layer_ids: Sequence[int] | None = None,
    rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    activation_checkpointing: str = "none",
    chunked_loss: bool = True,
    optimizer_impl: str = "auto",
    overrides: dict[str, Any] | None = None,
    steps: int = 2,
    fake: bool = True,
    round_to: int = ALLOCATOR_ROUND,
    world_size: int = 1,
    phase: str = "train",
    peak_detail: bool = False,
    gpu: str | None = "hopper",
) -> MemoryEstimate:
    """Estimate the peak device memory of a training step of ``model`` with ``method``.

    Args:
        model: a ``PretrainedConfig``, a config.json path or directory, or a cached hub name.
        method: a ``grass-llm train`` method (:func:`methods`).
        active_layers: gamma (``grass.active_layers``) of the layer-wise methods; default the method's
            (2 for grass and lisa, 1 for badam).
        active_layer_ids: the active decoder layers; default ``0 .. gamma-1``, the worst case
            (activations are saved from the lowest active layer upward).
        rank: LoRA / DoRA rank r (``lora.rank``; ``lora.alpha`` = 2r).
        batch_size, seq_len: the batch of one step (B, T).
        dtype: weight dtype, ``bf16`` (the paper's pure-bf16 setting) or ``fp32``.
        activation_checkpointing: ``none``, ``full`` or ``frozen`` (``grass-llm train``'s key).
        chunked_loss: the chunked cross-entropy of ``grass-llm train`` (its default) or the model's own.
        optimizer_impl: torch.optim's AdamW implementation, one of :data:`OPTIMIZER_IMPLS`.
        overrides: more ``grass-llm train`` keys, dotted (``{"grass.offload": False, "lora.dtype": "fp32"}``).
        steps: training steps run (>= 2: the first step creates the optimizer states).
        fake: fake tensors on ``meta`` standing for a CUDA device (no memory, any size); ``False`` runs
            real CPU tensors (small models only; used to validate the fake run; no cuBLAS workspaces).
        round_to: storages are rounded up to this many bytes (CUDA caching allocator: 512).
        world_size: > 1: the peak of one of ``world_size`` ranks running FSDP2
            (``distributed.strategy: fsdp2``: every decoder block and the root ``fully_shard``-ed, GRASS on
            ``FSDP2Backend``, offload on as on CUDA), with a fake process group; the model is on fake
            CPU tensors (FSDP2 refuses meta ones) and the offloader's host buffers on meta, out of the count.
        phase: ``train`` (a training step), ``probe`` (a probing step of the methods that probe:
            backward through every layer, each gradient freed as soon as its norm is read), or ``run``
            (the whole run's peak, :func:`whole_run` of the two; the training step alone for methods that
            do not probe).
        peak_detail: also list every storage live at the peak, labelled with what made it
            (``extra["peak_storages"]``: ``LiveBytesTracker.peak_storages`` with ``origins=True``; slower).
        gpu: the GPU the fake run stands for, which sizes PyTorch's cuBLAS workspaces (one per thread
            running matmuls: forward, and autograd's backward thread): ``hopper`` (H100 / H200, the default:
            32 MiB each), ``other`` (any other NVIDIA GPU: 8 MiB + 128 KiB each), or ``None`` (none counted);
            ``CUBLAS_WORKSPACE_CONFIG``, when set, sizes them as it does for PyTorch. Ignored with
            ``fake=False`` (a CPU has none).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_choice("method", method, methods())
    _check_choice("dtype", dtype, tuple(_DTYPES))
    _check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 2)
    _check_int("steps", steps, 1)
    _check_int("world_size", world_size, 1)
    _check_choice("phase", phase, PHASES)
    if gpu is not None:
        _check_choice("gpu", gpu, GPUS)
    if world_size > 1 and not fake:
        raise MemoryEstimateError(
            "world_size > 1 needs fake=True (a fake process group stands for the ranks)"
        )
    if phase == "run":
        kw = dict(
            active_layers=active_layers,
            active_layer_ids=active_layer_ids,
            rank=rank,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=dtype,
            activation_checkpointing=activation_checkpointing,
            chunked_loss=chunked_loss,
            optimizer_impl=optimizer_impl,
            overrides=overrides,
            steps=steps,
            fake=fake,
            round_to=round_to,
            world_size=world_size,
            peak_detail=peak_detail,
            gpu=gpu,
        )
        train = estimate_memory(model, method, phase="train", **kw)
        probe = estimate_memory(model, method, phase="probe", **kw) if _probes_cfg(train) else None
        return whole_run(train, probe)
    from grass_llm.recipes.methods import get_method

    layer_wise = get_method(method).layer_wise
    if layer_wise and active_layers is not None:
        _check_int("active_layers", active_layers, 1)
    if method in ("lora", "dora"):
        _check_int("rank", rank, 1)
    config = load_config(model)
    settings = _settings(
        method,
        active_layers,
        rank,
        batch_size,
        seq_len,
        dtype,
        activation_checkpointing,
        chunked_loss,
        overrides,
    )
    if layer_wise and phase == "probe":
        settings["grass.probe_steps"] = steps + 1  # every step of the estimate probes
    if world_size > 1:
        settings.setdefault("grass.offload", "period")  # what auto gives on CUDA
    name = _config_name(config) if not isinstance(model, (str, Path)) else str(model)
    cfg = _train_config(name, method, settings)
    _check_probes(cfg, method, phase)
    num_layers = getattr(config, "num_hidden_layers", None)
    active_layers = cfg.grass.active_layers if layer_wise else None
    active_layer_ids = _active_ids(active_layer_ids, active_layers, num_layers) if layer_wise else None
    gpu = gpu if fake else None

    device = torch.device("meta" if fake and world_size == 1 else "cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    with _fake_mode_patches(mode, device.type), _fake_process_group(world_size) as mesh:
        step = TrainingStep(config, cfg, device, mode, active_layer_ids, optimizer_impl, mesh)
        net = step.model
        tracker = LiveBytesTracker(
            round_to=round_to,
            device=device,
            origins=peak_detail,
            cublas_workspace=cublas_workspace_bytes(gpu) if gpu else 0,
            cublaslt_workspace=cublaslt_workspace_bytes(gpu) if gpu else 0,
        )
        named = [*net.named_parameters(), *net.named_buffers()]
        tracker.track([_local(t) for _, t in named], "weights", names=[n for n, _ in named])
        # states already on the device before the first step (residency per period: the active layers')
        tracker.track(step.state_tensors(), "optimizer_states")

        tag_gradients(net, tracker)
        labels = tracker.label_modules(net) if peak_detail else contextlib.nullcontext()
        with mode or contextlib.nullcontext(), labels, tracker:
            for _ in range(steps):
                step.run(batch_size, seq_len, tracker)
        breakdown = tracker.peak_breakdown()
        total = sum(p.numel() for p in net.parameters())
        trainable = (
            sum(p.numel() for p in step.opt.trainable_parameters())
            if layer_wise
            else sum(p.numel() for g in step.opt.param_groups for p in g["params"])
        )
        extra = _extras(step)
        extra["workspaces"] = [f"{lib} ({thread} thread)" for lib, thread in tracker.workspaces]
        if peak_detail:
            extra["peak_storages"] = tracker.peak_storages()
        others = _other_layers_states(step, device, round_to) if phase == "train" else 0

    return MemoryEstimate(
        model=name,
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        active_layers=active_layers if layer_wise else None,
        active_layer_ids=active_layer_ids,
        rank=rank if method in ("lora", "dora") else None,
        activation_checkpointing=activation_checkpointing,
        chunked_loss=chunked_loss,
        optimizer_impl=optimizer_impl,
        num_layers=int(num_layers or 0),
        total_params=total,
        trainable_params=trainable,
        peak=tracker.peak,
        fake=fake,
        world_size=world_size,
        phase=phase,
        settings=dict(overrides or {}),
        gpu=gpu,
        other_layers_states=others,
        extra=extra,
        **breakdown,
    )


def _probes_cfg(est: MemoryEstimate) -> bool:
    """Whether the method of ``est`` probes with its settings."""
    from grass_llm.recipes.methods import get_method

    return get_method(est.method).layer_wise and _probes(est.method, est.settings)


def whole_run(train: MemoryEstimate, probe: MemoryEstimate | None = None) -> MemoryEstimate:
    """The whole run's peak from its training step's estimate and, for a method that probes, its probing
    step's: the larger of the two. A training step with ``other_layers_states`` (``offload=off``, whose run
    keeps the AdamW states of every layer it has trained on the device) counts them in its optimizer
    states: the whole run is the worst layers training with every other trainable layer's states held.
    The breakdown is that of the step that sets the peak (``extra["whole_run_from"]``); ``extra["steps"]``
    holds both steps' own peaks (``extra["other_layers_states_added"]``: the bytes added to the training step's)."""
    if train.phase != "train" or (probe is not None and probe.phase != "probe"):
        raise MemoryEstimateError("whole_run takes a training step's estimate and a probing step's (or None)")
    trained = dataclasses.replace(
        train,
        optimizer_states=train.optimizer_states + train.other_layers_states,
        peak=train.peak + train.other_layers_states,
        extra=dict(train.extra),
    )
    top = probe if probe is not None and probe.peak > trained.peak else trained
    steps = {"train": train.peak} | ({"probe": probe.peak} if probe is not None else {})
    run = dataclasses.replace(top, phase="run", measured_peak=None, extra=dict(top.extra))
    run.extra.update(whole_run_from=top.phase, steps=steps)
    if top is trained and train.other_layers_states:
        run.extra["other_layers_states_added"] = train.other_layers_states
        run.extra.pop("peak_storages", None)  # (those of the training step alone)
    return run


def _other_layers_states(step: TrainingStep, device: torch.device, round_to: int) -> int:
    """Device bytes of the AdamW states of the trainable decoder layers ``step`` does not train, with
    ``offload=off`` and ``on_reactivation=keep`` (torch.optim's ``state``, kept once made): each parameter's
    state tensors as those of a trained parameter of its dtype. 0 for any other setting."""
    opt = step.opt
    if not step.method.layer_wise or opt.residency != "off" or opt.config.on_reactivation != "keep":
        return 0

    def rounded(nbytes: int) -> int:
        return -(-nbytes // round_to) * round_to

    layouts: dict[torch.dtype, list[tuple[int, bool, int]]] = {}  # dtype -> (elem size, param-shaped, bytes)
    for p in opt.trainable_parameters():
        st = opt.state.get(p, {})
        states = [t for k, t in st.items() if k != "step" and torch.is_tensor(t) and t.device.type == device.type]
        if states:
            n = _local(p).numel()
            layouts.setdefault(p.dtype, [(t.element_size(), t.numel() == n, t.nbytes) for t in states])
    if not layouts:
        return 0
    active = set(opt.active_layers)
    total = 0
    for group in opt.param_groups:
        if group.get("layer") is None or group["layer"] in active:
            continue
        for p in opt.units.trainable_of(group["params"]):
            n = _local(p).numel()
            layout = layouts.get(p.dtype) or next(iter(layouts.values()))
            total += sum(rounded(n * size) if shaped else rounded(nbytes) for size, shaped, nbytes in layout)
    return total


def tag_gradients(model: torch.nn.Module, tracker: LiveBytesTracker) -> list:
    """Count each parameter's accumulated gradient as ``gradients`` in ``tracker`` (a hook on every
    parameter: GrassOptimizer switches ``requires_grad`` itself). Returns the hook handles."""

    def retag_grad(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.retag(_local(p.grad), "gradients")

    handles = []
    for p in model.parameters():
        was = p.requires_grad
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(retag_grad))
        p.requires_grad_(was)
    return handles


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 ``DTensor``; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def _fake_process_group(world_size: int):
    """``world_size > 1``: a fake process group of that many ranks (collectives are no-ops, as in
    torchtitan's estimator) and its 1-D CPU mesh, yielded; else ``None``."""
    if world_size == 1:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise MemoryEstimateError("world_size > 1 needs no process group initialised (it makes a fake one)")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


#: ``grass.probe_steps`` of a real run that measures probing steps: every step it runs probes
_PROBE_FOREVER = 2**31 - 1


def _check_probes(cfg, method: str, phase: str) -> None:
    """``phase="probe"`` needs a method that probes with these settings (LISA's fixed settings do not)."""
    if phase == "probe" and not (cfg.layer_wise and cfg.grass.probe_steps > 0):
        raise MemoryEstimateError(f"method={method} does not probe; allowed: phase=train")


def _active_ids(ids: Sequence[int] | None, gamma: int, num_layers: int | None) -> list[int]:
    """The active layers: ``ids``, by default ``0 .. gamma-1`` (the worst case), checked."""
    ids = sorted({int(i) for i in (range(gamma) if ids is None else ids)})
    if len(ids) != gamma:
        raise MemoryEstimateError(
            f"active_layer_ids={ids!r} has {len(ids)} distinct layers; allowed: exactly active_layers={gamma}"
        )
    if num_layers is not None and (ids[0] < 0 or ids[-1] >= num_layers):
        raise MemoryEstimateError(f"active_layer_ids={ids!r} is invalid; allowed: layers 0..{num_layers - 1}")
    return ids


def _settings(method, active_layers, rank, batch_size, seq_len, dtype, checkpointing, chunked, overrides):
    from grass_llm.recipes.methods import get_method

    settings: dict[str, Any] = {
        "dtype": dtype,
        "batch_size": batch_size,
        "max_length": max(seq_len, 8),
        "activation_checkpointing": checkpointing,
        "chunked_loss": chunked,
    }
    if get_method(method).layer_wise:
        # the training phase (probing runs no update); the method's defining settings still win
        settings["grass.probe_steps"] = 0
        if active_layers is not None:
            settings["grass.active_layers"] = active_layers
    if method in ("lora", "dora"):
        settings.update({"lora.rank": rank, "lora.alpha": 2 * rank})
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise MemoryEstimateError(f"overrides key {key!r} is invalid; allowed: grass-llm train keys")
        settings[key] = value
    if get_method(method).layer_wise:
        # no resample inside the estimate's few steps: its draw reads MGN values, which fake tensors do not hold
        # (the memory of a step does not depend on the period; the estimate forces its active layers anyway)
        settings["grass.period"] = max(int(settings.get("grass.period", 25)), 1000)
    return settings


def _extras(step: TrainingStep) -> dict[str, Any]:
    """What the estimate ran with: the offload and precision settings, host memory of the offloaded states."""
    opt = step.opt
    out: dict[str, Any] = {"optimizer": type(opt).__name__}
    off = getattr(opt, "offloader", None)
    if step.method.layer_wise:
        out.update(offload=off is not None, precision=opt.precision)
    if off is not None:
        out.update(
            offload_chunk_bytes=off.chunk_bytes,
            host_bytes_all_units=sum(off.unit_nbytes(u) for u in off.units()),
        )
    return out


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

_UNITS = {"GiB": 2**30, "GB": 1e9}


def format_table(
    estimates: Sequence[MemoryEstimate],
    paper: dict[str, float] | None = None,
    unit: str = "GiB",
) -> str:
    """A Markdown table of ``estimates``: per row the model, the method, what the peak is of (the whole run,
    a training step or a probing step), the breakdown of the peak and the peak in ``unit`` (``GiB`` or
    ``GB``). Whole-run peaks are bold when the table has any; else every peak is.

    ``paper`` maps a method label (``MemoryEstimate.method_label``) to a reference figure shown beside the
    estimate.
    """
    _check_choice("unit", unit, tuple(_UNITS))
    scale = _UNITS[unit]
    cols = ["model", "method", "peak of", "B", "T", *(_CATEGORY_LABELS[c] for c in CATEGORIES), f"peak ({unit})"]
    if paper is not None:
        cols.append("paper")
    measured = any(e.measured_peak is not None for e in estimates)
    if measured:
        cols.append(f"measured max_memory_allocated ({unit})")
    bold_runs = any(e.phase == "run" for e in estimates)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for e in estimates:
        bold = e.phase == "run" or not bold_runs
        row = [
            e.model,
            e.method_label + {"none": "", "full": " +AC", "frozen": " +AC frozen"}[e.activation_checkpointing],
            _peak_of(e),
            str(e.batch_size),
            str(e.seq_len),
        ]
        row += [f"{getattr(e, c) / scale:.2f}" for c in CATEGORIES]
        row.append(f"**{e.peak / scale:.2f}**" if bold else f"{e.peak / scale:.2f}")
        if paper is not None:
            ref = paper.get(e.method_label)
            row.append("" if ref is None else f"{ref:.2f}")
        if measured:
            row.append("" if e.measured_peak is None else f"{e.measured_peak / scale:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _peak_of(e: MemoryEstimate) -> str:
    """The ``peak of`` cell: the step, or for a whole run the step that sets it."""
    if e.phase != "run":
        return e.step
    source = e.extra.get("whole_run_from", "train")
    if source == "train" and e.extra.get("other_layers_states_added"):
        return "whole run: training step + every layer's states (offload=off)"
    return f"whole run: {_STEP_LABELS[source]}"


# ---------------------------------------------------------------------------------------------
# real devices
# ---------------------------------------------------------------------------------------------


def training_step(
    model: Any,
    method: str = "grass",
    *,
    device: torch.device | str = "cuda",
    active_layers: int | None = None,
    active_layer_ids: Sequence[int] | None = None,
    rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    activation_checkpointing: str = "none",
    chunked_loss: bool = True,
    optimizer_impl: str = "auto",
    overrides: dict[str, Any] | None = None,
    phase: str = "train",
    force_layers: bool = True,
) -> TrainingStep:
    """A randomly initialised ``model`` (a config) with ``method`` on a real ``device``, built from the same
    ``TrainConfig`` as :func:`estimate_memory` (same arguments); for measurements and timings
    (``benchmarks/gpu_check.py``). ``batch_size`` / ``seq_len`` only size ``max_length``: pass them to
    ``run`` too. ``phase="probe"``: every ``run`` is a probing step (methods that probe only);
    ``phase="run"``: a run of a layer-wise method as ``grass-llm train`` runs it, probing first
    (``grass.probe_steps`` of ``overrides``, else :data:`RUN_PROBE_STEPS` steps), then training.
    ``force_layers`` (default): the training steps train ``active_layer_ids`` (default the worst case,
    ``0 .. gamma-1``); ``False``: the layers the method draws, as in a real run."""
    _check_choice("method", method, methods())
    _check_choice("dtype", dtype, tuple(_DTYPES))
    _check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    _check_choice("phase", phase, PHASES)
    config = load_config(model)
    from grass_llm.recipes.methods import get_method

    layer_wise = get_method(method).layer_wise
    settings = _settings(
        method,
        active_layers,
        rank,
        batch_size,
        seq_len,
        dtype,
        activation_checkpointing,
        chunked_loss,
        overrides,
    )
    if layer_wise and phase == "probe":
        settings["grass.probe_steps"] = _PROBE_FOREVER
    if layer_wise and phase == "run" and "grass.probe_steps" not in (overrides or {}):
        settings["grass.probe_steps"] = RUN_PROBE_STEPS  # (a method that never probes keeps its 0)
    cfg = _train_config(_config_name(config), method, settings)
    _check_probes(cfg, method, phase)
    num_layers = getattr(config, "num_hidden_layers", None)
    active = _active_ids(active_layer_ids, cfg.grass.active_layers, num_layers) if layer_wise else None
    return TrainingStep(config, cfg, torch.device(device), None, active if force_layers else None, optimizer_impl)


# ---------------------------------------------------------------------------------------------
# real measurement on a CUDA device
# ---------------------------------------------------------------------------------------------


def cuda_gpu(device: torch.device | str | int | None = None) -> str:
    """The ``gpu`` of :func:`estimate_memory` that stands for a CUDA ``device``: ``hopper`` for compute
    capability 9.0 (the GPUs on which PyTorch's cuBLAS workspaces are 32 MiB), else ``other``."""
    return "hopper" if torch.cuda.get_device_capability(device) == (9, 0) else "other"


def measure_cuda_step(
    model: Any,
    method: str = "grass",
    *,
    active_layers: int | None = None,
    active_layer_ids: Sequence[int] | None = None,
    rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: str = "bf16",
    activation_checkpointing: str = "none",
    chunked_loss: bool = True,
    optimizer_impl: str = "auto",
    overrides: dict[str, Any] | None = None,
    steps: int = 2,
    device: str = "cuda",
    phase: str = "train",
) -> int:
    """Run the same training steps on a real CUDA device; return ``torch.cuda.max_memory_allocated``.

    The model is randomly initialised from its config (no weights are downloaded) and the method built
    with the same ``TrainConfig`` as :func:`estimate_memory`; ``phase="probe"`` measures probing steps;
    ``phase="run"`` a whole run in one: :data:`RUN_PROBE_STEPS` probing steps (a method that probes), then
    ``steps`` training steps with the worst layers, the peak over all of them. (With ``offload=off`` a real
    run also accumulates the states of the layers it trains later, which a few steps cannot show:
    :func:`whole_run` adds them to the estimate.) Garbage is collected before and after, so measurements
    in one process do not count each other's memory (the first one in a process also allocates the
    cuBLAS workspaces, which stay and are counted, as the estimate counts them). Raises
    :class:`MemoryEstimateError` without CUDA.
    """
    if not torch.cuda.is_available():
        raise MemoryEstimateError("measure_cuda_step needs a CUDA device; torch.cuda.is_available() is False")
    _check_choice("method", method, methods())
    _check_choice("dtype", dtype, tuple(_DTYPES))
    _check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    dev = torch.device(device)
    # what earlier work left to the garbage collector (reference cycles: a model with frozen-block checkpointing,
    # the chunked loss's hook on the head) is freed first, or it would count in this measurement
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    step = training_step(
        model,
        method,
        device=dev,
        active_layers=active_layers,
        active_layer_ids=active_layer_ids,
        rank=rank,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        activation_checkpointing=activation_checkpointing,
        chunked_loss=chunked_loss,
        optimizer_impl=optimizer_impl,
        overrides=overrides,
        phase=phase,
    )
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probing = step.cfg.grass.probe_steps if step.method.layer_wise and phase == "run" else 0
    for _ in range(probing + steps):
        step.run(batch_size, seq_len)
    torch.cuda.synchronize(dev)
    peak = int(torch.cuda.max_memory_allocated(dev))
    del step
    gc.collect()  # (the cycles above: freed now, not at the garbage collector's next pass)
    torch.cuda.empty_cache()
    return peak


# ---------------------------------------------------------------------------------------------
# command line: ``grass-llm memory``
# ---------------------------------------------------------------------------------------------


def _methods(values: Sequence[str]) -> list[str]:
    known = methods()
    out: list[str] = []
    for v in values:
        for m in v.split(","):
            m = m.strip().lower()
            if not m:
                continue
            if m not in known:
                raise MemoryEstimateError(f"--method {m!r} is invalid; allowed: {', '.join(known)}")
            if m not in out:
                out.append(m)
    return out or ["grass"]


def _probes(method: str, overrides: dict[str, Any]) -> bool:
    """Whether ``method`` with these settings has a probing phase (as ``grass-llm train`` resolves them)."""
    cfg = _train_config("model", method, dict(overrides))
    return cfg.layer_wise and cfg.grass.probe_steps > 0


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    from grass_llm.recipes.train_config import _parse_scalar

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MemoryEstimateError(
                f"setting {item!r} is invalid; allowed: key=value with a grass-llm train key (e.g. grass.offload=false)"
            )
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_scalar(value)
    return out


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``grass-llm memory`` to ``parser``."""
    from grass_llm.activation_checkpointing import MODES

    parser.description = (
        "Estimate the peak device memory of a training run without a GPU: the model is built from fake "
        "tensors and the method exactly as `grass-llm train` builds it on a CUDA device, and its real "
        "optimizer steps. The headline is each method's whole-run peak: for GRASS the larger of its probing "
        "and training steps (worst-case layers). Comparable with torch.cuda.max_memory_allocated: PyTorch's "
        "cuBLAS workspaces are counted for the GPU named by --gpu (default hopper: 2 x 32 MiB); the CUDA "
        "context is not. key=value settings are grass-llm train keys (grass.offload=off, lora.dtype=fp32, "
        "grass.fp32_master_weights=false ...)."
    )
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
        help=f"method(s) to estimate, repeatable or comma separated: {', '.join(methods())} (default grass)",
    )
    parser.add_argument(
        "--active-layers",
        type=int,
        default=None,
        help="gamma of the layer-wise methods (default: the method's, 2 for grass and lisa, 1 for badam)",
    )
    parser.add_argument("--rank", type=int, default=128, help="LoRA / DoRA rank r, alpha = 2r (default 128)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length T (default 1024)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16", help="weight dtype (default bf16)")
    parser.add_argument(
        "--activation-checkpointing",
        choices=MODES,
        default="none",
        help="none, full (every block) or frozen (only frozen blocks above the lowest trained one)",
    )
    parser.add_argument(
        "--optimizer-impl",
        choices=OPTIMIZER_IMPLS,
        default="auto",
        help="torch.optim AdamW implementation (default auto: what grass-llm train builds on CUDA, fused)",
    )
    parser.add_argument(
        "--unit", choices=tuple(_UNITS), default="GiB", help="unit of the table (default GiB)"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="estimate one rank of an N-rank FSDP2 run (distributed.strategy=fsdp2; default 1: one device)",
    )
    parser.add_argument(
        "--phase",
        choices=(*PHASES, "both"),
        default="both",
        help="run: the whole run's peak (a layer-wise method's probing or training step, whichever is larger; "
        "with grass.offload=off plus every layer's states, which such a run keeps); train: a training step; "
        "probe: a probing step (backward through every layer); both (default): the whole run first (bold), "
        "then the training and probing steps it comes from",
    )
    parser.add_argument(
        "--gpu",
        choices=GPUS,
        default=None,
        help="the GPU the estimate stands for, which sizes PyTorch's cuBLAS workspaces (one per thread that "
        "runs matmuls: forward and backward): hopper (H100/H200, sm90: 32 MiB each; the default, or with "
        "--measure the measured GPU's kind) or other (other NVIDIA GPUs: 8.1 MiB each); "
        "CUBLAS_WORKSPACE_CONFIG, when set, sizes them as it does for PyTorch",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the estimates as JSON here")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also run the step on the CUDA device and report torch.cuda.max_memory_allocated",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="grass-llm train settings")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm memory``: print a Markdown table, optionally write JSON. Returns the exit code."""
    try:
        chosen = _methods(args.method or [])
        overrides = _overrides(args.overrides or [])
        if args.measure and not torch.cuda.is_available():
            raise MemoryEstimateError("--measure needs a CUDA device; torch.cuda.is_available() is False")
        if args.measure and args.world_size > 1:
            raise MemoryEstimateError("--measure runs one device; allowed with --world-size 1")
        shown, rows = [], []
        for method in chosen:
            kwargs = dict(
                active_layers=args.active_layers,
                rank=args.rank,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                dtype=args.dtype,
                activation_checkpointing=args.activation_checkpointing,
                optimizer_impl=args.optimizer_impl,
                overrides=overrides,
            )
            a, b = _method_rows(args, method, kwargs, overrides)
            shown += a
            rows += b
        if not rows:
            raise MemoryEstimateError(
                f"--phase probe: none of the methods {', '.join(chosen)} probes with these settings"
            )
    except MemoryEstimateError as err:
        print(f"grass-llm memory: error: {err}", file=sys.stderr)
        return 2
    print(format_table(shown, unit=args.unit))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([e.to_dict() for e in rows], indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def _method_rows(args: argparse.Namespace, method: str, kwargs: dict[str, Any], overrides: dict[str, Any]):
    """(the rows the table shows, the rows the JSON holds) of one method. Only what is reported is computed
    (and measured): a whole run is composed from its steps' estimates, and measured as one run."""
    probes = _probes(method, overrides)
    gpu = args.gpu or (cuda_gpu() if args.measure else "hopper")
    wanted = {"both": ["train", "probe", "run"], "run": ["train", "probe", "run"]}.get(args.phase, [args.phase])
    steps: dict[str, MemoryEstimate] = {}
    for phase in ("train", "probe"):
        if phase in wanted and (phase == "train" or probes):
            steps[phase] = estimate_memory(
                args.model, method, world_size=args.world_size, phase=phase, gpu=gpu, **kwargs
            )
    run = whole_run(steps["train"], steps.get("probe")) if "run" in wanted else None
    if args.measure:
        for phase, est in steps.items():
            if args.phase != "run":
                est.measured_peak = measure_cuda_step(args.model, method, phase=phase, **kwargs)
        if run is not None:
            single = not probes and steps["train"].measured_peak is not None
            run.measured_peak = (
                steps["train"].measured_peak if single else measure_cuda_step(args.model, method, phase="run", **kwargs)
            )
    if args.phase == "run":
        return [run], [run]
    if args.phase != "both":
        return list(steps.values()), list(steps.values())
    rows = [run, *steps.values()]
    # a method with one kind of step and nothing added: its whole run is that step (one row in the table)
    shown = rows if probes or run.other_layers_states else [run]
    return shown, rows
