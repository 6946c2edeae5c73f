"""Test-wide settings: offline hubs, caches inside the repo's work dir, a shared tiny-model folder."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".work"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(WORK / "cache" / "hf"))
os.environ.setdefault("TORCH_HOME", str(WORK / "cache" / "torch"))
os.environ.setdefault("XDG_CACHE_HOME", str(WORK / "cache" / "xdg"))
os.environ.setdefault("MPLCONFIGDIR", str(WORK / "cache" / "mpl"))
os.environ.setdefault("RAY_TMPDIR", str(WORK / "ray"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
(WORK / "ray").mkdir(parents=True, exist_ok=True)


import pytest  # noqa: E402

ON_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: CI installs everything the default run needs (GPU tests excepted)."""
    outcome = yield
    report = outcome.get_result()
    if ON_CI and report.skipped and "gpu" not in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped under CI=true, where nothing may skip: {reason}"


@pytest.fixture(scope="module")
def one_thread():
    """Run the test with one torch thread (timings and float results as on a 1-CPU worker), then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Build every tiny model preset once per test session (random weights, each library's own format).

    Sets LAYERDIFF_TINY_MODELS so `mlcid.registry.resolve(name, "tiny")` finds them. Returns the root folder.
    """
    root = tmp_path_factory.mktemp("tiny-models")
    from model.tiny import build_tiny_models as build_model_presets

    from pipelines.tiny import build_tiny_models as build_pipeline_presets

    build_model_presets(root)
    build_pipeline_presets(root)
    os.environ["LAYERDIFF_TINY_MODELS"] = str(root)
    return root
