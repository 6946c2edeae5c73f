"""Shard addressing and raw tar access on webdataset: brace patterns, fsspec URLs, node/worker splits, tar members.

webdataset's own pieces do the work (`braceexpand`, `tar_file_iterator`, `base_plus_ext`, `pytorch_worker_info`);
on top sit what MLCID needs: folders and fsspec prefixes as shard specs, explicit node ranks, and telling a cut
tar from a complete one. `import webdataset` loads torch, so it is imported only when a tar is read.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
from braceexpand import braceexpand  # webdataset's brace expansion, without importing webdataset (and torch)

from mlcid import errors
from mlcid.errors import SampleError

log = logging.getLogger(__name__)

def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..099}` ranges (zero padding kept) and `{a,b}` lists, as webdataset does (with `braceexpand`)."""
    return list(braceexpand(pattern))


_TAR_NAME = re.compile(r"\.tar(\.gz)?$")


STATS_SUFFIX = "_stats.json"  # written last beside each finished `NAME.tar`: NAME_stats.json (also img2dataset's)


def _list_folder(folder: str) -> list[str]:
    """Every name directly in a local folder or under an fsspec prefix, as paths/URLs (one listing)."""
    if "://" not in folder:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder!r} not found (expected a shard file or a folder of *.tar shards)")
        return [os.path.join(folder, f) for f in os.listdir(folder)]
    fs, root = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache(root)
    try:
        names = fs.ls(root.rstrip("/"), detail=False)
    except FileNotFoundError:
        names = []
    protocol = folder.split("://", 1)[0]
    return [str(n) if protocol == "file" else f"{protocol}://{str(n).lstrip('/')}" for n in names]


def _list_tars(folder: str, complete_only: bool = False) -> list[str]:
    """The *.tar / *.tar.gz files directly in `folder`, sorted; with `complete_only`, only finished ones.

    In a folder whose shards carry stats files (the writer publishes each one last), a `.tar` without its stats
    file is still being written or uploaded: it is skipped with a warning. A folder with no stats file at all
    holds shards made by other tools and is read whole; `.tar.gz` shards carry no stats file.
    """
    names = _list_folder(folder)
    tars = sorted(n for n in names if _TAR_NAME.search(n))
    if "://" in folder and not tars:
        raise FileNotFoundError(f"{folder!r}: not found or holds no *.tar shards")
    if complete_only and any(n.endswith(STATS_SUFFIX) for n in names):
        present = set(names)
        done = [t for t in tars if not t.endswith(".tar") or t[: -len(".tar")] + STATS_SUFFIX in present]
        if len(done) < len(tars):
            log.warning("%s: skipping %d tar(s) without their stats file (not finished yet): %s", folder,
                        len(tars) - len(done), ", ".join(t.rsplit("/", 1)[-1] for t in tars if t not in done)[:300])
        tars = done
    return tars


def expand_urls(specs: str | Iterable[str], complete_only: bool = False) -> list[str]:
    """Space-separated specs or a list of them → a flat list of shard URLs.

    A name ending in `.tar`/`.tar.gz` is taken as is (a missing one fails when it is read); anything else is a
    folder — local or an fsspec prefix such as `s3://bucket/mlcid` — and stands for the tars directly in it
    (with `complete_only`, those whose stats file is written: see `_list_tars`). A folder that does not exist
    raises `FileNotFoundError` saying so.
    """
    if isinstance(specs, str):
        specs = specs.split()
    urls: list[str] = []
    for spec in specs:
        for url in expand_braces(spec):
            urls += [url] if _TAR_NAME.search(url) else _list_tars(url, complete_only)
    if not urls:
        raise ValueError(f"no shards match {specs!r}")
    return urls


def split_for(urls: list[str], rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> list[str]:
    """Shards for one (node rank, dataloader worker): webdataset's `split_by_node` then `split_by_worker`.

    Written out because those two read the slot from the environment only (`MLCIDReader(rank=…)` overrides it).
    """
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad split rank={rank}/{world_size} worker={worker}/{num_workers}")
    return urls[rank::world_size][worker::num_workers]


def worker_slot() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) as webdataset sees them: RANK/WORLD_SIZE or torch.distributed, and
    WORKER/NUM_WORKERS or the torch DataLoader worker."""
    from webdataset.utils import pytorch_worker_info

    return pytorch_worker_info()


def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a local path or an fsspec URL for streaming."""
    return fsspec.open(url, mode).open()


