"""The evaluation protocol: splits, hull, early exit, paired intervals, provenance."""
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from halting import HaltingConfig, run_halting
from stas_core.baselines import (AnytimeRun, choose_combination_threshold, collect_anytime,
                                 early_exit, fewer_timesteps, halting_baselines, hull_mixture,
                                 load_runs, upper_hull, versus_curve)
from stas_core.evaluate import against_baseline
from stas_core.models import create_model
from stas_core.provenance import provenance, save_predictions
from stas_core.stats import mcnemar_exact, paired_bootstrap, seed_interval

from helpers import calibrate_bn, needs_fmnist, tiny_converted_vit


# ------------------------------------------------------------------------------ the hull
def test_upper_hull_drops_points_under_the_chord_and_past_the_best():
    # (2, .6) lies under the chord (1, .5) -> (3, .8), which reads .65 at 2; (4, .8) buys nothing
    assert upper_hull([1, 2, 3, 4], [0.5, 0.6, 0.8, 0.8]) == [0, 2]
    assert upper_hull([1, 2, 3], [0.5, 0.7, 0.8]) == [0, 1, 2]  # concave: all stay
    assert upper_hull([3, 1, 2], [0.8, 0.5, 0.7]) == [1, 2, 0]  # unsorted input
    assert upper_hull([1, 2], [0.9, 0.5]) == [0]  # the dearer point is worse


def test_hull_mixture_mixes_two_timesteps_at_the_budget():
    assert hull_mixture([1, 2, 3], [0.5, 0.6, 0.8], 2.0) == [(0, 0.5), (2, 0.5)]
    assert hull_mixture([1, 2, 3], [0.5, 0.6, 0.8], 0.5) is None
    assert hull_mixture([1, 2, 3], [0.5, 0.6, 0.8], 9.0) == [(2, 1.0)]


def test_against_baseline_keeps_the_step_and_adds_the_hull():
    curve = {"top1": [0.5, 0.6, 0.8], "energy_mj": [1.0, 2.0, 3.0]}
    r = against_baseline(0.62, 2.0, curve)
    assert r["top1_gain_at_equal_energy"] == pytest.approx(0.02)  # against t = 2's 0.60
    assert r["top1_gain_vs_hull"] == pytest.approx(-0.03)           # against the mix's 0.65
    assert r["beats_baseline"] is True and r["beats_hull"] is False


# ----------------------------------------------------------------------------- early exit
def _run():
    # 3 images, T = 2; image 1 is wrong at t = 1 only; image 0 is confident at t = 1
    labels = np.array([0, 1, 2])
    pred = np.array([[0, 0, 2], [0, 1, 2]])
    conf = np.array([[0.95, 0.6, 0.5], [0.97, 0.9, 0.8]])
    return AnytimeRun(labels, pred, conf, np.array([1.0, 3.0]), np.array([10.0, 20.0]))


def test_the_default_early_exit_sweep_spans_t1_to_T():
    """The default thresholds reach both ends of the fewer-timesteps curve: every image
    stopped after t = 1 (so a halted point as cheap as t = 1 is compared, not skipped)
    and, for confident-but-not-certain images, every image run to T."""
    from stas_core.baselines import DEFAULT_THRESHOLDS

    run = _run()
    ee = early_exit(run)
    assert ee.energy["conventional"].min() == 1.0 and ee.mean_timesteps.min() == 1.0
    assert ee.energy["conventional"].max() == 3.0 and ee.mean_timesteps.max() == 2.0
    assert DEFAULT_THRESHOLDS[0] == 0.0 and list(DEFAULT_THRESHOLDS) == sorted(DEFAULT_THRESHOLDS)


def test_early_exit_hand_counted():
    ee = early_exit(_run(), thresholds=[0.0, 0.9, 1.1])
    # 0.0: all stop at t = 1 (2 of 3 right); 0.9: image 0 at t = 1, the others at T
    # (all right); 1.1: none clears, all run T (all right)
    assert ee.top1.tolist() == pytest.approx([2 / 3, 1.0, 1.0])
    assert ee.correct[1].tolist() == [1.0, 1.0, 1.0]
    assert ee.mean_timesteps.tolist() == pytest.approx([1.0, 5 / 3, 2.0])
    assert ee.energy["conventional"].tolist() == pytest.approx([1.0, 7 / 3, 3.0])
    assert ee.energy["full"].tolist() == pytest.approx([10.0, 50 / 3, 20.0])


