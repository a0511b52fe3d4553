"""nnU-Net v2 plans for small networks.

``reduce_plans`` applies the reduced-plans recipe of ``docs/demo-model.md`` (fewer stages, narrower) to
plans written by ``nnUNetv2_plan_experiment``; ``make_plans`` writes plans of the same
structure from scratch (used by the tiny test models, where running nnU-Net's planner would
cost ~25 s per test session), for one of the configurations nnU-Net plans: ``3d_fullres``,
``3d_lowres`` (the same network on a coarser grid) or ``2d`` (a 2D network applied slice by
slice; spacing and patch in-plane only, as ``ExperimentPlanner.plan_experiment`` writes them);
``add_cascade`` adds the ``3d_cascade_fullres`` stage nnU-Net plans beside ``3d_lowres``
(docs/model-card.md, "Configurations and checkpoints").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

#: the configurations :func:`make_plans` writes (nnU-Net's single-stage ones)
CONFIGURATIONS = ("3d_fullres", "3d_lowres", "2d")


def _arch(n_stages: int, features: Sequence[int], n_conv: int = 2, ndim: int = 3) -> dict:
    kernel = [[3] * ndim] * n_stages
    strides = [[1] * ndim] + [[2] * ndim] * (n_stages - 1)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(features),
            "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
            "kernel_sizes": kernel,
            "strides": strides,
            "n_conv_per_stage": [n_conv] * n_stages,
            "n_conv_per_stage_decoder": [n_conv] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def make_plans(
    dataset_name: str,
    n_channels: int,
    spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0),
    patch_size_xyz: Sequence[int] = (64, 64, 64),
    features: Sequence[int] = (8, 16, 32, 64),
    batch_size: int = 2,
    plans_name: str = "nnUNetPlans",
    median_shape_xyz: Sequence[int] = (128, 128, 128),
    configuration: str = "3d_fullres",
) -> dict:
    """Plans with the structure ``nnUNetv2_plan_experiment`` writes: one configuration, a
    PlainConvUNet with ``len(features)`` stages and z-score normalisation.

    Sizes are given in nibabel order (x, y, z) and stored in nnU-Net's (z, y, x) order.

    Parameters
    ----------
    spacing_xyz : 3 floats
        Voxel size in mm of the network's grid. ``2d`` stores the in-plane (x, y) part only,
        as nnU-Net's planner does; the slices are along z, nnU-Net's first axis.
    patch_size_xyz : 3 ints (2 for ``2d``: x, y)
    median_shape_xyz : 3 ints
        ``2d`` stores the in-plane part.
    configuration : str
        ``3d_fullres``, ``3d_lowres`` (a 3D configuration under another name: give it the
        coarser spacing) or ``2d`` (Conv2d / InstanceNorm2d network, 2D patch).
    """
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration must be one of {', '.join(CONFIGURATIONS)}")
    ndim = 2 if configuration == "2d" else 3
    if len(patch_size_xyz) != ndim or len(spacing_xyz) != 3:
        raise ValueError(f"{configuration} needs {ndim} patch sides and 3 spacings")
    n_stages = len(features)
    divisor = 2 ** (n_stages - 1)
    if any(int(p) % divisor for p in patch_size_xyz):
        raise ValueError(f"patch sides must be multiples of {divisor} for {n_stages} stages")
    spacing_full = [float(s) for s in reversed(spacing_xyz)]
    spacing = spacing_full[3 - ndim:]
    patch = [int(p) for p in reversed(patch_size_xyz)]
    median_full = [float(s) for s in reversed(median_shape_xyz)]
    median = median_full[3 - ndim:]
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    }
    config = {
        "data_identifier": f"{plans_name}_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": patch,
        "median_image_size_in_voxels": median,
        "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"] * n_channels,
        "use_mask_for_norm": [True] * n_channels,
        **resampling,
        "architecture": _arch(n_stages, features, ndim=ndim),
        "batch_dice": configuration == "2d",
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": spacing_full,
        "original_median_shape_after_transp": [int(m) for m in median_full],
        "image_reader_writer": "NibabelIOWithReorient",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "msxplain.training.plans.make_plans",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 5.0, "mean": 1.0, "median": 1.0, "min": -5.0,
                     "percentile_00_5": -3.0, "percentile_99_5": 3.0, "std": 1.0}
            for c in range(n_channels)
        },
    }


def add_cascade(plans: dict, lowres: dict) -> dict:
    """Plans with a ``3d_lowres`` stage and the ``3d_cascade_fullres`` configuration beside the
    ``3d_fullres`` of ``plans``, as ``ExperimentPlanner.plan_experiment`` writes them when the
    full-resolution patch covers little of the median image.

    Parameters
    ----------
    plans : dict
        Plans with a ``3d_fullres`` configuration (:func:`make_plans`).
    lowres : dict
        Plans with a ``3d_lowres`` configuration (:func:`make_plans` with the coarser spacing).
    """
    out = copy.deepcopy(plans)
    stage = copy.deepcopy(lowres["configurations"]["3d_lowres"])
    stage["next_stage"] = "3d_cascade_fullres"
    out["configurations"] = {"3d_lowres": stage, **out["configurations"],
                             "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}
    return out


def reduce_plans(
    plans: dict,
    features: Sequence[int] = (8, 16, 32, 64),
    patch_size_xyz: Sequence[int] | None = None,
    plans_name: str = "nnUNetPlansSmall",
    spacing_xyz: Sequence[float] | None = None,
    batch_size: int | None = None,
) -> dict:
    """Shrink the ``3d_fullres`` network of real nnU-Net plans (recipe: ``docs/demo-model.md``).

    Keeps nnU-Net's normalisation and resampling; shortens the per-stage lists to
    ``len(features)`` stages (or extends them with 3x3x3, stride-2 stages when nnU-Net planned
    fewer, as for small images); keeps only ``3d_fullres``. ``data_identifier`` is left unchanged
    when the spacing is unchanged, so the preprocessed data can be reused.
    """
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    cfg = out["configurations"]["3d_fullres"]
    out["configurations"] = {"3d_fullres": cfg}
    n = len(features)
    kw = cfg["architecture"]["arch_kwargs"]
    kw["n_stages"] = n
    kw["features_per_stage"] = list(features)
    # more stages than nnU-Net planned (small images): 3x3x3 kernels, stride 2, 2 convolutions
    extra = max(0, n - len(kw["kernel_sizes"]))
    kw["kernel_sizes"] = (kw["kernel_sizes"] + [[3, 3, 3]] * extra)[:n]
    kw["strides"] = (kw["strides"] + [[2, 2, 2]] * extra)[:n]
    kw["n_conv_per_stage"] = (kw["n_conv_per_stage"] + [2] * extra)[:n]
    kw["n_conv_per_stage_decoder"] = (kw["n_conv_per_stage_decoder"] + [2] * extra)[: n - 1]
    if patch_size_xyz is not None:
        cfg["patch_size"] = [int(p) for p in reversed(patch_size_xyz)]
    if spacing_xyz is not None:
        cfg["spacing"] = [float(s) for s in reversed(spacing_xyz)]
        cfg["data_identifier"] = f"{plans_name}_3d_fullres"
    if batch_size is not None:
        cfg["batch_size"] = int(batch_size)
    divisor = [1, 1, 1]
    for s in kw["strides"]:
        divisor = [d * int(x) for d, x in zip(divisor, s)]
    if any(p % d for p, d in zip(cfg["patch_size"], divisor)):
        raise ValueError(f"patch {cfg['patch_size']} not divisible by the total stride {divisor}")
    return out
