#!/usr/bin/env python
"""Arrange open_ms_data's patient07 (real skull-stripped FLAIR + MPRAGE T1 with the expert consensus
lesion mask, Lesjak et al. 2017, CC-BY) as a BIDS dataset with a reference-mask derivative.

    python scripts/patient07_bids.py OUT_DIR [--source ../shared/data/open_ms_data/cross_sectional/MNI/patient07]

then:
    msxplain OUT_DIR OUT_DIR/../p07_out participant --reference-masks OUT_DIR/derivatives/reference --no-tta
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_SOURCE = (Path(__file__).resolve().parents[2] / "shared" / "data" / "open_ms_data" / "cross_sectional" / "MNI"
                  / "patient07")
FILES = {
    "T1w": "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz",
    "FLAIR": "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz",
    "mask": "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz",
}


def arrange(out: Path, source: Path = DEFAULT_SOURCE, label: str = "p07") -> Path:
    import nibabel as nib
    import numpy as np

    out = Path(out)
    anat = out / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "open_ms_data patient07 (real MS data, Lesjak et al. 2017)", "BIDSVersion": "1.10.0",
        "DatasetType": "raw", "License": "CC-BY", "Authors": ["Lesjak Z", "Galimzianova A", "Koren A"],
        "ReferencesAndLinks": ["https://doi.org/10.1007/s12021-017-9348-7"]}, indent=1))
    (out / "README").write_text("patient07 of the open_ms_data cross-sectional set (skull-stripped, N4-corrected, "
                                "registered to MNI152 1 mm), arranged as BIDS by msxplain's "
                                "scripts/patient07_bids.py.\n")
    (out / "participants.tsv").write_text(f"participant_id\tsite\nsub-{label}\tLjubljana\n")
    for suffix in ("T1w", "FLAIR"):
        shutil.copy(source / FILES[suffix], anat / f"sub-{label}_{suffix}.nii.gz")
        (anat / f"sub-{label}_{suffix}.json").write_text(json.dumps(
            {"MagneticFieldStrength": 3, "SkullStripped": True,
             "Description": "bias-corrected, skull-stripped, registered to MNI152 (FSL 1 mm grid)"}, indent=1))
    ref = out / "derivatives" / "reference"
    ref_anat = ref / f"sub-{label}" / "anat"
    ref_anat.mkdir(parents=True, exist_ok=True)
    (ref / "dataset_description.json").write_text(json.dumps({
        "Name": "expert consensus lesion masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "Manual", "Description": "consensus of three raters (Lesjak et al. 2017)"}]},
        indent=1))
    img = nib.load(str(source / FILES["mask"]))
    mask = nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine, img.header)
    mask.set_data_dtype(np.uint8)
    nib.save(mask, str(ref_anat / f"sub-{label}_label-lesion_mask.nii.gz"))
    (ref_anat / f"sub-{label}_label-lesion_mask.json").write_text(json.dumps(
        {"Type": "Lesion", "Manual": True, "Sources": [f"bids:raw:sub-{label}/anat/sub-{label}_FLAIR.nii.gz"]},
        indent=1))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = p.parse_args()
    print(arrange(args.out, args.source))
    sys.exit(0)
