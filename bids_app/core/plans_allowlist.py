"""What an untrusted ``plans.json`` and ``dataset.json`` may name: exact allow-lists.

nnU-Net turns strings of a trained model's ``plans.json`` into Python objects: the network
class and its layer classes by dotted name (``pydoc.locate`` in
``nnunetv2.utilities.get_network_from_plans``, which follows attributes of any module it can
import, so ``dynamic_network_architectures.architectures.unet.torch.hub.load`` is
``torch.hub.load``), and the preprocessor, normalisation, resampling, label-manager and
reader-writer classes by bare name (``recursive_find_python_class``, which returns any
attribute of any module of an nnunetv2 sub-package). A model folder is untrusted input, so
every name that msxplain's code path can make nnU-Net resolve is checked here, by **exact
string match** against the tables below, before any nnU-Net object is constructed:

================================================ ===================================================
``plans.json`` / ``dataset.json`` key            resolved by nnU-Net (or msxplain) with
================================================ ===================================================
``architecture.network_class_name``              :data:`NETWORK_CLASSES` (msxplain imports it itself)
``architecture.arch_kwargs[k]``, k in            :data:`LAYER_CLASSES` ``[k]`` (msxplain imports it)
``architecture._kw_requires_import``
``UNet_class_name`` (plans before nnU-Net 2.4)   :data:`LEGACY_UNET_CLASS_NAMES`
``preprocessor_name``                            :data:`PREPROCESSORS`
``normalization_schemes[c]``                     :data:`NORMALIZATION_SCHEMES`
``resampling_fn_{data,seg,probabilities}``       :data:`RESAMPLING_FUNCTIONS`
``label_manager``                                :data:`LABEL_MANAGERS`
``image_reader_writer``,                         :data:`IMAGE_READER_WRITERS`
``overwrite_image_reader_writer`` (dataset.json)
================================================ ===================================================

Names nnU-Net never resolves on msxplain's path (``experiment_planner_used``, the trainer
name in the checkpoint and the card) are not checked: msxplain rebuilds the network from the
plans and never looks a trainer up. Everything else the network constructor receives must be
plain JSON data, and no string in it may look like a dotted Python name.

This module is pure: it imports nothing from nnU-Net or torch except, in
:func:`import_allowed`, the module a table entry names.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any

from bids_app.errors import BadInputData

# --------------------------------------------------------------------------------------
# Allow-lists
# --------------------------------------------------------------------------------------
_DNA = "dynamic_network_architectures"

#: network classes: name in plans.json -> (module, attribute) msxplain imports
NETWORK_CLASSES: dict[str, tuple[str, str]] = {
    f"{_DNA}.architectures.unet.PlainConvUNet": (f"{_DNA}.architectures.unet", "PlainConvUNet"),
    f"{_DNA}.architectures.unet.ResidualEncoderUNet": (f"{_DNA}.architectures.unet", "ResidualEncoderUNet"),
    f"{_DNA}.architectures.unet.ResidualUNet": (f"{_DNA}.architectures.unet", "ResidualUNet"),
    # the name nnU-Net's own conversion of pre-2.4 plans writes; nnU-Net finds the class in
    # dynamic_network_architectures.architectures.unet, and so does msxplain
    f"{_DNA}.architectures.residual_unet.ResidualEncoderUNet": (f"{_DNA}.architectures.unet", "ResidualEncoderUNet"),
}

#: the network classes of plans written before nnU-Net 2.4 (``UNet_class_name``), which
#: nnU-Net maps to the first two entries of :data:`NETWORK_CLASSES` itself
LEGACY_UNET_CLASS_NAMES = frozenset({"PlainConvUNet", "ResidualEncoderUNet"})


def _torch_layers(module: str, names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Both spellings nnU-Net writes: ``torch.nn.X`` and ``torch.nn.modules.<module>.X``."""
    table = {}
    for name in names:
        table[f"torch.nn.{name}"] = ("torch.nn", name)
        table[f"torch.nn.modules.{module}.{name}"] = (f"torch.nn.modules.{module}", name)
    return table


