"""``msxplain`` / ``run.py``: parse, check, build the graph, run it, report, return an exit code.

Exit codes follow the BIDS Apps execution spec (see :mod:`bids_app.errors`). When some
sessions fail and others succeed, the others are finished and written; the run then returns
the exit code of the first failed session (sessions sorted by name) and prints one line per
failed session with its message. A session succeeds only when its outputs are on disk,
written by this run; the outputs of an earlier run of a session that now fails are removed.
SIGTERM and SIGINT end every process of the run (:mod:`bids_app.cli.shutdown`) and exit
143 or 130.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from bids_app.errors import (
    EXIT_SUCCESS,
    BadInputData,
    MissingInput,
    MsxplainError,
    OutputIOError,
    TemporaryFailure,
    UsageError,
    exit_code_from_traceback,
    message_from_traceback,
)

LOGGER = logging.getLogger("bids_app")


def main(argv: list[str] | None = None) -> int:
    """Run msxplain; returns the BIDS-Apps exit code."""
    from bids_app.app.runlog import setup_console
    from bids_app.cli.parser import parse_args

    global _CURRENT_ARGV
    _CURRENT_ARGV = list(argv) if argv is not None else sys.argv[1:]
    try:
        ns = parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or usage errors (64/17)
        return int(exc.code or 0)
    setup_console(ns.verbose)
    offline_before = os.environ.get("MSXPLAIN_OFFLINE")
    if ns.offline:  # read by bids_app.bids.templates, here and in every worker process
        os.environ["MSXPLAIN_OFFLINE"] = "1"
    from bids_app.app.config import Config

    # every message of the run is kept until its log file's place is known (the output folder
    # must stay untouched when the run fails before processing)
    buffer = _LogBuffer()
    try:
        config = Config.from_args(ns)
        if config.execution.analysis_level == "participant":
            from bids_app.cli.shutdown import RunInterrupted, terminate_on_signals

            try:
                with terminate_on_signals():
                    return run_participant(config, buffer)
            except RunInterrupted as exc:
                return _interrupted(exc, config)
        from bids_app.app.group import run_group

        try:
            return run_group(config)
        finally:
            group_dir = config.execution.output_dir / "group"
            if group_dir.is_dir():
                buffer.write_to(group_dir / "log" / config.execution.run_uuid / "group_msxplain.log")
    except MsxplainError as exc:
        LOGGER.error("%s", exc.one_line(), extra={"console": False})  # printed once, below
        print(f"msxplain: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("msxplain: interrupted; re-run with the same --work-dir to resume.", file=sys.stderr)
        return 130
    finally:
        buffer.close()
        if ns.offline:  # main() may run several times in one process (tests, rerun)
            if offline_before is None:
                os.environ.pop("MSXPLAIN_OFFLINE", None)
            else:
                os.environ["MSXPLAIN_OFFLINE"] = offline_before


class _LogBuffer:
    """Holds the run's log records in memory until :meth:`start_file` names the run log."""

    def __init__(self):
        import logging.handlers

        # records are formatted by the file they are replayed into
        self.memory = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self.memory.setLevel(logging.DEBUG)
        logging.getLogger().addHandler(self.memory)
        self.file_handler = None
        self.path: Path | None = None

    def start_file(self, path: Path, verbosity: int) -> None:
        """From now on the run's messages (and its workers') go to ``path``; the buffered ones first."""
        from bids_app.app.runlog import start_run_log

        self.file_handler = start_run_log(path, verbosity)
        self.path = path
        self._replay(self.file_handler)
        self._drop_memory()

    def write_to(self, path: Path) -> None:
        """Write the buffered messages to ``path`` (a run that never started its file)."""
        from bids_app.app.runlog import file_handler

        if self.memory is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            LOGGER.warning("Could not write the log %s (%s)", path, exc.strerror)
            return
        handler = file_handler(path, verbosity=0)
        self._replay(handler)
        handler.close()

    def _replay(self, handler: logging.Handler) -> None:
        for record in self.memory.buffer:
            if record.levelno >= handler.level:  # Handler.handle does not look at its own level
                handler.handle(record)

    def _drop_memory(self) -> None:
        if self.memory is not None:
            logging.getLogger().removeHandler(self.memory)
            self.memory.buffer.clear()
            self.memory = None

    def close(self) -> None:
        from bids_app.app.runlog import stop_run_log

        self._drop_memory()
        if self.file_handler is not None:
            stop_run_log(self.file_handler)
            self.file_handler = None


