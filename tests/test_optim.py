"""Behaviour of GrassOptimizer: reference equivalence, probing, sampling, resume, schedulers."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import torch
from conftest import make_tiny_llama
from torch.testing import assert_close

from grass_llm import GrassConfig, GrassOptimizer, enable_gradient_checkpointing

VOCAB = 64


def batches(n: int, bs: int = 2, seq: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, seq), generator=g) for _ in range(n)]


def train(model, opt, data, loss_scale: float = 1.0, sched=None, accum: int = 1):
    log = []
    for x in data:
        chunks = x.chunk(accum)
        for i, chunk in enumerate(chunks):  # every micro-batch but the last under no_sync()
            with opt.no_sync() if i + 1 < len(chunks) else contextlib.nullcontext():
                (model(input_ids=chunk, labels=chunk).loss * loss_scale / accum).backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        log.append(opt.active_layers)
    return log


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_models_equal(a, b, rtol=0.0, atol=0.0):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("decay_bias_and_norm", [False, True])
def test_all_layers_active_equals_adamw(decay_bias_and_norm):
    """Every layer active: GRASS equals torch.optim.AdamW bit for bit. Weight decay skips biases and
    norm weights by the transformers Trainer's own rule unless decay_bias_and_norm=True."""
    from transformers import Trainer

    model = make_tiny_llama(num_layers=3)
    ref = copy.deepcopy(model)
    cfg = GrassConfig(
        active_layers=3, period=2, probe_steps=0, train_embeddings=True, train_head=True, train_norm=True
    )
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = GrassOptimizer(model, cfg, decay_bias_and_norm=decay_bias_and_norm, **kw)
    if decay_bias_and_norm:
        ref_opt = torch.optim.AdamW(ref.parameters(), **kw)
    else:
        decay = set(Trainer.get_decay_parameter_names(None, ref))
        assert decay and len(decay) < len(list(ref.parameters()))
        groups = [
            {"params": [p for n, p in ref.named_parameters() if n in decay]},
            {"params": [p for n, p in ref.named_parameters() if n not in decay], "weight_decay": 0.0},
        ]
        ref_opt = torch.optim.AdamW(groups, **kw)
    for x in batches(6):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()
        assert_models_equal(model, ref)
    assert opt.active_layers == [0, 1, 2]


def test_probing_changes_no_weight_and_holds_no_grad():
    model = make_tiny_llama()
    before = params_of(model)
    opt = GrassOptimizer(model, GrassConfig(probe_steps=4, period=3), lr=1e-1)
    for x in batches(4):
        model(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is None for p in model.parameters()), "probing must free every gradient at once"
        assert opt.active_layers == []
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert_close(p, before[n], rtol=0, atol=0)
    assert len(opt.active_layers) == 2 and not opt.probing
    assert (opt.importance > 0).all()


def test_probe_mgn_is_eq2():
    """After one probing step, importance is sqrt(||g_l||^2 / N_l) of each layer's gradient."""
    model = make_tiny_llama(num_layers=3)
    ref = copy.deepcopy(model)
    opt = GrassOptimizer(model, GrassConfig(probe_steps=5), lr=1e-2)
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    ref(input_ids=x, labels=x).loss.backward()
    expected = []
    for layer in ref.model.layers:
        sq = sum(p.grad.double().pow(2).sum() for p in layer.parameters())
        n = sum(p.numel() for p in layer.parameters())
        expected.append((sq / n).sqrt())
    assert_close(opt.importance, torch.stack(expected), rtol=1e-5, atol=0)


