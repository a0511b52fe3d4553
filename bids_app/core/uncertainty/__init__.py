"""Voxel-, lesion- and patient-scale uncertainty of a deep ensemble (pure numpy, no file I/O).

Definitions follow Molchanova et al., arXiv:2311.08931 (MS_WML_uncs) and arXiv:2407.05761
(interpret-lesion-unc);
``docs/uncertainty.md`` lists every convention and every NaN / -inf case. In short:

* inputs are per-member class probabilities ``member_probs`` of shape ``(M, C, X, Y, Z)``
  (members, classes with background at 0, space); a single lesion-probability map per member
  is turned into that layout by :func:`binary_member_probs`;
* voxel measures (ε = 1e-10) run over **all** C classes;
* lesion measures of a lesion of class ``c`` use ``p_m[c]`` as the lesion probability and the
  member lesions of class ``c``; member masks are built with
  :func:`bids_app.core.postprocess.segment_lesions`, i.e. with the ensemble's threshold,
  minimum size and connectivity (or the members' own thresholds for the ``+`` variants);
* everything lesion-wise is a label-indexed reduction (``np.bincount`` over the voxels of the
  lesions, joint histograms of (ensemble label, member label) pairs): no loop touches the whole
  volume once per lesion.

Stages (one call each, so a Nipype interface can wrap one function): :func:`voxel_uncertainty`,
:func:`member_segmentations`, :func:`lesion_uncertainty`, :func:`patient_uncertainty`, or
everything at once with :func:`compute_uncertainty`.

Modules:

* :mod:`~bids_app.core.uncertainty.voxel`: input layout and checks, voxel measures;
* :mod:`~bids_app.core.uncertainty.matching`: ensemble and member segmentations, matching of
  member lesions to ensemble lesions;
* :mod:`~bids_app.core.uncertainty.lesion`: lesion measures;
* :mod:`~bids_app.core.uncertainty.patient`: patient measures;
* :mod:`~bids_app.core.uncertainty.session`: all stages at once, lesion maps.

All functions are pure: they never modify their inputs.
"""

from bids_app.core.uncertainty.lesion import EPS_STRUCT, LOGSUM_SKIPPED, STRUCTURAL_MEASURES, lesion_uncertainty
from bids_app.core.uncertainty.matching import (
    DEFAULT_ENSEMBLE_MEAN,
    ENSEMBLE_MEANS,
    ensemble_mean,
    ensemble_segmentation,
    member_segmentations,
)
from bids_app.core.uncertainty.patient import patient_uncertainty
from bids_app.core.uncertainty.session import (
    DEFAULT_LESION_MAPS,
    DEFAULT_VOXEL_MAPS,
    UncertaintyResult,
    compute_uncertainty,
    paint_lesions,
)
from bids_app.core.uncertainty.voxel import (
    EPS_VOXEL,
    VOXEL_MEASURES,
    binary_member_probs,
    check_member_probs,
    voxel_uncertainty,
)

__all__ = [
    "DEFAULT_ENSEMBLE_MEAN",
    "ENSEMBLE_MEANS",
    "ensemble_mean",
    "DEFAULT_LESION_MAPS",
    "DEFAULT_VOXEL_MAPS",
    "EPS_STRUCT",
    "EPS_VOXEL",
    "LOGSUM_SKIPPED",
    "STRUCTURAL_MEASURES",
    "VOXEL_MEASURES",
    "UncertaintyResult",
    "binary_member_probs",
    "check_member_probs",
    "compute_uncertainty",
    "ensemble_segmentation",
    "lesion_uncertainty",
    "member_segmentations",
    "paint_lesions",
    "patient_uncertainty",
    "voxel_uncertainty",
]
