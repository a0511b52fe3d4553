"""The run's plan: the :class:`~bids_app.app.config.Config` and the model card resolved, once,
into the :class:`~bids_app.workflows.base.PipelineSettings` the graph is built from.

Every default that the model card can set (threshold, minimum lesion size, connectivity, the
members' checkpoint: ``--checkpoint``, :func:`bids_app.model.resolve.select_checkpoint`) and
every default of the explanations (the refiner's training setting, else
:class:`~bids_app.core.explain.ExplainConfig`'s) is decided here and nowhere else; the nodes
receive the result (docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bids_app.errors import BadInputData, MissingInput, MsxplainError, UsageError

LOGGER = logging.getLogger("bids_app")

#: --skull-stripped (are the inputs skull-stripped?) -> the BrainMask node's mode


def resolve_settings(config, model, digests: dict[str, str], references: dict | None = None):
    """Model card defaults + user overrides -> :class:`~bids_app.workflows.base.PipelineSettings`.

    Parameters
    ----------
    config : bids_app.app.config.Config
    model : bids_app.model.resolve.ResolvedModel
        The resolved model (card, trainer folder), with the members' checkpoint ``--checkpoint``
        chose (:func:`bids_app.model.resolve.select_checkpoint`).
    digests : dict
        SHA-256 of the verified member files (recorded as the model's provenance).
    references : dict, optional
        Session name -> :class:`~bids_app.bids.discovery.ReferenceMasks` (evaluation).

    Raises
    ------
    MsxplainError
        No brain-mask template while ``--skull-stripped no``; no atlas while one was asked for;
        a missing or invalid refiner; ``--refine`` without a refiner; a card whose input
        orientation cannot be resolved.
    """
    from bids_app.core.segment import resolve_device
    from bids_app.model.provenance import model_provenance
    from bids_app.model.resolve import resolve_input_orientation, select_members
    from bids_app.workflows.base import PipelineSettings

    members = select_members(model, list(config.model.members) if config.model.members else None)
    card = model.card  # with the members' checkpoint --checkpoint chose (app/participant, select_checkpoint)
    device = resolve_device(config.model.device).type
    orientation = resolve_input_orientation(model, config.model.input_orientation)  # exit 65 now, not in a node
    post = config.postprocess
    template_t1w, template_mask = _brain_mask_template(config.model.skull_stripped, config.model.skull_strip)
    feature_templates = _feature_templates(config.outputs) if config.outputs.lesion_features else None
    outputs = config.outputs
    explain = refiner_file = None
    if outputs.explain:
        _require_3d_network(model)
        refiner_file = _refiner_file(outputs, model)
        explain = explain_config(outputs, read_refiner(refiner_file) if refiner_file else None)
        if device == "cpu":
            LOGGER.warning("Explanations on the CPU (%d SmoothGrad samples per lesion): expect minutes per "
                           "lesion with a full-size model; --explain-max-lesions limits the work, a GPU is "
                           "the intended device.", explain.n_samples)
    return PipelineSettings(
        bids_dir=config.execution.bids_dir,
        output_dir=config.execution.output_dir,
        trainer_dir=model.trainer_dir,
        # None: no card file, the nodes infer the same card from plans.json and dataset.json as the run did
        card_file=model.card_path,
        checkpoint=config.model.checkpoint,
        label_indices=tuple(card.lesion_indices),
        label_names=tuple(lab.name for lab in card.labels),
        label_entities=tuple(lab.bids_label for lab in card.labels),
        reference_channel=card.reference_channel,
        skull_stripped_input=card.skull_stripped_input,
        members=tuple(members),
        device=device,
        tta=config.model.tta,
        threshold=post.threshold if post.threshold is not None else card.threshold,
        min_lesion_size=post.min_lesion_size if post.min_lesion_size is not None else card.min_lesion_size,
        connectivity=post.connectivity if post.connectivity is not None else card.connectivity,
        ensemble_mean=post.ensemble_mean,
        save_member_probabilities=config.model.save_member_probabilities,
        omp_nthreads=config.resources.omp_nthreads,
        model_provenance=model_provenance(model, members, digests),
        template_t1w=template_t1w,
        template_mask=template_mask,
        skull_stripped=config.model.skull_stripped,
        skull_strip=config.model.skull_strip,
        member_thresholds=tuple(card.member_thresholds[m] for m in members) if card.member_thresholds else (),
        voxel_maps=tuple(outputs.voxel_maps),
        lesion_maps=tuple(outputs.lesion_maps),
        detection_method=outputs.detection_method,
        detection_threshold=outputs.detection_threshold,
        ndsc_r=card.reference_lesion_load,
        references=dict(references or {}),
        feature_templates=feature_templates,
        export_meshes=outputs.export_meshes,
        explain=explain,
        explain_max_lesions=int(outputs.explain_max_lesions),
        refiner_file=refiner_file,
        refine=outputs.refine,
        refine_threshold=outputs.refine_threshold,
        input_orientation=config.model.input_orientation,
        network_orientation=orientation,
    )


def _require_3d_network(model) -> None:
    """Explanations perturb 3D windows of a 3D network: a 2D configuration (nnU-Net's ``2d``, a 2D
    patch run slice by slice) is refused before the run starts."""
    from bids_app.core.plans_allowlist import check_plans
    from bids_app.model.card import read_json_file

    plans_path = model.trainer_dir / "plans.json"
    config = check_plans(read_json_file(plans_path, "plans.json"), model.card.configuration, source=str(plans_path))
    if len(config["patch_size"]) != 3:
        raise UsageError(f"--explain needs a 3D network, and the model's configuration '{model.card.configuration}' "
                         f"runs a {len(config['patch_size'])}D network slice by slice.",
                         hint="drop --explain (and --refine/--refiner), or use a 3d_fullres or 3d_lowres model.")


def _brain_mask_template(skull_stripped: str, skull_strip: str) -> tuple[Path | None, Path | None]:
    """The MNI template and its brain mask (None, None when TemplateFlow has none and the run can do
    without). Fails now, before any session, when every session would need what is missing: the
    template for ``--skull-stripped no`` with the template mask (asked for, or ``auto`` without the
    learned tool), the learned tool for ``--skull-strip learned``."""
    from bids_app.bids.templates import brain_mask_template
    from bids_app.core.brain_extraction import INSTALL_HINT, tool_available

    learned = tool_available()
    if skull_strip == "learned" and skull_stripped != "yes" and not learned:
        raise MissingInput("--skull-strip learned needs the learned brain extraction (deepbet), which is not "
                           "installed.", hint=INSTALL_HINT)
    try:
        return brain_mask_template()
    except MsxplainError as exc:
        if skull_stripped == "no" and (skull_strip == "template" or (skull_strip == "auto" and not learned)):
            raise  # every session needs the template: say so now
        LOGGER.warning("No brain-mask template: %s (only skull-stripped inputs, or the learned brain extraction, "
                       "can make brain masks).", exc.one_line())
    return None, None


def _feature_templates(outputs) -> dict[str, Path] | None:
    """Templates of the lesion features (None: skipped, when ``--atlas auto|none`` finds none)."""
    from bids_app.bids.templates import feature_templates

    try:
        templates = feature_templates(outputs.atlas, outputs.atlas_lut)
    except MsxplainError as exc:
        if outputs.atlas not in ("auto", "none"):
            raise
        LOGGER.warning("Lesion features skipped: %s", exc.one_line())
        return None
    if templates is not None and "atlas" not in templates:
        LOGGER.warning("No atlas: lesion location classes use the GM map only (no ventricles, no brain stem); "
                       "pass --atlas DSEG --atlas-lut TSV for the full classes.")
    return templates


def _refiner_file(outputs, model) -> Path | None:
    """The saliency refiner of the run: ``--refiner FILE``, else the model's own (``--refiner none``: none)."""
    from bids_app.model.resolve import model_refiner

    refiner_file = None
    if outputs.refiner and outputs.refiner != "none":
        refiner_file = Path(outputs.refiner).resolve()
        if not refiner_file.is_file():
            raise MissingInput("The --refiner file does not exist.", path=str(refiner_file),
                               hint="train one with msxplain-tools train-refiner, or drop --refiner.")
    elif outputs.refiner is None:
        refiner_file = model_refiner(model)
    if outputs.refine and refiner_file is None:
        raise UsageError("--refine needs a saliency refiner, and the model has none.",
                         hint="pass --refiner FILE (msxplain-tools train-refiner).")
    return refiner_file


def read_refiner(path: Path) -> dict:
    """A refiner JSON, checked before the run starts."""
    from bids_app.core.explain.refiner import check_refiner

    try:
        return check_refiner(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputData(f"Not a msxplain refiner ({type(exc).__name__}: {exc}).", path=str(path),
                           hint="give the JSON written by msxplain-tools train-refiner.") from None


def explain_config(outputs, refiner: dict | None):
    """The :class:`~bids_app.core.explain.ExplainConfig` of the run's ExplainLesions nodes.

    Each parameter is the user's, else the one the refiner was trained with (its radiomic
    features depend on them), else the ``ExplainConfig`` default. A context margin that is not
    positive means "measured" (``margin_mm=None``).

    Parameters
    ----------
    outputs : bids_app.app.config.OutputConfig
        ``explain_samples``, ``explain_noise``, ``explain_margin`` (None: not given).
    refiner : dict or None
        The checked refiner JSON; its ``explain_config`` holds the training setting.
    """
    from bids_app.core.explain import ExplainConfig

    trained = (refiner or {}).get("explain_config") or {}
    default = ExplainConfig()

    def pick(user, key):
        if user is not None:
            if key in trained and trained[key] != user:
                LOGGER.warning("The refiner was trained with %s = %s; this run uses %s (p_true_lesion may be "
                               "off).", key, trained[key], user)
            return user
        return trained.get(key, getattr(default, key))

    margin = pick(outputs.explain_margin, "margin_mm")
    return ExplainConfig(n_samples=int(pick(outputs.explain_samples, "n_samples")),
                         noise_level=float(pick(outputs.explain_noise, "noise_level")),
                         margin_mm=float(margin) if margin is not None and margin > 0 else None,
                         max_groups=int(trained.get("max_groups", default.max_groups)))
