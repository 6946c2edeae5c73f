"""Where shards live: a local folder or any fsspec URL (s3://, gs://, az://), listed, read and published in order.

Credentials and endpoints come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, fsspec
config…). Remote shards are written locally first and then uploaded with `publish`: the tar, then the
outcomes, then the stats file LAST — an object store shows an object only once its upload is complete, so a
shard whose stats object exists is complete, exactly as in a local folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


class ShardStore:
    """A folder of shards addressed by name: `exists`, `names`, `read_bytes`, `publish` (uploads in order)."""

    def __init__(self, url: str | os.PathLike) -> None:
        text = str(url)
        self.url = text.rstrip("/") or text
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or root
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"ShardStore({self.url!r})"

    def path(self, name: str) -> str:
        """The filesystem path of `name` (what `self.fs` takes)."""
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        """The URL of `name` (what readers and `fsspec.open` take)."""
        return f"{self.url}/{name}"

    def local_dir(self) -> str:
        """The folder itself for a local store (created); remote stores have none."""
        if not self.local:
            raise ValueError(f"{self.url} is not a local folder")
        os.makedirs(self.root, exist_ok=True)
        return self.root

    def exists(self, name: str) -> bool:
        if not self.local:
            self.fs.invalidate_cache(self.path(name))  # never trust a cached listing for completion
        return self.fs.exists(self.path(name))

    def names(self) -> set[str]:
        """Every file name directly under the store (one listing; empty when the folder does not exist yet)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        return {str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries}

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """One object in one request (atomic on object stores); locally via `.tmp` → rename."""
        if self.local:
            tmp = self.path(name) + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(name))
        else:
            self.fs.pipe_file(self.path(name), data)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def publish(self, local_dir: str, names: Sequence[str]) -> None:
        """Upload `local_dir/name` for each name, in order (put the completion marker last).

        If an upload fails, the names already uploaded are removed again (best effort) and the error is raised.
        """
        done: list[str] = []
        try:
            for name in names:
                self.fs.put_file(os.path.join(local_dir, name), self.path(name))
                done.append(name)
        except BaseException:
            for name in reversed(done):
                try:
                    self.remove(name)
                except Exception as e:  # noqa: BLE001 — the upload error is the one to report
                    log.warning("could not remove %s after a failed upload: %s", self.uri(name), e)
            raise
