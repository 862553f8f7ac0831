"""Evaluation of spiking models: top-1, throughput, and energy with the shared op counter."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
from torch import nn

from halting.plugin import DEFAULT_EXECUTION, HaltingConfig, run_halting
from halting.protocol import run_stepwise

from .energy import TERMS, EnergyCosts, OpCounter, equal_information_bits
from .stats import hull_mixture
from .timing import Stopwatch


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, *,
             amp: bool = False, amp_dtype: torch.dtype = torch.float16, progress=None) -> dict:
    """Top-1 and images/s over ``loader`` (local to this process). ``model`` may be a
    :class:`halting.Halted` wrapper: then the token ratio is reported too."""
    model.eval()
    correct = total = 0
    ratio_sum = 0.0
    fraction_sum = None
    watch = Stopwatch(device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with watch, torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(images)
        if isinstance(logits, tuple):  # Halted: (logits, ponder loss)
            logits = logits[0]
            ratio_sum += model.last.token_ratio * labels.numel()
            part = model.last.active_fraction * labels.numel()
            fraction_sum = part if fraction_sum is None else fraction_sum + part
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        if progress is not None:
            progress.update(1)
    seconds = watch.seconds
    out = {"correct": correct, "images": total, "seconds": seconds,
           "top1": correct / max(total, 1), "images_per_s": total / seconds if seconds else 0.0}
    if fraction_sum is not None:
        out["token_ratio"] = ratio_sum / max(total, 1)
        out["active_fraction"] = (fraction_sum / max(total, 1)).tolist()  # [T][L]
    return out


@torch.no_grad()
def evaluate_halting(model: nn.Module, loader: Iterable, cfg: HaltingConfig,
                     timesteps: Optional[int], device: torch.device, *,
                     energy_images: int = 256, execution: str = DEFAULT_EXECUTION,
                     costs: Optional[EnergyCosts] = None) -> dict:
    """Top-1, token ratio, energy per image (conventional ``energy_mj`` and full ledger
    ``full_energy_mj``) (ops counted on the first ``energy_images``
    images) and images/s (timed on the other batches) of ``model`` run for ``timesteps``
    steps with halting ``cfg``. An empty loader is a ConfigError."""
    from .errors import ConfigError

    model.eval()
    counter = OpCounter(model, costs)
    correct = total = timed = 0
    ratio_sum = 0.0
    watch = Stopwatch(device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if counter.images < energy_images:
            with counter:
                res = run_halting(model, x, cfg, timesteps=timesteps, execution=execution,
                                  on_timestep=counter.set_timestep)
            counter.add_images(len(x))
        else:
            with watch:
                res = run_halting(model, x, cfg, timesteps=timesteps, execution=execution)
            timed += len(y)
        correct += int((res.logits.argmax(-1) == y).sum())
        ratio_sum += res.token_ratio * len(y)
        total += len(y)
    if not total:
        raise ConfigError("the validation set is empty; check --val-subset")
    energy = counter.summary()
    return {"top1": correct / total, "energy_mj": float(energy["energy_mj"]),
            "full_energy_mj": float(energy["ledger"]["full_mj"]),
            "token_ratio": ratio_sum / total, "images": total,
            **({"images_per_s": timed / watch.seconds} if timed else {})}


@torch.no_grad()
def save_depth_heatmap(model: nn.Module, loader: Iterable, device: torch.device,
                       halting: HaltingConfig, path, *, execution: str = DEFAULT_EXECUTION,
                       samples: int = 6) -> dict:
    """Run the first batch of ``loader`` with halting and save a PNG of each token's
    halting depth over the image for ``samples`` images; returns the depth statistics."""
    from halting.plots import depth_heatmap_figure

    from .checkpoint import atomic_write

    images, labels = next(iter(loader))
    images = images[:samples].to(device)
    model.eval()
    res = run_halting(model, images, halting, execution=execution)
    steps = res.active_fraction.numel()
    # event frames [B, T, 2, H, W]: show all events of a sample as one grey image
    shown = images.sum((1, 2)).unsqueeze(1) if images.dim() == 5 else images
    fig = depth_heatmap_figure(shown, res.depth, max_depth=steps,
                               prefix_tokens=getattr(model, "num_prefix_tokens", 0),
                               labels=[f"label {int(v)}" for v in labels[:samples]])
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    depth = res.depth.float()
    return {"depth_plot": str(path), "depth_mean": float(depth.mean()),
            "depth_min": float(depth.min()), "depth_max": float(depth.max()),
            "depth_of": steps}


@torch.no_grad()
def accuracy_per_timestep(model: nn.Module, loader: Iterable, device: torch.device) -> dict:
    """Top-1 after every t = 1..T (cumulative readout of the per-timestep path), as
    ``{"1": acc, ...}``: what the model would answer if stopped after t timesteps."""
    model.eval()
    correct, total = None, 0
    for images, labels in loader:
        cum = run_stepwise(model, images.to(device), cumulative=True)
        hits = (cum.argmax(-1) == labels.to(device)).sum(-1).double().cpu()
        correct = hits if correct is None else correct + hits
        total += labels.numel()
    if correct is None:
        return {}
    return {str(t + 1): float(c) / total for t, c in enumerate(correct)}


@torch.no_grad()
def measure_energy(model: nn.Module, loader: Iterable, device: torch.device, *,
                   max_images: Optional[int] = 256, costs: Optional[EnergyCosts] = None,
                   halting: Optional[HaltingConfig] = None,
                   execution: str = DEFAULT_EXECUTION, timesteps: Optional[int] = None,
                   mode: str = "snn", activation_bits: Optional[int] = None,
                   int_macs: bool = False) -> dict:
    """Per-image ops and energy (:meth:`OpCounter.summary`, with the full ledger), counted
    per timestep on the per-timestep path.

    The per-timestep path computes exactly what the multi-step path does (tested), and
    lets the counter book every op to its timestep and see I-SPS run its stack once.
    ``mode``, ``activation_bits``, ``int_macs``: see :class:`OpCounter` (the ANN).
    """
    model.eval()
    counter = OpCounter(model, costs, mode=mode, activation_bits=activation_bits,
                        int_macs=int_macs)
    with counter:
        for images, _ in loader:
            if max_images is not None and counter.images >= max_images:
                break
            if max_images is not None:
                images = images[: max_images - counter.images]
            if halting is None:
                run_stepwise(model, images.to(device), timesteps,
                             on_timestep=counter.set_timestep)
            else:  # halted tokens send no spikes, so they cost nothing
                run_halting(model, images.to(device), halting, timesteps=timesteps,
                            execution=execution, on_timestep=counter.set_timestep)
            counter.add_images(images.shape[0])
    return counter.summary()


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


@torch.no_grad()
def energy_report(model: nn.Module, loader: Iterable, device: torch.device, *,
                  max_images: Optional[int] = 256, costs: Optional[EnergyCosts] = None,
                  halting: Optional[HaltingConfig] = None, execution: str = DEFAULT_EXECUTION,
                  timesteps: Optional[int] = None) -> dict:
    """Both ledgers of ``model`` (halted with ``halting``), and of the ANN and the
    equal-information quantized ANN it is compared with, on the same images.

    Returns the SNN's :func:`measure_energy` summary with an ``energy`` block:
    ``conventional_mj``, ``full_mj``, ``terms_mj``; ``ann_*`` and ``qann_*`` (full ledger;
    the QANN at ``qann_bits`` for all T steps); ``snn_vs_ann`` and ``snn_vs_qann`` (full
    ledger ratios); and ``per_t``: the same, cumulative, for the model stopped after t
    steps (the QANN's bit width follows t).
    """
    costs = costs or EnergyCosts()
    steps = int(timesteps or model.timesteps)
    snn = measure_energy(model, loader, device, max_images=max_images, costs=costs,
                         halting=halting, execution=execution, timesteps=timesteps)
    ann_run = measure_energy(model, loader, device, max_images=max_images, costs=costs,
                             timesteps=1, mode="ann")
    ann = ann_run["ledger"]
    levels = getattr(model, "levels", None)
    qann: dict[int, dict] = {}
    for t in range(1, steps + 1):
        bits = equal_information_bits(t, levels)
        if bits not in qann:
            qann[bits] = measure_energy(model, loader, device, max_images=max_images,
                                        costs=costs, timesteps=1, mode="ann",
                                        activation_bits=bits, int_macs=True)["ledger"]
    full = snn["ledger"]
    conv_t = {e["t"]: e["energy_mj"] for e in snn["per_timestep"]}
    per_t, conv_cum, full_cum = [], 0.0, 0.0
    terms_cum = dict.fromkeys(TERMS, 0.0)
    full_t = {e["t"]: e for e in full["per_timestep"] if e["t"] is not None}
    for step in range(steps):  # a step where every token had halted costs nothing
        entry = full_t.get(step, {"full_mj": 0.0, "terms_mj": dict.fromkeys(TERMS, 0.0)})
        conv_cum += conv_t.get(step, 0.0)
        full_cum += entry["full_mj"]
        for k in TERMS:
            terms_cum[k] += entry["terms_mj"][k]
        t = step + 1
        q = qann[equal_information_bits(t, levels)]
        per_t.append({"t": t, "conventional_mj": conv_cum, "full_mj": full_cum,
                      "terms_mj": dict(terms_cum), "qann_bits": equal_information_bits(t, levels),
                      "qann_full_mj": q["full_mj"], "snn_vs_ann": _ratio(full_cum, ann["full_mj"]),
                      "snn_vs_qann": _ratio(full_cum, q["full_mj"])})
    bits_T = equal_information_bits(steps, levels)
    q_T = qann[bits_T]
    snn["energy"] = {
        "conventional_mj": snn["energy_mj"], "full_mj": full["full_mj"],
        "terms_mj": full["terms_mj"],
        "ann_conventional_mj": ann_run["energy_mj"], "ann_macs": ann_run["macs"],
        "ann_full_mj": ann["full_mj"], "ann_terms_mj": ann["terms_mj"],
        "qann_bits": bits_T, "qann_full_mj": q_T["full_mj"], "qann_terms_mj": q_T["terms_mj"],
        "snn_vs_ann": _ratio(full["full_mj"], ann["full_mj"]),
        "snn_vs_qann": _ratio(full["full_mj"], q_T["full_mj"]),
        "conventional_snn_vs_ann": _ratio(snn["energy_mj"], ann_run["energy_mj"]),
        "per_t": per_t, "images": snn["images"], "weight_bytes": full["weight_bytes"],
        "weights_on_chip": full["weights_on_chip"], "costs": dataclasses.asdict(costs),
    }
    return snn


# --------------------------------------------------------------------------- the baseline
@torch.no_grad()
def timestep_baseline(model: nn.Module, loader: Iterable, device: torch.device, *,
                      timesteps: Optional[int] = None, energy_images: int = 256,
                      costs: Optional[EnergyCosts] = None) -> dict:
    """The trivial baseline of every halting figure: the same model *without* halting,
    stopped after t = 1..T timesteps. Returns ``{"t", "top1", "energy_mj",
    "full_energy_mj", "images"}`` (lists over t; energy per image, cumulative, on the first
    ``energy_images`` images; top-1 on the whole loader)."""
    model.eval()
    steps = int(timesteps or model.timesteps)
    correct, total = None, 0
    for images, labels in loader:
        cum = run_stepwise(model, images.to(device), steps, cumulative=True)
        hits = (cum.argmax(-1) == labels.to(device)).sum(-1).double().cpu()
        correct = hits if correct is None else correct + hits
        total += labels.numel()
    if correct is None:
        from .errors import ConfigError

        raise ConfigError("the validation set is empty; check --val-subset")
    e = energy_report(model, loader, device, max_images=energy_images, costs=costs,
                      timesteps=steps)["energy"]["per_t"]
    return {"t": list(range(1, steps + 1)), "top1": [float(c) / total for c in correct],
            "energy_mj": [p["conventional_mj"] for p in e],
            "full_energy_mj": [p["full_mj"] for p in e], "images": total}


def against_baseline(top1: float, energy_mj: float, baseline: dict, *,
                     energy_key: str = "energy_mj") -> dict:
    """Where a halted point ``(top1, energy_mj)`` lies against the no-halting curve:

    * ``top1_gain_at_equal_energy``: its top-1 minus the best top-1 the baseline reaches
      at no more energy (the step: ``None`` when even t = 1 costs more);
    * ``top1_gain_vs_hull``: its top-1 minus the curve's upper convex hull at its energy
      (mixing two timesteps per image reaches every point between them; ``None`` when t =
      1 costs more): the comparison that counts;
    * ``energy_saving_at_equal_top1``: 1 - its energy / the energy of the cheapest t whose
      top-1 is at least its own (``None`` when no t reaches it);
    * ``beats_baseline`` / ``beats_hull``: the gain is positive (None where not comparable).

    Paired intervals over images need per-image answers: :mod:`stas_core.baselines`.
    """
    pairs = list(zip(baseline["top1"], baseline[energy_key]))
    cheaper = [a for a, e in pairs if e <= energy_mj]
    gain = top1 - max(cheaper) if cheaper else None
    reach = [e for a, e in pairs if a >= top1]
    saving = 1 - energy_mj / min(reach) if reach else None
    mix = hull_mixture(baseline[energy_key], baseline["top1"], energy_mj)
    hull_gain = None if mix is None else float(top1 - sum(w * baseline["top1"][i] for i, w in mix))
    return {"top1_gain_at_equal_energy": gain, "top1_gain_vs_hull": hull_gain,
            "energy_saving_at_equal_top1": saving,
            "beats_baseline": None if gain is None else gain > 0,
            "beats_hull": None if hull_gain is None else hull_gain > 0}


def baseline_section(baselines: dict, top1: float, energy_mj: float, full_energy_mj: float,
                     path=None, *, title: str = "", protocol: Optional[dict] = None) -> dict:
    """The ``baseline`` block of a halting summary: each named no-halting curve
    (:func:`timestep_baseline`) with where the halted point lies against it, under both
    ledgers; with ``path``, a PNG of the point against every curve (and the hull and
    early-exit curves of ``protocol``, a :func:`stas_core.baselines.halting_baselines`
    block)."""
    section = {}
    for name, curve in baselines.items():
        section[name] = {**curve,
                         "vs_halted": against_baseline(top1, energy_mj, curve),
                         "vs_halted_full": against_baseline(top1, full_energy_mj, curve,
                                                            energy_key="full_energy_mj")}
    if path is not None and baselines:
        from halting.plots import baseline_figure

        from .checkpoint import atomic_write

        curve = next(iter(baselines.values()))
        fig = baseline_figure(curve, [{"label": "halted", "top1": top1,
                                       "energy_mj": energy_mj}], title=title)
        if protocol is not None:
            from halting.plots import draw_protocol_curves

            draw_protocol_curves(fig.axes[0], protocol)
        if len(baselines) > 1:
            from halting.plots import draw_baseline

            ax = fig.axes[0]
            for i, (name, other) in enumerate(list(baselines.items())[1:]):
                draw_baseline(ax, other, label=f"{name}, stopped after t")
                ax.lines[-1].set_color(f"C{i + 2}")
            ax.legend(fontsize=7, loc="lower right")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        section["plot"] = str(path)
    return section
