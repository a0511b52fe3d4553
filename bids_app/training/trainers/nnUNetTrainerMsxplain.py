"""nnU-Net trainer of the msxplain demo ensemble: short epochs, a wall-clock budget, seeds.

nnU-Net finds it by name through ``nnUNet_extTrainer`` pointing at this folder
(``msxplain-tools train-demo`` sets it). It changes only the schedule, never the network,
the loss or the augmentation, so a model it trains is an ordinary nnU-Net v2 model
(``build_network_architecture`` is not overridden: msxplain rebuilds the network from the
plans).

Environment knobs (recorded in the model card):

* ``MSXPLAIN_ITERATIONS_PER_EPOCH`` (default 100), ``MSXPLAIN_VAL_ITERATIONS`` (default 10)
* ``MSXPLAIN_MAX_EPOCHS`` (default 1000)
* ``MSXPLAIN_TRAIN_SECONDS``: wall-clock budget; after the first epoch the number of epochs
  is set to what fits, and the poly learning-rate schedule is stretched to it, so the
  learning rate still decays to zero at the end (stopping a 1000-epoch schedule early would
  leave it high)
* ``MSXPLAIN_SEED``: base seed; member (fold) k uses ``seed + k`` for torch, numpy, random
* ``MSXPLAIN_OPTIMIZER`` (``sgd``, nnU-Net's SGD with Nesterov momentum 0.99, or ``adam``:
  AdamW) and ``MSXPLAIN_LR`` (default 1e-2 for SGD, 1e-3 for AdamW); both with nnU-Net's poly decay
* ``MSXPLAIN_OVERSAMPLE_FG`` (default 1.0): fraction of patches forced to contain foreground
  (nnU-Net rounds it per batch: with batch 2, 0.33 and 0.66 both give one of two)

Resumable mode (``msxplain-tools train-demo``'s staged recipe, :mod:`bids_app.training.staged`;
``docs/demo-model.md``, "v2 training infrastructure"), chosen by ``MSXPLAIN_TARGET_EPOCHS``:

* ``MSXPLAIN_TARGET_EPOCHS``: the member's planned total; the poly learning rate follows it
  (``lr0 * (1 - epoch / target) ** 0.9``, nnU-Net's own per-epoch schedule), so a run resumed
  with ``nnUNetv2_train ... --c`` from ``checkpoint_latest.pth`` continues the same schedule
  (``MSXPLAIN_TRAIN_SECONDS`` is ignored: no stretching);
* ``MSXPLAIN_DEADLINE``: Unix time by which this run must have stopped; after each epoch the
  run stops cleanly (``checkpoint_latest.pth`` written, no ``checkpoint_final.pth``) when
  the next epoch would end after it. At least one epoch runs per invocation;
* ``MSXPLAIN_STOP_AFTER_EPOCHS``: stop after this many epochs in this run (tests, smoke runs);
* ``MSXPLAIN_MEMBER_SEED``: the member's seed (instead of ``MSXPLAIN_SEED + fold``); a resumed
  run reseeds with ``(seed, epoch)`` so that it does not replay the first session's draws;
* ``MSXPLAIN_TORCH_THREADS``: torch intra-op threads (``nnUNetv2_train -device cpu`` takes all
  cores; two members in parallel on 2 cores take one each).

Every epoch prints one line ``MSXPLAIN_PROGRESS {json}`` (epoch, iterations, losses,
pseudo Dice, EMA pseudo Dice, learning rate, seconds) that the recipe relays to its log and
state file.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from os.path import join

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerMsxplain(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's trainer signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("MSXPLAIN_ITERATIONS_PER_EPOCH", 100))
        self.num_val_iterations_per_epoch = int(os.environ.get("MSXPLAIN_VAL_ITERATIONS", 10))
        self.num_epochs = int(os.environ.get("MSXPLAIN_MAX_EPOCHS", 1000))
        self.time_budget = float(os.environ.get("MSXPLAIN_TRAIN_SECONDS", 0) or 0)
        self.save_every = 10**9  # only checkpoint_final (and checkpoint_best) are written
        # Small lesions and short schedules: 3 of 4 members collapsed to all-background with
        # nnU-Net's 33 % foreground sampling in the first GPU run (docs/demo-model.md); more
        # patches centred on lesions keep the Dice term alive early on.
        self.oversample_foreground_percent = float(os.environ.get("MSXPLAIN_OVERSAMPLE_FG", 1.0))
        seed = int(os.environ.get("MSXPLAIN_MEMBER_SEED", int(os.environ.get("MSXPLAIN_SEED", 0)) + int(fold)))
        _seed_everything(seed)
        self.member_seed = seed
        if os.environ.get("MSXPLAIN_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["MSXPLAIN_TORCH_THREADS"]))
        target = int(os.environ.get("MSXPLAIN_TARGET_EPOCHS", 0) or 0)
        self.resumable = target > 0
        if self.resumable:
            self.num_epochs = target
            self.time_budget = 0.0  # the schedule follows the target, never the clock
            self.save_every = 1  # checkpoint_latest.pth after every epoch: a kill loses one epoch at most
        self.deadline = float(os.environ.get("MSXPLAIN_DEADLINE", 0) or 0)
        self.stop_after = int(os.environ.get("MSXPLAIN_STOP_AFTER_EPOCHS", 0) or 0)

    def configure_optimizers(self):
        kind = os.environ.get("MSXPLAIN_OPTIMIZER", "sgd").lower()
        if kind == "adam":
            lr = float(os.environ.get("MSXPLAIN_LR", 1e-3))
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=lr, weight_decay=self.weight_decay)
            return optimizer, PolyLRScheduler(optimizer, lr, self.num_epochs)
        if "MSXPLAIN_LR" in os.environ:
            self.initial_lr = float(os.environ["MSXPLAIN_LR"])
        return super().configure_optimizers()

    def on_train_start(self):
        if self.resumable and self.current_epoch > 0:
            # resumed (checkpoint loaded before this call): new draws, not a replay of epoch 0's
            _seed_everything(self.member_seed * 100_003 + self.current_epoch)
        super().on_train_start()

    def _one_epoch(self) -> None:
        """nnU-Net's epoch (``nnUNetTrainer.run_training``'s loop body): training iterations,
        validation iterations, then ``on_epoch_end`` (logging, checkpoints, epoch count)."""
        self.on_epoch_start()
        self.on_train_epoch_start()
        train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
        self.on_train_epoch_end(train_outputs)
        with torch.no_grad():
            self.on_validation_epoch_start()
            val_outputs = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]
            self.on_validation_epoch_end(val_outputs)
        self.on_epoch_end()

    def run_training(self):
        if self.resumable:
            return self._run_resumable()
        self.on_train_start()
        started = time.monotonic()
        epoch_one_done = None
        epoch = self.current_epoch
        while epoch < self.num_epochs:
            self._one_epoch()
            epoch = self.current_epoch
            if self.time_budget and epoch == 1:
                epoch_one_done = time.monotonic()
            elif self.time_budget and epoch == 2:
                # the first epoch also paid for starting the augmentation workers: time the second
                now = time.monotonic()
                per_epoch = max(now - epoch_one_done, 1e-3)
                fit = epoch + max(0, int((self.time_budget - (now - started)) // per_epoch))
                self.num_epochs = max(epoch, min(self.num_epochs, fit))
                self.lr_scheduler.max_steps = max(self.num_epochs, 1)
                self.print_to_log_file(f"msxplain: {per_epoch:.1f} s per epoch, budget "
                                       f"{self.time_budget:.0f} s -> {self.num_epochs} epochs")
            if self.time_budget and epoch < self.num_epochs and time.monotonic() - started > 1.25 * self.time_budget:
                # the machine slowed down after the estimate (shared CPUs): stop rather than overrun
                self.print_to_log_file(f"msxplain: wall-clock budget exceeded after {epoch} epochs; stopping")
                self.num_epochs = epoch
        self.on_train_end()

    def _run_resumable(self):
        """Train to ``num_epochs`` (the target) or until this run's deadline / epoch limit.

        On a stop before the target only ``checkpoint_latest.pth`` (written by
        :meth:`on_epoch_end` every epoch) is left, so ``nnUNetv2_train ... --c`` resumes from
        it; ``checkpoint_final.pth`` is written only when the target is reached.
        """
        self.on_train_start()
        run_epochs, durations = 0, []
        while self.current_epoch < self.num_epochs:
            started = time.monotonic()
            self._one_epoch()
            run_epochs += 1
            durations.append(time.monotonic() - started)
            self._report_progress(durations[-1])
            if self.current_epoch >= self.num_epochs:
                break
            if self.stop_after and run_epochs >= self.stop_after:
                return self._stop_early(f"{run_epochs} epochs in this run (MSXPLAIN_STOP_AFTER_EPOCHS)")
            # the next epoch is assumed as long as the slowest of the last two (shared CPUs vary)
            if self.deadline and time.time() + max(durations[-2:]) > self.deadline:
                return self._stop_early("the next epoch would end after this run's deadline")
        self.on_train_end()

    def _stop_early(self, why: str) -> None:
        """Leave checkpoint_latest.pth (already written), shut the augmentation workers down."""
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

        self.print_to_log_file(f"msxplain: stopping at epoch {self.current_epoch} of {self.num_epochs}: {why}; "
                               f"resume with nnUNetv2_train ... --c")
        for loader in (self.dataloader_train, self.dataloader_val):
            if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                loader._finish()
        if not os.path.isfile(join(self.output_folder, "checkpoint_latest.pth")):
            self.current_epoch -= 1  # save_checkpoint stores current_epoch + 1 (as on_train_end does)
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
            self.current_epoch += 1

    def _report_progress(self, seconds: float) -> None:
        """One machine-readable line per epoch for the recipe (epoch = epochs done so far)."""
        value = self.logger.get_value
        dice = [float(v) for v in value("dice_per_class_or_region", step=-1)]
        ema = float(value("ema_fg_dice", step=-1))
        best = None if self._best_ema is None else float(self._best_ema)
        line = {"epoch": int(self.current_epoch), "target_epochs": int(self.num_epochs),
                "iterations": int(self.current_epoch * self.num_iterations_per_epoch),
                "train_loss": round(float(value("train_losses", step=-1)), 5),
                "val_loss": round(float(value("val_losses", step=-1)), 5),
                "pseudo_dice": [None if np.isnan(v) else round(v, 4) for v in dice],
                "ema_pseudo_dice": None if np.isnan(ema) else round(ema, 4),
                "best_ema_pseudo_dice": None if best is None or np.isnan(best) else round(best, 4),
                "lr": float(value("lrs", step=-1)), "seconds": round(seconds, 2), "seed": self.member_seed}
        print("MSXPLAIN_PROGRESS " + json.dumps(line), flush=True)
        sys.stdout.flush()

    def perform_actual_validation(self, save_probabilities: bool = False):
        # msxplain checks each member itself (bids_app.training.recipe.check_members) with its
        # own in-process predictor; nnU-Net's validation would spawn 8 export workers.
        self.print_to_log_file("msxplain: nnU-Net's final validation skipped (member check done by msxplain)")


def _seed_everything(seed: int) -> None:
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
