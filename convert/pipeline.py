"""``stas-convert`` as a library call: ANN -> calibrated spiking ViT -> report.

Steps: build the timm ViT for the data set (weights from ``--pretrained``, a checkpoint, or
``--train-epochs`` of training here), rebuild it as a :class:`SpikingViT`, calibrate the
thresholds, save it, and evaluate ANN and SNN side by side: top-1 at every t = 1..T in
one pass (cumulative readout), energy per image after every t, throughput.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from halting.plugin import DEFAULT_EXECUTION, HaltingConfig, HaltingConfigError
from halting.protocol import run_stepwise
from stas_core.baselines import (AnytimeRun, answers, collect_anytime, curve_of,
                                 halting_baselines)
from stas_core.checkpoint import atomic_write, atomic_write_text, load_checkpoint, save_checkpoint
from stas_core.data import build_datasets, get_dataset_info
from stas_core.energy import EnergyCosts
from stas_core.errors import check_positive_int
from stas_core.provenance import provenance, save_predictions
from stas_core.report import SCHEMA, per_t_rows
from stas_core.timing import Stopwatch
from stas_core.evaluate import (against_baseline, energy_report, evaluate_halting,
                                save_depth_heatmap)
from stas_core.train import halting_config_of, progress_bar, resolve_device

from .ann import ann_energy, build_ann, train_ann
from .calibrate import METHODS, calibrate
from .errors import CheckpointError, ConfigError
from .spiking_vit import HALTED_KV, SpikingViT
from .timm_models import canonical_name, check_patch_grid, name_patch_size

logger = logging.getLogger(__name__)

FORMAT = "stas-converted/1"


@dataclass
class ConvertConfig:
    """Everything a conversion run depends on."""

    model: str = "vit_tiny"
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    checkpoint: Optional[str] = None
    train_epochs: int = 0
    random_init: bool = False  # convert randomly initialised weights (experiments only)
    train_lr: float = 1e-3
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    timesteps: int = 16
    levels: int = 8
    calib_images: int = 256
    calib_method: str = "mse"
    calib_percentile: float = 99.99
    batch_size: int = 128
    energy_images: int = 256
    energy_costs: Optional[str] = None  # JSON file of EnergyCosts fields (None: 45 nm)
    halting_finetune: int = 0        # epochs of A-ViT halting fine-tune of the ANN first
    halting_finetune_lr: float = 1e-4
    halting_finetune_delta_p: float = 5e-4  # weight of the ANN's ponder loss
    out: str = "runs/convert"
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    halting: bool = False
    alpha: float = SpikingViT.halting_defaults.alpha  # the converted operating point
    beta: float = SpikingViT.halting_defaults.beta
    eps: float = SpikingViT.halting_defaults.eps
    accumulate: str = "both"
    halting_score: Optional[str] = None   # None: the model's default (convergence)
    halting_output: Optional[str] = None  # None: the model's default ('last': the head
    #                                       reads the last block, as the ANN's did)
    halted_kv: str = "frozen"        # halted tokens' K/V: kept (running mean) or dropped
    execution: str = DEFAULT_EXECUTION
    progress: Optional[bool] = None

    def validate(self) -> "ConvertConfig":
        check_positive_int("timesteps", self.timesteps)
        check_positive_int("levels", self.levels)
        check_positive_int("batch_size", self.batch_size)
        if self.calib_images < 1:
            raise ConfigError(f"calib_images must be >= 1 (the calibration set cannot be "
                              f"empty); got {self.calib_images}")
        if self.calib_method not in METHODS:
            raise ConfigError(f"calib_method must be one of {', '.join(METHODS)}; "
                              f"got {self.calib_method!r}")
        if self.train_epochs < 0:
            raise ConfigError(f"train_epochs must be >= 0; got {self.train_epochs}")
        if self.halting_finetune < 0 or not self.halting_finetune_lr > 0 \
                or self.halting_finetune_delta_p < 0:
            raise ConfigError(f"halting_finetune must be >= 0 epochs, its lr > 0 and its "
                              f"delta_p >= 0; got {self.halting_finetune}, "
                              f"{self.halting_finetune_lr}, {self.halting_finetune_delta_p}")
        if sum(bool(v) for v in (self.pretrained or self.pretrained_file, self.checkpoint)) > 1:
            raise ConfigError("give only one of --pretrained and --checkpoint")
        if not (self.pretrained or self.pretrained_file or self.checkpoint
                or self.train_epochs > 0 or self.random_init):
            raise ConfigError(
                f"no weights for {self.model}: converting a randomly initialised ViT reports "
                f"the accuracy of noise. Give --pretrained (timm's hub, needs network), "
                f"--pretrained-file FILE, --checkpoint FILE, or --train-epochs N (train the "
                f"ANN here first, offline); --random-init converts random weights on purpose")
        EnergyCosts.load(self.energy_costs)  # a bad file fails before any work
        info = get_dataset_info(self.dataset)
        if info.events:
            raise ConfigError(
                f"--dataset {info.name} gives event frames [T, 2, H, W], but stas-convert "
                f"converts image ViTs ([B, C, H, W] in). Train a spiking model on event input "
                f"directly instead: stas-train --direct --dataset {info.name} -T N")
        patch = self.model_kwargs.get("patch_size", name_patch_size(self.model))
        if isinstance(patch, int):  # refused before any download or training
            check_patch_grid(int(self.model_kwargs.get("img_size", info.img_size)), patch)
        halting = self.halting_config()
        if halting is not None:
            try:
                halting.with_defaults(SpikingViT.halting_defaults, "a converted ViT")
            except HaltingConfigError as exc:
                raise ConfigError(str(exc).replace("output=", "--halting-output ")) from None
        if self.halted_kv not in HALTED_KV:
            raise ConfigError(f"halted_kv must be one of {', '.join(HALTED_KV)}; "
                              f"got {self.halted_kv!r}")
        return self

    def halting_config(self):
        """The :class:`halting.HaltingConfig` of this run (None without --halting)."""
        return halting_config_of(self, score=self.halting_score, output=self.halting_output)


# ----------------------------------------------------------------------------- save / load
def save_converted(path: Path, snn: SpikingViT, cfg: ConvertConfig, vit_kwargs: dict) -> None:
    save_checkpoint(path, {"format": FORMAT, "timm_model": canonical_name(cfg.model),
                           "dataset": get_dataset_info(cfg.dataset).name,
                           "vit_kwargs": vit_kwargs, "levels": snn.levels,
                           "timesteps": snn.timesteps, "model": snn.state_dict()})


def load_converted(path: str | Path, device: str | torch.device = "cpu") -> SpikingViT:
    """Rebuild a converted model saved by ``stas-convert`` (one call; nothing unpickled)."""
    import timm

    state = load_checkpoint(path, device)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a converted model (format {state.get('format')!r}, "
                              f"expected {FORMAT!r}); pass the model file stas-convert wrote")
    vit = timm.create_model(state["timm_model"], pretrained=False, **state["vit_kwargs"])
    snn = SpikingViT(vit, levels=state["levels"], timesteps=state["timesteps"])
    snn.load_state_dict(state["model"])
    return snn.to(device).eval()


def _vit_kwargs(vit: nn.Module, cfg: ConvertConfig) -> dict:
    info = get_dataset_info(cfg.dataset)
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != "pretrained_cfg_overlay"}
    kwargs.setdefault("img_size", info.img_size)
    kwargs.setdefault("in_chans", info.in_chans)
    kwargs.setdefault("num_classes", info.num_classes)
    return kwargs


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_side_by_side(vit: nn.Module, snn: SpikingViT, loader: DataLoader, timesteps: int,
                          device, *, progress: Optional[bool] = None) -> dict:
    """ANN and SNN over ``loader``: SNN top-1 at every t in one pass, agreement, speed;
    ``answers``: labels, and every image's prediction and confidence after each t."""
    vit.eval()
    snn.eval()
    correct = torch.zeros(timesteps, dtype=torch.float64)
    agree = torch.zeros(timesteps, dtype=torch.float64)
    ann_correct = total = 0
    ann_watch, snn_watch = Stopwatch(device), Stopwatch(device)
    err = torch.zeros(timesteps, dtype=torch.float64)
    labels, preds, confs = [], [], []
    bar = progress_bar(progress, len(loader), "evaluating", True)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with ann_watch:
            a = vit(x)
        with snn_watch:
            cum = run_stepwise(snn, x, timesteps, cumulative=True)
        p, c = answers(cum)
        labels.append(y.cpu().numpy())
        preds.append(p)
        confs.append(c)
        pred = cum.argmax(-1)
        ann_correct += int((a.argmax(-1) == y).sum())
        correct += (pred == y).sum(-1).double().cpu()
        agree += (pred == a.argmax(-1)).sum(-1).double().cpu()
        err += (cum - a).abs().amax(-1).sum(-1).double().cpu()
        total += len(y)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ann_s, snn_s = ann_watch.seconds, snn_watch.seconds
    return {  # lists: index i is t = i + 1
        "test_images": total,
        "answers": (np.concatenate(labels), np.concatenate(preds, axis=1),
                    np.concatenate(confs, axis=1)),  # per image, after every t (not JSON)
        "ann_top1": ann_correct / total,
        "snn_top1": [float(c / total) for c in correct],
        "agreement": [float(a / total) for a in agree],
        "logit_error": [float(e / total) for e in err],
        "ann_images_per_s": total / ann_s,
        "snn_images_per_s": total / snn_s,
        "snn_step_cost_vs_ann": (snn_s / timesteps) / ann_s,
    }


