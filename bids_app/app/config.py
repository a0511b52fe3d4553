"""Run configuration: one frozen object, built once from the command line, passed explicitly.

No module-level singleton (fMRIPrep's ``config`` module, a process-wide global that Nipype workers
re-read from a file, is the cautionary example): the :class:`Config` (the command line, ``argv``
included) is resolved with the model card once into the settings the workflow is built from
(:mod:`bids_app.app.plan`); Nipype workers receive plain traits. ``Config.to_dict()`` is what the
run records in its log folder, beside ``argv``, which ``msxplain-tools rerun`` repeats exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bids_app.core.metrics.detection import DEFAULT_DETECTION_THRESHOLD, DEFAULT_METHOD
from bids_app.core.uncertainty.matching import DEFAULT_ENSEMBLE_MEAN
from bids_app.core.uncertainty.session import DEFAULT_LESION_MAPS, DEFAULT_VOXEL_MAPS
from bids_app.errors import CannotCreateOutput, MissingInput, UsageError


@dataclass(frozen=True)
class ExecutionConfig:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_label: tuple[str, ...] | None = None
    session_label: tuple[str, ...] | None = None
    bids_filters: dict[str, dict] | None = None
    skip_bids_validation: bool = False
    reference_masks: Path | None = None
    stop_on_first_crash: bool = False
    write_graph: bool = False
    reports_only: bool = False
    run_uuid: str = ""


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "demo"
    card_path: Path | None = None
    device: str = "auto"
    members: tuple[str, ...] | None = None
    tta: bool = True
    save_member_probabilities: bool = False
    skull_stripped: str = "auto"
    #: how an image with a skull gets its brain mask: auto (learned where installed and measured, else
    #: template), learned (deepbet), template (MNI mask, affine), none (core.brain_extraction)
    skull_strip: str = "auto"
    #: voxel order the network sees: auto (the model card's, else its plans.json reader's), native or ras
    input_orientation: str = "auto"
    #: the members' checkpoint: auto (the model card's nnunet.checkpoint), final or best
    #: (checkpoint_final.pth / checkpoint_best.pth; the card must pin it: model.resolve.select_checkpoint)
    checkpoint: str = "auto"


@dataclass(frozen=True)
class PostprocessConfig:
    """User overrides; None means "the model card's value"."""

    threshold: float | None = None
    min_lesion_size: int | None = None
    connectivity: int | None = None
    #: how the members are averaged into the probability map that is thresholded (core.uncertainty.ensemble_mean)
    ensemble_mean: str = DEFAULT_ENSEMBLE_MEAN


@dataclass(frozen=True)
class OutputConfig:
    voxel_maps: tuple[str, ...] = DEFAULT_VOXEL_MAPS
    lesion_maps: tuple[str, ...] = DEFAULT_LESION_MAPS
    detection_method: str = DEFAULT_METHOD
    detection_threshold: float = DEFAULT_DETECTION_THRESHOLD
    lesion_features: bool = True
    atlas: str = "auto"
    atlas_lut: str | None = None
    export_meshes: bool = False
    in_domain_sites: tuple[str, ...] | None = None
    explain: bool = False
    #: None: the refiner's training setting, else the ExplainConfig default
    explain_samples: int | None = None
    explain_noise: float | None = None
    explain_margin: float | None = None
    explain_max_lesions: int = 0
    refiner: str | None = None
    refine: bool = False
    refine_threshold: float | None = None


@dataclass(frozen=True)
class ResourceConfig:
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    execution: ExecutionConfig
    model: ModelConfig
    postprocess: PostprocessConfig
    resources: ResourceConfig
    outputs: OutputConfig = field(default_factory=OutputConfig)
    verbosity: int = 0
    #: the command line of the run (without the program name); recorded beside the configuration
    #: as the run record's ``argv`` (``msxplain-tools rerun`` repeats it), not in :meth:`to_dict`
    argv: tuple[str, ...] = ()

    # ------------------------------------------------------------------
    @classmethod
    def from_args(cls, ns: argparse.Namespace, argv: list[str] | tuple[str, ...] = ()) -> Config:
        """Build and cross-check the configuration (the checks fMRIPrep's parser does).

        ``ns`` is what :func:`bids_app.cli.parser.parse_args` returns for ``argv``: every option
        is set there (the parser's defaults are this module's dataclass defaults).

        Raises
        ------
        MissingInput
            ``bids_dir`` does not exist.
        UsageError
            Output or work folder inside the input dataset; input inside the output; work folder
            equal to the output folder or inside it.
        """
        bids_dir = Path(ns.bids_dir).expanduser()
        if not bids_dir.is_dir():
            raise MissingInput("The BIDS dataset folder does not exist.", path=str(bids_dir),
                               hint="check the first positional argument.")
        bids_dir = bids_dir.resolve()
        output_dir = Path(os.path.abspath(Path(ns.output_dir).expanduser()))
        if output_dir.exists() and not output_dir.is_dir():
            raise CannotCreateOutput("The output path exists and is not a folder.", path=str(output_dir),
                                     hint="choose a folder for the derivatives.")
        real_out = Path(os.path.realpath(output_dir))
        if real_out == bids_dir or bids_dir in real_out.parents:
            if not (real_out.relative_to(bids_dir).parts[:1] == ("derivatives",)):
                raise UsageError("The output folder is inside the input BIDS dataset.", path=str(output_dir),
                                 hint="write derivatives outside the dataset, or under <bids_dir>/derivatives/.")
        if real_out in bids_dir.parents:
            raise UsageError("The input BIDS dataset is inside the output folder.", path=str(output_dir),
                             hint="choose an output folder that does not contain the input dataset.")
        work_dir = Path(os.path.abspath(Path(ns.work_dir).expanduser())) if ns.work_dir \
            else Path(os.path.abspath("work"))
        real_work = Path(os.path.realpath(work_dir))
        if real_work == bids_dir or bids_dir in real_work.parents:
            raise UsageError("The work folder is inside the input BIDS dataset.", path=str(work_dir),
                             hint="use -w/--work-dir outside the dataset.")
        if real_work == real_out or real_out in real_work.parents:
            # the work tree would become part of the derivatives dataset (validator errors, and a
            # re-run's cleanup of the outputs could delete the cache it resumes from)
            raise UsageError("The work folder is the output folder or inside it.", path=str(work_dir),
                             hint="use a -w/--work-dir outside the output folder, e.g. a sibling folder.")
        nprocs = ns.nprocs or default_nprocs()
        omp = ns.omp_nthreads or max(1, min(nprocs, 8))
        if omp > nprocs:
            raise UsageError(f"--omp-nthreads {omp} exceeds --nprocs {nprocs}.", hint="lower --omp-nthreads.")
        run_uuid = f"{datetime.now(UTC):%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}"
        execution = ExecutionConfig(
            bids_dir=bids_dir,
            output_dir=output_dir,
            analysis_level=ns.analysis_level,
            work_dir=work_dir,
            participant_label=tuple(dict.fromkeys(ns.participant_label)) if ns.participant_label else None,
            session_label=tuple(dict.fromkeys(ns.session_label)) if ns.session_label else None,
            bids_filters=ns.bids_filters,
            skip_bids_validation=bool(ns.skip_bids_validation),
            reference_masks=Path(ns.reference_masks).resolve() if ns.reference_masks else None,
            stop_on_first_crash=bool(ns.stop_on_first_crash),
            write_graph=bool(ns.write_graph),
            reports_only=bool(ns.reports_only),
            run_uuid=run_uuid,
        )
        if execution.reference_masks is not None and not execution.reference_masks.is_dir():
            raise MissingInput("The --reference-masks folder does not exist.", path=str(execution.reference_masks),
                               hint="point it at a BIDS derivatives folder with the manual lesion masks.")
        model = ModelConfig(
            spec=str(ns.model),
            card_path=Path(ns.model_card).resolve() if ns.model_card else None,
            device=ns.device,
            members=tuple(str(m) for m in ns.members) if ns.members else None,
            tta=bool(ns.tta),
            save_member_probabilities=bool(ns.save_member_probabilities),
            skull_stripped=str(ns.skull_stripped),
            skull_strip=str(ns.skull_strip),
            input_orientation=str(ns.input_orientation),
            checkpoint=str(ns.checkpoint),
        )
        post = PostprocessConfig(threshold=ns.threshold, min_lesion_size=ns.min_lesion_size,
                                 connectivity=ns.connectivity, ensemble_mean=ns.ensemble_mean)
        resources = ResourceConfig(nprocs=int(nprocs), omp_nthreads=int(omp), mem_gb=ns.mem_gb,
                                   plugin=ns.plugin, plugin_args=dict(ns.plugin_args or {}))
        outputs = OutputConfig(
            voxel_maps=tuple(ns.voxel_maps),
            lesion_maps=tuple(ns.lesion_maps),
            detection_method=ns.detection_method,
            detection_threshold=float(ns.detection_threshold),
            lesion_features=bool(ns.lesion_features),
            atlas=str(ns.atlas),
            atlas_lut=str(ns.atlas_lut) if ns.atlas_lut else None,
            export_meshes=bool(ns.export_meshes),
            in_domain_sites=tuple(ns.in_domain_sites) if ns.in_domain_sites else None,
            # --refine and --refiner FILE need the saliency maps, so they switch the explanations on
            explain=bool(ns.explain or ns.refine is not None or ns.refiner not in (None, "none")),
            explain_samples=ns.explain_samples,
            explain_noise=ns.explain_noise,
            explain_margin=ns.explain_margin,
            explain_max_lesions=int(ns.explain_max_lesions),
            refiner=(None if not ns.refiner else
                     "none" if ns.refiner == "none" else str(Path(ns.refiner).expanduser().resolve())),
            refine=ns.refine is not None,
            refine_threshold=(float(ns.refine) if ns.refine not in (None, "model") else None),
        )
        if outputs.refine and outputs.refiner == "none":
            raise UsageError("--refine needs a refiner, but --refiner none was given.",
                             hint="drop --refiner none, or pass --refiner FILE (msxplain-tools train-refiner).")
        return cls(execution=execution, model=model, postprocess=post, resources=resources, outputs=outputs,
                   verbosity=int(ns.verbose or 0), argv=tuple(argv))

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (paths as strings, tuples as lists)."""

        def convert(obj):
            if dataclasses.is_dataclass(obj):
                return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            if isinstance(obj, Path):
                return str(obj)
            if isinstance(obj, (list, tuple)):
                return [convert(v) for v in obj]
            if isinstance(obj, dict):
                return {k: convert(v) for k, v in obj.items()}
            return obj

        return {k: v for k, v in convert(self).items() if k != "argv"}  # the record keeps argv beside it

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


def default_nprocs() -> int:
    """CPUs this process may use (respects affinity masks, e.g. SLURM's cgroups)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
