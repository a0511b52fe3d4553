"""Nipype interface around :class:`bids_app.core.segment.EnsemblePredictor`."""

from __future__ import annotations

import json
import os
import time

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _PredictLesionsInputSpec(BaseInterfaceInputSpec):
    channels_file = File(exists=True, mandatory=True, desc="4D NIfTI (X, Y, Z, K) of the input channels")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    model_dir = Directory(exists=True, mandatory=True, desc="nnU-Net trained-model folder")
    card_file = File(desc="model card JSON (empty: the card beside the model, or an inferred one)")
    checkpoint = traits.Enum("auto", "final", "best", usedefault=True,
                             desc="the members' checkpoint (auto: the card's; --checkpoint)")
    members = traits.List(traits.Str, mandatory=True,
                          desc="ensemble members to run (names of nnU-Net's fold_<name> folders)")
    device = traits.Enum("cpu", "cuda", "auto", usedefault=True, desc="torch device")
    tta = traits.Bool(True, usedefault=True, desc="test-time mirroring")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="marks the node as a GPU node for Nipype's MultiProc GPU queue")
    skull_stripped_input = traits.Bool(True, usedefault=True,
                                       desc="zero the inputs outside the brain mask (the model card's)")
    input_orientation = traits.Enum("auto", "native", "ras", usedefault=True,
                                    desc="voxel order the network sees: the stored one (native), RAS+ (ras), or "
                                         "the model card's / plans.json reader's (auto)")
    progress_label = traits.Str("", usedefault=True, desc="who the progress line is about, e.g. 'sub-01 ses-1'")


class _PredictLesionsOutputSpec(TraitedSpec):
    member_probs_file = File(exists=True, desc=".npy (M, C, X, Y, Z) float32 per-member softmax on the input grid")
    model_file = File(exists=True, desc="JSON: model provenance (id, members, checkpoint SHA-256) and timings")


