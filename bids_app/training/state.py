"""The configuration and the state file of the resumable demo recipe (``WORKDIR/state.json``).

``msxplain-tools train-demo WORKDIR ... --budget-seconds S [--resume]`` (module
:mod:`bids_app.training.staged`) may need several sessions; what each one did is kept in
``WORKDIR/state.json`` (format: ``docs/demo-model.md``, "v2 training infrastructure (issue
14)"): the configuration, which stages are done, and per member its seed, its data seed and
training cases, epochs and iterations done, wall seconds spent and the last and best
validation figures. This module holds the configuration (:class:`StagedConfig`), the members'
independent data draws (:func:`member_draws`), the file's reading and atomic writing, and the
progress line (:func:`progress_line`). Independent members (own seed, own data draw): a deep
ensemble after Lakshminarayanan et al., NeurIPS 2017, arXiv:1612.01474.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

STATE_NAME = "state.json"
STATE_VERSION = 1
#: stages in order; each is done once and recorded
STAGES = ("synthesize", "plan_and_preprocess", "train", "check_and_tune", "evaluate_test", "package")
#: fields that may change between runs of one WORKDIR (the others fix the experiment)
RUNTIME_FIELDS = frozenset({"out_model", "device", "workers", "da_workers", "torch_threads", "parallel",
                            "budget_seconds", "stop_after_epochs", "templates_dir", "lesion_dir", "workdir"})
MEMBER_DATA_MODES = ("subset", "disjoint")


@dataclass
class StagedConfig:
    """Everything a resumable recipe run needs (CLI: ``msxplain-tools train-demo --help``).

    Attributes
    ----------
    generator : str
        Name in :data:`bids_app.training.generators.GENERATORS` (``classic``, ``randomised``, ``toy``).
    n_pool : int
        Synthetic training subjects in the pool the members draw from.
    member_data : str
        ``subset``: member k trains on its own random ``member_fraction`` of the pool (without
        replacement, data seed ``seed + 10000 + k``); ``disjoint``: the pool is shuffled (seed
        ``seed + 10000``) and cut into ``members`` parts, one each.
    target_iterations : int
        Training iterations per member; the target in epochs is
        ``ceil(target_iterations / iterations_per_epoch)`` and the poly learning rate decays to 0
        at it, however many runs it takes.
    budget_seconds : float
        Wall-clock budget of this run (0: none); training stops cleanly before it
        (checkpoint saved); the other stages only start while budget is left.
    parallel : int
        Members trained at once (each with ``torch_threads`` threads).
    stop_after_epochs : int
        Stop each member after this many epochs in a run (0: no limit; tests, smoke runs).
    """

    workdir: Path
    out_model: Path
    generator: str = "classic"
    dataset_id: int = 502
    dataset_name: str = "MsxplainSynthV2"
    n_pool: int = 60
    n_val: int = 8
    n_test: int = 10
    seed: int = 2026
    resolution_mm: float = 1.0
    wml_load: tuple[float, float] = (8.0, 35.0)
    cl_load: tuple[float, float] = (1.0, 6.0)
    members: int = 5
    member_data: str = "subset"
    member_fraction: float = 0.8
    target_iterations: int = 10000
    iterations_per_epoch: int = 50
    val_iterations: int = 5
    features: tuple[int, ...] = (8, 16, 32, 64, 96)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    oversample_fg: float = 0.33
    min_member_dice: float = 0.2
    connectivity: int = 18
    detection_threshold: float = 0.1
    # runtime (may change between runs)
    device: str = "cpu"
    workers: int = 2
    da_workers: int = 1
    torch_threads: int = 2
    parallel: int = 1
    budget_seconds: float = 0.0
    stop_after_epochs: int = 0
    templates_dir: str | None = None
    lesion_dir: str | None = None

    def __post_init__(self):
        self.workdir, self.out_model = Path(self.workdir), Path(self.out_model)
        self.wml_load, self.cl_load = tuple(self.wml_load), tuple(self.cl_load)
        self.features, self.patch_size = tuple(self.features), tuple(self.patch_size)
        if self.member_data not in MEMBER_DATA_MODES:
            raise ValueError(f"member_data must be one of {MEMBER_DATA_MODES}")
        if self.member_data == "disjoint" and self.n_pool < self.members:
            raise ValueError("disjoint member data needs at least one pool subject per member")
        if not 0 < self.member_fraction <= 1:
            raise ValueError("member_fraction must be in (0, 1]")

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    @property
    def target_epochs(self) -> int:
        return max(1, math.ceil(self.target_iterations / self.iterations_per_epoch))

    def identity(self) -> dict:
        """The fields that fix the experiment (JSON types)."""
        return {k: v for k, v in to_json(asdict(self)).items() if k not in RUNTIME_FIELDS}


def to_json(value: Any) -> Any:
    """Paths to str, tuples to lists, numpy scalars to Python (recursively)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def config_from_json(data: dict, **runtime) -> StagedConfig:
    """A :class:`StagedConfig` from its JSON form, runtime fields replaced by ``runtime``."""
    names = {f.name for f in fields(StagedConfig)}
    merged = {k: v for k, v in data.items() if k in names}
    merged.update({k: v for k, v in runtime.items() if v is not None})
    return StagedConfig(**merged)


