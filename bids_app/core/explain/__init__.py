"""Instance-level explanations of an nnU-Net ensemble: SmoothGrad and Grad-CAM per lesion.

What is explained (``docs/explain.md`` gives the reasons and the measurements):

* the **target scalar** of lesion ``l`` is ``S_l = sum_{v in V_l} z_c(v)``, the pre-softmax
  logit of the lesion's class ``c`` summed over the lesion's voxels (arXiv:2406.09335),
  computed by the network with **deep supervision off** (only the full-resolution head) and
  **without test-time mirroring** (the un-mirrored network; ``mirror_axes`` averages over
  flips for SmoothGrad when asked);
* the **ensemble mean** by default: every member runs on the same noisy input and the
  members' gradients are averaged (the gradient of the mean logit), or each member on its own
  (``members='each'``);
* **SmoothGrad** per input channel, raw (signed, logit per normalised-intensity unit), with
  ``n`` noise samples of ``sigma = noise_level * (max - min)`` of the first normalised
  channel (same sigma for all channels), aggregated by the **mean** (gradient of ``S_l``) and
  by the **max** (per input voxel the per-lesion-voxel gradient of largest ``|.|``, sign
  kept; lesion voxels are grouped into at most ``max_groups`` groups, exact when the lesion has
  no more voxels than that);
* **Grad-CAM** (channel-pooled, last decoder stage: a class map) and **Grad-CAM++** (no
  ``exp(score)`` factor; by default its weights kept per voxel on the half-resolution decoder
  stage, the formulation that localises the instance) on named layers, upsampled trilinearly,
  ReLU'd and min-max normalised to max 1 within each lesion's crop;
* InstanceNorm statistics **frozen per lesion** at their values on the clean, patch-sized window
  centred on the lesion (``norm_stats='window'``), so that saliency is local and crops agree with
  the whole volume.

Everything runs in nnU-Net's network space (the preprocessed ``(K, z', y', x')`` tensor of
:meth:`bids_app.core.segment.EnsemblePredictor.preprocess`), on **lesion-centred crops**
whose sides are multiples of the network's total stride, batched across noise samples and
lesions; ``mode='full'`` runs the network on the whole volume instead (validation). The
lesion instance map is mapped into network space and the maps back to the input grid with
:func:`instances_to_network` / :func:`network_to_input`, which replay nnU-Net's
transpose -> crop-to-non-zero -> resample chain exactly as its export reverts it.

Noise is a counter-based function of (seed, sample, channel, global network-space voxel), so
a lesion gets the same noisy inputs whatever the crop, the batch or the device: crop and full
mode see identical noise and results do not depend on the batching.
The package imports torch (lazily) but not nnU-Net, never reads or writes files (see
:mod:`bids_app.formats.saliency_store`) and never modifies its inputs. Its modules:

* :mod:`~bids_app.core.explain.config`: :class:`ExplainConfig`, map names, CAM defaults;
* :mod:`~bids_app.core.explain.geometry`: :class:`NetworkGeometry`, input grid <-> network space;
* :mod:`~bids_app.core.explain.network`: strides, receptive field, layers, frozen InstanceNorm
  statistics, prepared members, mirroring, zero-padded crops;
* :mod:`~bids_app.core.explain.noise`: the counter-based noise;
* :mod:`~bids_app.core.explain.smoothgrad` and :mod:`~bids_app.core.explain.cam`: one batch of
  SmoothGrad / Grad-CAM-family maps;
* :mod:`~bids_app.core.explain.crops`: crop lattice, normalisation windows, context margin;
* :mod:`~bids_app.core.explain.engine`: :func:`explain_network_space`;
* :mod:`~bids_app.core.explain.case`: :class:`SaliencyStore`, :func:`explain_case`,
  :func:`reorient_store`;
* :mod:`~bids_app.core.explain.summaries`: viewer maps, lesion-table summaries and the
  explanation's lesion-table fragment;
* :mod:`~bids_app.core.explain.refiner`: radiomics of the saliency maps and the TP/FP refiner
  (arXiv:2409.03772).
"""

from bids_app.core.explain.cam import cam_batch, cam_from_gradients
from bids_app.core.explain.case import SaliencyStore, explain_case, member_networks, reorient_store
from bids_app.core.explain.config import (
    CAM_FORMULATIONS,
    CAM_MAPS,
    DEFAULT_CAMS,
    METHODS,
    SMOOTHGRAD_MAPS,
    ExplainConfig,
)
from bids_app.core.explain.engine import NetworkLesionMaps, explain_network_space
from bids_app.core.explain.geometry import (
    NetworkGeometry,
    geometry_from_properties,
    instances_to_network,
    network_to_input,
    predictor_geometry,
)
from bids_app.core.explain.network import canonical_layer_name, prepare_networks, receptive_field, total_stride
from bids_app.core.explain.noise import counter_noise
from bids_app.core.explain.summaries import lesion_summaries, summary_maps

__all__ = [
    "CAM_FORMULATIONS", "CAM_MAPS", "DEFAULT_CAMS", "METHODS", "SMOOTHGRAD_MAPS", "ExplainConfig", "NetworkGeometry",
    "NetworkLesionMaps", "SaliencyStore", "cam_batch", "cam_from_gradients", "canonical_layer_name",
    "counter_noise", "explain_case", "explain_network_space", "geometry_from_properties", "instances_to_network",
    "lesion_summaries", "member_networks", "network_to_input", "predictor_geometry", "prepare_networks",
    "receptive_field", "reorient_store", "summary_maps", "total_stride",
]
