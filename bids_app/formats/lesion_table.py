"""The per-lesion table: fragments from several stages merged into one BIDS TSV + dictionary.

Each stage that says something per lesion (geometry and uncertainty, features, saliency,
evaluation) writes a *fragment*: a TSV with a ``label`` column plus its own columns, and a
JSON data dictionary (``{column: {"Description": ..., "Units": ...}}``). :func:`merge_fragments`
joins them on ``label`` (label order, ``label`` first), so a stage can be added without touching
the others. NaN is written ``n/a`` (BIDS), infinities as ``inf``/``-inf``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: descriptions of the columns every lesion table has (geometry + uncertainty); patterns
#: (regular expressions) cover families such as mean_<measure>
BASE_DICTIONARY: dict[str, dict[str, str]] = {
    "label": {"Description": "Lesion label in the desc-instances dseg (1..N)."},
    "class": {"Description": "Lesion class (model label name, e.g. WML = white-matter lesion, CL = cortical lesion)."},
    "centroid_x_vox": {"Description": "Centroid, voxel index along the image's first axis.", "Units": "voxel"},
    "centroid_y_vox": {"Description": "Centroid, voxel index along the image's second axis.", "Units": "voxel"},
    "centroid_z_vox": {"Description": "Centroid, voxel index along the image's third axis.", "Units": "voxel"},
    "centroid_x_mm": {"Description": "Centroid, scanner RAS+ x (right).", "Units": "mm"},
    "centroid_y_mm": {"Description": "Centroid, scanner RAS+ y (anterior).", "Units": "mm"},
    "centroid_z_mm": {"Description": "Centroid, scanner RAS+ z (superior).", "Units": "mm"},
    "n_voxels": {"Description": "Number of voxels of the lesion.", "Units": "voxel"},
    "volume_mm3": {"Description": "Lesion volume (voxel count x voxel volume).", "Units": "mm^3"},
    "n_members_matched": {"Description": "Number of ensemble members whose own segmentation has a lesion "
                                         "overlapping this one."},
    "LSU": {"Description": "Lesion structural uncertainty (ddu): 1 - mean over members of the best IoU between "
                           "this lesion and a lesion of the member's own segmentation (same threshold).",
            "Units": "1"},
    "LSU+": {"Description": "LSU with each member's own tuned threshold.", "Units": "1"},
    "ddu_adj": {"Description": "1 - mean over members of the IoU-adjusted overlap with the member's lesions.",
                "Units": "1"},
    "ddu_fast": {"Description": "1 - mean over members of the IoU with the member's whole lesion mask.",
                 "Units": "1"},
    "srmi": {"Description": "Structural reverse mutual information: mean log ensemble probability minus mean log "
                            "member probability over the lesion.", "Units": "nat"},
    "smi": {"Description": "Negated structural mutual information over the matched member lesions.", "Units": "nat"},
    "seoe": {"Description": "Structural entropy of expected: -P ln P with P the product over members of the mean "
                            "member probability in the lesion (n/a when P = 0).", "Units": "nat"},
    "vvc": {"Description": "Volume variation coefficient of the matched member lesions (std/mean).", "Units": "1"},
    "avg_pwdice": {"Description": "Mean pairwise Dice between the matched member lesions.", "Units": "1"},
    "global_iou": {"Description": "Intersection over union of all matched member lesions.", "Units": "1"},
    "lesion_type": {"Description": "Evaluation against the reference masks: TPL (true positive), USL "
                                   "(under-segmented: 0 < IoU_adj < t) or FPL (false positive).",
                    "Levels": {"TPL": "true positive lesion", "USL": "under-segmented lesion",
                               "FPL": "false positive lesion"}},
    "iou_score": {"Description": "Overlap score with the reference used for lesion_type (method in the sidecar).",
                  "Units": "1"},
}
VOXEL_MEASURES = {
    "NC": "negated confidence", "EoE": "entropy of the expected distribution (total uncertainty)",
    "ExE": "expected entropy (aleatoric)", "MI": "mutual information (epistemic)",
    "EPKL": "expected pairwise KL divergence", "RMI": "reverse mutual information",
}
PATTERNS: list[tuple[str, dict[str, str]]] = [
    (r"mean_(\w+)", {"Description": "Mean of the voxel measure {0} ({name}) over the lesion.", "Units": "nat"}),
    (r"logsum_(\w+)", {"Description": "Sum of ln({0}) over the lesion ({name}); -inf when {0} = 0 somewhere.",
                       "Units": "nat"}),
]


def describe_column(column: str, extra: dict[str, dict] | None = None) -> dict[str, Any]:
    """The data-dictionary entry of a column (from ``extra``, the base dictionary or a pattern)."""
    if extra and column in extra:
        return extra[column]
    if column in BASE_DICTIONARY:
        return BASE_DICTIONARY[column]
    for pattern, entry in PATTERNS:
        m = re.fullmatch(pattern, column)
        if m:
            name = VOXEL_MEASURES.get(m.group(1), m.group(1))
            return {k: v.format(m.group(1), name=name) for k, v in entry.items()}
    return {"Description": column.replace("_", " ")}


def merge_fragments(fragments: list[pd.DataFrame]) -> pd.DataFrame:
    """Outer-join fragments on ``label``; ``label`` first, then ``class``, rows in label order.

    Raises
    ------
    ValueError
        A fragment has no ``label`` column or two fragments define the same column.
    """
    table: pd.DataFrame | None = None
    for frag in fragments:
        if "label" not in frag.columns:
            raise ValueError("every lesion-table fragment needs a 'label' column")
        frag = frag.copy()
        frag["label"] = frag["label"].astype(np.int64)
        if table is None:
            table = frag
            continue
        clash = (set(frag.columns) & set(table.columns)) - {"label", "class"}
        if clash:
            raise ValueError(f"lesion-table fragments both define {sorted(clash)}")
        if "class" in frag.columns and "class" in table.columns:
            frag = frag.drop(columns=["class"])
        table = table.merge(frag, on="label", how="outer")
    if table is None:
        return pd.DataFrame({"label": pd.Series(dtype=np.int64)})
    table = table.sort_values("label", kind="stable").reset_index(drop=True)
    first = [c for c in ("label", "class") if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def to_tsv(table: pd.DataFrame) -> str:
    """BIDS TSV text: tab-separated, NaN as ``n/a``, floats with full precision."""
    return table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.10g", lineterminator="\n")


def read_tsv(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def dictionary_for(table: pd.DataFrame, extra: dict[str, dict] | None = None) -> dict[str, dict]:
    return {c: describe_column(c, extra) for c in table.columns}


def write_fragment(table: pd.DataFrame, dictionary: dict[str, dict], stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.tsv`` and ``<stem>.json`` (file boundary for interfaces)."""
    stem = Path(stem)
    tsv, js = stem.with_suffix(".tsv"), stem.with_suffix(".json")
    tsv.write_text(to_tsv(table))
    js.write_text(json.dumps(dictionary, indent=2, sort_keys=True) + "\n")
    return tsv, js
