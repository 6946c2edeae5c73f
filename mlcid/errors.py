"""Typed drop reasons: a bad sample raises `SampleError(reason, detail)`; batch jobs count `reason`."""

from __future__ import annotations


class SampleError(ValueError):
    """A sample that cannot be used. `reason` is a short stable identifier counted in shard stats."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Reasons shared by the reader, the writer and the validator (pipelines add their own).
MISSING_MEMBER = "missing_member"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"
SIZE_MISMATCH = "size_mismatch"
LAYER_COUNT = "layer_count"
MASK_VALUES = "mask_values"
MASK_OVERLAP = "mask_overlap"
MASK_AREA = "mask_area"
BAD_TEXT = "bad_text"
TRUNCATED_SHARD = "truncated_shard"
UNREADABLE_SHARD = "unreadable_shard"
