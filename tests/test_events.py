"""Event input: the simulated event set, the tonic-format loaders, training on events."""
import math

import numpy as np
import pytest
import torch

from stas_core.data import build_datasets, get_dataset_info, load_fashion_mnist
from stas_core.errors import ConfigError, DataError
from stas_core.events import (EVENT_DTYPE, EventFrames, SaccadeDVS, dvs_events,
                              load_event_dataset, load_fashion_mnist_dvs, to_tonic)

from helpers import needs_fmnist  # skips without the IDX files; fails under CI=true

DARK, BRIGHT = 0.0, 1.0
PIX = dict(threshold=0.3, log_offset=0.05)  # log(1.05) - log(0.05) = 3.04 >= 0.3


def _views(*frames):
    return [np.asarray(f, dtype=np.float32)[None] for f in frames]  # [B=1, H, W] each


# --------------------------------------------------------------------------- pixel model
def test_hand_counted_events_of_a_moving_bright_pixel():
    # 3x3 sensor, one bright pixel at (x=0, y=1) moves to (x=1, y=1) at t=10 ms and stays
    # there at t=20 ms. By hand: at t=10 ms pixel (0, 1) goes bright -> dark: one OFF
    # event; pixel (1, 1) goes dark -> bright: one ON event; nothing else changes. At
    # t=20 ms no pixel changes: no event. Total 2 events: OFF (0, 1), ON (1, 1), both 10 ms.
    a = np.zeros((3, 3)); a[1, 0] = BRIGHT
    b = np.zeros((3, 3)); b[1, 1] = BRIGHT
    bb, x, y, t, p = dvs_events(_views(a, b, b), [0, 10_000, 20_000], refractory_us=0, **PIX)
    got = sorted(zip(x.tolist(), y.tolist(), t.tolist(), p.tolist()))
    assert got == [(0, 1, 10_000, False), (1, 1, 10_000, True)]
    assert bb.tolist() == [0, 0]


def test_refractory_period_is_respected():
    # one pixel flickers dark, bright, dark, bright, dark at 0, 10, 20, 30, 40 ms.
    # No refractory period: ON 10, OFF 20, ON 30, OFF 40 (4 events).
    # Refractory 15 ms: ON at 10; at 20 only 10 ms have passed (blocked, reference stays
    # bright); at 30 the pixel is bright again = its reference (no change); at 40 it is
    # dark, 30 ms after its last event: OFF. So ON 10, OFF 40 (2 events).
    seq = _views(*[[[BRIGHT if k % 2 else DARK]] for k in range(5)])
    times = [0, 10_000, 20_000, 30_000, 40_000]
    _, _, _, t, p = dvs_events(seq, times, refractory_us=0, **PIX)
    assert list(zip(t.tolist(), p.tolist())) == [(10_000, True), (20_000, False),
                                                 (30_000, True), (40_000, False)]
    _, _, _, t, p = dvs_events(seq, times, refractory_us=15_000, **PIX)
    assert list(zip(t.tolist(), p.tolist())) == [(10_000, True), (40_000, False)]


def test_contrast_threshold_is_respected():
    # log intensity rises by 0.2 per step, threshold 0.3: the change since the reference
    # is 0.2 (none), 0.4 (ON, reset), 0.2 (none), 0.4 (ON): events at steps 2 and 4 only.
    levels = np.log(0.2) + 0.2 * np.arange(5)
    seq = _views(*[[[math.exp(v) - 0.05]] for v in levels])
    _, _, _, t, p = dvs_events(seq, [0, 1, 2, 3, 4], refractory_us=0, **PIX)
    assert t.tolist() == [2, 4] and p.all()
    # just below the threshold everywhere: no event at all
    seq = _views(*[[[math.exp(np.log(0.2) + 0.29 * k) - 0.05]] for k in range(2)])
    assert len(dvs_events(seq, [0, 1], refractory_us=0, **PIX)[0]) == 0


