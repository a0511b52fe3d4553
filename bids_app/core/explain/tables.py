"""What the explanation and refinement nodes write, as values: the lesion selection, the
lesion-table fragments and their data dictionaries, the summary-map and store metadata, the
summary parts and the refined segmentation's parameters (``docs/explain.md``). Pure: the nodes
(:mod:`bids_app.interfaces.explain`) only load, call these and write."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from bids_app.core.explain.case import SaliencyStore
from bids_app.core.explain.refiner import Refinement
from bids_app.core.explain.summaries import lesion_summaries, summary_maps

#: lesion-table column suffix -> description (see :func:`~bids_app.core.explain.summaries.lesion_summaries`)
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
_SUMMARY_COLUMN = re.compile(r"^(smoothgrad_mean|smoothgrad_max|gradcampp|gradcam)(?:_(.+))?_(peak_in|peak_out|"
                             r"mean_in|rim_ratio|mass_in)$")


# ------------------------------------------------------------------------------------------
# the lesions of a session
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionLesions:
    """The lesions of the post-processing record (``label``, ``class_index``, ``n_voxels``).

    Attributes
    ----------
    labels, classes, n_voxels : ndarray of int (n,), in the record's (ascending label) order
    """

    labels: np.ndarray
    classes: np.ndarray
    n_voxels: np.ndarray

    @classmethod
    def from_record(cls, record: dict) -> SessionLesions:
        """From the post-processing JSON record (``n_voxels`` 1 each when absent)."""
        labels = np.asarray(record.get("label", []), int)
        classes = np.asarray(record.get("class_index", []), int)
        n_voxels = np.asarray(record.get("n_voxels", [1] * len(labels)), int)
        return cls(labels, classes, n_voxels)

    def largest(self, max_lesions: int) -> np.ndarray:
        """Labels of the ``max_lesions`` largest lesions (ties by label), ascending; all when
        ``max_lesions`` is 0 or not smaller than their number."""
        if max_lesions and len(self.labels) > max_lesions:
            order = np.lexsort((self.labels, -self.n_voxels))  # largest first, ties by label
            return np.sort(self.labels[order[:max_lesions]])
        return self.labels

    def class_of_label(self) -> np.ndarray:
        """int32 (max label,): class index of lesion ``i + 1`` (0 for a label without a lesion)."""
        out = np.zeros(int(self.labels.max()) if len(self.labels) else 0, np.int32)
        out[self.labels - 1] = self.classes
        return out


# ------------------------------------------------------------------------------------------
# explanations
# ------------------------------------------------------------------------------------------

def saliency_desc(map_name: str, channel: str | None) -> str:
    """BIDS ``desc`` of a summary map: letters and digits only (e.g. ``smoothgradmaxFLAIR``)."""
    return re.sub(r"[^A-Za-z0-9]", "", map_name + (channel or ""))


@dataclass
class SummaryMap:
    """One viewer map: ``desc`` entity, float32 volume (X, Y, Z) and its sidecar metadata."""

    desc: str
    volume: np.ndarray
    metadata: dict


@dataclass
class ExplanationOutputs:
    """What the explanation node writes besides the store.

    Attributes
    ----------
    store_metadata : dict, the store's sidecar
    maps : list of SummaryMap (empty without explained lesions)
    table : pandas.DataFrame, the lesion-table fragment (every lesion; unexplained rows n/a)
    dictionary : dict, its data dictionary
    summary : dict, the ``explanations`` summary part (``seconds_total`` left to the node)
    """

    store_metadata: dict
    maps: list = field(default_factory=list)
    table: object = None
    dictionary: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def store_metadata(store: SaliencyStore) -> dict:
    """Sidecar of the saliency store."""
    return {"Format": "msxplain saliency store (docs/explain.md)",
            "Lesions": [int(v) for v in store.labels],
            "Maps": {k: store.map_channels(k) for k in store.maps},
            "Explained": store.meta.get("explained"),
            "CAMs": store.meta.get("cams")}


def viewer_maps(store: SaliencyStore) -> list[SummaryMap]:
    """One :class:`SummaryMap` per map and channel of :func:`summary_maps` (none without lesions)."""
    out = []
    if not store.n_lesions:
        return out
    for name, volume in summary_maps(store).items():
        for c, ch in enumerate(store.map_channels(name)):
            desc = saliency_desc(name, None if ch == "cam" else ch)
            out.append(SummaryMap(desc=desc, volume=volume[c].astype(np.float32, copy=False), metadata={
                "Description": MAP_DESCRIPTIONS.get(name.split("@")[0], name).format(ch=ch)
                + "; each lesion's voxels hold its own map, elsewhere the value of "
                  "largest magnitude among the lesions whose crops cover the voxel, "
                  "0 where none does.",
                "Map": name, "Channel": ch,
                "ExplainedLesions": [int(v) for v in store.labels]}))
    return out


def explanation_table(store: SaliencyStore, labels: np.ndarray):
    """The lesion-table fragment of the explanations and its data dictionary.

    Parameters
    ----------
    store : SaliencyStore
    labels : ndarray of int (n,), every lesion of the instance map

    Returns
    -------
    table : pandas.DataFrame, ``label``, the saliency summaries (n/a for unexplained lesions),
        ``explained``
    dictionary : dict of column -> BIDS column description
    """
    import pandas as pd

    table = pd.DataFrame({"label": labels.astype(np.int64)})
    summaries = pd.DataFrame(lesion_summaries(store))
    table = table.merge(summaries, on="label", how="left") if len(summaries.columns) > 1 else table
    table["explained"] = np.isin(labels, store.labels).astype(int)
    dictionary = {"explained": {"Description": "1 when the lesion was explained (saliency columns filled).",
                                "Levels": {"1": "explained", "0": "not explained (--explain-max-lesions)"}}}
    for column in table.columns:
        m = _SUMMARY_COLUMN.match(column)
        if m:
            text, units = SUMMARY_DESCRIPTIONS[m.group(3)]
            what = MAP_DESCRIPTIONS[m.group(1)].format(ch=m.group(2) or "")
            dictionary[column] = {"Description": f"{text} Map: {what}.", "Units": units}
    return table, dictionary


def explanation_summary(store: SaliencyStore, labels: np.ndarray) -> dict:
    """The ``explanations`` summary part, without ``seconds_total`` (the node's wall time)."""
    return {
        "n_lesions": int(len(labels)), "n_explained": int(store.n_lesions),
        "not_explained_labels": [int(v) for v in np.setdiff1d(labels, store.labels)],
        "config": store.meta.get("config"), "explained": store.meta.get("explained"),
        "cams": store.meta.get("cams"), "device": store.meta.get("device"),
        "timings_s": store.meta.get("timings_s"),
    }


def explanation_outputs(store: SaliencyStore, labels: np.ndarray) -> ExplanationOutputs:
    """Everything the explanation node writes besides the store itself (see
    :class:`ExplanationOutputs`)."""
    table, dictionary = explanation_table(store, labels)
    return ExplanationOutputs(store_metadata=store_metadata(store), maps=viewer_maps(store), table=table,
                              dictionary=dictionary, summary=explanation_summary(store, labels))


# ------------------------------------------------------------------------------------------
# refinement
# ------------------------------------------------------------------------------------------

def refinement_table(refinement: Refinement):
    """The lesion-table fragment of the refinement (``label``, ``p_true_lesion``,
    ``refiner_scored``, ``refiner_unscored_reason``, ``refined_keep``) and its data dictionary."""
    import pandas as pd

    table = pd.DataFrame({"label": refinement.labels.astype(np.int64)})
    table["p_true_lesion"] = refinement.p_true_lesion
    table["refiner_scored"] = refinement.scored.astype(int)
    table["refiner_unscored_reason"] = pd.Series(refinement.reasons, dtype=object)
    table["refined_keep"] = refinement.keep.astype(int)
    dictionary = {
        "p_true_lesion": {
            "Description": "Probability that the lesion is a true lesion, from the saliency-radiomics "
                           "classifier (93 PyRadiomics features of the lesion's SmoothGrad map, L1 logistic "
                           "regression); n/a when the lesion was not explained or its features failed "
                           "(refiner_scored = 0).", "Units": "1"},
        "refiner_scored": {
            "Description": "1 when p_true_lesion was computed from the lesion's own saliency features; 0 when "
                           "the lesion was not explained or its feature extraction failed (it is then kept).",
            "Levels": {"1": "scored", "0": "not scored, kept"}},
        "refiner_unscored_reason": {
            "Description": "Why the refiner did not score the lesion (n/a when it did)."},
        "refined_keep": {
            "Description": f"1 when the refinement keeps the lesion (p_true_lesion >= {refinement.threshold:g}, or "
                           "not scored: not explained or its features failed), 0 when it drops it.",
            "Levels": {"1": "kept", "0": "dropped"}},
    }
    return table, dictionary


def refinement_summary(refinement: Refinement, refiner_name: str, model: dict, segmentation_written: bool) -> dict:
    """The refinement summary part: ``{"refinement": ...}`` and, when features failed,
    ``qc_flags`` ``["refiner_features_failed"]``."""
    failed = refinement.failed_labels
    keep = refinement.keep
    part = {"refinement": {"refiner": refiner_name,
                           "refiner_explain_config": model.get("explain_config"),
                           "threshold": refinement.threshold, "n_dropped": int((~keep).sum()),
                           "dropped_labels": [int(v) for v in refinement.labels[~keep]],
                           "n_unscored": int((~refinement.scored).sum()),
                           "n_features_failed": len(failed),
                           "features_failed_labels": failed,
                           "segmentation_written": bool(segmentation_written)}}
    if failed:
        part["qc_flags"] = ["refiner_features_failed"]
    return part


def refinement_parameters(refinement: Refinement) -> dict:
    """Sidecar parameters of the refined segmentation and mask."""
    return {"RefinementThreshold": refinement.threshold, "RefinementRule": "keep p_true_lesion >= threshold",
            "DroppedLabels": [int(v) for v in refinement.labels[~refinement.keep]]}
