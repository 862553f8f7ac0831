"""The baselines an adaptive-computation figure must beat, per image and under both ledgers.

A *policy* decides, image by image, how long a model runs; its cost is the mean energy of
what each image ran, its accuracy the share of images it gets right. Families of policies
form curves:

* **fewer timesteps**: every image stopped after t = 1..T;
* **per-image early exit** (SEENN-I, Li et al., NeurIPS 2023): an image stops at the first
  t whose softmax confidence of the accumulated output clears a threshold, swept;
* **token halting** (the halted model stopped after t), and **token halting + early
  exit** (the halted model's images stopped by confidence).

Running a fraction of the images under one policy and the rest under another reaches every
point on the straight line between the two, so a point is measured against a curve's
**upper convex hull** at its own energy. The comparison is paired: each image's
correctness under the point minus its expected correctness under the hull's mixture, with
a bootstrap 95% interval over the images (:func:`stas_core.stats.paired_bootstrap`).

Energy per image is booked by what the image ran: an image stopped after t costs the
model's mean per-image energy over its first t timesteps (counted on the energy images
under each ledger), so a policy's energy is ``mean_i E(t_i)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .evaluate import measure_energy
from .stats import hull_mixture, paired_bootstrap, upper_hull  # noqa: F401 - API

__all__ = ["LEDGERS", "AnytimeRun", "Curve", "upper_hull", "hull_mixture", "fewer_timesteps",
           "early_exit", "versus_curve", "halting_baselines", "DEFAULT_THRESHOLDS",
           "collect_anytime", "answers", "choose_combination_threshold", "load_runs",
           "curve_of"]

#: The two ledgers a policy's energy is booked under: name -> key of the energy figure.
LEDGERS = {"conventional": "energy_mj", "full": "full_energy_mj"}
#: Confidence thresholds of the early-exit sweep: 0 (every image stops after t = 1, the
#: curve's cheapest end, which the fewer-timesteps curve has too), 0.1 .. 0.9 in steps of
#: 0.05, then 1 - 0.05 .. 1 - 1e-6 (almost every image runs to T).
DEFAULT_THRESHOLDS = tuple(float(v) for v in np.concatenate(
    [[0.0], np.linspace(0.1, 0.9, 17), 1.0 - np.logspace(-1.3, -6, 14)]))


@dataclass
class AnytimeRun:
    """Per-image answers of a model stopped after every t = 1..T, with the mean
    per-image energy of its first t timesteps under each ledger."""

    labels: np.ndarray          #: [N] int
    pred: np.ndarray            #: [T, N] argmax of the accumulated output after t + 1 steps
    confidence: np.ndarray      #: [T, N] its largest softmax probability
    energy_mj: np.ndarray       #: [T] conventional, cumulative
    full_energy_mj: np.ndarray  #: [T] full ledger, cumulative
    depth: Optional[np.ndarray] = None  #: [N, tokens] scored steps per token (halted runs)

    @property
    def correct(self) -> np.ndarray:
        """[T, N] bool: image n right when stopped after t + 1 timesteps."""
        return self.pred == self.labels[None, :]

    @property
    def timesteps(self) -> int:
        return int(self.pred.shape[0])

    def energy(self, ledger: str) -> np.ndarray:
        return np.asarray(getattr(self, LEDGERS[ledger]), dtype=np.float64)


def curve_of(run: AnytimeRun) -> dict:
    """The fewer-timesteps curve of ``run`` in the form of
    :func:`stas_core.evaluate.timestep_baseline`: ``{"t", "top1", "energy_mj",
    "full_energy_mj", "images"}``."""
    return {"t": list(range(1, run.timesteps + 1)),
            "top1": [float(v) for v in run.correct.mean(axis=1)],
            "energy_mj": [float(v) for v in run.energy_mj],
            "full_energy_mj": [float(v) for v in run.full_energy_mj],
            "images": int(run.labels.size)}


@dataclass
class Curve:
    """A family of policies: per point, each image's correctness and the mean energy."""

    name: str
    correct: np.ndarray          #: [K, N] float (0/1 or expected correctness)
    energy: dict                 #: ledger -> [K] mean energy per image (mJ)
    params: list                 #: per point: what it is (t, or a threshold)
    mean_timesteps: np.ndarray   #: [K] mean timesteps per image

    @property
    def top1(self) -> np.ndarray:
        return self.correct.mean(axis=1)

    def summary(self, ledger_hulls: bool = True) -> dict:
        out = {"name": self.name, "points": [
            {"param": p, "top1": float(a), "mean_timesteps": float(m),
             **{LEDGERS[k]: float(v[i]) for k, v in self.energy.items()}}
            for i, (p, a, m) in enumerate(zip(self.params, self.top1, self.mean_timesteps))]}
        if ledger_hulls:
            out["hull"] = {k: upper_hull(v, self.top1) for k, v in self.energy.items()}
        return out


