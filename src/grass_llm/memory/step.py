"""A method built as ``grass-llm train`` builds it, and its training step (:class:`TrainingStep`), on fake
tensors for an estimate or on a real device for a measurement (:func:`training_step`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from grass_llm._tensor import DTYPES
from grass_llm.memory.inputs import PROBE_FOREVER, RUN_PROBE_STEPS, StepInputs
from grass_llm.memory.model import build_model, config_name, load_config
from grass_llm.memory.tracker import LiveBytesTracker

__all__ = ["TrainingStep", "build_step", "training_step"]


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
            model = build_model(config, DTYPES[cfg.dtype], device)
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
    ``TrainConfig`` as :func:`~grass_llm.memory.estimate.estimate_memory` (same arguments,
    :class:`~grass_llm.memory.inputs.StepInputs`); for measurements and timings (``benchmarks/gpu_check.py``).
    ``batch_size`` / ``seq_len`` only size ``max_length``: pass them to ``run`` too. ``phase="probe"``: every
    ``run`` is a probing step (methods that probe only); ``phase="run"``: a run of a layer-wise method as
    ``grass-llm train`` runs it, probing first (``grass.probe_steps`` of ``overrides``, else
    :data:`~grass_llm.memory.inputs.RUN_PROBE_STEPS` steps), then training. ``force_layers`` (default): the
    training steps train ``active_layer_ids`` (default the worst case, ``0 .. gamma-1``); ``False``: the
    layers the method draws, as in a real run."""
    inputs = StepInputs(
        method,
        active_layers,
        active_layer_ids,
        rank,
        batch_size,
        seq_len,
        dtype,
        activation_checkpointing,
        chunked_loss,
        optimizer_impl,
        overrides,
        phase,
    )
    return build_step(model, inputs, device, force_layers)


def build_step(model: Any, inputs: StepInputs, device: torch.device | str, force_layers: bool = True) -> TrainingStep:
    """:func:`training_step` of checked ``inputs``."""
    config = load_config(model)
    probe_steps = None
    if inputs.phase == "probe":
        probe_steps = PROBE_FOREVER
    elif inputs.phase == "run" and "grass.probe_steps" not in (inputs.overrides or {}):
        probe_steps = RUN_PROBE_STEPS  # (a method that never probes keeps its 0)
    cfg = inputs.train_config(config_name(config), probe_steps)
    active = inputs.active_ids(cfg, getattr(config, "num_hidden_layers", None))
    return TrainingStep(
        config, cfg, torch.device(device), None, active if force_layers else None, inputs.optimizer_impl
    )
