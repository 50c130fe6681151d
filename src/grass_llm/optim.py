"""``GrassOptimizer``: AdamW that trains only the decoder layers GRASS samples, one state per layer.

Life of a run (one ``step()`` = one optimizer step, after all micro-batches of gradient accumulation):

1. Probing, ``probe_steps`` steps. Every decoder layer requires grad; the gradient-ready hooks read each
   gradient's norm and free it at once (no gradient memory on the device), and ``step()`` turns the
   squared norms into MGN observations and changes no weight (``_optim.probe``).
2. Training. Every ``period`` steps the sampler draws ``active_layers`` layers; only they (and the
   embeddings / norm / head groups switched on in the config) require grad and are stepped, so backward
   stops at the lowest active layer. The hooks read each trained gradient's squared norm before anything
   clips it; ``step()`` observes the MGN of the active layers (no host sync), clips if configured, and runs
   AdamW. At the end of a period the MGN of the trained layers is updated by EMA (eq. 4) and new layers are
   drawn (``_optim.selection``).

This class coordinates; the parts in ``grass_llm._optim`` compute (docs/architecture.md). A step reads:
resolve the loss scale -> the probe's readings -> skip, or apply (probing: observe; training: reduce,
clip, update through the state store) -> the selector's end of step (maybe a new active set) -> one reset.

Mixed precision: ``GrassOptimizer`` takes part in ``torch.amp.GradScaler``'s protocol for optimizers that
handle scaling themselves (``_step_supports_amp_scaling``); the MGN is read from unscaled gradients, and a
step with an overflow changes nothing (the scaler lowers its scale).

Skipped steps: a step whose gradients hold NaN/Inf, with an overflow, or with no backward pass since the
last step changes no weight, no MGN and no AdamW state; it is counted in ``skipped_steps``
(``last_step_skipped`` tells about the last one) and advances neither probing nor the sampling period.

The AdamW arithmetic is PyTorch's own functional AdamW, so with every layer active the result equals
``torch.optim.AdamW`` bit for bit (fp32 weights, or bf16 weights with ``update_rounding="nearest"`` and no
masters). bf16/fp16 weights do not lose updates below their resolution (``_optim.precision``). Weight decay
skips biases and normalisation weights unless ``decay_bias_and_norm=True``. ``param_groups`` has one group
per unit (each decoder layer, ``embeddings``, ``norm``, ``head``) so LR schedulers change the LR applied,
then the loss-scale probe. Where the AdamW states live is ``GrassConfig.offload`` (``_optim.state_store``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from grass_llm._optim import serialization
from grass_llm._optim.in_backward import InBackwardStepper
from grass_llm._optim.model_binding import ModelBinding, move_parameter_, weak_call
from grass_llm._optim.probe import GradientProbe, check_scaler, loss_scale_factor
from grass_llm._optim.selection import LayerSelector
from grass_llm._optim.state_store import StateStore
from grass_llm._optim.units import EXTRA_UNITS, UnitTable, no_weight_decay_ids
from grass_llm._tensor import all_finite
from grass_llm.config import GrassConfig
from grass_llm.distributed.base import DataParallelBackend, LocalBackend
from grass_llm.distributed.resolve import resolve_backend
from grass_llm.layers import LayerGroups, LayerSpec, discover_layers

__all__ = ["GrassOptimizer", "no_weight_decay_ids"]

_SCALE_UNIT = "loss_scale_probe"


def _weakly(obj: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(obj, *args)`` through a weak reference to ``obj``."""
    ref = weakref.ref(obj)
    return lambda *args: fn(ref(), *args)


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (lr >= 0):
        raise ValueError(f"lr={lr!r} is invalid; allowed: a float >= 0")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas={betas!r} is invalid; allowed: two floats in [0, 1)")
    if not (eps >= 0):
        raise ValueError(f"eps={eps!r} is invalid; allowed: a float >= 0")
    if not (weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r} is invalid; allowed: a float >= 0")