def _interrupted(exc, config) -> int:
    """After SIGTERM/SIGINT (the run's processes are ended): remove what they were staging, say how to resume."""
    from bids_app.bids.derivatives import remove_staging_of

    ex = config.execution
    try:
        remove_staging_of(ex.output_dir, [os.getpid(), *exc.ended])
    except OSError:
        pass
    LOGGER.error("Stopped by %s: %d process(es) of the run ended.", signal_name(exc.signum), len(exc.ended),
                 extra={"console": False})
    print(f"msxplain: stopped by {signal_name(exc.signum)}; every process of the run was ended and no session "
          f"was left half-written. To resume, re-run the same command with the same work folder (-w "
          f"{ex.work_dir}): finished steps are not recomputed.", file=sys.stderr)
    return exc.exit_code


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def main_exit() -> None:  # console-script entry point
    sys.exit(main())


# --------------------------------------------------------------------------------------
# Participant level
# --------------------------------------------------------------------------------------
def resolve_settings(config, model, digests: dict[str, str], references: dict | None = None):
    """Model card defaults + user overrides -> :class:`~bids_app.workflows.base.PipelineSettings`."""
    from bids_app.bids.derivatives import atomic_write_text, dumps_json
    from bids_app.core.segment import resolve_device
    from bids_app.model.models import (
        CARD_NAME,
        model_provenance,
        model_refiner,
        resolve_input_orientation,
        select_members,
    )
    from bids_app.workflows.base import PipelineSettings

    card = model.card
    folds = select_members(model, list(config.model.folds) if config.model.folds else None)
    device = resolve_device(config.model.device).type
    orientation = resolve_input_orientation(model, config.model.input_orientation)  # exit 65 now, not in a node
    post = config.postprocess
    if model.card_path is not None:
        card_file = model.card_path
    else:  # an inferred card is written into the work folder so the nodes read the same one
        card_file = config.execution.work_dir / f"inferred_{CARD_NAME}"
        atomic_write_text(card_file, dumps_json(card.raw))
    template_t1w = template_mask = None
    try:
        from bids_app.bids.templates import brain_mask_template

        template_t1w, template_mask = brain_mask_template()
    except MsxplainError as exc:
        if config.model.skull_stripped == "no":  # every session needs the template: say so now
            raise
        LOGGER.warning("No brain-mask template: %s (only skull-stripped inputs can be processed).", exc.one_line())
    feature_templates = None
    if config.outputs.lesion_features:
        from bids_app.bids.templates import feature_templates as find_feature_templates

        try:
            feature_templates = find_feature_templates(config.outputs.atlas, config.outputs.atlas_lut)
        except MsxplainError as exc:
            if config.outputs.atlas not in ("auto", "none"):
                raise
            LOGGER.warning("Lesion features skipped: %s", exc.one_line())
        if feature_templates is not None and "atlas" not in feature_templates:
            LOGGER.warning("No atlas: lesion location classes use the GM map only (no ventricles, no brain stem); "
                           "pass --atlas DSEG --atlas-lut TSV for the full classes.")
    explain = refiner_file = None
    outputs = config.outputs
    if outputs.explain:
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
        explain = explain_parameters(outputs, _read_refiner(refiner_file) if refiner_file else None)
        if device == "cpu":
            LOGGER.warning("Explanations on the CPU (%d SmoothGrad samples per lesion): expect minutes per "
                           "lesion with a full-size model; --explain-max-lesions limits the work, a GPU is "
                           "the intended device.", explain["n_samples"])
    return PipelineSettings(
        bids_dir=config.execution.bids_dir,
        output_dir=config.execution.output_dir,
        trainer_dir=model.trainer_dir,
        card_file=Path(card_file),
        label_indices=tuple(card.lesion_indices),
        label_names=tuple(lab.name for lab in card.labels),
        reference_channel=card.reference_channel,
        skull_strip=card.skull_stripped_input,
        folds=tuple(folds),
        device=device,
        tta=config.model.tta,
        threshold=post.threshold if post.threshold is not None else card.threshold,
        min_lesion_size=post.min_lesion_size if post.min_lesion_size is not None else card.min_lesion_size,
        connectivity=post.connectivity if post.connectivity is not None else card.connectivity,
        save_member_probabilities=config.model.save_member_probabilities,
        omp_nthreads=config.resources.omp_nthreads,
        model_provenance=model_provenance(model, folds, digests),
        template_t1w=template_t1w,
        template_mask=template_mask,
        brain_mask_mode={"auto": "auto", "yes": "stripped", "no": "template"}[config.model.skull_stripped],
        member_thresholds=tuple(card.member_thresholds[f] for f in folds) if card.member_thresholds else (),
        voxel_maps=tuple(config.outputs.voxel_uncertainty),
        lesion_maps=tuple(config.outputs.lesion_uncertainty_maps),
        detection_method=config.outputs.detection_method,
        detection_threshold=config.outputs.detection_threshold,
        ndsc_r=card.reference_lesion_load,
        references=dict(references or {}),
        feature_templates=feature_templates,
        export_meshes=config.outputs.export_meshes,
        explain=explain,
        refiner_file=refiner_file,
        refine=outputs.refine,
        refine_threshold=outputs.refine_threshold,
        input_orientation=config.model.input_orientation,
        network_orientation=orientation,
    )


