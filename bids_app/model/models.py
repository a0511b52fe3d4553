"""Models: resolving ``--model``, model cards, checksums, safe archives and checkpoints.

A *model* is an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``,
``fold_*/checkpoint_*.pth``), as written by ``nnUNetv2_train`` or found inside an
``nnUNetv2_export_model_to_zip`` archive, plus an msxplain **model card**
(``msxplain_model.json``) that says what the model needs and means:

* which BIDS images feed each input channel (pybids queries, in order of preference);
* what its labels are (e.g. ``WML``, ``CL``) and the default threshold, minimum lesion size,
  connectivity and reference lesion load for nDSC;
* the SHA-256 of every member checkpoint, checked **before** anything is unpickled, and of
  ``plans.json`` and ``dataset.json`` (``files``), checked before they are parsed.

Model files are untrusted input (a model zip from the internet can carry code): archives are
extracted with path-traversal, link and size checks, and checkpoints are read with
``torch.load(weights_only=True)`` and an allow-list of the two numpy globals that nnU-Net
checkpoints contain (their optimizer and logging state). Every class name in ``plans.json`` and
``dataset.json`` that nnU-Net would resolve must be in the exact allow-lists of
:mod:`bids_app.model.safety` (:func:`check_consistency`, and again where the network is built,
:func:`bids_app.core.segment.build_network`). The card itself is validated field by field:
every problem is exit 65 with the field's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app import DATA_DIR
from bids_app.errors import BadInputData, MissingInput, UsageError
from bids_app.model.safety import is_int, is_number

LOGGER = logging.getLogger("bids_app.model.models")

CARD_NAME = "msxplain_model.json"
CARD_VERSION = 1
#: where bundled models live inside the package
BUNDLED_MODELS_DIR = DATA_DIR / "models"
#: extra model folders (e.g. baked into a container at build time), ``os.pathsep``-separated
MODELS_PATH_ENV = "MSXPLAIN_MODELS"
#: archive limits: refuse zip bombs and absurd archives
MAX_ARCHIVE_UNCOMPRESSED_BYTES = 8 * 1024**3
MAX_ARCHIVE_MEMBERS = 20000
MAX_COMPRESSION_RATIO = 200
#: the model files the card pins besides the checkpoints (card key ``files``)
MODEL_FILES = ("plans.json", "dataset.json")
#: plans.json / dataset.json / cards are a few kB; refuse to read absurd ones into memory
MAX_MODEL_JSON_BYTES = 16 * 1024**2
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: a label name becomes the ``label-`` entity of the outputs: BIDS labels are alphanumeric
_BIDS_LABEL = re.compile(r"[A-Za-z0-9]+")
#: a member name becomes the folder ``fold_<name>``: no separators, no ``..``
_FOLD = re.compile(r"[A-Za-z0-9_-]+")
#: card ``input_orientation``: the voxel order the network sees. ``native``: the file's stored
#: axis order (nnU-Net's SimpleITKIO and NibabelIO); ``ras``: reoriented to RAS+ (NibabelIOWithReorient)
INPUT_ORIENTATIONS = ("native", "ras")
#: nnU-Net's NIfTI readers -> the orientation their arrays have (Tiff3DIO and NaturalImage2DIO
#: read no NIfTI: a model trained with them needs the card's or the user's choice)
READER_ORIENTATIONS = {"SimpleITKIO": "native", "NibabelIO": "native", "NibabelIOWithReorient": "ras"}
#: the reader nnU-Net's planner picks for ``.nii.gz`` when neither plans.json nor dataset.json names one
DEFAULT_NIFTI_READER = "SimpleITKIO"

#: nnU-Net channel names -> BIDS queries (used only when a model has no card)
_CHANNEL_QUERY_GUESSES: dict[str, list[dict[str, Any]]] = {
    "t1w": [{"suffix": "UNIT1"}, {"suffix": "T1w"}],
    "t1": [{"suffix": "UNIT1"}, {"suffix": "T1w"}],
    "mprage": [{"suffix": "T1w"}],
    "mp2rage": [{"suffix": "UNIT1"}],
    "unit1": [{"suffix": "UNIT1"}],
    "uni": [{"suffix": "UNIT1"}],
    "flair": [{"suffix": "FLAIR"}],
    "t2w": [{"suffix": "T2w"}],
    "t2": [{"suffix": "T2w"}],
    "pdw": [{"suffix": "PDw"}],
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Channel:
    """One network input channel and how to find it in a BIDS dataset."""

    index: int
    name: str
    queries: tuple[dict[str, Any], ...]
    required: bool = True


@dataclass(frozen=True)
class LesionLabel:
    """One lesion class of the model (its index in the network output)."""

    index: int
    name: str
    long_name: str = ""


@dataclass(frozen=True)
class ModelCard:
    """The parsed ``msxplain_model.json``.

    ``members`` maps a member (fold) name to the SHA-256 of its checkpoint; the member
    names are nnU-Net fold folder suffixes (``fold_<name>``). ``files`` maps the model's
    other files (``plans.json``, ``dataset.json``) to their SHA-256; it is empty for a card
    written before msxplain pinned them.
    """

    id: str
    name: str
    version: str
    description: str
    channels: tuple[Channel, ...]
    labels: tuple[LesionLabel, ...]
    members: dict[str, str]
    configuration: str = "3d_fullres"
    checkpoint: str = "checkpoint_final.pth"
    reference_channel: int = 0
    skull_stripped_input: bool = True
    #: None: follow the reader named in plans.json (:func:`input_orientation_rule`)
    input_orientation: str | None = None
    threshold: float = 0.5
    member_thresholds: dict[str, float] | None = None
    min_lesion_size: int = 4
    connectivity: int = 18
    reference_lesion_load: float = 0.001
    demo: bool = False
    inferred: bool = False
    files: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def lesion_indices(self) -> list[int]:
        return [label.index for label in self.labels]

    def label_name(self, index: int) -> str:
        for label in self.labels:
            if label.index == index:
                return label.name
        raise KeyError(index)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "model card") -> ModelCard:
        """Validate and parse a card; every problem is a :class:`BadInputData` naming the field.

        The schema is documented in ``docs/model-card.md``; keys not named there (``training``,
        ``performance``...) are free-form and only shown in reports.
        """
        return _parse_card(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelCard:
        path = Path(path)
        data = read_json_file(path, "Model card", missing_hint="check --model-card.")
        if not isinstance(data, dict):
            raise BadInputData("Model card must be a JSON object.", path=str(path), hint="see docs/model-card.md.")
        return cls.from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------
# Card schema
# --------------------------------------------------------------------------------------
def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _card_error(source: str, field_name: str, problem: str, hint: str = "see docs/model-card.md.") -> BadInputData:
    return BadInputData(f"Model card field '{field_name}' {problem}.", path=source, hint=hint)


def _plain_relative_file(value: Any) -> bool:
    """A file name relative to the model folder that cannot leave it."""
    if not isinstance(value, str) or not value or "\\" in value or value.startswith("/"):
        return False
    return ".." not in Path(value).parts


def _parse_card(data: dict[str, Any], source: str) -> ModelCard:
    """:meth:`ModelCard.from_dict`: every field checked, with its dotted name in the message."""
    if not isinstance(data, dict):
        raise BadInputData("Model card must be a JSON object.", path=source, hint="see docs/model-card.md.")

    def need(key: str, kind: type | tuple[type, ...]):
        if key not in data:
            raise BadInputData(f"Model card lacks the key '{key}'.", path=source,
                               hint=f"add '{key}' (see docs/model-card.md).")
        value = data[key]
        if not isinstance(value, kind):
            raise BadInputData(f"Model card key '{key}' has the wrong type ({type(value).__name__}).",
                               path=source, hint="see docs/model-card.md.")
        return value

    def optional(obj: dict, key: str, where: str, check, expected: str, default):
        if key not in obj or (obj[key] is None and default is None):
            return default
        value = obj[key]
        if not check(value):
            raise _card_error(source, where, f"is {json.dumps(value)[:60]}; expected {expected}")
        return value

    def section(key: str) -> dict:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _card_error(source, key, f"is a {type(value).__name__}; expected an object")
        return value

    version = data.get("card_version", CARD_VERSION)
    if version != CARD_VERSION or not is_int(version):
        raise BadInputData(f"Unsupported model card version {version!r} (expected {CARD_VERSION}).", path=source,
                           hint="upgrade msxplain or rewrite the card.")
    card_id = need("id", str)
    if not card_id.strip():
        raise _card_error(source, "id", "is empty")
    name = optional(data, "name", "name", lambda v: isinstance(v, str), "a string", card_id)
    card_version_label = optional(data, "version", "version", lambda v: isinstance(v, str) or is_int(v),
                                  "a string", "0")
    description = optional(data, "description", "description", lambda v: isinstance(v, str), "a string", "")
    flags = {key: optional(data, key, key, lambda v: isinstance(v, bool), "true or false", default)
             for key, default in (("demo", False), ("inferred", False), ("skull_stripped_input", True))}

    # --- channels
    channels = []
    raw_channels = need("channels", list)
    if not raw_channels:
        raise _card_error(source, "channels", "is empty; expected at least one input channel")
    for i, ch in enumerate(raw_channels):
        where = f"channels[{i}]"
        if not isinstance(ch, dict) or "name" not in ch or "queries" not in ch:
            raise BadInputData(f"Model card channel {i} needs 'name' and 'queries'.", path=source,
                               hint="see docs/model-card.md.")
        if not isinstance(ch["name"], str) or not ch["name"].strip():
            raise _card_error(source, f"{where}.name", "is not a non-empty string")
        queries = ch["queries"]
        if not isinstance(queries, list) or not queries or not all(isinstance(q, dict) for q in queries):
            raise BadInputData(f"Model card channel '{ch['name']}' needs a non-empty list of queries.",
                               path=source, hint="see docs/model-card.md.")
        for j, query in enumerate(queries):
            for entity, value in query.items():
                scalar = (str, int, float, bool, type(None))
                if not (isinstance(value, scalar) or isinstance(value, list) and all(isinstance(v, scalar)
                                                                                     for v in value)):
                    raise _card_error(source, f"{where}.queries[{j}].{entity}",
                                      "is not a BIDS entity value (a string, a number, null or a list of them)")
        index = optional(ch, "index", f"{where}.index", is_int, "an integer", i)
        required = optional(ch, "required", f"{where}.required", lambda v: isinstance(v, bool), "true or false",
                            True)
        channels.append(Channel(index=index, name=ch["name"], queries=tuple(dict(q) for q in queries),
                                required=required))
    if sorted(c.index for c in channels) != list(range(len(channels))):
        raise BadInputData("Model card channel indices must be 0..K-1.", path=source, hint="fix 'channels'.")
    names = [c.name.lower() for c in channels]
    if len(set(names)) != len(names):
        raise _card_error(source, "channels", "names a channel twice", "give every channel its own name.")
    reference_channel = optional(data, "reference_channel", "reference_channel",
                                 lambda v: is_int(v) and 0 <= v < len(channels),
                                 f"a channel index 0..{len(channels) - 1}", 0)
    input_orientation = optional(data, "input_orientation", "input_orientation",
                                 lambda v: v in INPUT_ORIENTATIONS, '"native" or "ras"', None)

    # --- labels
    labels = []
    raw_labels = need("labels", dict)
    if not raw_labels:
        raise _card_error(source, "labels", "is empty; expected at least one lesion label")
    for key, value in raw_labels.items():
        if not str(key).isdigit() or int(key) == 0:
            raise BadInputData(f"Model card label key {key!r} must be a positive output index.", path=source,
                               hint='use e.g. {"1": {"name": "WML"}}.')
        value = {"name": value} if isinstance(value, str) else value  # "1": "WML" is short for {"name": "WML"}
        if not isinstance(value, dict):
            raise _card_error(source, f"labels.{key}", f"is a {type(value).__name__}; expected an object",
                              'use e.g. {"1": {"name": "WML"}}.')
        if "name" not in value:
            raise _card_error(source, f"labels.{key}.name", "is missing", 'use e.g. {"1": {"name": "WML"}}.')
        if not isinstance(value["name"], str) or not _BIDS_LABEL.fullmatch(value["name"]):
            raise _card_error(source, f"labels.{key}.name", f"is {json.dumps(value['name'])[:60]}; expected "
                              "letters and digits only (it becomes the label- entity of the output files)")
        long_name = optional(value, "long_name", f"labels.{key}.long_name", lambda v: isinstance(v, str),
                             "a string", "")
        labels.append(LesionLabel(index=int(key), name=value["name"], long_name=long_name))
    labels.sort(key=lambda lab: lab.index)
    if len({lab.name for lab in labels}) != len(labels):
        raise _card_error(source, "labels", "gives two labels the same name", "give every label its own name.")

    # --- members
    member_sha: dict[str, str] = {}
    for i, m in enumerate(need("members", list)):
        if not isinstance(m, dict) or "fold" not in m:
            raise BadInputData("Each model card member needs a 'fold'.", path=source, hint="see docs/model-card.md.")
        fold = m["fold"]
        if not (isinstance(fold, str) or is_int(fold)) or not _FOLD.fullmatch(str(fold)):
            raise _card_error(source, f"members[{i}].fold", f"is {json.dumps(fold)[:60]}; expected a fold name "
                              "such as \"0\" or \"all\" (letters, digits, _ and -)")
        if str(fold) in member_sha:
            raise _card_error(source, f"members[{i}].fold", f"repeats fold {fold}")
        sha = optional(m, "sha256", f"members[{i}].sha256", lambda v: isinstance(v, str), "a SHA-256 hex string", "")
        member_sha[str(fold)] = sha.lower()
    if not member_sha:
        raise BadInputData("Model card lists no members.", path=source, hint="list the folds under 'members'.")

    # --- nnunet, postprocessing, files, refiner
    nnunet = section("nnunet")
    configuration = optional(nnunet, "configuration", "nnunet.configuration", lambda v: isinstance(v, str) and v,
                             "a configuration name such as \"3d_fullres\"", "3d_fullres")
    checkpoint = optional(nnunet, "checkpoint", "nnunet.checkpoint",
                          lambda v: _plain_relative_file(v) and "/" not in v, "a file name such as "
                          "\"checkpoint_final.pth\"", "checkpoint_final.pth")
    for key in ("trainer", "plans"):
        optional(nnunet, key, f"nnunet.{key}", lambda v: isinstance(v, str), "a string", None)
    post = section("postprocessing")
    threshold = optional(post, "threshold", "postprocessing.threshold", lambda v: is_number(v) and 0 < v < 1,
                         "a number between 0 and 1", 0.5)
    min_lesion_size = optional(post, "min_lesion_size", "postprocessing.min_lesion_size",
                               lambda v: is_int(v) and v >= 0, "a whole number of voxels >= 0", 4)
    connectivity = post.get("connectivity", 18)
    if not is_int(connectivity) or connectivity not in (6, 18, 26):
        raise BadInputData(f"Model card field 'postprocessing.connectivity' is {json.dumps(connectivity)[:60]}, "
                           "not 6, 18 or 26.", path=source, hint="fix postprocessing.connectivity.")
    member_thresholds = optional(post, "member_thresholds", "postprocessing.member_thresholds",
                                 lambda v: isinstance(v, dict), "an object {fold: threshold}", None)
    if member_thresholds:
        for fold, value in member_thresholds.items():
            if fold not in member_sha:
                raise _card_error(source, f"postprocessing.member_thresholds.{fold}", "names a fold that is not a "
                                  "member")
            if not is_number(value) or not 0 < value < 1:
                raise _card_error(source, f"postprocessing.member_thresholds.{fold}",
                                  f"is {json.dumps(value)[:60]}; expected a number between 0 and 1")
    reference_lesion_load = optional(data, "reference_lesion_load", "reference_lesion_load",
                                     lambda v: is_number(v) and 0 < v < 1, "a fraction between 0 and 1", 0.001)
    files = section("files")
    for key, value in files.items():
        if key not in MODEL_FILES:
            raise _card_error(source, f"files.{key}", f"is not a model file msxplain pins ({', '.join(MODEL_FILES)})")
        if not _is_sha256(value):
            raise _card_error(source, f"files.{key}", "is not a SHA-256 (64 hexadecimal digits)")
    if files and set(files) != set(MODEL_FILES):
        missing = sorted(set(MODEL_FILES) - set(files))
        raise _card_error(source, "files", f"pins {', '.join(sorted(files))} but not {', '.join(missing)}",
                          "pin both files (sha256sum plans.json dataset.json).")
    refiner = data.get("refiner")
    if refiner is not None:
        if not isinstance(refiner, dict):
            raise _card_error(source, "refiner", f"is a {type(refiner).__name__}; expected an object "
                              '{"file": "refiner.json", "sha256": "..."}')
        if not _plain_relative_file(refiner.get("file")):
            raise _card_error(source, "refiner.file", "is not a file name inside the model folder")
        if not _is_sha256(refiner.get("sha256")):
            raise _card_error(source, "refiner.sha256", "is missing or not a SHA-256 (64 hexadecimal digits)")
    return ModelCard(
        id=card_id,
        name=name,
        version=str(card_version_label),
        description=description,
        channels=tuple(sorted(channels, key=lambda c: c.index)),
        labels=tuple(labels),
        members=member_sha,
        configuration=configuration,
        checkpoint=checkpoint,
        reference_channel=reference_channel,
        skull_stripped_input=flags["skull_stripped_input"],
        input_orientation=input_orientation,
        threshold=float(threshold),
        member_thresholds={str(k): float(v) for k, v in member_thresholds.items()} if member_thresholds else None,
        min_lesion_size=min_lesion_size,
        connectivity=connectivity,
        reference_lesion_load=float(reference_lesion_load),
        demo=flags["demo"],
        inferred=flags["inferred"],
        files={k: v.lower() for k, v in files.items()},
        raw=dict(data),
    )


# --------------------------------------------------------------------------------------
# plans.json and dataset.json
# --------------------------------------------------------------------------------------
def read_json_file(path: Path, what: str, *, data: bytes | None = None, missing_hint: str = "restore the model folder.",
                   max_bytes: int = MAX_MODEL_JSON_BYTES) -> Any:
    """Parse a small JSON file of a model (card, plans, dataset), with messages, not tracebacks.

    Parameters
    ----------
    path : Path
    what : str
        e.g. ``"Model card"``, ``"plans.json"``: the start of every message.
    data : bytes or None
        The file's content when it was already read (and checksummed).

    Raises
    ------
    MissingInput
        The file is not there.
    BadInputData
        Larger than ``max_bytes``, not UTF-8, or not JSON.
    """
    if data is None:
        try:
            if path.stat().st_size > max_bytes:
                raise BadInputData(f"{what} is {path.stat().st_size / 1024**2:.0f} MiB (limit "
                                   f"{max_bytes / 1024**2:.0f} MiB).", path=str(path),
                                   hint="this is not a model file; re-download the model.")
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingInput(f"{what} not found.", path=str(path), hint=missing_hint) from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInputData(f"{what} is not UTF-8 text.", path=str(path), hint="fix or restore the file.") from None
    except json.JSONDecodeError as exc:
        raise BadInputData(f"{what} is not valid JSON ({exc.msg}, line {exc.lineno}).", path=str(path),
                           hint="fix the JSON syntax." if what == "Model card" else
                           "the file is corrupt; re-download the model.") from None
    except RecursionError:
        raise BadInputData(f"{what} is nested too deeply to be a model file.", path=str(path),
                           hint="re-download the model.") from None


def pin_model_files(trainer_dir: Path) -> dict[str, str]:
    """The card's ``files`` entry for a model folder: SHA-256 of ``plans.json`` and ``dataset.json``."""
    return {name: sha256_file(Path(trainer_dir) / name) for name in MODEL_FILES}


