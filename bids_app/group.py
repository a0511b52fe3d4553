"""The group level: aggregate existing participant outputs (plain pandas, no Nipype)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import MissingInput

LOGGER = logging.getLogger("bids_app.group")


def find_summaries(output_dir: Path) -> list[Path]:
    return sorted(Path(output_dir).glob("sub-*/**/anat/*_summary.json"))


def run_group(config) -> int:
    """Check that participant outputs exist and aggregate them (see docs)."""
    import pandas as pd

    from . import __version__
    from .derivatives import atomic_write_text, write_dataset_files

    out = config.execution.output_dir
    summaries = find_summaries(out)
    if not summaries:
        raise MissingInput("No participant outputs (*_summary.json) found in the output folder.", path=str(out),
                           hint="run the participant level first, into this output folder.")
    rows = []
    for path in summaries:
        data = json.loads(path.read_text())
        row = {"participant_id": data["participant_id"], "session_id": data.get("session_id", "n/a")}
        lesions = data.get("lesions", {})
        row["n_lesions"] = lesions.get("n_lesions")
        row["total_volume_mm3"] = lesions.get("total_volume_mm3")
        for name, entry in lesions.get("per_class", {}).items():
            row[f"n_{name}"] = entry.get("n_lesions")
            row[f"volume_{name}_mm3"] = entry.get("volume_mm3")
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["participant_id", "session_id"])
    atomic_write_text(out / "group" / "group_lesions.tsv", table.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_dataset_files(out, config.execution.bids_dir, __version__)
    LOGGER.info("Group table of %d session(s) written to %s", len(table), out / "group")
    return 0
