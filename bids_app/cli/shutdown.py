"""Ending a run cleanly: signals, the process tree of the run, and a MultiProc plugin that never hangs.

Nipype's MultiProc runs nodes in a :class:`~concurrent.futures.ProcessPoolExecutor` whose
``forkserver`` context adds two processes beside the workers (the fork server and
multiprocessing's resource tracker). Ending only the main process leaves them running (a
worker finishes its node, however long it takes), so on SIGTERM or SIGINT
:func:`terminate_on_signals` ends every descendant of the main process before the run
returns (exit code 128 + signal number).

:class:`MultiProcPlugin` fixes the other way a run could wait forever: when a worker's task
ends with an exception outside the node (its result cannot be read back, e.g. a full work
disk, or the worker was killed), Nipype's done-callback raises in the executor's thread, the
task is never marked finished, and the main loop polls for ever. Here such a task counts as a
failed node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from nipype.pipeline.plugins.multiproc import MultiProcPlugin as _NipypeMultiProc


class RunInterrupted(BaseException):
    """Raised in the main thread by the SIGTERM/SIGINT handler, after the run's processes were ended.

    A :class:`BaseException` (like :class:`KeyboardInterrupt`) so that no ``except Exception``
    on the way (Nipype's or ours) swallows it.
    """

    def __init__(self, signum: int, ended: list[int]):
        self.signum = signum
        self.ended = ended
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports it."""
        return 128 + self.signum


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux ``/proc``); empty where there is no ``/proc``."""
    table: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: parse after its last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2 and fields[0] != "Z":
            table[int(entry)] = int(fields[1])
    return table


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), parents before children."""
    pid = os.getpid() if pid is None else pid
    table = _parents()
    if not table:  # no /proc (macOS): the processes multiprocessing knows of
        import multiprocessing
        import multiprocessing.forkserver
        import multiprocessing.resource_tracker

        found = [p.pid for p in multiprocessing.active_children()]
        for owner in (multiprocessing.forkserver._forkserver, multiprocessing.resource_tracker._resource_tracker):
            extra = getattr(owner, "_forkserver_pid", None) or getattr(owner, "_pid", None)
            if extra:
                found.append(extra)
        return [p for p in found if p]
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    order, todo = [], list(children.get(pid, []))
    while todo:
        current = todo.pop(0)
        order.append(current)
        todo += children.get(current, [])
    return order


def _signal_all(pids, signum) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
            return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
        return stat[stat.rfind(")") + 2:].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def end_process_tree(grace_s: float = 5.0) -> list[int]:
    """End every descendant of this process: SIGTERM, then SIGKILL for those alive after ``grace_s``.

    New descendants that appear meanwhile (a fork server starting a worker) are ended too.

    Returns
    -------
    list of int
        The pids that were signalled.
    """
    ended: list[int] = []
    deadline = time.monotonic() + grace_s
    while True:
        pids = [p for p in descendants() if p not in ended]
        # the fork server first, so that it starts no new worker while the others end
        _signal_all(pids, signal.SIGTERM)
        ended += pids
        time.sleep(0.1)
        alive = [p for p in ended if _alive(p)]
        if not alive and not [p for p in descendants() if p not in ended]:
            return ended
        if time.monotonic() > deadline:
            # the resource tracker ignores SIGTERM; every process is ended without waiting further
            _signal_all(alive + descendants(), signal.SIGKILL)
            ended += [p for p in descendants() if p not in ended]
            stop = time.monotonic() + 2.0
            while time.monotonic() < stop and any(_alive(p) for p in ended):
                time.sleep(0.05)
            return ended


@contextlib.contextmanager
def terminate_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """While the block runs, SIGTERM and SIGINT end every process of the run, then raise :class:`RunInterrupted`.

    A second signal while the run is being stopped is ignored (the stop is already under way).
    Outside the main thread (where Python cannot set handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"stopping": False}

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        if state["stopping"]:
            return
        state["stopping"] = True
        ended = end_process_tree()
        raise RunInterrupted(signum, ended)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class MultiProcPlugin(_NipypeMultiProc):
    """Nipype's MultiProc plugin where a task that ends with an exception is a failed node, never a hang.

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
