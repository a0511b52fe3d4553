"""Nipype interface around :func:`bids_app.core.explain.explain_case` and the saliency refiner
(:mod:`bids_app.core.saliency_radiomics`)."""

from __future__ import annotations

import json
import logging
import os
import re
import time

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

#: lesion-table column suffix -> description (see core.explain.lesion_summaries)
SUMMARY_DESCRIPTIONS = {
    "peak_in": ("Signed saliency value of largest magnitude inside the lesion.", "a.u."),
    "peak_out": ("Signed saliency value of largest magnitude in the lesion's crop outside the lesion.", "a.u."),
    "mean_in": ("Mean signed saliency inside the lesion.", "a.u."),
    "rim_ratio": ("Mean |saliency| in the 2-voxel shell around the lesion / mean |saliency| inside it.", "1"),
    "mass_in": ("Fraction of the crop's |saliency| mass inside the lesion.", "1"),
}
MAP_DESCRIPTIONS = {
    "smoothgrad_mean": "SmoothGrad, mean aggregation: gradient of the lesion's summed logit w.r.t. channel {ch}, "
                       "averaged over noisy copies (signed, unnormalised)",
    "smoothgrad_max": "SmoothGrad, max aggregation over the lesion's voxel groups, channel {ch} (signed, "
                      "unnormalised)",
    "gradcam": "Grad-CAM (channel-pooled weights) of the lesion, min-max normalised (max 1)",
    "gradcampp": "Grad-CAM++ (element-wise weights) of the lesion, min-max normalised (max 1)",
}


def saliency_desc(map_name: str, channel: str | None) -> str:
    """BIDS ``desc`` of a summary map: letters and digits only (e.g. ``smoothgradmaxFLAIR``)."""
    return re.sub(r"[^A-Za-z0-9]", "", map_name + (channel or ""))


