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
"""

from __future__ import annotations

import os
import random
import time

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
        seed = int(os.environ.get("MSXPLAIN_SEED", 0)) + int(fold)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.member_seed = seed

    def configure_optimizers(self):
        kind = os.environ.get("MSXPLAIN_OPTIMIZER", "sgd").lower()
        if kind == "adam":
            lr = float(os.environ.get("MSXPLAIN_LR", 1e-3))
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=lr, weight_decay=self.weight_decay)
            return optimizer, PolyLRScheduler(optimizer, lr, self.num_epochs)
        if "MSXPLAIN_LR" in os.environ:
            self.initial_lr = float(os.environ["MSXPLAIN_LR"])
        return super().configure_optimizers()

    def run_training(self):
        self.on_train_start()
        started = time.monotonic()
        epoch_one_done = None
        epoch = self.current_epoch
        while epoch < self.num_epochs:
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

    def perform_actual_validation(self, save_probabilities: bool = False):
        # msxplain checks each member itself (bids_app.training.recipe.check_members) with its
        # own in-process predictor; nnU-Net's validation would spawn 8 export workers.
        self.print_to_log_file("msxplain: nnU-Net's final validation skipped (member check done by msxplain)")
