"""models/probes.py (debiased CKA in Gram and feature-space form, its bootstrap interval, weight
movement, probe patches) and the Mean-Var start."""

import itertools
import math

import pytest
import torch

from tlcore.models.networks import build_model, layer_groups
from tlcore.models.probes import (
    LayerProbe,
    MinibatchCKA,
    WeightMovement,
    bootstrap_weights,
    cka_from_sums,
    gram,
    hsic1,
    linear_cka,
    patch_sums,
    probe_features,
    probe_patches,
    unique_voxels,
    weighted_hsic,
)
from tlcore.models.transfer import freeze_first, load_source, mean_var_init


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hsic_by_definition(K, L) -> float:
    """Song et al. (2012)'s unbiased HSIC as sums over distinct index tuples (no matrix algebra)."""
    n = K.shape[0]
    falling = lambda k: math.prod(range(n - k + 1, n + 1))
    pairs = sum(K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)) / falling(2)
    quads = sum(K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / falling(4)
    triples = sum(K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)) / falling(3)
    return float(pairs + quads - 2 * triples)


def test_hsic_matches_its_definition_with_the_diagonal_zeroed():
    x, y = randn(6, 3, seed=1), randn(6, 4, seed=2)
    K, L = gram(x), gram(y)
    assert hsic1(K, L) == pytest.approx(hsic_by_definition(K.double(), L.double()), rel=1e-6)
    # the classic bug: K - diag(K) subtracts the diagonal's vector from every row, not only the diagonal
    wrong = hsic1(K - torch.diag(K), L - torch.diag(L))
    assert wrong != pytest.approx(hsic1(K, L), rel=1e-3)


def test_identical_representations_give_one_and_independent_ones_about_zero():
    x = randn(32, 2000, seed=3)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x, minibatch=8) == pytest.approx(1.0, abs=1e-9)
    y = randn(32, 2000, seed=4)
    assert abs(linear_cka(x, y)) < 0.1
    assert abs(linear_cka(x, y, minibatch=8)) < 0.15
    # why the debiased estimator: with far more features than examples the biased one says "similar"
    H = torch.eye(32, dtype=torch.float64) - 1 / 32
    Kc, Lc = H @ gram(x).double() @ H, H @ gram(y).double() @ H
    biased = float((Kc * Lc).sum() / ((Kc * Kc).sum() * (Lc * Lc).sum()).sqrt())
    assert biased > 0.9


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = randn(24, 16, seed=5)
    y = x @ randn(16, 16, seed=6) + 0.5 * randn(24, 16, seed=7)  # related, not identical
    q, _ = torch.linalg.qr(randn(16, 16, seed=8))
    reference = linear_cka(x, y, minibatch=8)
    assert 0.2 < reference < 0.99
    assert linear_cka(x @ q, y, minibatch=8) == pytest.approx(reference, rel=1e-6)
    assert linear_cka(3.7 * x, 0.01 * y, minibatch=8) == pytest.approx(reference, rel=1e-6)


def test_dead_or_constant_features_give_zero_not_nan():
    x = randn(16, 8, seed=9)
    for degenerate in (torch.zeros(16, 8, dtype=torch.float64), torch.ones(16, 8, dtype=torch.float64)):
        value = linear_cka(x, degenerate, minibatch=8)
        assert value == 0.0 and not math.isnan(value)
    cka = MinibatchCKA()
    cka.xy, cka.xx, cka.yy = 0.2, -0.1, 0.5  # a negative self-similarity estimate: no sqrt of a negative
    assert cka.value() == 0.0


def test_weight_movement_is_relative_per_group_and_zero_when_frozen():
    torch.manual_seed(0)
    model = build_model(num_classes=2)
    freeze_first(model, 2)
    movement = WeightMovement(model)
    assert all(v == 0 for v in movement(model).values())
    with torch.no_grad():
        for m in layer_groups(model)["res_2"]:
            for p in m.parameters():
                p.mul_(1.5)
    moved = movement(model)
    assert set(moved) == {f"weight_change.{g}" for g in layer_groups(model)}
    assert moved["weight_change.res_2"] == pytest.approx(0.5, rel=1e-5)
    assert moved["weight_change.conv_0"] == 0 and moved["weight_change.res_3"] == 0


class Volume:
    def __init__(self, seed):
        self.image = randn(2, 20, 20, 20, seed=seed).float()
        self.label = torch.zeros(1, 20, 20, 20, dtype=torch.long)
        self.label[0, 12:16, 3:6, 8:11] = 1