def fewer_timesteps(run: AnytimeRun, name: str = "fewer_timesteps") -> Curve:
    """Every image stopped after t = 1..T."""
    T = run.timesteps
    return Curve(name, run.correct.astype(np.float64),
                 {k: run.energy(k) for k in LEDGERS}, list(range(1, T + 1)),
                 np.arange(1, T + 1, dtype=np.float64))


def early_exit(run: AnytimeRun, thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
               name: str = "early_exit") -> Curve:
    """SEENN-I: each image stops at the first t whose confidence is at least the
    threshold (at T otherwise); one point per threshold."""
    thresholds = [float(v) for v in thresholds]
    correct, steps = [], []
    energies = {k: [] for k in LEDGERS}
    cols = np.arange(run.pred.shape[1])
    for thr in thresholds:
        clears = run.confidence >= thr
        clears[-1] = True
        stop = clears.argmax(axis=0)  # first t that clears (0-based)
        correct.append(run.correct[stop, cols].astype(np.float64))
        steps.append(float(stop.mean() + 1))
        for k in LEDGERS:
            energies[k].append(float(run.energy(k)[stop].mean()))
    return Curve(name, np.stack(correct), {k: np.asarray(v) for k, v in energies.items()},
                 thresholds, np.asarray(steps))


def versus_curve(correct: Sequence[float], energy: float, curve: Curve, ledger: str, *,
                 resamples: int = 2000, seed: int = 0) -> dict:
    """A point (each image's correctness, mean energy under ``ledger``) against ``curve``'s
    upper hull at the same energy: the paired top-1 difference with its 95% interval, and
    the mixture it was taken against. ``difference`` None: the point is cheaper than the
    curve's cheapest point."""
    e = curve.energy[ledger]
    mix = hull_mixture(e, curve.top1, energy)
    if mix is None:
        return {"difference": None, "ci95": None, "excludes_zero": None,
                "note": "cheaper than the curve's cheapest point"}
    base = sum(w * curve.correct[i] for i, w in mix)
    res = paired_bootstrap(correct, base, resamples=resamples, seed=seed)
    res["curve_top1_at_energy"] = float(base.mean())
    res["mixture"] = [{"param": curve.params[i], "weight": float(w)} for i, w in mix]
    res["beats"] = bool(res["ci95"][0] > 0)
    return res


def choose_combination_threshold(unhalted: AnytimeRun, halted: AnytimeRun, *,
                                 thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                                 ledger: str = "conventional") -> float:
    """The early-exit threshold of token halting + early exit whose smaller gain over
    early exit alone and over token halting alone is largest on these images: run it on
    the validation split, then report the threshold on the test split."""
    thresholds = list(thresholds)
    ee, th = early_exit(unhalted, thresholds), fewer_timesteps(halted, "token_halting")
    combo = early_exit(halted, thresholds)

    def gain(i: int) -> float:
        e = float(combo.energy[ledger][i])
        out = []
        for curve in (ee, th):
            mix = hull_mixture(curve.energy[ledger], curve.top1, e)
            if mix is None:
                return -1.0
            out.append(float(combo.top1[i]) - sum(w * float(curve.top1[j]) for j, w in mix))
        return min(out)

    return thresholds[max(range(len(thresholds)), key=gain)]


def halting_baselines(unhalted: AnytimeRun, halted: AnytimeRun, *,
                      thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                      resamples: int = 2000, seed: int = 0,
                      combination_threshold: Optional[float] = None) -> dict:
    """The ``baselines`` block of every halting report: the halted model (run for all T)
    against the unhalted model's fewer-timesteps hull and early-exit hull, and early exit
    on top of token halting against each alone and against fewer timesteps, under both
    ledgers, on the same images. The combination's ``best`` point is the best of its
    curve on these images (a description, not a claim); ``combination_threshold``, chosen
    elsewhere (:func:`choose_combination_threshold` on the validation split), adds
    ``combination.<ledger>.chosen``: that one point with its paired intervals."""
    if unhalted.labels.shape != halted.labels.shape or (unhalted.labels != halted.labels).any():
        raise ValueError("the halted and unhalted runs must answer the same images")
    thresholds = list(thresholds)
    curves = {"fewer_timesteps": fewer_timesteps(unhalted),
              "early_exit": early_exit(unhalted, thresholds),
              "token_halting": fewer_timesteps(halted, "token_halting"),
              "token_halting+early_exit": early_exit(halted, thresholds,
                                                     "token_halting+early_exit")}
    point = halted.correct[-1].astype(np.float64)
    kw = dict(resamples=resamples, seed=seed)
    out = {"images": int(point.size), "resamples": resamples,
           "halted": {"top1": float(point.mean()),
                      **{LEDGERS[k]: float(halted.energy(k)[-1]) for k in LEDGERS}},
           "curves": {n: c.summary() for n, c in curves.items()}, "vs": {}, "combination": {}}
    for ledger in LEDGERS:
        e_point = float(halted.energy(ledger)[-1])
        out["vs"][ledger] = {n: versus_curve(point, e_point, curves[n], ledger, **kw)
                             for n in ("fewer_timesteps", "early_exit")}
        combo = curves["token_halting+early_exit"]
        parts = ("early_exit", "token_halting", "fewer_timesteps")

        def row(correct, energy, param, mean_t):
            return {"param": param, "top1": float(np.mean(correct)), LEDGERS[ledger]: energy,
                    "mean_timesteps": mean_t,
                    **{f"vs_{n}": versus_curve(correct, energy, curves[n], ledger, **kw)
                       for n in parts}}

        rows = [row(combo.correct[i], float(combo.energy[ledger][i]), combo.params[i],
                    float(combo.mean_timesteps[i])) for i in range(len(combo.params))]

        def worst(r):  # the smaller of its two gains (None: not comparable)
            g = [r[f"vs_{n}"]["difference"] for n in ("early_exit", "token_halting")]
            return -1.0 if None in g else min(g)

        best = max(range(len(rows)), key=lambda i: worst(rows[i]))
        out["combination"][ledger] = {
            "points": rows, "best": best,
            "beats_both_somewhere": any(
                r["vs_early_exit"].get("beats") and r["vs_token_halting"].get("beats")
                for r in rows)}
        if combination_threshold is not None:
            one = early_exit(halted, [combination_threshold], "chosen")
            out["combination"][ledger]["chosen"] = row(
                one.correct[0], float(one.energy[ledger][0]), float(combination_threshold),
                float(one.mean_timesteps[0]))
    return out


