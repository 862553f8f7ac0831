"""Open question 1 of STAS on event input: vanilla SPS against I-SPS (max, mean, learned).

    OMP_NUM_THREADS=1 python bench/research/event_bench.py [--seeds 0 1 2] [--model spikformer-2-64]
        [-T 4] [--train-subset 4000] [--val-subset 2000] [--out runs/event_bench]

Does folding T event frames into one token set (I-SPS) lose the timing the events carry?
Per seed, on the same seeded ``fashion-mnist-dvs`` subsets (frames ``[T, 2, 28, 28]``, T =
the timesteps) and budget, for each patch splitting (``vanilla``: frame t at timestep t;
``integrated-max`` / ``-mean`` / ``-learned``: every frame through the stack, integrated):

* ``<variant>/stage1``: stage 1 (no halting), ``--stage1-epochs`` epochs;
* ``<variant>/hand``: STAS stage 2 from it, ``--stage2-epochs`` epochs, with the hand-set
  halting knobs of ``bench/research/ablations.py`` (:data:`ablations.HAND`), and the trivial
  baseline its summary carries (the same model without halting, stopped after t = 1..T).

Then a timing probe (every stage-1 model on the test frames in reverse time order: a model
that ignores timing scores the same) and the images/s of every model at batch 128,
measured side by side in this process (round robin, best of ``--speed-repeats``). Top-1
is on ``--val-subset`` test images: a binomial std of sqrt(p (1 - p) / n) each.
Resumable (``bench/research/ablations.py``'s train-or-reuse runs); the JSON, Markdown and PNG are
rewritten after every run into ``--results`` (default ``bench/research/results``) as
``event_bench.*``, next to ``event_samples.png`` (six test recordings as ON/OFF frames).
Each seed takes about 10-15 minutes on one core. Run by hand, never in CI.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ablations import (HAND, STAGE1_LR, STAGE2_LR, Runs, _fmt, _ms, _paired,  # bench/ sibling
                       interval_tables, paired_top1, versus_stage1, versus_t1)
from halting import Halted
from stas_core.provenance import provenance_of_args
from stas_core.checkpoint import atomic_write, atomic_write_text
from stas_core.data import build_datasets
from stas_core.evaluate import evaluate
from stas_core.train import load_trained_model

logger = logging.getLogger("bench.event_bench")

DATASET = "fashion-mnist-dvs"
VARIANTS = {"vanilla": ("vanilla", "max"), "integrated-max": ("integrated", "max"),
            "integrated-mean": ("integrated", "mean"),
            "integrated-learned": ("integrated", "learned")}
REPO = Path(__file__).resolve().parents[2]


class EventRuns(Runs):
    """:class:`ablations.Runs` on the event set; a variant names SPS and integration."""

    def __init__(self, args) -> None:
        super().__init__(args)
        self.common["dataset"] = DATASET
        self.common["augment"] = False

    def stage1(self, variant: str, seed: int) -> dict:
        sps, integrate = VARIANTS[variant]
        return self._train(f"{variant}/stage1/seed{seed}", sps=sps, integrate=integrate,
                           seed=seed, epochs=self.args.stage1_epochs, lr=STAGE1_LR)


def _rel(path) -> str:
    """A repository-relative path where the file lies in the repository."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(path)