def test_probe_patches_are_fixed_and_half_of_them_on_the_foreground():
    subjects = [Volume(1), Volume(2)]
    a, b = probe_patches(subjects, (8, 8, 8), n=8), probe_patches(subjects, (8, 8, 8), n=8)
    assert a.shape == (8, 2, 8, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, probe_patches(subjects, (8, 8, 8), n=8, seed=1))
    small = probe_patches(subjects, (24, 24, 24), n=4)  # larger than the volume: zero-padded
    assert small.shape == (4, 2, 24, 24, 24)


def test_layer_probe_gives_one_against_itself_and_less_after_training_changes_it():
    torch.manual_seed(0)
    source = build_model(num_classes=2)
    patches = probe_patches([Volume(3), Volume(4)], (12, 12, 12), n=8)
    probe = LayerProbe(source, patches, torch.device("cpu"), minibatch=4)
    assert set(probe.cka(source)) == {f"{m}.{g}" for g in ("conv_0", "res_1", "res_2", "res_3", "conv_1")
                                      for m in ("cka", "cka_low", "cka_high")}
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in probe.cka(source).values())
    other = build_model(num_classes=2)  # another random initialisation
    changed = probe.cka(other)
    assert all(v < 0.95 for k, v in changed.items() if k.startswith("cka.")), changed
    assert source.training  # the probe restores the mode it found
    few = LayerProbe(source, patches[:3], torch.device("cpu"), minibatch=4).cka(other)  # too few to resample
    assert set(few) == {f"cka.{g}" for g in ("conv_0", "res_1", "res_2", "res_3", "conv_1")}
    assert few["cka.res_1"] == pytest.approx(LayerProbe(source, patches[:3], torch.device("cpu"), resamples=0).cka(other)["cka.res_1"])
    features, owner = probe_features(source, patches, probe.positions, torch.device("cpu"), minibatch=4)["conv_0"]
    assert features.shape[1] == 16 and owner.tolist() == sorted(owner.tolist())  # voxels are the examples
    assert 8 * 200 < len(features) <= 8 * 256 and set(owner.tolist()) == set(range(8))  # 256 a patch, repeats once


def test_feature_space_hsic_is_the_gram_form_and_resamples_leave_a_voxels_copies_out():
    x, y = randn(40, 3, seed=11), randn(40, 4, seed=12)
    y = y + x[:, :1]  # related
    patch = torch.arange(40) // 5
    sums = patch_sums(x, y, patch, 8)
    assert float(weighted_hsic(sums, torch.ones(1, 8))) == pytest.approx(hsic1(gram(x), gram(y)), rel=1e-10)
    # a resample: patch 0 twice, patch 4 three times, ...; every pair of distinct voxels counts,
    # a voxel with its own copies does not (as with itself)
    w = torch.tensor([[2.0, 0, 1, 1, 3, 0, 1, 0]])
    idx = torch.cat([torch.nonzero(patch == p).flatten().repeat(int(w[0, p])) for p in range(8)])
    K, L = x[idx] @ x[idx].T, y[idx] @ y[idx].T
    same = idx[:, None] == idx[None, :]
    K[same], L[same], n = 0, 0, len(idx)
    expanded = ((K * L).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * (K.sum(0) @ L.sum(1)) / (n - 2)) / (n * (n - 3))
    assert float(weighted_hsic(sums, w)) == pytest.approx(float(expanded), rel=1e-10)
    # the CKA over every voxel is linear_cka without minibatches
    xx, yy = patch_sums(x, x, patch, 8), patch_sums(y, y, patch, 8)
    assert float(cka_from_sums(sums, xx, yy, torch.ones(1, 8))) == pytest.approx(linear_cka(x, y), rel=1e-10)


def test_bootstrap_resamples_patches_within_each_stratum_and_is_seeded():
    strata = torch.arange(10) % 2
    w = bootstrap_weights(10, 200, strata, seed=3)
    assert w.shape == (200, 10) and torch.equal(w, bootstrap_weights(10, 200, strata, seed=3))
    assert (w[:, 0::2].sum(1) == 5).all() and (w[:, 1::2].sum(1) == 5).all()  # 5 of each kind every time
    assert not torch.equal(w, bootstrap_weights(10, 200, strata, seed=4))


def test_unique_voxels_count_a_coarse_maps_voxel_once():
    coarse = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # 4 voxels a map
    positions = torch.rand(2, 50, 2, generator=torch.Generator().manual_seed(0))  # 50 places fall on 4 voxels
    features, owner = unique_voxels(coarse, positions)
    assert features.shape == (8, 3) and owner.tolist() == [0] * 4 + [1] * 4


