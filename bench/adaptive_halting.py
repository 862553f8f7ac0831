"""Does halting on a converted ViT adapt per token, and does it beat running fewer timesteps?

    python bench/adaptive_halting.py --model runs/convert/model.safetensors [-T 8] \\
        [--screen-images 500] [--val-images 2000] [--finalists 3] [--out runs/adaptive]

The trivial baseline is the same SNN without halting stopped after t = 1..T (top-1 on the
validation images, energy per image under both ledgers). Candidates: the published
constant-score point (alpha 0: ``sigmoid(beta)`` for every token, a uniform truncation)
and a grid of the convergence score (``HaltingConfig(score='convergence')``: how settled
each token's running mean is). Every candidate is screened on the first
``--screen-images`` images against the baseline on the same images; the ``--finalists``
with the largest top-1 gain at equal energy are measured on ``--val-images`` images, with
the standard deviation of per-token depth and a depth heat map. Prints one JSON object,
writes ``adaptive_halting.json`` and ``adaptive_halting.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from halting import HaltingConfig, run_halting
from stas_core.checkpoint import atomic_write, atomic_write_text
from stas_core.data import build_datasets
from stas_core.evaluate import against_baseline, save_depth_heatmap, timestep_baseline

DEVICE = torch.device("cpu")


@torch.no_grad()
def evaluate(snn, batches, cfg: HaltingConfig, energy_images: int) -> dict:
    """Top-1, token ratio, per-token depth statistics, energy (both ledgers)."""
    from stas_core.energy import OpCounter

    correct = total = 0
    ratio = 0.0
    depths = []
    counter = OpCounter(snn)
    for x, y in batches:
        if counter.images < energy_images:
            with counter:
                res = run_halting(snn, x, cfg, on_timestep=counter.set_timestep)
            counter.add_images(len(y))
        else:
            res = run_halting(snn, x, cfg)
        correct += int((res.logits.argmax(-1) == y).sum())
        total += len(y)
        ratio += res.token_ratio * len(y)
        prefix = int(snn.num_prefix_tokens)
        depths.append(res.depth[:, prefix:].float())  # patch tokens (the class token never halts)
    depth = torch.cat(depths)
    s = counter.summary()
    return {"top1": correct / total, "images": total, "token_ratio": ratio / total,
            "energy_mj": s["energy_mj"], "full_energy_mj": s["ledger"]["full_mj"],
            "depth_mean": float(depth.mean()), "depth_min": float(depth.min()),
            "depth_max": float(depth.max()),
            "depth_std_over_tokens": float(depth.std()),  # all patch tokens of all images
            "depth_std_within_image": float(depth.std(dim=1).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("-T", "--timesteps", type=int, default=None)
    p.add_argument("--screen-images", type=int, default=500)
    p.add_argument("--val-images", type=int, default=2000)
    p.add_argument("--energy-images", type=int, default=256)
    p.add_argument("--finalists", type=int, default=3)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--betas", type=float, nargs="+", default=[-8.0, -6.0, -4.0])
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--score", default="convergence", choices=["convergence", "mean", "current"],
                   help="the score of the grid (mean: channel 0's running mean, e.g. after "
                        "stas-convert --halting-finetune)")
    p.add_argument("--out", default="runs/adaptive")
    args = p.parse_args()
    from convert.pipeline import load_converted

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    snn = load_converted(args.model).set_halted_kv("frozen")
    steps = args.timesteps or snn.timesteps
    snn.timesteps = steps
    _, val, _ = build_datasets("fashion-mnist", val_subset=args.val_images, augment=False)
    batches = list(DataLoader(val, batch_size=128, shuffle=False))
    n_screen = max(1, args.screen_images // 128)
    screen = batches[:n_screen]
    candidates = {"constant score (alpha 0, beta -3.25, published)":
                  HaltingConfig(alpha=0.0, beta=-3.25, eps=0.01)}
    for a, b in itertools.product(args.alphas, args.betas):
        candidates[f"{args.score} (alpha {a:g}, beta {b:g})"] = HaltingConfig(
            alpha=a, beta=b, eps=args.eps, score=args.score)
    base_screen = timestep_baseline(snn, screen, DEVICE, energy_images=args.energy_images)
    screened = {}
    for name, cfg in candidates.items():
        r = evaluate(snn, screen, cfg, args.energy_images)
        r["vs_baseline"] = against_baseline(r["top1"], r["energy_mj"], base_screen)
        screened[name] = r
        print(json.dumps({name: {k: r[k] for k in ("top1", "energy_mj", "token_ratio",
                                                   "depth_std_over_tokens")}}),
              file=sys.stderr, flush=True)

    def gain(item):
        g = item[1]["vs_baseline"]["top1_gain_at_equal_energy"]
        return -1.0 if g is None else g

    finalists = [n for n, _ in sorted(screened.items(), key=gain, reverse=True)[:args.finalists]]
    published = next(iter(candidates))
    if published not in finalists:
        finalists.append(published)
    base = timestep_baseline(snn, batches, DEVICE, energy_images=args.energy_images)
    final = {}
    out = Path(args.out)
    for i, name in enumerate(finalists):
        r = evaluate(snn, batches, candidates[name], args.energy_images)
        r["vs_baseline"] = against_baseline(r["top1"], r["energy_mj"], base)
        r["vs_baseline_full"] = against_baseline(r["top1"], r["full_energy_mj"], base,
                                                 energy_key="full_energy_mj")
        r["depth_map"] = save_depth_heatmap(snn, batches, DEVICE, candidates[name],
                                            out / f"depth_{i}.png")
        r["config"] = candidates[name].__dict__
        final[name] = r
    full_t = base["top1"][-1]
    result = {"bench": "adaptive_halting", "model": args.model, "timesteps": steps,
              "screen_images": sum(len(y) for _, y in screen),
              "baseline_screen": base_screen, "screened": screened,
              "baseline": base, "final": final, "full_T_top1": full_t,
              "wall_s": round(time.perf_counter() - start, 1)}
    _plot(result, out / "adaptive_halting.png")
    atomic_write_text(out / "adaptive_halting.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("final", "full_T_top1")}, indent=2))
    return 0


def _plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    from halting.plots import draw_baseline

    fig = Figure(figsize=(7, 4.6))
    ax = fig.subplots()
    draw_baseline(ax, result["baseline"])
    for i, (name, r) in enumerate(result["final"].items()):
        ax.scatter([r["energy_mj"]], [100 * r["top1"]], marker="*", s=150, color=f"C{i}",
                   zorder=3, label=f"{name}: depth std {r['depth_std_over_tokens']:.2f}")
    ax.set(xlabel="energy per image (mJ, conventional)", ylabel="top-1 (%)",
           title=f"converted ViT, T={result['timesteps']}, "
                 f"{result['baseline']['images']} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


if __name__ == "__main__":
    sys.exit(main())