def test_versus_curve_is_paired_against_the_mixture():
    run = _run()
    ft = fewer_timesteps(run)
    # at energy 2: half t = 1, half t = 2: expected correctness (1, .5, 1) per image
    r = versus_curve(np.array([1.0, 1.0, 1.0]), 2.0, ft, "conventional", resamples=200)
    assert r["curve_top1_at_energy"] == pytest.approx(5 / 6)
    assert r["difference"] == pytest.approx(1 / 6)
    assert [m["param"] for m in r["mixture"]] == [1, 2]
    assert versus_curve(np.ones(3), 0.5, ft, "conventional")["difference"] is None


def test_combination_threshold_is_the_one_that_beats_both_parts_most():
    run = _run()  # image 0 confident at t = 1; all right at t = 2
    unhalted = AnytimeRun(run.labels, run.pred, run.confidence, np.array([0.6, 1.2]),
                          np.array([6.0, 12.0]))
    halted = AnytimeRun(run.labels, run.pred, run.confidence, np.array([0.5, 1.0]),
                        np.array([5.0, 10.0]))
    # 0.0: everything at t = 1, cheaper than early exit's cheapest point (not comparable);
    # 0.9: all right at 0.833 mJ, above token halting's hull (0.889) and early exit's
    # (0.861); 1.1: the halted model at T, level with both
    assert choose_combination_threshold(unhalted, halted, thresholds=[0.0, 0.9, 1.1]) == 0.9
    rep = halting_baselines(unhalted, halted, thresholds=[0.0, 0.9, 1.1], resamples=100,
                            combination_threshold=0.9)
    chosen = rep["combination"]["conventional"]["chosen"]
    assert chosen["top1"] == 1.0 and chosen["energy_mj"] == pytest.approx(2.5 / 3)
    assert chosen["vs_token_halting"]["difference"] == pytest.approx(1 - (2 / 3 + 2 / 9))
    assert set(k for k in chosen if k.startswith("vs_")) == {
        "vs_early_exit", "vs_token_halting", "vs_fewer_timesteps"}


# ---------------------------------------------------------------------------- statistics
def test_paired_bootstrap_of_a_constant_difference_has_no_width():
    r = paired_bootstrap([1.0] * 50, [0.0] * 50, resamples=100)
    assert r["difference"] == 1.0 and r["ci95"] == [1.0, 1.0] and r["excludes_zero"]


def test_paired_bootstrap_interval_covers_a_noisy_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 400).astype(float)
    r = paired_bootstrap(a, rng.permutation(a), resamples=500)
    assert r["ci95"][0] < 0 < r["ci95"][1] and not r["excludes_zero"]
    # about the normal interval's width: 2 * 1.96 * sd(d) / sqrt(n), sd(d) about 0.7 here
    assert r["ci95"][1] - r["ci95"][0] == pytest.approx(2 * 1.96 * 0.7 / 20, rel=0.3)


def test_mcnemar_exact_hand_counted():
    a = [True] * 5 + [False] * 3
    b = [False] * 5 + [False] * 3
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (5, 0)
    assert r["p_value"] == pytest.approx(2 / 32)  # two-sided binomial(5, 1/2), k = 0
    assert mcnemar_exact([True], [True])["p_value"] == 1.0


