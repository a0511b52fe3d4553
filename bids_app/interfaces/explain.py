"""Nipype interfaces around :func:`bids_app.core.explain.explain_case` and the saliency refiner
(:mod:`bids_app.core.explain.refiner`): they load, call the core and write
(:mod:`bids_app.core.explain.tables` says what is written)."""

from __future__ import annotations

import json
import logging
import os
import time

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class _ExplainLesionsInputSpec(BaseInterfaceInputSpec):
    channels_file = File(exists=True, mandatory=True, desc="4D NIfTI (X, Y, Z, K) of the conformed channels")
    channel_names = traits.List(traits.Str, mandatory=True, desc="channel names (store and column names)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    instances_file = File(exists=True, mandatory=True, desc="lesion instance map (desc-instances dseg)")
    lesions_file = File(exists=True, mandatory=True, desc="postprocess JSON: label, class_index, n_voxels")
    model_dir = Directory(exists=True, mandatory=True, desc="nnU-Net trained-model folder")
    card_file = File(desc="model card JSON")
    checkpoint = traits.Enum("auto", "final", "best", usedefault=True,
                             desc="the members' checkpoint (auto: the card's; --checkpoint)")
    members = traits.List(traits.Str, mandatory=True, desc="ensemble members (explained as their mean)")
    progress_label = traits.Str("", usedefault=True, desc="who the progress line is about, e.g. 'sub-01 ses-1'")
    device = traits.Enum("cpu", "cuda", "auto", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    use_gpu = traits.Bool(False, usedefault=True, desc="GPU node for Nipype's MultiProc GPU queue")
    skull_stripped_input = traits.Bool(True, usedefault=True,
                                       desc="zero the inputs outside the brain mask (the model card's)")
    input_orientation = traits.Enum("auto", "native", "ras", usedefault=True,
                                    desc="voxel order the network sees (as PredictLesions)")
    explain_config = traits.Dict(traits.Str, traits.Any, usedefault=True,
                                 desc="fields of bids_app.core.explain.ExplainConfig (n_samples, noise_level, "
                                 "margin_mm, max_groups, seed, ...); absent ones take its defaults")
    max_lesions = traits.Int(0, usedefault=True, desc="explain the largest N lesions only (0: all)")
    sources = traits.List(traits.Str, mandatory=True, desc="raw inputs (provenance)")


class _ExplainLesionsOutputSpec(TraitedSpec):
    lesions_file = File(exists=True, desc="lesion-table fragment: saliency summaries (+ p_true_lesion)")
    lesions_dictionary = File(exists=True, desc="its data dictionary")
    summary_file = File(exists=True, desc="JSON part: what was explained, how, timings")
    store_file = File(exists=True, desc="the per-lesion saliency store (.npz)")
    derivatives = traits.List(traits.Dict, desc="derivative records (store, summary maps)")


class ExplainLesions(SimpleInterface):
    """Instance-level saliency of every predicted lesion (SmoothGrad mean/max per channel,
    Grad-CAM, Grad-CAM++): the per-lesion store, viewer maps and lesion-table summaries.

    The ensemble members are explained as their mean (``docs/explain.md``), on the grid the
    network runs on (RAS+ or the stored order, as for prediction); the store and maps are mapped
    back to the reference image's grid.
    """

    input_spec = _ExplainLesionsInputSpec
    output_spec = _ExplainLesionsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import nibabel.orientations as nio
        import numpy as np

        from bids_app.bids.derivatives import dumps_json
        from bids_app.core.explain import ExplainConfig, explain_case, reorient_store
        from bids_app.core.explain.tables import SessionLesions, explanation_outputs
        from bids_app.core.imageio import save_image
        from bids_app.formats.lesion_table import write_fragment
        from bids_app.formats.saliency_store import save_store
        from bids_app.interfaces.segment import network_channels, node_model
        from bids_app.model.ensemble import load_ensemble
        from bids_app.model.resolve import resolve_input_orientation
        from bids_app.progress import ProgressLine

        start = time.perf_counter()
        names = list(self.inputs.channel_names)
        ensemble = load_ensemble(node_model(self.inputs.model_dir, self.inputs.card_file, self.inputs.checkpoint,
                                            self.inputs.members), list(self.inputs.members),
                                 device=self.inputs.device, tta=False, num_threads=self.inputs.num_threads)
        model, predictor = ensemble.model, ensemble.predictor
        orientation, _ = resolve_input_orientation(model, self.inputs.input_orientation)
        img = nib.load(self.inputs.channels_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        stack, zooms, ornt = network_channels(np.asarray(img.dataobj, dtype=np.float32), img.affine,
                                              mask if self.inputs.skull_stripped_input else None, orientation)
        inst_img = nib.load(self.inputs.instances_file)
        instances = np.asarray(inst_img.dataobj).astype(np.int32)
        affine = inst_img.affine
        # the grid the network sees: the channels' mapping (identity for native) applied to the instances
        canonical_instances = np.ascontiguousarray(
            nio.apply_orientation(instances, nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))))
        with open(self.inputs.lesions_file) as handle:
            lesions = SessionLesions.from_record(json.load(handle))
        selected = lesions.largest(self.inputs.max_lesions)
        config = ExplainConfig(**self.inputs.explain_config)
        line = ProgressLine(self.inputs.progress_label or "session", "explain")
        n_explained = len(selected)

        def progress(done, total):
            # the engine counts (lesion, noise sample) items, lesion by lesion within a batch group: the
            # lesion number shown is therefore approximate
            fraction = done / max(total, 1)
            current = min(n_explained, int(fraction * n_explained) + 1)
            line.update(fraction, f"lesion {current} of {n_explained}")

        try:
            store = explain_case(predictor, stack, zooms, canonical_instances, lesions.class_of_label(), config,
                                 channel_names=names, labels=[int(v) for v in selected], progress=progress)
        finally:
            line.close()
        store = reorient_store(store, nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt))
        del predictor
        outputs = explanation_outputs(store, lesions.labels)

        sources = list(self.inputs.sources)
        store_file = save_store(os.path.abspath("saliency.npz"), store, affine=affine)
        records = [{"key": "saliency_store", "file": str(store_file), "sources": sources,
                    "derived_from": [{"key": "instance_dseg"}], "metadata": outputs.store_metadata}]
        for summary_map in outputs.maps:
            path = os.path.abspath(f"saliency_{summary_map.desc}.nii.gz")
            save_image(path, summary_map.volume, affine)
            records.append({"key": "saliency", "file": path, "sources": sources,
                            "entities": {"desc": summary_map.desc}, "derived_from": [{"key": "saliency_store"}],
                            "metadata": summary_map.metadata})
        tsv, js = write_fragment(outputs.table, outputs.dictionary, os.path.abspath("lesions_saliency"))
        summary = {"explanations": {**outputs.summary, "seconds_total": round(time.perf_counter() - start, 3)}}
        summary_file = os.path.abspath("explain_summary.json")
        with open(summary_file, "w") as handle:
            handle.write(dumps_json(summary))
        self._results.update(lesions_file=str(tsv), lesions_dictionary=str(js), summary_file=summary_file,
                             store_file=str(store_file), derivatives=records)
        return runtime


