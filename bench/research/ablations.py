"""The paper's mechanism claims, retrained per variant with several seeds.

    python bench/research/ablations.py [--seeds 0 1 2] [--model spikformer-4-64] [-T 4]
        [--train-subset 12000] [--val-subset 2000] [--out runs/ablations] [--report-only]

Per seed, on the same seeded Fashion-MNIST subset and budget:

* ``<sps>/stage1``: stage 1 (no halting), ``--stage1-epochs`` epochs, for I-SPS and vanilla SPS;
* ``<sps>/backbone``: stage 1 trained ``--stage2-epochs`` more epochs *without* halting, at
  the stage-2 learning rate: the backbone with as many epochs as STAS (the fair baseline);
* ``<sps>/both``: STAS stage 2 from the same stage 1, with the knobs ``stas-tune`` found for
  that patch splitting (``--tune-trials`` trials each, on seed 0's stage 1: an equal trial
  budget); ``<sps>/hand``: the same with one shared hand-set choice (alpha 1, beta -1,
  eps 0.05, delta_p 1e-2, the knobs of the earlier one-seed ablation);
* ``integrated/block`` and ``integrated/time``: stage 2 retrained with each accumulation mode.

Then, at inference: an eps sweep of ``integrated/both`` per seed, and the temporal similarity
of block inputs (paper Fig. 2e) of both stage-1 models. Last, the fair converted-vs-direct
comparison: a timm ViT of about the same parameter count, trained here on the same subset
for as many epochs as stage 1 + stage 2, converted, and set against ``integrated/backbone``
through ``stas-compare`` (accuracy and energy against timesteps).

Splits: every run trains without the validation split; ``stas-tune`` picks the knobs on it;
everything is reported on the same ``--val-subset`` test images for every seed and variant
(a top-1 difference carries a paired 95% interval over those images per seed, then a
Student-t interval over the seeds; each halting run is set against its stage-1 model's
fewer-timesteps hull and per-image early exit).

Resumable: every run keeps its ``summary.json``; a rerun skips finished runs and resumes an
interrupted one from its ``last.safetensors``. Writes ``ablations.json``, ``ablations.md``
and ``ablations.png`` to ``--out`` and prints the JSON. Run by hand, never in CI.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from halting import HaltingConfig
from stas_core.provenance import provenance_of_args
from stas_core.baselines import halting_baselines, load_runs
from stas_core.stats import paired_bootstrap, seed_interval
from stas_core.checkpoint import atomic_write, atomic_write_text
from stas_core.data import build_datasets
from stas_core.evaluate import evaluate_halting
from stas_core.train import TrainConfig, load_trained_model, progress_bar, train

logger = logging.getLogger("bench.ablations")

HAND = dict(alpha=1.0, beta=-1.0, eps=0.05, delta_p=1e-2)
VARIANTS = ("backbone", "both", "hand", "block", "time")
EPS_SWEEP = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
STAGE1_LR, STAGE2_LR = 3e-3, 5e-4


def _read(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


class Runs:
    """Train-or-reuse: a run whose ``summary.json`` exists is read back, not retrained."""

    def __init__(self, args) -> None:
        self.args, self.root = args, Path(args.out)
        self.common = dict(model=args.model, timesteps=args.timesteps, batch_size=128,
                           train_subset=args.train_subset, val_subset=args.val_subset,
                           energy_images=args.energy_images, progress=False,
                           warmup_epochs=0.1, bn_images=2048, resume=True)

    def stage1(self, sps: str, seed: int) -> dict:
        return self._train(f"{sps}/stage1/seed{seed}", sps=sps, seed=seed,
                           epochs=self.args.stage1_epochs, lr=STAGE1_LR)

    def stage2(self, name: str, sps: str, seed: int, *, halting: bool, **knobs) -> dict:
        s1 = self.stage1(sps, seed)
        return self._train(f"{sps}/{name}/seed{seed}", seed=seed, init_from=s1["checkpoint"],
                           epochs=self.args.stage2_epochs, lr=STAGE2_LR, halting=halting,
                           **knobs)

    def _train(self, name: str, **kw) -> dict:
        out = self.root / name
        done = _read(out / "summary.json")
        if done is not None:
            return done
        logger.info("training %s", name)
        start = time.perf_counter()
        summary = train(TrainConfig(**{**self.common, **kw, "out": str(out)}))
        logger.info("%s: top-1 %.4f, %.4g mJ, %.0f s", name, summary["top1"],
                    summary["energy_mj"], time.perf_counter() - start)
        return summary


def tuned_knobs(runs: Runs, sps: str) -> dict:
    """alpha, beta, eps, delta_p that stas-tune picks on seed 0's stage 1 (best.json: the
    cheapest Pareto point within 1 point of the most accurate trial)."""
    from tuning.study import TuneConfig, run_study

    a = runs.args
    out = runs.root / f"tune_{sps}"
    # run_study continues a stored study until it has tune_trials finished trials
    run_study(TuneConfig(checkpoint=runs.stage1(sps, 0)["checkpoint"], n_trials=a.tune_trials,
                         train_subset=a.tune_train_subset, val_subset=a.tune_val_subset,
                         energy_images=a.energy_images, seed=0, out=str(out), progress=False))
    chosen = json.loads((out / "best.json").read_text())
    return {k: chosen[k] for k in ("alpha", "beta", "eps", "delta_p")}


def _val_batches(args) -> list:
    _, val_ds, _ = build_datasets("fashion-mnist", val_subset=args.val_subset, augment=False)
    return list(DataLoader(val_ds, batch_size=256, shuffle=False))


def eps_sweep(summary: dict, batches, energy_images: int) -> list[dict]:
    model, cfg = load_trained_model(summary["checkpoint"])
    base = cfg.halting_config()
    rows = []
    for eps in EPS_SWEEP:
        c = HaltingConfig(**{**base.__dict__, "eps": eps})
        r = evaluate_halting(model, batches, c, None, torch.device("cpu"),
                             energy_images=energy_images, execution="gather")
        rows.append({"eps": eps, **{k: r[k] for k in ("top1", "energy_mj", "token_ratio")}})
    return rows


def similarity(runs: Runs, seed: int) -> dict:
    from stas_core.analysis import similarity_report

    out = runs.root / f"similarity/seed{seed}.json"
    done = _read(out)
    if done is None:
        done = similarity_report({sps: runs.stage1(sps, seed)["checkpoint"]
                                  for sps in ("integrated", "vanilla")},
                                 max_images=512, val_subset=runs.args.val_subset)
        atomic_write_text(out, json.dumps(done) + "\n")
    return {sps: done["runs"][sps]["per_block"] for sps in ("integrated", "vanilla")}


def converted_vs_direct(runs: Runs) -> dict:
    """A timm ViT with about spikformer-4-64's parameters, trained on the same subset for
    stage 1 + stage 2 epochs, converted (T=8), against integrated/backbone (seed 0)."""
    from convert.compare import compare, load_run, plot as plot_compare, to_markdown
    from convert.pipeline import ConvertConfig, convert

    a = runs.args
    out = runs.root / "converted"
    report = _read(out / "report.json")
    if report is None:
        logger.info("training and converting the ViT")
        report = convert(ConvertConfig(
            model="vit_tiny", model_kwargs=dict(patch_size=4, embed_dim=64, depth=5, num_heads=4),
            train_epochs=a.stage1_epochs + a.stage2_epochs, train_lr=1e-3,
            train_subset=a.train_subset, val_subset=a.val_subset, timesteps=8,
            energy_images=a.energy_images, out=str(out), progress=False))
    direct = runs.stage2("backbone", "integrated", 0, halting=False)
    direct_path = runs.root / "integrated/backbone/seed0/summary.json"
    pair = [load_run(out / "report.json", "converted ViT"), load_run(direct_path, "direct backbone")]
    table = compare(pair)
    plot_compare(pair, runs.root / "converted_vs_direct.png")
    atomic_write_text(runs.root / "converted_vs_direct.md", to_markdown(table))
    return {"converted": {k: report.get(k) for k in ("top1", "per_t", "energy_mj", "reference",
                                                     "test_images")},
            "direct": {k: direct.get(k) for k in ("top1", "per_t",
                                                  "energy_mj", "test_images")},
            "compare": table}


def full_ledger(runs: Runs, results: dict) -> dict:
    """Both energy ledgers (stas_core.energy) of every trained run, re-measured from its
    checkpoint on the same ``--energy-images`` validation images: per variant and seed,
    conventional and full mJ, and the full ledger's terms."""
    from stas_core.evaluate import energy_report

    out = runs.root / "energy_full.json"
    kept = _read(out) or {}
    loader = DataLoader(build_datasets("fashion-mnist", val_subset=runs.args.val_subset,
                                       augment=False)[1], batch_size=128)
    for name, per_seed in results["runs"].items():
        for seed, rec in per_seed.items():
            if seed in kept.get(name, {}):
                continue
            model, cfg = load_trained_model(rec["checkpoint"])
            e = energy_report(model, loader, torch.device("cpu"),
                              max_images=runs.args.energy_images,
                              halting=cfg.halting_config())["energy"]
            kept.setdefault(name, {})[seed] = {k: e[k] for k in (
                "conventional_mj", "full_mj", "terms_mj", "ann_full_mj", "qann_full_mj",
                "qann_bits", "snn_vs_ann", "snn_vs_qann", "per_t")}
            atomic_write_text(out, json.dumps(kept) + "\n")
    return kept


