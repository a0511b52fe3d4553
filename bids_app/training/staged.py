"""The resumable demo recipe: ``msxplain-tools train-demo WORKDIR --budget-seconds S [--resume]``.

The v2 demo ensemble (issue 14 item 2) needs more CPU training than one session holds, so the
recipe of :mod:`bids_app.training.recipe` runs here as stages recorded in ``WORKDIR/state.json``
(:mod:`bids_app.training.state`); a run with ``--resume`` skips what is done:

1. ``synthesize``: the cases of the training pool, validation and test sets, one at a time
   (a run that reaches its budget stops between cases), made by the configured generator
   (:mod:`bids_app.training.generators`);
2. ``plan_and_preprocess``: nnU-Net's planning and preprocessing, the reduced plans
   (:func:`bids_app.training.recipe.plan_and_preprocess`), and ``splits_final.json`` with
   each member's own draw of the pool (:func:`bids_app.training.state.member_draws`);
3. ``train``: each member with ``nnUNetv2_train`` and the trainer's resumable mode (the
   poly learning rate follows the member's target, ``--c`` continues from
   ``checkpoint_latest.pth``, the run stops cleanly before its deadline), ``parallel`` members
   at a time; one progress line per epoch to ``WORKDIR/logs/progress.log`` and stdout; a
   finished member's weights-only checkpoint goes to ``WORKDIR/finished/fold_<k>/``;
4. ``check_and_tune``, ``evaluate_test``, ``package``: only once every member has reached its
   target; the recipe's own member check, threshold tuning, test and packaging, then the card
   gets each member's seed, data seed, iterations and validation figures.

Where the state lives, its format and the commands: ``docs/demo-model.md``, "v2 training
infrastructure (issue 14)". nnU-Net v2: Isensee et al., Nature Methods 2021,
doi:10.1038/s41592-020-01008-z.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from bids_app.training import recipe as R
from bids_app.training.state import (
    STAGES,
    StagedConfig,
    config_differences,
    member_draws,
    new_state,
    progress_line,
    read_state,
    to_json,
    write_state,
)

LOGGER = logging.getLogger("bids_app.training.staged")
#: seconds kept back from the budget for stopping a member and writing its checkpoint
STOP_MARGIN_S = 15.0
#: assumed start-up of one nnUNetv2_train process before any measurement (s)
STARTUP_GUESS_S = 30.0


class BudgetSpent(Exception):
    """The run's budget ends before the next step can start (the state says where it stopped)."""


def recipe_config(cfg: StagedConfig):
    """The :class:`~bids_app.training.recipe.RecipeConfig` the recipe's shared steps read."""
    return R.RecipeConfig(
        workdir=cfg.workdir, out_model=cfg.out_model, dataset_id=cfg.dataset_id, dataset_name=cfg.dataset_name,
        n_train=cfg.n_pool, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed, resolution_mm=cfg.resolution_mm,
        workers=cfg.workers, members=cfg.members, device=cfg.device, features=cfg.features,
        patch_size=cfg.patch_size, batch_size=cfg.batch_size, da_workers=cfg.da_workers, wml_load=cfg.wml_load,
        cl_load=cfg.cl_load, templates_dir=cfg.templates_dir, lesion_dir=cfg.lesion_dir,
        connectivity=cfg.connectivity, detection_threshold=cfg.detection_threshold,
        min_member_dice=cfg.min_member_dice, iterations_per_epoch=cfg.iterations_per_epoch,
        val_iterations=cfg.val_iterations, train_seconds=0.0, max_epochs=cfg.target_epochs)


