"""An Optuna study over the halting knobs: create or join it, run trials until it holds the
requested number of finished trials, export the results.

Several processes (``stas-tune`` workers, on one machine or many) may share a study
through its storage. Each worker loops: under a short per-study lock it fails stale
trials (dead workers, by heartbeat; they are re-queued with the same parameters), counts
finished (COMPLETE or PRUNED) and RUNNING trials, and starts a trial only while
``finished + running < n_trials``; the lock is released as soon as the trial exists.
When the remaining trials all run elsewhere it waits, so a dead worker's trial is picked up
again once its heartbeat is stale. The study thus ends with exactly ``n_trials`` finished
trials, whether one worker runs them, several, or a worker restarted after a kill.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from halting.plugin import SCORES
from stas_core.checkpoint import atomic_write_text
from stas_core.errors import check_positive_int
from stas_core.evaluate import against_baseline

from . import export
from .export import OBJ
from .errors import ConfigError, TuningError, require_optuna
from .objectives import ConvertedTrial, DirectTrial, check_kind, checkpoint_path_kind
from .space import PATHS, SearchSpace, build_space, start_point
from .storage import (ReservationLock, default_storage_url, mask_url, open_storage,
                      stale_trial_callback)

logger = logging.getLogger(__name__)

OBJECTIVES = ("pareto", "energy")
ENERGY_MODELS = ("conventional", "full")
SAMPLERS = ("tpe", "nsgaii", "random")
#: Single objective: a trial below the top-1 floor scores ``PENALTY * (1 + shortfall) +
#: energy``, so every trial meeting the floor ranks above every trial that misses it.
PENALTY = 1000.0


@dataclass
class TuneConfig:
    """Everything a tuning run depends on (the ``stas-tune`` options)."""

    path: Optional[str] = None           # None: detected from the checkpoint's format
    checkpoint: str = ""
    dataset: Optional[str] = None        # None: the checkpoint's (direct) / fashion-mnist
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    n_trials: int = 30
    timeout: Optional[float] = None      # seconds; no new trial starts after it
    study_name: str = "stas-tune"
    storage: Optional[str] = None        # None: sqlite:///<out>/study.db
    out: str = "runs/tune"
    seed: int = 0
    trial_epochs: int = 1
    trial_lr: Optional[float] = None     # direct path: None (the stage-1 run's lr) or a lr
    timesteps: Optional[int] = None
    batch_size: Optional[int] = None
    energy_images: int = 256
    energy_costs: Optional[str] = None   # JSON file of EnergyCosts fields (None: 45 nm)
    energy_model: str = "conventional"   # the energy a study minimises: or 'full' (ledger)
    halting_score: Optional[str] = None  # converted path: None (the model's, 'convergence'),
    #                                      'current' or 'convergence' 
    device: str = "auto"
    objective: str = "pareto"            # 'pareto': max top1, min energy; 'energy': see PENALTY
    min_top1: Optional[float] = None
    sampler: str = "tpe"
    ranges: tuple = ()                   # "--range" strings, e.g. "eps=0:0.3"
    space_file: Optional[str] = None
    heartbeat_interval: int = 60
    grace_period: Optional[int] = None   # None: 2 x heartbeat_interval
    max_retry: int = 3
    progress: Optional[bool] = None      # a bar over finished trials (None: on a terminal)

    def validate(self) -> "TuneConfig":
        from stas_core.energy import EnergyCosts

        if self.energy_model not in ENERGY_MODELS:
            raise ConfigError(f"energy_model must be one of {', '.join(ENERGY_MODELS)}; "
                              f"got {self.energy_model!r}")
        EnergyCosts.load(self.energy_costs)  # a bad file fails before the study starts
        if self.halting_score is not None and self.halting_score not in SCORES:
            raise ConfigError(f"halting_score must be one of {', '.join(SCORES)}; "
                              f"got {self.halting_score!r}")
        if not self.checkpoint:
            raise ConfigError("a checkpoint is needed: --checkpoint FILE (a stage-1 checkpoint "
                              "of stas-train, or model.safetensors of stas-convert)")
        if self.path is None:
            self.path = checkpoint_path_kind(self.checkpoint)
        if self.path not in PATHS:
            raise ConfigError(f"path must be one of {', '.join(PATHS)}; got {self.path!r}")
        if self.halting_score is not None and self.path != "converted":
            raise ConfigError(f"--halting-score applies to the converted path (a direct "
                              f"trial trains with the model's score); got it with --path "
                              f"{self.path}")
        check_positive_int("n_trials", self.n_trials)
        check_positive_int("trial_epochs", self.trial_epochs)
        if self.trial_lr is not None and not self.trial_lr > 0:
            raise ConfigError(f"trial_lr must be > 0; got {self.trial_lr}")
        check_positive_int("energy_images", self.energy_images)
        for name in ("timesteps", "batch_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds; got {self.timeout}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}; "
                              f"got {self.objective!r}")
        if self.min_top1 is not None and not 0.0 <= self.min_top1 <= 1.0:
            raise ConfigError(f"min_top1 is a fraction in [0, 1]; got {self.min_top1}")
        if self.objective == "energy" and self.min_top1 is None:
            raise ConfigError("--objective energy minimises energy subject to a top-1 floor: "
                              "give --min-top1, e.g. --min-top1 0.85")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}; "
                              f"got {self.sampler!r}")
        if not self.study_name or not self.study_name.strip():
            raise ConfigError("study name must not be empty")
        self.search_space()
        return self

    def search_space(self) -> SearchSpace:
        return build_space(self.path, self.ranges, self.space_file)

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.out)


# ----------------------------------------------------------------------------- pieces
def objective_values(result: dict, objective: str, min_top1: Optional[float]) -> list[float]:
    """What Optuna optimises: ``[top1, energy]`` (pareto) or ``[penalised energy]``."""
    if objective == "pareto":
        return [result["top1"], result[OBJ]]
    return [result[OBJ] + penalty(result["top1"], min_top1)]


def penalty(top1: float, floor: Optional[float]) -> float:
    """0 at or above the floor, else ``PENALTY * (1 + shortfall)``."""
    if floor is None or top1 >= floor:
        return 0.0
    return PENALTY * (1.0 + floor - top1)


def make_sampler(name: str, seed: int, n_trials: int):
    """A seeded sampler; TPE starts with ``min(10, max(2, n_trials // 3))`` random trials
    and uses the constant liar so that parallel workers spread out."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                              n_startup_trials=min(10, max(2, n_trials // 3)))
        if name == "nsgaii":
            return optuna.samplers.NSGAIISampler(seed=seed,
                                                 population_size=max(4, min(50, n_trials // 3)))
        return optuna.samplers.RandomSampler(seed=seed)


def trial_record(t) -> dict:
    """A finished (or running) Optuna trial as a plain dict (one line of trials.jsonl)."""
    ua = t.user_attrs
    start, end = t.datetime_start, t.datetime_complete
    return {"number": t.number, "state": t.state.name, "params": dict(t.params),
            "values": list(t.values) if t.values is not None else None,
            "top1": ua.get("top1"),
            # studies written before the objective had its own key stored it as energy_mj
            OBJ: ua.get(OBJ, ua.get("energy_mj")),
            "energy_mj": ua.get("conventional_energy_mj", ua.get("energy_mj")),
            "full_energy_mj": ua.get("full_energy_mj"),
            "token_ratio": ua.get("token_ratio"), "worker": ua.get("worker"),
            **({"trial_dir": ua["trial_dir"]} if "trial_dir" in ua else {}),
            "retry_of": t.system_attrs.get("failed_trial"),
            "datetime_start": start.isoformat() if start else None,
            "datetime_complete": end.isoformat() if end else None,
            "duration_s": (end - start).total_seconds() if start and end else None}


def _count(trials, *states) -> int:
    return sum(1 for t in trials if t.state.name in states)


def open_study(cfg: TuneConfig, storage):
    """Create the study or join the existing one; a study made for another path, objective
    or top-1 floor is refused (pass another --study-name)."""
    optuna = require_optuna()
    directions = ["maximize", "minimize"] if cfg.objective == "pareto" else ["minimize"]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3) if cfg.objective == "energy"
              else optuna.pruners.NopPruner())
    try:
        study = optuna.create_study(storage=storage, study_name=cfg.study_name,
                                    directions=directions, pruner=pruner, load_if_exists=True,
                                    sampler=make_sampler(cfg.sampler, cfg.seed, cfg.n_trials))
    except ValueError as exc:
        raise TuningError(f"cannot open study {cfg.study_name!r}: {exc}") from None
    want = {"stas_path": cfg.path, "stas_objective": cfg.objective, "stas_min_top1":
            cfg.min_top1 if cfg.objective == "energy" else None,
            "stas_energy_model": cfg.energy_model, "stas_halting_score": cfg.halting_score}
    have = study.user_attrs
    for key, value in want.items():
        if key in have and have[key] != value:
            flag = {"stas_path": "--path", "stas_objective": "--objective",
                    "stas_min_top1": "--min-top1", "stas_energy_model": "--energy-model",
                    "stas_halting_score": "--halting-score"}[key]
            raise TuningError(f"study {cfg.study_name!r} in {mask_url(cfg.storage_url)} was "
                              f"created with {flag} {have[key]}, not {value}; use those "
                              f"settings or another --study-name")
        if key not in have:
            study.set_user_attr(key, value)
    if [d.name.lower() for d in study.directions] != directions:
        raise TuningError(f"study {cfg.study_name!r} optimises {len(study.directions)} "
                          f"objective(s); use another --study-name")
    return study


def fail_orphans(study, storage) -> int:
    """Fail (and re-queue) RUNNING trials that never reached their objective: their worker
    died between creating the trial and its first heartbeat, so no heartbeat can ever go
    stale. Call with the reservation lock held: no live worker is in that window then."""
    from optuna.trial import TrialState

    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("started") != t.number]  # (a retry copies user attrs)
    for t in orphans:
        try:
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - finished meanwhile (UpdateFinishedTrialError)
            continue
        logger.info("trial %d was left without a worker; failed and re-queued", t.number)
        retry = stale_trial_callback(storage)
        if retry is not None:
            retry(study, storage.get_trial(t._trial_id))
    return len(orphans)


def build_trial(cfg: TuneConfig, header: dict):
    """The trial evaluator of ``cfg.path`` (loads the model / checks the data once)."""
    common = dict(dataset=cfg.dataset, data_dir=cfg.data_dir, val_subset=cfg.val_subset,
                  batch_size=cfg.batch_size, timesteps=cfg.timesteps, seed=cfg.seed,
                  energy_images=cfg.energy_images, energy_costs=cfg.energy_costs,
                  device=cfg.device, header=header)
    if cfg.path == "direct":
        return DirectTrial(cfg.checkpoint, cfg.out, trial_epochs=cfg.trial_epochs, lr=cfg.trial_lr,
                           train_subset=cfg.train_subset, **common)
    return ConvertedTrial(cfg.checkpoint, halting_score=cfg.halting_score, **common)


# ----------------------------------------------------------------------------- the study
def run_study(cfg: TuneConfig, *, evaluate: Optional[Callable] = None) -> dict:
    """Run (or continue, or join) the study until it has ``cfg.n_trials`` finished trials
    (or ``cfg.timeout`` passes), then write the outputs to ``cfg.out``; returns a summary.

    ``evaluate(params, number, on_epoch)`` replaces the path's own trial (tests).
    """
    optuna = require_optuna()
    cfg.validate()
    space = cfg.search_space()
    out = Path(cfg.out)
    header = check_kind(cfg.checkpoint, cfg.path)
    storage = open_storage(cfg.storage_url, heartbeat_interval=cfg.heartbeat_interval,
                           grace_period=cfg.grace_period, max_retry=cfg.max_retry)
    study = open_study(cfg, storage)
    runner = build_trial(cfg, header) if evaluate is None else None
    evaluate = evaluate or runner
    out.mkdir(parents=True, exist_ok=True)
    lock = ReservationLock(storage, cfg.study_name)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    logger.info("study %r in %s: %s, %s, knobs %s", cfg.study_name, mask_url(cfg.storage_url),
                cfg.path, cfg.objective, space.describe())

    def objective(trial) -> list[float]:
        storage.record_heartbeat(trial._trial_id)  # stale from now on if this process dies
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("started", trial.number)  # without it: an orphan (fail_orphans)
        lock.release()  # the trial exists (RUNNING): other workers count it from now on
        params = space.suggest(trial)
        on_epoch = None
        if cfg.objective == "energy" and cfg.path == "direct":
            def on_epoch(epoch: int, record: dict) -> None:
                # energy is measured at the end only: the pruner sees the floor penalty
                trial.report(penalty(record["val_top1"], cfg.min_top1), epoch)
                if epoch + 1 < cfg.trial_epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"val top-1 {record['val_top1']:.4f} after "
                                             f"epoch {epoch + 1}")
        result = evaluate(params, trial.number, on_epoch)
        # energy_mj: conventional; OBJ: what the study minimises (by its energy model)
        result = {**result, "conventional_energy_mj": result["energy_mj"],
                  OBJ: result["full_energy_mj" if cfg.energy_model == "full" else "energy_mj"]}
        for key in ("top1", "energy_mj", "token_ratio", "conventional_energy_mj",
                    "full_energy_mj", OBJ):
            if result.get(key) is not None:
                trial.set_user_attr(key, float(result[key]))
        if "trial_dir" in result:
            trial.set_user_attr("trial_dir", result["trial_dir"])
        values = objective_values(result, cfg.objective, cfg.min_top1)
        return values if len(values) > 1 else values[0]

    from stas_core.train import progress_bar

    bar = progress_bar(cfg.progress, cfg.n_trials, "trials", True)

    def after_trial(study, frozen) -> None:
        records = [trial_record(t) for t in study.get_trials(deepcopy=False)
                   if t.state.is_finished()]
        export.write_jsonl(out / "trials.jsonl", records)
        done = sum(1 for r in records if r["state"] in ("COMPLETE", "PRUNED"))
        ua = frozen.user_attrs
        if bar is not None:
            bar.update(min(done, cfg.n_trials) - bar.n)
            if frozen.state.name == "COMPLETE":
                bar.set_postfix(top1=f"{ua['top1']:.4f}", mJ=f"{ua[OBJ]:.4g}")
        knobs = " ".join(f"{k}={v:.4g}" for k, v in frozen.params.items())
        if frozen.state.name == "COMPLETE":
            logger.info("trial %d: top1 %.4f energy %.4g mJ (%s ledger) tokens %.3f (%s) "
                        "[%d/%d finished]", frozen.number, ua["top1"], ua[OBJ],
                        cfg.energy_model, ua["token_ratio"], knobs,
                        done, cfg.n_trials)
        else:
            logger.info("trial %d %s (%s) [%d/%d finished]", frozen.number,
                        frozen.state.name.lower(), knobs, done, cfg.n_trials)

    start = time.monotonic()
    ran = 0
    waiting_logged = False
    poll = min(5.0, max(0.5, cfg.heartbeat_interval / 2))
    while True:
        if cfg.timeout is not None and time.monotonic() - start > cfg.timeout:
            logger.info("timeout of %.0f s reached; no new trials", cfg.timeout)
            break
        wait = False
        lock.acquire()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            if lock.effective:
                fail_orphans(study, storage)
            trials = study.get_trials(deepcopy=False)
            finished = _count(trials, "COMPLETE", "PRUNED")
            running = _count(trials, "RUNNING")
            if finished >= cfg.n_trials:
                break
            if finished + running >= cfg.n_trials:
                wait = True
            else:
                # a fresh sampler, seeded by the study's size: reproducible for one worker,
                # and distinct draws for workers sharing the study
                study.sampler = make_sampler(cfg.sampler, cfg.seed + len(trials), cfg.n_trials)
                first = None if trials else start_point(cfg.path, space, cfg.halting_score)
                if first is not None:  # a fresh study starts from the measured point
                    study.enqueue_trial(first)
                study.optimize(objective, n_trials=1, callbacks=[after_trial])
                ran += 1
                waiting_logged = False
        finally:
            lock.release()
        if wait:
            if not waiting_logged:
                logger.info("%d of the remaining trials run in other workers (or wait for "
                            "their heartbeat to go stale); waiting", running)
                waiting_logged = True
            time.sleep(poll)
    if bar is not None:
        bar.close()
    return export_study(cfg, study, space, runner, ran=ran, wall_s=time.monotonic() - start)


def export_study(cfg: TuneConfig, study, space: SearchSpace, runner=None, *, ran: int = 0,
                 wall_s: float = 0.0) -> dict:
    """Write trials.jsonl, pareto.json/.csv, best.json and trials.png; return the summary.

    With a ``runner`` that has a ``baseline()`` (the real trials), the model without
    halting stopped after t = 1..T is measured once (kept in ``baseline.json``), drawn on
    trials.png, and every Pareto point is placed against it."""
    out = Path(cfg.out)
    baseline = _baseline(cfg, runner)
    energy_key = "full_energy_mj" if cfg.energy_model == "full" else "energy_mj"
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)
               if t.state.is_finished()]
    export.write_jsonl(out / "trials.jsonl", records)
    front = export.pareto_front(records)
    best = export.choose_best(records, cfg.objective, cfg.min_top1)
    complete = sum(1 for r in records if r["state"] == "COMPLETE")
    meta = {"study": cfg.study_name, "storage": mask_url(cfg.storage_url), "path": cfg.path,
            "checkpoint": str(cfg.checkpoint), "objective": cfg.objective,
            "min_top1": cfg.min_top1, "space": space.describe(), "complete_trials": complete,
            "best": None if best is None else {k: best[k] for k in (
                "number", "params", "top1", OBJ, "energy_mj", "full_energy_mj",
                "token_ratio")}, "chose_on": "val"}
    files = {"trials": str(out / "trials.jsonl")}
    held_out = None
    if not front:
        logger.warning("no trial of study %r has completed yet; nothing to export",
                       cfg.study_name)
    else:
        export.write_pareto(out, front, space.names, meta)
        files.update(pareto=str(out / "pareto.json"), pareto_csv=str(out / "pareto.csv"))
        if best is not None:
            defaults = runner.defaults() if runner is not None else {"halting": True}
            export.write_best(out, best, defaults)
            files["best"] = str(out / "best.json")
            held_out = _best_on_test(cfg, runner, best)
            if held_out:
                files["best_on_test"] = str(out / "best_on_test.json")
        export.plot_trials(out / "trials.png", records, front, best,
                           title=f"{cfg.study_name} ({cfg.path}, {complete} trials)",
                           baseline=baseline, energy_key=energy_key)
        files["plot"] = str(out / "trials.png")
    return {**{k: meta[k] for k in ("study", "storage", "path", "objective", "min_top1",
                                     "complete_trials", "best")},
            "trials_run_here": ran, "wall_s": wall_s,
            "energy_model": cfg.energy_model,
            "pareto": [{"number": r["number"], "params": r["params"], "top1": r["top1"],
                        OBJ: r[OBJ], "energy_mj": r["energy_mj"],
                        "full_energy_mj": r["full_energy_mj"], "token_ratio": r["token_ratio"],
                        **({"vs_baseline": against_baseline(r["top1"], r[energy_key],
                                                            baseline, energy_key=energy_key)}
                           if baseline else {})}
                       for r in front],
            **({"best_on_test": held_out} if held_out else {}),
            **({"baseline": baseline} if baseline else {}),
            "files": files}


