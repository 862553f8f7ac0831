"""The check to run whenever a CUDA device is at hand (at most about 5 minutes on one GPU).

    python bench/gpu_check.py [--device cuda] [--out runs/gpu_check] [--no-compile]

Exercises what CPU-only CI cannot: AMP training (float16 autocast + GradScaler) with an
exact kill-and-resume, a stage-2 epoch with halting (gather execution) under AMP,
converted-ViT evaluation on the device with and without halting against the CPU result,
``--compile`` kernels against eager ones, and 2-rank NCCL DDP against one process when two
devices exist. Data: a small synthetic Fashion-MNIST-format set (IDX files written to
OUT/data: the device machine needs no dataset package). Prints one JSON object; exits 1 if
a check failed. ``--device cpu`` runs the same logic on the CPU (a dry run of the script).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from stas_core.provenance import provenance_of_args
from stas_core.checkpoint import load_checkpoint
from stas_core.train import TrainConfig, train


def write_idx(root: Path, n_train: int = 2048, n_val: int = 512, seed: int = 0) -> Path:
    """A learnable 10-class set in Fashion-MNIST's IDX layout: a fixed random template per
    class plus noise and a random shift."""
    rng = np.random.default_rng(seed)
    templates = (rng.random((10, 28, 28)) > 0.6) * 200.0
    root.mkdir(parents=True, exist_ok=True)

    def images(n):
        labels = rng.integers(0, 10, n)
        x = templates[labels] + rng.normal(0, 40, (n, 28, 28))
        shifts = rng.integers(-2, 3, (n, 2))
        x = np.stack([np.roll(img, tuple(s), (0, 1)) for img, s in zip(x, shifts)])
        return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.uint8)

    for split, n in (("train", n_train), ("t10k", n_val)):
        x, y = images(n)
        (root / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], ">i4").tobytes() + x.tobytes())
        (root / f"{split}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], ">i4").tobytes() + y.tobytes())
    return root


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


class _Killed(Exception):
    pass


def check_amp_resume(device: str, data: Path, out: Path) -> dict:
    """Two AMP epochs in one go vs. one epoch, a 'kill' after its checkpoint, and resume."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    base = TrainConfig(model="spikformer-2-64", timesteps=2, epochs=2, batch_size=64,
                       data_dir=str(data), device=device, progress=False, energy_images=64,
                       amp=True, warmup_epochs=0.1, lr=3e-3)
    start = time.perf_counter()
    ref = train(dataclasses.replace(base, out=str(out / "ref")))

    def kill(epoch, record):
        if epoch == 0:
            raise _Killed

    try:
        train(dataclasses.replace(base, out=str(out / "killed")), on_epoch=kill)
    except _Killed:
        pass
    resumed = train(dataclasses.replace(base, out=str(out / "killed"), resume=True))
    a = load_checkpoint(out / "ref" / "last.safetensors")
    b = load_checkpoint(out / "killed" / "last.safetensors")
    diff = _max_diff(a["model"], b["model"])
    losses = [(h["train_loss"], g["train_loss"]) for h, g in zip(ref["history"],
                                                                resumed["history"])]
    return {"ok": diff < 1e-3 and a["scaler"] == b["scaler"] and bool(a["scaler"]),
            "exact": diff == 0.0, "max_weight_diff": diff, "scaler": b["scaler"],
            "train_losses": losses, "top1": resumed["top1"], "amp": resumed["amp"],
            "seconds": time.perf_counter() - start, "checkpoint": str(out / "ref")}


def check_stage2(device: str, data: Path, out: Path, stage1: Path) -> dict:
    """One AMP epoch of STAS stage 2 (halting, gather execution) from the stage-1 run."""
    start = time.perf_counter()
    s = train(TrainConfig(init_from=str(stage1 / "last.safetensors"), halting=True,
                          epochs=1, batch_size=64, data_dir=str(data), device=device,
                          progress=False, energy_images=64, amp=True, alpha=1.0, beta=0.0,
                          eps=0.1, delta_p=5e-2, lr=5e-4, out=str(out / "stage2")))
    return {"ok": 0 < s["token_ratio"] < 1 and s["top1"] > 0.2, "top1": s["top1"],
            "token_ratio": s["token_ratio"], "images_per_s": s["images_per_s"],
            "seconds": time.perf_counter() - start}


def _converted(seed: int = 0):
    import timm

    from convert.calibrate import calibrate
    from convert.spiking_vit import SpikingViT

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1,
                            num_classes=10, depth=2, embed_dim=96, num_heads=3).eval()
    snn = SpikingViT(vit, timesteps=8)
    calibrate(snn, [torch.randn(64, 1, 28, 28)])
    return snn


