"""`paretoq-export`: quantize (RTN), qat, import, eval, export, quickstart, validate, bench, pareto, card, push.

Every command is a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in COMMANDS.
``paretoq-export --format gguf CKPT -o model.gguf`` is the shortcut of ``paretoq-export export gguf CKPT ...``.
Every failure the user can fix, a validation that failed its thresholds included, ends with one ``error: ...`` line
and exit status 2 (a bug: exit 1, also one line); ``--debug`` (anywhere on the line, or PARETOQ_DEBUG=1) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (anywhere on the line; errors are one line otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        help_text = command_help(module)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


# warnings torch and torchao print on import about kernels and APIs none of our paths use (logger -> message parts)
IMPORT_NOISE = {
    "torchao": ("Failed to load", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("register_constant() on Enum subclasses",),
}


class _ImportNoise(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from paretoq_export.commands.export import shortcut

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("PARETOQ_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        for logger, parts in IMPORT_NOISE.items():
            logging.getLogger(logger).addFilter(_ImportNoise(parts))
        warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes to their callers
    if argv and (argv[0] == "export" or argv[0].startswith("--format")):
        argv = shortcut(argv)
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except KeyboardInterrupt:
        print("error: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as exc:  # the project's errors are ValueErrors with one-line messages
        if debug:
            raise
        print("error: " + one_line(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not the user's: still one line, the traceback on request
        if debug:
            raise
        print(f"error: internal error ({type(exc).__name__}: {one_line(exc)}): rerun with --debug for the traceback "
              "and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
