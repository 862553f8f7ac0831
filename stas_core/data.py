"""Datasets and loaders for image classification, offline-first.

* ``fashion-mnist``: IDX files parsed with numpy, searched in ``data_dir`` (flat or the
  torchvision layout ``data_dir/FashionMNIST/raw``), then in ``$STAS_FASHION_MNIST_DIR`` or
  the Debian package dir :data:`SYSTEM_FASHION_MNIST_DIR` (``apt-get install
  dataset-fashion-mnist``); torchvision download is the last resort. Kept in memory as
  uint8 ``[N, 1, 28, 28]``; augmentation (torchvision transforms v2) runs on tensors.
* ``cifar10`` / ``cifar100``: the python-pickle release under ``data_dir`` (torchvision
  downloads it when allowed), read through an allow-list unpickler into uint8 tensors.
* ``imagenet``: ``ImageFolder`` on ``data_dir/train`` and ``data_dir/val``.
* event sets (:mod:`stas_core.events`; ``DatasetInfo.events``): ``fashion-mnist-dvs``
  (simulated once from Fashion-MNIST into ``data_dir``), ``nmnist`` (34x34 centre-cropped
  to 32x32), ``dvs-gesture`` and ``cifar10-dvs`` (128x128 downsampled to 64x64; the
  ``-128`` names keep full resolution) from the user's files. A sample is ``[T, 2, H, W]``
  float (``log1p`` of event counts in ``frames`` time bins), a batch ``[B, T, 2, H, W]``.

Every user mistake or unusable environment raises :class:`DataError` or :class:`ConfigError`.
"""
from __future__ import annotations

import http.client
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import events
from .errors import ConfigError, DataError, check_positive_int
from .fashion_mnist import (SYSTEM_FASHION_MNIST_DIR, default_data_dir,  # noqa: F401 - API
                            load_fashion_mnist)