class GrassOptimizer(torch.optim.Optimizer):
    """AdamW over GRASS-sampled decoder layers.

    Args:
        model: the model to fine-tune. Its decoder blocks are found by introspection (see
            ``grass_llm.layers``) unless ``layers`` names them.
        config: a ``GrassConfig``; the paper's defaults when omitted.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (``torch.optim.AdamW`` semantics; weight decay
            is decoupled).
        layers: override for the decoder blocks: a dotted module path or ``model -> blocks`` (default:
            ``config.layers``, else introspection).
        foreach: passed to the functional AdamW (``None``: PyTorch's default for the device).
        distributed: the data-parallel backend (``grass_llm.distributed``): ``"auto"`` uses ``FSDP2Backend``
            for a model sharded with ``fully_shard``, the replicated backend when torch.distributed is
            initialised with more than one rank, else one process; ``None``/``False``: one process; or a
            ``DataParallelBackend``. Do not wrap the model in DDP yourself; a DDP wrapper put around it later
            (the HF Trainer under torchrun) is detected and its own gradient reduction switched off.
        decay_bias_and_norm: also apply weight decay to biases and normalisation weights (default: not, as
            the transformers Trainer does).

    The optimizer may be built before the model is moved to its device (the HF Trainer, ``accelerate`` and
    many loops do that): everything it keeps follows the parameters at the next forward, backward or step.
    """

    # GradScaler calls step() with ``grad_scale`` / ``found_inf`` set and lets the optimizer unscale
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        config: GrassConfig | None = None,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        layers: LayerSpec = None,
        foreach: bool | None = None,
        distributed: DataParallelBackend | bool | str | None = "auto",
        decay_bias_and_norm: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_hyper(lr, betas, eps, weight_decay)
        self.config = copy.deepcopy(config) if config is not None else GrassConfig()
        self.groups: LayerGroups = discover_layers(model, layers if layers is not None else self.config.layers)
        self.config.validate(num_layers=self.groups.num_layers)
        self.backend = resolve_backend(distributed, model)  # M1: attaches before the optimizer's hooks
        if self.config.step_in_backward and not isinstance(self.backend, LocalBackend):
            raise ValueError(
                "step_in_backward=True is not supported with data-parallel sync (the update would run "
                "before the gradient all-reduce); set step_in_backward=False or distributed=False"
            )
        self.model = model
        self.binding = ModelBinding(self, model, self.backend, self.groups.other)
        try:
            self._build(lr, betas, eps, weight_decay, foreach, decay_bias_and_norm)
        except BaseException:  # leave the model as it was
            self.binding.abandon()
            raise

    def _build(self, lr, betas, eps, weight_decay, foreach, decay_bias_and_norm) -> None:
        cfg = self.config
        self.units = UnitTable(self.groups, self.binding.user_frozen)
        device = self._device = self._params_device()
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
            foreach=foreach, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True,
        )  # fmt: skip
        #: GradScaler's view of the squared norms the hooks read (``_optim.probe``); never trained
        self.loss_scale_probe = torch.zeros(1, dtype=torch.float32, device=device)
        scale_group = {"params": [self.loss_scale_probe], "unit": _SCALE_UNIT, "layer": None}
        super().__init__([*self.units.param_groups(), scale_group], defaults)
        self.units.to(device)
        self.global_step = 0
        #: steps skipped (non-finite gradients, a GradScaler overflow, no backward pass)
        self.skipped_steps = 0
        #: whether the last step() was skipped
        self.last_step_skipped = False
        self._always = {name for name in EXTRA_UNITS if getattr(cfg, f"train_{name}")}
        if cfg.train_head and self.groups.tied_head:  # a tied head is the embeddings' tensor: train it there
            self._always.add("embeddings")
        self._warned: set[str] = set()
        self.selection = LayerSelector(
            cfg, [self.groups.numel(i) for i in range(self.num_layers)], device, self.backend.broadcast_layers
        )
        # the parts call back through weak references: no reference cycle, so `del opt` frees its states at once
        groups = _weakly(self, lambda o: o.param_groups)
        self.probe = GradientProbe(self.units, self.backend, self.loss_scale_probe, _weakly(self, lambda o: o.probing), self)
        no_decay = set() if decay_bias_and_norm else no_weight_decay_ids(self.model)
        trainable_units = [name for name, layer, _ in self.units.specs if layer is not None or name in self._always]
        self.store = StateStore(
            cfg, self.units, self.backend, groups, _weakly(self, lambda o: o.state), trainable_units, no_decay, device
        )
        self.in_backward = InBackwardStepper(
            self.units,
            groups,
            _weakly(self, lambda o: o._trained_groups()),
            _weakly(self, lambda o, group, following: o.store.update_unit(group, o.global_step, following)),
            _weakly(self, lambda o, rows: all_finite(o.probe.param_sumsq[rows])),
        )
        self.backend.attach(
            [self.units.trainable_of(g["params"]) for g in self._units], on_reduced=weak_call(self, "_on_reduced")
        )
        self.binding.install_hooks(self, self.units.trainable, self.groups.blocks)
        self._apply_active(self.selection.start(), reset_leaving=False)

    # ------------------------------------------------------------------------------------------
    # lifetime
    def close(self) -> None:
        """Remove every hook and restore the model's ``requires_grad`` flags; the optimizer is not stepped
        after this. Safe to call twice."""
        self.binding.close(self)

    @property
    def closed(self) -> bool:
        return self.binding.closed

    def __enter__(self) -> GrassOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a GrassOptimizer cannot be pickled or deep-copied (it holds hooks on its model and host buffers); "
            "save optimizer.state_dict() and load it into a new GrassOptimizer built on the model"
        )

    # ------------------------------------------------------------------------------------------
    # public read-only views
    @property
    def _units(self) -> list[dict[str, Any]]:
        """The units' param groups, in order (unit j is param group j); the last group, the loss-scale
        probe, is not one. (A property: load_state_dict replaces the group dicts.)"""
        return self.param_groups[:-1]

    @property
    def active_layers(self) -> list[int]:
        """Decoder layers training now (``[]`` while probing)."""
        return list(self.selection.active)

    @property
    def importance(self) -> torch.Tensor:
        """Current MGN per decoder layer (1-D, float64, on the host; reading it syncs the device)."""
        return self.selection.tracker.current()

    @property
    def probabilities(self) -> torch.Tensor:
        """Current sampling probabilities per decoder layer (1-D, float64)."""
        return self.selection.sampler.probabilities.clone()

    # the selector's state, as attributes of the optimizer
    importance_tracker = property(lambda self: self.selection.tracker)
    sampler = property(lambda self: self.selection.sampler)
    probing = property(lambda self: self.selection.probing, doc="Whether the next step() is a probing step.")
    probe_done = property(lambda self: self.selection.probe_done, doc="Probing steps completed.")
    period_pos = property(lambda self: self.selection.period_pos, doc="Steps completed in the current period.")

    @property
    def num_layers(self) -> int:
        return self.groups.num_layers

    @property
    def precision(self) -> str:
        """How updates reach bf16/fp16 weights: ``master``, ``kahan``, ``stochastic`` or ``nearest`` (also for
        fp32 weights, which are updated exactly)."""
        return self.store.precision.name

    @property
    def residency(self) -> str:
        """Where the AdamW states live: ``off`` (on the device), ``step`` or ``period`` (``GrassConfig.offload``)."""
        return self.store.residency

    @property
    def offloader(self):
        """The ``LayerStateOffloader`` holding every layer's state in host memory, or None."""
        return self.store.offloader

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters stepped now: active layers plus the always-trained groups."""
        return [p for g in self._trained_groups() for p in self.units.trainable_of(g["params"])]

    def activate(self, layers: Iterable[int]) -> None:
        """Train ``layers`` (decoder layer indices) from now until the next draw, instead of the drawn ones.

        For experiments and for ``grass-llm memory``, which activates the lowest layers (the worst case for
        activation memory). Raises during probing."""
        self._apply_active(self.selection.force(layers))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Context for the backward passes of all micro-batches but the last of a step: no gradient
        all-reduce across ranks, no update from the backward hooks with ``step_in_backward``, and during
        probing the gradient goes to the accumulation buffer (``_optim.probe``)."""
        previous = self.probe.accumulating
        self.probe.accumulating = True
        try:
            with self.backend.no_sync():
                yield
        finally:
            self.probe.accumulating = previous

    # ------------------------------------------------------------------------------------------
    # the active set, the device
    def _trained_groups(self) -> list[dict[str, Any]]:
        if self.probing:
            return []
        active = set(self.selection.active)
        return [g for g in self._units if (g["layer"] in active if g["layer"] is not None else g["unit"] in self._always)]

    def _apply_active(self, layers: list[int], reset_leaving: bool = True) -> None:
        """Train ``layers`` from now on ([] while probing: every block requires grad, nothing is trained)."""
        leaving = [f"layer.{i}" for i in set(self.selection.active) - set(layers)] if reset_leaving else []
        self.selection.active = sorted(layers)
        trained = self._trained_groups()
        self.store.activate([g["unit"] for g in trained], leaving)
        self.binding.recompute_blocks(self, self.groups.blocks, self.probing and self.config.probe_checkpointing)
        if self.probing:
            self.binding.set_requires_grad(self._units, lambda g: g["layer"] is not None)
        else:
            names = {g["unit"] for g in trained}
            self.binding.set_requires_grad(self._units, lambda g: g["unit"] in names)
        self.backend.set_trained([self.units.index[g["unit"]] for g in trained])

    def _params_device(self) -> torch.device:
        return next(iter(self.groups.block_params[0])).device

    def _follow_device(self) -> None:
        """Every tensor the optimizer keeps follows its parameters: the first forward, backward or ``step()``
        after a move brings the step's buffers, the MGN accumulators, the loss-scale probe and every AdamW
        state to the parameters' new device, and rebuilds the state store for it (``offload="auto"``
        offloads on CUDA). Values are unchanged."""
        device = self._params_device()
        if device == self._device:
            return
        if self.probe.backwards or self.probe.host_acc or self.in_backward.stepped:
            raise RuntimeError(
                f"the model moved from {self._device} to {device} in the middle of an optimizer step; move it "
                "before the first forward pass or after optimizer.step()"
            )
        states = self.store.param_states()
        self._device = device
        move_parameter_(self.loss_scale_probe, device)  # a param group's parameter: the object stays
        self.units.to(device)
        self.selection.to(device)
        self._end_step_reset()
        self.store.bind(device)
        self.store.place_param_states(states)
        self.store.activate([g["unit"] for g in self._trained_groups()], [])

    # ------------------------------------------------------------------------------------------
    # hooks (installed by ModelBinding, called through weak references)
    def _on_grad(self, p: torch.Tensor) -> None:
        if self.closed:
            return
        if not self.probe.in_backward:
            self._follow_device()
        self.probe.on_grad(p)
        if self.config.step_in_backward and not self.probing and not self.probe.accumulating:
            self.in_backward.count(self.units.unit_of[id(p)])

    def _on_backward_end(self) -> None:
        if self.closed:
            self.probe.in_backward = False
            return
        self.probe.on_backward_end()

    def _on_reduced(self, unit_ids: list[int]) -> None:
        if not self.probing and not self.closed:
            self.probe.on_reduced(unit_ids, self.param_groups)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if not self.closed:
            self._follow_device()
            self.binding.before_forward(module, "embeddings" in self._always)

    def _before_block(self, block: nn.Module, args: tuple) -> tuple | None:
        if self.closed or "embeddings" in self._always:
            return None
        lowest = 0 if self.probing else min(self.selection.active, default=0)
        return self.binding.before_block(block, args, self.groups.blocks[lowest])

    # ------------------------------------------------------------------------------------------
    # step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.closed:
            raise RuntimeError("this GrassOptimizer is closed (close(), or another one took over its model)")
        self._follow_device()
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step
        found_inf = getattr(self, "found_inf", None)
        check_scaler(grad_scale, self.backend, self.config.step_in_backward)
        factor = loss_scale_factor(self.loss_scale_probe.grad, grad_scale, self._device)
        overflow = found_inf is not None and bool(torch.as_tensor(found_inf).sum() > 0)
        try:
            if self.probe.backwards == 0:
                self._skip("no backward pass since the last step (step() without a new gradient)")
            elif self.probing:
                self._probe_step(factor, overflow)
            else:
                self._train_step(factor, grad_scale, overflow)
        finally:
            self._end_step_reset()
        return loss

    def _end_step_reset(self) -> None:
        """The one end-of-step reset (H3, B3), whatever the step's outcome."""
        self.probe.reset()
        self.in_backward.reset()
        self.loss_scale_probe.grad = None

    def _skip(self, why: str) -> None:
        self.skipped_steps += 1
        self.last_step_skipped = True
        if why not in self._warned and why != "overflow":
            warnings.warn(
                f"GrassOptimizer skipped a step: {why}; weights, MGN and AdamW state are unchanged "
                f"(skipped steps: {self.skipped_steps}, see optimizer.skipped_steps)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned.add(why)

    def _complete(self, layer_sumsq: torch.Tensor, observed: Iterable[int]) -> None:
        """A step that counts: observe the MGN, count it, maybe switch to a new active set."""
        self.selection.observe(layer_sumsq, list(observed))
        self.last_step_skipped = False
        self.global_step += 1
        drawn = self.selection.end_step()
        if drawn is not None:
            self._apply_active(drawn)

    def _probe_step(self, factor: torch.Tensor | None, overflow: bool) -> None:
        sumsq, why = self.probe.end_probe_step()
        if sumsq is None:
            return self._skip(why)
        if factor is not None:
            sumsq = sumsq * factor
        if overflow:
            return self._skip("overflow")
        if not all_finite(sumsq):
            return self._skip("non-finite gradients")
        self._complete(sumsq, range(self.num_layers))

    def _train_step(self, factor: torch.Tensor | None, grad_scale: Any, overflow: bool) -> None:
        trained = self._trained_groups()
        ids = [self.units.index[g["unit"]] for g in trained]
        self.backend.reduce_gradients(ids)  # every rank now holds the global batch's gradients
        done = {self._units[j]["layer"] for j in self.in_backward.stepped} - {None}
        have = {g["layer"] for g in trained if g["layer"] is not None and any(p.grad is not None for p in g["params"])}
        self._warn_missing(sorted(set(self.selection.active) - have - done))
        if overflow:
            return self._skip("overflow")
        # the norms read in the hooks, and whether the gradients as they are now are finite (a user, a
        # clipping of an infinite norm, may have changed them since), made global in one reduction and one
        # host sync (a sum over the shards with FSDP2, so every rank takes the same decision)
        sumsq = self.probe.param_sumsq if factor is None else self.probe.param_sumsq * factor
        grads = [self.backend.local(p.grad) for g in trained for p in g["params"] if p.grad is not None]
        now = torch.zeros(1, dtype=torch.float64, device=sumsq.device)
        if grads:
            now += torch.stack(torch._foreach_norm(grads, 2)).double().square().sum().to(sumsq.device)
        vec = torch.cat([sumsq, now])
        self.backend.reduce_sumsq_(vec)
        if not all_finite(vec):
            return self._skip("non-finite gradients")
        if grad_scale is not None and grads:  # the scaler left the unscaling to us
            torch._foreach_mul_(grads, 1.0 / float(grad_scale))
        if self.config.max_grad_norm is not None:
            self.clip_grad_norm_(self.config.max_grad_norm)
        stepped = [g for g in trained if any(p.grad is not None for p in g["params"])]
        self.store.update([g for g in stepped if self.backend.owns(self.units.index[g["unit"]])], self.global_step)
        self.backend.broadcast_updates([self.units.index[g["unit"]] for g in stepped])  # ZeRO-1: owners send
        self._complete(self.units.layer_sumsq(vec[:-1]), sorted(have | done))
        if self.config.step_in_backward:
            order = self.in_backward.order()  # the next backward's first unit: its copy-in overlaps the forward
            if order:
                self.store.prefetch(order[0]["unit"])

    def _warn_missing(self, missing: list[int]) -> None:
        if missing and "no grad" not in self._warned:
            warnings.warn(
                f"active layers {missing} received no gradient this step (was backward called? with reentrant "
                "gradient checkpointing pass hidden states positionally)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned.add("no grad")

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of the trained parameters to ``max_norm``; returns the total norm (a 0-d tensor
        on the parameters' device, 0 when no parameter has a gradient)."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self._device)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)

    # ------------------------------------------------------------------------------------------
    # state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: PyTorch's optimizer format (param groups, and per parameter
        ``step``, ``exp_avg``, ``exp_avg_sq`` and ``master`` / ``compensation`` when enabled, always as tensors
        independent of where the states live) plus a ``grass`` entry with the config, sampler, RNG, MGN and
        schedule. Take it between optimizer steps (not between the micro-batches of one)."""
        return serialization.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`, whatever device its tensors were moved to. Everything is validated
        before anything changes; a state saved under a ``GrassConfig`` that trains differently (another
        γ, policy, temperature, ...) is refused unless ``strict=False``."""
        serialization.load_state_dict(self, state_dict, strict)

    def __repr__(self) -> str:
        return (
            f"GrassOptimizer(layers={self.num_layers} at {self.groups.block_path!r}, policy={self.config.policy}, "
            f"active={self.active_layers}, step={self.global_step}, probing={self.probing}, "
            f"offload={self.residency})"
        )
