"""Stage faults on real stages (wrapped to raise): device faults and broken stages fail the shard, OOM halves."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import torch

from mlcid.writer import shard_name
from pipelines.faults import DeviceFault, FaultPolicy, ShardFault, StageFault, is_device_fault, is_oom
from pipelines.runner import ShardProcessor, outcomes_name
from tests.builders import classical_config, input_records, write_input_shard

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


class Faulty:
    """Wraps a real, set-up stage; `fault(batch)` returns an exception to raise instead of running it, or None."""

    def __init__(self, stage, fault):
        self.stage, self.fault, self.calls = stage, fault, []
        self.kind = stage.kind

    def setup(self):
        pass

    def __call__(self, batch):
        self.calls.append(len(batch))
        err = self.fault(batch)
        if err is not None:
            raise err
        return self.stage(batch)


def wrap(proc: ShardProcessor, kind: str, fault) -> Faulty:
    i = next(i for i, (k, _) in enumerate(proc.stages) if k == kind)
    proc.stages[i] = (kind, Faulty(proc.stages[i][1], fault))
    return proc.stages[i][1]


def visible(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def shard(tmp_path) -> str:
    return write_input_shard(tmp_path / "00005.tar", input_records(8, seed=5, shard=5))


def test_classification():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_device_fault(RuntimeError("CUDA out of memory"))
    assert is_device_fault(RuntimeError(CUDA_FAULT)) and not is_oom(RuntimeError(CUDA_FAULT))
    assert is_device_fault(RuntimeError("CUDNN_STATUS_EXECUTION_FAILED"))
    wrapped = ValueError("stage failed")
    wrapped.__cause__ = RuntimeError("device-side assert triggered")
    assert is_device_fault(wrapped)
    assert not is_device_fault(ValueError("bad box")) and not is_oom(ValueError("bad box"))
    assert DeviceFault.retire_worker and not StageFault.retire_worker


def test_device_fault_fails_the_shard_and_a_rerun_completes_it(shard, tmp_path):
    out = tmp_path / "out"
    proc = ShardProcessor(classical_config()).setup()
    faulty = wrap(proc, "saliency", lambda b: RuntimeError(CUDA_FAULT))
    with pytest.raises(DeviceFault, match="illegal memory access") as info:
        proc.process(shard, str(out))
    assert info.value.retire_worker
    assert faulty.calls == [8]  # no item-by-item retry on a broken device
    assert visible(out) == []  # no tar, no outcomes, no stats: resume and the pool see it as not done
    stats = ShardProcessor(classical_config()).setup().process(shard, str(out))
    assert not stats["skipped"] and stats["read"] == 8 and "stage_error:saliency" not in stats["dropped"]


def test_out_of_memory_halves_the_batch_and_keeps_every_item(shard, tmp_path):
    clean = ShardProcessor(classical_config()).setup().process(shard, str(tmp_path / "clean"))
    proc = ShardProcessor(classical_config()).setup()
    faulty = wrap(proc, "saliency",
                  lambda b: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB") if len(b) > 2 else None)
    stats = proc.process(shard, str(tmp_path / "out"))
    assert faulty.calls == [8, 4, 2, 2, 2, 2]  # 8 → OOM, 4 → OOM, then batches of 2
    assert proc.batch_caps["saliency"] == 2  # later shards start at the size that fit
    assert stats["written"] == clean["written"] and stats["dropped"] == clean["dropped"]


def test_out_of_memory_on_one_item_fails_the_shard(shard, tmp_path):
    proc = ShardProcessor(classical_config()).setup()
    wrap(proc, "saliency", lambda b: torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(StageFault, match="out of memory on a single item"):
        proc.process(shard, str(tmp_path / "out"))
    assert visible(tmp_path / "out") == []


def test_a_stage_failing_every_item_of_a_batch_fails_the_shard(shard, tmp_path):
    proc = ShardProcessor(classical_config()).setup()
    faulty = wrap(proc, "cutout", lambda b: ValueError("driver returned garbage"))
    with pytest.raises(StageFault, match="every item of a batch of 8"):
        proc.process(shard, str(tmp_path / "out"))
    assert faulty.calls == [8] + [1] * 8  # the batch, then each item alone
    assert visible(tmp_path / "out") == []


def test_stage_error_share_over_the_budget_fails_the_shard(shard, tmp_path):
    bad = {"000050001", "000050003", "000050006"}

    def fault(batch):
        return ValueError("bad item") if any(it.key in bad for it in batch) else None

    proc = ShardProcessor(classical_config()).setup()
    wrap(proc, "saliency", fault)
    with pytest.raises(StageFault, match="3 of 8 items hit stage errors"):
        proc.process(shard, str(tmp_path / "out"))
    assert visible(tmp_path / "out") == []
    # A looser budget keeps the shard: the three items are dropped with their reason, the rest are written.
    proc = ShardProcessor(classical_config(), FaultPolicy(max_stage_error_frac=0.5)).setup()
    wrap(proc, "saliency", fault)
    stats = proc.process(shard, str(tmp_path / "out"))
    assert stats["dropped"]["stage_error:saliency"] == 3
    rows = pq.read_table(tmp_path / "out" / outcomes_name(5, "mlcid")).to_pylist()
    assert {r["key"] for r in rows if r["reason"] == "stage_error:saliency"} == bad
    assert all("ValueError: bad item" in r["detail"] for r in rows if r["key"] in bad)
    assert (tmp_path / "out" / shard_name(5)).exists()


def test_fault_policy_rejects_bad_values():
    with pytest.raises(ValueError):
        FaultPolicy(max_stage_error_frac=1.5)
    with pytest.raises(ValueError):
        FaultPolicy(min_stage_errors=0)
    assert issubclass(StageFault, ShardFault) and issubclass(DeviceFault, ShardFault)
