"""Issue 12, the first hour of a new user: help that reads right, progress with an ETA, a text
log per run, model names that cannot collide with folders, bundled lesion shapes, templates
fetched once (from a local HTTP server here) or strictly offline."""

from __future__ import annotations

import functools
import http.server
import io
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bids_app.cli.parser import build_parser
from bids_app.errors import MissingInput
from bids_app.progress import ProgressLine, format_duration
from bids_app.testing import make_bids, run_cli, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()


# ---------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------
def _help_entries() -> dict[str, str]:
    """Option -> its help text (whitespace folded), parsed from the printed help."""
    text = build_parser().format_help()
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line.strip()
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return entries


def test_help_shows_every_default_once_and_truthfully():
    entries = _help_entries()
    assert len(entries) > 40
    for option, text in entries.items():
        assert text.lower().count("(default:") <= 1, (option, text)
        assert text.lower().count("default") <= 2, (option, text)  # "default" once, maybe in a phrase
        for wrong in ("(default: True)", "(default: False)", "(default: None)", "(default: 0)\n"):
            assert wrong not in text, (option, text)
    tta = entries["--no-tta"]
    assert "ON by default" in tta and "(default: True)" not in tta
    assert "computed by default" in entries["--no-lesion-features"]
    assert "(default: ./work" in entries["-w"] and "is not used" not in entries["-w"]
    assert "(default: MultiProc)" in entries["--plugin"]
    assert "(default: EoE ExE MI)" in entries["--voxel-uncertainty"]
    assert "(default: demo" in entries["--model"] and "./mymodel" in entries["--model"]
    assert "TemplateFlow" in entries["--atlas"] and "not distributed by TemplateFlow" in entries["--atlas"]
    # the parsed defaults are the ones the help states
    ns = build_parser().parse_args(["/d", "/o", "participant"])
    assert ns.tta is True and ns.lesion_features is True and ns.plugin == "MultiProc" and ns.offline is False


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert format_duration(4.2) == "4 s"
    assert format_duration(70) == "1 min 10 s"
    assert format_duration(120) == "2 min"
    assert format_duration(3700) == "1 h 1 min"


def test_progress_line_in_a_pipe_prints_one_line_per_step_with_an_eta():
    clock, stream = _Clock(), io.StringIO()
    line = ProgressLine("sub-01 ses-1", "predict", stream=stream, interval=30, clock=clock)
    for tile in range(1, 97):  # one member of 3, 96 tiles, 1 s per tile
        clock.now = float(tile)
        line.update(tile / (3 * 96), f"member 1/3, tile {tile}/96", step=tile == 96)
    lines = stream.getvalue().splitlines()
    # the first tile, one line every 30 s, and the finished member: not 96 lines
    assert 3 <= len(lines) <= 6, lines
    assert lines[-1].endswith("[sub-01 ses-1] predict: member 1/3, tile 96/96, ETA 3 min 12 s")
    clock.now = 300.0
    line.update(1.0, "member 3/3, tile 96/96")
    assert stream.getvalue().splitlines()[-1].endswith("predict: member 3/3, tile 96/96, done in 5 min")


def test_progress_line_on_a_terminal_is_rewritten_in_place():
    clock, stream = _Clock(), _Terminal()
    line = ProgressLine("sub-01", "explain", stream=stream, refresh=0.0, clock=clock)
    for k in range(1, 5):
        clock.now = 10.0 * k
        line.update(k / 10, f"lesion {k} of 10")
    text = stream.getvalue()
    assert text.count("\r\x1b[2K") == 4 and "\n" not in text
    assert text.endswith("[sub-01] explain: lesion 4 of 10, ETA 1 min")
    line.close()
    assert stream.getvalue().endswith("\n")


