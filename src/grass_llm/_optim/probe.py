"""What the gradient-ready hooks read: each step's squared gradient norms, micro-batch by micro-batch.

Probing (every layer requires grad, nothing is updated): each gradient is read and freed at once, so no
gradient memory is held on the device. With gradient accumulation the observation is eq. 2 of the
*accumulated* gradient of the step: the micro-batches before the last add their gradients to a host buffer
(one per parameter, allocated on first use) and the last one adds the buffer to its gradient before the
norm is read. Which micro-batch is the last: all but the last run under ``optimizer.no_sync()`` (or, with
accelerate / the HF Trainer, with ``sync_gradients`` off). A loop that marks nothing has its number ``k`` of
micro-batches learned: its first step (and any later step with more backward passes than ``k``) cannot be
exact, so it is not observed and not counted (probing lasts one step longer); the others are exact.

Training: the hooks read each trained gradient's squared norm as it becomes final (the accumulated
gradient of the step), before anything (a Trainer, the user) clips it; with data-parallel backends the
backend calls :meth:`GradientProbe.on_reduced` once the gradients are the global batch's.

Loss scale: a one-element ``loss_scale_probe`` parameter (the optimizer's last param group) gets the gradient
1 (inf after a non-finite norm) at the end of every backward. ``torch.amp.GradScaler`` checks it and, if
the user unscales first, unscales it with the real gradients, so its value tells by how much the squared
norms read in the hooks are scaled (:func:`loss_scale_factor`), and an overflow during probing (whose
gradients are freed) reaches the scaler like any other.

Hook invariants:
H1. A norm kernel is queued on the stream that produced the gradient, before the gradient is dropped; the
    caching allocator keeps the memory until that kernel has run.
H2. The end-of-backward callback is queued by the first hook of each backward pass, after the backend's
    (queued at attach), so the backend's reductions have run when it finalises probing.
H3. All per-step state is reset in one place, :meth:`GradientProbe.reset`, which the optimizer calls at the
    end of every ``step()``, whatever the step's outcome.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

from grass_llm._optim.units import UnitTable
from grass_llm.distributed.base import DataParallelBackend

__all__ = ["GradientProbe", "accelerate_sync_gradients", "check_scaler", "loss_scale_factor"]


def accelerate_sync_gradients() -> bool | None:
    """accelerate's ``GradientState.sync_gradients`` when an Accelerator (or the HF Trainer) uses it, else
    None. Read without importing accelerate."""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None)
    if not shared:
        return None
    return bool(shared.get("sync_gradients", True))


def check_scaler(grad_scale: Any, backend: DataParallelBackend, step_in_backward: bool) -> None:
    """Refuse a GradScaler where it cannot work: a backend whose ranks' overflow checks could differ, or
    updates made during backward (before the scaler has checked the gradients)."""
    if grad_scale is not None and not backend.supports_grad_scaler:
        raise RuntimeError(
            f"a GradScaler cannot be used with {type(backend).__name__}: its overflow check would differ "
            "between ranks; train in bf16 (or fp32)"
        )
    if step_in_backward and grad_scale is not None:
        raise RuntimeError(
            "step_in_backward=True cannot be used with a GradScaler: the updates run during backward, "
            "before the scaler has checked the gradients; use bf16, or step_in_backward=False"
        )


def loss_scale_factor(probe_grad: torch.Tensor | None, grad_scale: Any, device: torch.device) -> torch.Tensor | None:
    """What the squared norms read in the hooks must be multiplied by: 1/scale² when GradScaler left the
    unscaling to the optimizer (``grad_scale`` set); else the square of the probe's gradient (1, or 1/scale
    after the user's ``unscaler_``, or inf after a non-finite norm); None when no backward ran."""
    if grad_scale is not None:
        return torch.as_tensor(grad_scale, dtype=torch.float64, device=device).reciprocal().square()
    if probe_grad is not None:
        return probe_grad.double().square()
    return None


