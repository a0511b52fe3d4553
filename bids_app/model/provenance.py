"""The model block of every sidecar: where the model came from, its card and the checksums of
the members and files that ran."""

from __future__ import annotations

from typing import Any

from bids_app.model.card import MODEL_FILES, sha256_file
from bids_app.model.resolve import BUNDLED_MODELS_DIR, ResolvedModel


def model_source_block(model: ResolvedModel) -> dict[str, Any]:
    """Where the model came from: the DOI or URL and the checksums of the fetched archive
    (models pulled by :mod:`bids_app.model.cache`), else ``bundled`` or ``local``."""
    from bids_app.model.cache import source_of

    record = source_of(model.trainer_dir)
    if record:
        return {"Kind": "zenodo" if record.get("kind") == "zenodo" else "url", "Spec": record.get("spec"),
                "RegistryName": record.get("registry_name"), "DOI": record.get("doi"), "URL": record.get("url"),
                "File": record.get("file"), "ArchiveSize": record.get("size"), "ArchiveMD5": record.get("md5"),
                "ArchiveSHA256": record.get("sha256"), "CheckedAgainst": record.get("checked_against"),
                "Fetched": record.get("fetched")}
    bundled = model.trainer_dir.resolve().is_relative_to(BUNDLED_MODELS_DIR)
    return {"Kind": "bundled" if bundled else "local"}


def model_provenance(model: ResolvedModel, members: list[str], digests: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    """The model block written into every sidecar (``Members``: one entry per member that ran,
    ``Fold`` its name; ``digests``: member -> SHA-256 as verified, else the card's)."""
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
            {"Fold": member, "Checkpoint": f"fold_{member}/{card.checkpoint}",
             "SHA256": (digests or {}).get(member) or card.members.get(member, "")}
            for member in members
        ],
        "CardSHA256": sha256_file(model.card_path) if model.card_path else None,
        "Files": {name: sha256_file(model.trainer_dir / name) for name in MODEL_FILES},
        "FilesPinnedByCard": bool(card.files) and not card.inferred,
    }
