"""Nipype interface around :func:`bids_app.core.lesions.features.lesion_features` (+ location, meshes)."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _LesionFeaturesInputSpec(BaseInterfaceInputSpec):
    instances_file = File(exists=True, mandatory=True, desc="lesion instance map")
    channels_file = File(exists=True, mandatory=True, desc="4D NIfTI (X, Y, Z, K) of the conformed channels")
    channel_names = traits.List(traits.Str, mandatory=True, desc="channel names (intensity column prefixes)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    reference_file = File(exists=True, mandatory=True,
                          desc="raw reference image (registration to the template; its BIDS suffix names the "
                               "from- entity of the transform)")
    template_t1w = File(exists=True, mandatory=True, desc="template T1w (MNI152NLin2009cAsym)")
    template_mask = File(exists=True, mandatory=True, desc="template brain mask")
    template_gm = File(exists=True, mandatory=True, desc="template GM probability")
    template_wm = File(exists=True, desc="template WM probability (NAWM reference)")
    atlas_file = File(exists=True, desc="dseg atlas on the template grid (location classes), from configuration")
    atlas_lut = File(exists=True, desc="atlas lookup table: index, name, location_class")
    skull_stripped_input = traits.Bool(True, usedefault=True,
                                       desc="the model card's: register brain to brain (else head to head)")
    export_meshes = traits.Bool(False, usedefault=True, desc="write one STL surface mesh per lesion")
    sources = traits.List(traits.Str, mandatory=True, desc="raw inputs (provenance)")


#: what is known of the one atlas msxplain looks for by itself (``--atlas auto``): a file named like
#: TemplateFlow's, which TemplateFlow does not distribute
HOPARC_PROVENANCE = {
    "Description": "Parcellation on the MNI152NLin2009cAsym grid derived by niworkflows 0.0.5 from the FSL "
                   "Harvard-Oxford cortical and subcortical atlases (cortical labels 101-196, subcortical "
                   "structures, lateral ventricles, brain stem, cerebellum). Not a TemplateFlow file.",
    "License": "FSL licence (Harvard-Oxford atlases); see https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence",
}
#: lesion-table columns that come from the atlas (their data dictionary names it)
ATLAS_COLUMNS = ("atlas_label", "atlas_name", "atlas_label_fraction", "atlas_class", "atlas_class_fraction",
                 "location_class", "distance_to_ventricle_mm")


def atlas_provenance(atlas_file: str) -> dict[str, str]:
    """Where the configured atlas comes from, as truthfully as msxplain knows it.

    Parameters
    ----------
    atlas_file : str
        The dseg atlas (``--atlas``, or the ``desc-HOparc`` dseg found by ``--atlas auto``).

    Returns
    -------
    dict
        ``File`` (its name) and ``Description``/``License`` taken, in this order, from a JSON
        sidecar beside the atlas, the known ``desc-HOparc`` parcellation, or "configured by the
        user" when nothing is known.
    """
    import json
    from pathlib import Path

    path = Path(atlas_file)
    info = {"File": path.name}
    sidecar = path.with_name(path.name.replace("".join(path.suffixes), ".json"))
    meta: dict = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            meta = {}
    if isinstance(meta, dict) and meta.get("Description"):
        info["Description"] = str(meta["Description"])
        if meta.get("License"):
            info["License"] = str(meta["License"])
    elif "_desc-HOparc_" in path.name:
        info.update(HOPARC_PROVENANCE)
    else:
        info["Description"] = "Atlas given with --atlas (its origin and licence are the user's)."
    return info


class _LesionFeaturesOutputSpec(TraitedSpec):
    lesions_file = File(exists=True, desc="lesion-table fragment: features")
    lesions_dictionary = File(exists=True, desc="its data dictionary")
    summary_file = File(exists=True, desc="JSON part: registration and location summary")
    derivatives = traits.List(traits.Dict, desc="derivative records (transform, meshes)")


class LesionFeatures(SimpleInterface):
    """Shape, intensity, cortical involvement, distances and MNI location of every lesion
    (:func:`bids_app.core.registration.register_to_template`,
    :func:`bids_app.core.lesions.features.lesion_features`,
    :func:`bids_app.core.lesions.meshes.lesion_meshes`)."""

    input_spec = _LesionFeaturesInputSpec
    output_spec = _LesionFeaturesOutputSpec

    def _run_interface(self, runtime):
        import logging

        import nibabel as nib
        import numpy as np
        import pandas as pd

        from bids_app.bids.derivatives import dumps_json, parse_bids_name
        from bids_app.core.imageio import load_image
        from bids_app.core.lesions.dictionary import feature_dictionary
        from bids_app.core.lesions.features import FeatureOptions, lesion_features
        from bids_app.core.registration import (
            register_to_template,
            warp_labels_to_subject,
            warp_probability_to_subject,
        )
        from bids_app.formats.lesion_table import write_fragment

        inst_img = nib.load(self.inputs.instances_file)
        instances = np.asarray(inst_img.dataobj).astype(np.int32)
        affine = inst_img.affine
        n = int(instances.max())
        stack = np.asarray(nib.load(self.inputs.channels_file).dataobj, dtype=np.float32)
        channels = {name: stack[..., k] for k, name in enumerate(self.inputs.channel_names)}
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        reference = load_image(self.inputs.reference_file)
        template = load_image(self.inputs.template_t1w)
        template_mask = load_image(self.inputs.template_mask, check_values=False)
        if self.inputs.skull_stripped_input:
            transform = register_to_template(reference, template, reference_mask=mask,
                                             template_mask=np.asarray(template_mask.data) > 0)
        else:
            transform = register_to_template(reference, template)
        gm = load_image(self.inputs.template_gm, check_values=False)
        gm_prob = warp_probability_to_subject(gm.data, gm.affine, instances.shape, affine, transform)
        wm_prob = None
        if self.inputs.template_wm:
            wm = load_image(self.inputs.template_wm, check_values=False)
            wm_prob = warp_probability_to_subject(wm.data, wm.affine, instances.shape, affine, transform)
        atlas_labels = lut = None
        if self.inputs.atlas_file:
            atlas = load_image(self.inputs.atlas_file, dtype=None, check_values=False)
            atlas_labels = warp_labels_to_subject(np.asarray(atlas.data).astype(np.int32), atlas.affine,
                                                  instances.shape, affine, transform)
            lut = pd.read_csv(self.inputs.atlas_lut, sep="\t", dtype=str)
        options = FeatureOptions()
        table = lesion_features(instances, n, affine, channels, mask, gm_prob, atlas_labels, lut, options,
                                wm_prob=wm_prob, template_transform=transform)
        dictionary = feature_dictionary(table.columns, list(channels), options.rules)
        atlas_info = atlas_provenance(self.inputs.atlas_file) if self.inputs.atlas_file else None
        if atlas_info:
            for column in ATLAS_COLUMNS:
                if column in dictionary:
                    dictionary[column] = dict(dictionary[column], Atlas=atlas_info["File"])
        tsv, js = write_fragment(table, dictionary, os.path.abspath("lesions_features"))

        records = []
        xfm = os.path.abspath("to_template_xfm.txt")
        import SimpleITK as sitk

        sitk.WriteTransform(transform.to_sitk(), xfm)
        # naming rule: the reference image's own BIDS suffix (e.g. UNIT1, T1w) names its space in
        # every from-/space- entity of the session, as in ConformInputs' from-<ref>_to-<channel>
        reference_suffix = parse_bids_name(self.inputs.reference_file)[1]
        records.append({"key": "template_xfm", "file": xfm, "sources": list(self.inputs.sources),
                        "entities": {"from": reference_suffix, "to": transform.template},
                        "metadata": {"FromFile": os.path.basename(self.inputs.reference_file),
                                     "Method": "affine (similarity then affine), Mattes MI, SimpleITK",
                                     "Direction": "maps points of the subject's reference image to the template "
                                                  "(ITK convention, LPS)",
                                     "MattesMI": transform.metric}})
        if self.inputs.export_meshes and n:
            from bids_app.core.lesions.meshes import lesion_meshes, stl_bytes

            for label, mesh in enumerate(lesion_meshes(instances, n, affine), start=1):
                if mesh is None:
                    continue
                path = os.path.abspath(f"lesion{label:04d}.stl")
                with open(path, "wb") as handle:
                    handle.write(stl_bytes(mesh, name=f"lesion {label}", space="RAS"))
                records.append({"key": "mesh", "file": path, "sources": list(self.inputs.sources),
                                "entities": {"desc": f"lesion{label:04d}"},
                                "derived_from": [{"key": "instance_dseg"}],
                                "metadata": {"Label": label, "CoordinateSystem": "scanner RAS+", "Units": "mm",
                                             "Method": "marching cubes on the lesion mask (skimage)"}})
        failed = table.loc[table["features_failed"] == 1, "label"].astype(int).tolist() \
            if "features_failed" in table.columns else []
        if failed:
            # kept in the table with n/a features and a reason; said here so it is never silent
            logging.getLogger("bids_app.features").warning(
                "%s: features failed for %d of %d lesions (labels %s); they are kept, flagged in the lesion "
                "table's features_failed column.", os.path.basename(self.inputs.sources[0]) if self.inputs.sources
                else "session", len(failed), n, ", ".join(str(v) for v in failed[:20]))
        summary = {"features": {
            "n_features_failed": len(failed),
            "features_failed_labels": failed,
            "template_registration_mattes_mi": transform.metric,
            "atlas": atlas_info,
            "location_counts": (table["location_class"].fillna("unknown").value_counts().to_dict()
                                if "location_class" in table.columns and len(table) else {}),
            "cortical_type_counts": (table["cortical_type"].fillna("unknown").value_counts().to_dict()
                                     if "cortical_type" in table.columns and len(table) else {}),
        }}
        if failed:
            summary["qc_flags"] = ["lesion_features_failed"]
        summary_file = os.path.abspath("features_summary.json")
        with open(summary_file, "w") as handle:
            handle.write(dumps_json(summary))
        self._results.update(lesions_file=str(tsv), lesions_dictionary=str(js), summary_file=summary_file,
                             derivatives=records)
        return runtime
