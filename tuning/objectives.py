"""What one trial measures: top-1, energy per image and token ratio of a halting setting.

* :class:`DirectTrial` (``--path direct``): a short STAS stage-2 fine-tune with halting
  from a stage-1 checkpoint of ``stas-train`` (the only path that can tune ``delta_p``).
* :class:`ConvertedTrial` (``--path converted``): inference only, on a converted model
  of ``stas-convert`` loaded once per process.

Both are plain callables ``trial(params, number, on_epoch=None) -> dict`` with ``top1``,
``energy_mj`` and ``token_ratio``; Optuna is not needed here.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

from stas_core import checkpoint
from stas_core.data import build_datasets, get_dataset_info
from stas_core.energy import EnergyCosts
from stas_core.evaluate import evaluate_halting

from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DIRECT_FORMAT = "stas-direct/1"        # stas_core.train.CHECKPOINT_FORMAT
CONVERTED_FORMAT = "stas-converted/1"  # convert.pipeline.FORMAT
_KINDS = {DIRECT_FORMAT: ("direct", "a direct-training checkpoint written by stas-train"),
          CONVERTED_FORMAT: ("converted", "a converted model written by stas-convert")}

EpochHook = Optional[Callable[[int, dict], None]]


def read_header(path: str | Path) -> dict:
    """Format, config and other JSON fields of a STAS checkpoint, without its tensors."""
    return checkpoint.read_header(path, "stas-train (--path direct) or stas-convert "
                                        "(--path converted)")


def checkpoint_path_kind(path: str | Path) -> str:
    """'direct' or 'converted': the ``--path`` a checkpoint needs, from its format."""
    fmt = read_header(path).get("format")
    if fmt not in _KINDS:
        raise CheckpointError(f"{path} has format {fmt!r}; stas-tune takes a stage-1 checkpoint "
                              f"of stas-train ({DIRECT_FORMAT!r}) or a model of stas-convert "
                              f"({CONVERTED_FORMAT!r})")
    return _KINDS[fmt][0]


def check_kind(path: str | Path, want: str) -> dict:
    """The header of ``path`` if it is a checkpoint for ``--path want``; else one clear
    :class:`CheckpointError` naming what it is and which ``--path`` it needs."""
    header = read_header(path)
    fmt = header.get("format")
    if fmt not in _KINDS:
        raise CheckpointError(f"{path} has format {fmt!r}; stas-tune takes a stage-1 checkpoint "
                              f"of stas-train ({DIRECT_FORMAT!r}, --path direct) or a model of "
                              f"stas-convert ({CONVERTED_FORMAT!r}, --path converted)")
    kind, what = _KINDS[fmt]
    if kind != want:
        raise CheckpointError(f"{path} is {what} ({fmt}), but --path {want} was given; "
                              f"use --path {kind}")
    return header


# ----------------------------------------------------------------------------- direct
class DirectTrial:
    """STAS stage 2 for one knob setting: ``train(TrainConfig(halting=True, init_from=CKPT,
    alpha, beta, eps, delta_p, epochs=trial_epochs, out=OUT/trials/<number>))``.

    The model, timesteps, SPS and neuron settings come from the checkpoint's config;
    ``None`` arguments keep the checkpoint's values.
    """

    path_kind = "direct"

    def __init__(self, checkpoint: str | Path, out: str | Path, *, trial_epochs: int = 1,
                 lr: Optional[float] = None,
                 dataset: Optional[str] = None, data_dir: Optional[str] = None,
                 train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                 batch_size: Optional[int] = None, timesteps: Optional[int] = None,
                 energy_images: int = 256, energy_costs: Optional[str] = None, seed: int = 0,
                 device: str = "auto", header: Optional[dict] = None) -> None:
        from stas_core.train import TrainConfig

        header = header or check_kind(checkpoint, "direct")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        saved = TrainConfig(**{k: v for k, v in (header.get("config") or {}).items() if k in names})
        self.out = Path(out)
        self.base = dataclasses.replace(
            saved, halting=True, init_from=str(checkpoint), epochs=trial_epochs, resume=False,
            lr=lr or saved.lr,
            progress=False, dataset=dataset or saved.dataset, data_dir=data_dir,
            train_subset=train_subset, val_subset=val_subset,
            batch_size=batch_size or saved.batch_size, timesteps=timesteps or saved.timesteps,
            energy_images=energy_images, energy_costs=energy_costs, seed=seed, device=device,
            workers=0, report_split="val",  # a trial's figures choose: never the test split
            out=str(self.out / "trials" / "0")).validate().resolved()
        # fail here (before any trial exists) on missing data, not inside a trial
        build_datasets(self.base.dataset, data_dir=data_dir, train_subset=train_subset,
                       val_subset=val_subset, seed=seed, frames=self.base.timesteps)

    #: TrainConfig fields a trial depends on that are also stas-train options (best.json
    #: holds them all, so ``stas-train --config best.json`` trains what was tuned)
    OPTIONS = ("init_from", "model", "dataset", "data_dir", "timesteps", "sps", "integrate",
               "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
               "label_smoothing", "train_subset", "val_subset", "augment", "seed",
               "energy_images", "energy_costs", "bn_images", "amp", "accumulate", "execution",
               "halting_output", "alpha", "beta", "eps", "delta_p")
    NEURON_OPTIONS = ("tau", "surrogate", "backend")

    def defaults(self) -> dict:
        """The ``stas-train`` options of a stage-2 run with these settings (for best.json);
        the tuned knobs overwrite alpha, beta, eps and delta_p."""
        b = self.base
        extra = sorted(set(b.neuron) - set(self.NEURON_OPTIONS))
        if extra:
            logger.warning("neuron settings %s have no stas-train option: best.json "
                           "cannot carry them", ", ".join(extra))
        return {"halting": True, **{k: getattr(b, k) for k in self.OPTIONS},
                **{k: b.neuron[k] for k in self.NEURON_OPTIONS if k in b.neuron}}

    def baseline(self) -> dict:
        """The stage-1 model without halting after t = 1..T, on the trials' images."""
        from torch.utils.data import DataLoader

        from stas_core.evaluate import timestep_baseline
        from stas_core.train import load_trained_model, resolve_device

        b = self.base
        device = resolve_device(b.device)
        model, _ = load_trained_model(b.init_from, device)
        _, val_ds, _ = build_datasets(b.dataset, data_dir=b.data_dir, val_subset=b.val_subset,
                                      seed=b.seed, augment=False, frames=b.timesteps,
                                      split="val")
        return timestep_baseline(model, DataLoader(val_ds, batch_size=b.batch_size), device,
                                 timesteps=b.timesteps, energy_images=b.energy_images,
                                 costs=b.costs())

    def on_test(self, best: dict) -> dict:
        """The chosen trial's stage-2 model on the test split, against the stage-1 model."""
        from stas_core.train import CHECKPOINT_NAME, load_trained_model, resolve_device

        b = dataclasses.replace(self.base, **best["params"])
        device = resolve_device(b.device)
        ckpt = Path(best["trial_dir"]) / CHECKPOINT_NAME
        halted, _ = load_trained_model(ckpt, device)
        stage1, _ = load_trained_model(b.init_from, device)
        _, test_ds, _ = build_datasets(b.dataset, data_dir=b.data_dir, val_subset=b.val_subset,
                                       augment=False, frames=b.timesteps, split="test")
        return held_out_report(stage1, halted, b.halting_config(), test_ds, device,
                               batch_size=b.batch_size, timesteps=b.timesteps,
                               execution=b.execution, energy_images=b.energy_images,
                               costs=b.costs(), checkpoints=[b.init_from, ckpt], seed=b.seed)

    def __call__(self, params: dict, number: int, on_epoch: EpochHook = None) -> dict:
        from stas_core.train import train

        cfg = dataclasses.replace(self.base, **params, out=str(self.out / "trials" / str(number)))
        summary = train(cfg, on_epoch=on_epoch)
        return {"top1": float(summary["top1"]), "energy_mj": float(summary["energy_mj"]),
                "full_energy_mj": float(summary["energy"]["full_mj"]),
                "token_ratio": float(summary.get("token_ratio", 1.0)), "trial_dir": cfg.out}


