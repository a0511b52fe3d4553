"""Shared fixtures: offline TemplateFlow, isolated caches, the tiny nnU-Net model, small BIDS datasets.

Helpers that tests call (``make_bids``, ``make_case``, ``write_nifti``, ``run_cli``, ``need_shared``)
live in :mod:`bids_app.testing`; this file only holds fixtures and the ``slow`` marking rule.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bids_app.testing import make_bids, shared_data_dir

SHARED = shared_data_dir()


@pytest.fixture(scope="session", autouse=True)
def templateflow_home(tmp_path_factory) -> Path:
    """A writable copy of ../shared/data/templateflow as TEMPLATEFLOW_HOME (never downloads)."""
    home = tmp_path_factory.mktemp("templateflow")
    src = SHARED / "templateflow"
    if src.is_dir():
        shutil.copytree(src, home, dirs_exist_ok=True)
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    return home


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    os.environ["MSXPLAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("DENO_DIR", str(tmp_path_factory.mktemp("deno")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Trainer folder of the tiny 3-member nnU-Net model (built once per test session)."""
    import torch

    from bids_app.testing.tiny_model import build_tiny_model

    torch.set_num_threads(2)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), n_members=3, iterations=60)


@pytest.fixture
def bids_factory(tmp_path):
    def factory(name="bids", **kwargs):
        return make_bids(tmp_path / name, **kwargs)

    return factory


#: module fixtures that run the whole participant pipeline (and the tests that use them are
#: full-pipeline tests: marked ``slow``, outside the default suite; CI runs them)
FULL_PIPELINE_FIXTURES = frozenset({"participant_run", "broken_run", "explain_run", "reference_run", "unit1_run"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_PIPELINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
