"""The one model loader: a resolved model and its chosen members -> verified weights and an
:class:`~bids_app.core.segment.EnsemblePredictor`.

Every place that runs the networks (the prediction and explanation nodes, the tests, the
benchmarks) loads them here, so they all run exactly the same ensemble: checksums are verified
before any checkpoint is unpickled (:func:`bids_app.model.checkpoints.load_member_weights`),
and ``plans.json`` and ``dataset.json`` are read from the model folder the card describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bids_app.model.card import read_json_file
from bids_app.model.checkpoints import MemberWeights, load_member_weights
from bids_app.model.resolve import ResolvedModel

if TYPE_CHECKING:
    from bids_app.core.segment import EnsemblePredictor


@dataclass(frozen=True)
class Ensemble:
    """A loaded ensemble.

    Attributes
    ----------
    model : ResolvedModel
        The model folder and its card.
    members : tuple of MemberWeights
        The verified weights of the members that run, in the order asked for.
    predictor : EnsemblePredictor
        Per-member softmax probabilities, shape (M, C, X, Y, Z).
    """

    model: ResolvedModel
    members: tuple[MemberWeights, ...]
    predictor: EnsemblePredictor

    @property
    def digests(self) -> dict[str, str]:
        """Member (fold name) -> SHA-256 of its checkpoint, as verified."""
        return {m.name: m.sha256 for m in self.members}


def load_ensemble(model: ResolvedModel, members: Sequence[str], *, device: Any = "cpu", tta: bool = True,
                  num_threads: int | None = None) -> Ensemble:
    """Verify and load the chosen members of ``model`` and build their predictor.

    Parameters
    ----------
    model : ResolvedModel
        From :func:`bids_app.model.resolve.resolve_model`.
    members : sequence of str
        Member names (the ``<name>`` of nnU-Net's ``fold_<name>`` folders), e.g. from
        :func:`bids_app.model.resolve.select_members`.
    device : str or torch.device
        ``cpu``, ``cuda`` or ``auto`` (:func:`bids_app.core.segment.resolve_device`).
    tta : bool
        Test-time mirroring.
    num_threads : int or None
        Torch CPU threads (None: leave torch's setting).

    Raises
    ------
    MissingInput, BadInputData
        A missing or altered checkpoint, ``plans.json`` or ``dataset.json``, or a checkpoint
        that needs more than tensors (see :func:`bids_app.model.checkpoints.load_checkpoint`).
    """
    from bids_app.core.segment import EnsemblePredictor, MemberInput

    weights = load_member_weights(model, list(members))  # checksums are verified before unpickling
    trainer_dir = model.trainer_dir
    predictor = EnsemblePredictor(
        read_json_file(trainer_dir / "plans.json", "plans.json"),
        read_json_file(trainer_dir / "dataset.json", "dataset.json"),
        [MemberInput(m.name, m.state_dict, m.mirroring_axes) for m in weights],
        configuration=model.card.configuration, device=device, tta=tta, num_threads=num_threads,
    )
    return Ensemble(model=model, members=tuple(weights), predictor=predictor)
