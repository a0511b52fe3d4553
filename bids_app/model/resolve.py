"""Resolving ``--model`` (names, registry, remote sources, folders, archives) into a
:class:`ResolvedModel`, and verifying its files before anything is parsed or unpickled.

Checkpoints, ``plans.json`` and ``dataset.json`` are checked against the SHA-256 the card pins;
every class name in ``plans.json`` and ``dataset.json`` that nnU-Net would resolve must be in the
exact allow-lists of :mod:`bids_app.core.plans_allowlist` (:func:`check_consistency`, and again where the
network is built, :func:`bids_app.core.segment.build_network`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bids_app import DATA_DIR
from bids_app.errors import BadInputData, MissingInput, UsageError
from bids_app.model.archive import default_cache_dir, extract_model_archive, find_trainer_dirs
from bids_app.model.card import (
    CARD_NAME,
    CHECKPOINT_FILES,
    CHECKPOINT_PIN_KEYS,
    MAX_MODEL_JSON_BYTES,
    MODEL_FILES,
    ModelCard,
    infer_card,
    member_checksums,
    read_json_file,
    sha256_file,
)
from bids_app.model.orientation import input_orientation_rule

LOGGER = logging.getLogger("bids_app.model.resolve")

#: where bundled models live inside the package
BUNDLED_MODELS_DIR = DATA_DIR / "models"
#: extra model folders (e.g. baked into a container at build time), ``os.pathsep``-separated
MODELS_PATH_ENV = "MSXPLAIN_MODELS"


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

    def member_checkpoint(self, member: str) -> Path:
        """The checkpoint of one member: ``fold_<member>/<card checkpoint>``."""
        return self.trainer_dir / f"fold_{member}" / self.card.checkpoint


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
    :mod:`bids_app.model.cache`), then folders and archives.

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
    from bids_app.model.cache import pull_spec
    from bids_app.model.registry import registry_entry

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
        from bids_app.model.registry import load_registry

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


def select_members(model: ResolvedModel, requested: list[str] | None) -> list[str]:
    """The members to run: all of the card's, or the requested subset (checked to exist)."""
    if not requested:
        return list(model.card.members)
    unknown = [f for f in requested if str(f) not in model.card.members]
    if unknown:
        raise UsageError(f"--members {' '.join(unknown)} not in the model (members: {', '.join(model.card.members)}).",
                         hint="choose among the model card's members.")
    return [str(f) for f in requested]


