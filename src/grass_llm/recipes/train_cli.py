"""The ``grass-llm train`` command line: arguments, settings from ``--config`` / ``key=value`` / the
checkpoint being resumed, the run (``grass_llm.recipes.finetune``), its plots (``grass_llm.plots``, drawn
here once the run has returned), exit codes and the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import warnings
from pathlib import Path

from grass_llm.recipes.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, TrainFailed, TrainInputError
from grass_llm.recipes.finetune import DEMO_CONFIG, TrainResult, stopped_detail, train
from grass_llm.recipes.interrupt import Interrupted, StopSignals, signal_name
from grass_llm.recipes.reporting import pct
from grass_llm.recipes.resume import SECTIONS
from grass_llm.recipes.train_config import (
    PER_INVOCATION,
    RESUME_CHANGEABLE,
    TrainConfig,
    TrainConfigError,
    config_yaml,
    load_train_config,
)
from grass_llm.run_layout import TENSORBOARD_DIR

__all__ = ["add_cli_arguments", "cli_main", "config_from_cli", "normalize_argv"]

# CLI
_RESUME_PATH_OPTION = "--resume-from"  # what normalize_argv turns --resume=PATH into


def normalize_argv(argv: list[str]) -> list[str]:
    """The arguments after ``train``, options first, so that ``--resume`` may stand anywhere.

    ``--resume`` takes no value: ``--resume out_dir=D`` resumes in ``D``. A checkpoint path is given as
    ``--resume=PATH`` (or ``--resume PATH`` when PATH has no ``=``, which no ``key=value`` lacks).
    """
    opts: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--resume":
            if nxt is not None and not nxt.startswith("-") and "=" not in nxt:
                opts += [_RESUME_PATH_OPTION, nxt]
                i += 2
                continue
            opts.append(a)
        elif a.startswith("--resume="):
            opts += [_RESUME_PATH_OPTION, a.split("=", 1)[1]]
        elif a == "--config" and nxt is not None:
            opts += [a, nxt]
            i += 2
            continue
        elif a.startswith("-") and a != "-":
            opts.append(a)
        else:
            rest.append(a)
        i += 1
    return opts + rest


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``grass-llm train`` (settings themselves are ``key=value`` overrides)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = "grass-llm train [-h] [--config PATH] [--resume[=PATH]] [--print-config] [KEY=VALUE ...]"
    parser.description = (
        "Fine-tune a causal LM with GRASS or a baseline. Settings come from the defaults, then --config, "
        "then key=value overrides (nested keys with dots: grass.active_layers=4). Without --config the "
        "built-in demo settings (configs/demo.yaml) are the base: `grass-llm train` alone fine-tunes a "
        "tiny pretrained Llama shipped with the package on a built-in arithmetic sample, on CPU, and "
        "prints its held-out accuracy before and after.\n\n"
        "Exit codes: 0 done; 1 the run failed (diverged, could not write); 2 bad input (nothing changed, "
        "e.g. out_dir in use by another run, or --resume on changed data); 130 / 143 stopped by SIGINT / "
        "SIGTERM after saving a checkpoint of the last step. Every failure is one line; set GRASS_LLM_DEBUG=1 "
        "for the traceback of an unexpected one."
    )
    lines = [f"  {k:<30} {h}" for k, h in TrainConfig.help().items()]
    parser.epilog = (
        "settings (key=value):\n"
        + "\n".join(lines)
        + "\n\nOn --resume the settings come from the checkpoint; these may be changed on the command line "
        "or in --config: " + ", ".join(RESUME_CHANGEABLE) + " (any other difference is refused)."
    )
    parser.add_argument("--config", metavar="PATH", help="YAML file of settings (see configs/).")
    parser.add_argument(
        "--resume",
        action="store_const",
        const="auto",
        default=None,
        help=(
            "Continue the run in out_dir from its newest intact checkpoint (may stand anywhere on the "
            "line); --resume=PATH continues from the checkpoint directory PATH. No checkpoint in out_dir: "
            "start from step 0."
        ),
    )
    parser.add_argument(_RESUME_PATH_OPTION, dest="resume", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "--print-config", action="store_true", help="Print the resolved settings as YAML (memory_budget's plan applied) and exit."
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Setting overrides.")


def config_from_cli(
    config: str | None, overrides: list[str] | None, resume: str | None = None
) -> TrainConfig:
    """The settings of one ``grass-llm train`` invocation.

    Without ``--config`` the demo settings are the base. When resuming from a checkpoint, the
    checkpoint's settings are the base instead, and ``--config`` / ``key=value`` apply on top of them
    (``train`` then applies or refuses each difference).
    """
    cfg = load_train_config(config, overrides, base=None if config else DEMO_CONFIG)
    if resume is not None:
        cfg = dataclasses.replace(cfg, resume=resume)
    if cfg.resume is None:
        return cfg
    path = _checkpoint_to_resume(cfg)
    if path is None:
        return cfg
    from grass_llm.recipes.run_checkpoint import CheckpointError, read_checkpoint_config

    try:
        saved = read_checkpoint_config(path)
    except CheckpointError:
        return cfg  # train() reports it (and falls back to an older checkpoint with resume=auto)
    base = {
        k: v
        for k, v in saved.items()
        if k not in PER_INVOCATION and k in TrainConfig.keys() + list(SECTIONS)
    }
    if isinstance(base.get("grass"), dict):  # follow from the top-level keys
        base["grass"] = {k: v for k, v in base["grass"].items() if k not in ("max_grad_norm", "seed")}
    try:
        merged = load_train_config(config, overrides, base=base)
    except TrainConfigError as e:
        raise TrainConfigError(f"{e} (settings of the checkpoint {path} + the command line)") from None
    return dataclasses.replace(merged, resume=cfg.resume)


def _checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``cfg.resume`` points at (auto: the newest intact one in out_dir), or None. A
    given path that is no checkpoint is refused here, before its settings are needed."""
    if cfg.resume != "auto":
        from grass_llm.recipes.resume import check_resume_path

        return check_resume_path(cfg.resume)
    from grass_llm.recipes.run_checkpoint import find_resumable

    if not cfg.run_dir.is_dir():
        return None
    return find_resumable(cfg.run_dir, set_aside=False)[0]