def _binomial_std(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def _stage1_record(s: dict) -> dict:
    return {"top1": s["top1"], "top1_binomial_std": _binomial_std(s["top1"], s["test_images"]),
            "test_images": s["test_images"], "energy_mj": s["energy_mj"],
            "full_mj": s["energy"]["full_mj"], "per_t": s["per_t"],
            "train_s": sum(h["epoch_s"] for h in s["history"]), "checkpoint": _rel(s["checkpoint"])}


def _stage2_record(s: dict) -> dict:
    # the stage-1 model stopped after t: not the halting-trained weights run without
    # halting, which degrade and would make a crippled baseline
    base = s["baseline"]["stage1"]
    paired = {ledger: {name: {k: v.get(k) for k in ("difference", "ci95")}
                       for name, v in vs.items()}
              for ledger, vs in s["baselines"]["vs"].items()}
    return {"top1": s["top1"], "top1_binomial_std": _binomial_std(s["top1"], s["test_images"]),
            "test_images": s["test_images"], "energy_mj": s["energy_mj"],
            "full_mj": s["energy"]["full_mj"], "token_ratio": s["token_ratio"],
            "fewer_timesteps": {k: base[k] for k in ("t", "top1", "energy_mj", "full_energy_mj")},
            "vs_fewer_timesteps": base["vs_halted"],
            "vs_fewer_timesteps_full": base["vs_halted_full"],
            "vs": paired,  # the stage-1 hull and early exit, 95% intervals over images
            "train_s": sum(h["epoch_s"] for h in s["history"]), "checkpoint": _rel(s["checkpoint"])}


def speed(results: dict, args, repeats: int) -> dict:
    """Inference images/s at batch 128 on the test subset, every model side by side."""
    _, val, _ = build_datasets(DATASET, val_subset=args.val_subset, seed=0, augment=False,
                               frames=args.timesteps)
    batches = list(DataLoader(val, batch_size=128, shuffle=False))
    models = {}
    for key in ("stage1", "hand"):
        for variant in VARIANTS:
            rec = results["runs"].get(f"{variant}/{key}", {}).get(str(args.seeds[0]))
            if rec is None:
                continue
            model, cfg = load_trained_model(_abs(rec["checkpoint"]))
            runner = Halted(model, cfg.halting_config()) if key == "hand" else model
            models[f"{variant}/{key}"] = runner
    best = {name: 0.0 for name in models}
    for _ in range(repeats):  # round robin: every model sees the same machine load
        for name, runner in models.items():
            ev = evaluate(runner, batches, torch.device("cpu"))
            best[name] = max(best[name], ev["images_per_s"])
    return {"images_per_s": best, "batch": 128, "images": len(val), "repeats": repeats,
            "seed": args.seeds[0]}


@torch.no_grad()
def timing_probe(results: dict, args) -> dict:
    """How much each stage-1 model uses the order of its frames: top-1 on the test frames
    as recorded and with the frame order reversed (polarities kept; per seed, on that
    seed's test subset). A model that ignores the order scores the same on both."""
    out = {}
    for seed in args.seeds:
        _, val, _ = build_datasets(DATASET, val_subset=args.val_subset, seed=seed,
                                   augment=False, frames=args.timesteps)
        batches = list(DataLoader(val, batch_size=256, shuffle=False))
        for variant in VARIANTS:
            rec = results["runs"].get(f"{variant}/stage1", {}).get(str(seed))
            if rec is None:
                continue
            model, _ = load_trained_model(_abs(rec["checkpoint"]))
            hits = {"recorded": 0, "reversed": 0}
            for x, y in batches:
                hits["recorded"] += int((model(x).argmax(-1) == y).sum())
                hits["reversed"] += int((model(x.flip(1)).argmax(-1) == y).sum())
            n = len(val)
            out.setdefault(variant, {})[str(seed)] = {
                "top1": hits["recorded"] / n, "top1_reversed": hits["reversed"] / n,
                "drop": (hits["recorded"] - hits["reversed"]) / n, "images": n}
    return out


def _abs(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO / path


def aggregate(results: dict) -> dict:
    variants = {}
    for name, per_seed in results["runs"].items():
        rows = list(per_seed.values())
        variants[name] = {k: _ms([r[k] for r in rows])
                          for k in ("top1", "energy_mj", "full_mj", "token_ratio")
                          if rows and all(r.get(k) is not None for r in rows)}
    pairs = {}
    for stage in ("stage1", "hand"):
        for variant in VARIANTS:
            if variant == "vanilla":
                continue
            a = results["runs"].get(f"{variant}/{stage}")
            b = results["runs"].get(f"vanilla/{stage}")
            if not a or not b:
                continue
            seeds = sorted(set(a) & set(b))
            keys = ("top1", "energy_mj", "full_mj") + (("token_ratio",) if stage == "hand" else ())
            for key in keys:
                pairs[f"{variant} - vanilla ({stage}): {key}"] = _paired(
                    [a[s][key] for s in seeds], [b[s][key] for s in seeds])
    absolute = {"runs": {name: {s: {**r, "checkpoint": str(_abs(r["checkpoint"]))}
                                for s, r in per_seed.items()}
                         for name, per_seed in results["runs"].items()}}
    images = {}  # the same test recordings for every run: paired over them, then seeds
    for stage in ("stage1", "hand"):
        for variant in VARIANTS:
            a, b = f"{variant}/{stage}", f"vanilla/{stage}"
            if variant != "vanilla" and a in results["runs"] and b in results["runs"]:
                images[f"{variant} - vanilla ({stage})"] = paired_top1(absolute, a, b)
    stage1 = {name: versus_stage1(absolute, name) for name, per_seed in results["runs"].items()
              if any(r.get("vs") for r in per_seed.values())}
    first = {name: versus_t1(absolute, name, f"{name.split('/')[0]}/stage1") for name in stage1
             if f"{name.split('/')[0]}/stage1" in results["runs"]}
    probe = {}
    for variant, per_seed in (results.get("timing_probe") or {}).items():
        rows = list(per_seed.values())
        probe[variant] = {k: _ms([r[k] for r in rows]) for k in ("top1", "top1_reversed", "drop")}
    return {"variants": variants, "paired": pairs, "paired_top1": images,
            "vs_stage1": stage1, "vs_stage1_t1": first, "timing_probe": probe}


def markdown(results: dict) -> str:
    s, agg = results["settings"], results["aggregate"]
    n = s["val_subset"]
    lines = [f"# Event input: vanilla SPS vs I-SPS ({DATASET}, {s['model']}, T={s['timesteps']} "
             f"frames = timesteps, seeds {s['seeds']}, {s['train_subset']} train / {n} test)",
             "", f"Mean ± std over seeds. One top-1 on {n} test images has a binomial std of "
             f"about {100 * _binomial_std(0.75, n):.1f} points (at 75 %). Energy per image; "
             "'hand' = STAS stage 2 with the hand-set knobs " + json.dumps(HAND) + ".", "",
             "| variant | top-1 % | energy (mJ, conventional) | energy (mJ, full ledger) | "
             "token ratio | images/s (batch 128) |", "|---|---|---|---|---|---|"]
    ips = (results.get("speed") or {}).get("images_per_s", {})
    for name, v in agg["variants"].items():
        lines.append(f"| {name} | {_fmt(v['top1'], 100)} | {_fmt(v['energy_mj'], 1, 4)} | "
                     f"{_fmt(v['full_mj'], 1, 4)} | "
                     + (_fmt(v["token_ratio"], 1, 3) if "token_ratio" in v else "1") + " | "
                     + (f"{ips[name]:.0f}" if name in ips else "n/a") + " |")
    lines += ["", "| paired difference (per seed) | mean ± std | per seed |", "|---|---|---|"]
    for name, p in agg["paired"].items():
        scale = 100 if name.endswith("top1") else 1
        lines.append(f"| {name} | {_fmt(p, scale, 3 if scale == 1 else 2)} | "
                     + ", ".join(f"{v * scale:+.4g}" for v in p["values"]) + " |")
    lines += interval_tables(agg)
    if agg.get("timing_probe"):
        lines += ["", "Does the model use the order of the frames? Stage-1 top-1 on the test "
                  "frames as recorded and with their order reversed (polarities kept), "
                  "mean ± std over seeds:", "",
                  "| variant | recorded % | time-reversed % | drop (points) |", "|---|---|---|---|"]
        for variant, v in agg["timing_probe"].items():
            lines.append(f"| {variant} | {_fmt(v['top1'], 100)} | {_fmt(v['top1_reversed'], 100)} "
                         f"| {_fmt(v['drop'], 100)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, variant in enumerate(VARIANTS):
        for stage, marker in (("stage1", "o"), ("hand", "s")):
            v = results["aggregate"]["variants"].get(f"{variant}/{stage}")
            if not v:
                continue
            ax1.errorbar(v["energy_mj"]["mean"], 100 * v["top1"]["mean"],
                         xerr=v["energy_mj"]["std"], yerr=100 * v["top1"]["std"], fmt=marker,
                         color=f"C{i}", capsize=3, label=f"{variant} {stage}")
        rows = list(results["runs"].get(f"{variant}/stage1", {}).values())
        if rows:
            ts = [p["t"] for p in rows[0]["per_t"]]
            ax2.plot(ts, [100 * statistics.fmean(r["per_t"][t - 1]["top1"] for r in rows)
                          for t in ts], "o-", color=f"C{i}", label=variant)
    ax1.set_xlabel("energy per image (mJ, conventional)")
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title("stage 1 (o) and STAS stage 2 (s), mean ± std over seeds", fontsize=8)
    ax1.legend(fontsize=6)
    ax2.set_xlabel("timesteps run (stage 1, no halting)")
    ax2.set_ylabel("top-1 (%)")
    ax2.set_title("stopping after t timesteps", fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def samples_png(path: Path, frames: int) -> None:
    """A few fashion-mnist-dvs test recordings as ON/OFF frames (the data, documented)."""
    from stas_core.events import save_event_samples_png

    _, val, _ = build_datasets(DATASET, augment=False, frames=frames)
    names = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
             "bag", "ankle boot"]
    save_event_samples_png(val, path, samples=6, classes=names)


def write(results: dict, root: Path, args) -> None:
    results["aggregate"] = aggregate(results)
    results["provenance"] = provenance_of_args(
        args, seeds=args.seeds, images={"test": build_datasets(
            DATASET, val_subset=args.val_subset, augment=False, frames=args.timesteps)[1]},
        chose="val", reported="test",
        checkpoints=[_abs(r["checkpoint"]) for per in results["runs"].values()
                     for r in per.values()])
    atomic_write_text(root / "event_bench.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(root / "event_bench.md", markdown(results))
    plot(results, root / "event_bench.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="spikformer-2-64")
    p.add_argument("-T", "--timesteps", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--stage1-epochs", type=int, default=1)
    p.add_argument("--stage2-epochs", type=int, default=1)
    p.add_argument("--energy-images", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--out", default="runs/event_bench", help="training runs")
    p.add_argument("--results", default="bench/research/results", help="event_bench.{json,md,png}")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    runs, root = EventRuns(args), Path(args.results)
    samples_png(root / "event_samples.png", args.timesteps)
    results = {"bench": "event_bench", "dataset": DATASET,
               "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "results")},
                            "stage1_lr": STAGE1_LR, "stage2_lr": STAGE2_LR, "hand_knobs": HAND,
                            "subset_seed": "the run's seed (TrainConfig.seed)"},
               "runs": {}}
    for seed in args.seeds:  # seed-major: partial results cover whole seeds
        for variant in args.variants:
            s1 = runs.stage1(variant, seed)
            results["runs"].setdefault(f"{variant}/stage1", {})[str(seed)] = _stage1_record(s1)
            s2 = runs.stage2("hand", variant, seed, halting=True, **HAND)
            results["runs"].setdefault(f"{variant}/hand", {})[str(seed)] = _stage2_record(s2)
            write(results, root, args)
    results["timing_probe"] = timing_probe(results, args)
    results["speed"] = speed(results, args, args.speed_repeats)
    results.update({"wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "machine": platform.machine()})
    write(results, root, args)
    print(json.dumps(results["aggregate"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
