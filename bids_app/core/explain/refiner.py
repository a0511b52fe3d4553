"""Radiomics of saliency maps and the TP/FP lesion classifier built on them (arXiv:2409.03772).

For every lesion, the 93 PyRadiomics features of the paper (``docs/explain.md``) are computed on its
SmoothGrad map (max aggregation, FLAIR channel or the first channel) inside the lesion plus a
2-voxel shell:

* **ROI**: the instance map dilated with a 5x5x5 maximum filter (2 voxels in every
  direction, Chebyshev), the original labels restored inside lesions, ``label == l``; where
  shells of two lesions meet, the larger label wins (as in RadiomXAI);
* **image**: the lesion's map z-normalised over the **whole image** as PyRadiomics
  ``normalizeImage`` (``sitk.Normalize``: mean and the n-1 standard deviation of every voxel;
  scale 1, no outlier removal). The store keeps crops, so the map is taken as 0 outside its
  crop and the whole-image mean and deviation are computed exactly from the crop's sums;
* **extractor**: image type Original, bin width 10, classes firstorder (18), glcm (24),
  glrlm (16), glszm (16), gldm (14), ngtdm (5); shape disabled; run on the crop (never on the
  whole volume).

The classifier is a logistic regression (L1, liblinear, C = 1, class weights
``{FP: 0.29, TP: 0.71}`` as in the paper, or balanced) on standardised features (scaler fitted
on the training lesions only). It is kept as a plain JSON-able dict (coefficients, scaler
mean/scale, feature names, threshold): no pickle. Missing features are imputed with the
training mean; a lesion whose extraction failed altogether (all features missing) is not
scored (:func:`scorable`) and never dropped by :func:`refine`. :func:`refine_lesions` scores every
lesion of a session and applies the refinement rule (:func:`refinement_threshold`, :func:`refine`).

Pure: numpy, SimpleITK and PyRadiomics in memory; no file I/O; inputs never modified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FEATURE_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
N_FEATURES = 93
#: PyRadiomics settings of RadiomXAI (``sigma`` is set there but has no effect without LoG)
RADIOMICS_SETTINGS = {"binWidth": 10, "normalize": False, "imageType": "Original",
                      "featureClasses": list(FEATURE_CLASSES), "shape": False,
                      "whole_image_normalisation": "z-score over the whole grid, n-1 deviation (sitk.Normalize)",
                      "roi": "5x5x5 maximum filter of the instance map, labels restored inside lesions"}
REFINER_FORMAT = "msxplain-saliency-refiner"
REFINER_VERSION = 1
#: class weights of the paper ({FP: 0.29, TP: 0.71})
SPEC_CLASS_WEIGHT = {0: 0.29, 1: 0.71}

_EXTRACTOR = None


def _extractor():
    global _EXTRACTOR
    if _EXTRACTOR is None:
        import radiomics
        from radiomics import featureextractor

        radiomics.setVerbosity(logging.ERROR)
        logging.getLogger("radiomics").setLevel(logging.ERROR)
        ex = featureextractor.RadiomicsFeatureExtractor(binWidth=10, normalize=False, additionalInfo=False)
        ex.disableAllFeatures()
        ex.disableAllImageTypes()
        ex.enableImageTypeByName("Original")
        for c in FEATURE_CLASSES:
            ex.enableFeatureClassByName(c)
        _EXTRACTOR = ex
    return _EXTRACTOR


def feature_names() -> list[str]:
    """The 93 feature names (``original_<class>_<feature>``) in extraction order."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    img = rng.normal(size=(8, 8, 8))
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    res = _extractor().execute(sitk.GetImageFromArray(img), sitk.GetImageFromArray(mask), label=1)
    names = [k for k in res if not k.startswith("diagnostics")]
    if len(names) != N_FEATURES:  # pragma: no cover - a different PyRadiomics
        raise RuntimeError(f"PyRadiomics gives {len(names)} features, expected {N_FEATURES}")
    return names


