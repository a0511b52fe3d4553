"""Ending a run cleanly: signals and the process tree of the run.

Nipype's MultiProc runs nodes in a :class:`~concurrent.futures.ProcessPoolExecutor` whose
``forkserver`` context adds two processes beside the workers (the fork server and
multiprocessing's resource tracker). Ending only the main process leaves them running (a
worker finishes its node, however long it takes), so on SIGTERM or SIGINT
:func:`terminate_on_signals` ends every descendant of the main process before the run
returns (exit code 128 + signal number).

:class:`bids_app.app.execution.MultiProcPlugin` fixes the other way a run could wait forever
(a worker's task that ends with an exception outside its node).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time


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