def test_probe_with_accumulation_matches_single_batch_for_identical_microbatches():
    """k identical micro-batches of loss / k give the single batch's MGN (an unmarked loop: its first step
    learns k and is not observed, the second is)."""
    x = batches(1)[0][:1]
    results = []
    for accum in (1, 2):
        model = make_tiny_llama(num_layers=3)
        opt = GrassOptimizer(model, GrassConfig(probe_steps=5), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while opt.probe_done < 1:
                for _ in range(accum):
                    (model(input_ids=x, labels=x).loss / accum).backward()
                opt.step()
        assert opt.skipped_steps == accum - 1
        results.append(opt.importance)
    assert_close(results[0], results[1], rtol=1e-5, atol=0)


def test_exactly_gamma_layers_change_per_period():
    model = make_tiny_llama(num_layers=6)
    cfg = GrassConfig(active_layers=2, period=3, probe_steps=2, seed=3)
    opt = GrassOptimizer(model, cfg, lr=1e-2)
    data = batches(2 + 3 * 4)
    train(model, opt, data[:2])
    seen = set()
    for period in range(4):
        start = params_of(model)
        active = opt.active_layers
        log = train(model, opt, data[2 + 3 * period : 5 + 3 * period])
        assert log[:-1] == [active] * 2  # the set holds for the whole period
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
        layers_changed = {int(n.split(".")[2]) for n in changed if n.startswith("model.layers.")}
        assert layers_changed == set(active), (period, active, layers_changed)
        assert all(n.startswith("model.layers.") for n in changed), (
            "embeddings / norm / head must stay frozen"
        )
        seen.add(tuple(active))
    assert len(seen) > 1, "layers should be resampled"


def test_backward_stops_at_lowest_active_layer():
    model = make_tiny_llama(num_layers=6)
    opt = GrassOptimizer(model, GrassConfig(active_layers=2, probe_steps=0, seed=5), lr=1e-2)
    outputs = {}
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    low = min(opt.active_layers)
    for i, out in outputs.items():
        assert out.requires_grad == (i >= low), (i, opt.active_layers)
    grads = {
        i for i, layer in enumerate(model.model.layers) if any(p.grad is not None for p in layer.parameters())
    }
    assert grads == set(opt.active_layers)


def _block_requires_grad(model, x):
    outputs = {}
    hooks = [
        b.register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for i, b in enumerate(model.model.layers)
    ]
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    for h in hooks:
        h.remove()
    return outputs


def test_hf_gradient_checkpointing_hook_forces_backward_and_we_remove_it():
    x = batches(1)[0]
    # transformers 5.x: gradient_checkpointing_enable installs enable_input_require_grads
    plain = make_tiny_llama(num_layers=4)
    for p in plain.parameters():
        p.requires_grad_(False)
    for p in plain.model.layers[3].parameters():
        p.requires_grad_(True)
    with pytest.warns(FutureWarning):
        plain.gradient_checkpointing_enable()
    assert plain._require_grads_hooks, "transformers no longer installs the hook; revisit this workaround"
    assert all(_block_requires_grad(plain, x).values()), "the HF hook makes every frozen block run backward"

    # our optimizer strips it before every forward: frozen blocks below the active one record nothing
    model = make_tiny_llama(num_layers=4)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0, seed=0), lr=1e-2)
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable()
    req = _block_requires_grad(model, x)
    low = opt.active_layers[0]
    assert req == {i: i >= low for i in range(4)}
    assert all(p.grad is not None for p in model.model.layers[low].parameters())

    # and our helper enables non-reentrant checkpointing without the hook
    other = make_tiny_llama(num_layers=4)
    enable_gradient_checkpointing(other)
    assert not getattr(other, "_require_grads_hooks", None)
    assert other.is_gradient_checkpointing


def test_policies():
    data = batches(2 + 5 * 3)
    probs = {}
    for policy in ("grass", "static", "uniform"):
        model = make_tiny_llama(num_layers=5)
        opt = GrassOptimizer(model, GrassConfig(policy=policy, probe_steps=2, period=3), lr=5e-2)
        hist = []
        for x in data:
            train(model, opt, [x])
            hist.append(opt.probabilities)
        probs[policy] = hist
    after_probe = probs["static"][1:]
    assert all(torch.equal(p, after_probe[0]) for p in after_probe), "static keeps the probing probabilities"
    assert not torch.allclose(after_probe[0], torch.full((5,), 0.2, dtype=torch.float64))
    assert any(not torch.equal(p, probs["grass"][1]) for p in probs["grass"][2:]), "grass adapts"
    assert all(torch.equal(p, torch.full((5,), 0.2, dtype=torch.float64)) for p in probs["uniform"])
    assert GrassConfig(policy="uniform").probe_steps == 0
    assert GrassConfig().probe_steps == 150


def test_sampling_invariant_to_loss_scale():
    logs, probs = [], []
    for scale in (1.0, 1000.0):
        model = make_tiny_llama(num_layers=6)
        opt = GrassOptimizer(model, GrassConfig(probe_steps=3, period=2, seed=1), lr=1e-2)
        logs.append(train(model, opt, batches(3 + 2 * 6), loss_scale=scale))
        probs.append(opt.probabilities)
    assert logs[0] == logs[1]
    # after training, AdamW's eps makes the two trajectories differ in the last digits only
    assert_close(probs[0], probs[1], rtol=2e-3, atol=0)


def test_probing_probabilities_invariant_to_loss_scale():
    probs = []
    for scale in (1.0, 1000.0, 1e-3):
        model = make_tiny_llama(num_layers=6)
        opt = GrassOptimizer(model, GrassConfig(probe_steps=3, period=2, seed=1, temperature=0.1), lr=1e-2)
        train(model, opt, batches(3), loss_scale=scale)
        probs.append(opt.probabilities)
    assert not torch.allclose(probs[0], torch.full((6,), 1 / 6, dtype=torch.float64), rtol=1e-2)
    for p in probs[1:]:
        assert_close(p, probs[0], rtol=1e-5, atol=0)


