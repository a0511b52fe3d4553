"""The participant-level Nipype graph: one sub-workflow per subject/session.

Workflow Graph (per session)::

    conform ─ brain_mask ─ predict (GPU) ─┬─ postprocess ─┬─ [features] ────────┐
                                          │               └─ [explain (GPU) ─ refine] ┤
                                          ├─ uncertainty ─┬─ lesion_table ──────┤
                                          └─ [evaluation] ┘   summary ──────────┴─ records ─ ds_session

Nodes only wire: every computation lives in :mod:`bids_app.core` behind a thin interface.
All derivatives of a session go through a single sink (``ds_session``) that writes them all
or none (:func:`bids_app.bids.commit.commit_records`), so a session that fails anywhere
leaves nothing half-written, and a re-run with the same work directory resumes from the
nodes that finished (Nipype's hashed cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.bids.discovery import SessionInputs
from bids_app.core.explain import ExplainConfig
from bids_app.core.metrics.detection import DEFAULT_DETECTION_THRESHOLD, DEFAULT_METHOD
from bids_app.core.metrics.overlap import DEFAULT_NDSC_R
from bids_app.core.uncertainty import DEFAULT_ENSEMBLE_MEAN, DEFAULT_LESION_MAPS, DEFAULT_VOXEL_MAPS
from bids_app.interfaces.conform import BrainMask, ConformInputs
from bids_app.interfaces.derivatives import DerivativesSink, SessionSummary
from bids_app.interfaces.evaluation import EvaluateSession, LesionTable
from bids_app.interfaces.explain import ExplainLesions, RefineLesions
from bids_app.interfaces.features import LesionFeatures
from bids_app.interfaces.postprocess import PostProcess
from bids_app.interfaces.segment import PredictLesions
from bids_app.interfaces.uncertainty import ComputeUncertainty
from bids_app.progress import session_label


@dataclass(frozen=True)
class PipelineSettings:
    """Everything the graph needs that was resolved before building it.

    Built once by :func:`bids_app.app.plan.resolve_settings` from the
    :class:`~bids_app.app.config.Config` and the model card; its :meth:`parameters` are what
    every sidecar records.
    """

    bids_dir: Path
    output_dir: Path
    trainer_dir: Path
    #: the model card file (None: inferred from the model's plans.json and dataset.json)
    card_file: Path | None
    label_indices: tuple[int, ...]
    label_names: tuple[str, ...]
    #: the ``label-`` values of the classes' files (BIDS-safe; the names stay in sidecars and tables)
    label_entities: tuple[str, ...]
    reference_channel: int
    #: the model card's ``skull_stripped_input``: the network sees the inputs zeroed outside the brain mask
    skull_stripped_input: bool
    members: tuple[str, ...]
    device: str
    tta: bool
    threshold: float
    min_lesion_size: int
    connectivity: int
    save_member_probabilities: bool
    omp_nthreads: int
    model_provenance: dict[str, Any] = field(default_factory=dict)
    template_t1w: Path | None = None
    template_mask: Path | None = None
    #: --skull-stripped (auto, yes, no) and --skull-strip (auto, learned, template, none): the brain mask
    skull_stripped: str = "auto"
    skull_strip: str = "auto"
    member_thresholds: tuple[float, ...] = ()
    #: the members' checkpoint (--checkpoint auto|final|best); the nodes choose it as the run did
    checkpoint: str = "auto"
    #: the probability map that is thresholded: mean of member probabilities, or softmax of mean logits
    ensemble_mean: str = DEFAULT_ENSEMBLE_MEAN
    voxel_maps: tuple[str, ...] = DEFAULT_VOXEL_MAPS
    lesion_maps: tuple[str, ...] = DEFAULT_LESION_MAPS
    detection_method: str = DEFAULT_METHOD
    detection_threshold: float = DEFAULT_DETECTION_THRESHOLD
    ndsc_r: float = DEFAULT_NDSC_R
    #: session name -> bids_app.bids.discovery.ReferenceMasks (evaluation on when present)
    references: dict[str, Any] = field(default_factory=dict)
    #: lesion features (None: not computed): template files for registration, GM/WM maps, atlas
    feature_templates: dict[str, Path] | None = None
    export_meshes: bool = False
    gpu_sbatch_args: str = "--gres=gpu:1"
    #: instance explanations (None: off): the ExplainLesions parameters (bids_app.app.plan.explain_config)
    explain: ExplainConfig | None = None
    #: explain only the N largest lesions of a session (0: all)
    explain_max_lesions: int = 0
    #: saliency refiner JSON (p_true_lesion), and whether/at which threshold to refine
    refiner_file: Path | None = None
    refine: bool = False
    refine_threshold: float | None = None
    #: --input-orientation as given (auto, native, ras): the prediction and explanation nodes resolve
    #: it with models.input_orientation_rule; ``network_orientation`` is the result, for the sidecars
    input_orientation: str = "auto"
    #: (orientation, reason) as resolved before the run, e.g. ("native", "plans.json image_reader_writer SimpleITKIO")
    network_orientation: tuple[str, str] | None = None

    def parameters(self) -> dict[str, Any]:
        explain = {}
        if self.explain is not None:
            explain = {"Explanations": {
                "SmoothGradSamples": self.explain.n_samples, "SmoothGradNoiseLevel": self.explain.noise_level,
                "MaxAggregationGroups": self.explain.max_groups,
                "ContextMarginMM": self.explain.margin_mm if self.explain.margin_mm is not None else "measured",
                "MaxLesions": self.explain_max_lesions or None,
                "Refiner": self.refiner_file.name if self.refiner_file else None,
                "Refine": self.refine, "RefineThreshold": self.refine_threshold}}
        return explain | {
            "Threshold": self.threshold,
            "ThresholdRule": "p >= threshold",
            "EnsembleMean": self.ensemble_mean,
            "MinLesionSizeVoxels": self.min_lesion_size,
            "Connectivity": self.connectivity,
            "Members": list(self.members),
            "TestTimeAugmentation": self.tta,
            "Device": self.device,
            "SkullStripForNetwork": self.skull_stripped_input,
            "SkullStrippedInput": self.skull_stripped,
            "SkullStrip": self.skull_strip,
            **({"NetworkInputOrientation": self.network_orientation[0],
                "NetworkInputOrientationSource": self.network_orientation[1]} if self.network_orientation else {}),
            "MemberThresholds": list(self.member_thresholds) or None,
            "DetectionMethod": self.detection_method,
            "DetectionThreshold": self.detection_threshold,
            "nDSCReferenceLesionLoad": self.ndsc_r,
        }

    def common_metadata(self) -> dict[str, Any]:
        from bids_app.bids.provenance import provenance_block

        return provenance_block(self.model_provenance, self.parameters())


def _card_trait(settings: PipelineSettings):
    """The nodes' ``card_file`` trait: the card's path, or Undefined when the card is inferred
    (the nodes then infer it as the run did, :func:`bids_app.model.resolve.resolve_model`)."""
    from nipype.interfaces.base import Undefined

    return str(settings.card_file) if settings.card_file is not None else Undefined


def session_wf_name(session: SessionInputs) -> str:
    return session.name.replace("-", "_") + "_wf"


def init_msxplain_wf(sessions: list[SessionInputs], settings: PipelineSettings, *, base_dir: Path,
                     name: str = "msxplain_wf") -> pe.Workflow:
    """The whole participant level: one :func:`init_single_session_wf` per session."""
    workflow = pe.Workflow(name=name, base_dir=str(base_dir))
    for session in sessions:
        workflow.add_nodes([init_single_session_wf(session, settings)])
    return workflow


def init_single_session_wf(session: SessionInputs, settings: PipelineSettings) -> pe.Workflow:
    """Segment one session and write its derivatives.

    Parameters
    ----------
    session : SessionInputs
        The selected input images, in the model card's channel order.
    settings : PipelineSettings

    Outputs
    -------
    ds_session.out_files
        The derivative files written.
    """
    workflow = pe.Workflow(name=session_wf_name(session))
    sources = session.paths
    reference_image = sources[settings.reference_channel]
    use_gpu = settings.device == "cuda"

    # 1. bring every channel onto the reference image's grid
    conform = pe.Node(ConformInputs(in_files=sources, channel_names=[f.channel for f in session.files],
                                    reference_index=settings.reference_channel),
                      name="conform", mem_gb=2.0)
    # 2. brain mask (skull-stripped input or template registration)
    #    a learned extraction may run (decided in the node, from the image): it uses the run's device
    #    (a GPU node like predict's) or its CPU threads
    may_learn = settings.skull_stripped != "yes" and settings.skull_strip in ("auto", "learned")
    brain_mask = pe.Node(BrainMask(sources=sources, skull_stripped=settings.skull_stripped,
                                   skull_strip=settings.skull_strip, device=settings.device,
                                   num_threads=settings.omp_nthreads, use_gpu=use_gpu and may_learn),
                         name="brain_mask", mem_gb=2.0,
                         n_procs=settings.omp_nthreads if may_learn and not use_gpu else 1)
    if settings.template_t1w and settings.template_mask:
        brain_mask.inputs.template_t1w = str(settings.template_t1w)
        brain_mask.inputs.template_mask = str(settings.template_mask)
    # 3. per-member probabilities; a GPU node for MultiProc's GPU queue when CUDA is used.
    #    n_procs=1: a GPU node takes n_procs GPU slots in MultiProc; torch uses its own threads.
    predict = pe.Node(PredictLesions(model_dir=str(settings.trainer_dir), card_file=_card_trait(settings),
                                     checkpoint=settings.checkpoint,
                                     members=list(settings.members), device=settings.device, tta=settings.tta,
                                     num_threads=settings.omp_nthreads, use_gpu=use_gpu,
                                     skull_stripped_input=settings.skull_stripped_input,
                                     input_orientation=settings.input_orientation),
                      name="predict", mem_gb=4.0, n_procs=1 if use_gpu else settings.omp_nthreads)
    predict.inputs.progress_label = session_label(session.name)
    if use_gpu:  # cluster plugins: the prediction job asks SLURM for a GPU
        predict.plugin_args = {"sbatch_args": settings.gpu_sbatch_args, "overwrite": False}
    # 4. threshold, minimum size, connectivity -> masks and lesion instances
    postprocess = pe.Node(PostProcess(label_indices=list(settings.label_indices),
                                      label_names=list(settings.label_names),
                                      label_entities=list(settings.label_entities), members=list(settings.members),
                                      threshold=settings.threshold, min_lesion_size=settings.min_lesion_size,
                                      connectivity=settings.connectivity, ensemble_mean=settings.ensemble_mean,
                                      save_member_probabilities=settings.save_member_probabilities,
                                      sources=sources),
                          name="postprocess", mem_gb=3.0)
    # 5. voxel, lesion and patient-scale uncertainty; the lesion table starts here
    uncertainty = pe.Node(ComputeUncertainty(
        label_indices=list(settings.label_indices), label_names=list(settings.label_names),
        threshold=settings.threshold, member_thresholds=list(settings.member_thresholds),
        min_lesion_size=settings.min_lesion_size, connectivity=settings.connectivity,
        voxel_maps=list(settings.voxel_maps), lesion_maps=list(settings.lesion_maps), sources=sources),
        name="uncertainty", mem_gb=4.0)
    workflow.connect([
        (conform, brain_mask, [("reference_file", "reference_file")]),
        (conform, predict, [("channels_file", "channels_file")]),
        (brain_mask, predict, [("mask_file", "mask_file")]),
        (predict, postprocess, [("member_probs_file", "member_probs_file")]),
        (conform, postprocess, [("reference_file", "reference_file")]),
        (predict, uncertainty, [("member_probs_file", "member_probs_file")]),
        (postprocess, uncertainty, [("dseg_file", "dseg_file"), ("instances_file", "instances_file")]),
        (conform, uncertainty, [("reference_file", "reference_file")]),
        (brain_mask, uncertainty, [("mask_file", "mask_file")]),
    ])  # fmt:skip

    # what each stage contributes to the summary, the lesion table and the derivatives
    summary_parts = [(conform, "qc_file"), (brain_mask, "qc_file"), (predict, "model_file"),
                     (postprocess, "summary_file"), (uncertainty, "summary_file")]
    fragments = [(uncertainty, "lesions_file", "lesions_dictionary")]
    record_sources = [(conform, "derivatives"), (brain_mask, "derivatives"), (postprocess, "derivatives"),
                      (uncertainty, "derivatives")]

    # 6. lesion features: shape, intensity, cortical involvement, MNI location (optional meshes)
    if settings.feature_templates:
        tpl = settings.feature_templates
        features = pe.Node(LesionFeatures(
            channel_names=[f.channel for f in session.files], template_t1w=str(tpl["t1w"]),
            template_mask=str(tpl["mask"]), template_gm=str(tpl["gm"]),
            skull_stripped_input=settings.skull_stripped_input, export_meshes=settings.export_meshes,
            sources=sources), name="features", mem_gb=3.0)
        if tpl.get("wm"):
            features.inputs.template_wm = str(tpl["wm"])
        if tpl.get("atlas"):
            features.inputs.atlas_file = str(tpl["atlas"])
            features.inputs.atlas_lut = str(tpl["atlas_lut"])
        workflow.connect([
            (postprocess, features, [("instances_file", "instances_file")]),
            (conform, features, [("channels_file", "channels_file"), ("reference_file", "reference_file")]),
            (brain_mask, features, [("mask_file", "mask_file")]),
        ])  # fmt:skip
        summary_parts.append((features, "summary_file"))
        fragments.append((features, "lesions_file", "lesions_dictionary"))
        record_sources.append((features, "derivatives"))

    # 6b. instance-level explanations: a GPU node like predict
    if settings.explain is not None:
        explain = pe.Node(ExplainLesions(
            channel_names=[f.channel for f in session.files], model_dir=str(settings.trainer_dir),
            card_file=_card_trait(settings), checkpoint=settings.checkpoint, members=list(settings.members),
            device=settings.device,
            num_threads=settings.omp_nthreads, use_gpu=use_gpu, skull_stripped_input=settings.skull_stripped_input,
            input_orientation=settings.input_orientation, sources=sources,
            explain_config=dataclasses.asdict(settings.explain), max_lesions=settings.explain_max_lesions),
            name="explain", mem_gb=4.0, n_procs=1 if use_gpu else settings.omp_nthreads)
        explain.inputs.progress_label = session_label(session.name)
        if use_gpu:
            explain.plugin_args = {"sbatch_args": settings.gpu_sbatch_args, "overwrite": False}
        workflow.connect([
            (conform, explain, [("channels_file", "channels_file")]),
            (brain_mask, explain, [("mask_file", "mask_file")]),
            (postprocess, explain, [("instances_file", "instances_file"), ("lesions_file", "lesions_file")]),
        ])  # fmt:skip
        summary_parts.append((explain, "summary_file"))
        fragments.append((explain, "lesions_file", "lesions_dictionary"))
        record_sources.append((explain, "derivatives"))
        # 6c. p_true_lesion from the saliency radiomics (+ --refine): cheap, so its own node
        if settings.refiner_file:
            refine = pe.Node(RefineLesions(
                refiner_file=str(settings.refiner_file), refine=settings.refine,
                label_indices=list(settings.label_indices), label_names=list(settings.label_names),
                sources=sources), name="refine", mem_gb=1.0)
            if settings.refine_threshold is not None:
                refine.inputs.refine_threshold = settings.refine_threshold
            workflow.connect([
                (explain, refine, [("store_file", "store_file")]),
                (postprocess, refine, [("instances_file", "instances_file"), ("lesions_file", "lesions_file")]),
            ])  # fmt:skip
            summary_parts.append((refine, "summary_file"))
            fragments.append((refine, "lesions_file", "lesions_dictionary"))
            record_sources.append((refine, "derivatives"))

    # 7. evaluation against manual masks (--reference-masks)
    reference = settings.references.get(session.name)
    if reference is not None:
        evaluation = pe.Node(EvaluateSession(
            reference_kind=reference.kind, reference_files=list(reference.files),
            reference_value_map=dict(reference.value_map), label_indices=list(settings.label_indices),
            label_names=list(settings.label_names), method=settings.detection_method,
            detection_threshold=settings.detection_threshold, connectivity=settings.connectivity,
            ndsc_r=settings.ndsc_r, ensemble_mean=settings.ensemble_mean, sources=sources),
            name="evaluation", mem_gb=3.0)
        workflow.connect([
            (postprocess, evaluation, [("instances_file", "instances_file")]),
            (uncertainty, evaluation, [("lesions_file", "lesions_file"), ("voxel_map_files", "voxel_map_files")]),
            (predict, evaluation, [("member_probs_file", "member_probs_file")]),
            (brain_mask, evaluation, [("mask_file", "mask_file")]),
        ])  # fmt:skip
        summary_parts.append((evaluation, "summary_file"))
        fragments.append((evaluation, "lesions_file", "lesions_dictionary"))
        record_sources.append((evaluation, "derivatives"))

    # 8. the lesion table: fragments joined on the lesion label
    fragment_files = pe.Node(niu.Merge(len(fragments)), name="fragment_files", run_without_submitting=True)
    fragment_dicts = pe.Node(niu.Merge(len(fragments)), name="fragment_dicts", run_without_submitting=True)
    for i, (node, table_out, dict_out) in enumerate(fragments, start=1):
        workflow.connect(node, table_out, fragment_files, f"in{i}")
        workflow.connect(node, dict_out, fragment_dicts, f"in{i}")
    lesion_table = pe.Node(LesionTable(sources=sources), name="lesion_table", run_without_submitting=True)
    workflow.connect([
        (fragment_files, lesion_table, [("out", "fragments")]),
        (fragment_dicts, lesion_table, [("out", "dictionaries")]),
    ])  # fmt:skip
    record_sources.append((lesion_table, "derivatives"))

    # 9. session summary (read by the group level)
    parts = pe.Node(niu.Merge(len(summary_parts)), name="summary_parts", run_without_submitting=True)
    for i, (node, out) in enumerate(summary_parts, start=1):
        workflow.connect(node, out, parts, f"in{i}")
    summary = pe.Node(SessionSummary(
        participant_id=f"sub-{session.subject}", session_id=f"ses-{session.session}" if session.session else "",
        inputs=[{"channel": f.channel, "file": str(Path(f.path).relative_to(settings.bids_dir)), "reason": f.reason}
                for f in session.files],
        sources=sources, provenance=settings.common_metadata()["msxplain"]),
        name="summary", run_without_submitting=True)
    workflow.connect(parts, "out", summary, "parts")
    record_sources.append((summary, "derivatives"))

    # 10. one sink for everything: all or nothing
    records = pe.Node(niu.Merge(len(record_sources), ravel_inputs=True), name="records",
                      run_without_submitting=True)
    for i, (node, out) in enumerate(record_sources, start=1):
        workflow.connect(node, out, records, f"in{i}")
    ds_session = pe.Node(DerivativesSink(output_dir=str(settings.output_dir), bids_dir=str(settings.bids_dir),
                                         common_metadata=settings.common_metadata(),
                                         spatial_reference=reference_image),
                         name="ds_session", run_without_submitting=True)
    ds_session.overwrite = True  # always (re)write: the output folder may have been cleaned
    workflow.connect(records, "out", ds_session, "records")
    return workflow
