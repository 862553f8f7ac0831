"""Kernel A/B in one process: this checkout's C++ kernels against an earlier revision's,
interleaved round by round on the same inputs, so a noisy machine hits both alike.

    python bench/kernel_ab.py --baseline HEAD~1 \\
        --checkpoint vit_fmnist_d6.safetensors --spec vit_fmnist_d6.json [--rounds 7]

``--baseline`` is a git revision (its ``stas_core/csrc/kernels.cpp`` is built beside the
current one, with the same flags) or a path to a kernels.cpp. Timed per round, alternating
which build goes first: one unhalted converted timestep (and the ANN pass beside it), one
halted ``gather`` run of the converted ViT at ``--eps`` (T=8, alpha 0, beta -3.25), and one
vanilla-SPS spikformer-2-128 training step (random inputs; ``--no-train`` skips it). Also
reports whether the two builds give the same logits and gradients. Prints one JSON object;
run by hand, from the repository root.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from convert.calibrate import calibrate
from convert.spiking_vit import SpikingViT
from halting.plugin import HaltingConfig, run_halting
from stas_core import kernels
from stas_core.data import build_datasets
from stas_core.models import create_model

from convert_bench import bench_vit  # bench/ is on the path when run as a script


def baseline_source(spec: str, into: Path) -> Path:
    """``spec`` as a kernels.cpp path: a file, or the one in git revision ``spec``."""
    if Path(spec).is_file():
        return Path(spec)
    text = subprocess.run(["git", "show", f"{spec}:stas_core/csrc/kernels.cpp"],
                          check=True, capture_output=True, text=True).stdout
    path = into / "kernels.cpp"
    path.write_text(text)
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="HEAD~1", help="git revision or kernels.cpp path")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.5)
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args()
    kernels.keep_freed_memory()
    current = kernels.load()
    if current is None:
        print(f"the kernels are unavailable here ({kernels._state['why']})", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        before = kernels.build(baseline_source(args.baseline, Path(tmp)), "stas_kernels_ab")
    builds = {"current": current, "baseline": before}

    def use(build: str) -> None:
        kernels._state["module"] = builds[build]

    train, val, _ = build_datasets("fashion-mnist", augment=False)
    _, _, vit = bench_vit(args)
    vit.eval()
    snn = SpikingViT(vit, levels=8, timesteps=8)
    calibrate(snn, DataLoader(Subset(train, range(256)), batch_size=args.batch_size),
              max_images=256)
    x = next(iter(DataLoader(Subset(val, range(args.batch_size)), batch_size=args.batch_size)))[0]
    cfg = HaltingConfig(alpha=0.0, beta=-3.25, eps=args.eps, accumulate="both", score="mean",
                        output="last")
    stepping = {b: copy.deepcopy(snn) for b in builds}   # each build keeps its own state
    halting = {b: copy.deepcopy(snn) for b in builds}

    def step(model: SpikingViT) -> torch.Tensor:
        tok = model.tokens(x, 1)
        for blk in model.blocks:
            tok = blk.step(tok)
        return model.readout(tok)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g)
    nets = {}
    for b in builds:
        torch.manual_seed(0)
        net = create_model("spikformer-2-128", img_size=28, in_chans=1, num_classes=10,
                           timesteps=4, sps="vanilla")
        nets[b] = (net, torch.optim.SGD(net.parameters(), lr=0.0))  # weights stay put
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def train_step(b: str) -> None:
        net, opt = nets[b]
        net.train()
        loss = loss_fn(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    agree = {}
    with torch.no_grad():
        logits = {}
        for b in builds:
            use(b)
            stepping[b].reset()
            stepping[b].tokens(x, 0)
            logits[b] = step(stepping[b])
            run_halting(halting[b], x, cfg, execution="gather")  # warm-up
        agree["converted_step_logits_max_abs_diff"] = float(
            (logits["current"] - logits["baseline"]).abs().max())
    if not args.no_train:
        grads = {}
        for b in builds:
            use(b)
            train_step(b)
            grads[b] = [q.grad.clone() for q in nets[b][0].parameters() if q.grad is not None]
        agree["train_gradients_bitwise_equal"] = all(
            torch.equal(a, c) for a, c in zip(grads["current"], grads["baseline"]))

    rows: dict[str, list] = {"ann": []}
    for r in range(args.rounds):
        order = ("current", "baseline") if r % 2 == 0 else ("baseline", "current")
        with torch.no_grad():
            use("current")
            rows["ann"].append(timed(lambda: snn.ann_forward(x)))
            for b in order:
                use(b)
                rows.setdefault(f"step_{b}", []).append(timed(lambda: step(stepping[b])))
            for b in order:
                use(b)
                rows.setdefault(f"gather_{b}", []).append(
                    timed(lambda: run_halting(halting[b], x, cfg, execution="gather")))
        if not args.no_train:
            for b in order:
                use(b)
                rows.setdefault(f"train_{b}", []).append(timed(lambda: train_step(b)))
    use("current")
    med = {k: statistics.median(v) for k, v in rows.items()}
    speedups = {}
    for what in ("step", "gather", "train"):
        if f"{what}_current" in med:
            speedups[what] = med[f"{what}_baseline"] / med[f"{what}_current"]
            speedups[f"{what}_per_round"] = [
                old / new for old, new in zip(rows[f"{what}_baseline"], rows[f"{what}_current"])]
    print(json.dumps({
        "bench": "kernel_ab", "baseline": args.baseline, "rounds": args.rounds,
        "batch_size": args.batch_size, "eps": args.eps, "median_s": med,
        "step_vs_ann": {b: med[f"step_{b}"] / med["ann"] for b in builds},
        "baseline_over_current": speedups, "agreement": agree,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
