"""A raw img2dataset-style shard of real photographs that ship inside scikit-image and scikit-learn (offline).

`python -m mlcid.photos --out DIR --shard-id 90` writes `DIR/00090.tar` (KEY.jpg, KEY.txt, KEY.json), so the demo
can run the MLCID pipeline on real photos next to the synthetic scenes without any download.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from mlcid.imageio import encode_jpeg

# name → (loader, caption). Only images these packages carry on disk (several skimage images download on use).
_SKIMAGE = {
    "astronaut": "an astronaut in a white suit posing in front of a flag",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat looking to the side",
    "rocket": "a rocket on a launch pad",
    "stereo_motorcycle": "a red motorcycle in a garage",
    "immunohistochemistry": "a microscope image of stained tissue",
}
_SKLEARN = {"china.jpg": "a chinese temple among trees", "flower.jpg": "a pink flower with a bee"}


def load_photos() -> list[tuple[str, np.ndarray, str]]:
    """(name, RGB uint8 image, caption) for each bundled photo that loads offline."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name, caption in _SKIMAGE.items():
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle returns (left, right, disp)
        photos.append((name, np.ascontiguousarray(image[..., :3], dtype=np.uint8), caption))
    bundle = load_sample_images()
    for fname, image in zip(bundle.filenames, bundle.images):
        base = os.path.basename(fname)
        photos.append((Path(base).stem, image.astype(np.uint8), _SKLEARN.get(base, base)))
    return photos


def write_photo_shard(out: str | os.PathLike, shard_id: int = 90) -> Path:
    """Write the bundled photos as one img2dataset-style shard `{shard_id:05d}.tar`; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{shard_id:05d}.tar"
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i, (name, image, caption) in enumerate(load_photos()):
            key = f"{shard_id:05d}{i:04d}"
            meta = {"key": key, "caption": caption, "url": f"bundled://{name}", "width": image.shape[1],
                    "height": image.shape[0], "status": "success"}
            for suffix, data in (("jpg", encode_jpeg(image)), ("txt", caption.encode()),
                                 ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(data), time.time()
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path
