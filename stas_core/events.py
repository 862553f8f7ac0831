"""Event-camera input: a simulated event set (``fashion-mnist-dvs``) and tonic-format loaders.

* :class:`SaccadeDVS` turns static images into events the way N-MNIST was recorded
  (Orchard et al. 2015): the image moves along three small saccades (a triangle path) in
  front of a sensor whose pixels emit an ON/OFF event when their log intensity has changed
  by at least a contrast threshold since their last event (then the reference resets),
  with a refractory period and optional uniform background noise. Vectorised over images
  with numpy; deterministic for a seed.
* :func:`load_fashion_mnist_dvs` generates the events of all Fashion-MNIST images once into
  ``data_dir/fashion-mnist-dvs/`` (atomic writes, the generator parameters stored beside
  them: a changed parameter regenerates instead of reusing a stale cache).
* N-MNIST, DVS128 Gesture and CIFAR10-DVS are read from the user's files in the layout
  tonic's dataset classes use, with tonic's own file readers (see :func:`load_event_dataset`).
* :class:`EventFrames` gives ``(frames [T, 2, H, W] float, label)`` samples: tonic's
  ``ToFrame`` counts events into ``T`` time bins per polarity, then ``log1p`` compresses the
  counts (event counts are heavy-tailed: a few hot pixels would dominate a linear scale).

Events are numpy structured arrays with tonic's fields ``x``, ``y``, ``t`` (microseconds)
and ``p`` (:data:`EVENT_DTYPE`, tonic's ``events_struct``), so every tonic transform applies.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError, DataError, check_positive_int
from .fashion_mnist import default_data_dir, load_fashion_mnist

__all__ = ["EVENT_DTYPE", "SaccadeDVS", "dvs_events", "EventFrames", "load_fashion_mnist_dvs",
           "load_event_dataset", "EVENT_SOURCES", "save_event_samples_png"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: tonic's event dtype (``tonic.io.events_struct``): x, y, t in microseconds, polarity.
EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", bool)])
# on-disk form of the simulated events (7 bytes an event instead of 13)
_STORE_DTYPE = np.dtype([("x", np.uint8), ("y", np.uint8), ("p", np.uint8), ("t", np.uint32)])
_CACHE_FORMAT = "stas-fashion-mnist-dvs/1"


# --------------------------------------------------------------------------- simulator
@dataclass(frozen=True)
class SaccadeDVS:
    """Event-camera simulation of an image moved through three saccades (N-MNIST style).

    The image (intensities in [0, 1]) is shifted with bilinear interpolation along the
    triangle ``(0, 0) -> (amplitude / 2, amplitude) -> (amplitude, 0) -> (0, 0)`` (x, y in
    pixels; centred on the sensor), one straight saccade of ``saccade_us`` microseconds per
    side, sampled ``steps_per_saccade`` times each. At each sample time every pixel compares
    ``L = log(I + log_offset)`` with its reference ``L_ref`` (initially the first view): if
    ``|L - L_ref| >= threshold`` and at least ``refractory_us`` have passed since its last
    event, it emits one event (ON if L rose) at that time and sets ``L_ref = L``; during the
    refractory period the change keeps accumulating. ``noise_hz`` adds background events
    per pixel and second (uniform times, random polarity), drawn from a generator seeded by
    ``(seed, image index)``, so a sample does not depend on which others are generated.
    """

    sensor_size: tuple = (28, 28)   #: (width, height) of the sensor = of the images
    amplitude: float = 2.0          #: side of the saccade triangle, pixels
    saccade_us: int = 100_000       #: duration of one saccade (N-MNIST: about 100 ms)
    steps_per_saccade: int = 10     #: intensity samples per saccade (time resolution)
    threshold: float = 0.3          #: contrast threshold on the log-intensity change
    log_offset: float = 0.05        #: added to I before the log (dark pixels stay finite)
    refractory_us: int = 15_000     #: minimum time between two events of one pixel
    noise_hz: float = 0.0           #: background events per pixel and second
    seed: int = 0                   #: seed of the noise

    def __post_init__(self) -> None:
        check_positive_int("steps_per_saccade", self.steps_per_saccade)
        check_positive_int("saccade_us", self.saccade_us)
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be > 0 (a log-intensity step); got {self.threshold}")
        if not self.log_offset > 0:
            raise ConfigError(f"log_offset must be > 0 (log of a dark pixel); got "
                              f"{self.log_offset}")
        for name in ("amplitude", "refractory_us", "noise_hz"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")

    @property
    def duration_us(self) -> int:
        """Length of a recording (three saccades)."""
        return 3 * self.saccade_us

    def sample_times(self) -> np.ndarray:
        """Times (us) of the intensity samples, ``0`` (the reference view) included."""
        n = 3 * self.steps_per_saccade
        return np.round(np.arange(n + 1) * (self.duration_us / n)).astype(np.int64)

    def positions(self) -> np.ndarray:
        """Image offset ``(dx, dy)`` in pixels at each sample time, ``[3 * steps + 1, 2]``."""
        a = self.amplitude
        corners = np.array([[0.0, 0.0], [a / 2, a], [a, 0.0], [0.0, 0.0]])
        corners -= corners[:3].mean(0)  # centred: the image moves around its rest position
        s = self.steps_per_saccade
        frac = np.arange(s) / s
        path = [corners[i] + frac[:, None] * (corners[i + 1] - corners[i]) for i in range(3)]
        return np.concatenate(path + [corners[3:]])

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def _shift(self, img: np.ndarray, dx: float, dy: float) -> np.ndarray:
        """``img[B, H, W]`` moved by (dx, dy) pixels, bilinear, zero outside."""
        pad = int(np.ceil(max(abs(dx), abs(dy)))) + 1
        p = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        h, w = img.shape[1:]
        ix, iy = int(np.floor(dx)), int(np.floor(dy))
        fx, fy = dx - ix, dy - iy
        out = np.zeros_like(img)
        # out[y, x] = img[y - dy, x - dx]
        for oy, wy in ((iy, 1 - fy), (iy + 1, fy)):
            for ox, wx in ((ix, 1 - fx), (ix + 1, fx)):
                if wx * wy:
                    out += wx * wy * p[:, pad - oy: pad - oy + h, pad - ox: pad - ox + w]
        return out

    def simulate(self, images: np.ndarray, first_index: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Events of ``images`` ``[B, H, W]`` (uint8 or float in [0, 1]).

        Returns ``(events, offsets)``: one structured array in the compact store dtype
        (x, y, p uint8, t uint32 us) sorted by image then time, and ``offsets[B + 1]``
        (image ``b``'s events are ``events[offsets[b]:offsets[b + 1]]``). ``first_index``
        is the index of ``images[0]`` in its split (it seeds the noise).
        """
        img = np.asarray(images)
        if img.ndim != 3:
            raise ConfigError(f"images must be [B, H, W]; got shape {list(img.shape)}")
        if tuple(img.shape[:0:-1]) != tuple(self.sensor_size):
            raise ConfigError(f"images are {img.shape[2]}x{img.shape[1]} (WxH) but the sensor "
                              f"is {self.sensor_size[0]}x{self.sensor_size[1]}")
        img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
        b_n = len(img)
        views = (self._shift(img, dx, dy) for dx, dy in self.positions())
        parts = [dvs_events(views, self.sample_times(), threshold=self.threshold,
                            log_offset=self.log_offset, refractory_us=self.refractory_us)]
        if self.noise_hz > 0:
            parts.append(self._noise(b_n, first_index))
        b, x, y, t, p = (np.concatenate(c) for c in zip(*parts))
        order = np.lexsort((x, y, t, b))  # by image, then time (then position: deterministic)
        ev = np.empty(len(order), dtype=_STORE_DTYPE)
        ev["x"], ev["y"], ev["t"], ev["p"] = x[order], y[order], t[order], p[order]
        offsets = np.zeros(b_n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(b, minlength=b_n))
        return ev, offsets

    def _noise(self, b_n: int, first_index: int) -> tuple:
        w, h = self.sensor_size
        mean = self.noise_hz * w * h * self.duration_us * 1e-6
        cols = []
        for i in range(b_n):
            rng = np.random.default_rng([self.seed, first_index + i])
            n = int(rng.poisson(mean))
            cols.append((np.full(n, i), rng.integers(0, w, n), rng.integers(0, h, n),
                         rng.integers(1, self.duration_us + 1, n), rng.random(n) < 0.5))
        return tuple(np.concatenate(c) for c in zip(*cols)) if cols else ()


