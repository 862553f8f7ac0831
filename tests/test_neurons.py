"""Tests for stas_core.neurons: LIF/IF dynamics, surrogates, fused vs sinabs backends.

Conventions under test (spikingjelly ``decay_input``, Heaviside at ``H >= threshold``)::

    LIF: H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau      IF: H[t] = V[t-1] + X[t]
    S[t] = (H[t] >= v_threshold)
    soft: V[t] = H[t] - v_threshold * S[t]
    hard: V[t] = H[t] * (1 - S[t]) + v_reset * S[t]
"""
from __future__ import annotations

import math

import pytest
import torch

from stas_core.errors import ConfigError, StasError
from stas_core.neurons import (
    ATan, IF, LIF, Sigmoid, lif_multistep, make_surrogate, reset_net, set_step_mode,
)

SHAPE = (4, 3, 5, 7)  # [T, B, C, L]

# (v_reset, detach_reset): hard reset to 0 / soft reset, each with and without detach
RESETS = [(0.0, True), (0.0, False), (None, True), (None, False)]
RESET_IDS = ["hard-detach", "hard-grad", "soft-detach", "soft-grad"]
SURROGATES = [Sigmoid(), ATan(), Sigmoid(alpha=2.5), ATan(alpha=4.0)]
SURROGATE_IDS = ["sigmoid", "atan", "sigmoid2.5", "atan4"]



def make(kind: str, **kw) -> LIF:
    return LIF(2.0, **kw) if kind == "lif" else IF(**kw)


def membrane(neuron: LIF) -> torch.Tensor:
    """Current membrane of either backend (``neuron.v`` is only kept by the fused backend)."""
    return neuron.v if neuron.backend == "fused" else neuron._sinabs.v_mem


