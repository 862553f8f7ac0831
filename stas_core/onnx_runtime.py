"""Run exported models with onnxruntime: top-1, images/s and token ratio over a dataset."""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, Optional

import numpy as np

from .errors import DataError
from .export import FORMAT, ort_providers, ort_session


class OnnxModel:
    """An exported STAS model in an onnxruntime session, with its ``stas`` metadata."""

    def __init__(self, path: str | os.PathLike, *, threads: Optional[int] = None,
                 device: str = "auto") -> None:
        if not os.path.isfile(path):
            raise DataError(f"no ONNX model at {path}; export one with stas-export CKPT --out "
                            f"{path}")
        ort_providers(device)  # a bad device is its own error, not an unreadable file
        try:
            self.session = ort_session(path, threads, device)
        except Exception as exc:  # onnxruntime's errors for unreadable files
            raise DataError(f"{path} is not a readable ONNX model: "
                            f"{str(exc).strip().splitlines()[0]}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("stas")
        self.meta = json.loads(raw) if raw else {}
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{path} was not written by stas-export (no {FORMAT} metadata); "
                            f"export the model with stas-export")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {"images": images})))


def evaluate_onnx(model: OnnxModel, loader: Iterable, *, progress=None) -> dict:
    """Top-1, images/s (inference only) and, for halting graphs, the mean token ratio."""
    correct = total = 0
    seconds = ratio_sum = 0.0
    for images, labels in loader:
        x = images.numpy().astype(np.float32, copy=False)
        start = time.perf_counter()
        out = model(x)
        seconds += time.perf_counter() - start
        correct += int((out["logits"].argmax(-1) == labels.numpy()).sum())
        total += len(labels)
        if "token_ratio" in out:
            ratio_sum += float(out["token_ratio"].sum())
        if progress is not None:
            progress.update(1)
    result = {"top1": correct / max(total, 1), "test_images": total, "seconds": seconds,
              "images_per_s": total / seconds if seconds else 0.0}
    if "token_ratio" in model.outputs:
        result["token_ratio"] = ratio_sum / max(total, 1)
    return result
