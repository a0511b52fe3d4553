"""The nnU-Net adapter: per-member softmax probabilities in the input image's geometry.

This is the only module of msxplain that imports :mod:`nnunetv2`. nnU-Net's predictor
averages the **logits** of the folds before the softmax
(``nnUNetPredictor.predict_logits_from_preprocessed_data``), which
throws away the disagreement that deep-ensemble uncertainty needs. :class:`EnsemblePredictor`
therefore runs nnU-Net's own preprocessing once and then, for each member, nnU-Net's own
sliding-window inference (Gaussian weighting, optional mirroring) and nnU-Net's own export
(resampling the logits back, softmax, un-cropping). Each member's output is bit-for-bit what
``nnUNetPredictor`` gives when it is run with that single fold (on CUDA, where the mirrorings of
a tile go through the network as one batch, within float rounding).

Everything runs in this process: no worker pools, so no large ``/dev/shm`` is needed and no
stray worker processes are left behind (nnU-Net issue #1789).

Network construction does not look up the trainer class by name: the network is rebuilt from
``plans.json`` (valid for nnU-Net's standard PlainConvUNet and ResidualEncoderUNet trainers,
which do not override ``build_network_architecture``). A model folder is untrusted, so every
class name the plans give is checked against the exact allow-lists of
:mod:`bids_app.core.plans_allowlist` and imported from those tables, never located by the name itself
(nnU-Net's ``pydoc.locate`` follows attributes: ``...unet.torch.hub.load`` is ``torch.hub.load``);
the other names nnU-Net resolves from the plans (preprocessor, normalisation, resampling,
label manager) are checked before :class:`EnsemblePredictor` hands the plans to nnU-Net.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bids_app.core.imageio import from_nnunet_order, to_nnunet_order
from bids_app.errors import BadInputData, UsageError

LOGGER = logging.getLogger("bids_app.core.segment")


def resolve_device(requested: str = "auto"):
    """``auto`` | ``cpu`` | ``cuda`` -> :class:`torch.device`.

    Raises
    ------
    UsageError
        CUDA was requested but no GPU is visible (a forgotten ``--gpus all`` / ``--nv``).
    """
    import torch

    requested = (requested or "auto").lower()
    if requested == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda":
        if not has_cuda:
            raise UsageError(
                "--device cuda was requested but PyTorch sees no CUDA GPU.",
                hint="run the container with 'docker run --gpus all' or 'singularity run --nv', check "
                "CUDA_VISIBLE_DEVICES, or use --device cpu.",
            )
        return torch.device("cuda", 0)
    if requested != "auto":
        raise UsageError(f"Unknown device {requested!r}.", hint="use auto, cpu or cuda.")
    return torch.device("cuda", 0) if has_cuda else torch.device("cpu")


def build_network(plans: dict, configuration: str, n_input_channels: int, n_output_channels: int):
    """Build the member network from the plans, with deep supervision off.

    What nnU-Net's ``get_network_from_plans(..., allow_init=False, deep_supervision=False)``
    builds, but the network and layer classes come from the allow-lists of
    :mod:`bids_app.core.plans_allowlist` (checked by exact name, imported from the table), never from
    ``pydoc.locate`` of a string in the plans.

    Parameters
    ----------
    plans : dict
        Parsed ``plans.json``.
    configuration : str
        e.g. ``'3d_fullres'``.
    n_input_channels, n_output_channels : int

    Returns
    -------
    torch.nn.Module
        In eval mode, on the CPU.

    Raises
    ------
    BadInputData
        The plans name a class outside the allow-lists, or their network cannot be built.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from bids_app.core.plans_allowlist import check_plans, import_allowed

    check_plans(plans, configuration)  # before nnU-Net's PlansManager reads anything
    try:
        # nnU-Net resolves inheritance and converts pre-2.4 plans (names it builds itself)
        cm = PlansManager(plans).get_configuration(configuration)
        arch_name = cm.network_arch_class_name
        kwargs = dict(cm.network_arch_init_kwargs)
        requires_import = list(cm.network_arch_init_kwargs_req_import)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BadInputData(f"plans.json cannot be read by nnU-Net ({type(exc).__name__}: {exc}).",
                           hint="the plans file is corrupt or not nnU-Net v2's; re-download the model.") from None
    network_class = import_allowed(arch_name, "network")
    for key in requires_import:  # the same check again, on the names nnU-Net produced
        if kwargs.get(key) is not None:
            kwargs[key] = import_allowed(kwargs[key], key)
    kwargs["deep_supervision"] = False
    try:
        network = network_class(input_channels=n_input_channels, num_classes=n_output_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError, RuntimeError) as exc:
        raise BadInputData(f"The network in plans.json cannot be built ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}).",
                           hint="the plans file is corrupt or was edited; re-download the model.") from None
    network.eval()
    return network


