"""The device a model runs on, and the GPU errors that end a process: which device an actor's Predictor takes
(choose_device), why CUDA is unusable (CudaUnusable), and the CUDA errors that leave a GPU broken for the rest of
the process (DeviceFailed)."""

from __future__ import annotations

import torch

from imgxlate.errors import one_line


class CudaUnusable(RuntimeError):
    """A model was given GPUs, but this process's torch cannot use CUDA (no driver, a driver older than the
    build needs, no device visible): running it on the CPU instead would be silently slow."""


def cuda_problem() -> str:
    """Why torch cannot use CUDA here, in words ('' when it can)."""
    if torch.cuda.is_available():
        return ""
    try:
        torch.cuda.init()
        why = "no CUDA device is visible (CUDA_VISIBLE_DEVICES)"
    except Exception as e:
        why = one_line(e, 300) or type(e).__name__
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({build}) cannot use a GPU here: {why}"


def choose_device(gpus: float | None = None) -> str:
    """The device of a model in this process: ``gpus`` is what the process was given (a model actor's
    --gpus-per-actor, or what Ray assigned a worker). 0: the CPU, even where CUDA is visible (a CPU actor on a GPU
    node must not take GPU 0); more: CUDA, or CudaUnusable; None (not known, outside Ray): CUDA when usable."""
    if gpus is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if gpus <= 0:
        return "cpu"
    if problem := cuda_problem():
        raise CudaUnusable(f"given {gpus:g} GPU(s), but {problem}. Install the torch build that matches the "
                           f"node's NVIDIA driver (a CUDA 13 build needs driver 580 or later; see cluster/), or "
                           f"run on CPUs with --gpus-per-actor 0")
    return "cuda"


# A CUDA error that leaves the device unusable for the rest of the process: every later call fails too.
STICKY_CUDA = ("illegal memory access", "device-side assert", "misaligned address", "unspecified launch failure",
               "illegal instruction", "uncorrectable ECC", "CUBLAS_STATUS_EXECUTION_FAILED", "cudaErrorLaunchFailure")


class DeviceFailed(RuntimeError):
    """The device is in an error state that every later call in this process would meet (a sticky CUDA error):
    not one image's failure. The process must end (a model actor exits, and Ray restarts it and retries its
    block)."""


def sticky_device_error(e: BaseException) -> bool:
    return not isinstance(e, torch.OutOfMemoryError) and any(m in str(e) for m in STICKY_CUDA)
