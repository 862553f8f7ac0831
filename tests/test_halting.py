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
    """Block ``l`` of a scripted model: each active token's element 0 becomes
    ``logit(p[t][token])`` (so its score is p with alpha=1, beta=0) and element 1 the marker
    ``t * L + l + 1`` of the step; halted tokens pass through unchanged. Outputs that differ
    from step to step make every weight of the mean field visible in the readout."""

    def __init__(self, index, depth, probs):
        super().__init__()
        self.index, self.depth, self.probs, self.calls = index, depth, probs, 0

    def step(self, x, active=None, *, gather=False):  # dense either way: same result
        p = torch.tensor(self.probs[self.calls])
        marker = float(self.calls * self.depth + self.index + 1)
        self.calls += 1
        out = x.clone()
        out[..., 0] = torch.where(active, torch.logit(p), x[..., 0])
        out[..., 1] = torch.where(active, torch.full_like(x[..., 1], marker), x[..., 1])
        return out


class Scripted(nn.Module):
    """Two tokens, two blocks, two timesteps with known halting scores; the readout is the
    identity (``[B, N * D]``), so a test sees exactly what it was given."""

    timesteps = 2

    def __init__(self, probs):
        super().__init__()
        depth = len(probs[0])
        self.blocks = nn.ModuleList(ScriptedBlock(l, depth, [probs[t][l] for t in range(2)])
                                    for l in range(depth))
        self.seen = []

    def reset(self):
        self.seen = []
        for b in self.blocks:
            b.calls = 0

    def tokens(self, x, t):
        return x  # fresh input tokens: zeros

    def readout(self, h):
        self.seen.append(h.clone())
        return h.flatten(1)


# PROBS[t][l] = [score of token 0, score of token 1]; token 0 reaches 1 at (0, 1) with
# remainder 0.25 = 1 - 0.75 (not its score 0.75), token 1 is forced at the end
PROBS = [[[0.75, 0.125], [0.75, 0.25]], [[0.75, 0.5], [0.75, 0.5]]]


@pytest.mark.parametrize("mode, depth, remainder, ponder, fractions, markers", [
    # one window over (t,l) = (0,0),(0,1),(1,0),(1,1), markers 1..4:
    # token 0: .75 x m1, then R .25 x m2; token 1: .125 m1 + .25 m2 + .5 m3 + R .125 m4
    ("both", [2, 4], [0.25, 0.125], (2.25 + 4.125) / 2, [[1, 1], [0.5, 0.5]],
     [0.75 * 1 + 0.25 * 2, 0.125 * 1 + 0.25 * 2 + 0.5 * 3 + 0.125 * 4]),
    # a window per timestep, forced at its last block, read out per t and averaged:
    # token 0: (.75 m1 + .25 m2 + .75 m3 + .25 m4) / 2; token 1: (.125 m1 + .875 m2 + .5 m3 + .5 m4) / 2
    ("block", [4, 4], [0.5, 1.375], (4.5 + 5.375) / 2, [[1, 1], [1, 1]],
     [(1.25 + 3.25) / 2, (1.875 + 3.5) / 2]),
    # scored after the last block only: token 0 .75 x m2 then R .25 x m4; token 1 .25 m2, R .75 m4
    ("time", [2, 2], [0.25, 0.75], (2.25 + 2.75) / 2, [[1, 1], [1, 1]],
     [0.75 * 2 + 0.25 * 4, 0.25 * 2 + 0.75 * 4]),
])
@pytest.mark.parametrize("execution", ["mask", "gather"])
def test_hand_worked_accumulation(mode, depth, remainder, ponder, fractions, markers, execution):
    model = Scripted(PROBS)
    x = torch.zeros(1, 2, 3)
    res = run_halting(model, x, HaltingConfig(alpha=1.0, beta=0.0, eps=0.0, accumulate=mode),
                      record=True, execution=execution)
    assert res.depth[0].tolist() == depth
    assert res.remainder[0].tolist() == pytest.approx(remainder)
    assert float(res.ponder_loss) == pytest.approx(ponder)
    assert res.active_fraction.tolist() == fractions
    # element 1 of each token's mean field: its step markers weighted by h, and R at the end
    assert res.logits.view(2, 3)[:, 1].tolist() == pytest.approx(markers)
    if mode == "both":  # per-step record: (t, l, H, R, N, mask)
        t, l, H, R, N, mask = res.history[1]
        assert (t, l) == (0, 1) and mask[0].tolist() == [False, True]
        assert H[0].tolist() == pytest.approx([1.5, 0.375])  # H sums scores; R is 1 - H before