def select_checkpoint(model: ResolvedModel, choice: str = "auto", members: list[str] | None = None
                      ) -> ResolvedModel:
    """The model with the members' checkpoint that ``--checkpoint`` chooses, pinned.

    ``auto`` keeps the card's ``nnunet.checkpoint``; ``final`` and ``best`` choose
    ``checkpoint_final.pth`` and ``checkpoint_best.pth``. The card's SHA-256 for the chosen file
    (``members[].sha256`` when it is ``nnunet.checkpoint``, else ``sha256_final`` /
    ``sha256_best``) become the members' pins, so :func:`verify_members` checks the chosen files
    as it checks the card's own. A card inferred from the folder computes them now, as it does
    for ``checkpoint_final.pth``. A card that pins the chosen file for no requested member is
    refused rather than the file being checksummed now: a pin is the author's statement of what
    was released, and a checksum computed at run time proves nothing about the file
    (docs/model-card.md, "Configurations and checkpoints").

    Parameters
    ----------
    choice : str
        ``auto``, ``final`` or ``best``.
    members : list of str or None
        The members that will run (default: all of the card's); each must be pinned.

    Returns
    -------
    ResolvedModel
        ``model`` itself when the choice is the card's checkpoint; else the same folder with a
        card whose ``checkpoint`` is the chosen file and whose ``members`` are its pins (members
        without a pin left out), ``raw`` changed alike (a card file written from it describes
        the same model).

    Raises
    ------
    UsageError
        ``choice`` is not one of auto, final, best.
    BadInputData
        The card pins the chosen file for none or not all of ``members``.
    """
    if choice in (None, "auto"):
        return model
    if choice not in CHECKPOINT_FILES:
        raise UsageError(f"--checkpoint {choice} is not a checkpoint msxplain knows.",
                         hint=f"use auto, {', '.join(CHECKPOINT_FILES)}.")
    card = model.card
    name = CHECKPOINT_FILES[choice]
    if name == card.checkpoint:
        return model
    wanted = [str(m) for m in members] if members else list(card.members)
    if card.inferred:  # checksums computed now, as for the inferred card's own checkpoint
        computed = {m["fold"]: m["sha256"] for m in member_checksums(model.trainer_dir, name)}
        pins = {m: computed.get(m, "") for m in card.members}
    else:
        pinned = card.checkpoint_pins.get(name, {})
        unpinned = [m for m in wanted if not pinned.get(m)]
        if unpinned:
            raise BadInputData(
                f"--checkpoint {choice}: the model card pins no SHA-256 for {name} of "
                f"{', '.join(f'fold_{m}' for m in unpinned)} (it pins {card.checkpoint}); msxplain loads only "
                "checkpoints whose checksum the model card pins.",
                path=str(model.card_path or model.trainer_dir),
                hint=f"add \"{CHECKPOINT_PIN_KEYS[name]}\" to the card's members (sha256sum fold_*/{name}) and "
                     f"pass it with --model-card, or drop --checkpoint {choice}.")
        pins = {m: pinned[m] for m in card.members if pinned.get(m)}
    raw = copy.deepcopy(card.raw)
    raw["nnunet"] = {**(raw.get("nnunet") or {}), "checkpoint": name}
    raw["members"] = [{**entry, "sha256": pins[str(entry["fold"])]} for entry in raw.get("members") or []
                      if isinstance(entry, dict) and str(entry.get("fold")) in pins]
    chosen = dataclasses.replace(card, checkpoint=name, members=pins, raw=raw,
                                 checkpoint_pins={**card.checkpoint_pins, name: pins})
    LOGGER.info("Checkpoint %s of members %s (--checkpoint %s; the card's is %s)", name, ", ".join(wanted), choice,
                card.checkpoint)
    return dataclasses.replace(model, card=chosen)


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
    :mod:`bids_app.core.plans_allowlist`, but nothing proves the files are the released ones.

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
    from bids_app.core.plans_allowlist import check_dataset_json, check_plans

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


def verify_members(model: ResolvedModel, members: list[str]) -> dict[str, str]:
    """Check that every member's checkpoint exists and matches the card's SHA-256 (and that
    ``plans.json`` and ``dataset.json`` match theirs, :func:`verify_model_files`).

    Returns
    -------
    dict
        member -> SHA-256 (as computed).

    Raises
    ------
    MissingInput
        A member's checkpoint, ``plans.json`` or ``dataset.json`` is missing.
    BadInputData
        A checksum does not match the card (tampered or corrupt file).
    """
    verify_model_files(model)
    digests = {}
    for member in members:
        ckpt = model.member_checkpoint(member)
        if not ckpt.is_file():
            raise MissingInput(f"Model member fold_{member} has no {model.card.checkpoint}.", path=str(ckpt),
                               hint="restore the missing fold or select other members with --members.")
        digest = sha256_file(ckpt)
        expected = model.card.members.get(member, "")
        if expected and digest != expected:
            raise BadInputData(
                f"Checksum mismatch for fold_{member}: SHA-256 {digest[:12]}... but the model card says "
                f"{expected[:12]}...",
                path=str(ckpt),
                hint="the checkpoint is corrupt or was replaced; re-download the model and do not use this copy.",
            )
        if not expected and not model.card.inferred:
            raise BadInputData(f"Model card gives no sha256 for member fold_{member}.",
                               path=str(model.card_path or model.trainer_dir),
                               hint=f"add the checkpoint's sha256 to the card (sha256sum fold_{member}/"
                                    f"{model.card.checkpoint}).")
        digests[member] = digest
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
# The voxel order the network sees
# --------------------------------------------------------------------------------------
def resolve_input_orientation(model: ResolvedModel, override: str = "auto") -> tuple[str, str]:
    """:func:`input_orientation_rule` for a resolved model (reads its plans.json and dataset.json)."""
    plans_path = model.trainer_dir / "plans.json"
    plans = read_json_file(plans_path, "plans.json")
    dataset = read_json_file(model.trainer_dir / "dataset.json", "dataset.json")
    return input_orientation_rule(model.card, plans, dataset, override, source=str(plans_path))
