"""The single-pass CPU kernels give the PyTorch-op forms' results, and fall back cleanly."""
import logging

import pytest
import torch

from convert.ops import (Compensated, HeldRows, KernelLayerNorm, MultiThresholdNeuron,
                         compensated_update, gelu_fn, integrate_and_fire, softmax_fn)
from stas_core import kernels
from stas_core.neurons import ATan, Sigmoid, lif_multistep

from helpers import missing


@pytest.fixture
def ext():
    module = kernels.load()
    if module is None:
        missing(f"the C++ kernels did not build: {kernels._state['why']}")
    return module


def _hard_inputs(dtype):
    """Membranes and inputs with the structural cases: zeros of both signs, exact level
    boundaries (1.5, 0.75 x 2^-k), whole-spike bursts, values under the smallest level."""
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(257, 33, generator=g) * 3).to(dtype)
    x = (torch.randn(257, 33, generator=g) * 2).to(dtype)
    special = torch.tensor([0.0, -0.0, 1.5, -1.5, 0.75, 0.375, 5.2, -9.9, 1e-9, 3 * 2.0 ** -8],
                           dtype=dtype)
    x[0, :len(special)] = special
    v[0, :len(special)] = 0
    return v, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_threshold_kernel_is_bitwise_the_reference(ext, dtype):
    v, x = _hard_inputs(dtype)
    theta = torch.tensor(0.7)  # the neuron's buffer is float32; .to(dtype) is exact
    smallest = 2.0 ** -7
    s_ref, v_ref = integrate_and_fire(v, x, theta.to(dtype), smallest)
    s, v_new = ext.multi_threshold_fire(v, x, float(theta), smallest)
    assert torch.equal(s, s_ref) and torch.equal(v_new, v_ref)
    assert (s_ref.abs() > 1.5 * 0.7).any() and (s_ref == 0).any()  # bursts and silence
    s0, v0 = ext.multi_threshold_fire(None, x, float(theta), smallest)  # at rest
    s0_ref, v0_ref = integrate_and_fire(torch.zeros_like(x), x, theta.to(dtype), smallest)
    assert torch.equal(s0, s0_ref) and torch.equal(v0, v0_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_threshold_kernel_reads_views_where_they_lie(ext, dtype):
    """Chunks of Q/K/V, their heads and a strided slice are read without a copy and give
    the contiguous input's spikes and membranes (as contiguous tensors)."""
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(3, 7, 3 * 12, generator=g) * 2).to(dtype)
    views = [qkv.chunk(3, -1)[1], qkv.chunk(3, -1)[2].unflatten(-1, (3, -1)).transpose(-3, -2),
             qkv[:, ::2], qkv.transpose(0, 1)]
    for x in views:
        assert not x.is_contiguous()
        v = torch.randn(x.shape, generator=g).to(dtype)
        s, v_new = ext.multi_threshold_fire(v, x, 0.7, 2.0 ** -7)
        s_ref, v_ref = ext.multi_threshold_fire(v, x.contiguous(), 0.7, 2.0 ** -7)
        assert torch.equal(s, s_ref) and torch.equal(v_new, v_ref)
        assert s.is_contiguous() and v_new.is_contiguous() and s.abs().sum() > 0