def check_converted(device: str) -> dict:
    """The converted ViT on the device against the CPU: unhalted and halted (mask, gather)."""
    from halting import HaltingConfig, run_halting, run_stepwise
    from stas_core.timing import Stopwatch

    snn = _converted()
    x = torch.randn(128, 1, 28, 28)
    cfg = HaltingConfig(alpha=0.0, beta=-2.0, eps=0.05)
    with torch.no_grad():
        cpu = run_stepwise(snn, x)
        cpu_h = run_halting(snn, x, cfg, execution="mask")
        snn.to(device)
        xd = x.to(device)
        out, times = {}, {}
        for name, fn in (("unhalted", lambda: run_stepwise(snn, xd)),
                         ("mask", lambda: run_halting(snn, xd, cfg, execution="mask").logits),
                         ("gather", lambda: run_halting(snn, xd, cfg, execution="gather").logits)):
            fn()  # warm-up
            watch = Stopwatch(device)
            with watch:
                out[name] = fn().float().cpu()
            times[name] = len(x) / watch.seconds
    agree = float((out["unhalted"].argmax(-1) == cpu.argmax(-1)).float().mean())
    agree_h = float((out["mask"].argmax(-1) == cpu_h.logits.argmax(-1)).float().mean())
    return {"ok": agree >= 0.95 and agree_h >= 0.95 and
            float((out["mask"] - out["gather"]).abs().max()) < 1e-3,
            "top1_agreement_with_cpu": agree, "halted_agreement_with_cpu": agree_h,
            "max_logit_diff_vs_cpu": float((out["unhalted"] - cpu).abs().max()),
            "mask_vs_gather_max_diff": float((out["mask"] - out["gather"]).abs().max()),
            "token_ratio": cpu_h.token_ratio, "images_per_s": times}


def check_compile(device: str) -> dict:
    """``--compile`` kernels give the spikes of the eager ones."""
    from halting import run_stepwise

    snn = _converted().to(device)
    x = torch.randn(32, 1, 28, 28, device=device)
    with torch.no_grad():
        eager = run_stepwise(snn, x, 4, cumulative=True)
        start = time.perf_counter()
        snn.compile()
        try:
            compiled = run_stepwise(snn, x, 4, cumulative=True)
        finally:
            snn.compile(False)
    diff = float((eager - compiled).abs().max())
    return {"ok": diff < 1e-3, "max_diff": diff, "seconds": time.perf_counter() - start}


def check_ddp(data: Path, out: Path) -> dict:
    """2 NCCL ranks x 16 images vs 1 rank x 32: one optimizer step, the same weights."""
    if torch.cuda.device_count() < 2:
        return {"ok": True, "skipped": f"{torch.cuda.device_count()} CUDA device(s)"}
    common = ["--direct", "--model", "spikformer-1-32", "-T", "2", "--batch-size", "32",
              "--train-subset", "32", "--val-subset", "64", "--epochs", "1", "--no-augment",
              "--energy-images", "16", "--no-progress", "--device", "cuda", "--no-amp",
              "--data-dir", str(data)]
    runs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", "-m", "stas_core.cli.train", *common,
               "--out", str(out / f"ddp{n}")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if res.returncode != 0:
            return {"ok": False, "ranks": n, "error": (res.stdout + res.stderr)[-2000:]}
        runs[n] = load_checkpoint(out / f"ddp{n}" / "last.safetensors")["model"]
    diff = _max_diff(runs[1], runs[2])
    return {"ok": diff < 2e-4, "max_weight_diff": diff}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device; use --device cpu for a "
                                                "dry run"}))
        return 1
    out = Path(args.out)
    data = write_idx(out / "data")
    os.environ["STAS_FASHION_MNIST_DIR"] = str(data)
    report = {"device": args.device, "torch": torch.__version__,
              "cuda_devices": torch.cuda.device_count(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    checks = [("amp_resume", lambda: check_amp_resume(args.device, data, out / "amp")),
              ("stage2_halting", lambda: check_stage2(args.device, data, out, out / "amp" / "ref")),
              ("converted", lambda: check_converted(args.device)),
              *([("compile", lambda: check_compile(args.device))] if args.compile else []),
              ("ddp_nccl", lambda: check_ddp(data, out))]
    start = time.perf_counter()
    for name, fn in checks:
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - report every check, then fail
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc()[-3000:]}
        print(f"{name}: {'ok' if report[name].get('ok') else 'FAILED'}", file=sys.stderr)
    report["ok"] = all(report[name].get("ok") for name, _ in checks)
    report["seconds"] = time.perf_counter() - start
    report["provenance"] = provenance_of_args(args)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
