"""Timings of the synthetic data engine (``msxplain-tools synth``).

Usage::

    TEMPLATEFLOW_HOME=/path/to/templateflow-copy python benchmarks/bench_synth.py [--full]

Prints: source loading (lesion library, templates), one subject at 2 mm and 1 mm (cold =
first subject, with the per-template caches; warm = later subjects), and a complete
3-subject 2 mm dataset written by a fresh process (the figure the issue targets: < 10 s on
2 CPU cores). ``--full`` adds a 3-subject 1 mm dataset. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(label: str, func, *args, **kwargs):
    start = time.perf_counter()
    result = func(*args, **kwargs)
    print(f"{label:<48s} {time.perf_counter() - start:7.2f} s", flush=True)
    return result


def cli_dataset(resolution: float, n_subjects: int, lesion_dir: str | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", "import sys; from bids_app.cli.tools import main; sys.exit(main(sys.argv[1:]))",
               "synth", str(Path(tmp) / "ds"), "--n-subjects", str(n_subjects), "--resolution", str(resolution),
               "--seed", "0"]
        if lesion_dir:
            cmd += ["--lesion-masks", lesion_dir]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also time a 3-subject 1 mm dataset")
    parser.add_argument("--lesion-masks", default=None, help="open_ms_data cross_sectional/MNI folder")
    args = parser.parse_args()
    if not os.environ.get("TEMPLATEFLOW_HOME"):
        print("set TEMPLATEFLOW_HOME to a (writable) TemplateFlow copy", file=sys.stderr)
        return 2

    from bids_app.synth import generate_subject, load_lesion_library, load_templates, sample_site

    print(f"cpus: {os.cpu_count()}, numpy {np.__version__}")
    lib = timed("load lesion library (27 patients)", load_lesion_library, args.lesion_masks)
    for res in (2.0, 1.0):
        tpl = timed(f"load templates {res:g} mm", load_templates, res)
        site = sample_site(np.random.default_rng(0), 0)
        timed(f"subject {res:g} mm, cold (per-template caches)", generate_subject, 0, site, res, templates=tpl,
              library=lib)
        for seed in (1, 2):
            timed(f"subject {res:g} mm, warm", generate_subject, seed, site, res, templates=tpl, library=lib)
    print(f"{'dataset 3 subjects 2 mm, fresh process (CLI)':<48s} {cli_dataset(2.0, 3, args.lesion_masks):7.2f} s")
    if args.full:
        print(f"{'dataset 3 subjects 1 mm, fresh process (CLI)':<48s} {cli_dataset(1.0, 3, args.lesion_masks):7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
