"""BIDS validation with the official validator (``bids-validator-deno``, runs offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import BIDSValidationError, MissingInput


@dataclass(frozen=True)
class ValidationResult:
    errors: list[dict]
    warnings: list[dict]

    def error_lines(self, limit: int = 5) -> list[str]:
        lines = []
        for issue in self.errors[:limit]:
            lines.append(f"{issue.get('code')}: {issue.get('location', '')}")
        if len(self.errors) > limit:
            lines.append(f"... and {len(self.errors) - limit} more")
        return lines


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
    issues = report.get("issues", {}).get("issues", [])
    return ValidationResult(errors=[i for i in issues if i.get("severity") == "error"],
                            warnings=[i for i in issues if i.get("severity") == "warning"])


def require_valid(path: Path) -> ValidationResult:
    """Validate the input dataset; raise :class:`BIDSValidationError` (16) on errors."""
    result = validate(path)
    if result.errors:
        raise BIDSValidationError(
            f"The input dataset fails BIDS validation with {len(result.errors)} error(s): "
            + "; ".join(result.error_lines(3)),
            path=str(path), hint="fix the dataset (run bids-validator-deno on it) or pass --skip-bids-validation.")
    return result
