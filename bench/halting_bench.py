"""STAS halting benchmark on Fashion-MNIST: energy, accuracy and wall-clock of a halted
model against the same backbone without halting, plus the paper's inference ablations.

Direct path (stage 1 = I-SPS without halting, stage 2 = ``stas-train --halting``):

    python bench/halting_bench.py direct --baseline S1.safetensors --stas S2.safetensors \\
        [--val-subset N] [--batch-size 128] [--energy-images 512] [--out runs/halting_bench]

Converted path (a model written by ``stas-convert``; halting at inference only):

    python bench/halting_bench.py converted --model MODEL.safetensors [--alpha A --beta B \\
        --eps E] [-T 8] [--val-subset 2000]     (default: the converted operating point)

Prints one JSON object and writes ``<out>/<path>.json``, ``<out>/<path>_eps_pareto.png`` and
``<out>/<path>_depth.png``. Timings: every configuration runs the same in-memory batches
(one warm-up batch first) in one process, interleaved round by round, median of rounds.
Ablations (accumulation mode, eps sweep) re-use the trained weights at inference: they show
how the halting knobs act on one model, not what retraining per setting would give. Every
halted point is placed against the trivial baseline (``fewer_timesteps``: the model without
halting stopped after t = 1..T), which the eps Pareto plot draws too.
Run by hand; not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from halting import Halted, HaltingConfig, run_halting
from convert.spiking_vit import SpikingViT
from halting.protocol import run_stepwise
from stas_core.provenance import provenance_of_args
from stas_core.timing import median_rates
from stas_core.data import build_datasets
from halting.plots import draw_baseline
from stas_core.evaluate import (against_baseline, measure_energy, save_depth_heatmap,
                                timestep_baseline)

EPS_SWEEP = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def _batches(dataset: str, val_subset, batch_size: int) -> list:
    _, val_ds, _ = build_datasets(dataset, val_subset=val_subset, augment=False)
    return list(DataLoader(val_ds, batch_size=batch_size, shuffle=False))


@torch.no_grad()
def _top1(fn, batches) -> tuple[float, float]:
    """(top-1, mean token ratio) of ``fn(x) -> logits | HaltingResult`` over ``batches``."""
    correct = total = 0
    ratio = 0.0
    for x, y in batches:
        out = fn(x)
        logits = out.logits if hasattr(out, "logits") else out
        ratio += (out.token_ratio if hasattr(out, "logits") else 1.0) * len(y)
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    return correct / total, ratio / total


@torch.no_grad()
def _throughput(runners: dict, batches, rounds: int) -> dict:
    """Images/s of each runner over the same batches, interleaved; median over rounds."""
    images = sum(len(y) for _, y in batches)

    def over_batches(fn):
        return lambda: [fn(x) for x, _ in batches]

    return median_rates({k: over_batches(fn) for k, fn in runners.items()}, images,
                        rounds=rounds)


def _energy(model, batches, images: int, halting=None) -> float:
    return measure_energy(model, batches, torch.device("cpu"), max_images=images,
                          halting=halting, execution="gather")["energy_mj"]


def _ablations(model, batches, cfg: HaltingConfig, energy_images: int, out: Path,
               name: str, baseline: dict) -> dict:
    """Accumulation modes at the model's eps, and an eps sweep with its Pareto plot."""
    modes = {}
    for mode in ("block", "time", "both"):
        c = HaltingConfig(**{**cfg.__dict__, "accumulate": mode})
        top1, ratio = _top1(lambda x: run_halting(model, x, c, execution="gather"), batches)
        modes[mode] = {"top1": top1, "token_ratio": ratio,
                       "energy_mj": _energy(model, batches, energy_images, c)}
    sweep = []
    for eps in EPS_SWEEP:
        c = HaltingConfig(**{**cfg.__dict__, "eps": eps})
        top1, ratio = _top1(lambda x: run_halting(model, x, c, execution="gather"), batches)
        energy = _energy(model, batches, energy_images, c)
        sweep.append({"eps": eps, "top1": top1, "token_ratio": ratio, "energy_mj": energy,
                      "vs_baseline": against_baseline(top1, energy, baseline)})
    _plot_sweep(sweep, out / f"{name}_eps_pareto.png", name, baseline)
    return {"accumulate": modes, "eps_sweep": sweep}


