"""Causal-LM cross-entropy in chunks of tokens, without the full fp32 logits.

A causal LM's loss is ``cross_entropy(lm_head(h).float(), shifted labels)`` over a (B, T, V) logits
tensor. For a large vocabulary that tensor and the fp32 copies the loss makes of it are the largest
activation of a step: at T = 1024, Gemma-2B's 256k vocabulary gives 0.5 GiB of bf16 logits, 1 GiB
in fp32, another 1 GiB for the log-softmax saved for backward and 1 GiB for its gradient.
:func:`chunked_cross_entropy` computes the same loss ``chunk_tokens`` rows at a time: each chunk's
logits are made, reduced to the loss and turned into the gradients of the hidden states (and of the
head's weight, when it trains) at once, in forward, and dropped; backward only scales the stored
gradients. What stays alive is one chunk's logits during the loss and a (B, T, H) gradient until
backward. The arithmetic is transformers' ``ForCausalLMLoss``: logits in the model's dtype, the loss
in fp32, labels shifted left with ``ignore_index`` padding, the sum divided by
``num_items_in_batch`` when given, else the mean over the labelled tokens.

With a transformers model, :class:`ChunkedCausalLMLoss` captures the head's input with a forward hook
and lets the model skip its logits while gradients are enabled (training)::

    loss_fn = ChunkedCausalLMLoss(model)
    out = model(input_ids=ids, attention_mask=mask)          # no labels: out.logits is empty
    loss = loss_fn(out, labels, num_items_in_batch=n_tokens)  # == model(..., labels=labels).loss
    loss.backward()

It has the signature of the HF ``Trainer``'s ``compute_loss_func``, which pops the labels before
the forward pass: ``Trainer(..., compute_loss_func=ChunkedCausalLMLoss(model))``. Under
``torch.no_grad()`` (evaluation) the model computes its logits as usual and the loss is still
chunked. Torch only; the model is duck-typed (``get_output_embeddings``, ``config``).

Invariants (referenced as ``# L1`` ... next to the code that relies on them):

L1. The forward hook keeps the head's input of the LAST forward pass, and a loss consumes it: a
    second loss without a forward pass in between is an error, never the loss of stale activations.
L2. The logits are replaced by an empty tensor only while gradients are enabled (training, where
    this loss is computed instead); under ``torch.no_grad()`` the model's own logits come back.
L3. The gradients are computed in forward and saved; backward only scales them by the incoming
    gradient, which ``loss.backward()`` seeds with exactly 1 (the multiply is skipped then).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "LOGITS_PER_CHUNK",
    "ChunkedCausalLMLoss",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "chunked_loss_for",
    "unsupported_reason",
]

#: Label value that the loss ignores (``torch.nn.CrossEntropyLoss``'s and transformers' default): prompt
#: tokens when only the response is trained, padding (``grass_llm.data`` writes it).
IGNORE_INDEX = -100
#: Logits per chunk (rows x vocabulary): 2**22, i.e. 16 MiB of fp32 logits per chunk, 131 rows of a
#: 32k vocabulary, 16 of a 256k one (Liger-Kernel's fused linear cross-entropy picks 16 rows for the
#: latter too). A chunk's peak is about 1.5 times its fp32 logits (plus its bf16 copy).
LOGITS_PER_CHUNK = 2**22
# config attributes that transform the logits in ways this loss does not reproduce
_UNSUPPORTED_CONFIG = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden @ weight.T (+ bias)``, computed ``chunk_tokens`` rows at a time.

    Args:
        hidden: (B, T, H) (or (N, H)) input of the output head, in the model's dtype.
        weight: (V, H) head weight; ``bias``: optional (V,).
        labels: (B, T) token ids, shifted inside like transformers does (position t predicts label
            t + 1, the last position predicts nothing). Give ``shift_labels`` (already aligned with
            ``hidden``) instead to skip the shift.
        ignore_index: label of positions without a loss.
        num_items_in_batch: divide the summed loss by this (a tensor or a number), as transformers
            does when the Trainer or a recipe passes it; None: the mean over labelled positions.
        softcap: ``final_logit_softcapping`` (Gemma 2/3): logits become ``cap * tanh(logits / cap)``.
        chunk_tokens: rows per chunk; default ``LOGITS_PER_CHUNK // V``.

    Returns the scalar fp32 loss. Gradients flow to ``hidden``, ``weight`` and ``bias`` when they
    require grad; they are computed in the forward pass, chunk by chunk.
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("give exactly one of labels (unshifted) and shift_labels")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match: expected (..., H) and (V, H)"
        )
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = shift_labels.reshape(-1).to(h.device)  # (N,)
    if y.numel() != h.shape[0]:
        raise ValueError(f"labels have {y.numel()} positions, hidden has {h.shape[0]}")
    vocab = weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGITS_PER_CHUNK // vocab)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is invalid; allowed: an integer >= 1")
    return _ChunkedCrossEntropy.apply(
        h, weight, bias, y, ignore_index, num_items_in_batch, softcap, chunk_tokens
    )


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, ignore_index, num_items, softcap, chunk):  # type: ignore[override]
        valid = y != ignore_index
        if num_items is None:
            denom = valid.sum().to(torch.float32)  # the mean over labelled tokens (0/0 = nan, as in torch)
        elif torch.is_tensor(num_items):
            denom = num_items.to(device=h.device, dtype=torch.float32)
        else:
            denom = torch.tensor(float(num_items), device=h.device)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        safe_y = torch.where(valid, y, 0)
        for a in range(0, h.shape[0], chunk):
            hc = h[a : a + chunk]  # (c, H)
            logits = nn.functional.linear(
                hc, weight, bias
            )  # (c, V), the model's dtype, as lm_head computes it
            z = logits.float()
            del logits
            if softcap is not None:
                z.div_(softcap).tanh_()
                t = z if (need_h or need_w or need_b) else None
                z = z * softcap
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            yc, vc = safe_y[a : a + chunk], valid[a : a + chunk]
            picked = z.gather(1, yc[:, None]).squeeze(1)
            total += torch.where(vc, lse - picked, 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d z = (softmax(z) - onehot(y)) / denom on labelled rows, 0 elsewhere
            g = z.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, yc[:, None], torch.full_like(g[:, :1], -1.0))
            g.mul_((vc.to(g.dtype) / denom)[:, None])
            if softcap is not None:
                g.mul_(1 - t * t)  # d(cap * tanh(x / cap)) / dx
                del t
            gl = g.to(h.dtype)  # the gradient reaches the bf16 logits in the model's dtype, as in autograd
            del g
            if need_h:
                grad_h[a : a + chunk] = gl @ weight
            if need_w:
                grad_w.addmm_(gl.t(), hc)
            if need_b:
                grad_b += gl.sum(0, dtype=torch.float32).to(grad_b.dtype)
            del gl
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = None if grad_out is None else grad_out
        out = []
        for g in (grad_h, grad_w, grad_b):
            if g is None or scale is None:
                out.append(g)
            else:
                out.append(g if _is_one(scale) else g * scale.to(g.dtype))  # L3
        return out[0], out[1], out[2], None, None, None, None, None


def _is_one(t: torch.Tensor) -> bool:
    # backward() of a loss seeds a gradient of exactly 1: skip the multiply (and its extra memory) then.
    # Reading the value syncs the device once per backward; fake tensors (memory estimates) have none.
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor) or t.device.type == "meta":
        return True
    return bool(t.numel() == 1 and t.item() == 1.0)


# ------------------------------------------------------------------------------------------------
# transformers models
def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`ChunkedCausalLMLoss` cannot reproduce ``model``'s own loss, or None when it can.

    Supported: an output head that is a plain ``nn.Linear`` (tied or not, bias or not) whose logits
    go to transformers' causal-LM cross-entropy, optionally soft-capped (``final_logit_softcapping``).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    if type(head) is not nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain nn.Linear (an adapter or a quantised layer?)"
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_CONFIG:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"config.{name}={value!r} transforms the logits"
    return None


class ChunkedCausalLMLoss:
    """The causal-LM loss of a transformers model, chunked (see the module docstring).

    Registers a forward hook on ``model.get_output_embeddings()``: it records the head's input and,
    while gradients are enabled, returns an empty (B, T, 0) tensor instead of the logits, so the model
    neither computes nor keeps them. Call the model without ``labels``, then this object with the
    model's output and the labels. ``remove()`` takes the hook off. Raises ``ValueError`` for a model
    whose loss it cannot reproduce (:func:`unsupported_reason`).
    """

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"chunked loss: {type(model).__name__} is not supported: {reason}")
        self.head: nn.Linear = model.get_output_embeddings()
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self.chunk_tokens = chunk_tokens
        self.ignore_index = ignore_index
        self._hidden: torch.Tensor | None = None
        ref = weakref.ref(self)  # the hook must not keep this object (and so the head) alive: no cycle

        def capture(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            loss = ref()
            return None if loss is None else loss._capture(module, args, output)

        self._handle = self.head.register_forward_hook(capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        (hidden,) = args
        self._hidden = hidden  # L1
        if torch.is_grad_enabled():  # L2
            return output.new_empty((*output.shape[:-1], 0))
        return None

    def __call__(
        self,
        outputs: Any = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        *,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of the last forward pass. ``outputs`` (the model's output) is accepted for the HF
        ``Trainer``'s ``compute_loss_func`` signature and not read."""
        hidden, self._hidden = self._hidden, None  # L1
        if hidden is None:
            raise RuntimeError(
                "ChunkedCausalLMLoss: no forward pass of the model since the last loss (call the model first, "
                "without labels)"
            )
        return chunked_cross_entropy(
            hidden,
            self.head.weight,
            labels,
            bias=self.head.bias,
            shift_labels=shift_labels,
            ignore_index=self.ignore_index,
            num_items_in_batch=num_items_in_batch,
            softcap=self.softcap,
            chunk_tokens=self.chunk_tokens,
        )

    def remove(self) -> None:
        """Take the hook off: the model computes its logits again."""
        self._handle.remove()
        self._hidden = None


