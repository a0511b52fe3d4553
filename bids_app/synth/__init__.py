"""Synthetic multi-site MS data built on real lesion shapes (``msxplain-tools synth``).

Anatomy comes from MNI152NLin2009cAsym with random smooth deformations, white-matter lesions
are real expert-segmented components (Lesjak et al. 2017, CC-BY) placed at their MNI
positions, cortical lesions are synthesised at the GM boundary, and each site draws its own
contrast, bias field, noise, blur, FLAIR geometry and orientation. See ``docs/synth.md``.

Modules: :mod:`.sources` (reads the template and lesion masks), :mod:`.site`,
:mod:`.anatomy`, :mod:`.lesions`, :mod:`.contrast`, :mod:`.engine` (numerics, no file
access) and :mod:`.writer` (the BIDS dataset). Heavy imports happen on first attribute
access so that ``import bids_app.synth`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SiteParams": ".site",
    "sample_site": ".site",
    "TemplateSet": ".sources",
    "LesionLibrary": ".sources",
    "load_templates": ".sources",
    "load_lesion_library": ".sources",
    "build_lesion_library": ".sources",
    "SyntheticSubject": ".engine",
    "generate_subject": ".engine",
    "generate_sessions": ".engine",
    "write_dataset": ".writer",
    # domain-randomised mode (issue 14; docs/synth.md "Domain-randomised mode (issue 14)")
    "RandomisationParams": ".randomised",
    "RandomisedSubject": ".randomised",
    "generate_randomised_subject": ".randomised",
    "LoadDistribution": ".lesion_load",
    "PlacementParams": ".lesion_load",
    "sample_wml_volume_ml": ".lesion_load",
    "place_wml": ".lesion_load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