def infer_card(trainer_dir: Path) -> dict[str, Any]:
    """Build a card for a model that has none, from its ``dataset.json`` and fold folders.

    Channel names are mapped to BIDS suffixes when they are recognisable (``T1w``, ``FLAIR``,
    ``UNIT1``...); checksums (checkpoints, ``plans.json``, ``dataset.json``) are computed now,
    so they protect the rest of the run but not against a file that was tampered with before
    (the run logs a warning saying so).
    """
    from bids_app.model.safety import check_dataset_json

    dataset_path = trainer_dir / "dataset.json"
    dataset = read_json_file(dataset_path, "dataset.json")
    channel_names = check_dataset_json(dataset, source=str(dataset_path))
    channels = []
    for key in sorted(channel_names):
        name = channel_names[key]
        queries = _CHANNEL_QUERY_GUESSES.get(name.lower().replace("-", "").replace("_", ""))
        if queries is None:
            raise BadInputData(
                f"Model has no msxplain model card and its channel name '{name}' does not say which BIDS image to use.",
                path=str(dataset_path),
                hint="write a model card (see docs/model-card.md) or pass --model-card.",
            )
        channels.append({"index": key, "name": name, "queries": queries})
    labels = {str(v): {"name": str(k)} for k, v in dataset["labels"].items()
              if isinstance(v, int) and v != 0 and k != "ignore"}
    plans = read_json_file(trainer_dir / "plans.json", "plans.json")
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configurations, dict) or not configurations:
        raise BadInputData("plans.json has no 'configurations'.", path=str(trainer_dir / "plans.json"),
                           hint="the model folder is corrupt; re-download it.")
    configuration = trainer_dir.name.split("__")[-1] if "__" in trainer_dir.name else next(iter(configurations))
    checkpoint = "checkpoint_final.pth"
    members = [{"fold": d.name[len("fold_"):], "sha256": sha256_file(d / checkpoint)}
               for d in sorted(trainer_dir.glob("fold_*")) if (d / checkpoint).is_file()]
    card = {
        "card_version": CARD_VERSION,
        "id": f"{trainer_dir.parent.name}/{trainer_dir.name}",
        "name": trainer_dir.parent.name,
        "description": "card inferred by msxplain from dataset.json (no model card was provided)",
        "inferred": True,
        "nnunet": {"configuration": configuration, "checkpoint": checkpoint},
        "channels": channels,
        "labels": labels,
        "members": members,
        "files": pin_model_files(trainer_dir),
    }
    orientation = READER_ORIENTATIONS.get(model_reader(plans, dataset)[0])
    if orientation is not None:  # a non-NIfTI reader: the run asks for --input-orientation
        card["input_orientation"] = orientation
    return card


