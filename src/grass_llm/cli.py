"""The ``grass-llm`` command line: one entry point, one subcommand per workflow.

Each subcommand lives in its own module, which provides ``add_cli_arguments(parser)`` and
``cli_main(args) -> int`` (and may provide ``normalize_argv(args) -> args``, applied to the arguments
after the subcommand's name before parsing). Modules are imported only when their subcommand runs, so
``grass-llm -h`` stays fast and the core never imports transformers.

:func:`main` also sets up the output of a command-line tool (not done at import, so that importing
``grass_llm`` changes nothing): warnings print as one ``grass-llm: warning: ...`` line without the
source line, and third-party ``FutureWarning`` s (deprecation notices meant for developers) are not
shown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    # first of all: SIGINT / SIGTERM stop the command with a message and exit code 128 + N (grass-llm train
    # defers them to the end of the training step and saves a checkpoint; see grass_llm.recipes.interrupt)
    from grass_llm.recipes.interrupt import Interrupted, StopSignals, signal_name

    signals = StopSignals().install()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"grass-llm {command}" if command in SUBCOMMANDS else "grass-llm"
    formatwarning = warnings.formatwarning
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
            return int(module.cli_main(args) or 0)
    except Interrupted as e:
        detail = e.detail or (_NOTHING_DONE if command == "train" else "")
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{prog}: stopped by {signal_name(e.signum)}{detail}", file=sys.stderr)
        return e.exit_code
    finally:
        warnings.formatwarning = formatwarning
        signals.restore()


if __name__ == "__main__":
    sys.exit(main())