def test_generator_is_deterministic_and_seeded():
    rng = np.random.default_rng(0)
    images = (rng.random((5, 28, 28)) * 255).astype(np.uint8)
    a, off_a = SaccadeDVS(noise_hz=5.0, seed=1).simulate(images)
    b, off_b = SaccadeDVS(noise_hz=5.0, seed=1).simulate(images)
    c, _ = SaccadeDVS(noise_hz=5.0, seed=2).simulate(images)
    assert np.array_equal(a, b) and np.array_equal(off_a, off_b)
    assert not (len(a) == len(c) and np.array_equal(a, c))
    # noise is seeded per image: generating image 3 alone gives its events unchanged
    alone, _ = SaccadeDVS(noise_hz=5.0, seed=1).simulate(images[3:4], first_index=3)
    assert np.array_equal(alone, a[off_a[3]:off_a[4]])
    # without noise the seed does not matter
    n1, _ = SaccadeDVS(seed=1).simulate(images)
    n2, _ = SaccadeDVS(seed=2).simulate(images)
    assert np.array_equal(n1, n2)
    # events of one image are time-sorted, inside the sensor and the recording
    sim = SaccadeDVS()
    ev = a[off_a[0]:off_a[1]]
    assert np.all(np.diff(ev["t"].astype(np.int64)) >= 0)
    assert ev["x"].max() < 28 and ev["y"].max() < 28 and ev["t"].max() <= sim.duration_us


def test_saccades_trace_a_closed_triangle():
    pos = SaccadeDVS(amplitude=2.0, steps_per_saccade=4).positions()
    assert pos.shape == (13, 2)
    assert np.allclose(pos[0], pos[-1])  # back where it started
    assert np.allclose(np.ptp(pos, 0), [2.0, 2.0])


def test_bad_generator_options_name_the_rule():
    with pytest.raises(ConfigError, match=r"threshold must be > 0.*got 0"):
        SaccadeDVS(threshold=0)
    with pytest.raises(ConfigError, match=r"refractory_us must be >= 0; got -1"):
        SaccadeDVS(refractory_us=-1)


