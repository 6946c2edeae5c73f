"""The per-sample outcomes table of a shard: one parquet row per input key — kept or why not, provenance, timings."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.base import Item
from pipelines.inputs import Drop


def outcome_row(res: Item | Drop) -> dict[str, Any]:
    """The row of one input before the writer decides: provenance filled, `kept` False, no reason yet."""
    src = res.source or {}
    return {
        "key": res.key, "kept": False, "reason": None, "detail": "", "num_layers": 0,
        "uid": src.get("uid"), "url": src.get("url"), "caption": src.get("caption"),
        "license": json.dumps(src["license"], sort_keys=True) if src.get("license") else None,
    }


def outcomes_parquet(rows: list[dict[str, Any]], timing_columns: list[str]) -> bytes:
    """The parquet file (bytes): key, kept, reason, detail, num_layers, uid, url, caption, license (JSON),
    seconds_<stage>… per row."""
    strings = ("key", "reason", "detail", "uid", "url", "caption", "license")
    table = pa.table({
        **{name: pa.array([r.get(name) for r in rows], pa.string()) for name in strings},
        "kept": pa.array([r["kept"] for r in rows], pa.bool_()),
        "num_layers": pa.array([r["num_layers"] for r in rows], pa.int8()),
        **{f"seconds_{c}": pa.array([r.get(f"seconds_{c}") for r in rows], pa.float32()) for c in timing_columns},
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