def _make(cfg_kwargs, lr=1e-2):
    model = make_tiny_llama(num_layers=5)
    opt = GrassOptimizer(model, GrassConfig(**cfg_kwargs), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


@pytest.mark.parametrize("split", [2, 5, 7])  # mid-probing, at the probe/train boundary, mid-period
def test_resume_equals_uninterrupted(split):
    cfg = dict(probe_steps=5, period=3, seed=7, train_head=True)
    data = batches(14)
    model, opt, sched = _make(cfg)
    log_full = train(model, opt, data, sched=sched)

    m1, o1, s1 = _make(cfg)
    log_a = train(m1, o1, data[:split], sched=s1)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    m2, o2, s2 = _make(cfg)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sched"])
    log_b = train(m2, o2, data[split:], sched=s2)

    assert log_a + log_b == log_full
    assert_models_equal(m2, model)
    assert_close(o2.importance, opt.importance, rtol=0, atol=0)
    assert_close(o2.probabilities, opt.probabilities, rtol=0, atol=0)
    assert o2.global_step == opt.global_step == 14


def test_scheduler_changes_applied_lr():
    data = batches(10)
    cfg = dict(probe_steps=2, period=3, seed=2)
    m1 = make_tiny_llama(num_layers=4)
    o1 = GrassOptimizer(m1, GrassConfig(**cfg), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(o1, lambda s: 0.5)
    m2 = make_tiny_llama(num_layers=4)
    o2 = GrassOptimizer(m2, GrassConfig(**cfg), lr=5e-3)
    train(m1, o1, data, sched=sched)
    train(m2, o2, data)
    assert_models_equal(m1, m2)
    # and a schedule at zero freezes everything
    m3 = make_tiny_llama(num_layers=4)
    before = params_of(m3)
    o3 = GrassOptimizer(m3, GrassConfig(**cfg), lr=1e-2)
    train(m3, o3, data, sched=torch.optim.lr_scheduler.LambdaLR(o3, lambda s: 0.0))
    for n, p in m3.named_parameters():
        assert torch.equal(p, before[n])


def test_gradient_accumulation_matches_full_batch():
    data = batches(6, bs=4)
    out = []
    for accum in (1, 2):
        model = make_tiny_llama(num_layers=4)
        opt = GrassOptimizer(model, GrassConfig(probe_steps=2, period=2, seed=4), lr=1e-2)
        log = train(model, opt, data, accum=accum)
        out.append((model, log, opt.importance))
    assert out[0][1] == out[1][1]
    for (n, p), (_, q) in zip(out[0][0].named_parameters(), out[1][0].named_parameters()):
        assert_close(p, q, rtol=0, atol=1e-4, msg=n)  # Adam amplifies fp rounding of the summed grads


def test_clipping_applies_to_active_layers_and_mgn_reads_raw_gradient():
    data = batches(3)
    res = {}
    for clip in (None, 1e-4):
        model = make_tiny_llama(num_layers=3)
        ref = copy.deepcopy(model)
        cfg = GrassConfig(
            active_layers=3,
            probe_steps=0,
            period=1,
            max_grad_norm=clip,
            train_embeddings=True,
            train_head=True,
            train_norm=True,
        )
        opt = GrassOptimizer(model, cfg, lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
        for step, x in enumerate(data):
            model(input_ids=x, labels=x).loss.backward()
            ref(input_ids=x, labels=x).loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            if step == 0:  # same weights, same batch: the MGN must not depend on clipping
                res[clip] = opt.importance
        # the total norm is summed in another parameter order than clip_grad_norm_(ref.parameters())
        assert_models_equal(model, ref, rtol=1e-5, atol=1e-7)
    assert res[None].min() > 1e-4  # raw gradients are far above the clip threshold
    assert_close(res[None], res[1e-4], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_reactivation_state(mode):
    """keep: a returning layer continues its AdamW state; reset: it starts afresh after leaving."""
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(
        model, GrassConfig(active_layers=1, probe_steps=0, period=1, on_reactivation=mode, seed=0), lr=1e-2
    )
    total = [0, 0, 0]
    run, prev = 0, None
    returned = False
    for x in batches(16):
        layer = opt.active_layers[0]
        returned |= total[layer] > 0 and layer != prev
        run = run + 1 if layer == prev else 1
        total[layer] += 1
        prev = layer
        p0 = next(model.model.layers[layer].parameters())
        train(model, opt, [x])
        st = opt.state.get(p0)
        expected = total[layer] if mode == "keep" else run
        if st is not None:  # (reset drops the state at once when the layer leaves)
            assert float(st["step"]) == expected
        else:
            assert mode == "reset" and opt.active_layers[0] != layer
    assert returned, "the seed should bring a layer back"


def test_user_frozen_parameters_stay_frozen():
    model = make_tiny_llama(num_layers=3)
    frozen = model.model.layers[1].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = GrassOptimizer(model, GrassConfig(active_layers=3, probe_steps=2, period=2), lr=1e-1)
    train(model, opt, batches(6))
    assert not frozen.requires_grad
    assert torch.equal(frozen, before)


def test_bad_optimizer_arguments():
    model = make_tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match="active_layers=4 is larger than the model's 3 decoder layers"):
        GrassOptimizer(model, GrassConfig(active_layers=4))
    with pytest.raises(ValueError, match="lr="):
        GrassOptimizer(model, lr=-1.0)
    opt = GrassOptimizer(model, GrassConfig(probe_steps=0))
    sd = opt.state_dict()
    other = GrassOptimizer(make_tiny_llama(num_layers=4), GrassConfig(probe_steps=0))
    with pytest.raises(ValueError, match="3 decoder layers"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="'grass'"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "grass"})
