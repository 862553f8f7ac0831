"""The haltable-model protocol: what a spiking transformer offers to be driven per timestep.

Both the direct-trained models (``stas_core``) and converted ViTs (``convert``) implement it,
so the halting plugin never needs to know which path made a model. This module imports
nothing of the project.

Execution order is timestep-major, ``for t: for l:``; tensors of one timestep are
``[B, N, D]`` and ``active`` masks are ``[B, N]`` bool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class HaltingDefaults:
    """What a model needs from the halting plugin, declared by the model itself as its
    ``halting_defaults`` attribute (a model without one gets these values).

    ``output`` and ``score`` fill a :class:`~halting.plugin.HaltingConfig` that leaves them
    open (None); ``outputs`` lists the readouts the model can honour, and a config asking
    for another is refused. A converted ViT's readout is stateful (compensated LayerNorm,
    head neurons) and must be called once per timestep, so it allows ``'last'`` only and
    scores how settled the running mean of its fluctuating per-step values is.
    """

    output: str = "mean_field"
    score: str = "current"
    outputs: tuple[str, ...] = ("mean_field", "last")
    why: str = ""  # one line: why the model restricts its readouts (used in the error)
    #: The knobs a run on this model kind starts from when the user gives none: the best
    #: operating point measured for it (the CLIs, stas-tune's first trial, the benches).
    alpha: float = 1.0
    beta: float = -2.0
    eps: float = 0.01


@runtime_checkable
class HaltableBlock(Protocol):
    def step(self, x: Tensor, active: Optional[Tensor] = None, *, gather: bool = False) -> Tensor:
        """One block at one timestep. Tokens with ``active`` False must come out unchanged,
        send nothing to the other tokens (no Q/K/V), cost no ops, and keep their neuron
        state frozen. ``gather=True``: compute the active tokens only, same result."""


@runtime_checkable
class HaltableModel(Protocol):
    """``halting_defaults`` (a :class:`HaltingDefaults`) is optional."""

    timesteps: int
    blocks: Sequence[HaltableBlock]

    def reset(self) -> None:
        """Clear all neuron state (start of a sample)."""

    def tokens(self, x: Tensor, t: int) -> Tensor:
        """Input tokens ``[B, N, D]`` of timestep ``t`` (I-SPS: the same tensor every t)."""

    def readout(self, per_token_out: Tensor) -> Tensor:
        """Logits ``[B, classes]`` from per-token outputs ``[B, N, D]``."""

    # Optional: ``set_halting_refills(refills: bool) -> None``, called by the plugin right
    # after ``reset()``. ``False`` promises that in this sample a token that stops is never
    # active again (every accumulation but 'block'), so a model may drop its state.


def run_stepwise(model: HaltableModel, x: Tensor, timesteps: Optional[int] = None, *,
                 on_timestep: Optional[Callable[[int], None]] = None,
                 cumulative: bool = False):
    """Run ``model`` timestep-major with every token active.

    Returns the mean over timesteps of the per-timestep readout, ``[B, classes]``; with
    ``cumulative=True`` returns ``[T, B, classes]`` where entry t is the mean of the first
    t + 1 readouts (the answer the model would give if stopped after t + 1 timesteps).
    ``on_timestep(t)`` is called before each timestep (used by op counters).
    """
    steps = model.timesteps if timesteps is None else timesteps
    model.reset()
    total, outs = None, []
    for t in range(steps):
        if on_timestep is not None:
            on_timestep(t)
        h = model.tokens(x, t)
        for blk in model.blocks:
            h = blk.step(h)
        logits = model.readout(h)
        total = logits if total is None else total + logits
        if cumulative:
            outs.append(total / (t + 1))
    if cumulative:
        import torch
        return torch.stack(outs)
    return total / steps