def _read_refiner(path: Path) -> dict:
    """A refiner JSON, checked before the run starts."""
    from bids_app.core.saliency_radiomics import check_refiner

    try:
        return check_refiner(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputData(f"Not a msxplain refiner ({type(exc).__name__}: {exc}).", path=str(path),
                           hint="give the JSON written by msxplain-tools train-refiner.") from None


def explain_parameters(outputs, refiner: dict | None) -> dict:
    """ExplainLesions parameters: the user's, else those the refiner was trained with (its
    radiomic features depend on them), else the :class:`~bids_app.core.explain.ExplainConfig`
    defaults."""
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

    return {"n_samples": int(pick(outputs.explain_samples, "n_samples")),
            "noise_level": float(pick(outputs.explain_noise, "noise_level")),
            "margin_mm": float(pick(outputs.explain_margin, "margin_mm") or -1.0),
            "max_groups": int(trained.get("max_groups", default.max_groups)),
            "max_lesions": int(outputs.explain_max_lesions)}


def plugin_settings(config, settings) -> tuple[str, dict]:
    """Nipype plugin name and arguments for this run."""
    resources = config.resources
    args = dict(resources.plugin_args)
    if resources.plugin == "MultiProc":
        args.setdefault("n_procs", resources.nprocs)
        if resources.mem_gb:
            args.setdefault("memory_gb", resources.mem_gb)
        args.setdefault("raise_insufficient", False)
        args.setdefault("mp_context", "forkserver")
        args.setdefault("n_gpu_procs", 1 if settings.device == "cuda" else 0)
    elif resources.plugin == "SLURMGraph":
        args.setdefault("dont_resubmit_completed_jobs", True)
    return resources.plugin, args


def _session_of_node(node_name: str, sessions) -> str | None:
    from bids_app.workflows.base import session_wf_name

    for session in sessions:
        if session_wf_name(session) in node_name:
            return session.name
    return None


def collect_crashes(crash_dir: Path, sessions) -> dict[str, tuple[int, str, Path]]:
    """Map session name -> (exit code, one-line message, crash file) from Nipype crash files."""
    failures: dict[str, tuple[int, str, Path]] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime):
        text = crash.read_text(errors="replace")
        node = ""
        for line in text.splitlines():
            if line.startswith("Node:"):
                node = line.split(":", 1)[1].strip()
                break
        session = _session_of_node(node or crash.name, sessions)
        if session is None or session in failures:
            continue
        failures[session] = (*_classify_crash(text, node), crash)
    return failures


#: what an error of a full disk (or exhausted quota) looks like in a traceback
_NO_SPACE = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")


def _classify_crash(text: str, node: str) -> tuple[int, str]:
    """Exit code and one-line message of a crash file's traceback.

    An error of msxplain's own keeps its code; a full disk anywhere (the work folder, for
    which Nipype raises plain OSErrors) becomes exit 74 with a message that says so.
    """
    code, message = exit_code_from_traceback(text), message_from_traceback(text)
    if code == 1 and any(marker in text for marker in _NO_SPACE):
        step = node.split(".")[-1] if node else "a processing step"
        return 74, (f"No space left on the disk while running {step} (the work folder, or a temporary folder). "
                    "Fix: free disk space or choose another -w, then re-run with the same -w to resume.")
    return code, message