def test_last_output_reads_what_a_halted_token_stopped_with():
    # token 0 halts at (0, 1) holding marker 2; at t = 1 it must not re-enter as its
    # (zero) input token: the last block's readout sees 2 at both timesteps
    model = Scripted(PROBS)
    res = run_halting(model, torch.zeros(1, 2, 3),
                      HaltingConfig(alpha=1.0, beta=0.0, eps=0.0, output="last"))
    assert [h[0, :, 1].tolist() for h in model.seen] == [[2.0, 2.0], [2.0, 4.0]]
    assert res.logits.view(2, 3)[:, 1].tolist() == pytest.approx([2.0, 3.0])


@pytest.mark.parametrize("execution", ["mask", "gather"])
def test_last_output_on_a_direct_model_reads_the_halting_value(execution):
    # beta 1e4: every token halts after block 0 at t = 0; the readout at t = 1, 2 must see
    # that block's output, not the patch embedding the token would re-enter with
    model, x = _tiny_model("spikformer-2-32", timesteps=3)
    first, seen = [], []
    step0, readout = model.blocks[0].step, model.readout
    model.blocks[0].step = lambda h, *a, **k: first.append(step0(h, *a, **k)) or first[-1]
    model.readout = lambda h: seen.append(h.clone()) or readout(h)
    with torch.no_grad():
        run_halting(model, x, HaltingConfig(beta=1e4, output="last"), execution=execution)
        embedding = model.tokens(x, 0)
    assert len(seen) == 3 and not torch.equal(first[0], embedding)
    for t in range(3):
        assert torch.equal(seen[t], first[0]), t


def test_last_output_on_an_average_pooled_vit_reads_the_halting_value():
    snn, x = tiny_converted_vit(global_pool="avg")
    assert snn.global_pool == "avg" and snn.num_prefix_tokens == 1
    first, seen = [], []
    step0, readout = snn.blocks[0].step, snn.readout
    snn.blocks[0].step = lambda h, *a, **k: first.append(step0(h, *a, **k)) or first[-1]
    snn.readout = lambda h: seen.append(h.clone()) or readout(h)
    with torch.no_grad():
        run_halting(snn, x, HaltingConfig(beta=1e4))  # the model's default: output='last'
    patches = slice(1, None)  # the class token never halts; the patches halt at (0, 0)
    for t in range(1, 3):
        assert torch.equal(seen[t][:, patches], first[0][:, patches]), t


def test_a_model_declares_its_halting_defaults():
    snn, x = tiny_converted_vit(timesteps=8)
    with torch.no_grad():
        ann = snn.ann_forward(x)
        default = run_halting(snn, x, HaltingConfig(beta=-1e4, eps=0.0))
        explicit = run_halting(snn, x, HaltingConfig(beta=-1e4, eps=0.0, output="last",
                                                     score="convergence"))
        plain = run_stepwise(snn, x)
    assert default.config.output == "last" and default.config.score == "convergence"
    assert torch.equal(default.logits, explicit.logits)
    assert torch.allclose(default.logits, plain, atol=1e-5)  # nothing halts: the plain SNN
    assert float((default.logits - ann).abs().max()) < 0.1
    with pytest.raises(HaltingConfigError, match="supports output 'last'.*got output='mean_field'"):
        run_halting(snn, x, HaltingConfig(output="mean_field"))
    direct, y = _tiny()
    res = run_halting(direct, y, HaltingConfig())
    assert (res.config.output, res.config.score) == ("mean_field", "current")


def _tiny_model(name="spikformer-1-32", timesteps=2, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 1, 28, 28)
    model = create_model(name, img_size=28, in_chans=1, timesteps=timesteps)
    return calibrate_bn(model, x), x


def _tiny(seed=0):
    return _tiny_model(seed=seed)


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
    ({"score": "median"}, "score must be one of current, mean, convergence; got 'median'"),
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