def test_multi_threshold_membrane_is_updated_in_place_and_stays_exact(ext, monkeypatch):
    """Unmasked steps write the membrane over itself (one tensor); masked steps, which read
    the old one, make a new one; either way the values are the PyTorch-op form's."""
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(3, 5, 8, generator=g) * 2 for _ in range(6)]
    masks = [None, None, torch.rand(3, 5, 1, generator=g) > 0.3, None, None, None]
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("STAS_KERNELS", flag)
        n, ptrs = MultiThresholdNeuron(levels=4, threshold=0.9), []
        runs.append([n.step(x, m).clone() for x, m in zip(xs, masks)] + [n.v.clone()])
        ptrs.append(n.v.data_ptr())
        n.step(xs[0])
        ptrs.append(n.v.data_ptr())
        if flag == "1":
            assert ptrs[0] == ptrs[1]  # the same membrane, written over
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_kernel_gelu_is_within_rounding_of_torch(ext):
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(100_003, generator=g) * 4, torch.tensor([0.0, -0.0, 10.0, -10.0])])
    ref = torch.nn.functional.gelu(x.double())
    y = ext.gelu_erf(x)
    assert (y.double() - ref).abs().max() <= 4e-6 * ref.abs().clamp(min=1).max()
    assert torch.equal(ext.gelu_erf(x[5:17]), y[5:17])  # tails: the same vector code
    # the rational erf, on a fine grid: worst absolute error 1.0e-6 (near x = -5.6, where
    # 1 + erf cancels; torch's float32 GELU: 4.7e-7); a wrong coefficient gives far more
    grid = torch.linspace(-12, 12, 400_001)
    err = (ext.gelu_erf(grid).double() - torch.nn.functional.gelu(grid.double())).abs()
    assert err.max() <= 1.5e-6
    assert (err / grid.double().abs().clamp(min=1)).max() <= 1e-6


def _compensated_fn(kind):
    """The converted model's GELU, LayerNorm (random affine) or softmax, and its kernel call."""
    if kind == "gelu":
        return gelu_fn(), lambda ext, *a: ext.compensated_gelu(*a)
    if kind == "softmax":
        fn = softmax_fn(0.3)
    else:
        norm = torch.nn.LayerNorm(40)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
        fn = KernelLayerNorm.of(norm).requires_grad_(False)  # as in SpikingViT
    return fn, lambda ext, *a: ext.compensated_rows(*a, *fn.row_kernel(a[1]))


def _compensated_steps(fn, kind, xs, rows_at=None):
    """Steps of a compensation (dense, or rows with compaction where ``rows_at`` says)."""
    comp = Compensated(fn, kind)
    outs, at_return = [], []
    for t, x in enumerate(xs):
        if rows_at is None:
            outs.append(comp.step(x))
        else:
            held = HeldRows([comp]) if t == 0 else held
            rows = held.update(rows_at[t])
            outs.append(comp.step(x.reshape(-1, x.shape[-1]).index_select(0, rows.index), rows))
        at_return.append(outs[-1].clone())
    assert all(torch.equal(a, b) for a, b in zip(outs, at_return))  # nothing overwritten
    return outs, comp


@pytest.mark.parametrize("kind", ["gelu", "layernorm", "softmax"])
def test_compensated_kernels_are_the_ops_form_bit_for_bit(ext, monkeypatch, kind):
    """The one-pass step equals compensated_update with the same function: dense (a step
    count) and as rows (a count per row, rows that leave), and updating its sums in place
    never changes an output already returned."""
    fn, kernel_step = _compensated_fn(kind)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 6, 40, generator=g) * 2 for _ in range(5)]
    active = [torch.ones(4, 6, dtype=torch.bool)] + [torch.rand(4, 6, generator=g) > 0.2] * 4
    active[3] = active[3] & (torch.rand(4, 6, generator=g) > 0.4)  # the set only shrinks
    active[4] = active[3]
    inputs = [x.clone() for x in xs]
    name = "compensated_gelu" if kind == "gelu" else "compensated_rows"
    real = getattr(ext, name)
    for rows_at in (None, active):
        calls = []
        monkeypatch.setattr(ext, name, lambda *a: calls.append(1) or real(*a))
        kernel, comp = _compensated_steps(fn, kind, xs, rows_at)
        monkeypatch.undo()
        assert len(calls) == len(xs) - (rows_at is None), "the kernel route was not taken"
        assert all(torch.equal(a, b) for a, b in zip(xs, inputs))
        monkeypatch.setattr(Compensated, "_kernel_update", lambda self, x, count: None)
        ops, comp_ops = _compensated_steps(fn, kind, xs, rows_at)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(kernel, ops))
        assert torch.equal(comp.total, comp_ops.total) and torch.equal(comp.emitted, comp_ops.emitted)
    # the rows run's counts differ per row: a row that joined late has a smaller one
    count = torch.tensor([[1.0], [3.0]])
    x = torch.randn(2, 40, generator=g)
    total, emitted = torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)
    t_ref, e_ref, o_ref = compensated_update(fn, total, x, count, emitted)
    t_k, e_k, o_k = kernel_step(ext, total.clone(), x, emitted.clone(), count, True)
    assert torch.equal(o_k, o_ref) and torch.equal(t_k, t_ref) and torch.equal(e_k, e_ref)


