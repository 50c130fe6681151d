"""The ``grass-llm`` command line: one entry point, one subcommand per workflow.

Each subcommand lives in its own module, which provides ``add_cli_arguments(parser)`` and
``cli_main(args) -> int``. Modules are imported only when their subcommand runs, so
``grass-llm -h`` stays fast and the core never imports transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "grass_llm.recipes.finetune",
        "fine-tune a model with GRASS or a baseline (YAML config + key=value overrides)",
    ),
    "eval": ("grass_llm.evaluate", "evaluate a model on LLM-Adapters arithmetic / commonsense benchmarks"),
    "memory": (
        "grass_llm.memory.estimate",
        "estimate peak device memory of one training step, without a GPU",
    ),
    "plot": ("grass_llm.plots", "draw layer-activity, MGN, probability and loss plots for a run directory"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. Only ``command``'s module is imported (all of them when ``command`` is None)."""
    parser = argparse.ArgumentParser(
        prog="grass-llm",
        description="GRASS: gradient-based adaptive layer-wise importance sampling for LLM fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            importlib.import_module(module_name).add_cli_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    return int(module.cli_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
