"""GrassConfig.probe_checkpointing: probing steps recompute every block's activations in backward, so a
probing step keeps no more activations than a training step; the MGN is the same, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_optim import batches

from grass_llm import GrassConfig, GrassOptimizer, checkpoint_frozen_blocks


def _saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward during one forward (a checkpointed block keeps its input only)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    return total, loss


def _probe_then_train(on: bool):
    model = make_tiny_llama(num_layers=4, hidden=32)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=2, probe_checkpointing=on), lr=1e-2)
    saved = []
    for x in batches(3, bs=4, seq=16):
        n, loss = _saved_bytes(model, x)
        saved.append((opt.probing, n))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, saved


def test_probing_recomputes_every_block_and_measures_the_same_mgn(one_thread):
    _, off, saved_off = _probe_then_train(False)
    model, on, saved_on = _probe_then_train(True)
    assert torch.equal(on.importance, off.importance)
    probe_on = [n for probing, n in saved_on if probing]
    probe_off = [n for probing, n in saved_off if probing]
    train_on = [n for probing, n in saved_on if not probing]
    assert probe_on[0] < probe_off[0] / 2  # every block's activations: only the blocks' inputs are kept
    assert probe_on[0] <= train_on[0]  # a probing step keeps no more than a training step
    # training steps are not checkpointed: the blocks run as usual again
    assert train_on == [n for probing, n in saved_off if not probing]
    assert all(type(b).__name__ == type(b).__mro__[0].__name__ for b in model.model.layers)
    assert not any(hasattr(b, "_grass_while") for b in model.model.layers)


def test_close_restores_the_blocks_and_frozen_mode_still_checkpoints():
    model = make_tiny_llama(num_layers=3)
    base = type(model.model.layers[0])
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=2), lr=1e-2)
    assert type(model.model.layers[0]) is not base  # the checkpointing subclass while probing
    opt.close()
    assert type(model.model.layers[0]) is base
    checkpoint_frozen_blocks(model)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=2), lr=1e-2)
    opt.close()
    assert type(model.model.layers[0]) is not base  # the frozen mode's mark stays
    checkpoint_frozen_blocks(model, enable=False)
    assert type(model.model.layers[0]) is base


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_is_not_checkpointed_twice(reentrant):
    model = make_tiny_llama(num_layers=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=1), lr=1e-2)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    torch.utils.checkpoint.checkpoint, saved = counting, original
    try:
        x = batches(1)[0]
        model(input_ids=x, labels=x).loss.backward()
    finally:
        torch.utils.checkpoint.checkpoint = saved
    assert len(calls) == 0  # HF's layers call their own checkpoint function, never ours
    opt.step()
    assert not opt.probing


def test_a_model_that_caches_keys_probes_the_same(one_thread):
    """A recomputed block must not append its keys to the KV cache a second time (use_cache=True, the HF
    default a plain loop gets): no cache while checkpointing, as HF's own checkpointing does."""
    mgn = []
    for on in (False, True):
        model = make_tiny_llama(num_layers=3)
        model.config.use_cache = True
        model.train()
        opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=2, probe_checkpointing=on), lr=1e-2)
        for x in batches(2):
            model(input_ids=x, labels=x, use_cache=True).loss.backward()
            opt.step()
        mgn.append(opt.importance)
    assert torch.equal(*mgn)