def dvs_events(intensities: Iterable[np.ndarray], times: Sequence[int], *, threshold: float,
               log_offset: float, refractory_us: float) -> tuple[np.ndarray, ...]:
    """The pixel model of :class:`SaccadeDVS` on a sequence of views ``[B, H, W]`` (in
    [0, 1]) taken at ``times`` (us); the first view sets the references.

    A pixel fires (at most once per view) when ``|log(I + log_offset) - L_ref| >=
    threshold`` and ``refractory_us`` have passed since its last event; its reference then
    becomes the current level. Returns ``(b, x, y, t, p)`` arrays, p True for ON.
    """
    views = iter(intensities)
    ref = np.log(next(views) + log_offset)
    last = np.full(ref.shape, -np.inf)
    parts = [tuple(np.zeros(0, dtype=np.int64) for _ in range(4)) + (np.zeros(0, dtype=bool),)]
    for t, view in zip(times[1:], views):
        level = np.log(view + log_offset)
        diff = level - ref
        fire = (np.abs(diff) >= threshold) & (t - last >= refractory_us)
        b, y, x = np.nonzero(fire)
        parts.append((b, x, y, np.full(len(b), t, dtype=np.int64), diff[b, y, x] > 0))
        ref[fire] = level[fire]
        last[fire] = t
    return tuple(np.concatenate(c) for c in zip(*parts))