@dataclass(frozen=True)
class MemberInput:
    """The weights of one ensemble member (see :func:`bids_app.model.checkpoints.load_member_weights`)."""

    name: str
    state_dict: dict
    mirroring_axes: tuple[int, ...] | None


class EnsemblePredictor:
    """Run an nnU-Net v2 ensemble member by member.

    Parameters
    ----------
    plans, dataset_json : dict
        Parsed ``plans.json`` and ``dataset.json`` of the trained model.
    members : list of MemberInput
    configuration : str
    device : torch.device or str
    tta : bool
        Test-time mirroring over the axes the checkpoint allows (nnU-Net's default).
    tile_step_size : float
        Sliding-window step as a fraction of the patch (nnU-Net's default 0.5).
    num_threads : int or None
        torch intra-op threads (None leaves torch's setting).
    mirror_batch : int or None
        With ``tta``, how many mirrorings of a tile go through the network in one forward pass
        (``1``: one pass per mirroring, as ``nnUNetPredictor``; ``8``: the tile and its seven
        mirrorings as one batch of 8). None: 8 on CUDA (fewer, fuller kernel launches; issue 17),
        1 on the CPU (bit-for-bit nnU-Net). Batched results equal the sequential ones up to float
        rounding (the same sum in the same order; InstanceNorm is per sample), which nnU-Net's
        float16 accumulation of the tiles' logits can show as one last-bit change (measured on the
        CPU: probabilities within 3e-5 to 2.2e-4, tests/test_mirror_batch.py).
    """

    def __init__(
        self,
        plans: dict,
        dataset_json: dict,
        members: Sequence[MemberInput],
        configuration: str = "3d_fullres",
        device: Any = "cpu",
        tta: bool = True,
        tile_step_size: float = 0.5,
        num_threads: int | None = None,
        mirror_batch: int | None = None,
    ):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from bids_app.core.plans_allowlist import check_dataset_json, check_plans

        if not members:
            raise UsageError("An ensemble needs at least one member.")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.num_threads = int(num_threads or torch.get_num_threads())
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        # every class name nnU-Net will resolve from these files is allow-listed first
        check_plans(plans, configuration, n_channels=len(check_dataset_json(dataset_json)))
        self.plans_manager = PlansManager(plans)
        if configuration not in plans.get("configurations", {}):
            raise BadInputData(f"Configuration '{configuration}' is not in plans.json "
                               f"(has {', '.join(plans.get('configurations', {}))}).",
                               hint="fix nnunet.configuration in the model card.")
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.dataset_json = dataset_json
        self.label_manager = self.plans_manager.get_label_manager(dataset_json)
        self.n_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager, dataset_json)
        self.n_classes = self.label_manager.num_segmentation_heads
        if self.label_manager.has_regions:
            raise BadInputData("Region-based nnU-Net models are not supported (their outputs are not a softmax).",
                               hint="use a model trained with plain labels.")
        network = build_network(plans, configuration, self.n_channels, self.n_classes)
        self.members = list(members)
        for m in self.members:  # fail early and clearly on a mismatching checkpoint
            try:
                network.load_state_dict(m.state_dict)
            except RuntimeError as exc:
                raise BadInputData(f"Member fold_{m.name} does not fit the network in plans.json "
                                   f"({str(exc).splitlines()[0]}).",
                                   hint="the model folder mixes files of different models.") from None
        axes = self.members[0].mirroring_axes
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints instead of logging
            predictor = nnUNetPredictor(
                tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=tta,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False,
            )
        predictor.manual_initialization(
            network, self.plans_manager, self.configuration_manager, None, dataset_json,
            "nnUNetTrainer", axes,
        )
        self._predictor = predictor
        self.tta = bool(tta)
        self.tile_step_size = float(tile_step_size)
        if mirror_batch is None:
            mirror_batch = 8 if self.device.type == "cuda" else 1
        if int(mirror_batch) < 1:
            raise UsageError(f"mirror_batch must be >= 1, got {mirror_batch}.")
        self.mirror_batch = int(mirror_batch)

    @property
    def network(self):
        """The architecture (deep supervision off) with the weights last loaded; for the
        explanation engine, which copies it once per member (:meth:`member_networks`)."""
        return self._predictor.network

    def member_networks(self) -> tuple[list, list[str]]:
        """One eval-mode network per member (deep copies with that member's weights)."""
        import copy

        nets, names = [], []
        for member in self.members:
            net = copy.deepcopy(self._predictor.network)
            net.load_state_dict(member.state_dict)
            net.eval()
            nets.append(net)
            names.append(str(member.name))
        return nets, names

    @property
    def mirroring_axes(self) -> tuple[int, ...] | None:
        return self._predictor.allowed_mirroring_axes if self.tta else None

    @property
    def target_spacing(self) -> list[float]:
        """The network's working spacing in mm, in nibabel order (x, y, z)."""
        spacing_zyx = self.configuration_manager.spacing
        return [float(s) for s in reversed(spacing_zyx)]

    def preprocess(self, channels: np.ndarray, zooms: Sequence[float]):
        """nnU-Net preprocessing (crop to non-zero, normalise, resample) of one case.

        Parameters
        ----------
        channels : ndarray of float32, shape (K, X, Y, Z)
        zooms : 3 floats, voxel size in mm along X, Y, Z

        Returns
        -------
        data : torch.Tensor, shape (K, z', y', x')
            On nnU-Net's grid (SimpleITK axis order).
        properties : dict
            What :meth:`to_input_geometry` needs to map network outputs back.
        """
        import torch

        channels = np.asarray(channels, dtype=np.float32)
        if channels.ndim != 4 or channels.shape[0] != self.n_channels:
            raise BadInputData(
                f"The model expects {self.n_channels} input channel(s), "
                f"got {channels.shape[0] if channels.ndim == 4 else channels.ndim}.",
                hint="check the model card's channels against the selected images.",
            )
        array, spacing = to_nnunet_order(channels, tuple(zooms))
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, properties = preprocessor.run_case_npy(
                np.ascontiguousarray(array), None, {"spacing": spacing},
                self.plans_manager, self.configuration_manager, self.dataset_json,
            )
        return torch.from_numpy(np.ascontiguousarray(data)).float(), properties

    def member_logits(self, member: MemberInput, data, on_tile=None):
        """Sliding-window logits of one member on the preprocessed grid, shape (C, z', y', x').

        ``on_tile(done, total)`` is called after each sliding-window tile (with all its
        mirrorings), for progress reporting.
        """
        self._predictor.network.load_state_dict(member.state_dict)
        if self.tta and member.mirroring_axes != self._predictor.allowed_mirroring_axes:
            self._predictor.allowed_mirroring_axes = member.mirroring_axes
        with contextlib.redirect_stdout(io.StringIO()), _batched_mirroring(self._predictor, self.mirror_batch), \
                _counting_tiles(self._predictor, on_tile):
            return self._predictor.predict_sliding_window_return_logits(data).cpu()

    def to_input_geometry(self, logits, properties: dict) -> np.ndarray:
        """Logits on nnU-Net's grid -> softmax probabilities on the input grid, shape (C, X, Y, Z)."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        with contextlib.redirect_stdout(io.StringIO()):
            _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
                return_probabilities=True, num_threads_torch=self.num_threads,
            )
        return from_nnunet_order(np.asarray(probs, dtype=np.float32))

    def predict(self, channels: np.ndarray, zooms: Sequence[float], progress=None) -> np.ndarray:
        """Per-member softmax probabilities.

        Parameters
        ----------
        channels : ndarray of float32, shape (K, X, Y, Z)
            The input channels on one grid, in the model card's channel order.
        zooms : 3 floats
            Voxel size in mm along X, Y, Z.
        progress : callable or None
            Called as ``progress(member, n_members, tile, n_tiles)`` after each sliding-window
            tile (with its mirrorings) of each member; ``member`` and ``tile`` count from 1.

        Returns
        -------
        ndarray of float32, shape (M, C, X, Y, Z)
            Softmax over the C classes (background first), per member, on the input grid.
        """
        import torch

        data, properties = self.preprocess(channels, zooms)
        shape = np.asarray(channels).shape[1:]
        n_members = len(self.members)
        out = np.empty((n_members, self.n_classes, *shape), dtype=np.float32)
        with torch.inference_mode():
            for i, member in enumerate(self.members):
                on_tile = None
                if progress is not None:
                    def on_tile(done, total, _member=i + 1):
                        progress(_member, n_members, done, total)
                logits = self.member_logits(member, data, on_tile)
                out[i] = self.to_input_geometry(logits, properties)
                del logits
        return out


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The flips of a tile that nnU-Net's test-time mirroring averages, in its order: none, then
    every non-empty combination of the tensor axes (``mirror_axes`` + 2: batch and channel
    first) by increasing size (``nnUNetPredictor._internal_maybe_mirror_and_predict``)."""
    import itertools

    axes = [int(a) + 2 for a in mirror_axes]
    return [()] + [c for k in range(len(axes)) for c in itertools.combinations(axes, k + 1)]