# --------------------------------------------------------------------------------------
# The voxel order the network sees
# --------------------------------------------------------------------------------------
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


def resolve_input_orientation(model: ResolvedModel, override: str = "auto") -> tuple[str, str]:
    """:func:`input_orientation_rule` for a resolved model (reads its plans.json and dataset.json)."""
    plans_path = model.trainer_dir / "plans.json"
    plans = read_json_file(plans_path, "plans.json")
    dataset = read_json_file(model.trainer_dir / "dataset.json", "dataset.json")
    return input_orientation_rule(model.card, plans, dataset, override, source=str(plans_path))


# --------------------------------------------------------------------------------------
# Resolution of --model
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and its card.

    Attributes
    ----------
    trainer_dir : Path
        The nnU-Net trained-model folder (holds plans.json, dataset.json, fold_*/).
    card : ModelCard
    card_path : Path or None
        None when the card was inferred.
    source : str
        What the user asked for (name, folder or zip).
    """

    trainer_dir: Path
    card: ModelCard
    card_path: Path | None
    source: str

    def member_checkpoint(self, fold: str) -> Path:
        return self.trainer_dir / f"fold_{fold}" / self.card.checkpoint


def model_search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(MODELS_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(BUNDLED_MODELS_DIR)
    return dirs


def available_model_names() -> list[str]:
    names = set()
    for d in model_search_dirs():
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(names)


def find_trainer_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that look like nnU-Net trained models."""
    found = []
    for plans in sorted(root.rglob("plans.json")):
        d = plans.parent
        if (d / "dataset.json").is_file() and any(p.is_dir() for p in d.glob("fold_*")):
            found.append(d)
    return found


