"""Where and how precisely a network computes: the device (``auto``/``cpu``/``cuda``), its
preparation per fold, mixed precision, torch's thread count, timers that wait for the device,
peak memory, and the environment record. Training (:mod:`.loop`), the pretext (:mod:`.pretext`)
and ``pretrain`` share these rules."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
import typing

import numpy as np
import torch

from ..config import Precision
from ..constants import __version__


def environment(device: torch.device, threads: int | None = None) -> dict:
    """Where and with what weights are being computed (the record's ``environment``: versions,
    platform, device, and the torch threads training uses: ``threads``, else torch's setting
    now). It changes the time and, on a CPU, the last bits of the weights, not the recipe; cv's
    ``run.json`` (with the folds' threads), fit's bundle and pretrain's record keep it.
    CUDA is queried only for a CUDA ``device``, so a client of remote workers never
    initialises it."""
    import monai
    import sklearn

    return {
        "nmosd_ms": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "scikit_learn": sklearn.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" and torch.cuda.is_available()
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
    }


def resolve_device(device: str, check: bool = True) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" is refused where no GPU is (unless
    ``check`` is False: the name is then only parsed, for a device on another machine)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if check and device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import NmosdError

        raise NmosdError(
            "device 'cuda' was asked for but no CUDA device is available", option="device"
        )
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        from ..errors import NmosdError

        raise NmosdError(f"device must be auto, cpu or cuda, not {device!r}", option="device")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads (0: leave torch's setting), and restore the
    previous number after it: ``cv``'s folds, ``fit`` and ``pretrain`` share this rule, and a
    notebook that calls them keeps its own setting."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (torch's setting) or more, not {threads}")
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


assert set(AUTOCAST_DTYPES) | {"fp32"} == set(typing.get_args(Precision))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX). Without it, bf16 is
    emulated: measured on an AVX2-only AMD EPYC, a two-view-18 epoch at 100³ took 20-30 s in
    bf16 against 2-3 s in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an op this torch build does not have
        return False


def clock(dev: torch.device) -> float:
    """A timer reading that waits for the device's queued work (CUDA runs asynchronously)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def prepare_device(dev: torch.device, precision: str) -> None:
    """Per fold, on the device it trains on: refuse bf16 on a GPU without native bf16
    (compute capability < 8.0; fp16 is the one to use there), make fp32 mean fp32 (no TF32 in
    matmuls or cuDNN convolutions), set cuBLAS's deterministic workspace, and reset the peak
    memory counter so that each fold's peak is its own."""
    if dev.type != "cuda":
        return
    import os

    from ..errors import NmosdError

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise NmosdError(
            f"{torch.cuda.get_device_name(dev)} has no native bf16 (compute capability below "
            "8.0); use fp16 on this GPU",
            option="precision",
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_float32_matmul_precision("highest")  # no TF32 in matmuls
    torch.backends.cudnn.allow_tf32 = False  # nor in cuDNN convolutions
    torch.cuda.reset_peak_memory_stats(dev)


def precision_note(precision: str, device: str) -> str | None:
    """A sentence for the user when ``precision`` will run slowly on ``device``, else None."""
    if precision == "bf16" and resolve_device(device).type == "cpu" and not cpu_has_native_bf16():
        return (
            "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and runs about "
            "10x slower than fp32 here; fp32 is faster on this machine"
        )
    return None


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
