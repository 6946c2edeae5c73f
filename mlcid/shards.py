"""Shard addressing and raw tar access: brace patterns, fsspec URLs, node/worker splits, member grouping."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO

import fsspec

from mlcid import errors
from mlcid.errors import SampleError

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..099}` ranges (zero padding kept) and `{a,b}` lists, leftmost brace first (like bash)."""
    found = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda match: match.start())
    head, tail = pattern[: m.start()], pattern[m.end() :]
    if m.re is _BRACE_RANGE:
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"empty brace range in {pattern!r}")
        width = len(lo) if lo.startswith("0") else 0
        parts = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        parts = m.group(1).split(",")
    return [s for part in parts for s in expand_braces(head + part + tail)]


_TAR_NAME = re.compile(r"\.tar(\.gz)?$")


def _list_tars(folder: str) -> list[str]:
    """The *.tar / *.tar.gz files directly in a local folder or under an fsspec prefix, sorted, as URLs."""
    if "://" not in folder:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder!r} not found (expected a shard file or a folder of *.tar shards)")
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if _TAR_NAME.search(f))
    fs, root = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache(root)
    try:
        names = fs.ls(root.rstrip("/"), detail=False)
    except FileNotFoundError:
        names = []
    protocol = folder.split("://", 1)[0]
    as_url = (lambda n: n) if protocol == "file" else (lambda n: f"{protocol}://{n.lstrip('/')}")
    tars = sorted(as_url(str(n)) for n in names if _TAR_NAME.search(str(n)))
    if not tars:
        raise FileNotFoundError(f"{folder!r}: not found or holds no *.tar shards")
    return tars


def expand_urls(specs: str | Iterable[str]) -> list[str]:
    """Space-separated specs or a list of them → a flat list of shard URLs.

    A name ending in `.tar`/`.tar.gz` is taken as is (a missing one fails when it is read); anything else is a
    folder — local or an fsspec prefix such as `s3://bucket/mlcid` — and stands for the tars directly in it.
    A folder that does not exist raises `FileNotFoundError` saying so.
    """
    if isinstance(specs, str):
        specs = specs.split()
    urls: list[str] = []
    for spec in specs:
        for url in expand_braces(spec):
            urls += [url] if _TAR_NAME.search(url) else _list_tars(url)
    if not urls:
        raise ValueError(f"no shards match {specs!r}")
    return urls


def split_for(urls: list[str], rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> list[str]:
    """Shards for one (node rank, dataloader worker): round-robin over rank·num_workers + worker."""
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad split rank={rank}/{world_size} worker={worker}/{num_workers}")
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return urls[slot::slots]


def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a local path or an fsspec URL for streaming."""
    return fsspec.open(url, mode).open()


def split_member_name(name: str) -> tuple[str, str] | None:
    """'dir/KEY.layer01.png' → ('dir/KEY', 'layer01.png'); None for names without a suffix."""
    base = name.rsplit("/", 1)
    stem = base[-1]
    if "." not in stem or stem.startswith("."):
        return None
    key, suffix = stem.split(".", 1)
    prefix = base[0] + "/" if len(base) == 2 else ""
    return prefix + key, suffix


class TailRecorder:
    """File wrapper that remembers the last bytes read, to tell a complete tar (ends in zero blocks) from a cut one."""

    def __init__(self, raw: IO[bytes], keep: int = 1024) -> None:
        self.raw, self.keep, self.tail = raw, keep, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.tail = (self.tail + data)[-self.keep :]
        return data

    @property
    def ended_in_zero_block(self) -> bool:
        """True when the bytes read so far end with a 512-byte zero block (a plain tar's end-of-archive marker)."""
        return self.tail[-512:] == bytes(512)


def iter_tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]] | SampleError]:
    """Stream a tar and yield (key, {suffix: bytes}) per contiguous run of members with one key.

    Yields `SampleError`s instead of raising: a key whose members are not contiguous (interleaved tar) →
    `BAD_SCHEMA` for its later run; a truncated or unreadable tar → one `TRUNCATED_SHARD`/`UNREADABLE_SHARD`
    in place of the group the cut fell in. A plain `.tar` must end in its zero end-of-archive block; a cut
    exactly between members is caught that way (the last group is then reported as truncated, not yielded).
    """
    try:
        stream = open_url(url)
    except (OSError, ValueError) as e:
        yield SampleError(errors.UNREADABLE_SHARD, f"{url}: {e}")
        return
    plain = url.endswith(".tar")
    recorder = TailRecorder(stream)
    seen: set[str] = set()
    key, group, skip = None, {}, False
    try:
        with stream, tarfile.open(fileobj=recorder, mode="r|" if plain else "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_member_name(info.name)
                if parts is None:
                    continue
                k, suffix = parts
                if k != key:
                    if key is not None and not skip:
                        yield key, group
                    skip = k in seen  # a later run of an earlier key: reported once, its members dropped
                    if skip:
                        yield SampleError(errors.BAD_SCHEMA, f"{url}: members of {k!r} are not contiguous")
                    seen.add(k)
                    key, group = k, {}
                f = tar.extractfile(info)
                group[suffix] = f.read() if f is not None else b""
            if plain and seen and not recorder.ended_in_zero_block:
                raise EOFError("no end-of-archive block: the tar was cut between members")
            if key is not None and not skip:
                yield key, group
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
        reason = errors.TRUNCATED_SHARD if seen else errors.UNREADABLE_SHARD
        yield SampleError(reason, f"{url}: {type(e).__name__}: {e}")


def zlib_error() -> type[BaseException]:
    import zlib

    return zlib.error