def is_model_name(spec: str) -> bool:
    """True when ``spec`` is written like a model name (a bare word), not like a path."""
    return bool(spec) and "/" not in spec and os.sep not in spec and not spec.startswith((".", "~")) \
        and not spec.lower().endswith(".zip")


def find_named_model(name: str) -> Path | None:
    """The folder of a bundled or installed model called ``name`` (``$MSXPLAIN_MODELS`` first,
    then the models bundled in the package), or None."""
    if not is_model_name(name):
        return None
    for d in model_search_dirs():
        if (d / name).is_dir():
            return (d / name).resolve()
    return None


def resolve_model(spec: str, *, card_path: Path | None = None, cache_dir: Path | None = None) -> ResolvedModel:
    """Turn ``--model NAME|DOI|URL|DIR|ZIP`` into a :class:`ResolvedModel`.

    Model **names resolve first**: a bare word (no ``/``, not starting with ``.`` or ``~``,
    not ending in ``.zip``) that names a bundled or installed model is that model, even when
    the current folder holds a folder of the same name (e.g. ``demo/`` from an earlier demo
    run). A folder or archive is therefore given as a path (``./demo``, ``/models/x.zip``); a
    bare word that names no model but an existing folder or archive is still taken as a path.
    Installed and bundled names come first, then the names of the model registry, then
    ``doi:``/``zenodo:``/``https://`` sources (pulled into the model cache on first use,
    :mod:`bids_app.model.sources`), then folders and archives.

    Raises
    ------
    MissingInput
        No such model name, folder or archive; a folder without an nnU-Net model; a remote
        source not found (404) or not cached while offline.
    BadInputData
        Unsafe or corrupt archive; invalid card; several models in one folder; a download with
        the wrong size or checksum.
    TemporaryFailure
        A download timed out or its connection dropped (it resumes on the next run).
    """
    from bids_app.model.sources import pull_spec, registry_entry

    path = Path(spec).expanduser()
    root = find_named_model(spec)
    fetched = pull_spec(spec) if root is None else None
    if root is not None:
        if path.exists() and path.resolve() != root:
            LOGGER.info("--model %s: the %s model (model names take precedence over folders; write ./%s "
                        "for the folder)", spec, spec, spec)
    elif fetched is not None:
        root = fetched
    elif registry_entry(spec) is not None:  # a bundled registry entry whose folder is missing
        raise MissingInput(f"Model '{spec}' is in the registry but not installed.", path=str(BUNDLED_MODELS_DIR),
                           hint="reinstall msxplain.")
    elif path.is_file() and zipfile.is_zipfile(path):
        root = extract_model_archive(path, cache_dir or default_cache_dir())
    elif path.is_file():
        raise BadInputData("Model file is not a zip archive.", path=str(path),
                           hint="pass an nnUNetv2_export_model_to_zip archive, a model folder or a model name.")
    elif path.is_dir():
        root = path.resolve()
    else:
        from bids_app.model.sources import load_registry

        names = ", ".join(sorted(set(available_model_names()) | set(load_registry()))) or "none"
        raise MissingInput(f"Model '{spec}' not found (model names: {names}).",
                           hint="pass a model name, doi:10.5281/zenodo.<id>, zenodo:<id>, an https:// URL of an "
                                "nnU-Net export zip, an nnU-Net model folder or a zip archive with --model.")
    trainer_dirs = find_trainer_dirs(root)
    if not trainer_dirs:
        raise MissingInput("No nnU-Net trained model (plans.json + dataset.json + fold_*/) found.", path=str(root),
                           hint="point --model at an nnU-Net results folder or an exported zip.")
    if card_path is None:
        card_candidates = [d / CARD_NAME for d in trainer_dirs if (d / CARD_NAME).is_file()]
        if (root / CARD_NAME).is_file():
            card_candidates.append(root / CARD_NAME)
    else:
        card_candidates = [card_path]
    if len(trainer_dirs) > 1:
        # a card may say which configuration to use
        wanted = None
        if card_candidates:
            wanted = ModelCard.load(card_candidates[0]).configuration
        chosen = [d for d in trainer_dirs if wanted and d.name.endswith(f"__{wanted}")]
        if len(chosen) != 1:
            raise BadInputData(
                f"Several nnU-Net models found ({', '.join(str(d.relative_to(root)) for d in trainer_dirs)}).",
                path=str(root), hint="point --model at one of them, or give a card naming the configuration.")
        trainer_dirs = chosen
    trainer_dir = trainer_dirs[0]
    if card_candidates:
        card = ModelCard.load(card_candidates[0])
        used_card_path = card_candidates[0]
    else:
        LOGGER.warning("Model %s has no %s: inferring one from dataset.json; checksums are computed now and "
                       "cannot prove the checkpoints are the ones their author released.", trainer_dir, CARD_NAME)
        card = ModelCard.from_dict(infer_card(trainer_dir), source=str(trainer_dir / "dataset.json"))
        used_card_path = None
    return ResolvedModel(trainer_dir=trainer_dir, card=card, card_path=used_card_path, source=spec)


