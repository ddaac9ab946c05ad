"""flags.py: the command line of the sweep scripts."""

import pytest

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


def test_val_subjects_reaches_every_trial_and_nonsense_is_refused(capsys):
    from tlcore.sweep.preflight import DataChoice, base_config

    parser = sweep_parser("doc", source="models:/ixi_hippocampus/latest", dataset="brats")
    build = lambda argv, profile={}: base_config("brats", parser.parse_args(argv), "sqlite:///x.db", "/d", "/s.json",
                                                 profile, DataChoice())
    assert "max_val_subjects" not in build([])  # all subjects, TrialConfig's default
    assert build(["--val-subjects", "16"])["max_val_subjects"] == 16
    assert build(["--val-subjects", "3"], {"max_val_subjects": 2})["max_val_subjects"] == 3  # over --smoke-test's
    with pytest.raises(SystemExit) as e:
        build(["--val-subjects", "0"])
    assert e.value.code == 2 and "--val-subjects 0" in capsys.readouterr().err
    assert not hasattr(sweep_parser("doc", dataset="mura").parse_args([]), "val_subjects")  # 3D only