class PredictLesions(SimpleInterface):
    """Per-member softmax probabilities of an nnU-Net ensemble (see :mod:`bids_app.core.segment`).

    The network sees the image in the voxel order the model was trained with (RAS+, or the
    stored order: :func:`network_channels`) and the probabilities are mapped back to the
    input's voxel order, so downstream nodes work on the reference image's own grid.
    """

    input_spec = _PredictLesionsInputSpec
    output_spec = _PredictLesionsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_app.core.conform import from_canonical
        from bids_app.model.ensemble import load_ensemble
        from bids_app.model.provenance import model_provenance
        from bids_app.model.resolve import resolve_input_orientation
        from bids_app.progress import ProgressLine

        start = time.perf_counter()
        members = list(self.inputs.members)
        ensemble = load_ensemble(node_model(self.inputs.model_dir, self.inputs.card_file, self.inputs.checkpoint,
                                            members), members,
                                 device=self.inputs.device, tta=self.inputs.tta, num_threads=self.inputs.num_threads)
        model, predictor = ensemble.model, ensemble.predictor
        device = predictor.device
        orientation, orientation_reason = resolve_input_orientation(model, self.inputs.input_orientation)
        img = nib.load(self.inputs.channels_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        stack, zooms, ornt = network_channels(np.asarray(img.dataobj, dtype=np.float32), img.affine,
                                              mask if self.inputs.skull_stripped_input else None, orientation)
        load_seconds = time.perf_counter() - start
        t0 = time.perf_counter()
        line = ProgressLine(self.inputs.progress_label or "session", "predict")

        def progress(member, n_members, tile, n_tiles):
            line.update(((member - 1) * n_tiles + tile) / (n_members * n_tiles),
                        f"member {member}/{n_members}, tile {tile}/{n_tiles}",
                        step=tile == n_tiles and member < n_members)

        try:
            probs = predictor.predict(stack, zooms, progress=progress)
        finally:
            line.close()
        predict_seconds = time.perf_counter() - t0
        probs = from_canonical(probs, ornt)
        out = os.path.abspath("member_probs.npy")
        np.save(out, probs)
        info = {"inference": {
            "model": model_provenance(model, members, ensemble.digests),
            "labels": {str(lab.index): lab.name for lab in model.card.labels},
            "device": str(device),
            "tta": bool(self.inputs.tta),
            "mirroring_axes": list(predictor.mirroring_axes) if predictor.mirroring_axes else None,
            "tile_step_size": predictor.tile_step_size,
            "network_spacing_mm": predictor.target_spacing,
            "skull_stripped_for_network": bool(self.inputs.skull_stripped_input),
            "input_orientation": orientation,
            "input_orientation_reason": orientation_reason,
            "seconds_loading": round(load_seconds, 3),
            "seconds_inference": round(predict_seconds, 3),
        }}
        model_file = os.path.abspath("model.json")
        with open(model_file, "w") as handle:
            json.dump(info, handle, indent=2, sort_keys=True)
        self._results.update(member_probs_file=out, model_file=model_file)
        return runtime


def node_model(model_dir, card_file, checkpoint="auto", members=None):
    """The model a node was given (``model_dir``, ``card_file``, ``checkpoint`` traits), resolved by
    the one rule of ``--model`` (:func:`bids_app.model.resolve.resolve_model`: the card given, else
    the one beside the model, else an inferred one) and of ``--checkpoint``
    (:func:`bids_app.model.resolve.select_checkpoint`), so that the prediction and explanation nodes
    load the same model as the run (:func:`bids_app.model.ensemble.load_ensemble`)."""
    from pathlib import Path

    from bids_app.model.resolve import resolve_model, select_checkpoint

    model = resolve_model(str(model_dir), card_path=Path(card_file) if card_file else None)
    return select_checkpoint(model, checkpoint or "auto", list(members) if members else None)


def network_channels(channels, affine, mask=None, orientation="ras"):
    """Input channels as the network takes them: zeroed outside ``mask`` (skull-stripped
    models), in the voxel order the model expects (:func:`~bids_app.model.orientation.input_orientation_rule`).

    ``ras``: reoriented to RAS+, as nnU-Net's ``NibabelIOWithReorient`` reads a file.
    ``native``: the stored voxel order of the grid (the reference image's, after conforming),
    as ``SimpleITKIO`` and ``NibabelIO`` read it. Either way
    :meth:`~bids_app.core.segment.EnsemblePredictor.preprocess` then hands nnU-Net the array
    in (z, y, x) order with the spacing reversed, as those readers do.

    Parameters
    ----------
    channels : ndarray (X, Y, Z, K) float32
    affine : ndarray (4, 4)
    mask : ndarray (X, Y, Z) bool or None
    orientation : {"ras", "native"}

    Returns
    -------
    stack : ndarray (K, X', Y', Z') float32 on the grid the network sees
    zooms : (3,) float, mm on that grid
    ornt : ndarray (3, 2), the orientation that maps it back to the input grid with
        :func:`~bids_app.core.conform.from_canonical` (the original orientation for ``ras``;
        RAS, i.e. the identity, for ``native``)
    """
    import numpy as np
    from nibabel import orientations as nio

    from bids_app.core.conform import to_canonical
    from bids_app.core.imageio import Image

    if orientation not in ("ras", "native"):
        raise ValueError(f"orientation must be 'ras' or 'native', not {orientation!r}")
    if mask is not None:
        channels = channels * mask[..., None]
    if orientation == "native":
        stack = np.ascontiguousarray(np.moveaxis(np.asarray(channels, dtype=np.float32), -1, 0))
        return stack, Image(channels[..., 0], affine).zooms, nio.axcodes2ornt("RAS")
    canonical, ornt = [], None
    canon = None
    for k in range(channels.shape[-1]):
        canon, ornt = to_canonical(Image(channels[..., k], affine))
        canonical.append(canon.data)
    return np.stack(canonical), canon.zooms, ornt