def _work_disk_error(exc: OSError, work_dir: Path) -> MsxplainError:
    """The error to report when Nipype itself fails on the work folder (e.g. it cannot write a crash file)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full(work_dir):
        return OutputIOError("No space left in the work folder; the run was stopped.", path=str(work_dir),
                             hint="free disk space or choose another -w, then re-run with the same -w to resume.")
    return OutputIOError(f"I/O error in the work folder ({exc.strerror or exc}).", path=str(work_dir),
                         hint="check the file system, then re-run with the same -w to resume.")


def _disk_full(folder: Path, reserve: int = 1 << 20) -> bool:
    """Whether the file system of ``folder`` has less than ``reserve`` bytes free."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False


def session_folder(session) -> Path:
    """``sub-X/[ses-Y/]anat``: the folder a session's outputs are swapped into (one unit)."""
    from bids_app.bids.derivatives import subject_dir

    return subject_dir({"sub": session.subject, "ses": session.session or ""})


def unwritten_sessions(sessions, failures, output_dir: Path, since_ns: int) -> list[str]:
    """Sessions that no step reported as failed but whose outputs this run did not write.

    A session's outputs are swapped in as one folder whose files were all written during the
    commit, so a ``*_summary.json`` modified at or after ``since_ns`` (the mtime of this run's
    record in the output folder, same file system and clock) proves that this run committed it.
    """
    missing = []
    for s in sessions:
        if s.name in failures:
            continue
        summaries = list((Path(output_dir) / session_folder(s)).glob("*_summary.json"))
        try:
            fresh = any(p.stat().st_mtime_ns >= since_ns for p in summaries)
        except OSError:
            fresh = False
        if not fresh:
            missing.append(s.name)
    return missing