def select_members(model: ResolvedModel, folds: list[str] | None) -> list[str]:
    """The members to run: all of the card's, or the requested subset (checked to exist)."""
    if not folds:
        return list(model.card.members)
    unknown = [f for f in folds if str(f) not in model.card.members]
    if unknown:
        raise UsageError(f"--folds {' '.join(unknown)} not in the model (members: {', '.join(model.card.members)}).",
                         hint="choose among the model card's members.")
    return [str(f) for f in folds]


def _verified_bytes(model: ResolvedModel, name: str) -> tuple[bytes, str]:
    """Read one of :data:`MODEL_FILES` and check it against the card's pin; (content, SHA-256)."""
    path = model.trainer_dir / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingInput(f"The model has no {name}.", path=str(path), hint="restore the model folder.") from None
    if size > MAX_MODEL_JSON_BYTES:
        raise BadInputData(f"{name} is {size / 1024**2:.0f} MiB (limit {MAX_MODEL_JSON_BYTES / 1024**2:.0f} MiB).",
                           path=str(path), hint="this is not an nnU-Net model file; re-download the model.")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = model.card.files.get(name)
    if expected and digest != expected:
        raise BadInputData(
            f"Checksum mismatch for {name}: SHA-256 {digest[:12]}... but the model card says {expected[:12]}...",
            path=str(path),
            hint="the file was altered or replaced; re-download the model and do not use this copy.",
        )
    return data, digest


