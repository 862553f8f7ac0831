"""Direct training of spiking transformers with surrogate gradients (``stas-train --direct``).

AdamW, timm's warmup + cosine schedule (per step), label smoothing, AMP on CUDA, DDP under
``torchrun`` (gloo on CPU, NCCL on GPU). After every epoch the BatchNorm statistics are
recomputed for the epoch's final weights (:mod:`stas_core.batchnorm`), then the process of
rank 0 appends a line to ``metrics.jsonl`` and atomically rewrites ``last.safetensors``;
``resume`` picks up from there. At the end ``summary.json`` reports accuracy, energy,
firing rates and speed.

Stage 2 (``init_from``) is the model stage 1 was: model, timesteps, SPS, integration and
neuron settings left unset (None) are taken from the stage-1 checkpoint, and a value that
conflicts with it is an error (:meth:`TrainConfig.resolved`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from halting.plugin import DEFAULT_EXECUTION

from .batchnorm import batches_for, frozen_batchnorms, recalibrate_batchnorm
from .checkpoint import atomic_write_text, load_checkpoint, read_header, save_checkpoint
from .data import SPLITS, build_datasets, build_loaders, get_dataset_info
from .errors import CheckpointError, ConfigError, check_positive_int
from .evaluate import baseline_section, energy_report, evaluate, save_depth_heatmap
from .models import create_model
from .models.base import SpikingTransformer
from .timing import Stopwatch
from .distributed import (all_reduce_sum, augmentation_seed, convert_sync_batchnorm,
                          gather_rng_states, init_distributed, leave, rank_device)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "stas-direct/1"
CHECKPOINT_NAME = "last.safetensors"

#: What defines the model (stage 2 takes these from stage 1), with their defaults.
MODEL_DEFAULTS = {"model": "spikformer-2-128", "timesteps": 4, "sps": "integrated",
                  "integrate": "max"}
NEURON_DEFAULTS = {"tau": 2.0, "backend": "fused", "surrogate": "sigmoid"}
_FLAGS = {"timesteps": "--timesteps"}  # the option of each inherited setting (else --name)


@dataclass
class TrainConfig:
    """Everything a direct training run depends on (also stored in the checkpoint).

    ``model``, ``timesteps``, ``sps``, ``integrate`` and the ``neuron`` keys left unset
    take :data:`MODEL_DEFAULTS` / :data:`NEURON_DEFAULTS`, or with ``init_from`` the
    stage-1 checkpoint's values (see :meth:`resolved`).
    """

    model: Optional[str] = None      # None: spikformer-2-128, or init_from's
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    timesteps: Optional[int] = None  # None: 4, or init_from's
    sps: Optional[str] = None        # None: integrated (I-SPS), or init_from's
    integrate: Optional[str] = None  # None: max, or init_from's
    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.2
    label_smoothing: float = 0.1
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    augment: bool = True
    out: str = "runs/direct"
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    energy_images: int = 256
    energy_costs: Optional[str] = None  # JSON file of EnergyCosts fields (None: 45 nm)
    neuron: dict = field(default_factory=dict)  # LIF settings; unset: defaults or init_from's
    bn_images: int = 2048          # training images that recompute BatchNorm statistics
    #                                after every epoch (0: keep the running averages)
    amp: Optional[bool] = None     # mixed precision; None: on CUDA (float16), off on CPU
    report_split: str = "test"     # where summary.json reports ('val': a stas-tune trial,
    #                                whose figures make a choice, never sees the test split)
    halting: bool = False          # stage 2 of STAS: train with token halting
    alpha: float = 1.0
    beta: float = -2.0
    eps: float = 0.01
    delta_p: float = 5e-4          # weight of the ponder loss
    accumulate: str = "both"
    execution: str = DEFAULT_EXECUTION  # halting: active tokens only ('mask': dense)
    halting_output: Optional[str] = None  # None: the model's (mean_field, STAS); 'last'

    init_from: Optional[str] = None  # stage-1 checkpoint to start from
    progress: Optional[bool] = None  # None: a bar when stderr is a terminal

    def validate(self) -> "TrainConfig":
        if self.timesteps is not None:
            check_positive_int("timesteps", self.timesteps)
        check_positive_int("epochs", self.epochs)
        if self.report_split not in SPLITS:
            raise ConfigError(f"report_split must be one of {', '.join(SPLITS)}; got "
                              f"{self.report_split!r}")
        if isinstance(self.bn_images, bool) or not isinstance(self.bn_images, int) \
                or self.bn_images < 0:
            raise ConfigError(f"bn_images must be an integer >= 0 (0: no BatchNorm "
                              f"recalibration); got {self.bn_images!r}")
        check_positive_int("batch_size", self.batch_size)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        get_dataset_info(self.dataset)
        if self.delta_p < 0:
            raise ConfigError(f"delta_p must be >= 0; got {self.delta_p}")
        self.halting_config()  # validates alpha/beta/eps/accumulate/execution
        self.costs()  # a bad --energy-costs file fails before any training
        return self

    def costs(self):
        """The :class:`~stas_core.energy.EnergyCosts` of ``energy_costs`` (or the defaults)."""
        from .energy import EnergyCosts

        return EnergyCosts.load(self.energy_costs)

    def halting_config(self):
        """The :class:`halting.HaltingConfig` of this run (None without --halting)."""
        return halting_config_of(self, output=self.halting_output)

    def resolved(self) -> "TrainConfig":
        """This config with every model-defining setting filled in: from ``init_from``'s
        checkpoint when given (an explicit value that differs from it is a ConfigError
        naming both), else from the defaults."""
        if self.init_from:
            header = read_header(self.init_from, "stas-train")
            if header.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    f"--init-from {self.init_from} is not a stage-1 checkpoint of stas-train "
                    f"(format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
            saved = header.get("config") or {}
            source = {k: saved.get(k, v) for k, v in MODEL_DEFAULTS.items()}
            neuron = {**NEURON_DEFAULTS, **(saved.get("neuron") or {})}
        else:
            source, neuron = dict(MODEL_DEFAULTS), dict(NEURON_DEFAULTS)
        values = {}
        for key, inherited in [*source.items(), *((k, neuron.get(k)) for k in self.neuron)]:
            given = self.neuron.get(key) if key in self.neuron else getattr(self, key)
            if given is None:
                values[key] = inherited
                continue
            if self.init_from and inherited is not None and given != inherited:
                flag = _FLAGS.get(key, f"--{key}")
                raise ConfigError(
                    f"{flag} {given} conflicts with the stage-1 checkpoint --init-from "
                    f"{self.init_from}, which was trained with {flag} {inherited}: stage 2 "
                    f"must be the model stage 1 was; drop {flag} (it is taken from the "
                    f"checkpoint) or start from another checkpoint")
            values[key] = given
        neuron.update({k: values.pop(k) for k in self.neuron})
        return dataclasses.replace(self, **values, neuron=neuron)


def halting_config_of(cfg, **extra):
    """``HaltingConfig`` from a run config's alpha/beta/eps/accumulate (validated even when
    halting is off; None then); halting errors become ConfigError for the CLIs."""
    from halting import HaltingConfig, HaltingConfigError
    from halting.plugin import check_execution

    try:
        check_execution(cfg.execution)
        out = HaltingConfig(alpha=cfg.alpha, beta=cfg.beta, eps=cfg.eps,
                            accumulate=cfg.accumulate, **extra)
    except HaltingConfigError as exc:
        raise ConfigError(str(exc)) from None
    return out if cfg.halting else None


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an unusable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def build_model(cfg: TrainConfig) -> SpikingTransformer:
    """The model a config describes, sized for its dataset."""
    info = get_dataset_info(cfg.dataset)
    return create_model(cfg.model, img_size=info.img_size, in_chans=info.in_chans,
                         num_classes=info.num_classes, timesteps=cfg.timesteps, sps=cfg.sps,
                         integrate=cfg.integrate, batch_first=info.events or None,
                         **cfg.neuron)


def load_trained_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                       **overrides) -> tuple[SpikingTransformer, TrainConfig]:
    """Rebuild a model from a ``stas-train`` checkpoint (``overrides`` change config fields)."""
    state = load_checkpoint(path, device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a direct-training checkpoint "
                              f"(format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    cfg = dataclasses.replace(TrainConfig(**state["config"]), **overrides)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match model {cfg.model}: {exc}") from None
    return model.to(device).eval(), cfg


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """timm's :class:`~timm.scheduler.CosineLRScheduler` by optimizer step: linear warmup
    from ``lr / warmup_steps`` over ``warmup_steps`` steps, then cosine decay to 0 over the
    rest. Call ``scheduler.step_update(global_step)`` after every optimizer step; the lr of
    any step is a function of the step alone, so a resumed run sets it from the step count.
    """
    from timm.scheduler import CosineLRScheduler

    warmup_steps = max(1, int(warmup_steps))
    base_lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps),
                             warmup_t=warmup_steps, warmup_lr_init=base_lr / warmup_steps,
                             warmup_prefix=True, lr_min=0.0, t_in_epochs=False)


def progress_bar(enabled: Optional[bool], total: int, desc: str, main: bool):
    """A tqdm bar on the main process when wanted (None: when stderr is a terminal), else
    None (callers then log plain lines)."""
    if not main:
        return None
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *,
          on_epoch: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run a training job; returns the summary (also written to ``out/summary.json``).

    ``on_epoch(epoch, record)`` is called on every process after each epoch's validation
    and checkpoint, with the 0-based epoch index and that epoch's history record (e.g. to
    report intermediate values to an Optuna pruner; whatever it raises stops training)."""
    cfg = cfg.validate().resolved().validate()
    device = resolve_device(cfg.device)
    d = init_distributed(device)
    device = rank_device(device, d)
    start_wall = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME

    # every epoch is validated on held-out training images; the test split only reports
    train_ds, val_ds, info = build_datasets(cfg.dataset, data_dir=cfg.data_dir,
                                            train_subset=cfg.train_subset,
                                            val_subset=cfg.val_subset, seed=cfg.seed,
                                            augment=cfg.augment, frames=cfg.timesteps,
                                            split="val")
    _, test_ds, _ = build_datasets(cfg.dataset, data_dir=cfg.data_dir, augment=False,
                                   val_subset=cfg.val_subset, frames=cfg.timesteps,
                                   split=cfg.report_split)
    train_loader, val_loader = build_loaders(train_ds, val_ds,
                                             batch_size=max(1, cfg.batch_size // d.world),
                                             workers=cfg.workers, distributed=d.enabled,
                                             seed=cfg.seed)
    train_sampler = train_loader.sampler
    # BatchNorm recalibration sees training images as evaluation does: not augmented
    # (random crops and flips shift the statistics: 0.17 instead of 0.47 top-1, measured)
    recal_batches = batches_for(cfg.bn_images, cfg.batch_size)
    recal_loader = train_loader
    if recal_batches and cfg.augment and not info.events:  # event sets are not augmented
        plain, _, _ = build_datasets(cfg.dataset, data_dir=cfg.data_dir,
                                     train_subset=cfg.train_subset, val_subset=cfg.val_subset,
                                     seed=cfg.seed, augment=False, frames=cfg.timesteps)
        recal_loader, _ = build_loaders(plain, val_ds, batch_size=max(1, cfg.batch_size // d.world),
                                        workers=0, distributed=d.enabled, seed=cfg.seed)

    model = build_model(cfg).to(device)
    if cfg.init_from:
        stage1 = load_checkpoint(cfg.init_from, device)
        try:
            model.load_state_dict(stage1["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"--init-from {cfg.init_from} does not match {cfg.model}: "
                                  f"{str(exc).splitlines()[0]}") from None
        logger.info("initialised from %s", cfg.init_from)
    torch.manual_seed(augmentation_seed(cfg.seed, d.rank))  # weights above: the same on all
    halting_cfg = cfg.halting_config()
    if d.enabled:
        model = convert_sync_batchnorm(model)
    from halting import Halted

    runner = Halted(model, halting_cfg, execution=cfg.execution) if halting_cfg is not None else model
    ddp_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    net = nn.parallel.DistributedDataParallel(runner, device_ids=ddp_ids) if d.enabled else runner
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, total_steps, warmup)
    amp = device.type == "cuda" if cfg.amp is None else bool(cfg.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp)  # its state is checkpointed
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[dict] = []
    start_epoch = 0
    if cfg.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{ckpt_path} is not a direct-training checkpoint")
        saved = TrainConfig(**state["config"])
        for key in ("model", "dataset", "timesteps", "sps"):
            if getattr(saved, key) != getattr(cfg, key):
                raise ConfigError(f"--resume: {key} is {getattr(cfg, key)!r} but the checkpoint "
                                  f"in {out} was trained with {getattr(saved, key)!r}; use the "
                                  f"same value or another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start_epoch = int(state["epoch"])
        scheduler.step_update(start_epoch * steps_per_epoch)  # lr is a function of the step
        torch.set_rng_state(state["rng"][d.rank].cpu() if d.rank < len(state["rng"])
                            else state["rng"][0].cpu())
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif cfg.resume:
        logger.info("--resume: no checkpoint in %s, starting fresh", out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    frozen = frozen_batchnorms(model, halting=halting_cfg is not None, sps=cfg.sps)
    if frozen and d.main:
        logger.info("stage 2 with vanilla SPS: the %d BatchNorm layers of the patch splitting "
                    "keep their stage-1 statistics", len(frozen))
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)
        net.train()
        for bn in frozen:
            bn.eval()
        watch = Stopwatch(device).start()
        loss_sum = correct = seen = 0.0
        bar = progress_bar(cfg.progress, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", d.main)
        for step, (images, labels) in enumerate(train_loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = net(images)
                if halting_cfg is not None:  # task loss on the mean field + ponder loss
                    logits, ponder = logits
                    loss = criterion(logits, labels) + cfg.delta_p * ponder
                else:
                    loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            loss_sum += float(loss.detach()) * labels.numel()
            correct += float((logits.argmax(-1) == labels).sum())
            seen += labels.numel()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                bar.update(1)
            elif d.main and (step + 1) % max(1, steps_per_epoch // 10) == 0:
                logger.info("epoch %d step %d/%d loss %.4f acc %.4f", epoch + 1, step + 1,
                            steps_per_epoch, loss_sum / seen, correct / seen)
        if bar is not None:
            bar.close()
        train_s = watch.stop()
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], d, device)
        # the evaluated and saved model carries BatchNorm statistics of its final weights
        recal_loader.sampler.set_epoch(epoch)
        recalibrate_batchnorm(runner, recal_loader, device, batches=recal_batches, amp=amp,
                              amp_dtype=amp_dtype, frozen=frozen)
        ev = evaluate(runner, val_loader, device, amp=amp, amp_dtype=amp_dtype)
        v_correct, v_total = all_reduce_sum([ev["correct"], ev["images"]], d, device)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                  "val_top1": v_correct / max(v_total, 1), "lr": optimizer.param_groups[0]["lr"],
                  "epoch_s": train_s, "train_images_per_s": seen / train_s,
                  "elapsed_s": time.perf_counter() - start_wall}
        history.append(record)
        rng = gather_rng_states(d)
        if d.main:
            logger.info("epoch %d: loss %.4f train %.4f val %.4f (%.0fs)", epoch + 1,
                        record["train_loss"], record["train_top1"], record["val_top1"], train_s)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "history": history, "rng": rng})
        if on_epoch is not None:
            on_epoch(epoch, record)

    summary = None
    if d.main:
        summary = _summarise(cfg, model, runner, test_ds, device, ckpt_path, history,
                             start_wall, amp, amp_dtype,
                             images={"val": val_ds, cfg.report_split: test_ds})
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    leave(d)
    return summary


def _summarise(cfg: TrainConfig, model: nn.Module, runner: nn.Module, test_ds, device,
               ckpt_path, history, start_wall, amp, amp_dtype, *, images: dict) -> dict:
    """The run's summary, reported on ``cfg.report_split`` (the test split unless a
    choice is made on it; epochs were validated on the held-out training images)."""
    from torch.utils.data import DataLoader

    from .baselines import collect_anytime, curve_of, halting_baselines
    from .provenance import provenance, save_predictions
    from .report import SCHEMA, per_t_rows

    test_loader = DataLoader(test_ds, batch_size=cfg.batch_size, shuffle=False)
    halting_cfg = cfg.halting_config()
    ev = evaluate(runner, test_loader, device, amp=amp, amp_dtype=amp_dtype)
    energy = energy_report(model, test_loader, device, max_images=cfg.energy_images,
                           costs=cfg.costs(), halting=halting_cfg, execution=cfg.execution)
    depth = {} if halting_cfg is None else save_depth_heatmap(
        model, test_loader, device, halting_cfg, Path(cfg.out) / "halting_depth.png",
        execution=cfg.execution)
    baseline = {}
    checkpoints = [ckpt_path]
    anytime = dict(energy_images=cfg.energy_images, costs=cfg.costs())
    per_step = energy["energy"]["per_t"]  # this model's energy after every t, counted above
    counted = ([p["conventional_mj"] for p in per_step], [p["full_mj"] for p in per_step])
    if halting_cfg is not None:  # what running fewer timesteps, or early exit, gives
        halted = collect_anytime(model, test_loader, device, halting=halting_cfg,
                                 execution=cfg.execution, energy=counted)
        without = collect_anytime(model, test_loader, device, **anytime)
        runs = {"unhalted": without, "halted": halted}
        curves = {"without_halting": curve_of(without)}
        if cfg.init_from:  # stage 2: the stage-1 model is the one to beat
            stage1, _ = load_trained_model(cfg.init_from, device)
            runs["unhalted"] = collect_anytime(stage1, test_loader, device, **anytime)
            runs["without_halting"] = without
            curves["stage1"] = curve_of(runs["unhalted"])
            checkpoints.append(cfg.init_from)
        protocol = {"reference": "stage1" if cfg.init_from else "without_halting",
                    **halting_baselines(runs["unhalted"], halted)}
        baseline = {"baseline": baseline_section(
            curves, ev["top1"], energy["energy_mj"], energy["energy"]["full_mj"],
            Path(cfg.out) / "halting_vs_baseline.png", protocol=protocol,
            title=f"{cfg.model}: STAS against its baselines"),
            "baselines": protocol}
    else:  # top-1 and energy after every t, from one stepwise pass
        run = collect_anytime(model, test_loader, device, energy=counted)
        runs = {"model": run}
    reported = runs["halted"] if halting_cfg is not None else runs["model"]
    baseline["predictions"] = save_predictions(Path(cfg.out) / "predictions.npz",
                                               next(iter(runs.values())).labels, runs)
    baseline["provenance"] = provenance(seeds=[cfg.seed], checkpoints=checkpoints,
                                        images=images, chose="val",
                                        reported=cfg.report_split)
    return {
        "schema": SCHEMA, "kind": "direct",
        "checkpoint": str(ckpt_path),
        "model": cfg.model, "dataset": cfg.dataset, "sps": cfg.sps,
        "timesteps": cfg.timesteps, "epochs": len(history),
        "top1": ev["top1"], "energy_mj": energy["energy_mj"],
        "full_energy_mj": energy["energy"]["full_mj"],
        # the model as run (with halting for STAS) stopped after t = 1..T
        "per_t": per_t_rows(reported.correct.mean(axis=1), energy["energy"]["per_t"]),
        "reference": None,
        "test_images" if cfg.report_split == "test" else "val_images": ev["images"],
        "reported_on": cfg.report_split,
        "sops": energy["sops"], "macs": energy["macs"],
        "energy": energy["energy"],
        **baseline,
        "energy_images": energy["images"],
        "firing_rates": energy["firing_rates"],
        "wall_s": time.perf_counter() - start_wall,
        "images_per_s": ev["images_per_s"],
        "history": history,
        "bn_images": cfg.bn_images, "amp": amp,
        **({"halting": {"alpha": cfg.alpha, "beta": cfg.beta, "eps": cfg.eps,
                        "delta_p": cfg.delta_p, "accumulate": cfg.accumulate,
                        "execution": cfg.execution,
                        "output": runner.cfg.output, "score": runner.cfg.score},
            "token_ratio": ev.get("token_ratio", 1.0),
            "active_fraction": ev.get("active_fraction"), **depth} if halting_cfg else {}),
    }
