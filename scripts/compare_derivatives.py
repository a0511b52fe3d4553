#!/usr/bin/env python3
"""Compare two msxplain output folders file by file: the check that a refactoring changed no output.

    python scripts/compare_derivatives.py BEFORE AFTER

Every derivative must be byte-identical, except what a run cannot reproduce and what names the
code rather than the data:

* run logs, crash files and the run's config dump (``logs/``, ``sub-*/log/``): times and UUIDs;
* in JSON sidecars, the keys listed in :data:`RUN_SPECIFIC_KEYS` (times, durations, run ids,
  software versions, Python module names) and absolute paths of the two output folders;
* in HTML reports, times, durations and run ids (everything else must match);
* saliency stores (``.npz``): every array must be equal (NaN equal to NaN); the ``meta`` JSON is
  scrubbed like a sidecar (its ``timings_s``).

NIfTI files are compared after decompression (gzip headers carry no time here, but the
comparison should not depend on it). Exit 0 when they match, 1 with a list of differences.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

#: sidecar keys whose values are specific to one run or name code, not data
RUN_SPECIFIC_KEYS = frozenset({
    "run_uuid", "RunUUID", "started", "finished", "Started", "Finished", "DateCreated", "date", "timestamp",
    "elapsed_s", "ElapsedSeconds", "duration_s", "runtime_s", "seconds", "wall_s", "Seconds",
    "CodeURL", "Version", "version", "versions", "SoftwareVersions", "python", "platform", "hostname",
    "module", "modules", "interface", "Interface", "node", "argv", "command", "CommandLine", "work_dir",
    "seconds_total", "timings_s",
})
TIME_PATTERNS = [
    re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([+-]\d{2}:?\d{2}|Z)?"),
    re.compile(r"\d{8}-\d{6}_[0-9a-f]{8}"),  # run ids
    re.compile(r"\b\d+(\.\d+)? ?(s|ms|min|h)\b"),
    re.compile(r"\b\d+ min \d+ s\b"),
]
SKIPPED_FOLDERS = ("logs", "log")


def _scrub_text(text: str, roots: tuple[str, str]) -> str:
    for root in roots:
        text = text.replace(root, "<OUT>")
    for pattern in TIME_PATTERNS:
        text = pattern.sub("<T>", text)
    return text


def _scrub_json(value, roots):
    if isinstance(value, dict):
        return {k: ("<RUN>" if k in RUN_SPECIFIC_KEYS else _scrub_json(v, roots)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v, roots) for v in value]
    if isinstance(value, str):
        return _scrub_text(value, roots)
    return value


def _npz_payload(path: Path, roots: tuple[str, str]) -> dict:
    import numpy as np

    out = {}
    with np.load(path, allow_pickle=False) as store:
        for key in sorted(store.files):
            value = store[key]
            if key == "meta" and value.dtype.kind in "US":
                out[key] = _scrub_json(json.loads(str(value)), roots)
            else:
                # bytes of the array, with every NaN written the same way (NaN != NaN otherwise)
                array = np.where(np.isnan(value), np.nan, value) if value.dtype.kind == "f" else value
                out[key] = (array.dtype.str, array.shape, array.tobytes())
    return out


def _payload(path: Path, roots: tuple[str, str]):
    if path.suffix == ".npz":
        return _npz_payload(path, roots)
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.suffix == ".json":
        return _scrub_json(json.loads(data), roots)
    if path.suffix == ".html":
        return _scrub_text(data.decode(), roots)
    return data


def _files(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(part in SKIPPED_FOLDERS for part in rel.parts[:-1]):
            out[str(rel)] = path
    return out


def compare(before: Path, after: Path) -> list[str]:
    """Differences between two output folders (empty when they match)."""
    # the folders around the outputs too: a demo folder holds bids/, out/ and work/ side by side
    roots = (str(before.resolve().parent), str(after.resolve().parent))
    a, b = _files(before), _files(after)
    problems = [f"only in {before}: {name}" for name in sorted(set(a) - set(b))]
    problems += [f"only in {after}: {name}" for name in sorted(set(b) - set(a))]
    for name in sorted(set(a) & set(b)):
        if _payload(a[name], roots) != _payload(b[name], roots):
            problems.append(f"differs: {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    problems = compare(args.before, args.after)
    n = len(_files(args.before))
    for line in problems:
        print(line)
    print(f"{n} files compared: " + ("identical (run-specific fields aside)" if not problems
                                     else f"{len(problems)} difference(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