class _ExplainLesionsInputSpec(BaseInterfaceInputSpec):
    channels_file = File(exists=True, mandatory=True, desc="4D NIfTI (X, Y, Z, K) of the conformed channels")
    channel_names = traits.List(traits.Str, mandatory=True, desc="channel names (store and column names)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    instances_file = File(exists=True, mandatory=True, desc="lesion instance map (desc-instances dseg)")
    lesions_file = File(exists=True, mandatory=True, desc="postprocess JSON: label, class_index, n_voxels")
    model_dir = Directory(exists=True, mandatory=True, desc="nnU-Net trained-model folder")
    card_file = File(desc="model card JSON")
    folds = traits.List(traits.Str, mandatory=True, desc="ensemble members (explained as their mean)")
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
        import pandas as pd

        from bids_app.app.progress import ProgressLine
        from bids_app.bids.derivatives import dumps_json
        from bids_app.core.explain import ExplainConfig, explain_case, lesion_summaries, reorient_store, summary_maps
        from bids_app.core.imageio import save_image
        from bids_app.formats.lesion_table import write_fragment
        from bids_app.formats.saliency_store import save_store
        from bids_app.interfaces.segment import network_channels, node_model
        from bids_app.model.ensemble import load_ensemble
        from bids_app.model.resolve import resolve_input_orientation

        start = time.perf_counter()
        names = list(self.inputs.channel_names)
        ensemble = load_ensemble(node_model(self.inputs.model_dir, self.inputs.card_file), list(self.inputs.folds),
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
            geometry = json.load(handle)
        labels_all = np.asarray(geometry.get("label", []), int)
        classes = np.asarray(geometry.get("class_index", []), int)
        n_voxels = np.asarray(geometry.get("n_voxels", [1] * len(labels_all)), int)
        selected = labels_all
        if self.inputs.max_lesions and len(labels_all) > self.inputs.max_lesions:
            order = np.lexsort((labels_all, -n_voxels))  # largest first, ties by label
            selected = np.sort(labels_all[order[: self.inputs.max_lesions]])
        config = ExplainConfig(**self.inputs.explain_config)
        class_of_label = np.zeros(int(labels_all.max()) if len(labels_all) else 0, np.int32)
        class_of_label[labels_all - 1] = classes
        line = ProgressLine(self.inputs.progress_label or "session", "explain")
        n_explained = len(selected)

        def progress(done, total):
            # the engine counts (lesion, noise sample) items, lesion by lesion within a batch group: the
            # lesion number shown is therefore approximate
            fraction = done / max(total, 1)
            current = min(n_explained, int(fraction * n_explained) + 1)
            line.update(fraction, f"lesion {current} of {n_explained}")

        try:
            store = explain_case(predictor, stack, zooms, canonical_instances, class_of_label, config,
                                 channel_names=names, labels=[int(v) for v in selected], progress=progress)
        finally:
            line.close()
        store = reorient_store(store, nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt))
        del predictor
        sources = list(self.inputs.sources)
        records = []
        store_file = save_store(os.path.abspath("saliency.npz"), store, affine=affine)
        records.append({"key": "saliency_store", "file": str(store_file), "sources": sources,
                        "derived_from": [{"key": "instance_dseg"}],
                        "metadata": {"Format": "msxplain saliency store (docs/explain.md)",
                                     "Lesions": [int(v) for v in store.labels],
                                     "Maps": {k: store.map_channels(k) for k in store.maps},
                                     "Explained": store.meta.get("explained"),
                                     "CAMs": store.meta.get("cams")}})
        if store.n_lesions:
            for name, volume in summary_maps(store).items():
                chans = store.map_channels(name)
                for c, ch in enumerate(chans):
                    desc = saliency_desc(name, None if ch == "cam" else ch)
                    path = os.path.abspath(f"saliency_{desc}.nii.gz")
                    save_image(path, volume[c].astype(np.float32), affine)
                    records.append({"key": "saliency", "file": path, "sources": sources,
                                    "entities": {"desc": desc}, "derived_from": [{"key": "saliency_store"}],
                                    "metadata": {
                                        "Description": MAP_DESCRIPTIONS.get(name.split("@")[0], name).format(ch=ch)
                                        + "; each lesion's voxels hold its own map, elsewhere the value of "
                                          "largest magnitude among the lesions whose crops cover the voxel, "
                                          "0 where none does.",
                                        "Map": name, "Channel": ch,
                                        "ExplainedLesions": [int(v) for v in store.labels]}})

        # lesion-table fragment: every lesion of the instance map (unexplained rows are n/a)
        cols = lesion_summaries(store)
        table = pd.DataFrame({"label": labels_all.astype(np.int64)})
        summaries = pd.DataFrame(cols)
        table = table.merge(summaries, on="label", how="left") if len(summaries.columns) > 1 else table
        table["explained"] = np.isin(labels_all, store.labels).astype(int)
        dictionary = {"explained": {"Description": "1 when the lesion was explained (saliency columns filled).",
                                    "Levels": {"1": "explained", "0": "not explained (--explain-max-lesions)"}}}
        for column in table.columns:
            m = re.match(r"^(smoothgrad_mean|smoothgrad_max|gradcampp|gradcam)(?:_(.+))?_(peak_in|peak_out|"
                         r"mean_in|rim_ratio|mass_in)$", column)
            if m:
                text, units = SUMMARY_DESCRIPTIONS[m.group(3)]
                what = MAP_DESCRIPTIONS[m.group(1)].format(ch=m.group(2) or "")
                dictionary[column] = {"Description": f"{text} Map: {what}.", "Units": units}
        tsv, js = write_fragment(table, dictionary, os.path.abspath("lesions_saliency"))
        summary = {"explanations": {
            "n_lesions": int(len(labels_all)), "n_explained": int(store.n_lesions),
            "not_explained_labels": [int(v) for v in np.setdiff1d(labels_all, store.labels)],
            "config": store.meta.get("config"), "explained": store.meta.get("explained"),
            "cams": store.meta.get("cams"), "device": store.meta.get("device"),
            "timings_s": store.meta.get("timings_s"), "seconds_total": round(time.perf_counter() - start, 3),
        }}
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
    refine_threshold = traits.Float(-1.0, usedefault=True, desc="refinement threshold (< 0: the refiner's own)")
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
    (:func:`bids_app.core.saliency_radiomics.saliency_features`, ``predict_refiner``) and, with
    ``refine``, the segmentation without the lesions under the threshold. A node of its own, so
    that changing the refiner or its threshold does not recompute the saliency maps."""

    input_spec = _RefineLesionsInputSpec
    output_spec = _RefineLesionsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import pandas as pd

        from bids_app.bids.derivatives import dumps_json
        from bids_app.core.explain import refiner as R
        from bids_app.formats.lesion_table import write_fragment
        from bids_app.formats.saliency_store import load_store

        store = load_store(self.inputs.store_file)
        inst_img = nib.load(self.inputs.instances_file)
        instances = np.asarray(inst_img.dataobj).astype(np.int32)
        with open(self.inputs.lesions_file) as handle:
            geometry = json.load(handle)
        labels_all = np.asarray(geometry.get("label", []), int)
        classes = np.asarray(geometry.get("class_index", []), int)
        table = pd.DataFrame({"label": labels_all.astype(np.int64)})
        dictionary = {}
        sources = list(self.inputs.sources)
        records = []
        affine = inst_img.affine
        with open(self.inputs.refiner_file) as handle:
            refiner = R.check_refiner(json.load(handle))
        p = np.full(len(labels_all), np.nan)
        reasons: list[str | None] = ["not explained (--explain-max-lesions)"] * len(labels_all)
        if store.n_lesions:
            failures: dict[int, str] = {}
            features, feature_names = R.saliency_features(store, refiner.get("map", "smoothgrad_max"),
                                                          refiner.get("channel"), failures=failures)
            p_store = R.predict_refiner(refiner, features, feature_names)
            # a lesion without features would score the intercept's sigmoid: no score, never dropped
            scored = R.scorable(refiner, features)
            rows = np.searchsorted(labels_all, store.labels)
            for i, row in enumerate(rows):
                if scored[i] and i not in failures:
                    p[row] = p_store[i]
                    reasons[row] = None
                else:
                    reasons[row] = failures.get(i, "no usable saliency feature")
        unscored = np.isnan(p)
        table["p_true_lesion"] = p
        table["refiner_scored"] = (~unscored).astype(int)
        table["refiner_unscored_reason"] = pd.Series(reasons, dtype=object)
        threshold = (self.inputs.refine_threshold if self.inputs.refine_threshold >= 0
                     else float(refiner["threshold"]))
        keep = R.refine(p, threshold)  # unscored lesions (NaN) are kept
        table["refined_keep"] = keep.astype(int)
        failed_labels = [int(v) for v, r in zip(labels_all, reasons)
                         if r is not None and not r.startswith("not explained")]
        if failed_labels:
            logging.getLogger("bids_app.refine").warning(
                "%s: the refiner could not score %d of %d lesions (labels %s: saliency features failed); they are "
                "kept (refined_keep = 1, refiner_scored = 0).", os.path.basename(self.inputs.sources[0])
                if self.inputs.sources else "session", len(failed_labels), len(labels_all),
                ", ".join(str(v) for v in failed_labels[:20]))
        dictionary["p_true_lesion"] = {
            "Description": "Probability that the lesion is a true lesion, from the saliency-radiomics "
                           "classifier (93 PyRadiomics features of the lesion's SmoothGrad map, L1 logistic "
                           "regression); n/a when the lesion was not explained or its features failed "
                           "(refiner_scored = 0).", "Units": "1"}
        dictionary["refiner_scored"] = {
            "Description": "1 when p_true_lesion was computed from the lesion's own saliency features; 0 when "
                           "the lesion was not explained or its feature extraction failed (it is then kept).",
            "Levels": {"1": "scored", "0": "not scored, kept"}}
        dictionary["refiner_unscored_reason"] = {
            "Description": "Why the refiner did not score the lesion (n/a when it did)."}
        dictionary["refined_keep"] = {
            "Description": f"1 when the refinement keeps the lesion (p_true_lesion >= {threshold:g}, or not "
                           "scored: not explained or its features failed), 0 when it drops it.",
            "Levels": {"1": "kept", "0": "dropped"}}
        refine_info = {"refiner": os.path.basename(self.inputs.refiner_file),
                       "refiner_explain_config": refiner.get("explain_config"),
                       "threshold": threshold, "n_dropped": int((~keep).sum()),
                       "dropped_labels": [int(v) for v in labels_all[~keep]],
                       "n_unscored": int(unscored.sum()),
                       "n_features_failed": len(failed_labels),
                       "features_failed_labels": failed_labels,
                       "segmentation_written": bool(self.inputs.refine)}
        if self.inputs.refine:
            records += self._refined_records(instances, labels_all, classes, keep, affine, threshold, sources)
        tsv, js = write_fragment(table, dictionary, os.path.abspath("lesions_refiner"))
        summary_file = os.path.abspath("refine_summary.json")
        part = {"refinement": refine_info}
        if failed_labels:
            part["qc_flags"] = ["refiner_features_failed"]
        with open(summary_file, "w") as handle:
            handle.write(dumps_json(part))
        self._results.update(lesions_file=str(tsv), lesions_dictionary=str(js), summary_file=summary_file,
                             derivatives=records)
        return runtime

    def _refined_records(self, instances, labels, classes, keep, affine, threshold, sources):
        """The refined class dseg and union mask: the dropped lesions removed."""
        import numpy as np

        from bids_app.core.imageio import save_image
        from bids_app.interfaces.postprocess import write_class_lut

        lut = np.zeros(int(instances.max()) + 1, np.int16)
        lut[labels[keep]] = classes[keep]
        dseg = lut[instances]
        params = {"RefinementThreshold": threshold, "RefinementRule": "keep p_true_lesion >= threshold",
                  "DroppedLabels": [int(v) for v in labels[~keep]]}
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