def test_predictor_reports_every_tile_of_every_member(tiny_model):
    import numpy as np

    from bids_app.model.ensemble import load_ensemble
    from bids_app.model.resolve import resolve_model
    from bids_app.testing import make_case

    model = resolve_model(str(tiny_model))
    ensemble = load_ensemble(model, list(model.card.members), device="cpu", tta=False)
    predictor, members = ensemble.predictor, ensemble.members
    image, _ = make_case(3)
    calls = []
    with_progress = predictor.predict(image, (2.0, 2.0, 2.0), progress=lambda *a: calls.append(a))
    without = predictor.predict(image, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(with_progress, without)  # counting tiles changes nothing
    n_members, n_tiles = len(members), calls[0][3]
    assert n_tiles >= 1 and len(calls) == n_members * n_tiles
    assert calls == [(m, n_members, t, n_tiles) for m in range(1, n_members + 1) for t in range(1, n_tiles + 1)]
    assert "_internal_maybe_mirror_and_predict" not in vars(predictor._predictor)  # hooks removed


@pytest.mark.slow
def test_participant_run_prints_progress_and_keeps_a_text_log(tiny_model, tmp_path):
    """A real ``msxplain`` process (its own forkserver workers): stderr carries the progress lines
    with an ETA and no Nipype INFO entries; the run log and the per-subject logs hold everything."""
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    venv_msxplain = REPO / ".venv" / "bin" / "msxplain"
    program = str(venv_msxplain) if venv_msxplain.exists() else shutil.which("msxplain")
    proc = subprocess.run([program, str(bids), str(out), "participant", "--model", str(tiny_model),
                           "-w", str(work), "--skull-stripped", "yes", "--no-lesion-features", "--nprocs", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert re.search(r"\[sub-0[12]\] predict: member 1/3, tile \d+/\d+, ETA \d+", err), err[-3000:]
    assert re.search(r"\[sub-0[12]\] predict: member 3/3, tile (\d+)/\1, done in", err), err[-3000:]
    assert re.search(r"\[sub-01\] \(session 1 of 2\) predict: started", err)
    assert "nipype.workflow INFO" not in err and "[Node] Setting-up" not in err
    assert len(re.findall(r"^msxplain: error", err, flags=re.M)) == 0
    run_logs = list((out / "logs").glob("participant-*.log"))
    assert len(run_logs) == 1
    log_text = run_logs[0].read_text()
    assert "[Node] Setting-up" in log_text  # Nipype's lines, from the workers, are in the file
    assert "predict: member 3/3" in log_text
    run_id = run_logs[0].name[len("participant-"):-len(".log")]
    for sub, other in (("01", "02"), ("02", "01")):
        sub_log = (out / f"sub-{sub}" / "log" / run_id / f"sub-{sub}_msxplain.log").read_text()
        assert f"sub_{sub}_wf" in sub_log and f"sub_{other}_wf" not in sub_log
        assert "participant level, run" in sub_log  # the run's general lines too


# ---------------------------------------------------------------------------------------------
# model names before folders
# ---------------------------------------------------------------------------------------------
def test_a_folder_named_like_a_model_does_not_shadow_it(tmp_path, monkeypatch):
    from bids_app.model.resolve import BUNDLED_MODELS_DIR, resolve_model

    (tmp_path / "demo" / "bids").mkdir(parents=True)  # what an earlier demo run left behind
    monkeypatch.chdir(tmp_path)
    assert resolve_model("demo").trainer_dir.is_relative_to(BUNDLED_MODELS_DIR)
    with pytest.raises(MissingInput, match="No nnU-Net trained model"):
        resolve_model("./demo")  # the folder, when written as a path


def test_a_bare_folder_name_that_is_no_model_is_still_a_folder(tiny_model, tmp_path, monkeypatch):
    from bids_app.model.resolve import resolve_model

    shutil.copytree(tiny_model, tmp_path / "mymodel")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("mymodel").trainer_dir == (tmp_path / "mymodel").resolve()


# ---------------------------------------------------------------------------------------------
# bundled lesion shapes
# ---------------------------------------------------------------------------------------------
def test_lesion_shapes_are_bundled_with_their_licence(monkeypatch):
    from bids_app.synth.sources import BUNDLED_LESION_DIR, default_lesion_dir, find_lesion_masks

    monkeypatch.delenv("MSXPLAIN_LESION_MASKS", raising=False)
    assert default_lesion_dir() == BUNDLED_LESION_DIR
    found = find_lesion_masks(BUNDLED_LESION_DIR)
    assert len(found) == 28 and "patient07" in found
    assert "CC-BY" in (BUNDLED_LESION_DIR / "LICENSE.txt").read_text().replace(" ", "")
    readme = (BUNDLED_LESION_DIR / "README.md").read_text()
    assert "10.1007/s12021-017-9348-7" in readme
    shared = SHARED / "open_ms_data" / "cross_sectional" / "MNI"
    if shared.is_dir():  # copied unchanged
        for name, path in found.items():
            assert path.read_bytes() == (shared / name / path.name).read_bytes()


# ---------------------------------------------------------------------------------------------
# templates: fetched once, or strictly offline
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def template_server(templateflow_home):
    """TemplateFlow's S3 layout served from 127.0.0.1 (only the files of the offline copy)."""
    handler = functools.partial(_QuietHandler, directory=str(templateflow_home))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        self.server.requests.append(self.path)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No TEMPLATEFLOW_HOME, no offline flag: TemplateFlow's default cache under a temp folder."""
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    monkeypatch.delenv("MSXPLAIN_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "templateflow"


def test_templates_are_fetched_once_on_first_use(online, template_server, monkeypatch, capfd):
    from bids_app.bids import templates

    monkeypatch.setenv(templates.MIRROR_ENV, f"http://127.0.0.1:{template_server.server_port}")
    assert templates.templateflow_home() == online and not templates.offline_mode()
    first = templates.brain_mask_template()
    assert all(p.is_file() and p.stat().st_size > 1000 and p.is_relative_to(online) for p in first)
    assert len(template_server.requests) == 2
    assert "Downloading http://127.0.0.1" in capfd.readouterr().err  # TemplateFlow shows what it fetches
    assert templates.brain_mask_template() == first
    assert len(template_server.requests) == 2  # cached: nothing fetched again


def test_fetch_templates_command_fills_the_cache(online, template_server, monkeypatch, capsys):
    from bids_app.bids.templates import MIRROR_ENV, REQUIRED_FILES
    from bids_app.cli.tools import main as tools_main

    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{template_server.server_port}")
    assert tools_main(["fetch-templates", "--check"]) == 66
    assert "10 template file(s) missing" in capsys.readouterr().err
    assert tools_main(["fetch-templates"]) == 0
    assert len(template_server.requests) == len(REQUIRED_FILES)
    assert tools_main(["fetch-templates", "--check"]) == 0


def test_offline_never_touches_the_network_and_names_the_files(tmp_path, monkeypatch):
    from bids_app.bids import templates

    empty = tmp_path / "tf"
    empty.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(empty))  # an explicit cache means offline
    monkeypatch.setitem(sys.modules, "templateflow.client", None)  # importing it would fail the test
    assert templates.offline_mode()
    with pytest.raises(MissingInput) as info:
        templates.brain_mask_template()
    message = info.value.one_line()
    assert "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz" in message and "msxplain-tools fetch-templates" in message
    assert "shared" not in message
    monkeypatch.delenv("TEMPLATEFLOW_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MSXPLAIN_OFFLINE", "1")
    with pytest.raises(MissingInput, match="offline"):
        templates.template_file(resolution=1, suffix="probseg", label="GM")


def test_offline_participant_run_without_templates_fails_before_processing(tiny_model, tmp_path, monkeypatch,
                                                                           capsys):
    """--offline and no cache: a clear message and exit 66 for a run that needs the template
    (unstripped input with --skull-strip template: the brain mask comes from it), nothing written
    to the output folder."""
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", tmp_path / "work", "--offline",
                    "--skull-stripped", "no", "--skull-strip", "template"])
    err = capsys.readouterr().err
    assert code == 66, err
    assert "fetch-templates" in err and "res-02_T1w" in err
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


def test_split_run_log_gives_each_subject_its_lines(tmp_path):
    from bids_app.app.runlog import split_run_log

    log = tmp_path / "run.log"
    log.write_text(
        "2026-12-04 10:00:00,000 | INFO | MainProcess | bids_app | msxplain, participant level\n"
        "2026-12-04 10:00:01,000 | INFO | MainProcess | bids_app | [sub-01] predict: started\n"
        "2026-12-04 10:00:02,000 | INFO | MainProcess | nipype.workflow | [MultiProc] pending:\n"
        "\t* wf.sub_01_wf.conform\n"
        "\t* wf.sub_02_wf.conform\n"
        "2026-12-04 10:00:03,000 | ERROR | MainProcess | bids_app | [sub-02] conform: FAILED\n"
        "Traceback (most recent call last):\n"
        "ValueError: bad\n"
        "2026-12-04 10:00:04,000 | INFO | ForkServerProcess-2 | nipype.workflow | [Node] Setting-up "
        "\"wf.sub_02_wf.predict\"\n"
        "2026-12-04 10:00:05,000 | INFO | ForkServerProcess-2 | nipype.workflow | [Node] Finished \"predict\"\n")
    parts = split_run_log(log, ["01", "02"])
    assert "participant level" in parts["01"] and "participant level" in parts["02"]
    assert "[sub-01] predict" in parts["01"] and "[sub-01] predict" not in parts["02"]
    assert "sub_01_wf.conform" in parts["01"] and "sub_02_wf" not in parts["01"]
    assert "sub_02_wf.conform" in parts["02"] and "sub_01_wf" not in parts["02"]
    assert "ValueError: bad" in parts["02"] and "ValueError" not in parts["01"]
    assert 'Finished "predict"' in parts["02"] and 'Finished "predict"' not in parts["01"]


def test_a_run_log_that_cannot_be_written_never_breaks_the_caller(tmp_path):
    """A worker's run log may point into a folder removed since its fork server started."""
    import logging

    from bids_app.app.runlog import file_handler

    gone = tmp_path / "removed" / "run.log"
    logger = logging.getLogger("bids_app.test_runlog")
    handler = file_handler(gone, verbosity=0)
    logger.addHandler(handler)
    try:
        logger.warning("a line for a log file whose folder does not exist")  # must not raise
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert not gone.exists()
