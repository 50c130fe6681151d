"""LR schedules: same factors as transformers.get_scheduler, delayed past probing, weights_only state."""

from __future__ import annotations

import io

import pytest
import torch

from grass_llm.schedule import SCHEDULES, LRSchedule, build_lr_scheduler, resolve_warmup

KWARGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}}


def _opt(lr=0.5):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("name", SCHEDULES)
def test_factors_equal_transformers(name):
    transformers = pytest.importorskip("transformers")
    ref_opt, ours_opt = _opt(), _opt()
    total = None if name in ("constant", "constant_with_warmup", "inverse_sqrt") else 40
    ref = transformers.get_scheduler(
        name,
        ref_opt,
        num_warmup_steps=7,
        num_training_steps=total,
        scheduler_specific_kwargs=KWARGS.get(name),
    )
    ours = build_lr_scheduler(ours_opt, name, 7, total, scheduler_kwargs=KWARGS.get(name))
    for step in range(50):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12), step
        ref_opt.step(), ours_opt.step()
        ref.step(), ours.step()


def test_delay_holds_step_zero_then_runs_the_schedule():
    schedule = LRSchedule("linear", num_warmup_steps=2, num_training_steps=7, delay_steps=3)
    assert [schedule(s) for s in range(8)] == pytest.approx([0, 0, 0, 0, 0.5, 1, 0.5, 0])


def test_state_dict_loads_with_weights_only():
    """The Trainer reloads scheduler.pt with weights_only=True: the state must be plain numbers."""
    opt = _opt()
    sched = build_lr_scheduler(opt, "cosine", 3, 20, delay_steps=4)
    for _ in range(9):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = _opt()
    sched2 = build_lr_scheduler(opt2, "cosine", 3, 20, delay_steps=4)
    sched2.load_state_dict(state)
    opt.step(), opt2.step()
    sched.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (dict(name="warmup_stable_decay"), "allowed: linear"),
        (dict(name="linear"), "needs num_training_steps"),
        (dict(name="cosine", num_training_steps=5, power=2.0), "takes no argument"),
        (dict(name="linear", num_training_steps=5, delay_steps=-1), "delay_steps"),
        (dict(name="cosine_with_min_lr", num_training_steps=5), "exactly one of min_lr"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**args)


def test_resolve_warmup():
    assert resolve_warmup(0.1, 95) == 10
    assert resolve_warmup(5, None) == 5
    with pytest.raises(ValueError, match="fractional"):
        resolve_warmup(0.5, None)


def test_warmup_after_probing_is_one_definition_for_train_and_the_trainer():
    from grass_llm.schedule import warmup_after_delay

    assert warmup_after_delay(0.1, 100, 5) == 10  # a fraction of the 95 steps after probing
    assert warmup_after_delay(0.5, 10, 10) == 1  # probing takes every step: still a valid schedule
    assert warmup_after_delay(3, None, 5) == 3


def test_the_trainer_helper_takes_a_probing_phase_longer_than_the_run():
    """The HF helper used to compute a negative warmup here and fail (grass-llm train clamped it), and
    then trained nothing without a word: it warns, as grass-llm train does."""
    from grass_llm import GrassConfig
    from grass_llm.integrations.hf import create_grass_optimizer_and_scheduler
    from grass_llm.models import tiny_llama

    model = tiny_llama(32, hidden_size=16, num_layers=2, seed=0)
    with pytest.warns(UserWarning, match=r"probe_steps=8 >= the run's 4 optimizer steps .*no weight will change"):
        _, sched = create_grass_optimizer_and_scheduler(
            model, grass_config=GrassConfig(active_layers=1, probe_steps=8), num_training_steps=4, warmup_steps=0.5
        )
    assert sched.lr_lambdas[0].warmup == 1 and sched.lr_lambdas[0].delay == 8


def test_a_grad_scaler_overflow_does_not_move_the_schedule():
    """The Trainer's order (scaler.step, scaler.update, scheduler.step after every step): an overflow,
    in probing and in the first training step, leaves the schedule where it was (issue #17.4)."""
    from grass_llm import GrassConfig, GrassOptimizer
    from grass_llm.models import tiny_llama

    model = tiny_llama(32, hidden_size=16, num_layers=2, seed=0)
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, period=2, probe_steps=2), lr=1.0)
    sched = build_lr_scheduler(opt, "linear", num_warmup_steps=2, num_training_steps=9, delay_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    applied = []
    for step in range(1, 10):
        applied.append(opt.param_groups[0]["lr"])
        loss = model(input_ids=x, labels=x).loss
        if step in (1, 4):
            loss = loss * float("inf")  # an overflow
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
    assert opt.skipped_steps == 2 and opt.last_step_skipped is False
    # probing steps 1-3 (1 skipped and repeated), step 4 skipped: warm-up from step 5, decay over 7 steps
    assert applied == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 0.8, 0.6])
    assert sched.last_epoch == 7
