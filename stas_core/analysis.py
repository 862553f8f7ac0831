"""Temporal similarity of block input tokens: the argument for I-SPS (STAS, arXiv 2508.14138).

With vanilla SPS the patch-splitting stack runs at every timestep and its LIF neurons carry
state, so the tokens a block receives change from one timestep to the next even for a static
image. With I-SPS the same token set is fed at every timestep: the first block's input is
identical over time and later blocks' inputs stay much more similar. That temporal
redundancy is what lets the halting plugin stop tokens early.

:func:`temporal_similarity` measures it for one model on the per-timestep path
(``model.reset()``, then ``for t: h = model.tokens(x, t); for l: h = blocks[l].step(h)``),
:func:`similarity_report` compares several models or checkpoints (e.g. the same trained
weights under ``sps='vanilla'`` and ``sps='integrated'``, see :func:`sps_variants`), and
:func:`plot_similarity` draws the comparison.

Similarity convention (per token, timestep ``t`` vs ``t - 1``): the cosine of the two token
vectors. Two identical vectors count as exactly 1.0 (this includes two all-zero vectors:
a silent token that stays silent has not changed); a pair where exactly one vector is
all-zero counts as 0.0 (a token that starts or stops firing). Spiking tokens are
non-negative, so every value lies in [0, 1]; a model with signed tokens may give values in
[-1, 1]. The per-block number is the mean over all (image, token, t = 1..T-1) triples,
each weighted equally.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .errors import ConfigError, check_positive_int

__all__ = ["token_similarity", "temporal_similarity", "sps_variants", "similarity_report",
           "plot_similarity"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: What :func:`similarity_report` accepts per label: a model, a checkpoint path, or
#: ``(checkpoint path, {TrainConfig field: value})``.
ModelSource = Union[nn.Module, PathLike, tuple]


def token_similarity(prev: Tensor, cur: Tensor) -> Tensor:
    """Cosine similarity per token of ``[..., N, D]`` tensors, ``[..., N]`` float64.

    Identical vectors (all-zero ones included) give exactly 1.0; a pair where exactly one
    vector is all-zero gives 0.0 (see the module docstring).
    """
    if prev.shape != cur.shape:
        raise ConfigError(f"token tensors differ in shape: {list(prev.shape)} vs {list(cur.shape)}")
    a, b = prev.detach().double(), cur.detach().double()
    na2, nb2 = (a * a).sum(-1), (b * b).sum(-1)
    dot = (a * b).sum(-1)
    both = (na2 > 0) & (nb2 > 0)
    cos = torch.where(both, dot / torch.sqrt(torch.where(both, na2 * nb2, torch.ones_like(na2))),
                      torch.zeros_like(dot))
    cos = cos.clamp(-1.0, 1.0)
    same = (a == b).all(-1)
    return torch.where(same, torch.ones_like(cos), cos)


def _images_of(batch: Any) -> Tensor:
    """The input tensor of a loader item: ``(images, labels)`` or a bare tensor."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise ConfigError(f"loader must yield tensors or (images, labels); got {type(batch).__name__}")
    return batch


