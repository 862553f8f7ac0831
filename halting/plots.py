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