def verify_model_files(model: ResolvedModel, *, warn: bool = False) -> dict[str, str]:
    """Check ``plans.json`` and ``dataset.json`` against the SHA-256 the card pins (``files``).

    A card without ``files`` (written before msxplain pinned them) is accepted: the class
    names in these files are still held to the exact allow-lists of
    :mod:`bids_app.model.safety`, but nothing proves the files are the released ones.

    Parameters
    ----------
    warn : bool
        Log a warning when the card pins neither file (once per run: the caller decides).

    Returns
    -------
    dict
        file name -> SHA-256 (as computed).

    Raises
    ------
    MissingInput
        A file is missing.
    BadInputData
        A checksum differs from the card's.
    """
    digests = {name: _verified_bytes(model, name)[1] for name in MODEL_FILES}
    if warn:
        _warn_if_unpinned(model)
    return digests


def _warn_if_unpinned(model: ResolvedModel) -> None:
    if not model.card.files:
        LOGGER.warning("The model card %s pins no SHA-256 for %s: they are checked against msxplain's allow-lists "
                       "but nothing proves they are the released ones. Add \"files\" to the card "
                       "(see docs/model-card.md).", model.card_path or model.trainer_dir, " and ".join(MODEL_FILES))


def check_consistency(model: ResolvedModel) -> None:
    """Verify ``plans.json`` and ``dataset.json`` against the card's checksums, check that they
    name only allow-listed classes, and that the card describes the network: same number of
    input channels as ``dataset.json``, lesion labels that exist among its outputs, and a
    configuration that ``plans.json`` has.

    Every file is read once, checksummed, then parsed from the same bytes, so nothing is
    parsed (let alone built) before its checksum is known to match.

    Raises
    ------
    MissingInput
        ``plans.json`` or ``dataset.json`` is missing.
    BadInputData
        A checksum mismatch, an invalid or unsafe file, or a mismatch with the card; with the
        file to fix.
    """
    from bids_app.model.safety import check_dataset_json, check_plans

    card = model.card
    content = {name: _verified_bytes(model, name)[0] for name in MODEL_FILES}  # both, before parsing either
    _warn_if_unpinned(model)
    dataset_path, plans_path = model.trainer_dir / "dataset.json", model.trainer_dir / "plans.json"
    dataset = read_json_file(dataset_path, "dataset.json", data=content["dataset.json"])
    channels = check_dataset_json(dataset, source=str(dataset_path))
    if len(channels) != card.n_channels:
        raise BadInputData(
            f"The model card lists {card.n_channels} input channel(s) but the network takes {len(channels)} "
            f"({', '.join(channels[i] for i in sorted(channels))}).",
            path=str(model.card_path or dataset_path),
            hint="make the card's 'channels' match dataset.json's channel_names, in order.")
    outputs = {int(v) for k, v in dataset["labels"].items() if k != "ignore"}
    missing = [lab.index for lab in card.labels if lab.index not in outputs]
    if missing:
        raise BadInputData(f"The model card names output label(s) {missing} that the network does not have.",
                           path=str(model.card_path or model.trainer_dir), hint="fix the card's 'labels'.")
    plans = read_json_file(plans_path, "plans.json", data=content["plans.json"])
    check_plans(plans, card.configuration, n_channels=len(channels), source=str(plans_path))


