"""Takedown: rewrite MLCID shards without the samples named by key or source URL, and keep a manifest.

    mlcid takedown --keys keys.txt [--urls urls.txt] --out clean/ data/mlcid-{000000..000009}.tar   (cli/takedown.py)

Per shard, into `out` (a local folder or fsspec URL; it may be the shards' own folder):
  1. stream the tar, copying every member of a kept sample byte for byte (no re-encoding);
  2. mark removed keys in the outcomes parquet (`kept=False, reason="takedown"`) when one sits beside the shard;
  3. extend the shard's removal manifest `NAME_takedown.json` (key, source URL, what matched, when);
  4. remove the old stats file, move tar / parquet / manifest into place (each written as `.tmp` first), then
     write the stats file LAST with `written` lowered, `dropped["takedown"]` raised and the layer counts fixed,
     so `read == written + sum(dropped)` still holds and `mlcid validate` passes.
A shard that is unreadable, truncated or has no stats file is refused (it would not validate); the others go on.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from mlcid.codec import parse_metadata
from mlcid.errors import SampleError
from mlcid.schema import JSON_MEMBER
from mlcid.shards import expand_urls, iter_tar_groups
from mlcid.stats import STATS_SUFFIX, load_shard_stats, outcomes_url_for, stats_url_for

log = logging.getLogger(__name__)

TAKEDOWN_REASON = "takedown"
MANIFEST_SUFFIX = "_takedown.json"


def read_list(url: str) -> list[str]:
    """One entry per line (local path or fsspec URL); blank lines and lines starting with '#' are skipped."""
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class TakedownConfig:
    """What to remove and where the cleaned shards go."""

    out: str  # folder (local path or fsspec URL); may be the shards' own folder (rewritten in place)
    keys: frozenset[str] = frozenset()  # sample keys (the tar key, as in KEY.json "key")
    urls: frozenset[str] = frozenset()  # source image URLs (KEY.json "source"."url")

    def __post_init__(self) -> None:
        if not self.keys and not self.urls:
            raise ValueError("a takedown needs at least one key or source URL to remove")


@dataclass
class Removal:
    """One removed sample, as recorded in the manifest."""

    key: str
    url: str | None
    matched: str  # 'key', 'url' or 'key+url'
    layers: int
    removed_at: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "url": self.url, "matched": self.matched, "layers": self.layers,
                "removed_at": self.removed_at}


@dataclass
class ShardTakedown:
    """What happened to one shard. `error` is set (and nothing written) when the shard was refused."""

    shard: str
    out: str | None = None
    kept: int = 0
    removed: list[Removal] = field(default_factory=list)
    error: str | None = None


@dataclass
class TakedownResult:
    shards: list[ShardTakedown]
    unmatched_keys: list[str]  # requested keys found in no shard
    unmatched_urls: list[str]

    @property
    def removed(self) -> int:
        return sum(len(s.removed) for s in self.shards)

    @property
    def failed(self) -> list[ShardTakedown]:
        return [s for s in self.shards if s.error is not None]


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    """Write `path + '.tmp'`; return the tmp path (moved into place by the caller, in order)."""
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    return tmp


def _read_optional(url: str) -> bytes | None:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _rewrite_outcomes(data: bytes, removed: set[str]) -> bytes:
    """The outcomes parquet with the removed keys' rows turned into `kept=False, reason='takedown'`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    hit = [k in removed for k in table.column("key").to_pylist()]
    for name, value in (("kept", False), ("reason", TAKEDOWN_REASON), ("detail", "removed on request")):
        if name in table.column_names:
            col = table.column(name).to_pylist()
            kind = table.schema.field(name).type
            new = pa.array([value if h else v for h, v in zip(hit, col)], None if pa.types.is_null(kind) else kind)
            table = table.set_column(table.schema.get_field_index(name), name, new)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _updated_stats(stats: dict[str, Any], removed: list[Removal], manifest: str) -> dict[str, Any]:
    out = dict(stats)
    dropped = Counter(stats["dropped"])
    dropped[TAKEDOWN_REASON] += len(removed)
    out["dropped"] = dict(sorted(dropped.items()))
    out["written"] = stats["written"] - len(removed)
    layers = Counter({int(k): v for k, v in stats.get("layer_counts", {}).items()})
    layers.subtract(Counter(r.layers for r in removed))
    out["layer_counts"] = {str(k): v for k, v in sorted(layers.items()) if v > 0}
    earlier = (stats.get("takedown") or {}).get("removed", 0)
    out["takedown"] = {"removed": earlier + len(removed), "manifest": manifest, "updated_at": removed[0].removed_at}
    return out


def _groups(url: str):
    """(key, members) of every sample; any unreadable part refuses the whole shard."""
    for item in iter_tar_groups(url):
        if isinstance(item, SampleError):
            raise ValueError(f"{item}; takedown needs a readable shard (it would not validate)")
        yield item


def _match(key: str, members: dict[str, bytes], config: TakedownConfig, url: str) -> tuple[str, str | None, int] | None:
    """(what matched, source URL, layer count) when the sample is to be removed, else None."""
    try:
        if JSON_MEMBER not in members:
            raise SampleError("missing_member", f"{key}.{JSON_MEMBER}")
        meta = parse_metadata(members[JSON_MEMBER])
    except SampleError as e:
        raise ValueError(f"{url}:{key}: {e}") from e
    source_url = (meta.get("source") or {}).get("url")
    by_key = key.rsplit("/", 1)[-1] in config.keys
    by_url = isinstance(source_url, str) and source_url in config.urls
    if not (by_key or by_url):
        return None
    return ("key+url" if by_key and by_url else "key" if by_key else "url"), source_url, len(meta.get("layers", []))


