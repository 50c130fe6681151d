"""Where each unit's AdamW state lives, and the update loop over a unit's pieces.

Residency (``GrassConfig.offload``):

* ``off``: every state in ``torch.optim``'s ``self.state`` on the parameters' device, created on a unit's
  first update and kept (with ``on_reactivation="keep"`` a long run ends up holding every layer's state).
* ``step`` (the paper's scheme, the least device memory): every unit's state in host memory; each update
  streams its unit through two 32 MiB device slots, chunk by chunk, the next chunk's copy-in overlapping
  the current chunk's update (``grass_llm.offload``).
* ``period``: every unit's state in host memory, and the active units' states kept on the device for as long
  as they stay active: a unit arriving in the active set is copied in and a leaving one written back, both
  on the copy stream and overlapping the next step's forward and backward, so a period moves no state
  between its resamples.

In the offloaded residencies ``self.state`` holds only each parameter's ``step`` counter (torch.optim's
layout); the moments (and masters or compensation) are the offloader's. Either way an update runs on
pieces of bounded size, so its fp32 temporaries are bounded whatever the size of a layer or the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from grass_llm._optim.adamw import Piece, adamw_pieces
from grass_llm._optim.precision import PrecisionPolicy, exact_value
from grass_llm._optim.units import UnitTable
from grass_llm._tensor import param_index
from grass_llm.config import GrassConfig
from grass_llm.distributed.base import DataParallelBackend
from grass_llm.offload import LayerStateOffloader

__all__ = ["OFFLOAD_CHUNK_BYTES", "RESIDENCIES", "UPDATE_CHUNK_ELEMENTS", "StateStore", "resolve_residency"]

#: Offloaded states are staged in chunks of at most this many bytes: streaming holds two of them on the
#: device (the chunk being updated and the next one, prefetched), whatever the size of a unit.
OFFLOAD_CHUNK_BYTES = 32 * 2**20
#: Without offload the update runs on pieces of at most this many elements (bounds its fp32 temporaries).
UPDATE_CHUNK_ELEMENTS = 4 * 2**20
RESIDENCIES = ("off", "step", "period")


def resolve_residency(offload: bool | str, device: torch.device) -> str:
    """``GrassConfig.offload`` -> ``off`` / ``step`` / ``period``. ``auto``: ``period`` on CUDA (and on
    ``meta``, where ``grass-llm memory`` runs a CUDA configuration): about the speed of keeping every state on
    the device, with the device memory of the active layers' states only; else ``off``. ``True`` is ``step``
    and ``False`` is ``off`` (their meaning before residencies had names)."""
    if offload == "auto":
        return "period" if device.type in ("cuda", "meta") else "off"
    if offload is True:
        return "step"
    if offload is False:
        return "off"
    return offload


class StateStore:
    """The AdamW states of every unit, where the residency puts them, and their update.

    Args:
        units: the unit table; ``groups()`` returns the optimizer's param groups now (unit ``j`` is group
            ``j``; torch.optim replaces the group dicts when loading a state dict).
        state: returns torch.optim's ``self.state`` now (also replaced when loading).
        trained_units: names of the units that can ever train (every layer, and the embeddings / norm /
            head the config trains): only they are registered with the offloader.
    """

    def __init__(
        self,
        config: GrassConfig,
        units: UnitTable,
        backend: DataParallelBackend,
        groups: Callable[[], list[dict[str, Any]]],
        state: Callable[[], dict[Any, dict[str, Any]]],
        trained_units: Iterable[str],
        no_decay: set[int],
        device: torch.device,
    ) -> None:
        self.config = config
        self.units = units
        self.backend = backend
        self._groups = groups
        self._state = state
        self.trained_units = list(trained_units)
        self.no_decay = no_decay
        # a parameter's position among all of them keys its stochastic-rounding random bits
        self.param_number = param_index(groups())
        self._kept: list[str] = []
        self.bind(device)

    def bind(self, device: torch.device) -> None:
        """(Re)build for the parameters' device: settle the residency and precision, register the offloaded
        units. States are moved by the caller (:meth:`param_states` before, :meth:`place_param_states` after)."""
        self.device = device
        self.residency = resolve_residency(self.config.offload, device)
        params = [p for name in self.trained_units for p in self._params(name)]
        self.precision = PrecisionPolicy.settle(self.config, {p.dtype for p in params}, self.residency)
        self.offloader: LayerStateOffloader | None = None
        self._index: dict[int, int] = {}  # id(param) -> its index in its unit's offloaded list
        self._offloaded: dict[str, list[nn.Parameter]] = {}
        self._kept = []
        if self.residency == "off":
            return
        off = LayerStateOffloader(device, overlap=self.config.overlap, chunk_bytes=OFFLOAD_CHUNK_BYTES)
        for name in self.trained_units:
            params = self._params(name)
            if not params:
                continue
            off.register(
                name,
                [self.backend.local(p) for p in params],  # FSDP2: this rank's shards
                fp32_states=self.precision.fp32_states,
                fp32_master=self.precision.use_master,
                compensation=any(self.precision.compensates(p.dtype) for p in params),
            )
            self._index.update({id(p): k for k, p in enumerate(params)})
            self._offloaded[name] = params
        self.offloader = off

    def _params(self, name: str) -> list[nn.Parameter]:
        return self.units.trainable_of(self.units.specs[self.units.index[name]][2])

    # ------------------------------------------------------------------ residency
    def activate(self, active_units: list[str], leaving: Iterable[str]) -> None:
        """The trained units changed (a draw): apply ``on_reactivation`` to the ``leaving`` ones and, with
        residency per period, keep exactly the trained units this rank updates on the device."""
        reset = self.config.on_reactivation == "reset"
        leaving = [u for u in leaving if u in self.units.index]
        off = self.offloader
        if reset:  # the step counters too, wherever the moments live
            for name in leaving:
                for p in self.units.specs[self.units.index[name]][2]:
                    self._state().pop(p, None)
        if off is None:
            return
        if self.residency == "period":
            kept = [u for u in active_units if u in self._offloaded and self.backend.owns(self.units.index[u])]
            off.keep_on_device(kept, discard=leaving if reset else ())
            self._kept = kept
        if reset:
            for name in leaving:
                if name in self._offloaded:
                    off.reset(name)

    def prefetch(self, unit: str) -> None:
        if self.offloader is not None and unit in self._offloaded:
            self.offloader.prefetch(unit)

    def traffic(self) -> tuple[int, int]:
        """(bytes copied to the device, bytes copied to the host) by the offloader so far."""
        off = self.offloader
        return (off.bytes_to_device, off.bytes_to_host) if off is not None else (0, 0)

    # ------------------------------------------------------------------ update
    def update(self, groups: list[dict[str, Any]], global_step: int) -> None:
        """AdamW on each group in turn; with offload the next group's first chunk is prefetched while one
        updates (streaming; kept units need no prefetch)."""
        if groups:
            self.prefetch(groups[0]["unit"])
        for i, group in enumerate(groups):
            self.update_unit(group, global_step, groups[i + 1]["unit"] if i + 1 < len(groups) else None)

    def update_unit(self, group: dict[str, Any], global_step: int, next_unit: str | None = None) -> None:
        """One AdamW step of the unit's parameters that have a gradient, in pieces; offloaded, chunk by chunk
        (acquire, prefetch the next chunk or ``next_unit``'s first, update, release)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("GrassOptimizer does not support sparse gradients")
        steps = self._advance_steps(params)
        off, unit = self.offloader, group["unit"]
        if off is None or unit not in self._offloaded:
            for chunk in self._device_chunks(params):
                adamw_pieces([self._piece(full, a, b, steps, None) for full, a, b in chunk], group,
                             self.precision, global_step)  # fmt: skip
            return
        registered = self._offloaded[unit]
        n_chunks = off.num_chunks(unit)
        for c in range(n_chunks):
            staged = off.acquire(unit, c)
            if c + 1 < n_chunks:
                off.prefetch(unit, c + 1)
            elif next_unit is not None:
                self.prefetch(next_unit)
            pieces = [
                self._piece(registered[i], a, b, steps, {key: ts[k] for key, ts in staged.items()})
                for k, (i, a, b) in enumerate(off.chunk_pieces(unit, c))
                if registered[i].grad is not None
            ]
            if pieces:
                adamw_pieces(pieces, group, self.precision, global_step)
            off.release(unit, c)

    def _piece(
        self, full: nn.Parameter, a: int, b: int, steps: dict[int, float], state: dict[str, torch.Tensor] | None
    ) -> Piece:
        """The piece ``[a, b)`` of parameter ``full``; ``state``: its state pieces (offloaded), or None to cut
        them from ``self.state``."""
        p = self.backend.local(full).detach()  # FSDP2: this rank's shard; its state covers the shard only
        whole = (a, b) == (0, p.numel())

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t if whole else t.reshape(-1)[a:b]

        if state is None:
            state = {k: cut(v) for k, v in self._state()[full].items() if k != "step"}
        return Piece(
            param=p if whole else p.view(-1)[a:b],
            grad=cut(self.backend.local(full.grad)),
            state=state,
            step=steps[id(full)],
            decay=id(full) not in self.no_decay,
            where=(self.param_number[id(full)], a),
        )

    def _device_chunks(self, params: list[nn.Parameter]) -> list[list[tuple[nn.Parameter, int, int]]]:
        """The in-memory states: create or convert each (precision), then group the parameters' pieces
        into updates of at most UPDATE_CHUNK_ELEMENTS elements."""
        pieces = []
        for full in params:
            self.precision.ensure_state(self._state()[full], self.backend.local(full))
            n = self.backend.local(full).numel()
            if n <= UPDATE_CHUNK_ELEMENTS or not self.backend.local(full).is_contiguous():
                pieces.append((full, 0, n))
            else:
                pieces += [(full, a, min(a + UPDATE_CHUNK_ELEMENTS, n)) for a in range(0, n, UPDATE_CHUNK_ELEMENTS)]
        chunks, size, chunk = [], 0, []
        for piece in pieces:
            if chunk and size + piece[2] - piece[1] > UPDATE_CHUNK_ELEMENTS:
                chunks.append(chunk)
                size, chunk = 0, []
            chunk.append(piece)
            size += piece[2] - piece[1]
        if chunk:
            chunks.append(chunk)
        return chunks

    def _advance_steps(self, params: list[torch.Tensor]) -> dict[int, float]:
        """Count this step in each parameter's ``step`` (torch.optim's state layout); id -> new step."""
        out = {}
        for p in params:
            state = self._state()[p]
            if "step" not in state:
                # same initial state as torch.optim.Adam._init_group (non-capturable, non-fused)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["step"] += 1
            out[id(p)] = float(state["step"])
        return out

    # ------------------------------------------------------------------ states as tensors
    def param_states(self, offloaded_only: bool = False) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """The AdamW state tensors (not ``step``) of every parameter that has state, wherever they live:
        offloaded ones as host copies, the others as they are."""
        out: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        units = self.offloader.state_dict()["units"] if self.offloader is not None else {}
        for name, _, params in self.units.specs:
            staged = units.get(name)
            for p in params:
                st = self._state().get(p, {})
                if "step" not in st:
                    continue
                if staged is not None and id(p) in self._index:
                    out[p] = {key: staged[key][self._index[id(p)]].clone() for key in staged}
                elif not offloaded_only:
                    out[p] = {k: v for k, v in st.items() if k != "step"}
        return out

    def place_param_states(self, states: dict[nn.Parameter, dict[str, torch.Tensor]]) -> None:
        """Put per-parameter AdamW state tensors (any device) where this store keeps them: offloaded units'
        into the offloader (units absent from ``states`` start afresh), the others into ``self.state`` on
        their parameter's device."""
        offloaded: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for p, moments in states.items():
            unit = self.units.unit_name(self.units.unit_of[id(p)])
            if self.offloader is not None and unit in self._offloaded and id(p) in self._index:
                offloaded.setdefault(unit, {})[id(p)] = moments
                for key in moments:
                    self._state()[p].pop(key, None)
            else:
                self._state()[p].update({k: v.to(self.backend.local(p).device) for k, v in moments.items()})
        if self.offloader is not None:
            self.offloader.load_state_dict({"units": {u: self._fill(u, have) for u, have in offloaded.items()}})

    def _fill(self, unit: str, have: dict[int, dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Offloader state of one unit in the layout registered now; parameters without saved moments get
        zeros (and a master copy of their current value), as a first use would give them. A master saved by
        a run with the other precision setting becomes a compensation and vice versa."""
        params = self._offloaded[unit]
        keys = self.offloader.unit_keys(unit)
        out: dict[str, list[torch.Tensor]] = {key: [] for key in sorted(keys)}
        for full in params:
            p = self.backend.local(full).detach()
            dtype = self.precision.state_dtype(p)
            m = have.get(id(full), {})
            for key in ("exp_avg", "exp_avg_sq"):
                out[key].append(m[key].to("cpu", dtype) if key in m else torch.zeros(p.shape, dtype=dtype))
            current = p.to("cpu", torch.float32)
            exact = exact_value(p.cpu(), m)
            if "master" in keys:
                out["master"].append(exact if exact is not None else current)
            if "compensation" in keys:
                out["compensation"].append(
                    (exact - current).to(p.dtype) if exact is not None else torch.zeros(p.shape, dtype=p.dtype)
                )
        return out
