"""GRASS driven by the real PyTorch / accelerate / transformers code paths users take: accelerate's
``Accelerator.prepare``, ``torch.amp.GradScaler``, gradient accumulation loops, reentrant activation
checkpointing, non-finite gradients, a second optimizer on one model, multimodal and encoder-decoder
layer discovery."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from conftest import RandomTokens, make_tiny_llama
from torch.testing import assert_close

from grass_llm import GrassConfig, GrassOptimizer, LayerDiscoveryError, discover_layers

VOCAB = 64


def batches(n: int, bs: int = 4, seq: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, seq), generator=g) for _ in range(n)]


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def eq2(model, grads):
    """sqrt(||g_l||^2 / N_l) per decoder layer of the given gradients (id(param) -> tensor)."""
    out = []
    for layer in model.model.layers:
        ps = list(layer.parameters())
        out.append((sum(grads[id(p)].double().pow(2).sum() for p in ps) / sum(p.numel() for p in ps)).sqrt())
    return torch.stack(out)


def record_grads(model):
    """Hooks registered before GRASS's: they see every micro-batch gradient; returns the running sums."""
    acc: dict[int, torch.Tensor] = {}

    def hook(p):
        acc[id(p)] = acc.get(id(p), 0) + p.grad.detach().clone()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return acc


# ----------------------------------------------------------------------------------------------
# gradient accumulation in a plain loop