# ----------------------------------------------------------------------------- converted
class ConvertedTrial:
    """Inference with halting (the model's score and readout, stas-convert's execution) on
    a converted model, loaded once; ``energy_mj`` is per image at ``timesteps`` (default: the model's T)."""

    path_kind = "converted"

    def __init__(self, checkpoint: str | Path, *, dataset: Optional[str] = None,
                 data_dir: Optional[str] = None, val_subset: Optional[int] = None,
                 batch_size: Optional[int] = None, timesteps: Optional[int] = None,
                 energy_images: int = 256, energy_costs: Optional[str] = None, seed: int = 0,
                 device: str = "auto", accumulate: str = "both",
                 halting_score: Optional[str] = None, header: Optional[dict] = None) -> None:
        from torch.utils.data import DataLoader

        from convert.pipeline import ConvertConfig, load_converted
        from stas_core.train import resolve_device

        header = header or check_kind(checkpoint, "converted")
        info = get_dataset_info(dataset or "fashion-mnist")
        vk = header.get("vit_kwargs") or {}
        got = (vk.get("img_size"), vk.get("in_chans"), vk.get("num_classes"))
        want = (info.img_size, info.in_chans, info.num_classes)
        if any(g is not None and g != w for g, w in zip(got, want)):
            raise ConfigError(f"{checkpoint} was converted for img_size/in_chans/num_classes "
                              f"{got}, but --dataset {info.name} gives {want}; pass the "
                              f"dataset the model was converted for")
        if timesteps is not None and timesteps < 1:
            raise ConfigError(f"timesteps must be an integer >= 1, got {timesteps!r}")
        self.device = resolve_device(device)
        self.inference = ConvertConfig()  # stas-convert's halting readout and K/V defaults
        self.model = load_converted(checkpoint, self.device).set_halted_kv(
            self.inference.halted_kv)
        self.timesteps = int(timesteps or self.model.timesteps)
        self.accumulate = accumulate
        self.halting_score = halting_score  # None: the model's default
        self.execution = self.inference.execution
        self.energy_images = energy_images
        self.costs = EnergyCosts.load(energy_costs)
        # trials choose: they see held-out training images, never the test split
        self.split_args = dict(dataset=info.name, data_dir=data_dir, val_subset=val_subset)
        _, val_ds, _ = build_datasets(info.name, data_dir=data_dir, val_subset=val_subset,
                                      seed=seed, augment=False, split="val")
        self.batch_size = batch_size or 128
        self.loader = DataLoader(val_ds, batch_size=self.batch_size, shuffle=False)
        self.checkpoint = checkpoint

    def defaults(self) -> dict:
        """The ``stas-convert`` options that reproduce this evaluation (for best.json)."""
        from halting import HaltingConfig

        readout = HaltingConfig(score=self.halting_score).for_model(self.model)
        return {"halting": True, "timesteps": self.timesteps, "accumulate": self.accumulate,
                "halting_score": readout.score, "halting_output": readout.output,
                "halted_kv": self.inference.halted_kv, "execution": self.execution}

    def baseline(self) -> dict:
        """The converted model without halting after t = 1..T, on the trials' images."""
        from stas_core.evaluate import timestep_baseline

        return timestep_baseline(self.model, self.loader, self.device, timesteps=self.timesteps,
                                 energy_images=self.energy_images, costs=self.costs)

    def _halting(self, params: dict):
        from stas_core.train import halting_config_of

        knobs = SimpleNamespace(halting=True, accumulate=self.accumulate,
                                execution=self.execution, alpha=params["alpha"],
                                beta=params["beta"], eps=params["eps"])
        return halting_config_of(knobs, score=self.halting_score)  # readout: the model's

    def on_test(self, best: dict) -> dict:
        """The chosen knobs on the test split, against the same model without halting."""
        a = self.split_args
        _, test_ds, _ = build_datasets(a["dataset"], data_dir=a["data_dir"],
                                       val_subset=a["val_subset"], augment=False, split="test")
        return held_out_report(self.model, self.model, self._halting(best["params"]), test_ds,
                               self.device, batch_size=self.batch_size,
                               timesteps=self.timesteps, execution=self.execution,
                               energy_images=self.energy_images, costs=self.costs,
                               checkpoints=[self.checkpoint])

    def __call__(self, params: dict, number: int, on_epoch: EpochHook = None) -> dict:
        return evaluate_halting(self.model, self.loader, self._halting(params), self.timesteps,
                                self.device,
                                energy_images=self.energy_images, execution=self.execution,
                                costs=self.costs)


def held_out_report(unhalted_model, halted_model, halting, test_ds, device, *, batch_size: int,
                    timesteps: Optional[int], execution: str, energy_images: int, costs,
                    checkpoints, seed: int = 0) -> dict:
    """A chosen halting point measured on the test split: top-1 and both energies, and
    :func:`stas_core.baselines.halting_baselines` against the unhalted model on the same
    images, with provenance (chosen on the validation split, reported on the test split)."""
    from torch.utils.data import DataLoader

    from stas_core.baselines import collect_anytime, halting_baselines
    from stas_core.provenance import provenance

    loader = DataLoader(test_ds, batch_size=batch_size, shuffle=False)
    kw = dict(timesteps=timesteps, energy_images=energy_images, costs=costs)
    base = collect_anytime(unhalted_model, loader, device, **kw)
    halted = collect_anytime(halted_model, loader, device, halting=halting,
                             execution=execution, **kw)
    report = halting_baselines(base, halted)
    return {"split": "test", **report["halted"], "baselines": report,
            "provenance": provenance(seeds=[seed], checkpoints=checkpoints,
                                     images={"test": test_ds}, chose="val", reported="test")}
