"""``msxplain-tools rerun OUTPUT_DIR/logs/config-<run>.json``: repeat a recorded run exactly.

Every participant-level run records its command line, working directory, resolved parameters,
model (member checksums) and software versions in ``logs/config-<run>.json``. ``rerun`` checks
that the model's checkpoints still have the recorded checksums (else it refuses: the results
would differ) and that the software versions are the same (else it warns), then runs the same
command line from the same working directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

NAME = "rerun"
HELP = "repeat a recorded msxplain run (logs/config-<run>.json) exactly"
LOGGER = logging.getLogger("bids_app.rerun")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the run's logs/config-<run>.json")
    parser.add_argument("--check-only", action="store_true", help="only check model checksums and versions")


def run(args) -> int:
    from bids_app.bids.provenance import software_versions
    from bids_app.errors import BadInputData, MissingInput
    from bids_app.model.resolve import resolve_model, verify_members

    if not args.config.is_file():
        raise MissingInput("Run record not found.", path=str(args.config),
                           hint="pass OUTPUT_DIR/logs/config-<run>.json.")
    record = json.loads(args.config.read_text())
    cfg = record["config"]
    model = resolve_model(cfg["model"]["spec"], card_path=Path(cfg["model"]["card_path"]) if cfg["model"]["card_path"]
                          else None, cache_dir=Path(cfg["execution"]["work_dir"]) / "models")
    recorded = {m["Fold"]: m["SHA256"] for m in record["model"]["Members"]}
    current = verify_members(model, list(recorded))
    changed = [f for f in recorded if current.get(f) != recorded[f]]
    if changed:
        raise BadInputData(f"Model member(s) {changed} changed since the recorded run.", path=str(model.trainer_dir),
                           hint="restore the recorded model to repeat the run exactly.")
    now = software_versions()
    drift = {k: (v, now.get(k)) for k, v in record.get("software", {}).items() if now.get(k) != v}
    for name, (then, current_version) in drift.items():
        LOGGER.warning("%s was %s in the recorded run and is %s now: results may differ", name, then, current_version)
    if args.check_only:
        print(f"model checksums match; software drift: {drift or 'none'}")
        return 0
    from bids_app.cli.run import main as msxplain_main

    os.chdir(record.get("cwd", os.getcwd()))
    return msxplain_main(list(record["argv"]))
