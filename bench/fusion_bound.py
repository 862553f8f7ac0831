"""What fusing a converted ViT's neurons into its matrix products could still save.

    python bench/fusion_bound.py --model MODEL.safetensors [--images 128] [-T 8] [--repeats 15]

Two measurements behind the converted step's cost against an ANN pass:

* ``spike_density``: the fraction of non-zero inputs of each Linear that reads spikes,
  over a ``-T`` step run on the first ``--images`` Fashion-MNIST test images. A
  multi-threshold neuron emits its largest power-of-two level below the membrane, down to
  ``threshold / 2^(levels-1)``, so these inputs are nearly dense and an event-driven
  (sparse) product has nothing to skip.
* ``sites``: at each such Linear's shape (``images x tokens`` rows), the product and one
  neuron step on its output (a lower bound on the element-wise work that follows it),
  timed three ways: the product alone (ATen/MKL),
  the product then the single-pass neuron kernel (what the model runs), and
  ``torch.compile`` with ``max-autotune`` and freezing on the product plus the neuron in
  PyTorch ops, restricted to Inductor's C++ GEMM template (``CPP``: the one CPU GEMM
  that fuses an epilogue). The three alternate round by round; each figure is the
  median of ``--repeats`` rounds.

Prints one JSON object. Run by hand, never in CI.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
import torch.nn as nn

from convert.ops import integrate_and_fire
from convert.pipeline import load_converted
from stas_core.timing import interleaved_seconds
from stas_core.provenance import provenance_of_args
from stas_core import kernels
from stas_core.data import build_datasets


def _interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, after 3 warm-up calls, timed round by round
    (:func:`stas_core.timing.interleaved_seconds`)."""
    times = interleaved_seconds(fns, rounds=repeats, warmup=3)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


class _Site(nn.Module):
    """A Linear on spikes and one step of the neuron that reads its output (ops form)."""

    def __init__(self, linear: nn.Linear, threshold: float, smallest: float) -> None:
        super().__init__()
        self.lin, self.threshold, self.smallest = linear, threshold, smallest

    def forward(self, s: torch.Tensor, v: torch.Tensor):
        return integrate_and_fire(v, self.lin(s), torch.tensor(self.threshold), self.smallest)


def _compiled(site: _Site, s, v, backends: str) -> Callable[[], object]:
    """``site`` compiled with max-autotune and freezing over the given GEMM backends.
    (Left free to choose, ``CPP,ATEN``, the autotuner picks MKL's product and fuses
    nothing: the template alone shows what fusion would cost.)"""
    import torch._inductor.config as inductor

    fn = torch.compile(site, mode="max-autotune-no-cudagraphs")
    with inductor.patch(freezing=True, max_autotune_gemm_backends=backends):
        fn(s, v)  # compiles here, under these options
    return lambda: fn(s, v)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model.safetensors written by stas-convert")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("-T", "--timesteps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    kernels.keep_freed_memory()
    snn = load_converted(args.model).eval()
    _, val, _ = build_datasets("fashion-mnist", augment=False)
    x = torch.stack([val[i][0] for i in range(args.images)])

    counts: dict[str, list[int]] = {}  # kind (qkv, ..., summed over blocks): [non-zero, all]

    def hook(kind: str):
        def record(module, inputs, output):
            c = counts.setdefault(kind, [0, 0])
            c[0] += int((inputs[0] != 0).sum())
            c[1] += inputs[0].numel()
        return record

    handles = []
    for name, m in snn.named_modules():
        if getattr(m, "stas_input", None) == "events":
            parts = name.split(".")  # blocks.3.qkv -> qkv
            kind = ".".join(parts[2:]) if parts[0] == "blocks" else name
            handles.append(m.register_forward_hook(hook(kind)))
    with torch.inference_mode():
        snn.reset()
        snn(x, timesteps=args.timesteps)
        tokens = snn.tokens(x, 0).shape[1]
    for h in handles:
        h.remove()

    ext = kernels.load()
    rows = args.images * tokens
    sites = {}
    first_block = snn.blocks[0]
    # one neuron step stands for the element-wise work after each product: exactly that
    # after qkv; a residual add and a compensated LayerNorm after proj and fc2, a
    # compensated GELU and a neuron after fc1 (the threshold: the next neuron's)
    readers = {"qkv": first_block.n_q, "proj": first_block.in_fc1,
               "fc1": first_block.in_fc2, "fc2": first_block.in_qkv}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for kind, neuron in readers.items():
            lin = getattr(first_block, kind)
            out_f, in_f = lin.weight.shape
            theta, smallest = float(neuron.threshold), neuron.smallest
            s = torch.randint(-2, 3, (rows, in_f), generator=g).float() * 0.25
            v = torch.randn(rows, out_f, generator=g) * theta
            fns = {
                "gemm_ms": lambda: lin(s),
                "gemm_then_kernel_ms":
                    lambda: ext.multi_threshold_fire(v, lin(s), theta, smallest, False),
                "inductor_cpp_template_fused_ms":
                    _compiled(_Site(lin, theta, smallest).eval(), s, v, "CPP"),
            }
            sites[kind] = {"shape_rows_in_out": [rows, in_f, out_f],
                           **_interleaved_ms(fns, args.repeats)}
    report = {
        "bench": "fusion_bound",
        "model": args.model.rsplit("/", 1)[-1],
        "images": args.images,
        "timesteps": args.timesteps,
        "tokens": tokens,
        "spike_density": {k: nz / total for k, (nz, total) in counts.items()},
        "sites": sites,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    report["provenance"] = provenance_of_args(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
