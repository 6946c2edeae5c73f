"""img2dataset shard reading: odd image modes, EXIF, bounds, corrupt members, interleaving, truncation."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlcid.errors import SampleError
from pipelines.base import Item
from pipelines.inputs import (
    DecodeOptions,
    Drop,
    RawRecord,
    ReadStats,
    decode_record,
    input_shard_id,
    iter_inputs,
    iter_raw_records,
    output_size,
)
from tests.builders import write_tar


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_array(h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height and whose pixel data is garbage (decoding it would fail)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


OPTS = DecodeOptions(max_side=512, min_side=64, shard_id=3, shard_url="x/00003.tar")


def decode(members: dict[str, bytes], opts: DecodeOptions = OPTS) -> Item | Drop:
    return decode_record(RawRecord("k", members), opts)


def test_input_shard_id():
    assert input_shard_id("s3://bucket/laion/00012.tar") == 12
    assert input_shard_id("/data/raw/00000.tar") == 0
    with pytest.raises(ValueError, match="shard id"):
        input_shard_id("/data/raw/shard.tar")


def test_output_size_rounds_to_multiples_of_8_and_never_upscales():
    assert output_size(1000, 600, 512) == (848, 512)
    assert output_size(600, 1000, 512) == (512, 848)
    assert output_size(100, 70, 512) == (96, 64)
    assert output_size(512, 512, 512) == (512, 512)


@pytest.mark.parametrize(
    "mode_img",
    [
        lambda a: Image.fromarray(a[..., 0]),  # L
        lambda a: Image.fromarray(a).convert("CMYK"),
        lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])),  # RGBA
        lambda a: Image.fromarray(a.astype(np.uint16)[..., 0] * 257),  # 16-bit grayscale
        lambda a: Image.fromarray(a).convert("P"),
    ],
    ids=["gray", "cmyk", "rgba", "16bit", "palette"],
)
def test_odd_modes_become_rgb(mode_img):
    img = mode_img(rgb_array())
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    item = decode({fmt.lower().replace("jpeg", "jpg"): encode(img, fmt)})
    assert isinstance(item, Item), item
    assert item.image.shape == (96, 128, 3) and item.image.dtype == np.uint8


def test_16bit_png_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (80, 1))  # (80, 128)
    item = decode({"png": encode(Image.fromarray(ramp), "PNG")})
    assert isinstance(item, Item)
    row = item.image[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and (np.diff(row) >= 0).all()


def test_exif_orientation_applied():
    a = np.zeros((80, 120, 3), np.uint8)  # stored landscape: left half red, right half blue
    a[:, :60] = (255, 0, 0)
    a[:, 60:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    item = decode({"jpg": encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)})
    assert isinstance(item, Item)
    assert item.image.shape == (120, 80, 3)  # portrait after the transpose
    top, bottom = item.image[:40].reshape(-1, 3).mean(0), item.image[-40:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50  # the red (left) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_too_small_and_too_large_and_corrupt():
    small = decode({"png": encode(Image.fromarray(rgb_array(63, 200)), "PNG")})
    assert isinstance(small, Drop) and small.reason == "too_small"
    huge = decode({"png": png_header_only(10_001, 10_001)})  # 100 MP claimed; pixels never decoded
    assert isinstance(huge, Drop) and huge.reason == "image_too_large"
    bounded = decode({"png": encode(Image.fromarray(rgb_array(100, 100)), "PNG")},
                     DecodeOptions(max_pixels=5_000))
    assert isinstance(bounded, Drop) and bounded.reason == "image_too_large"
    good = encode(Image.fromarray(rgb_array()), "JPEG")
    corrupt = decode({"jpg": good[: len(good) // 2]})
    assert isinstance(corrupt, Drop) and corrupt.reason == "undecodable_image"
    garbage = decode({"jpg": b"\xff\xd8 not a jpeg at all"})
    assert isinstance(garbage, Drop) and garbage.reason == "undecodable_image"
    empty = decode({"jpg": b""})
    assert isinstance(empty, Drop) and empty.reason == "undecodable_image"
    no_image = decode({"txt": b"a caption"})
    assert isinstance(no_image, Drop) and no_image.reason == "missing_image"


def test_resize_and_metadata():
    meta = {"url": "http://x/y.jpg", "caption": "from json"}
    item = decode({"jpg": encode(Image.fromarray(rgb_array(600, 1000)), "JPEG"), "txt": b"  a cat \n",
                   "json": json.dumps(meta).encode()})
    assert item.image.shape == (512, 848, 3)
    assert item.source["caption"] == "a cat" and item.source["url"] == "http://x/y.jpg"
    assert item.source["input_shard"] == 3 and item.source["original_size"] == [1000, 600]


def test_missing_caption_kept():
    item = decode({"jpg": encode(Image.fromarray(rgb_array()), "JPEG"), "json": b"{not json"})
    assert isinstance(item, Item) and item.source["caption"] is None and item.source["url"] is None


def test_interleaved_members_grouped(tmp_path):
    a, b = encode(Image.fromarray(rgb_array()), "JPEG"), encode(Image.fromarray(rgb_array(80, 80)), "PNG")
    url = write_tar(tmp_path / "00001.tar", [
        ("000010000.jpg", a), ("000010001.png", b), ("000010000.txt", b"first"),
        ("000010001.txt", b"second"), ("000010000.json", b"{}"), ("000010001.json", b"{}"),
    ])
    items = list(iter_inputs(url))
    assert [type(i) for i in items] == [Item, Item]
    assert {i.key: i.source["caption"] for i in items} == {"000010000": "first", "000010001": "second"}


def test_late_member_counted_not_duplicated(tmp_path):
    img = encode(Image.fromarray(rgb_array()), "JPEG")
    url = write_tar(tmp_path / "00002.tar", [("a.jpg", img), ("b.jpg", img), ("c.jpg", img), ("a.txt", b"late")])
    stats = ReadStats()
    recs = list(iter_raw_records(url, flush_after=1, stats=stats))
    assert [r.key for r in recs] == ["a", "b", "c"] and stats.late_members == 1 and stats.keys == 3


def test_truncated_tar_keeps_complete_keys(tmp_path):
    img = encode(Image.fromarray(rgb_array()), "JPEG")
    path = tmp_path / "00005.tar"
    write_tar(path, [("a.jpg", img), ("a.txt", b"x"), ("b.jpg", img), ("c.jpg", img)])
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"c.jpg") + 512 + len(img) // 2])  # cut inside c.jpg's data
    out = list(iter_inputs(str(path)))
    assert [type(o).__name__ for o in out] == ["Item", "Item", "Drop"]
    assert out[-1].reason == "truncated_shard" and out[-1].key == "c"


def test_unreadable_shard_raises(tmp_path):
    with pytest.raises(SampleError, match="unreadable_shard"):
        list(iter_raw_records(str(tmp_path / "00000.tar")))
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(SampleError, match="unreadable_shard"):
        list(iter_raw_records(str(tmp_path / "00001.tar")))


def test_bad_inputs_never_stop_the_shard(tmp_path):
    """Every odd input in one shard: the good ones are written, each bad one dropped with its reason."""
    from mlcid.shard_check import validate_shard
    from mlcid.writer import shard_name
    from pipelines.runner import ShardProcessor
    from tests.builders import classical_config, input_records

    good = input_records(3, seed=5, shard=9)
    odd = [
        ("odd0", {"jpg": b"", "txt": b"zero"}),
        ("odd1", {"jpg": good[0][1]["jpg"][:300], "txt": b"corrupt"}),
        ("odd2", {"png": encode(Image.fromarray(rgb_array(40, 40)), "PNG")}),
        ("odd3", {"png": png_header_only(12_000, 12_000)}),
        ("odd4", {"txt": b"no image"}),
    ]
    members = [(f"{k}.{s}", d) for k, m in good[:2] + odd + good[2:] for s, d in m.items()]
    url = write_tar(tmp_path / "00009.tar", members)
    stats = ShardProcessor(classical_config()).setup().process(url, str(tmp_path / "out"))
    assert stats["read"] == 8
    assert stats["dropped"]["undecodable_image"] == 2
    assert stats["dropped"]["too_small"] == 1 and stats["dropped"]["image_too_large"] == 1
    assert stats["dropped"]["missing_image"] == 1
    assert stats["written"] >= 2 and stats["read"] == stats["written"] + sum(stats["dropped"].values())
    assert validate_shard(str(tmp_path / "out" / shard_name(9))) == (stats["written"], {})


def test_tar_cut_between_members_is_flagged(tmp_path):
    img = encode(Image.fromarray(rgb_array()), "JPEG")
    path = tmp_path / "00006.tar"
    write_tar(path, [("a.jpg", img), ("b.jpg", img)])
    data = path.read_bytes()
    complete = ReadStats()
    assert [r.key for r in iter_raw_records(str(path), stats=complete)] == ["a", "b"] and not complete.truncated
    path.write_bytes(data[: data.index(b"b.jpg")])  # exactly at b's header: a 512-byte boundary
    cut = ReadStats()
    assert [r.key for r in iter_raw_records(str(path), stats=cut)] == ["a"] and cut.truncated
