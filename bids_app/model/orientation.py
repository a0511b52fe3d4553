"""The voxel order the network sees (card key ``input_orientation``, ``--input-orientation``).

nnU-Net reads a NIfTI with the reader the model was trained with; ``SimpleITKIO`` and
``NibabelIO`` keep the file's stored axis order, ``NibabelIOWithReorient`` reorients to RAS+.
msxplain shows the network what ``nnUNetv2_predict`` would (docs/model-card.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bids_app.errors import BadInputData, UsageError

if TYPE_CHECKING:
    from bids_app.model.card import ModelCard

#: card ``input_orientation``: the voxel order the network sees. ``native``: the file's stored
#: axis order (nnU-Net's SimpleITKIO and NibabelIO); ``ras``: reoriented to RAS+ (NibabelIOWithReorient)
INPUT_ORIENTATIONS = ("native", "ras")
#: nnU-Net's NIfTI readers -> the orientation their arrays have (Tiff3DIO and NaturalImage2DIO
#: read no NIfTI: a model trained with them needs the card's or the user's choice)
READER_ORIENTATIONS = {"SimpleITKIO": "native", "NibabelIO": "native", "NibabelIOWithReorient": "ras"}
#: the reader nnU-Net's planner picks for ``.nii.gz`` when neither plans.json nor dataset.json names one
DEFAULT_NIFTI_READER = "SimpleITKIO"


def model_reader(plans: Any, dataset: Any) -> tuple[str, str]:
    """The image reader nnU-Net uses for this model and where it is named: ``image_reader_writer``
    of ``plans.json`` (what ``nnUNetv2_predict`` reads with), else ``overwrite_image_reader_writer``
    of ``dataset.json``, else :data:`DEFAULT_NIFTI_READER` (nnU-Net's choice for ``.nii.gz``).

    Returns
    -------
    (reader, where) : (str, str)
        e.g. ``("SimpleITKIO", "plans.json image_reader_writer")``.
    """
    for name, obj, key in (("plans.json", plans, "image_reader_writer"),
                           ("dataset.json", dataset, "overwrite_image_reader_writer")):
        reader = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(reader, str) and reader and reader != "None":
            return reader, f"{name} {key}"
    return DEFAULT_NIFTI_READER, "nnU-Net's default reader for .nii.gz"


def input_orientation_rule(card: ModelCard, plans: Any, dataset: Any, override: str = "auto",
                           source: str = "plans.json") -> tuple[str, str]:
    """The voxel order the network sees: ``native`` (the reference image's stored axis order)
    or ``ras`` (RAS+), and why.

    The user's ``override`` (``--input-orientation native|ras``) wins, then the card's
    ``input_orientation``, then the reader the model was trained with
    (:func:`model_reader`, :data:`READER_ORIENTATIONS`), so that a model without the field sees
    what ``nnUNetv2_predict`` shows it.

    Returns
    -------
    (orientation, reason) : (str, str)
        e.g. ``("native", "plans.json image_reader_writer SimpleITKIO")``.

    Raises
    ------
    UsageError
        ``override`` is not auto, native or ras.
    BadInputData
        Neither the user nor the card says, and the model's reader reads no NIfTI (Tiff3DIO,
        NaturalImage2DIO): exit 65 with the two ways out.
    """
    if override not in ("auto",) + INPUT_ORIENTATIONS:
        raise UsageError(f"--input-orientation {override!r} is not auto, native or ras.")
    if override != "auto":
        return override, "--input-orientation"
    if card.input_orientation is not None:
        return card.input_orientation, "model card input_orientation"
    reader, where = model_reader(plans, dataset)
    if reader not in READER_ORIENTATIONS:
        raise BadInputData(
            f"The model was trained with nnU-Net's {reader} reader, which reads no NIfTI, so msxplain cannot tell "
            "in which voxel order its network expects the image.", path=source,
            hint='set "input_orientation": "native" or "ras" in the model card (docs/model-card.md), '
                 "or pass --input-orientation native|ras.")
    return READER_ORIENTATIONS[reader], f"{where} {reader}"
