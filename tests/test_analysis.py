"""Tests for stas_core.analysis (temporal similarity, I-SPS vs vanilla SPS) and stas-analyze.

The model tests use a tiny calibrated Spikformer (BN running stats from a few train-mode
passes; with init stats every neuron is silent in eval mode and all tokens would be zero).
The CLI tests train a one-epoch checkpoint on a Fashion-MNIST subset (seconds).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from stas_core.analysis import (plot_similarity, similarity_report, sps_variants,
                                temporal_similarity, token_similarity)
from stas_core.errors import ConfigError, DataError
from stas_core.models import create_model

from helpers import calibrate_bn, missing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def images(b=8, seed=1):
    return torch.rand((b, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def calibrated(sps="integrated", timesteps=3, seed=0):
    torch.manual_seed(seed)
    model = create_model("spikformer-1-32", img_size=28, in_chans=1, num_classes=10,
                         timesteps=timesteps, sps=sps)
    return calibrate_bn(model, [images(8, seed=100 + i) for i in range(3)])


def loader(n=12, b=8):
    x = images(n)
    return [(x[i:i + b], torch.zeros(min(b, n - i), dtype=torch.long)) for i in range(0, n, b)]


# ----------------------------------------------------------------------------- library
def test_token_similarity_conventions():
    a = torch.tensor([[0., 0.], [1., 0.], [0., 0.], [1., 1.], [2., 0.], [0.3, 0.7]])
    b = torch.tensor([[0., 0.], [0., 0.], [1., 0.], [1., 0.], [1., 0.], [0.3, 0.7]])
    s = token_similarity(a, b)
    assert s.tolist()[:3] == [1.0, 0.0, 0.0]  # both zero: 1, exactly one zero: 0
    assert s[3].item() == pytest.approx(1 / math.sqrt(2))
    assert s[4].item() == pytest.approx(1.0)
    assert s[5].item() == 1.0  # identical vectors: exactly 1
    with pytest.raises(ConfigError):
        token_similarity(a, b[:2])


def test_integrated_first_block_identical_vanilla_not():
    res_i = temporal_similarity(calibrated("integrated"), loader(), "cpu")
    res_v = temporal_similarity(calibrated("vanilla"), loader(), "cpu")
    for res in (res_i, res_v):
        assert res["timesteps"] == 3 and res["images"] == 12
        assert len(res["per_block"]) == 1
        assert all(0.0 <= v <= 1.0 for v in res["per_block"] + [res["output"]])
    assert res_i["per_block"][0] == 1.0
    assert res_v["per_block"][0] < 1.0
    # the blocks' own neurons still evolve over time, so the output need not be identical
    assert res_i["output"] > res_v["output"]


def test_max_images_and_bare_tensor_loader():
    x = images(10)
    res = temporal_similarity(calibrated("vanilla"), [x[:4], x[4:8], x[8:]], "cpu", max_images=6)
    assert res["images"] == 6


def test_needs_two_timesteps_and_images():
    with pytest.raises(ConfigError, match="timesteps >= 2"):
        temporal_similarity(calibrated(timesteps=1), loader(), "cpu")
    with pytest.raises(ConfigError, match="no images"):
        temporal_similarity(calibrated(), [], "cpu")


def test_report_of_models_and_plot(tmp_path):
    van, isps = calibrated("vanilla"), calibrated("integrated")
    isps.load_state_dict(van.state_dict())  # same weights, two SPS modes
    rep = similarity_report({"vanilla": van, "integrated": isps}, loader(), max_images=8)
    assert rep["images"] == 8 and set(rep["runs"]) == {"vanilla", "integrated"}
    assert rep["runs"]["integrated"]["per_block"][0] == 1.0
    assert rep["runs"]["vanilla"]["per_block"][0] < 1.0
    assert rep["runs"]["vanilla"]["sps"] == "vanilla"
    png = plot_similarity(rep, tmp_path / "s.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no temp file left
    assert sps_variants("x.safetensors") == {"vanilla": ("x.safetensors", {"sps": "vanilla"}),
                                            "integrated": ("x.safetensors", {"sps": "integrated"})}


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from stas_core.data import load_fashion_mnist
    from stas_core.train import TrainConfig, train

    try:
        load_fashion_mnist(download=False)
    except DataError as exc:
        missing(f"Fashion-MNIST not available offline (apt-get install "
                    f"dataset-fashion-mnist or set STAS_FASHION_MNIST_DIR): {exc}")
    out = tmp_path_factory.mktemp("run")
    summary = train(TrainConfig(model="spikformer-1-32", train_subset=64, val_subset=32, epochs=1,
                                batch_size=32, timesteps=2, out=str(out), progress=False,
                                energy_images=16, device="cpu"))
    return summary["checkpoint"]


def test_cli_compare_sps(checkpoint, tmp_path, capsys):
    from stas_core.cli.analyze import main

    out = tmp_path / "an"
    rc = main(["similarity", "--checkpoint", checkpoint, "--compare-sps", "--images", "16",
               "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "similarity.json").read_text())
    assert printed == saved
    assert saved["dataset"] == "fashion-mnist" and saved["images"] == 16
    runs = saved["runs"]
    assert set(runs) == {"vanilla", "integrated"}
    assert runs["integrated"]["per_block"][0] == 1.0
    assert runs["vanilla"]["per_block"][0] <= 1.0
    for r in runs.values():
        assert r["timesteps"] == 2 and r["checkpoint"] == checkpoint
        assert all(0.0 <= v <= 1.0 for v in r["silent_per_block"] + [r["silent_output"]])
        assert all(0.0 <= v <= 1.0 for v in r["per_block"] + [r["output"]])
    assert (out / "similarity.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == ["similarity.json", "similarity.png"]


@pytest.fixture(scope="module")
def calibrated_checkpoint(checkpoint, tmp_path_factory):
    """The quick checkpoint with settled BN statistics (one epoch on 64 images leaves them
    near init, so nothing fires in eval mode and every similarity is a trivial 1.0)."""
    from stas_core.checkpoint import load_checkpoint, save_checkpoint
    from stas_core.data import build_datasets
    from stas_core.train import load_trained_model

    model, _ = load_trained_model(checkpoint)
    _, val, _ = build_datasets("fashion-mnist", val_subset=64, seed=1, augment=False)
    x = torch.stack([val[i][0] for i in range(len(val))])
    calibrate_bn(model, x.split(32))
    state = load_checkpoint(checkpoint)
    state["model"] = model.state_dict()
    path = tmp_path_factory.mktemp("calibrated") / "last.safetensors"
    save_checkpoint(path, state)
    return str(path)


def test_cli_compare_sps_firing_model(calibrated_checkpoint, tmp_path, capsys):
    from stas_core.cli.analyze import main

    rc = main(["similarity", "--checkpoint", calibrated_checkpoint, "--compare-sps", "-T", "3",
               "--images", "16", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "similarity.json").read_text())["runs"]
    van, isps = runs["vanilla"], runs["integrated"]
    assert van["silent_per_block"][0] < 0.99  # the tokens do fire
    assert isps["per_block"][0] == 1.0
    assert van["per_block"][0] < 1.0
    assert isps["output"] >= van["output"]


def test_cli_labelled_checkpoints(checkpoint, tmp_path, capsys):
    from stas_core.cli.analyze import main

    rc = main(["similarity", "--checkpoints", f"a={checkpoint}", f"b={checkpoint}",
               "--images", "8", "--timesteps", "3", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "similarity.json").read_text())["runs"]
    assert set(runs) == {"a", "b"} and runs["a"] == runs["b"]
    assert runs["a"]["timesteps"] == 3


def test_cli_missing_checkpoint(tmp_path, capsys):
    from stas_core.cli.analyze import main

    missing = tmp_path / "nope.safetensors"
    rc = main(["similarity", "--checkpoint", str(missing), "--compare-sps",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "checkpoint not found" in err and str(missing) in err
    assert not (tmp_path / "o").exists()


def test_cli_user_errors(tmp_path, capsys):
    from stas_core.cli.analyze import main

    rc = main(["similarity", "--checkpoints", "x.safetensors", "--compare-sps"])
    assert rc == 2 and "--compare-sps needs --checkpoint" in capsys.readouterr().err
    rc = main(["similarity", "--checkpoint", "x.safetensors", "--images", "0"])
    assert rc == 2 and "--images must be an integer >= 1" in capsys.readouterr().err
