"""`paretoq-export`: quantize (RTN), qat, import, eval, export, quickstart, validate, bench, pareto, card, push.

Every command is a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in COMMANDS.
``paretoq-export --format gguf CKPT -o model.gguf`` is the shortcut of ``paretoq-export export gguf CKPT ...``.
Every failure the user can fix ends with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from paretoq_export.canonical.checkpoint import CheckpointError
from paretoq_export.model_source import ModelSourceError

# command -> module (each: add_arguments(parser), run(args) -> int; HELP, or the first line of its docstring)
COMMANDS = {
    "quantize": "paretoq_export.commands.quantize",
    "qat": "paretoq_export.commands.qat",
    "import": "paretoq_export.commands.import_checkpoint",
    "eval": "paretoq_export.commands.evaluate",
    "export": "paretoq_export.commands.export",
    "quickstart": "paretoq_export.commands.quickstart",
    "validate": "paretoq_export.validate",
    "bench": "paretoq_export.bench",
    "pareto": "paretoq_export.pareto",
    "card": "paretoq_export.model_card",
    "push": "paretoq_export.hub",
}


def command_help(module) -> str:
    return getattr(module, "HELP", None) or module.__doc__.strip().split("\n")[0].split(": ", 1)[-1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paretoq-export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        help_text = command_help(module)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from paretoq_export.commands.export import shortcut

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] == "export" or argv[0].startswith("--format")):
        argv = shortcut(argv)
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except (CheckpointError, ModelSourceError, ValueError, FileNotFoundError, ImportError) as exc:
        if os.environ.get("PARETOQ_DEBUG"):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
