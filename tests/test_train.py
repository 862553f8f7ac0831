"""Direct training: a short real run, checkpoints, resume after a kill, DDP, CLI errors."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stas_core.checkpoint import load_checkpoint, save_checkpoint
from stas_core.cli.train import main as train_main
from stas_core.errors import CheckpointError
from stas_core.train import TrainConfig, load_trained_model, train

from helpers import needs_fmnist

TINY = dict(model="spikformer-1-32", timesteps=2, batch_size=32, progress=False,
            energy_images=32)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "stas_core.cli.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@needs_fmnist
def test_short_training_learns_and_reports(tmp_path, monkeypatch):
    import stas_core.train as T

    trained = {}
    summarise = T._summarise
    monkeypatch.setattr(T, "_summarise", lambda cfg, model, *a, **k: trained.setdefault(
        "model", model) and summarise(cfg, model, *a, **k))
    cfg = TrainConfig(model="spikformer-2-64", timesteps=2, batch_size=64, epochs=2, lr=3e-3,
                      train_subset=2000, val_subset=500, out=str(tmp_path / "run"),
                      progress=False, energy_images=64, warmup_epochs=0.1)
    summary = train(cfg)
    assert summary["top1"] > 0.45, summary["top1"]  # chance is 0.10
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("checkpoint", "top1", "timesteps", "energy_mj", "sops", "macs",
                "firing_rates", "wall_s", "images_per_s"):
        assert key in on_disk
    assert on_disk["energy_mj"] > 0 and on_disk["sops"] > 0 and on_disk["macs"] > 0
    assert all(0 <= r <= 1 for r in on_disk["firing_rates"].values())
    # both ledgers, with the ANN and equal-information QANN baselines, per t too
    e = on_disk["energy"]
    assert e["conventional_mj"] == on_disk["energy_mj"]
    assert e["full_mj"] == pytest.approx(sum(e["terms_mj"].values()))
    assert e["full_mj"] > e["conventional_mj"] and e["ann_full_mj"] > 0 and e["qann_full_mj"] > 0
    assert e["qann_bits"] == 2 and [p["t"] for p in e["per_t"]] == [1, 2]  # T = 2
    assert e["per_t"][-1]["full_mj"] == pytest.approx(e["full_mj"])
    assert e["snn_vs_ann"] == pytest.approx(e["full_mj"] / e["ann_full_mj"])
    # accuracy and both energies after every t (t from 1), and at t = T the same answer
    # as the multi-step path: the run report stas-convert writes too
    assert (on_disk["schema"], on_disk["kind"], on_disk["reference"]) == ("stas-run/1",
                                                                         "direct", None)
    rows = on_disk["per_t"]
    assert [r["t"] for r in rows] == [1, 2]
    assert rows[-1]["top1"] == pytest.approx(on_disk["top1"], abs=1 / 500)
    assert rows[-1]["energy_mj"] == pytest.approx(on_disk["energy_mj"])
    assert rows[-1]["full_energy_mj"] == pytest.approx(on_disk["full_energy_mj"])
    assert 0 < rows[0]["energy_mj"] < rows[1]["energy_mj"]
    from convert.compare import load_run  # stas-compare reads it as written
    assert load_run(tmp_path / "run").top1 == [r["top1"] for r in rows]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    # epochs validated on held-out training images, the summary reported on the test split
    prov = on_disk["provenance"]
    assert prov["chose_on"] == "val" and prov["reported_on"] == "test"
    assert prov["images"]["val"]["source"] == "train" and prov["images"]["test"]["images"] == 500
    assert prov["seeds"] == [0] and prov["checkpoints"][0]["sha256"]
    saved = np.load(tmp_path / "run" / "predictions.npz")
    assert saved["model.pred"].shape == (2, 500)
    assert (saved["model.pred"][-1] == saved["labels"]).mean() == pytest.approx(
        rows[-1]["top1"])
    # the checkpoint reloads into a model that reproduces the evaluated model's logits
    model, loaded_cfg = load_trained_model(on_disk["checkpoint"])
    assert loaded_cfg.model == "spikformer-2-64" and not model.training
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), trained["model"].eval()(x))


def test_checkpoint_round_trip_without_pickle(tmp_path):
    state = {"format": "x", "model": {"w": torch.randn(3, 2)}, "nested": [1, {"a": None}],
             "rng": [torch.get_rng_state()]}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["nested"] == [1, {"a": None}]
    assert torch.equal(back["rng"][0], state["rng"][0])
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left
    # a pickle (what torch.save writes) is refused, never unpickled
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


@needs_fmnist
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    args = ["--direct", "--model", "spikformer-1-32", "-T", "2", "--batch-size", "32",
            "--train-subset", "256", "--val-subset", "64", "--epochs", "3",
            "--energy-images", "16", "--no-progress", "--device", "cpu"]
    ref = _cli([*args, "--out", str(tmp_path / "ref")])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    out = tmp_path / "killed"
    proc = _cli([*args, "--out", str(out)])
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once epoch 1 is checkpointed, mid-way through epoch 2
        if (out / "last.safetensors").exists() and metrics.exists() and metrics.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    done = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert 1 <= len(done) < 3

    resumed = _cli([*args, "--out", str(out), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    got = [json.loads(x) for x in metrics.read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [g["epoch"] for g in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
        assert g["val_top1"] == pytest.approx(w["val_top1"])
    a = load_checkpoint(out / "last.safetensors")["model"]
    b = load_checkpoint(tmp_path / "ref" / "last.safetensors")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


@needs_fmnist
def test_ddp_two_gloo_processes_agree_with_one(tmp_path):
    # One optimizer step on one global batch of 32: 2 ranks x 16 images with cross-process
    # BatchNorm must compute what 1 rank x 32 computes. (Over many steps, float rounding
    # flips an occasional spike and runs drift apart, as any two SNN runs on other hardware.)
    common = ["--direct", "--model", "spikformer-1-32", "-T", "2", "--batch-size", "32",
              "--train-subset", "32", "--val-subset", "64", "--epochs", "1",
              "--no-augment", "--energy-images", "16", "--no-progress", "--device", "cpu"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"ddp{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", "-m", "stas_core.cli.train", *common, "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        runs[n] = out
    m1 = json.loads((runs[1] / "metrics.jsonl").read_text())
    m2 = json.loads((runs[2] / "metrics.jsonl").read_text())
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m2["val_top1"] == pytest.approx(m1["val_top1"], abs=1 / 64 + 1e-9)
    a = load_checkpoint(runs[1] / "last.safetensors")["model"]
    b = load_checkpoint(runs[2] / "last.safetensors")["model"]
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    # Weights: one optimizer step apart from rounding. Running statistics come from the
    # recalibration forward after the step, where those last bits may flip a few spikes
    # (seen: 1.7e-3 with channels-last convolutions); statistics left unsynced across the
    # two ranks in the recalibration differ by 0.1-0.2 (measured), far beyond the bound.
    weights = {k: v for k, v in diffs.items() if "running" not in k}
    stats = {k: v for k, v in diffs.items() if "running" in k}
    assert max(weights.values()) < 2e-4, sorted(weights.items(), key=lambda kv: -kv[1])[:3]
    assert max(stats.values()) < 5e-3, sorted(stats.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("args, words", [
    (["--model", "nosuchformer-2-64"], ["unknown model", "spikformer-2-128"]),
    (["--dataset", "mnist-but-not"], ["dataset", "fashion-mnist"]),
    (["-T", "0"], ["timesteps", ">= 1", "0"]),
    (["--epochs", "-1"], ["epochs"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
     ["device"]),
])
def test_bad_input_gives_one_clear_error(tmp_path, capsys, args, words):
    code = train_main(["--direct", "--out", str(tmp_path / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.count("error:") == 1
    for w in words:
        assert w in err, err
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STAS_FASHION_MNIST_DIR", str(tmp_path / "nothing"))
    code = train_main(["--direct", "--data-dir", str(tmp_path / "empty"), "--out",
                       str(tmp_path / "o"), "--no-progress", "--train-subset", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset-fashion-mnist" in err and "Traceback" not in err


@needs_fmnist
def test_two_stage_training_with_halting_lowers_the_token_ratio(tmp_path):
    from halting import HaltingConfig
    from stas_core.evaluate import evaluate
    from torch.utils.data import DataLoader

    from halting import Halted
    from stas_core.data import build_datasets

    common = dict(batch_size=64, lr=3e-3, train_subset=2048, val_subset=256, progress=False,
                  energy_images=64, warmup_epochs=0.1)
    stage1 = train(TrainConfig(**common, model="spikformer-2-32", timesteps=2, epochs=2,
                               out=str(tmp_path / "s1")))
    # (with beta 0 the stage-1 weights already halt down to a ratio of 0.45 and training
    # cannot lower it: measured 0.455 before, 0.466 after. At beta -1: 0.65 -> 0.53)
    knobs = dict(alpha=1.0, beta=-1.0, eps=0.1)
    stage2 = train(TrainConfig(**common, epochs=1, out=str(tmp_path / "s2"), halting=True,
                               init_from=stage1["checkpoint"], delta_p=0.2, **knobs))
    # the stage-1 weights with the same knobs and data: what halting gives untrained
    model, _ = load_trained_model(stage1["checkpoint"])
    _, val, _ = build_datasets("fashion-mnist", val_subset=256, seed=0, augment=False)
    before = evaluate(Halted(model, HaltingConfig(**knobs)), DataLoader(val, batch_size=64),
                      torch.device("cpu"))
    assert stage2["token_ratio"] < before["token_ratio"] - 0.05, \
        (stage2["token_ratio"], before["token_ratio"])
    assert stage2["top1"] > 0.3, stage2["top1"]  # chance is 0.1
    print("stage 1 top-1", stage1["top1"], "stage 2 top-1", stage2["top1"],
          "token ratio", stage2["token_ratio"])
    assert stage2["energy_mj"] < stage1["energy_mj"]  # halted tokens cost nothing
    assert stage2["energy"]["full_mj"] < stage1["energy"]["full_mj"]  # in the full ledger too
    # per_t of a STAS run is the halted model stopped after t; at T it is the run itself
    assert stage2["per_t"][-1]["top1"] == pytest.approx(stage2["top1"], abs=1 / 256)
    assert stage2["per_t"][-1]["energy_mj"] == pytest.approx(stage2["energy_mj"])
    # the trivial baselines: the same weights and the stage-1 model without halting, after t
    base = stage2["baseline"]
    assert base["stage1"]["top1"][-1] == pytest.approx(stage1["top1"])
    assert base["stage1"]["t"] == [1, 2] and len(base["without_halting"]["energy_mj"]) == 2
    assert base["without_halting"]["energy_mj"][-1] > stage2["energy_mj"]
    assert base["stage1"]["vs_halted"]["beats_baseline"] in (True, False, None)
    assert Path(base["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert stage2["halting"]["accumulate"] == "both"
    fractions = stage2["active_fraction"]  # [T][L], the first step runs every token
    assert len(fractions) == 2 and fractions[0][0] == 1.0
    assert sum(map(sum, fractions)) / 4 == pytest.approx(stage2["token_ratio"], rel=1e-6)
    assert (tmp_path / "s2" / "halting_depth.png").stat().st_size > 0


@needs_fmnist
def test_a_short_run_evaluates_close_to_what_its_weights_can_do(tmp_path):
    # 16 steps: the running BatchNorm averages lag the moving weights, and without
    # recalibration this run evaluates at chance (0.09, one class for every image)
    from stas_core.data import build_datasets
    from torch.utils.data import DataLoader

    summary = train(TrainConfig(model="spikformer-2-128", timesteps=2, epochs=1, batch_size=64,
                                train_subset=1024, val_subset=512, progress=False,
                                energy_images=16, out=str(tmp_path / "r")))
    model, _ = load_trained_model(summary["checkpoint"])
    _, val, _ = build_datasets("fashion-mnist", val_subset=512, seed=0, augment=False)
    hits = 0
    with torch.no_grad():  # the same weights with each batch's own statistics
        model.train()
        for x, y in DataLoader(val, batch_size=64):
            hits += int((model(x).argmax(-1) == y).sum())
    batch_stats = hits / 512
    assert batch_stats > 0.3, batch_stats
    assert summary["top1"] > batch_stats - 0.08, (summary["top1"], batch_stats)


def _stage1_checkpoint(path, **config):
    """A stage-1 checkpoint of a tiny model with these (non-default) settings, untrained."""
    from stas_core.train import CHECKPOINT_FORMAT, build_model

    cfg = TrainConfig(model="spikformer-1-32", timesteps=3, sps="vanilla", integrate="mean",
                      neuron={"tau": 1.5, "surrogate": "atan", "backend": "fused"}, **config)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg),
                           "model": build_model(cfg).state_dict()})
    return path


def test_stage_two_is_the_model_stage_one_was(tmp_path, capsys):
    from stas_core.cli.train import build_parser, config_from_args
    from stas_core.errors import ConfigError
    from stas_core.train import build_model

    ckpt = _stage1_checkpoint(tmp_path / "s1.safetensors")
    cfg = TrainConfig(init_from=str(ckpt), halting=True).resolved()
    assert (cfg.model, cfg.timesteps, cfg.sps, cfg.integrate) == \
        ("spikformer-1-32", 3, "vanilla", "mean")
    assert cfg.neuron == {"tau": 1.5, "surrogate": "atan", "backend": "fused"}
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    assert model.blocks[0].mlp.lif1.tau == 1.5 and model.sps == "vanilla"
    # the CLI leaves them unset too; the same value given explicitly is fine
    args = build_parser().parse_args(["--direct", "--init-from", str(ckpt), "-T", "3"])
    assert config_from_args(args).resolved() == dataclasses.replace(cfg, halting=False)
    # without --init-from: the defaults
    assert TrainConfig().resolved().timesteps == 4
    for flags, words in ((["-T", "4"], ["--timesteps 4", "--timesteps 3"]),
                         (["--tau", "2.0"], ["--tau 2.0", "--tau 1.5"]),
                         (["--sps", "integrated"], ["--sps integrated", "--sps vanilla"])):
        code = train_main(["--direct", "--init-from", str(ckpt), "--halting", *flags,
                           "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
        assert all(w in err for w in words), err
    with pytest.raises(ConfigError, match="--model spikformer-2-32 conflicts"):
        TrainConfig(init_from=str(ckpt), model="spikformer-2-32").resolved()


def test_ranks_draw_their_own_augmentation():
    from stas_core.data import DATASETS, TensorImageDataset
    from stas_core.distributed import augmentation_seed

    info = DATASETS["fashion-mnist"]
    images = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.zeros(4, dtype=torch.long), info.mean, info.std,
                            augment=True, padding=2)
    draws = []
    for rank in (0, 1, 0):
        torch.manual_seed(augmentation_seed(7, rank))
        draws.append(torch.stack([ds[i][0] for i in range(4)]))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


@needs_fmnist
def test_amp_resume_restores_the_grad_scaler(tmp_path):
    # CPU autocast (bfloat16) with a GradScaler: the scaler's state is checkpointed, so a
    # resumed run continues its growth tracker instead of starting it over
    base = TrainConfig(model="spikformer-1-32", timesteps=2, batch_size=32, epochs=2,
                       train_subset=128, val_subset=32, energy_images=8, progress=False,
                       amp=True, device="cpu")

    class Killed(Exception):
        pass

    def kill(epoch, record):
        raise Killed

    ref = train(dataclasses.replace(base, out=str(tmp_path / "ref")))
    with pytest.raises(Killed):
        train(dataclasses.replace(base, out=str(tmp_path / "k")), on_epoch=kill)
    resumed = train(dataclasses.replace(base, out=str(tmp_path / "k"), resume=True))
    a = load_checkpoint(tmp_path / "ref" / "last.safetensors")
    b = load_checkpoint(tmp_path / "k" / "last.safetensors")
    assert a["scaler"] and a["scaler"] == b["scaler"], (a["scaler"], b["scaler"])
    assert a["scaler"]["_growth_tracker"] == 8  # 4 steps per epoch, never reset
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["amp"] is True and ref["history"][1]["train_loss"] == \
        pytest.approx(resumed["history"][1]["train_loss"], rel=1e-6)


def test_halting_flags_are_checked(tmp_path, capsys):
    code = train_main(["--direct", "--halting", "--eps", "1.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "eps must be in [0, 1)" in err and "Traceback" not in err


def test_scheduler_warmup_then_cosine_to_zero():
    """Hand-worked lr of timm's warmup + cosine: lr/W at step 0, lr after W steps, half
    way down the cosine at its middle, 0 at the end."""
    from stas_core.train import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(opt, total_steps=14, warmup_steps=4)
    lrs = [opt.param_groups[0]["lr"]]
    for step in range(1, 15):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(2.5e-4)
    assert lrs[4] == pytest.approx(1e-3) and lrs[9] == pytest.approx(5e-4)
    assert lrs[14] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(lrs[:4], lrs[1:5]))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_recalibration_keeps_statistics_of_a_layer_that_sees_no_rows():
    """A BatchNorm that receives no rows during recalibration (every token halted before
    it) keeps the statistics training left; one that receives rows gets exactly theirs."""
    from stas_core.batchnorm import recalibrate_batchnorm
    from stas_core.layers import TokenBN

    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.fed, self.starved = TokenBN(3), TokenBN(3)

        def forward(self, x):
            self.starved(x[:0])  # no rows reach it, as after every token halted
            return self.fed(x)

    net = TwoNorms()
    for bn in (net.fed, net.starved):
        bn.running_mean.fill_(5.0), bn.running_var.fill_(7.0)
    x = torch.randn(16, 3) * 2 + 1
    used = recalibrate_batchnorm(net, [(x, None)], torch.device("cpu"), batches=1)
    assert used == 1
    assert torch.allclose(net.fed.running_mean, x.mean(0), atol=1e-6)
    assert torch.allclose(net.fed.running_var, x.var(0), atol=1e-5)
    assert torch.equal(net.starved.running_mean, torch.full((3,), 5.0))
    assert torch.equal(net.starved.running_var, torch.full((3,), 7.0))


def test_stage2_with_vanilla_sps_keeps_the_patch_splitting_statistics(tmp_path):
    """Vanilla SPS + halting: the patch-splitting BatchNorms keep their stage-1 statistics
    (stepwise training would normalise each timestep apart, against running statistics
    that average over timesteps); the blocks' BatchNorms are still recalibrated."""
    from stas_core.batchnorm import frozen_batchnorms
    from stas_core.train import load_trained_model

    common = dict(model="spikformer-1-32", timesteps=2, batch_size=32, train_subset=128,
                  val_subset=64, energy_images=8, progress=False, bn_images=64)
    s1 = train(TrainConfig(**common, sps="vanilla", epochs=1, out=str(tmp_path / "s1")))
    s2 = train(TrainConfig(**common, epochs=1, halting=True, beta=0.0, init_from=s1["checkpoint"],
                           out=str(tmp_path / "s2")))
    m1, _ = load_trained_model(s1["checkpoint"])
    m2, cfg2 = load_trained_model(s2["checkpoint"])
    frozen = frozen_batchnorms(m2, halting=True, sps=cfg2.sps)
    assert frozen and cfg2.sps == "vanilla"
    for a, b in zip(frozen_batchnorms(m1, halting=True, sps="vanilla"), frozen):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    blocks1 = [bn for bn in m1.blocks.modules() if isinstance(bn, nn.BatchNorm1d)]
    blocks2 = [bn for bn in m2.blocks.modules() if isinstance(bn, nn.BatchNorm1d)]
    assert any(not torch.equal(a.running_mean, b.running_mean) for a, b in zip(blocks1, blocks2))
    assert frozen_batchnorms(m2, halting=True, sps="integrated") == []