def test_against_baseline_hand_worked():
    """A curve t = 1, 2, 3 at top-1 0.5 / 0.7 / 0.8 for 1 / 2 / 3 mJ."""
    from stas_core.evaluate import against_baseline

    curve = {"t": [1, 2, 3], "top1": [0.5, 0.7, 0.8], "energy_mj": [1.0, 2.0, 3.0]}
    above = against_baseline(0.75, 2.0, curve)  # t = 2 gives 0.70 for the same energy
    assert above["top1_gain_at_equal_energy"] == pytest.approx(0.05)
    assert above["energy_saving_at_equal_top1"] == pytest.approx(1 - 2 / 3)  # t = 3 needed
    assert above["beats_baseline"] is True
    under = against_baseline(0.6, 2.5, curve)  # t = 2 is cheaper and more accurate
    assert under["top1_gain_at_equal_energy"] == pytest.approx(-0.1)
    assert under["energy_saving_at_equal_top1"] == pytest.approx(1 - 2.5 / 2)
    assert under["beats_baseline"] is False
    outside = against_baseline(0.4, 0.5, curve)  # cheaper than t = 1: nothing to compare
    assert outside["top1_gain_at_equal_energy"] is None and outside["beats_baseline"] is None
    best = against_baseline(0.9, 3.0, curve)  # more accurate than any t
    assert best["energy_saving_at_equal_top1"] is None and best["beats_baseline"] is True


def test_convergence_signal_hand_worked():
    """Running means m_0 = h_0 = [1, 0], m_1 = (h_0 + h_1) / 2 = [2, 0] for h_1 = [3, 0]:
    change |m_1 - m_0| = 1 against |m_1| = 2, signal -log(1/2) = log 2; 0 at t = 0."""
    from halting.plugin import _settled

    h0, h1 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3.0, 0.0]]])
    s0, total = _settled(h0, None, 0)
    assert s0.item() == 0.0
    s1, total = _settled(h1, total, 1)
    assert s1.item() == pytest.approx(math.log(2.0))
    s2, _ = _settled(torch.tensor([[[2.0, 0.0]]]), total, 2)  # the mean stays at [2, 0]
    assert s2.item() > 50  # settled: the score saturates, the token halts


def test_convergence_score_halts_settled_tokens_first():
    """A model whose token 0 repeats the same output every step and token 1 alternates:
    with the convergence score token 0 halts after t = 1, token 1 runs longer."""
    class Block(nn.Module):
        def step(self, x, active=None, *, gather=False):
            return x

    class Model(nn.Module):
        timesteps, num_prefix_tokens = 4, 0

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

        def reset(self):
            pass

        def tokens(self, x, t):
            out = x.clone()
            out[:, 1] *= (-1.0) ** t + 2.0  # token 1: 3, 1, 3, 1, ... its mean keeps moving
            return out

        def readout(self, h):
            return h.mean(1)

    x = torch.ones(1, 2, 3)
    res = run_halting(Model(), x, HaltingConfig(alpha=1.0, beta=-4.0, eps=0.01,
                                                score="convergence", output="mean_field"))
    assert res.depth[0, 0] < res.depth[0, 1], res.depth


def test_energy_per_t_covers_every_step_when_all_tokens_halt_early():
    """A step after every token halted costs nothing, but it is still a step: the
    cumulative energy per t has T entries, about flat after the first (a tuning
    trial whose knobs halt everything by t = 1 once crashed the anytime readout)."""
    from stas_core.baselines import collect_anytime
    from stas_core.evaluate import energy_report

    model, x = _tiny_model("spikformer-1-32", timesteps=4)
    y = torch.zeros(len(x), dtype=torch.long)
    cfg = HaltingConfig(alpha=1.0, beta=1e4, eps=0.0)  # every token halts in the first step
    loader = [(x, y)]
    e = energy_report(model, loader, torch.device("cpu"), max_images=4, halting=cfg)["energy"]
    assert [p["t"] for p in e["per_t"]] == [1, 2, 3, 4]
    assert e["per_t"][0]["conventional_mj"] > 0
    assert e["per_t"][-1]["conventional_mj"] < 1.01 * e["per_t"][0]["conventional_mj"]
    assert e["per_t"][-1]["full_mj"] == pytest.approx(e["full_mj"])
    counted = ([p["conventional_mj"] for p in e["per_t"]], [p["full_mj"] for p in e["per_t"]])
    run = collect_anytime(model, loader, torch.device("cpu"), halting=cfg, energy=counted)
    assert run.pred.shape == (4, len(x))
