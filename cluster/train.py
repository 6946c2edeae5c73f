"""Multi-worker LayerDiff training through Ray Train: the same `model.training.trainer.Trainer` in each DDP worker.

    python -m cluster.train --data SHARDS --out RUN --workers 2 [--gpu] [model.training.trainer options]
    python -m model.training.trainer ... --workers 2          # delegates here

`ray.train.torch.TorchTrainer` starts `workers` processes, sets up torch.distributed (gloo on CPU, nccl with
`--gpu`) and runs `train_loop_per_worker`, which builds the Trainer; every worker streams its own shards
(rank × loader-worker split), rank 0 writes logs, checkpoints and the final pipeline folder. Ray runs
in-process unless RAY_ADDRESS names a cluster; its files stay under $RAY_TMPDIR. RUN must be a folder every
worker can reach (one machine, or a shared filesystem on a cluster).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from cluster.ray_env import RayEnvConfig, ray_session
from model.training.config import TrainConfig, config_from_dict, config_to_dict

log = logging.getLogger(__name__)


def _absolute_shards(data: str) -> str:
    """Make local shard specs absolute (Ray workers may run in another working directory)."""
    return " ".join(s if "://" in s else os.path.abspath(s) for s in data.split())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker: torch.distributed is already initialised by Ray."""
    import ray.train
    import ray.train.torch

    from model.training.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_dict(loop_config["config"])

    def report(metrics: dict[str, Any]) -> None:
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    trainer = Trainer(config, loop_config["data"], loop_config["out_dir"], resume=loop_config["resume"],
                      device=ray.train.torch.get_device(), on_step=report)
    trainer.setup().train()


def launch(
    config: TrainConfig,
    data: str,
    out_dir: str | Path,
    workers: int = 2,
    use_gpu: bool = False,
    resume: bool | str | Path = False,
    cpus_per_worker: float = 1.0,
    num_cpus: float | None = None,
) -> None:
    """Train with `workers` DDP processes through Ray Train; raise `TrainingDiverged`/`RuntimeError` on failure."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from model.training.trainer import TrainingDiverged

    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    loop_config = {
        "config": config_to_dict(config),
        "data": _absolute_shards(data),
        "out_dir": str(out_dir),
        "resume": str(Path(resume).absolute()) if isinstance(resume, (str, Path)) else bool(resume),
    }
    ray_cfg = RayEnvConfig(num_cpus=num_cpus if num_cpus is not None else max(os.cpu_count() or 1, workers * cpus_per_worker))
    with ray_session(ray_cfg) as resources:
        log.info("Ray resources %s; launching %d %s worker(s)", resources, workers, "GPU" if use_gpu else "CPU")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name="layerdiff-train", storage_path=str(out_dir / "ray"),
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps worker errors (TrainingFailedError / WorkerGroupError)
            text = str(e)
            if "TrainingDiverged" in text or "training diverged" in text:
                raise TrainingDiverged(f"a training worker diverged: {text[-600:]}") from e
            raise RuntimeError(f"Ray Train failed: {text[-1500:]}") from e
    log.info("training finished; run folder %s", out_dir)


def main(argv: list[str] | None = None) -> int:
    """Same options as `python -m model.training.trainer`; `--workers` defaults to 2 here."""
    from model.training.trainer import main as train_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--workers" or a.startswith("--workers=") for a in argv):
        argv += ["--workers", "2"]
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
