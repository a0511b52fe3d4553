"""``msxplain-tools prepare-training BIDS_DIR MASKS_DIR OUT``: a site's own data -> nnU-Net raw dataset.

For users who want to train or fine-tune a model on their own scans. Inputs are found exactly
as the participant level finds them (the model card's channel queries, ``--bids-filter-file``),
the reference masks as the evaluation finds them (``--reference-masks``), and every case is
conformed as the app conforms its inputs (co-registration onto the reference channel, brain
masking when the model expects skull-stripped input, RAS+ orientation), so a model trained on
the result sees at run time what it saw in training. Channel names in ``dataset.json`` are the
model card's channel names (the card convention: ``T1w``, ``FLAIR``...), so ``msxplain`` can
infer a card for the trained model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "prepare-training"
HELP = "BIDS images + reference masks -> an nnU-Net raw training dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bids_app.cli.parser import _filter_file, _strip_prefix

    parser.add_argument("bids_dir", type=Path, help="raw BIDS dataset")
    parser.add_argument("masks_dir", type=Path, help="BIDS derivatives folder with the manual lesion masks")
    parser.add_argument("out_dir", type=Path, help="nnU-Net raw folder (nnUNet_raw); DatasetNNN_Name is created in it")
    parser.add_argument("--dataset-id", type=int, default=601, help="nnU-Net dataset id (3 digits)")
    parser.add_argument("--dataset-name", default="MsxplainSite", help="nnU-Net dataset name")
    parser.add_argument("--model", default="demo",
                        help="model (name/folder/zip) whose card defines channels and labels (default: demo)")
    parser.add_argument("--model-card", type=Path, help="a model card JSON instead of a model's")
    parser.add_argument("--participant-label", nargs="+", type=_strip_prefix("sub-"), metavar="LABEL")
    parser.add_argument("--bids-filter-file", dest="bids_filters", type=_filter_file, metavar="FILE")
    parser.add_argument("--skull-stripped", choices=("auto", "yes", "no"), default="auto",
                        help="are the inputs skull-stripped (else a template brain mask is applied when the "
                             "card asks for skull-stripped input)")
    parser.add_argument("--coregister", action="store_true",
                        help="rigidly co-register secondary channels whose grid differs from the reference "
                             "(default: resample them through their headers, right when the scans share world space)")


def run(args) -> int:
    import numpy as np

    from bids_app.bids.discovery import discover, find_reference_masks, open_layout
    from bids_app.core import conform
    from bids_app.core.imageio import load_image
    from bids_app.errors import NoMatchingInputs
    from bids_app.model.card import ModelCard
    from bids_app.model.resolve import resolve_model
    from bids_app.training.dataset import conform_case, write_case, write_dataset_json

    card = ModelCard.load(args.model_card) if args.model_card else resolve_model(args.model).card
    layout = open_layout(args.bids_dir.resolve())
    sessions, failed = discover(layout, card, args.participant_label, None, args.bids_filters)
    raw = args.out_dir / f"Dataset{args.dataset_id:03d}_{args.dataset_name}"
    written, skipped = [], [{"session": f.name, "reason": f.error.one_line()} for f in failed]
    template = None
    for s in sessions:
        ref = find_reference_masks(args.masks_dir.resolve(), card, s.subject, s.session,
                                   (args.bids_filters or {}).get("reference"))
        if ref is None:
            skipped.append({"session": s.name, "reason": "no reference mask"})
            continue
        images = [load_image(p) for p in s.paths]
        reference = images[card.reference_channel]
        labels = np.zeros(reference.shape, np.uint8)
        if ref.kind == "dseg":
            values = load_image(ref.files[0], dtype=None, check_values=False)
            for value, index in ref.value_map.items():
                labels[np.asarray(values.data) == value] = index
            label_image = type(values)(labels, values.affine, values.path)
        elif ref.kind == "class_masks":
            label_image = None
            for lab, path in zip(card.labels, ref.files):
                if path:
                    m = load_image(path, dtype=None, check_values=False)
                    labels[np.asarray(m.data) > 0] = lab.index
                    label_image = type(m)(labels, m.affine, m.path)
        else:
            m = load_image(ref.files[0], dtype=None, check_values=False)
            labels[np.asarray(m.data) > 0] = card.labels[0].index
            label_image = type(m)(labels, m.affine, m.path)
        mask = None
        if card.skull_stripped_input:
            stripped = args.skull_stripped == "yes" or (
                args.skull_stripped == "auto" and conform.skull_stripped_support(reference)[0])
            if stripped:
                mask = conform.support_mask(reference)
            else:
                if template is None:
                    from bids_app.bids.templates import brain_mask_template

                    t1, tm = brain_mask_template()
                    template = (load_image(t1), load_image(tm, check_values=False))
                mask = conform.template_brain_mask(reference, *template)[0]
        stack, label_array, affine = conform_case(images, card.reference_channel, label_image, mask,
                                                  coregister=args.coregister)
        case = s.name.replace("-", "").replace("_", "-")
        write_case(raw, case, stack, label_array, affine)
        written.append({"case": case, "session": s.name, "inputs": [f.reason for f in s.files],
                        "reference": ref.reason})
    if not written:
        raise NoMatchingInputs("No session has both the model's inputs and a reference mask.", path=str(args.bids_dir),
                               hint="check the masks folder and the filters.")
    write_dataset_json(raw, [c.name for c in card.channels], {lab.index: lab.name for lab in card.labels},
                       len(written), description=f"prepared by msxplain-tools prepare-training from {args.bids_dir}")
    (raw / "msxplain_prepare.json").write_text(json.dumps({"cases": written, "skipped": skipped,
                                                           "model_card": card.id}, indent=1))
    print(f"{len(written)} case(s) written to {raw}; {len(skipped)} skipped")
    return 0