@torch.no_grad()
def evaluate_halted(snn: SpikingViT, loader: DataLoader, timesteps: int, device, cfg,
                    max_energy_images: int, execution: str = DEFAULT_EXECUTION,
                    costs: Optional[EnergyCosts] = None) -> dict:
    """Top-1, token ratio, energy per image (conventional and full ledger) and images/s of
    the halted SNN after t = 1, 2, 4, ... (each t is its own run: the halting window ends
    at the last timestep), one row per t. Throughput is timed on the batches run without
    the op counter."""
    marks = sorted({t for t in (1, 2, 4, 8, 16, 32, 64) if t <= timesteps} | {timesteps})
    rows = []
    for t in marks:
        ev = evaluate_halting(snn, loader, cfg, t, device, energy_images=max_energy_images,
                              execution=execution, costs=costs)
        rows.append({"t": t, "top1": ev["top1"], "energy_mj": ev["energy_mj"],
                     "full_energy_mj": ev["full_energy_mj"], "token_ratio": ev["token_ratio"],
                     **({"images_per_s": ev["images_per_s"]} if "images_per_s" in ev else {})})
    return rows


@torch.no_grad()
def snn_energy(snn: SpikingViT, loader: DataLoader, timesteps: int, device,
               max_images: int, costs: Optional[EnergyCosts] = None) -> dict:
    """Energy per image at T (conventional), the full ledger with the ANN and
    quantized-ANN baselines and both ledgers cumulative after every t (``energy``), and
    firing rates, on ``max_images``."""
    s = energy_report(snn, loader, device, max_images=max_images, costs=costs,
                      timesteps=timesteps)
    return {"energy_mj": s["energy_mj"], "sops_at_T": s["sops"], "macs_at_T": s["macs"],
            "per_timestep": s["per_timestep"], "energy_images": s["images"],
            "firing_rates": s["firing_rates"], "energy": s["energy"]}


