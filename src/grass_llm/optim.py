"""``GrassOptimizer``: AdamW that trains only the decoder layers GRASS samples, one state per layer.

Life of a run (one ``step()`` = one optimizer step, after all micro-batches of gradient accumulation):

1. Probing, ``probe_steps`` steps. Every decoder layer requires grad; a gradient-ready hook on each
   parameter adds ``||grad||^2`` to its layer's running sum and frees ``.grad`` at once, so no
   gradient memory is held. ``step()`` turns the sums into MGN observations and changes no weight.
   With k micro-batches per step the hooks see the micro-batch gradients g_i, not their sum; the
   observation is then ``sqrt(k * sum_i ||g_i||^2 / N)``, which equals the accumulated gradient's
   ``sqrt(||sum_i g_i||^2 / N)`` when the micro-batch gradients agree and is an upper estimate
   otherwise (holding the accumulated gradient would cost a full gradient copy).
2. Training. Every ``period`` steps the sampler draws ``active_layers`` layers; only they (and the
   embeddings / norm / head groups switched on in the config) require grad and are stepped. The
   optimizer sets ``requires_grad`` itself, so backward stops at the lowest active layer when the
   embeddings are frozen. ``step()`` reads the MGN of the active layers from their gradients (one
   fused ``torch._foreach_norm``, no host sync), clips if configured, and runs AdamW. At the end of
   a period the MGN of the trained layers is updated by EMA (eq. 4) and new layers are drawn.

The AdamW arithmetic is PyTorch's own functional ``torch.optim.adam.adam`` with
``decoupled_weight_decay=True``, called with the same defaults as ``torch.optim.AdamW``, so with every
layer active the result equals ``torch.optim.AdamW`` bit for bit (fp32 weights, or bf16 weights with
``update_rounding="nearest"`` and no masters). It runs on pieces of at most a few million elements (AdamW
is elementwise, so the numbers do not change) to bound the temporaries of the update, and, with offload,
on the chunks the offloader stages. bf16/fp16 weights do not lose updates below their resolution: by
default they get fp32 master weights in host memory under offload, else a Kahan compensation buffer
(``GrassConfig.fp32_master_weights``, ``GrassConfig.update_rounding``). ``param_groups`` has one group per
unit (each decoder layer, ``embeddings``, ``norm``, ``head``) so LR schedulers change the LR applied.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
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

__all__ = ["GrassOptimizer"]

_EXTRA_GROUPS = ("embeddings", "norm", "head")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: Offloaded states are staged in chunks of at most this many bytes: the device holds two of them (the chunk
#: being updated and the next one, prefetched), whatever the size of a layer, the embeddings or the head.
OFFLOAD_CHUNK_BYTES = 32 * 2**20
#: Without offload the update runs on pieces of at most this many elements (bounds its fp32 temporaries).
UPDATE_CHUNK_ELEMENTS = 4 * 2**20


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


class GrassOptimizer(torch.optim.Optimizer):
    """AdamW over GRASS-sampled decoder layers.

    Args:
        model: the model to fine-tune. Its decoder blocks are found by introspection (see
            ``grass_llm.layers``) unless ``layers`` names them.
        config: a ``GrassConfig``; the paper's defaults when omitted.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (``torch.optim.AdamW`` semantics;
            weight decay is decoupled and applies to every trained parameter).
        layers: override for the decoder blocks: a dotted module path or ``model -> blocks``
            (default: ``config.layers``, else introspection).
        foreach: passed to the functional AdamW (``None``: PyTorch's default for the device).
        distributed: the data-parallel backend (``grass_llm.distributed``): ``"auto"`` uses the replicated
            backend when torch.distributed is initialised with more than one rank; ``None``/``False``: one
            process; or a ``DataParallelBackend`` (e.g. ``ReplicatedBackend(shard_optimizer_states=True)``).
            Do not wrap the model in DDP.
    """

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
        self.model = model
        # parameters the user froze before handing us the model stay frozen
        self._user_frozen = {id(p) for p in model.parameters() if not p.requires_grad}

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
        param_groups: list[dict[str, Any]] = []
        for i, params in enumerate(self.groups.block_params):
            param_groups.append({"params": params, "unit": f"layer.{i}", "layer": i})
        for name in _EXTRA_GROUPS:
            params = getattr(self.groups, name)
            if params:
                param_groups.append({"params": params, "unit": name, "layer": None})
        super().__init__(param_groups, defaults)
        self._unit_id = {g["unit"]: j for j, g in enumerate(self.param_groups)}  # unit name -> index

        cfg = self.config
        # invariant: the backend exists before the tracker and sampler that use it, and is attached
        # before the first draw and before the probing hooks are registered
        self.backend = resolve_backend(distributed, model)
        trackable = [self.groups.numel(i) for i in range(self.groups.num_layers)]
        device = next(iter(self.groups.block_params[0])).device
        self.importance_tracker = ImportanceTracker(
            trackable, device=device, reduce_sumsq=self.backend.reduce_sumsq_
        )
        self.sampler = LayerSampler(
            self.groups.num_layers,
            cfg.active_layers,
            cfg.policy,
            cfg.temperature,
            cfg.seed,
            broadcast=self.backend.broadcast_layers,
        )
        self._layer_of = {id(p): i for i, ps in enumerate(self.groups.block_params) for p in ps}
        self.global_step = 0
        self.probe_done = 0
        self.period_pos = 0
        self._active: list[int] = []
        self._probe_handles: list[Any] = []
        self._probe_micro = 0
        self._probe_ref: nn.Parameter | None = None
        self._always = {name for name in _EXTRA_GROUPS if getattr(cfg, f"train_{name}")}
        self._warned_no_grad = False
        self._fwd_hook = model.register_forward_pre_hook(self._strip_input_require_grads)
        self._offloader = self._make_offloader(device)

        self.backend.attach(
            [[p for p in g["params"] if id(p) not in self._user_frozen] for g in self.param_groups]
        )
        self._accumulating = False  # inside no_sync(): a non-final micro-batch
        self._sib_ready: dict[int, int] = {}  # param-group index -> gradients ready in this backward
        self._sib_stepped: set[int] = set()  # param-group indices updated in backward since step()
        self._sib_handles: list[Any] = []
        if cfg.step_in_backward:
            if not isinstance(self.backend, LocalBackend):
                raise ValueError(
                    "step_in_backward=True is not supported with data-parallel sync (the update would run "
                    "before the gradient all-reduce); set step_in_backward=False or distributed=False"
                )
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    if id(p) not in self._user_frozen:
                        self._sib_handles.append(
                            p.register_post_accumulate_grad_hook(self._make_sib_hook(gi))
                        )
        if cfg.probe_steps > 0:
            self._start_probe()
        else:
            self._finish_probe()

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
        """Context for the backward passes of all micro-batches but the last: no gradient all-reduce
        across ranks, and no update from the backward hooks with ``step_in_backward`` (on one process
        without ``step_in_backward`` it changes nothing)."""
        previous = self._accumulating
        self._accumulating = True
        try:
            with self.backend.no_sync():
                yield
        finally:
            self._accumulating = previous

    # ------------------------------------------------------------------------------------------
    # step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.probing:
            self._probe_step()
        else:
            self._train_step()
        self.global_step += 1
        return loss

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of the trained parameters to ``max_norm``; returns the total norm (on device)."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)

    def _probe_step(self) -> None:
        micro = self._probe_micro
        if micro == 0 and not self._warned_no_grad:
            warnings.warn(
                "GrassOptimizer.step() during probing saw no backward pass since the last step",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_no_grad = True
        self.importance_tracker.observe_step(
            range(self.num_layers) if micro else [], scale=float(max(micro, 1))
        )
        self._probe_micro = 0
        self.probe_done += 1
        if self.probe_done == self.config.probe_steps:
            self._finish_probe()

    def _train_step(self) -> None:
        # every rank now holds the gradients of the global batch
        self.backend.reduce_gradients([self._unit_id[g["unit"]] for g in self._trained_groups()])
        # layers updated in backward (step_in_backward) had their squared norms added there already
        done = {self.param_groups[gi]["layer"] for gi in self._sib_stepped} - {None}
        grads: dict[int, list[torch.Tensor]] = {}
        for layer in self._active:
            gs = [p.grad for p in self.groups.block_params[layer] if p.grad is not None]
            if gs and layer not in done:
                grads[layer] = gs
        if len(grads) + len(done) < len(self._active) and not self._warned_no_grad:
            missing = sorted(set(self._active) - set(grads) - done)
            warnings.warn(
                f"active layers {missing} received no gradient this step (was backward called? with gradient "
                "checkpointing use use_reentrant=False, or grass_llm.enable_gradient_checkpointing)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_no_grad = True
        if done:
            self.importance_tracker.add_grads(grads)
            self.importance_tracker.observe_step(sorted(done | set(grads)))
        else:
            self.importance_tracker.observe_grads(grads)
        if self.config.max_grad_norm is not None:
            self.clip_grad_norm_(self.config.max_grad_norm)
        trained = [g for g in self._trained_groups() if any(p.grad is not None for p in g["params"])]
        self._step_groups([g for g in trained if self.backend.owns(self._unit_id[g["unit"]])])
        # ZeRO-1: each owner sends its units' new weights
        self.backend.broadcast_updates([self._unit_id[g["unit"]] for g in trained])
        self.period_pos += 1
        if self.period_pos == self.config.period:
            self._resample()
        self._sib_ready, self._sib_stepped = {}, set()
        if self._sib_handles and self._offloader is not None:
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
            for p in params:
                self._ensure_precision_state(p)
                n = p.numel()
                if n <= UPDATE_CHUNK_ELEMENTS or not p.is_contiguous():
                    pieces.append((p, 0, n))
                else:
                    pieces += [
                        (p, a, min(a + UPDATE_CHUNK_ELEMENTS, n)) for a in range(0, n, UPDATE_CHUNK_ELEMENTS)
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

    def _ensure_precision_state(self, p: torch.Tensor) -> None:
        """In-memory state of ``p``: the moments, and the master or compensation its precision needs. A
        state loaded from a run with the other precision setting is converted (master <-> compensation)."""
        state = self.state[p]
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
        by_dtype: dict[torch.dtype, dict[str, list]] = {}
        for k, (p, a, b) in enumerate(pieces):
            whole = (a, b) == (0, p.numel())
            lists = by_dtype.setdefault(p.dtype, {"p": [], "g": [], "step": [], "where": []})

            def cut(t: torch.Tensor, whole=whole, a=a, b=b) -> torch.Tensor:
                return t if whole else t.reshape(-1)[a:b]

            lists["p"].append(p.detach() if whole else p.detach().view(-1)[a:b])
            lists["g"].append(cut(p.grad))
            lists["step"].append(torch.tensor(step_of[id(p)] - 1, dtype=torch.float32))
            lists["where"].append((self._param_numbers[id(p)], a))
            if staged is not None:
                for key, ts in staged.items():
                    lists.setdefault(key, []).append(ts[k])
            else:
                for key, t in self.state[p].items():
                    if key != "step":
                        lists.setdefault(key, []).append(cut(t))
        for lists in by_dtype.values():
            self._adamw_update(group, lists)

    def _adamw_update(self, group: dict[str, Any], lists: dict[str, list]) -> None:
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
            weight_decay=group["weight_decay"],
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
    # step_in_backward: each trained unit is updated from a gradient-ready hook
    def _make_sib_hook(self, gi: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self.probing or self._accumulating:
                return
            group = self.param_groups[gi]
            if gi in self._sib_stepped:
                raise RuntimeError(
                    f"step_in_backward: a second backward pass reached {group['unit']!r} before step(); with "
                    "gradient accumulation run every micro-batch but the last under optimizer.no_sync()"
                )
            n = self._sib_ready.get(gi, 0) + 1
            self._sib_ready[gi] = n
            # invariant: the unit's trainable parameters are exactly those with requires_grad (set by
            # _set_requires_grad), and each one's hook fires once per backward pass
            if n == sum(q.requires_grad for q in group["params"] if id(q) not in self._user_frozen):
                self._step_unit_in_backward(gi)

        return hook

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
        group = self.param_groups[gi]
        if group["layer"] is not None:
            layer = group["layer"]
            self.importance_tracker.add_grads(
                {layer: [q.grad for q in self.groups.block_params[layer] if q.grad is not None]}
            )
        following = None
        if self._offloader is not None:
            done = {self.param_groups[k]["unit"] for k in self._sib_stepped} | {group["unit"]}
            later = [g for g in self._backward_order() if g["unit"] not in done]
            if later:
                following = later[0]["unit"]  # its copy-in overlaps this update and the backward below
        self._update_unit(group, following)
        for q in group["params"]:
            q.grad = None  # invariant: queued kernels keep the memory alive (caching allocator, same stream)
        self._sib_stepped.add(gi)

    def _make_offloader(self, device: torch.device):
        """A LayerStateOffloader with one unit per param group that can be trained (every decoder layer, and
        the embeddings / norm / head only when the config trains them), or None when offload is off. Also
        settles the update precision (masters, compensation) that the registered state layout holds."""
        cfg = self.config
        # auto: on for CUDA; meta is where grass-llm memory runs a CUDA configuration on fake tensors
        on = device.type in ("cuda", "meta") if cfg.offload == "auto" else bool(cfg.offload)
        trainable = [g for g in self.param_groups if g["layer"] is not None or g["unit"] in self._always]
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
                params,
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
            for g in self.param_groups
            if (g["layer"] is not None and g["layer"] in active)
            or (g["layer"] is None and g["unit"] in self._always)
        ]

    def _start_probe(self) -> None:
        """Every block trainable; hooks read each gradient's norm and free it."""
        self._set_requires_grad(set(range(self.num_layers)), extra=False)
        self.backend.set_trained([])
        self._remove_probe_hooks()
        for i, params in enumerate(self.groups.block_params):
            for p in params:
                if id(p) in self._user_frozen:
                    continue
                if self._probe_ref is None:
                    self._probe_ref = p
                self._probe_handles.append(p.register_post_accumulate_grad_hook(self._make_probe_hook(i)))

    def _make_probe_hook(self, layer: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            # invariant: the norm kernel is queued on the stream that produced the gradient, before
            # the grad is dropped; the caching allocator keeps the memory until that kernel has run
            self.importance_tracker.add_sumsq(layer, p.grad)
            if p is self._probe_ref:
                self._probe_micro += 1
            p.grad = None

        return hook

    def _remove_probe_hooks(self) -> None:
        for h in self._probe_handles:
            h.remove()
        self._probe_handles = []

    def _finish_probe(self) -> None:
        self._remove_probe_hooks()
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
        self.backend.set_trained([self._unit_id[g["unit"]] for g in self._trained_groups()])

    def _set_requires_grad(self, layers: set[int], extra: bool) -> None:
        for group in self.param_groups:
            if group["layer"] is not None:
                on = group["layer"] in layers
            else:
                on = extra and group["unit"] in self._always
            for p in group["params"]:
                p.requires_grad_(on and id(p) not in self._user_frozen)
                if not p.requires_grad:
                    p.grad = None

    def _strip_input_require_grads(self, module: nn.Module, args: Any) -> None:
        """HF's ``enable_input_require_grads`` (installed by gradient checkpointing) makes the embedding
        output require grad, which forces backward through every frozen layer. Remove it unless the
        embeddings train."""
        if "embeddings" in self._always:
            return
        if getattr(module, "_require_grads_hooks", None) and hasattr(module, "disable_input_require_grads"):
            module.disable_input_require_grads()

    # ------------------------------------------------------------------------------------------
    # state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: PyTorch's optimizer format (param groups, and per
        parameter ``step``, ``exp_avg``, ``exp_avg_sq`` and ``master`` when enabled, always as tensors
        independent of offloading) plus a ``grass`` entry with the sampler, RNG, MGN and schedule."""
        sd = super().state_dict()
        if self._offloader is not None:
            # offloaded moments live in host buffers; put copies where torch.optim keeps them
            units = self._offloader.state_dict()["units"]
            index = self._packed_index()
            for group in self.param_groups:
                staged = units.get(group["unit"])
                if staged is None:
                    continue
                for p in group["params"]:
                    if "step" not in self.state.get(p, {}) or id(p) not in self._offload_index:
                        continue
                    k = self._offload_index[id(p)]
                    sd["state"][index[id(p)]].update({key: staged[key][k].clone() for key in staged})
        sd["grass"] = {
            "version": 1,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "global_step": self.global_step,
            "probe_done": self.probe_done,
            "period_pos": self.period_pos,
            "active": list(self._active),
            "importance": self.importance_tracker.state_dict(),
            "sampler": self.sampler.state_dict(),
        }
        sd = self.backend.consolidate_state_dict(sd)  # collective when sharding; rank 0's is complete
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        # torch.optim would cast the moments to the weights' dtype and device; keep them aside and place
        # them ourselves (fp32 moments stay fp32, offloaded ones go to host buffers)
        tensors: dict[int, dict[str, torch.Tensor]] = {}
        stripped = {}
        for idx, st in state_dict.get("state", {}).items():
            tensors[idx] = {k: v for k, v in st.items() if k != "step"}
            stripped[idx] = {k: v for k, v in st.items() if k == "step"}
        super().load_state_dict({**state_dict, "state": stripped})
        params = [p for g in self.param_groups for p in g["params"]]
        offloaded: dict[str, dict[str, list[torch.Tensor]]] = {}
        for idx, moments in tensors.items():
            p = params[idx]
            if self._offloader is not None and id(p) in self._offload_index:
                unit = next(g["unit"] for g in self.param_groups if any(q is p for q in g["params"]))
                offloaded.setdefault(unit, {}).setdefault("_items", []).append((p, moments))
            else:
                self.state[p].update({k: v.to(p.device) for k, v in moments.items()})
        if self._offloader is not None:
            self._offloader.load_state_dict({"units": self._fill_units(offloaded)})
        for j, group in enumerate(self.param_groups):  # ZeRO-1 on this world size; any world size loads
            if not self.backend.owns(j):
                for p in group["params"]:
                    self.state.pop(p, None)
        self._sib_ready, self._sib_stepped = {}, set()
        self.importance_tracker.load_state_dict(grass["importance"])
        self.sampler.load_state_dict(grass["sampler"])
        self.global_step = int(grass["global_step"])
        self.probe_done = int(grass["probe_done"])
        self.period_pos = int(grass["period_pos"])
        self._probe_micro = 0
        if self.probing:
            self._active = []
            self._start_probe()
        else:
            self._remove_probe_hooks()
            self._active = sorted(int(i) for i in grass["active"])
            self._set_requires_grad(set(self._active), extra=True)
            self.backend.set_trained([self._unit_id[g["unit"]] for g in self._trained_groups()])

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
            for p in self._offload_params[unit]:
                dtype = torch.float32 if cfg.fp32_optimizer_states else p.dtype
                m = have.get(id(p), {})
                for key in ("exp_avg", "exp_avg_sq"):
                    out[key].append(
                        m[key].to("cpu", dtype) if key in m else torch.zeros(p.shape, dtype=dtype)
                    )
                exact = self._exact_value(p.cpu(), m)
                current = p.detach().to("cpu", torch.float32)
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