def rand_input(seed: int = 0, dtype=torch.float32, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # mean 1, std 2: LIF (H = X/2 from rest) and IF both fire on a good share of elements
    return (torch.randn(shape, generator=g) * 2.0 + 1.0).to(dtype)


def rand_grad(seed: int = 1, dtype=torch.float32, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def assert_some_spikes(s: torch.Tensor) -> None:
    rate = s.float().mean().item()
    assert 0.05 < rate < 0.95, f"degenerate firing rate {rate}"


# =========================================================================== hand-computed
class TestHandComputedDynamics:
    # x = [3.0, 1.5, 1.0, 0.5], tau = 2, threshold 1 (all values exact in binary)
    X_LIF = [3.0, 1.5, 1.0, 0.5]

    def test_lif_hard_reset(self):
        # V0 = 0
        # t0: H = 0    + (3.0 - 0   )/2 = 1.5    >= 1 -> S=1, V = 0
        # t1: H = 0    + (1.5 - 0   )/2 = 0.75         S=0, V = 0.75
        # t2: H = 0.75 + (1.0 - 0.75)/2 = 0.875        S=0, V = 0.875
        # t3: H = 0.875+ (0.5 - 0.875)/2 = 0.6875      S=0, V = 0.6875
        for backend in ("fused", "sinabs"):
            n = LIF(2.0, v_reset=0.0, backend=backend)
            s = n(torch.tensor(self.X_LIF).view(4, 1))
            assert s.flatten().tolist() == [1.0, 0.0, 0.0, 0.0], backend
            assert membrane(n).flatten().tolist() == [0.6875], backend

    def test_lif_soft_reset(self):
        # t0: H = 0    + (3.0 - 0  )/2 = 1.5   S=1, V = 1.5 - 1 = 0.5
        # t1: H = 0.5  + (1.5 - 0.5)/2 = 1.0   S=1 (H == threshold fires), V = 0
        # t2: H = 0    + (1.0 - 0  )/2 = 0.5   S=0, V = 0.5
        # t3: H = 0.5  + (0.5 - 0.5)/2 = 0.5   S=0, V = 0.5
        for backend in ("fused", "sinabs"):
            n = LIF(2.0, v_reset=None, backend=backend)
            s = n(torch.tensor(self.X_LIF).view(4, 1))
            assert s.flatten().tolist() == [1.0, 1.0, 0.0, 0.0], backend
            assert membrane(n).flatten().tolist() == [0.5], backend

    def test_lif_leak_only(self):
        # x = [1.5, 0.5, 1.2, 0.0]: never reaches threshold, pure leak
        # H = 0.75; 0.75 + (0.5-0.75)/2 = 0.625; 0.625 + (1.2-0.625)/2 = 0.9125;
        # 0.9125 + (0 - 0.9125)/2 = 0.45625
        n = LIF(2.0)
        s = n(torch.tensor([1.5, 0.5, 1.2, 0.0]).view(4, 1))
        assert s.sum().item() == 0.0
        assert n.v.item() == pytest.approx(0.45625, abs=1e-6)

    def test_lif_tau4_threshold2(self):
        # tau = 4, threshold 2, hard reset: x = [8.0, 4.0, 4.0, 4.0]
        # t0: H = 0 + 8/4 = 2.0 >= 2 -> S=1, V=0
        # t1: H = 0 + 4/4 = 1.0          S=0, V=1
        # t2: H = 1 + (4-1)/4 = 1.75     S=0, V=1.75
        # t3: H = 1.75 + (4-1.75)/4 = 2.3125 S=1, V=0
        n = LIF(4.0, v_threshold=2.0)
        s = n(torch.tensor([8.0, 4.0, 4.0, 4.0]).view(4, 1))
        assert s.flatten().tolist() == [1.0, 0.0, 0.0, 1.0]
        assert n.v.item() == 0.0

    # x = [1.5, 0.5, 1.2, 0.0], IF (no leak), threshold 1
    X_IF = [1.5, 0.5, 1.2, 0.0]

    def test_if_hard_reset(self):
        # t0: H = 0 + 1.5 = 1.5   S=1, V = 0
        # t1: H = 0 + 0.5 = 0.5   S=0, V = 0.5
        # t2: H = 0.5 + 1.2 = 1.7 S=1, V = 0
        # t3: H = 0 + 0   = 0     S=0, V = 0
        for backend in ("fused", "sinabs"):
            n = IF(v_reset=0.0, backend=backend)
            s = n(torch.tensor(self.X_IF).view(4, 1))
            assert s.flatten().tolist() == [1.0, 0.0, 1.0, 0.0], backend
            assert membrane(n).flatten().tolist() == [0.0], backend

    def test_if_soft_reset(self):
        # t0: H = 0 + 1.5 = 1.5   S=1, V = 0.5
        # t1: H = 0.5 + 0.5 = 1.0 S=1, V = 0
        # t2: H = 0 + 1.2 = 1.2   S=1, V = 0.2
        # t3: H = 0.2 + 0 = 0.2   S=0, V = 0.2
        for backend in ("fused", "sinabs"):
            n = IF(v_reset=None, backend=backend)
            s = n(torch.tensor(self.X_IF).view(4, 1))
            assert s.flatten().tolist() == [1.0, 1.0, 1.0, 0.0], backend
            assert membrane(n).item() == pytest.approx(0.2, abs=1e-6), backend

    def test_if_hard_reset_nonzero(self):
        # v_reset = -0.5, V0 = 0: x = [1.5, 0.5, 1.2, 0.0]
        # t0: H = 1.5 S=1, V = -0.5
        # t1: H = 0.0 S=0, V = 0.0
        # t2: H = 1.2 S=1, V = -0.5
        # t3: H = -0.5 S=0, V = -0.5
        for backend in ("fused", "sinabs"):
            n = IF(v_reset=-0.5, backend=backend)
            s = n(torch.tensor(self.X_IF).view(4, 1))
            assert s.flatten().tolist() == [1.0, 0.0, 1.0, 0.0], backend
            assert membrane(n).flatten().tolist() == [-0.5], backend

    # gradients by hand at H exactly on the threshold: IF, x = [1.0, 0.5], loss = S0 + S1,
    # Sigmoid(4): sg(0) = 1, sg(-0.5) = 4 sig(-2) (1 - sig(-2)) = 0.41997434161402614
    #   t0: H0 = 1.0 -> S0 = 1 ;  t1: H1 = V0 + 0.5 = 0.5 -> S1 = 0 (both resets give V0 = 0)
    #   dL/dx1 = sg(H1 - 1) = 0.41997
    #   dL/dx0 = sg(H0 - 1) + sg(H1 - 1) * dV0/dH0
    #     hard, detach:  dV0/dH0 = 1 - S0 = 0                       -> 1.0
    #     hard, grad:    dV0/dH0 = 1 - S0 + (0 - H0) sg(0) = -1      -> 1 - 0.41997
    #     soft, detach:  dV0/dH0 = 1                                -> 1 + 0.41997
    #     soft, grad:    dV0/dH0 = 1 - th sg(0) = 0                 -> 1.0
    SG = 0.41997434161402614

    @pytest.mark.parametrize("backend", ["fused", "sinabs"])
    @pytest.mark.parametrize("v_reset,detach,dx0", [
        (0.0, True, 1.0), (0.0, False, 1.0 - SG), (None, True, 1.0 + SG), (None, False, 1.0)],
        ids=RESET_IDS)
    def test_if_gradient_at_threshold(self, backend, v_reset, detach, dx0):
        x = torch.tensor([[1.0], [0.5]], dtype=torch.float64, requires_grad=True)
        n = IF(v_reset=v_reset, detach_reset=detach, surrogate=Sigmoid(4.0),
               backend=backend).double()
        s = n(x)
        assert s.flatten().tolist() == [1.0, 0.0]
        s.sum().backward()
        # sinabs' SingleSpike emits float32 spikes even for float64 input, so gradients through
        # a differentiable reset are float32-rounded there
        tol = 1e-12 if backend == "fused" else 1e-6
        assert x.grad.flatten().tolist() == pytest.approx([dx0, self.SG], abs=tol)

    def test_lif_functional_matches_module(self):
        x = torch.tensor(self.X_LIF).view(4, 1)
        s, v = lif_multistep(x, tau=2.0, v_reset=None)
        assert s.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
        assert v.item() == 0.5
        s, v = lif_multistep(x, tau=None, v_reset=0.0)  # IF: 3 -> spike, 1.5 -> spike, ...
        # IF hard: H = 3 S, V0; H = 1.5 S, V0; H = 1.0 S, V0; H = 0.5, V 0.5
        assert s.flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
        assert v.item() == 0.5


# =========================================================================== surrogates
class TestSurrogates:
    @pytest.mark.parametrize("alpha", [1.0, 4.0, 7.5])
    def test_sigmoid_closed_form(self, alpha):
        f = Sigmoid(alpha)
        th = 1.0
        for u in [-1.0, -0.25, 0.0, 0.3, 2.0]:
            sig = 1.0 / (1.0 + math.exp(-alpha * u))
            want = alpha * sig * (1.0 - sig)
            got = f(torch.tensor([th + u], dtype=torch.float64), th).item()
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
        # peak at u = 0 is alpha / 4
        assert f(torch.tensor(0.5), 0.5).item() == pytest.approx(alpha / 4)

    def test_sigmoid_default_hand_values(self):
        f = Sigmoid()  # alpha = 4
        assert f.alpha == 4.0
        # u = 0: 4 * 0.5 * 0.5 = 1
        assert f(torch.tensor(1.0), 1.0).item() == pytest.approx(1.0)
        # u = 0.5: sig(2) = 0.8807970779778823 -> 4 * 0.880797 * 0.119203 = 0.4199743416
        assert f(torch.tensor(1.5, dtype=torch.float64), 1.0).item() == pytest.approx(
            0.41997434161402614, rel=1e-12)

    @pytest.mark.parametrize("alpha", [1.0, 2.0, 5.0])
    def test_atan_closed_form(self, alpha):
        f = ATan(alpha)
        th = 0.5
        for u in [-1.0, -0.25, 0.0, 0.3, 2.0]:
            want = (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)
            got = f(torch.tensor([th + u], dtype=torch.float64), th).item()
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15)

    def test_atan_default_hand_values(self):
        f = ATan()  # alpha = 2
        assert f.alpha == 2.0
        assert f(torch.tensor(1.0), 1.0).item() == pytest.approx(1.0)  # alpha/2
        # u = 1: 1 / (1 + pi^2) = 0.09199966835037524
        assert f(torch.tensor(2.0, dtype=torch.float64), 1.0).item() == pytest.approx(
            0.09199966835037524, rel=1e-12)

    def test_surrogates_symmetric_and_tensor_threshold(self):
        u = torch.linspace(-2, 2, 41, dtype=torch.float64)
        for f in (Sigmoid(3.0), ATan(3.0)):
            assert torch.allclose(f(1.0 + u, 1.0), f(1.0 - u, 1.0))
            assert torch.allclose(f(1.0 + u, torch.tensor(1.0, dtype=torch.float64)),
                                  f(1.0 + u, 1.0))

    def test_make_surrogate(self):
        assert make_surrogate("sigmoid") == Sigmoid()
        assert make_surrogate("atan") == ATan()
        assert make_surrogate("atan", 3) == ATan(3.0)
        assert make_surrogate("sigmoid", 1.5) == Sigmoid(1.5)

    @pytest.mark.parametrize("surrogate", SURROGATES, ids=SURROGATE_IDS)
    @pytest.mark.parametrize("backend", ["fused", "sinabs"])
    def test_one_step_grad_is_surrogate(self, surrogate, backend):
        # from rest: IF H = X, dS/dX = sg(H); LIF H = X / tau, dS/dX = sg(H) / tau
        x0 = torch.linspace(-1.0, 4.0, 21, dtype=torch.float64)
        for kind, tau in (("if", 1.0), ("lif", 2.0)):
            x = x0.clone().requires_grad_(True)
            n = make(kind, surrogate=surrogate, backend=backend, v_threshold=1.0).double()
            s = n(x.unsqueeze(0))
            s.sum().backward()
            h = x0 / tau
            want = surrogate(h, 1.0) / tau
            assert torch.equal(s[0].detach(), (h >= 1.0).double())
            assert torch.allclose(x.grad, want, atol=1e-12), (kind, backend)


# =========================================================================== fused vs sinabs
def _run(kind, backend, v_reset, detach, surrogate, x, grad_out):
    n = make(kind, v_reset=v_reset, detach_reset=detach, surrogate=surrogate, backend=backend)
    xi = x.clone().requires_grad_(True)
    s = n(xi)
    s.backward(grad_out)
    return s.detach(), xi.grad, membrane(n).detach()


@pytest.mark.parametrize("surrogate", SURROGATES[:2], ids=SURROGATE_IDS[:2])
@pytest.mark.parametrize("v_reset,detach", RESETS, ids=RESET_IDS)
@pytest.mark.parametrize("kind", ["lif", "if"])
def test_fused_equals_sinabs(kind, v_reset, detach, surrogate):
    x = rand_input(seed=3)
    g = rand_grad(seed=4)
    s_f, gx_f, v_f = _run(kind, "fused", v_reset, detach, surrogate, x, g)
    s_s, gx_s, v_s = _run(kind, "sinabs", v_reset, detach, surrogate, x, g)
    assert_some_spikes(s_f)
    assert s_s.dtype == s_f.dtype and s_s.shape == s_f.shape and s_s.is_contiguous()
    assert torch.equal(s_f, s_s)
    assert torch.allclose(v_f, v_s, atol=1e-6)
    assert gx_f.abs().sum() > 0
    assert torch.allclose(gx_f, gx_s, atol=1e-6), (gx_f - gx_s).abs().max()


@pytest.mark.parametrize("detach", [True, False])
def test_fused_equals_sinabs_if_nonzero_hard_reset(detach):
    x, g = rand_input(seed=5), rand_grad(seed=6)
    s_f, gx_f, v_f = _run("if", "fused", -0.3, detach, ATan(), x, g)
    s_s, gx_s, v_s = _run("if", "sinabs", -0.3, detach, ATan(), x, g)
    assert_some_spikes(s_f)
    assert torch.equal(s_f, s_s)
    assert torch.allclose(v_f, v_s, atol=1e-6)
    assert torch.allclose(gx_f, gx_s, atol=1e-6)


@pytest.mark.parametrize("v_reset", [0.5, -0.3])
def test_sinabs_lif_nonzero_hard_reset_rejected(v_reset):
    with pytest.raises(ConfigError, match="v_reset"):
        LIF(2.0, v_reset=v_reset, backend="sinabs")
    LIF(2.0, v_reset=v_reset, backend="fused")  # the fused backend supports it


def test_sinabs_state_not_in_state_dict():
    n = LIF(backend="sinabs")
    n(rand_input())
    assert dict(n.state_dict()) == {}
    assert list(n.parameters()) == []


# =========================================================================== vs autograd reference
class _RefSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, th, surrogate):
        ctx.save_for_backward(h)
        ctx.th, ctx.surrogate = th, surrogate
        return (h >= th).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return grad * ctx.surrogate(h, ctx.th), None, None


