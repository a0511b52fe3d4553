#!/usr/bin/env python
"""Load test: a synthetic cohort through MultiProc with a memory cap.

Generates ``--n-subjects`` synthetic subjects (``msxplain-tools synth``, 2 mm by default), runs
the participant level with ``--nprocs`` and ``--mem``, samples the resident memory of the whole
process tree (the msxplain process and every Nipype worker) every 0.5 s, and reports the peak
against the cap, the wall time and the throughput.

    python benchmarks/bench_load.py --n-subjects 50 --nprocs 2 --mem 6 --model demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS of ``root_pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-subjects", type=int, default=50)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--mem", type=float, default=6.0, help="memory cap given to msxplain --mem, GB")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--model", default="demo")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_load_"))
    bids = work / "bids"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    if not bids.is_dir():
        subprocess.run([sys.executable, "-c", "import sys; from bids_app.cli.tools import main; sys.exit(main())",
                        "synth", str(bids), "--n-subjects", str(args.n_subjects), "--sites", "3", "--seed", "11",
                        "--resolution", str(args.resolution), "--skull-stripped"], env=env, check=True)
    synth_s = time.monotonic() - t0
    cmd = [sys.executable, "-m", "bids_app", str(bids), str(work / "out"), "participant", "-w", str(work / "work"),
           "--model", args.model, "--nprocs", str(args.nprocs), "--mem", f"{args.mem}G", "--no-tta",
           "--skip-bids-validation", "--reference-masks", str(bids / "derivatives" / "lesions")]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "run.log", "w"))
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    sampler.join()
    wall = time.monotonic() - start
    done = len(list((work / "out").glob("sub-*/anat/*_summary.json")))
    result = {"n_subjects": args.n_subjects, "sessions_written": done, "exit_code": code, "nprocs": args.nprocs,
              "mem_cap_gb": args.mem, "peak_tree_rss_gb": round(peak[0] / 1e9, 2),
              "under_cap": peak[0] / 1e9 <= args.mem, "wall_s": round(wall, 1),
              "sessions_per_hour": round(3600 * done / wall, 1), "synth_s": round(synth_s, 1),
              "model": args.model, "resolution_mm": args.resolution, "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