def roi_label_map(instances: np.ndarray, width: int = 2) -> np.ndarray:
    """Instance map dilated by ``width`` voxels (cube), original labels restored inside lesions.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)

    Returns
    -------
    ndarray of int32, same shape (outside the array counts as background)
    """
    inst = np.asarray(instances)
    dil = ndimage.maximum_filter(inst, size=2 * width + 1, mode="constant", cval=0)
    return np.where(inst > 0, inst, dil).astype(np.int32)


def whole_image_zscore(crop: np.ndarray, n_voxels: int) -> tuple[float, float]:
    """Mean and n-1 standard deviation of a map that is ``crop`` inside a grid of ``n_voxels``
    voxels and 0 elsewhere (``sitk.Normalize`` statistics of the whole image)."""
    x = np.asarray(crop, np.float64)
    n = float(n_voxels)
    s1 = x.sum()
    s2 = np.square(x).sum()
    mean = s1 / n
    var = max((s2 - n * mean * mean) / (n - 1.0), 0.0) if n > 1 else 0.0
    return mean, math.sqrt(var)


def lesion_features(image: np.ndarray, roi: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The 93 features of one ROI.

    Parameters
    ----------
    image : ndarray of float, shape (X, Y, Z), already normalised
    roi : ndarray of bool, same shape
    spacing : 3 floats, mm along X, Y, Z

    Returns
    -------
    ndarray of float64 (93,); NaN when the ROI is empty or PyRadiomics refuses it
    (:func:`lesion_features_or_reason` says why).
    """
    return lesion_features_or_reason(image, roi, spacing)[0]


def lesion_features_or_reason(image: np.ndarray, roi: np.ndarray,
                              spacing: Sequence[float]) -> tuple[np.ndarray, str | None]:
    """The 93 features of one ROI, and why they could not be computed.

    Parameters
    ----------
    image : ndarray of float, shape (X, Y, Z), already normalised
    roi : ndarray of bool, same shape
    spacing : 3 floats, mm along X, Y, Z

    Returns
    -------
    features : ndarray of float64 (93,)
        All NaN when the extraction failed.
    reason : str or None
        None on success, else what failed (empty ROI, the PyRadiomics error, a feature count).
    """
    import SimpleITK as sitk

    roi = np.asarray(roi, bool)
    if roi.sum() < 1:
        return np.full(N_FEATURES, np.nan), "empty ROI"
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(image, np.float64).transpose(2, 1, 0)))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(roi.astype(np.uint8).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    msk.SetSpacing(tuple(float(s) for s in spacing))
    try:
        res = _extractor().execute(img, msk, label=1)
    except (ValueError, RuntimeError, IndexError) as exc:
        return np.full(N_FEATURES, np.nan), f"PyRadiomics {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    vals = [float(v) for k, v in res.items() if not k.startswith("diagnostics")]
    if len(vals) != N_FEATURES:
        return np.full(N_FEATURES, np.nan), f"PyRadiomics gave {len(vals)} features, expected {N_FEATURES}"
    return np.asarray(vals, np.float64), None


def select_channel(channel_names: Sequence[str], channel: str | int | None = None) -> int:
    """Index of the explained channel: ``channel`` (name or index), else FLAIR, else 0."""
    names = [str(c) for c in channel_names]
    if isinstance(channel, (int, np.integer)):
        if not 0 <= int(channel) < len(names):
            raise ValueError(f"channel {channel} out of range for {names}")
        return int(channel)
    if channel is not None:
        low = [n.lower() for n in names]
        if str(channel).lower() not in low:
            raise ValueError(f"channel {channel!r} not among {names}")
        return low.index(str(channel).lower())
    for i, n in enumerate(names):
        if "flair" in n.lower():
            return i
    return 0


def saliency_features(store, map_name: str = "smoothgrad_max", channel: str | int | None = None,
                      progress=None, failures: dict[int, str] | None = None) -> tuple[np.ndarray, list[str]]:
    """The 93 features of every lesion of a :class:`~bids_app.core.explain.SaliencyStore`.

    Parameters
    ----------
    store : SaliencyStore
    map_name : str
        Map used (default the max-aggregated SmoothGrad, as in the paper).
    channel : name, index or None
        Channel of the map (default: FLAIR if present, else the first).
    progress : callable or None, ``progress(done, total)``
    failures : dict, optional
        Filled with ``store index -> reason`` for every lesion whose extraction failed (its row
        is all NaN): callers must not score such a lesion as if it had features.

    Returns
    -------
    features : ndarray of float64, shape (L, 93)
    names : list of 93 str
    """
    names = feature_names()
    L = store.n_lesions
    out = np.full((L, N_FEATURES), np.nan)
    if L == 0:
        return out, names
    if map_name not in store.maps:
        raise ValueError(f"map {map_name!r} not in the store (has {sorted(store.maps)})")
    c = select_channel(store.map_channels(map_name), channel)
    n_vox = int(np.prod(store.shape))
    for i in range(L):
        crop = store.maps[map_name][i][c]
        mean, sd = whole_image_zscore(crop, n_vox)
        norm = (crop.astype(np.float64) - mean) / sd if sd > 0 else np.zeros(crop.shape)
        roi = roi_label_map(store.instances[i]) == store.labels[i]
        out[i], reason = lesion_features_or_reason(norm, roi, store.zooms)
        if reason is not None and failures is not None:
            failures[i] = reason
        if progress is not None:
            progress(i + 1, L)
    return out, names


# ------------------------------------------------------------------------------------------
# truth and the refiner
# ------------------------------------------------------------------------------------------

def store_truth(store, reference: np.ndarray) -> np.ndarray:
    """TP (True) / FP (False) per lesion: the lesion overlaps the reference at all
    (IES ``non_zero`` rule).

    Parameters
    ----------
    store : SaliencyStore
    reference : ndarray, shape (X, Y, Z), lesion where > 0

    Returns
    -------
    ndarray of bool (L,)
    """
    ref = np.asarray(reference)
    if ref.shape != tuple(store.shape):
        raise ValueError(f"reference shape {ref.shape} != store grid {tuple(store.shape)}")
    out = np.zeros(store.n_lesions, bool)
    for i in range(store.n_lesions):
        sub = ref[store.slices(i)]
        out[i] = bool(np.any(sub[store.instances[i] == store.labels[i]] > 0))
    return out


def fit_refiner(features: np.ndarray, is_tp: np.ndarray, names: Sequence[str], class_weight="spec",
                C: float = 1.0, threshold: float = 0.5, extra: dict | None = None) -> dict:
    """Fit the TP/FP logistic regression; returns the model as a JSON-able dict.

    Parameters
    ----------
    features : ndarray (n, F)
    is_tp : ndarray of bool (n,)
    names : F feature names
    class_weight : 'spec' ({FP: 0.29, TP: 0.71}), 'balanced' or a dict {0: w, 1: w}
    C : float, inverse L1 strength (liblinear)
    threshold : float, lesions with ``p_true_lesion < threshold`` are rejected by :func:`refine`
    extra : dict merged into the model (provenance)

    Raises
    ------
    ValueError
        Fewer than 2 lesions of either class, or shapes that disagree.
    """
    import sklearn
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, np.float64)
    y = np.asarray(is_tp, bool).astype(int)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[1] != len(names):
        raise ValueError(f"features {X.shape}, labels {y.shape} and {len(names)} names disagree")
    n_tp, n_fp = int(y.sum()), int((1 - y).sum())
    if n_tp < 2 or n_fp < 2:
        raise ValueError(f"need at least 2 TP and 2 FP lesions, got {n_tp} TP and {n_fp} FP")
    col_mean = np.nanmean(np.where(np.isfinite(X), X, np.nan), axis=0)
    col_mean = np.where(np.isfinite(col_mean), col_mean, 0.0)
    X = np.where(np.isfinite(X), X, col_mean)
    scaler = StandardScaler().fit(X)
    if class_weight == "spec":
        cw = dict(SPEC_CLASS_WEIGHT)
    elif class_weight == "balanced":
        cw = "balanced"
    elif isinstance(class_weight, dict):
        cw = {int(k): float(v) for k, v in class_weight.items()}
    else:
        raise ValueError(f"class_weight must be 'spec', 'balanced' or a dict, got {class_weight!r}")
    clf = _logistic_l1(C, cw)
    clf.fit(scaler.transform(X), y)
    coef = clf.coef_[0].astype(float)
    mx = float(np.abs(coef).max())
    model = {
        "format": REFINER_FORMAT,
        "version": REFINER_VERSION,
        "feature_names": [str(n) for n in names],
        "scaler_mean": scaler.mean_.astype(float).tolist(),
        "scaler_scale": scaler.scale_.astype(float).tolist(),
        "coef": coef.tolist(),
        "intercept": float(clf.intercept_[0]),
        "importance": (coef / mx).tolist() if mx > 0 else [0.0] * len(coef),
        "threshold": float(threshold),
        "classifier": {"type": "LogisticRegression", "penalty": "l1", "solver": "liblinear", "C": float(C),
                       "max_iter": 10000, "random_state": 0,
                       "class_weight": {"FP": cw[0], "TP": cw[1]} if isinstance(cw, dict) else cw},
        "imputation": "missing features are replaced by the training mean",
        "n_train": {"TP": n_tp, "FP": n_fp},
        "truth_rule": "TP = the predicted lesion overlaps the reference at all (IES non_zero); FP otherwise",
        "radiomics": dict(RADIOMICS_SETTINGS),
        "sklearn_version": sklearn.__version__,
    }
    model.update(extra or {})
    return model


def _logistic_l1(C: float, class_weight):
    """``LogisticRegression(penalty='l1', solver='liblinear', ...)`` in the spelling of the
    installed scikit-learn (1.8 deprecated ``penalty`` in favour of ``l1_ratio``)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    kwargs = dict(solver="liblinear", C=float(C), max_iter=10000, class_weight=class_weight, random_state=0)
    if (major, minor) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, **kwargs)
    return LogisticRegression(penalty="l1", **kwargs)