__all__ = [
    "DatasetInfo", "DATASETS", "ALIASES", "SYSTEM_FASHION_MNIST_DIR", "get_dataset_info",
    "default_data_dir", "TensorImageDataset", "load_fashion_mnist", "build_datasets",
    "build_loaders", "SPLITS", "SPLIT_SEED", "default_holdout", "split_record",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: input shape, class count and normalisation."""

    name: str
    in_chans: int
    img_size: int
    num_classes: int
    mean: tuple
    std: tuple
    events: bool = False  #: samples are event frames [T, 2, H, W] (2 polarities), not images


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": DatasetInfo("imagenet", 3, 224, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # event frames are log1p(counts), not standardised: mean 0 / std 1 leave them as they are
    **{name: DatasetInfo(name, 2, size, classes, (0.0, 0.0), (1.0, 1.0), events=True)
       for name, size, classes in (("fashion-mnist-dvs", 28, 10), ("nmnist", 32, 10),
                                   ("dvs-gesture", 64, 11), ("dvs-gesture-128", 128, 11),
                                   ("cifar10-dvs", 64, 10), ("cifar10-dvs-128", 128, 10))},
}
ALIASES: dict[str, str] = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
                           "n-mnist": "nmnist", "dvsgesture": "dvs-gesture",
                           "cifar10dvs": "cifar10-dvs"}
#: frames of an event set when none are asked for
DEFAULT_FRAMES = 4

# Errors that torchvision / the OS raise for missing, partial or corrupt data (or no network).
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError,
                tarfile.TarError, http.client.HTTPException)


def get_dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` for ``name`` (aliases and case accepted)."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        known = ", ".join(list(DATASETS) + list(ALIASES))
        raise ConfigError(f"unknown dataset {name!r}; expected one of: {known}")
    return DATASETS[key]


# --------------------------------------------------------------------------- tensors
class TensorImageDataset(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` -> (normalised float ``[C, H, W]``, int label).

    With ``augment``: torchvision transforms v2 random crop after zero padding by
    ``padding`` pixels, then a random horizontal flip (torch's global RNG, which DataLoader
    seeds per worker). ``classes`` names the labels when the files carry names.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: tuple, std: tuple,
                 augment: bool = False, padding: int = 2,
                 classes: Optional[list[str]] = None) -> None:
        from torchvision.transforms import v2

        self.images, self.targets, self.classes = images, targets, classes
        self.augment, self.padding = augment, padding
        size = tuple(images.shape[-2:])
        steps = [v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()] if augment else []
        self.transform = v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True),
                                             v2.Normalize(list(mean), list(std))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


# --------------------------------------------------------------------------- CIFAR
# torchvision's CIFAR classes md5-check the official files and unpickle them without any
# restriction; these readers take the same python-pickle release from the user's folder
# through an allow-list unpickler (numpy arrays, builtin containers), nothing executable.
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names",
                 "fine_labels"),
}
_PICKLE_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
                   ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                   ("__builtin__", "object"), ("builtins", "object")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch "
                                         "holds only arrays, lists and strings")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _DataUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, found {type(obj).__name__}")
    return obj


def _read_cifar_split(folder: Path, names: list[str], label_key: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        batch = _read_pickle(folder / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{name}: 'data' has shape {data.shape}, expected [N, 3072]")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _build_cifar(info: DatasetInfo, data_dir: Optional[PathLike], download: bool, augment: bool):
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    base, train_files, test_files, meta, names_key, label_key = _CIFAR[info.name]
    folder = root / base
    try:
        if download and not folder.is_dir():
            from torchvision.datasets import CIFAR10, CIFAR100

            root.mkdir(parents=True, exist_ok=True)
            (CIFAR10 if info.name == "cifar10" else CIFAR100)(root=str(root), download=True)
        xt, yt = _read_cifar_split(folder, train_files, label_key)
        xv, yv = _read_cifar_split(folder, test_files, label_key)
        classes = list(_read_pickle(folder / meta)[names_key])
    except _LOAD_ERRORS as exc:
        files = ", ".join(train_files + test_files + [meta])
        raise DataError(
            f"cannot load {info.name} from {root} ({type(exc).__name__}: {exc}). Expected "
            f"{root}/{base}/ with {files} (the python-pickle release). Fix: pass "
            f"--data-dir pointing at the folder that contains {base}/, or allow "
            "download with network access.") from exc
    for split, y in (("train", yt), ("test", yv)):
        if y.numel() and (y.min() < 0 or y.max() >= info.num_classes):
            raise DataError(f"{info.name} {split} labels must lie in 0..{info.num_classes - 1}; "
                            f"found {int(y.min())}..{int(y.max())} in {folder}")
    return (TensorImageDataset(xt, yt, info.mean, info.std, augment=augment, padding=4, classes=classes),
            TensorImageDataset(xv, yv, info.mean, info.std, classes=classes))


def _build_imagenet(info: DatasetInfo, data_dir: Optional[PathLike], augment: bool):
    from torchvision import datasets
    from torchvision.transforms import v2 as T

    layout = "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG"
    if data_dir is None:
        raise DataError(f"imagenet needs --data-dir (no download available); expected layout {layout}")
    root = Path(data_dir).expanduser()
    missing = [str(root / s) for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"imagenet folder(s) missing: {', '.join(missing)}; expected layout "
                        f"{layout} with DIR={root}")
    norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(info.mean, info.std)]
    val_tf = T.Compose([T.Resize(round(info.img_size / 0.875)), T.CenterCrop(info.img_size)] + norm)
    train_tf = (T.Compose([T.RandomResizedCrop(info.img_size), T.RandomHorizontalFlip()] + norm)
                if augment else val_tf)
    try:
        return (datasets.ImageFolder(str(root / "train"), transform=train_tf),
                datasets.ImageFolder(str(root / "val"), transform=val_tf))
    except _LOAD_ERRORS as exc:
        raise DataError(f"cannot load imagenet from {root}: {exc}; expected layout {layout}") from exc


def _build_events(info: DatasetInfo, data_dir: Optional[PathLike], download: bool,
                  frames: int, seed: int) -> tuple[Dataset, Dataset]:
    if info.name == "fashion-mnist-dvs":
        return events.fashion_mnist_dvs_frames(data_dir, frames=frames, download=download)
    source = info.name.removesuffix("-128")
    return events.load_event_dataset(source, data_dir, frames=frames, size=info.img_size,
                                     seed=seed, download=download)


# --------------------------------------------------------------------------- public builders
#: The splits an evaluation set is drawn from: ``"val"`` (held-out training images, where
#: every choice is made) and ``"test"`` (the dataset's test split, which only reports).
SPLITS = ("val", "test")
#: Seed of everything that fixes *which* images a split holds (the validation hold-out, the
#: evaluation subset, CIFAR10-DVS's train/test split): the same for every run seed, so every
#: seed and variant of a comparison is measured on the same images.
SPLIT_SEED = 0
#: Training images held out as the validation split: a tenth, at most this many.
MAX_VAL_HOLDOUT = 5000


def default_holdout(train_size: int) -> int:
    """Images of a training set of ``train_size`` held out for validation."""
    return min(MAX_VAL_HOLDOUT, max(1, train_size // 10)) if train_size > 1 else 0


def _holdout_split(n: int, holdout: int) -> tuple[list[int], list[int]]:
    """(validation indices, training indices) of a training set of ``n``: a fixed
    permutation seeded by :data:`SPLIT_SEED`, independent of the run seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return sorted(order[:holdout]), sorted(order[holdout:])


def _subset(ds: Dataset, n: Optional[int], seed: int, what: str) -> Subset:
    """Fixed seeded subset of ``n`` items (None or n >= len(ds): all of them, in order)."""
    if n is not None and n > len(ds):
        logger.warning("%s=%d exceeds the %d available samples; using all of them", what, n, len(ds))
    if n is None or n >= len(ds):
        return Subset(ds, list(range(len(ds))))
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:n].tolist()))