class _RefineLesionsInputSpec(BaseInterfaceInputSpec):
    store_file = File(exists=True, mandatory=True, desc="saliency store (.npz) of ExplainLesions")
    instances_file = File(exists=True, mandatory=True, desc="lesion instance map (desc-instances dseg)")
    lesions_file = File(exists=True, mandatory=True, desc="postprocess JSON: label, class_index")
    refiner_file = File(exists=True, mandatory=True, desc="saliency-radiomics refiner JSON")
    refine = traits.Bool(False, usedefault=True, desc="write the refined segmentation (drops p < threshold)")
    refine_threshold = traits.Float(desc="refinement threshold (unset: the refiner's own)")
    label_indices = traits.List(traits.Int, mandatory=True, desc="lesion label indices of the model")
    label_names = traits.List(traits.Str, mandatory=True, desc="their names")
    sources = traits.List(traits.Str, mandatory=True, desc="raw inputs (provenance)")


class _RefineLesionsOutputSpec(TraitedSpec):
    lesions_file = File(exists=True, desc="lesion-table fragment: p_true_lesion, refined_keep")
    lesions_dictionary = File(exists=True, desc="its data dictionary")
    summary_file = File(exists=True, desc="JSON part: the refinement")
    derivatives = traits.List(traits.Dict, desc="derivative records (refined dseg and mask with --refine)")


