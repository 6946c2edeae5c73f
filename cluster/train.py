"""Multi-worker LayerDiff training through Ray Train: the same `model.training.trainer.Trainer` in each DDP worker.

    layerdiff train --data SHARDS --out RUN --workers 2 [--gpu] [--max-failures N] [trainer options]   (cli/train.py)

`ray.train.torch.TorchTrainer` starts `workers` processes, sets up torch.distributed (gloo on CPU, nccl with
`--gpu`) and runs `train_loop_per_worker`, which builds the Trainer; every worker streams its own shards
(rank × loader-worker split), rank 0 writes logs, checkpoints and the final pipeline folder. RUN is a path
every worker can reach (one machine, a shared filesystem) or an object-storage URL (`s3://bucket/runs/x`).

A lost worker is not a lost run: with `FailureConfig(max_failures=N)` Ray restarts the worker group and each
worker resumes from the newest complete checkpoint (weights, optimiser, RNG, data position), so the losses
continue as if uninterrupted and `metrics.jsonl` keeps every step once. Divergence (NaN) is reported, not raised,
so Ray does not retry it: rank 0 writes `diverged.json` into the run folder, every worker returns, and the driver
raises `TrainingDiverged` (exit 3). Ray runs in-process unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.ray_env import RayEnvConfig, ray_session
from model.training.checkpoint import CheckpointError
from model.training.config import TrainConfig, config_from_dict, config_to_dict
from model.training.data_check import check_training_data
from model.training.outcome import TrainingDiverged
from model.training.run_folder import RunFolder, is_remote
from model.training.trainer import RESUME_IF_ANY, Trainer

log = logging.getLogger(__name__)

DIVERGED = "diverged.json"  # rank 0 writes why it stopped instead of raising (a raise would be retried)
CLUSTER_MAX_FAILURES = 3  # default restarts of the worker group when joining a cluster (0 in-process)


@dataclass
class LaunchConfig:
    """How many DDP workers, on what, and how many worker-group restarts Ray may make."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    num_cpus: float | None = None  # in-process Ray only (default: this machine's cores, at least the workers')
    max_failures: int | None = None  # None: CLUSTER_MAX_FAILURES when joining a cluster, else 0


def _absolute(location: str) -> str:
    """Local shard specs and run folders made absolute (Ray workers may run in another working directory)."""
    return " ".join(s if "://" in s else os.path.abspath(s) for s in location.split())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker (torch.distributed already initialised), on every (re)start."""
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_dict(loop_config["config"])
    trainer = Trainer(config, loop_config["data"], loop_config["out"], resume=loop_config["resume"],
                      device=ray.train.torch.get_device())
    try:
        trainer.setup().train()
    except TrainingDiverged as e:  # every rank sees the same all-reduced loss, so all of them end up here
        if trainer.is_main:
            run = RunFolder.open(loop_config["out"])
            (run.local / DIVERGED).write_text(json.dumps({"message": str(e)}))
            run.publish(DIVERGED)
            run.close()


def _check_run_folder(out: str, resume: bool | str) -> None:
    """Refuse before starting Ray: checkpoints in a run not asked to resume, or --resume with nothing to resume.
    A `diverged.json` from an earlier attempt is removed."""
    run = RunFolder.open(out)
    try:
        latest = run.latest()
        run.remove(DIVERGED)
    finally:
        run.close()
    if not resume and latest is not None:
        raise FileExistsError(f"{out} already holds {latest.rsplit('/', 1)[-1]}; pass --resume to continue it "
                              "or choose a new --out")
    if resume is True and latest is None:
        raise CheckpointError(f"--resume: no complete checkpoint-* folder in {out}")


def launch(config: TrainConfig, data: str, out: str | Path, launch_config: LaunchConfig = LaunchConfig(),
           resume: bool | str | Path = False) -> None:
    """Train with DDP workers through Ray Train; raise `TrainingDiverged`/`RuntimeError` on failure."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    lc = launch_config
    if lc.workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {lc.workers}")
    out = str(out) if is_remote(out) else os.path.abspath(out)
    explicit = str(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else None
    if explicit is not None and not is_remote(explicit):
        explicit = os.path.abspath(explicit)
    # 1. Fail fast, before Ray starts: the data and the run folder.
    check_training_data(data, config.data)
    _check_run_folder(out, resume if explicit is None else explicit)
    loop_config = {
        "config": config_to_dict(config),
        "data": _absolute(data),
        "out": out,
        # a restarted worker group resumes from the newest checkpoint (an explicit one is kept on every attempt)
        "resume": explicit or RESUME_IF_ANY,
    }
    ray_cfg = RayEnvConfig(num_cpus=lc.num_cpus if lc.num_cpus is not None
                           else max(os.cpu_count() or 1, lc.workers * lc.cpus_per_worker))
    # 2. Ray Train's own state stays local: checkpoints live in the run folder (see model.training.run_folder).
    ray_storage = out + "/ray" if not is_remote(out) else tempfile.mkdtemp(prefix="layerdiff-ray-")
    max_failures = lc.max_failures
    if max_failures is None:
        max_failures = CLUSTER_MAX_FAILURES if ray_cfg.resolved_address() else 0
    with ray_session(ray_cfg) as resources:
        log.info("Ray resources %s; launching %d %s worker(s), up to %d restart(s)", resources, lc.workers,
                 "GPU" if lc.use_gpu else "CPU", max_failures)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if lc.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=lc.workers, use_gpu=lc.use_gpu, resources_per_worker={"CPU": lc.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name=f"layerdiff-train-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=ray_storage,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
            ),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps worker errors (TrainingFailedError / WorkerGroupError)
            raise RuntimeError(f"Ray Train failed: {str(e)[-1500:]}") from e
    # Ray Train V2 keeps metrics only with its own checkpoints; the run folder says how the run ended.
    run = RunFolder.open(out)
    try:
        if run.fetch(DIVERGED):
            raise TrainingDiverged(json.loads((run.local / DIVERGED).read_text())["message"])
    finally:
        run.close()
    log.info("training finished; run folder %s", out)
