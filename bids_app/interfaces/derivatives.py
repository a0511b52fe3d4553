"""Nipype interfaces that write derivatives (:mod:`bids_app.bids.derivatives`)."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _SessionSummaryInputSpec(BaseInterfaceInputSpec):
    parts = traits.List(File(exists=True), mandatory=True, desc="JSON files whose top-level keys are merged")
    participant_id = traits.Str(mandatory=True, desc="sub-<label>")
    session_id = traits.Str("", usedefault=True, desc="ses-<label> or empty")
    inputs = traits.List(traits.Dict, mandatory=True, desc="selected inputs: channel, file, reason")
    sources = traits.List(traits.Str, mandatory=True, desc="raw input files")
    provenance = traits.Dict(mandatory=True, desc="model, parameters, software versions")


class _SessionSummaryOutputSpec(TraitedSpec):
    summary_file = File(exists=True, desc="the session summary JSON")
    derivatives = traits.List(traits.Dict, desc="derivative record of the summary")


class SessionSummary(SimpleInterface):
    """Merge the per-node JSON parts into one session summary (MRIQC's IQM-file pattern:
    values + ``bids_meta`` + ``provenance``), read by the group level."""

    input_spec = _SessionSummaryInputSpec
    output_spec = _SessionSummaryOutputSpec

    #: keys that vary run to run and therefore stay out of derivatives (they go to the logs)
    VOLATILE_KEYS = ("seconds_loading", "seconds_inference", "timing")

    def _run_interface(self, runtime):
        from bids_app.bids.derivatives import dumps_json

        summary: dict = {"participant_id": self.inputs.participant_id}
        if self.inputs.session_id:
            summary["session_id"] = self.inputs.session_id
        part_flags: list[str] = []
        for part in self.inputs.parts:
            with open(part) as handle:
                data = json.load(handle)
            for key, value in data.items():
                if key == "qc_flags":  # several parts flag things: gather, never overwrite
                    part_flags += [str(v) for v in value]
                    continue
                if isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k not in self.VOLATILE_KEYS}
                summary[key] = value
        summary["bids_meta"] = {"inputs": list(self.inputs.inputs)}
        summary["provenance"] = dict(self.inputs.provenance)
        qc = summary.setdefault("qc_flags", [])
        qc += part_flags
        if summary.get("lesions", {}).get("empty_prediction"):
            qc.append("empty_prediction")
        if summary.get("brain_mask", {}).get("implausible_brain_volume"):
            qc.append("implausible_brain_volume")
        for name, entry in summary.get("conform", {}).get("channels", {}).items():
            if entry.get("poor_registration"):
                qc.append(f"poor_registration_{name}")
        out = os.path.abspath("summary.json")
        with open(out, "w") as handle:
            handle.write(dumps_json(summary))
        self._results.update(summary_file=out, derivatives=[
            {"key": "summary", "file": out, "sources": list(self.inputs.sources)}])
        return runtime


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    records = traits.List(traits.Dict, mandatory=True, desc="derivative records (see bids_app.bids.derivatives)")
    output_dir = Directory(mandatory=True, desc="derivatives dataset root")
    bids_dir = Directory(exists=True, mandatory=True, desc="input BIDS dataset root")
    common_metadata = traits.Dict(desc="sidecar fields shared by every file (provenance)")
    spatial_reference = traits.Str(desc="raw image whose grid every output image is on")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="written derivative files")


class DerivativesSink(SimpleInterface):
    """Write one session's derivatives, all or nothing (:func:`bids_app.bids.commit.commit_records`)."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        from bids_app.bids.commit import commit_records

        written = commit_records(
            list(self.inputs.records), Path(self.inputs.output_dir), Path(self.inputs.bids_dir),
            dict(self.inputs.common_metadata or {}), self.inputs.spatial_reference or None,
        )
        self._results["out_files"] = [str(p) for p in written]
        return runtime