def test_the_interval_covers_the_probe_and_narrows_with_more_patches():
    torch.manual_seed(0)
    source, other = build_model(num_classes=2), build_model(num_classes=2)
    subjects = [Volume(s) for s in range(4)]
    widths = {}
    for n in (8, 32):
        probe = LayerProbe(source, probe_patches(subjects, (12, 12, 12), n=n), torch.device("cpu"), minibatch=8,
                           voxels_per_patch=64, strata=torch.arange(n) % 2)
        values = probe.cka(other)
        for g in ("conv_0", "res_3"):
            assert values[f"cka_low.{g}"] <= values[f"cka.{g}"] <= values[f"cka_high.{g}"]
        widths[n] = values["cka_high.res_3"] - values["cka_low.res_3"]
        itself = probe.cka(source)
        assert itself["cka_low.res_3"] == pytest.approx(1.0, abs=1e-6)  # every resample of a copy is a copy
    assert widths[32] < 0.75 * widths[8], widths


def test_probe_voxels_are_the_same_places_at_any_resolution():
    fine = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # (B, C, H, W)
    positions = torch.tensor([[[0.0, 0.0], [0.5, 0.75]], [[0.99, 0.3], [0.25, 0.0]]])
    picked, owner = unique_voxels(fine, positions)
    assert picked.shape == (4, 3) and owner.tolist() == [0, 0, 1, 1]
    assert picked[1].tolist() == fine[0, :, 2, 3].tolist() and picked[3].tolist() == fine[1, :, 3, 1].tolist()
    coarse = fine[:, :, ::2, ::2]  # half the resolution: the same fractions, the matching coarse cells
    assert unique_voxels(coarse, positions)[0][1].tolist() == coarse[0, :, 1, 1].tolist()


def source_state(num_classes=2, seed=1):
    torch.manual_seed(seed)
    src = build_model(num_classes=num_classes)
    with torch.no_grad():  # distinctive statistics per tensor
        for i, p in enumerate(src.parameters()):
            p.mul_(1 + 0.2 * (i % 3))
    return {k: v.clone() for k, v in src.state_dict().items()}


def test_mean_var_keeps_each_tensors_statistics_but_none_of_its_features():
    state = source_state(num_classes=3)
    model = build_model(num_classes=2)
    default_bn = {k: v.clone() for k, v in model.state_dict().items() if ".adn.N." in k}
    report = mean_var_init(model, state, seed=0, source="models:/ixi/1")
    after = model.state_dict()
    assert report.sampled and not report.loaded
    assert sorted(report.reinitialised) == ["blocks.11.conv.bias", "blocks.11.conv.weight"]  # 3 -> 2 classes
    for key in report.sampled:
        src, new = state[key].double(), after[key].double()
        if src.numel() >= 400:
            assert float(new.mean()) == pytest.approx(float(src.mean()), abs=0.15 * float(src.std()) + 1e-6)
            assert float(new.std()) == pytest.approx(float(src.std()), rel=0.15)
        assert not torch.allclose(src, new)  # drawn, not copied
    for key, value in default_bn.items():  # BatchNorm at its default initialisation, never sampled
        assert torch.equal(after[key], value)
    again = build_model(num_classes=2)
    mean_var_init(again, state, seed=0)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in report.sampled)  # seeded
    third = build_model(num_classes=2)
    mean_var_init(third, state, seed=1)
    assert not torch.equal(after["blocks.0.conv.weight"], third.state_dict()["blocks.0.conv.weight"])


def test_mean_var_start_shares_less_with_the_source_than_the_transferred_start():
    state = source_state(num_classes=2)
    source = build_model(num_classes=2)
    source.load_state_dict(state)
    transferred, control = build_model(num_classes=2), build_model(num_classes=2)
    load_source(transferred, state)
    mean_var_init(control, state, seed=0)
    patches = probe_patches([Volume(5), Volume(6)], (12, 12, 12), n=8)
    probe = LayerProbe(source, patches, torch.device("cpu"), minibatch=4)
    same, meanvar = probe.cka(transferred), probe.cka(control)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.values())
    assert max(v for k, v in meanvar.items() if k.startswith("cka.")) < 0.9, meanvar


def test_the_reports_group_order_is_the_networks():
    from tlcore.config import TrialConfig
    from tlcore.models.networks import build_network
    from tlcore.report.summary import GROUP_ORDER

    networks = [build_network(TrialConfig(dataset="brats"), 2), build_network(TrialConfig(dataset="mura"), 2)]
    assert GROUP_ORDER == tuple(g for net in networks for g in layer_groups(net))
