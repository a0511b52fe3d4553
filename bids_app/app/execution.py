"""Running the participant graph with Nipype: plugins, progress, SLURM, crashes, full disks.

:func:`run_graph` is the one place that configures Nipype, runs a built workflow with the
run's plugin (MultiProc through :class:`MultiProcPlugin`, Linear, SLURM or SLURMGraph, whose
jobs it waits for), and turns Nipype's crash files into per-session failures: ``{session
name: (exit code, one-line message, crash file)}`` with the exit codes of the BIDS Apps
execution spec (:mod:`bids_app.errors`). A full work disk is reported as exit 74 wherever it
happens (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from nipype.pipeline.plugins.multiproc import MultiProcPlugin as _NipypeMultiProc

from bids_app.errors import (
    MsxplainError,
    OutputIOError,
    TemporaryFailure,
    exit_code_from_traceback,
    message_from_traceback,
)

LOGGER = logging.getLogger("bids_app")

#: a session's failure: (exit code, one-line message, crash file or None)
Failure = tuple[int, str, "Path | None"]
#: nodes long enough to announce when they start (the others are reported when they end)
LONG_STAGES = {"conform", "brain_mask", "predict", "uncertainty", "features", "explain", "evaluation"}
#: what an error of a full disk (or exhausted quota) looks like in a traceback
NO_SPACE = ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")


class MultiProcPlugin(_NipypeMultiProc):
    """Nipype's MultiProc plugin where a task that ends with an exception is a failed node, never a hang.

    When a worker's task ends with an exception outside the node (its result cannot be read
    back, e.g. a full work disk, or the worker was killed), Nipype's done-callback raises in the
    executor's thread, the task is never marked finished, and the main loop polls for ever.
    Here such a task counts as a failed node.

    The class keeps Nipype's name (the workflow names its plugin after the class, and MapNodes
    look that name up in Nipype's plugins).
    """

    def _async_callback(self, args):
        if args.cancelled() or args.exception() is not None:
            return  # _get_result reads the exception from the future (Nipype's callback raised here)
        result = args.result()
        self._taskresult[result["taskid"]] = result

    def _get_result(self, taskid):
        result = self._taskresult.get(taskid)
        if result is None:
            future = self._task_obj.get(taskid)
            if future is not None and future.done():
                error = future.exception() if not future.cancelled() else RuntimeError("cancelled")
                if error is not None:
                    # Nipype's loop turns an exception from here into a failed node (crash file, error list)
                    raise RuntimeError(f"the worker running this node failed: {type(error).__name__}: "
                                       f"{error}") from error
        return result

    def _report_crash(self, node, result=None):
        # Nipype's loop hands a failed task's traceback over as one string, and its report_crash
        # appends a list to it when the node's result file is missing (a full work disk): TypeError
        if result is not None and isinstance(result.get("traceback"), str):
            result = dict(result, traceback=result["traceback"].splitlines(keepends=True))
        return super()._report_crash(node, result=result)


def plugin_settings(resources, device: str) -> tuple[str, dict]:
    """Nipype plugin name and arguments for this run.

    Parameters
    ----------
    resources : bids_app.app.config.ResourceConfig
    device : {'cpu', 'cuda'}
        The resolved torch device (CUDA runs one GPU node at a time).
    """
    args = dict(resources.plugin_args)
    if resources.plugin == "MultiProc":
        args.setdefault("n_procs", resources.nprocs)
        if resources.mem_gb:
            args.setdefault("memory_gb", resources.mem_gb)
        args.setdefault("raise_insufficient", False)
        args.setdefault("mp_context", "forkserver")
        args.setdefault("n_gpu_procs", 1 if device == "cuda" else 0)
    elif resources.plugin == "SLURMGraph":
        args.setdefault("dont_resubmit_completed_jobs", True)
    return resources.plugin, args


def configure_nipype(config, crash_dir: Path) -> None:
    """Nipype's settings for this run (before the graph is built): crash files as text in
    ``crash_dir`` (created here), content hashes, no pruning of node outputs, no monitoring."""
    from nipype import config as nipype_config

    crash_dir.mkdir(parents=True, exist_ok=True)
    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": config.execution.stop_on_first_crash,
            "hash_method": "content",
            "remove_unnecessary_outputs": False,
            "check_version": False,
            "poll_sleep_duration": 0.5,
        },
        "monitoring": {"enabled": False},
    })


def run_graph(workflow, sessions, config, device: str, crash_dir: Path) -> dict[str, Failure]:
    """Run ``workflow`` with the run's Nipype plugin; the sessions whose nodes crashed.

    Parameters
    ----------
    workflow : nipype.pipeline.engine.Workflow
        The participant graph (:func:`bids_app.workflows.base.init_msxplain_wf`), built after
        :func:`configure_nipype`.
    sessions : list of bids_app.bids.discovery.SessionInputs
    config : bids_app.app.config.Config
    device : {'cpu', 'cuda'}
    crash_dir : Path
        Where Nipype writes its crash files (:func:`configure_nipype`).

    Returns
    -------
    dict
        Session name -> (exit code, one-line message, crash file), from the crash files.

    Raises
    ------
    OutputIOError
        Nipype itself failed on the work folder (a full disk, an I/O error).
    TemporaryFailure
        SLURMGraph: ``squeue`` kept failing, or the jobs stayed queued too long.
    """
    from bids_app.app.runlog import route_nipype_logging

    ex = config.execution
    if ex.write_graph:
        try:
            workflow.write_graph(graph2use="colored", format="svg", simple_form=True)
        except Exception as exc:  # noqa: BLE001 - graphviz may be absent
            LOGGER.warning("Could not write the workflow graph: %s", exc)
    route_nipype_logging()  # nipype resets its loggers when its config is updated
    plugin, plugin_args = plugin_settings(config.resources, device)
    if plugin == "MultiProc":
        plugin_args["status_callback"] = progress_callback(sessions, len(workflow.list_node_names()))
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
        runner, plugin_args = MultiProcPlugin(plugin_args=plugin_args), None
    try:
        workflow.run(plugin=runner, plugin_args=plugin_args)
    except RuntimeError as exc:
        LOGGER.debug("Nipype reported failures: %s", exc)
    except OSError as exc:  # Nipype's own files in the work folder (results, crash files)
        raise work_disk_error(exc, ex.work_dir) from None
    if plugin == "SLURMGraph":
        # SLURMGraph returns right after submitting the whole graph: wait for its jobs
        wait_for_slurm_jobs({node.split(".")[-1] for node in workflow.list_node_names()})
    return collect_crashes(crash_dir, sessions)


def _session_of_node(node_name: str, sessions) -> str | None:
    from bids_app.workflows.base import session_wf_name

    for session in sessions:
        if session_wf_name(session) in node_name:
            return session.name
    return None


def collect_crashes(crash_dir: Path, sessions) -> dict[str, Failure]:
    """Map session name -> (exit code, one-line message, crash file) from Nipype crash files."""
    failures: dict[str, Failure] = {}
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
        failures[session] = (*classify_crash(text, node), crash)
    return failures


def classify_crash(text: str, node: str) -> tuple[int, str]:
    """Exit code and one-line message of a crash file's traceback.

    An error of msxplain's own keeps its code; a full disk anywhere (the work folder, for
    which Nipype raises plain OSErrors) becomes exit 74 with a message that says so.
    """
    code, message = exit_code_from_traceback(text), message_from_traceback(text)
    if code == 1 and any(marker in text for marker in NO_SPACE):
        step = node.split(".")[-1] if node else "a processing step"
        return 74, (f"No space left on the disk while running {step} (the work folder, or a temporary folder). "
                    "Fix: free disk space or choose another -w, then re-run with the same -w to resume.")
    return code, message


def work_disk_error(exc: OSError, work_dir: Path) -> MsxplainError:
    """The error to report when Nipype itself fails on the work folder (e.g. it cannot write a crash file)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or disk_full(work_dir):
        return OutputIOError("No space left in the work folder; the run was stopped.", path=str(work_dir),
                             hint="free disk space or choose another -w, then re-run with the same -w to resume.")
    return OutputIOError(f"I/O error in the work folder ({exc.strerror or exc}).", path=str(work_dir),
                         hint="check the file system, then re-run with the same -w to resume.")


def disk_full(folder: Path, reserve: int = 1 << 20) -> bool:
    """Whether the file system of ``folder`` has less than ``reserve`` bytes free."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


def wait_for_slurm_jobs(node_names: set[str], poll: float = 2.0, timeout: float = 7 * 24 * 3600,
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


def progress_callback(sessions, n_steps: int):
    """A MultiProc status callback: one line per node started and finished, with the session
    it belongs to (session k of N) and the run's steps done (finished nodes of ``n_steps``)."""
    from bids_app.progress import format_duration, session_label
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
            if stage in LONG_STAGES:
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
