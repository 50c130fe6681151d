"""Find a model's decoder blocks and its other parameter groups by introspection.

The decoder blocks are the repeated blocks of the model: the ``nn.ModuleList`` (or
``nn.Sequential``) whose children all share one class and which holds the most parameters.
That finds ``model.layers`` (Llama, Qwen2, Gemma, Mistral, Phi), ``transformer.h`` (GPT-2),
``gpt_neox.layers`` and ``model.decoder.layers`` (OPT) without a model map. Anything else can be
named with an override: a dotted module path (``"backbone.blocks"``) or a callable
``model -> sequence of modules``.

The parameters outside the blocks fall into three groups:

* ``embeddings``: the input embeddings (``get_input_embeddings()``) and every other
  ``nn.Embedding`` outside the blocks (learned position embeddings);
* ``head``: the output embeddings (``get_output_embeddings()``), unless tied to the input
  embeddings, in which case the shared tensor belongs to ``embeddings`` only;
* ``norm``: the rest (final norm, projections around the stack).

Every parameter is in exactly one group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["LayerDiscoveryError", "LayerGroups", "LayerSpec", "discover_layers"]

#: How the user may name the decoder blocks instead of relying on introspection.
LayerSpec = str | Callable[[nn.Module], Sequence[nn.Module]] | None


class LayerDiscoveryError(ValueError):
    """The decoder blocks could not be found, or the override does not name them."""


@dataclass
class LayerGroups:
    """The parameter groups of a model. Lists hold parameters in module order, without duplicates."""

    block_path: str
    blocks: list[nn.Module]
    block_params: list[list[nn.Parameter]]
    embeddings: list[nn.Parameter] = field(default_factory=list)
    head: list[nn.Parameter] = field(default_factory=list)
    norm: list[nn.Parameter] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # id(param) -> qualified name

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def numel(self, layer: int) -> int:
        return sum(p.numel() for p in self.block_params[layer])


def discover_layers(model: nn.Module, layers: LayerSpec = None) -> LayerGroups:
    """Split ``model``'s parameters into decoder blocks, embeddings, head and norm groups."""
    if layers is None:
        path, blocks = _find_blocks(model)
    elif isinstance(layers, str):
        path, blocks = layers, _resolve_path(model, layers)
    elif callable(layers):
        path, blocks = getattr(layers, "__name__", "<callable>"), list(layers(model))
        _check_override(blocks, path)
    else:
        raise LayerDiscoveryError(
            f"layers={layers!r} is invalid; allowed: None (introspection), a dotted module path, or a callable"
        )

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    block_params: list[list[nn.Parameter]] = []
    for i, block in enumerate(blocks):
        params = _unique(block.parameters(), seen)
        if not params:
            raise LayerDiscoveryError(f"decoder block {i} of {path!r} has no parameters of its own")
        block_params.append(params)

    embed_modules: list[nn.Module] = []
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        with contextlib.suppress(NotImplementedError, AttributeError):
            embed_modules.append(get_in())
    block_ids = {id(m) for b in blocks for m in b.modules()}
    embed_modules += [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in block_ids]
    embeddings = _unique((p for m in embed_modules if m is not None for p in m.parameters()), seen)

    head: list[nn.Parameter] = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            head = _unique(out.parameters(), seen)
    norm = _unique(model.parameters(), seen)
    return LayerGroups(path, list(blocks), block_params, embeddings, head, norm, names)


def _unique(params, seen: set[int]) -> list[nn.Parameter]:
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 1:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel == 0:
            continue
        if best is None or numel > best[0]:
            best = (numel, name, children)
    if best is None:
        raise LayerDiscoveryError(
            f"no repeated decoder blocks found in {type(model).__name__}: no nn.ModuleList/nn.Sequential of "
            "same-class modules with parameters. Pass layers='dotted.path.to.blocks' or a callable."
        )
    return best[1], best[2]


def _resolve_path(model: nn.Module, path: str) -> list[nn.Module]:
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise LayerDiscoveryError(
            f"layers={path!r}: {type(model).__name__} has no submodule at that path"
        ) from err
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        raise LayerDiscoveryError(
            f"layers={path!r} names a {type(module).__name__}; allowed: an nn.ModuleList or nn.Sequential of blocks"
        )
    blocks = list(module)
    _check_override(blocks, path)
    return blocks


def _check_override(blocks: list, path: str) -> None:
    if not blocks:
        raise LayerDiscoveryError(f"layers={path!r} gives no blocks")
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise LayerDiscoveryError(f"layers={path!r}: item {i} is a {type(b).__name__}, not an nn.Module")
    ids = [id(p) for b in blocks for p in b.parameters()]
    if len(ids) != len(set(ids)):
        raise LayerDiscoveryError(
            f"layers={path!r}: blocks share parameters; each block must own its parameters"
        )