@torch.no_grad()
def temporal_similarity(model: nn.Module, loader: Iterable, device: Union[str, torch.device], *,
                        max_images: Optional[int] = 256) -> dict:
    """Mean cosine similarity of each block's input tokens between consecutive timesteps.

    ``model`` implements the haltable protocol (``timesteps``, ``blocks``, ``reset``,
    ``tokens``) and must already be on ``device``; it is put in eval mode. ``loader`` yields
    ``(images, labels)`` or image tensors (``[B, C, H, W]`` static or ``[T, B, C, H, W]``
    time-varying); at most ``max_images`` images are used (None: all).

    Returns ``{"per_block": [s_0, ..., s_{L-1}], "output": s_out, "timesteps": T,
    "images": n, "silent_per_block": [...], "silent_output": z_out}`` where ``s_l`` is the
    similarity of block ``l``'s input, ``s_out`` that of the last block's output, averaged
    over tokens, images and t = 1..T-1 (see the module docstring for zero vectors), and the
    ``silent`` entries give the fraction of those pairs where both vectors are all-zero
    (counted as 1.0: a value near 1 with a silent fraction near 1 only says the model does
    not fire, e.g. an undertrained model whose BN statistics have not settled).
    """
    steps = int(model.timesteps)
    if steps < 2:
        raise ConfigError(f"temporal similarity compares consecutive timesteps, so it needs "
                          f"timesteps >= 2; the model has {steps}")
    if max_images is not None:
        check_positive_int("max_images", max_images)
    device = torch.device(device)
    model.eval()
    depth = len(model.blocks)
    sums = [0.0] * (depth + 1)  # index depth: output of the last block
    silent = [0] * (depth + 1)  # pairs where both vectors are all-zero
    count = 0  # (image, token, t) triples per position
    images = 0
    for batch in loader:
        if max_images is not None and images >= max_images:
            break
        x = _images_of(batch)
        bdim = 1 if x.dim() == 5 else 0
        if max_images is not None:
            x = x.narrow(bdim, 0, min(x.shape[bdim], max_images - images))
        x = x.to(device, non_blocking=True)
        model.reset()
        prev: list[Optional[Tensor]] = [None] * (depth + 1)
        for t in range(steps):
            h = model.tokens(x, t)
            for pos in range(depth + 1):
                if t > 0:
                    sums[pos] += float(token_similarity(prev[pos], h).sum())
                    silent[pos] += int(((prev[pos] == 0).all(-1) & (h == 0).all(-1)).sum())
                # I-SPS returns the same cached tensor every t; the blocks never modify
                # their input in place, but keep a private copy to be safe.
                prev[pos] = h.detach().clone()
                if pos < depth:
                    h = model.blocks[pos].step(h)
            if t > 0:
                count += h.shape[0] * h.shape[-2]
        images += x.shape[bdim]
    if images == 0:
        raise ConfigError("the loader yielded no images; check the dataset and --images")
    per_block = [s / count for s in sums[:depth]]
    return {"per_block": per_block, "output": sums[depth] / count, "timesteps": steps,
            "images": images, "silent_per_block": [z / count for z in silent[:depth]],
            "silent_output": silent[depth] / count}


# ----------------------------------------------------------------------------- comparison
def sps_variants(checkpoint: PathLike, modes: Iterable[str] = ("vanilla", "integrated")) -> dict:
    """``{mode: (checkpoint, {"sps": mode})}``: one trained model under each SPS mode."""
    return {mode: (checkpoint, {"sps": mode}) for mode in modes}


def _resolve(source: ModelSource, device: torch.device, timesteps: Optional[int]):
    """``(model, info dict, dataset name or None)`` for one entry of :func:`similarity_report`."""
    from .train import load_trained_model

    if isinstance(source, nn.Module):
        if timesteps is not None:
            source.timesteps = check_positive_int("timesteps", timesteps)
        info = {"checkpoint": None, "model": type(source).__name__,
                "sps": getattr(source, "sps", None)}
        return source.to(device), info, None
    if isinstance(source, tuple):
        if len(source) != 2 or not isinstance(source[1], Mapping):
            raise ConfigError("a model entry must be a model, a checkpoint path, or "
                              "(checkpoint path, {config field: value})")
        path, overrides = source[0], dict(source[1])
    else:
        path, overrides = source, {}
    if timesteps is not None:
        overrides["timesteps"] = check_positive_int("timesteps", timesteps)
    try:
        model, cfg = load_trained_model(path, device, **overrides)
    except TypeError as exc:  # dataclasses.replace with an unknown field
        raise ConfigError(f"bad override for {path}: {exc}") from None
    info = {"checkpoint": str(path), "model": cfg.model, "sps": cfg.sps}
    return model, info, cfg.dataset


def _val_loader(dataset: str, data_dir, val_subset, batch_size: int, seed: int,
                frames: Optional[int] = None):
    from torch.utils.data import DataLoader

    from .data import build_datasets

    _, val, info = build_datasets(dataset, data_dir=data_dir, val_subset=val_subset, seed=seed,
                                  augment=False, frames=frames)
    return DataLoader(val, batch_size=batch_size, shuffle=False), info


