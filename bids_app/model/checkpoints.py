"""Checkpoints: nnU-Net ``checkpoint_*.pth`` read weights-only, and the weights of the ensemble
members.

Checkpoints are read with ``torch.load(weights_only=True)`` and an allow-list of the two numpy
globals that nnU-Net checkpoints contain (their optimizer and logging state); each member's
SHA-256 is checked against the card before it is read (:func:`bids_app.model.resolve.verify_members`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import BadInputData, MissingInput
from bids_app.model.card import sha256_file
from bids_app.model.resolve import ResolvedModel, verify_members


@dataclass(frozen=True)
class MemberWeights:
    """What the adapter needs of one member's checkpoint.

    ``name`` is the member's name: nnU-Net's fold folder is ``fold_<name>``.
    """

    name: str
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


def load_member_weights(model: ResolvedModel, members: list[str]) -> list[MemberWeights]:
    """Verify checksums, then load the weights of the chosen members (in that order)."""
    digests = verify_members(model, members)
    weights = []
    for member in members:
        checkpoint = load_checkpoint(model.member_checkpoint(member))
        init_args = checkpoint.get("init_args") or {}
        axes = checkpoint.get("inference_allowed_mirroring_axes")
        weights.append(
            MemberWeights(
                name=member,
                state_dict=checkpoint["network_weights"],
                trainer_name=str(checkpoint.get("trainer_name", "nnUNetTrainer")),
                configuration=str(init_args.get("configuration", model.card.configuration)),
                mirroring_axes=tuple(int(a) for a in axes) if axes is not None else None,
                sha256=digests[member],
            )
        )
    return weights