def run_participant(config, log=None) -> int:
    """The participant level: validate, resolve the model, discover, build, run, report."""
    from nipype import config as nipype_config

    from bids_app import __version__
    from bids_app.app.runlog import route_nipype_logging
    from bids_app.bids.derivatives import dataset_authors, remove_stale_staging, write_dataset_files
    from bids_app.bids.discovery import discover, open_layout
    from bids_app.model.models import check_consistency, resolve_model, select_members, verify_members
    from bids_app.workflows.base import init_msxplain_wf

    ex = config.execution
    if ex.reports_only:
        from bids_app.reports.participant import build_reports

        labels = [f"sub-{p}" for p in ex.participant_label] if ex.participant_label else None
        written = build_reports(ex.output_dir, labels)
        LOGGER.info("%d report(s) rebuilt from %s", len(written), ex.output_dir)
        return EXIT_SUCCESS
    started = time.time()
    LOGGER.info("msxplain %s, participant level, run %s", __version__, ex.run_uuid)
    if not ex.skip_bids_validation:
        from bids_app.bids.validation import require_valid

        LOGGER.info("Validating %s with bids-validator-deno", ex.bids_dir)
        require_valid(ex.bids_dir)

    model = resolve_model(config.model.spec, card_path=config.model.card_path,
                          cache_dir=ex.work_dir / "models")
    check_consistency(model)
    folds = select_members(model, list(config.model.folds) if config.model.folds else None)
    digests = verify_members(model, folds)
    if model.card.demo:
        LOGGER.warning("Model '%s' is a DEMO model trained on synthetic data (%s); its lesion maps are not "
                       "clinically validated. Use --model for a real model.", model.card.id, model.card.name)
    LOGGER.info("Model %s (%s), members %s: %s verified (SHA-256)", model.card.id, model.trainer_dir, ", ".join(folds),
                "checkpoints, plans.json and dataset.json" if model.card.files else
                "checkpoints (plans.json and dataset.json not pinned by the card)")

    layout = open_layout(ex.bids_dir)
    sessions, failed = discover(layout, model.card, ex.participant_label, ex.session_label, ex.bids_filters)
    for f in failed:
        LOGGER.warning("%s cannot be processed and is skipped (reported at the end): %s", f.name, f.error.one_line())
    if failed and ex.stop_on_first_crash:
        raise failed[0].error

    try:
        ex.work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from bids_app.errors import CannotCreateOutput

        raise CannotCreateOutput(f"Cannot create the work folder ({exc.strerror}).", path=str(ex.work_dir),
                                 hint="choose a writable --work-dir.") from None
    run_log = ex.work_dir / "logs" / f"participant-{ex.run_uuid}.log"
    if log is not None:
        log.start_file(run_log, config.verbosity)
    references = {}
    if ex.reference_masks is not None:
        from bids_app.bids.discovery import find_reference_masks

        for s in sessions:
            ref = find_reference_masks(ex.reference_masks, model.card, s.subject, s.session,
                                       (ex.bids_filters or {}).get("reference"))
            if ref is None:
                LOGGER.warning("%s has no reference mask in %s: not evaluated.", s.name, ex.reference_masks)
            else:
                LOGGER.info("%s evaluated against %s", s.name, ref.reason)
                references[s.name] = ref
    settings = resolve_settings(config, model, digests, references)
    authors = dataset_authors(model.card.raw)
    write_dataset_files(ex.output_dir, ex.bids_dir, __version__, authors=authors)
    for folder, outcome in remove_stale_staging(ex.output_dir):  # killed runs: finish or undo their writes
        LOGGER.warning("An interrupted write of an earlier run was %s (%s).", outcome, folder.name)
    log_dir = ex.output_dir / "logs"
    from bids_app.bids.derivatives import atomic_write_text, dumps_json
    from bids_app.bids.provenance import software_versions

    run_record = log_dir / f"config-{ex.run_uuid}.json"
    atomic_write_text(run_record, dumps_json({
        "config": config.to_dict(), "parameters": settings.parameters(), "model": settings.model_provenance,
        "sessions": [s.name for s in sessions], "argv": _argv(), "cwd": os.getcwd(),
        "software": software_versions()}))

    failures: dict[str, tuple[int, str, Path | None]] = {
        f.name: (f.error.exit_code, f.error.one_line(), None) for f in failed}
    if sessions:
        crash_dir = ex.work_dir / "crash" / ex.run_uuid
        crash_dir.mkdir(parents=True, exist_ok=True)
        nipype_config.update_config({
            "execution": {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": ex.stop_on_first_crash,
                "hash_method": "content",
                "remove_unnecessary_outputs": False,
                "check_version": False,
                "poll_sleep_duration": 0.5,
            },
            "monitoring": {"enabled": False},
        })
        workflow = init_msxplain_wf(sessions, settings, base_dir=ex.work_dir,
                                    name=f"msxplain_{__version__.replace('.', '_')}_wf")
        if ex.write_graph:
            try:
                workflow.write_graph(graph2use="colored", format="svg", simple_form=True)
            except Exception as exc:  # noqa: BLE001 - graphviz may be absent
                LOGGER.warning("Could not write the workflow graph: %s", exc)
        route_nipype_logging()  # nipype resets its loggers when its config is updated
        plugin, plugin_args = plugin_settings(config, settings)
        if plugin == "MultiProc":
            plugin_args["status_callback"] = _progress_callback(sessions, len(workflow.list_node_names()))
            if plugin_args.get("mp_context") == "forkserver":
                import multiprocessing.forkserver

                # workers set their logging up before Nipype is imported there (bids_app.app.runlog)
                multiprocessing.forkserver.set_forkserver_preload(["__main__", "bids_app.app.worker_logging"])
        LOGGER.info("Running %d session(s) with Nipype %s (%s)", len(sessions), plugin,
                    {k: v for k, v in plugin_args.items() if k != "status_callback"})
        if plugin.startswith("SLURM"):
            os.environ.setdefault("LOGNAME", _user())  # Nipype's SLURM plugin names jobs after it
        runner = plugin
        if plugin == "MultiProc":  # Nipype's, except that a worker failing outside its node is no hang
            from bids_app.cli.shutdown import MultiProcPlugin

            runner, plugin_args = MultiProcPlugin(plugin_args=plugin_args), None
        try:
            workflow.run(plugin=runner, plugin_args=plugin_args)
        except RuntimeError as exc:
            LOGGER.debug("Nipype reported failures: %s", exc)
        except OSError as exc:  # Nipype's own files in the work folder (results, crash files)
            raise _work_disk_error(exc, ex.work_dir) from None
        if plugin == "SLURMGraph":
            # SLURMGraph returns right after submitting the whole graph: wait for its jobs
            _wait_for_slurm_jobs({node.split(".")[-1] for node in workflow.list_node_names()})
        for name, value in collect_crashes(crash_dir, sessions).items():
            failures.setdefault(name, value)
        # a run succeeds only when every session's outputs are on disk: a job the scheduler killed
        # (memory, time) leaves no crash file
        for name in unwritten_sessions(sessions, failures, ex.output_dir, run_record.stat().st_mtime_ns):
            failures[name] = (TemporaryFailure.exit_code, "Its outputs were not written, and no step reported an "
                              "error: a process was probably killed (out of memory, or the scheduler's time "
                              "limit). Fix: give the run more memory or time, then re-run with the same -w "
                              "to resume.", None)
        if failures and _disk_full(ex.work_dir):
            raise _work_disk_error(OSError(28, "No space left on device"), ex.work_dir)
    _remove_failed_outputs(failures, sessions, failed, ex.output_dir)
    _copy_crash_logs(failures, ex.output_dir, ex.run_uuid)
    write_dataset_files(ex.output_dir, ex.bids_dir, __version__, authors=authors)
    from bids_app.reports.participant import build_reports

    build_reports(ex.output_dir, sorted({f"sub-{s.subject}" for s in sessions} |
                                        {name.split("_")[0] for name in failures}))

    n_ok = len(sessions) - len([s for s in sessions if s.name in failures])
    LOGGER.info("Finished in %.0f s: %d session(s) written, %d failed.", time.time() - started, n_ok, len(failures))
    if log is not None and log.path is not None:
        _publish_run_log(log.path, ex.output_dir, ex.run_uuid,
                         sorted({s.subject for s in sessions} | {name.split("_")[0][4:] for name in failures}))
    if not failures:
        return EXIT_SUCCESS
    for name in sorted(failures):
        code, message, crash = failures[name]
        line = f"msxplain: {name} failed (exit code {code}): {message}"
        if crash is not None:
            line += f" [details: {crash}]"
        print(line, file=sys.stderr)
    return failures[sorted(failures)[0]][0]


