"""The Hugging Face Trainer integration: factory, delayed schedule, callback logs, on a tiny Llama."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_llama

from grass_llm import GrassConfig, GrassOptimizer
from grass_llm.schedule import build_lr_scheduler

transformers = pytest.importorskip("transformers")

from grass_llm.integrations.hf import (  # noqa: E402
    GrassCallback,
    add_grass_callback,
    create_grass_optimizer_and_scheduler,
)

VOCAB = 64


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


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
        max_grad_norm=0.0,
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
        model=model, args=args, train_dataset=_RandomTokens(), optimizers=(opt, sched), callbacks=[Spy()]
    )
    add_grass_callback(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # max_grad_norm=0: no clipping warning
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
        train_dataset=_RandomTokens(8),
        optimizers=(opt, sched),
        callbacks=[Reporter()],
    )
    add_grass_callback(trainer)
    trainer.train()
    assert received and all("grass/mgn/layer_0" in r for r in received)


def test_callback_warns_when_trainer_clips(tmp_path):
    model = make_tiny_llama(num_layers=2)
    args = _args(tmp_path, max_steps=1, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="max_grad_norm=0"):
        opt, sched = create_grass_optimizer_and_scheduler(
            model, args, grass_config=GrassConfig(active_layers=1, probe_steps=0)
        )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_RandomTokens(4),
        optimizers=(opt, sched),
        callbacks=[GrassCallback()],
    )
    with pytest.warns(UserWarning, match="GrassConfig.max_grad_norm"):
        trainer.train()


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