def to_tonic(events: np.ndarray) -> np.ndarray:
    """Compact stored events (or any x, y, t, p array) as tonic's :data:`EVENT_DTYPE`."""
    out = np.empty(len(events), dtype=EVENT_DTYPE)
    for name in EVENT_DTYPE.names:
        out[name] = events[name]
    return out


# --------------------------------------------------------------------------- frames
class EventFrames(Dataset):
    """Event recordings -> ``(log1p of event counts [T, 2, H, W] float32, label)``.

    ``read(i)`` returns recording ``i`` as a structured array with x, y, t, p; tonic's
    ``ToFrame`` counts it in ``frames`` equal time windows (over ``[0, duration_us]`` when the
    recording length is fixed, else over each recording's own span), after an optional
    tonic ``Downsample`` (``size`` divides the sensor) or ``CenterCrop`` to ``size``.
    """

    def __init__(self, read: Callable[[int], np.ndarray], targets: Sequence[int], *,
                 sensor_size: tuple, frames: int, size: Optional[int] = None,
                 duration_us: Optional[int] = None, classes: Optional[list] = None,
                 files: Optional[list] = None) -> None:
        import tonic.transforms as tt

        check_positive_int("frames", frames)
        self.read, self.targets, self.classes = read, list(targets), classes
        self.files = files  # the recordings' paths, where they are files
        self.frames = frames
        w, h, c = sensor_size
        steps = []
        if size is not None and (w, h) != (size, size):
            if w % size == 0 and h % size == 0:  # 128 -> 64 or 32: pool pixels together
                steps.append(tt.Downsample(sensor_size=sensor_size, target_size=(size, size)))
            else:  # 34 -> 32 (N-MNIST): drop the border
                steps.append(tt.CenterCrop(sensor_size=sensor_size, size=(size, size)))
            w = h = size
        self.sensor_size = (w, h, c)
        self.spatial = tt.Compose(steps) if steps else None
        self.duration_us = duration_us

    def _to_frames(self, events: np.ndarray) -> np.ndarray:
        """tonic's ToFrame over ``frames`` equal windows that cover the recording, both ends
        included (its ``n_time_bins`` drops the events of the last timestamp)."""
        import tonic.transforms as tt

        if self.duration_us is not None:
            start, end = 0, self.duration_us
        else:
            start, end = int(events["t"].min()), int(events["t"].max())
        window = (end - start + 1) / self.frames  # windows [start + i w, start + (i + 1) w)
        # ToFrame makes floor((end_time - start) / w) windows: half a window more keeps
        # float rounding from losing the last one
        return tt.ToFrame(sensor_size=self.sensor_size, time_window=window, start_time=start,
                          end_time=end + 1 + window / 2)(events)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        events = self.read(index)
        if self.spatial is not None:
            events = self.spatial(events)
        w, h, c = self.sensor_size
        if len(events) == 0:  # ToFrame cannot bin an empty recording
            counts = np.zeros((self.frames, c, h, w), dtype=np.float32)
        else:
            counts = self._to_frames(events)
        x = torch.from_numpy(np.asarray(counts, dtype=np.float32))
        return torch.log1p(x), int(self.targets[index])


