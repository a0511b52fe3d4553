"""The participant level: validate, resolve the model, discover, plan, build, run, report.

:func:`run_participant` returns the BIDS-Apps exit code (:mod:`bids_app.errors`). When some
sessions fail and others succeed, the others are finished and written; the run then returns
the exit code of the first failed session (sessions sorted by name) and prints one line per
failed session with its message. A session succeeds only when its outputs are on disk,
written by this run; the outputs of an earlier run of a session that now fails are removed
(README, "Bad input: what happens").
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from bids_app.errors import EXIT_SUCCESS, TemporaryFailure

LOGGER = logging.getLogger("bids_app")


def run_participant(config, log=None) -> int:
    """The participant level of ``config``; ``log`` (:class:`~bids_app.app.runlog.LogBuffer`)
    receives the run log's path once the work folder exists."""
    from bids_app import __version__
    from bids_app.app.execution import configure_nipype, disk_full, run_graph, work_disk_error
    from bids_app.app.plan import resolve_settings
    from bids_app.bids.commit import remove_stale_staging
    from bids_app.bids.derivatives import dataset_authors, write_dataset_files
    from bids_app.bids.discovery import discover, open_layout
    from bids_app.model.resolve import (
        check_consistency,
        resolve_model,
        select_checkpoint,
        select_members,
        verify_members,
    )
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
    members = select_members(model, list(config.model.members) if config.model.members else None)
    # the members' checkpoint --checkpoint chooses (exit 65 when the card does not pin it), verified as the card's own
    model = select_checkpoint(model, config.model.checkpoint, members)
    digests = verify_members(model, members)
    if model.card.demo:
        LOGGER.warning("Model '%s' is a DEMO model trained on synthetic data (%s); its lesion maps are not "
                       "clinically validated. Use --model for a real model.", model.card.id, model.card.name)
    LOGGER.info("Model %s (%s), members %s: %s verified (SHA-256)", model.card.id, model.trainer_dir,
                ", ".join(members),
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
    settings = resolve_settings(config, model, digests, _reference_masks(config, model, sessions))
    authors = dataset_authors(model.card.raw)
    write_dataset_files(ex.output_dir, ex.bids_dir, __version__, authors=authors)
    for folder, outcome in remove_stale_staging(ex.output_dir):  # killed runs: finish or undo their writes
        LOGGER.warning("An interrupted write of an earlier run was %s (%s).", outcome, folder.name)
    run_record = _write_run_record(config, settings, sessions)

    failures: dict[str, tuple[int, str, Path | None]] = {
        f.name: (f.error.exit_code, f.error.one_line(), None) for f in failed}
    if sessions:
        crash_dir = ex.work_dir / "crash" / ex.run_uuid
        configure_nipype(config, crash_dir)
        workflow = init_msxplain_wf(sessions, settings, base_dir=ex.work_dir,
                                    name=f"msxplain_{__version__.replace('.', '_')}_wf")
        for name, value in run_graph(workflow, sessions, config, settings.device, crash_dir).items():
            failures.setdefault(name, value)
        # a run succeeds only when every session's outputs are on disk: a job the scheduler killed
        # (memory, time) leaves no crash file
        for name in unwritten_sessions(sessions, failures, ex.output_dir, run_record.stat().st_mtime_ns):
            failures[name] = (TemporaryFailure.exit_code, "Its outputs were not written, and no step reported an "
                              "error: a process was probably killed (out of memory, or the scheduler's time "
                              "limit). Fix: give the run more memory or time, then re-run with the same -w "
                              "to resume.", None)
        if failures and disk_full(ex.work_dir):
            raise work_disk_error(OSError(28, "No space left on device"), ex.work_dir)
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


def _reference_masks(config, model, sessions) -> dict:
    """Session name -> its manual masks (``--reference-masks``); sessions without one are not evaluated."""
    ex = config.execution
    references = {}
    if ex.reference_masks is None:
        return references
    from bids_app.bids.discovery import find_reference_masks

    for s in sessions:
        ref = find_reference_masks(ex.reference_masks, model.card, s.subject, s.session,
                                   (ex.bids_filters or {}).get("reference"))
        if ref is None:
            LOGGER.warning("%s has no reference mask in %s: not evaluated.", s.name, ex.reference_masks)
        else:
            LOGGER.info("%s evaluated against %s", s.name, ref.reason)
            references[s.name] = ref
    return references


def _write_run_record(config, settings, sessions) -> Path:
    """``logs/config-<run>.json``: what ``msxplain-tools rerun`` repeats (its mtime dates this run's writes)."""
    from bids_app.bids.derivatives import atomic_write_text, dumps_json
    from bids_app.bids.provenance import software_versions

    ex = config.execution
    run_record = ex.output_dir / "logs" / f"config-{ex.run_uuid}.json"
    atomic_write_text(run_record, dumps_json({
        "config": config.to_dict(), "parameters": settings.parameters(), "model": settings.model_provenance,
        "sessions": [s.name for s in sessions], "argv": list(config.argv), "cwd": os.getcwd(),
        "software": software_versions()}))
    return run_record


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
    from bids_app.bids.commit import remove_session_outputs

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