def check_refiner(model: dict) -> dict:
    """Validate a refiner dict (from JSON); raises ValueError with what is wrong."""
    if not isinstance(model, dict) or model.get("format") != REFINER_FORMAT:
        raise ValueError("not an msxplain saliency refiner")
    if int(model.get("version", 0)) > REFINER_VERSION:
        raise ValueError(f"refiner version {model.get('version')} is newer than this msxplain reads")
    n = len(model["feature_names"])
    for key in ("scaler_mean", "scaler_scale", "coef"):
        if len(model[key]) != n:
            raise ValueError(f"refiner field {key} has {len(model[key])} values for {n} features")
    return model


def predict_refiner(model: dict, features: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """``p_true_lesion`` per lesion.

    Parameters
    ----------
    model : dict from :func:`fit_refiner`
    features : ndarray (n, F)
    names : feature names of the columns (checked against the model's when given)

    Returns
    -------
    ndarray of float64 (n,) in [0, 1]
    """
    check_refiner(model)
    X = np.asarray(features, np.float64)
    if X.ndim == 1:
        X = X[None]
    if names is not None and list(names) != list(model["feature_names"]):
        raise ValueError("feature names differ from the refiner's")
    mean = np.asarray(model["scaler_mean"], float)
    scale = np.asarray(model["scaler_scale"], float)
    if X.shape[1] != mean.size:
        raise ValueError(f"{X.shape[1]} features given, the refiner has {mean.size}")
    Z = (np.where(np.isfinite(X), X, mean) - mean) / scale
    logit = Z @ np.asarray(model["coef"], float) + float(model["intercept"])
    return 1.0 / (1.0 + np.exp(-logit))


def scorable(model: dict, features: np.ndarray) -> np.ndarray:
    """Lesions the refiner can score from their own features (bool (n,)).

    A lesion whose every feature with a non-zero coefficient is missing would be scored from
    the imputed training means alone, i.e. the sigmoid of the intercept, the same value for
    every such lesion: that is not a score, and :func:`refine` must not drop it on that basis.

    Parameters
    ----------
    model : dict from :func:`fit_refiner`
    features : ndarray (n, F)
    """
    X = np.asarray(features, np.float64)
    if X.ndim == 1:
        X = X[None]
    used = np.asarray(model["coef"], float) != 0
    if not used.any():
        used = np.ones(X.shape[1], bool)
    return np.isfinite(X[:, used]).any(axis=1)


def refinement_threshold(model: dict, requested: float | None = None) -> float:
    """The refinement threshold: ``requested`` when given and >= 0, else the refiner's own
    (``model['threshold']``)."""
    if requested is not None and requested >= 0:
        return requested
    return float(model["threshold"])


def refine(p_true_lesion: np.ndarray, threshold: float) -> np.ndarray:
    """Lesions kept by the refinement: ``p_true_lesion >= threshold``, and every lesion without a
    score (NaN: not explained, or its features failed), which is never dropped (bool (n,))."""
    p = np.asarray(p_true_lesion, float)
    return np.isnan(p) | (p >= float(threshold))


#: why a lesion that was not explained has no score
NOT_EXPLAINED = "not explained (--explain-max-lesions)"


@dataclass
class Refinement:
    """The refinement of one session's lesions.

    Attributes
    ----------
    labels : ndarray of int (n,), every lesion of the instance map, ascending
    p_true_lesion : ndarray of float64 (n,), NaN for a lesion without a score
    reasons : list of n (str or None), why a lesion has no score (None when it has one)
    threshold : float, the threshold applied (:func:`refinement_threshold`)
    keep : ndarray of bool (n,), :func:`refine`
    """

    labels: np.ndarray
    p_true_lesion: np.ndarray
    reasons: list
    threshold: float
    keep: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.p_true_lesion)

    @property
    def failed_labels(self) -> list[int]:
        """Explained lesions whose saliency features failed (or gave no usable feature)."""
        return [int(v) for v, r in zip(self.labels, self.reasons) if r is not None and r != NOT_EXPLAINED]


