"""Activation (gradient) checkpointing that does not force backward through frozen layers.

HF's ``gradient_checkpointing_enable`` also installs ``enable_input_require_grads``: a forward hook
that makes the embedding output require grad, so that reentrant checkpointing sees an input with
``requires_grad``. With GRASS most layers are frozen and the embeddings usually are too; that hook
makes autograd run backward through every frozen layer below the lowest active one, for nothing.
Non-reentrant checkpointing (``use_reentrant=False``) needs no such input, so we enable that and
remove the hook. ``GrassOptimizer`` also removes the hook before every forward while the
embeddings are frozen, which covers a Trainer that enables checkpointing by itself.

Duck-typed on the HF ``PreTrainedModel`` API; transformers is not imported.

:func:`checkpoint_frozen_blocks` (``activation_checkpointing: frozen`` in ``grass-llm train``) is the
layer-wise alternative: it recomputes only the decoder blocks that are frozen but must pass the
gradient on, i.e. the frozen blocks above the lowest trained one. Those need input gradients but no
weight gradients, and without checkpointing they keep every activation their input gradient needs;
checkpointed they keep their input only. Blocks that train keep their activations (no recomputation
of what is needed anyway), and blocks below the lowest trained one run no backward at all; when every
block trains (GRASS's probing steps) every block is checkpointed, so probing does not need the
activations of the whole model. The
choice is made at every forward pass from ``requires_grad``, so it follows GRASS's active layers.

:func:`compact_saved_activations` (``compact_activations: true``, ``grass-llm train``'s default) is
cheaper still and changes no number: while it is active, two kinds of tensors that autograd saves for
backward are stored in less memory, and restored bit for bit when backward needs them:

* an fp32 tensor made by ``.float()`` from a bf16/fp16 one (RMSNorm computes in fp32 and saves its
  fp32 input) is kept in its source dtype, which holds the same values in half the bytes;
* the output of an elementwise activation (``silu``, ``gelu``) saved by the next op (the gated MLP's
  ``act(gate) * up``) is not kept at all: backward recomputes it from ``gate``, which the activation's
  own backward keeps anyway.

For LLaMA2-7B at sequence 1024 that is 38 MiB per decoder layer, 1.2 GiB in all. Any other saved
tensor is kept as it is.

Invariants (referenced as ``# C1`` ... next to the code that relies on them):

C1. A block's parameters train or are frozen together (GRASS switches whole units), so its first
    parameter's ``requires_grad``, read at every forward pass, says whether the block trains; it is
    read afresh each time because FSDP2 replaces the parameter objects.
C2. A bf16/fp16 value converted to fp32 is exact, so keeping the source and upcasting again in
    backward gives the same bits.
C3. A ``silu`` / ``gelu`` output saved by the next op is recomputed from the input that the
    activation's own backward saves anyway; that input must not have changed since the forward pass
    (its ``_version`` is checked, and a change is an error rather than a wrong gradient).
C4. The memo of upcasts is keyed by ``id`` and checked through a weak reference, so a tensor freed
    during the forward pass and a new one at the same address are never confused.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "MODES",
    "apply_activation_checkpointing",
    "checkpoint_blocks_while",
    "checkpoint_frozen_blocks",
    "enable_gradient_checkpointing",
]

#: ``activation_checkpointing`` settings of ``grass-llm train`` / ``grass-llm memory``.
MODES = ("none", "full", "frozen")


def enable_gradient_checkpointing(model: nn.Module, **checkpoint_kwargs: Any) -> nn.Module:
    """Turn on non-reentrant checkpointing for an HF model and drop the input-require-grads hook."""
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    if kwargs["use_reentrant"]:
        raise ValueError(
            "use_reentrant=True needs inputs that require grad, which forces backward through frozen layers; "
            "allowed: use_reentrant=False"
        )
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); wrap its blocks with "
            "torch.utils.checkpoint yourself"
        )
    if callable(getattr(model, "disable_input_require_grads", None)):
        model.disable_input_require_grads()
    return model


# classes of checkpointed blocks, one per block class: a subclass whose forward decides per call
_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _trains(block: nn.Module) -> bool:
    # C1: GRASS switches a block's parameters together; read at every forward (FSDP2 replaces them)
    first = next(block.parameters(), None)
    return first is not None and first.requires_grad


def _recomputes(block: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether this forward of ``block`` runs under checkpointing (the block's ``_grass_*`` marks):
    ``_grass_while``: a callable, true while every block is to be recomputed (GRASS's probing steps);
    ``_grass_peers``: the blocks of ``checkpoint_frozen_blocks`` (frozen ones that pass a gradient on, and
    every block when all of them train). Never when the block checkpoints itself (HF's own
    gradient checkpointing) or gradients are off."""
    if not torch.is_grad_enabled() or (getattr(block, "gradient_checkpointing", False) and block.training):
        return False
    while_ = getattr(block, "_grass_while", None)
    if while_ is not None and while_():
        return True
    peers = [ref() for ref in getattr(block, "_grass_peers", ())]  # weak: blocks must not keep each other
    if not peers:
        return False
    if len(peers) > 1 and all(b is not None and _trains(b) for b in peers):
        # every block trains (FFT): keeping every block's activations is what this mode avoids
        return True
    # frozen, and backward must pass through: keep the inputs, recompute the rest in backward
    return not any(p.requires_grad for p in block.parameters()) and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs))
    )


