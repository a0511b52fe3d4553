"""Logging of a run: a readable console, a complete text log per run.

* **Console** (stderr): ``HH:MM:SS | LEVEL   | message``. Nipype's own INFO lines (two-line
  entries in another time format, one per node start and end) are kept off the console
  unless ``-v``; msxplain's progress lines and one line per finished node say what happens.
* **Run log** (a text file): everything at INFO (DEBUG with ``-vv``), Nipype's lines included,
  from the main process and from the Nipype worker processes. The participant level writes
  it to ``OUTPUT/logs/participant-<run-id>.log`` and, per subject, the lines about that
  subject and the run's general lines to ``OUTPUT/sub-<label>/log/<run-id>/sub-<label>_msxplain.log``;
  the group level writes ``OUTPUT/group/log/<run-id>/group_msxplain.log``.

Worker processes are started by Nipype's MultiProc plugin from a ``forkserver``, which
preloads :mod:`bids_app.app.worker_logging` so that their loggers are set up from the
environment (:data:`RUN_LOG_ENV`, :data:`VERBOSITY_ENV`) before Nipype is imported there;
otherwise Nipype adds its own stdout handler in every worker. The forkserver reads that
environment once, when it starts: one run per process (the command line) is exact; a
process that runs several participant levels (the test suite) sends the worker lines of the
later runs to the first run's log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

CONSOLE_FORMAT = "%(asctime)s | %(levelname)-7s | %(message)s"
CONSOLE_DATEFMT = "%H:%M:%S"
FILE_FORMAT = "%(asctime)s | %(levelname)-7s | %(processName)s | %(name)s | %(message)s"
#: environment read by worker processes (see the module docstring)
RUN_LOG_ENV = "MSXPLAIN_RUN_LOG"
VERBOSITY_ENV = "MSXPLAIN_VERBOSITY"
#: loggers whose INFO messages stay off the console unless -v
NIPYPE_LOGGERS = ("nipype", "nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip")


class _ConsoleFilter(logging.Filter):
    """Keep Nipype's INFO chatter and the progress logger (already shown by the progress
    lines themselves) off the console unless verbose."""

    def __init__(self, verbosity: int):
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:  # e.g. an error that is printed by other means
            return False
        if record.name.startswith("nipype") and record.levelno < logging.WARNING:
            return self.verbosity >= 1
        if record.name == "bids_app.progress":
            return False
        return True


def _console_handler(verbosity: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt=CONSOLE_DATEFMT))
    handler.addFilter(_ConsoleFilter(verbosity))
    return handler


class _RunLogHandler(logging.FileHandler):
    """A run-log file handler that never breaks the code that logs.

    Worker processes open the run log lazily, possibly long after their fork server read its
    path (a later run in the same process, a work folder removed since, a full disk): a line
    that cannot be written is lost from the file, and the node that logged it goes on.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:  # opening the file (FileHandler opens it outside its own try)
            pass

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass  # a failed write: no traceback on the console for a log line


def file_handler(path: str | os.PathLike, verbosity: int) -> logging.Handler:
    handler = _RunLogHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    return handler


def setup_console(verbosity: int) -> None:
    """Root logger -> stderr (replacing earlier handlers of ours); Nipype's loggers propagate
    to it (Nipype attaches a stdout handler of its own on import, removed here)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_console_handler(verbosity))
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    logging.getLogger("bids").setLevel(logging.WARNING)
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    route_nipype_logging()


def route_nipype_logging() -> None:
    """Send Nipype's loggers through ours: no handler of their own, INFO level (the console
    filter decides what is shown). Nipype resets its loggers when its config is updated, so
    this runs again after every ``nipype.config.update_config``."""
    for name in NIPYPE_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.INFO)


def start_run_log(path: Path, verbosity: int) -> logging.Handler:
    """Append every message of this process (and, through the environment, of the Nipype
    workers started after this call) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = file_handler(path, verbosity)
    logging.getLogger().addHandler(handler)
    os.environ[RUN_LOG_ENV] = str(path)
    os.environ[VERBOSITY_ENV] = str(verbosity)
    return handler


def stop_run_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


class LogBuffer:
    """Holds the run's log records in memory until :meth:`start_file` names the run log.

    Every message of a run is kept until its log file's place is known: the output folder
    must stay untouched when the run fails before processing.
    """

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
        self.file_handler = start_run_log(path, verbosity)
        self.path = path
        self._replay(self.file_handler)
        self._drop_memory()

    def write_to(self, path: Path) -> None:
        """Write the buffered messages to ``path`` (a run that never started its file)."""
        if self.memory is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logging.getLogger("bids_app").warning("Could not write the log %s (%s)", path, exc.strerror)
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
        self._drop_memory()
        if self.file_handler is not None:
            stop_run_log(self.file_handler)
            self.file_handler = None


def configure_worker_from_environment() -> None:
    """Loggers of a Nipype worker process (called by :mod:`bids_app.app.worker_logging`).

    Nipype's and msxplain's loggers get the run log (when :data:`RUN_LOG_ENV` is set) and the
    console handler, and stop propagating; Nipype, imported later in the worker, then finds a
    handler on its logger and adds no stdout handler of its own.
    """
    verbosity = int(os.environ.get(VERBOSITY_ENV, "0") or 0)
    console = _console_handler(verbosity)
    # the main process reports what the workers do (a line per node, progress lines): their own
    # INFO messages are details for the run log, and the console with -v
    console.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    run_log = os.environ.get(RUN_LOG_ENV)
    if run_log:
        handlers.append(file_handler(run_log, verbosity))
    for name in ("nipype", "bids_app"):
        logger = logging.getLogger(name)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)


_SUBJECT_TOKEN = re.compile(r"sub[-_]([A-Za-z0-9]+)")


def split_run_log(run_log: Path, subjects: list[str]) -> dict[str, str]:
    """The part of a run log that concerns each subject: its own lines and the run's general
    lines (those that name no subject); a record's continuation lines follow their first line
    unless they name subjects themselves, and a worker process's lines follow the subject of the
    node it last set up.

    Parameters
    ----------
    run_log : Path
    subjects : list of str
        Labels without ``sub-``.

    Returns
    -------
    dict
        subject label -> text.
    """
    if not run_log.is_file():
        return {}
    texts: dict[str, list[str]] = {s: [] for s in subjects}
    owners: set[str] | None = None
    # a worker process works for the subject its last "Setting-up" line named: its later lines
    # ("Executing", "Finished", warnings) name none but belong to that subject
    worker_subject: dict[str, set[str]] = {}
    for line in run_log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        named = set(_SUBJECT_TOKEN.findall(line)) or None
        if _starts_record(line):
            fields = line.split(" | ", 3)
            process = fields[2].strip() if len(fields) > 3 else ""
            if process and process != "MainProcess":
                if named:
                    worker_subject[process] = named
                else:
                    named = worker_subject.get(process)
            owners = line_owners = named
        else:  # a continuation line (a list of nodes, a traceback) that names subjects is theirs
            line_owners = named or owners
        for subject in subjects:
            if line_owners is None or subject in line_owners:
                texts[subject].append(line)
    return {s: "".join(lines) for s, lines in texts.items()}


_RECORD_START = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def _starts_record(line: str) -> bool:
    return bool(_RECORD_START.match(line))
