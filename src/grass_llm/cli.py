"""The ``grass-llm`` command line: one entry point, one subcommand per workflow.

Each subcommand lives in its own module, which provides ``add_cli_arguments(parser)`` and
``cli_main(args) -> int`` (and may provide ``normalize_argv(args) -> args``, applied to the arguments
after the subcommand's name before parsing). Modules are imported only when their subcommand runs, so
``grass-llm -h`` stays fast and the core never imports transformers.

:func:`main` also sets up the output of a command-line tool (not done at import, so that importing
``grass_llm`` changes nothing): warnings print as one ``grass-llm: warning: ...`` line without the
source line, and third-party ``FutureWarning`` s (deprecation notices meant for developers) are not
shown.

Every failure ends in one line and its exit code: the subcommands report what they expect (bad input:
exit code 2; a run that failed: 1); anything else reaches :func:`main`, which prints
``grass-llm COMMAND: error: <type>: <message>`` and returns 1, with the traceback only when the
environment variable ``GRASS_LLM_DEBUG`` is set (to anything but ``0``). A signal stops any command
with exit code 128 + N and one line; an error that follows a signal (third-party code that swallowed
or converted the stop, see ``grass_llm.recipes.interrupt``) is reported as that signal.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import warnings
from collections.abc import Sequence

from grass_llm._text import one_line

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "grass_llm.recipes.train_cli",
        "fine-tune a model with GRASS or a baseline (YAML config + key=value overrides)",
    ),
    "eval": ("grass_llm.evaluate", "evaluate a model on LLM-Adapters arithmetic / commonsense benchmarks"),
    "memory": (
        "grass_llm.memory.fit",
        "estimate peak device memory of a training step without a GPU; --budget: the fastest settings that fit",
    ),
    "plot": ("grass_llm.plots", "draw layer-activity, MGN, probability and loss plots for a run directory"),
}


_NOTHING_DONE = " during setup, before the first step: nothing was trained or saved in this invocation"
#: set (to anything but 0) to see the traceback of an unexpected error
DEBUG_ENV = "GRASS_LLM_DEBUG"


def debug() -> bool:
    """Whether ``$GRASS_LLM_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grass-llm")
    except PackageNotFoundError:  # running from a source tree without an install
        from grass_llm import __version__

        return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. Only ``command``'s module is imported (all of them when ``command`` is None)."""
    parser = argparse.ArgumentParser(
        prog="grass-llm",
        description="GRASS: gradient-based adaptive layer-wise importance sampling for LLM fine-tuning.",
        epilog=(
            "Exit codes: 0 done, 1 failed, 2 bad input (nothing changed), 128+N stopped by signal N (130: "
            f"Ctrl-C). Every failure is one line; {DEBUG_ENV}=1 shows the traceback of an unexpected one."
        ),
    )
    parser.add_argument("--version", action="version", version=f"grass-llm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            importlib.import_module(module_name).add_cli_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """One line, no source: ``grass-llm: warning: <message>`` (the category for non-user warnings)."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"grass-llm: warning: {message}{kind}\n"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(_format_warning(message, category, filename, lineno), end="", file=file or sys.stderr)


def _setup_output() -> None:
    warnings.showwarning = _show_warning  # (restored by catch_warnings)
    warnings.formatwarning = _format_warning
    warnings.filterwarnings("ignore", category=FutureWarning)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A background thread's exception (TensorBoard's writer, a data loader...): one line; the main
    thread reports what it means for the command."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = one_line(args.exc_value) if args.exc_value is not None else ""
    print(f"grass-llm: warning: a background thread ({name}) failed: {args.exc_type.__name__}: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (None: ``sys.argv``, the process's own command: ``grass-llm`` and
    ``python -m grass_llm``); returns its exit code."""
    # first of all: SIGINT / SIGTERM stop the command with a message and exit code 128 + N (grass-llm train
    # defers them to the end of the training step and saves a checkpoint; see grass_llm.recipes.interrupt)
    from grass_llm.recipes.interrupt import Interrupted, StopSignals, signal_name

    signals = StopSignals().install()
    process = argv is None  # (the process ends with this command)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"grass-llm {command}" if command in SUBCOMMANDS else "grass-llm"
    formatwarning = warnings.formatwarning
    excepthook = threading.excepthook
    if not debug():
        threading.excepthook = _thread_failed
    try:
        with warnings.catch_warnings():  # (restores the filters; formatwarning is restored below)
            _setup_output()
            if command in SUBCOMMANDS:
                module = importlib.import_module(SUBCOMMANDS[command][0])
                normalize = getattr(module, "normalize_argv", None)
                if normalize is not None:
                    i = argv.index(command)
                    argv = [*argv[: i + 1], *normalize(argv[i + 1 :])]
            parser = build_parser(command if command in SUBCOMMANDS else "")
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return 2
            args._signals = signals
            module = importlib.import_module(args._module)
            rc = int(module.cli_main(args) or 0)
            if rc != 0 and signals.raised is not None:  # (a failure after a stop: the stop's consequence)
                signals.check()
            return rc
    except Interrupted as e:
        detail = e.detail or (_NOTHING_DONE if command == "train" else "")
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{prog}: stopped by {signal_name(e.signum)}{detail}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if signals.raised is not None:  # third-party code swallowed or converted the stop
            if os.environ.get("RANK", "0") == "0":
                detail = _NOTHING_DONE if command == "train" else ""
                print(f"\n{prog}: stopped by {signal_name(signals.raised)}{detail}", file=sys.stderr)
            return 128 + signals.raised
        if debug():
            raise
        print(
            f"{prog}: error: {type(e).__name__}: {one_line(e)} (an unexpected failure; set {DEBUG_ENV}=1 to see "
            "the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.formatwarning = formatwarning
        threading.excepthook = excepthook
        if process:  # the command has ended and said how: a signal now only races the exit
            signals.ignore()
        else:
            signals.restore()


if __name__ == "__main__":
    sys.exit(main())