def _plot_sweep(sweep: list[dict], path: Path, name: str, baseline: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tuning.export import pareto_front

    front = pareto_front([{**p, "state": "COMPLETE", "number": i} for i, p in enumerate(sweep)])
    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([p["energy_mj"] for p in sweep], [100 * p["top1"] for p in sweep], "o", color="0.6")
    front = sorted(front, key=lambda p: p["energy_mj"])
    ax.plot([p["energy_mj"] for p in front], [100 * p["top1"] for p in front], "o-", color="C0",
            label="Pareto front")
    for p in sweep:
        ax.annotate(f"eps {p['eps']}", (p["energy_mj"], 100 * p["top1"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    draw_baseline(ax, baseline)
    ax.set_xlabel("energy per image (mJ)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{name}: eps sweep", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_direct(args) -> dict:
    from stas_core.train import load_trained_model

    base, base_cfg = load_trained_model(args.baseline)
    stas, stas_cfg = load_trained_model(args.stas)
    cfg = stas_cfg.halting_config() or HaltingConfig(
        alpha=stas_cfg.alpha, beta=stas_cfg.beta, eps=stas_cfg.eps)  # a stage-1 as --stas
    if args.eps is not None:
        cfg = HaltingConfig(**{**cfg.__dict__, "eps": args.eps})
    batches = _batches(base_cfg.dataset, args.val_subset, args.batch_size)
    base_top1, _ = _top1(base, batches)
    halted_top1, ratio = _top1(lambda x: run_halting(stas, x, cfg, execution="gather"), batches)
    base_e = _energy(base, batches, args.energy_images)
    stas_e = _energy(stas, batches, args.energy_images, cfg)
    # the trivial baselines: stage 1, and the STAS weights, without halting, after t
    curve = timestep_baseline(base, batches, torch.device("cpu"), energy_images=args.energy_images)
    own = timestep_baseline(stas, batches, torch.device("cpu"), energy_images=args.energy_images)
    timed = batches[: args.timed_batches]
    speed = _throughput({
        "baseline_multistep": base,
        "baseline_stepwise": lambda x: run_stepwise(base, x),
        "stas_mask": Halted(stas, cfg, execution="mask"),
        "stas_gather": Halted(stas, cfg, execution="gather"),
    }, timed, args.rounds)
    out = Path(args.out)
    depth = save_depth_heatmap(stas, batches, torch.device("cpu"), cfg, out / "direct_depth.png",
                               execution="gather")
    return {
        "path": "direct", "baseline": args.baseline, "stas": args.stas,
        "model": base_cfg.model, "timesteps": base_cfg.timesteps, "sps": base_cfg.sps,
        "halting": cfg.__dict__, "delta_p": stas_cfg.delta_p,
        "test_images": sum(len(y) for _, y in batches),
        "baseline_top1": base_top1, "stas_top1": halted_top1,
        "top1_delta_points": 100 * (halted_top1 - base_top1),
        "token_ratio": ratio,
        "baseline_energy_mj": base_e, "stas_energy_mj": stas_e,
        "energy_reduction": 1 - stas_e / base_e,
        "images_per_s": speed,
        # against the faster of the two executions of the model without halting
        "gather_speedup_vs_baseline": speed["stas_gather"] / max(
            speed["baseline_multistep"], speed["baseline_stepwise"]),
        "gather_speedup_vs_mask": speed["stas_gather"] / speed["stas_mask"],
        "timed_images": sum(len(y) for _, y in timed), "batch_size": args.batch_size,
        "depth": depth,
        "fewer_timesteps": {"stage1": curve, "stas_without_halting": own,
                            "vs_stage1": against_baseline(halted_top1, stas_e, curve),
                            "vs_stas_without_halting": against_baseline(halted_top1, stas_e, own)},
        "ablations": _ablations(stas, batches, cfg, args.energy_images, out, "direct", curve),
    }


def bench_converted(args) -> dict:
    from convert.pipeline import load_converted

    snn = load_converted(args.model)
    steps = args.timesteps or snn.timesteps
    snn.timesteps = steps
    if args.compile:  # every execution compiled alike (warm-up rounds absorb the compiling)
        snn.compile()
    cfg = HaltingConfig(alpha=args.alpha, beta=args.beta, eps=args.eps if args.eps is not None
                        else SpikingViT.halting_defaults.eps, accumulate=args.accumulate,
                        score=args.score, output=args.output)
    batches = _batches(args.dataset, args.val_subset, args.batch_size)
    if args.speed_only:
        return _converted_speed(snn, cfg, steps, batches, args)
    base_top1, _ = _top1(lambda x: run_stepwise(snn, x, steps), batches)
    kv = {}  # what the other tokens see of a halted token: frozen K/V vs dropped
    for mode in ("drop", "frozen"):
        snn.set_halted_kv(mode)
        top1, ratio = _top1(lambda x: run_halting(snn, x, cfg, execution="gather"), batches)
        kv[mode] = {"top1": top1, "token_ratio": ratio}
    snn.set_halted_kv(args.halted_kv)
    halted_top1, ratio = _top1(lambda x: run_halting(snn, x, cfg, execution="gather"), batches)
    base_e = _energy(snn, batches, args.energy_images)
    stas_e = _energy(snn, batches, args.energy_images, cfg)
    curve = timestep_baseline(snn, batches, torch.device("cpu"), energy_images=args.energy_images)
    timed = batches[: args.timed_batches]
    speed = _throughput({
        "snn": lambda x: run_stepwise(snn, x, steps),
        "halted_mask": Halted(snn, cfg, execution="mask"),
        "halted_gather": Halted(snn, cfg, execution="gather"),
    }, timed, args.rounds)
    out = Path(args.out)
    depth = save_depth_heatmap(snn, batches, torch.device("cpu"), cfg,
                               out / "converted_depth.png", execution="gather")
    return {
        "path": "converted", "model": args.model, "timesteps": steps, "halting": cfg.__dict__,
        "halted_kv": args.halted_kv, "halted_kv_comparison": kv,
        "test_images": sum(len(y) for _, y in batches),
        "snn_top1": base_top1, "halted_top1": halted_top1,
        "top1_delta_points": 100 * (halted_top1 - base_top1), "token_ratio": ratio,
        "snn_energy_mj": base_e, "halted_energy_mj": stas_e,
        "energy_reduction": 1 - stas_e / base_e,
        "images_per_s": speed,
        "gather_speedup_vs_snn": speed["halted_gather"] / speed["snn"],
        "timed_images": sum(len(y) for _, y in timed), "batch_size": args.batch_size,
        "depth": depth,
        "fewer_timesteps": {"snn": curve, "vs_snn": against_baseline(halted_top1, stas_e, curve)},
        "ablations": _ablations(snn, batches, cfg, args.energy_images, out, "converted", curve),
    }


def _converted_speed(snn, cfg: HaltingConfig, steps: int, batches, args) -> dict:
    """Images/s of the ANN pass, the unhalted SNN and both halted executions on the same
    batches (interleaved), with the token ratio on those batches: no accuracy or energy."""
    timed = batches[: args.timed_batches]
    _, ratio = _top1(lambda x: run_halting(snn, x, cfg, execution="gather"), timed)
    speed = _throughput({
        "ann": snn.ann_forward,
        "snn": lambda x: run_stepwise(snn, x, steps),
        "halted_mask": Halted(snn, cfg, execution="mask"),
        "halted_gather": Halted(snn, cfg, execution="gather"),
    }, timed, args.rounds)
    return {"path": "converted", "speed_only": True, "compiled": args.compile,
            "model": args.model, "timesteps": steps,
            "halting": cfg.__dict__, "halted_kv": args.halted_kv, "token_ratio": ratio,
            "images_per_s": speed,
            "gather_speedup_vs_snn": speed["halted_gather"] / speed["snn"],
            "mask_speedup_vs_snn": speed["halted_mask"] / speed["snn"],
            # one SNN timestep (1/T of a run) against one ANN pass over the same images
            "snn_step_vs_ann_pass": speed["ann"] / (speed["snn"] * steps),
            "timed_images": sum(len(y) for _, y in timed), "batch_size": args.batch_size,
            "rounds": args.rounds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="path", required=True)
    d = sub.add_parser("direct")
    d.add_argument("--baseline", required=True, help="stage-1 checkpoint (no halting)")
    d.add_argument("--stas", required=True, help="stage-2 checkpoint (stas-train --halting)")
    c = sub.add_parser("converted")
    c.add_argument("--model", required=True, help="model.safetensors written by stas-convert")
    c.add_argument("--dataset", default="fashion-mnist")
    c.add_argument("-T", "--timesteps", type=int, default=None)
    start = SpikingViT.halting_defaults  # the measured converted operating point
    c.add_argument("--alpha", type=float, default=start.alpha)
    c.add_argument("--beta", type=float, default=start.beta)
    c.add_argument("--accumulate", default="both")
    c.add_argument("--output", default="last", choices=["last", "mean_field"])
    c.add_argument("--compile", action="store_true",
                   help="SpikingViT.compile() first: the compiled unhalted and halted runs")
    c.add_argument("--score", default=start.score, choices=["mean", "current", "convergence"],
                   help="halting score signal (convergence: per-token depth, see README)")
    c.add_argument("--halted-kv", default="frozen", choices=["frozen", "drop"])
    c.add_argument("--speed-only", action="store_true",
                   help="only images/s (ANN pass, unhalted, mask, gather) and the token ratio")
    for q in (d, c):
        q.add_argument("--eps", type=float, default=None, help="override the halting eps")
        q.add_argument("--val-subset", type=int, default=None)
        q.add_argument("--batch-size", type=int, default=128)
        q.add_argument("--energy-images", type=int, default=512)
        q.add_argument("--timed-batches", type=int, default=8)
        q.add_argument("--rounds", type=int, default=3)
        q.add_argument("--out", default="runs/halting_bench")
    args = p.parse_args()
    from stas_core.kernels import keep_freed_memory

    malloc_tuned = keep_freed_memory()  # as the CLIs do; every configuration shares it
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = bench_direct(args) if args.path == "direct" else bench_converted(args)
    result.update({"bench": "halting", "wall_s": round(time.perf_counter() - start, 1),
                   "malloc_keeps_freed_memory": malloc_tuned,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count(), "machine": platform.machine(),
                   "load_average_1m_end": os.getloadavg()[0]})
    result["provenance"] = provenance_of_args(args)
    text = json.dumps(result, indent=2)
    name = args.path + ("_speed" if getattr(args, "speed_only", False) else "")
    (Path(args.out) / f"{name}.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