def _resume_args(config: str | None, overrides: list[str]) -> list[str]:
    """The arguments of this invocation that a continuation repeats (not the per-invocation ones)."""
    keep = [o for o in overrides if o.split("=", 1)[0].strip() not in PER_INVOCATION]
    return [*(["--config", config] if config else []), *keep]


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm train``; returns the exit code (0 done, 1 failed, 2 bad input, 128+N signal N)."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = config_from_cli(args.config, args.overrides, args.resume)
    except (TrainConfigError, TrainInputError) as e:
        if getattr(args, "_signals", None) is not None:
            args._signals.check()  # (a failure after a Ctrl-C that a library swallowed: the Ctrl-C)
        print(f"grass-llm train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.print_config:  # the settings the run would use: memory_budget's plan applied
        if cfg.memory_budget is not None:
            from grass_llm.memory.fit import apply_memory_budget
            from grass_llm.recipes.inputs import resolve_device

            try:
                cfg = apply_memory_budget(cfg, resolve_device(cfg), say=lambda line: print(line, file=sys.stderr))
            except (TrainConfigError, TrainInputError) as e:
                print(f"grass-llm train: error: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
        print(config_yaml(cfg), end="")
        return EXIT_OK
    # the CLI's handlers (grass_llm.cli.main installs them first thing), else our own
    signals = getattr(args, "_signals", None)
    own = signals is None
    if own:
        signals = StopSignals().install()
    try:
        def plots(result: TrainResult) -> TrainResult:  # drawn while the run still holds its out_dir
            return _with_plots(result, signals) if result.interrupted is None else result

        finish = plots if cfg.plots else None
        result = train(cfg, signals=signals, resume_args=_resume_args(args.config, args.overrides), finish=finish)
    except (TrainInputError, TrainConfigError) as e:
        print(f"grass-llm train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainFailed as e:
        if main_rank:
            print(f"\ngrass-llm train: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as e:
        if not own:
            raise  # grass_llm.cli.main reports it
        if main_rank:
            print(f"\ngrass-llm train: stopped by {signal_name(e.signum)}{e.detail}", file=sys.stderr)
        return e.exit_code
    finally:
        if own:
            signals.restore()
    if main_rank:
        _print_summary(result)
    return result.exit_code


def _with_plots(result: TrainResult, signals: StopSignals) -> TrainResult:
    """``result`` with the run's plots drawn. A first signal meanwhile lets them finish and then stops
    the command as it would have stopped the run (exit code 128 + N); a second one stops it at once."""
    with signals.deferred():
        try:
            plots = _draw_plots(result.run_dir)
        except Interrupted as e:
            e.detail = stopped_detail("drawing the plots", result.checkpoint, result.resume_command)
            raise
    return dataclasses.replace(result, plots=plots, interrupted=signals.received)


def _draw_plots(run_dir: Path) -> list[Path]:
    try:
        from grass_llm.plots import plot_run
    except ImportError as e:
        warnings.warn(f"plots skipped: {e}", UserWarning, stacklevel=2)
        return []
    try:
        return [Path(p) for p in plot_run(run_dir)]
    except Exception as e:  # plotting must never fail a finished run
        warnings.warn(f"plots skipped: {type(e).__name__}: {e}", UserWarning, stacklevel=2)
        return []


def _q(path: object) -> str:
    """A path as a shell word (quoted when it holds spaces or other special characters): the summary's
    paths are meant to be copied into commands."""
    return shlex.quote(str(path))


def _print_summary(r: TrainResult) -> None:
    loss = "n/a" if r.final_loss is None else f"{r.final_loss:.4f}"
    ran = f"{r.steps_run} steps in {r.seconds:.1f} s"
    if r.start_step:
        ran += f" (steps {r.start_step + 1}-{r.steps} of {r.total_steps}; resumed at step {r.start_step})"
    if r.interrupted is not None:
        print(
            f"\nstopped by {signal_name(r.interrupted)} after step {r.steps} of {r.total_steps}: {ran}, last loss {loss}"
        )
    elif r.steps < r.total_steps:
        print(f"\nstopped at step {r.steps} of {r.total_steps} (stop_at_step): {ran}, last loss {loss}")
    else:
        print(f"\ndone: {ran}, last loss {loss}")
    if r.skipped_steps:
        shown = ", ".join(map(str, r.skipped_steps[:10])) + (", ..." if len(r.skipped_steps) > 10 else "")
        print(
            f"  skipped:    {len(r.skipped_steps)} steps with non-finite gradients (steps {shown}); weights unchanged by them"
        )
    if r.heldout is not None:
        before, after, n = r.heldout
        what = f"{pct(before)} -> {pct(after)}" if after is not None else f"{pct(before)} before training"
        print(
            f"  held-out accuracy: {what} ({n} arithmetic questions not in the training data, greedy decoding)"
        )
    if r.checkpoint is not None:
        print(f"  checkpoint: {_q(r.checkpoint)}  (continue with --resume)")
    print(f"  model:      {_q(r.final_dir) if r.final_dir is not None else '-'}  ({r.final_kind})")
    print(f"  log:        {_q(r.log_path)}")
    tb = r.run_dir / TENSORBOARD_DIR
    if tb.exists():
        print(f"  tensorboard: tensorboard --logdir {_q(tb)}")
    if r.plots:
        print(f"  plots:      {_q(str(r.plots[0].parent) + '/')} ({', '.join(p.name for p in r.plots)})")
        heatmap = [p for p in r.plots if p.name == "layers_heatmap.png"]
        if heatmap:
            print(f"  layer heatmap: {_q(heatmap[0])}  (which decoder layers trained at each step)")
    if r.interrupted is not None:
        print(f"  continue with: {r.resume_command}")
