"""Single-pass CPU kernels for the neuron updates, built from ``csrc/kernels.cpp`` on first use.

The PyTorch-op forms (``convert.ops.integrate_and_fire``, ``neurons._FusedNeuronFn``) make
5-13 passes over memory per step; these kernels make one, which is what bounds a spiking
step on a CPU. They give the same results (bitwise for the multi-threshold neuron: tested)
and are used for CPU tensors when available. The build needs a C++ compiler and takes
about a minute once (cached by ``torch.utils.cpp_extension`` under
``TORCH_EXTENSIONS_DIR``); without one, or with ``STAS_KERNELS=0``, the PyTorch-op path
runs instead and one warning says why.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Optional

from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_lock = threading.Lock()
_state: dict = {"module": None, "tried": False, "why": None}


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction set (the build uses ``-march=native``), so a
    cache shared by different machines never loads another CPU's build."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _vector_capability() -> str:
    """The instruction set PyTorch's own CPU kernels run with here (``AVX512``, ``AVX2``,
    ``DEFAULT``, ...): ``at::vec`` in the extension is built for the same one."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # an old or unusual build: the portable vectors
        return "DEFAULT"


def _capability_flags(capability: str) -> list[str]:
    """Defines that select ``at::vec``'s vectors for ``capability`` (x86 only: elsewhere
    the portable ones, which are correct, only slower)."""
    if capability in ("AVX512", "AVX2") and platform.machine() in ("x86_64", "AMD64"):
        return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` turns a default-on setting off
    (``0``, ``false``, ``off`` or ``no``, any case)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether the kernels may be used (``STAS_KERNELS=0`` turns them off)."""
    return not switched_off("STAS_KERNELS")


def build(source: Path, name: str = "stas_kernels") -> object:
    """Compile ``source`` (a version of ``csrc/kernels.cpp``) into a module named ``name``
    plus this CPU's tags, with the flags every build uses (``bench/kernel_ab.py`` builds an
    earlier revision beside the current one this way). Raises when the build fails."""
    from torch.utils.cpp_extension import load as compile_extension

    capability = _vector_capability()
    return compile_extension(
        name=f"{name}_{_cpu_tag()}_{capability.lower()}", sources=[str(source)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off",
                      "-fno-trapping-math", "-fno-math-errno", *_capability_flags(capability)],
        extra_ldflags=["-fopenmp"], verbose=False)


def load() -> Optional[object]:
    """The compiled extension, building it on the first call; None when unavailable."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        try:
            log.info("preparing the single-pass neuron kernels "
                     "(about a minute the first time; cached)")
            _state["module"] = build(_SOURCE)
        except Exception as err:  # no compiler, no ninja, a failed build: use torch ops
            _state["why"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}"
            log.warning("single-pass neuron kernels unavailable (%s); using PyTorch ops",
                        _state["why"])
        return _state["module"]


def usable(*tensors: Optional[Tensor], dtypes: tuple = (), autograd: bool = False) -> bool:
    """Whether a kernel can run on ``tensors``: CPU, of ``dtypes``, nothing to
    differentiate (unless the caller has an ``autograd`` form), not traced or compiled,
    and the extension built."""
    import torch

    dtypes = dtypes or (torch.float32, torch.float64)
    if not enabled() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    if any(t is not None and (t.device.type != "cpu" or t.dtype not in dtypes)
           for t in tensors):
        return False
    if not autograd and torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                         for t in tensors):
        return False  # the kernel has no autograd form
    if torch.compiler.is_compiling():
        return False
    return load() is not None


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse: no ``mmap`` per large block and no
    trimming, so a new tensor reuses pages the process already has.

    PyTorch's CPU allocator calls malloc per tensor. A spiking step makes many large
    temporaries (membranes, spikes, compensation sums); above glibc's mmap threshold each
    one is mapped fresh and every page is faulted in and zeroed by the kernel, which on a
    2-core machine cost as much as the arithmetic (a 51 MB ``x * 2`` took 43 ms instead of
    4.4 ms). The price: the process keeps its peak memory instead of returning freed
    memory to the system, as a caching allocator does. Process-wide, so the CLIs call it
    at start (``STAS_MALLOC_TUNE=0`` turns it off); a no-op off glibc. Returns whether it
    took effect."""
    import ctypes
    import ctypes.util

    if switched_off("STAS_MALLOC_TUNE"):
        return False
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
