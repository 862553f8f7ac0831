"""Fashion-MNIST's IDX files, found and parsed offline (numpy), for the image and the
event data sets alike.

Searched in ``data_dir`` (flat or the torchvision layout ``data_dir/FashionMNIST/raw``),
then in ``$STAS_FASHION_MNIST_DIR`` or the Debian package dir
:data:`SYSTEM_FASHION_MNIST_DIR` (``apt-get install dataset-fashion-mnist``); torchvision's
download is the last resort.
"""
from __future__ import annotations

import gzip
import http.client
import logging
import os
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .errors import DataError

__all__ = ["SYSTEM_FASHION_MNIST_DIR", "FASHION_MNIST_ENV", "default_data_dir",
           "load_fashion_mnist"]

logger = logging.getLogger("stas_core.data")

PathLike = Union[str, os.PathLike]

#: Where ``apt-get install dataset-fashion-mnist`` puts the IDX files.
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Environment variable that overrides :data:`SYSTEM_FASHION_MNIST_DIR`.
FASHION_MNIST_ENV = "STAS_FASHION_MNIST_DIR"


# What torchvision's download raises offline or on a partial file.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, http.client.HTTPException)


def default_data_dir() -> Path:
    """Cache directory used when no ``data_dir`` is given: ``~/.cache/stas/data``."""
    return Path.home() / ".cache" / "stas" / "data"


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # ndim -> magic (uint8 payload)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a uint8 IDX file (raw or ``.gz``) with ``ndim`` dimensions; DataError if corrupt."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; re-download or reinstall it") from exc
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != _IDX_MAGIC[ndim] or len(raw) < header:
        found = "a truncated file" if magic is None else f"magic 0x{magic:08x}"
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dim(s): expected magic "
                        f"0x{_IDX_MAGIC[ndim]:08x}, found {found}; replace the file")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path} is corrupt: header says shape {dims} ({int(np.prod(dims))} bytes) "
                        f"but holds {len(raw) - header} bytes; replace the file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_dir(dirs: list[Path]) -> Optional[dict[str, Path]]:
    """First directory of ``dirs`` that holds all four IDX files (raw or .gz), as paths."""
    for d in dirs:
        found = {}
        for key, stem in _FMNIST_FILES.items():
            for cand in (d / stem, d / f"{stem}.gz"):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(_FMNIST_FILES):
            return found
        if found:
            missing = sorted(set(_FMNIST_FILES.values()) - {_FMNIST_FILES[k] for k in found})
            logger.warning("%s holds only part of Fashion-MNIST (missing %s); skipping it",
                           d, ", ".join(missing))
    return None


def _fmnist_search_dirs(data_dir: Optional[PathLike]) -> list[Path]:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    system = os.environ.get(FASHION_MNIST_ENV) or SYSTEM_FASHION_MNIST_DIR
    return [root, root / "FashionMNIST" / "raw", Path(system).expanduser()]


def load_fashion_mnist(data_dir: Optional[PathLike] = None, download: bool = True
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Return ``((train_images, train_labels), (val_images, val_labels))``.

    Images are uint8 ``[N, 1, 28, 28]``, labels int64 ``[N]``. See the module docstring for
    the search order; raises DataError if nothing usable is found.
    """
    dirs = _fmnist_search_dirs(data_dir)
    files = _find_idx_dir(dirs)
    if files is None and download:
        root = dirs[0]
        logger.info("Fashion-MNIST not found locally; downloading into %s", root)
        try:
            import torchvision

            for train in (True, False):
                torchvision.datasets.FashionMNIST(root=str(root), train=train, download=True)
        except _DOWNLOAD_ERRORS as exc:
            logger.warning("Fashion-MNIST download failed: %s", exc)
        files = _find_idx_dir(dirs)
    if files is None:
        raise DataError(
            "Fashion-MNIST IDX files not found (searched: " + ", ".join(map(str, dirs))
            + ("" if not download else "; download failed or is unavailable offline")
            + "). Expected " + ", ".join(f"{s}[.gz]" for s in _FMNIST_FILES.values())
            + ". Fix: run `apt-get install dataset-fashion-mnist`, set "
            f"{FASHION_MNIST_ENV}, or pass --data-dir with the IDX files.")
    logger.info("loading Fashion-MNIST from %s", files["train_images"].parent)
    splits = []
    for split in ("train", "val"):
        x = _read_idx(files[f"{split}_images"], 3)
        y = _read_idx(files[f"{split}_labels"], 1)
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataError(f"Fashion-MNIST {split} files disagree: images {x.shape}, labels "
                            f"{y.shape}; expected [N, 28, 28] images and N labels")
        if y.size and y.max() >= 10:
            raise DataError(f"Fashion-MNIST {split} labels must be in 0..9, found {int(y.max())}")
        splits.append((torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))))
    return splits[0], splits[1]
