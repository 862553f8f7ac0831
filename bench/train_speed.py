"""Training and inference speed of vanilla SPS vs I-SPS, and of the fastest peer
implementation of the same model, measured side by side.

    python bench/train_speed.py [--model spikformer-2-128] [-T 4] [--batch-size 128]
                                [--steps 10] [--warmup 2] [--device auto] [--threads N]
                                [--peer spikingjelly|none]

Peer (``--peer spikingjelly``, the default when it is installed: ``pip install -e
'.[bench]'``): spikingjelly 2.0's own ``Spikformer`` (``activation_based.model.spikformer``)
built with the same depth, width, heads and patch size: the same parameter count as our
``spikformer-<depth>-<dim>`` with vanilla SPS (checked), so ``ratio_vanilla_over_peer``
compares implementations of one algorithm. Its output ``[T, B, classes]`` is averaged over T
and its neuron state reset after every step (``functional.reset_net``).

Random inputs (speed does not depend on the pixels). Training step: forward on the
multi-step path, cross-entropy, backward, AdamW step. Inference step: eval-mode forward
under ``torch.inference_mode``. After ``--warmup`` untimed steps of each kind, the two modes
are timed alternately step by step (vanilla, integrated, vanilla, ...), so both see the same
machine load, and the median of ``--steps`` timed steps is reported. Then ``--profile-steps``
training steps per implementation run under ``torch.profiler``: ``dense_ops`` gives each
one's seconds per step in matrix products and convolutions, and
``train_ratio_bound_over_peer`` the peer's step over our dense-op time, the ratio no
change outside those ops can exceed; ``kernels_ms_per_step`` times our C++ kernels' calls
over the same steps (the profiler does not see them). Prints one JSON object
(with the load average: on an oversubscribed CPU box, ``--threads 1`` can be several times
faster than the default, because every multi-threaded op waits for a descheduled thread).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from stas_core.provenance import provenance_of_args
from stas_core.cli.common import run
from stas_core.errors import ConfigError, check_positive_int
from stas_core.models import create_model
from stas_core.timing import Stopwatch
from stas_core.train import resolve_device

MODES = ("vanilla", "integrated")
PEER = "spikingjelly"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="spikformer-2-128")
    p.add_argument("--timesteps", "-T", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode and kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode and kind")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16/fp16 autocast (auto: on for CUDA, as stas-train does)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", choices=["auto", "spikingjelly", "none"], default="auto",
                   help="peer implementation timed beside ours (auto: spikingjelly if installed)")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="training steps per implementation profiled after the timing, for "
                        "the time in dense GEMMs and convolutions (0: skip)")
    return p


def _bench(args: argparse.Namespace) -> int:
    for name in ("timesteps", "batch_size", "steps", "in_chans", "img_size", "num_classes"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0; got {args.warmup}")
    if args.profile_steps < 0:
        raise ConfigError(f"--profile-steps must be >= 0; got {args.profile_steps}")
    if args.threads is not None:
        torch.set_num_threads(check_positive_int("--threads", args.threads))
    from stas_core.kernels import keep_freed_memory

    malloc_tuned = keep_freed_memory()  # as stas-train does; ours and the peer share it
    device = resolve_device(args.device)
    amp = device.type == "cuda" if args.amp == "auto" else args.amp == "on"
    if amp and device.type != "cuda":
        raise ConfigError("--amp on needs a CUDA device (stas-train uses AMP on CUDA only)")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    x, y = x.to(device), y.to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    setups = {}
    for mode in MODES:
        torch.manual_seed(args.seed)  # same initial weights in both modes
        model = create_model(args.model, img_size=args.img_size, in_chans=args.in_chans,
                             num_classes=args.num_classes, timesteps=args.timesteps,
                             sps=mode).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        setups[mode] = (model, opt, scaler, model)
    peer = _peer(args, setups["vanilla"][0], device)
    if peer is not None:
        opt = torch.optim.AdamW(peer[0].parameters(), lr=1e-3, weight_decay=0.05)
        setups[PEER] = (peer[0], opt, torch.amp.GradScaler("cuda", enabled=amp), peer[1])
    names = list(setups)

    def train_step(mode: str) -> float:
        model, opt, scaler, forward = setups[mode]
        model.train()
        with Stopwatch(device) as watch:
            with torch.autocast(device.type, enabled=amp):
                loss = criterion(forward(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return watch.seconds

    def infer_step(mode: str) -> float:
        model, forward = setups[mode][0], setups[mode][3]
        model.eval()
        with Stopwatch(device) as watch, torch.inference_mode(), \
                torch.autocast(device.type, enabled=amp):
            forward(x)
        return watch.seconds

    times: dict[str, dict[str, list]] = {m: {"train": [], "infer": []} for m in names}
    for kind, step in (("train", train_step), ("infer", infer_step)):
        for mode in names:
            for _ in range(args.warmup):
                step(mode)
        for _ in range(args.steps):
            for mode in names:
                times[mode][kind].append(step(mode))

    results = {}
    for mode in names:
        med_t = statistics.median(times[mode]["train"])
        med_i = statistics.median(times[mode]["infer"])
        results[mode] = {"train_images_per_s": args.batch_size / med_t,
                         "infer_images_per_s": args.batch_size / med_i,
                         "train_step_s_median": med_t, "infer_step_s_median": med_i,
                         "train_step_s": times[mode]["train"], "infer_step_s": times[mode]["infer"]}
    v, i = results["vanilla"], results["integrated"]
    report = {
        "model": args.model, "timesteps": args.timesteps, "batch_size": args.batch_size,
        "input": [args.in_chans, args.img_size, args.img_size], "steps": args.steps,
        "warmup": args.warmup, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "amp": amp, "malloc_keeps_freed_memory": malloc_tuned, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "results": results,
        "ratio_integrated_over_vanilla": {
            "train_images_per_s": i["train_images_per_s"] / v["train_images_per_s"],
            "infer_images_per_s": i["infer_images_per_s"] / v["infer_images_per_s"]},
    }
    if peer is not None:
        p = results[PEER]
        report["peer"] = peer[2]
        for mine in MODES:
            report[f"ratio_{mine}_over_peer"] = {
                k: results[mine][k] / p[k] for k in ("train_images_per_s", "infer_images_per_s")}
    if args.profile_steps > 0:
        report["dense_ops"] = _dense_ops(names, train_step, args.profile_steps)
        if peer is not None:
            peer_step = results[PEER]["train_step_s_median"]
            report["dense_ops"]["train_ratio_bound_over_peer"] = {
                mine: peer_step / report["dense_ops"][mine]["train_step_s"] for mine in MODES}
        report["kernels_ms_per_step"] = _kernel_times(MODES, train_step, args.profile_steps)
    report["provenance"] = provenance_of_args(args)
    print(json.dumps(report, indent=2))
    return 0


def _kernel_times(modes, train_step, steps: int) -> dict:
    """Milliseconds per training step in each single-pass kernel of ours (LIF forward and
    backward, BatchNorm moments, pooling, ...): calls into the C++ extension, which
    ``torch.profiler`` does not see. Each call is timed through a stand-in for the loaded
    extension; empty when it is not built."""
    from stas_core import kernels

    real = kernels.load()
    if real is None:
        return {}
    out = {}
    for mode in modes:
        spent: dict = collections.defaultdict(float)

        class Timed:
            def __getattr__(self, name):
                fn = getattr(real, name)

                def timed(*a, **kw):
                    start = time.perf_counter()
                    try:
                        return fn(*a, **kw)
                    finally:
                        spent[name] += time.perf_counter() - start
                return timed

        kernels._state["module"] = Timed()
        try:
            for _ in range(steps):
                train_step(mode)
        finally:
            kernels._state["module"] = real
        ranked = sorted(spent.items(), key=lambda kv: -kv[1])
        out[mode] = {name: 1e3 * s / steps for name, s in ranked}
    return out


# The ops that are the model's dense arithmetic (matrix products and convolutions, forward
# and backward) whatever the implementation routes them through.
DENSE_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::mkldnn_convolution",
             "aten::convolution_backward", "aten::_convolution", "mkldnn::_linear_pointwise",
             "aten::mkldnn_rnn_layer", "aten::baddbmm")


def _dense_ops(names, train_step, steps: int) -> dict:
    """Seconds per training step in dense GEMMs and convolutions, per implementation (self
    time under ``torch.profiler``, which slows small ops, not these). No implementation can
    train faster than its dense ops alone, so ``peer step / our dense ops`` bounds the
    ratio over the peer that any change to the rest (neurons, BatchNorms, copies) can reach
    at this arithmetic."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for mode in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(mode)
        per_op = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()
                  if e.key in DENSE_OPS}
        out[mode] = {"train_step_s": sum(per_op.values()), "per_op_s": per_op}
    return out