# ----------------------------------------------------------------------------- report
def _ms(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "n": len(values), "values": values}


def _paired(a: list[float], b: list[float]) -> dict:
    d = [x - y for x, y in zip(a, b)]
    return {**_ms(d), "all_positive": all(x > 0 for x in d), "all_negative": all(x < 0 for x in d),
            "over_seeds": seed_interval(d)}


def _final_correct(record: dict) -> np.ndarray:
    """Each test image's correctness at the run's last timestep (halted if it halts), from
    the ``predictions.npz`` beside its checkpoint."""
    data = np.load(Path(record["checkpoint"]).parent / "predictions.npz")
    name = "halted" if "halted.pred" in data.files else "model"
    return data[f"{name}.pred"][-1] == data["labels"]


def paired_top1(results: dict, a: str, b: str) -> Optional[dict]:
    """Top-1 of ``a`` minus ``b``: per seed a paired bootstrap 95% interval over the same
    test images, then a Student-t interval over the seeds' differences."""
    def one(ra: dict, rb: dict, s: str) -> dict:
        ca, cb = _final_correct(ra), _final_correct(rb)
        if ca.shape != cb.shape:
            raise RuntimeError(f"{a} and {b} (seed {s}) were not measured on the same images")
        return {k: v for k, v in paired_bootstrap(ca.astype(float), cb.astype(float)).items()
                if k in ("difference", "ci95", "items", "excludes_zero")}

    return _over_seeds(results, a, b, one)


