"""float64 ONNX pieces: erf from onnxruntime's double ops, patch convolutions as matmuls,
constants kept in float64, and float64 spiking ops equal to float32 ones where both are
exact."""
import math

import pytest
import torch
from torch import nn

from convert.ops import MultiThresholdNeuron, _pow2_levels, gelu_fn, softmax_fn
from halting.numeric import exact
from stas_core.errors import StasError
from stas_core.onnx_float64 import (PatchConv, TwoPassLayerNorm, erf_float64, gelu_float64,
                                    to_float64)


def test_erf_float64_matches_libm_to_the_last_bits():
    x = torch.cat([torch.linspace(-7, 7, 14001, dtype=torch.float64),
                   torch.arange(-6.0, 6.01, 0.25, dtype=torch.float64),  # piece edges
                   torch.tensor([0.0, -0.0, 1e-300, 5.9999999, 6.0, 40.0, -40.0],
                                dtype=torch.float64)])
    ref = torch.tensor([math.erf(v) for v in x.tolist()], dtype=torch.float64)
    assert (erf_float64(x) - ref).abs().max() <= 4 * torch.finfo(torch.float64).eps
    # hand values: erf(0.5) and erf(-2) to 16 digits
    assert erf_float64(torch.tensor([0.5, -2.0], dtype=torch.float64)).tolist() == \
        pytest.approx([0.5204998778130465, -0.9953222650189527], abs=2e-16)


def test_gelu_float64_equals_torch_gelu():
    x = torch.randn(10000, dtype=torch.float64) * 4
    eps = torch.finfo(torch.float64).eps  # a few ulp of the larger of |x| and 1
    assert ((gelu_float64(x) - torch.nn.functional.gelu(x)).abs()
            <= 4 * eps * x.abs().clamp(min=1)).all()
    assert gelu_fn()(x).equal(torch.nn.functional.gelu(x))  # eager path stays torch's


def test_patch_conv_equals_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(PatchConv(conv)(x), conv(x), atol=1e-5)


def test_to_float64_copies_and_rewrites_patch_convolutions_only():
    model = nn.Sequential(nn.Conv2d(1, 4, 7, 7), nn.Flatten())
    double = to_float64(model)
    assert isinstance(double[0], PatchConv) and double[0].weight.dtype == torch.float64
    assert isinstance(model[0], nn.Conv2d) and model[0].weight.dtype == torch.float32
    with pytest.raises(StasError, match=r"convolution '0' \(kernel \(3, 3\), stride \(1, 1\)"):
        to_float64(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)))


def test_pow2_levels_agree_between_float32_and_float64():
    a = torch.cat([torch.rand(100000) * 8, torch.tensor([0.0, 0.75, 1.5, 3.0, 1.0, 1e-30])])
    assert _pow2_levels(a.double()).equal(_pow2_levels(a).double())
    assert _pow2_levels(torch.zeros(3, dtype=torch.float64)).equal(torch.zeros(3).double())


def test_multi_threshold_neuron_in_float64_spikes_as_in_float32():
    torch.manual_seed(0)
    xs = (torch.randn(6, 4, 50) * 32).round() / 64  # multiples of 1/64: exact in both
    n32, n64 = MultiThresholdNeuron(levels=4, threshold=1.0), MultiThresholdNeuron(4, 1.0)
    n64.double()
    for x in xs:
        assert n64.step(x.double()).equal(n32.step(x).double())


def test_exact_keeps_float64_constants_and_leaves_float32_alone():
    x64, x32 = torch.ones(2, dtype=torch.float64), torch.ones(2)
    assert exact(0.21, x32) == 0.21
    const = exact(0.21, x64)
    assert const.dtype == torch.float64 and float(const) == 0.21


def test_float64_pieces_in_onnxruntime_match_torch_to_the_last_bits(tmp_path):
    """LayerNorm (eps 1e-6: a float32 attribute in ONNX's own op), GELU and a scaled softmax
    of a float64 graph, against PyTorch's float64 kernels."""
    import onnxruntime as ort

    norm = TwoPassLayerNorm(nn.LayerNorm(48, eps=1e-6)).double()
    softmax = softmax_fn(0.1234567)

    class Pieces(nn.Module):
        def forward(self, x):
            return norm(x), gelu_float64(x), softmax(x)

    torch.manual_seed(0)
    x = torch.randn(4, 9, 48, dtype=torch.float64) * 3
    path = tmp_path / "pieces.onnx"
    torch.onnx.export(Pieces().eval(), (x,), str(path), opset_version=18, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    ref = [nn.functional.layer_norm(x, (48,), eps=1e-6), nn.functional.gelu(x),
           torch.softmax(x * 0.1234567, -1)]
    for g, r in zip(got, ref):
        assert abs(g - r.numpy()).max() <= 1e-14 * abs(r.numpy()).max()


def test_float64_neuron_decides_structural_ties_by_the_rounding_rule():
    """A membrane a few ulp under the level boundary 1.5 * 2^-6 theta (what summing
    per-step increments back to an exact value leaves) fires as the exact boundary does:
    2^-5 theta; one clearly under it fires 2^-6 theta."""
    theta = 2.1439759731292725
    neuron = MultiThresholdNeuron(levels=8, threshold=theta).double()
    boundary = 1.5 * 2.0 ** -6 * theta
    x = torch.tensor([boundary, boundary * (1 - 8e-16), boundary * (1 + 8e-16),
                      boundary * (1 - 1e-9), -boundary * (1 - 8e-16)], dtype=torch.float64)
    s = neuron.step(x) / theta
    assert s.tolist() == [2.0 ** -5, 2.0 ** -5, 2.0 ** -5, 2.0 ** -6, -(2.0 ** -5)]