def _best_on_test(cfg: TuneConfig, runner, best: dict) -> Optional[dict]:
    """The chosen trial measured once on the test split (its knobs were chosen on the
    validation split), against the baselines on the same test images; kept in
    ``best_on_test.json`` and not redone while the chosen trial stays the same."""
    if runner is None or not hasattr(runner, "on_test"):
        return None
    path = Path(cfg.out) / "best_on_test.json"
    key = {"checkpoint": str(cfg.checkpoint), "trial": best["number"],
           "params": best["params"], "val_subset": cfg.val_subset,
           "energy_images": cfg.energy_images, "energy_costs": cfg.energy_costs}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["result"]
    logger.info("measuring the chosen trial %d on the test split", best["number"])
    result = runner.on_test(best)
    atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def _baseline(cfg: TuneConfig, runner) -> Optional[dict]:
    """The no-halting curve of the study's model, measured once per output directory."""
    if runner is None or not hasattr(runner, "baseline"):
        return None
    path = Path(cfg.out) / "baseline.json"
    key = {"checkpoint": str(cfg.checkpoint), "val_subset": cfg.val_subset,
           "timesteps": cfg.timesteps, "energy_images": cfg.energy_images,
           "energy_costs": cfg.energy_costs}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["curve"]
    logger.info("measuring the model without halting after t = 1..T (the baseline)")
    curve = runner.baseline()
    atomic_write_text(path, json.dumps({"key": key, "curve": curve}, indent=2) + "\n")
    return curve
