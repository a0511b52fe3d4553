"""Nipype interfaces: evaluation against reference masks, and the lesion-table assembly."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_app.core.metrics.detection import DEFAULT_DETECTION_THRESHOLD, DETECTION_METHODS
from bids_app.core.metrics.overlap import DEFAULT_NDSC_R


class _EvaluateSessionInputSpec(BaseInterfaceInputSpec):
    instances_file = File(exists=True, mandatory=True, desc="lesion instance map (desc-instances dseg)")
    lesions_file = File(exists=True, mandatory=True, desc="lesion-table fragment with class and lesion measures")
    member_probs_file = File(exists=True, mandatory=True, desc=".npy (M, C, X, Y, Z) per-member probabilities")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    reference_kind = traits.Enum("dseg", "class_masks", "binary", mandatory=True, desc="how the reference is stored")
    reference_files = traits.List(traits.Either(None, File(exists=True)), mandatory=True,
                                  desc="reference mask file(s)")
    reference_value_map = traits.Dict(traits.Int, traits.Int, desc="dseg value -> model class index")
    label_indices = traits.List(traits.Int, mandatory=True, desc="model class indices of the lesion classes")
    label_names = traits.List(traits.Str, mandatory=True, desc="names of the lesion classes")
    method = traits.Enum(*DETECTION_METHODS, usedefault=True, desc="lesion detection method")
    detection_threshold = traits.Float(DEFAULT_DETECTION_THRESHOLD, usedefault=True,
                                       desc="IoU threshold of a detected lesion")
    connectivity = traits.Enum(6, 18, 26, mandatory=True, desc="lesion connectivity")
    ensemble_mean = traits.Enum("probabilities", "logits", usedefault=True,
                                desc="the ensemble probability map calibrated (as PostProcess thresholded it)")
    ndsc_r = traits.Float(DEFAULT_NDSC_R, usedefault=True, desc="reference lesion load of nDSC")
    lesion_measures = traits.List(traits.Str, ["LSU", "mean_MI", "mean_EoE"], usedefault=True,
                                  desc="lesion measures given a lesion retention curve")
    voxel_map_files = traits.Dict(traits.Str, File(exists=True),
                                  desc="the uncertainty node's voxel maps (measure -> NIfTI); EoE and MI are "
                                       "read from here when present instead of being computed again")
    sources = traits.List(traits.Str, mandatory=True, desc="raw inputs (provenance)")


class _EvaluateSessionOutputSpec(TraitedSpec):
    metrics_file = File(exists=True, desc="evaluation metrics JSON (derivative)")
    summary_file = File(exists=True, desc="JSON part for the session summary")
    lesions_file = File(exists=True, desc="lesion-table fragment: lesion_type, iou_score")
    lesions_dictionary = File(exists=True, desc="its data dictionary")
    derivatives = traits.List(traits.Dict, desc="derivative records")


class EvaluateSession(SimpleInterface):
    """Detection, voxel, calibration metrics and retention curves
    (:func:`bids_app.core.metrics.session.evaluate_session`)."""

    input_spec = _EvaluateSessionInputSpec
    output_spec = _EvaluateSessionOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import pandas as pd

        from bids_app.bids.derivatives import dumps_json
        from bids_app.core.imageio import load_image
        from bids_app.core.metrics.session import evaluate_session
        from bids_app.core.uncertainty import ensemble_mean, voxel_uncertainty
        from bids_app.errors import BadInputData
        from bids_app.formats.lesion_table import read_tsv, write_fragment

        inst_img = nib.load(self.inputs.instances_file)
        instances = np.asarray(inst_img.dataobj).astype(np.int32)
        lesions = read_tsv(self.inputs.lesions_file)
        names = dict(zip(self.inputs.label_indices, self.inputs.label_names))
        name_to_index = {v: k for k, v in names.items()}
        instance_class = np.array([name_to_index[c] for c in lesions["class"]], dtype=np.int32) \
            if len(lesions) else np.zeros(0, np.int32)

        def reference(path):
            img = load_image(path, dtype=None, check_values=False)
            if img.shape != instances.shape or not np.allclose(img.affine, inst_img.affine, atol=1e-3):
                raise BadInputData(
                    f"Reference mask is on another grid (shape {img.shape}) than the reference image "
                    f"(shape {instances.shape}).", path=path,
                    hint="resample the manual mask onto the image it was drawn on (the same grid as the input).")
            return np.asarray(img.data)

        ref = np.zeros(instances.shape, dtype=np.int32)
        kind = self.inputs.reference_kind
        class_names = names
        if kind == "dseg":
            values = reference(self.inputs.reference_files[0])
            for value, index in (self.inputs.reference_value_map or {i: i for i in names}).items():
                ref[values == value] = index
        elif kind == "class_masks":
            for index, path in zip(self.inputs.label_indices, self.inputs.reference_files):
                if path:
                    ref[reference(path) > 0] = index
            class_names = {i: n for (i, n), p in zip(names.items(), self.inputs.reference_files) if p}
        else:
            ref[reference(self.inputs.reference_files[0]) > 0] = 1
            class_names = {}
        member_probs = np.load(self.inputs.member_probs_file, mmap_mode="r")
        mean = ensemble_mean(member_probs, self.inputs.ensemble_mean)  # the map the segmentation thresholded
        lesion_prob = 1.0 - mean[0]
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        given = self.inputs.voxel_map_files if isdefined(self.inputs.voxel_map_files) else {}
        if all(m in given for m in ("EoE", "MI")):  # the same float32 maps the uncertainty node computed
            voxel_maps = {m: np.asarray(nib.load(given[m]).dataobj, dtype=np.float32) for m in ("EoE", "MI")}
        else:
            voxel_maps = voxel_uncertainty(np.asarray(member_probs), measures=("EoE", "MI"))
        measures = {m: lesions[m].to_numpy(dtype=np.float64) for m in self.inputs.lesion_measures
                    if m in lesions.columns}
        result = evaluate_session(
            instances, instance_class, ref, class_names, lesion_prob, brain_mask=mask, voxel_maps=voxel_maps,
            lesion_measures=measures, method=self.inputs.method, threshold=self.inputs.detection_threshold,
            connectivity=int(self.inputs.connectivity), ndsc_r=self.inputs.ndsc_r)
        metrics = dict(result.metrics)
        metrics["reference_kind"] = kind
        metrics_file = os.path.abspath("evaluation.json")
        curves = {k: {"fracs": c.fracs[::10].tolist(), "values": c.values[::10].tolist(), "auc": c.auc}
                  for k, c in result.curves.items()}
        with open(metrics_file, "w") as handle:
            handle.write(dumps_json({"metrics": metrics, "retention_curves": curves,
                                     "reference_files": [os.path.basename(p)
                                                         for p in self.inputs.reference_files if p]}))
        summary_file = os.path.abspath("evaluation_summary.json")
        with open(summary_file, "w") as handle:
            handle.write(dumps_json({"evaluation": metrics}))
        fragment = pd.DataFrame({"label": lesions["label"] if len(lesions) else pd.Series(dtype=int),
                                 "lesion_type": result.lesion_type, "iou_score": result.lesion_score})
        from bids_app.formats.lesion_table import dictionary_for

        dictionary = dictionary_for(fragment)
        dictionary["iou_score"] = dict(dictionary["iou_score"], Method=self.inputs.method,
                                       Threshold=self.inputs.detection_threshold)
        tsv, js = write_fragment(fragment, dictionary, os.path.abspath("lesions_evaluation"))
        sources = list(self.inputs.sources) + [p for p in self.inputs.reference_files if p]
        self._results.update(metrics_file=metrics_file, summary_file=summary_file, lesions_file=str(tsv),
                             lesions_dictionary=str(js),
                             derivatives=[{"key": "evaluation", "file": metrics_file, "sources": sources}])
        return runtime


class _LesionTableInputSpec(BaseInterfaceInputSpec):
    fragments = traits.List(File(exists=True), mandatory=True, desc="lesion-table fragments (TSV with label)")
    dictionaries = traits.List(File(exists=True), mandatory=True, desc="their JSON data dictionaries")
    sources = traits.List(traits.Str, mandatory=True, desc="raw inputs (provenance)")


class _LesionTableOutputSpec(TraitedSpec):
    table_file = File(exists=True, desc="the lesion table TSV")
    derivatives = traits.List(traits.Dict, desc="derivative record")


class LesionTable(SimpleInterface):
    """Join the per-lesion fragments of all stages (:func:`bids_app.formats.lesion_table.merge_fragments`)."""

    input_spec = _LesionTableInputSpec
    output_spec = _LesionTableOutputSpec

    def _run_interface(self, runtime):
        from bids_app.formats.lesion_table import dictionary_for, merge_fragments, read_tsv, to_tsv

        frames = [read_tsv(f) for f in self.inputs.fragments]
        extra: dict = {}
        for d in self.inputs.dictionaries:
            with open(d) as handle:
                extra.update(json.load(handle))
        table = merge_fragments(frames)
        out = os.path.abspath("lesions.tsv")
        with open(out, "w") as handle:
            handle.write(to_tsv(table))
        self._results.update(table_file=out, derivatives=[{
            "key": "lesion_table", "file": out, "sources": list(self.inputs.sources),
            "derived_from": [{"key": "instance_dseg"}],
            "metadata": dictionary_for(table, extra)}])
        return runtime
