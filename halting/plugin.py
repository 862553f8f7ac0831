"""2-D token halting (A-SSA): every token may stop early across blocks *and* timesteps.

Driven timestep-major, ``for t: for l:``, through the haltable-model protocol. After block
``l`` at timestep ``t`` each active token k gets a halting score from the first element of
its output embedding, ``h = sigmoid(alpha * y[k, 0] + beta)`` (forced to 1 at the last
step of its accumulation window), and accumulates ``H_k += h``:

* ``accumulate='both'`` (STAS T+B, default): one window over all (t, l);
* ``'block'``: A-ViT per timestep; ``H`` restarts at every timestep;
* ``'time'``: scored once per timestep, after the last block (dynamic timesteps per token).

Once ``H_k >= 1 - eps`` the token is masked from the next step on (it leaves attention and
the MLP, costs no ops, and its neuron state freezes); its last output is weighted by the
remainder ``R_k = 1 - H_k(before)``, earlier ones by their ``h``. The mean-field output
(per token, the weighted sum of its outputs) goes through the model's readout. The ponder
loss is ``mean(N_k + R_k)`` with ``N_k`` the number of scored steps of token k.

Two executions give the same results: ``'mask'`` (dense, static shapes: the reference and
the ONNX form) and ``'gather'`` (blocks compute only the active tokens, so halting saves
wall-clock time, not only ops). This module imports nothing of the project.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .numeric import exact
from .protocol import HaltableModel, HaltingDefaults

MODES = ("both", "block", "time")
EXECUTIONS = ("mask", "gather")
OUTPUTS = ("mean_field", "last")
SCORES = ("current", "mean", "convergence")
#: The execution of the Python API and the CLIs alike (``'mask'``: the ONNX form).
DEFAULT_EXECUTION = "gather"


class HaltingConfigError(ValueError):
    """A halting option outside its rule (the message states the rule and the value)."""


@dataclass(frozen=True)
class HaltingConfig:
    """The halting knobs tuned by STAS: score slope/offset, threshold slack, mode.

    ``output='mean_field'`` (STAS) reads out each token's h-weighted outputs; ``'last'``
    reads out the last block's tokens every timestep (halted tokens carry the value they
    stopped with) and averages over timesteps, as a converted SNN's readout expects.
    ``score='current'`` scores the step's own output, ``'mean'`` its running mean over
    timesteps, ``'convergence'`` how settled that running mean is: the signal is
    ``-log(|m_t - m_(t-1)| / |m_t|)`` for the running mean ``m_t`` of the token's whole
    block output (0 at t = 0), so with ``alpha > 0`` a token whose rate-coded value has
    stopped moving scores high (a converted SNN's form of STAS's temporal stability).
    ``output`` and ``score`` left as None take the model's
    :class:`~halting.protocol.HaltingDefaults` (see :meth:`for_model`).
    """

    alpha: float = 1.0
    beta: float = -2.0
    eps: float = 0.01
    accumulate: str = "both"
    score: Optional[str] = None   # None: the model's default ('mean' on converted ViTs)
    output: Optional[str] = None  # None: the model's default ('last' on converted ViTs)
    keep_prefix: bool = True    # the model's prefix tokens (a ViT's class token) never halt

    def __post_init__(self) -> None:
        if self.output is not None and self.output not in OUTPUTS:
            raise HaltingConfigError(f"output must be one of {', '.join(OUTPUTS)}; "
                                     f"got {self.output!r}")
        if self.score is not None and self.score not in SCORES:
            raise HaltingConfigError(f"score must be one of {', '.join(SCORES)}; "
                                     f"got {self.score!r}")
        if not 0.0 <= self.eps < 1.0:
            raise HaltingConfigError(f"eps must be in [0, 1); got {self.eps}")
        if self.accumulate not in MODES:
            raise HaltingConfigError(f"accumulate must be one of {', '.join(MODES)}; "
                                     f"got {self.accumulate!r}")

    def for_model(self, model: object) -> "HaltingConfig":
        """This config with ``output`` and ``score`` filled from ``model.halting_defaults``
        where left open; a readout the model cannot honour is a HaltingConfigError."""
        return self.with_defaults(getattr(model, "halting_defaults", None) or HaltingDefaults(),
                                  type(model).__name__)

    def with_defaults(self, defaults: HaltingDefaults, owner: str = "the model") -> "HaltingConfig":
        """:meth:`for_model` for a model kind known by its defaults only (CLI checks)."""
        output = self.output if self.output is not None else defaults.output
        score = self.score if self.score is not None else defaults.score
        if output not in defaults.outputs:
            why = f" ({defaults.why})" if defaults.why else ""
            raise HaltingConfigError(
                f"{owner} supports output {' or '.join(map(repr, defaults.outputs))}"
                f"{why}; got output={output!r}. Leave output unset (None) to use the model's "
                f"default {defaults.output!r}")
        if (output, score) == (self.output, self.score):
            return self
        return dataclasses.replace(self, output=output, score=score)


@dataclass
class HaltingResult:
    """Logits of the mean-field output and what the halting did."""

    logits: Tensor
    ponder_loss: Tensor
    active_fraction: Tensor          # [T, L]: share of tokens computed at (t, l)
    depth: Tensor                    # [B, N]: scored steps per token (N_k)
    remainder: Tensor                # [B, N]: R_k (summed over windows in 'block' mode)
    image_ratio: Tensor              # [B]: each image's share of token-steps computed
    history: list = field(default_factory=list)  # per step (t, l): (H, R, N, mask) copies
    config: Optional[HaltingConfig] = None  # the config as run (output, score filled in)
    #: [T, B, classes] with ``anytime=True``: entry t is the answer had the image stopped
    #: after t + 1 timesteps (every token still active halting there), else None
    logits_per_t: Optional[Tensor] = None

    @property
    def token_ratio(self) -> float:
        """Active token-block-timesteps / all of them."""
        return float(self.active_fraction.mean())


def _window(cfg: HaltingConfig, t: int, l: int, steps: int, depth: int) -> tuple[bool, bool]:
    """(is (t, l) scored, is it the last scored step of its window)."""
    last_block = l == depth - 1
    if cfg.accumulate == "time":
        return last_block, last_block and t == steps - 1
    if cfg.accumulate == "block":
        return True, last_block
    return True, last_block and t == steps - 1


def _settled(h: Tensor, total: Optional[Tensor], t: int) -> tuple[Tensor, Tensor]:
    """(settledness ``-log(|m_t - m_(t-1)| / |m_t|)`` per token, new running sum) for the
    running mean ``m`` of block outputs ``h[B, N, D]`` over timesteps; 0 at t = 0."""
    new_total = h if total is None else total + h
    if total is None:
        return torch.zeros_like(h[..., 0]), new_total
    mean_now, mean_before = new_total / (t + 1), total / t
    change = (mean_now - mean_before).norm(dim=-1)
    scale = mean_now.norm(dim=-1)
    tiny = torch.finfo(h.dtype).tiny
    return -torch.log((change + tiny) / (scale + tiny)), new_total


def check_execution(execution: str) -> str:
    if execution not in EXECUTIONS:
        raise HaltingConfigError(f"execution must be one of {', '.join(EXECUTIONS)}; "
                                 f"got {execution!r}")
    return execution


def run_halting(model: HaltableModel, x: Tensor, cfg: HaltingConfig, *,
                timesteps: Optional[int] = None, record: bool = False,
                execution: str = DEFAULT_EXECUTION,
                on_timestep: Optional[Callable[[int], None]] = None,
                anytime: bool = False) -> HaltingResult:
    """Run ``model`` on ``x`` with token halting.

    ``execution='gather'`` (default) asks the blocks to compute the active tokens only
    (``step(x, active, gather=True)``); ``'mask'`` runs every block densely with the token
    mask (static shapes); both give the same result. ``output``/``score`` left open in
    ``cfg`` come from the model (:meth:`HaltingConfig.for_model`). A halted token enters
    later timesteps with the value it halted with (not with fresh input tokens), so
    ``output='last'`` reads out what it stopped with. ``on_timestep(t)`` is called before
    each timestep (op counters). ``anytime=True`` also returns ``logits_per_t``: the
    readout had the whole image stopped after each timestep, every token still active
    halting there with its remainder (per-image early exit on top of token halting); its
    last entry equals ``logits``.
    """
    gather = check_execution(execution) == "gather"
    cfg = cfg.for_model(model)
    steps = model.timesteps if timesteps is None else timesteps
    depth = len(model.blocks)
    model.reset()
    hint = getattr(model, "set_halting_refills", None)
    if hint is not None:  # outside 'block' mode the active set only shrinks
        hint(cfg.accumulate == "block")
    fractions = []  # per (t, l): a 0-d tensor on the model's device (no host sync)
    history = []
    mask = H = R = N = None
    mean_field = None
    logits_sum = None
    stopped_here = []  # anytime: the readout of an image stopped after each timestep
    image_active = 0.0
    signal_sums = [None] * depth  # running sums of the score signal, per block
    per_step = cfg.accumulate == "block" or cfg.output == "last"  # read out every timestep
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if cfg.keep_prefix else 0
    for t in range(steps):
        if on_timestep is not None:
            on_timestep(t)
        fresh = model.tokens(x, t)
        h = fresh if mask is None else torch.where(mask.unsqueeze(-1), fresh, h)
        if mask is None:
            H = torch.zeros_like(h[..., 0])  # like a slice: the batch size stays symbolic
            mask = H == 0                     # (for tracers such as the ONNX exporter)
            R = torch.zeros_like(H)
            N = torch.zeros_like(H)
            free = torch.ones_like(mask)  # tokens allowed to halt before the forced end
            if prefix:
                free[:, :prefix] = False
        if cfg.accumulate == "block" and t > 0:  # a fresh window every timestep
            mask = torch.ones_like(mask)
            H = torch.zeros_like(H)
            h = fresh  # every token is computed again from its input tokens
        for l, blk in enumerate(model.blocks):
            per_image = mask.to(h.dtype).mean(-1)
            image_active = image_active + per_image
            fractions.append(per_image.mean())
            h = blk.step(h, mask, gather=True) if gather else blk.step(h, mask)
            scored, last = _window(cfg, t, l, steps, depth)
            if not scored:
                continue
            signal = h[..., 0]
            if cfg.score == "mean":  # per-step values of a converted SNN fluctuate
                signal_sums[l] = signal if signal_sums[l] is None else signal_sums[l] + signal
                signal = signal_sums[l] / (t + 1)
            elif cfg.score == "convergence":
                signal, signal_sums[l] = _settled(h, signal_sums[l], t)
            score = torch.sigmoid(exact(cfg.alpha, signal) * signal + exact(cfg.beta, signal))
            if prefix:  # kept tokens score 0, so their whole weight comes at the end
                score = score * free.to(score.dtype)
            if last:
                score = torch.ones_like(score)
            live = mask.to(h.dtype)
            reached = (H + score >= exact(1.0 - cfg.eps, score)) & mask
            weight = torch.where(reached, 1.0 - H, score) * live
            R = R + torch.where(reached, 1.0 - H, 0.0)  # summed over windows ('block')
            N = N + live
            H = H + score * live
            if cfg.output != "last":  # 'last' reads h out: no dense weighted sum to keep
                contribution = weight.unsqueeze(-1) * h
                mean_field = contribution if mean_field is None else mean_field + contribution
            mask = mask & ~reached
            if record:
                history.append((t, l, H.detach().clone(), R.detach().clone(),
                                N.detach().clone(), mask.clone()))
        if per_step:  # A-ViT per timestep ('block'), or the last block's tokens ('last')
            out = model.readout(h if cfg.output == "last" else mean_field)
            logits_sum = out if logits_sum is None else logits_sum + out
            mean_field = None
            if anytime:
                stopped_here.append(logits_sum / (t + 1))
        elif anytime:  # tokens still active take their remainder on this step's output
            rest = ((1.0 - H) * mask.to(h.dtype)).unsqueeze(-1) * h
            stopped_here.append(model.readout(rest if mean_field is None else mean_field + rest))
    logits = logits_sum / steps if per_step else model.readout(mean_field)
    ponder = (N + R).mean()
    fractions = torch.stack(fractions).detach().float().reshape(steps, depth).cpu()
    return HaltingResult(logits=logits, ponder_loss=ponder, active_fraction=fractions,
                         depth=N, remainder=R, image_ratio=image_active / (steps * depth),
                         history=history, config=cfg,
                         logits_per_t=torch.stack(stopped_here) if anytime else None)


class Halted(nn.Module):
    """``model`` run with halting as a module: ``forward(x) -> (logits, ponder_loss)``, so
    it can be wrapped by DistributedDataParallel; ``last`` keeps the latest result."""

    def __init__(self, model: nn.Module, cfg: HaltingConfig, *,
                 execution: str = DEFAULT_EXECUTION) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg.for_model(model)
        self.execution = check_execution(execution)
        self.last: Optional[HaltingResult] = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.last = run_halting(self.model, x, self.cfg, execution=self.execution)
        return self.last.logits, self.last.ponder_loss
