import dataclasses

import pytest

from tlcore.config import TrialConfig, flatten_config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown config keys: \\['learning_rate'\\]"):
        TrialConfig.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize("bad", [{"lr_schedule": "step"}, {"sampler": "balanced"}, {"frozen_layers": 7,
                                 "source_model": "models:/x/1"}, {"frozen_layers": 2}, {"patch_size": [16, 16]},
                                 {"torch_compile": "yes"}])
def test_invalid_values_fail_loudly(bad):
    with pytest.raises(ValueError, match="invalid run config"):
        TrialConfig.from_dict(bad)


def test_start_pair_is_flattened_and_lists_become_tuples():
    cfg = TrialConfig.from_dict({"start": {"source_model": "models:/ixi_hippocampus/2", "frozen_layers": 3},
                               "patch_size": [16, 16, 16], "label_map": {"17": 1}})
    assert (cfg.source_model, cfg.frozen_layers) == ("models:/ixi_hippocampus/2", 3)
    assert cfg.patch_size == (16, 16, 16) and cfg.roi == (16, 16, 16)
    assert cfg.label_map == {17: 1}
    assert flatten_config({"start": {"a": 1}, "b": 2}) == {"a": 1, "b": 2}


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrialConfig().lr = 1.0


def test_a_run_logs_only_the_settings_that_apply_to_it():
    from tlcore.config import ONLY_2D, ONLY_3D

    brats = TrialConfig(dataset="brats").logged_params()
    assert "patch_size" in brats and "sw_overlap" in brats and not ONLY_2D & set(brats)
    chest = TrialConfig(dataset="chestxray").logged_params()
    assert chest["finding"] == "Pneumothorax" and "image_size" in chest and not ONLY_3D & set(chest)
    mura = TrialConfig(dataset="mura").logged_params()
    assert "finding" not in mura and "image_size" in mura
    assert set(brats) | ONLY_2D == set(TrialConfig().to_params())  # the checkpoint's run_config keeps every key