def mirrored_prediction(network, x, mirror_axes: Sequence[int] | None, batch: int):
    """Mean of the network's logits over the mirrorings of ``x``, ``batch`` mirrorings per forward pass.

    Parameters
    ----------
    network : torch.nn.Module
    x : torch.Tensor, shape (1, K, *spatial)
        One tile.
    mirror_axes : sequence of int or None
        Spatial axes that may be flipped (None or empty: no mirroring).
    batch : int
        Mirrorings per forward pass (>= 1).

    Returns
    -------
    torch.Tensor, shape (1, C, *spatial)
        ``(f(x) + sum_a flip_a(f(flip_a(x)))) / n`` summed in nnU-Net's order.
    """
    import torch

    combos = mirror_combinations(mirror_axes) if mirror_axes else [()]
    prediction = None
    for start in range(0, len(combos), batch):
        chunk = combos[start:start + batch]
        inputs = torch.cat([torch.flip(x, c) if c else x for c in chunk])
        outputs = network(inputs)
        for i, c in enumerate(chunk):
            out = outputs[i:i + 1]
            out = torch.flip(out, c) if c else out
            prediction = out.clone() if prediction is None else prediction + out
    if len(combos) > 1:
        prediction /= len(combos)
    return prediction


@contextlib.contextmanager
def _batched_mirroring(predictor, batch: int):
    """Route nnU-Net's per-tile mirroring through :func:`mirrored_prediction` with ``batch``
    mirrorings per pass, on this predictor instance only (``batch`` 1: nnU-Net's own code)."""
    if batch <= 1 or not predictor.use_mirroring:
        yield
        return

    def tile(x):
        return mirrored_prediction(predictor.network, x, predictor.allowed_mirroring_axes, batch)

    predictor._internal_maybe_mirror_and_predict = tile
    try:
        yield
    finally:
        predictor.__dict__.pop("_internal_maybe_mirror_and_predict", None)