# --------------------------------------------------------------------------- cache
def _cache_paths(root: Path, split: str) -> tuple[Path, Path]:
    d = root / "fashion-mnist-dvs"
    return d / f"{split}.npz", d / f"{split}.json"


def _save_npz(path: PathLike, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


def _generate(images: np.ndarray, sim: SaccadeDVS, *, chunk: int = 1000,
              progress: Optional[bool] = None, desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    evs, offs, base = [], [np.zeros(1, dtype=np.int64)], 0
    for start in tqdm(range(0, len(images), chunk), desc=desc, unit="chunk",
                      disable=None if progress is None else not progress, leave=False):
        ev, off = sim.simulate(images[start:start + chunk], first_index=start)
        evs.append(ev)
        offs.append(off[1:] + base)
        base += len(ev)
    return np.concatenate(evs), np.concatenate(offs)


def load_fashion_mnist_dvs(data_dir: Optional[PathLike] = None, *,
                           sim: Optional[SaccadeDVS] = None, download: bool = True,
                           progress: Optional[bool] = None) -> dict:
    """Events of Fashion-MNIST under ``sim`` (default :class:`SaccadeDVS`), generated once.

    Returns ``{"train": (events, offsets, labels), "val": (...)}`` (compact store dtype,
    see :meth:`SaccadeDVS.simulate`). The cache lives in ``data_dir/fashion-mnist-dvs/``
    (default :func:`~stas_core.fashion_mnist.default_data_dir`); a cache whose stored parameters
    differ from ``sim``'s is regenerated.
    """
    from .checkpoint import atomic_write, atomic_write_text

    sim = sim or SaccadeDVS()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    want = {"format": _CACHE_FORMAT, "generator": sim.to_dict()}
    out, images = {}, None
    for split, idx in (("train", 0), ("val", 1)):
        data_path, meta_path = _cache_paths(root, split)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and {k: meta.get(k) for k in want} == want and data_path.is_file():
            try:
                with np.load(data_path) as z:
                    out[split] = (z["events"], z["offsets"], z["labels"])
                continue
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("%s is unreadable (%s); regenerating it", data_path, exc)
        elif meta is not None:
            logger.info("%s was made with other generator parameters; regenerating it",
                        data_path)
        if images is None:
            images = load_fashion_mnist(data_dir, download)
        x, y = images[idx]
        logger.info("generating fashion-mnist-dvs %s events (%d images) into %s", split,
                    len(x), data_path.parent)
        ev, off = _generate(x[:, 0].numpy(), sim, progress=progress,
                            desc=f"fashion-mnist-dvs {split}")
        labels = y.numpy().astype(np.uint8)
        try:
            atomic_write(data_path, lambda tmp: _save_npz(tmp, events=ev, offsets=off,
                                                          labels=labels))
            atomic_write_text(meta_path, json.dumps({**want, "images": len(x),
                                                     "events": int(len(ev))}, indent=2) + "\n")
        except OSError as exc:
            raise DataError(f"cannot write the fashion-mnist-dvs cache to {data_path.parent}: "
                            f"{exc}; pass --data-dir with a writable folder") from exc
        out[split] = (ev, off, labels)
    return out


def fashion_mnist_dvs_frames(data_dir: Optional[PathLike] = None, *, frames: int,
                             sim: Optional[SaccadeDVS] = None,
                             download: bool = True) -> tuple[EventFrames, EventFrames]:
    """``(train, val)`` :class:`EventFrames` of fashion-mnist-dvs with ``frames`` bins."""
    sim = sim or SaccadeDVS()
    splits = load_fashion_mnist_dvs(data_dir, sim=sim, download=download)
    w, h = sim.sensor_size
    made = []
    for split in ("train", "val"):
        ev, off, labels = splits[split]
        made.append(EventFrames(lambda i, ev=ev, off=off: to_tonic(ev[off[i]:off[i + 1]]),
                                labels.astype(np.int64), sensor_size=(w, h, 2),
                                frames=frames, duration_us=sim.duration_us))
    return made[0], made[1]


# --------------------------------------------------------------------------- real event sets
@dataclass(frozen=True)
class EventSource:
    """Where a recorded event set lives (tonic's layout under ``data_dir/<folder>``)."""

    name: str
    folder: str          # tonic's class name = its folder under save_to
    sensor_size: tuple   # (W, H, polarities)
    layout: str          # the expected files, for the error message
    tonic_class: str


EVENT_SOURCES: dict[str, EventSource] = {
    "nmnist": EventSource(
        "nmnist", "NMNIST", (34, 34, 2),
        "NMNIST/Train/<digit 0-9>/*.bin and NMNIST/Test/<digit 0-9>/*.bin (the extracted "
        "train.zip / test.zip of N-MNIST: 5-byte events)", "NMNIST"),
    "dvs-gesture": EventSource(
        "dvs-gesture", "DVSGesture", (128, 128, 2),
        "DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy and "
        "DVSGesture/ibmGestureTest/... (tonic's preprocessed release ibmGestureTrain.tar.gz / "
        "ibmGestureTest.tar.gz, extracted: [N, 4] arrays x, y, p, t in ms)", "DVSGesture"),
    "cifar10-dvs": EventSource(
        "cifar10-dvs", "CIFAR10DVS", (128, 128, 2),
        "CIFAR10DVS/<class>/*.aedat4 with class in airplane, automobile, bird, cat, deer, "
        "dog, frog, horse, ship, truck (the extracted CIFAR10DVS.zip and its per-class zips)",
        "CIFAR10DVS"),
}
CIFAR10DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                      "ship", "truck")
#: share of each CIFAR10-DVS class held out for testing (no published split exists)
CIFAR10DVS_TEST_SHARE = 0.1


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())


