"""Nipype interfaces around :mod:`bids_app.core.conform` (co-registration, brain mask)."""

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


class _ConformInputsInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, desc="input images, in the model's channel order")
    channel_names = traits.List(traits.Str, mandatory=True, desc="model channel name of each input")
    reference_index = traits.Int(0, usedefault=True, desc="index of the reference channel (its grid is used)")
    coregister = traits.Bool(True, usedefault=True, desc="rigidly register channels whose grid differs")


class _ConformInputsOutputSpec(TraitedSpec):
    channels_file = File(exists=True, desc="4D NIfTI (X, Y, Z, K) of all channels on the reference grid")
    reference_file = File(exists=True, desc="the reference input image")
    qc_file = File(exists=True, desc="JSON: per channel, how it was brought to the reference grid")
    derivatives = traits.List(traits.Dict, desc="derivative records (preprocessed channels, transforms)")


class ConformInputs(SimpleInterface):
    """Load and check every channel, then co-register and resample them onto the reference grid
    (:func:`bids_app.core.conform.register_rigid`, :func:`~bids_app.core.conform.resample_to`)."""

    input_spec = _ConformInputsInputSpec
    output_spec = _ConformInputsOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from bids_app.bids.derivatives import parse_bids_name
        from bids_app.core import conform
        from bids_app.core.imageio import load_image, save_image

        files = list(self.inputs.in_files)
        names = list(self.inputs.channel_names)
        ref_i = int(self.inputs.reference_index)
        images = [load_image(f) for f in files]
        reference = images[ref_i]
        ref_suffix = parse_bids_name(files[ref_i])[1]
        stack = np.empty(reference.shape + (len(images),), dtype=np.float32)
        qc: dict = {"reference": {"channel": names[ref_i], "file": os.path.basename(files[ref_i]),
                                  "shape": list(reference.shape), "zooms_mm": [round(z, 4) for z in reference.zooms]},
                    "channels": {}}
        records = []
        for i, (image, name, path) in enumerate(zip(images, names, files)):
            entry: dict = {"file": os.path.basename(path), "shape": list(image.shape),
                           "zooms_mm": [round(z, 4) for z in image.zooms]}
            suffix = parse_bids_name(path)[1]
            if i == ref_i:
                stack[..., i] = image.data
                entry["method"] = "reference"
                records.append({"key": "preproc", "file": path, "sources": [path], "source_suffix": suffix,
                                "metadata": {"SkullStripped": conform.skull_stripped_support(image)[0],
                                             "Description": f"{name} channel as the network saw it (reference grid)."}})
            else:
                if conform.same_grid(reference, image):
                    stack[..., i] = image.data
                    entry["method"] = "same grid as the reference; used as is"
                    transform = None
                else:
                    if self.inputs.coregister:
                        transform = conform.register_rigid(reference, image)
                    else:
                        conform.fov_overlap(reference, image)
                        transform = conform.identity_transform(reference)
                    stack[..., i] = conform.resample_to(reference, image, transform, "linear")
                    entry.update({
                        "method": "rigid registration (Mattes MI) + linear resampling" if not transform.identity
                        else "resampled through the headers (registration did not improve on them)",
                        "translation_mm": round(transform.translation_mm, 3),
                        "max_rotation_deg": round(transform.rotation_deg, 3),
                        "mattes_mi_before": transform.metric_before,
                        "mattes_mi_after": transform.metric_after,
                    })
                    quality = conform.registration_quality(reference, stack[..., i])
                    entry["gradient_correlation"] = round(quality, 4)
                    entry["poor_registration"] = bool(quality < 0.1)
                    xfm_path = os.path.abspath(f"xfm_{i}_{name}.txt")
                    self._write_transform(transform, xfm_path)
                    records.append({"key": "xfm", "file": xfm_path, "sources": [files[ref_i], path],
                                    "entities": {"from": ref_suffix, "to": suffix},
                                    "metadata": {"FromFile": os.path.basename(files[ref_i]),
                                                 "ToFile": os.path.basename(path),
                                                 "Method": entry["method"]}})
                resampled = os.path.abspath(f"preproc_{i}_{name}.nii.gz")
                save_image(resampled, stack[..., i], reference.affine)
                records.append({"key": "preproc", "file": resampled, "sources": [path], "source_suffix": suffix,
                                "entities": {"space": ref_suffix},
                                "metadata": {"SkullStripped": conform.skull_stripped_support(image)[0],
                                             "Description": f"{name} channel on the {ref_suffix} grid, "
                                                            "as the network saw it."}})
            qc["channels"][name] = entry
        flags = self._qc_flags(qc, images, names, stack)
        channels_file = os.path.abspath("channels.nii.gz")
        save_image(channels_file, stack, reference.affine)
        qc_file = os.path.abspath("conform_qc.json")
        with open(qc_file, "w") as handle:
            json.dump({"conform": qc, "qc_flags": flags}, handle, indent=2, sort_keys=True, default=float)
        self._results.update(channels_file=channels_file, reference_file=files[ref_i], qc_file=qc_file,
                             derivatives=records)
        return runtime

    @staticmethod
    def _qc_flags(qc: dict, images: list, names: list[str], stack) -> list[str]:
        """QC of the inputs (flags, never errors): sheared or implausible geometry, negative
        intensities, and a FLAIR channel without FLAIR contrast (a heuristic, see
        :func:`bids_app.core.conform.modality_contrast_qc`). Adds the measures to ``qc``."""
        from bids_app.core import conform

        flags: list[str] = []
        for image, name in zip(images, names):
            entry = qc["channels"][name]
            geometry = conform.geometry_qc(image)
            negative = conform.negative_values_qc(image.data)
            entry.update(geometry_qc=geometry, **negative)
            if geometry["sheared"]:
                flags.append(f"sheared_affine_{name}")
            if geometry["implausible_fov"]:
                flags.append(f"implausible_field_of_view_{name}")
            if negative["negative_voxels"]:
                flags.append(f"negative_values_{name}")
        low = [n.lower() for n in names]
        t1 = next((i for i, n in enumerate(low) if n.startswith(("t1", "unit1", "mp2rage"))), None)
        for k, n in enumerate(low):
            if "flair" in n and t1 is not None:
                check = conform.modality_contrast_qc(stack[..., t1], stack[..., k])
                qc["channels"][names[k]]["modality_contrast"] = check
                if check["looks_unlike_flair"]:
                    flags.append(f"modality_mismatch_{names[k]}")
        return flags

    @staticmethod
    def _write_transform(transform, path: str) -> None:
        import SimpleITK as sitk

        sitk.WriteTransform(transform.to_sitk(), path)


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    reference_file = File(exists=True, mandatory=True, desc="the reference image (its grid is the mask's)")
    skull_stripped = traits.Enum("auto", "yes", "no", usedefault=True,
                                 desc="--skull-stripped: auto detects skull-stripped input from the image")
    skull_strip = traits.Enum("auto", "learned", "template", "none", usedefault=True,
                              desc="--skull-strip: how an image with a skull gets its brain mask")
    template_t1w = File(exists=True, desc="template head T1w (MNI152NLin2009cAsym)")
    template_mask = File(exists=True, desc="template brain mask")
    device = traits.Str("cpu", usedefault=True, desc="torch device of the learned brain extraction")
    num_threads = traits.Int(1, usedefault=True, desc="CPU threads of the learned brain extraction")
    use_gpu = traits.Bool(False, usedefault=True, desc="GPU node for Nipype's MultiProc GPU queue")
    sources = traits.List(traits.Str, mandatory=True, desc="raw input files (for provenance)")


