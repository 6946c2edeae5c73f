"""Stage faults: which exceptions fail a whole shard, which halve the batch, and the per-shard error budget.

A stage exception is one of three things:
- out of memory (`torch.OutOfMemoryError`, or a RuntimeError saying "out of memory"): the runner halves the
  batch and retries; only a single item that still does not fit fails the shard;
- a device fault (CUDA/cuDNN/cuBLAS/NCCL error, device-side assert, illegal memory access): the device state
  is no longer trustworthy, so the shard fails at once with `DeviceFault` — whose `retire_worker` tells the
  Ray pool to replace the actor that raised it and to retry the shard on another one;
- anything else: the batch is retried item by item and the items that still fail are dropped with reason
  `stage_error:<kind>`. When every item of a batch fails that way, or the stage-error share of a shard passes
  `FaultPolicy.max_stage_error_frac`, the shard fails with `StageFault` instead (a broken stage, not bad items).
A failed shard leaves nothing visible and writes no stats, so resume and the pool's retries run it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STAGE_ERROR_PREFIX = "stage_error:"

_DEVICE_FAULT = re.compile(
    r"CUDA error|CUDA driver|cuda runtime error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error|"
    r"device-side assert|illegal memory access|illegal instruction|misaligned address|ECC error|"
    r"HIP error|XPU error|unspecified launch failure",
    re.IGNORECASE,
)
_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|failed to allocate", re.IGNORECASE)


@dataclass
class FaultPolicy:
    """When per-item stage errors stop being "bad items" and become "a broken stage" that fails the shard."""

    max_stage_error_frac: float = 0.05  # fail the shard when more than this share of its items hit stage errors
    min_stage_errors: int = 3  # … and at least this many (a 4-image test shard with one bad image is fine)
    halve_on_oom: bool = True  # retry an out-of-memory batch in halves before failing the shard

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_stage_error_frac <= 1.0:
            raise ValueError(f"max_stage_error_frac must be in [0, 1], got {self.max_stage_error_frac}")
        if self.min_stage_errors < 1:
            raise ValueError(f"min_stage_errors must be ≥ 1, got {self.min_stage_errors}")

    def over_budget(self, stage_errors: int, items: int) -> bool:
        """True when `stage_errors` of `items` is more than the shard may lose to stage errors."""
        return stage_errors >= self.min_stage_errors and stage_errors > self.max_stage_error_frac * items


class ShardFault(RuntimeError):
    """The shard cannot be finished here; nothing of it is published and the pool may retry it elsewhere."""

    retire_worker = False  # read by the Ray pool: replace the actor that raised this


class StageFault(ShardFault):
    """A stage failed on a whole batch, or on more items than the shard's error budget allows."""


class DeviceFault(ShardFault):
    """The accelerator raised (CUDA error, device-side assert…): the worker's device state is suspect."""

    retire_worker = True


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error (torch's own class, or a RuntimeError whose message says so)."""
    try:
        import torch

        if any(isinstance(x, torch.OutOfMemoryError) for x in _chain(e)):
            return True
    except ImportError:
        pass
    return any(isinstance(x, (RuntimeError, MemoryError)) and (isinstance(x, MemoryError) or _OOM.search(str(x)))
               for x in _chain(e))


def is_device_fault(e: BaseException) -> bool:
    """A device error after which the worker's accelerator context must not be trusted (not an OOM)."""
    if is_oom(e):
        return False
    try:
        import torch

        if any(isinstance(x, torch.AcceleratorError) for x in _chain(e)):
            return True
    except (ImportError, AttributeError):
        pass
    return any(_DEVICE_FAULT.search(f"{type(x).__name__}: {x}") for x in _chain(e))


def free_device_memory() -> None:
    """Return cached accelerator memory after an OOM so the halved retry can use it."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def describe(e: BaseException, limit: int = 500) -> str:
    return f"{type(e).__name__}: {e}"[:limit]
