"""The CLI's commands: one module each, with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(paretoq_export.cli lists them). The options several commands share are in paretoq_export/arguments.py, so that one
setting has one name everywhere."""
