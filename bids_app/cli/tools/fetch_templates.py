"""``msxplain-tools fetch-templates``: fill the TemplateFlow cache once, for offline runs.

Fetches every template file msxplain may read (:data:`bids_app.bids.templates.REQUIRED_FILES`,
MNI152NLin2009cAsym at 1 and 2 mm, about 45 MB) with the TemplateFlow client into
``$TEMPLATEFLOW_HOME`` (or TemplateFlow's default cache). Run it where there is a network,
then copy the folder to offline machines and set ``TEMPLATEFLOW_HOME`` there. ``--check``
only lists what is missing (exit 66 when something is), and never touches the network.
"""

from __future__ import annotations

import argparse

NAME = "fetch-templates"
HELP = "fetch the TemplateFlow templates msxplain uses into the cache (once, for offline runs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="only report which files are missing from the cache (no network)")


def run(args) -> int:
    import os

    from bids_app.bids.templates import (
        FETCH_COMMAND,
        OFFLINE_ENV,
        fetch_template_files,
        missing_template_files,
        templateflow_home,
    )
    from bids_app.errors import MissingInput

    home = templateflow_home()
    missing = missing_template_files()
    if args.check:
        if missing:
            raise MissingInput(f"{len(missing)} template file(s) missing: {', '.join(missing)}.", path=str(home),
                               hint=f"run '{FETCH_COMMAND}' where there is a network.")
        print(f"all template files are in {home}")
        return 0
    if missing and os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        raise MissingInput(f"{OFFLINE_ENV} is set, so nothing can be fetched ({len(missing)} file(s) missing).",
                           path=str(home), hint=f"unset {OFFLINE_ENV} to fetch.")
    paths = fetch_template_files()
    print(f"{len(paths)} template files in {home} ({len(missing)} fetched now)")
    return 0
