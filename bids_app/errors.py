"""Exceptions that carry a BIDS-Apps exit code.

The BIDS Apps execution specification (bids-standard/execution-spec, ``src/outputs.md``)
recommends these exit codes; every error msxplain raises on purpose is one of the classes
below, so that :func:`bids_app.cli.run.main` can turn it into the right code. Only
``run.py`` / the console scripts call :func:`sys.exit`.

==== ============================== =================================================
code class                           meaning
==== ============================== =================================================
0    (success)
1    :class:`MsxplainError`          unspecified failure (a bug, a crashed node)
16   :class:`BIDSValidationError`    input failed BIDS validation
17   :class:`UnknownAnalysisLevel`   unknown analysis level
18   :class:`NoMatchingInputs`       entity filters selected no files
64   :class:`UsageError`             wrong command-line usage
65   :class:`BadInputData`           input data are corrupt or unusable
66   :class:`MissingInput`           input missing or unreadable
73   :class:`CannotCreateOutput`     output cannot be created
74   :class:`OutputIOError`          I/O error while writing
75   :class:`TemporaryFailure`       temporary failure (a retry may succeed)
==== ============================== =================================================
"""

from __future__ import annotations

EXIT_SUCCESS = 0


class MsxplainError(Exception):
    """Base class; exit code 1 (unspecified failure)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None):
        self.message = message
        self.hint = hint
        self.path = str(path) if path is not None else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The user-facing message on one line: what, which file, and the fix."""
        text = self.message
        if self.path and self.path not in text:
            text = f"{text} [{self.path}]"
        if self.hint:
            text = f"{text} Fix: {self.hint}"
        return " ".join(text.split())


class BIDSValidationError(MsxplainError):
    exit_code = 16


class UnknownAnalysisLevel(MsxplainError):
    exit_code = 17


class NoMatchingInputs(MsxplainError):
    exit_code = 18


class UsageError(MsxplainError):
    exit_code = 64


class BadInputData(MsxplainError):
    exit_code = 65


class MissingInput(MsxplainError):
    exit_code = 66


class CannotCreateOutput(MsxplainError):
    exit_code = 73


class OutputIOError(MsxplainError):
    exit_code = 74


class TemporaryFailure(MsxplainError):
    exit_code = 75


#: every class by name, so that a crash recorded by a Nipype worker (where only the
#: traceback text survives) can be mapped back to its exit code.
ERROR_CLASSES: dict[str, type[MsxplainError]] = {
    cls.__name__: cls
    for cls in (
        MsxplainError,
        BIDSValidationError,
        UnknownAnalysisLevel,
        NoMatchingInputs,
        UsageError,
        BadInputData,
        MissingInput,
        CannotCreateOutput,
        OutputIOError,
        TemporaryFailure,
    )
}


def exit_code_from_traceback(text: str) -> int:
    """Exit code of the last msxplain error named in a formatted traceback (1 if none).

    Nipype workers record a failed node as the text of its traceback; the last line that
    names one of our error classes decides the code.
    """
    import re

    found = re.findall(r"bids_app\.errors\.(\w+):", text)
    for name in reversed(found):
        if name in ERROR_CLASSES:
            return ERROR_CLASSES[name].exit_code
    return 1


def message_from_traceback(text: str) -> str:
    """The one-line message of the last msxplain error in a traceback, else its last line."""
    import re

    found = re.findall(r"bids_app\.errors\.\w+: (.*)", text)
    if found:
        return found[-1].strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"