def test_kernel_layer_norm_and_softmax_are_within_rounding_of_torch(ext):
    """The row functions agree with torch's within float32 rounding, on every row length
    (whole vectors and tails), with and without affine parameters; with autograd (the
    parameters need their gradient) the LayerNorm is torch's."""
    g = torch.Generator().manual_seed(6)
    for width in (1, 7, 16, 40, 192):
        x = torch.randn(33, width, generator=g) * 3 + 1
        for affine in (True, False):
            norm = torch.nn.LayerNorm(width, elementwise_affine=affine)
            if affine:
                with torch.no_grad():
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.uniform_(-1, 1)
            with torch.no_grad():
                torch.testing.assert_close(KernelLayerNorm.of(norm)(x), norm(x),
                                           rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(softmax_fn(0.125)(x), torch.softmax(x * 0.125, -1),
                                       rtol=1e-6, atol=1e-7)
    norm = KernelLayerNorm(40)
    x = torch.randn(5, 40, generator=g)
    assert torch.equal(norm(x), torch.nn.functional.layer_norm(x, (40,), norm.weight, norm.bias))
    with torch.no_grad(), pytest.raises(RuntimeError):  # rows of another width: torch's error
        KernelLayerNorm(40, elementwise_affine=False)(torch.randn(3, 41, generator=g))
    with pytest.raises(RuntimeError, match="count"):  # empty rows: an error, not a crash
        ext.compensated_rows(None, torch.zeros(2, 0), None, torch.ones(1), False, 1, None,
                             None, 1.0)


def test_neuron_steps_the_same_with_and_without_the_kernel(ext, monkeypatch):
    torch.manual_seed(1)
    xs = [torch.randn(3, 5, 8) for _ in range(4)]
    active = torch.rand(3, 5, 1) > 0.3
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("STAS_KERNELS", flag)
        n = MultiThresholdNeuron(levels=4, threshold=0.9)
        runs.append([n.step(x, active) for x in xs] + [n.v])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("tau, v_reset, detach, surrogate", [
    (2.0, 0.0, True, Sigmoid()), (2.0, None, False, ATan()),
    (None, 0.0, False, Sigmoid(2.0)), (3.0, -0.5, False, Sigmoid())])
def test_lif_kernel_equals_the_torch_op_form(ext, monkeypatch, tau, v_reset, detach, surrogate):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 37, generator=g) * 2
    v0 = torch.randn(6, 37, generator=g)
    w = torch.randn(4, 6, 37, generator=g)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("STAS_KERNELS", flag)
        xi, vi = x.clone().requires_grad_(), v0.clone().requires_grad_()
        s, v = lif_multistep(xi, vi, tau=tau, v_reset=v_reset, detach_reset=detach,
                             surrogate=surrogate)
        ((s * w).sum() + v.square().sum()).backward()
        out[flag] = (s, v, xi.grad, vi.grad)
    (s1, v1, gx1, gv1), (s0, v0_, gx0, gv0) = out["1"], out["0"]
    assert torch.equal(s1, s0) and 0.05 < float(s1.detach().mean()) < 0.95
    assert torch.allclose(v1, v0_, atol=1e-5)
    assert torch.allclose(gx1, gx0, atol=1e-5) and torch.allclose(gv1, gv0, atol=1e-5)


