"""Install a model archive into the image with msxplain's safe extractor (image build time).

    python install_model.py MODEL.zip DEST [CARD_URL]
"""

import shutil
import sys
import urllib.request
from pathlib import Path

from bids_app.models import CARD_NAME, extract_model_archive, find_trainer_dirs

archive, dest = Path(sys.argv[1]), Path(sys.argv[2])
card_url = sys.argv[3] if len(sys.argv) > 3 else ""
extracted = extract_model_archive(archive, dest.parent / ".extract")
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(extracted), str(dest))
trainers = find_trainer_dirs(dest)
if card_url and trainers:
    with urllib.request.urlopen(card_url) as response:  # noqa: S310 - build-time download of the card
        (trainers[0] / CARD_NAME).write_bytes(response.read())
print("installed", dest, [str(t) for t in trainers])