def _nmnist(root: Path, train: bool) -> tuple[list, list, Callable]:
    from tonic.datasets import NMNIST
    from tonic.io import read_mnist_file

    files = _files(root / ("Train" if train else "Test"), ".bin")
    targets = [int(p.parent.name) for p in files]
    return files, targets, lambda p: read_mnist_file(str(p), dtype=NMNIST.dtype)


def _dvs_gesture(root: Path, train: bool) -> tuple[list, list, Callable]:
    from numpy.lib import recfunctions
    from tonic.datasets import DVSGesture

    files = _files(root / ("ibmGestureTrain" if train else "ibmGestureTest"), ".npy")

    def read(p: Path) -> np.ndarray:  # as DVSGesture.__getitem__: x, y, p, t (ms -> us)
        ev = np.load(p)
        ev[:, 3] *= 1000
        return recfunctions.unstructured_to_structured(ev, DVSGesture.dtype)

    return files, [int(p.stem) for p in files], read


def _cifar10_dvs(root: Path, train: bool, seed: int) -> tuple[list, list, Callable]:
    from tonic.io import read_aedat4

    files, targets = [], []
    for label, cls in enumerate(CIFAR10DVS_CLASSES):
        found = _files(root / cls, ".aedat4")
        g = np.random.default_rng([seed, label])  # a fixed seeded 90/10 split per class
        order = g.permutation(len(found))
        n_test = int(round(CIFAR10DVS_TEST_SHARE * len(found)))
        keep = order[n_test:] if train else order[:n_test]
        files += [found[i] for i in sorted(keep)]
        targets += [label] * len(keep)

    def read(p: Path) -> np.ndarray:
        try:
            ev = read_aedat4(str(p))
        except ImportError as exc:  # tonic's reader imports the decoder lazily
            raise DataError("reading CIFAR10-DVS .aedat4 files needs tonic's decoder, the "
                            "aedat package: pip install aedat") from exc
        out = np.empty(len(ev), dtype=EVENT_DTYPE)
        for name in ("x", "y", "t"):
            out[name] = ev[name]
        out["p"] = ev["on"] if "on" in ev.dtype.names else ev[ev.dtype.names[-1]]
        return out

    return files, targets, read


def _download(src: EventSource, root: Path) -> None:
    """Let tonic's dataset class fetch and extract the set into ``root`` (online only)."""
    import tonic.datasets

    cls = getattr(tonic.datasets, src.tonic_class)
    logger.info("%s not found in %s; trying tonic's download", src.name, root / src.folder)
    kwargs = [{"train": True}, {"train": False}] if src.name != "cifar10-dvs" else [{}]
    for kw in kwargs:
        cls(save_to=str(root), **kw)


