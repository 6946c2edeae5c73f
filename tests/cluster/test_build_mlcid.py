"""`mlcid build` end to end (tiny preset, in-process Ray), its planning, the cluster configs,
the summary, and the img2dataset wrapper."""

from __future__ import annotations

import json
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mlcid.synthetic import SceneConfig, write_dataset
from mlcid.shard_check import validate_shard
from mlcid.validate import ValidationConfig
from mlcid.writer import read_stats, shard_name
from pipelines.config import PipelineConfig
from pipelines.inputs import iter_inputs
from pipelines.runner import outcomes_name

from cluster import laion
from cli.main import MLCID_COMMANDS, build_parser, mlcid_main
from cluster.build_mlcid import WorkerSpec, plan_tasks, resolve_pool, with_decode_threads
from cluster.pool import PoolConfig, PoolReport, ShardOutcome, ShardTask
from cluster.progress import format_summary, summarize

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "cluster" / "configs"


# -- the CLI on real shards -----------------------------------------------------------------------------------
def test_cli_builds_valid_shards_reports_failures_and_resumes(tiny_models, tmp_path, capfd):
    import ray
    write_dataset(tmp_path / "raw", tmp_path / "gt", samples=8, seed=5, shards=2, config=SceneConfig(size=64),
                  progress=False)
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    good = str(tmp_path / "raw" / "{00000..00001}.tar")
    missing = str(tmp_path / "gone" / "00009.tar")
    common = ["--out", str(out), "--preset", "tiny", "--max-side", "64", "--workers", "2", "--num-cpus", "2",
              "--no-progress", "--summary-json", str(summary)]

    # 1. Two good shards and one that cannot be read (no retries): exit 1, the failure is in the summary.
    assert mlcid_main(["build", "--shards", good, missing, "--max-retries", "0", *common]) == 1
    printed = capfd.readouterr()
    assert f"| {missing} | 1 | SampleError: unreadable_shard" in printed.out  # the summary names it
    assert "Traceback" not in printed.out + printed.err
    s = json.loads(summary.read_text())
    assert s["shards_total"] == 3 and s["shards_processed"] == 2 and s["shards_failed"] == 1
    assert s["failed"][0]["url"] == missing and s["failed"][0]["attempts"] == 1
    assert s["read"] == 8 and s["written"] + sum(s["dropped"].values()) == 8
    assert s["workers"] == 2 and s["actors_started"] == 2
    for sid in (0, 1):
        stats = read_stats(out, sid)
        valid, bad = validate_shard(str(out / shard_name(sid)), ValidationConfig())
        assert valid == stats["written"] and not bad
        outcomes = pq.read_table(out / outcomes_name(sid, "mlcid")).to_pylist()
        assert len(outcomes) == stats["read"] == 4
    index = json.loads((out / "index.json").read_text())  # the wids index over the complete shards
    assert {e["url"]: e["nsamples"] for e in index["shardlist"]} == {
        shard_name(sid): read_stats(out, sid)["written"] for sid in (0, 1) if read_stats(out, sid)["written"]}
    assert not list(out.glob("*.tmp"))
    assert not ray.is_initialized()  # the CLI shut its Ray down

    # 2. Re-run on the good shards: everything is complete, so nothing runs and Ray is not even started.
    assert mlcid_main(["build", "--shards", good, *common]) == 0
    s = json.loads(summary.read_text())
    assert s["shards_skipped"] == 2 and s["shards_processed"] == 0 and s["actors_started"] == 0
    assert not ray.is_initialized()


def parse_build(argv: list[str]):
    """`mlcid build ARGV` parsed as the console command does."""
    return build_parser("mlcid", "", MLCID_COMMANDS, "build").parse_args(["build", *argv])


def test_help_and_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mlcid_main(["build", "--help"])
    assert e.value.code == 0
    assert "--workers" in capsys.readouterr().out
    # a wrong input folder says so (not "cannot read an id")
    assert mlcid_main(["build", "--shards", str(tmp_path / "no-such-folder"), "--out", str(tmp_path),
                       "--preset", "tiny"]) == 2
    assert "mlcid build: error:" in (err := capsys.readouterr().err) and "not found" in err
    assert mlcid_main(["build", "--shards", "a/00001.tar", "b/00001.tar", "--out", str(tmp_path), "--preset",
                       "tiny"]) == 2
    assert "both have shard id 1" in capsys.readouterr().err


