"""Start Ray in-process with the repo's temp dirs, or join a running cluster (`RAY_ADDRESS` / `--address`).

Keeps Ray's files inside the repo (`$RAY_TMPDIR` or `.work/ray`), turns off usage reporting and the auth token
file, and forwards the offline/cache environment variables to the workers of a joined cluster through the
job's `runtime_env` (in-process workers inherit them from this process).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Set before `ray` starts anything: no usage report, no ~/.ray/auth_token.
RAY_DEFAULT_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
# Forwarded to every worker of the job when they are set here (offline hubs, caches, tiny-model root…).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR",
    "LAYERDIFF_TINY_MODELS", "LAYERDIFF_SAM_CHECKPOINT", "LAYERDIFF_CLIP_RN50", "LAYERDIFF_FID_WEIGHTS",
    "TOKENIZERS_PARALLELISM", "NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",  # S3 on a custom endpoint
)  # credentials are not forwarded: a runtime_env is shown in the Ray dashboard; give nodes their own (IAM, files)
DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "prometheus_client", "opencensus")


@dataclass
class RayEnvConfig:
    """How to get a Ray connection. `address=None` → `$RAY_ADDRESS` if set, else start Ray in this process."""

    address: str | None = None
    num_cpus: float | None = None  # in-process only: logical CPUs (default: this machine's cores)
    num_gpus: int | None = None  # in-process only: GPUs (default: Ray's detection)
    dashboard: bool = False  # start the dashboard (in-process only; needs ray[default])
    dashboard_port: int = 8265
    temp_dir: str | None = None  # in-process only: default $RAY_TMPDIR, else ./.work/ray

    def resolved_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None


def ray_temp_dir(config: RayEnvConfig) -> Path:
    """Where an in-process Ray keeps its session files (kept short: Ray's socket paths must be < 108 bytes)."""
    path = Path(config.temp_dir or os.environ.get("RAY_TMPDIR") or Path.cwd() / ".work" / "ray").absolute()
    path.mkdir(parents=True, exist_ok=True)
    if len(str(path)) > 60:
        log.warning("Ray temp dir %s is long; Ray's unix socket paths may exceed 107 bytes", path)
    return path


def dashboard_available() -> bool:
    """True when the packages of `ray[default]` that the dashboard needs are importable."""
    return all(importlib.util.find_spec(m) is not None for m in DASHBOARD_MODULES)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


@contextmanager
def ray_session(config: RayEnvConfig) -> Iterator[dict]:
    """Connect to Ray for the duration of the block; yields `ray.cluster_resources()`.

    A Ray already initialised in this process (a test session, a notebook) is reused and left running;
    otherwise Ray is started or joined here and shut down at the end.
    """
    for key, value in RAY_DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    address = config.resolved_address()
    runtime_env = {"env_vars": forwarded_env()}
    if address:
        if config.num_cpus is not None or config.num_gpus is not None:
            log.warning("joining %s: --num-cpus/--num-gpus only apply to an in-process Ray and are ignored", address)
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        include_dashboard = config.dashboard and dashboard_available()
        if config.dashboard and not include_dashboard:
            log.warning("--dashboard asked but ray[default] dashboard packages are not installed; running without")
        temp_dir = ray_temp_dir(config)
        info = ray.init(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            include_dashboard=include_dashboard,
            dashboard_port=config.dashboard_port,
            _temp_dir=str(temp_dir),
            runtime_env=runtime_env,
            log_to_driver=True,
        )
        url = getattr(info, "dashboard_url", None) if include_dashboard else None
        log.info("started Ray in-process (temp dir %s)%s", temp_dir, f"; dashboard at http://{url}" if url else "")
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