def chunked_loss_for(model: nn.Module) -> ChunkedCausalLMLoss | None:
    """``ChunkedCausalLMLoss(model)``, or None with a warning when it cannot reproduce the model's own loss
    (the model then computes it from its full logits). What ``chunked_loss: true`` builds."""
    reason = unsupported_reason(model)
    if reason is not None:
        import warnings

        warnings.warn(f"chunked_loss: using the model's own loss: {reason}", UserWarning, stacklevel=2)
        return None
    return ChunkedCausalLMLoss(model)


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: ChunkedCausalLMLoss | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    compact: bool = False,
) -> torch.Tensor:
    """The loss of one micro-batch the way ``grass-llm train`` (and ``grass-llm memory``) compute it.

    With ``loss_fn`` the model runs without its labels and ``loss_fn`` makes the chunked loss;
    without it the model computes its own loss from ``batch["labels"]``. ``num_items_in_batch``:
    see :func:`chunked_cross_entropy`. ``compact``: run the forward pass under
    ``grass_llm.activation_checkpointing.compact_saved_activations`` (same gradients, less memory).
    """
    from grass_llm.activation_checkpointing import compact_saved_activations

    with compact_saved_activations(compact):
        if loss_fn is None:
            return model(**batch, num_items_in_batch=num_items_in_batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return loss_fn(model(**inputs), batch["labels"], num_items_in_batch=num_items_in_batch)
