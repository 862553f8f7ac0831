"""float64 ONNX graphs: what onnxruntime's CPU kernels lack in double, in ops they have.

Why float64 at all: a converted ViT's multi-threshold neurons pick a spike level from the
membrane, so a last-bit difference between two float32 kernels (onnxruntime's LayerNorm,
softmax, GEMM vs PyTorch's) flips an occasional spike, and the flips add up over blocks
and timesteps. In float32 the logits of such a model are only defined to about 0.1 (PyTorch
float32 against the same model in float64 differs by that much); in float64 the same
flips need a 1e-16 coincidence, and two runtimes agree to ~1e-12.

onnxruntime's CPU provider has no float64 ``Conv`` or ``Erf``, and ONNX's
``LayerNormalization`` holds its epsilon as a float32 attribute (1e-6 becomes
0.99999999747e-6: a 1e-13 shift that still flips spikes in a few images out of a hundred).
:func:`to_float64` swaps patch convolutions (kernel == stride, no padding: a ViT's patch
embedding) for a reshape and a matmul and LayerNorms for a two-pass form with a float64
epsilon, and :func:`erf_float64` evaluates erf to double precision with ops it has.
Python-float constants go through :func:`halting.numeric.exact` for the same reason.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from halting.numeric import exact

from .errors import StasError

# erf on [0, 6) as Taylor polynomials about the centres of 24 intervals of width 1/4
# (degree 14: truncation error below 1e-18); erf(x) rounds to 1.0 in double for x >= 6
_WIDTH, _PIECES, _DEGREE = 0.25, 24, 14


def _erf_taylor_table() -> Tensor:
    """``table[k, i]``: i-th Taylor coefficient of erf about ``(k + 1/2) * _WIDTH``.

    Derivatives of erf are Hermite polynomials times a Gaussian:
    ``erf^(n+1)(c) = 2/sqrt(pi) (-1)^n H_n(c) exp(-c^2)``.
    """
    rows = []
    for k in range(_PIECES):
        c = (k + 0.5) * _WIDTH
        gauss = 2.0 / math.sqrt(math.pi) * math.exp(-c * c)
        h_prev, h = 0.0, 1.0  # H_{-1} (unused), H_0
        row = [math.erf(c)]
        for n in range(_DEGREE):  # coefficient n+1 = erf^(n+1)(c) / (n+1)!
            row.append((-1) ** n * h * gauss / math.factorial(n + 1))
            h_prev, h = h, 2.0 * c * h - 2.0 * n * h_prev
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


_TABLE = _erf_taylor_table()


def erf_float64(x: Tensor) -> Tensor:
    """erf(x) in float64 from Gather, Mul, Add and Where (within a few ulp of libm)."""
    a = x.abs()
    k = torch.clamp(torch.floor(a * (1.0 / _WIDTH)), max=_PIECES - 1)
    s = a - (k + 0.5) * _WIDTH
    idx = k.to(torch.int64)
    table = _TABLE.to(x.device)
    p = table[:, _DEGREE][idx]
    for i in range(_DEGREE - 1, -1, -1):
        p = p * s + table[:, i][idx]
    p = torch.where(a >= _PIECES * _WIDTH, torch.ones_like(p), p)
    return torch.where(x < 0, -p, p)


def gelu_float64(x: Tensor) -> Tensor:
    """Exact (erf) GELU through :func:`erf_float64`, as PyTorch computes it."""
    return 0.5 * x * (1.0 + erf_float64(x * exact(math.sqrt(0.5), x)))


class PatchConv(nn.Module):
    """A convolution with kernel == stride and no padding, as reshape + matmul."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.kernel = tuple(conv.kernel_size)
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).t().contiguous(),
                                   requires_grad=False)  # [C*kh*kw, out]
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel
        gh, gw = h // kh, w // kw
        patches = x[:, :, :gh * kh, :gw * kw].reshape(b, c, gh, kh, gw, kw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c * kh * kw)
        y = patches @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.permute(0, 3, 1, 2)  # [B, out, gh, gw], as the convolution gives


class TwoPassLayerNorm(nn.Module):
    """LayerNorm over the last dims as mean, centred second moment and scale, with a
    float64 epsilon: in onnxruntime's float64 primitives, as accurate as PyTorch's kernel."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.dims = tuple(range(-len(norm.normalized_shape), 0))
        self.eps = float(norm.eps)  # exact(): float64 graphs would store it as float32
        self.weight = None if norm.weight is None else nn.Parameter(
            norm.weight.detach().clone(), requires_grad=False)
        self.bias = None if norm.bias is None else nn.Parameter(
            norm.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(self.dims, keepdim=True)
        var = (centred * centred).mean(self.dims, keepdim=True)
        y = centred / torch.sqrt(var + exact(self.eps, var))
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


def _is_patch_conv(conv: nn.Conv2d) -> bool:
    return (tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation)
            and conv.padding_mode == "zeros")


def to_float64(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` that onnxruntime computes as exactly as PyTorch (the
    input model is left alone). Raises :class:`StasError` for a convolution other than a
    patch one."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            _replace(model, name, TwoPassLayerNorm(module))
        elif isinstance(module, nn.Conv2d):
            if not _is_patch_conv(module):
                raise StasError(
                    f"a float64 ONNX graph cannot hold convolution {name!r} (kernel "
                    f"{tuple(module.kernel_size)}, stride {tuple(module.stride)}, padding "
                    f"{tuple(module.padding)}): onnxruntime has no float64 Conv, and only "
                    f"patch convolutions (kernel == stride, no padding) are rewritten. Export "
                    f"this model in float32; direct-trained models reproduce PyTorch there.")
            _replace(model, name, PatchConv(module))
    return model.to(torch.float64)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
