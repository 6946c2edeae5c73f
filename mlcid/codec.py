"""Encode an `MLCIDSample` to tar members and decode members back, raising typed `SampleError`s."""

from __future__ import annotations

import json
import re

from mlcid import errors
from mlcid.errors import SampleError
from mlcid.imageio import DEFAULT_MAX_PIXELS, decode_gray, decode_rgb, decode_rgba, encode_jpeg, encode_png
from mlcid.schema import (
    COMPOSITE_MEMBER,
    JSON_MEMBER,
    SCHEMA,
    LayerInfo,
    MLCIDSample,
    layer_member,
    mask_member,
)

_MEMBER_RE = re.compile(r"^(json|composite\.jpg|layer\d\d\.png|mask\d\d\.png)$")


def encode_sample(sample: MLCIDSample) -> dict[str, bytes]:
    """{member suffix: bytes}, in the order they go into the tar."""
    members = {
        JSON_MEMBER: json.dumps(sample.metadata(), ensure_ascii=False, sort_keys=True).encode("utf-8"),
        COMPOSITE_MEMBER: encode_jpeg(sample.composite),
        layer_member(0): encode_png(sample.background[..., :3]),
    }
    for i, (fg, m) in enumerate(zip(sample.foregrounds, sample.masks), start=1):
        members[layer_member(i)] = encode_png(fg)
        members[mask_member(i)] = encode_png(m)
    return members


def parse_metadata(data: bytes) -> dict:
    """Parse and shape-check `KEY.json`."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(errors.BAD_JSON, str(e)) from e
    if not isinstance(meta, dict):
        raise SampleError(errors.BAD_JSON, "metadata is not a JSON object")
    if meta.get("schema") != SCHEMA:
        raise SampleError(errors.BAD_SCHEMA, f"schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SampleError(errors.BAD_SCHEMA, "'layers' must be a non-empty list")
    return meta


def decode_sample(key: str, members: dict[str, bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> MLCIDSample:
    """Build a sample from its members; raise `SampleError` on a missing member, bad JSON or bad image."""
    if JSON_MEMBER not in members:
        raise SampleError(errors.MISSING_MEMBER, f"{key}.{JSON_MEMBER}")
    meta = parse_metadata(members[JSON_MEMBER])
    try:
        layers = [LayerInfo.from_json(d) for d in meta["layers"]]
    except ValueError as e:
        raise SampleError(errors.BAD_SCHEMA, str(e)) from e
    needed = [COMPOSITE_MEMBER, layer_member(0)]
    for i in range(1, len(layers)):
        needed += [layer_member(i), mask_member(i)]
    missing = [m for m in needed if m not in members]
    if missing:
        raise SampleError(errors.MISSING_MEMBER, f"{key}: " + ", ".join(missing))
    extra = [m for m in members if m not in needed and m != JSON_MEMBER]
    if extra:
        raise SampleError(errors.BAD_SCHEMA, f"{key}: unexpected members " + ", ".join(sorted(extra))[:200])
    return MLCIDSample(
        key=key,
        global_prompt=meta.get("global_prompt"),
        composite=decode_rgb(members[COMPOSITE_MEMBER], max_pixels),
        background=decode_rgb(members[layer_member(0)], max_pixels),
        foregrounds=[decode_rgba(members[layer_member(i)], max_pixels) for i in range(1, len(layers))],
        masks=[decode_gray(members[mask_member(i)], max_pixels) for i in range(1, len(layers))],
        layers=layers,
        source=meta.get("source") or {},
        pipeline=meta.get("pipeline") or {},
    )


def is_sample_member(suffix: str) -> bool:
    return bool(_MEMBER_RE.match(suffix))
