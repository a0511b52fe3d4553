"""The README's demo command, run as a user would: from a folder that already holds ``demo/``
(an earlier demo's outputs, or anything else called like the bundled model), with an offline
TemplateFlow cache and no ``../shared`` in sight. CI also runs ``./scripts/demo.sh`` itself from
a fresh clone (``.ci/run``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_runs_from_a_folder_holding_demo(tmp_path, templateflow_home):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("not a model\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSXPLAIN_")}
    env.update(TEMPLATEFLOW_HOME=str(templateflow_home), DEMO_SUBJECTS="1", NPROCS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(REPO / "scripts" / "demo.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / "msxplain-demo" / "out"
    assert (out / "sub-001.html").is_file()
    assert (out / "group" / "group_report.html").is_file()
    summary = json.loads(next(out.glob("sub-001/anat/*_summary.json")).read_text())
    assert summary["provenance"]["Model"]["Id"] == "msxplain-demo-synth-v1"  # the bundled model, not ./demo
    assert summary["evaluation"]  # evaluated against the true masks
    assert (tmp_path / "demo" / "notes.txt").read_text() == "not a model\n"  # untouched
    assert "shared" not in proc.stderr
    assert "predict: member 1/3" in proc.stderr and "ETA" in proc.stderr
