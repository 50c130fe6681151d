"""GRASS through the real Hugging Face Trainer / TRL code paths: the factory, the delayed schedule,
callback logs, resume_from_checkpoint, gradient accumulation, the Trainer's own clipping and
non-finite steps, on a tiny Llama."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import RandomTokens, make_tiny_llama
from torch.testing import assert_close

from grass_llm import GrassConfig, GrassOptimizer
from grass_llm.schedule import build_lr_scheduler

transformers = pytest.importorskip("transformers")

from grass_llm.integrations.hf import (  # noqa: E402
    add_grass_callback,
    create_grass_optimizer_and_scheduler,
)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _args(tmp_path, cls=None, **kw):
    """Small CPU TrainingArguments (or a subclass such as TRL's SFTConfig) for a few steps."""
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        max_steps=8,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return (cls or transformers.TrainingArguments)(**base)


def test_trainer_trains_only_sampled_layers_and_logs_grass_state(tmp_path):
    model = make_tiny_llama(num_layers=4)
    args = _args(tmp_path)
    cfg = GrassConfig(active_layers=1, period=2, probe_steps=2, max_grad_norm=1.0)
    opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)
    assert isinstance(opt, GrassOptimizer)

    layers = model.model.layers
    before = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    emb = model.model.embed_tokens.weight.detach().clone()
    seen: list[list[int]] = []

    class Spy(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(opt.active_layers)

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, sched), callbacks=[Spy()]
    )
    add_grass_callback(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the Trainer's default clipping needs no setting
        trainer.train()

    assert seen[:2] == [[], []]  # probing
    trained = {layer for act in seen[2:] for layer in act}
    assert all(len(act) == 1 for act in seen[2:])
    assert seen[2] == seen[3] and seen[4] == seen[5] and seen[6] == seen[7]  # period 2
    for i, layer in enumerate(layers):
        changed = any(not torch.equal(p, before[i][n]) for n, p in layer.named_parameters())
        assert changed == (i in trained), f"layer {i}: changed={changed}, trained layers {sorted(trained)}"
    assert torch.equal(model.model.embed_tokens.weight, emb)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8
    last = logs[-1]
    assert last["grass/num_active"] == 1.0 and last["grass/probing"] == 0.0
    assert sum(last[f"grass/active/layer_{i}"] for i in range(4)) == 1.0
    assert abs(sum(last[f"grass/prob/layer_{i}"] for i in range(4)) - 1.0) < 1e-9
    assert all(last[f"grass/mgn/layer_{i}"] > 0 for i in range(4))
    assert logs[0]["grass/probing"] == 1.0
    # the schedule started after probing: warmup 0, linear decay over the 6 training steps
    assert logs[2]["learning_rate"] == pytest.approx(1e-2)


def test_callback_reaches_reporters_when_added_first(tmp_path):
    model = make_tiny_llama(num_layers=2)
    args = _args(tmp_path, max_steps=2)
    opt, sched = create_grass_optimizer_and_scheduler(
        model, args, grass_config=GrassConfig(active_layers=1, period=1, probe_steps=1)
    )
    received: list[dict] = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            received.append(dict(logs))

    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(8),
        optimizers=(opt, sched),
        callbacks=[Reporter()],
    )
    add_grass_callback(trainer)
    trainer.train()
    assert received and all("grass/mgn/layer_0" in r for r in received)


def test_trainer_clipping_does_not_change_the_mgn(tmp_path):
    """The Trainer clips before optimizer.step(); GRASS reads each gradient's norm before that, so the
    MGN is the raw gradient's whatever TrainingArguments.max_grad_norm is (default 1.0 included)."""
    results = {}
    for clip in (0.0, 1.0, 1e-4):
        model = make_tiny_llama(num_layers=4)
        args = _args(tmp_path / str(clip), max_steps=2, max_grad_norm=clip)
        cfg = GrassConfig(active_layers=2, period=1, probe_steps=1, ema=1.0)
        opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)
        transformers.Trainer(
            model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, sched)
        ).train()
        results[clip] = (opt.importance, params_of(model))
    # the same weights and batches until the first update: the same observations (ema=1: the MGN of a
    # layer is its last observation); the tightly clipped run's weights moved differently
    mgn = {c: r[0] for c, r in results.items()}
    assert torch.allclose(mgn[1.0], mgn[0.0], rtol=1e-5) and torch.allclose(mgn[1e-4], mgn[0.0], rtol=1e-5)
    assert any(not torch.equal(v, results[0.0][1][n]) for n, v in results[1e-4][1].items())


def test_trainer_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    """resume_from_checkpoint loads our optimizer.pt and scheduler.pt (weights_only) and continues exactly:
    probing, sampler RNG, MGN, every layer's AdamW state, the delayed LR schedule."""

    def trainer(model, out):
        args = _args(out, max_steps=10, save_strategy="steps", save_steps=4, warmup_steps=2)
        cfg = GrassConfig(active_layers=1, period=3, probe_steps=2)
        opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)
        return transformers.Trainer(
            model=model, args=args, train_dataset=RandomTokens(64), optimizers=(opt, sched)
        ), opt

    full = make_tiny_llama(num_layers=4)
    t, opt_full = trainer(full, tmp_path / "full")
    t.train()
    resumed = make_tiny_llama(num_layers=4)
    t, opt_resumed = trainer(resumed, tmp_path / "resumed")
    t.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    for n, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[n]), n
    assert torch.equal(opt_full.importance, opt_resumed.importance)
    assert opt_full.active_layers == opt_resumed.active_layers and opt_resumed.global_step == 10


