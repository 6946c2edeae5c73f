"""A wids shard index (`index.json`) beside MLCID shards, so `wids.ShardListDataset("…/index.json")` reads them.

    mlcid wids-index data/            # writes data/index.json from the shards' stats files (cli/wids_index.py)

The sample counts come from each shard's stats file (`written`); a shard without one (unfinished) or with
no samples is left out and reported. Shards in the index's own folder are listed by relative name (the folder
can be moved or mirrored to object storage as a whole); others by their full URL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec

from mlcid.shards import expand_urls
from mlcid.stats import load_shard_stats

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
WIDS_KIND = "wids-shard-index-v1"


@dataclass
class WidsIndex:
    """What `write_wids_index` wrote."""

    url: str
    shards: list[dict]  # {"url", "nsamples", "filesize"} as in the file
    left_out: dict[str, str] = field(default_factory=dict)  # shard URL → why it is not in the index

    @property
    def nsamples(self) -> int:
        return sum(s["nsamples"] for s in self.shards)


def _folder(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def _canonical(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.unstrip_protocol(path)


def write_wids_index(shards: str | Iterable[str], index_url: str | None = None, name: str | None = None) -> WidsIndex:
    """Write a wids index of complete shards (default: `index.json` in the first shard's folder); atomic."""
    urls = expand_urls(shards)
    index_url = index_url or f"{_folder(urls[0])}/{INDEX_NAME}"
    base = _canonical(_folder(index_url))
    listed, left_out = [], {}
    for url in urls:
        record = load_shard_stats(url)
        if record.stats is None:
            left_out[url] = record.error or "no stats file (unfinished shard)"
            continue
        if record.stats["written"] == 0:
            left_out[url] = "no samples"
            continue
        fs, path = fsspec.core.url_to_fs(url)
        full = fs.unstrip_protocol(path)
        rel = full[len(base) + 1 :] if _folder(full) == base else full  # relative when beside the index
        listed.append({"url": rel, "nsamples": record.stats["written"], "filesize": fs.size(path)})
    if not listed:
        raise ValueError(f"no complete shard with samples among {len(urls)} shard(s): nothing to index")
    doc = {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": name or base.rstrip("/").rsplit("/", 1)[-1],
        "shardlist": listed,
    }
    fs, path = fsspec.core.url_to_fs(index_url)
    with fs.open(path + ".tmp", "wb") as f:
        f.write(json.dumps(doc, indent=1).encode())
    fs.mv(path + ".tmp", path)
    return WidsIndex(fs.unstrip_protocol(path), listed, left_out)


def index_folder(out_dir: str, prefix: str = "mlcid") -> WidsIndex | None:
    """Rewrite `out_dir/index.json` over the folder's `{prefix}-*.tar` shards; None (and no file) when none is done."""
    fs, path = fsspec.core.url_to_fs(out_dir)
    shards = sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{path.rstrip('/')}/{prefix}-*.tar"))
    try:
        return write_wids_index(shards, f"{fs.unstrip_protocol(path).rstrip('/')}/{INDEX_NAME}") if shards else None
    except ValueError as e:
        log.warning("no wids index written in %s: %s", out_dir, e)
        return None
