"""Command-line parsing: BIDS-Apps positional contract, aliases and usage exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bids_app.cli.parser import build_parser, parse_memory_gb
from bids_app.testing import run_cli

MIN = ["/data", "/out", "participant"]


def parse(*extra):
    return build_parser().parse_args([*MIN, *extra])


def test_positional_contract():
    ns = parse()
    assert str(ns.bids_dir) == "/data" and str(ns.output_dir) == "/out" and ns.analysis_level == "participant"
    assert ns.model == "demo" and ns.tta is True and ns.device == "auto"


@pytest.mark.parametrize("flag", ["--participant-label", "--participant_label"])
def test_participant_label_aliases_and_prefix(flag):
    ns = parse(flag, "sub-01", "02")
    assert ns.participant_label == ["01", "02"]


def test_session_label_prefix():
    assert parse("--session-label", "ses-pre", "post").session_label == ["pre", "post"]


@pytest.mark.parametrize("argv, code", [
    (["/d", "/o", "everything"], 17),               # unknown analysis level
    (["/d", "/o", "participant", "--bogus"], 64),   # unknown option
    (["/d", "/o"], 64),                             # missing positional
    (["/d", "/o", "participant", "--threshold", "1.5"], 64),
    (["/d", "/o", "participant", "--connectivity", "8"], 64),
    (["/d", "/o", "participant", "--participant-label", "sub-0_1"], 64),
    (["/d", "/o", "participant", "--min-lesion-size", "0"], 64),
])
def test_usage_errors_have_bids_apps_codes(argv, code, capsys):
    assert run_cli(argv) == code
    assert "error" in capsys.readouterr().err


def test_help_and_version_exit_zero(capsys):
    from bids_app import __version__

    assert run_cli(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert run_cli(["--help"]) == 0


def test_version_matches_version_file():
    from pathlib import Path

    from bids_app import __version__

    assert __version__ == (Path(__file__).resolve().parents[1] / "version").read_text().strip()


def test_filter_file_not_json_is_usage_error(tmp_path, capsys):
    bad = tmp_path / "filters.json"
    bad.write_text("{t1w: acquisition=MPRAGE}")
    assert run_cli([*MIN, "--bids-filter-file", bad]) == 64
    assert "not valid JSON" in capsys.readouterr().err


def test_filter_file_shape_checked(tmp_path):
    bad = tmp_path / "filters.json"
    bad.write_text(json.dumps({"t1w": "MPRAGE"}))
    assert run_cli([*MIN, "--bids-filter-file", bad]) == 64


def test_filter_file_parsed(tmp_path):
    good = tmp_path / "filters.json"
    good.write_text(json.dumps({"t1w": {"acquisition": "MPRAGE", "run": None}}))
    assert parse("--bids-filter-file", str(good)).bids_filters == {"t1w": {"acquisition": "MPRAGE", "run": None}}


@pytest.mark.parametrize("text, gb", [("8", 8.0), ("8G", 8.0), ("8GB", 8.0), ("8192M", 8.0), ("8192MB", 8.0),
                                      ("1T", 1024.0)])
def test_memory_units(text, gb):
    assert parse_memory_gb(text) == pytest.approx(gb)


def test_plugin_args_json():
    ns = parse("--plugin", "SLURM", "--plugin-args", '{"sbatch_args": "-p debug"}')
    assert ns.plugin == "SLURM" and ns.plugin_args == {"sbatch_args": "-p debug"}


def test_explanation_options(tmp_path):
    from bids_app.app.config import Config

    bids = tmp_path / "bids"
    bids.mkdir()
    argv = [str(bids), str(tmp_path / "out"), "participant"]
    off = Config.from_args(build_parser().parse_args(argv)).outputs
    assert not off.explain and not off.refine and off.explain_samples is None
    refine = Config.from_args(build_parser().parse_args([*argv, "--refine"])).outputs
    assert refine.explain and refine.refine and refine.refine_threshold is None  # the refiner's own
    custom = Config.from_args(build_parser().parse_args(
        [*argv, "--refine", "0.3", "--explain-samples", "8", "--explain-margin", "10"])).outputs
    assert custom.refine_threshold == 0.3 and custom.explain_samples == 8 and custom.explain_margin == 10.0
    given = Config.from_args(build_parser().parse_args([*argv, "--refiner", "r.json"])).outputs
    assert given.explain and not given.refine and given.refiner == str((Path.cwd() / "r.json").resolve())
    with pytest.raises(Exception) as info:
        Config.from_args(build_parser().parse_args([*argv, "--refine", "--refiner", "none"]))
    assert getattr(info.value, "exit_code", None) == 64


@pytest.mark.parametrize("bad", [["--refine", "1.5"], ["--explain-samples", "0"], ["--explain-margin", "-1"],
                                 ["--explain-max-lesions", "-2"]])
def test_explanation_options_out_of_range_are_usage_errors(bad):
    assert run_cli(["/d", "/o", "participant", *bad]) == 64


def test_explain_config_follows_the_refiner_unless_given():
    from types import SimpleNamespace

    from bids_app.app.plan import explain_config
    from bids_app.core.explain import ExplainConfig

    trained = {"explain_config": {"n_samples": 8, "noise_level": 0.1, "margin_mm": 10.0, "max_groups": 4}}
    user = SimpleNamespace(explain_samples=None, explain_noise=None, explain_margin=None, explain_max_lesions=0)
    assert explain_config(user, trained) == ExplainConfig(n_samples=8, noise_level=0.1, margin_mm=10.0,
                                                          max_groups=4)
    assert explain_config(user, None) == ExplainConfig()  # margin_mm None: measured
    user.explain_samples = 20
    assert explain_config(user, trained).n_samples == 20
