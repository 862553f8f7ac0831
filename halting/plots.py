"""Pictures of what the halting did: per-token halting depth over the image.

Needs matplotlib (imported when called). The figure is returned, not written: callers
save it (``stas_core`` writes it atomically), and this package imports nothing of the project.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor


def depth_grid(depth: Tensor, prefix_tokens: int = 0) -> Tensor:
    """Per-token depth ``[B, N]`` -> ``[B, g, g]`` over the patch grid (prefix tokens such
    as a class token dropped). Raises ValueError if the patch tokens are not a square."""
    patches = depth[:, prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(depth.shape[0], side, side)


def depth_heatmap_figure(images: Tensor, depth: Tensor, *, max_depth: int,
                         prefix_tokens: int = 0, labels: Optional[Sequence[str]] = None,
                         samples: int = 6):
    """A matplotlib Figure: each sample's image above its halting-depth map (steps
    computed per token, out of ``max_depth`` = blocks x timesteps). Built without pyplot,
    so the caller's (a notebook's) backend is left alone; save it with ``fig.savefig``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(samples, images.shape[0])
    grid = depth_grid(depth[:n].detach().float().cpu(), prefix_tokens)
    fig = Figure(figsize=(1.9 * n + 0.8, 4.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    im = None
    for i in range(n):
        img = images[i].detach().float().cpu()
        img = img[0] if img.shape[0] != 3 else img.permute(1, 2, 0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)  # undo normalisation
        axes[0, i].imshow(img.numpy(), cmap="gray")
        axes[0, i].set_title(labels[i] if labels else f"sample {i}", fontsize=8)
        im = axes[1, i].imshow(grid[i].numpy(), cmap="viridis", vmin=0, vmax=max_depth)
        axes[1, i].set_title(f"mean depth {float(grid[i].mean()):.1f}", fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="steps computed")
    fig.suptitle(f"token halting depth (of {max_depth} block-timesteps)", fontsize=9)
    return fig


def draw_baseline(ax, baseline: dict, *, energy_key: str = "energy_mj",
                  label: str = "no halting, stopped after t") -> None:
    """Draw the trivial baseline of a halting figure on ``ax`` (energy on x, top-1 % on
    y): the same model without halting after t = 1..T, each point marked with its t. A
    halted point counts as a gain only above this line."""
    energy = baseline[energy_key]
    top1 = [100 * a for a in baseline["top1"]]
    ax.plot(energy, top1, "s--", color="k", lw=1, ms=4, label=label, zorder=2)
    for t, e, a in zip(baseline["t"], energy, top1):
        ax.annotate(f"t={t}", (e, a), textcoords="offset points", xytext=(3, -9), fontsize=6)


def draw_protocol_curves(ax, baselines: dict, *, ledger: str = "conventional") -> None:
    """Draw a report's ``baselines`` block (``stas_core.baselines.halting_baselines``) on
    ``ax``: the fewer-timesteps hull, per-image early exit and early exit on top of token
    halting, energy on x under ``ledger``, top-1 % on y."""
    key = "energy_mj" if ledger == "conventional" else "full_energy_mj"
    curves = baselines["curves"]
    fewer = curves["fewer_timesteps"]
    hull = [fewer["points"][i] for i in fewer["hull"][ledger]]
    ax.plot([p[key] for p in hull], [100 * p["top1"] for p in hull], ":", color="k", lw=1,
            label="convex hull of fewer timesteps")
    for name, style, color in (("early_exit", ".-", "tab:orange"),
                               ("token_halting+early_exit", ".:", "tab:red")):
        pts = curves[name]["points"]
        ax.plot([p[key] for p in pts], [100 * p["top1"] for p in pts], style, color=color,
                ms=3, lw=1, label=name.replace("_", " ").replace("+", " + "))


def baseline_figure(baseline: dict, points: Sequence[dict], *, title: str = "",
                    energy_key: str = "energy_mj"):
    """A Figure: the halted ``points`` (``{"label", "top1", energy_key}``) against the
    no-halting curve (:func:`draw_baseline`). Built without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    draw_baseline(ax, baseline, energy_key=energy_key)
    for i, p in enumerate(points):
        ax.scatter([p[energy_key]], [100 * p["top1"]], marker="*", s=140, color=f"C{i}",
                   zorder=3, label=p.get("label", "halted"))
    ax.set(xlabel="energy per image (mJ)", ylabel="top-1 (%)",
           title=title or "halting against fewer timesteps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
