"""What every results file records about how it was made: commit, command, versions,
machine, seeds, checkpoints and images, so any figure can be traced and rebuilt."""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

__all__ = ["provenance", "provenance_of_args", "file_sha256", "git_state", "PACKAGES",
           "save_predictions"]

#: Packages whose versions a results file names.
PACKAGES = ("stas", "torch", "timm", "numpy", "onnx", "onnxruntime", "optuna", "sinabs",
            "tonic")
_ROOT = Path(__file__).resolve().parent.parent


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_state(root: Path = _ROOT) -> dict:
    """``{"commit", "dirty"}`` of the checkout this package runs from (tracked files only),
    or ``{"commit": None}`` for an installed copy outside git."""
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if "torch" in sys.modules:  # with its build (CPU or which CUDA)
        out["torch"] = sys.modules["torch"].__version__
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> Optional[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a provenance field must never fail a run
        return None
    return None


def provenance(*, seeds: Iterable[int] = (), checkpoints: Iterable = (),
               images: Optional[Mapping[str, object]] = None,
               command: Optional[list[str]] = None, chose: Optional[str] = None,
               reported: Optional[str] = None) -> dict:
    """The ``provenance`` block of a results file.

    ``checkpoints``: files the figures were measured with (named by file name and SHA-256,
    never by this machine's path); ``images``: name -> evaluation dataset (its
    :func:`stas_core.data.split_record`) or a ready record; ``chose`` / ``reported``: which
    split made the choices and which reported the figures.
    """
    from .data import split_record

    ckpts = []
    for path in checkpoints:
        p = Path(path)
        ckpts.append({"name": p.name, "sha256": file_sha256(p) if p.is_file() else None})
    imgs = {name: (rec if isinstance(rec, dict) else split_record(rec))
            for name, rec in (images or {}).items()}
    return {
        **git_state(), "command": list(sys.argv if command is None else command),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "cpu": _cpu(), "cpu_count": os.cpu_count(), "gpu": _gpu(),
        "seeds": [int(s) for s in seeds], "checkpoints": ckpts, "images": imgs,
        **({"chose_on": chose} if chose else {}), **({"reported_on": reported} if reported else {}),
    }


def provenance_of_args(args, **kwargs) -> dict:
    """:func:`provenance` for a command's parsed ``args``: its seeds (``seed`` / ``seeds``)
    and every argument that names an existing file as a checkpoint."""
    values = vars(args)
    seeds = values.get("seeds") or ([values["seed"]] if values.get("seed") is not None else [])
    files = [v for v in values.values() if isinstance(v, str) and Path(v).is_file()]
    return provenance(seeds=kwargs.pop("seeds", seeds),
                      checkpoints=kwargs.pop("checkpoints", files), **kwargs)


def save_predictions(path: Union[str, os.PathLike], labels, runs: Mapping[str, object]) -> dict:
    """Write every image's answer after each t (``pred`` and ``confidence`` [T, N] per run,
    one shared ``labels`` [N]) to an ``.npz`` atomically; returns ``{"file", "sha256"}``
    for the results file to cite."""
    import numpy as np

    from .checkpoint import atomic_write

    arrays = {"labels": np.asarray(labels)}
    for name, run in runs.items():
        arrays[f"{name}.pred"] = np.asarray(run.pred, dtype=np.int16 if run.pred.max() < 32767
                                            else np.int32)
        arrays[f"{name}.confidence"] = np.asarray(run.confidence, dtype=np.float32)
        arrays[f"{name}.energy_mj"] = np.asarray(run.energy_mj)
        arrays[f"{name}.full_energy_mj"] = np.asarray(run.full_energy_mj)
        if getattr(run, "depth", None) is not None:
            arrays[f"{name}.depth"] = np.asarray(run.depth, dtype=np.float16)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)
    return {"file": Path(path).name, "sha256": file_sha256(path)}
