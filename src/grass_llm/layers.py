"""Find a model's decoder blocks and its other parameter groups by introspection.

The decoder blocks are the repeated blocks of the language model: the ``nn.ModuleList`` (or
``nn.Sequential``) whose children all share one class and which holds the most parameters, searched
inside the text decoder when the model names one (``get_decoder()``: the language model of a
Llava / Gemma3 / Qwen-VL model, the decoder stack of T5 / BART). That finds ``model.layers`` (Llama,
Qwen2, Gemma, Mistral, Phi), ``transformer.h`` (GPT-2), ``gpt_neox.layers``,
``model.decoder.layers`` (OPT, BART), ``model.language_model.layers`` (Llava, Gemma3, Qwen2-VL) and
``decoder.block`` (T5) without a model map. When it stays ambiguous (two disjoint stacks of
comparable size and no decoder to choose by) discovery raises and asks for an override: a dotted
module path (``"backbone.blocks"``) or a callable ``model -> sequence of modules``.

The parameters outside the blocks fall into four groups:

* ``embeddings``: the input embeddings (``get_input_embeddings()``) and every other
  ``nn.Embedding`` of the decoder outside the blocks (learned position embeddings);
* ``head``: the output embeddings (``get_output_embeddings()``), unless tied to the input
  embeddings, in which case the shared tensor belongs to ``embeddings`` only;
* ``norm``: the rest of the decoder (final norm, projections around the stack);
* ``other``: everything outside the decoder (a vision tower, a multimodal projector, an encoder) and
  other stacks of blocks; never trained by GRASS.

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
    other: list[nn.Parameter] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # id(param) -> qualified name
    #: the output embeddings are the input embeddings' tensor (tied): ``head`` is empty, ``embeddings`` holds it
    tied_head: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def numel(self, layer: int) -> int:
        return sum(p.numel() for p in self.block_params[layer])


def discover_layers(model: nn.Module, layers: LayerSpec = None) -> LayerGroups:
    """Split ``model``'s parameters into decoder blocks, embeddings, head, norm and other groups."""
    root = _decoder_root(model)
    others: list[nn.Module] = []
    if layers is None:
        path, blocks, others = _find_blocks(model, root)
    elif isinstance(layers, str):
        path, blocks = layers, _resolve_path(model, layers)
    elif callable(layers):
        path, blocks = getattr(layers, "__name__", "<callable>"), list(layers(model))
        _check_override(blocks, path)
    else:
        raise LayerDiscoveryError(
            f"layers={layers!r} is invalid; allowed: None (introspection), a dotted module path, or a callable"
        )
    if root is not model and not _contains(root, blocks[0]):
        root = model  # an override outside the decoder: classify against the whole model

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    block_params: list[list[nn.Parameter]] = []
    for i, block in enumerate(blocks):
        params = _unique(block.parameters(), seen)
        if not params:
            raise LayerDiscoveryError(f"decoder block {i} of {path!r} has no parameters of its own")
        block_params.append(params)
    # other stacks first, so that their embeddings (e.g. a vision tower's positions) stay theirs
    other = _unique((p for m in others for p in m.parameters()), seen)

    embed_modules: list[nn.Module] = []
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        with contextlib.suppress(NotImplementedError, AttributeError):
            embed_modules.append(get_in())
    block_ids = {id(m) for b in blocks for m in b.modules()}
    embed_modules += [m for m in root.modules() if isinstance(m, nn.Embedding) and id(m) not in block_ids]
    embeddings = _unique((p for m in embed_modules if m is not None for p in m.parameters()), seen)

    head: list[nn.Parameter] = []
    tied_head = False
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            head = _unique(out.parameters(), seen)
            tied_head = not head and any(p is e for p in out.parameters() for e in embeddings)
    norm = _unique(root.parameters(), seen)
    other += _unique(model.parameters(), seen)
    return LayerGroups(path, list(blocks), block_params, embeddings, head, norm, other, names, tied_head)


def _decoder_root(model: nn.Module) -> nn.Module:
    """The text decoder named by ``get_decoder()`` when it is a proper submodule, else the model."""
    get = getattr(model, "get_decoder", None)
    if not callable(get):
        return model
    try:
        dec = get()
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return model
    if isinstance(dec, nn.Module) and dec is not model and _contains(model, dec):
        return dec
    return model


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def _unique(params, seen: set[int]) -> list[nn.Parameter]:
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _find_blocks(model: nn.Module, root: nn.Module) -> tuple[str, list[nn.Module], list[nn.Module]]:
    """(path, blocks, other stacks): the largest stack of same-class blocks inside ``root``.

    A stack nested in another one (experts inside a layer) is not a candidate. Another disjoint
    stack holding at least a quarter of the largest one's parameters makes the choice ambiguous
    unless ``root`` is the decoder the model names."""
    stacks: list[tuple[int, str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 1:
            continue
        if len({type(c) for c in module}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > 0:
            stacks.append((numel, name, module))
    top = [s for s in stacks if not any(o[2] is not s[2] and _contains(o[2], s[2]) for o in stacks)]
    inside = [s for s in top if _contains(root, s[2])]
    if not inside:
        raise LayerDiscoveryError(
            f"no repeated decoder blocks found in {type(model).__name__}: no nn.ModuleList/nn.Sequential of "
            "same-class modules with parameters. Pass layers='dotted.path.to.blocks' or a callable."
        )
    inside.sort(key=lambda s: -s[0])
    numel, path, chosen = inside[0]
    rivals = [s for s in inside[1:] if 4 * s[0] >= numel]
    if rivals:
        found = ", ".join(f"{p} ({len(m)} x {type(m[0]).__name__}, {n:,} params)" for n, p, m in inside[:4])
        raise LayerDiscoveryError(
            f"{type(model).__name__} has several stacks of blocks ({found}) and no get_decoder() to choose "
            f"by; name the decoder blocks: layers='{path}' (or another of them)"
        )
    others = [m for _, _, m in top if m is not chosen]
    return path, list(chosen), others


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
