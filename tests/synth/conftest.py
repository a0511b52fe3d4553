"""Fixtures of the synthetic-data tests: an offline TemplateFlow home and the lesion masks.

``TEMPLATEFLOW_HOME`` must point at a *writable copy* of ``shared/data/templateflow``
(TemplateFlow may write its skeleton there); the copy lives for the whole session.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

TEMPLATE_DIR = "tpl-MNI152NLin2009cAsym"


def shared_data() -> Path:
    env = os.environ.get("MSXPLAIN_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR | (stat.S_IXUSR if path.is_dir() else 0))


@pytest.fixture(scope="session")
def lesion_dir() -> Path:
    path = shared_data() / "open_ms_data" / "cross_sectional" / "MNI"
    if not path.is_dir():
        pytest.skip(f"real lesion masks not available at {path}")
    return path


def _has_template(home: str | os.PathLike | None) -> bool:
    if not home:
        return False
    folder = Path(home) / TEMPLATE_DIR
    return all((folder / f"tpl-MNI152NLin2009cAsym_res-0{r}_label-WM_probseg.nii.gz").is_file() for r in (1, 2))


@pytest.fixture(scope="session")
def synth_templateflow_home(tmp_path_factory) -> Path:
    """A writable TemplateFlow home exported as TEMPLATEFLOW_HOME for the session.

    Re-uses the one the top-level conftest may already have exported; otherwise copies
    ``shared/data/templateflow`` into a temporary folder.
    """
    current = os.environ.get("TEMPLATEFLOW_HOME")
    if _has_template(current) and os.access(current, os.W_OK):
        os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
        yield Path(current)
        return
    source = shared_data() / "templateflow"
    if not (source / TEMPLATE_DIR).is_dir():
        pytest.skip(f"template not available at {source}")
    home = tmp_path_factory.mktemp("synth_templateflow_home")
    shutil.copytree(source, home, dirs_exist_ok=True)
    _make_writable(home)
    saved = {k: os.environ.get(k) for k in ("TEMPLATEFLOW_HOME", "TEMPLATEFLOW_AUTOUPDATE")}
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def sources(synth_templateflow_home, lesion_dir):
    """(templates at 2 mm, lesion library) loaded once."""
    from bids_app.synth import load_lesion_library, load_templates

    return load_templates(2.0), load_lesion_library(lesion_dir)


@pytest.fixture(scope="session")
def cli_dataset(tmp_path_factory, synth_templateflow_home, lesion_dir):
    """3 subjects, 2 sites, 2 mm, written by the real console entry point in a fresh process.

    Returns (path, seconds): the wall time includes interpreter start-up and imports.
    """
    out = tmp_path_factory.mktemp("synth_cli") / "ds"
    cmd = [
        sys.executable, "-c", "import sys; from bids_app.cli.tools import main; sys.exit(main(sys.argv[1:]))",
        "synth", str(out), "--n-subjects", "3", "--sites", "2", "--resolution", "2", "--seed", "11",
        "--lesion-masks", str(lesion_dir),
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    return out, elapsed


def _run_validator(dataset: Path, tmp_path: Path) -> dict:
    from bids_app.bids.validation import validator_executable

    exe = validator_executable()  # a project dependency: its absence is a failure, not a skip
    home = tmp_path / "validator_home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), DENO_DIR=str(home / "deno"), NO_COLOR="1")
    proc = subprocess.run([exe, "-r", "--format", "json", str(dataset)], capture_output=True, text=True, env=env,
                          timeout=300)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator gave no JSON (rc {proc.returncode}): {proc.stderr[-2000:]}")


def _issues(report: dict, severity: str) -> list[str]:
    found = []
    parts = [("", report)] + list((report.get("derivativesSummary") or {}).items())
    for where, part in parts:
        for issue in part["issues"]["issues"]:
            if issue.get("severity") == severity:
                found.append(f"{where}{issue.get('location', '')}: {issue.get('code')} {issue.get('subCode') or ''}")
    return found


@pytest.fixture
def validate(tmp_path):
    """validate(dataset) -> (errors, warnings, report) from ``bids-validator-deno -r --format json``."""

    def run(dataset: Path):
        report = _run_validator(Path(dataset), tmp_path)
        return _issues(report, "error"), _issues(report, "warning"), report

    return run
