#!/usr/bin/env python
"""One short GPU session for the demo ensemble v2: train (or resume) the members for ~10 minutes.

A lent device has 15 minutes in all (start-up included), 16 CPU cores and one H100/H200, no
network; the repository arrives with its ``.venv`` but without the git-ignored training state
(``.train-state/``), and only ``$OUT`` comes back. So this script

1. makes a local WORKDIR from the carried ``state.json`` (``--state``; any carried
   ``checkpoint_latest.pth`` / ``checkpoint_final.pth`` beside it are used), or from
   ``train-demo`` options after ``--`` for a new run. Synthetic cases and nnU-Net
   preprocessing are deterministic (seeded), so when they were not carried the synthesis and
   preprocessing stages are redone here and give the same data;
2. runs ``msxplain-tools train-demo WORKDIR --resume --device cuda --budget-seconds B
   --stop-before check_and_tune`` with all members at once (``--parallel``), under a hard
   timeout (``--hard-timeout``, SIGINT then SIGKILL) a little above the budget;
3. always (even after the timeout) packs the state, the logs, the finished members and every
   member's ``checkpoint_latest.pth`` / ``checkpoint_final.pth`` into ``$OUT/train-state-*.tar``
   (flat: the device tool returns files at most two folders deep).

Back on the CPU machine, ``--merge $FILES_AT --into WORKDIR`` unpacks the tars and copies the members'
checkpoints and their progress into the WORKDIR's state; ``train-demo WORKDIR --resume``
then continues on CPU. Commands: ``docs/demo-model.md``, "v2 training infrastructure (issue 14)".

    # on the device (run tool; .train-state/demo-v2/state.json carried)
    python scripts/demo_model/gpu_oneshot.py --state .train-state/demo-v2 --out "$OUT" --budget-seconds 600
    # CPU smoke test of this script
    python scripts/demo_model/gpu_oneshot.py --out /tmp/out --device cpu --budget-seconds 60 -- \\
        --generator toy --n-train 4 --n-val 2 --n-test 2 --members 2 --features 4 8 16 --patch-size 32 32 32 \\
        --iterations-per-epoch 2 --target-iterations 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bids_app.training.state import read_state, write_state  # noqa: E402

CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")


def prepare_workdir(state_dir: Path | None, work: Path) -> bool:
    """Copy the carried state (and checkpoints) into ``work``; True when a state was carried.

    Stages whose files were not carried (cases, preprocessing) are marked not done, so that
    the run makes them again (same seeds, same data).
    """
    work.mkdir(parents=True, exist_ok=True)
    if state_dir is None:
        return False
    state = read_state(state_dir)
    if state is None:
        raise SystemExit(f"no state.json in {state_dir}")
    for path in state_dir.rglob("*.pth"):
        dest = work / path.relative_to(state_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "cases.json"):
        if (state_dir / sub).exists() and not (work / sub).exists():
            (shutil.copytree if (state_dir / sub).is_dir() else shutil.copy2)(state_dir / sub, work / sub)
    if not (work / "nnUNet_preprocessed").is_dir():
        state["cases"] = {}
        for stage in ("synthesize", "plan_and_preprocess"):
            state["stages"][stage] = {"done": False, "note": "redone on the lent device (data not carried)"}
    write_state(work, state)
    return True


def run_training(work: Path, args, extra: list[str], resume: bool) -> int:
    cmd = [sys.executable, "-c", "import sys; from bids_app.cli.tools import main; sys.exit(main(sys.argv[1:]))",
           "train-demo", str(work), "--device", args.device,
           "--budget-seconds", str(args.budget_seconds), "--stop-before", "check_and_tune",
           "--workers", str(args.workers), "--da-workers", str(args.da_workers),
           "--torch-threads", str(args.torch_threads)]
    if args.parallel:
        cmd += ["--parallel", str(args.parallel)]
    if resume:
        cmd.append("--resume")
    cmd += extra
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(timeout=args.hard_timeout)
    except subprocess.TimeoutExpired:
        print(f"hard timeout {args.hard_timeout} s: interrupting the run", flush=True)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


#: what the device tool brings back from $OUT: at most 8 files of 16 MiB, 64 MiB in all, two folders deep
RETURN_FILE_LIMIT = 16 * 2 ** 20


def collect(work: Path, out: Path) -> dict:
    """State, logs, finished members and the members' checkpoints, packed flat into ``out`` as
    ``train-state-common.tar`` and one ``train-state-fold_<k>.tar`` per member (the device tool
    returns at most 8 files of 16 MiB, two folders deep: a tree of checkpoints would not come back)."""
    import tarfile

    out.mkdir(parents=True, exist_ok=True)
    common = [work / "state.json", work / "cases.json", *work.glob("logs/*"), *work.glob("finished/*/*")]
    common += list(work.glob("nnUNet_results/*/*/plans.json")) + list(work.glob("nnUNet_results/*/*/dataset.json"))
    packs = {"train-state-common.tar": [p for p in common if p.is_file()]}
    for fold in sorted(work.glob("nnUNet_results/*/*/fold_*")):
        files = [fold / name for name in CHECKPOINTS if (fold / name).is_file()]
        if files:
            packs[f"train-state-{fold.name}.tar"] = files
    manifest = {"files": [], "total_bytes": 0, "packs": {}}
    for name, files in packs.items():
        with tarfile.open(out / name, "w") as tar:
            for path in files:
                tar.add(path, arcname=str(path.relative_to(work)))
                manifest["files"].append({"path": str(path.relative_to(work)), "bytes": path.stat().st_size})
        size = (out / name).stat().st_size
        manifest["packs"][name] = size
        manifest["total_bytes"] += size
        if size > RETURN_FILE_LIMIT:
            print(f"warning: {name} is {size / 2 ** 20:.1f} MiB, over the 16 MiB the device tool returns", flush=True)
    if len(packs) > 7:
        print(f"warning: {len(packs)} packs + the console log exceed the 8 files the device tool returns", flush=True)
    return manifest


def unpack(src: Path) -> Path:
    """A folder that came back from the device: its ``train-state-*.tar`` unpacked into a new
    temporary folder, or ``src`` itself when it holds a state tree already."""
    import tarfile

    tars = sorted(src.glob("train-state-*.tar"))
    if not tars:
        return src
    dest = Path(tempfile.mkdtemp(prefix="train-state-"))
    for path in tars:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and links out of dest
    return dest


def merge(src: Path, into: Path) -> dict:
    """Bring the device's progress into a local WORKDIR: each member whose device state is
    further along gets the device's checkpoints and its state entry."""
    theirs, ours = read_state(src), read_state(into)
    if theirs is None or ours is None:
        raise SystemExit("both folders need a state.json")
    taken = {}
    for name, member in theirs["members"].items():
        mine = ours["members"].get(name, {})
        if member.get("epochs_done", 0) <= mine.get("epochs_done", 0):
            continue
        for rel in [p.relative_to(src) for p in src.glob(f"nnUNet_results/*/*/fold_{name}/*.pth")]:
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            for stale in CHECKPOINTS:  # a final from the device must not sit beside an older latest
                (into / rel).parent.joinpath(stale).unlink(missing_ok=True)
        for path in list(src.glob(f"nnUNet_results/*/*/fold_{name}/*.pth")) + list(src.glob(f"finished/fold_{name}/*")):
            target = into / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        ours["members"][name] = {**mine, **member, "merged_from_device": theirs["runs"][-1] if theirs["runs"] else None}
        taken[name] = member.get("epochs_done")
    if theirs["stages"]["train"].get("done") and all(m.get("done") for m in ours["members"].values()):
        ours["stages"]["train"] = theirs["stages"]["train"]
    ours["runs"].extend({**r, "where": "device"} for r in theirs["runs"] if r not in ours["runs"])
    write_state(into, ours)
    return taken


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, help="carried WORKDIR (its state.json, optional checkpoints)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="default $OUT")
    p.add_argument("--work", type=Path, default=Path("/tmp/msxplain-gpu-work"), help="local WORKDIR on the device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-seconds", type=float, default=600.0,
                   help="train-demo budget (data preparation included when it has to be redone)")
    p.add_argument("--hard-timeout", type=float, default=None, help="default budget + 90 s")
    p.add_argument("--parallel", type=int, default=0, help="members at once (default: all)")
    p.add_argument("--torch-threads", type=int, default=None, help="default 1 on cuda, 2 on cpu")
    p.add_argument("--workers", type=int, default=min(15, os.cpu_count() or 2))
    p.add_argument("--da-workers", type=int, default=None, help="augmentation processes per member")
    p.add_argument("--merge", type=Path, help="(CPU machine) a train-state folder that came back from the device")
    p.add_argument("--into", type=Path, help="(with --merge) the local WORKDIR")
    args = p.parse_args(argv)
    if args.merge:
        print(json.dumps({"members_taken": merge(unpack(args.merge.resolve()), args.into.resolve())}, indent=1))
        return 0
    cores = os.cpu_count() or 2
    if args.hard_timeout is None:
        args.hard_timeout = args.budget_seconds + 90
    if args.torch_threads is None:
        args.torch_threads = 1 if args.device == "cuda" else 2
    state = read_state(args.state) if args.state else None
    members = int(state["config"]["members"]) if state else 5
    if not args.parallel:
        args.parallel = members if args.device == "cuda" else 1
    if args.da_workers is None:
        args.da_workers = max(1, (cores - args.parallel) // max(1, args.parallel)) if args.device == "cuda" else 1
    started = time.monotonic()
    resume = prepare_workdir(args.state.resolve() if args.state else None, args.work.resolve())
    code = run_training(args.work.resolve(), args, extra, resume)
    manifest = collect(args.work.resolve(), args.out.resolve())
    final = read_state(args.work.resolve()) or {"members": {}}
    print(json.dumps({"exit_code": code, "seconds": round(time.monotonic() - started, 1),
                      "members": {k: {"epochs": m.get("epochs_done"), "done": m.get("done")}
                                  for k, m in final["members"].items()},
                      "copied_bytes": manifest["total_bytes"], "packs": manifest["packs"]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
