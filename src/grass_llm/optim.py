"""``GrassOptimizer``: AdamW that trains only the decoder layers GRASS samples, one state per layer.

Life of a run (one ``step()`` = one optimizer step, after all micro-batches of gradient accumulation):

1. Probing, ``probe_steps`` steps. Every decoder layer requires grad; the gradient-ready hook of
   each parameter reads its gradient and frees it at once, so no gradient memory is held on the
   device, and ``step()`` turns the squared norms into MGN observations and changes no weight.
   With gradient accumulation the observation is eq. 2 of the *accumulated* gradient of the step:
   the micro-batches before the last add their gradients to a host buffer (one per parameter,
   allocated on first use), the last one adds the buffer to its gradient before the norm is read.
   Which micro-batch is the last: all but the last run under ``optimizer.no_sync()`` (or, with
   accelerate / the HF Trainer, with ``sync_gradients`` off); a loop that marks nothing has its
   number of micro-batches learned at the first step (whose observation is then an estimate, with a
   warning) and counted from the second step on.
2. Training. Every ``period`` steps the sampler draws ``active_layers`` layers; only they (and the
   embeddings / norm / head groups switched on in the config) require grad and are stepped. The
   optimizer sets ``requires_grad`` itself, so backward stops at the lowest active layer when the
   embeddings are frozen. The hooks read each trained gradient's squared norm as it becomes final
   (the accumulated gradient of the step), before anything (a Trainer, the user) clips it, so the
   MGN is the raw gradient's. ``step()`` observes the MGN of the active layers (no host sync),
   clips if configured, and runs AdamW. At the end of a period the MGN of the trained layers is
   updated by EMA (eq. 4) and new layers are drawn.

Mixed precision: ``GrassOptimizer`` takes part in ``torch.amp.GradScaler``'s protocol for optimizers
that handle scaling themselves (``_step_supports_amp_scaling``): ``scaler.step(opt)`` calls ``step()``
with the scale and the overflow flag set. A one-element ``loss_scale_probe`` in the last param group
gets the gradient 1 (inf after a non-finite norm) at the end of every backward; the scaler checks and,
if the user unscales first, unscales it with the real gradients, so its value tells the optimizer by
how much the squared norms read in the hooks are scaled, and an overflow during probing (whose
gradients are freed) reaches the scaler like any other. The MGN is read from unscaled gradients; a
step with an overflow changes nothing and the scaler lowers its scale.

Non-finite gradients: a step whose trained gradients hold NaN/Inf changes no weight, no MGN and no
AdamW state; it is counted in ``skipped_steps`` (``last_step_skipped`` tells about the last one) and
does not advance probing or the sampling period.

The AdamW arithmetic is PyTorch's own functional ``torch.optim.adam.adam`` with
``decoupled_weight_decay=True``, called with the same defaults as ``torch.optim.AdamW``, so with every
layer active the result equals ``torch.optim.AdamW`` bit for bit (fp32 weights, or bf16 weights with
``update_rounding="nearest"`` and no masters). It runs on pieces of at most a few million elements (AdamW
is elementwise, so the numbers do not change) to bound the temporaries of the update, and, with offload,
on the chunks the offloader stages. bf16/fp16 weights do not lose updates below their resolution: by
default they get fp32 master weights in host memory under offload, else a Kahan compensation buffer
(``GrassConfig.fp32_master_weights``, ``GrassConfig.update_rounding``). By default weight decay skips biases
and normalisation weights (the transformers Trainer's convention); ``decay_bias_and_norm=True``
decays every trained parameter. ``param_groups`` has one group per unit (each decoder layer,
``embeddings``, ``norm``, ``head``) so LR schedulers change the LR applied, then the loss-scale probe.

Hooks and their lifetime: the optimizer's hooks hold only a weak reference to it. ``close()`` (also
on leaving ``with GrassOptimizer(...) as opt:``, and when the optimizer is garbage collected) removes
every hook and gives the model back the ``requires_grad`` flags it had before any GRASS optimizer
touched it; a second optimizer built on the same model closes the first.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam as _functional_adam

from grass_llm.config import GrassConfig
from grass_llm.distributed.base import DataParallelBackend, LocalBackend, resolve_backend
from grass_llm.importance import ImportanceTracker
from grass_llm.layers import LayerGroups, LayerSpec, discover_layers
from grass_llm.sampling import LayerSampler

__all__ = ["GrassOptimizer", "no_weight_decay_ids"]

_EXTRA_GROUPS = ("embeddings", "norm", "head")
_SCALE_UNIT = "loss_scale_probe"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: Offloaded states are staged in chunks of at most this many bytes: the device holds two of them (the chunk
#: being updated and the next one, prefetched), whatever the size of a layer, the embeddings or the head.
OFFLOAD_CHUNK_BYTES = 32 * 2**20
#: Without offload the update runs on pieces of at most this many elements (bounds its fp32 temporaries).
UPDATE_CHUNK_ELEMENTS = 4 * 2**20


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (one host sync). True on fake and ``meta`` tensors, which hold
    no values: ``grass-llm memory`` steps the optimizer on them."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t) or bool(torch.isfinite(t).all())


def _hash32(x: int) -> int:
    """A 32-bit integer hash (mixes the stochastic-rounding key)."""
    x &= 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_hash32` elementwise on an int64 tensor of values in [0, 2**32) (no product exceeds 2**59)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


# parameter names that take no weight decay by default (transformers' Trainer convention)
_NO_DECAY_NAMES = [
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]

# model -> the GrassOptimizer attached to it (weakly) and the requires_grad flags the model had before
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """``id`` of the parameters that take no weight decay by default: biases and normalisation weights
    (parameters of ``*Norm*`` modules, or named like them), the transformers Trainer's convention."""
    out = set()
    for mname, module in model.named_modules():
        norm_module = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if norm_module or any(r.search(full.lower()) for r in _NO_DECAY_NAMES):
                out.add(id(p))
    return out


def _weak(obj: Any, name: str) -> Callable[..., Any]:
    """``getattr(obj, name)(*args)`` through a weak reference (no-op once ``obj`` is gone), so hooks on
    the model's parameters do not keep the optimizer alive."""
    ref = weakref.ref(obj)

    def call(*args: Any) -> Any:
        target = ref()
        return None if target is None else getattr(target, name)(*args)

    return call


def _detach(handles: list[Any], backend: DataParallelBackend, original: dict[nn.Parameter, bool]) -> None:
    """Remove an optimizer's hooks and restore the model's flags (``close()`` and the GC finalizer)."""
    for h in handles:
        h.remove()
    handles.clear()
    backend.close()
    for p, flag in original.items():
        p.requires_grad_(flag)


def _accelerate_sync_gradients() -> bool | None:
    """accelerate's ``GradientState.sync_gradients`` when an Accelerator (or the HF Trainer) uses it,
    else None. Read without importing accelerate."""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None)
    if not shared:
        return None
    return bool(shared.get("sync_gradients", True))


