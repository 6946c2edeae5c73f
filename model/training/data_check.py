"""Before the first training step: prove the shards yield usable samples, or say why not and what to do.

`check_training_data(shards, config)` reads the shards in order (no resampling) until it finds one sample the
trainer can use. When the shards do not exist, or the first `config.check_samples` items are all unusable, it
raises `DataCheckError` with the reasons counted and the likely fix (raw img2dataset shards → build MLCID first).
Without it, an endless resampling stream over unusable shards never yields a batch and training waits at step 0.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from mlcid.codec import decode_sample, is_sample_member
from mlcid.errors import SampleError
from mlcid.shards import expand_urls, iter_tar_groups
from mlcid.validate import ValidationConfig, validate_sample
from model.training.config import DataConfig

RAW_IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "webp"}


class DataCheckError(ValueError):
    """The training data cannot give a single usable sample (the message names the reasons and the fix)."""


@dataclass
class DataCheck:
    """What the check read: shards opened, items seen, the first usable sample's key, drops by reason."""

    shards: int = 0
    items: int = 0
    usable_key: str | None = None
    dropped: Counter[str] = field(default_factory=Counter)
    raw_like: int = 0  # groups whose members look like img2dataset output (image + caption, no MLCID members)


def _missing_local(urls: list[str]) -> list[str]:
    return [u for u in urls if "://" not in u and not os.path.exists(u)]


def _looks_raw(members: dict[str, bytes]) -> bool:
    suffixes = set(members)
    return bool(suffixes & RAW_IMAGE_SUFFIXES) and not any(is_sample_member(s) and s != "json" for s in suffixes)


def scan(urls: list[str], config: DataConfig, limit: int) -> DataCheck:
    """Read groups shard by shard until one sample passes decoding, validation and the layer policy."""
    from model.training.data import READER_MAX_LAYERS, check_layers  # data.py imports torch; this module does not

    validation = ValidationConfig(READER_MAX_LAYERS, config.min_area_frac, config.max_area_frac)
    result = DataCheck()
    for url in urls:
        result.shards += 1
        for item in iter_tar_groups(url):
            result.items += 1
            try:
                if isinstance(item, SampleError):
                    raise item
                key, members = item
                if _looks_raw(members):
                    result.raw_like += 1
                sample = decode_sample(key, members)
                validate_sample(sample, validation)
                check_layers(sample, config)
            except SampleError as e:
                result.dropped[e.reason] += 1
                if result.items >= limit:
                    return result
                continue
            result.usable_key = sample.key
            return result
    return result


def _likely_fix(check: DataCheck, config: DataConfig, spec: str) -> str:
    if check.raw_like and check.raw_like >= check.items // 2:
        return (f"these look like raw img2dataset shards (image + caption members, no composite.jpg / layerNN.png): "
                f"build MLCID from them first, e.g. `make build-mlcid SHARDS='{spec}' OUT=mlcid/`, then train on "
                "mlcid/mlcid-*.tar")
    top = check.dropped.most_common(1)[0][0] if check.dropped else ""
    hints = {
        "too_many_layers": f"every sample has more layers than data.max_layers={config.max_layers}: raise it or "
                           "set data.too_many_layers=truncate",
        "mask_area": f"masks fall outside data.min_area_frac={config.min_area_frac} / "
                     f"data.max_area_frac={config.max_area_frac}",
        "unreadable_shard": "the shards cannot be opened or are not tar files (check the path, the URL and "
                            "the storage credentials)",
        "truncated_shard": "the shards are cut short (still being written, or a failed copy)",
    }
    return hints.get(top, f"inspect them with `make validate SHARDS='{spec}'`")


def check_training_data(shards: str | list[str], config: DataConfig) -> DataCheck:
    """Raise `DataCheckError` unless the shards give at least one usable sample within `config.check_samples`."""
    spec = shards if isinstance(shards, str) else " ".join(shards)
    try:
        urls = expand_urls(shards, complete_only=True)  # as MLCIDReader reads them
    except ValueError as e:
        raise DataCheckError(f"--data {spec!r}: {e}") from e
    missing = _missing_local(urls)
    if missing:
        head = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataCheckError(f"--data {spec!r}: {len(missing)} of {len(urls)} shard path(s) do not exist: {head}")
    if config.check_samples <= 0:
        return DataCheck()
    check = scan(urls, config, config.check_samples)
    if check.usable_key is None:
        counts = ", ".join(f"{reason}: {n}" for reason, n in check.dropped.most_common()) or "no samples at all"
        raise DataCheckError(
            f"--data {spec!r}: no usable training sample in the first {check.items} item(s) of {check.shards} of "
            f"{len(urls)} shard(s) (dropped — {counts}). Likely fix: {_likely_fix(check, config, spec)}"
            + (" (or look further with --set data.check_samples=N)" if check.items >= config.check_samples else "")
        )
    return check