#: layer classes by the ``arch_kwargs`` key that receives them: name -> (module, attribute).
#: GroupNorm/LayerNorm are absent: dynamic_network_architectures calls ``norm_op(channels)``,
#: which is not their signature.
LAYER_CLASSES: dict[str, dict[str, tuple[str, str]]] = {
    "conv_op": _torch_layers("conv", ("Conv1d", "Conv2d", "Conv3d")),
    "norm_op": {**_torch_layers("instancenorm", ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")),
                **_torch_layers("batchnorm", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))},
    "dropout_op": _torch_layers("dropout", ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d")),
    "nonlin": _torch_layers("activation", ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SELU", "SiLU")),
    "block": {f"{_DNA}.building_blocks.residual.{n}": (f"{_DNA}.building_blocks.residual", n)
              for n in ("BasicBlockD", "BottleneckD")},
}

#: ``preprocessor_name`` (msxplain calls ``run_case_npy`` of the default preprocessor)
PREPROCESSORS = frozenset({"DefaultPreprocessor"})
#: ``normalization_schemes``: the classes of nnunetv2.preprocessing.normalization
NORMALIZATION_SCHEMES = frozenset({"ZScoreNormalization", "CTNormalization", "NoNormalization",
                                   "RescaleTo01Normalization", "RGBTo01Normalization"})
#: ``resampling_fn_*``: the resampling functions of nnunetv2.preprocessing.resampling
RESAMPLING_FUNCTIONS = frozenset({"resample_data_or_seg_to_shape", "resample_torch_fornnunet"})
RESAMPLING_KEYS = ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")
#: ``label_manager``
LABEL_MANAGERS = frozenset({"LabelManager"})
#: ``image_reader_writer`` / ``overwrite_image_reader_writer``: nnU-Net's LIST_OF_IO_CLASSES
IMAGE_READER_WRITERS = frozenset({"NibabelIO", "NibabelIOWithReorient", "SimpleITKIO", "Tiff3DIO",
                                  "NaturalImage2DIO"})

#: a string that Python could resolve as a dotted name (``a.b``, ``os.system``...)
_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _bad(message: str, source: str | None, hint: str) -> BadInputData:
    return BadInputData(message, path=source, hint=hint)


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def check_json_data(value: Any, where: str, source: str | None = None, *, names_allowed: bool = True) -> None:
    """Refuse anything but JSON data (dict with str keys, list, str, number, bool, None).

    Parameters
    ----------
    value : object
    where : str
        The key path, for the message (e.g. ``"arch_kwargs['nonlin_kwargs']"``).
    source : str or None
        The file, for the message.
    names_allowed : bool
        False: a string that looks like a dotted Python name is refused too (the network
        constructor must not receive something it, or a later version of it, could import).

    Raises
    ------
    BadInputData
    """
    if value is None or isinstance(value, bool) or is_int(value):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(f"plans.json has a non-finite number at {where}.", source, "the plans file is corrupt.")
        return
    if isinstance(value, str):
        if not names_allowed and _DOTTED_NAME.match(value):
            raise _bad(f"plans.json names '{value}' at {where}, a Python object that msxplain does not import "
                       "(it is not an nnU-Net network building block).", source,
                       "only the classes listed in docs/model-card.md may be named in plans.json.")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_json_data(item, f"{where}[{i}]", source, names_allowed=names_allowed)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(f"plans.json has a non-string key at {where}.", source, "the plans file is corrupt.")
            check_json_data(item, f"{where}['{key}']", source, names_allowed=names_allowed)
        return
    raise _bad(f"plans.json has a {type(value).__name__} at {where}, which is not JSON data.", source,
               "pass plans.json as parsed JSON.")


def _short(names) -> str:
    """The class names of a table, for messages (the full spellings are in docs/model-card.md)."""
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def _need_name(config: dict, key: str, allowed: frozenset[str], what: str, source: str | None) -> str:
    value = config.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise _bad(f"plans.json names {value!r} as the {what} ('{key}'), which is not one msxplain accepts "
                   f"({', '.join(sorted(allowed))}).", source,
                   "use a model planned and trained with standard nnU-Net v2 (see docs/model-card.md).")
    return value


def _resolve_inheritance(configurations: dict, name: str, source: str | None) -> dict:
    """The configuration as nnU-Net's PlansManager resolves it (``inherits_from``, parent first)."""
    chain: list[str] = []
    current = name
    while True:
        if current in chain:
            raise _bad(f"plans.json configuration '{name}' inherits from itself ({' -> '.join([*chain, current])}).",
                       source, "fix 'inherits_from' in plans.json.")
        if current not in configurations:
            raise _bad(f"Configuration '{current}' is not in plans.json (has {', '.join(map(str, configurations))}).",
                       source, "fix nnunet.configuration in the model card.")
        config = configurations[current]
        if not isinstance(config, dict):
            raise _bad(f"plans.json configuration '{current}' is not an object.", source, "the plans file is corrupt.")
        chain.append(current)
        parent = config.get("inherits_from")
        if parent is None:
            break
        if not isinstance(parent, str):
            raise _bad(f"plans.json configuration '{current}' has a non-string 'inherits_from'.", source,
                       "the plans file is corrupt.")
        current = parent
    resolved: dict = {}
    for link in reversed(chain):  # parent first, children override (nnU-Net: base.update(child))
        resolved.update(configurations[link])
    return resolved


# --------------------------------------------------------------------------------------
# plans.json
# --------------------------------------------------------------------------------------
def _check_architecture(config: dict, source: str | None) -> None:
    arch = config.get("architecture")
    if arch is None:
        # pre-2.4 plans: nnU-Net builds the names itself from this one word
        _need_name(config, "UNet_class_name", LEGACY_UNET_CLASS_NAMES, "network class", source)
        return
    if not isinstance(arch, dict):
        raise _bad("plans.json 'architecture' is not an object.", source, "the plans file is corrupt.")
    name = arch.get("network_class_name")
    if not isinstance(name, str) or name not in NETWORK_CLASSES:
        raise _bad(f"plans.json names {name!r} as the network class, which is not an nnU-Net network building block "
                   f"msxplain accepts ({_short(NETWORK_CLASSES)} of dynamic_network_architectures, by their exact "
                   "names).", source,
                   "use a model with a standard dynamic_network_architectures U-Net (see docs/model-card.md).")
    kwargs = arch.get("arch_kwargs")
    if not isinstance(kwargs, dict):
        raise _bad("plans.json 'architecture.arch_kwargs' is not an object.", source, "the plans file is corrupt.")
    req = arch.get("_kw_requires_import", [])
    if not isinstance(req, list) or not all(isinstance(k, str) for k in req):
        raise _bad("plans.json 'architecture._kw_requires_import' is not a list of key names.", source,
                   "the plans file is corrupt.")
    for key in req:
        if key not in LAYER_CLASSES:
            raise _bad(f"plans.json asks to import arch_kwargs['{key}'], which is not an nnU-Net network building "
                       f"block msxplain accepts (it imports only {', '.join(LAYER_CLASSES)}).", source,
                       "use a model planned with standard nnU-Net v2 (see docs/model-card.md).")
        if key not in kwargs:
            raise _bad(f"plans.json lists '{key}' in _kw_requires_import but arch_kwargs has no '{key}'.", source,
                       "the plans file is corrupt.")
        value = kwargs[key]
        if value is not None and (not isinstance(value, str) or value not in LAYER_CLASSES[key]):
            raise _bad(f"plans.json names {value!r} as '{key}', which is not an nnU-Net network building block "
                       f"msxplain accepts ({_short(LAYER_CLASSES[key])}, by their exact names).", source,
                       "use a model planned with standard nnU-Net v2 (see docs/model-card.md).")
    for key, value in kwargs.items():
        if key in req:
            continue
        # everything else goes to the constructor as it is: plain data, naming nothing
        check_json_data(value, f"architecture.arch_kwargs['{key}']", source, names_allowed=False)


def check_plans(plans: Any, configuration: str, *, n_channels: int | None = None,
                source: str | None = None) -> dict:
    """Check a parsed ``plans.json`` before nnU-Net sees it; return the resolved configuration.

    Every name that nnU-Net resolves on msxplain's path (network, layers, preprocessor,
    normalisation, resampling, label manager, reader-writer) must be in this module's
    allow-lists, by exact match; the network's other arguments must be plain JSON data; the
    keys msxplain reads must have the right types.

    Parameters
    ----------
    plans : object
        The parsed ``plans.json``.
    configuration : str
        The configuration the model card selects (e.g. ``'3d_fullres'``).
    n_channels : int or None
        The number of input channels (``dataset.json``); checks the per-channel lists.
    source : str or None
        The file, for messages.

    Returns
    -------
    dict
        The configuration with ``inherits_from`` resolved as nnU-Net resolves it.

    Raises
    ------
    BadInputData
        Naming the key and the fix.
    """
    if not isinstance(plans, dict):
        raise _bad("plans.json is not a JSON object.", source, "the model folder is corrupt; re-download it.")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise _bad("plans.json has no 'configurations'.", source, "the model folder is corrupt; re-download it.")
    config = _resolve_inheritance(configurations, configuration, source)
    if config.get("previous_stage") is not None:
        previous = config["previous_stage"]
        plans_name = plans.get("plans_name", "nnUNetPlans")
        raise _bad(f"Configuration '{configuration}' is the second stage of a cascade: it takes the segmentation "
                   f"of the first stage '{previous}' (a separately trained model, <trainer>__{plans_name}__"
                   f"{previous}) as extra input channels, and msxplain does not run that first stage; it runs "
                   "single-stage models only.", source,
                   f"use a single-stage model of the same dataset (its 3d_fullres, {previous} or 2d trainer folder) "
                   "with --model, or a model card whose nnunet.configuration names one.")
    _check_architecture(config, source)
    _need_name(config, "preprocessor_name", PREPROCESSORS, "preprocessor", source)
    for key in RESAMPLING_KEYS:
        _need_name(config, key, RESAMPLING_FUNCTIONS, "resampling function", source)
        kwargs = config.get(f"{key}_kwargs", {})
        if not isinstance(kwargs, dict):
            raise _bad(f"plans.json '{key}_kwargs' is not an object.", source, "the plans file is corrupt.")
        check_json_data(kwargs, f"{key}_kwargs", source, names_allowed=False)
    schemes = config.get("normalization_schemes")
    if not isinstance(schemes, list) or not schemes:
        raise _bad("plans.json has no 'normalization_schemes' list.", source, "the plans file is corrupt.")
    for i, scheme in enumerate(schemes):
        if not isinstance(scheme, str) or scheme not in NORMALIZATION_SCHEMES:
            raise _bad(f"plans.json names {scheme!r} as normalization_schemes[{i}], which is not an nnU-Net "
                       f"normalisation msxplain accepts ({_short(NORMALIZATION_SCHEMES)}).", source,
                       "use a model planned with standard nnU-Net v2.")
    use_mask = config.get("use_mask_for_norm")
    if not isinstance(use_mask, list) or not all(isinstance(v, bool) for v in use_mask):
        raise _bad("plans.json 'use_mask_for_norm' is not a list of true/false.", source, "the plans file is corrupt.")
    if n_channels is not None:
        intensity = plans.get("foreground_intensity_properties_per_channel",
                              plans.get("foreground_intensity_properties_by_modality"))
        if len(schemes) < n_channels or len(use_mask) < n_channels:
            raise _bad(f"plans.json normalises {min(len(schemes), len(use_mask))} channel(s) but dataset.json "
                       f"has {n_channels}.", source, "plans.json and dataset.json belong to different models.")
        if not isinstance(intensity, dict) or any(not isinstance(intensity.get(str(c)), dict)
                                                  for c in range(n_channels)):
            raise _bad("plans.json lacks 'foreground_intensity_properties_per_channel' for every channel.", source,
                       "plans.json and dataset.json belong to different models.")
    for key in ("spacing", "patch_size"):
        value = config.get(key)
        if (not isinstance(value, list) or not value
                or not all(is_number(v) and v > 0 for v in value)
                or (key == "patch_size" and not all(is_int(v) for v in value))):
            raise _bad(f"plans.json '{key}' of '{configuration}' is not a list of positive numbers.", source,
                       "the plans file is corrupt.")
    for key in ("transpose_forward", "transpose_backward"):
        value = plans.get(key)
        if not isinstance(value, list) or sorted(v for v in value if is_int(v)) != list(range(len(value))):
            raise _bad(f"plans.json '{key}' is not a permutation of the axes.", source, "the plans file is corrupt.")
    if "image_reader_writer" in plans:
        _need_name(plans, "image_reader_writer", IMAGE_READER_WRITERS, "image reader-writer", source)
    if "label_manager" in plans:
        _need_name(plans, "label_manager", LABEL_MANAGERS, "label manager", source)
    return config


def import_allowed(name: str, role: str):
    """The class an allow-listed name stands for, imported from the table, never by the name.

    Parameters
    ----------
    name : str
        As written in plans.json.
    role : str
        ``'network'`` or a key of :data:`LAYER_CLASSES` (``conv_op``, ``norm_op``...).

    Raises
    ------
    BadInputData
        The name is not in the table for that role.
    """
    table = NETWORK_CLASSES if role == "network" else LAYER_CLASSES.get(role, {})
    if not isinstance(name, str) or name not in table:
        raise BadInputData(f"plans.json names {name!r} as '{role}', which is not an nnU-Net network building block "
                           "msxplain accepts.", hint="see docs/model-card.md for the classes plans.json may name.")
    module, attribute = table[name]
    return getattr(importlib.import_module(module), attribute)


# --------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------
def check_dataset_json(dataset: Any, *, source: str | None = None) -> dict[int, str]:
    """Check a parsed ``dataset.json``; return its channel names by index.

    Raises
    ------
    BadInputData
        Not an object; no ``channel_names`` (or legacy ``modality``) numbered 0..K-1; no
        ``labels`` with ``background: 0`` and positive integer labels; a region-based model;
        a reader-writer outside :data:`IMAGE_READER_WRITERS`.
    """
    hint = "dataset.json must be nnU-Net v2's: channel_names {\"0\": ...} and labels {\"background\": 0, ...}."
    if not isinstance(dataset, dict):
        raise _bad("dataset.json is not a JSON object.", source, hint)
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise _bad("dataset.json has no 'channel_names'.", source, hint)
    if sorted(str(k) for k in channels) != sorted(str(i) for i in range(len(channels))) \
            or not all(isinstance(v, str) and v for v in channels.values()):
        raise _bad("dataset.json 'channel_names' must map \"0\"..\"K-1\" to channel names.", source, hint)
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or labels.get("background") != 0 or isinstance(labels.get("background"), bool):
        raise _bad("dataset.json has no 'labels' with \"background\": 0.", source, hint)
    for name, value in labels.items():
        if isinstance(value, list):
            raise _bad(f"dataset.json label '{name}' is a region ({value}): region-based models are not supported "
                       "(their outputs are not a softmax).", source, "use a model trained with plain labels.")
        if not is_int(value) or value < 0:
            raise _bad(f"dataset.json label '{name}' is {value!r}, not a label number.", source, hint)
    if dataset.get("regions_class_order") is not None:
        raise _bad("dataset.json has 'regions_class_order': region-based models are not supported.", source,
                   "use a model trained with plain labels.")
    reader = dataset.get("overwrite_image_reader_writer")
    if reader is not None and reader != "None" and (not isinstance(reader, str) or reader not in IMAGE_READER_WRITERS):
        raise _bad(f"dataset.json names {reader!r} as the image reader-writer, which is not an nnU-Net reader "
                   f"msxplain accepts ({', '.join(sorted(IMAGE_READER_WRITERS))}).", source,
                   "remove 'overwrite_image_reader_writer' or name an nnU-Net reader.")
    return {int(k): str(v) for k, v in channels.items()}