def _over_seeds(results: dict, a: str, b: str, one) -> Optional[dict]:
    """``one(record_a, record_b, seed)`` for every seed both runs have (each a dict with
    a ``difference``), and a Student-t interval over those differences; None without a
    common seed."""
    ra, rb = results["runs"].get(a, {}), results["runs"].get(b, {})
    seeds = sorted(set(ra) & set(rb), key=int)
    if not seeds:
        return None
    per_seed = {s: one(ra[s], rb[s], s) for s in seeds}
    return {"per_seed": per_seed,
            "over_seeds": seed_interval([v["difference"] for v in per_seed.values()])}


def versus_t1(results: dict, name: str, stage1: str) -> Optional[dict]:
    """A halting run against its stage-1 model stopped after t = 1, the cheapest point of
    the fewer-timesteps curve: a run cheaper than it lies outside the curve's reach, where
    the hull comparison says nothing. Per seed a paired bootstrap 95% interval over the
    test images, with both energies under both ledgers; Student-t over seeds."""
    def one(rec: dict, base: dict, s: str) -> dict:
        h = np.load(Path(rec["checkpoint"]).parent / "predictions.npz")
        b = np.load(Path(base["checkpoint"]).parent / "predictions.npz")
        if not np.array_equal(h["labels"], b["labels"]):
            raise RuntimeError(f"{name} and {stage1} (seed {s}) were not measured on the "
                               f"same images")
        halted = (h["halted.pred"][-1] == h["labels"]).astype(float)
        first = (b["model.pred"][0] == b["labels"]).astype(float)
        r = paired_bootstrap(halted, first)
        return {"difference": r["difference"], "ci95": r["ci95"],
                "energy_mj": float(h["halted.energy_mj"][-1]),
                "t1_energy_mj": float(b["model.energy_mj"][0]),
                "full_energy_mj": float(h["halted.full_energy_mj"][-1]),
                "t1_full_energy_mj": float(b["model.full_energy_mj"][0])}

    return _over_seeds(results, name, stage1, one)


