"""Nipype interface around :mod:`bids_app.core.postprocess`."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _PostProcessInputSpec(BaseInterfaceInputSpec):
    member_probs_file = File(exists=True, mandatory=True, desc=".npy (M, C, X, Y, Z) per-member probabilities")
    reference_file = File(exists=True, mandatory=True, desc="reference image (grid and affine of the outputs)")
    label_indices = traits.List(traits.Int, mandatory=True, desc="output indices of the lesion classes")
    label_names = traits.List(traits.Str, mandatory=True, desc="names of the lesion classes (e.g. WML, CL)")
    label_entities = traits.List(traits.Str, mandatory=True,
                                 desc="their label- values in file names (ModelCard bids_label: BIDS-safe)")
    members = traits.List(traits.Str, mandatory=True, desc="member names, in the order of the probabilities")
    threshold = traits.Float(mandatory=True, desc="lesion probability threshold (p >= threshold)")
    min_lesion_size = traits.Int(mandatory=True, desc="smallest lesion kept, in voxels")
    connectivity = traits.Enum(6, 18, 26, mandatory=True, desc="voxel connectivity of a lesion")
    ensemble_mean = traits.Enum("probabilities", "logits", usedefault=True,
                                desc="mean of member probabilities, or softmax of mean logits (nnU-Net's)")
    save_member_probabilities = traits.Bool(False, usedefault=True, desc="also write per-member probabilities")
    sources = traits.List(traits.Str, mandatory=True, desc="raw input files (for provenance)")


class _PostProcessOutputSpec(TraitedSpec):
    dseg_file = File(exists=True, desc="lesion class map")
    instances_file = File(exists=True, desc="lesion instance map")
    lesions_file = File(exists=True, desc="JSON: per-lesion geometry (label order)")
    summary_file = File(exists=True, desc="JSON: lesion counts and volumes per class")
    derivatives = traits.List(traits.Dict, desc="derivative records")


#: the probseg sidecars' description of the ensemble mean (core.uncertainty.ensemble_mean)
AGGREGATION = {"probabilities": "mean of member softmax",
               "logits": "softmax of the mean member logits (nnU-Net's ensembling)"}


class PostProcess(SimpleInterface):
    """Ensemble mean -> thresholded class masks and lesion instances
    (:func:`bids_app.core.uncertainty.ensemble_mean`, :func:`~bids_app.core.postprocess.segment_lesions`,
    :func:`~bids_app.core.postprocess.lesion_geometry`)."""

    input_spec = _PostProcessInputSpec
    output_spec = _PostProcessOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_app.core.imageio import save_image
        from bids_app.core.postprocess import lesion_geometry, segment_lesions
        from bids_app.core.uncertainty import ensemble_mean

        member_probs = np.load(self.inputs.member_probs_file, mmap_mode="r")
        affine = nib.load(self.inputs.reference_file).affine
        ensemble = ensemble_mean(member_probs, self.inputs.ensemble_mean)  # (C, X, Y, Z) float64
        indices = list(self.inputs.label_indices)
        names = list(self.inputs.label_names)
        params = {"Threshold": self.inputs.threshold, "ThresholdRule": "p >= threshold",
                  "MinLesionSizeVoxels": self.inputs.min_lesion_size, "Connectivity": self.inputs.connectivity,
                  "EnsembleMean": self.inputs.ensemble_mean}
        # the one segmentation of the session (of the float64 map written as the probseg); the uncertainty,
        # feature, explanation and evaluation nodes read it back instead of segmenting again
        seg = segment_lesions(ensemble, indices, self.inputs.threshold, min_size=self.inputs.min_lesion_size,
                              connectivity=self.inputs.connectivity)
        sources = list(self.inputs.sources)
        records = []
        for c, name, entity in zip(indices, names, self.inputs.label_entities):
            # the file names carry the BIDS-safe value; a name that differs from it is said in the sidecar
            named = {"LabelName": name} if name != entity else {}
            prob_file = os.path.abspath(f"prob_{entity}.nii.gz")
            save_image(prob_file, ensemble[c].astype(np.float32), affine)
            records.append({"key": "probseg", "file": prob_file, "sources": sources, "entities": {"label": entity},
                            "metadata": {**named, "Members": list(self.inputs.members),
                                         "Aggregation": AGGREGATION[self.inputs.ensemble_mean]}})
            mask_file = os.path.abspath(f"mask_{entity}.nii.gz")
            save_image(mask_file, seg.class_mask(c).astype(np.uint8), affine)
            records.append({"key": "class_mask", "file": mask_file, "sources": sources, "entities": {"label": entity},
                            "derived_from": [{"key": "probseg", "entities": {"label": entity}}],
                            "metadata": {**named, "Type": "Lesion", "Manual": False, **params}})
            if self.inputs.save_member_probabilities:
                for m, member in enumerate(self.inputs.members):
                    member_file = os.path.abspath(f"member{member}_{entity}.nii.gz")
                    save_image(member_file, np.asarray(member_probs[m, c], dtype=np.float32), affine)
                    records.append({"key": "member_probseg", "file": member_file, "sources": sources,
                                    "entities": {"label": entity, "desc": f"member{member}"},
                                    "metadata": {**named, "Member": member}})
        union_file = os.path.abspath("mask_lesion.nii.gz")
        save_image(union_file, (seg.dseg > 0).astype(np.uint8), affine)
        records.append({"key": "lesion_mask", "file": union_file, "sources": sources,
                        "derived_from": [{"key": "probseg", "entities": {"label": entity}}
                                         for entity in self.inputs.label_entities],
                        "metadata": {"Type": "Lesion", "Manual": False, "Classes": names, **params}})
        dseg_file = os.path.abspath("dseg.nii.gz")
        save_image(dseg_file, seg.dseg.astype(np.int16), affine)
        lut = write_class_lut(os.path.abspath("dseg.tsv"), indices, names)
        records.append({"key": "class_dseg", "file": dseg_file, "sources": sources, "lookup_table": lut,
                        "metadata": {"Manual": False, **params}})
        instances_file = os.path.abspath("instances.nii.gz")
        save_image(instances_file, seg.instances.astype(np.int16), affine)
        geometry = lesion_geometry(seg.instances, seg.n_lesions, affine)
        geometry["class_index"] = seg.instance_class
        class_names = dict(zip(indices, names))
        instance_lut = os.path.abspath("instances.tsv")
        with open(instance_lut, "w") as handle:
            handle.write("index\tname\tclass\tmapping\n")
            for lab, cls in zip(geometry["label"], geometry["class_index"]):
                handle.write(f"{lab}\tlesion-{lab:04d}\t{class_names[int(cls)]}\t7\n")
        records.append({"key": "instance_dseg", "file": instances_file, "sources": sources,
                        "lookup_table": instance_lut,
                        "metadata": {"Manual": False, "LabelOrder": "class by class, then C-order raster "
                                     "order of each lesion's first voxel", **params}})
        lesions = {k: v.tolist() for k, v in geometry.items()}
        lesions["class"] = [class_names[int(c)] for c in geometry["class_index"]]
        lesions_file = os.path.abspath("lesions.json")
        with open(lesions_file, "w") as handle:
            json.dump(lesions, handle)
        volumes = np.asarray(geometry["volume_mm3"])
        summary = {"lesions": {
            "n_lesions": int(seg.n_lesions),
            "total_volume_mm3": float(volumes.sum()),
            "per_class": {
                name: {"n_lesions": int((geometry["class_index"] == c).sum()),
                       "volume_mm3": float(volumes[geometry["class_index"] == c].sum())}
                for c, name in zip(indices, names)
            },
            "empty_prediction": bool(seg.n_lesions == 0),
        }, "parameters": params}
        summary_file = os.path.abspath("postprocess_summary.json")
        with open(summary_file, "w") as handle:
            json.dump(summary, handle, indent=2, sort_keys=True)
        self._results.update(dseg_file=dseg_file, instances_file=instances_file, lesions_file=lesions_file,
                             summary_file=summary_file, derivatives=records)
        return runtime


def write_class_lut(path: str, indices, names) -> str:
    """BIDS dseg lookup table (index, name, abbreviation, mapping 7 = lesion) of the lesion classes."""
    with open(path, "w") as handle:
        handle.write("index\tname\tabbreviation\tmapping\n")
        for c, name in zip(indices, names):
            long = {"WML": "WhiteMatterLesion", "CL": "CorticalLesion"}.get(name, name)
            handle.write(f"{c}\t{long}\t{name}\t7\n")
    return path