def test_lif_kernel_on_a_channels_last_input_over_many_tiles(ext, monkeypatch):
    """A channels-last activation runs on its memory order (no copy) and gives the
    contiguous run's spikes, state and gradients; 3 x 4 x 5 x 29 x 31 elements a step span
    several parallel chunks and tiles. Only the last state feeds the loss here, so the
    spikes' gradient is None in the backward."""
    from stas_core.neurons import memory_order

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 29, 31, 5, generator=g).permute(0, 1, 4, 2, 3) * 2  # [T, B, C, H, W]
    assert not x.is_contiguous() and memory_order(x) == [0, 1, 3, 4, 2]
    assert memory_order(x.contiguous()) is None and memory_order(x.transpose(0, 1)) is None
    w = torch.randn(3, 4, 5, 29, 31, generator=g)
    out = {}
    for flag, src in (("1", x), ("1c", x.contiguous()), ("0", x.contiguous())):
        monkeypatch.setenv("STAS_KERNELS", flag[0])
        for loss in ("spikes", "state"):
            xi = src.detach().clone().requires_grad_()  # clone keeps the layout
            s, v = lif_multistep(xi, tau=2.0, v_reset=None, detach_reset=False)
            (((s * w).sum() + v.square().sum()) if loss == "spikes" else v.square().sum()).backward()
            out[flag, loss] = (s, v, xi.grad)
    for loss in ("spikes", "state"):
        (s1, v1, g1), (sc, vc, gc), (s0, v0, g0) = (out[f, loss] for f in ("1", "1c", "0"))
        assert s1.stride() == x.stride()  # the output keeps the input's layout
        assert torch.equal(s1, sc) and torch.equal(v1, vc) and torch.equal(g1, gc)
        assert torch.equal(s1, s0) and torch.allclose(v1, v0, atol=1e-5)
        assert torch.allclose(g1, g0, atol=1e-5) and float(g1.abs().sum()) > 0
    monkeypatch.setenv("STAS_KERNELS", "1")  # state carried between calls in that layout
    s_a, v_a = lif_multistep(x[:2], tau=2.0, v_reset=None)
    s_b, v_b = lif_multistep(x[2:], v_a, tau=2.0, v_reset=None)
    assert torch.equal(torch.cat([s_a, s_b]), out["1", "spikes"][0])
    assert torch.equal(v_b, out["1", "spikes"][1])


def test_kernels_off_or_unbuildable_fall_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("STAS_KERNELS", "0")
    assert kernels.load() is None and not kernels.usable(torch.ones(2))
    monkeypatch.setenv("STAS_KERNELS", "1")
    monkeypatch.setattr(kernels, "_state", {"module": None, "tried": False, "why": None})

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'stas_kernels'\nno c++ compiler")

    import torch.utils.cpp_extension as cpp
    monkeypatch.setattr(cpp, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="stas_core.kernels"):
        assert kernels.load() is None and kernels.load() is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no c++ compiler" in warnings[0].getMessage()
    n = MultiThresholdNeuron(levels=3)  # the PyTorch ops still run
    assert n.step(torch.full((2, 2), 1.0)).eq(1.0).all()


def test_kernels_refuse_what_they_cannot_run(ext):
    x = torch.ones(3, requires_grad=True)
    assert not kernels.usable(x)                       # no autograd form
    assert kernels.usable(x, autograd=True)
    assert not kernels.usable(torch.ones(3, dtype=torch.float16))
    assert not kernels.usable(torch.ones(3, dtype=torch.float64), dtypes=(torch.float32,))


def test_malloc_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    monkeypatch.setenv("STAS_MALLOC_TUNE", "0")
    assert kernels.keep_freed_memory() is False
    monkeypatch.setenv("STAS_MALLOC_TUNE", "1")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert kernels.keep_freed_memory() is True


def _two_module_run(neuron, bn, x, channel_dim):
    """The reference: the BatchNorm module, then the neuron."""
    if channel_dim == -1:
        return neuron.multi_step(bn(x))
    return neuron.multi_step(bn(x.flatten(0, 1)).unflatten(0, x.shape[:2]))


@pytest.mark.parametrize("kind, tau, v_reset, detach, surrogate, momentum, carried", [
    ("tokens", 2.0, 0.0, True, Sigmoid(), 0.1, False),
    ("images", 2.0, None, False, ATan(), None, True),
    ("tokens", None, 0.0, False, Sigmoid(2.0), None, True),
    ("images", 3.0, -0.5, False, Sigmoid(), 0.3, False)])
