"""Tests for stas_core.models: Spikformer / Spikingformer, I-SPS, the haltable protocol.

After init, BN running stats (mean 0, var 1) silence every neuron in eval mode, so logits are
constant over samples and equality tests would be vacuous. ``calibrated`` fixes the running
stats from a few train-mode passes first, and the tests assert that outputs vary.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import halting
from halting.protocol import run_stepwise
from stas_core.errors import ConfigError
from stas_core.models import Spikformer, Spikingformer, create_model, list_models
from stas_core.neurons import LIF, ATan, reset_net

from helpers import calibrate_bn

FAMILIES = ["spikformer-1-32", "spikingformer-1-32"]
SPS = ["integrated", "vanilla"]



def build(name="spikformer-1-32", seed=0, **kw):
    kw = {"img_size": 28, "in_chans": 1, "num_classes": 10, "timesteps": 3, **kw}
    torch.manual_seed(seed)
    return create_model(name, **kw)


def images(b=4, c=1, size=28, seed=1, t=None):
    g = torch.Generator().manual_seed(seed)
    shape = (b, c, size, size) if t is None else (t, b, c, size, size)
    return torch.rand(shape, generator=g)


def calibrate(model, passes=3, b=8, seed=100):
    """Cumulative BN statistics from a few train-mode passes, then eval mode."""
    return calibrate_bn(model, [images(b, model.in_chans, model.img_size, seed=seed + i)
                                for i in range(passes)])


def calibrated(name="spikformer-1-32", **kw):
    return calibrate(build(name, **kw))


def assert_varies(logits):
    assert logits.std(0).max().item() > 1e-4, "logits constant over the batch: vacuous test"


# =========================================================================== shapes
@pytest.mark.parametrize("name", FAMILIES + ["spikformer-2-64"])
@pytest.mark.parametrize("sps", SPS)
def test_shapes_28px(name, sps):
    m = calibrated(name, sps=sps, timesteps=2)
    x = images(3)
    with torch.no_grad():
        logits = m(x)
        m.reset()  # forward_features / embed do not reset neuron state themselves
        feats = m.forward_features(x)
        m.reset()
        emb = m.embed(x)
    d = m.embed_dim
    assert logits.shape == (3, 10)
    assert feats.shape == (2, 3, 49, d) and emb.shape == (2, 3, 49, d)
    assert m.num_tokens == 49
    assert torch.isfinite(logits).all()
    assert_varies(logits)


def test_shapes_rgb_32px():
    m = calibrate(build("spikformer-1-32", img_size=32, in_chans=3, timesteps=2))
    x = images(2, c=3, size=32)
    with torch.no_grad():
        assert m(x).shape == (2, 10)
        m.reset()
        assert m.forward_features(x).shape == (2, 2, 64, 32)
        m.reset()
        assert m.tokens(x, 0).shape == (2, 64, 32)


def test_spikformer_features_are_spikes():
    m = calibrated("spikformer-1-32")
    with torch.no_grad():
        m.reset()
        feats = m.forward_features(images(2))
    # residual sums of spikes: non-negative integers
    assert torch.equal(feats, feats.round()) and feats.min() >= 0 and feats.max() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_patch_splitting_runs_channels_last_without_copies(name, monkeypatch):
    """SPS activations are channels-last from the first conv on (a one-channel image is
    both layouts, and the conv would pick NCHW), and the neurons return spikes in the
    layout they were given, so no layer converts back and forth."""
    from stas_core import neurons

    m = calibrated(name, sps="vanilla")
    seen = []

    def spy(real):
        def run(x_seq, *a, **k):
            out = real(x_seq, *a, **k)  # None: the folded kernel does not run here
            if out is not None and x_seq.dim() == 5:  # [T, B, C, H, W]: patch splitting
                seen.append((x_seq[0].is_contiguous(memory_format=torch.channels_last),
                             out[0].stride() == x_seq.stride()))
            return out
        return run

    # the neurons alone (Spikingformer) and with their BatchNorm folded in (Spikformer)
    for fn in ("lif_multistep", "lif_bn_multistep"):
        monkeypatch.setattr(neurons, fn, spy(getattr(neurons, fn)))
    with torch.no_grad():
        m(images(4))
    assert len(seen) >= 4 and all(cl and same for cl, same in seen), seen


# =========================================================================== haltable protocol
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("sps", SPS)
def test_stepwise_equals_multistep(name, sps):
    m = calibrated(name, sps=sps)
    assert isinstance(m, halting.HaltableModel)
    assert all(isinstance(b, halting.HaltableBlock) for b in m.blocks)
    x = images(4)
    with torch.no_grad():
        multi = m(x)
        step = run_stepwise(m, x)
        cum = run_stepwise(m, x, cumulative=True)
        again = m(x)  # forward resets: stepwise run left no state behind
    assert_varies(multi)
    assert torch.allclose(step, multi, atol=1e-5)
    assert cum.shape == (3, 4, 10)
    assert torch.allclose(cum[-1], multi, atol=1e-5)
    assert torch.equal(again, multi)
    # the per-timestep answers really differ (the timestep loop is not trivial)
    assert not torch.allclose(cum[0], cum[-1], atol=1e-6)


def test_stepwise_equals_multistep_deeper():
    m = calibrated("spikformer-2-64", timesteps=2)
    x = images(3)
    with torch.no_grad():
        multi = m(x)
        assert_varies(multi)
        assert torch.allclose(run_stepwise(m, x), multi, atol=1e-5)


def test_stepwise_time_varying_input():
    for sps in SPS:
        m = calibrated("spikformer-1-32", sps=sps)
        x = images(3, t=3)
        with torch.no_grad():
            multi = m(x)
            assert_varies(multi)
            assert torch.allclose(run_stepwise(m, x), multi, atol=1e-5), sps


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_step_with_halted_tokens(name, train):
    """HaltableBlock contract: halted tokens come out unchanged, send nothing to the others
    (also not through train-mode BN statistics) and keep their neuron state frozen."""
    m = calibrated(name)
    m.train(train)
    x = images(3)
    g = torch.Generator().manual_seed(7)
    active = torch.rand(3, 49, generator=g) > 0.4
    assert active.any() and (~active).any()
    blk = m.blocks[0]
    lifs = [n for n in blk.modules() if isinstance(n, LIF)]
    with torch.no_grad():
        m.reset()
        h0 = m.tokens(x, 0)
        blk.step(h0)  # t = 0, every token active: builds neuron state
        v_before = [n.v.clone() for n in lifs]
        h1 = m.tokens(x, 1)
        out = blk.step(h1, active)
        v_after = [n.v.clone() for n in lifs]

        # same two steps, but the halted tokens carry garbage at t = 1
        m.reset()
        blk.step(m.tokens(x, 0))
        noisy = torch.where(active.unsqueeze(-1), h1, torch.randn(h1.shape, generator=g) * 5)
        out_noisy = blk.step(noisy, active)
    assert torch.equal(out[~active], h1[~active])
    assert torch.equal(out_noisy[~active], noisy[~active])
    assert not torch.equal(out[active], h1[active])  # active tokens were really processed
    assert torch.allclose(out_noisy[active], out[active], atol=1e-6)
    for vb, va in zip(v_before, v_after):
        assert torch.equal(va[~active], vb[~active])
    assert any(not torch.equal(va[active], vb[active]) for vb, va in zip(v_before, v_after))


def test_train_bn_statistics_from_active_tokens_only():
    m = calibrated("spikformer-1-32")
    m.train()
    x = images(3)
    active = torch.rand(3, 49, generator=torch.Generator().manual_seed(8)) > 0.4
    lin_bn = m.blocks[0].mlp.fc1  # LinearBN fed by (masked) tokens
    seen = []
    hook = lin_bn.linear.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    lin_bn.bn.momentum = 1.0  # running stats := statistics of this batch
    with torch.no_grad():
        m.reset()
        m.blocks[0].step(m.tokens(x, 0), active)
    hook.remove()
    (lin_out,) = seen
    kept = lin_out[active]
    assert torch.allclose(lin_bn.bn.running_mean, kept.mean(0), atol=1e-5)
    assert torch.allclose(lin_bn.bn.running_var, kept.var(0, unbiased=True), atol=1e-5)
    # not trivially equal to the all-token statistics
    assert not torch.allclose(lin_bn.bn.running_mean, lin_out.flatten(0, 1).mean(0), atol=1e-4)


# =========================================================================== I-SPS
@pytest.mark.parametrize("name", FAMILIES)
def test_isps_tokens_identical_over_time(name):
    m = calibrated(name, sps="integrated")
    x = images(3)
    with torch.no_grad():
        m.reset()
        emb = m.embed(x)
        m.reset()
        toks = [m.tokens(x, t).clone() for t in range(m.timesteps)]
    assert emb.abs().sum() > 0
    for t in range(m.timesteps):
        assert torch.equal(emb[t], emb[0])
        assert torch.equal(toks[t], toks[0])
    assert torch.equal(toks[0], emb[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_vanilla_tokens_differ_over_time(name):
    m = calibrated(name, sps="vanilla")
    x = images(3)
    with torch.no_grad():
        m.reset()
        emb = m.embed(x)
        m.reset()
        toks = [m.tokens(x, t) for t in range(m.timesteps)]
    assert not torch.equal(toks[0], toks[1])
    assert not torch.equal(emb[0], emb[1])
    for t in range(m.timesteps):  # stepwise tokens are the multi-step tokens
        assert torch.allclose(toks[t], emb[t], atol=1e-6)


def _per_frame_tokens(m, x):
    """Frame-by-frame SPS output (neuron state carried between frames, BN in eval)."""
    reset_net(m.patch_embed)
    out = torch.stack([m.patch_embed(x[f:f + 1])[0] for f in range(x.shape[0])])
    reset_net(m.patch_embed)
    return out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("integrate", ["max", "mean"])
def test_isps_time_varying_integration(name, integrate):
    m = calibrated(name, sps="integrated", integrate=integrate)
    x = images(3, t=2)  # 2 frames, T = 3 timesteps
    with torch.no_grad():
        per = _per_frame_tokens(m, x)
        want = per.amax(0) if integrate == "max" else per.mean(0)
        m.reset()
        emb = m.embed(x)
        m.reset()
        toks = [m.tokens(x, t) for t in range(m.timesteps)]
    assert not torch.equal(per[0], per[1])  # frames differ, so max / mean are not trivial
    assert not torch.allclose(per.amax(0), per.mean(0))
    assert emb.shape == (3, 3, 49, m.embed_dim)
    for t in range(m.timesteps):
        assert torch.allclose(emb[t], want, atol=1e-6)
        assert torch.allclose(toks[t], want, atol=1e-6)


def test_vanilla_time_varying_frames():
    m = calibrated("spikformer-1-32", sps="vanilla")
    x = images(2, t=3)
    with torch.no_grad():
        m.reset()
        emb = m.embed(x)
        per = _per_frame_tokens(m, x)
    assert torch.allclose(emb, per, atol=1e-6)
    with pytest.raises(ConfigError, match=r"vanilla SPS needs 1 or timesteps=3 frames; got 2"):
        m(images(2, t=2))


# =========================================================================== training
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("sps", SPS)
def test_gradient_reaches_all_parameters(name, sps):
    m = calibrated(name, sps=sps, timesteps=2)
    m.train()
    x = images(6)
    y = torch.arange(6) % 10
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    params = dict(m.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    for n, p in params.items():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert m.patch_embed.convs[0].weight.grad.abs().sum() > 0
    assert m.head.weight.grad.abs().sum() > 0 and m.head.bias.grad.abs().sum() > 0
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in params.values())
    assert nonzero >= 0.9 * len(params)


def test_train_mode_stepwise_gradient():
    """Per-timestep execution is differentiable too (grads through carried membranes)."""
    m = calibrated("spikformer-1-32")
    m.train()
    x = images(4)
    run_stepwise(m, x).sum().backward()
    assert m.patch_embed.convs[0].weight.grad.abs().sum() > 0


# =========================================================================== backends
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("sps", SPS)
def test_sinabs_backend_same_logits(name, sps):
    fused = calibrated(name, sps=sps)
    sin = build(name, seed=1, sps=sps, backend="sinabs")
    assert all(n.backend == "sinabs" for n in sin.modules() if isinstance(n, LIF))
    sin.load_state_dict(fused.state_dict())
    sin.eval()
    x = images(4)
    with torch.no_grad():
        a, b = fused(x), sin(x)
        b_step = run_stepwise(sin, x)
    assert_varies(a)
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert torch.allclose(b_step, b, atol=1e-5)


def test_neuron_kwargs_reach_every_neuron():
    m = build("spikingformer-1-32", tau=3.0, surrogate="atan", surrogate_alpha=3.0,
              detach_reset=False, v_reset=-0.25)
    lifs = [n for n in m.modules() if isinstance(n, LIF)]
    assert lifs
    for n in lifs:
        assert (n.tau, n.surrogate, n.detach_reset, n.v_reset) == (3.0, ATan(3.0), False, -0.25)
    assert {n.v_threshold for n in lifs} == {1.0, 0.5}  # attention LIF threshold 0.5


def test_soft_reset_reachable_through_create_model():
    m = build("spikformer-1-32", reset="soft")
    assert all(n.v_reset is None for n in m.modules() if isinstance(n, LIF))
    with pytest.raises(ConfigError, match="reset must be one of"):
        build("spikformer-1-32", reset="sometimes")


# =========================================================================== state dict
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("backend", ["fused", "sinabs"])
def test_state_dict_roundtrip(name, backend):
    m = calibrated(name, backend=backend)
    keys_before = set(m.state_dict())
    x = images(3)
    with torch.no_grad():
        out = m(x)
    sd = m.state_dict()
    assert set(sd) == keys_before  # running the model adds no state
    assert not [k for k in sd if "v_mem" in k or k.endswith(".v")]
    fresh = build(name, seed=123, backend=backend).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), out, atol=1e-4)  # different weights, different out
    fresh.load_state_dict(sd)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert_varies(out)


# =========================================================================== bad inputs
class TestBadInputs:
    def test_unknown_model_name(self):
        with pytest.raises(ConfigError, match=r"unknown model 'resnet50'.*spikformer-2-128"):
            create_model("resnet50")

    def test_unknown_family(self):
        with pytest.raises(ConfigError, match=r"unknown model 'vit-2-128'.*'spikformer'"):
            create_model("vit-2-128")

    @pytest.mark.parametrize("t", [0, -1])
    def test_bad_timesteps(self, t):
        with pytest.raises(ConfigError, match=rf"timesteps must be an integer >= 1, got {t}"):
            build(timesteps=t)

    def test_bad_options(self):
        with pytest.raises(ConfigError, match="sps must be one of"):
            build(sps="fancy")
        with pytest.raises(ConfigError, match="integrate must be one of"):
            build(integrate="sum")
        with pytest.raises(ConfigError, match="surrogate must be one of"):
            build(surrogate="relu")
        with pytest.raises(ConfigError, match="backend must be one of"):
            build(backend="cuda")
        with pytest.raises(ConfigError, match="img_size must be divisible by 4; got 30"):
            build(img_size=30)

    @pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 28, 28), (2, 28, 28),
                                       (3, 2, 3, 28, 28)])
    def test_wrong_input_shape(self, shape):
        m = build(timesteps=2)
        x = torch.rand(shape)
        with pytest.raises(ConfigError, match=r"\[B, 1, 28, 28\]") as info:
            m(x)
        assert str(list(shape)) in str(info.value)
        with pytest.raises(ConfigError, match=r"\[B, 1, 28, 28\]"):
            m.tokens(x, 0)
        with pytest.raises(ConfigError, match=r"\[B, 1, 28, 28\]"):
            run_stepwise(m, x)

    def test_rgb_model_rejects_grayscale(self):
        m = build(img_size=32, in_chans=3, timesteps=2)
        with pytest.raises(ConfigError, match=r"\[B, 3, 32, 32\]"):
            m(torch.rand(2, 1, 32, 32))


# =========================================================================== registry
def test_registry_names():
    names = list_models()
    for n in ("spikformer-4-384", "spikingformer-4-384", "spikformer-8-512",
              "spikformer-2-128"):
        assert n in names
    assert names == sorted(names)


def test_registry_alias_and_defaults():
    m = create_model("spikformer_2_128", img_size=28, in_chans=1)
    assert type(m) is Spikformer
    assert (m.depth, m.embed_dim, m.num_heads, len(m.blocks)) == (2, 128, 4, 2)
    m = create_model("Spikingformer_2_128", num_heads=8, img_size=28, in_chans=1)
    assert type(m) is Spikingformer and m.num_heads == 8
    # unregistered <family>-<L>-<D> builds from the family
    m = create_model("spikingformer-1-32", img_size=28, in_chans=1)
    assert type(m) is Spikingformer and (m.depth, m.embed_dim, m.num_heads) == (1, 32, 1)


def test_registry_none_kwargs_dropped():
    m = create_model("spikformer-1-32", img_size=None, in_chans=None, timesteps=None,
                     num_classes=None, backend=None, surrogate=None, sps=None)
    assert (m.img_size, m.in_chans, m.timesteps, m.num_classes, m.sps) == \
        (32, 3, 4, 10, "integrated")
    assert all(n.backend == "fused" for n in m.modules() if isinstance(n, LIF))


# --------------------------------------------------------------------------- oneDNN Linear
def _onednn_calls(monkeypatch):
    from stas_core import layers

    calls = []
    real = layers._onednn_forward
    monkeypatch.setattr(layers, "_onednn_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear_with_gradients(bias, monkeypatch):
    """The oneDNN route is taken on CPU float32 and gives F.linear's values and gradients
    (rounding only) for x, weight and bias, on [T, B, N, D] input."""
    from stas_core.layers import Linear, _onednn_linear_op

    if _onednn_linear_op() is None:
        pytest.skip("this PyTorch build has no oneDNN linear; the layer is nn.Linear")
    calls = _onednn_calls(monkeypatch)
    torch.manual_seed(0)
    lin = Linear(24, 40, bias=bias)
    x = torch.randn(2, 4, 1030, 24, requires_grad=True)  # 8,240 rows: over ONEDNN_MIN_ROWS
    g = torch.randn(2, 4, 1030, 40)
    lin(x).backward(g)
    grads = [x.grad.clone(), *(p.grad.clone() for p in lin.parameters())]
    assert calls, "the oneDNN route was not taken"
    x.grad = None
    lin.zero_grad()
    F.linear(x, lin.weight, lin.bias).backward(g)
    ref = [x.grad, *(p.grad for p in lin.parameters())]
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: no autograd node, same values
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))


def test_onednn_linear_stays_visible_to_flop_counting(monkeypatch):
    """Under a dispatch mode (the FLOP counter) the layer runs ATen's op, so it is counted."""
    from torch.utils.flop_counter import FlopCounterMode
    from stas_core.layers import Linear, _onednn_linear_op

    if _onednn_linear_op() is None:
        pytest.skip("this PyTorch build has no oneDNN linear; the layer is nn.Linear")
    calls = _onednn_calls(monkeypatch)
    lin = Linear(16, 8, bias=False)
    x = torch.randn(8200, 16)  # enough rows for the oneDNN route outside the mode
    with FlopCounterMode(display=False) as counter:
        lin(x)
    assert counter.get_total_flops() == 2 * 8200 * 16 * 8
    assert not calls
    lin(x)
    assert calls


def test_onednn_linear_leaves_few_rows_to_aten(monkeypatch):
    """Below ONEDNN_MIN_ROWS (the halted rows of the gather execution) ATen's GEMM runs:
    oneDNN's per-call overhead made it slower there."""
    from stas_core.layers import ONEDNN_MIN_ROWS, Linear

    calls = _onednn_calls(monkeypatch)
    lin = Linear(16, 8)
    x = torch.randn(ONEDNN_MIN_ROWS - 1, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert not calls