def versus_stage1(results: dict, name: str) -> dict:
    """A halting run against its stage-1 model's fewer-timesteps hull and per-image early
    exit, recomputed from the run's ``predictions.npz`` (the stage-1 model's answers after
    every t beside the halted model's) with the library's current baselines; paired 95%
    intervals over the test images per seed, Student-t over seeds."""
    per: dict[str, dict] = {}
    for s, r in results["runs"][name].items():
        runs = load_runs(Path(r["checkpoint"]).parent / "predictions.npz")
        per[s] = halting_baselines(runs["unhalted"], runs["halted"])["vs"]
    out = {}
    for ledger in ("conventional", "full"):
        for base in ("fewer_timesteps", "early_exit"):
            rows = {s: {k: vs[ledger][base].get(k) for k in ("difference", "ci95")}
                    for s, vs in per.items()}
            d = [v["difference"] for v in rows.values()]
            out[f"{ledger}/vs_{base}"] = {"per_seed": rows, "over_seeds": None if None in d
                                          else seed_interval(d)}
    return out


def aggregate(results: dict) -> dict:
    """Mean +- std over seeds per variant, and per-seed paired differences."""
    variants: dict[str, dict] = {}
    for name, per_seed in results["runs"].items():
        rows = list(per_seed.values())
        variants[name] = {k: _ms([r[k] for r in rows]) for k in ("top1", "energy_mj", "token_ratio")
                          if all(r.get(k) is not None for r in rows)}
    pairs = {}

    def pair(label, a, b, key):
        if a in results["runs"] and b in results["runs"]:
            seeds = sorted(set(results["runs"][a]) & set(results["runs"][b]))
            pairs[f"{label}: {key}"] = _paired([results["runs"][a][s][key] for s in seeds],
                                               [results["runs"][b][s][key] for s in seeds])

    for key in ("top1", "energy_mj"):
        pair("STAS - backbone (I-SPS)", "integrated/both", "integrated/backbone", key)
        pair("I-SPS - vanilla (tuned, halting)", "integrated/both", "vanilla/both", key)
        pair("I-SPS - vanilla (hand-set, halting)", "integrated/hand", "vanilla/hand", key)
        pair("I-SPS - vanilla (backbones)", "integrated/backbone", "vanilla/backbone", key)
        pair("both - block", "integrated/both", "integrated/block", key)
        pair("both - time", "integrated/both", "integrated/time", key)
    full = results.get("energy_full") or {}
    for name, per_seed in full.items():
        if name in variants:
            variants[name]["full_mj"] = _ms([r["full_mj"] for r in per_seed.values()])
    for label, a, b in (("STAS - backbone (I-SPS)", "integrated/both", "integrated/backbone"),
                        ("both - block", "integrated/both", "integrated/block"),
                        ("both - time", "integrated/both", "integrated/time")):
        if a in full and b in full:
            seeds = sorted(set(full[a]) & set(full[b]))
            pairs[f"{label}: full_mj"] = _paired([full[a][k]["full_mj"] for k in seeds],
                                                 [full[b][k]["full_mj"] for k in seeds])
    for key in ("token_ratio",):
        pair("I-SPS - vanilla (tuned, halting)", "integrated/both", "vanilla/both", key)
        pair("I-SPS - vanilla (hand-set, halting)", "integrated/hand", "vanilla/hand", key)
        pair("both - block", "integrated/both", "integrated/block", key)
        pair("both - time", "integrated/both", "integrated/time", key)
    images = {}  # the same test images for every run: paired over images, then seeds
    for label, a, b in (("STAS - backbone (I-SPS)", "integrated/both", "integrated/backbone"),
                        ("STAS hand-set - backbone (I-SPS)", "integrated/hand",
                         "integrated/backbone"),
                        ("I-SPS - vanilla (tuned, halting)", "integrated/both", "vanilla/both"),
                        ("I-SPS - vanilla (hand-set, halting)", "integrated/hand", "vanilla/hand"),
                        ("I-SPS - vanilla (backbones)", "integrated/backbone", "vanilla/backbone"),
                        ("I-SPS - vanilla (stage 1)", "integrated/stage1", "vanilla/stage1"),
                        ("both - block", "integrated/both", "integrated/block"),
                        ("both - time", "integrated/both", "integrated/time")):
        if a in results["runs"] and b in results["runs"]:
            images[label] = paired_top1(results, a, b)
    stage1 = {name: versus_stage1(results, name) for name, per_seed in results["runs"].items()
              if any(r.get("vs") for r in per_seed.values())}
    first = {name: versus_t1(results, name, f"{name.split('/')[0]}/stage1")
             for name in stage1 if f"{name.split('/')[0]}/stage1" in results["runs"]}
    return {"variants": variants, "paired": pairs, "paired_top1": images,
            "vs_stage1": stage1, "vs_stage1_t1": first}