def _same_place(a: str, b: str) -> bool:
    """True when two URLs name the same file (local paths compared after resolving)."""
    fs_a, path_a = fsspec.core.url_to_fs(a)
    fs_b, path_b = fsspec.core.url_to_fs(b)
    return fs_a.unstrip_protocol(path_a) == fs_b.unstrip_protocol(path_b)


def takedown_shard(url: str, config: TakedownConfig) -> ShardTakedown:
    """Rewrite one shard into `config.out` without the requested samples (raises ValueError when refused)."""
    # 1. The shard must be complete: its stats are what we update.
    record = load_shard_stats(url)
    if record.stats is None:
        raise ValueError(f"{url}: " + (record.error or "no stats file (an unfinished shard); rebuild it first"))
    fs, root = fsspec.core.url_to_fs(config.out)
    fs.makedirs(root, exist_ok=True)
    name = _basename(url)
    target = f"{root.rstrip('/')}/{name}"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    # 2. Copy kept samples member by member into NAME.tar.tmp; collect the removed ones.
    result = ShardTakedown(shard=url, out=fs.unstrip_protocol(target))
    tar_tmp = target + ".tmp"
    try:
        with fs.open(tar_tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, members in _groups(url):
                match = _match(key, members, config, url)
                if match is not None:
                    result.removed.append(Removal(key, match[1], match[0], match[2], now))
                    continue
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                    tar.addfile(info, io.BytesIO(data))
                result.kept += 1
    except BaseException:
        if fs.exists(tar_tmp):
            fs.rm(tar_tmp)
        raise
    if _same_place(fs.unstrip_protocol(target), url) and not result.removed:
        fs.rm(tar_tmp)
        return result  # rewritten in place with nothing to remove: leave the shard untouched

    # 3. Sidecars: outcomes parquet (when present), manifest (extended), stats (last).
    stem = target[: -len(".tar")]
    manifest_name = _basename(stem) + MANIFEST_SUFFIX
    old_manifest = _read_optional(url[: -len(".tar")] + MANIFEST_SUFFIX)
    entries = json.loads(old_manifest)["removed"] if old_manifest else []
    manifest = {"shard": name, "removed": entries + [r.to_json() for r in result.removed]}
    moves = [(tar_tmp, target)]
    stats_path = stem + STATS_SUFFIX
    try:
        outcomes = _read_optional(outcomes_url_for(url))
        if outcomes is not None:
            rewritten = _rewrite_outcomes(outcomes, {r.key for r in result.removed})
            moves.append((_put(fs, stem + ".parquet", rewritten), stem + ".parquet"))
        manifest_path = stem + MANIFEST_SUFFIX
        moves.append((_put(fs, manifest_path, json.dumps(manifest, indent=1).encode()), manifest_path))
        stats = _updated_stats(record.stats, result.removed, manifest_name) if result.removed else dict(record.stats)
        moves.append((_put(fs, stats_path, json.dumps(stats, indent=1, sort_keys=True).encode()), stats_path))
    except BaseException:
        for tmp, _ in moves:
            if fs.exists(tmp):
                fs.rm(tmp)
        raise

    # 4. Commit: old stats gone first (it must never vouch for new content), then the moves, stats last.
    if fs.exists(stats_path):
        fs.rm(stats_path)
    for tmp, final in moves:
        fs.mv(tmp, final)
    return result


def _refresh_index(urls: list[str], out: str) -> None:
    """Rewrite `out/index.json` (wids) when the inputs or `out` had one: its sample counts just changed."""
    from mlcid.wids_index import INDEX_NAME, index_folder

    fs, root = fsspec.core.url_to_fs(out)
    beside_input = urls[0].rsplit("/", 1)[0] + "/" + INDEX_NAME if "/" in urls[0] else INDEX_NAME
    if fs.exists(f"{root.rstrip('/')}/{INDEX_NAME}") or _read_optional(beside_input) is not None:
        index_folder(out, _basename(urls[0]).rsplit("-", 1)[0])


def takedown(shards: str | Iterable[str], config: TakedownConfig) -> TakedownResult:
    """Rewrite every shard; a refused shard is reported with its reason and the others go on."""
    urls = expand_urls(shards)
    names = Counter(_basename(u) for u in urls)
    clashes = sorted(n for n, c in names.items() if c > 1)
    if clashes:
        raise ValueError(f"shards with the same name would overwrite each other in --out: {', '.join(clashes[:5])}")
    for u in urls:
        stats_url_for(u)  # every shard URL must end in .tar (raises otherwise)
    results = []
    for u in urls:
        try:
            results.append(takedown_shard(u, config))
        except (ValueError, OSError) as e:
            log.error("refused %s: %s", u, e)
            results.append(ShardTakedown(shard=u, error=str(e)))
    _refresh_index(urls, config.out)
    found_keys = {r.key.rsplit("/", 1)[-1] for s in results for r in s.removed}
    found_urls = {r.url for s in results for r in s.removed}
    return TakedownResult(results, sorted(config.keys - found_keys), sorted(config.urls - found_urls))
