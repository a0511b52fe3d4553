"""Install a model archive into the image with msxplain's safe extractor (image build time).

    python install_model.py MODEL.zip DEST [CARD_URL]

The installed model is then verified as a run would verify it (card schema, SHA-256 of the
checkpoints, ``plans.json`` and ``dataset.json``, allow-listed classes in the plans), so a
broken or tampered model fails the image build instead of every run.
"""

import shutil
import sys
import urllib.request
from pathlib import Path

from bids_app.model.archive import extract_model_archive
from bids_app.model.card import CARD_NAME
from bids_app.model.resolve import check_consistency, find_trainer_dirs, resolve_model, select_members, verify_members

archive, dest = Path(sys.argv[1]), Path(sys.argv[2])
card_url = sys.argv[3] if len(sys.argv) > 3 else ""
extracted = extract_model_archive(archive, dest.parent / ".extract")
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(extracted), str(dest))
trainers = find_trainer_dirs(dest)
if card_url and trainers:
    with urllib.request.urlopen(card_url) as response:  # noqa: S310 - build-time download of the card
        (trainers[0] / CARD_NAME).write_bytes(response.read())
model = resolve_model(str(dest.resolve()))
check_consistency(model)
verify_members(model, select_members(model, None))
if not model.card.files:
    print(f"warning: the card of {dest} pins no SHA-256 for plans.json and dataset.json", file=sys.stderr)
print("installed", dest, [str(t) for t in trainers])
