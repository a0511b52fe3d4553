"""Issue 16, items 3 and 4: signals, a full work disk, session outputs replaced as one unit,
failed re-runs, verified outputs, SLURM state queries, and group-level inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bids_app.testing import make_bids, run_cli, write_nifti

REPO = Path(__file__).resolve().parents[1]


def cli(bids, out, work, model, *extra) -> list[str]:
    return [sys.executable, "-m", "bids_app", str(bids), str(out), "participant", "--model", str(model), "-w",
            str(work), "--skull-stripped", "yes", "--no-lesion-features", "--skip-bids-validation", "--nprocs", "2",
            *[str(e) for e in extra]]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            table[int(entry)] = (int(fields[1]), fields[0], fields[19])
    return table


def tree_of(root: int, table) -> dict[int, str]:
    """Descendants of ``root`` (pid -> start time), ``root`` included."""
    found = {root: table[root][2]} if root in table else {}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, start) in table.items():
            if ppid in found and pid not in found:
                found[pid] = start
                changed = True
    return found


def survivors(seen: dict[int, str]) -> list[int]:
    """Processes of ``seen`` still running (same pid and start time, not a zombie)."""
    table = process_table()
    return [pid for pid, start in seen.items() if pid in table and table[pid][2] == start and table[pid][1] != "Z"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_bids(tmp_path_factory.mktemp("rel2") / "bids", subjects=("01",))


@pytest.fixture(scope="module")
def finished_run(dataset, tiny_model, tmp_path_factory):
    """A complete participant run of sub-01 (its output folder is copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("rel2ref")
    assert run_cli(cli(dataset, root / "out", root / "work", tiny_model)[3:]) == 0
    return root / "out"


# ------------------------------------------------------------------ item 3: signals, full work disk
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_prediction_ends_every_process(dataset, tiny_model, tmp_path, signum, code):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(cli(dataset, out, work, tiny_model), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    seen: dict[int, str] = {}
    sent = False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update(tree_of(proc.pid, process_table()))
            predict = list(work.glob("*/sub_01_wf/predict"))
            if not sent and predict and not (predict[0] / "result_predict.pklz").exists():
                time.sleep(1.0)  # inside the prediction: a worker holds the model
                seen.update(tree_of(proc.pid, process_table()))
                os.kill(proc.pid, signum)  # the main process only, as a scheduler or `kill` does
                sent = True
            time.sleep(0.05)
        assert sent, "the run ended before prediction could be interrupted"
        returncode = proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        time.sleep(3.0)  # grace period
        left = survivors(seen)
        assert left == [], f"processes of the run still running: {left}"
        assert len(seen) >= 3, seen  # the main process, the fork server and a worker at least
        assert returncode == code, err[-3000:]
        assert "re-run the same command with the same work folder" in err
        assert not list(out.glob(".msxplain-staging-*"))
        assert not (out / "sub-01" / "anat").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in survivors(seen):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MB tmpfs (root only) with 512 kB free: a work folder that fills up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    # 512 kB left: the first steps fill it (a quick test even on a loaded machine)
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    (mount / "filler").write_bytes(b"\0" * max(0, free - 512 * 1024))
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_full_work_disk_ends_with_74_within_a_minute(dataset, tiny_model, tmp_path, small_tmpfs):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(dataset, out, small_tmpfs / "work", tiny_model), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run with a full work folder did not end within a minute")
    err = err.decode()
    assert proc.returncode == 74, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("msxplain: error: No space left in the work folder"), err[-3000:]
    assert not list(out.glob(".msxplain-staging-*"))


def test_a_worker_failing_outside_its_node_is_a_failed_node_not_a_hang():
    """Nipype's MultiProc loses a task whose future raised (its callback raises in the executor's
    thread); ours reports it to Nipype's loop as a failed node."""
    from concurrent.futures import Future

    from bids_app.app.execution import MultiProcPlugin

    plugin = MultiProcPlugin.__new__(MultiProcPlugin)
    plugin._taskresult, plugin._task_obj = {}, {}
    future = Future()
    plugin._task_obj[7] = future
    future.add_done_callback(plugin._async_callback)
    future.set_exception(FileNotFoundError(2, "No such file or directory", "result_predict.pklz"))
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        plugin._get_result(7)


# ------------------------------------------------------------------ item 4: one-unit session swap
def _records(tmp: Path, bids: Path, tag: str) -> list[dict]:
    """Four derivative records of sub-01 whose content says which run wrote them."""
    src = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    records = []
    for label in ("WML", "CL", "X", "Y"):
        f = tmp / f"{tag}-{label}.nii.gz"
        write_nifti(f, np.full((4, 4, 4), {"old": 0.25, "new": 0.75}[tag], np.float32))
        records.append({"key": "probseg", "file": str(f), "sources": [str(src)], "entities": {"label": label}})
    return records


def _contents(anat: Path) -> dict[str, float]:
    import nibabel as nib

    return {p.name: float(np.asarray(nib.load(str(p)).dataobj).max()) for p in sorted(anat.glob("*.nii.gz"))}


def test_a_session_is_replaced_as_one_unit(dataset, tmp_path, monkeypatch):
    from bids_app.bids import commit
    from bids_app.errors import OutputIOError

    out = tmp_path / "out"
    commit.commit_records(_records(tmp_path, dataset, "old"), out, dataset)
    anat = out / "sub-01" / "anat"
    before = _contents(anat)
    assert set(before.values()) == {0.25} and len(before) == 4
    calls = {"n": 0}
    real = os.replace

    def fail_second_move(src, dst):  # the second move of the commit fails (a full or failing disk)
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_move)
    with pytest.raises(OutputIOError):
        commit.commit_records(_records(tmp_path, dataset, "new"), out, dataset)
    monkeypatch.setattr(os, "replace", real)
    assert _contents(anat) == before  # the previous result, whole: no file of the failed attempt
    assert not list(out.glob(".msxplain-staging-*"))
    commit.commit_records(_records(tmp_path, dataset, "new"), out, dataset)
    assert set(_contents(anat).values()) == {0.75}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("killed_after", ["old moved aside", "new moved into place"])
def test_an_interrupted_swap_is_rolled_back_or_finished_on_the_next_start(dataset, tmp_path, killed_after):
    """A process killed in the middle of a swap leaves its journal; the next start completes it."""
    from bids_app.bids import commit

    out = tmp_path / "out"
    commit.commit_records(_records(tmp_path, dataset, "old"), out, dataset)
    # the state a commit killed between its two renames (or after the second) leaves
    staging = out / commit.staging_name(pid=_dead_pid())
    new_records = _records(tmp_path, dataset, "new")
    elsewhere = tmp_path / "elsewhere"
    commit.commit_records(new_records, elsewhere, dataset)
    unit = Path("sub-01") / "anat"
    (staging / "new" / unit).parent.mkdir(parents=True)
    shutil.move(str(elsewhere / unit), str(staging / "new" / unit))
    (staging / commit.SWAP_JOURNAL).write_text(json.dumps({"target": unit.as_posix()}))
    os.replace(out / unit, staging / "old")
    if killed_after == "new moved into place":
        os.replace(staging / "new" / unit, out / unit)
    done = commit.remove_stale_staging(out)
    assert [outcome for _, outcome in done] == [{"old moved aside": "rolled back",
                                                 "new moved into place": "finished"}[killed_after]]
    expected = {"old moved aside": 0.25, "new moved into place": 0.75}[killed_after]
    assert set(_contents(out / unit).values()) == {expected} and len(_contents(out / unit)) == 4
    assert not list(out.glob(".msxplain-staging-*"))


@pytest.mark.slow
def test_a_failed_rerun_removes_the_earlier_outputs_and_group_says_why(dataset, tiny_model, finished_run, tmp_path,
                                                                      capsys):
    bids = tmp_path / "bids"
    shutil.copytree(dataset, bids)
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    assert (out / "sub-01" / "anat" / "sub-01_summary.json").is_file()
    flair = bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz"
    flair.write_bytes(flair.read_bytes()[:2000])  # the input became corrupt
    assert run_cli(cli(bids, out, tmp_path / "work", tiny_model)[3:]) == 65
    assert not (out / "sub-01" / "anat").exists()  # no stale result beside the error
    assert list((out / "sub-01" / "log").glob("*/sub-01_error.json"))
    assert (out / "sub-01.html").is_file()
    capsys.readouterr()
    assert run_cli([bids, out, "group"]) == 66
    err = capsys.readouterr().err
    assert "sub-01 (its latest participant run failed, exit code 65" in err


def test_a_session_whose_outputs_were_never_written_fails_the_run(dataset, tiny_model, tmp_path, monkeypatch, capsys):
    """A SLURM job killed by the scheduler leaves no crash file: simulated by a graph that runs nothing."""
    from nipype.pipeline.engine import Workflow

    monkeypatch.setattr(Workflow, "run", lambda self, *a, **k: None)
    assert run_cli(cli(dataset, tmp_path / "out", tmp_path / "work", tiny_model)[3:]) == 75
    err = capsys.readouterr().err
    assert "sub-01 failed (exit code 75): Its outputs were not written" in err


def test_squeue_failing_ends_the_wait_with_a_clear_error(monkeypatch):
    from bids_app.app.execution import wait_for_slurm_jobs
    from bids_app.errors import TemporaryFailure

    def failing(*args, **kwargs):
        return subprocess.CompletedProcess(args[0], 1, "", "slurm_load_jobs error: Unable to contact slurm controller")

    monkeypatch.setattr(subprocess, "run", failing)
    outcome = {}

    def wait():
        try:
            wait_for_slurm_jobs({"predict"}, poll=0.01, query_timeout=0.5)
            outcome["returned"] = True
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the wait for SLURM jobs did not end while squeue kept failing"
    assert isinstance(outcome.get("error"), TemporaryFailure), outcome
    assert "squeue kept failing" in outcome["error"].one_line()
    assert "Unable to contact slurm controller" in outcome["error"].one_line()


# ------------------------------------------------------------------ item 4: group inputs, all or nothing
def _corrupt(out: Path, what: str) -> Path:
    anat = out / "sub-01" / "anat"
    if what == "summary":
        path = anat / "sub-01_summary.json"
        path.write_text('{"participant_id": "sub-01", "lesions": ')
    elif what == "lesions":
        path = anat / "sub-01_lesions.tsv"
        path.write_bytes(bytes(range(256)) * 8)
    else:  # (the participant run had no lesion features, so no transform: one is put in place)
        path = anat / "sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt"
        path.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: NoSuchTransform_double_3_3\n")
    return path


@pytest.mark.parametrize("what", ["summary", "lesions", "transform"])
def test_group_refuses_unreadable_participant_outputs_and_writes_nothing(dataset, finished_run, tmp_path, capsys,
                                                                        what):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    assert run_cli([dataset, out, "group"]) == 0
    previous = {p.name: p.read_bytes() for p in (out / "group").glob("*") if p.is_file()}
    assert "group_sessions.tsv" in previous
    bad = _corrupt(out, what)
    capsys.readouterr()
    assert run_cli([dataset, out, "group"]) == 65
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err, err
    now = {p.name: p.read_bytes() for p in (out / "group").glob("*") if p.is_file()}
    assert now == previous  # the earlier group result, untouched
    assert not list(out.glob(".msxplain-staging-*"))