def _no_cache(block: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A recomputed block must not write its KV cache twice (the recomputation would append its keys
    again): no cache while checkpointing, as HF's own gradient checkpointing does in training (a training
    forward's cache starts empty, so attention is unchanged)."""
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(block, "_can_checkpoint_with_cache", False):
        for name in ("past_key_values", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
    return kwargs


def _checkpointed_class(cls: type) -> type:
    sub = _CHECKPOINTED_CLASSES.get(cls)
    if sub is not None:
        return sub

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        parent = super(sub, self).forward
        if _recomputes(self, args, kwargs):
            return torch.utils.checkpoint.checkpoint(parent, *args, use_reentrant=False, **_no_cache(self, kwargs))
        return parent(*args, **kwargs)

    sub = type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_grass_base": cls,
        },
    )
    _CHECKPOINTED_CLASSES[cls] = sub
    return sub


def _mark(block: nn.Module, name: str, value: Any) -> None:
    """Set (or with None clear) a ``_grass_*`` mark; the block's class is the checkpointing subclass while
    it has a mark, its own class otherwise (parameters, state dict and ``isinstance`` are unchanged)."""
    if value is None:
        block.__dict__.pop(name, None)
    else:
        object.__setattr__(block, name, value)
    base = getattr(type(block), "_grass_base", type(block))
    marked = any(block.__dict__.get(n) for n in ("_grass_while", "_grass_peers"))
    block.__class__ = _checkpointed_class(base) if marked else base


def checkpoint_frozen_blocks(model: nn.Module, layers: Any = None, enable: bool = True) -> int:
    """Checkpoint the frozen decoder blocks that backward passes through; returns how many blocks are set.

    Each decoder block (found by ``grass_llm.layers.discover_layers``; ``layers`` overrides it, as in
    ``GrassConfig.layers``) decides at every forward pass: when gradients are on, none of its
    parameters requires grad and one of its inputs does, it runs under non-reentrant
    ``torch.utils.checkpoint`` (its input is kept, the rest recomputed in backward); when EVERY block
    trains (GRASS's probing steps, which run backward through all layers, or FFT) every block is
    checkpointed, as with full checkpointing; otherwise it runs as usual. Do not combine with full
    checkpointing (:func:`enable_gradient_checkpointing`). ``enable=False`` restores the blocks.
    """
    from grass_llm.layers import discover_layers

    blocks = discover_layers(model, layers).blocks
    peers = tuple(blocks)
    for block in blocks:
        _mark(block, "_grass_peers", tuple(weakref.ref(b) for b in peers) if enable else None)
    return len(blocks)


def checkpoint_blocks_while(blocks: Any, condition: Any) -> None:
    """Recompute each of ``blocks`` in backward (non-reentrant checkpointing) whenever ``condition()`` is
    true at its forward pass; ``condition=None`` removes this. ``GrassOptimizer`` uses it for its probing
    steps (``GrassConfig.probe_checkpointing``): they run backward through every block, and would otherwise
    keep every block's activations."""
    for block in blocks:
        _mark(block, "_grass_while", condition)