@contextlib.contextmanager
def _counting_tiles(predictor, on_tile):
    """Count nnU-Net's sliding-window tiles while the block runs (``on_tile(done, total)``).

    nnU-Net has no progress hook but tqdm; its per-tile method and the method that receives the
    tile list are wrapped on this predictor instance only, and restored afterwards.
    """
    if on_tile is None:
        yield
        return
    state = {"done": 0, "total": 0}
    run_windows = predictor._internal_predict_sliding_window_return_logits
    predict_tile = predictor._internal_maybe_mirror_and_predict

    def windows(data, slicers, *args, **kwargs):
        state["done"], state["total"] = 0, len(slicers)
        return run_windows(data, slicers, *args, **kwargs)

    def tile(x):
        result = predict_tile(x)
        state["done"] += 1
        on_tile(state["done"], state["total"])
        return result

    shadowed = predictor.__dict__.get("_internal_maybe_mirror_and_predict")  # _batched_mirroring's, if any
    predictor._internal_predict_sliding_window_return_logits = windows
    predictor._internal_maybe_mirror_and_predict = tile
    try:
        yield
    finally:  # the instance attributes shadowed the class methods: removing them restores those
        del predictor._internal_predict_sliding_window_return_logits
        del predictor._internal_maybe_mirror_and_predict
        if shadowed is not None:
            predictor._internal_maybe_mirror_and_predict = shadowed
