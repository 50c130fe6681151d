"""Will it fit? ``grass_llm.memory.fit``: budgets, the speed model, the search, ``grass-llm memory --budget``
and ``grass-llm train memory_budget=``. Tiny configs; every peak checked against the estimator itself."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import LlamaConfig

from grass_llm.memory import fit as F
from grass_llm.memory.budget import BudgetError, parse_budget
from grass_llm.memory.estimate import estimate_memory

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: the shape of benchmarks/common.py's "tiny" (one config object, so the planner's estimate cache is shared)
TINY = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)
NO_MARGIN = F.Margin(context_bytes=0, fragmentation=0.0)
GiB = 2**30


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# -- budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("24GiB", 24 * GiB),
        ("24GB", 24 * 10**9),
        ("24 GiB", 24 * GiB),
        ("24gib", 24 * GiB),
        ("24", 24 * GiB),
        (24, 24 * GiB),
        (1.5, int(1.5 * GiB)),
        ("512MiB", 512 * 2**20),
        ("805306368B", 805306368),
    ],
)
def test_budgets_parse_as_users_write_them(value, expected):
    assert parse_budget("--budget", value) == expected


@pytest.mark.parametrize("value", ["", "24 parsecs", "24G", "-1", "0", "nan", "inf", "GiB", True, None, 0])
def test_a_bad_budget_is_one_line_naming_the_option(value):
    with pytest.raises(BudgetError) as e:
        parse_budget("--budget", value)
    msg = str(e.value)
    assert msg.startswith("--budget=") and "allowed:" in msg and "\n" not in msg


def test_train_config_checks_memory_budget():
    from grass_llm.recipes.train_config import TrainConfigError, load_train_config

    assert load_train_config(overrides=["memory_budget=24GiB"]).memory_budget == "24GiB"
    assert load_train_config(overrides=["memory_budget=40"]).memory_budget == 40
    with pytest.raises(TrainConfigError, match=r"memory_budget='lots' is invalid; allowed: a memory size"):
        load_train_config(overrides=["memory_budget=lots"])


# -- the speed model -------------------------------------------------------------------------------


def test_the_speed_model_is_the_fit_of_its_measurements():
    fitted = F.calibrate()
    for name in ("micro_batch_s", "matmul_flops", "stream_bytes_per_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(F.SPEED_MODEL, name), rel=0.01), name
    # the LLaMA2-7B rows it rests on, within 15% (docs/fit.md lists every row)
    for m in F.MEASUREMENTS:
        if m.fitted and m.shape == "LLaMA2-7B":
            assert F.modelled_tokens_per_s(m) == pytest.approx(m.tokens_per_s, rel=0.15), m.label


def test_the_measured_shapes_are_those_of_the_benchmark_configs():
    sys.path.insert(0, str(BENCH))
    try:
        from common import model_config
    finally:
        sys.path.remove(str(BENCH))
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    for name, shape in F.MEASURED_SHAPES.items():
        assert F.model_shape(model_config(name), targets, 128) == shape, name


def test_recomputation_transfers_and_small_micro_batches_cost_time():
    shape, model = F.MEASURED_SHAPES["LLaMA2-7B"], F.SPEED_MODEL
    base = F.Work(4096, 1024, 1, 22, 2, 0)

    def t(**kw):
        return model.seconds(shape, F.Work(**{**base.__dict__, **kw}))

    assert t(blocks_recomputed=20) > t()  # frozen blocks recomputed
    assert t(blocks_recomputed=22) > t(blocks_recomputed=20)  # full: the active blocks too
    assert t(streamed_bytes=6.5e9) > t(resample_bytes=6.5e9 / 25) > t()  # step > period > off
    assert t(tokens_per_micro=2048, grad_accum=2) > t()  # the same 4 rows as 2 x 2: slower
    assert t(tokens_per_micro=1024, grad_accum=4) > t(tokens_per_micro=2048, grad_accum=2)


# -- the search ------------------------------------------------------------------------------------


def _expected_peaks(p: F.FitPlan, e: F.Evaluated, config=TINY) -> tuple[int, int | None]:
    """The whole-run peaks of ``e``, from the estimator directly (not through the planner's cache)."""
    c = e.candidate
    overrides = {} if c.residency is None else {"grass.offload": c.residency}
    kw = dict(
        batch_size=c.micro_batch, seq_len=p.seq_len, activation_checkpointing=c.activation_checkpointing
    )
    est = estimate_memory(config, p.method, overrides=overrides, **kw)
    train = est.peak
    elem = 2  # bf16
    if c.grad_accum > 1:  # the trained parameters' gradients, kept between micro-batches
        train += est.trainable_params * elem
    if c.residency == "off":  # the states of the layers a run trains later (6 bytes a parameter: Kahan)
        model = F.model_shape(config)
        per_layer = model.block_params // model.num_layers
        train += 6 * per_layer * (model.num_layers - 2)
    probe = None
    if p.method == "grass":
        probe = estimate_memory(config, p.method, overrides=overrides, phase="probe", **kw).peak
    return train, probe


def test_the_choice_fits_and_every_faster_configuration_does_not():
    kw = dict(batch_size=2, seq_len=32, margin=NO_MARGIN)
    roomy = F.plan(TINY, 2**40, "grass", **kw)
    first = roomy.candidates[0]
    assert roomy.chosen is first and first.candidate.residency == "off"  # off: no state traffic at all
    assert (first.train_peak, first.probe_peak) == _expected_peaks(roomy, first)

    tight = F.plan(TINY, first.peak - 1, "grass", **kw)  # the fastest no longer fits
    assert [e.candidate for e in tight.candidates] == [e.candidate for e in roomy.candidates]  # one order
    chosen = tight.chosen
    assert chosen is not None and chosen is not first
    assert chosen.needed == chosen.peak <= tight.budget
    assert (chosen.train_peak, chosen.probe_peak) == _expected_peaks(tight, chosen)
    assert tight.settings == chosen.candidate.settings and set(tight.settings) == set(F.KNOBS)
    i = tight.candidates.index(chosen)
    for e in tight.candidates[:i]:  # every faster one was shown not to fit, by an estimate or a lower bound
        assert e.verdict.startswith("too big")
        assert (e.needed if e.needed is not None else NO_MARGIN.needed(e.lower_bound)) > tight.budget
    for e in tight.candidates:
        if e.peak is not None:
            assert e.peak >= e.lower_bound
    assert all(e.verdict == "not estimated" for e in tight.candidates[i + 1 :])
    assert chosen.step_seconds >= first.step_seconds  # a smaller budget never buys a faster choice


def test_a_larger_budget_never_yields_a_slower_choice():
    kw = dict(batch_size=2, seq_len=32, margin=NO_MARGIN)
    weights = F.model_shape(TINY).total_params * 2
    everything = F.plan(
        TINY, 4 * weights + 1, "fft", **kw
    )  # above the lower bound: every candidate estimated
    peaks = sorted({e.peak for e in everything.candidates if e.peak is not None})
    assert len(peaks) >= 2
    budgets = [peaks[0] - 1, *peaks, peaks[-1] + 1]
    previous = None
    for budget in budgets:
        p = F.plan(TINY, budget, "fft", **kw)
        if previous is None:
            assert not p.fits  # below the smallest peak: the refusal names it
            assert f"the smallest whole-run peak found is {F.format_size(peaks[0])}" in p.refusal()
            with pytest.raises(F.FitError, match="nothing fits"):
                _ = p.settings
        else:
            assert p.fits and p.chosen.needed <= budget
            if previous.fits:
                assert p.chosen.step_seconds <= previous.chosen.step_seconds
                assert p.candidates.index(p.chosen) <= previous.candidates.index(previous.chosen)
        previous = p


def test_a_plan_does_not_depend_on_the_methods_planned_before_it(monkeypatch):
    """The model-shape cache once ignored the method, so LoRA's adapters were counted (or not) by whichever
    method was planned first in the process (``--method grass,lora``): speeds and lower bounds changed."""
    context = importlib.import_module("grass_llm.memory.fit.context")

    def first_candidates(method):
        c = F.plan(TINY, 2**40, method, batch_size=2, seq_len=32).candidates[0]
        return c.tokens_per_s, c.lower_bound

    alone = {}
    for method in ("lora", "grass"):
        monkeypatch.setattr(context, "_SHAPES", {})
        alone[method] = first_candidates(method)
    monkeypatch.setattr(context, "_SHAPES", {})
    after = {m: first_candidates(m) for m in ("grass", "lora")} | {"grass": first_candidates("grass")}
    assert after == alone


def test_the_probing_step_is_one_estimate_for_every_residency_and_checkpointing_mode():
    """The planner estimates the probing step once per micro-batch size: no residency or checkpointing mode
    changes it while probe_checkpointing recomputes every block (what lets it reuse the estimate)."""
    peaks = {
        (res, ac): estimate_memory(
            TINY,
            "grass",
            batch_size=1,
            seq_len=32,
            phase="probe",
            activation_checkpointing=ac,
            overrides={"grass.offload": res},
        ).peak
        for res, ac in [("period", "none"), ("step", "frozen"), ("off", "full")]
    }
    assert len(set(peaks.values())) == 1, peaks


def test_bad_arguments_name_the_field():
    with pytest.raises(F.FitError, match=r"method='sgd' is invalid; allowed: grass"):
        F.plan(TINY, "1GiB", "sgd")
    with pytest.raises(F.FitError, match=r"budget='x' is invalid"):
        F.plan(TINY, "x")
    with pytest.raises(F.FitError, match=r"batch_size is what the plan chooses"):
        F.plan(TINY, "1GiB", overrides={"batch_size": 2})
    with pytest.raises(
        F.FitError, match=r"micro_batches=\[3\] is invalid; allowed: divisors of batch_size=4"
    ):
        F.plan(TINY, "1GiB", batch_size=4, micro_batches=[3])
    with pytest.raises(F.FitError, match=r"grass.offload is for the layer-wise methods"):
        F.plan(TINY, "1GiB", "lora", residencies=["step"])


def test_plan_settings_apply_to_a_train_config_and_a_grass_config():
    from grass_llm.recipes.train_config import TrainConfig

    p = F.plan(TINY, 2**40, "grass", batch_size=2, seq_len=32, residencies=["step"], checkpointing=["frozen"])
    assert p.settings == {
        "batch_size": 2,
        "grad_accum": 1,
        "activation_checkpointing": "frozen",
        "grass.offload": "step",
    }
    cfg = p.apply(TrainConfig(batch_size=1, grad_accum=2))
    assert (cfg.batch_size, cfg.grad_accum, cfg.activation_checkpointing, cfg.grass.offload) == (
        2,
        1,
        "frozen",
        "step",
    )
    assert p.grass_config().offload == "step"
    assert p.training_arguments() == {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
    }


# -- grass-llm memory --budget ---------------------------------------------------------------------


def _readme_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Will it fit?", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]


def test_readme_will_it_fit_command_runs(tmp_path, capsys):
    """The README's command, on a tiny config (and a short sequence) instead of LLaMA2-7B."""
    from grass_llm.cli import main

    TINY.to_json_file(tmp_path / "config.json")
    (line,) = [ln for ln in _readme_block().splitlines() if ln.startswith("grass-llm memory")]
    argv = shlex.split(line.split(" #")[0])[1:]
    argv = [str(tmp_path / "config.json") if a == "path/to/llama2-7b/config.json" else a for a in argv]
    argv = [*argv[: argv.index("--seq-len") + 1], "32", *argv[argv.index("--seq-len") + 2 :]]
    assert main([*argv, "--json", str(tmp_path / "plans.json")]) == 0
    out = capsys.readouterr().out
    assert "margin: 0.75 GiB + 5% of the peak" in out and re.search(r"planned in [\d.]+ s", out)
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert [p["method"] for p in plans] == ["grass", "lora", "fft"] and all(p["fits"] for p in plans)
    for p in plans:
        assert f"## {p['method']}: fits, " + " ".join(f"{k}={v}" for k, v in p["settings"].items()) in out
        assert p["chosen"]["needed"] <= p["budget"] == 24 * GiB
    again = F.plan(str(tmp_path / "config.json"), "24GiB", "grass", batch_size=4, seq_len=32)
    assert again.settings == plans[0]["settings"]
    # the train line: a shipped config with memory_budget resolves (it needs the hub and a GPU to run)
    from grass_llm.recipes.train_config import load_train_config

    (train,) = [
        shlex.split(ln.split(" #")[0])
        for ln in _readme_block().splitlines()
        if ln.startswith("grass-llm train")
    ]
    cfg = load_train_config(ROOT / train[train.index("--config") + 1], train[train.index("--config") + 2 :])
    assert cfg.memory_budget == "24GiB"


def test_memory_budget_cli_refuses_clearly(tmp_path, capsys):
    from grass_llm.cli import main

    TINY.to_json_file(tmp_path / "config.json")
    base = ["memory", "--model", str(tmp_path / "config.json"), "--seq-len", "32"]
    assert main([*base, "--budget", "24 parsecs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("grass-llm memory: error: --budget='24 parsecs' is invalid") and "\n" not in err
    assert main([*base, "--budget", "512MiB", "--method", "grass,fft"]) == 2  # under the 0.75 GiB margin
    captured = capsys.readouterr()
    assert "nothing fits 0.50 GiB" in captured.out and "nothing fits" in captured.err
    assert main([*base, "--budget", "1GiB", "batch_size=2"]) == 2
    assert "batch_size is what --budget chooses" in capsys.readouterr().err
    # a KEY=VALUE knob restricts the search to it
    assert main([*base, "--budget", "24GiB", "grass.offload=step", "activation_checkpointing=full"]) == 0
    assert "## grass: fits, batch_size=1 grad_accum=1 activation_checkpointing=full grass.offload=step" in (
        capsys.readouterr().out
    )


# -- grass-llm train memory_budget= ------------------------------------------------------------------

TRAIN = [
    "model=builtin:tiny",
    "data=builtin:arith",
    "device=cpu",
    "dtype=bf16",
    "max_steps=3",
    "batch_size=4",
    "grad_accum=1",
    "max_length=32",
    "grass.probe_steps=1",
    "grass.period=2",
    "save_every=0",
    "eval_heldout=0",
    "plots=false",
    "tensorboard=false",
]


def test_train_applies_exactly_the_plan(tmp_path):
    """grass-llm train memory_budget=... (a subprocess) runs with the settings plan_for_train_config chooses,
    prints them and records them in its checkpoint's config (so that --resume continues with them)."""
    from grass_llm.recipes.train_config import load_train_config

    roomy = F.plan_for_train_config(load_train_config(overrides=[*TRAIN, "memory_budget=1TiB"]))
    budget = f"{roomy.chosen.needed - 1}B"  # the fastest configuration no longer fits
    cfg = load_train_config(overrides=[*TRAIN, f"memory_budget={budget}", f"out_dir={tmp_path / 'run'}"])
    expected = F.plan_for_train_config(cfg)
    assert expected.fits and expected.chosen is not expected.candidates[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grass_llm",
            "train",
            *TRAIN,
            f"memory_budget={budget}",
            f"out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"memory_budget={budget} " in proc.stdout and " ".join(expected.train_args()) in proc.stdout
    assert "the plan is for a CUDA device; this run is on cpu" in proc.stdout
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "checkpoints" / "step-000003" / "config.yaml").read_text())
    applied = {k: saved[k] for k in ("batch_size", "grad_accum", "activation_checkpointing")}
    applied["grass.offload"] = saved["grass"]["offload"]
    assert applied == expected.settings
    # each optimizer step took the effective batch (batch_size x grad_accum rows)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # --resume with the same command line continues with the checkpoint's settings and plans nothing
    from grass_llm.recipes.resume import resume_changes
    from grass_llm.recipes.run_checkpoint import read_checkpoint_config
    from grass_llm.recipes.train_cli import config_from_cli

    said: list[str] = []
    again = config_from_cli(None, [*TRAIN, f"memory_budget={budget}", f"out_dir={tmp_path / 'run'}"], "auto")
    again = F.apply_memory_budget(again, torch.device("cpu"), say=said.append)
    assert len(said) == 1 and "resuming from" in said[0]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    assert resume_changes(read_checkpoint_config(checkpoint), again, checkpoint, 3) == {}  # nothing refused


def test_a_bare_number_budget_is_gib_in_train_as_in_its_messages():
    """memory_budget=24 (the command line or YAML load it as the int 24) is 24 GiB, as the config's check and
    every message read it; it was planned as 24 bytes and refused ("nothing fits 0.0 MiB")."""
    from grass_llm.recipes.train_config import load_train_config

    plans = [
        F.plan_for_train_config(load_train_config(overrides=[*TRAIN, f"memory_budget={v}"]))
        for v in ("24", "24.0", "24GiB")
    ]
    assert {p.budget for p in plans} == {24 * 2**30}
    assert all(p.fits for p in plans) and all(p.settings == plans[0].settings for p in plans)


def test_print_config_shows_the_planned_settings(capsys):
    """--print-config printed grass.offload: auto under a memory_budget whose plan chose another residency."""
    import yaml

    from grass_llm.cli import main
    from grass_llm.recipes.train_config import load_train_config

    expected = F.plan_for_train_config(load_train_config(overrides=[*TRAIN, "memory_budget=1TiB"])).settings
    assert main(["train", *TRAIN, "memory_budget=1TiB", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    shown = {k: printed[k] for k in ("batch_size", "grad_accum", "activation_checkpointing")}
    assert {**shown, "grass.offload": printed["grass"]["offload"]} == expected


def test_train_refuses_when_nothing_fits_and_writes_nothing(tmp_path, capsys):
    from grass_llm.cli import main

    out_dir = tmp_path / "run"
    assert main(["train", *TRAIN, "memory_budget=0.5GiB", f"out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err
    assert "grass-llm train: error: memory_budget=0.5GiB: nothing fits 0.50 GiB for grass" in err
    assert "nothing was written" in err
    assert not out_dir.exists()


# -- benchmarks/fit_check.py ---------------------------------------------------------------------------


def _fit_check():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("fit_check")
    finally:
        sys.path.remove(str(BENCH))


def test_fit_check_dry_run_runs_the_plan_with_accumulation(tmp_path, capsys, monkeypatch):
    """The GPU check's path on the CPU: plan the tiny model, run both phases, write the report; and run a plan
    with gradient accumulation (forward/backward per micro-batch, then the step) the way the check does."""
    mod = _fit_check()
    argv = ["--dry-run", "--budget", "24GiB", "--seq-len", "32", "--compare", "1", "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "| train |" in out and "| probe |" in out and "PASS: dry run" in out
    data = json.loads((tmp_path / "fit_check.json").read_text())
    assert data["plan"]["fits"] and [r["phase"] for r in data["measured"]] == ["train", "probe"]
    assert [c["settings"] for c in data["compared"]] == [e["settings"] for e in data["plan"]["candidates"][:2]]
    accumulating = F.plan(TINY, "24GiB", "grass", batch_size=4, seq_len=32, micro_batches=[2])
    assert accumulating.settings["grad_accum"] == 2
    calls = []
    from grass_llm import loss as loss_module

    original = loss_module.causal_lm_loss

    def counting(*args, **kwargs):
        calls.append(args[1]["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(loss_module, "causal_lm_loss", counting)
    r = mod._measure(TINY, accumulating, "train", torch.device("cpu"), 2)
    assert r["tokens_per_s"] > 0
    assert calls and all(shape == (2, 32) for shape in calls) and len(calls) == 4  # 2 steps x 2 micro-batches


def test_fit_table_on_the_tiny_model():
    mod = _fit_check()
    md, plans, _ = mod.table({"tiny": TINY}, budgets=("24GiB",), batch_size=4, seq_len=32)
    assert md.splitlines()[0] == "| model | budget | GRASS γ=2 | LoRA r=128 | FFT |"
    assert len(plans) == 3 and all(p["fits"] for p in plans)
    assert "| tiny | 24.00 GiB | 4x1, AC none, off:" in md