def refine_lesions(model: dict, store, labels: np.ndarray, threshold: float | None = None) -> Refinement:
    """Score every lesion of a session and apply the refinement rule.

    Parameters
    ----------
    model : dict, a checked refiner (:func:`check_refiner`); its ``map`` and ``channel`` choose the
        saliency map (default the max-aggregated SmoothGrad, FLAIR or the first channel)
    store : SaliencyStore of the explained lesions
    labels : ndarray of int (n,), every lesion label of the instance map, ascending (a superset of
        ``store.labels``)
    threshold : float or None, the requested threshold (None or < 0: the refiner's own)

    Returns
    -------
    Refinement
        A lesion that was not explained, whose features failed, or that :func:`scorable` rejects
        (it would score the intercept's sigmoid) has no score and is kept.
    """
    labels = np.asarray(labels)
    p = np.full(len(labels), np.nan)
    reasons: list[str | None] = [NOT_EXPLAINED] * len(labels)
    if store.n_lesions:
        failures: dict[int, str] = {}
        features, feature_names = saliency_features(store, model.get("map", "smoothgrad_max"), model.get("channel"),
                                                    failures=failures)
        p_store = predict_refiner(model, features, feature_names)
        scored = scorable(model, features)
        rows = np.searchsorted(labels, store.labels)
        for i, row in enumerate(rows):
            if scored[i] and i not in failures:
                p[row] = p_store[i]
                reasons[row] = None
            else:
                reasons[row] = failures.get(i, "no usable saliency feature")
    chosen = refinement_threshold(model, threshold)
    return Refinement(labels=labels, p_true_lesion=p, reasons=reasons, threshold=chosen, keep=refine(p, chosen))


def refined_segmentation(instances: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                         keep: np.ndarray) -> np.ndarray:
    """The class segmentation without the dropped lesions.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z), the instance map
    labels, classes : ndarray of int (n,), every lesion label and its class index
    keep : ndarray of bool (n,)

    Returns
    -------
    ndarray of int16, shape (X, Y, Z), the class index of every kept lesion's voxels, 0 elsewhere
    """
    lut = np.zeros(int(instances.max()) + 1, np.int16)
    lut[labels[keep]] = classes[keep]
    return lut[instances]
