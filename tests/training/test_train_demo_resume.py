"""``msxplain-tools train-demo`` across runs, end to end on tiny toy data (slow: ~5 min on 2 cores).

A prepared WORKDIR (toy cases synthesised, nnU-Net plans and preprocessing done) is copied
three times:

* A: trained one epoch per member (``stop_after_epochs``), then resumed with ``--resume``
  to the target and through check, tuning, test and packaging;
* B: trained to the target in one run (the reference for the learning-rate schedule);
* C: a longer target under ``--budget-seconds``: the run stops cleanly before its budget
  (within one epoch), the first member keeps ``checkpoint_latest.pth``, the second one never
  starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_app.cli.tools import main as tools_main
from bids_app.training.staged import fold_dir, run_staged
from bids_app.training.state import StagedConfig, config_from_json, read_state, write_state

pytestmark = pytest.mark.slow

TOY = dict(generator="toy", n_pool=4, n_val=2, n_test=2, members=2, target_iterations=6, iterations_per_epoch=2,
           val_iterations=1, features=(4, 8, 16), patch_size=(32, 32, 32), da_workers=0, workers=2,
           torch_threads=2, min_member_dice=0.0, oversample_fg=1.0)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train_demo") / "base"
    cfg = StagedConfig(workdir=base, out_model=base / "model", **TOY)
    state = run_staged(cfg, stop_before="train", echo=_quiet)
    assert state["stages"]["plan_and_preprocess"]["done"] and not state["stages"]["train"]["done"]
    return base


def _copy(prepared: Path, name: str) -> tuple[Path, StagedConfig]:
    dest = prepared.parent / name
    shutil.copytree(prepared, dest)
    return dest, config_from_json(read_state(dest)["config"], workdir=dest, out_model=dest / "model")


def _lrs(workdir: Path, member: str, name: str) -> list[float]:
    cfg = config_from_json(read_state(workdir)["config"])
    ckpt = torch.load(fold_dir(cfg, member) / name, map_location="cpu", weights_only=False)
    return [float(v) for v in ckpt["logging"]["lrs"]], int(ckpt["current_epoch"])


def test_interrupted_run_resumes_where_it_stopped(prepared):
    work, cfg = _copy(prepared, "A")
    before = read_state(work)
    raw_case = next((work / "nnUNet_raw").rglob("train_000_0000.nii.gz"))
    mtime = raw_case.stat().st_mtime_ns
    cfg.stop_after_epochs = 1
    state = run_staged(cfg, resume=True, echo=_quiet)
    for name in ("0", "1"):
        member = state["members"][name]
        assert (member["epochs_done"], member["iterations_done"], member["done"]) == (1, 2, False)
        assert (fold_dir(cfg, name) / "checkpoint_latest.pth").is_file()
        assert not (fold_dir(cfg, name) / "checkpoint_final.pth").exists()
    assert not state["stages"]["train"]["done"] and not state["stages"]["check_and_tune"]["done"]
    assert state["members"]["0"]["seed"] != state["members"]["1"]["seed"]
    assert state["members"]["0"]["train_cases"] != state["members"]["1"]["train_cases"]

    # the CLI with --resume: options come from the stored run
    assert tools_main(["train-demo", str(work), "--resume", "--budget-seconds", "0"]) == 0
    state = read_state(work)
    # finished stages were not redone
    for stage in ("synthesize", "plan_and_preprocess"):
        assert state["stages"][stage] == before["stages"][stage]
    assert raw_case.stat().st_mtime_ns == mtime
    log = (work / "logs" / "train_member0.log").read_text()
    assert "resumed at epoch 1" in (work / "logs" / "progress.log").read_text()
    assert "Epoch 0" in log and "Epoch 1" in log and "Epoch 2" in log
    for name in ("0", "1"):
        member = state["members"][name]
        assert (member["epochs_done"], member["iterations_done"], member["done"]) == (3, 6, True)
        assert member["runs"] == 2 and member["wall_seconds"] > 0
        # the epochs continue (1, 2 in the second run), never restart at 0
        assert [e for e, _ in member["lr_by_epoch"]] == [0, 1, 2]
        assert (work / member["finished_checkpoint"]).is_file()
    assert all(state["stages"][s]["done"] for s in state["stages"])
    assert state["runs"][-2]["stopped"].startswith("budget: train") and state["runs"][-1]["stopped"] == "finished"

    # the package: one weights-only checkpoint per member, seeds and data seeds in the card
    model = Path(state["results"]["model_dir"])
    card = json.loads((model / "msxplain_model.json").read_text())
    assert card["id"] == "msxplain-demo-synth-v2" and len(card["members"]) == 2
    for entry in card["members"]:
        member = state["members"][entry["trained_as_fold"]]
        assert (entry["seed"], entry["data_seed"], entry["iterations"]) == (member["seed"], member["data_seed"], 6)
        ckpt = torch.load(model / f"fold_{entry['fold']}" / "checkpoint_final.pth", weights_only=True)
        assert "optimizer_state" not in ckpt and ckpt["network_weights"]
        assert len(list((model / f"fold_{entry['fold']}").iterdir())) == 1

    # B: the same members trained in one run; the learning rate at each epoch is the same
    ref, cfg_b = _copy(prepared, "B")
    run_staged(cfg_b, resume=True, stop_before="check_and_tune", echo=_quiet)
    for name in ("0", "1"):
        resumed, epochs = _lrs(work, name, "checkpoint_final.pth")
        straight, epochs_b = _lrs(ref, name, "checkpoint_final.pth")
        assert epochs == epochs_b == 3
        assert np.allclose(resumed, straight) and np.allclose(straight, [1e-2 * (1 - e / 3) ** 0.9 for e in range(3)])


def test_budget_stops_training_cleanly(prepared):
    work, cfg = _copy(prepared, "C")
    state = read_state(work)
    state["config"]["target_iterations"] = 400  # the same data, a target far beyond the budget
    write_state(work, state)
    cfg.target_iterations, cfg.budget_seconds = 400, 50.0
    state = run_staged(cfg, resume=True, echo=_quiet)
    run = state["runs"][-1]
    first = state["members"]["0"]
    assert run["stopped"].startswith("budget: train")
    assert 1 <= first["epochs_done"] < 200 and not first["done"]
    assert run["seconds"] <= 50.0 + max(first["epoch_seconds"]) + 10.0
    assert (fold_dir(cfg, "0") / "checkpoint_latest.pth").is_file()
    assert not (fold_dir(cfg, "0") / "checkpoint_final.pth").exists()
    assert state["members"]["1"]["epochs_done"] == 0 and "runs" not in state["members"]["1"]
    _, epoch = _lrs(work, "0", "checkpoint_latest.pth")
    assert epoch == first["epochs_done"]