def verify_members(model: ResolvedModel, folds: list[str]) -> dict[str, str]:
    """Check that every member's checkpoint exists and matches the card's SHA-256 (and that
    ``plans.json`` and ``dataset.json`` match theirs, :func:`verify_model_files`).

    Returns
    -------
    dict
        fold -> SHA-256 (as computed).

    Raises
    ------
    MissingInput
        A member's checkpoint, ``plans.json`` or ``dataset.json`` is missing.
    BadInputData
        A checksum does not match the card (tampered or corrupt file).
    """
    verify_model_files(model)
    digests = {}
    for fold in folds:
        ckpt = model.member_checkpoint(fold)
        if not ckpt.is_file():
            raise MissingInput(f"Model member fold_{fold} has no {model.card.checkpoint}.", path=str(ckpt),
                               hint="restore the missing fold or select others with --folds.")
        digest = sha256_file(ckpt)
        expected = model.card.members.get(fold, "")
        if expected and digest != expected:
            raise BadInputData(
                f"Checksum mismatch for fold_{fold}: SHA-256 {digest[:12]}... but the model card says "
                f"{expected[:12]}...",
                path=str(ckpt),
                hint="the checkpoint is corrupt or was replaced; re-download the model and do not use this copy.",
            )
        if not expected and not model.card.inferred:
            raise BadInputData(f"Model card gives no sha256 for member fold_{fold}.",
                               path=str(model.card_path or model.trainer_dir),
                               hint=f"add the checkpoint's sha256 to the card (sha256sum fold_{fold}/"
                                    f"{model.card.checkpoint}).")
        digests[fold] = digest
    return digests


def model_refiner(model: ResolvedModel) -> Path | None:
    """The saliency refiner bundled with a model (card key ``refiner``: ``{"file", "sha256"}``,
    the file beside the card), checksum-verified; None when the card names none.

    Raises
    ------
    MissingInput
        The card names a refiner file that is not there.
    BadInputData
        Its SHA-256 differs from the card's.
    """
    entry = model.card.raw.get("refiner")
    if not entry:
        return None
    folder = model.card_path.parent if model.card_path is not None else model.trainer_dir
    path = folder / str(entry.get("file", ""))
    if not path.is_file():
        raise MissingInput("The model card names a refiner that is not there.", path=str(path),
                           hint="restore the model folder, or pass --refiner FILE / --refiner none.")
    digest = sha256_file(path)
    if digest != str(entry["sha256"]).lower():  # the card schema requires the pin
        raise BadInputData(f"Checksum mismatch for the refiner: SHA-256 {digest[:12]}... but the model card says "
                           f"{str(entry['sha256'])[:12]}...", path=str(path),
                           hint="the file is corrupt or was replaced; re-download the model.")
    return path


# --------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("MSXPLAIN_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "msxplain" / "models"


def _check_archive_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = info.filename
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise BadInputData(f"Model archive contains a symbolic link '{name}'.", path=str(archive),
                           hint="links are refused for safety; re-create the archive without links.")
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\\" in name:
        raise BadInputData(f"Model archive member '{name}' would be written outside the extraction folder.",
                           path=str(archive), hint="the archive is malformed or malicious; do not use it.")
    if info.file_size and info.compress_size and info.file_size / max(info.compress_size, 1) > MAX_COMPRESSION_RATIO:
        raise BadInputData(f"Model archive member '{name}' has a suspicious compression ratio.", path=str(archive),
                           hint="the archive looks like a zip bomb; do not use it.")