def _argv() -> list[str]:
    """The command line of this run (the msxplain arguments, without the program name)."""
    return list(_CURRENT_ARGV) if _CURRENT_ARGV is not None else sys.argv[1:]


_CURRENT_ARGV: list[str] | None = None


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


def _wait_for_slurm_jobs(node_names: set[str], poll: float = 2.0, timeout: float = 7 * 24 * 3600,
                         query_timeout: float = 600.0) -> None:
    """Block until no job of this user named like a node of the graph (``j<N>_<node>``) is queued.

    Parameters
    ----------
    node_names : set of str
        Names of the graph's nodes.
    poll : float
        Seconds between two ``squeue`` calls.
    timeout : float
        Longest wait for the jobs (they may stay queued for days).
    query_timeout : float
        Longest time ``squeue`` may keep failing (or hanging) before the run stops: without it
        the run cannot tell whether its jobs are finished.

    Raises
    ------
    TemporaryFailure
        ``squeue`` failed for ``query_timeout`` seconds in a row, or the jobs were still queued
        after ``timeout`` seconds.
    """
    import re
    import subprocess

    names = "|".join(re.escape(n) for n in sorted(node_names))
    pattern = re.compile(rf"^j\d+_({names})$")
    deadline = time.monotonic() + timeout
    failing_since, problem = None, ""
    while True:
        now = time.monotonic()
        try:
            out = subprocess.run(["squeue", "-h", "-u", _user(), "-o", "%j"], capture_output=True, text=True,
                                 timeout=max(1.0, min(60.0, query_timeout)))
            ok, problem = out.returncode == 0, (out.stderr or "").strip().splitlines()[-1:] or \
                [f"exit code {out.returncode}"]
        except (OSError, subprocess.TimeoutExpired) as exc:  # no squeue, or it hangs
            out, ok, problem = None, False, [str(exc)]
        if ok:
            failing_since = None
            names = [n for n in out.stdout.split() if pattern.match(n)]
            if not names:
                return
            LOGGER.info("Waiting for %d SLURM job(s) of the graph", len(names))
        else:
            failing_since = now if failing_since is None else failing_since
            LOGGER.warning("squeue failed (%s); retrying", problem[0])
            if time.monotonic() - failing_since >= query_timeout:
                raise TemporaryFailure(f"squeue kept failing for {time.monotonic() - failing_since:.0f} s "
                                       f"({problem[0]}): the state of the run's SLURM jobs is unknown.",
                                       hint="check SLURM (squeue -u $USER), then re-run with the same -w: "
                                            "finished steps are kept.")
        if time.monotonic() >= deadline:
            raise TemporaryFailure(f"The run's SLURM jobs were still queued after {timeout:.0f} s.",
                                   hint="check them with squeue, then re-run with the same -w when they are done.")
        time.sleep(poll)


