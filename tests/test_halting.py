"""The halting plugin (dense mask execution): hand-worked accumulation, limits, gradients."""
import math

import pytest
import torch
from torch import nn

from halting import HaltingConfig, HaltingConfigError, run_halting, run_stepwise
from stas_core.energy import OpCounter
from stas_core.models import create_model

from helpers import calibrate_bn, tiny_converted_vit


class ScriptedBlock(nn.Module):
    """Sets each active token's first element to logit(p[call][token]); halted tokens pass."""

    def __init__(self, probs):
        super().__init__()
        self.probs, self.calls = probs, 0

    def step(self, x, active=None):
        p = torch.tensor(self.probs[self.calls])
        self.calls += 1
        out = x.clone()
        out[..., 0] = torch.where(active, torch.logit(p), x[..., 0])
        return out


class Scripted(nn.Module):
    """A two-token, two-block, two-timestep model with known halting scores."""

    timesteps = 2

    def __init__(self, probs):
        super().__init__()
        self.blocks = nn.ModuleList(ScriptedBlock(p) for p in probs)

    def reset(self):
        for b in self.blocks:
            b.calls = 0

    def tokens(self, x, t):
        return x

    def readout(self, h):
        return h.sum(-2)


# token 0 scores 0.5 at every step, token 1 scores 0.25 (alpha=1, beta=0: h = p)
PROBS = [[[0.5, 0.25], [0.5, 0.25]], [[0.5, 0.25], [0.5, 0.25]]]


@pytest.mark.parametrize("mode, depth, remainder, ponder, fractions", [
    # one window over (t,l) = (0,0),(0,1),(1,0),(1,1):
    # token 0: H .5 -> reaches 1 at (0,1): R = .5, N = 2; token 1: .25 x3, forced at (1,1): R = .25
    ("both", [2, 4], [0.5, 0.25], (2.5 + 4.25) / 2, [[1, 1], [0.5, 0.5]]),
    # a window per timestep, forced at the last block: R .5 / .75 twice, N = 4
    ("block", [4, 4], [1.0, 1.5], (5 + 5.5) / 2, [[1, 1], [1, 1]]),
    # scored after the last block only: token 0 .5 then forced (R .5); token 1 .25 then R .75
    ("time", [2, 2], [0.5, 0.75], (2.5 + 2.75) / 2, [[1, 1], [1, 1]]),
])
def test_hand_worked_accumulation(mode, depth, remainder, ponder, fractions):
    model = Scripted([[PROBS[t][l] for t in range(2)] for l in range(2)])
    x = torch.zeros(1, 2, 3)
    res = run_halting(model, x, HaltingConfig(alpha=1.0, beta=0.0, eps=0.0, accumulate=mode),
                      record=True)
    assert res.depth[0].tolist() == depth
    assert res.remainder[0].tolist() == pytest.approx(remainder)
    assert float(res.ponder_loss) == pytest.approx(ponder)
    assert res.active_fraction.tolist() == fractions
    if mode == "both":  # per-step record: (t, l, H, R, N, mask)
        t, l, H, R, N, mask = res.history[1]
        assert (t, l) == (0, 1) and H[0].tolist() == [1.0, 0.5] and mask[0].tolist() == [False, True]
        # mean-field weights of token 1: .25 + .25 + .25 + R .25 = 1 (the sums check it)
        assert res.logits[0, 0].item() == pytest.approx(
            0.5 * math.log(1) + 0.5 * 0 + (0.25 * 3 + 0.25) * math.log(1 / 3))


def _tiny(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 1, 28, 28)
    model = create_model("spikformer-1-32", img_size=28, in_chans=1, timesteps=2)
    return calibrate_bn(model, x), x