def reference_neuron(x, tau, th, v_reset, detach, surrogate):
    """Plain autograd loop (spikingjelly formulation): differentiable reset unless detach."""
    v = torch.zeros_like(x[0])
    spikes = []
    for t in range(x.shape[0]):
        if tau is None:
            h = v + x[t]
        else:
            h = v + (x[t] - (v - (v_reset or 0.0))) / tau
        s = _RefSpike.apply(h, th, surrogate)
        sr = s.detach() if detach else s
        v = h - th * sr if v_reset is None else h * (1.0 - sr) + v_reset * sr
        spikes.append(s)
    return torch.stack(spikes), v


@pytest.mark.parametrize("surrogate", SURROGATES, ids=SURROGATE_IDS)
@pytest.mark.parametrize("v_reset,detach", RESETS + [(-0.3, True), (-0.3, False), (0.2, False)],
                         ids=RESET_IDS + ["hard-0.3-detach", "hard-0.3-grad", "hard+0.2-grad"])
@pytest.mark.parametrize("tau", [2.0, 3.0, None], ids=["lif2", "lif3", "if"])
def test_fused_backward_matches_autograd_reference(tau, v_reset, detach, surrogate):
    x = rand_input(seed=7, dtype=torch.float64)
    g_s = rand_grad(seed=8, dtype=torch.float64)
    g_v = rand_grad(seed=9, dtype=torch.float64, shape=SHAPE[1:])
    th = 0.8

    xr = x.clone().requires_grad_(True)
    s_r, v_r = reference_neuron(xr, tau, th, v_reset, detach, surrogate)
    torch.autograd.backward([s_r, v_r], [g_s, g_v])

    xf = x.clone().requires_grad_(True)
    s_f, v_f = lif_multistep(xf, tau=tau, v_threshold=th, v_reset=v_reset,
                             detach_reset=detach, surrogate=surrogate)
    torch.autograd.backward([s_f, v_f], [g_s, g_v])

    assert_some_spikes(s_f)
    assert torch.equal(s_f, s_r)
    assert torch.allclose(v_f, v_r, atol=1e-12)
    assert torch.allclose(xf.grad, xr.grad, atol=1e-10, rtol=1e-9), \
        (xf.grad - xr.grad).abs().max()


