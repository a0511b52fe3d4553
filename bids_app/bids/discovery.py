"""Finding each session's input images with pybids, by the model card's channel queries.

Each model channel has an ordered list of queries (e.g. the T1w channel of a CL model:
``[{"suffix": "UNIT1"}, {"suffix": "T1w"}]``: prefer the MP2RAGE uniform image, else any
MPRAGE ``T1w`` whatever its ``acq-``). For one subject/session and one channel:

1. the first query that matches anything wins (the later ones are fallbacks);
2. phase images (``part-phase``) and MP2RAGE inversion images are never taken as anatomy;
3. the user's ``--bids-filter-file`` entry for the channel (keyed by the lower-case channel
   name, e.g. ``"t1w"``, ``"flair"``) is applied on top of every query; ``null`` means "the
   entity must be absent" and ``"*"`` "any value", as in fMRIPrep;
4. files that differ only in ``run`` are repeats: the **highest run** is taken (the last
   acquisition, usually the one that was repeated because the first failed); a filter file
   with ``"run": 1`` overrides this;
5. files that differ in anything else (e.g. ``acq-``, ``rec-``, ``ce-``) are ambiguous and
   are refused with the list of candidates and the filter that would pick one.

Every choice is recorded with its reason, which ends up in the log and the report.

Sessions are processed independently; a subject without sessions is one "session" with
``session=None``. Sessions in which no channel matches anything (e.g. ``ses-meg``) are
skipped; a session that has some channels but lacks a required one fails on its own with a
:class:`~bids_app.errors.MissingInput` (66), without stopping the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app.errors import BadInputData, BIDSValidationError, MissingInput, MsxplainError, NoMatchingInputs, UsageError
from bids_app.model.card import ModelCard

LOGGER = logging.getLogger("bids_app.bids.discovery")

IMAGE_EXTENSIONS = [".nii", ".nii.gz"]
#: filter-file / query keys accepted in their short BIDS form, mapped to pybids names
ENTITY_ALIASES = {
    "sub": "subject", "ses": "session", "acq": "acquisition", "ce": "ceagent", "rec": "reconstruction",
    "dir": "direction", "inv": "inversion", "mt": "mtransfer", "desc": "description",
}


@dataclass(frozen=True)
class SelectedFile:
    """One chosen input image."""

    channel: str
    path: str
    reason: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SessionInputs:
    """The inputs of one subject/session, in the model card's channel order."""

    subject: str
    session: str | None
    files: tuple[SelectedFile, ...]

    @property
    def name(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


@dataclass(frozen=True)
class SessionFailure:
    """A session that cannot be processed, with the error to report."""

    subject: str
    session: str | None
    error: MsxplainError

    @property
    def name(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def open_layout(bids_dir: Path, database_dir: Path | None = None):
    """Index a BIDS dataset with pybids.

    Raises
    ------
    BIDSValidationError
        The folder is not a BIDS dataset (no ``dataset_description.json``, ...).
    """
    from bids import BIDSLayout

    if not (Path(bids_dir) / "dataset_description.json").is_file():
        raise BIDSValidationError("Not a BIDS dataset: dataset_description.json is missing.", path=str(bids_dir),
                                  hint="point bids_dir at the root of a BIDS dataset.")
    try:
        return BIDSLayout(str(bids_dir), validate=False, derivatives=False,
                          database_path=str(database_dir) if database_dir else None)
    except Exception as exc:  # pybids raises its own BIDSValidationError, ValueError...
        raise BIDSValidationError(f"pybids cannot index the dataset ({type(exc).__name__}: {exc}).",
                                  path=str(bids_dir), hint="fix the dataset (run the BIDS validator).") from None


def _pybids_filters(query: dict[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    out: dict[str, Any] = {}
    for key, value in query.items():
        key = ENTITY_ALIASES.get(key, key)
        if value is None:
            value = Query.NONE
        elif value == "*":
            value = Query.ANY
        elif isinstance(value, int) and not isinstance(value, bool) and key == "run":
            value = value  # pybids matches run as an int
        out[key] = value
    return out


def _describe(entities: dict[str, Any], skip=("subject", "session", "suffix", "extension", "datatype")) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(entities.items()) if k not in skip) or "no other entities"


def select_channel_file(layout, card_channel, subject: str, session: str | None,
                        user_filter: dict[str, Any] | None) -> SelectedFile | None:
    """Choose the image of one channel for one session (see the module docstring).

    Returns None when nothing matches.

    Raises
    ------
    BadInputData
        Several candidates that only a filter can tell apart.
    """
    from bids.layout import Query

    base = {
        "subject": subject,
        "session": session if session else Query.NONE,
        "datatype": "anat",
        "extension": IMAGE_EXTENSIONS,
    }
    user = _pybids_filters(user_filter or {})
    for qi, query in enumerate(card_channel.queries):
        # subject and session last: no query or filter may select another session's image
        filters = {**base, **_pybids_filters(query), **user,
                   **{k: v for k, v in base.items() if k in SESSION_ENTITIES}}
        try:
            found = layout.get(return_type="object", **filters)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"Invalid filter for channel '{card_channel.name}': {exc}",
                             hint="use BIDS entity names (e.g. acquisition, run, reconstruction).") from None
        # phase images and MP2RAGE inversions are never anatomy
        found = [f for f in found if f.entities.get("part") in (None, "mag")
                 and f.entities.get("suffix") != "MP2RAGE"]
        if not found:
            continue
        groups: dict[tuple, list] = {}
        for f in found:
            # filename entities only (f.entities also holds sidecar metadata)
            key = tuple(sorted((k, str(v)) for k, v in f.get_entities(metadata=False).items()
                               if k not in ("run", "extension")))
            groups.setdefault(key, []).append(f)
        query_text = ", ".join(f"{k}={v}" for k, v in query.items())
        if len(groups) > 1:
            listing = "; ".join(Path(f.path).name for f in sorted(found, key=lambda f: f.path))
            raise BadInputData(
                f"Channel '{card_channel.name}' of sub-{subject}{'_ses-' + session if session else ''} "
                f"is ambiguous: {len(found)} candidates ({listing}).",
                hint=f"choose one with --bids-filter-file, e.g. "
                     f"{{\"{card_channel.name.lower()}\": {{\"acquisition\": \"<label>\"}}}}.",
            )
        candidates = next(iter(groups.values()))
        candidates.sort(key=lambda f: (int(f.entities.get("run", 0) or 0), f.path))
        chosen = candidates[-1]
        owner = chosen.get_entities(metadata=False)
        if str(owner.get("subject")) != subject or (owner.get("session") and str(owner["session"]) != session):
            raise BadInputData(f"Channel '{card_channel.name}' of sub-{subject} selected another session's image.",
                               path=chosen.path, hint="check --bids-filter-file and the file names.")
        reason = f"query {qi + 1}/{len(card_channel.queries)} ({query_text})"
        if user_filter:
            reason += f" + filter {user_filter}"
        reason += f" matched {Path(chosen.path).name}"
        if len(candidates) > 1:
            runs = [str(c.entities.get("run", "none")) for c in candidates]
            reason += f"; runs {', '.join(runs)}: chose the highest run (override with a 'run' filter)"
        try:
            metadata = layout.get_metadata(chosen.path)
        except Exception:  # noqa: BLE001 - metadata is informative only
            metadata = {}
        return SelectedFile(channel=card_channel.name, path=chosen.path, reason=reason,
                            metadata={k: v for k, v in metadata.items() if not isinstance(v, (dict, list))})
    return None


def _mp2rage_hint(layout, subject: str, session: str | None) -> str | None:
    from bids.layout import Query

    inversions = layout.get(subject=subject, session=session if session else Query.NONE, suffix="MP2RAGE",
                            extension=IMAGE_EXTENSIONS, return_type="filename")
    if inversions:
        return ("found MP2RAGE inversion images (" + ", ".join(Path(p).name for p in sorted(inversions)[:4]) +
                ") but no UNIT1 image; compute the uniform image (UNIT1) from them (e.g. with pymp2rage or the "
                "scanner's UNI reconstruction) and store it as *_UNIT1.nii.gz.")
    return None


def list_sessions(layout, participant_label=None, session_label=None) -> list[tuple[str, str | None]]:
    """(subject, session) pairs to consider, after the label filters.

    Raises
    ------
    NoMatchingInputs
        A requested participant or session does not exist, or nothing is left.
    """
    subjects = layout.get_subjects()
    if participant_label:
        missing = [p for p in participant_label if p not in subjects]
        if missing:
            raise NoMatchingInputs(
                f"Participant(s) {', '.join('sub-' + m for m in missing)} not found in the dataset "
                f"(it has {len(subjects)}: {', '.join('sub-' + s for s in subjects[:8])}"
                f"{'...' if len(subjects) > 8 else ''}).",
                hint="check --participant-label.")
        subjects = [s for s in subjects if s in participant_label]
    pairs: list[tuple[str, str | None]] = []
    seen_sessions: set[str] = set()
    for sub in sorted(subjects):
        sessions = layout.get_sessions(subject=sub)
        seen_sessions.update(sessions)
        if not sessions:
            if session_label:
                continue
            pairs.append((sub, None))
            continue
        for ses in sorted(sessions):
            if session_label and ses not in session_label:
                continue
            pairs.append((sub, ses))
    if session_label:
        missing = [s for s in session_label if s not in seen_sessions]
        if missing:
            raise NoMatchingInputs(f"Session(s) {', '.join('ses-' + m for m in missing)} not found for the "
                                   f"selected participants.", hint="check --session-label.")
    if not pairs:
        raise NoMatchingInputs("No participant/session matches the selection.",
                               hint="check --participant-label and --session-label.")
    return pairs


#: entities a filter file may not set: the session being processed decides them, so that a
#: filter can never pull another participant's or session's image into this one's outputs
SESSION_ENTITIES = ("subject", "session")


def check_filter_keys(card: ModelCard, bids_filters: dict | None) -> None:
    """Refuse filter-file entries that are not channels, and filters on subject or session.

    Raises
    ------
    UsageError
        An entry keyed by something else than a channel (or ``reference``), or an entry that
        filters on ``subject``/``sub`` or ``session``/``ses``.
    """
    if not bids_filters:
        return
    names = {c.name.lower() for c in card.channels} | {"reference"}
    unknown = [k for k in bids_filters if k.lower() not in names]
    if unknown:
        raise UsageError(f"--bids-filter-file has entries {unknown} that are not channels of the model "
                         f"(channels: {sorted(names)}).", hint="key the filters by the model's channel names.")
    for key, entry in bids_filters.items():
        if not isinstance(entry, dict):
            continue
        fixed = [k for k in entry if ENTITY_ALIASES.get(k, k) in SESSION_ENTITIES]
        if fixed:
            raise UsageError(
                f"--bids-filter-file entry '{key}' filters on {', '.join(repr(k) for k in fixed)}: each session "
                f"takes its images from its own subject and session only.",
                hint="remove that key; choose participants and sessions with --participant-label and "
                     "--session-label.")


def collect_session(layout, card: ModelCard, subject: str, session: str | None,
                    bids_filters: dict | None = None) -> SessionInputs | None:
    """Select every channel of one session.

    Returns
    -------
    SessionInputs, or None when the session has none of the model's images at all.

    Raises
    ------
    MissingInput
        Some channels were found but a required one is missing.
    NoMatchingInputs
        A channel has candidates but the user's filter excluded all of them.
    BadInputData
        Ambiguous candidates.
    """
    filters = {k.lower(): v for k, v in (bids_filters or {}).items()}
    selected: list[SelectedFile | None] = []
    for channel in card.channels:
        selected.append(select_channel_file(layout, channel, subject, session, filters.get(channel.name.lower())))
    label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    if all(s is None for s in selected):
        # nothing of ours here at all; but a filter that removes everything must be reported
        if filters:
            unfiltered = [select_channel_file(layout, c, subject, session, None) for c in card.channels]
            if any(u is not None for u in unfiltered):
                raise NoMatchingInputs(f"The --bids-filter-file selects no image of {label}.",
                                       hint="loosen the filters; they are applied on top of the model's queries.")
        return None
    for channel, sel in zip(card.channels, selected):
        if sel is None and channel.required:
            if filters.get(channel.name.lower()):
                if select_channel_file(layout, channel, subject, session, None) is not None:
                    raise NoMatchingInputs(f"The --bids-filter-file entry '{channel.name.lower()}' selects no image "
                                           f"of {label}.", hint="loosen that filter.")
            hint = _mp2rage_hint(layout, subject, session) if channel.name.lower() in ("t1w", "unit1", "mp2rage") \
                else None
            queries = " or ".join(", ".join(f"{k}={v}" for k, v in q.items()) for q in channel.queries)
            raise MissingInput(f"{label} has no '{channel.name}' image (looked for {queries}).",
                               hint=hint or f"add the {channel.name} image, or use a model that does not need it.")
    files = tuple(s for s in selected if s is not None)
    for f in files:
        LOGGER.info("%s %s: %s", label, f.channel, f.reason)
    return SessionInputs(subject=subject, session=session, files=files)


def discover(layout, card: ModelCard, participant_label=None, session_label=None,
             bids_filters: dict | None = None) -> tuple[list[SessionInputs], list[SessionFailure]]:
    """All sessions to process and the sessions that cannot be processed.

    Raises
    ------
    NoMatchingInputs
        Unknown participant/session labels, or no session has any of the model's images.
    UsageError
        Filter-file keys that are not channels of the model.
    """
    check_filter_keys(card, bids_filters)
    ok: list[SessionInputs] = []
    failed: list[SessionFailure] = []
    for sub, ses in list_sessions(layout, participant_label, session_label):
        try:
            inputs = collect_session(layout, card, sub, ses, bids_filters)
        except (MissingInput, BadInputData, NoMatchingInputs) as exc:
            failed.append(SessionFailure(sub, ses, exc))
            continue
        if inputs is None:
            LOGGER.info("sub-%s%s has none of the model's images; skipped.", sub, f"_ses-{ses}" if ses else "")
            continue
        ok.append(inputs)
    if not ok and not failed:
        channels = ", ".join(c.name for c in card.channels)
        raise NoMatchingInputs(f"No selected session has any of the model's input images ({channels}).",
                               hint="check the dataset, the labels and --bids-filter-file.")
    return ok, failed


# --------------------------------------------------------------------------------------
# Reference (manual) lesion masks for the evaluation
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceMasks:
    """Where a session's manual lesion masks are and how to read them.

    ``kind`` is ``dseg`` (one class map; ``value_map`` maps its values to the model's class
    indices), ``class_masks`` (one binary mask per model class: ``files`` in the model's label
    order, None where absent) or ``binary`` (one mask of all lesions; only class-agnostic
    metrics are computed).
    """

    kind: str
    files: tuple[str | None, ...]
    value_map: dict[int, int] = field(default_factory=dict)
    reason: str = ""


def _lookup_table(path: Path, root: Path) -> Path | None:
    candidates = [path.with_name(path.name.replace("".join(path.suffixes), ".tsv")), root / "dseg.tsv"]
    return next((c for c in candidates if c.is_file()), None)


def _dseg_value_map(lut: Path | None, card: ModelCard) -> dict[int, int]:
    """Map reference dseg values to model label indices by name/abbreviation (else identity)."""
    identity = {lab.index: lab.index for lab in card.labels}
    if lut is None:
        return identity
    import pandas as pd

    table = pd.read_csv(lut, sep="\t", dtype=str)
    names = {lab.name.lower(): lab.index for lab in card.labels}
    long_names = {lab.long_name.lower().replace(" ", "").replace("-", ""): lab.index for lab in card.labels
                  if lab.long_name}
    aliases = {"whitematterlesion": "wml", "corticallesion": "cl"}
    out: dict[int, int] = {}
    for _, row in table.iterrows():
        for col in ("abbreviation", "name"):
            value = str(row.get(col, "")).lower().replace(" ", "").replace("-", "")
            value = aliases.get(value, value)
            index = names.get(value, long_names.get(value))
            if index is not None:
                out[int(row["index"])] = index
                break
    return out or identity


def find_reference_masks(ref_dir: Path, card: ModelCard, subject: str, session: str | None,
                         user_filter: dict[str, Any] | None = None) -> ReferenceMasks | None:
    """Find a session's manual lesion masks in a BIDS derivatives folder.

    Preference: a class map ``*_desc-lesions_dseg`` (any ``desc`` if a filter says so), then
    one ``*_label-<class>_mask`` per model class, then a ``*_label-lesion_mask`` of all lesions.
    ``user_filter`` (the ``"reference"`` entry of ``--bids-filter-file``) narrows the search.

    Returns None when the session has no reference mask.
    """
    from bids import BIDSLayout
    from bids.layout import Query

    layout = BIDSLayout(str(ref_dir), validate=False, config=["bids", "derivatives"])
    base = {**_pybids_filters(user_filter or {}), "subject": subject, "session": session if session else Query.NONE,
            "extension": IMAGE_EXTENSIONS}
    dseg = layout.get(return_type="filename", suffix="dseg", **{"desc": "lesions", **base})
    if len(dseg) > 1:
        raise BadInputData(f"Several reference class maps for sub-{subject}: {[Path(p).name for p in dseg]}.",
                           hint='pick one with a "reference" entry in --bids-filter-file.')
    if dseg:
        path = Path(dseg[0])
        return ReferenceMasks("dseg", (str(path),), _dseg_value_map(_lookup_table(path, Path(ref_dir)), card),
                              f"class map {path.name}")
    per_class = []
    for lab in card.labels:
        found = layout.get(return_type="filename", suffix="mask", label=lab.name, **base)
        per_class.append(sorted(found)[-1] if found else None)
    if any(per_class):
        return ReferenceMasks("class_masks", tuple(per_class), {}, "per-class masks " + ", ".join(
            Path(p).name for p in per_class if p))
    union = layout.get(return_type="filename", suffix="mask", label="lesion", **base)
    if union:
        return ReferenceMasks("binary", (sorted(union)[-1],), {}, f"binary mask {Path(sorted(union)[-1]).name}")
    return None
