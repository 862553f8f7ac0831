"""Tests for stas_core.data: offline loading of Fashion-MNIST, CIFAR and ImageFolder data."""
from __future__ import annotations

import gzip
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from stas_core import data as D
from stas_core import fashion_mnist as F
from stas_core.errors import ConfigError, DataError

from helpers import missing

SYSTEM_DIR = Path(D.SYSTEM_FASHION_MNIST_DIR)


@pytest.fixture
def no_system_fmnist(tmp_path, monkeypatch):
    """Point the system dir, env override and cache dir at empty tmp dirs."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(F, "SYSTEM_FASHION_MNIST_DIR", str(empty))
    monkeypatch.setenv(F.FASHION_MNIST_ENV, str(empty))
    monkeypatch.setattr(F, "default_data_dir", lambda: tmp_path / "cache")
    return empty


# --------------------------------------------------------------------------- helpers
def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else 0x800 + arr.ndim
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx_set(d: Path, n_train=12, n_val=6, gz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_val, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (d / stem).write_bytes(raw)
    return arrays


# The real CIFAR files are Python-2 pickles whose keys are py2 ``str``: they read as b'data'
# under encoding='bytes' (the official recipe) and as 'data' under encoding='latin1', which
# torchvision uses. A Python-3 pickle with str keys reads back identically under latin1.
def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_batch(n: int, label_key: str, n_classes: int, rng) -> dict:
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, n_classes, n).tolist(), "batch_label": "fake"}


def _write_cifar10(root: Path, n=4) -> None:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        _pickle(d / f"data_batch_{i}", _cifar_batch(n, "labels", 10, rng))
    _pickle(d / "test_batch", _cifar_batch(n, "labels", 10, rng))
    _pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n})


def _write_cifar100(root: Path, n=5) -> None:
    rng = np.random.default_rng(1)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name in ("train", "test"):
        batch = _cifar_batch(n, "fine_labels", 100, rng)
        batch["coarse_labels"] = [0] * n
        _pickle(d / name, batch)
    _pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"k{i}" for i in range(20)]})


# --------------------------------------------------------------------------- registry
def test_dataset_info_and_aliases():
    assert D.get_dataset_info("fmnist") is D.DATASETS["fashion-mnist"]
    assert D.get_dataset_info("fashion_mnist").in_chans == 1
    assert D.get_dataset_info("CIFAR100").num_classes == 100
    info = D.get_dataset_info("imagenet")
    assert (info.in_chans, info.img_size, info.num_classes) == (3, 224, 1000)
    with pytest.raises(Exception):
        info.name = "x"  # frozen


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'.*fashion-mnist.*cifar10"):
        D.build_datasets("mnist", download=False)


@pytest.mark.parametrize("kw", [{"train_subset": 0}, {"val_subset": -3}, {"train_subset": 2.5}])
def test_bad_subset_is_config_error(kw):
    with pytest.raises(ConfigError, match="subset must be an integer >= 1"):
        D.build_datasets("fashion-mnist", download=False, **kw)


# --------------------------------------------------------------------------- fashion-mnist
@pytest.fixture(scope="module")
def system_fmnist():
    if not all((SYSTEM_DIR / f"{s}.gz").is_file() or (SYSTEM_DIR / s).is_file()
               for s in F._FMNIST_FILES.values()):
        missing(f"{SYSTEM_DIR} absent or incomplete (apt-get install dataset-fashion-mnist)")
    return D.load_fashion_mnist(data_dir="/nonexistent-stas-dir", download=False)


def test_system_fashion_mnist(system_fmnist, monkeypatch):
    monkeypatch.delenv(F.FASHION_MNIST_ENV, raising=False)
    (xt, yt), (xv, yv) = system_fmnist
    assert xt.shape == (60000, 1, 28, 28) and xv.shape == (10000, 1, 28, 28)
    assert xt.dtype == torch.uint8 and yt.dtype == torch.int64 and len(yv) == 10000
    assert set(yt.unique().tolist()) == set(range(10))

    info = D.DATASETS["fashion-mnist"]
    val = D.TensorImageDataset(xv, yv, info.mean, info.std)
    x, y = val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    batch = torch.stack([val[i][0] for i in range(0, 10000, 10)])
    assert abs(batch.mean().item()) < 0.1 and abs(batch.std().item() - 1) < 0.1

    train = D.TensorImageDataset(xt, yt, info.mean, info.std, augment=True, padding=2)
    xa, _ = train[0]
    assert xa.shape == (1, 28, 28)
    # pixels introduced by padding are background (raw 0), i.e. normalised -mean/std
    assert xa.min().item() >= (0 - info.mean[0]) / info.std[0] - 1e-5


def test_system_fashion_mnist_build_and_subsets(system_fmnist, monkeypatch):
    monkeypatch.delenv(F.FASHION_MNIST_ENV, raising=False)
    # build_datasets reads the system dir too; reuse the module-scoped load to stay fast
    monkeypatch.setattr(D, "load_fashion_mnist", lambda *a, **k: system_fmnist)
    tr, va, info = D.build_datasets("fashion-mnist", train_subset=100, val_subset=50, seed=1)
    assert (len(tr), len(va), info.num_classes) == (100, 50, 10)
    tr_again, _, _ = D.build_datasets("fmnist", train_subset=100, seed=1)
    tr_other, _, _ = D.build_datasets("fmnist", train_subset=100, seed=2)
    assert isinstance(tr, Subset) and tr.indices == tr_again.indices
    assert tr.indices != tr_other.indices
    full_tr, full_va, _ = D.build_datasets("fmnist")
    assert (len(full_tr), len(full_va)) == (60000 - 5000, 10000)  # validation held out
    _, va_seed2, _ = D.build_datasets("fmnist", val_subset=50, seed=2)
    assert va_seed2.indices == va.indices  # the test images do not follow the run seed
    _, val, _ = D.build_datasets("fmnist", split="val", holdout=300)
    assert len(val) == 300 and D.split_record(val)["split"] == "val"
    with pytest.raises(D.ConfigError, match="split must be one of"):
        D.build_datasets("fmnist", split="train")
    with pytest.raises(D.ConfigError, match="leaves no training images"):
        D.build_datasets("fmnist", holdout=60000)


def test_real_loader_reads_system_dir(monkeypatch, tmp_path):
    if not SYSTEM_DIR.is_dir():
        missing(f"{SYSTEM_DIR} absent (apt-get install dataset-fashion-mnist)")
    monkeypatch.delenv(F.FASHION_MNIST_ENV, raising=False)
    tr, va, _ = D.build_datasets("fashion-mnist", data_dir=tmp_path, download=False,
                                 train_subset=8, val_subset=8)
    assert len(tr.dataset.dataset) == 60000 and len(va.dataset) == 10000


@pytest.mark.parametrize("gz", [True, False])
def test_fabricated_idx_from_data_dir(tmp_path, no_system_fmnist, gz):
    arrays = _write_idx_set(tmp_path / "d", gz=gz)
    tr, va, info = D.build_datasets("fashion-mnist", data_dir=tmp_path / "d", download=False,
                                    augment=False)
    assert (len(tr), len(va)) == (12 - 1, 6)  # one training image held out for validation
    x, y = va[3]
    expect = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"][3]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0], expect, atol=1e-6)
    assert y == int(arrays["t10k-labels-idx1-ubyte"][3])


def test_torchvision_layout_and_env_override(tmp_path, no_system_fmnist, monkeypatch):
    _write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", n_train=5)
    tr, _, _ = D.build_datasets("fmnist", data_dir=tmp_path / "tv", download=False)
    assert len(tr) == 5 - 1  # minus the validation hold-out
    _write_idx_set(tmp_path / "env", n_train=7)
    monkeypatch.setenv(F.FASHION_MNIST_ENV, str(tmp_path / "env"))
    tr, _, _ = D.build_datasets("fmnist", data_dir=tmp_path / "nowhere", download=False)
    assert len(tr) == 7 - 1  # minus the validation hold-out


def test_subset_larger_than_set_warns(tmp_path, no_system_fmnist, caplog):
    _write_idx_set(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="stas_core.data"):
        tr, va, _ = D.build_datasets("fmnist", data_dir=tmp_path / "d", download=False,
                                     train_subset=1000, val_subset=3)
    assert len(tr) == 12 - 1 and len(va) == 3
    assert "train_subset=1000 exceeds" in caplog.text


def test_corrupt_idx_is_data_error(tmp_path, no_system_fmnist):
    arrays = _write_idx_set(tmp_path / "d")
    bad = _idx_bytes(arrays["train-images-idx3-ubyte"], magic=0x00000999)
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bad))
    with pytest.raises(DataError, match="expected magic 0x00000803"):
        D.build_datasets("fmnist", data_dir=tmp_path / "d", download=False)
    truncated = _idx_bytes(arrays["train-images-idx3-ubyte"])[:-5]
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(truncated))
    with pytest.raises(DataError, match="corrupt"):
        D.build_datasets("fmnist", data_dir=tmp_path / "d", download=False)
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read IDX"):
        D.build_datasets("fmnist", data_dir=tmp_path / "d", download=False)


def test_missing_fashion_mnist(tmp_path, no_system_fmnist):
    with pytest.raises(DataError) as err:
        D.build_datasets("fashion-mnist", data_dir=tmp_path / "missing", download=False)
    msg = str(err.value)
    assert str(tmp_path / "missing") in msg and str(no_system_fmnist) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "train-images-idx3-ubyte" in msg


# --------------------------------------------------------------------------- CIFAR
def test_fabricated_cifar10(tmp_path):
    _write_cifar10(tmp_path)
    tr, va, info = D.build_datasets("cifar10", data_dir=tmp_path, download=False, train_subset=7)
    assert (len(tr), len(va), info.num_classes) == (7, 4, 10)
    x, y = tr[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert va.dataset.classes[0] == "c0"


def test_fabricated_cifar100(tmp_path):
    _write_cifar100(tmp_path)
    tr, va, info = D.build_datasets("cifar100", data_dir=tmp_path, download=False, augment=False)
    assert (len(tr), len(va), info.num_classes) == (5 - 1, 5, 100)
    x, y = va[1]
    assert x.shape == (3, 32, 32) and 0 <= y < 100


def test_missing_cifar_is_data_error(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py/.*--data-dir") as err:
        D.build_datasets("cifar10", data_dir=tmp_path, download=False)
    assert str(tmp_path) in str(err.value)


def test_corrupt_cifar_is_data_error(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot load cifar10"):
        D.build_datasets("cifar10", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- ImageFolder
def test_fabricated_imagenet(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    tr, va, info = D.build_datasets("imagenet", data_dir=tmp_path)
    assert (len(tr), len(va)) == (6 - 1, 4)
    assert tr[0][0].shape == (3, 224, 224) and va[3][0].shape == (3, 224, 224)
    assert va[3][1] == 1 and tr.dataset.dataset.classes == ["n01", "n02"]


def test_missing_imagenet(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir.*DIR/train/<class>/\\*.JPEG"):
        D.build_datasets("imagenet")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="missing: .*val.*DIR/val/<class>"):
        D.build_datasets("imagenet", data_dir=tmp_path)


def test_empty_imagenet_is_data_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="cannot load imagenet"):
        D.build_datasets("imagenet", data_dir=tmp_path)


# --------------------------------------------------------------------------- loaders
def test_build_loaders(tmp_path, no_system_fmnist):
    _write_idx_set(tmp_path / "d", n_train=10, n_val=5)
    tr, va, _ = D.build_datasets("fmnist", data_dir=tmp_path / "d", download=False)
    train_loader, val_loader = D.build_loaders(tr, va, batch_size=4, seed=3)
    sizes = [len(y) for _, y in train_loader]
    assert sizes == [4, 4, 1]  # drop_last=False (9: one image held out for validation)
    x, y = next(iter(val_loader))
    assert x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
    order = lambda: torch.cat([y for _, y in D.build_loaders(tr, va, batch_size=4, seed=3)[0]])
    assert torch.equal(order(), order())  # seeded shuffle


def test_build_loaders_errors(tmp_path):
    ds = D.TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), (0.,), (1.,))
    with pytest.raises(ConfigError, match="batch_size"):
        D.build_loaders(ds, ds, batch_size=0)
    with pytest.raises(ConfigError, match="workers"):
        D.build_loaders(ds, ds, batch_size=1, workers=-1)
    with pytest.raises(ConfigError, match="torch.distributed"):
        D.build_loaders(ds, ds, batch_size=1, distributed=True)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    """A batch file that would import a callable is refused, not executed."""
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2", {"data": Evil()})
    with pytest.raises(DataError, match="refusing to load .*system"):
        D.build_datasets("cifar10", data_dir=tmp_path, download=False)


def test_cifar_labels_out_of_range(tmp_path):
    _write_cifar10(tmp_path)
    batch = _cifar_batch(4, "labels", 10, np.random.default_rng(0))
    batch["labels"][0] = 10
    _pickle(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9; found .*10"):
        D.build_datasets("cifar10", data_dir=tmp_path, download=False)


def test_augmentation_is_a_padded_crop_and_flip():
    """Every augmented sample is one of the (2p+1)^2 padded shifts of the image, flipped or
    not, and both flips occur."""
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    ds = D.TensorImageDataset(img, torch.zeros(1, dtype=torch.long), (0.0,), (1 / 255,),
                              augment=True, padding=1)
    padded = torch.nn.functional.pad(img[0].float(), (1, 1, 1, 1))
    shifts = [padded[:, i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
    candidates = {(s.flip(-1) if f else s).flatten().tolist().__repr__(): f
                  for s in shifts for f in (False, True)}
    torch.manual_seed(0)
    flips = set()
    for _ in range(100):
        key = ds[0][0].round().flatten().tolist().__repr__()
        assert key in candidates
        flips.add(candidates[key])
    assert flips == {False, True}