class RefineLesions(SimpleInterface):
    """``p_true_lesion`` of every explained lesion from the radiomics of its SmoothGrad map
    (:func:`bids_app.core.explain.refiner.refine_lesions`) and, with
    ``refine``, the segmentation without the lesions under the threshold. A node of its own, so
    that changing the refiner or its threshold does not recompute the saliency maps."""

    input_spec = _RefineLesionsInputSpec
    output_spec = _RefineLesionsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_app.bids.derivatives import dumps_json
        from bids_app.core.explain.refiner import check_refiner, refine_lesions
        from bids_app.core.explain.tables import (
            SessionLesions,
            refinement_summary,
            refinement_table,
        )
        from bids_app.formats.lesion_table import write_fragment
        from bids_app.formats.saliency_store import load_store

        store = load_store(self.inputs.store_file)
        inst_img = nib.load(self.inputs.instances_file)
        instances = np.asarray(inst_img.dataobj).astype(np.int32)
        with open(self.inputs.lesions_file) as handle:
            lesions = SessionLesions.from_record(json.load(handle))
        with open(self.inputs.refiner_file) as handle:
            refiner = check_refiner(json.load(handle))
        refinement = refine_lesions(refiner, store, lesions.labels,
                                    self.inputs.refine_threshold if isdefined(self.inputs.refine_threshold) else None)
        failed_labels = refinement.failed_labels
        if failed_labels:
            logging.getLogger("bids_app.refine").warning(
                "%s: the refiner could not score %d of %d lesions (labels %s: saliency features failed); they are "
                "kept (refined_keep = 1, refiner_scored = 0).", os.path.basename(self.inputs.sources[0])
                if self.inputs.sources else "session", len(failed_labels), len(lesions.labels),
                ", ".join(str(v) for v in failed_labels[:20]))
        records = []
        if self.inputs.refine:
            records += self._refined_records(instances, lesions, refinement, inst_img.affine,
                                             list(self.inputs.sources))
        table, dictionary = refinement_table(refinement)
        tsv, js = write_fragment(table, dictionary, os.path.abspath("lesions_refiner"))
        summary_file = os.path.abspath("refine_summary.json")
        part = refinement_summary(refinement, os.path.basename(self.inputs.refiner_file), refiner,
                                  self.inputs.refine)
        with open(summary_file, "w") as handle:
            handle.write(dumps_json(part))
        self._results.update(lesions_file=str(tsv), lesions_dictionary=str(js), summary_file=summary_file,
                             derivatives=records)
        return runtime

    def _refined_records(self, instances, lesions, refinement, affine, sources):
        """The refined class dseg and union mask: the dropped lesions removed."""
        import numpy as np

        from bids_app.core.explain.refiner import refined_segmentation
        from bids_app.core.explain.tables import refinement_parameters
        from bids_app.core.imageio import save_image
        from bids_app.interfaces.postprocess import write_class_lut

        dseg = refined_segmentation(instances, lesions.labels, lesions.classes, refinement.keep)
        params = refinement_parameters(refinement)
        dseg_file = os.path.abspath("refined_dseg.nii.gz")
        save_image(dseg_file, dseg, affine)
        lut_file = write_class_lut(os.path.abspath("refined_dseg.tsv"), self.inputs.label_indices,
                                   self.inputs.label_names)
        mask_file = os.path.abspath("refined_mask.nii.gz")
        save_image(mask_file, (dseg > 0).astype(np.uint8), affine)
        derived = [{"key": "class_dseg"}, {"key": "saliency_store"}]
        return [
            {"key": "refined_dseg", "file": dseg_file, "sources": sources, "lookup_table": lut_file,
             "derived_from": derived, "metadata": {"Manual": False, **params}},
            {"key": "refined_lesion_mask", "file": mask_file, "sources": sources, "derived_from": derived,
             "metadata": {"Type": "Lesion", "Manual": False, **params}},
        ]
