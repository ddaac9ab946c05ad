"""flags.py: the command line of the sweep scripts."""

import pytest

from tlcore.sweep import flags
from tlcore.sweep.flags import control_starts, sweep_parser


def test_controls_default_per_sweep_and_their_grid_entries(capsys):
    parser = sweep_parser("doc", source="models:/ixi_hippocampus/latest", dataset="brats")
    args = parser.parse_args([])
    assert args.controls == ["scratch", "meanvar"]
    assert control_starts(args.controls, "models:/ixi_hippocampus/3") == [
        {"source_model": "scratch", "frozen_layers": 0},
        {"source_model": "meanvar:models:/ixi_hippocampus/3", "frozen_layers": 0}]
    assert parser.parse_args(["--controls", "none"]).controls == []
    parser.set_defaults(controls="scratch")  # brats_subsets, chestxray_transfer: Mean-Var on request
    assert control_starts(parser.parse_args([]).controls, "models:/x/1") == [{"source_model": "scratch",
                                                                              "frozen_layers": 0}]
    with pytest.raises(SystemExit):
        parser.parse_args(["--controls", "scratch,meanvar,imagenet"])
    assert "['imagenet'] unknown" in capsys.readouterr().err
    assert not hasattr(sweep_parser("doc", dataset="ixi").parse_args([]), "controls")  # no source, no controls


def test_val_subjects_reaches_every_trial():
    from tlcore.sweep.preflight import DataChoice, base_config

    parser = sweep_parser("doc", source="models:/ixi_hippocampus/latest", dataset="brats")
    build = lambda argv, profile={}: base_config("brats", parser.parse_args(argv), "sqlite:///x.db", "/d", "/s.json",
                                                 profile, DataChoice())
    assert "max_val_subjects" not in build([])  # all subjects, TrialConfig's default
    assert build(["--val-subjects", "16"])["max_val_subjects"] == 16
    assert build(["--val-subjects", "3"], {"max_val_subjects": 2})["max_val_subjects"] == 3  # over --smoke-test's
    assert not hasattr(sweep_parser("doc", dataset="mura").parse_args([]), "val_subjects")  # 3D only


@pytest.mark.parametrize("argv, says", [
    (["--frozen-layers", "two"], "argument --frozen-layers: 'two': give comma-separated counts of frozen layer groups from 0 to 5"),
    (["--frozen-layers", "7"], "argument --frozen-layers: '7': give comma-separated counts"),
    (["--frozen-layers", ","], "argument --frozen-layers: ','"),
    (["--num-samples", "0"], "argument --num-samples: 0: give 1 or more"),
    (["--num-samples", "3.5"], "argument --num-samples: '3.5' is not a whole number"),
    (["--cpus-per-trial", "0"], "argument --cpus-per-trial: 0: give more than 0"),
    (["--gpus-per-trial", "-1"], "argument --gpus-per-trial: -1: give at least 0"),
    (["--max-iterations", "0"], "argument --max-iterations: 0: give 1 or more"),
    (["--report-every", "x"], "argument --report-every: 'x' is not a whole number"),
    (["--val-subjects", "0"], "argument --val-subjects: 0: give 1 or more"),
])
def test_a_mistyped_flag_is_one_line_naming_it_and_what_it_takes(argv, says, capsys):
    """Checked while parsing, before anything else a sweep does (no store, folder, run or Ray yet)."""
    parser = sweep_parser("doc", source="models:/ixi_hippocampus/latest", dataset="brats")
    parser.add_argument("--frozen-layers", type=flags.frozen_layers, default="0,1,2,3,4,5")  # as brats_layers.py
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("[tlcore] error: ") and says in err, err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err
    ok = parser.parse_args(["--frozen-layers", "3,1,1", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.25"])
    assert (ok.frozen_layers, ok.cpus_per_trial, ok.gpus_per_trial) == ([1, 3], 0.5, 0.25)
    assert parser.parse_args([]).frozen_layers == [0, 1, 2, 3, 4, 5]
