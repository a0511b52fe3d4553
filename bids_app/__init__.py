"""msxplain: MS lesion segmentation with nnU-Net that says how certain it is and why.

Importing the package is cheap (no torch, nipype or pybids): ``--help`` and ``--version``
must answer instantly, also inside a container.
"""

from __future__ import annotations

from pathlib import Path

#: the package data (io_spec.json, registry.json, bundled models and lesion masks)
DATA_DIR = Path(__file__).resolve().parent / "data"


def _read_version() -> str:
    """The ``version`` file of a source checkout wins (editable installs), else the metadata."""
    candidate = Path(__file__).resolve().parent.parent / "version"
    if candidate.is_file():
        return candidate.read_text().strip()
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("msxplain")
    except (ImportError, PackageNotFoundError):  # pragma: no cover
        return "0+unknown"


__version__ = _read_version()