def load_event_dataset(name: str, data_dir: Optional[PathLike] = None, *, frames: int,
                       size: Optional[int] = None, seed: int = 0, download: bool = False
                       ) -> tuple[EventFrames, EventFrames]:
    """``(train, val)`` frames of a recorded event set from the user's files.

    The files sit where tonic's dataset class with ``save_to=data_dir`` keeps them (see
    :data:`EVENT_SOURCES` for each layout) and are read with tonic's readers. tonic's
    classes only accept a folder that still holds the downloaded archive next to at least
    10000 (N-MNIST), 100 (DVS Gesture) or 1000 (CIFAR10-DVS) extracted files, and try to
    download otherwise; so the extracted folders are enumerated here exactly as tonic does,
    and tonic's class is used only to download (``download=True``, online machines).
    CIFAR10-DVS has no published split: a fixed split seeded by ``seed`` holds out
    :data:`CIFAR10DVS_TEST_SHARE` of every class for testing.
    """
    if name not in EVENT_SOURCES:
        raise ConfigError(f"unknown event set {name!r}; expected one of "
                          f"{', '.join(EVENT_SOURCES)}")
    src = EVENT_SOURCES[name]
    root = Path(data_dir).expanduser() if data_dir is not None else _default_root()
    folder = root / src.folder

    def listing(train: bool):
        if name == "nmnist":
            return _nmnist(folder, train)
        if name == "dvs-gesture":
            return _dvs_gesture(folder, train)
        return _cifar10_dvs(folder, train, seed)

    splits = [listing(True), listing(False)]
    if (not splits[0][0] or not splits[1][0]) and download:
        try:
            _download(src, root)
        except Exception as exc:  # tonic raises plain URLError, RuntimeError, OSError, ...
            logger.warning("%s download failed: %s", name, exc)
        splits = [listing(True), listing(False)]
    if not splits[0][0] or not splits[1][0]:
        which = " and ".join(s for s, sp in zip(("train", "test"), splits) if not sp[0])
        raise DataError(
            f"{name}: no {which} recordings found in {folder}. Expected {src.layout}. Fix: "
            f"put the extracted files there (or pass --data-dir with the folder that "
            f"contains {src.folder}/)" + ("" if download else ", or allow the download "
                                          "with network access") + ".")
    w = src.sensor_size[0]
    out = []
    for files, targets, read in splits:
        def read_index(i: int, files=files, read=read) -> np.ndarray:
            try:
                return read(files[i])
            except (OSError, ValueError, IndexError, KeyError) as exc:
                raise DataError(f"cannot read {files[i]} as a {name} recording: {exc}; "
                                f"replace the file") from exc
        out.append(EventFrames(read_index, targets, sensor_size=src.sensor_size,
                               frames=frames, size=size if size and size != w else None,
                               files=files))
    logger.info("%s from %s: %d train / %d test recordings", name, folder, len(out[0]),
                len(out[1]))
    return out[0], out[1]


def _default_root() -> Path:

    return default_data_dir()


# --------------------------------------------------------------------------- pictures
def save_event_samples_png(dataset: EventFrames, path: PathLike, *, samples: int = 6,
                           classes: Optional[Sequence[str]] = None) -> None:
    """A PNG of ``samples`` recordings: one row per sample, one column per frame, ON events
    red and OFF events blue (the log1p counts of each frame)."""
    from matplotlib.figure import Figure

    from .checkpoint import atomic_write

    n = min(samples, len(dataset))
    frames = int(dataset[0][0].shape[0])  # [T, 2, H, W]; a split is a Subset of the set
    fig = Figure(figsize=(1.6 * frames + 0.8, 1.6 * n))
    axes = fig.subplots(n, frames, squeeze=False)
    for i in range(n):
        x, y = dataset[i]
        top = float(x.max()) or 1.0
        for t in range(frames):
            rgb = np.zeros((*x.shape[-2:], 3))
            rgb[..., 0] = x[t, 1].numpy() / top  # ON
            rgb[..., 2] = x[t, 0].numpy() / top  # OFF
            ax = axes[i, t]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {t + 1}", fontsize=8)
            if t == 0:
                ax.set_ylabel(classes[y] if classes else f"label {y}", fontsize=8)
    fig.suptitle("fashion-mnist-dvs: ON (red) / OFF (blue) events per frame", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