def test_nothing_halts_with_eps_0_and_very_negative_beta():
    model, x = _tiny()
    cfg = HaltingConfig(alpha=1.0, beta=-1e4, eps=0.0)
    counts = []
    with torch.no_grad():
        for run in (lambda: run_halting(model, x, cfg), lambda: run_stepwise(model, x)):
            with OpCounter(model) as counter:
                out = run()
                counter.add_images(len(x))
            counts.append(counter.summary())
    # the same ops in every layer; only the readout differs (once on the mean field vs per t)
    layers = [k for k in counts[1]["per_layer"] if k != "head"]
    assert out is not None and counts[1]["sops"] > 0
    for k in layers:
        assert counts[0]["per_layer"][k] == pytest.approx(counts[1]["per_layer"][k]), k
    res = run_halting(model, x, cfg)
    assert res.token_ratio == 1.0 and (res.depth == 2).all()  # every (t, l) for every token


def test_large_beta_halts_every_token_after_the_first_block_of_the_first_timestep():
    model = create_model("spikformer-2-32", img_size=28, in_chans=1, timesteps=2)
    model.eval()
    res = run_halting(model, torch.randn(2, 1, 28, 28), HaltingConfig(beta=1e4))
    assert res.active_fraction[0, 0] == 1 and res.active_fraction.sum() == 1
    assert (res.depth == 1).all() and float(res.remainder.detach().sum()) == 2 * 49


def test_ponder_loss_reaches_the_parameters_through_the_score():
    model, x = _tiny()
    model.train()
    res = run_halting(model, x, HaltingConfig(alpha=1.0, beta=0.0, eps=0.1))
    res.ponder_loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("kwargs, words", [
    ({"eps": 1.0}, "eps must be in [0, 1)"), ({"eps": -0.1}, "eps must be in [0, 1)"),
    ({"accumulate": "space"}, "accumulate must be one of both, block, time"),
    ({"score": "median"}, "score must be 'current' or 'mean'"),
])
def test_bad_values(kwargs, words):
    with pytest.raises(HaltingConfigError) as err:
        HaltingConfig(**kwargs)
    assert words in str(err.value)


def test_runs_unchanged_on_a_converted_vit():
    snn, x = tiny_converted_vit()
    with torch.no_grad():
        none = run_halting(snn, x, HaltingConfig(beta=-1e4, eps=0.0))
        some = run_halting(snn, x, HaltingConfig(alpha=1.0, beta=0.0, eps=0.2))
    assert none.token_ratio == 1.0 and none.logits.shape == (2, 10)
    assert 0 < some.token_ratio < 1.0


def test_prefix_tokens_never_halt_and_last_output_reads_the_last_block():
    snn, x = tiny_converted_vit()
    with torch.no_grad():
        res = run_halting(snn, x, HaltingConfig(beta=1e4, score="mean", output="last"))
        assert (res.depth[:, 0] == 3 * 2).all()   # the class token runs every (t, l)
        assert (res.depth[:, 1:] == 1).all()      # patches halt after the first step
        # nothing halts: 'last' is the plain per-timestep readout, averaged over t
        none = run_halting(snn, x, HaltingConfig(beta=-1e4, eps=0.0, output="last"))
        assert torch.allclose(none.logits, run_stepwise(snn, x), atol=1e-5)
        free = run_halting(snn, x, HaltingConfig(beta=1e4, keep_prefix=False))
    assert (free.depth == 1).all()


def test_unknown_output_is_a_clear_error():
    with pytest.raises(HaltingConfigError, match="output must be one of mean_field, last"):
        HaltingConfig(output="first")


def test_halted_keys_frozen_or_dropped_on_a_converted_vit():
    from convert.errors import ConversionError

    snn, x = tiny_converted_vit()
    cfg = HaltingConfig(alpha=1.0, beta=0.0, eps=0.2, score="mean", output="last")
    with torch.no_grad():
        frozen = run_halting(snn, x, cfg)
        dropped = run_halting(snn.set_halted_kv("drop"), x, cfg)
        nothing = run_halting(snn, x, HaltingConfig(beta=-1e4, eps=0.0, output="last"))
    assert 0 < frozen.token_ratio < 1 and torch.equal(frozen.depth, dropped.depth)
    assert not torch.allclose(frozen.logits, dropped.logits)  # the others see a difference
    assert torch.allclose(nothing.logits, run_stepwise(snn, x), atol=1e-5)  # no-op if none halt
    with pytest.raises(ConversionError, match="halted_kv must be one of frozen, drop"):
        snn.set_halted_kv("keep")