class TailRecorder:
    """File wrapper that remembers the last bytes read, to tell a complete tar (ends in zero blocks) from a cut one."""

    def __init__(self, raw: IO[bytes], name: str = "", keep: int = 1024) -> None:
        self.raw, self.name, self.keep, self.tail = raw, name, keep, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.tail = (self.tail + data)[-self.keep :]
        return data

    def __str__(self) -> str:  # webdataset appends `@ <file object>` to the errors it re-raises
        return self.name

    @property
    def ended_in_zero_block(self) -> bool:
        """True when the bytes read so far end with a 512-byte zero block (a plain tar's end-of-archive marker)."""
        return self.tail[-512:] == bytes(512)


# What reading a tar raises when it is missing, unreadable, cut short or not a tar at all.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)


@dataclass
class TarRead:
    """How far a tar read got: file members read, the key of the member being read, whether it ended cleanly."""

    url: str
    members: int = 0
    reading: str | None = None  # key of the member whose data is being read (None between members)
    cut_between_members: bool = False  # a plain .tar that ended without its end-of-archive block

    @property
    def started(self) -> bool:
        """True once any member header was read: a failure after that is a truncation, before it unreadable."""
        return self.members > 0 or self.reading is not None


def iter_tar_members(url: str, read: TarRead | None = None) -> Iterator[tuple[str, str, bytes]]:
    """(key, suffix, data) per file member of a tar, in tar order, read by webdataset's `tar_file_iterator`.

    'dir/KEY.layer01.png' → ('dir/KEY', 'layer01.png', …); members without a suffix are skipped unread. Raises one
    of `READ_ERRORS` when the tar cannot be opened or breaks (`read.reading` then names the key that was cut, None
    when the cut fell in a header). A plain `.tar` ending without its zero block (cut exactly between members)
    ends normally with `read.cut_between_members` set.
    """
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    read = read if read is not None else TarRead(url)

    def select(name: str) -> bool:  # called with each member's name before its data is read
        read.reading = base_plus_ext(name)[0]
        return read.reading is not None

    with open_url(url) as stream:
        recorder = TailRecorder(stream, url)
        for member in tar_file_iterator(recorder, skip_meta=None, handler=reraise_exception, select_files=select):
            key, suffix = base_plus_ext(member["fname"])
            read.reading = None
            read.members += 1
            yield key, suffix, member["data"]
        read.cut_between_members = url.endswith(".tar") and read.members > 0 and not recorder.ended_in_zero_block


def iter_tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]] | SampleError]:
    """Stream a tar and yield (key, {suffix: bytes}) per contiguous run of members with one key.

    Yields `SampleError`s instead of raising: a key whose members are not contiguous (interleaved tar) →
    `BAD_SCHEMA` for its later run; a truncated or unreadable tar → one `TRUNCATED_SHARD`/`UNREADABLE_SHARD`
    in place of the group the cut fell in. A plain `.tar` must end in its zero end-of-archive block; a cut
    exactly between members is caught that way (the last group is then reported as truncated, not yielded).
    """
    read = TarRead(url)
    seen: set[str] = set()
    key, group, skip = None, {}, False
    try:
        for k, suffix, data in iter_tar_members(url, read):
            if k != key:
                if key is not None and not skip:
                    yield key, group
                skip = k in seen  # a later run of an earlier key: reported once, its members dropped
                if skip:
                    yield SampleError(errors.BAD_SCHEMA, f"{url}: members of {k!r} are not contiguous")
                seen.add(k)
                key, group = k, {}
            group[suffix] = data
    except READ_ERRORS as e:
        if key is not None and not skip and read.reading not in (None, key):  # the cut fell in the next key
            yield key, group
        reason = errors.TRUNCATED_SHARD if read.started else errors.UNREADABLE_SHARD
        yield SampleError(reason, f"{url}: {type(e).__name__}: {e}")
        return
    if read.cut_between_members:
        yield SampleError(errors.TRUNCATED_SHARD, f"{url}: no end-of-archive block: the tar was cut between members")
    elif key is not None and not skip:
        yield key, group