class _BrainMaskOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="brain mask on the reference grid")
    qc_file = File(exists=True, desc="JSON: how the mask was made")
    derivatives = traits.List(traits.Dict, desc="derivative records")


#: a brain mask outside this volume (litres) is implausible for a human brain (adults ~1.0-1.8 L)
PLAUSIBLE_BRAIN_LITRES = (0.6, 2.4)


class BrainMask(SimpleInterface):
    """Brain mask of the reference image: the support of skull-stripped input
    (:func:`bids_app.core.conform.support_mask`), a learned extraction
    (:func:`bids_app.core.brain_extraction.learned_brain_mask`), the MNI template's mask
    (:func:`~bids_app.core.conform.template_brain_mask`) or the whole field of view, as
    :func:`~bids_app.core.brain_extraction.choose_brain_mask_method` decides. In ``auto``, a
    learned mask of implausible volume falls back to the template's (recorded)."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from bids_app.bids.derivatives import parse_bids_name
        from bids_app.core import brain_extraction, conform
        from bids_app.core.imageio import load_image, save_image

        reference = load_image(self.inputs.reference_file)
        contrast = parse_bids_name(self.inputs.reference_file)[1]
        stripped, reason = conform.skull_stripped_support(reference)
        method, why = brain_extraction.choose_brain_mask_method(
            stripped_detected=stripped, skull_stripped=self.inputs.skull_stripped,
            skull_strip=self.inputs.skull_strip, contrast=contrast,
            learned_available=brain_extraction.tool_available())
        qc = {"skull_stripped_input": bool(stripped), "skull_strip_reason": reason,
              "skull_strip_option": self.inputs.skull_strip, "method_choice": why}
        metadata: dict = {"Type": "Brain", "SkullStrip": self.inputs.skull_strip}
        if method == "learned":
            mask, info = self._learned(reference, contrast)
            volume_l = info["brain_volume_litres"]
            lo, hi = PLAUSIBLE_BRAIN_LITRES
            if self.inputs.skull_strip == "auto" and not lo <= volume_l <= hi and self._has_template():
                qc["learned_rejected"] = (f"{info['tool']} gave {volume_l:.3f} L, outside the {lo}-{hi} L of a "
                                          "brain: template mask instead")
                method = "template"
            else:
                qc["learned"] = {k: v for k, v in info.items() if k != "method"}
                qc["method"] = info["method"]
                metadata |= {"SkullStripTool": info["tool"], "SkullStripToolVersion": info["tool_version"],
                             "SkullStripDevice": info["device"]}
        if method == "support":
            mask = conform.support_mask(reference)
            qc["method"] = "non-zero support of the skull-stripped input"
        elif method == "template":
            mask, metric = self._template(reference)
            qc["method"] = "MNI152NLin2009cAsym brain mask, affine registration (Mattes MI) to the reference image"
            qc["template_registration_mattes_mi"] = metric
        elif method == "none":
            mask = np.ones(reference.shape, dtype=bool)
            qc["method"] = "no brain extraction (--skull-strip none): the whole field of view"
        qc["method_used"] = method
        metadata |= {"Method": qc["method"], "SkullStripMethod": method}
        volume_l = float(mask.sum()) * float(np.prod(reference.zooms)) / 1e6
        qc["brain_volume_litres"] = round(volume_l, 4)
        lo, hi = PLAUSIBLE_BRAIN_LITRES
        qc["implausible_brain_volume"] = bool(not lo <= volume_l <= hi)
        mask_file = os.path.abspath("brain_mask.nii.gz")
        save_image(mask_file, mask.astype(np.uint8), reference.affine)
        qc_file = os.path.abspath("brainmask_qc.json")
        with open(qc_file, "w") as handle:
            json.dump({"brain_mask": qc}, handle, indent=2, sort_keys=True)
        self._results.update(
            mask_file=mask_file, qc_file=qc_file,
            derivatives=[{"key": "brain_mask", "file": mask_file, "sources": list(self.inputs.sources),
                          "metadata": metadata}],
        )
        return runtime

    def _has_template(self) -> bool:
        return bool(self.inputs.template_t1w and self.inputs.template_mask)

    def _template(self, reference):
        from bids_app.core import conform
        from bids_app.core.imageio import load_image
        from bids_app.errors import MissingInput

        if not self._has_template():
            raise MissingInput("A brain mask from the template is needed but no template was found.",
                               hint="set TEMPLATEFLOW_HOME to a folder holding tpl-MNI152NLin2009cAsym "
                                    "(msxplain-tools fetch-templates), use --skull-strip learned, "
                                    "or give skull-stripped images.")
        return conform.template_brain_mask(reference, load_image(self.inputs.template_t1w),
                                           load_image(self.inputs.template_mask, check_values=False))

    def _learned(self, reference, contrast: str):
        import torch

        from bids_app.core.brain_extraction import learned_brain_mask

        torch.set_num_threads(max(1, int(self.inputs.num_threads)))
        # an explicit --skull-strip learned runs on any contrast (recorded as outside its training);
        # auto only reaches here for the measured contrasts
        return learned_brain_mask(reference.data, reference.affine, device=self.inputs.device, contrast=contrast,
                                  allow_untrained_contrast=True)
