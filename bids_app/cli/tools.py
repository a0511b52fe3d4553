"""``msxplain-tools``: utility subcommands around the BIDS App.

Each subcommand lives in its own module under :mod:`bids_app.cli` named ``tool_<name>.py``
and defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Adding a subcommand = adding a module and its name to :data:`TOOL_MODULES`.
Modules are imported only when their subcommand runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import MsxplainError, UsageError

#: subcommand name -> (module, one-line help). Imported lazily.
TOOL_MODULES: dict[str, tuple[str, str]] = {
    "synth": (".tool_synth", "write a synthetic multi-site MS BIDS dataset with true lesion masks"),
    "uncertainty": (".tool_uncertainty", "uncertainty maps, lesion table and patient summary from member probabilities"),
    "evaluate": (".tool_evaluate", "lesion-wise detection, voxel and calibration metrics of a mask against a reference"),
    "prepare-training": (".tool_prepare_training", "BIDS images + reference masks -> an nnU-Net raw training dataset"),
    "rerun": (".tool_rerun", "repeat a recorded msxplain run (logs/config-<run>.json) exactly"),
    "train-demo": (".tool_train_demo", "train the demo nnU-Net ensemble on synthetic data (the bundled model's recipe)"),
    "train-refiner": (".tool_train_refiner", "train the saliency-radiomics TP/FP lesion classifier on outputs with reference masks"),
    "fetch-templates": (".tool_fetch_templates", "fetch the TemplateFlow templates msxplain uses into the cache (once, for offline runs)"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .parser import UsageArgumentParser

    parser = UsageArgumentParser(
        prog="msxplain-tools",
        description="Utilities around the msxplain BIDS App (synthetic data, uncertainty and "
        "evaluation on any probabilities, training helpers).",
    )
    parser.add_argument("--version", action="version", version=f"msxplain-tools {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    # usage errors of any subcommand exit with 64 too (argparse's own 2 is reserved for Bash)
    sub = parser.add_subparsers(dest="tool", metavar="TOOL", parser_class=UsageArgumentParser)
    for name, (module_name, help_text) in TOOL_MODULES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        # argument definitions are cheap; the module is imported to get them
        module = importlib.import_module(module_name, package=__package__)
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