def _base_indices(ds: Dataset) -> list[int]:
    """Indices of ``ds`` in the dataset under its chain of Subsets."""
    idx = list(range(len(ds)))
    while isinstance(ds, Subset):
        idx = [int(ds.indices[i]) for i in idx]
        ds = ds.dataset
    return idx


def split_record(ds: Dataset) -> dict:
    """What a results file says of the images it was measured on: dataset, split
    (``val``: held out of the training set; ``test``), count and a SHA-256 of their indices
    in the source split (:func:`build_datasets` tags its evaluation sets)."""
    import hashlib

    tag = dict(getattr(ds, "stas_split", {}) or {})
    idx = _base_indices(ds)
    digest = hashlib.sha256(",".join(map(str, idx)).encode()).hexdigest()
    return {"dataset": tag.get("dataset"), "split": tag.get("split"),
            "source": tag.get("source"), "images": len(idx), "indices_sha256": digest}


def build_datasets(name: str, *, data_dir: Optional[PathLike] = None,
                   train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                   seed: int = 0, download: bool = True, augment: bool = True,
                   frames: Optional[int] = None, split: str = "test",
                   holdout: Optional[int] = None) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build ``(train_dataset, eval_dataset, info)`` for dataset ``name``.

    The training set never holds the validation images: ``holdout`` training images
    (default :func:`default_holdout`, a fixed choice seeded by :data:`SPLIT_SEED`) are set
    aside. ``split`` picks the evaluation set: ``"test"`` (the dataset's test split; it only
    reports) or ``"val"`` (the held-out training images, with the evaluation transform;
    every choice is made there). ``val_subset`` takes a fixed subset of that set, seeded by
    :data:`SPLIT_SEED` (the same images for every run seed); ``train_subset`` a subset of
    the remaining training images seeded by ``seed``. ``augment=False`` gives the train
    split the evaluation transform. ``frames``: time bins of an event set (default
    :data:`DEFAULT_FRAMES`; ignored for image sets). Event sets are not augmented (a flip
    changes what a gesture means). The evaluation set carries ``stas_split`` for
    :func:`split_record`.
    """
    info = get_dataset_info(name)
    for what, n in (("train_subset", train_subset), ("val_subset", val_subset)):
        if n is not None:
            check_positive_int(what, n)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, int)
                                or holdout < 0):
        raise ConfigError(f"holdout must be an integer >= 0 (training images kept for "
                          f"validation); got {holdout!r}")
    plain = None  # the training images with the evaluation transform (the val split)
    if info.events:
        train, test = _build_events(info, data_dir, download,
                                    check_positive_int("frames", frames or DEFAULT_FRAMES),
                                    SPLIT_SEED)
        plain = train
    elif info.name == "fashion-mnist":
        (xt, yt), (xv, yv) = load_fashion_mnist(data_dir, download)
        train = TensorImageDataset(xt, yt, info.mean, info.std, augment=augment, padding=2)
        test = TensorImageDataset(xv, yv, info.mean, info.std, augment=False)
        if split == "val":
            plain = train if not augment else TensorImageDataset(xt, yt, info.mean, info.std,
                                                                 augment=False)
    elif info.name in ("cifar10", "cifar100"):
        train, test = _build_cifar(info, data_dir, download, augment)
        if split == "val":
            plain = train if not augment else _build_cifar(info, data_dir, download, False)[0]
    else:
        train, test = _build_imagenet(info, data_dir, augment)
        if split == "val":
            plain = train if not augment else _build_imagenet(info, data_dir, False)[0]
    n_hold = default_holdout(len(train)) if holdout is None else holdout
    if n_hold >= len(train):
        raise ConfigError(f"holdout={n_hold} leaves no training images of the {len(train)} "
                          f"in {info.name}'s training split; hold out fewer")
    val_idx, train_idx = _holdout_split(len(train), n_hold)
    if split == "val":
        if not val_idx:
            raise ConfigError("split='val' needs held-out training images; got holdout=0")
        source = Subset(plain, val_idx)
    else:
        source = test
    evaluation = _subset(source, val_subset, SPLIT_SEED, "val_subset")
    evaluation.stas_split = {"dataset": info.name, "split": split,
                             "source": "train" if split == "val" else "test"}
    return (_subset(Subset(train, train_idx), train_subset, seed, "train_subset"),
            evaluation, info)


def build_loaders(train_ds: Dataset, val_ds: Dataset, *, batch_size: int, workers: int = 0,
                  distributed: bool = False, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Return ``(train_loader, val_loader)`` with ``batch_size`` images per process.

    Training order comes from a seeded :class:`DistributedSampler` in every case (one
    replica when not distributed): call ``train_loader.sampler.set_epoch(epoch)`` every
    epoch. The order of an epoch then depends on ``(seed, epoch)`` only, so a resumed run
    sees the batches an uninterrupted one would, and N processes together see exactly the
    batches one process sees. Validation is split across processes without padding.
    """
    from torch.utils.data.distributed import DistributedSampler

    check_positive_int("batch_size", batch_size)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("distributed=True needs an initialised torch.distributed process "
                              "group; launch with torchrun (or call init_process_group) or "
                              "drop the distributed option")
        rank, world = dist.get_rank(), dist.get_world_size()
    common = dict(batch_size=batch_size, num_workers=workers, drop_last=False,
                  pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    train_loader = DataLoader(train_ds, sampler=sampler, **common)
    val_shard = val_ds if world == 1 else Subset(val_ds, range(rank, len(val_ds), world))
    val_loader = DataLoader(val_shard, shuffle=False, **common)
    return train_loader, val_loader
