"""Provenance: software versions and the parameter block written into every sidecar."""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

#: distributions whose versions are recorded (import name is not always the dist name)
RECORDED_PACKAGES = (
    "msxplain", "torch", "nnunetv2", "dynamic_network_architectures", "numpy", "scipy", "nibabel",
    "SimpleITK", "nipype", "pybids", "pandas", "scikit-learn", "connected-components-3d",
    "pyradiomics-bhklab", "templateflow", "deepbet",
)


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the results."""
    from importlib.metadata import PackageNotFoundError, version

    from bids_app import __version__

    versions = {"python": platform.python_version()}
    for dist in RECORDED_PACKAGES:
        if dist == "msxplain":
            versions[dist] = __version__
            continue
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return versions


def provenance_block(model: dict[str, Any] | None, parameters: dict[str, Any]) -> dict[str, Any]:
    """The ``msxplain`` block of a sidecar: version, model, parameters and software."""
    from bids_app import __version__

    block: dict[str, Any] = {"Version": __version__, "Parameters": parameters, "Software": software_versions()}
    if model is not None:
        block["Model"] = model
    return {"msxplain": block}