def extract_model_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract a model zip safely into ``cache_dir/<sha256 of the zip>`` and return that folder.

    The extraction goes to a temporary folder that is renamed into place, so an interrupted
    extraction never leaves a half model behind, and a second run reuses the first.
    """
    archive = archive.resolve()
    digest = sha256_file(archive)
    target = cache_dir / digest[:16]
    if target.is_dir():
        return target
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise BadInputData(f"Model archive is corrupt ({exc}).", path=str(archive), hint="re-download it.") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise BadInputData(f"Model archive has {len(infos)} members (limit {MAX_ARCHIVE_MEMBERS}).",
                               path=str(archive), hint="this is not an nnU-Net model export.")
        total = 0
        for info in infos:
            _check_archive_member(info, archive)
            total += info.file_size
        if total > MAX_ARCHIVE_UNCOMPRESSED_BYTES:
            raise BadInputData(f"Model archive would extract to {total / 1024**3:.1f} GiB "
                               f"(limit {MAX_ARCHIVE_UNCOMPRESSED_BYTES / 1024**3:.0f} GiB).",
                               path=str(archive), hint="this is not a plausible nnU-Net model export.")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from bids_app.errors import CannotCreateOutput

            raise CannotCreateOutput(f"Cannot create the model cache ({exc.strerror}).", path=str(cache_dir),
                                     hint="set MSXPLAIN_CACHE to a writable folder.") from None
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
        try:
            root_resolved = tmp.resolve()
            for info in infos:
                dest = (tmp / info.filename).resolve()
                if root_resolved not in dest.parents and dest != root_resolved:
                    raise BadInputData(f"Model archive member '{info.filename}' escapes the extraction folder.",
                                       path=str(archive), hint="do not use this archive.")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(dest, "wb") as out:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        written += len(block)
                        if written > info.file_size:
                            raise BadInputData(f"Model archive member '{info.filename}' is larger than declared.",
                                               path=str(archive), hint="the archive is malformed; do not use it.")
                        out.write(block)
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():  # a concurrent run may have won the race
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberWeights:
    """What the adapter needs of one member's checkpoint."""

    fold: str
    state_dict: dict
    trainer_name: str
    configuration: str
    mirroring_axes: tuple[int, ...] | None
    sha256: str


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> dict:
    """Load an nnU-Net checkpoint **without** arbitrary unpickling.

    ``torch.load(weights_only=True)`` refuses every global except tensors and containers; the
    only other globals in nnU-Net checkpoints are ``numpy.dtype`` (and its per-type classes)
    and ``numpy._core.multiarray.scalar`` (optimizer/logging state), which are allowed here.
    A checkpoint that needs anything else is refused with a clear error.
    """
    import numpy as np
    import torch

    if expected_sha256:
        digest = sha256_file(path)
        if digest != expected_sha256:
            raise BadInputData(f"Checksum mismatch for {path.name}.", path=str(path),
                               hint="the checkpoint is corrupt or was replaced; re-download the model.")
    try:
        scalar = np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        scalar = np.core.multiarray.scalar
    allowed = [np.dtype, scalar]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8")]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingInput("Checkpoint not found.", path=str(path), hint="restore the model files.") from None
    except Exception as exc:  # UnpicklingError, RuntimeError for corrupt zips, ...
        text = str(exc).split("\n")[0]
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "UnpicklingError" in type(exc).__name__:
            raise BadInputData(
                f"Checkpoint refused: it needs objects beyond tensors and numpy scalars ({text[:160]}).",
                path=str(path),
                hint="only load checkpoints whose origin you trust; msxplain never unpickles arbitrary objects.",
            ) from None
        raise BadInputData(f"Checkpoint cannot be read ({type(exc).__name__}: {text[:160]}).", path=str(path),
                           hint="the file is corrupt; re-download the model.") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise BadInputData("Checkpoint has no 'network_weights' (not an nnU-Net v2 checkpoint).", path=str(path),
                           hint="use checkpoints written by nnUNetv2_train.")
    return checkpoint


def load_members(model: ResolvedModel, folds: list[str]) -> list[MemberWeights]:
    """Verify checksums, then load the weights of the chosen members."""
    digests = verify_members(model, folds)
    members = []
    for fold in folds:
        checkpoint = load_checkpoint(model.member_checkpoint(fold))
        init_args = checkpoint.get("init_args") or {}
        axes = checkpoint.get("inference_allowed_mirroring_axes")
        members.append(
            MemberWeights(
                fold=fold,
                state_dict=checkpoint["network_weights"],
                trainer_name=str(checkpoint.get("trainer_name", "nnUNetTrainer")),
                configuration=str(init_args.get("configuration", model.card.configuration)),
                mirroring_axes=tuple(int(a) for a in axes) if axes is not None else None,
                sha256=digests[fold],
            )
        )
    return members


def model_source_block(model: ResolvedModel) -> dict[str, Any]:
    """Where the model came from: the DOI or URL and the checksums of the fetched archive
    (models pulled by :mod:`bids_app.model.sources`), else ``bundled`` or ``local``."""
    from bids_app.model.sources import source_of

    record = source_of(model.trainer_dir)
    if record:
        return {"Kind": "zenodo" if record.get("kind") == "zenodo" else "url", "Spec": record.get("spec"),
                "RegistryName": record.get("registry_name"), "DOI": record.get("doi"), "URL": record.get("url"),
                "File": record.get("file"), "ArchiveSize": record.get("size"), "ArchiveMD5": record.get("md5"),
                "ArchiveSHA256": record.get("sha256"), "CheckedAgainst": record.get("checked_against"),
                "Fetched": record.get("fetched")}
    bundled = model.trainer_dir.resolve().is_relative_to(BUNDLED_MODELS_DIR)
    return {"Kind": "bundled" if bundled else "local"}


def model_provenance(model: ResolvedModel, folds: list[str], digests: dict[str, str] | None = None) -> dict[str, Any]:
    """The model block written into every sidecar."""
    card = model.card
    return {
        "Source": model_source_block(model),
        "Id": card.id,
        "Name": card.name,
        "Version": card.version,
        "Demo": card.demo,
        "CardInferred": card.inferred,
        "Configuration": card.configuration,
        "Members": [
            {"Fold": f, "Checkpoint": f"fold_{f}/{card.checkpoint}",
             "SHA256": (digests or {}).get(f) or card.members.get(f, "")}
            for f in folds
        ],
        "CardSHA256": sha256_file(model.card_path) if model.card_path else None,
        "Files": {name: sha256_file(model.trainer_dir / name) for name in MODEL_FILES},
        "FilesPinnedByCard": bool(card.files) and not card.inferred,
    }
