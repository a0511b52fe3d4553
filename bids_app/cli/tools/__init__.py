"""``msxplain-tools``: utility subcommands around the BIDS App.

Each subcommand lives in its own module of this package (:mod:`bids_app.cli.tools`), ``<name>.py``,
and defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Adding a subcommand = adding a module and its name to :data:`TOOL_MODULES`. Each module
imports its heavy dependencies inside ``run``, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bids_app.errors import MsxplainError, UsageError

#: the subcommand modules, in the order of ``--help``; each defines NAME, HELP, add_arguments and run
TOOL_MODULES: tuple[str, ...] = (".synth", ".uncertainty", ".evaluate", ".prepare_training", ".rerun",
                                 ".train_demo", ".train_refiner", ".fetch_templates", ".models")


def build_parser() -> argparse.ArgumentParser:
    from bids_app import __version__
    from bids_app.cli.parser import UsageArgumentParser

    parser = UsageArgumentParser(
        prog="msxplain-tools",
        description="Utilities around the msxplain BIDS App (synthetic data, uncertainty and "
        "evaluation on any probabilities, training helpers).",
    )
    parser.add_argument("--version", action="version", version=f"msxplain-tools {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    # usage errors of any subcommand exit with 64 too (argparse's own 2 is reserved for Bash)
    sub = parser.add_subparsers(dest="tool", metavar="TOOL", parser_class=UsageArgumentParser)
    for module_name in TOOL_MODULES:
        # argument definitions are cheap; the module is imported to get them (and its NAME, HELP)
        module = importlib.import_module(module_name, package=__package__)
        sp = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        sp.set_defaults(_module=module_name)
        module.add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one tool; returns its exit code (BIDS-Apps codes on errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, else usage error
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not getattr(args, "tool", None):
        parser.print_help(sys.stderr)
        return UsageError.exit_code
    module = importlib.import_module(args._module, package=__package__)
    try:
        return int(module.run(args) or 0)
    except MsxplainError as exc:
        print(f"msxplain-tools {args.tool}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


def main_exit() -> None:  # console-script entry point
    sys.exit(main())