def _peer(args: argparse.Namespace, ours: nn.Module, device: torch.device):
    """(model, forward, description) of spikingjelly's Spikformer matching ``ours``, or None."""
    if args.peer == "none":
        return None
    try:
        import spikingjelly
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.model.spikformer import Spikformer
    except ImportError as err:
        if args.peer == "spikingjelly":
            raise ConfigError(f"--peer spikingjelly needs spikingjelly 2.0 ({err}); install "
                              f"it with: pip install -e '.[bench]'") from None
        return None
    if not args.model.startswith("spikformer-"):
        return None  # spikingjelly ships Spikformer only
    torch.manual_seed(args.seed)
    model = Spikformer(T=args.timesteps, in_channels=args.in_chans, img_size_h=args.img_size,
                       img_size_w=args.img_size, patch_size=args.img_size // ours.grid,
                       num_classes=args.num_classes, embed_dims=ours.embed_dim,
                       num_heads=ours.num_heads, depths=ours.depth).to(device)
    n_peer = sum(q.numel() for q in model.parameters())
    n_ours = sum(q.numel() for q in ours.parameters())

    def forward(x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(model)
        return model(x).mean(0)

    return model, forward, {"name": "spikingjelly Spikformer",
                            "spikingjelly": getattr(spikingjelly, "__version__", "2.0"),
                            "parameters": n_peer, "ours_vanilla_parameters": n_ours,
                            "same_parameter_count": n_peer == n_ours}


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_bench, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