def test_no_sync_accumulation_probes_the_accumulated_gradient():
    model = make_tiny_llama(num_layers=3)
    acc = record_grads(model)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=5), lr=1e-2)
    micro = batches(1, bs=8)[0].chunk(4)
    for i, x in enumerate(micro):
        with opt.no_sync() if i < 3 else torch.enable_grad():
            (model(input_ids=x, labels=x).loss / 4).backward()
    assert all(p.grad is None for p in model.parameters()), "probing holds no gradient on the device"
    opt.step()
    assert_close(opt.importance, eq2(model, acc), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_unmarked_accumulation_probes_exactly(k):
    """A loop without no_sync() (k backward() calls, then step()): the first step learns k and is not
    observed (it is repeated, with a warning), every later step is eq. 2 of its accumulated gradient, so the
    probing MGN is exactly their mean; a later step with fewer passes is exact too, one with more is again
    not observed."""
    model = make_tiny_llama(num_layers=3)
    acc = record_grads(model)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=4), lr=1e-2)
    observed = []
    for step, n in enumerate([k, k, k, k - 1, k + 1, k + 1, k + 1]):
        acc.clear()
        before = opt.probe_done
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for chunk in batches(n, bs=2, seed=step):
                (model(input_ids=chunk, labels=chunk).loss / n).backward()
            opt.step()
        repeated = step in (0, 4)
        assert any("is not observed and is repeated" in str(m.message) for m in w) == repeated
        assert opt.probe_done == before + (0 if repeated else 1)
        if not repeated:
            observed.append(eq2(model, acc))
        if not opt.probing:
            break
    assert len(observed) == 4 and opt.skipped_steps == 2
    assert_close(opt.importance, torch.stack(observed).mean(0), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# torch.amp.GradScaler


def _amp_run(scaler, data, cfg, explicit_unscale=False, clip=None, poison=()):
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(model, cfg, lr=1e-2)
    log = []
    for i, x in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        if i in poison:  # an overflow: the scaled loss (and every gradient) is infinite
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        else:
            scaler.scale(loss).backward()
            if explicit_unscale:
                scaler.unscale_(opt)
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        log.append(opt.active_layers)
    return model, opt, log


@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_grad_scaler_gives_the_unscaled_run(explicit_unscale):
    """GradScaler("cpu") in both phases: the MGN is read from unscaled gradients and the weights equal
    the run without a scaler (a power-of-two scale is exact)."""
    cfg = GrassConfig(active_layers=1, period=2, probe_steps=2, seed=4)
    data = batches(6)
    ref, ref_opt, ref_log = _amp_run(None, data, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt, log = _amp_run(scaler, data, cfg, explicit_unscale=explicit_unscale)
    assert log == ref_log
    assert torch.equal(opt.importance, ref_opt.importance)
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[n]), n
    assert opt.skipped_steps == 0


def test_grad_scaler_overflow_is_skipped_in_both_phases():
    """An overflow in a probing step (whose gradients GRASS frees) and in a training step: the scaler
    skips both and halves its scale each time; nothing non-finite reaches the weights or the MGN."""
    cfg = GrassConfig(active_layers=1, period=2, probe_steps=2, seed=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    model, opt, log = _amp_run(scaler, batches(8), cfg, poison=(1, 5))
    assert opt.skipped_steps == 2 and scaler.get_scale() == 2.0**10
    assert log[1] == [] and log[2] != [], "the skipped probing step did not count: probing ends a step later"
    assert not opt.probing and opt.global_step == 6
    assert torch.isfinite(opt.importance).all() and (opt.importance > 0).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# accelerate


def test_accelerator_prepare_round_trips_the_state_and_trains():
    """AcceleratedOptimizer takes state_dict(), moves it to the accelerator and loads it back; the
    accumulate() context tells probing which micro-batch is the last."""
    accelerate = pytest.importorskip("accelerate")
    cfg = GrassConfig(active_layers=1, period=2, probe_steps=2, seed=1)
    data = batches(6, bs=8)
    ref = make_tiny_llama(num_layers=3)
    ref_opt = GrassOptimizer(ref, cfg, lr=1e-2)
    for x in data:
        for i, chunk in enumerate(x.chunk(2)):
            with ref_opt.no_sync() if i == 0 else torch.enable_grad():
                (ref(input_ids=chunk, labels=chunk).loss / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_tiny_llama(num_layers=3)
    model, opt = accelerator.prepare(model, GrassOptimizer(model, cfg, lr=1e-2))
    for x in data:
        for chunk in x.chunk(2):
            with accelerator.accumulate(model):
                accelerator.backward(model(input_ids=chunk, labels=chunk).loss)
                opt.step()
                opt.zero_grad()
    grass = opt.optimizer
    assert torch.equal(grass.importance, ref_opt.importance)
    assert_close(params_of(model), params_of(ref), rtol=1e-6, atol=1e-7)


def test_load_state_dict_puts_each_piece_where_it_belongs():
    """accelerate moves every tensor of the state to its device (on a GPU: the sampler's RNG state,
    the MGN, the step counters); loading puts each back where the optimizer keeps it."""
    cfg = GrassConfig(active_layers=1, period=2, probe_steps=1, seed=2)
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(model, cfg, lr=1e-2)
    for x in batches(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()

    def moved(obj):  # what a device move with dtype-preserving copies would give (here: new tensors)
        if isinstance(obj, torch.Tensor):
            return obj.clone().to(torch.float64) if obj.dtype == torch.uint8 else obj.clone()
        if isinstance(obj, dict):
            return {k: moved(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [moved(v) for v in obj]
        return obj

    other = make_tiny_llama(num_layers=3)
    other.load_state_dict(model.state_dict())
    opt2 = GrassOptimizer(other, cfg, lr=1e-2)
    opt2.load_state_dict(moved(sd))
    assert all(
        st["step"].device.type == "cpu" and st["step"].dtype == torch.float32 for st in opt2.state.values()
    )
    for x in batches(4, seed=5):
        for m, o in ((model, opt), (other, opt2)):
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()
    assert opt.active_layers == opt2.active_layers
    assert torch.equal(opt.importance, opt2.importance)


# ----------------------------------------------------------------------------------------------
# reentrant activation checkpointing


@pytest.mark.parametrize("train_head", [False, True])
def test_reentrant_checkpointing_trains_the_active_layers(train_head):
    """gradient_checkpointing_enable(use_reentrant=True): the lowest active block gets a grad-requiring
    input, so every active layer trains, as with non-reentrant checkpointing (before: an error, or with
    train_head=True layers that silently never trained)."""
    cfg = GrassConfig(active_layers=2, period=2, probe_steps=2, seed=7, train_head=train_head)
    runs = []
    for reentrant in (False, True):
        model = make_tiny_llama(num_layers=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        before = params_of(model)
        opt = GrassOptimizer(model, cfg, lr=1e-2)
        for x in batches(6):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((model, opt, before))
    (m0, o0, _), (m1, o1, before) = runs
    assert torch.equal(o0.importance, o1.importance)
    assert_close(params_of(m1), params_of(m0), rtol=1e-6, atol=1e-7)
    changed = {
        int(n.split(".")[2])
        for n, p in m1.named_parameters()
        if n.startswith("model.layers.") and not torch.equal(p, before[n])
    }
    assert changed and changed <= set(range(4))


# ----------------------------------------------------------------------------------------------
# non-finite gradients in a plain loop


def test_non_finite_step_changes_nothing_and_is_counted():
    model = make_tiny_llama(num_layers=3)
    opt = GrassOptimizer(model, GrassConfig(active_layers=2, period=3, probe_steps=1), lr=1e-2)
    data = batches(5)
    for x in data[:2]:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    before, mgn, state = params_of(model), opt.importance, copy.deepcopy(opt.state_dict())
    x = data[2]
    model(input_ids=x, labels=x).loss.backward()
    layer = opt.active_layers[0]
    next(model.model.layers[layer].parameters()).grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped a step: non-finite gradients"):
        opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(opt.importance, mgn) and opt.period_pos == state["grass"]["period_pos"]
    for idx, st in state["state"].items():
        for k, v in st.items():
            assert torch.equal(opt.state_dict()["state"][idx][k], v)
    model(input_ids=data[3], labels=data[3]).loss.backward()
    opt.step()
    assert not opt.last_step_skipped and opt.skipped_steps == 1


# ----------------------------------------------------------------------------------------------
# a second optimizer on the same model


def test_deleted_optimizer_leaves_no_hooks_and_no_frozen_flags():
    model = make_tiny_llama(num_layers=3)
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=1), lr=1e-2)
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    del opt
    gc.collect()
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()  # no hook of the dead optimizer frees a gradient
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "model.embed_tokens.weight")

    opt2 = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0, train_embeddings=True), lr=1e-2)
    assert opt2.binding.user_frozen == {id(model.model.embed_tokens.weight)}


def test_second_optimizer_closes_the_first_and_context_manager_closes():
    model = make_tiny_llama(num_layers=3)
    first = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=2), lr=1e-2)
    with pytest.warns(RuntimeWarning, match="already has a GrassOptimizer; closing it"):
        second = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0), lr=1e-2)
    assert first.closed and not second.closed
    assert second.binding.user_frozen == set(), "the first optimizer's freezing is not the user's"
    with pytest.raises(RuntimeError, match="closed"):
        first.step()
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    second.step()
    with GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0), lr=1e-2) as third:
        assert second.closed and third.active_layers
    assert third.closed and all(p.requires_grad for p in model.parameters())


