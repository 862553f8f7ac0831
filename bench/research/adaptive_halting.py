"""Token halting on a converted ViT against the baselines a reviewer names, chosen on a
validation split and reported on a fixed test split.

    python bench/research/adaptive_halting.py --model runs/convert/model.safetensors [-T 8] \\
        [--val-images 512] [--test-images 2000] [--budgets 0.25 0.5 0.75] [--out runs/adaptive]

Candidates: the published constant-score point (alpha 0: ``sigmoid(beta)`` for every
token, a uniform truncation) and a grid of the convergence score. Every candidate runs on
``--val-images`` held-out *training* images (never trained on, never reported); one
candidate per ``--budgets`` share of the unhalted model's energy, the one with the
largest smaller-of-two gains within it (against the fewer-timesteps hull and against the
early-exit hull, conventional ledger), goes on, with the published point, to
``--test-images`` test images (the same for every model and seed), where each is reported
by :func:`stas_core.baselines.halting_baselines`: paired 95% intervals against the convex
hull of fewer timesteps and against per-image early exit (SEENN-I), and early exit on top
of token halting against each alone, under both ledgers. Per-image answers go to
``predictions.npz``. Prints one JSON object, writes ``adaptive_halting.json`` and
``adaptive_halting.png`` to ``--out``; a finished run's JSON is not redone (``--force``
redoes it, reusing the screened candidates and the test runs it left). The threshold of
early exit on top of token halting is chosen on the validation split too.
``--combine OUT1 OUT2 ... --to FILE`` sets several finished runs (independently trained
ANNs) side by side with Student-t intervals over them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from halting import HaltingConfig
from stas_core.baselines import (choose_combination_threshold, collect_anytime, early_exit,
                                 fewer_timesteps, halting_baselines, load_runs, versus_curve)
from stas_core.checkpoint import atomic_write, atomic_write_text
from stas_core.data import build_datasets, split_record
from stas_core.provenance import provenance, save_predictions

DEVICE = torch.device("cpu")
PUBLISHED = "constant score (alpha 0, beta -3.25, published)"
#: what early exit on top of token halting is measured against
PARTS = ("early_exit", "token_halting", "fewer_timesteps")


def save_screen(path: Path, images: dict, steps: int, screened: dict) -> None:
    atomic_write_text(path, json.dumps({"images": images, "timesteps": steps,
                                        "screened": screened}) + "\n")


def _finished_test_runs(out: Path, images: dict) -> dict:
    """Test-split runs an earlier run of this bench left in ``out`` (its JSON names which
    configuration each ``predictions.npz`` entry is), when its test images are these:
    ``{"unhalted": (run, None), name: (run, depth statistics)}``."""
    path, npz = out / "adaptive_halting.json", out / "predictions.npz"
    if not (path.is_file() and npz.is_file()):
        return {}
    earlier = json.loads(path.read_text())
    if earlier["provenance"]["images"].get("test") != images:
        return {}
    runs = load_runs(npz)
    done = {"unhalted": (runs["unhalted"], None)}
    for name, f in earlier["final"].items():
        r = runs[f["predictions_key"]]
        done[name] = (r, {k: f[k] for k in f if k.startswith("depth_")})
    return done


def choose_finalists(screened: dict, full_energy: float, budgets) -> dict:
    """For each budget (a share of the unhalted model's conventional energy at T), the
    candidate within it whose smaller gain against the two baselines is largest: one
    operating point per budget, all chosen on the validation split (``{share: name}``)."""
    out = {}
    for share in budgets:
        within = [n for n, r in screened.items() if r["energy_mj"] <= share * full_energy
                  and r["selection_score"] is not None]
        if within:
            out[str(share)] = max(within, key=lambda n: screened[n]["selection_score"])
    return out


def _depth(run, prefix: int) -> dict:
    d = run.depth[:, prefix:]  # patch tokens (the class token never halts)
    return {"depth_mean": float(d.mean()), "depth_min": float(d.min()),
            "depth_max": float(d.max()), "depth_std_over_tokens": float(d.std()),
            "depth_std_within_image": float(d.std(axis=1).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the converted model (stas-convert's model.safetensors)")
    p.add_argument("-T", "--timesteps", type=int, default=None)
    p.add_argument("--val-images", type=int, default=512)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--energy-images", type=int, default=256)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="energy budgets, as shares of the unhalted model's at T: one finalist "
                        "each (chosen on the validation split)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--betas", type=float, nargs="+", default=[-8.0, -6.0, -4.0])
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--score", default="convergence", choices=["convergence", "mean", "current"])
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--out", default="runs/adaptive")
    p.add_argument("--force", action="store_true", help="redo a finished run")
    p.add_argument("--combine", nargs="+", metavar="OUT",
                   help="instead of a run: combine finished runs' --out folders into --to")
    p.add_argument("--to", default="adaptive_halting_seeds.json")
    args = p.parse_args()
    if args.combine:
        print(json.dumps(combine(args.combine, Path(args.to)), indent=2))
        return 0
    if not args.model:
        p.error("--model is required (or --combine)")
    from convert.pipeline import load_converted

    out = Path(args.out)
    if (out / "adaptive_halting.json").is_file() and not args.force:
        print((out / "adaptive_halting.json").read_text())
        return 0
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    snn = load_converted(args.model).set_halted_kv("frozen")
    steps = args.timesteps or snn.timesteps
    snn.timesteps = steps
    prefix = int(snn.num_prefix_tokens)
    _, val, _ = build_datasets("fashion-mnist", split="val", val_subset=args.val_images,
                               augment=False)
    _, test, _ = build_datasets("fashion-mnist", split="test", val_subset=args.test_images,
                                augment=False)
    loaders = {name: DataLoader(ds, batch_size=128, shuffle=False)
               for name, ds in (("val", val), ("test", test))}
    candidates = {PUBLISHED: HaltingConfig(alpha=0.0, beta=-3.25, eps=0.01)}
    for a, b in itertools.product(args.alphas, args.betas):
        candidates[f"{args.score} (alpha {a:g}, beta {b:g})"] = HaltingConfig(
            alpha=a, beta=b, eps=args.eps, score=args.score)
    run = lambda split, cfg=None: collect_anytime(  # noqa: E731
        snn, loaders[split], DEVICE, timesteps=steps, halting=cfg,
        energy_images=args.energy_images)

    # ---- selection: the validation split only
    base_val = run("val")
    curves_val = {"fewer_timesteps": fewer_timesteps(base_val), "early_exit": early_exit(base_val)}
    cache = out / "screened.json"  # a screened candidate is not run again
    images = split_record(val)
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    if kept.get("images") != images or kept.get("timesteps") != steps:
        kept = {}
    screened = {}
    for name, cfg in candidates.items():
        if name in kept.get("screened", {}):
            screened[name] = kept["screened"][name]
            continue
        r = run("val", cfg)
        point = r.correct[-1].astype(np.float64)
        vs = {n: versus_curve(point, float(r.energy_mj[-1]), c, "conventional",
                              resamples=args.resamples)
              for n, c in curves_val.items()}
        gains = [v["difference"] for v in vs.values()]
        screened[name] = {"top1": float(point.mean()), "energy_mj": float(r.energy_mj[-1]),
                          "full_energy_mj": float(r.full_energy_mj[-1]),
                          "vs": {n: {k: v.get(k) for k in ("difference", "ci95")}
                                 for n, v in vs.items()},
                          "selection_score": None if None in gains else min(gains),
                          "combination_threshold": choose_combination_threshold(base_val, r)}
        print(json.dumps({name: screened[name]}), file=sys.stderr, flush=True)
        save_screen(cache, images, steps, screened)
    by_budget = choose_finalists(screened, float(base_val.energy_mj[-1]), args.budgets)
    finalists = list(dict.fromkeys(by_budget.values()))
    if PUBLISHED not in finalists:
        finalists.append(PUBLISHED)
    for name in finalists:  # screened before the combination's threshold was chosen on val
        if "combination_threshold" not in screened[name]:
            screened[name]["combination_threshold"] = choose_combination_threshold(
                base_val, run("val", candidates[name]))
            save_screen(cache, images, steps, screened)

    # ---- report: the test split, the same images for every model and seed
    done = _finished_test_runs(out, split_record(test))  # name -> (run, depth stats)
    base_test = done["unhalted"][0] if "unhalted" in done else run("test")
    final, runs = {}, {"unhalted": base_test}
    for i, name in enumerate(finalists):
        r, depth = done[name] if name in done else (None, None)
        if r is None:
            r = run("test", candidates[name])
            depth = _depth(r, prefix)
        runs[f"finalist{i}"] = r
        final[name] = {"config": candidates[name].__dict__, "predictions_key": f"finalist{i}",
                       **depth, **halting_baselines(
                           base_test, r, resamples=args.resamples,
                           combination_threshold=screened[name]["combination_threshold"])}
    preds = save_predictions(out / "predictions.npz", base_test.labels, runs)
    result = {
        "bench": "adaptive_halting", "timesteps": steps,
        "selection": {"split": "val", "rule": "per energy budget (a share of the unhalted "
                                              "model's energy at T), the candidate within it "
                                              "with the largest min(gain vs fewer-timesteps "
                                              "hull, gain vs early-exit hull), conventional "
                                              "ledger", "by_budget": by_budget,
                      "screened": screened, "finalists": finalists},
        "reported_on": "test", "final": final, "predictions": preds,
        "provenance": provenance(checkpoints=[args.model], images={"val": val, "test": test},
                                 chose="val", reported="test"),
        "wall_s": round(time.perf_counter() - start, 1)}
    _plot(result, out / "adaptive_halting.png")
    atomic_write_text(out / "adaptive_halting.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({n: {"top1": f["halted"]["top1"], "energy_mj": f["halted"]["energy_mj"],
                          "vs": {led: {k: v["difference"] for k, v in f["vs"][led].items()}
                                 for led in f["vs"]}}
                      for n, f in final.items()}, indent=2))
    return 0


def combine(paths: list[str], to: Path) -> dict:
    """Several finished runs (one per independently trained ANN): for each, the candidate
    chosen first on its validation split, measured on the test split; then Student-t 95%
    intervals over the runs' paired differences."""
    from stas_core.stats import seed_interval

    rows = []
    for path in paths:
        r = json.loads((Path(path) / "adaptive_halting.json").read_text())
        for share, chosen in r["selection"]["by_budget"].items():
            f = r["final"][chosen]
            row = {"run": Path(path).name, "budget": float(share), "chosen_on_val": chosen,
                   "test_images": f["images"], "halted": f["halted"],
                   "unhalted_T": f["curves"]["fewer_timesteps"]["points"][-1],
                   "depth_mean": f["depth_mean"]}
            for ledger in ("conventional", "full"):
                row[ledger] = {n: {k: v.get(k) for k in ("difference", "ci95")}
                               for n, v in f["vs"][ledger].items()}
                c = f["combination"][ledger]["chosen"]  # threshold chosen on val
                key = "energy_mj" if ledger == "conventional" else "full_energy_mj"
                row[ledger]["combination"] = {
                    "threshold": c["param"], "top1": c["top1"], key: c[key],
                    **{f"vs_{n}": {k: c[f"vs_{n}"].get(k) for k in ("difference", "ci95")}
                       for n in PARTS}}
            rows.append(row)
    over = {}
    for share in sorted({row["budget"] for row in rows}):
        at = [row for row in rows if row["budget"] == share]
        for ledger in ("conventional", "full"):
            for n in ("fewer_timesteps", "early_exit"):
                d = [row[ledger][n]["difference"] for row in at]
                over[f"budget {share:g}/{ledger}/vs_{n}"] = (
                    None if None in d else seed_interval(d))
            for n in PARTS:
                d = [row[ledger]["combination"][f"vs_{n}"]["difference"] for row in at]
                over[f"budget {share:g}/{ledger}/combination_vs_{n}"] = (
                    None if None in d else seed_interval(d))
    result = {"bench": "adaptive_halting_seeds", "runs": rows, "over_runs": over}
    atomic_write_text(to, json.dumps(result, indent=2) + "\n")
    return result


def _plot(result: dict, path: Path) -> None:
    """Test split: the baselines' curves (hulls dashed) and each finalist, conventional
    ledger on the left, full ledger on the right."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    first = next(iter(result["final"].values()))
    for ax, (ledger, key) in zip(axes, (("conventional", "energy_mj"), ("full", "full_energy_mj"))):
        for j, (name, style) in enumerate((("fewer_timesteps", "o-"), ("early_exit", ".-"))):
            c = first["curves"][name]
            e = [pt[key] for pt in c["points"]]
            a = [100 * pt["top1"] for pt in c["points"]]
            ax.plot(e, a, style, color=f"C{j}", ms=4, label=name.replace("_", " "))
            h = c["hull"][ledger]
            ax.plot([e[i] for i in h], [a[i] for i in h], "--", color=f"C{j}", lw=0.8)
        for i, (name, f) in enumerate(result["final"].items()):
            combo = f["curves"]["token_halting+early_exit"]["points"]
            ax.plot([pt[key] for pt in combo], [100 * pt["top1"] for pt in combo], ":",
                    color=f"C{i + 2}", lw=1)
            ax.scatter([f["halted"][key]], [100 * f["halted"]["top1"]], marker="*", s=140,
                       color=f"C{i + 2}", zorder=3, label=name)
        ax.set(xlabel=f"energy per image (mJ, {ledger} ledger)", ylabel="top-1 (%)",
               title=f"converted ViT, T={result['timesteps']}, test split, "
                     f"{first['images']} images")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


if __name__ == "__main__":
    sys.exit(main())