def test_fused_backward_reference_detects_wrong_reset_grad():
    """Honesty check: detach and non-detach gradients really differ, so the comparison above
    would catch a backward that ignored ``detach_reset``."""
    x = rand_input(seed=7, dtype=torch.float64).requires_grad_(True)
    g = rand_grad(seed=8, dtype=torch.float64)
    grads = []
    for detach in (True, False):
        s, _ = lif_multistep(x, tau=2.0, v_reset=None, detach_reset=detach)
        (gx,) = torch.autograd.grad(s, x, g)
        grads.append(gx)
    assert not torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fused_grad_through_initial_membrane():
    x = rand_input(seed=10, dtype=torch.float64, shape=(3, 4, 6))
    v0 = (torch.rand(4, 6, dtype=torch.float64) * 0.9).requires_grad_(True)
    v0r = v0.detach().clone().requires_grad_(True)
    g = rand_grad(seed=11, dtype=torch.float64, shape=(3, 4, 6))
    s, _ = lif_multistep(x, v0, tau=2.0, v_reset=0.0, detach_reset=False, surrogate=ATan())
    s.backward(g)
    # reference: the same recursion unrolled with autograd from v0r
    v, outs = v0r, []
    for t in range(3):
        h = v + (x[t] - v) / 2.0
        sp = _RefSpike.apply(h, 1.0, ATan())
        v = h * (1.0 - sp)
        outs.append(sp)
    torch.stack(outs).backward(g)
    assert torch.allclose(v0.grad, v0r.grad, atol=1e-12)
    assert v0.grad.abs().sum() > 0