def test_seed_interval_student_t():
    r = seed_interval([1.0, 2.0, 3.0])
    assert r["difference"] == 2.0
    assert r["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])
    assert seed_interval([1.0]) is None


# ------------------------------------------------------------------- anytime and collected
def _spikformer(timesteps=3):
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    return calibrate_bn(create_model("spikformer-1-32", img_size=28, in_chans=1,
                                     timesteps=timesteps), x), x


@pytest.mark.parametrize("accumulate", ["both", "time", "block"])
def test_anytime_last_entry_is_the_answer_and_t1_stops_every_token(accumulate):
    model, x = _spikformer()
    cfg = HaltingConfig(alpha=1.0, beta=-1.0, eps=0.05, accumulate=accumulate)
    with torch.no_grad():
        res = run_halting(model, x, cfg, anytime=True)
        short = run_halting(model, x, cfg, timesteps=1)
    assert res.logits_per_t.shape == (3, 6, 10)
    torch.testing.assert_close(res.logits_per_t[-1], res.logits)
    if accumulate != "time":  # one timestep: its forced end is where the anytime readout stops
        torch.testing.assert_close(res.logits_per_t[0], short.logits)


def test_anytime_on_a_converted_vit_is_the_running_mean_of_the_readout():
    snn, x = tiny_converted_vit(images=3, timesteps=3)
    cfg = HaltingConfig(alpha=2.0, beta=-4.0, score="convergence")
    with torch.no_grad():
        res = run_halting(snn, x, cfg, anytime=True)
        short = run_halting(snn, x, cfg, timesteps=2)
    torch.testing.assert_close(res.logits_per_t[-1], res.logits)
    torch.testing.assert_close(res.logits_per_t[1], short.logits)  # 'last': no forced end


def test_halting_baselines_end_to_end_on_a_tiny_model(tmp_path):
    model, x = _spikformer()
    loader = DataLoader(TensorDataset(x, torch.arange(6) % 10), batch_size=3)
    unhalted = collect_anytime(model, loader, torch.device("cpu"), energy_images=6)
    halted = collect_anytime(model, loader, torch.device("cpu"), energy_images=6,
                             halting=HaltingConfig(alpha=1.0, beta=0.0, eps=0.05))
    assert unhalted.pred.shape == (3, 6) and np.all(np.diff(unhalted.energy_mj) > 0)
    assert halted.energy_mj[-1] < unhalted.energy_mj[-1]  # halted tokens cost nothing
    rep = halting_baselines(unhalted, halted, thresholds=[0.2, 0.5, 2.0], resamples=100)
    assert rep["images"] == 6
    assert set(rep["curves"]) == {"fewer_timesteps", "early_exit", "token_halting",
                                  "token_halting+early_exit"}
    ee = rep["curves"]["early_exit"]["points"]
    assert ee[-1]["energy_mj"] == pytest.approx(unhalted.energy_mj[-1])  # nobody exits
    for ledger in ("conventional", "full"):
        assert set(rep["vs"][ledger]) == {"fewer_timesteps", "early_exit"}
        assert len(rep["combination"][ledger]["points"]) == 3
    json.dumps(rep)  # a results file
    saved = save_predictions(tmp_path / "p.npz", unhalted.labels,
                             {"unhalted": unhalted, "halted": halted})
    back = np.load(tmp_path / "p.npz")
    assert (back["halted.pred"] == halted.pred).all() and len(saved["sha256"]) == 64
    again = load_runs(tmp_path / "p.npz")
    assert set(again) == {"unhalted", "halted"} and again["unhalted"].depth is None
    assert (again["halted"].correct == halted.correct).all()
    assert np.allclose(again["halted"].energy_mj, halted.energy_mj)
    assert again["halted"].depth.shape == halted.depth.shape


# -------------------------------------------------------------------- splits, provenance
@needs_fmnist
def test_validation_is_held_out_of_training_and_test_images_do_not_follow_the_seed():
    from stas_core.data import build_datasets, split_record

    tr0, val0, _ = build_datasets("fashion-mnist", split="val", val_subset=300, seed=0,
                                  augment=False)
    tr1, val1, _ = build_datasets("fashion-mnist", split="val", val_subset=300, seed=1,
                                  augment=False)
    _, te0, _ = build_datasets("fashion-mnist", val_subset=300, seed=0)
    _, te1, _ = build_datasets("fashion-mnist", val_subset=300, seed=7)
    assert split_record(val0) == split_record(val1)  # the same images for every seed
    assert split_record(te0) == split_record(te1)
    assert split_record(te0)["split"] == "test" and split_record(val0)["source"] == "train"
    from stas_core.data import _base_indices
    assert not set(_base_indices(val0)) & set(_base_indices(tr0))  # never trained on
    assert len(tr0) == 60000 - 5000
    x_val, y_val = val0[0]
    assert x_val.shape == (1, 28, 28)


def test_provenance_names_commit_command_versions_and_images(tmp_path):
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(b"weights")
    images = {"dataset": "fashion-mnist", "split": "test", "images": 3, "indices_sha256": "x"}
    p = provenance(seeds=[0, 1], checkpoints=[ck], images={"test": images},
                   command=["stas-convert", "vit_small"], chose="val", reported="test")
    import hashlib
    assert p["checkpoints"] == [{"name": "model.safetensors",
                                 "sha256": hashlib.sha256(b"weights").hexdigest()}]
    assert str(tmp_path) not in json.dumps(p)  # no path of this machine
    assert p["versions"]["torch"] == torch.__version__
    assert p["seeds"] == [0, 1] and p["chose_on"] == "val" and p["reported_on"] == "test"
    assert "commit" in p and "dirty" in p and p["cpu"]