def config_differences(stored: dict, cfg: StagedConfig) -> dict[str, tuple[Any, Any]]:
    """Identity fields whose value differs from the stored run's: {field: (stored, given)}."""
    now = cfg.identity()
    return {k: (stored.get(k), v) for k, v in now.items() if stored.get(k) != v}


def member_draws(cfg: StagedConfig, pool: list[str]) -> list[dict]:
    """Each member's seed, data seed and training cases (pure; the same on every run).

    Parameters
    ----------
    pool : list of str
        Case identifiers of the training pool, in order.

    Returns
    -------
    list of dict
        ``{"member", "seed", "data_seed", "train_cases"}`` for member 0..members-1: seed
        ``seed + k`` for torch/numpy/random; the cases per :attr:`StagedConfig.member_data`.
    """
    out = []
    if cfg.member_data == "disjoint":
        order = np.random.default_rng(cfg.seed + 10_000).permutation(len(pool))
        parts = np.array_split(order, cfg.members)
    for k in range(cfg.members):
        if cfg.member_data == "disjoint":
            data_seed, chosen = cfg.seed + 10_000, parts[k]
        else:
            data_seed = cfg.seed + 10_000 + k
            n = max(1, int(round(cfg.member_fraction * len(pool))))
            chosen = np.random.default_rng(data_seed).choice(len(pool), size=n, replace=False)
        out.append({"member": str(k), "seed": cfg.seed + k, "data_seed": int(data_seed),
                    "train_cases": sorted(pool[int(i)] for i in chosen)})
    return out


def new_state(cfg: StagedConfig) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {"version": STATE_VERSION, "created": now, "updated": now, "config": to_json(asdict(cfg)),
            "stages": {name: {"done": False} for name in STAGES}, "cases": {}, "members": {}, "runs": [],
            "results": {}}


def read_state(workdir: Path) -> dict | None:
    path = Path(workdir) / STATE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(workdir: Path, state: dict) -> Path:
    """Write atomically (a temporary file renamed over the old one: a kill never leaves half a file)."""
    path = Path(workdir) / STATE_NAME
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_json(state), indent=1))
    os.replace(tmp, path)
    return path


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(member: str, progress: dict, member_state: dict, budget_left: float | None) -> str:
    """One human-readable line per epoch (member, epoch, iterations, losses, pseudo Dice,
    seconds, ETA to the target, budget left).

    ``member_state`` holds ``epoch_seconds`` (recent epoch durations, s), used for the ETA.
    """
    recent = member_state.get("epoch_seconds", [])[-10:] or [progress["seconds"]]
    remaining = progress["target_epochs"] - progress["epoch"]
    eta = remaining * float(np.mean(recent))
    target_it = progress["target_epochs"] * (progress["iterations"] // max(progress["epoch"], 1))
    dice = "/".join("-" if v is None else f"{v:.3f}" for v in progress["pseudo_dice"])
    ema = progress.get("ema_pseudo_dice")
    return (f"member {member} epoch {progress['epoch']}/{progress['target_epochs']} "
            f"it {progress['iterations']}/{target_it} loss {progress['train_loss']:.4f} "
            f"val {progress['val_loss']:.4f} pseudo-Dice {dice} (ema {'-' if ema is None else f'{ema:.3f}'}) "
            f"lr {progress['lr']:.5f} epoch {progress['seconds']:.1f} s ETA {_duration(eta)} "
            f"budget left {_duration(budget_left) if budget_left is not None else 'none'}")
