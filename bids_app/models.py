"""Models: resolving ``--model``, model cards, checksums, safe archives and checkpoints.

A *model* is an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``,
``fold_*/checkpoint_*.pth``), as written by ``nnUNetv2_train`` or found inside an
``nnUNetv2_export_model_to_zip`` archive, plus an msxplain **model card**
(``msxplain_model.json``) that says what the model needs and means:

* which BIDS images feed each input channel (pybids queries, in order of preference);
* what its labels are (e.g. ``WML``, ``CL``) and the default threshold, minimum lesion size,
  connectivity and reference lesion load for nDSC;
* the SHA-256 of every member checkpoint, checked **before** anything is unpickled.

Model files are untrusted input (a model zip from the internet can carry code): archives are
extracted with path-traversal, link and size checks, and checkpoints are read with
``torch.load(weights_only=True)`` and an allow-list of the two numpy globals that nnU-Net
checkpoints contain (``nnunet_mechanics.md`` §1.3). The network class named in
``plans.json`` must come from ``dynamic_network_architectures`` (see
:func:`bids_app.core.segment.build_network`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInputData, MissingInput, UsageError

LOGGER = logging.getLogger("bids_app.models")

CARD_NAME = "msxplain_model.json"
CARD_VERSION = 1
#: where bundled models live inside the package
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
#: extra model folders (e.g. baked into a container at build time), ``os.pathsep``-separated
MODELS_PATH_ENV = "MSXPLAIN_MODELS"
#: archive limits: refuse zip bombs and absurd archives
MAX_ARCHIVE_UNCOMPRESSED_BYTES = 8 * 1024**3
MAX_ARCHIVE_MEMBERS = 20000
MAX_COMPRESSION_RATIO = 200

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
    names are nnU-Net fold folder suffixes (``fold_<name>``).
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
    threshold: float = 0.5
    member_thresholds: dict[str, float] | None = None
    min_lesion_size: int = 4
    connectivity: int = 18
    reference_lesion_load: float = 0.001
    demo: bool = False
    inferred: bool = False
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
        """Validate and parse a card; every problem is a :class:`BadInputData` naming the key."""

        def need(key: str, kind: type | tuple[type, ...]):
            if key not in data:
                raise BadInputData(f"Model card lacks the key '{key}'.", path=source,
                                   hint=f"add '{key}' (see docs/model-card.md).")
            value = data[key]
            if not isinstance(value, kind):
                raise BadInputData(f"Model card key '{key}' has the wrong type ({type(value).__name__}).",
                                   path=source, hint="see docs/model-card.md.")
            return value

        version = data.get("card_version", CARD_VERSION)
        if version != CARD_VERSION:
            raise BadInputData(f"Unsupported model card version {version!r} (expected {CARD_VERSION}).", path=source,
                               hint="upgrade msxplain or rewrite the card.")
        channels = []
        for i, ch in enumerate(need("channels", list)):
            if not isinstance(ch, dict) or "name" not in ch or "queries" not in ch:
                raise BadInputData(f"Model card channel {i} needs 'name' and 'queries'.", path=source,
                                   hint="see docs/model-card.md.")
            queries = ch["queries"]
            if not isinstance(queries, list) or not queries or not all(isinstance(q, dict) for q in queries):
                raise BadInputData(f"Model card channel '{ch['name']}' needs a non-empty list of queries.",
                                   path=source, hint="see docs/model-card.md.")
            channels.append(Channel(index=int(ch.get("index", i)), name=str(ch["name"]),
                                    queries=tuple(dict(q) for q in queries), required=bool(ch.get("required", True))))
        if sorted(c.index for c in channels) != list(range(len(channels))):
            raise BadInputData("Model card channel indices must be 0..K-1.", path=source, hint="fix 'channels'.")
        labels = []
        for key, value in need("labels", dict).items():
            if not str(key).isdigit() or int(key) == 0:
                raise BadInputData(f"Model card label key {key!r} must be a positive output index.", path=source,
                                   hint='use e.g. {"1": {"name": "WML"}}.')
            value = value if isinstance(value, dict) else {"name": str(value)}
            labels.append(LesionLabel(index=int(key), name=str(value["name"]), long_name=str(value.get("long_name", ""))))
        labels.sort(key=lambda lab: lab.index)
        members = need("members", list)
        member_sha = {}
        for m in members:
            if not isinstance(m, dict) or "fold" not in m:
                raise BadInputData("Each model card member needs a 'fold'.", path=source, hint="see docs/model-card.md.")
            member_sha[str(m["fold"])] = str(m.get("sha256", "")).lower()
        if not member_sha:
            raise BadInputData("Model card lists no members.", path=source, hint="list the folds under 'members'.")
        post = data.get("postprocessing", {})
        nnunet = data.get("nnunet", {})
        connectivity = int(post.get("connectivity", 18))
        if connectivity not in (6, 18, 26):
            raise BadInputData(f"Model card connectivity {connectivity} is not 6, 18 or 26.", path=source,
                               hint="fix postprocessing.connectivity.")
        member_thresholds = post.get("member_thresholds")
        return cls(
            id=str(need("id", str)),
            name=str(data.get("name", data["id"])),
            version=str(data.get("version", "0")),
            description=str(data.get("description", "")),
            channels=tuple(sorted(channels, key=lambda c: c.index)),
            labels=tuple(labels),
            members=member_sha,
            configuration=str(nnunet.get("configuration", "3d_fullres")),
            checkpoint=str(nnunet.get("checkpoint", "checkpoint_final.pth")),
            reference_channel=int(data.get("reference_channel", 0)),
            skull_stripped_input=bool(data.get("skull_stripped_input", True)),
            threshold=float(post.get("threshold", 0.5)),
            member_thresholds={str(k): float(v) for k, v in member_thresholds.items()} if member_thresholds else None,
            min_lesion_size=int(post.get("min_lesion_size", 4)),
            connectivity=connectivity,
            reference_lesion_load=float(data.get("reference_lesion_load", 0.001)),
            demo=bool(data.get("demo", False)),
            inferred=bool(data.get("inferred", False)),
            raw=dict(data),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingInput("Model card not found.", path=str(path), hint="check --model-card.") from None
        except json.JSONDecodeError as exc:
            raise BadInputData(f"Model card is not valid JSON ({exc.msg}, line {exc.lineno}).", path=str(path),
                               hint="fix the JSON syntax.") from None
        if not isinstance(data, dict):
            raise BadInputData("Model card must be a JSON object.", path=str(path), hint="see docs/model-card.md.")
        return cls.from_dict(data, source=str(path))


def infer_card(trainer_dir: Path) -> dict[str, Any]:
    """Build a card for a model that has none, from its ``dataset.json`` and fold folders.

    Channel names are mapped to BIDS suffixes when they are recognisable (``T1w``, ``FLAIR``,
    ``UNIT1``...); checksums are computed now, so they protect the rest of the run but not
    against a file that was tampered with before (the run logs a warning saying so).
    """
    dataset = json.loads((trainer_dir / "dataset.json").read_text())
    channel_names = dataset.get("channel_names") or dataset.get("modality") or {}
    channels = []
    for key in sorted(channel_names, key=int):
        name = str(channel_names[key])
        queries = _CHANNEL_QUERY_GUESSES.get(name.lower().replace("-", "").replace("_", ""))
        if queries is None:
            raise BadInputData(
                f"Model has no msxplain model card and its channel name '{name}' does not say which BIDS image to use.",
                path=str(trainer_dir / "dataset.json"),
                hint="write a model card (msxplain-tools model-card) or pass --model-card.",
            )
        channels.append({"index": int(key), "name": name, "queries": queries})
    labels = {str(v): {"name": str(k)} for k, v in dataset.get("labels", {}).items()
              if isinstance(v, int) and v != 0}
    plans = json.loads((trainer_dir / "plans.json").read_text())
    configuration = trainer_dir.name.split("__")[-1] if "__" in trainer_dir.name else \
        next(iter(plans.get("configurations", {"3d_fullres": {}})))
    checkpoint = "checkpoint_final.pth"
    members = [{"fold": d.name[len("fold_"):], "sha256": sha256_file(d / checkpoint)}
               for d in sorted(trainer_dir.glob("fold_*")) if (d / checkpoint).is_file()]
    return {
        "card_version": CARD_VERSION,
        "id": f"{trainer_dir.parent.name}/{trainer_dir.name}",
        "name": trainer_dir.parent.name,
        "description": "card inferred by msxplain from dataset.json (no model card was provided)",
        "inferred": True,
        "nnunet": {"configuration": configuration, "checkpoint": checkpoint},
        "channels": channels,
        "labels": labels,
        "members": members,
    }


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
    """Turn ``--model NAME|DIR|ZIP`` into a :class:`ResolvedModel`.

    Model **names resolve first**: a bare word (no ``/``, not starting with ``.`` or ``~``,
    not ending in ``.zip``) that names a bundled or installed model is that model, even when
    the current folder holds a folder of the same name (e.g. ``demo/`` from an earlier demo
    run). A folder or archive is therefore given as a path (``./demo``, ``/models/x.zip``); a
    bare word that names no model but an existing folder or archive is still taken as a path.

    Raises
    ------
    MissingInput
        No such model name, folder or archive; a folder without an nnU-Net model.
    BadInputData
        Unsafe or corrupt archive; invalid card; several models in one folder.
    """
    path = Path(spec).expanduser()
    root = find_named_model(spec)
    if root is not None:
        if path.exists() and path.resolve() != root:
            LOGGER.info("--model %s: the %s model (model names take precedence over folders; write ./%s "
                        "for the folder)", spec, spec, spec)
    elif path.is_file() and zipfile.is_zipfile(path):
        root = extract_model_archive(path, cache_dir or default_cache_dir())
    elif path.is_file():
        raise BadInputData("Model file is not a zip archive.", path=str(path),
                           hint="pass an nnUNetv2_export_model_to_zip archive, a model folder or a model name.")
    elif path.is_dir():
        root = path.resolve()
    else:
        names = ", ".join(available_model_names()) or "none"
        raise MissingInput(f"Model '{spec}' not found (bundled or installed models: {names}).",
                           hint="pass a model name, an nnU-Net model folder or a zip archive with --model.")
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


def check_consistency(model: ResolvedModel) -> None:
    """The card must describe the network: same number of input channels as ``dataset.json``,
    lesion labels that exist among its outputs, and a configuration that ``plans.json`` has.

    Raises
    ------
    BadInputData
        With the mismatch and the file to fix.
    """
    card = model.card
    dataset = json.loads((model.trainer_dir / "dataset.json").read_text())
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != card.n_channels:
        raise BadInputData(
            f"The model card lists {card.n_channels} input channel(s) but the network takes {len(channels)} "
            f"({', '.join(str(v) for v in channels.values())}).",
            path=str(model.card_path or model.trainer_dir / "dataset.json"),
            hint="make the card's 'channels' match dataset.json's channel_names, in order.")
    outputs = {int(v) for v in dataset.get("labels", {}).values() if isinstance(v, int)}
    missing = [lab.index for lab in card.labels if lab.index not in outputs]
    if missing:
        raise BadInputData(f"The model card names output label(s) {missing} that the network does not have.",
                           path=str(model.card_path or model.trainer_dir), hint="fix the card's 'labels'.")
    plans = json.loads((model.trainer_dir / "plans.json").read_text())
    if card.configuration not in plans.get("configurations", {}):
        raise BadInputData(f"Configuration '{card.configuration}' is not in plans.json.",
                           path=str(model.trainer_dir / "plans.json"), hint="fix nnunet.configuration in the card.")


def verify_members(model: ResolvedModel, folds: list[str]) -> dict[str, str]:
    """Check that every member's checkpoint exists and matches the card's SHA-256.

    Returns
    -------
    dict
        fold -> SHA-256 (as computed).

    Raises
    ------
    MissingInput
        A member's checkpoint is missing.
    BadInputData
        A checksum does not match the card (tampered or corrupt checkpoint).
    """
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
                f"Checksum mismatch for fold_{fold}: SHA-256 {digest[:12]}... but the model card says {expected[:12]}...",
                path=str(ckpt),
                hint="the checkpoint is corrupt or was replaced; re-download the model and do not use this copy.",
            )
        if not expected and not model.card.inferred:
            raise BadInputData(f"Model card gives no sha256 for member fold_{fold}.",
                               path=str(model.card_path or model.trainer_dir),
                               hint="add the checkpoint's sha256 to the card (msxplain-tools model-card).")
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
    if entry.get("sha256") and digest != entry["sha256"]:
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
            from .errors import CannotCreateOutput

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


def model_provenance(model: ResolvedModel, folds: list[str], digests: dict[str, str] | None = None) -> dict[str, Any]:
    """The model block written into every sidecar."""
    card = model.card
    return {
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
    }