def test_frames_count_events_per_bin_and_polarity():
    ev = np.zeros(3, dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = [0, 0, 2], [1, 1, 0], [10, 20, 70], [1, 1, 0]
    ds = EventFrames(lambda i: ev, [7], sensor_size=(3, 3, 2), frames=2, duration_us=100)
    x, y = ds[0]
    assert x.shape == (2, 2, 3, 3) and y == 7
    counts = torch.expm1(x).round()
    assert counts[0, 1, 1, 0] == 2 and counts[1, 0, 0, 2] == 1 and counts.sum() == 3


# --------------------------------------------------------------------------- the cache
@needs_fmnist
def test_fashion_mnist_dvs_cache_is_reused_and_regenerated(tmp_path, monkeypatch):
    import stas_core.events as D  # the event sets read Fashion-MNIST through it

    (xt, yt), (xv, yv) = load_fashion_mnist(download=False)
    small = ((xt[:30], yt[:30]), (xv[:20], yv[:20]))
    monkeypatch.setattr(D, "load_fashion_mnist", lambda *a, **k: small)
    calls = []
    import stas_core.events as E

    real = E._generate
    monkeypatch.setattr(E, "_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    sim = SaccadeDVS(steps_per_saccade=3)
    first = load_fashion_mnist_dvs(tmp_path, sim=sim, progress=False)
    assert len(calls) == 2 and len(first["train"][1]) == 31 and len(first["val"][2]) == 20
    again = load_fashion_mnist_dvs(tmp_path, sim=sim, progress=False)
    assert len(calls) == 2  # read back, not regenerated
    assert np.array_equal(again["train"][0], first["train"][0])
    other = load_fashion_mnist_dvs(tmp_path, sim=SaccadeDVS(steps_per_saccade=3, threshold=0.5),
                                   progress=False)
    assert len(calls) == 4  # a changed parameter regenerates
    assert len(other["train"][0]) < len(first["train"][0])
    assert not list((tmp_path / "fashion-mnist-dvs").glob(".*.tmp"))  # no leftovers


@needs_fmnist
def test_fashion_mnist_dvs_dataset_shapes(tmp_path, monkeypatch):
    import stas_core.events as D  # the event sets read Fashion-MNIST through it

    (xt, yt), (xv, yv) = load_fashion_mnist(download=False)
    monkeypatch.setattr(D, "load_fashion_mnist",
                        lambda *a, **k: ((xt[:40], yt[:40]), (xv[:10], yv[:10])))
    train, val, info = build_datasets("fashion-mnist-dvs", data_dir=tmp_path, frames=3,
                                      train_subset=16)
    x, y = train[0]
    assert info.events and info.in_chans == 2 and info.img_size == 28
    assert x.shape == (3, 2, 28, 28) and x.dtype == torch.float32 and x.sum() > 0
    assert len(train) == 16 and len(val) == 10


# --------------------------------------------------------------------------- recorded sets
def _nmnist_bin(path, events):
    """N-MNIST's 5-byte events: x, y, polarity bit 7 + time bits 22..16, time 15..8, 7..0."""
    raw = bytearray()
    for x, y, t, p in events:
        raw += bytes([x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(raw))


def test_nmnist_loader_reads_the_extracted_layout(tmp_path):
    for split, per in (("Train", 3), ("Test", 2)):
        for digit in range(10):
            for i in range(per):
                _nmnist_bin(tmp_path / "NMNIST" / split / str(digit) / f"{i:05d}.bin",
                            [(33, 0, 1000, 1), (5, 6, 150_000, 0), (digit, digit, 290_000, 1)])
    train, test = load_event_dataset("nmnist", tmp_path, frames=3, size=32)
    assert (len(train), len(test)) == (30, 20)
    x, y = train[7]  # sorted: digit 2, third file
    assert y == 2 and x.shape == (3, 2, 32, 32)
    counts = torch.expm1(x).round()
    # the event at x=33 falls outside the 32x32 centre crop; (5, 6) -> (4, 5) after it. The
    # 3 frames split the span of what is left, 150..290 ms: the first and the last frame
    assert counts.sum() == 2 and counts[0, 0, 5, 4] == 1 and counts[2, 1, 1, 1] == 1
    assert sorted(set(train.targets)) == list(range(10))
    _, _, info = build_datasets("nmnist", data_dir=tmp_path, frames=2, download=False)
    assert (info.in_chans, info.img_size, info.num_classes) == (2, 32, 10)


def test_dvs_gesture_loader_reads_tonic_npy_layout(tmp_path):
    # tonic's preprocessed release: ibmGesture{Train,Test}/user<NN>_<lighting>/<label>.npy,
    # [N, 4] arrays of x, y, p, t (ms)
    for folder, users in (("ibmGestureTrain", (1, 2)), ("ibmGestureTest", (24,))):
        for u in users:
            d = tmp_path / "DVSGesture" / folder / f"user{u:02d}_fluorescent"
            d.mkdir(parents=True)
            for label in range(11):
                np.save(d / f"{label}.npy", np.array([[0, 0, 1, 0], [127, 127, 0, 5],
                                                      [64, 2, 1, 9]], dtype=np.int64))
    train, test = load_event_dataset("dvs-gesture", tmp_path, frames=2, size=64)
    assert (len(train), len(test)) == (22, 11)
    x, y = test[3]
    assert x.shape == (2, 2, 64, 64) and y == test.targets[3]
    assert sorted(set(train.targets)) == list(range(11))
    counts = torch.expm1(x).round()
    assert counts.sum() == 3 and counts[1, 0, 63, 63] == 1 and counts[1, 1, 1, 32] == 1
    assert train.read(0)["t"].tolist() == [0, 5000, 9000]  # tonic's ms -> us
    full, _ = load_event_dataset("dvs-gesture", tmp_path, frames=2)
    assert full[0][0].shape == (2, 2, 128, 128)


def test_cifar10_dvs_split_is_seeded_per_class(tmp_path, monkeypatch):
    # The .aedat4 files are decoded by tonic's read_aedat4 (the aedat package, not
    # installed here): the layout, split and framing are checked with a stand-in decoder.
    import tonic.io

    from stas_core.events import CIFAR10DVS_CLASSES

    for cls in CIFAR10DVS_CLASSES:
        d = tmp_path / "CIFAR10DVS" / cls
        d.mkdir(parents=True)
        for i in range(20):
            (d / f"cifar10_{cls}_{i}.aedat4").write_bytes(b"")
    ev = np.zeros(2, dtype=[("t", np.int64), ("x", np.int16), ("y", np.int16), ("on", bool)])
    ev["t"], ev["x"], ev["y"], ev["on"] = [0, 100], [10, 127], [3, 0], [True, False]
    monkeypatch.setattr(tonic.io, "read_aedat4", lambda path: ev.copy())
    train, test = load_event_dataset("cifar10-dvs", tmp_path, frames=2, size=64, seed=0)
    assert (len(train), len(test)) == (180, 20)
    assert [test.targets.count(c) for c in range(10)] == [2] * 10
    x, _ = train[0]
    assert x.shape == (2, 2, 64, 64) and torch.expm1(x).round().sum() == 2
    again, test_again = load_event_dataset("cifar10-dvs", tmp_path, frames=2, seed=0)
    _, test_other = load_event_dataset("cifar10-dvs", tmp_path, frames=2, seed=1)
    assert test_again.files == test.files and test_other.files != test.files
    assert not set(test.files) & set(train.files)


def test_cifar10_dvs_without_the_decoder_is_a_clear_error(tmp_path):
    pytest.importorskip("tonic")
    try:
        import aedat  # noqa: F401
        pytest.skip("the aedat decoder is installed")
    except ImportError:
        pass
    for cls in ("airplane",):
        d = tmp_path / "CIFAR10DVS" / cls
        d.mkdir(parents=True)
        for i in range(10):
            (d / f"{i}.aedat4").write_bytes(b"")
    train, _ = load_event_dataset("cifar10-dvs", tmp_path, frames=2)
    with pytest.raises(DataError, match="pip install aedat"):
        train[0]


@pytest.mark.parametrize("name, folder", [("nmnist", "NMNIST"), ("dvs-gesture", "DVSGesture"),
                                          ("cifar10-dvs", "CIFAR10DVS")])
def test_missing_event_set_names_where_to_put_it(tmp_path, name, folder):
    with pytest.raises(DataError) as info:
        load_event_dataset(name, tmp_path, frames=2, download=False)
    msg = str(info.value)
    assert name in msg and str(tmp_path / folder) in msg and "Expected" in msg
    assert "--data-dir" in msg


def test_missing_event_set_cli_exits_without_traceback(tmp_path, capsys):
    from stas_core.cli.train import main

    code = main(["--direct", "--dataset", "nmnist", "--data-dir", str(tmp_path), "-T", "2",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert "NMNIST/Train/<digit 0-9>/*.bin" in err and str(tmp_path / "NMNIST") in err


def test_event_datasets_are_registered():
    for name, size, classes in (("fashion-mnist-dvs", 28, 10), ("nmnist", 32, 10),
                                ("dvs-gesture", 64, 11), ("cifar10-dvs", 64, 10),
                                ("cifar10-dvs-128", 128, 10)):
        info = get_dataset_info(name)
        assert info.events and (info.in_chans, info.img_size, info.num_classes) == \
            (2, size, classes)
    assert not get_dataset_info("fashion-mnist").events


# --------------------------------------------------------------------------- models
def test_batch_first_model_equals_time_first():
    from halting.protocol import run_stepwise
    from stas_core.models import create_model

    kw = dict(img_size=28, in_chans=2, num_classes=10, timesteps=3)
    for sps, integrate in (("vanilla", "max"), ("integrated", "max"), ("integrated", "learned")):
        torch.manual_seed(0)
        a = create_model("spikformer-1-32", sps=sps, integrate=integrate, **kw).eval()
        torch.manual_seed(0)
        b = create_model("spikformer-1-32", sps=sps, integrate=integrate, batch_first=True,
                         **kw).eval()
        x = torch.rand(4, 3, 2, 28, 28)
        with torch.no_grad():
            want = a(x.transpose(0, 1))
            assert torch.allclose(want, b(x), atol=1e-6), sps
            # the per-timestep path (halting drives it) reads the frames the same way
            assert torch.allclose(run_stepwise(b, x), want, atol=1e-5), sps


def test_learned_integration_is_a_softmax_weighted_sum():
    from stas_core.models import create_model

    m = create_model("spikformer-1-32", img_size=28, in_chans=2, num_classes=10, timesteps=3,
                     integrate="learned").eval()
    seq = torch.rand(3, 2, 49, 32)
    assert torch.allclose(m._integrate(seq), seq.mean(0), atol=1e-6)  # starts as the mean
    with torch.no_grad():
        m.frame_logits.copy_(torch.tensor([0.0, 20.0, 0.0]))
    assert torch.allclose(m._integrate(seq), seq[1], atol=1e-4)
    x = torch.rand(3, 2, 2, 28, 28)
    m.train()
    m(x).sum().backward()
    assert m.frame_logits.grad is not None and m.frame_logits.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"integrate='learned' weighs timesteps=3 frames; got 2"):
        m(torch.rand(2, 2, 2, 28, 28))


# --------------------------------------------------------------------------- training
@needs_fmnist
def test_a_few_steps_on_fashion_mnist_dvs_beat_chance(tmp_path, monkeypatch):
    import stas_core.events as D  # the event sets read Fashion-MNIST through it
    from stas_core.train import TrainConfig, train

    (xt, yt), (xv, yv) = load_fashion_mnist(download=False)
    monkeypatch.setattr(D, "load_fashion_mnist",
                        lambda *a, **k: ((xt[:1650], yt[:1650]), (xv[:300], yv[:300])))  # 1485 trained on
    common = dict(model="spikformer-1-32", dataset="fashion-mnist-dvs", data_dir=str(tmp_path),
                  timesteps=2, batch_size=64, lr=3e-3, warmup_epochs=0.1, bn_images=256,
                  energy_images=32, progress=False)
    s1 = train(TrainConfig(**common, epochs=2, out=str(tmp_path / "s1")))
    assert s1["top1"] > 0.3, s1["top1"]  # chance is 0.10 (0.134 is its 95% bound on 300 images)
    s2 = train(TrainConfig(**{**common, "lr": 5e-4}, epochs=1, out=str(tmp_path / "s2"),
                           halting=True, init_from=s1["checkpoint"], alpha=1.0, beta=-1.0,
                           eps=0.05, delta_p=1e-2))
    assert s2["top1"] > 0.3 and 0 < s2["token_ratio"] <= 1, s2
    assert s2["baseline"]["without_halting"]["t"] == [1, 2]


# --------------------------------------------------------------------------- other commands
@needs_fmnist
def test_export_and_infer_feed_the_frames_the_model_was_trained_on(tmp_path, monkeypatch):
    """A model trained with T=2 on an event set is traced on 2-frame samples, and stas-infer
    builds 2-frame samples for it (both used the 4-frame default before), reproducing
    PyTorch's top-1 on the same images."""
    import dataclasses
    import json

    import onnx
    from torch.utils.data import DataLoader

    import stas_core.events as D  # the event sets read Fashion-MNIST through it
    from convert.cli_export import main as export_main
    from stas_core.checkpoint import save_checkpoint
    from stas_core.cli.infer import main as infer_main
    from stas_core.evaluate import evaluate
    from stas_core.train import CHECKPOINT_FORMAT, TrainConfig, build_model

    (xt, yt), (xv, yv) = load_fashion_mnist(download=False)
    monkeypatch.setattr(D, "load_fashion_mnist",
                        lambda *a, **k: ((xt[:40], yt[:40]), (xv[:24], yv[:24])))
    cfg = TrainConfig(model="spikformer-1-32", dataset="fashion-mnist-dvs", timesteps=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    _, val, _ = build_datasets("fashion-mnist-dvs", data_dir=tmp_path, frames=2, augment=False)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real frames: outputs that vary
        model(torch.stack([val[i][0] for i in range(24)]))
    model.eval()
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg),
                           "model": model.state_dict()})
    out = tmp_path / "export"
    assert export_main([str(ckpt), "--out", str(out), "--data-dir", str(tmp_path),
                        "--sample-images", "4", "--check"]) == 0
    graph = onnx.load(out / "model.onnx")
    dims = [d.dim_value or d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, 2, 28, 28]
    assert infer_main([str(out / "model.onnx"), "--data-dir", str(tmp_path), "--no-progress",
                       "--out", str(tmp_path / "inf")]) == 0
    report = json.loads((tmp_path / "inf" / "report.json").read_text())
    torch_eval = evaluate(model, DataLoader(val, batch_size=24), torch.device("cpu"))
    assert report["test_images"] == 24
    assert report["top1"] == pytest.approx(torch_eval["correct"] / torch_eval["images"])


def test_stas_convert_refuses_an_event_set_with_what_to_run_instead():
    from convert.pipeline import ConvertConfig

    with pytest.raises(ConfigError, match="stas-train --direct --dataset fashion-mnist-dvs"):
        ConvertConfig(model="vit_tiny", random_init=True, dataset="fashion-mnist-dvs").validate()