def _calling_ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` whose forward is calling ``module`` (a few frames up), if any."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.parallel.DistributedDataParallel) and obj.module is module:
            return obj
        frame = frame.f_back
    return None


class GrassOptimizer(torch.optim.Optimizer):
    """AdamW over GRASS-sampled decoder layers.

    Args:
        model: the model to fine-tune. Its decoder blocks are found by introspection (see
            ``grass_llm.layers``) unless ``layers`` names them.
        config: a ``GrassConfig``; the paper's defaults when omitted.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (``torch.optim.AdamW`` semantics;
            weight decay is decoupled).
        layers: override for the decoder blocks: a dotted module path or ``model -> blocks``
            (default: ``config.layers``, else introspection).
        foreach: passed to the functional AdamW (``None``: PyTorch's default for the device).
        distributed: the data-parallel backend (``grass_llm.distributed``): ``"auto"`` uses
            ``FSDP2Backend`` for a model sharded with ``fully_shard``, the replicated backend when
            torch.distributed is initialised with more than one rank, else one process;
            ``None``/``False``: one process; or a ``DataParallelBackend`` (e.g.
            ``ReplicatedBackend(shard_optimizer_states=True)``). Do not wrap the model in DDP yourself; a
            DDP wrapper put around it later (the HF Trainer under torchrun) is detected and its own
            gradient reduction switched off.
        decay_bias_and_norm: also apply weight decay to biases and normalisation weights (default:
            not, as the transformers Trainer does).
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
        if not (lr >= 0):
            raise ValueError(f"lr={lr!r} is invalid; allowed: a float >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas!r} is invalid; allowed: two floats in [0, 1)")
        if not (eps >= 0):
            raise ValueError(f"eps={eps!r} is invalid; allowed: a float >= 0")
        if not (weight_decay >= 0):
            raise ValueError(f"weight_decay={weight_decay!r} is invalid; allowed: a float >= 0")
        self.config = copy.deepcopy(config) if config is not None else GrassConfig()
        self.groups: LayerGroups = discover_layers(
            model, layers if layers is not None else self.config.layers
        )
        self.config.validate(num_layers=self.groups.num_layers)
        # invariant: the backend is resolved first; it attaches (and installs its hooks) before the
        # optimizer installs its own
        self.backend = resolve_backend(distributed, model)
        if self.config.step_in_backward and not isinstance(self.backend, LocalBackend):
            raise ValueError(
                "step_in_backward=True is not supported with data-parallel sync (the update would run "
                "before the gradient all-reduce); set step_in_backward=False or distributed=False"
            )
        self.model = model
        self._handles: list[Any] = []
        original = self._attach_to_model(model)
        try:
            self._build(model, original, lr, betas, eps, weight_decay, foreach, decay_bias_and_norm)
        except BaseException:  # leave the model as it was
            _detach(self._handles, self.backend, original)
            _ATTACHED.pop(model, None)
            raise

    def _build(self, model, original, lr, betas, eps, weight_decay, foreach, decay_bias_and_norm) -> None:
        # parameters the user froze before any GRASS optimizer touched the model stay frozen
        self._user_frozen = {id(p) for p, flag in original.items() if not flag}
        self._no_decay = set() if decay_bias_and_norm else no_weight_decay_ids(model)

        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=False,
            maximize=False,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=None,
            decoupled_weight_decay=True,
        )
        device = self._device = self._params_device()
        param_groups: list[dict[str, Any]] = []
        for i, params in enumerate(self.groups.block_params):
            param_groups.append({"params": params, "unit": f"layer.{i}", "layer": i})
        for name in _EXTRA_GROUPS:
            params = getattr(self.groups, name)
            if params:
                param_groups.append({"params": params, "unit": name, "layer": None})
        #: GradScaler's view of the squared norms the hooks read (module docstring); never trained
        self.loss_scale_probe = torch.zeros(1, dtype=torch.float32, device=device)
        param_groups.append({"params": [self.loss_scale_probe], "unit": _SCALE_UNIT, "layer": None})
        super().__init__(param_groups, defaults)
        self._unit_id = {g["unit"]: j for j, g in enumerate(self._units)}

        cfg = self.config
        self.importance_tracker = ImportanceTracker(
            [self.groups.numel(i) for i in range(self.groups.num_layers)], device=device
        )
        self.sampler = LayerSampler(
            self.groups.num_layers,
            cfg.active_layers,
            cfg.policy,
            cfg.temperature,
            cfg.seed,
            broadcast=self.backend.broadcast_layers,
        )
        self.global_step = 0
        self.probe_done = 0
        self.period_pos = 0
        #: steps skipped because a trained gradient was non-finite (or GradScaler found an overflow)
        self.skipped_steps = 0
        #: whether the last step() was skipped
        self.last_step_skipped = False
        self._active: list[int] = []
        self._always = {name for name in _EXTRA_GROUPS if getattr(cfg, f"train_{name}")}
        self._warned: set[str] = set()
        self._accumulating = False  # inside no_sync(): a non-final micro-batch
        self._marks_seen = False  # some backward was marked non-final (no_sync / sync_gradients)
        self._k: int | None = None  # micro-batches per step of an unmarked loop, learned at step 1
        self._ddp: weakref.ref | None = None

        # per-parameter squared gradient norms of the current step, on the device
        trained = [p for g in self._units for p in g["params"] if id(p) not in self._user_frozen]
        self._pidx = {id(p): k for k, p in enumerate(trained)}
        if not any(id(p) in self._pidx for ps in self.groups.block_params for p in ps):
            raise ValueError(
                "every parameter of the decoder blocks is frozen (requires_grad=False): nothing to train"
            )
        # float64: the squares of gradients scaled by a GradScaler must not overflow
        self._param_sumsq = torch.zeros(len(trained), dtype=torch.float64, device=device)
        layer_of = [-1] * len(trained)
        for i, params in enumerate(self.groups.block_params):
            for p in params:
                if id(p) in self._pidx:
                    layer_of[self._pidx[id(p)]] = i
        # the decoder-block entries of _param_sumsq and their layers, as index tensors: boolean-mask
        # indexing would sync the device (and cannot run on the meta tensors of grass-llm memory)
        rows = [k for k, layer in enumerate(layer_of) if layer >= 0]
        self._block_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self._block_layers = torch.tensor([layer_of[k] for k in rows], dtype=torch.long, device=device)
        self._layer_of = {id(p): i for i, ps in enumerate(self.groups.block_params) for p in ps}
        self._probe_params = [[p for p in ps if id(p) in self._pidx] for ps in self.groups.block_params]
        self._unit_of = {id(p): j for j, g in enumerate(self._units) for p in g["params"]}
        self._reset_step_state()

        self._offloader = self._make_offloader(device)
        self.backend.attach(
            [[p for p in g["params"] if id(p) not in self._user_frozen] for g in self._units],
            on_reduced=_weak(self, "_on_reduced"),
        )
        self._sib_ready: dict[int, int] = {}  # unit -> gradients ready in this backward
        self._sib_stepped: set[int] = set()  # units updated in backward since step()
        self._handles += [p.register_post_accumulate_grad_hook(_weak(self, "_on_grad")) for p in trained]
        self._handles.append(model.register_forward_pre_hook(_weak(self, "_before_forward")))
        for block in self.groups.blocks:
            self._handles.append(block.register_forward_pre_hook(_weak(self, "_before_block")))
        self._finalizer = weakref.finalize(self, _detach, self._handles, self.backend, original)
        if cfg.probe_steps > 0:
            self._start_probe()
        else:
            self._finish_probe()

    # ------------------------------------------------------------------------------------------
    # attachment to the model
    def _attach_to_model(self, model: nn.Module) -> dict[nn.Parameter, bool]:
        """Close a GRASS optimizer still attached to ``model``; return the flags the model had before
        any of them. Parameters outside the decoder (``groups.other``) are frozen for good."""
        record = _ATTACHED.get(model)
        previous = record["owner"]() if record is not None else None
        if previous is not None:
            warnings.warn(
                "this model already has a GrassOptimizer; closing it (its hooks are removed). Call close() "
                "on an optimizer you stop using, or use `with GrassOptimizer(...) as opt:`",
                RuntimeWarning,
                stacklevel=3,
            )
            previous.close()
        original = {p: p.requires_grad for p in model.parameters()}
        _ATTACHED[model] = {"owner": weakref.ref(self)}
        for p in self.groups.other:
            p.requires_grad_(False)
        return original

    def close(self) -> None:
        """Remove every hook and restore the model's ``requires_grad`` flags; the optimizer is not
        stepped after this. Safe to call twice."""
        if self._finalizer.alive:
            self._finalizer()
            record = _ATTACHED.get(self.model)
            if record is not None and record["owner"]() is self:
                del _ATTACHED[self.model]

    @property
    def _units(self) -> list[dict[str, Any]]:
        """The trained units' param groups, in order (unit j is param group j); the last param group,
        the loss-scale probe, is not one. (A property: load_state_dict replaces the group dicts.)"""
        return self.param_groups[:-1]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> GrassOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # public read-only views
    @property
    def active_layers(self) -> list[int]:
        """Decoder layers training now (``[]`` while probing)."""
        return list(self._active)

    @property
    def importance(self) -> torch.Tensor:
        """Current MGN per decoder layer (1-D, float64, on the host; reading it syncs the device)."""
        return self.importance_tracker.current()

    @property
    def probabilities(self) -> torch.Tensor:
        """Current sampling probabilities per decoder layer (1-D, float64)."""
        return self.sampler.probabilities.clone()

    @property
    def probing(self) -> bool:
        return self.probe_done < self.config.probe_steps

    @property
    def num_layers(self) -> int:
        return self.groups.num_layers

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters stepped now: active layers plus the always-trained groups."""
        return [p for g in self._trained_groups() for p in g["params"] if id(p) not in self._user_frozen]

    def activate(self, layers: Iterable[int]) -> None:
        """Train ``layers`` (decoder layer indices) from now until the next draw, instead of the drawn ones.

        The active set is forced until the end of the current period, when the sampler draws as usual
        (``period`` and the policy are unchanged). For experiments and for ``grass-llm memory``, which
        activates the lowest layers (the worst case for activation memory). Raises during probing.
        """
        if self.probing:
            raise RuntimeError("activate() during probing: the active layers are set when probing ends")
        chosen = sorted({int(i) for i in layers})
        if not chosen or chosen[0] < 0 or chosen[-1] >= self.num_layers:
            raise ValueError(
                f"layers={list(layers)!r} is invalid; allowed: a non-empty set of layers in 0..{self.num_layers - 1}"
            )
        self._activate(chosen)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Context for the backward passes of all micro-batches but the last of a step: no gradient
        all-reduce across ranks, no update from the backward hooks with ``step_in_backward``, and
        during probing the gradient goes to the accumulation buffer (module docstring)."""
        previous = self._accumulating
        self._accumulating = True
        try:
            with self.backend.no_sync():
                yield
        finally:
            self._accumulating = previous

    # ------------------------------------------------------------------------------------------
    # per-step state read by the hooks
    def _reset_step_state(self) -> None:
        self._param_sumsq.zero_()
        self._host_acc: dict[int, torch.Tensor] = {}  # probing: gradient sums of non-final micro-batches
        self._final_seen: set[int] = set()  # probing: parameters whose final micro-batch was read
        self._backwards = 0  # backward passes seen in this step
        self._in_backward = False
        self._this_backward_final = True
        self._inexact = False  # probing: an unmarked accumulation made this step an estimate
        self._probe_sumsq: torch.Tensor | None = None  # probing: per-layer, global, finalised
        self._probe_units: dict[int, dict[int, torch.Tensor]] = {}  # layer -> its final gradients so far
        self._probe_layer_sumsq = torch.zeros(
            self.num_layers, dtype=torch.float64, device=self._param_sumsq.device
        )

    def _on_backward_start(self) -> None:
        """First hook of a backward pass: count it, decide whether it is the step's last micro-batch,
        and queue the end-of-backward callback (it runs after the backend's, queued earlier)."""
        self._in_backward = True
        self._backwards += 1
        marked = self._accumulating or _accelerate_sync_gradients() is False
        if marked:
            self._marks_seen = True
        self._this_backward_final = not marked and (
            self._marks_seen or self._k is None or self._backwards >= self._k
        )
        torch.autograd.Variable._execution_engine.queue_callback(_weak(self, "_on_backward_end"))

    def _on_grad(self, p: torch.Tensor) -> None:
        """Gradient-ready hook of every trainable parameter (all phases)."""
        if self.closed:
            return
        if not self._in_backward:
            self._follow_device()
            self._on_backward_start()
        if self.probing:
            self._probe_grad(p)
            return
        if self.backend.gradients_final_in_hooks:
            k = self._pidx[id(p)]
            g = self.backend.local(p.grad)  # FSDP2: this rank's shard (reduce_sumsq_ sums the shards)
            self._param_sumsq[k] = torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
        if self.config.step_in_backward and not self._accumulating:
            self._sib_count(self._unit_of[id(p)])

    def _probe_grad(self, p: torch.Tensor) -> None:
        """Probing: add this micro-batch's gradient to the step's (host buffer, squared norm, or the
        backend's reduction of its layer) and free it.

        Invariant: the norm kernel is queued on the stream that produced the gradient, before the grad
        is dropped; the caching allocator keeps the memory until that kernel has run."""
        key = id(p)
        g = self.backend.local(p.grad)
        p.grad = None
        if key in self._final_seen:  # more micro-batches than the step was expected to have
            self._inexact = True
            self._probe_sumsq = None  # finalised again with this micro-batch
        elif not self._this_backward_final:
            acc = self._host_acc.get(key)
            if acc is None:
                self._host_acc[key] = g.detach().to("cpu", torch.float32, copy=True)
            else:
                acc.add_(g.detach().to("cpu", torch.float32))
            return
        else:
            acc = self._host_acc.pop(key, None)
            if acc is not None:
                g = g.to(torch.float32) + acc.to(g.device, non_blocking=True)
            self._final_seen.add(key)
        self._probe_add(key, g)

    def _probe_add(self, key: int, g: torch.Tensor) -> None:
        """A parameter's gradient of the step: its squared norm, or (data parallel) into its layer."""
        if not self.backend.probe_needs_whole_units:
            self._param_sumsq[self._pidx[key]] += (
                torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
            )
            return
        layer = self._layer_of[key]
        staged = self._probe_units.setdefault(layer, {})
        staged[key] = g
        if len(staged) == len(self._probe_params[layer]):
            self._reduce_probe_layer(layer)

    def _reduce_probe_layer(self, layer: int) -> None:
        """Hand one layer's gradients to the backend, in parameter order, zeros for missing ones (the
        same layout on every rank)."""
        staged = self._probe_units.pop(layer)
        grads = [staged[id(q)] if id(q) in staged else torch.zeros_like(q) for q in self._probe_params[layer]]
        self.backend.reduce_probe_unit(layer, grads, _weak(self, "_on_probe_sumsq"))

    def _on_probe_sumsq(self, layer: int, value: torch.Tensor) -> None:
        self._probe_layer_sumsq[layer] += value.to(self._probe_layer_sumsq.device)

    def _on_backward_end(self) -> None:
        """After every backward: finalise probing's squared norms on the last micro-batch, and give
        the loss-scale probe its gradient (inf when a norm is non-finite)."""
        self._in_backward = False
        if self.closed:
            return
        if self.probing:
            if self._this_backward_final and not self._host_acc:
                self._finalize_probe()
            total = self._param_sumsq.sum() if self._probe_sumsq is None else self._probe_sumsq.sum()
        else:
            total = self._param_sumsq.sum()
        one = torch.ones(1, dtype=torch.float32, device=self.loss_scale_probe.device)
        self.loss_scale_probe.grad = torch.where(
            torch.isfinite(total), one, torch.full_like(one, float("inf"))
        )

    def _finalize_probe(self) -> None:
        """Probing: the step's per-layer squared norms, made global by the backend (a collective)."""
        device = self._param_sumsq.device
        for key in list(self._host_acc):  # micro-batches never followed by a final one
            self._probe_add(key, self._host_acc.pop(key).to(device))
        if self.backend.probe_needs_whole_units:
            for layer in sorted(self._probe_units):  # layers some of whose parameters had no gradient
                self._reduce_probe_layer(layer)
            self.backend.finish_probe_reductions()
            sumsq = self._probe_layer_sumsq.clone()
        else:
            sumsq = self._layer_sumsq()
        self.backend.reduce_sumsq_(sumsq)  # invariant: every rank finalises at the same point
        self._probe_sumsq = sumsq

    def _layer_sumsq(self) -> torch.Tensor:
        """Per-layer sums of the per-parameter squared norms (1-D, ``num_layers``)."""
        out = torch.zeros(self.num_layers, dtype=torch.float64, device=self._param_sumsq.device)
        return out.index_add_(0, self._block_layers, self._param_sumsq.index_select(0, self._block_rows))

    def _on_reduced(self, unit_ids: list[int]) -> None:
        """The backend reduced these units' gradients: read their squared norms now (training)."""
        if self.probing or self.closed:
            return
        for j in unit_ids:
            params = [p for p in self._units[j]["params"] if p.grad is not None and id(p) in self._pidx]
            if params:
                norms = torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float32)
                idx = torch.tensor([self._pidx[id(p)] for p in params], device=self._param_sumsq.device)
                self._param_sumsq.index_copy_(
                    0, idx, torch.stack(norms).double().square().to(self._param_sumsq.device)
                )

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
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step (module docstring)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None and not self.backend.supports_grad_scaler:
            raise RuntimeError(
                f"a GradScaler cannot be used with {type(self.backend).__name__}: its overflow check would differ "
                "between ranks; train in bf16 (or fp32)"
            )
        if self.config.step_in_backward and grad_scale is not None:
            raise RuntimeError(
                "step_in_backward=True cannot be used with a GradScaler: the updates run during backward, "
                "before the scaler has checked the gradients; use bf16, or step_in_backward=False"
            )
        # what the squared norms read in the hooks must be multiplied by: the scaler's unscale_ (if the
        # user called it) multiplied the probe's gradient 1 by 1/scale; a scaler that left the unscaling
        # to us gives the scale
        probe = self.loss_scale_probe.grad
        inv2 = None
        if probe is not None and grad_scale is None:
            inv2 = probe.double().square()  # 1 without a scaler (inf after a non-finite norm)
        if grad_scale is not None:
            inv2 = torch.as_tensor(grad_scale, dtype=torch.float64, device=self._param_sumsq.device)
            inv2 = inv2.reciprocal().square()
        overflow = found_inf is not None and bool(torch.as_tensor(found_inf).sum() > 0)
        if self.probing:
            self._probe_step(inv2, overflow)
        else:
            self._train_step(inv2, grad_scale, overflow)
        if not self.last_step_skipped:
            self.global_step += 1
        self._reset_step_state()
        self.loss_scale_probe.grad = None
        return loss

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

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of the trained parameters to ``max_norm``; returns the total norm (on device)."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)

    def _probe_step(self, inv2: torch.Tensor | None, overflow: bool) -> None:
        self.last_step_skipped = False
        if self._backwards == 0:
            if "no backward" not in self._warned:
                warnings.warn(
                    "GrassOptimizer.step() during probing saw no backward pass since the last step",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned.add("no backward")
            self._count_probe_step()
            return
        if self._probe_sumsq is None:
            self._finalize_probe()  # the step's last micro-batch was not recognised as such
        sumsq = self._probe_sumsq
        if self._inexact:
            sumsq = sumsq * float(self._backwards)  # the estimator of the unmarked first step (docstring)
            if "inexact" not in self._warned:
                warnings.warn(
                    f"gradient accumulation over {self._backwards} micro-batches without optimizer.no_sync(): "
                    "this probing step's MGN is an estimate; the following steps are exact. Run every "
                    "micro-batch but the last under optimizer.no_sync() to make every step exact",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned.add("inexact")
        if not getattr(self, "_marks_seen", False):
            self._k = self._backwards
        if inv2 is not None:
            sumsq = sumsq * inv2
        if overflow:
            self._skip("overflow")
            return
        if not _all_finite(sumsq):
            self._skip("non-finite gradients")
            return
        self.importance_tracker.observe(sumsq, range(self.num_layers))
        self._count_probe_step()

    def _count_probe_step(self) -> None:
        self.probe_done += 1
        if self.probe_done == self.config.probe_steps:
            self._finish_probe()

    def _train_step(self, inv2: torch.Tensor | None, grad_scale: Any, overflow: bool) -> None:
        self.last_step_skipped = False
        trained = list(self._trained_groups())
        # every rank now holds the gradients of the global batch (and on_reduced read their norms)
        self.backend.reduce_gradients([self._unit_id[g["unit"]] for g in trained])
        done = {self._units[j]["layer"] for j in self._sib_stepped} - {None}
        have = {
            g["layer"]
            for g in trained
            if g["layer"] is not None and any(p.grad is not None for p in g["params"])
        }
        missing = sorted(set(self._active) - have - done)
        if missing and "no grad" not in self._warned:
            warnings.warn(
                f"active layers {missing} received no gradient this step (was backward called? with reentrant "
                "gradient checkpointing pass hidden states positionally)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned.add("no grad")
        sumsq = self._param_sumsq if inv2 is None else self._param_sumsq * inv2
        if overflow:
            self._skip("overflow")
            return
        # the norms read in the hooks, and whether the gradients as they are now are finite (a user, a
        # clipping of an infinite norm, may have changed them since), made global in one reduction (a
        # sum over the shards with FSDP2, so that every rank takes the same decision) and one host sync
        grads = [self.backend.local(p.grad) for g in trained for p in g["params"] if p.grad is not None]
        now = torch.zeros(1, dtype=torch.float64, device=sumsq.device)
        if grads:
            now += torch.stack(torch._foreach_norm(grads, 2)).double().square().sum().to(sumsq.device)
        vec = torch.cat([sumsq, now])
        self.backend.reduce_sumsq_(vec)
        if not _all_finite(vec):
            self._skip("non-finite gradients")
            return
        layer_sumsq = torch.zeros(self.num_layers, dtype=torch.float64, device=sumsq.device)
        layer_sumsq.index_add_(0, self._block_layers, vec[:-1].index_select(0, self._block_rows))
        self.importance_tracker.observe(layer_sumsq, sorted(have | done))
        if grad_scale is not None and grads:  # the scaler left the unscaling to us
            torch._foreach_mul_(grads, 1.0 / float(grad_scale))
        if self.config.max_grad_norm is not None:
            self.clip_grad_norm_(self.config.max_grad_norm)
        stepped = [g for g in trained if any(p.grad is not None for p in g["params"])]
        self._step_groups([g for g in stepped if self.backend.owns(self._unit_id[g["unit"]])])
        # ZeRO-1: each owner sends its units' new weights
        self.backend.broadcast_updates([self._unit_id[g["unit"]] for g in stepped])
        self.period_pos += 1
        if self.period_pos == self.config.period:
            self._resample()
        self._sib_ready, self._sib_stepped = {}, set()
        if self.config.step_in_backward and self._offloader is not None:
            # the first unit the next backward completes: its state's copy-in overlaps the forward
            order = self._backward_order()
            if order:
                self._offloader.prefetch(order[0]["unit"])

    def _step_groups(self, groups: list[dict[str, Any]]) -> None:
        """AdamW on each group in turn. With offload, a group's state is staged on the device chunk by chunk
        just for its update: the next chunk's copy-in (or the next group's first) is issued before this
        chunk's update (prefetch), and the write-back is queued right after it (see grass_llm.offload for
        the stream/event invariants)."""
        off = self._offloader
        if off is not None and groups:
            off.prefetch(groups[0]["unit"])
        for i, group in enumerate(groups):
            self._update_unit(group, groups[i + 1]["unit"] if i + 1 < len(groups) else None)

    def _update_unit(self, group: dict[str, Any], next_unit: str | None = None) -> None:
        """One AdamW step of a unit's parameters that have a gradient, in pieces; with offload, chunk by chunk
        (acquire, prefetch the next chunk or ``next_unit``'s first, update, release)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("GrassOptimizer does not support sparse gradients")
        step_of = self._advance_steps(params)
        off = self._offloader
        if off is None:
            pieces = []
            for full in params:
                self._ensure_precision_state(full)
                p = self.backend.local(full)  # FSDP2: this rank's shard; its state covers the shard only
                n = p.numel()
                if n <= UPDATE_CHUNK_ELEMENTS or not p.is_contiguous():
                    pieces.append((full, 0, n))
                else:
                    pieces += [
                        (full, a, min(a + UPDATE_CHUNK_ELEMENTS, n))
                        for a in range(0, n, UPDATE_CHUNK_ELEMENTS)
                    ]
            size, chunk = 0, []
            for piece in pieces:
                if chunk and size + piece[2] - piece[1] > UPDATE_CHUNK_ELEMENTS:
                    self._adamw_pieces(group, chunk, None, step_of)
                    size, chunk = 0, []
                chunk.append(piece)
                size += piece[2] - piece[1]
            if chunk:
                self._adamw_pieces(group, chunk, None, step_of)
            return
        unit, registered = group["unit"], self._offload_params[group["unit"]]
        n_chunks = off.num_chunks(unit)
        for c in range(n_chunks):
            staged = off.acquire(unit, c)
            if c + 1 < n_chunks:
                off.prefetch(unit, c + 1)
            elif next_unit is not None:
                off.prefetch(next_unit)
            pieces = [(registered[i], a, b) for i, a, b in off.chunk_pieces(unit, c)]
            keep = [k for k, (p, _, _) in enumerate(pieces) if p.grad is not None]
            if keep:
                self._adamw_pieces(
                    group,
                    [pieces[k] for k in keep],
                    {key: [ts[k] for k in keep] for key, ts in staged.items()},
                    step_of,
                )
            off.release(unit, c)

    def _advance_steps(self, params: list[torch.Tensor]) -> dict[int, float]:
        """Count this step in each parameter's ``step`` (torch.optim's state layout); id -> new step."""
        out = {}
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # same initial state as torch.optim.Adam._init_group (non-capturable, non-fused)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["step"] += 1
            out[id(p)] = float(state["step"])
        return out

    def _ensure_precision_state(self, full: torch.Tensor) -> None:
        """In-memory state of ``full``: the moments, and the master or compensation its precision needs. A
        state loaded from a run with the other precision setting is converted (master <-> compensation)."""
        state = self.state[full]
        p = self.backend.local(full)
        if "exp_avg" not in state:
            dtype = torch.float32 if self.config.fp32_optimizer_states else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        exact = self._exact_value(p, state)
        if self._use_master:
            if "master" not in state:
                state["master"] = exact if exact is not None else p.detach().to(torch.float32, copy=True)
            state.pop("compensation", None)
            return
        state.pop("master", None)
        if self._rounding == "kahan" and p.dtype in _LOW_PRECISION:
            if "compensation" not in state:
                state["compensation"] = (
                    torch.zeros_like(p, memory_format=torch.preserve_format)
                    if exact is None
                    else (exact - p.detach().float()).to(p.dtype)
                )
        elif "compensation" in state:
            p.detach().copy_(exact)  # fold the owed rounding error into the weight
            state.pop("compensation")

    @staticmethod
    def _exact_value(p: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | None:
        """The fp32 value a master or a compensation buffer in ``state`` says ``p`` has, else None."""
        if "master" in state:
            return state["master"].to(p.device, torch.float32)
        if "compensation" in state:
            return p.detach().float() + state["compensation"].float()
        return None

    def _adamw_pieces(
        self,
        group: dict[str, Any],
        pieces: list[tuple[torch.Tensor, int, int]],
        staged: dict[str, list[torch.Tensor]] | None,
        step_of: dict[int, float],
    ) -> None:
        """AdamW on flat element ranges ``(param, start, stop)`` of the group's parameters (a whole parameter
        keeps its shape), with the state from ``staged`` (offload) or ``self.state``."""
        local = self.backend.local  # FSDP2: this rank's shard; its state covers the shard only
        buckets: dict[tuple[torch.dtype, bool], dict[str, list]] = {}
        for k, (full, a, b) in enumerate(pieces):
            p = local(full).detach()
            whole = (a, b) == (0, p.numel())
            # biases and norm weights take no weight decay unless decay_bias_and_norm (class docstring)
            key = (p.dtype, id(full) not in self._no_decay)
            lists = buckets.setdefault(key, {"p": [], "g": [], "step": [], "where": []})

            def cut(t: torch.Tensor, whole=whole, a=a, b=b) -> torch.Tensor:
                return t if whole else t.reshape(-1)[a:b]

            lists["p"].append(p if whole else p.view(-1)[a:b])
            lists["g"].append(cut(local(full.grad)))
            lists["step"].append(torch.tensor(step_of[id(full)] - 1, dtype=torch.float32))
            lists["where"].append((self._param_numbers[id(full)], a))
            if staged is not None:
                for name, ts in staged.items():
                    lists.setdefault(name, []).append(ts[k])
            else:
                for name, t in self.state[full].items():
                    if name != "step":
                        lists.setdefault(name, []).append(cut(t))
        for (_, decay), lists in buckets.items():
            self._adamw_update(group, lists, group["weight_decay"] if decay else 0.0)

    def _adamw_update(self, group: dict[str, Any], lists: dict[str, list], weight_decay: float) -> None:
        params, grads, exp_avgs, exp_avg_sqs = lists["p"], lists["g"], lists["exp_avg"], lists["exp_avg_sq"]
        masters, comps = lists.get("master"), lists.get("compensation")
        low = params[0].dtype in _LOW_PRECISION
        rounding = self._rounding if low and not masters else "nearest"
        # the tensors AdamW updates: the weights themselves, their fp32 masters, or fp32 copies that are
        # written back after the update (fp32 moments, or a rounding that needs the exact new value)
        if masters:
            targets = masters
        elif rounding == "kahan" and comps:
            targets = [p.float() + c.float() for p, c in zip(params, comps)]
        elif rounding == "stochastic" or exp_avgs[0].dtype != params[0].dtype:
            targets = [p.to(torch.float32, memory_format=torch.contiguous_format) for p in params]
        else:
            targets = params
        dtype = targets[0].dtype
        grads = grads if grads[0].dtype == dtype else [g.to(dtype) for g in grads]
        # bf16 moments with an fp32 update: computed in fp32, stored back rounded
        m_work = exp_avgs if exp_avgs[0].dtype == dtype else [m.to(dtype) for m in exp_avgs]
        v_work = exp_avg_sqs if exp_avg_sqs[0].dtype == dtype else [v.to(dtype) for v in exp_avg_sqs]
        beta1, beta2 = group["betas"]
        _functional_adam(
            targets,
            grads,
            m_work,
            v_work,
            [],
            lists["step"],
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=weight_decay,
            eps=group["eps"],
            maximize=False,
        )
        if m_work is not exp_avgs:
            for m, w in zip(exp_avgs, m_work):
                m.copy_(w)
            for v, w in zip(exp_avg_sqs, v_work):
                v.copy_(w)
        if targets is params:
            return
        for i, (p, t) in enumerate(zip(params, targets)):
            if rounding == "stochastic":
                self._stochastic_round_(p, t, lists["where"][i])
            else:
                p.copy_(t)
                if rounding == "kahan" and comps:
                    comps[i].copy_(t - p.float())

    def _stochastic_round_(self, dst: torch.Tensor, src: torch.Tensor, where: tuple[int, int]) -> None:
        """``dst`` (bf16) <- ``src`` (fp32) rounded up or down with probability proportional to the distance.

        The random bits are a hash of (seed, step, parameter, element index): reproducible, and the same
        whichever way the parameter is cut into pieces or chunks."""
        index, start = where
        key = (self.config.seed * 1_000_003 + self.global_step) * 1_000_003 + index
        base = _hash32(key & 0xFFFFFFFF)
        n = src.numel()
        x = torch.arange(start, start + n, dtype=torch.int64, device=src.device)
        rand = _hash32_((x + base) & 0xFFFFFFFF) & 0xFFFF
        bits = src.contiguous().view(-1).view(torch.int32) + rand.to(torch.int32)
        bits &= -65536  # clear the 16 bits bf16 drops: truncating after the random carry
        dst.copy_(bits.view(torch.float32).view(dst.shape))

    # ------------------------------------------------------------------------------------------
    # step_in_backward: each trained unit is updated from its gradient-ready hooks
    def _sib_count(self, j: int) -> None:
        if self.probing:
            return
        group = self._units[j]
        if j in self._sib_stepped:
            raise RuntimeError(
                f"step_in_backward: a second backward pass reached {group['unit']!r} before step(); with "
                "gradient accumulation run every micro-batch but the last under optimizer.no_sync()"
            )
        n = self._sib_ready.get(j, 0) + 1
        self._sib_ready[j] = n
        # invariant: the unit's trainable parameters are exactly those with requires_grad (set by
        # _set_requires_grad), and each one's hook fires once per backward pass
        if n == sum(q.requires_grad for q in group["params"] if id(q) not in self._user_frozen):
            self._step_unit_in_backward(j)

    def _backward_order(self) -> list[dict[str, Any]]:
        """The trained units in the order backward usually completes them: head, norm, the active
        layers from the top down, embeddings. Only used to choose what to prefetch."""
        trained = list(self._trained_groups())
        rank = {"head": -2, "norm": -1, "embeddings": self.num_layers}
        return sorted(
            trained, key=lambda g: rank[g["unit"]] if g["layer"] is None else self.num_layers - 1 - g["layer"]
        )

    @torch.no_grad()
    def _step_unit_in_backward(self, gi: int) -> None:
        group = self._units[gi]
        self._sib_stepped.add(gi)
        idx = [self._pidx[id(q)] for q in group["params"] if q.grad is not None and id(q) in self._pidx]
        # one host sync per unit: a unit with a non-finite gradient is not updated (units updated earlier
        # in this backward stay updated; step() then counts the step as skipped)
        if idx and not _all_finite(self._param_sumsq[idx]):
            for q in group["params"]:
                q.grad = None
            return
        following = None
        if self._offloader is not None:
            done = {self._units[k]["unit"] for k in self._sib_stepped}
            later = [g for g in self._backward_order() if g["unit"] not in done]
            if later:
                following = later[0]["unit"]  # its copy-in overlaps this update and the backward below
        self._update_unit(group, following)
        for q in group["params"]:
            q.grad = None  # invariant: queued kernels keep the memory alive (caching allocator, same stream)

    def _make_offloader(self, device: torch.device):
        """A LayerStateOffloader with one unit per param group that can be trained (every decoder layer, and
        the embeddings / norm / head only when the config trains them), or None when offload is off. Also
        settles the update precision (masters, compensation) that the registered state layout holds."""
        cfg = self.config
        # auto: on for CUDA; meta is where grass-llm memory runs a CUDA configuration on fake tensors
        on = device.type in ("cuda", "meta") if cfg.offload == "auto" else bool(cfg.offload)
        trainable = [g for g in self._units if g["layer"] is not None or g["unit"] in self._always]
        low = {p.dtype for g in trainable for p in g["params"]} & set(_LOW_PRECISION)
        # a parameter's position among all of them keys its stochastic-rounding random bits
        self._param_numbers = {
            id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])
        }
        master = cfg.fp32_master_weights
        self._use_master = bool(low) and (master is True or (master == "auto" and on))
        self._rounding = cfg.update_rounding if low and not self._use_master else "nearest"
        if self._rounding == "stochastic" and torch.float16 in low:
            raise ValueError(
                "update_rounding='stochastic' supports bf16 weights, the model has fp16 ones; allowed for fp16: "
                "kahan, nearest, or fp32_master_weights=True"
            )
        if not on:
            return None
        from grass_llm.offload import LayerStateOffloader

        off = LayerStateOffloader(device, overlap=cfg.overlap, chunk_bytes=OFFLOAD_CHUNK_BYTES)
        self._offload_index: dict[int, int] = {}
        self._offload_params: dict[str, list[torch.Tensor]] = {}
        self._offload_keys: dict[str, set[str]] = {}
        for group in trainable:
            params = [p for p in group["params"] if id(p) not in self._user_frozen]
            if not params:
                continue
            comp = self._rounding == "kahan" and any(p.dtype in _LOW_PRECISION for p in params)
            off.register(
                group["unit"],
                [self.backend.local(p) for p in params],  # FSDP2: this rank's shards
                fp32_states=cfg.fp32_optimizer_states,
                fp32_master=self._use_master,
                compensation=comp,
            )
            self._offload_index.update({id(p): k for k, p in enumerate(params)})
            self._offload_params[group["unit"]] = params
            keys = {"exp_avg", "exp_avg_sq"} | ({"master"} if self._use_master else set())
            self._offload_keys[group["unit"]] = keys | ({"compensation"} if comp else set())
        return off

    @property
    def precision(self) -> str:
        """How updates reach bf16/fp16 weights: ``master`` (fp32 master weights), ``kahan``, ``stochastic`` or
        ``nearest`` (also for fp32 weights, which are updated exactly); settled from the config at construction."""
        return "master" if self._use_master else self._rounding

    @property
    def offloader(self):
        """The ``LayerStateOffloader`` holding every layer's state in host memory, or None."""
        return self._offloader

    # ------------------------------------------------------------------------------------------
    # phases and switching
    def _trained_groups(self) -> Iterable[dict[str, Any]]:
        if self.probing:
            return []
        active = set(self._active)
        return [
            g
            for g in self._units
            if (g["layer"] is not None and g["layer"] in active)
            or (g["layer"] is None and g["unit"] in self._always)
        ]

    def _start_probe(self) -> None:
        """Every block trainable; the hooks read each gradient's norm and free it."""
        self._set_requires_grad(set(range(self.num_layers)), extra=False)

    def _finish_probe(self) -> None:
        if self.config.probe_steps > 0:
            self.sampler.end_probe(self.importance_tracker.end_probe())
        self.period_pos = 0
        self._activate(self.sampler.draw())

    def _resample(self) -> None:
        self.sampler.end_period(self.importance_tracker.end_period(self.config.ema))
        self.period_pos = 0
        self._activate(self.sampler.draw())

    def _activate(self, layers: list[int]) -> None:
        leaving = set(self._active) - set(layers)
        if self.config.on_reactivation == "reset":
            for i in leaving:
                for p in self.groups.block_params[i]:
                    self.state.pop(p, None)
                if self._offloader is not None and f"layer.{i}" in self._offloader.units():
                    self._offloader.reset(f"layer.{i}")
        self._active = sorted(layers)
        self._set_requires_grad(set(self._active), extra=True)

    def _set_requires_grad(self, layers: set[int], extra: bool) -> None:
        for group in self._units:
            if group["layer"] is not None:
                on = group["layer"] in layers
            else:
                on = extra and group["unit"] in self._always
            for p in group["params"]:
                p.requires_grad_(on and id(p) not in self._user_frozen)
                if not p.requires_grad:
                    p.grad = None
        self.backend.set_trained([self._unit_id[g["unit"]] for g in self._trained_groups()])

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model.

        * HF's ``enable_input_require_grads`` (installed by gradient checkpointing) makes the embedding
          output require grad, which forces backward through every frozen layer: removed unless the
          embeddings train (the lowest active block gets a grad-requiring input instead, see
          ``_before_block``).
        * A ``DistributedDataParallel`` wrapper calling the model (the HF Trainer under torchrun wraps
          it): GRASS all-reduces the active layers' gradients itself, and DDP's buckets, built for the
          parameters that required grad when it was wrapped, cannot follow the sampled layers; its
          gradient reduction is switched off (``require_backward_grad_sync``), so gradients are
          reduced once.
        """
        if self.closed:
            return
        self._follow_device()
        if "embeddings" not in self._always and getattr(module, "_require_grads_hooks", None):
            module.disable_input_require_grads()
        if not torch.is_grad_enabled():
            return
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            ddp = _calling_ddp(module)
            if ddp is not None:
                if self.backend.world_size == 1:
                    raise RuntimeError(
                        "the model is wrapped in DistributedDataParallel but GrassOptimizer was built with "
                        "distributed=False (or before torch.distributed was initialised): GRASS's probing "
                        "frees the gradients DDP would reduce. Build it with distributed='auto' after "
                        "init_process_group (the HF Trainer does both in the right order)"
                    )
                self._ddp = weakref.ref(ddp)
        if ddp is not None:
            ddp.require_backward_grad_sync = False

    def _before_block(self, block: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook of every decoder block: under *reentrant* activation checkpointing
        (``use_reentrant=True``) a checkpointed block computes gradients only if an input requires
        grad. With the embeddings frozen, the hidden states entering the lowest active block do not,
        so they are replaced by a leaf that does (nothing below needs a gradient)."""
        if self.closed or not block.training or not torch.is_grad_enabled() or "embeddings" in self._always:
            return None
        if not getattr(block, "gradient_checkpointing", False):
            return None
        keywords = getattr(getattr(block, "_gradient_checkpointing_func", None), "keywords", None) or {}
        if keywords.get("use_reentrant", True) is False:
            return None
        lowest = 0 if self.probing else min(self._active, default=0)
        if block is not self.groups.blocks[lowest] or not args:
            return None
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    # ------------------------------------------------------------------------------------------
    # state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: PyTorch's optimizer format (param groups, and per
        parameter ``step``, ``exp_avg``, ``exp_avg_sq`` and ``master`` when enabled, always as tensors
        independent of offloading) plus a ``grass`` entry with the sampler, RNG, MGN and schedule.
        Take it between optimizer steps (not between the micro-batches of one)."""
        sd = super().state_dict()
        # torch.optim packs the live per-parameter dicts: copy them before adding to them
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}
        if self._offloader is not None:
            # offloaded moments live in host buffers; put copies where torch.optim keeps them
            index = self._packed_index()
            for p, moments in self._param_states(offloaded_only=True).items():
                sd["state"][index[id(p)]].update(moments)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, st in sd["state"].items():  # FSDP2: states as DTensors sharded like their parameters
            sd["state"][i] = {
                k: v if k == "step" else self.backend.export_state(v, params[i]) for k, v in st.items()
            }
        sd["grass"] = {
            "version": 2,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "global_step": self.global_step,
            "probe_done": self.probe_done,
            "period_pos": self.period_pos,
            "skipped_steps": self.skipped_steps,
            "active": list(self._active),
            "importance": self.importance_tracker.state_dict(),
            "sampler": self.sampler.state_dict(),
        }
        return self.backend.consolidate_state_dict(sd)  # collective when sharding; rank 0's is complete

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, whatever device its tensors were moved to (accelerate moves an
        optimizer's whole state to the accelerator): every piece goes where this optimizer keeps it."""
        state_dict = dict(state_dict)
        grass = state_dict.pop("grass", None)
        if grass is None:
            raise ValueError(
                "state_dict has no 'grass' entry: it was not saved by GrassOptimizer.state_dict()"
            )
        if grass.get("partial_shard"):
            raise ValueError(
                f"state_dict is rank {grass['partial_shard']['rank']}'s part of a sharded optimizer; save and "
                "load the state_dict() of rank 0, which holds every rank's states"
            )
        if grass["num_layers"] != self.num_layers:
            raise ValueError(
                f"state_dict is for a model with {grass['num_layers']} decoder layers, this one has {self.num_layers}"
            )
        groups = list(state_dict["param_groups"])
        if len(groups) == len(self.param_groups) - 1:  # saved before the loss-scale probe existed
            n = sum(len(g["params"]) for g in groups)
            groups.append({**self.param_groups[-1], "params": [n]})
            groups[-1] = {k: v for k, v in groups[-1].items() if k != "initial_lr" or k in groups[0]}
        # torch.optim would cast the moments to the weights' dtype and device; keep them aside and place
        # them ourselves (fp32 moments stay fp32, offloaded ones go to host buffers, step to the CPU)
        tensors: dict[int, dict[str, torch.Tensor]] = {}
        stripped = {}
        for idx, st in state_dict.get("state", {}).items():
            tensors[idx] = {k: v for k, v in st.items() if k != "step"}
            stripped[idx] = {
                k: torch.as_tensor(v).to("cpu", torch.float32) for k, v in st.items() if k == "step"
            }
        super().load_state_dict({**state_dict, "param_groups": groups, "state": stripped})
        params = [p for g in self.param_groups for p in g["params"]]
        self._place_param_states(
            {
                params[idx]: {k: self.backend.import_state(v, params[idx]) for k, v in moments.items()}
                for idx, moments in tensors.items()
            }
        )
        for j, group in enumerate(self._units):  # ZeRO-1 on this world size; any world size loads
            if not self.backend.owns(j):
                for p in group["params"]:
                    self.state.pop(p, None)
        self._sib_ready, self._sib_stepped = {}, set()
        self._reset_step_state()
        self.importance_tracker.load_state_dict(grass["importance"])
        self.sampler.load_state_dict(grass["sampler"])
        self.global_step = int(grass["global_step"])
        self.probe_done = int(grass["probe_done"])
        self.period_pos = int(grass["period_pos"])
        self.skipped_steps = int(grass.get("skipped_steps", 0))
        if self.probing:
            self._active = []
            self._start_probe()
        else:
            self._active = sorted(int(i) for i in grass["active"])
            self._set_requires_grad(set(self._active), extra=True)

    def _param_states(self, offloaded_only: bool = False) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """The AdamW state tensors (not ``step``) of every parameter that has state, wherever they live:
        offloaded ones as host copies, the others as they are."""
        out: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        units = self._offloader.state_dict()["units"] if self._offloader is not None else {}
        for group in self._units:
            staged = units.get(group["unit"])
            for p in group["params"]:
                st = self.state.get(p, {})
                if "step" not in st:
                    continue
                if staged is not None and id(p) in self._offload_index:
                    k = self._offload_index[id(p)]
                    out[p] = {key: staged[key][k].clone() for key in staged}
                elif not offloaded_only:
                    out[p] = {k: v for k, v in st.items() if k != "step"}
        return out

    def _place_param_states(self, states: dict[nn.Parameter, dict[str, torch.Tensor]]) -> None:
        """Put per-parameter AdamW state tensors (any device) where this optimizer keeps them: offloaded
        units' into the offloader's host buffers (units absent from ``states`` start afresh), the others
        into ``self.state`` on their parameter's device."""
        offloaded: dict[str, dict[str, list]] = {}
        for p, moments in states.items():
            if self._offloader is not None and id(p) in self._offload_index:
                unit = self._units[self._unit_of[id(p)]]["unit"]
                offloaded.setdefault(unit, {}).setdefault("_items", []).append((p, moments))
                for key in moments:
                    self.state[p].pop(key, None)
            else:
                self.state[p].update({k: v.to(self.backend.local(p).device) for k, v in moments.items()})
        if self._offloader is not None:
            self._offloader.load_state_dict({"units": self._fill_units(offloaded)})

    def _params_device(self) -> torch.device:
        return next(iter(self.groups.block_params[0])).device

    def _follow_device(self) -> None:
        """Every tensor the optimizer keeps follows its parameters. The HF Trainer, ``accelerate.prepare``
        and many loops move the model after the optimizer was built from it: the first forward, backward
        or ``step()`` after a move brings the step's buffers, the MGN accumulators, the loss-scale probe and
        every AdamW state to the parameters' new device, and rebuilds the offloader for it (``offload=
        "auto"`` turns offload on for CUDA). Values are unchanged."""
        device = self._params_device()
        if device == self._device:
            return
        if self._backwards or self._host_acc or self._sib_stepped:
            raise RuntimeError(
                f"the model moved from {self._device} to {device} in the middle of an optimizer step; move it "
                "before the first forward pass or after optimizer.step()"
            )
        states = self._param_states()
        self._device = device
        probe = self.loss_scale_probe  # a param group's parameter: moved in place, the object stays
        probe.grad = None
        moved = probe.detach().to(device)
        if torch._has_compatible_shallow_copy_type(probe, moved):
            probe.data = moved
        else:  # e.g. to meta (grass-llm memory, tests)
            torch.utils.swap_tensors(probe, nn.Parameter(moved, requires_grad=probe.requires_grad))
        self._param_sumsq = self._param_sumsq.to(device)
        self._block_rows = self._block_rows.to(device)
        self._block_layers = self._block_layers.to(device)
        self.importance_tracker.to(device)
        self._reset_step_state()
        self._offloader = self._make_offloader(device)
        self._place_param_states(states)

    def _packed_index(self) -> dict[int, int]:
        """id(param) -> its index in torch.optim's packed state_dict (running over the param groups)."""
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _fill_units(self, offloaded: dict[str, dict[str, list]]) -> dict[str, dict[str, list[torch.Tensor]]]:
        """Offloader state for the units in a checkpoint, in the layout registered now; parameters without
        saved moments get zeros (and a master copy of their current value), as a first use would give them.
        A master saved by a run with the other precision setting becomes a compensation and vice versa."""
        cfg = self.config
        units = {}
        for unit, entry in offloaded.items():
            have = {id(p): m for p, m in entry["_items"]}
            keys = self._offload_keys[unit]
            out: dict[str, list[torch.Tensor]] = {key: [] for key in sorted(keys)}
            for full in self._offload_params[unit]:
                p = self.backend.local(full).detach()
                dtype = torch.float32 if cfg.fp32_optimizer_states else p.dtype
                m = have.get(id(full), {})
                for key in ("exp_avg", "exp_avg_sq"):
                    out[key].append(
                        m[key].to("cpu", dtype) if key in m else torch.zeros(p.shape, dtype=dtype)
                    )
                current = p.to("cpu", torch.float32)
                exact = self._exact_value(p.cpu(), m)
                if "master" in keys:
                    out["master"].append(exact if exact is not None else current)
                if "compensation" in keys:
                    out["compensation"].append(
                        (exact - current).to(p.dtype)
                        if exact is not None
                        else torch.zeros(p.shape, dtype=p.dtype)
                    )
            units[unit] = out
        return units

    def __repr__(self) -> str:
        return (
            f"GrassOptimizer(layers={self.num_layers} at {self.groups.block_path!r}, policy={self.config.policy}, "
            f"active={self._active}, step={self.global_step}, probing={self.probing})"
        )
