"""Checkpointing of frozen blocks and compact saved activations: same gradients, less memory."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from grass_llm import GrassConfig, GrassOptimizer, checkpoint_frozen_blocks
from grass_llm.activation_checkpointing import compact_saved_activations
from grass_llm.memory import LiveBytesTracker

pytest.importorskip("transformers")


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _count_calls(model):
    calls = [0] * len(model.model.layers)
    for i, block in enumerate(model.model.layers):
        block.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_only_frozen_blocks_above_the_lowest_active_one_are_recomputed():
    ids = torch.randint(0, 64, (2, 12))
    plain = make_tiny_llama(num_layers=5)
    model = copy.deepcopy(plain)
    assert checkpoint_frozen_blocks(model) == 5
    opts = [
        GrassOptimizer(m, GrassConfig(probe_steps=0)) for m in (plain, model)
    ]  # kept alive: they set the flags
    for opt in opts:
        opt.activate([1, 3])
    calls = _count_calls(model)
    model(input_ids=ids, labels=ids).loss.backward()
    # below the lowest active: no backward; active: saved; frozen above it: recomputed in backward
    assert calls == [1, 1, 2, 1, 2]
    plain(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(_grads(plain), _grads(model)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert type(model.model.layers[0]).__name__ == type(plain.model.layers[0]).__name__
    assert model.state_dict().keys() == plain.state_dict().keys()
    copy.deepcopy(model)  # the swapped class copies
    checkpoint_frozen_blocks(model, enable=False)
    calls[:] = [0] * 5
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1] * 5


def test_every_block_is_recomputed_while_every_block_trains():
    """GRASS's probing steps (and FFT) train every block: `frozen` then checkpoints them all, as `full`
    would, so probing does not keep the whole model's activations; the gradients are the same."""
    ids = torch.randint(0, 64, (2, 12))
    plain = make_tiny_llama(num_layers=4)
    model = copy.deepcopy(plain)
    checkpoint_frozen_blocks(model)
    # probing: all train (the plain model without the optimizer's own probing checkpointing)
    opts = [GrassOptimizer(m, GrassConfig(probe_steps=2, probe_checkpointing=m is model)) for m in (plain, model)]
    assert all(opt.probing for opt in opts)
    calls = _count_calls(model)
    tracker = LiveBytesTracker(round_to=1)
    with tracker:
        loss = model(input_ids=ids, labels=ids).loss
    saved_checkpointed = tracker.current
    loss.backward()
    assert calls == [2, 2, 2, 2]  # every block recomputed in backward
    tracker = LiveBytesTracker(round_to=1)
    with tracker:
        loss = plain(input_ids=ids, labels=ids).loss
    assert saved_checkpointed < tracker.current
    loss.backward()
    for opt in opts:
        opt.step()  # probing: the MGN of every layer from its (freed) gradients
    assert torch.equal(opts[0].importance, opts[1].importance)
    assert bool((opts[0].importance > 0).all())


def _saved_bytes(model, ids, compact: bool) -> int:
    tracker = LiveBytesTracker(round_to=1)
    with tracker, compact_saved_activations(compact):
        loss = model(input_ids=ids, labels=ids).loss
    after_forward = tracker.current
    loss.backward()
    return after_forward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compact_saved_activations_give_the_same_gradients(dtype):
    ids = torch.randint(0, 64, (2, 32))
    a = make_tiny_llama(num_layers=3).to(dtype)
    b = copy.deepcopy(a)
    saved_plain = _saved_bytes(a, ids, compact=False)
    saved_compact = _saved_bytes(b, ids, compact=True)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x.grad, y.grad)
    assert saved_compact < saved_plain  # SiLU outputs are not kept (and, in bf16, RMSNorm's fp32 inputs)


def test_compact_saved_activations_recompute_gelu():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    a = GemmaForCausalLM(cfg).to(torch.bfloat16)
    b = copy.deepcopy(a)
    ids = torch.randint(0, 64, (2, 16))
    a(input_ids=ids, labels=ids).loss.backward()
    with compact_saved_activations():
        loss = b(input_ids=ids, labels=ids).loss
    loss.backward()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x.grad, y.grad)


def test_in_place_change_of_a_recomputed_input_is_an_error():
    x = torch.randn(8, requires_grad=True)
    with compact_saved_activations():
        gate = x * 2
        out = torch.nn.functional.silu(gate) * x
        gate.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
