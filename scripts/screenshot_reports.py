#!/usr/bin/env python3
"""Headless-Chromium screenshots of a participant report and a group report, for the docs.

Usage::

    python scripts/screenshot_reports.py OUTPUT_DIR [--participant sub-001] [--group-output DIR]
                                         [--docs docs] [--width 1400] [--height 3900] [--max-bytes 1000000]

``OUTPUT_DIR`` is an msxplain output folder after the participant level (and the group level,
unless ``--group-output`` names another one). The screenshots in ``docs/`` were made with::

    python scripts/patient07_bids.py P07 && msxplain P07 P07_OUT participant --no-tta \
        --reference-masks P07/derivatives/reference          # real FLAIR/T1 + expert mask
    msxplain-tools synth BIDS --n-subjects 2 --sites 2 --seed 7 --resolution 1.0 --skull-stripped
    msxplain BIDS OUT participant --no-tta --reference-masks BIDS/derivatives/lesions
    msxplain BIDS OUT group
    python scripts/screenshot_reports.py P07_OUT --group-output OUT
 Writes ``docs/report-participant.png`` and
``docs/report-group.png``: the page at ``--width`` CSS pixels, the first ``--height`` pixels
of it, reduced to a 256-colour palette (:func:`to_palette`; and, if still above
``--max-bytes``, downscaled) so that each file stays small. Needs Debian's ``chromium`` (or
``chromium-browser``) and Pillow.
Chromium runs with networking disabled for the page's own origin (``file://``); the reports
need no network.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    return exe


def to_palette(image, n_grey: int = 192):
    """256 colours: ``n_grey`` grey levels (the MR images stay smooth) and the rest fitted to the
    coloured pixels (outlines, swatches, plots) by median cut. Pillow's own quantisers give
    the greys a tint or visible bands."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image.convert("RGB")).astype(int)
    coloured = pixels[(pixels.max(-1) - pixels.min(-1)) > 24].reshape(-1, 1, 3).astype(np.uint8)
    n_colour = 256 - n_grey
    palette: list[int] = []
    if coloured.size:
        fitted = Image.fromarray(coloured).quantize(colors=n_colour, method=Image.Quantize.MEDIANCUT)
        palette = fitted.getpalette()[: 3 * n_colour]
    greys = np.linspace(0, 255, n_grey).round().astype(int)
    palette = [int(v) for g in greys for v in (g, g, g)] + palette
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette + [0] * (768 - len(palette)))
    return image.convert("RGB").quantize(palette=holder, dither=Image.Dither.NONE)


def screenshot(page: Path, png: Path, width: int, height: int, max_bytes: int) -> int:
    """Screenshot ``page`` into ``png``; returns the size in bytes."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="chromium-") as work:
        raw = Path(work) / "shot.png"
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={Path(work) / 'profile'}", f"--window-size={width},{height}",
               f"--screenshot={raw}", page.resolve().as_uri()]
        subprocess.run(cmd, capture_output=True, timeout=180, check=False)
        if not raw.is_file():
            sys.exit(f"chromium wrote no screenshot of {page}")
        image = Image.open(raw).convert("RGB")
    # cut the empty bottom (white rows) of a page shorter than the window
    import numpy as np

    rows = np.flatnonzero((np.asarray(image.convert("L")) < 250).any(axis=1))
    if rows.size:
        image = image.crop((0, 0, image.width, min(image.height, int(rows[-1]) + 20)))
    scale = 1.0
    while True:
        shown = image if scale == 1.0 else image.resize((int(image.width * scale), int(image.height * scale)),
                                                        Image.LANCZOS)
        buffer = io.BytesIO()
        to_palette(shown).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes or scale < 0.4:
            break
        scale *= 0.85
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(buffer.getvalue())
    return buffer.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="msxplain output folder (participant and group levels run)")
    parser.add_argument("--participant", help="participant report to shoot (default: the first sub-*.html)")
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs",
                        help="where the PNG files go (default: the repository's docs/)")
    parser.add_argument("--width", type=int, default=1400, help="window width in CSS pixels (default 1400)")
    parser.add_argument("--group-output", type=Path, help="output folder of the group report (default: OUTPUT_DIR)")
    parser.add_argument("--height", type=int, default=3900, help="page height captured, in pixels (default 3900)")
    parser.add_argument("--group-height", type=int, default=3400, help="the same for the group report")
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="size limit per PNG (default 1 MB)")
    args = parser.parse_args(argv)
    pages = sorted(args.output_dir.glob("sub-*.html"))
    participant = args.output_dir / f"{args.participant}.html" if args.participant else (pages[0] if pages else None)
    group = (args.group_output or args.output_dir) / "group" / "group_report.html"
    for page, name, height in ((participant, "report-participant.png", args.height),
                               (group, "report-group.png", args.group_height)):
        if page is None or not page.is_file():
            sys.exit(f"no report at {page}: run the participant and group levels first")
        size = screenshot(page, args.docs / name, args.width, height, args.max_bytes)
        print(f"{args.docs / name}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