# =========================================================================== step modes / state
@pytest.mark.parametrize("backend", ["fused", "sinabs"])
@pytest.mark.parametrize("v_reset,detach", RESETS, ids=RESET_IDS)
@pytest.mark.parametrize("kind", ["lif", "if"])
def test_multistep_equals_single_step(kind, v_reset, detach, backend):
    x, g = rand_input(seed=12), rand_grad(seed=13)
    kw = dict(v_reset=v_reset, detach_reset=detach, surrogate=ATan(), backend=backend)

    xm = x.clone().requires_grad_(True)
    nm = make(kind, **kw)
    s_m = nm(xm)
    s_m.backward(g)

    # step_mode 's' module calls
    xs = x.clone().requires_grad_(True)
    ns = make(kind, step_mode="s", **kw)
    s_s = torch.stack([ns(xs[t]) for t in range(x.shape[0])])
    s_s.backward(g)

    # explicit single_step calls on a multi-step module
    xe = x.clone().requires_grad_(True)
    ne = make(kind, **kw)
    s_e = torch.stack([ne.single_step(xe[t]) for t in range(x.shape[0])])
    s_e.backward(g)

    assert_some_spikes(s_m)
    for s, n, xx in ((s_s, ns, xs), (s_e, ne, xe)):
        assert torch.equal(s_m, s)
        assert torch.allclose(membrane(nm), membrane(n), atol=1e-6)
        assert torch.allclose(xm.grad, xx.grad, atol=1e-6)


