"""BIDS validation with the official validator (``bids-validator-deno``, runs offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bids_app.errors import BIDSValidationError, MissingInput

#: how to fix the validator errors a user meets first (code -> hint); others get the generic hint
FIX_HINTS: dict[str, str] = {
    "MISSING_DATASET_DESCRIPTION": "create dataset_description.json at the dataset root, with at least "
                                   '{"Name": "...", "BIDSVersion": "1.10.0"}',
    "JSON_INVALID": "fix the JSON syntax of the file (a JSON linter names the line)",
    "EMPTY_FILE": "replace the empty file with the real data, or remove it",
    "NIFTI_HEADER_UNREADABLE": "replace the file with a readable NIfTI (re-convert it from DICOM)",
    "NOT_INCLUDED": "rename the file to a BIDS name, or list it in .bidsignore",
    "FILENAME_MISMATCH": "rename the file to a BIDS name, or list it in .bidsignore",
    "SIDECAR_KEY_REQUIRED": "add the missing key to the JSON sidecar",
    "JSON_KEY_REQUIRED": "add the missing key to the JSON file",
}
GENERIC_HINT = "fix the dataset (bids-validator-deno DATASET prints every issue) or pass --skip-bids-validation."


@dataclass(frozen=True)
class ValidationResult:
    """The validator's issues, split by severity.

    ``code_messages`` maps an issue code to the validator's own description of it; it fills
    in the detail of issues that carry none (e.g. ``MISSING_DATASET_DESCRIPTION``).
    """

    errors: list[dict]
    warnings: list[dict]
    code_messages: dict[str, str] = field(default_factory=dict)

    def describe(self, issue: dict) -> str:
        """One readable line for an issue: code, what is wrong and where.

        The detail is the issue's own message, else the validator's description of its code,
        else the code's sub-code; the file is the issue's location, else the files it affects.
        """
        code = str(issue.get("code") or "UNKNOWN_ISSUE")
        detail = " ".join(str(issue.get("issueMessage") or "").split())
        if not detail:
            detail = " ".join(str(self.code_messages.get(code) or "").split())
        if issue.get("subCode"):
            detail = f"{issue['subCode']}: {detail}" if detail else str(issue["subCode"])
        where = issue.get("location") or ", ".join(str(a) for a in issue.get("affects") or [])
        if not detail:
            detail = code.replace("_", " ").lower()
        return f"{code}: {detail}" + (f" ({where})" if where else "")

    def error_lines(self, limit: int = 5) -> list[str]:
        lines = [self.describe(issue) for issue in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(f"... and {len(self.errors) - limit} more")
        return lines

    def warning_lines(self, limit: int = 5) -> list[str]:
        lines = [self.describe(issue) for issue in self.warnings[:limit]]
        if len(self.warnings) > limit:
            lines.append(f"... and {len(self.warnings) - limit} more")
        return lines

    def fix_hint(self) -> str:
        """The fixes of the error codes present (in order, once each), then the generic hint."""
        hints: list[str] = []
        for issue in self.errors:
            hint = FIX_HINTS.get(str(issue.get("code")))
            if hint and hint not in hints:
                hints.append(hint)
        return "; ".join(hints + [GENERIC_HINT])


def validator_executable() -> str:
    """The ``bids-validator-deno`` of this environment (next to the Python interpreter first)."""
    local = Path(sys.executable).parent / "bids-validator-deno"
    if local.exists():
        return str(local)
    found = shutil.which("bids-validator-deno")
    if not found:
        raise MissingInput("bids-validator-deno is not installed.",
                           hint="install msxplain's dependencies, or pass --skip-bids-validation.")
    return found


def parse_report(report: dict) -> ValidationResult:
    """Split the validator's JSON report (``--format json``) into errors and warnings."""
    block = report.get("issues", {}) if isinstance(report, dict) else {}
    issues = block.get("issues", []) or []
    messages = {str(k): str(v) for k, v in (block.get("codeMessages") or {}).items()}
    return ValidationResult(errors=[i for i in issues if i.get("severity") == "error"],
                            warnings=[i for i in issues if i.get("severity") == "warning"],
                            code_messages=messages)


def validate(path: Path, *, timeout: int = 600) -> ValidationResult:
    """Run the validator on ``path`` (a raw or derivative dataset) and split its issues."""
    env = dict(os.environ)
    # deno wants a writable cache; read-only containers give it one under /tmp
    env.setdefault("DENO_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "msxplain-deno"))
    env["NO_COLOR"] = "1"
    proc = subprocess.run([validator_executable(), "--format", "json", str(path)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BIDSValidationError(f"The BIDS validator failed to run: {(proc.stderr or proc.stdout).strip()[:300]}",
                                  path=str(path), hint="pass --skip-bids-validation to skip it.") from None
    return parse_report(report)


def require_valid(path: Path) -> ValidationResult:
    """Validate the input dataset; raise :class:`BIDSValidationError` (16) on errors."""
    result = validate(path)
    if result.errors:
        raise BIDSValidationError(
            f"The input dataset fails BIDS validation with {len(result.errors)} error(s): "
            + "; ".join(result.error_lines(3)),
            path=str(path), hint=result.fix_hint())
    return result