# ------------------------------------------------------------------------ collecting runs
def answers(cum: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, largest softmax probability) of accumulated logits ``[T, B, classes]``."""
    prob = torch.softmax(cum.float(), dim=-1)
    conf, pred = prob.max(dim=-1)
    return pred.cpu().numpy(), conf.cpu().numpy()


@torch.no_grad()
def collect_anytime(model: torch.nn.Module, loader: Iterable, device: torch.device, *,
                    timesteps: Optional[int] = None, halting=None, execution: str = "gather",
                    energy_images: int = 256, costs=None,
                    energy: Optional[tuple] = None) -> AnytimeRun:
    """Run ``model`` (with token ``halting`` or without) over ``loader`` and keep every
    image's answer after each t, with the cumulative per-image energy of t timesteps under
    both ledgers (counted on the first ``energy_images`` images, or given as ``energy``:
    ``(conventional [T], full [T])`` already counted for this model and images)."""
    from halting import run_halting
    from halting.protocol import run_stepwise


    model.eval()
    steps = int(timesteps or model.timesteps)
    labels, preds, confs, depths = [], [], [], []
    for x, y in loader:
        x = x.to(device)
        if halting is None:
            cum = run_stepwise(model, x, steps, cumulative=True)
        else:
            res = run_halting(model, x, halting, timesteps=steps, execution=execution,
                              anytime=True)
            cum = res.logits_per_t
            depths.append(res.depth.cpu().numpy().astype(np.float32))
        p, c = answers(cum)
        preds.append(p)
        confs.append(c)
        labels.append(np.asarray(y))
    if not labels:
        from .errors import ConfigError

        raise ConfigError("the evaluation set is empty; check --val-subset")
    if energy is None:
        e = measure_energy(model, loader, device, max_images=energy_images, costs=costs,
                           halting=halting, execution=execution, timesteps=steps)
        conv, full = np.zeros(steps), np.zeros(steps)
        for entry in e["per_timestep"]:
            if entry["t"] is not None:
                conv[entry["t"]] += entry["energy_mj"]
        for entry in e["ledger"]["per_timestep"]:
            if entry["t"] is not None:
                full[entry["t"]] += entry["full_mj"]
        energy = (np.cumsum(conv), np.cumsum(full))
    conv_cum, full_cum = (np.asarray(v, dtype=np.float64) for v in energy)
    if conv_cum.shape != (steps,) or full_cum.shape != (steps,):
        raise ValueError(f"energy must hold {steps} cumulative values per ledger; got shapes "
                         f"{conv_cum.shape} and {full_cum.shape}")
    return AnytimeRun(np.concatenate(labels), np.concatenate(preds, axis=1),
                      np.concatenate(confs, axis=1), conv_cum, full_cum,
                      np.concatenate(depths) if depths else None)


def load_runs(path) -> dict:
    """The :class:`AnytimeRun` s a ``predictions.npz`` holds
    (:func:`stas_core.provenance.save_predictions`), by name."""
    data = np.load(path)
    names = sorted({k.rsplit(".", 1)[0] for k in data.files if k.endswith(".pred")})
    return {n: AnytimeRun(data["labels"], data[f"{n}.pred"].astype(np.int64),
                          data[f"{n}.confidence"].astype(np.float64), data[f"{n}.energy_mj"],
                          data[f"{n}.full_energy_mj"],
                          data[f"{n}.depth"] if f"{n}.depth" in data.files else None)
            for n in names}
