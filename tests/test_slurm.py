"""The participant level through a real single-node SLURM (Nipype's SLURM and SLURMGraph plugins)."""

from __future__ import annotations

import json

import pytest
from slurm_cluster import slurm_cluster

from bids_app.bids.validation import validate
from bids_app.testing import make_bids, run_cli


@pytest.fixture(scope="module")
def slurm_env():
    with slurm_cluster() as env:
        yield env


@pytest.mark.slurm
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_participant_level_through_slurm(plugin, slurm_env, tiny_model, tmp_path, monkeypatch):
    import subprocess

    for key in ("SLURM_CONF", "LOGNAME"):
        monkeypatch.setenv(key, slurm_env[key])
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out, work = tmp_path / "out", tmp_path / "work"
    args = {"sbatch_args": "--mem=1G", "max_tries": 2} if plugin == "SLURM" else {"dont_resubmit_completed_jobs": True}
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", work, "--skull-stripped", "yes",
                    "--no-tta", "--no-lesion-features", "--skip-bids-validation", "--plugin", plugin,
                    "--plugin-args", json.dumps(args)])
    assert code == 0
    assert (out / "sub-01" / "anat" / "sub-01_lesions.tsv").is_file()
    assert (out / "sub-01" / "anat" / "sub-01_summary.json").is_file()
    assert validate(out).errors == []
    # the nodes really ran as SLURM jobs
    batch = list(work.rglob("batchscript_*.sh")) + list(work.rglob("batch/*.sh"))
    assert batch, "no SLURM batch script was written"
    assert subprocess.run(["squeue", "-h"], env=slurm_env, capture_output=True, text=True).stdout.strip() == ""