class Run:
    """One invocation: the config, the state, the deadline and the log."""

    def __init__(self, cfg: StagedConfig, state: dict, echo=print):
        self.cfg, self.state, self.echo = cfg, state, echo
        self.started = time.monotonic()
        self.deadline = self.started + cfg.budget_seconds if cfg.budget_seconds > 0 else None
        (cfg.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.progress_log = cfg.workdir / "logs" / "progress.log"

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def say(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.progress_log, "a") as handle:
            handle.write(line + "\n")
        self.echo(line)

    def save(self) -> None:
        write_state(self.cfg.workdir, self.state)


# --------------------------------------------------------------------------------------
# 1. synthesis (resumable case by case)
# --------------------------------------------------------------------------------------
def _case_jobs(cfg: StagedConfig) -> list[dict]:
    return R.case_jobs(cfg, cfg.workdir / "nnUNet_raw" / cfg.dataset, cfg.n_pool, generator=cfg.generator)


def synthesize(run: Run) -> dict:
    from bids_app.training.dataset import write_dataset_json

    cfg, done = run.cfg, run.state["cases"]
    todo = [j for j in _case_jobs(cfg) if j["case"] not in done]
    run.say(f"synthesize: {len(done)} cases done, {len(todo)} to make (generator {cfg.generator})")
    spent = []
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        running = {}
        while todo or running:
            per_case = (sum(spent) / len(spent) / max(1, cfg.workers)) if spent else 0.0
            while todo and len(running) < max(1, cfg.workers):
                if run.left() is not None and run.left() < per_case:
                    todo = []  # no new case: the budget would be spent before it ends
                    break
                job = todo.pop(0)
                running[pool.submit(R._synth_case, job)] = (job, time.monotonic())
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job, t0 = running.pop(future)
                done[job["case"]] = future.result()
                spent.append(time.monotonic() - t0)
            run.save()
    n_all = cfg.n_pool + cfg.n_val + cfg.n_test
    if len(done) < n_all:
        raise BudgetSpent(f"synthesize: {len(done)} of {n_all} cases made")
    raw = cfg.workdir / "nnUNet_raw" / cfg.dataset
    write_dataset_json(raw, R.CHANNELS, R.LABELS, cfg.n_pool + cfg.n_val,
                       description=f"msxplain synthetic MS lesions (generator {cfg.generator}), skull-stripped, RAS+")
    (cfg.workdir / "cases.json").write_text(json.dumps(cases_by_set(run.state), indent=1))
    return {"n_cases": len(done), "per_case_s": round(sum(spent) / len(spent), 1) if spent else None}


def cases_by_set(state: dict) -> dict[str, list[dict]]:
    """The recipe's ``cases`` ({"train": pool, "val", "test"}) from the state, in case order."""
    out = {"train": [], "val": [], "test": []}
    for name in sorted(state["cases"]):
        out[name.split("_")[0]].append(state["cases"][name])
    return out


# --------------------------------------------------------------------------------------
# 2. plans, preprocessing, the members' data draws
# --------------------------------------------------------------------------------------
def plan_and_preprocess(run: Run) -> dict:
    cfg = run.cfg
    rc = recipe_config(cfg)
    rc.da_workers = max(1, rc.da_workers)  # the planner sets torch threads from nnUNet_n_proc_DA (0 fails)
    info = R.plan_and_preprocess(rc)
    cases = cases_by_set(run.state)
    write_member_splits(run, [c["case"] for c in cases["train"]], [c["case"] for c in cases["val"]])
    return {"plans": info}


def write_member_splits(run: Run, pool: list[str], val: list[str]) -> None:
    """Record each member's draw in the state and write nnU-Net's ``splits_final.json``
    (fold k = member k: its own training cases, the shared validation cases)."""
    cfg = run.cfg
    draws = member_draws(cfg, pool)
    for d in draws:
        member = run.state["members"].setdefault(d["member"], {})
        member.update({"seed": d["seed"], "data_seed": d["data_seed"], "n_train_cases": len(d["train_cases"]),
                       "train_cases": d["train_cases"], "target_epochs": cfg.target_epochs,
                       "target_iterations": cfg.target_epochs * cfg.iterations_per_epoch})
        member.setdefault("epochs_done", 0)
        member.setdefault("iterations_done", 0)
        member.setdefault("wall_seconds", 0.0)
        member.setdefault("done", False)
    pre = cfg.workdir / "nnUNet_preprocessed" / cfg.dataset
    (pre / "splits_final.json").write_text(json.dumps([{"train": d["train_cases"], "val": val} for d in draws],
                                                      indent=1))


# --------------------------------------------------------------------------------------
# 3. members (resumable)
# --------------------------------------------------------------------------------------
def fold_dir(cfg: StagedConfig, member: str) -> Path:
    return recipe_config(cfg).trainer_dir / f"fold_{member}"


def _member_env(cfg: StagedConfig, member: dict, deadline_unix: float | None) -> dict:
    env = recipe_config(cfg).env()
    env.update({
        "MSXPLAIN_TARGET_EPOCHS": str(cfg.target_epochs),
        "MSXPLAIN_MEMBER_SEED": str(member["seed"]),
        "MSXPLAIN_TRAIN_SECONDS": "0",
        "MSXPLAIN_DEADLINE": "" if deadline_unix is None else f"{deadline_unix:.1f}",
        "MSXPLAIN_STOP_AFTER_EPOCHS": str(cfg.stop_after_epochs or 0),
        "MSXPLAIN_TORCH_THREADS": str(cfg.torch_threads),
        "MSXPLAIN_OVERSAMPLE_FG": str(cfg.oversample_fg),
        "OMP_NUM_THREADS": str(cfg.torch_threads),
    })
    return env


def _start_member(run: Run, name: str, events: queue.Queue) -> dict:
    cfg = run.cfg
    resume = (fold_dir(cfg, name) / "checkpoint_latest.pth").is_file()
    left = run.left()
    deadline = None if left is None else time.time() + left - STOP_MARGIN_S
    cmd = [*R._entry("nnunetv2.run.run_training", "run_training_entry", "nnUNetv2_train"), str(cfg.dataset_id),
           R.CONFIGURATION, name, "-tr", R.TRAINER, "-p", R.PLANS, "-device", cfg.device] + (["--c"] if resume else [])
    log = open(cfg.workdir / "logs" / f"train_member{name}.log", "a")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} member {name}\n")
    proc = subprocess.Popen(cmd, env=_member_env(cfg, run.state["members"][name], deadline), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def relay():
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith("MSXPLAIN_PROGRESS "):
                events.put((name, json.loads(line.split(" ", 1)[1])))
        proc.wait()
        log.close()
        events.put((name, None))

    threading.Thread(target=relay, daemon=True).start()
    member = run.state["members"][name]
    run.say(f"member {name}: {'resumed at epoch ' + str(member['epochs_done']) if resume else 'started'} "
            f"(seed {member['seed']}, data seed {member['data_seed']}, {member['n_train_cases']} cases)")
    return {"proc": proc, "started": time.monotonic(), "wall_before": run.state["members"][name]["wall_seconds"],
            "first_epoch_at": None}


def _epoch_estimate(state: dict, name: str) -> float | None:
    own = state["members"][name].get("epoch_seconds") or []
    other = [s for m in state["members"].values() for s in (m.get("epoch_seconds") or [])[-5:]]
    values = own[-5:] or other
    return max(values) if values else None


def _can_start(run: Run, name: str) -> bool:
    left = run.left()
    if left is None:
        return True
    startup = run.state.get("startup_seconds") or STARTUP_GUESS_S
    epoch = _epoch_estimate(run.state, name) or 0.0
    return left - STOP_MARGIN_S > startup + epoch


def train(run: Run) -> dict:
    cfg, state = run.cfg, run.state
    todo = [m for m in sorted(state["members"], key=int) if not state["members"][m]["done"]]
    events: queue.Queue = queue.Queue()
    running: dict[str, dict] = {}
    errors: set[str] = set()
    while todo or running:
        while todo and len(running) < max(1, cfg.parallel):
            if not _can_start(run, todo[0]):
                run.say(f"train: budget left ({run.left():.0f} s) is less than a start-up and an epoch; stopping")
                todo = []
                break
            name = todo.pop(0)
            running[name] = _start_member(run, name, events)
        if not running:
            break
        try:
            name, progress = events.get(timeout=5.0)
        except queue.Empty:
            _kill_overdue(run, running)
            continue
        job, member = running[name], state["members"][name]
        member["wall_seconds"] = round(job["wall_before"] + time.monotonic() - job["started"], 1)
        if progress is None:
            if not _member_ended(run, name, job["proc"].returncode) and not job.get("killed"):
                errors.add(name)
            running.pop(name)
        else:
            if job["first_epoch_at"] is None:
                job["first_epoch_at"] = time.monotonic()
                startup = job["first_epoch_at"] - job["started"] - progress["seconds"]
                state["startup_seconds"] = round(max(0.0, startup), 1)
            member.update({"epochs_done": progress["epoch"], "iterations_done": progress["iterations"],
                           "last": progress, "best_ema_pseudo_dice": progress.get("best_ema_pseudo_dice")})
            member["epoch_seconds"] = (member.get("epoch_seconds", []) + [progress["seconds"]])[-20:]
            member["lr_by_epoch"] = (member.get("lr_by_epoch", []) + [[progress["epoch"] - 1, progress["lr"]]])
            run.say(progress_line(name, progress, member, run.left()))
        run.save()
    missing = [m for m in sorted(state["members"], key=int) if not state["members"][m]["done"]]
    failed = [m for m in missing if m in errors]
    if failed:
        raise RuntimeError(f"train: nnUNetv2_train failed for members {', '.join(failed)} "
                           f"(logs/train_member<k>.log)")
    if missing:
        raise BudgetSpent(f"train: members {', '.join(missing)} have not reached {cfg.target_epochs} epochs")
    return {"members": {m: {k: v for k, v in state["members"][m].items() if k in ("epochs_done", "iterations_done",
                                                                                  "wall_seconds")}
                        for m in state["members"]}}


def _kill_overdue(run: Run, running: dict) -> None:
    """A member still running well after the deadline (its epoch was far slower than measured)
    is stopped; its last checkpoint_latest.pth (one epoch back) stays."""
    if run.deadline is None:
        return
    over = time.monotonic() - run.deadline
    for name, job in running.items():
        grace = 120.0 + 1.5 * (_epoch_estimate(run.state, name) or 0.0)
        if over > grace and job["proc"].poll() is None:
            run.say(f"member {name}: still running {over:.0f} s after the deadline; terminating it")
            job["proc"].terminate()
            job["killed"] = True


def _member_ended(run: Run, name: str, code: int) -> bool:
    """Record how a member's process ended; False when it failed."""
    cfg, member = run.cfg, run.state["members"][name]
    final = fold_dir(cfg, name) / "checkpoint_final.pth"
    member["runs"] = member.get("runs", 0) + 1
    if code == 0 and final.is_file():
        member["done"] = True
        member["finished_checkpoint"] = str(export_member(cfg, name, member).relative_to(cfg.workdir))
        run.say(f"member {name}: reached its target ({member['epochs_done']} epochs, "
                f"{member['iterations_done']} iterations, {member['wall_seconds']:.0f} s)")
    elif code == 0:
        run.say(f"member {name}: stopped at epoch {member['epochs_done']} of {cfg.target_epochs}; "
                f"checkpoint_latest.pth kept for --resume")
    else:
        member["last_error"] = f"exit code {code}; see logs/train_member{name}.log"
        run.say(f"member {name}: nnUNetv2_train failed with exit code {code} (logs/train_member{name}.log)")
        return False
    return True


def export_member(cfg: StagedConfig, name: str, member: dict) -> Path:
    """The finished member as one weights-only file, ``WORKDIR/finished/fold_<k>/checkpoint_final.pth``,
    beside ``member.json`` (seed, data seed, iterations, figures): what may be committed."""
    import torch

    from bids_app.model.card import sha256_file
    from bids_app.model.checkpoints import load_checkpoint

    ckpt = load_checkpoint(fold_dir(cfg, name) / "checkpoint_final.pth")
    slim = {k: ckpt[k] for k in ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                                 "current_epoch") if k in ckpt}
    dest = cfg.workdir / "finished" / f"fold_{name}"
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dest / "checkpoint_final.pth")
    info = {k: v for k, v in member.items() if k not in ("train_cases", "lr_by_epoch", "epoch_seconds")}
    info["sha256"] = sha256_file(dest / "checkpoint_final.pth")
    (dest / "member.json").write_text(json.dumps(to_json(info), indent=1))
    return dest / "checkpoint_final.pth"