def similarity_report(models: Mapping[str, ModelSource], loader: Optional[Iterable] = None, *,
                      device: Union[str, torch.device] = "cpu", max_images: Optional[int] = 256,
                      batch_size: int = 64, dataset: Optional[str] = None,
                      data_dir: Optional[PathLike] = None, val_subset: Optional[int] = None,
                      timesteps: Optional[int] = None, seed: int = 0,
                      progress: Optional[bool] = False) -> dict:
    """Run :func:`temporal_similarity` for each labelled model on the same images
    (``progress``: a bar over the models; None: when stderr is a terminal).

    ``models`` maps a label to a model (already built), a ``stas-train`` checkpoint path, or
    ``(path, overrides)`` where ``overrides`` are :class:`~stas_core.train.TrainConfig`
    fields passed to :func:`~stas_core.train.load_trained_model` (``{"sps": "vanilla"}``:
    the same weights with per-timestep SPS; :func:`sps_variants` builds such a pair).
    ``timesteps`` overrides every model's T.

    Without ``loader``, the validation split of ``dataset`` (default: the first
    checkpoint's dataset, else fashion-mnist) is read in order, unaugmented.

    Returns ``{"dataset", "images", "runs": {label: {"checkpoint", "model", "sps",
    "timesteps", "images", "per_block", "output", "mean_per_block", "silent_per_block",
    "silent_output"}}}`` (see :func:`temporal_similarity`).
    """
    if not models:
        raise ConfigError("similarity_report needs at least one model")
    check_positive_int("batch_size", batch_size)
    device = torch.device(device)
    resolved = {label: _resolve(src, device, timesteps) for label, src in models.items()}
    if loader is None:
        dataset = dataset or next((d for _, _, d in resolved.values() if d), None) or "fashion-mnist"
        frames = timesteps or next(iter(resolved.values()))[0].timesteps  # event sets
        loader, info = _val_loader(dataset, data_dir, val_subset, batch_size, seed, frames)
        for label, (model, meta, _) in resolved.items():
            shape = (getattr(model, "in_chans", None), getattr(model, "img_size", None))
            if shape != (info.in_chans, info.img_size):
                raise ConfigError(
                    f"{label}: model {meta['model']} takes {shape[0]}x{shape[1]}x{shape[1]} "
                    f"inputs but dataset {info.name} is {info.in_chans}x{info.img_size}x"
                    f"{info.img_size}; pass the dataset the checkpoint was trained on")
        dataset = info.name
    from .train import progress_bar

    runs: dict[str, dict] = {}
    bar = progress_bar(progress, len(resolved), "similarity", True)
    for label, (model, meta, _) in resolved.items():
        logger.info("temporal similarity of %s (sps=%s)", label, meta["sps"])
        res = temporal_similarity(model, loader, device, max_images=max_images)
        if bar is not None:
            bar.update(1)
        runs[str(label)] = {**meta, "timesteps": res["timesteps"], "images": res["images"],
                            "per_block": res["per_block"], "output": res["output"],
                            "mean_per_block": sum(res["per_block"]) / len(res["per_block"]),
                            "silent_per_block": res["silent_per_block"],
                            "silent_output": res["silent_output"]}
        if min(res["silent_per_block"] + [res["silent_output"]]) > 0.99:
            logger.warning("%s: over 99%% of the tokens are all-zero at every block, so the "
                           "similarities (zero vs zero counts as 1) say nothing; the model "
                           "barely fires in eval mode (undertrained, or BN statistics not "
                           "settled)", label)
    if bar is not None:
        bar.close()
    images = {r["images"] for r in runs.values()}
    return {"dataset": dataset, "images": min(images), "runs": runs}


# ----------------------------------------------------------------------------- plot
def plot_similarity(report: Mapping, path: PathLike, *, title: Optional[str] = None) -> Path:
    """Write a PNG of per-block similarity, one line per run (atomic; no pyplot state).

    x: block index (the block's input), plus ``out`` for the last block's output; y: mean
    cosine similarity between consecutive timesteps, in [0, 1].
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .checkpoint import atomic_write

    runs = report.get("runs") or {}
    if not runs:
        raise ConfigError("nothing to plot: the report has no runs")
    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    depth = max(len(r["per_block"]) for r in runs.values())
    for label, r in runs.items():
        xs = list(range(len(r["per_block"])))
        name = label if r.get("sps") in (None, label) else f"{label} (sps={r['sps']})"
        line, = ax.plot(xs, r["per_block"], marker="o", label=name)
        if r.get("output") is not None and math.isfinite(r["output"]):
            ax.plot([xs[-1], depth], [r["per_block"][-1], r["output"]], linestyle=":",
                    color=line.get_color())
            ax.plot([depth], [r["output"]], marker="s", markerfacecolor="none",
                    color=line.get_color())
    ax.set_xticks(list(range(depth + 1)))
    ax.set_xticklabels([str(i) for i in range(depth)] + ["out"])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.3, depth + 0.3)
    ax.set_xlabel("block index (input tokens of block l; 'out' = after the last block)")
    ax.set_ylabel("mean cosine similarity, t vs t-1")
    steps = sorted({r["timesteps"] for r in runs.values()})
    ax.set_title(title or (f"Temporal similarity of block inputs "
                           f"(T={'/'.join(map(str, steps))}, {report.get('images', '?')} images"
                           f"{', ' + str(report['dataset']) if report.get('dataset') else ''})"),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