def _progress_callback(sessions, n_steps: int):
    """A MultiProc status callback: one line per node started and finished, with the session
    it belongs to (session k of N) and the run's steps done (finished nodes of ``n_steps``)."""
    from bids_app.app.progress import format_duration, session_label
    from bids_app.workflows.base import session_wf_name

    order = {session_wf_name(s): (k, s.name) for k, s in enumerate(sessions, 1)}
    state = {"done": 0, "started": {}}

    def where(node) -> str:
        for part in node.fullname.split("."):
            if part in order:
                k, name = order[part]
                return f"[{session_label(name)}] (session {k} of {len(sessions)})"
        return "[run]"

    def callback(node, status):
        stage = node.fullname.split(".")[-1]
        if status == "start":
            state["started"][node.fullname] = time.monotonic()
            if stage in _LONG_STAGES:
                LOGGER.info("%s %s: started", where(node), stage)
            return
        seconds = time.monotonic() - state["started"].pop(node.fullname, time.monotonic())
        if status == "end":
            state["done"] += 1
            LOGGER.info("%s %s: done in %s (run: %d/%d steps)", where(node), stage, format_duration(seconds),
                        state["done"], n_steps)
        elif status == "exception":
            LOGGER.error("%s %s: FAILED after %s", where(node), stage, format_duration(seconds))

    return callback


#: nodes long enough to announce when they start (the others are reported when they end)
_LONG_STAGES = {"conform", "brain_mask", "predict", "uncertainty", "features", "explain", "evaluation"}


def _publish_run_log(run_log: Path, output_dir: Path, run_uuid: str, subjects: list[str]) -> None:
    """Copy the run log into the output folder: whole (``logs/``) and per subject."""
    from bids_app.app.runlog import split_run_log
    from bids_app.bids.derivatives import atomic_write_text

    try:
        text = run_log.read_text(encoding="utf-8", errors="replace") if run_log.is_file() else ""
        atomic_write_text(output_dir / "logs" / f"participant-{run_uuid}.log", text)
        for subject, part in split_run_log(run_log, subjects).items():
            atomic_write_text(output_dir / f"sub-{subject}" / "log" / run_uuid / f"sub-{subject}_msxplain.log", part)
    except OSError as exc:
        LOGGER.warning("Could not copy the run log into %s (%s)", output_dir, exc.strerror)


def _remove_failed_outputs(failures, sessions, discovery_failures, output_dir: Path) -> None:
    """Remove the earlier outputs of every session whose latest attempt failed (each as one unit).

    The output folder then never shows results beside the error of a later attempt, and the
    group level cannot count them (README, "Bad input: what happens").
    """
    from bids_app.bids.derivatives import remove_session_outputs

    folders = {s.name: session_folder(s) for s in list(sessions) + list(discovery_failures)}
    for name in sorted(failures):
        if name not in folders:
            continue
        try:
            if remove_session_outputs(output_dir, folders[name]):
                LOGGER.warning("%s failed: the outputs of an earlier run were removed (%s).", name, folders[name])
        except OSError as exc:
            LOGGER.warning("%s failed, and the outputs of an earlier run could not be removed (%s): %s", name,
                           exc.strerror, output_dir / folders[name])


def _copy_crash_logs(failures, output_dir: Path, run_uuid: str) -> None:
    import shutil

    for name, (code, message, crash) in failures.items():
        sub = name.split("_")[0]
        dest = output_dir / sub / "log" / run_uuid
        try:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / f"{name}_error.json").write_text(json.dumps(
                {"session": name, "exit_code": code, "message": message}, indent=2) + "\n")
            if crash is not None:
                shutil.copy(crash, dest / crash.name)
        except OSError:
            LOGGER.warning("Could not write the error log of %s into %s", name, dest)