def test_plan_skips_complete_shards(tmp_path):
    (tmp_path / "mlcid-000003_stats.json").write_text("{}")
    tasks, complete = plan_tasks(["in/00003.tar", "in/00004.tar"], str(tmp_path), "mlcid")
    assert complete == ["in/00003.tar"]
    assert tasks == [ShardTask("mlcid-000004", "in/00004.tar")]
    with pytest.raises(ValueError, match="cannot read a shard id"):
        plan_tasks(["in/images.tar"], str(tmp_path), "mlcid")


def test_resolve_pool_sizes_actors_from_resources():
    base = PoolConfig()
    cpu = resolve_pool(WorkerSpec(), base, {"CPU": 2.0}, strict=True)
    assert (cpu.workers, cpu.num_cpus, cpu.num_gpus) == (2, 1.0, 0.0)
    half = resolve_pool(WorkerSpec(workers=4), base, {"CPU": 2.0}, strict=True)
    assert (half.workers, half.num_cpus) == (4, 0.5)  # fractional CPUs: more actors than cores
    gpu = resolve_pool(WorkerSpec(), base, {"CPU": 32.0, "GPU": 4.0}, strict=True)
    assert (gpu.workers, gpu.num_cpus, gpu.num_gpus) == (4, 8.0, 1.0)  # one actor per GPU, cores ÷ GPUs each
    assert gpu.threads == 8  # torch/OpenCV threads follow the actor's CPUs
    # Per node: a CPU-only head (8 cores) must not inflate the share of the 2 × (16 CPU, 4 GPU) workers.
    nodes = [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    mixed = resolve_pool(WorkerSpec(), base, {"CPU": 40.0, "GPU": 8.0}, strict=False, nodes=nodes)
    assert (mixed.workers, mixed.num_cpus) == (8, 4.0)
    assert resolve_pool(WorkerSpec(cpus_per_worker=2), base, {"CPU": 32.0, "GPU": 4.0}, strict=True).num_cpus == 2
    pipeline = PipelineConfig.from_preset("real")
    assert with_decode_threads(pipeline, gpu.num_cpus).decode_threads == 7  # the actor's CPUs less its main thread
    assert with_decode_threads(pipeline, 1.0) is pipeline  # never fewer than the preset's
    with pytest.raises(ValueError, match="do not fit"):
        resolve_pool(WorkerSpec(workers=3, cpus_per_worker=1), base, {"CPU": 2.0}, strict=True)
    # Joining a cluster (not strict): an autoscaler may add nodes, so a bigger request is allowed.
    assert resolve_pool(WorkerSpec(workers=8, gpus_per_worker=1), base, {"CPU": 2.0}, strict=False).workers == 8


def test_summary_counts_and_table():
    ok = ShardOutcome(ShardTask("mlcid-000000", "in/00000.tar"), True, {
        "read": 10, "written": 7, "dropped": {"no_salient_mask": 2, "too_small": 1},
        "timings": {"detect": 2.0, "segment": 1.0, "write": 0.5}}, attempts=1, process_seconds=4.0)
    again = ShardOutcome(ShardTask("mlcid-000001", "in/00001.tar"), True, {"read": 5, "written": 5, "dropped": {},
                                                                          "skipped": True}, attempts=1)
    bad = ShardOutcome(ShardTask("mlcid-000002", "in/00002.tar"), False, None, attempts=3,
                       errors=["SampleError: unreadable_shard: x"] * 3)
    s = summarize(PoolReport([ok, again, bad], actors_started=2, actors_died=1, startup_seconds=1.5, wall_seconds=4.0),
                  skipped_up_front=4, workers=2, wall_seconds=5.0)
    assert (s.shards_total, s.shards_processed, s.shards_skipped, s.shards_failed) == (7, 1, 5, 1)
    assert (s.read, s.written, s.dropped) == (10, 7, {"no_salient_mask": 2, "too_small": 1})
    assert s.samples_per_second == 2.0 and s.steady_samples_per_second == 4.0 and s.stage_seconds["detect"] == 2.0
    table = format_summary(s)
    assert "| no_salient_mask | 2 |" in table and "| in/00002.tar | 3 |" in table
    assert "detect 2.0s" in table and "write" not in table.split("stage time")[1].split("\n")[0]


def test_progress_logs_one_line_per_shard_when_not_a_terminal(caplog):
    import io
    import logging

    from cluster.progress import RunProgress

    prog = RunProgress(2, file=io.StringIO())
    with caplog.at_level(logging.INFO, logger="cluster.progress"):
        prog.on_samples(3)
        prog.on_shard(ShardOutcome(ShardTask("mlcid-000004", "in/00004.tar"), True,
                                   {"read": 4, "written": 3, "dropped": {"too_small": 1}}, attempts=1))
        prog.on_shard(ShardOutcome(ShardTask("mlcid-000005", "in/00005.tar"), False, None, 3, ["boom"]))
    prog.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("shards 1/2 (mlcid-000004)") and "written 3" in lines[0] and "too_small:1" in lines[0]
    assert lines[1].startswith("shards 2/2 (mlcid-000005)") and "failed 1" in lines[1]


# -- cluster configs ------------------------------------------------------------------------------------------
def _build_command(text: str) -> list[str]:
    """The arguments after `mlcid build` in a command line."""
    args = shlex.split(text)
    i = args.index("mlcid")
    assert args[i + 1] == "build"
    return args[i + 2:]


def test_ray_cluster_yaml_parses_and_runs_the_build():
    text = (CONFIGS / "ray-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert workers and all(n["max_workers"] >= n["min_workers"] for n in workers)
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    line = next(ln.lstrip("# ") for ln in text.splitlines() if "mlcid build" in ln)
    args = parse_build(_build_command(line))
    assert args.preset == "real" and args.gpus_per_worker == 1 and args.out == "/mnt/data/mlcid"


def test_rayjob_yaml_parses_and_its_entrypoint_is_a_valid_build_command():
    cfg = yaml.safe_load((CONFIGS / "rayjob.yaml").read_text())
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayJob"
    spec = cfg["spec"]
    args = parse_build(_build_command(spec["entrypoint"]))
    assert args.preset == "real" and args.out == "/data/mlcid" and args.shards == ["/data/raw/{00000..00099}.tar"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any(c["resources"]["limits"].get("nvidia.com/gpu") for c in
                                    g["template"]["spec"]["containers"])]
    assert gpu, "no GPU worker group"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


# -- img2dataset wrapper --------------------------------------------------------------------------------------
def test_img2dataset_arguments_are_a_plain_list(tmp_path):
    cfg = laion.LaionConfig("s3://laion/part 00000.parquet", str(tmp_path / "raw; rm -rf /"), processes=8, threads=64,
                            save_columns=["similarity", "hash"], extra=["--max_aspect_ratio=3"])
    args = laion.img2dataset_args(cfg)
    assert "--url_list=s3://laion/part 00000.parquet" in args  # a space stays inside one argument
    assert f"--output_folder={tmp_path / 'raw; rm -rf /'}" in args  # nothing is shell-parsed
    for flag in ("--input_format=parquet", "--url_col=URL", "--caption_col=TEXT", "--output_format=webdataset",
                 "--enable_wandb=False", "--processes_count=8", "--thread_count=64",
                 "--save_additional_columns=[similarity,hash]"):
        assert flag in args
    assert args[-1] == "--max_aspect_ratio=3"
    assert laion.command(cfg)[0].endswith(".venv-img2dataset/bin/img2dataset")
    with pytest.raises(ValueError, match="input_format"):
        laion.LaionConfig("x", "y", input_format="xlsx")
    with pytest.raises(ValueError, match="samples_per_shard"):
        laion.LaionConfig("x", "y", samples_per_shard=20_000)
    with pytest.raises(FileNotFoundError, match="make img2dataset-env"):
        laion.run(laion.LaionConfig("x", str(tmp_path / "o"), venv=str(tmp_path / "no-venv")))


def test_laion_cli_dry_run(capsys, tmp_path):
    from cli.main import mlcid_main

    assert mlcid_main(["laion", "--url-list", "urls.parquet", "--out", str(tmp_path), "--dry-run", "--",
                       "--max_aspect_ratio=2"]) == 0
    out = capsys.readouterr().out
    assert "--url_list=urls.parquet" in out and out.strip().endswith("--max_aspect_ratio=2")


@pytest.mark.skipif(not (REPO / laion.DEFAULT_VENV / "bin" / "img2dataset").exists(),
                    reason="img2dataset's venv is missing (make img2dataset-env)")
def test_real_img2dataset_on_file_urls_gives_shards_the_pipeline_reads(tmp_path):
    urls, texts = [], []
    for i in range(4):
        img = (np.random.default_rng(i).random((80, 120, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        urls.append(f"file://{tmp_path / f'{i}.png'}")
        texts.append(f"picture number {i}")
    urls.append(f"file://{tmp_path / 'missing.png'}")
    texts.append("gone")
    pq.write_table(pa.table({"URL": urls, "TEXT": texts}), tmp_path / "urls.parquet")
    cfg = laion.LaionConfig(str(tmp_path / "urls.parquet"), str(tmp_path / "raw"), image_size=64,
                            min_image_size=32, processes=1, threads=2,
                            venv=str(REPO / laion.DEFAULT_VENV))
    assert laion.run(cfg) == 0
    stats = json.loads((tmp_path / "raw" / "00000_stats.json").read_text())
    assert stats["successes"] == 4 and stats["failed_to_download"] == 1
    with tarfile.open(tmp_path / "raw" / "00000.tar") as tar:
        assert sum(n.endswith(".jpg") for n in tar.getnames()) == 4
    items = list(iter_inputs(str(tmp_path / "raw" / "00000.tar")))
    assert sorted(it.source["caption"] for it in items) == [f"picture number {i}" for i in range(4)]
    assert all(min(it.image.shape[:2]) == 64 for it in items)  # keep_ratio: shorter side = image_size


# -- orchestration benchmark ----------------------------------------------------------------------------------
def test_control_cores_measures_busy_processes():
    from benchmarks.orchestration import control_cores

    assert 0.0 < control_cores(1, seconds=0.3) <= 1.05


@pytest.mark.slow
def test_bench_orchestration_prints_a_row_per_worker_count(tiny_models, tmp_path, capsys):
    from benchmarks import orchestration as bench_orchestration

    out = tmp_path / "rows.json"
    assert bench_orchestration.main(["--shards", "2", "--samples-per-shard", "4", "--workers", "1", "2",
                                     "--repeats", "1", "--work-dir", str(tmp_path / "w"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["workers"] for r in rows] == [1, 2] and all(r["samples"] == 8 for r in rows)
    assert rows[0]["speedup"] == 1.0 and all(r["stage_s_per_sample"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "| workers |" in table and "python -m benchmarks.orchestration" in table


@pytest.mark.slow
def test_joins_a_running_cluster_and_forwards_the_environment(tiny_models, tmp_path):
    """A head started WITHOUT the tiny-model root in its environment: the driver's runtime_env must carry it."""
    import os
    import subprocess
    import sys

    import psutil

    write_dataset(tmp_path / "raw", tmp_path / "gt", samples=4, seed=2, shards=1, config=SceneConfig(size=64),
                  progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERDIFF_TINY_MODELS", "RAY_ADDRESS")}
    head = subprocess.Popen([sys.executable, "-c", (
        "import os, time, ray\n"
        "ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.environ['RAY_TMPDIR'])\n"
        "print(ray.get_runtime_context().gcs_address, flush=True)\n"
        "time.sleep(300)")], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        address = head.stdout.readline().strip()
        assert address, "the head did not start"
        summary = tmp_path / "summary.json"
        rc = mlcid_main(["build", "--shards", str(tmp_path / "raw" / "00000.tar"), "--out", str(tmp_path / "out"),
                               "--preset", "tiny", "--max-side", "64", "--workers", "1", "--address", address,
                               "--no-progress", "--summary-json", str(summary)])
        assert rc == 0
        s = json.loads(summary.read_text())
        assert s["shards_processed"] == 1 and s["read"] == 4
    finally:
        kids = psutil.Process(head.pid).children(recursive=True)
        head.kill()
        head.wait()
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