def apply_activation_checkpointing(model: nn.Module, mode: str, layers: Any = None) -> nn.Module:
    """``grass-llm train``'s ``activation_checkpointing``: ``none``; ``full``
    (:func:`enable_gradient_checkpointing`); ``frozen`` (:func:`checkpoint_frozen_blocks`, ``layers`` as in
    ``GrassConfig.layers``). Apply it before the method wraps the model (peft)."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is unknown; allowed: {', '.join(MODES)}")
    if mode == "full":
        enable_gradient_checkpointing(model)
    elif mode == "frozen":
        checkpoint_frozen_blocks(model, layers)
    return model


# -------------------------------------------------------------------------------------------------
# compact saved activations
_LOW = (torch.bfloat16, torch.float16)


class _Upcast:
    """A saved fp32 tensor that is an exact upcast, kept in its source dtype."""

    __slots__ = ("low",)

    def __init__(self, low: torch.Tensor) -> None:
        self.low = low


class _Recompute:
    """A saved activation output, recomputed from its saved input."""

    __slots__ = ("approximate", "fn", "version", "x")

    def __init__(self, fn: str, x: torch.Tensor, approximate: str) -> None:
        self.fn, self.x, self.version, self.approximate = fn, x, x._version, approximate


def _source_dtype(node: Any) -> torch.dtype | None:
    """The dtype of the input of a ``ToCopyBackward0`` node (what ``.float()`` was applied to), if known."""
    try:
        src, index = node.next_functions[0]
        return src._input_metadata[index].dtype if src is not None else None
    except (AttributeError, IndexError, RuntimeError):  # private autograd API: compact nothing if it moved
        return None


class _Packer:
    def __init__(self) -> None:
        # an upcast saved by several ops (RMSNorm's pow and mul) is stored once
        self._memo: dict[int, tuple[weakref.ref, _Upcast]] = {}

    def pack(self, t: torch.Tensor) -> Any:
        node = t.grad_fn
        name = type(node).__name__ if node is not None else ""
        if name == "ToCopyBackward0" and t.dtype == torch.float32:
            src = _source_dtype(node)
            if src in _LOW:  # C2
                hit = self._memo.get(id(t))
                if hit is not None and hit[0]() is t:  # C4
                    return hit[1]
                packed = _Upcast(t.to(src))
                self._memo[id(t)] = (weakref.ref(t), packed)
                return packed
        elif name in ("SiluBackward0", "GeluBackward0"):
            x = getattr(node, "_saved_self", None)
            if isinstance(x, torch.Tensor) and x.shape == t.shape and x.dtype == t.dtype:
                return _Recompute(name, x, getattr(node, "_saved_approximate", "none"))  # C3
        return t

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Upcast):
            return packed.low.float()
        if isinstance(packed, _Recompute):
            if packed.x._version != packed.version:  # C3
                raise RuntimeError(
                    "compact_saved_activations: the input of an activation was modified in place after the "
                    "forward pass; its output cannot be recomputed (run without compact activations)"
                )
            if packed.fn == "SiluBackward0":
                return torch.nn.functional.silu(packed.x)
            return torch.nn.functional.gelu(packed.x, approximate=packed.approximate)
        return packed


@contextlib.contextmanager
def compact_saved_activations(enabled: bool = True) -> Iterator[None]:
    """Store the tensors autograd saves during the block more compactly, with bit-identical gradients.

    See the module docstring: exact fp32 upcasts of bf16/fp16 tensors are kept in the source dtype, and
    ``silu`` / ``gelu`` outputs are recomputed in backward from their inputs. Wrap the forward pass (and
    the loss); backward needs no context. ``enabled=False`` does nothing. Tensors saved inside an
    activation-checkpointed region are handled by the checkpoint, not by this.
    """
    if not enabled:
        yield
        return
    packer = _Packer()
    with torch.autograd.graph.saved_tensors_hooks(packer.pack, packer.unpack):
        yield