class GradientProbe:
    """Per-step gradient readings (module docstring). ``probing()`` tells the phase; ``on_unit_grad`` is
    called in training for every trainable gradient (step_in_backward counts them)."""

    def __init__(
        self,
        units: UnitTable,
        backend: DataParallelBackend,
        loss_scale_probe: torch.Tensor,
        probing: Callable[[], bool],
        owner: Any,
    ) -> None:
        self.units = units
        self.backend = backend
        self.loss_scale_probe = loss_scale_probe
        self._probing = probing
        self._owner = weakref.ref(owner)  # the optimizer: callbacks go through it (closed check)
        self.accumulating = False  # inside no_sync(): a non-final micro-batch
        self.marks_seen = False  # some backward was marked non-final (no_sync / sync_gradients)
        self.k: int | None = None  # micro-batches per step of an unmarked loop, learned
        self.reset()

    # ------------------------------------------------------------------ per-step state (H3)
    def reset(self) -> None:
        """Forget this step's readings (the end of every ``step()``)."""
        self.param_sumsq = self.units.zeros()
        self.host_acc: dict[int, torch.Tensor] = {}  # probing: gradient sums of non-final micro-batches
        self.final_seen: set[int] = set()  # probing: parameters whose final micro-batch was read
        self.backwards = 0  # backward passes seen in this step
        self.in_backward = False
        self.this_backward_final = True
        self.inexact = False  # probing: a micro-batch came after the one taken as the last
        self.probe_sumsq: torch.Tensor | None = None  # probing: per-layer, global, finalised
        self.probe_units: dict[int, dict[int, torch.Tensor]] = {}  # layer -> its final gradients so far
        self.probe_layer_sumsq = torch.zeros(self.units.num_layers, dtype=torch.float64, device=self.units.device)

    # ------------------------------------------------------------------ hooks
    def on_grad(self, p: torch.Tensor) -> None:
        """Gradient-ready hook of every trainable parameter (all phases)."""
        if not self.in_backward:
            self._on_backward_start()
        if self._probing():
            self._probe_grad(p)
        elif self.backend.gradients_final_in_hooks:
            g = self.backend.local(p.grad)  # FSDP2: this rank's shard (reduce_sumsq_ sums the shards)
            self.param_sumsq[self.units.row[id(p)]] = torch.linalg.vector_norm(g, dtype=torch.float32).double().square()

    def _on_backward_start(self) -> None:
        """First hook of a backward pass: count it, decide whether it is the step's last micro-batch, and
        queue the end-of-backward callback (H2)."""
        self.in_backward = True
        self.backwards += 1
        marked = self.accumulating or accelerate_sync_gradients() is False
        if marked:
            self.marks_seen = True
        self.this_backward_final = not marked and (self.marks_seen or self.k is None or self.backwards >= self.k)
        owner = self._owner
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: None if owner() is None else owner()._on_backward_end()
        )

    def _probe_grad(self, p: torch.Tensor) -> None:
        """Probing: add this micro-batch's gradient to the step's (host buffer, squared norm, or the
        backend's reduction of its layer) and free it (H1)."""
        key = id(p)
        g = self.backend.local(p.grad)
        p.grad = None
        if key in self.final_seen:  # more micro-batches than the step was expected to have
            self.inexact = True
            return
        if not self.this_backward_final:
            acc = self.host_acc.get(key)
            if acc is None:
                self.host_acc[key] = g.detach().to("cpu", torch.float32, copy=True)
            else:
                acc.add_(g.detach().to("cpu", torch.float32))
            return
        acc = self.host_acc.pop(key, None)
        if acc is not None:
            g = g.to(torch.float32) + acc.to(g.device, non_blocking=True)
        self.final_seen.add(key)
        self._probe_add(key, g)

    def _probe_add(self, key: int, g: torch.Tensor) -> None:
        """A parameter's gradient of the step: its squared norm, or (data parallel) into its layer."""
        if not self.backend.probe_needs_whole_units:
            self.param_sumsq[self.units.row[key]] += torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
            return
        layer = self.units.layer_of[key]
        staged = self.probe_units.setdefault(layer, {})
        staged[key] = g
        if len(staged) == len(self.units.layer_params[layer]):
            self._reduce_probe_layer(layer)

    def _reduce_probe_layer(self, layer: int) -> None:
        """Hand one layer's gradients to the backend, in parameter order, zeros for missing ones (the same
        layout on every rank)."""
        staged = self.probe_units.pop(layer)
        grads = [staged[id(q)] if id(q) in staged else torch.zeros_like(q) for q in self.units.layer_params[layer]]
        probe = weakref.ref(self)
        self.backend.reduce_probe_unit(
            layer, grads, lambda i, v: None if probe() is None else probe()._on_probe_sumsq(i, v)
        )

    def _on_probe_sumsq(self, layer: int, value: torch.Tensor) -> None:
        self.probe_layer_sumsq[layer] += value.to(self.probe_layer_sumsq.device)

    def on_backward_end(self) -> None:
        """After every backward: finalise probing's squared norms on the last micro-batch, and give the
        loss-scale probe its gradient (inf when a norm is non-finite)."""
        self.in_backward = False
        if self._probing():
            if self.this_backward_final and not self.host_acc and not self.inexact:
                self.finalize_probe()
            total = self.param_sumsq.sum() if self.probe_sumsq is None else self.probe_sumsq.sum()
        else:
            total = self.param_sumsq.sum()
        one = torch.ones(1, dtype=torch.float32, device=self.loss_scale_probe.device)
        self.loss_scale_probe.grad = torch.where(torch.isfinite(total), one, torch.full_like(one, float("inf")))

    def finalize_probe(self) -> torch.Tensor:
        """Probing: the step's per-layer squared norms so far, made global by the backend (a collective: every
        rank finalises at the same points)."""
        for key in list(self.host_acc):  # micro-batches never followed by a final one
            self._probe_add(key, self.host_acc.pop(key).to(self.units.device))
        if self.backend.probe_needs_whole_units:
            for layer in sorted(self.probe_units):  # layers some of whose parameters had no gradient
                self._reduce_probe_layer(layer)
            self.backend.finish_probe_reductions()
            sumsq = self.probe_layer_sumsq.clone()
        else:
            sumsq = self.units.layer_sumsq(self.param_sumsq)
        self.backend.reduce_sumsq_(sumsq)
        self.probe_sumsq = sumsq
        return sumsq

    def end_probe_step(self) -> tuple[torch.Tensor | None, str | None]:
        """At ``step()`` during probing: (per-layer squared norms of the step, or None when it cannot be
        observed exactly, with the reason). Learns ``k`` for a loop that marks no micro-batch."""
        if not self.marks_seen:
            learned = self.k
            if learned is None or self.inexact:  # fewer passes than k are exact: all went to the host buffers
                self.k = self.backwards
            if self.inexact:
                return None, (
                    f"gradient accumulation over {self.backwards} backward passes without optimizer.no_sync() "
                    f"({'the first step' if learned is None else f'{learned} expected'}): this probing step "
                    "is not observed and is repeated; the following steps with as many backward passes are "
                    "exact. Run every micro-batch but the last under optimizer.no_sync() to make every step "
                    "exact"
                )
        elif self.inexact:
            return None, "a backward pass came after the micro-batch marked as the step's last"
        # the last finalisation (reentrant checkpointing runs nested backward passes, each finalising)
        return self.probe_sumsq if self.probe_sumsq is not None else self.finalize_probe(), None

    def on_reduced(self, unit_ids: list[int], groups: list[dict[str, Any]]) -> None:
        """The backend reduced these units' gradients: read their squared norms now (training)."""
        for j in unit_ids:
            params = [p for p in groups[j]["params"] if p.grad is not None and id(p) in self.units.row]
            if params:
                norms = torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float32)
                idx = torch.tensor([self.units.row[id(p)] for p in params], device=self.param_sumsq.device)
                self.param_sumsq.index_copy_(0, idx, torch.stack(norms).double().square().to(self.param_sumsq.device))