def test_batchnorm_folded_into_the_lif_kernel_is_the_two_modules(
        ext, kind, tau, v_reset, detach, surrogate, momentum, carried):
    """bn_fire (BatchNorm inside the LIF kernel) against BatchNorm then LIF: the same
    spikes, running statistics and num_batches_tracked; gradients of the input, weight and
    bias within rounding; in training (two batches, the second from a carried membrane)
    and in evaluation. Images are channels-last [T, B, C, H, W] (the patch-splitting
    layout), tokens [T, B, N, C]; 12 x 5 x 9 x 11 elements a step span several tiles."""
    from torch import nn

    from stas_core.layers import TokenBN, bn_fire
    from stas_core.neurons import LIF

    g = torch.Generator().manual_seed(5)
    if kind == "tokens":
        shape, channel_dim, make = (3, 4, 45, 24), -1, lambda: TokenBN(24, momentum=momentum)
    else:
        shape, channel_dim, make = (3, 4, 12, 9, 11), 2, lambda: nn.BatchNorm2d(12, momentum=momentum)
    bns = [make(), make()]
    with torch.no_grad():
        bns[0].weight.copy_(torch.rand(bns[0].num_features, generator=g) + 0.5)
        bns[0].bias.copy_(torch.randn(bns[0].num_features, generator=g) * 0.3)
    bns[1].load_state_dict(bns[0].state_dict())
    lifs = [LIF(tau, v_threshold=0.5, v_reset=v_reset, detach_reset=detach, surrogate=surrogate)
            for _ in bns]
    batches = []
    for _ in range(2):
        x = torch.randn(*shape, generator=g) * 1.7 + 0.4
        if kind == "images":
            x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, shape[:2])
        batches.append((x, torch.randn(*shape, generator=g)))
    for step, (x, w) in enumerate(batches):
        if step and not carried:
            for n in lifs:
                n.reset()
        xs = [x.clone().requires_grad_() for _ in bns]  # clone keeps the layout
        s_fused = bn_fire(lifs[0], bns[0], xs[0], channel_dim)
        s_ref = _two_module_run(lifs[1], bns[1], xs[1], channel_dim)
        assert torch.equal(s_fused, s_ref) and 0.01 < float(s_ref.detach().mean()) < 0.95
        assert s_fused.stride() == s_ref.stride()
        assert torch.allclose(lifs[0].v, lifs[1].v, atol=1e-5)
        for s, n in zip((s_fused, s_ref), lifs):
            ((s * w).sum() + n.v.square().sum()).backward()
            n.v = n.v.detach()
        for a, b in ((xs[0].grad, xs[1].grad), (bns[0].weight.grad, bns[1].weight.grad),
                     (bns[0].bias.grad, bns[1].bias.grad)):
            assert float(b.abs().max()) > 0
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
        for n in bns:
            n.weight.grad = n.bias.grad = None
        assert torch.allclose(bns[0].running_mean, bns[1].running_mean, atol=1e-6)
        assert torch.allclose(bns[0].running_var, bns[1].running_var, rtol=1e-5)
        assert int(bns[0].num_batches_tracked) == int(bns[1].num_batches_tracked) == step + 1
    for n, lif in zip(bns, lifs):
        n.eval(), lif.reset()
    with torch.no_grad():
        x = batches[0][0]
        assert torch.equal(bn_fire(lifs[0], bns[0], x, channel_dim),
                           _two_module_run(lifs[1], bns[1], x, channel_dim))
    assert int(bns[0].num_batches_tracked) == 2  # evaluation leaves the statistics alone