def test_set_step_mode_and_reset_net():
    net = torch.nn.Sequential(torch.nn.Linear(7, 7), LIF(), torch.nn.Linear(7, 7), IF())
    set_step_mode(net, "s")
    assert [m.step_mode for m in net if isinstance(m, LIF)] == ["s", "s"]
    x = rand_input(seed=14)
    with torch.no_grad():
        out_s = torch.stack([net(x[t]) for t in range(4)])
        reset_net(net)
        assert all(m.v is None for m in net if isinstance(m, LIF))
        set_step_mode(net, "m")
        out_m = net(x)
    assert torch.equal(out_s, out_m)
    with pytest.raises(ConfigError, match="step_mode"):
        set_step_mode(net, "multi")


@pytest.mark.parametrize("backend", ["fused", "sinabs"])
def test_reset_repeats_and_state_carries(backend):
    x = rand_input(seed=15)
    n = LIF(backend=backend, v_reset=None)
    with torch.no_grad():
        s1 = n(x)
        v1 = membrane(n).clone()
        s_carry = n(x)  # no reset: continues from v1
        n.reset()
        s2 = n(x)
        v2 = membrane(n).clone()
        # one long sequence = the two calls without reset
        n.reset()
        s_long = n(torch.cat([x, x]))
    assert torch.equal(s1, s2) and torch.equal(v1, v2)
    assert torch.equal(s_long[:4], s1) and torch.equal(s_long[4:], s_carry)
    assert not torch.equal(s_carry, s1)  # state really carried over