def test_trainer_accumulation_probes_the_accumulated_gradient(tmp_path):
    """With gradient_accumulation_steps=4 the probing MGN is eq. 2 of the step's accumulated gradient
    (before: sqrt(k * sum_i ||g_i||^2 / N), 2x too high at k=4)."""
    model = make_tiny_llama(num_layers=3)
    acc: dict[int, torch.Tensor] = {}

    def record(p):  # registered before GRASS's hooks: sees each micro-batch gradient first
        acc[id(p)] = acc.get(id(p), 0) + p.grad.detach().clone()

    for layer in model.model.layers:
        for p in layer.parameters():
            p.register_post_accumulate_grad_hook(record)
    args = _args(tmp_path, max_steps=1, gradient_accumulation_steps=4, per_device_train_batch_size=2)
    opt, sched = create_grass_optimizer_and_scheduler(
        model, args, grass_config=GrassConfig(active_layers=1, probe_steps=5)
    )
    transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, sched)
    ).train()
    expected = []
    for layer in model.model.layers:
        params = list(layer.parameters())
        sq = sum(acc[id(p)].double().pow(2).sum() for p in params)
        expected.append((sq / sum(p.numel() for p in params)).sqrt())
    assert_close(opt.importance, torch.stack(expected), rtol=1e-5, atol=0)


def test_trainer_skips_and_logs_non_finite_steps(tmp_path):
    model = make_tiny_llama(num_layers=3)
    args = _args(tmp_path, max_steps=5)
    opt, sched = create_grass_optimizer_and_scheduler(
        model, args, grass_config=GrassConfig(active_layers=2, period=10, probe_steps=1)
    )
    snapshots = {}

    class Poison(transformers.TrainerCallback):  # a NaN loss in the 4th step
        def on_step_begin(self, args, state, control, **kw):
            snapshots[state.global_step] = params_of(model)
            model.lm_head.weight.data[0, 0] = float("nan") if state.global_step == 3 else 0.0

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, sched), callbacks=[Poison()]
    )
    add_grass_callback(trainer)
    with pytest.warns(RuntimeWarning, match="skipped a step: non-finite gradients"):
        trainer.train()
    assert opt.skipped_steps == 1
    changed_in_step_4 = [
        n for n, v in snapshots[4].items() if not torch.equal(v, snapshots[3][n]) and "lm_head" not in n
    ]
    assert changed_in_step_4 == []
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lm_head" not in n)
    assert torch.isfinite(opt.importance).all()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["grass/skipped_steps"] for h in logs] == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_delayed_schedule_applies_lr_after_probing():
    model = make_tiny_llama(num_layers=2)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=3), lr=1.0)
    sched = build_lr_scheduler(opt, "linear", num_warmup_steps=2, num_training_steps=7, delay_steps=3)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    # 3 probing steps at f(0)=0, then warmup 0, 0.5, then linear decay over the 2 steps left
    assert lrs == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 0.5])
    assert sched.state_dict()["last_epoch"] == 7


def test_factory_needs_training_steps_for_decaying_schedules():
    model = make_tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match="num_training_steps"):
        create_grass_optimizer_and_scheduler(model, grass_config=GrassConfig(active_layers=1))
    opt, sched = create_grass_optimizer_and_scheduler(
        model, grass_config=GrassConfig(active_layers=1), lr_scheduler_type="constant", learning_rate=0.1
    )
    assert opt.param_groups[0]["lr"] == 0.1 and sched.get_last_lr()[0] == 0.1


def test_trl_sft_trainer_takes_the_grass_optimizer(tmp_path):
    """TRL's SFTTrainer accepts the same (optimizer, scheduler) pair: after probing, exactly the drawn
    layers change and nothing else."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from grass_llm.data import builtin_sample, builtin_tokenizer, format_prompt

    tokenizer = builtin_tokenizer()
    texts = [format_prompt(r) + r["output"] for r in builtin_sample(16)]
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, cls=trl.SFTConfig, max_steps=6, max_length=64, dataset_text_field="text")
    cfg = GrassConfig(active_layers=2, period=10, probe_steps=2, seed=0)
    opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        optimizers=(opt, sched),
    )
    trainer.train()
    assert opt.global_step == 6 and len(opt.active_layers) == 2
    changed = {n.split(".")[2] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {str(i) for i in opt.active_layers}


def test_a_run_shorter_than_probing_says_so(tmp_path):
    """max_steps below probe_steps trained nothing and said nothing: the helper warns when it knows
    max_steps; when the Trainer derives it from epochs, GrassCallback warns at the start."""
    model = make_tiny_llama(num_layers=2)
    cfg = GrassConfig(active_layers=1, probe_steps=5)
    with pytest.warns(UserWarning, match=r"probe_steps=5 >= the run's 3 optimizer steps"):
        create_grass_optimizer_and_scheduler(model, _args(tmp_path, max_steps=3), grass_config=cfg)
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1, lr_scheduler_type="constant")
    opt, sched = create_grass_optimizer_and_scheduler(model, args, grass_config=cfg)  # (max_steps unknown)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(8), optimizers=(opt, sched))
    add_grass_callback(trainer)
    with pytest.warns(UserWarning, match=r"5 probing steps remain and the Trainer runs 2 more optimizer steps"):
        trainer.train()
    assert opt.probing and opt.probe_done == 2
