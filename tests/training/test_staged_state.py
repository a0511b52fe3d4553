"""Fast checks of the resumable demo recipe's bookkeeping (bids_app.training.state, the
generator hook, the trainer's resumable learning-rate schedule); the end-to-end runs are in
test_train_demo_resume.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bids_app.training.generators import GENERATORS, generate_case
from bids_app.training.staged import open_state, run_staged
from bids_app.training.state import (
    StagedConfig,
    config_differences,
    config_from_json,
    member_draws,
    new_state,
    progress_line,
    to_json,
    write_state,
)

POOL = [f"train_{i:03d}" for i in range(20)]


def _cfg(tmp_path: Path, **kw) -> StagedConfig:
    return StagedConfig(workdir=tmp_path, out_model=tmp_path / "model", **kw)


def test_members_get_their_own_seed_and_data_draw(tmp_path):
    draws = member_draws(_cfg(tmp_path, members=5, member_fraction=0.8), POOL)
    assert [d["seed"] for d in draws] == [2026, 2027, 2028, 2029, 2030]
    assert len({d["data_seed"] for d in draws}) == 5
    assert all(len(d["train_cases"]) == 16 and set(d["train_cases"]) <= set(POOL) for d in draws)
    assert len({tuple(d["train_cases"]) for d in draws}) == 5  # five different subsets
    # the same on every run (a resumed run must see the same splits)
    assert draws == member_draws(_cfg(tmp_path, members=5, member_fraction=0.8), POOL)


def test_disjoint_draws_partition_the_pool(tmp_path):
    draws = member_draws(_cfg(tmp_path, members=4, member_data="disjoint"), POOL)
    cases = [c for d in draws for c in d["train_cases"]]
    assert sorted(cases) == POOL and all(len(d["train_cases"]) == 5 for d in draws)


def test_target_epochs_round_up(tmp_path):
    assert _cfg(tmp_path, target_iterations=101, iterations_per_epoch=50).target_epochs == 3
    with pytest.raises(ValueError, match="member_data"):
        _cfg(tmp_path, member_data="bootstrap")


def test_resume_refuses_other_experiment_and_new_run_refuses_existing_state(tmp_path):
    cfg = _cfg(tmp_path, members=3)
    write_state(tmp_path, new_state(cfg))
    with pytest.raises(RuntimeError, match="--resume"):
        open_state(cfg, resume=False)
    other = config_from_json(json.loads((tmp_path / "state.json").read_text())["config"], members=4,
                             budget_seconds=99.0, device="cuda")
    assert config_differences(to_json(vars(cfg)), other) == {"members": (3, 4)}  # runtime fields may change
    with pytest.raises(RuntimeError, match="members: stored 3, given 4"):
        open_state(other, resume=True)
    assert open_state(config_from_json(to_json(vars(cfg)), budget_seconds=5.0), resume=True)["config"]["members"] == 3


def test_progress_line_has_eta_and_budget():
    progress = {"epoch": 10, "target_epochs": 40, "iterations": 500, "train_loss": -0.41, "val_loss": -0.38,
                "pseudo_dice": [0.61, None], "ema_pseudo_dice": 0.55, "lr": 0.0078, "seconds": 60.0}
    line = progress_line("2", progress, {"epoch_seconds": [60.0, 60.0]}, 3600.0)
    assert "member 2 epoch 10/40 it 500/2000" in line
    assert "pseudo-Dice 0.610/-" in line and "ETA 30m00s" in line and "budget left 1h00m" in line


def test_generator_hook_names_and_toy_case():
    assert {"classic", "randomised", "toy"} <= set(GENERATORS)
    with pytest.raises(ValueError, match="unknown generator"):
        generate_case("nope", 1, 0, 1.0, (1, 2), (1, 2))
    channels, labels, info = generate_case("toy", 3, 0, 1.0, (1, 2), (1, 2))
    assert len(channels) == 2 and channels[0].shape == labels.shape
    assert (np.asarray(labels.data) == 1).any() and info["n_wml"] >= 2
    again = generate_case("toy", 3, 0, 1.0, (1, 2), (1, 2))
    assert np.array_equal(again[0][1].data, channels[1].data)  # a seed gives one case


def test_budget_spent_before_a_stage_stops_cleanly(tmp_path):
    cfg = _cfg(tmp_path, generator="toy", n_pool=2, n_val=1, n_test=1, members=1, budget_seconds=1e-6)
    state = run_staged(cfg, echo=lambda *_: None)
    assert state["runs"][-1]["stopped"].startswith("budget")
    assert not any(s["done"] for s in state["stages"].values())
    assert json.loads((tmp_path / "state.json").read_text())["runs"][-1]["stopped"] == state["runs"][-1]["stopped"]


def _trainer(monkeypatch, tmp_path, **env):
    from bids_app.training.plans import make_plans

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # nnU-Net 2.8 reads its folders from the environment when used
    import torch

    from bids_app.training.trainers.nnUNetTrainerMsxplain import nnUNetTrainerMsxplain

    plans = make_plans("Dataset990_T", 2, patch_size_xyz=(16, 16, 16), features=(4, 8))
    plans["continue_training"] = False
    dataset = {"channel_names": {"0": "T1w", "1": "FLAIR"}, "labels": {"background": 0, "WML": 1, "CL": 2},
               "numTraining": 2, "file_ending": ".nii.gz"}
    trainer = nnUNetTrainerMsxplain(plans, "3d_fullres", 1, dataset, torch.device("cpu"))
    trainer.network = torch.nn.Conv3d(2, 3, 1)  # initialize() would need the preprocessed data
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


def test_resumable_trainer_schedule_follows_the_target_not_the_clock(monkeypatch, tmp_path):
    """With MSXPLAIN_TARGET_EPOCHS the LR at epoch e is lr0 (1 - e / target)^0.9 whatever the
    run and the budget (nnU-Net's per-epoch poly schedule; no wall-clock stretching), and a
    checkpoint is written every epoch; without it the v1 behaviour (budget, no latest) stays."""
    trainer = _trainer(monkeypatch, tmp_path, MSXPLAIN_TARGET_EPOCHS="6", MSXPLAIN_TRAIN_SECONDS="30",
                       MSXPLAIN_MEMBER_SEED="77")
    assert trainer.resumable and trainer.num_epochs == 6 and trainer.time_budget == 0 and trainer.save_every == 1
    assert trainer.member_seed == 77 and trainer.lr_scheduler.max_steps == 6
    lrs = []
    for epoch in range(6):
        trainer.lr_scheduler.step(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert np.allclose(lrs, [1e-2 * (1 - e / 6) ** 0.9 for e in range(6)])
    monkeypatch.delenv("MSXPLAIN_TARGET_EPOCHS")
    monkeypatch.delenv("MSXPLAIN_MEMBER_SEED")
    legacy = _trainer(monkeypatch, tmp_path / "v1", MSXPLAIN_TRAIN_SECONDS="30", MSXPLAIN_SEED="10")
    assert not legacy.resumable and legacy.time_budget == 30 and legacy.save_every > 10**6
    assert legacy.member_seed == 11  # seed + fold, as in v1
