"""Activation (gradient) checkpointing that does not force backward through frozen layers.

HF's ``gradient_checkpointing_enable`` also installs ``enable_input_require_grads``: a forward hook
that makes the embedding output require grad, so that reentrant checkpointing sees an input with
``requires_grad``. With GRASS most layers are frozen and the embeddings usually are too; that hook
makes autograd run backward through every frozen layer below the lowest active one, for nothing.
Non-reentrant checkpointing (``use_reentrant=False``) needs no such input, so we enable that and
remove the hook. ``GrassOptimizer`` also removes the hook before every forward while the
embeddings are frozen, which covers a Trainer that enables checkpointing by itself.

Duck-typed on the HF ``PreTrainedModel`` API; transformers is not imported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["enable_gradient_checkpointing"]


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