def test_failed_construction_leaves_the_model_as_it_was():
    model = make_tiny_llama(num_layers=3)
    for layer in model.model.layers:
        layer.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="every parameter of the decoder blocks is frozen"):
        GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0), lr=1e-2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()  # no hook of the failed optimizer frees gradients
    assert model.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# multimodal and encoder-decoder models


def _multimodal(name):
    import transformers as tf

    text = dict(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2)
    if name == "llava":
        vc = tf.CLIPVisionConfig(image_size=32, patch_size=8, **vision)
        cfg = tf.LlavaConfig(
            vision_config=vc.to_dict(),
            text_config=tf.LlamaConfig(num_key_value_heads=2, **text).to_dict(),
            image_token_index=299,
        )
        return tf.LlavaForConditionalGeneration(cfg), "model.language_model.layers"
    if name == "gemma3":
        cfg = tf.Gemma3Config(
            text_config=dict(num_key_value_heads=1, head_dim=8, **text),
            vision_config=dict(image_size=32, patch_size=8, **vision),
            mm_tokens_per_image=4,
        )
        return tf.Gemma3ForConditionalGeneration(cfg), "model.language_model.layers"
    if name == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(
            text_config=dict(
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **text
            ),
            vision_config=dict(depth=6, embed_dim=64, hidden_size=16, num_heads=2),
        )
        return tf.Qwen2VLForConditionalGeneration(cfg), "model.language_model.layers"
    if name == "t5":
        cfg = tf.T5Config(
            vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=6, num_decoder_layers=2, num_heads=2
        )
        return tf.T5ForConditionalGeneration(cfg), "decoder.block"
    cfg = tf.BartConfig(
        vocab_size=300, d_model=16, encoder_layers=6, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=32,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(cfg), "model.decoder.layers"


@pytest.mark.parametrize("name", ["llava", "gemma3", "qwen2_vl", "t5", "bart"])
def test_discovery_picks_the_language_decoder(name):
    """The vision tower / encoder holds more parameters than the text decoder here; discovery still
    picks the decoder's blocks, and the other stack stays frozen in a group of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, path = _multimodal(name)
    groups = discover_layers(model)
    assert groups.block_path == path and groups.num_layers == 2
    blocks = sum(p.numel() for ps in groups.block_params for p in ps)
    other = sum(p.numel() for p in groups.other)
    assert other > blocks, "the test model's other stack is the larger one"
    every = [id(p) for ps in groups.block_params for p in ps]
    every += [id(p) for p in groups.embeddings + groups.head + groups.norm + groups.other]
    assert sorted(every) == sorted(id(p) for p in model.parameters())
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0, train_norm=True), lr=1e-2)
    assert all(not p.requires_grad for p in groups.other), (
        "train_norm must not train a vision tower / encoder"
    )
    opt.close()
    assert all(p.requires_grad for p in groups.other)


def test_ambiguous_stacks_ask_for_layers():
    from torch import nn

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
            self.vision = nn.ModuleList([nn.Conv1d(8, 8, 3) for _ in range(4)])

    with pytest.raises(LayerDiscoveryError, match=r"several stacks of blocks.*layers='"):
        discover_layers(TwoTowers())
    assert discover_layers(TwoTowers(), "text").num_layers == 4


# ----------------------------------------------------------------------------------------------
# CUDA only (run by benchmarks/gpu_check.py where a GPU is available)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
def test_accelerate_on_cuda_moves_the_state_and_trains():
    """AcceleratedOptimizer moves the whole optimizer state (sampler RNG, MGN, steps) to the GPU and
    loads it back: GRASS's own pieces go back where they belong, and training goes on."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator()
    model = make_tiny_llama(num_layers=3).cuda()
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, period=2, probe_steps=1, offload=True), lr=1e-2)
    for x in batches(2):
        x = x.cuda()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model, prepared = accelerator.prepare(model, opt)  # state_dict -> cuda -> load_state_dict
    for x in batches(3, seed=2):
        x = x.cuda()
        accelerator.backward(model(input_ids=x, labels=x).loss)
        prepared.step()
        prepared.zero_grad()
    assert opt.global_step == 5 and torch.isfinite(opt.importance).all()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_on_cuda_with_offload(tmp_path, precision):
    """The Trainer on CUDA: bf16, and fp16 with its GradScaler (through accelerate), offload on."""
    transformers = pytest.importorskip("transformers")
    from grass_llm.integrations.hf import create_grass_optimizer_and_scheduler

    model = make_tiny_llama(num_layers=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", per_device_train_batch_size=4,
        learning_rate=1e-3, max_steps=8, logging_steps=1, disable_tqdm=True, **{precision: True},
    )  # fmt: skip
    cfg = GrassConfig(active_layers=2, period=2, probe_steps=2, offload=True)
    opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)
    transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, sched)
    ).train()
    assert opt.offloader is not None and not opt.probing
    assert torch.isfinite(opt.importance).all() and (opt.importance > 0).all()
    assert opt.global_step + opt.skipped_steps == 8


