"""A training run folder at a local path or any fsspec URL (`s3://bucket/runs/x`, `gs://…`, `memory://…`).

Every process writes into a local folder (`local`): the run folder itself when it is local, otherwise a private
staging folder. For a remote run, `publish(name)` uploads a file or folder from staging; a checkpoint folder's
`complete.json` goes up last, so a half-uploaded checkpoint is never listed (object storage has no rename).
Credentials and endpoints come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …).

Why not Ray Train's checkpoint storage (`ray.train.report(checkpoint=…)`, `RunConfig(storage_path=…)`): the
single-process trainer, `--resume` and the sampler read the same run folder without Ray, so the trainer owns the
layout and Ray only restarts workers (see cluster/train.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from model.training.checkpoint import COMPLETE, CheckpointError, checkpoint_step, list_checkpoints

log = logging.getLogger(__name__)

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_INDEX = "model_index.json"


def is_remote(location: str | Path) -> bool:
    """True for fsspec URLs other than file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _local_path(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def _remote_root(location: str | Path, marker: str, missing: Exception) -> tuple[Any, str]:
    """(filesystem, root path) of a remote `location` whose `marker` file exists; raises `missing` otherwise."""
    fs, root = url_to_fs(str(location))
    root = root.rstrip("/")
    fs.invalidate_cache()  # a marker written since this process last listed the folder must be seen
    if not fs.exists(f"{root}/{marker}"):
        raise missing
    return fs, root


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerdiff"


@dataclass
class RunFolder:
    """Where a run lives (`url`) and where this process writes before publishing (`local`)."""

    url: str
    local: Path
    fs: fsspec.AbstractFileSystem | None = None  # None: the run folder is local
    root: str = ""  # the run folder's path inside `fs`

    @classmethod
    def open(cls, location: str | Path) -> "RunFolder":
        if not is_remote(location):
            local = _local_path(location).absolute()
            return cls(str(local), local)
        fs, root = url_to_fs(str(location))
        staging = Path(tempfile.mkdtemp(prefix="layerdiff-run-"))
        return cls(str(location).rstrip("/"), staging, fs, root.rstrip("/"))

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def location(self, name: str) -> str:
        """Path or URL of a member, for messages and `--resume`."""
        return f"{self.url}/{name}" if self.remote else str(self.local / name)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        """Names of the complete checkpoints (those with `complete.json`), oldest first."""
        if not self.remote:
            return [p.name for p in list_checkpoints(self.local)]  # local: complete once renamed from .tmp
        else:
            self.fs.invalidate_cache()  # other processes write here: never trust a cached listing
            markers = self.fs.glob(f"{self.root}/checkpoint-*/{COMPLETE}")
            names = [m.rstrip("/").split("/")[-2] for m in markers]
        found = [n for n in names if checkpoint_step(n) is not None]
        return sorted(found, key=checkpoint_step)

    def latest(self) -> str | None:
        """Location of the newest complete checkpoint, or None."""
        names = self.checkpoints()
        return self.location(names[-1]) if names else None

    def fetch_checkpoint(self, location: str | Path) -> Path:
        """A local folder holding the checkpoint at `location` (downloaded into staging when remote)."""
        if not is_remote(location):
            return _local_path(location)
        fs, path = _remote_root(location, COMPLETE,
                                CheckpointError(f"checkpoint {location} is incomplete or missing: no {COMPLETE}"))
        dest = Path(tempfile.mkdtemp(prefix="layerdiff-ckpt-", dir=self.local if self.remote else None))
        fs.get(path + "/", str(dest) + "/", recursive=True)
        return dest

    def remove_checkpoint(self, name: str) -> None:
        """Delete a checkpoint; remotely its marker goes first, so a partial delete is never listed."""
        if not self.remote:
            shutil.rmtree(self.local / name, ignore_errors=True)
            return
        self.fs.invalidate_cache()
        self.fs.rm_file(f"{self.root}/{name}/{COMPLETE}")
        self.fs.rm(f"{self.root}/{name}", recursive=True)

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints (keep ≤ 0: all)."""
        if keep > 0:
            for name in self.checkpoints()[:-keep]:
                self.remove_checkpoint(name)

    # -- files ---------------------------------------------------------------------------------------------------
    def publish(self, name: str) -> None:
        """Upload `local/name` (file or folder) to the run folder; a folder's `complete.json` last. Local: no-op."""
        if not self.remote:
            return
        src = self.local / name
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name == COMPLETE)  # the marker after everything it vouches for
            for f in files:
                self.fs.put_file(str(f), f"{self.root}/{name}/{f.relative_to(src).as_posix()}")
        elif src.is_file():
            self.fs.put_file(str(src), f"{self.root}/{name}")

    def fetch(self, name: str) -> bool:
        """Download one file of a remote run into `local` (False when it is not there). Local: whether it exists."""
        if not self.remote:
            return (self.local / name).exists()
        remote = f"{self.root}/{name}"
        self.fs.invalidate_cache()
        if not self.fs.exists(remote):
            return False
        (self.local / name).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(remote, str(self.local / name))
        return True

    def remove(self, name: str) -> None:
        """Delete one file (locally and, for a remote run, in the run folder)."""
        (self.local / name).unlink(missing_ok=True)
        if self.remote:
            self.fs.invalidate_cache()
        if self.remote and self.fs.exists(f"{self.root}/{name}"):
            self.fs.rm_file(f"{self.root}/{name}")

    def close(self) -> None:
        """Remove the staging folder of a remote run (everything worth keeping was published)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def write_pipeline_folder(run: RunFolder, parts: dict[str, Any]) -> None:
    """Save each pipeline part (`save_pretrained`) to `.NAME.tmp`, swap it in and publish it; `model_index.json`
    goes last and is removed first, so it never vouches for a half-updated folder."""
    import diffusers

    run.remove(PIPELINE_INDEX)
    index: dict[str, Any] = {"_class_name": "LayerDiffPipeline", "_diffusers_version": diffusers.__version__}
    for name, obj in parts.items():
        tmp, final = run.local / f".{name}.tmp", run.local / name
        shutil.rmtree(tmp, ignore_errors=True)
        if name in ("unet", "vae"):
            obj.save_pretrained(tmp, safe_serialization=True)
        else:
            obj.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        run.publish(name)
        module = type(obj).__module__.split(".")[0]
        index[name] = [type(obj).__module__ if module == "model" else module, type(obj).__name__]
    (run.local / PIPELINE_INDEX).write_text(json.dumps(index, indent=2))
    run.publish(PIPELINE_INDEX)


def fetch_pipeline_folder(location: str | Path) -> Path:
    """A local copy of a run's pipeline folder: the path itself when local; for a URL, its pipeline parts and
    `model_index.json` (checkpoints skipped) downloaded into the cache, `model_index.json` last."""
    if not is_remote(location):
        return _local_path(location)
    fs, root = _remote_root(location, PIPELINE_INDEX, ValueError(
        f"{location} is not a LayerDiff run: {PIPELINE_INDEX} is missing (is training finished?)"))
    digest = hashlib.sha256(str(location).encode()).hexdigest()[:16]
    dest = cache_dir() / "runs" / digest
    (dest / PIPELINE_INDEX).unlink(missing_ok=True)  # never vouch for a half-refreshed copy
    for part in PIPELINE_PARTS:
        if fs.isdir(f"{root}/{part}"):
            shutil.rmtree(dest / part, ignore_errors=True)
            fs.get(f"{root}/{part}/", str(dest / part) + "/", recursive=True)
    fs.get_file(f"{root}/{PIPELINE_INDEX}", str(dest / PIPELINE_INDEX))
    log.info("downloaded %s to %s", location, dest)
    return dest
