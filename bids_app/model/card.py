"""Model cards: the schema of ``msxplain_model.json``, parsed field by field, and the card msxplain
infers for a model that has none.

A *model* is an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``,
``fold_*/checkpoint_*.pth``), as written by ``nnUNetv2_train`` or found inside an
``nnUNetv2_export_model_to_zip`` archive, plus an msxplain **model card**
(``msxplain_model.json``, docs/model-card.md) that says what the model needs and means:

* which BIDS images feed each input channel (pybids queries, in order of preference);
* what its labels are (e.g. ``WML``, ``CL``) and the default threshold, minimum lesion size,
  connectivity and reference lesion load for nDSC;
* the SHA-256 of every member checkpoint, checked **before** anything is unpickled, and of
  ``plans.json`` and ``dataset.json`` (``files``), checked before they are parsed.

The card is validated field by field: every problem is exit 65 with the field's name. Resolving
``--model`` and verifying the files is :mod:`bids_app.model.resolve`; loading the networks is
:mod:`bids_app.model.ensemble`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app.core.plans_allowlist import is_int, is_number
from bids_app.errors import BadInputData, MissingInput
from bids_app.model.orientation import INPUT_ORIENTATIONS, READER_ORIENTATIONS, model_reader

CARD_NAME = "msxplain_model.json"
CARD_VERSION = 1
#: the model files the card pins besides the checkpoints (card key ``files``)
MODEL_FILES = ("plans.json", "dataset.json")
#: plans.json / dataset.json / cards are a few kB; refuse to read absurd ones into memory
MAX_MODEL_JSON_BYTES = 16 * 1024**2
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: BIDS entity values (``label-<value>``) are letters and digits
_BIDS_LABEL = re.compile(r"[A-Za-z0-9]+")
#: ``label-`` values msxplain writes itself (``label-lesion``: the union of all classes); no class takes one
RESERVED_LABEL_VALUES = frozenset({"lesion"})
#: a lesion class name is data (sidecars, tables): any printable text of this length
_MAX_LABEL_NAME = 64
#: a member name becomes the folder ``fold_<name>``: no separators, no ``..``
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_-]+")
#: the checkpoints nnUNetv2_train writes that a run may choose (``--checkpoint``), by their option value
CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
#: the member keys that pin one of :data:`CHECKPOINT_FILES` whatever ``nnunet.checkpoint`` says
#: (``sha256`` pins ``nnunet.checkpoint``)
CHECKPOINT_PIN_KEYS = {"checkpoint_final.pth": "sha256_final", "checkpoint_best.pth": "sha256_best"}

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


def bids_label_value(name: str, index: int) -> str:
    """The BIDS ``label-`` value of a lesion class (docs/model-card.md, "Label names").

    The name's runs of letters and digits, each run after the first starting with a capital
    (``"white matter lesion"`` -> ``whiteMatterLesion``, ``"WML_1"`` -> ``WML1``, ``"CL-cortical"``
    -> ``CLCortical``; an alphanumeric name is its own value); ``class<index>`` when the name has no
    letter or digit; ``Class`` appended when the value is one msxplain writes itself
    (:data:`RESERVED_LABEL_VALUES`: ``"lesion"`` -> ``lesionClass``).

    Parameters
    ----------
    name : str
        The class name (model card or ``dataset.json``).
    index : int
        The class's output index.

    Returns
    -------
    str
        Letters and digits only.
    """
    runs = re.findall(r"[A-Za-z0-9]+", name)
    value = runs[0] + "".join(run[:1].upper() + run[1:] for run in runs[1:]) if runs else f"class{index}"
    if value.lower() in RESERVED_LABEL_VALUES:
        value += "Class"
    return value


@dataclass(frozen=True)
class LesionLabel:
    """One lesion class of the model (its index in the network output).

    ``name`` is data (sidecars, lesion tables, lookup tables); ``bids_label`` is the ``label-``
    value of its output files (:func:`bids_label_value`, or the card's ``bids_label``).
    """

    index: int
    name: str
    long_name: str = ""
    bids_label: str = ""


@dataclass(frozen=True)
class ModelCard:
    """The parsed ``msxplain_model.json``.

    ``members`` maps a member (fold) name to the SHA-256 of its checkpoint (``checkpoint``); the
    member names are nnU-Net fold folder suffixes (``fold_<name>``, e.g. ``fold_all``).
    ``checkpoint_pins`` maps each checkpoint file the card pins (``checkpoint`` and those of
    ``members[].sha256_final`` / ``sha256_best``) to {member: SHA-256}. ``files`` maps the model's
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
    checkpoint_pins: dict[str, dict[str, str]] = field(default_factory=dict)
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
        label_name = value["name"]
        if not isinstance(label_name, str) or not label_name.strip() or len(label_name) > _MAX_LABEL_NAME \
                or not label_name.isprintable():
            raise _card_error(source, f"labels.{key}.name", f"is {json.dumps(label_name)[:60]}; expected a "
                              f"printable name of 1 to {_MAX_LABEL_NAME} characters")
        long_name = optional(value, "long_name", f"labels.{key}.long_name", lambda v: isinstance(v, str),
                             "a string", "")
        bids_label = optional(value, "bids_label", f"labels.{key}.bids_label",
                              lambda v: isinstance(v, str) and bool(_BIDS_LABEL.fullmatch(v))
                              and v.lower() not in RESERVED_LABEL_VALUES,
                              "letters and digits only, and not " + " or ".join(sorted(RESERVED_LABEL_VALUES)),
                              None)
        labels.append(LesionLabel(index=int(key), name=label_name, long_name=long_name,
                                  bids_label=bids_label or bids_label_value(label_name, int(key))))
    labels.sort(key=lambda lab: lab.index)
    if len({lab.name for lab in labels}) != len(labels):
        raise _card_error(source, "labels", "gives two labels the same name", "give every label its own name.")
    if len({lab.bids_label.lower() for lab in labels}) != len(labels):
        # two names with the same letters and digits ("WML 1", "WML_1"): the index keeps them apart
        explicit = {str(k) for k, v in raw_labels.items() if isinstance(v, dict) and v.get("bids_label")}
        labels = [lab if str(lab.index) in explicit else
                  LesionLabel(lab.index, lab.name, lab.long_name, f"{lab.bids_label}{lab.index}") for lab in labels]
        if len({lab.bids_label.lower() for lab in labels}) != len(labels):
            raise _card_error(source, "labels", "gives two labels the same bids_label",
                              "give every label its own bids_label.")

    # --- members
    member_sha: dict[str, str] = {}
    extra_pins: dict[str, dict[str, tuple[int, str]]] = {name: {} for name in CHECKPOINT_PIN_KEYS}
    for i, m in enumerate(need("members", list)):
        if not isinstance(m, dict) or "fold" not in m:
            raise BadInputData("Each model card member needs a 'fold'.", path=source, hint="see docs/model-card.md.")
        fold = m["fold"]
        if not (isinstance(fold, str) or is_int(fold)) or not _MEMBER_NAME.fullmatch(str(fold)):
            raise _card_error(source, f"members[{i}].fold", f"is {json.dumps(fold)[:60]}; expected a fold name "
                              "such as \"0\" or \"all\" (letters, digits, _ and -)")
        if str(fold) in member_sha:
            raise _card_error(source, f"members[{i}].fold", f"repeats fold {fold}")
        sha = optional(m, "sha256", f"members[{i}].sha256", lambda v: isinstance(v, str), "a SHA-256 hex string", "")
        member_sha[str(fold)] = sha.lower()
        for name, key in CHECKPOINT_PIN_KEYS.items():
            pin = optional(m, key, f"members[{i}].{key}", _is_sha256, "a SHA-256 (64 hexadecimal digits)", None)
            if pin is not None:
                extra_pins[name][str(fold)] = (i, pin.lower())
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
    checkpoint_pins = {checkpoint: dict(member_sha)}
    for name, pins in extra_pins.items():
        for fold, (i, pin) in pins.items():
            if name == checkpoint and member_sha[fold] and pin != member_sha[fold]:
                raise _card_error(source, f"members[{i}].{CHECKPOINT_PIN_KEYS[name]}", "differs from its sha256, "
                                  f"which pins the same file (nnunet.checkpoint is {checkpoint})")
            checkpoint_pins.setdefault(name, {})[fold] = pin
            if name == checkpoint:
                member_sha[fold] = pin
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
        checkpoint_pins=checkpoint_pins,
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


#: a registry card's ``members`` when the release's checkpoints are not known in advance: the pull
#: fills in the members and their SHA-256 from the archive it checked (docs/models.md)
MEMBERS_FROM_ARCHIVE = "from-archive"


def member_checksums(trainer_dir: Path, checkpoint: str = "checkpoint_final.pth") -> list[dict[str, str]]:
    """The card's ``members`` for a model folder: every ``fold_<name>`` with a checkpoint, and its SHA-256."""
    return [{"fold": d.name[len("fold_"):], "sha256": sha256_file(d / checkpoint)}
            for d in sorted(Path(trainer_dir).glob("fold_*")) if (d / checkpoint).is_file()]


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
    from bids_app.core.plans_allowlist import check_dataset_json

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
    members = member_checksums(trainer_dir, checkpoint)
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
