"""Checkpoints that are written atomically and load without unpickling anything.

A checkpoint is one safetensors file: tensors (model, optimizer state, ...) under
namespaced keys, plus a JSON document (config, epoch, metrics, RNG-free scalars) stored in
the safetensors metadata. Nothing executable is ever loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .errors import CheckpointError

META_KEY = "stas"


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Call ``writer(tmp_path)`` then rename onto ``path`` (same dir, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _flatten(prefix: str, obj: Any, tensors: dict, skeleton: Any = None):
    """Split a nested structure into tensors (by key) and a JSON skeleton referencing them."""
    if isinstance(obj, Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_json_key(k), _flatten(f"{prefix}.{k}", v, tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def _json_key(k):
    if isinstance(k, (str, int)):
        return k
    raise CheckpointError(f"checkpoint dict keys must be str or int, got {type(k).__name__}")


def _unflatten(node: Any, tensors: dict):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__list__" in node:
            return [_unflatten(v, tensors) for v in node["__list__"]]
        return {k: _unflatten(v, tensors) for k, v in node.items()}
    return node


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save a nested dict of tensors and JSON scalars atomically as safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    skeleton = _flatten("s", state, tensors)
    # safetensors refuses tensors that share storage; clone to be safe.
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta = {META_KEY: json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


class _NoTensors(dict):
    """Stands in for the tensors when only the JSON part of a checkpoint is read."""

    def __missing__(self, key):
        return None


def _read(path: str | os.PathLike, device: Optional[str | torch.device], written_by: str) -> dict:
    """The checkpoint at ``path``; ``device`` None: its JSON part only (tensors as None)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if device is not None \
                else _NoTensors()
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc}); "
                              f"pass a file written by {written_by}") from None
    if META_KEY not in meta:
        raise CheckpointError(f"{path} has no STAS metadata: pass a file written by {written_by}")
    return _unflatten(json.loads(meta[META_KEY]), tensors)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (no unpickling)."""
    return _read(path, device, "stas-train")


def read_header(path: str | os.PathLike, written_by: str = "stas-train or stas-convert") -> dict:
    """The JSON part of a checkpoint (format, config, ...) without reading its tensors."""
    return _read(path, None, written_by)
