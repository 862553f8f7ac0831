"""ONNX export of spiking transformers, with or without token halting.

Any model of the haltable-model protocol exports (direct-trained Spikformer/Spikingformer
and converted ViTs alike) through :class:`InferenceGraph`: ``images [B, C, H, W] ->
logits [B, classes]``, plus ``token_ratio [B]`` and ``depth [B, N]`` with halting.

The graph holds all T timesteps **unrolled** (one copy of the per-timestep ops per t; the
weights are stored once). Why not one timestep with explicit state inputs/outputs: a model
carries dozens of state tensors (every neuron's membrane, every compensated op's running
sums, and with halting the per-token H, R, N, mask and mean field); a one-step graph
would make every runtime juggle them and re-implement the timestep loop and the halting
accumulation outside the graph. Unrolled, a deployment is "image in, logits out", the
halting accumulation lives inside the graph (the ``mask`` execution: static shapes), and
the result equals PyTorch's. The price: the graph grows with T, and T is fixed at export.
The batch dimension is dynamic.

``precision='float64'`` computes inside the graph in double (input and outputs stay
float32). Converted ViTs need it for parity: in float32 their multi-threshold neurons flip
on last-bit differences between runtimes' kernels (see :mod:`stas_core.onnx_float64`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from halting.plugin import HaltingConfig, HaltingConfigError, run_halting
from halting.protocol import run_stepwise

from .errors import StasError
from .onnx_float64 import to_float64

logger = logging.getLogger(__name__)

FORMAT = "stas-onnx/1"
OPSET = 18
PROTOCOL = ("reset", "tokens", "blocks", "readout", "timesteps")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


class ExportError(StasError):
    """A model could not be exported, or the export does not reproduce PyTorch."""


class InferenceGraph(nn.Module):
    """What is exported: the timestep loop (and halting) around a protocol model."""

    def __init__(self, model: nn.Module, timesteps: int,
                 halting: Optional[HaltingConfig] = None, precision: str = "float32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}; "
                              f"got {precision!r}")
        if precision == "float64":
            try:
                model = to_float64(model)
            except StasError as exc:
                raise ExportError(str(exc)) from None
        if halting is not None:
            try:
                halting = halting.for_model(model)  # the model's readout defaults filled in
            except HaltingConfigError as exc:
                raise ExportError(str(exc)) from None
        self.model, self.timesteps, self.halting = model, int(timesteps), halting
        self.precision = precision

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + (["token_ratio", "depth"] if self.halting is not None else [])

    def forward(self, images: Tensor):
        images = images.to(PRECISIONS[self.precision])
        if self.halting is None:
            return run_stepwise(self.model, images, self.timesteps).float()
        res = run_halting(self.model, images, self.halting, timesteps=self.timesteps,
                          execution="mask")
        return res.logits.float(), res.image_ratio.float(), res.depth.float()


def _check_protocol(model: nn.Module) -> None:
    missing = [name for name in PROTOCOL if not hasattr(model, name)]
    if missing:
        raise ExportError(
            f"{type(model).__name__} cannot be exported: it lacks {', '.join(missing)} of the "
            f"haltable-model protocol (reset, tokens, blocks, readout, timesteps). Export a "
            f"model made by stas-train or stas-convert.")


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, warnings and chatty loggers."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def ort_providers(device: str = "auto") -> list:
    """onnxruntime execution providers for ``device``: ``auto`` (CUDA when onnxruntime's
    CUDA provider is installed, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import onnxruntime as ort

    cpu = "CPUExecutionProvider"
    if device == "cpu":
        return [cpu]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return ["CUDAExecutionProvider", cpu] if has_cuda else [cpu]
    if device == "cuda" or device.startswith("cuda:") and device[5:].isdigit():
        if not has_cuda:
            raise ExportError(f"--device {device}: onnxruntime has no CUDA provider here "
                              f"(available: {', '.join(ort.get_available_providers())}); "
                              f"install onnxruntime-gpu or use --device cpu")
        index = int(device[5:]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), cpu]
    raise ExportError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def ort_session(path: str | os.PathLike, threads: Optional[int] = None, device: str = "auto"):
    """An onnxruntime session for ``path`` on ``device`` (see :func:`ort_providers`;
    ``threads``: intra-op threads)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ExportError("onnxruntime is needed: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=ort_providers(device))


def compare_outputs(graph: InferenceGraph, onnx_path: str | os.PathLike, images: Tensor,
                    atol: float = 1e-4, device: str = "auto") -> dict:
    """Run ``images`` through PyTorch and onnxruntime (on ``device``); raise ExportError unless logits agree
    within ``atol`` (max abs difference) and give the same top-1 for every image."""
    with torch.no_grad():
        ref = graph(images)
    ref = ref[0] if isinstance(ref, tuple) else ref
    hint = ("Converted ViTs flip spikes on last-bit differences between float32 kernels: "
            "export them with precision float64 (stas-export --precision float64). "
            if graph.precision == "float32" else "")
    sess = ort_session(onnx_path, device=device)
    got = sess.run(["logits"], {"images": images.cpu().numpy()})[0]
    ref_np = ref.detach().cpu().numpy()
    diff = float(np.abs(got - ref_np).max())
    agree = float((got.argmax(-1) == ref_np.argmax(-1)).mean())
    if not diff <= atol or agree < 1.0:
        raise ExportError(
            f"the exported graph does not reproduce PyTorch on {len(images)} images: max abs "
            f"logit difference {diff:.3g} (allowed {atol:g}), top-1 identical for "
            f"{100 * agree:.1f}% (required 100%). Nothing was written. {hint}Otherwise, "
            f"report this as a bug.")
    return {"max_abs_diff": diff, "top1_identical": agree, "check_images": len(images)}


def export_onnx(model: nn.Module, path: str | os.PathLike, sample: Tensor, *,
                timesteps: Optional[int] = None, halting: Optional[HaltingConfig] = None,
                metadata: Optional[dict] = None, check: bool = True,
                atol: float = 1e-4, precision: str = "float32", device: str = "auto") -> dict:
    """Export ``model`` (eval mode, ``timesteps`` unrolled) to ``path``, atomically.

    ``sample`` is a batch of input images used to trace (and, with ``check``, to compare
    PyTorch and onnxruntime). ``metadata`` is stored as JSON in the model's ``stas``
    metadata property (with the format, timesteps, halting knobs and output names).
    ``precision`` is the arithmetic inside the graph, 'float32' or 'float64' (images in and
    outputs stay float32); the check compares against PyTorch at the same precision, in
    onnxruntime on ``device`` (:func:`ort_providers`).
    """
    import onnx

    _check_protocol(model)
    model.eval()
    steps = int(timesteps or model.timesteps)
    graph = InferenceGraph(model, steps, halting, precision).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the exporter may write side files (external weights): all of it goes in a scratch
    # directory beside the target, and only the finished single-file model is moved out
    scratch = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = os.path.join(scratch, "model.onnx")
    start = time.perf_counter()
    try:
        try:
            with _quiet(), torch.no_grad():
                batch = torch.export.Dim("batch")
                torch.onnx.export(graph, (sample,), tmp, input_names=["images"],
                                  output_names=graph.output_names, opset_version=OPSET,
                                  dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        except Exception as exc:  # the exporter raises many kinds; one clear message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{type(model).__name__} could not be exported to ONNX: "
                              f"{first}") from None
        proto = onnx.load(tmp)  # external weights, if any, are read in and saved inline
        meta = {"format": FORMAT, "timesteps": steps, "precision": precision,
                "halting": None if graph.halting is None else dataclasses.asdict(graph.halting),
                "outputs": graph.output_names, "input_shape": list(sample.shape[1:]),
                **(metadata or {})}
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = "stas", json.dumps(meta)
        onnx.save(proto, tmp)
        seconds = time.perf_counter() - start
        result = {"path": str(path), "export_s": seconds, "bytes": os.path.getsize(tmp),
                  "nodes": len(proto.graph.node), **meta}
        if check:
            result.update(compare_outputs(graph, tmp, sample, atol, device))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("exported %s (%d nodes, %.1f MB) in %.1f s", path, result["nodes"],
                result["bytes"] / 1e6, seconds)
    return result
