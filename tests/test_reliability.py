"""Fault injection, resumable runs, concurrent writers, determinism and run records."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bids_app.testing import make_bids, run_cli

REPO = Path(__file__).resolve().parents[1]


def digests(out: Path) -> dict[str, str]:
    """SHA-256 of every derivative file (logs are per run by design)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and "logs" not in p.relative_to(out).parts
            and "log" not in p.relative_to(out).parts}


def cli(bids, out, work, model, *extra) -> list[str]:
    return [sys.executable, "-m", "bids_app", str(bids), str(out), "participant", "--model", str(model), "-w",
            str(work), "--skull-stripped", "yes", "--no-lesion-features", "--skip-bids-validation", "--nprocs", "2",
            *[str(e) for e in extra]]


# every test here runs the participant pipeline (kill and resume, reruns, concurrent runs)
pytestmark = pytest.mark.slow


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_bids(tmp_path_factory.mktemp("rel") / "bids", subjects=("01", "02"))


@pytest.fixture(scope="module")
def reference_run(dataset, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    out = root / "out"
    assert run_cli(cli(dataset, out, root / "work", tiny_model, "--participant-label", "01")[3:]) == 0
    return out


def test_sigkill_during_inference_then_resume(dataset, tiny_model, reference_run, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = cli(dataset, out, work, tiny_model, "--participant-label", "01")
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        predict_dirs = list(work.glob("*/sub_01_wf/predict"))
        if predict_dirs and not (predict_dirs[0] / "result_predict.pklz").exists():
            time.sleep(0.5)  # well inside the 8-fold mirrored inference of 3 members
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run ended before inference could be interrupted"
    # nothing of the session, no temporary file in the output
    assert not (out / "sub-01" / "anat").exists() or not list((out / "sub-01" / "anat").iterdir())
    assert not list(out.glob(".msxplain-staging-*"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    finished = {p: p.stat().st_mtime_ns for p in work.glob("*/sub_01_wf/*/result_*.pklz")}
    assert any("conform" in str(p) for p in finished) and not any("predict" in str(p) for p in finished)
    # resume with the same work directory
    assert subprocess.run(argv, env=env(), capture_output=True).returncode == 0
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent.name} was recomputed"
    # same outputs as an uninterrupted run (byte for byte: no timestamps in derivatives)
    assert digests(out) == digests(reference_run)


def test_reruns_are_byte_identical_and_agree_with_version(dataset, tiny_model, reference_run, tmp_path):
    from bids_app import __version__

    out = tmp_path / "out"
    assert run_cli(cli(dataset, out, tmp_path / "work", tiny_model, "--participant-label", "01")[3:]) == 0
    assert digests(out) == digests(reference_run)
    sidecar = json.loads(next(out.rglob("*_label-WML_mask.json")).read_text())
    assert sidecar["msxplain"]["Version"] == __version__ == sidecar["msxplain"]["Software"]["msxplain"]


def test_two_runs_writing_into_one_output_at_once(dataset, tiny_model, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(cli(dataset, out, tmp_path / f"work{sub}", tiny_model, "--participant-label", sub),
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for sub in ("01", "02")]
    codes = [p.wait() for p in procs]
    assert codes == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    for sub in ("01", "02"):
        assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_lesions.tsv").is_file()
        assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_summary.json").is_file()
    assert not list(out.glob(".msxplain-staging-*")) and not list(out.glob(".*.tmp"))
    from bids_app.bids.validation import validate

    assert validate(out).errors == []


def test_run_record_repeats_the_run(dataset, tiny_model, reference_run, tmp_path):
    from bids_app.cli.tools import main as tools

    records = sorted((reference_run / "logs").glob("config-*.json"))
    assert records
    record = json.loads(records[-1].read_text())
    assert record["parameters"]["Threshold"] == 0.5 and record["argv"][1] == str(reference_run)
    assert tools(["rerun", str(records[-1]), "--check-only"]) == 0