# ----------------------------------------------------------------------------------------------
# the optimizer follows its model to another device


def _tensors(obj, path="opt", seen=None):
    """(path, tensor) for every tensor reachable from ``obj`` through attributes, dicts, lists and the
    project's own objects (the offloader, tracker, sampler, backend), parameters of the model excluded."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        if not isinstance(obj, torch.nn.Parameter) or path.startswith("opt.loss_scale_probe"):
            yield path, obj
        if obj.grad is not None:
            yield from _tensors(obj.grad, path + ".grad", seen)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{path}[param]", seen)
        return
    if isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", seen)
        return
    if type(obj).__module__.startswith("grass_llm") or type(obj).__name__.startswith("_"):
        for k, v in getattr(obj, "__dict__", {}).items():
            yield from _tensors(v, f"{path}.{k}", seen)


#: tensors kept on the host by design: torch.optim's step counters, the host copies the sampler reads once
#: a period, the offloader's host buffers
_HOST_BY_DESIGN = ("['step']", "tracker.mgn", "sampler.", "offloader._units")


def _misplaced(opt, device):
    return [
        (path, str(t.device))
        for path, t in _tensors(opt)
        if t.device.type != device and not any(k in path for k in _HOST_BY_DESIGN)
    ]


def _move(model, device):
    """``model.to(device)`` keeping the Parameter objects, as a move to a GPU does (CPU -> meta would
    replace them, their tensor types differ; swapping on conversion keeps them, but drops their
    gradient hooks: only forward passes are run after this move)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("offload", [False, True])
def test_optimizer_follows_the_model_to_another_device(offload, one_thread):
    """Built on the CPU, the model then moved (the HF Trainer's order, accelerate's and many loops'): every
    tensor the optimizer keeps must follow at the next forward pass (on a CPU-only machine the other device
    is ``meta``; tests/test_ecosystem.py's CUDA tests train after a real move). With offload the model moves
    during probing, when no state exists yet, and the offloader is rebuilt for the new device; without, it
    moves after training steps and the AdamW states follow."""
    model = make_tiny_llama(num_layers=4)
    cfg = GrassConfig(active_layers=2, period=50, probe_steps=5 if offload else 1, offload=offload)
    opt = GrassOptimizer(model, cfg, lr=1e-2)
    for ids in batches(1 if offload else 3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.probing == offload and (offload or opt.state)
    assert (opt.offloader is not None) == offload
    assert _misplaced(opt, "cpu") == []
    _move(model, "meta")
    with torch.no_grad():
        model(input_ids=batches(1)[0].to("meta"))
    assert _misplaced(opt, "meta") == []
    assert not offload or opt.offloader.device.type == "meta"


def test_moving_the_model_inside_a_step_is_refused(one_thread):
    model = make_tiny_llama(num_layers=2)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0), lr=1e-2)
    ids = batches(1)[0]
    with opt.no_sync():
        model(input_ids=ids, labels=ids).loss.backward()
    _move(model, "meta")
    with pytest.raises(RuntimeError, match="in the middle of an optimizer step"):
        opt.step()