def plot_report(report: dict, path: Path) -> None:
    """Accuracy and energy against t, with the ANN as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, ann = report["per_t"], report["reference"]
    ts = [r["t"] for r in rows]
    halted = report.get("halted")
    fig = Figure(figsize=(15 if halted else 10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if halted else 2)
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(ts, [100 * r["top1"] for r in rows], "o-", label="SNN")
    ax1.axhline(100 * ann["top1"], ls="--", color="k", label="ANN")
    ax1.set(xlabel="timesteps t", ylabel="top-1 (%)", title=f"{report['model']}: accuracy")
    ax1.legend()
    ax2.plot(ts, [r["energy_mj"] for r in rows], "o-", label="SNN (after t)")
    ax2.axhline(ann["energy_mj"], ls="--", color="k", label="ANN")
    ax2.set(xlabel="timesteps t", ylabel="energy per image (mJ)", title="energy")
    ax2.legend()
    if halted:  # halted runs (each t its own halting window) against fewer timesteps
        from halting.plots import draw_baseline

        ax3 = axes[2]
        draw_baseline(ax3, report["baseline"]["without_halting"])
        ax3.plot([r["energy_mj"] for r in halted], [100 * r["top1"] for r in halted], "*-",
                 color="tab:red", ms=9,
                 label="halted, T = " + ",".join(str(r["t"]) for r in halted))
        if "baselines" in report:
            from halting.plots import draw_protocol_curves

            draw_protocol_curves(ax3, report["baselines"])
        ax3.set(xlabel="energy per image (mJ)", ylabel="top-1 (%)",
                title="halting against its baselines")
        ax3.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ----------------------------------------------------------------------------- the job
def convert(cfg: ConvertConfig) -> dict:
    """Run the whole conversion job; returns the report (also written to ``out``)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    out = Path(cfg.out)
    vit = build_ann(cfg).to(device)
    train_ds, val_ds, info = build_datasets(cfg.dataset, data_dir=cfg.data_dir,
                                            train_subset=cfg.train_subset,
                                            val_subset=cfg.val_subset, seed=cfg.seed,
                                            augment=cfg.train_epochs > 0 or cfg.halting_finetune > 0)
    history, finetune = [], []
    if cfg.train_epochs or cfg.halting_finetune:
        g = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g)
        if cfg.train_epochs:
            history = train_ann(vit, loader, cfg.train_epochs, lr=cfg.train_lr, device=device,
                                progress=cfg.progress)
        if cfg.halting_finetune:  # A-ViT: channel 0 learns when a token is done
            from .halting_finetune import halting_finetune

            d = HaltingConfig()
            finetune = halting_finetune(vit, loader, cfg.halting_finetune,
                                        lr=cfg.halting_finetune_lr, alpha=d.alpha, beta=d.beta,
                                        eps=d.eps, delta_p=cfg.halting_finetune_delta_p,
                                        device=device, progress=cfg.progress)
        from safetensors.torch import save_file
        state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
        atomic_write(out / "ann.safetensors", lambda tmp: save_file(state, tmp))
    vit.eval()
    snn = SpikingViT(vit, levels=cfg.levels, timesteps=cfg.timesteps).to(device)
    calib_ds, _, _ = build_datasets(cfg.dataset, data_dir=cfg.data_dir,
                                    train_subset=cfg.calib_images, seed=cfg.seed + 1,
                                    augment=False)
    thresholds = calibrate(snn, DataLoader(calib_ds, batch_size=cfg.batch_size),
                           method=cfg.calib_method, percentile=cfg.calib_percentile,
                           max_images=cfg.calib_images, seed=cfg.seed, device=device)
    model_path = out / "model.safetensors"
    save_converted(model_path, snn, cfg, _vit_kwargs(vit, cfg))
    snn.compile(cfg.compile)

    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False)
    ev = evaluate_side_by_side(vit, snn, val_loader, cfg.timesteps, device,
                               progress=cfg.progress)
    costs = EnergyCosts.load(cfg.energy_costs)
    energy = snn_energy(snn, val_loader, cfg.timesteps, device, cfg.energy_images, costs)
    first = next(iter(val_loader))[0][: min(cfg.energy_images, cfg.batch_size)].to(device)
    ann_e = ann_energy(vit, first, costs)
    labels, pred, conf = ev.pop("answers")
    per_t = energy["energy"]["per_t"]  # both ledgers, cumulative after every t
    runs = {"unhalted": AnytimeRun(labels, pred, conf,
                                   np.array([p["conventional_mj"] for p in per_t]),
                                   np.array([p["full_mj"] for p in per_t]))}
    halting_cfg = cfg.halting_config()
    halted = {}
    if halting_cfg is not None:
        snn.set_halted_kv(cfg.halted_kv)
        halted = {"halted": evaluate_halted(snn, val_loader, cfg.timesteps, device, halting_cfg,
                                            cfg.energy_images, cfg.execution, costs)}
        halted["halting"] = {**dataclasses.asdict(halting_cfg.for_model(snn)),
                             "execution": cfg.execution,
                             "halted_kv": cfg.halted_kv}
        halted.update(save_depth_heatmap(snn, val_loader, device, halting_cfg,
                                         out / "halting_depth.png", execution=cfg.execution))
        curve = curve_of(runs["unhalted"])  # the same SNN without halting, after t
        runs["halted"] = collect_anytime(snn, val_loader, device, timesteps=cfg.timesteps,
                                         halting=halting_cfg, execution=cfg.execution,
                                         energy_images=cfg.energy_images, costs=costs)
        halted["baselines"] = {"reference": "without_halting",
                               **halting_baselines(runs["unhalted"], runs["halted"])}
        halted["baseline"] = {"without_halting": curve, "vs_halted": [
            {"t": r["t"], "conventional": against_baseline(r["top1"], r["energy_mj"], curve),
             "full": against_baseline(r["top1"], r["full_energy_mj"], curve,
                                      energy_key="full_energy_mj")}
            for r in halted["halted"]]}
    report = {
        "schema": SCHEMA, "kind": "converted",
        "model": canonical_name(cfg.model), "dataset": info.name, "timesteps": cfg.timesteps,
        "levels": cfg.levels, "model_path": str(model_path),
        "top1": ev["snn_top1"][-1], "energy_mj": energy["energy_mj"],
        "full_energy_mj": energy["energy"]["full_mj"],
        "per_t": per_t_rows(ev["snn_top1"], per_t, agreement=ev["agreement"],
                            logit_error=ev["logit_error"]),
        "reference": {"kind": "ann", "top1": ev["ann_top1"], "energy_mj": ann_e["energy_mj"],
                      "full_energy_mj": energy["energy"]["ann_full_mj"],
                      "images_per_s": ev["ann_images_per_s"], "macs": ann_e["macs"]},
        "images_per_s": ev["snn_images_per_s"], "test_images": ev["test_images"],
        "snn_step_cost_vs_ann": ev["snn_step_cost_vs_ann"],
        "sops": energy["sops_at_T"], "macs": energy["macs_at_T"],
        "energy_images": energy["energy_images"],
        "energy": energy["energy"],
        "firing_rates": energy["firing_rates"],
        "calibration": {"method": cfg.calib_method, "images": cfg.calib_images,
                        "thresholds": thresholds},
        "ann_training": history,
        **({"halting_finetune": finetune} if finetune else {}),
        **halted,
        "predictions": save_predictions(out / "predictions.npz", labels, runs),
        "provenance": provenance(
            seeds=[cfg.seed], checkpoints=[c for c in (cfg.checkpoint, cfg.pretrained_file)
                                           if c] + [model_path],
            images={"test": val_ds}, reported="test"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.perf_counter() - start,
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot_report(report, out / "report.png")
    report["plot"] = str(out / "report.png")
    return report