# --------------------------------------------------------------------------------------
# 4-6. check, tune, test, package
# --------------------------------------------------------------------------------------
def check_and_tune(run: Run) -> dict:
    folds = sorted(run.state["members"], key=int)
    tuning = R.check_and_tune(recipe_config(run.cfg), cases_by_set(run.state), folds)
    for m, dice in tuning["member_val_dice"].items():
        run.state["members"][m]["val_lesion_dice"] = dice
    run.state["results"]["tuning"] = tuning
    return {"kept": tuning["kept_members"], "threshold": tuning["threshold"], "min_size": tuning["min_lesion_size"]}


def evaluate_test(run: Run) -> dict:
    t = run.state["results"]["tuning"]
    test = R.evaluate_test(recipe_config(run.cfg), cases_by_set(run.state), t["kept_members"], t["threshold"],
                           t["min_lesion_size"])
    run.state["results"]["test"] = test
    return {k: v for k, v in test.items() if k != "per_case"}


def package(run: Run) -> dict:
    from bids_app.model.card import CARD_NAME

    cfg, state = run.cfg, run.state
    tuning, test = state["results"]["tuning"], state["results"]["test"]
    dest = R.package(recipe_config(cfg), tuning["kept_members"], tuning, test, cases_by_set(state),
                     state["stages"]["plan_and_preprocess"].get("plans", {}), R.hardware_info(cfg.device))
    card = json.loads((dest / CARD_NAME).read_text())
    card.update({"id": "msxplain-demo-synth-v2", "version": "2"})
    for entry in card["members"]:
        member = state["members"][entry["trained_as_fold"]]
        entry.update({"seed": member["seed"], "data_seed": member["data_seed"],
                      "n_train_cases": member["n_train_cases"], "epochs": member["epochs_done"],
                      "iterations": member["iterations_done"],
                      "train_wall_seconds": member["wall_seconds"], "runs": member.get("runs"),
                      "best_ema_pseudo_dice": member.get("best_ema_pseudo_dice"),
                      "last_pseudo_dice": (member.get("last") or {}).get("pseudo_dice")})
    training = card["training"]
    training["data"].update({"generator": cfg.generator, "n_train": cfg.n_pool, "n_val": cfg.n_val,
                             "member_data": cfg.member_data, "member_fraction": cfg.member_fraction})
    training["ensemble"] = ("deep ensemble of independently trained members: each from scratch with its own seed and "
                            f"its own data draw ({cfg.member_data} of the {cfg.n_pool}-subject pool)")
    training["trainer"].update({"iterations_per_epoch": cfg.iterations_per_epoch, "wall_clock_budget_s": None,
                                "target_iterations": cfg.target_epochs * cfg.iterations_per_epoch,
                                "lr_schedule": "nnU-Net poly (exponent 0.9) over the target epochs, kept across runs",
                                "oversample_foreground": cfg.oversample_fg, "patch_size": list(cfg.patch_size)})
    training["timings_s"] = {s: state["stages"][s].get("seconds") for s in STAGES if state["stages"][s].get("done")}
    training["runs"] = [{k: r.get(k) for k in ("started", "device", "budget_s", "seconds", "stopped")}
                        for r in state["runs"]]
    (dest / CARD_NAME).write_text(json.dumps(to_json(card), indent=1) + "\n")
    state["results"]["model_dir"] = str(dest)
    return {"model_dir": str(dest), "members": len(card["members"])}