def test_a_vanilla_spikformer_trains_the_same_with_the_batchnorm_folded(ext, monkeypatch):
    """A training step of a vanilla-SPS Spikformer through the folded BatchNorms (every BN
    that feeds a LIF: patch splitting and blocks) gives the two-module step's loss and
    gradients within rounding, and its running statistics."""
    from stas_core import neurons
    from stas_core.models import create_model

    folded = []
    original = neurons._KernelBNNeuronFn.apply
    monkeypatch.setattr(neurons._KernelBNNeuronFn, "apply",
                        lambda *a: folded.append(1) or original(*a))
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    runs = []
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(neurons.LIF, "multi_step_bn", lambda self, *a: None)
        torch.manual_seed(0)
        model = create_model("spikformer-2-64", img_size=28, in_chans=1, num_classes=10,
                             timesteps=2, sps="vanilla")
        loss = model(x).logsumexp(-1).sum()
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                     {n: b for n, b in model.named_buffers() if "running" in n}))
        if fold:
            n_folded = len(folded)
    (l1, g1, b1), (l0, g0, b0) = runs
    assert n_folded == 5 + 2 * 6 and len(folded) == n_folded  # 5 in SPS, 6 per block
    assert torch.allclose(l1, l0, rtol=1e-5)
    for name in g0:
        scale = float(g0[name].abs().max()) or 1.0
        assert float((g1[name] - g0[name]).abs().max()) <= 1e-4 * scale, name
    assert all(torch.allclose(b1[n], b0[n], rtol=1e-5, atol=1e-6) for n in b0)


def test_cross_process_and_hooked_batchnorms_are_not_folded():
    """A synchronised BatchNorm computes its statistics across processes, and a hooked one
    expects its forward to run: both stay modules."""
    from torch import nn

    from stas_core.distributed import SyncBatchNorm2d, SyncTokenBN
    from stas_core.layers import TokenBN, _foldable

    assert _foldable(TokenBN(4)) and _foldable(nn.BatchNorm2d(4))
    assert not _foldable(SyncTokenBN(4)) and not _foldable(SyncBatchNorm2d(4))
    assert not _foldable(nn.BatchNorm2d(4, affine=False))
    hooked = TokenBN(4)
    hooked.register_forward_hook(lambda *a: None)
    assert not _foldable(hooked)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((6, 5, 9, 11), 3, 2, 1),            # SPS's pool, odd sizes: clipped windows at both ends
    ((4, 3, 8, 8), 2, 2, 0),
    ((3, 7, 10, 9), (3, 2), (1, 2), (1, 0)),  # non-square, overlapping rows
])
def test_kernel_max_pool_is_atens_bit_for_bit(ext, monkeypatch, shape, kernel, stride, padding):
    """Spikes make ties the rule: the kernel's maxima, the element each window sends its
    gradient to (the first maximum in row-major order; NaN wins) and the gradient sums are
    ATen's exactly, with and without autograd."""
    from stas_core import layers

    calls = []
    real = layers._MaxPoolFn.apply
    monkeypatch.setattr(layers._MaxPoolFn, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    x = (torch.rand(*shape) > 0.6).float()
    x[0, 0, 0, 0] = float("nan")
    x[2, 0, 1, 2] = float("nan")             # after a window's maximum: NaN still wins
    x[1, 1] = -float("inf")                  # a whole channel at -inf: first valid element
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    pool = layers.MaxPool2d(kernel, stride, padding)
    y = pool(x)
    want = torch.nn.functional.max_pool2d(ref, kernel, stride, padding)
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    assert calls, "the kernel route was not taken"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.nan_to_num(), want.nan_to_num())
    assert torch.equal(x.grad, ref.grad)
    with torch.no_grad():
        assert torch.equal(pool(x).nan_to_num(), want.nan_to_num())


def test_kernel_max_pool_leaves_other_layouts_and_options_to_aten(ext, monkeypatch):
    from stas_core import layers

    def refuse(*args):
        raise AssertionError("the kernel must not run here")

    monkeypatch.setattr(layers._MaxPoolFn, "apply", refuse)
    monkeypatch.setattr(ext, "max_pool_forward", refuse, raising=False)
    x = torch.rand(2, 3, 9, 9, requires_grad=True)           # contiguous NCHW
    for pool in (layers.MaxPool2d(3, 2, 1), layers.MaxPool2d(3, 2, 1, ceil_mode=True)):
        torch.testing.assert_close(pool(x), torch.nn.functional.max_pool2d(
            x, 3, 2, 1, ceil_mode=pool.ceil_mode))
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="too small"):  # smaller than the window: ATen's error
        layers.MaxPool2d(3, 2)(cl[:, :, :2])
    y, idx = layers.MaxPool2d(3, 2, 1, return_indices=True)(cl)
    assert torch.equal(idx, torch.nn.functional.max_pool2d(cl, 3, 2, 1, return_indices=True)[1])