def _fmt(ms: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def markdown(results: dict) -> str:
    agg, s = results["aggregate"], results["settings"]
    lines = [f"# Ablations ({s['model']}, T={s['timesteps']}, seeds {s['seeds']}, "
             f"{s['train_subset']} train / {s['val_subset']} test images)", "",
             "| variant | top-1 % | energy (mJ, conventional) | energy (mJ, full ledger) | "
             "token ratio |", "|---|---|---|---|---|"]
    for name, v in agg["variants"].items():
        full = _fmt(v["full_mj"], 1, 3) if "full_mj" in v else "n/a"
        lines.append(f"| {name} | {_fmt(v['top1'], 100)} | {_fmt(v['energy_mj'], 1, 4)} | "
                     f"{full} | "
                     + (_fmt(v["token_ratio"], 1, 3) if "token_ratio" in v else "1") + " |")
    lines += ["", "| paired difference (per seed) | mean ± std | per seed |", "|---|---|---|"]
    for name, p in agg["paired"].items():
        scale = 100 if name.endswith("top1") else 1
        lines.append(f"| {name} | {_fmt(p, scale, 3)} | "
                     + ", ".join(f"{v * scale:+.3f}" for v in p["values"]) + " |")
    lines += interval_tables(agg)
    if results.get("knobs"):
        lines += ["", "Knobs: " + "; ".join(f"{k}: {v}" for k, v in results["knobs"].items())]
    return "\n".join(lines) + "\n"


def interval_tables(agg: dict) -> list[str]:
    """Markdown: top-1 differences paired over test images per seed and over seeds, and
    each halting run against its stage-1 model's hull and early exit."""
    lines: list[str] = []
    lines += ["", "| top-1 difference (points) | per seed, 95% interval over test images | "
              "over seeds (Student-t 95%) |", "|---|---|---|"]
    for name, p in agg.get("paired_top1", {}).items():
        seeds = "; ".join(f"{100 * v['difference']:+.2f} [{100 * v['ci95'][0]:+.2f}, "
                          f"{100 * v['ci95'][1]:+.2f}]" for v in p["per_seed"].values())
        lines.append(f"| {name} | {seeds} | {_interval(p['over_seeds'])} |")
    lines += ["", "| halting run against its stage-1 model | vs fewer-timesteps hull | "
              "vs early exit | full ledger: vs hull / vs early exit |", "|---|---|---|---|"]
    for name, v in agg.get("vs_stage1", {}).items():
        cells = [_interval(v[k]["over_seeds"]) for k in (
            "conventional/vs_fewer_timesteps", "conventional/vs_early_exit")]
        full = " / ".join(_interval(v[k]["over_seeds"]) for k in (
            "full/vs_fewer_timesteps", "full/vs_early_exit"))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {full} |")
    if agg.get("vs_stage1_t1"):
        lines += ["", "| halting run against its stage-1 model stopped after t = 1 | per seed: "
                  "top-1 difference [95%] (mJ: run / t = 1) | over seeds |", "|---|---|---|"]
        for name, v in agg["vs_stage1_t1"].items():
            seeds = "; ".join(f"{100 * r['difference']:+.2f} [{100 * r['ci95'][0]:+.2f}, "
                              f"{100 * r['ci95'][1]:+.2f}] ({r['energy_mj']:.4f} / "
                              f"{r['t1_energy_mj']:.4f})" for r in v["per_seed"].values())
            lines.append(f"| {name} | {seeds} | {_interval(v['over_seeds'])} |")
    lines.append("\nTop-1 differences over seeds: the mean of the seeds' paired differences "
                 "with a Student-t 95% interval; n/a for fewer than 2 seeds.")
    return lines


def _interval(v: Optional[dict]) -> str:
    if not v:
        return "n/a"
    return f"{100 * v['difference']:+.2f} [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}]"


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for name, v in results["aggregate"]["variants"].items():
        ax1.errorbar(v["energy_mj"]["mean"], 100 * v["top1"]["mean"], xerr=v["energy_mj"]["std"],
                     yerr=100 * v["top1"]["std"], fmt="o", capsize=3, label=name)
    base = results["runs"].get("integrated/backbone", {})
    if base:  # the trivial baseline: the backbone stopped after t = 1..T
        t_curves = [r["per_t"] for r in base.values()]
        if t_curves:
            acc = [statistics.fmean(rows[i]["top1"] for rows in t_curves) * 100
                   for i in range(len(t_curves[0]))]
            en = [statistics.fmean(rows[i]["energy_mj"] for rows in t_curves)
                  for i in range(len(t_curves[0]))]
            ax1.plot(en, acc, "k--", lw=1, label="backbone, fewer timesteps")
    ax1.set_xlabel("energy per image (mJ)")
    ax1.set_ylabel("top-1 (%)")
    ax1.legend(fontsize=6)
    sweep = results.get("eps_sweep") or {}
    if sweep:
        rows = list(sweep.values())
        for i, eps in enumerate(EPS_SWEEP):
            acc = [100 * r[i]["top1"] for r in rows]
            en = [r[i]["energy_mj"] for r in rows]
            ax2.errorbar(statistics.fmean(en), statistics.fmean(acc), yerr=_ms(acc)["std"],
                         xerr=_ms(en)["std"], fmt="o-", capsize=3)
            ax2.annotate(f"eps {eps}", (statistics.fmean(en), statistics.fmean(acc)), fontsize=7)
    ax2.set_title("eps sweep (I-SPS, both), mean ± std over seeds", fontsize=8)
    ax2.set_xlabel("energy per image (mJ)")
    sim = results.get("similarity") or {}
    for sps in ("integrated", "vanilla"):
        rows = [v[sps] for v in sim.values()]
        if rows:
            blocks = range(len(rows[0]))
            ax3.errorbar(list(blocks), [statistics.fmean(r[b] for r in rows) for b in blocks],
                         yerr=[_ms([r[b] for r in rows])["std"] for b in blocks], capsize=3,
                         marker="o", label=sps)
    ax3.set_title("temporal similarity of block inputs (Fig. 2e)", fontsize=8)
    ax3.set_xlabel("block")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _record(summary: dict) -> dict:
    vs = (summary.get("baselines") or {}).get("vs")  # against the stage-1 model (stage 2)
    return {"top1": summary["top1"], "energy_mj": summary["energy_mj"],
            "token_ratio": summary.get("token_ratio"), "per_t": summary["per_t"],
            "test_images": summary.get("test_images"), "checkpoint": summary["checkpoint"],
            "vs": None if vs is None else {ledger: {name: {k: v.get(k) for k in (
                "difference", "ci95")} for name, v in per.items()} for ledger, per in vs.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="spikformer-4-64")
    p.add_argument("-T", "--timesteps", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--stage1-epochs", type=int, default=2)
    p.add_argument("--stage2-epochs", type=int, default=1)
    p.add_argument("--tune-trials", type=int, default=12)
    p.add_argument("--tune-train-subset", type=int, default=2000)
    p.add_argument("--tune-val-subset", type=int, default=1000)
    p.add_argument("--energy-images", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="stage-2 variants to train (both, block and time need the tuned knobs)")
    p.add_argument("--skip", nargs="*", default=[], choices=["converted", "similarity", "sweep", "full"])
    p.add_argument("--out", default="runs/ablations")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    runs = Runs(args)
    tuned = {"both", "block", "time"} & set(args.variants)
    knobs = {sps: tuned_knobs(runs, sps) for sps in ("integrated", "vanilla")} if tuned else {}
    rows = [("integrated/backbone", "integrated", dict(halting=False)),
            ("vanilla/backbone", "vanilla", dict(halting=False)),
            ("integrated/hand", "integrated", dict(halting=True, **HAND)),
            ("vanilla/hand", "vanilla", dict(halting=True, **HAND))]
    if knobs:  # the knobs stas-tune chose on the validation split, per patch splitting
        rows += [("integrated/both", "integrated", dict(halting=True, **knobs["integrated"])),
                 ("vanilla/both", "vanilla", dict(halting=True, **knobs["vanilla"])),
                 ("integrated/block", "integrated",
                  dict(halting=True, accumulate="block", **knobs["integrated"])),
                 ("integrated/time", "integrated",
                  dict(halting=True, accumulate="time", **knobs["integrated"]))]
    plan = [(name, sps, seed, kw) for seed in args.seeds for name, sps, kw in rows
            if name.split("/", 1)[1] in args.variants]
    results = {"bench": "ablations", "settings": {**vars(args), "stage1_lr": STAGE1_LR,
                                                  "stage2_lr": STAGE2_LR, "hand_knobs": HAND},
               "knobs": {**knobs, "hand": HAND}, "runs": {}}
    bar = progress_bar(None, len(plan), "ablation runs", True)
    for name, sps, seed, kw in plan:
        variant = name.split("/", 1)[1]
        s = runs.stage2(variant, sps, seed, **kw)
        results["runs"].setdefault(name, {})[str(seed)] = _record(s)
        for s1_sps in ("integrated", "vanilla"):
            results["runs"].setdefault(f"{s1_sps}/stage1", {})[str(seed)] = \
                _record(runs.stage1(s1_sps, seed))
        if bar is not None:
            bar.update(1)
    if "sweep" not in args.skip and "both" in args.variants:
        batches = _val_batches(args)
        results["eps_sweep"] = {str(seed): eps_sweep(runs.stage2(
            "both", "integrated", seed, halting=True, **knobs["integrated"]), batches,
            args.energy_images) for seed in args.seeds}
    if "similarity" not in args.skip:
        results["similarity"] = {str(seed): similarity(runs, seed) for seed in args.seeds}
    if "converted" not in args.skip:
        results["converted_vs_direct"] = converted_vs_direct(runs)  # both ledgers per t
    if "full" not in args.skip:
        results["energy_full"] = full_ledger(runs, results)
    results["aggregate"] = aggregate(results)
    results.update({"wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "machine": platform.machine()})
    root = Path(args.out)
    results["provenance"] = provenance_of_args(
        args, seeds=args.seeds, images={"test": build_datasets(
            "fashion-mnist", val_subset=args.val_subset, augment=False)[1]},
        chose="val", reported="test",
        checkpoints=[r["checkpoint"] for per in results["runs"].values() for r in per.values()])
    atomic_write_text(root / "ablations.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(root / "ablations.md", markdown(results))
    plot(results, root / "ablations.png")
    print(json.dumps(results["aggregate"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