STAGE_FUNCTIONS = {"synthesize": synthesize, "plan_and_preprocess": plan_and_preprocess, "train": train,
                   "check_and_tune": check_and_tune, "evaluate_test": evaluate_test, "package": package}


# --------------------------------------------------------------------------------------
def open_state(cfg: StagedConfig, resume: bool) -> dict:
    """The state of WORKDIR: new (refused if one exists without ``resume``) or resumed
    (refused if an experiment-defining option differs from the stored run)."""
    state = read_state(cfg.workdir)
    if state is None:
        if resume and (cfg.workdir / "nnUNet_results").exists():
            raise RuntimeError(f"{cfg.workdir} has training results but no state.json; use a new WORKDIR")
        return new_state(cfg)
    if not resume:
        raise RuntimeError(f"{cfg.workdir / 'state.json'} exists: pass --resume to continue it, or use a new WORKDIR")
    diff = config_differences(state["config"], cfg)
    if diff:
        raise RuntimeError("--resume with options that differ from the stored run: " + "; ".join(
            f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in sorted(diff.items())))
    return state


def run_staged(cfg: StagedConfig, resume: bool = False, stop_before: str | None = None, echo=print) -> dict:
    """Run (or continue) the staged recipe within ``cfg.budget_seconds``; returns the state.

    Parameters
    ----------
    stop_before : str or None
        A stage name: stop before it (e.g. ``check_and_tune`` on a lent GPU, which should
        only train).
    """
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    state = open_state(cfg, resume)
    state["config"] = to_json({**state["config"], **{k: v for k, v in to_json(vars(cfg)).items()}})
    run = Run(cfg, state, echo)
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": cfg.device, "budget_s": cfg.budget_seconds,
              "parallel": cfg.parallel, "torch_threads": cfg.torch_threads, "stopped": None}
    state["runs"].append(record)
    run.save()
    try:
        for name in STAGES:
            if name == stop_before:
                record["stopped"] = f"before {name} (--stop-before)"
                break
            if state["stages"][name]["done"]:
                continue
            if run.left() is not None and run.left() <= 0:
                raise BudgetSpent(f"budget spent before {name}")
            t = time.monotonic()
            run.say(f"stage {name} ...")
            try:
                out = STAGE_FUNCTIONS[name](run)
            finally:
                stage = state["stages"][name]
                stage["seconds"] = round(stage.get("seconds", 0.0) + time.monotonic() - t, 1)
            stage.update({"done": True, **(out or {})})
            run.say(f"stage {name} done ({stage['seconds']:.0f} s in all)")
            run.save()
        else:
            record["stopped"] = "finished"
    except BudgetSpent as why:
        record["stopped"] = f"budget: {why}"
        run.say(f"stopping: {why}; continue with --resume")
    except Exception as exc:
        record["stopped"] = f"error: {exc}"
        run.say(f"error: {exc}")
        raise
    finally:
        record["seconds"] = round(time.monotonic() - run.started, 1)
        run.save()
    return state


def default_workdir(repo: Path) -> Path:
    """Where the partial states of the real training live: ``<repo>/.train-state/`` (git-ignored)."""
    return Path(os.environ.get("MSXPLAIN_TRAIN_STATE", repo / ".train-state"))