@pytest.mark.parametrize("backend", ["fused", "sinabs"])
def test_reset_between_samples_with_grad(backend):
    """Training loop pattern: forward, backward, reset, forward again (different batch size)."""
    n = LIF(backend=backend, detach_reset=False)
    for seed, b in ((16, 3), (17, 2)):
        x = rand_input(seed=seed, shape=(4, b, 5)).requires_grad_(True)
        n.reset()
        n(x).sum().backward()
        ref = LIF(detach_reset=False)
        xr = x.detach().clone().requires_grad_(True)
        ref(xr).sum().backward()
        assert torch.allclose(x.grad, xr.grad, atol=1e-6)


@pytest.mark.parametrize("backend", ["fused", "sinabs"])
def test_single_step_active_mask(backend):
    x = rand_input(seed=18, shape=(3, 4, 6))
    active = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    n = LIF(backend=backend, v_reset=None)
    ref = LIF(backend=backend, v_reset=None)
    with torch.no_grad():
        # first step with a mask: no prior state, inactive membrane stays at rest (0)
        s0 = n.single_step(x[0], active)
        ref.single_step(x[0])
        assert torch.all(s0[~active] == 0)
        assert torch.all(membrane(n)[~active] == 0)
        n.single_step(x[1])
        v_before = membrane(n).clone()
        s = n.single_step(x[2] * 0 + 5.0, active)  # strong input: every active element fires
        v_after = membrane(n)
    assert torch.all(s[~active] == 0)
    assert torch.all(s[active] == 1)
    assert torch.equal(v_after[~active], v_before[~active])
    assert not torch.equal(v_after[active], v_before[active])
    # broadcastable mask over a trailing feature dim
    n2 = LIF(backend=backend)
    x3 = torch.full((2, 3, 5), 4.0)
    row_active = torch.tensor([[True], [False]])  # [B, 1] -> broadcasts over [B, N, D]
    s3 = n2.single_step(x3, row_active.unsqueeze(-1))
    assert torch.all(s3[0] == 1) and torch.all(s3[1] == 0)
    assert torch.all(membrane(n2)[1] == 0)


def test_single_step_active_mask_matches_unmasked_on_active():
    x = rand_input(seed=19, shape=(4, 4, 6))
    active = torch.ones(4, 6, dtype=torch.bool)
    active[1] = False
    a, b = LIF(), LIF()
    for t in range(4):
        sa = a.single_step(x[t], active)
        sb = b.single_step(x[t])
        assert torch.equal(sa[active], sb[active])
    assert torch.equal(a.v[0], b.v[0]) and torch.all(a.v[1] == 0)


# =========================================================================== bad values
class TestBadValues:
    @pytest.mark.parametrize("tau", [1.0, 0.5, 0.0, -2.0, float("nan")])
    def test_bad_tau(self, tau):
        with pytest.raises(ConfigError, match=r"tau must be > 1.*got"):
            LIF(tau)

    @pytest.mark.parametrize("th", [0.0, -1.0, float("nan")])
    def test_bad_threshold(self, th):
        with pytest.raises(ConfigError, match=r"v_threshold must be > 0.*got"):
            LIF(v_threshold=th)
        with pytest.raises(ConfigError, match="v_threshold"):
            IF(v_threshold=th)

    def test_bad_backend(self):
        with pytest.raises(ConfigError, match=r"backend must be one of fused, sinabs; got 'cuda'"):
            LIF(backend="cuda")

    def test_bad_step_mode(self):
        with pytest.raises(ConfigError, match=r"step_mode must be one of s, m; got 'x'"):
            LIF(step_mode="x")
        n = LIF()
        with pytest.raises(ConfigError, match="step_mode"):
            n.step_mode = "multi"
        assert n.step_mode == "m"

    def test_bad_surrogate_name(self):
        with pytest.raises(ConfigError, match=r"surrogate must be one of sigmoid, atan; got 'relu'"):
            make_surrogate("relu")
        assert issubclass(ConfigError, StasError) and issubclass(ConfigError, ValueError)

    def test_surrogate_string_in_module(self):
        with pytest.raises(ConfigError, match="surrogate must be one of"):
            LIF(surrogate="nope")
        assert LIF(surrogate="atan").surrogate == ATan()
        with pytest.raises(ConfigError, match="callable"):
            LIF(surrogate=3.0)
