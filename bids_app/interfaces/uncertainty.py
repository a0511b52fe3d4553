"""Nipype interface around :func:`bids_app.core.uncertainty.compute_uncertainty`."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_app.core.uncertainty.session import DEFAULT_LESION_MAPS, DEFAULT_VOXEL_MAPS


class _ComputeUncertaintyInputSpec(BaseInterfaceInputSpec):
    member_probs_file = File(exists=True, mandatory=True, desc=".npy (M, C, X, Y, Z) per-member probabilities")
    reference_file = File(exists=True, mandatory=True, desc="reference image (grid and affine)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask (patient-level voxel averages)")
    dseg_file = File(exists=True, desc="the session's lesion class map (PostProcess); absent: segment here")
    instances_file = File(exists=True, desc="the session's lesion instance map (PostProcess)")
    label_indices = traits.List(traits.Int, mandatory=True, desc="output indices of the lesion classes")
    label_names = traits.List(traits.Str, mandatory=True, desc="names of the lesion classes")
    threshold = traits.Float(mandatory=True, desc="ensemble (and member) threshold")
    member_thresholds = traits.List(traits.Float, desc="each member's own threshold (LSU+/PSU+); empty: none")
    min_lesion_size = traits.Int(mandatory=True, desc="smallest lesion kept, voxels")
    connectivity = traits.Enum(6, 18, 26, mandatory=True, desc="lesion connectivity")
    voxel_maps = traits.List(traits.Str, list(DEFAULT_VOXEL_MAPS), usedefault=True,
                             desc="voxel measures written as maps (NC, EoE, ExE, MI, EPKL, RMI)")
    lesion_maps = traits.List(traits.Str, list(DEFAULT_LESION_MAPS), usedefault=True,
                              desc="lesion measures written as painted maps")
    sources = traits.List(traits.Str, mandatory=True, desc="raw input files (provenance)")


class _ComputeUncertaintyOutputSpec(TraitedSpec):
    lesions_file = File(exists=True, desc="lesion-table fragment (TSV): geometry + lesion uncertainty")
    lesions_dictionary = File(exists=True, desc="its JSON data dictionary")
    summary_file = File(exists=True, desc="JSON part: patient-scale uncertainty")
    voxel_map_files = traits.Dict(traits.Str, File(exists=True), desc="voxel measure -> NIfTI")
    derivatives = traits.List(traits.Dict, desc="derivative records (maps)")


class ComputeUncertainty(SimpleInterface):
    """Voxel, lesion and patient-scale uncertainty of the ensemble (:mod:`bids_app.core.uncertainty`)."""

    input_spec = _ComputeUncertaintyInputSpec
    output_spec = _ComputeUncertaintyOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_app.core.imageio import save_image
        from bids_app.core.postprocess import segmentation_from_maps
        from bids_app.core.uncertainty import compute_uncertainty, paint_lesions
        from bids_app.formats.lesion_table import VOXEL_MEASURES, dictionary_for, write_fragment

        probs = np.load(self.inputs.member_probs_file, mmap_mode="r")
        affine = nib.load(self.inputs.reference_file).affine
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        indices = list(self.inputs.label_indices)
        names = dict(zip(indices, self.inputs.label_names))
        member_thresholds = list(self.inputs.member_thresholds) or None
        segmentation = None
        if isdefined(self.inputs.dseg_file) and isdefined(self.inputs.instances_file):
            segmentation = segmentation_from_maps(np.asarray(nib.load(self.inputs.dseg_file).dataobj),
                                                  np.asarray(nib.load(self.inputs.instances_file).dataobj))
        result = compute_uncertainty(
            np.asarray(probs), threshold=self.inputs.threshold, min_size=self.inputs.min_lesion_size,
            connectivity=self.inputs.connectivity, lesion_labels=indices, member_thresholds=member_thresholds,
            brain_mask=mask, affine=affine, segmentation=segmentation)
        lesions = result.lesions.copy()
        lesions["class"] = [names.get(int(c), str(c)) for c in lesions["class"]]
        stem = os.path.abspath("lesions_uncertainty")
        tsv, dictionary = write_fragment(lesions, dictionary_for(lesions), stem)

        # sidecar keys are CamelCase, as the post-processing node writes the same parameters
        # (Threshold, ThresholdRule, MinLesionSizeVoxels, Connectivity); the summary keeps snake_case
        params = {"UncertaintyParameters": {_camel(key): value for key, value in result.parameters.items()}}
        records = []
        map_files = {}
        for measure in self.inputs.voxel_maps:
            if measure not in result.voxel_maps:
                raise ValueError(f"unknown voxel measure {measure!r}; choose from {sorted(result.voxel_maps)}")
            path = os.path.abspath(f"voxel_{measure}.nii.gz")
            save_image(path, result.voxel_maps[measure].astype(np.float32), affine)
            map_files[measure] = path
            records.append({"key": "voxel_uncertainty", "file": path, "sources": list(self.inputs.sources),
                            "entities": {"desc": measure.lower()},
                            "metadata": {"Measure": measure, "MeasureName": VOXEL_MEASURES.get(measure, measure),
                                         "Units": "nat" if measure != "NC" else "1", "SkullStripped": False,
                                         **params}})
        for measure in self.inputs.lesion_maps:
            if measure not in lesions.columns:
                raise ValueError(f"unknown lesion measure {measure!r}")
            path = os.path.abspath(f"lesion_{measure}.nii.gz")
            values = lesions[measure].to_numpy(dtype=np.float64)
            save_image(path, paint_lesions(result.segmentation.instances, np.nan_to_num(values, nan=0.0,
                                                                                         neginf=0.0)), affine)
            desc = "".join(ch for ch in measure.lower() if ch.isalnum())
            records.append({"key": "lesion_uncertainty", "file": path, "sources": list(self.inputs.sources),
                            "entities": {"desc": desc},
                            "derived_from": [{"key": "instance_dseg"}],
                            "metadata": {"Measure": measure, "NonFiniteValuesWrittenAs": 0.0, **params}})
        summary_file = os.path.abspath("uncertainty_summary.json")
        from bids_app.bids.derivatives import dumps_json

        with open(summary_file, "w") as handle:
            handle.write(dumps_json({"uncertainty": result.patient, "uncertainty_parameters": result.parameters}))
        self._results.update(lesions_file=str(tsv), lesions_dictionary=str(dictionary), summary_file=summary_file,
                             voxel_map_files=map_files, derivatives=records)
        return runtime


def _camel(key: str) -> str:
    """``min_lesion_size_voxels`` -> ``MinLesionSizeVoxels`` (BIDS sidecar style)."""
    return "".join(part[:1].upper() + part[1:] for part in key.split("_"))
