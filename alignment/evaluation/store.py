"""Where an evaluation keeps its samples and scores, so that a crashed evaluation resumes.

Layout under ``evaluation.resume_dir``::

    <protocol key>/protocol.json                      what the key stands for (prompts digest, seeds, sampler)
    <protocol key>/<model key>/model.json             which model (spec, or the weights' digest)
    <protocol key>/<model key>/images/000000.png ...  one PNG per (prompt, seed), grid order
    <protocol key>/<model key>/scores/<scorer key>.npy

Images are written as they are sampled (PNG is lossless, so a reloaded image
scores exactly like the one in memory); on a rerun only the missing indices are
sampled. A scorer's scores are written once the scorer has scored every image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LARGE_FILE = 64 << 20
EDGE = 16 << 20


def digest(value: Any) -> str:
    """A short stable key of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(directory: str | Path) -> str:
    """Content digest of a weights directory (or file): names, sizes and bytes.

    Files above 64 MB contribute their size and first and last 16 MB (a full
    UNet is gigabytes; a different checkpoint differs there too).
    """
    root = Path(directory)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    hasher = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        hasher.update(f"{file.relative_to(root) if file != root else file.name}:{size}\n".encode())
        with file.open("rb") as handle:
            if size <= LARGE_FILE:
                hasher.update(handle.read())
            else:
                hasher.update(handle.read(EDGE))
                handle.seek(size - EDGE)
                hasher.update(handle.read(EDGE))
    return hasher.hexdigest()[:16]


class ModelSamples:
    """The stored samples and scores of one model under one protocol."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.count = count
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "scores").mkdir(parents=True, exist_ok=True)

    def _image_path(self, index: int) -> Path:
        return self.root / "images" / f"{index:06d}.png"

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self._image_path(i).is_file()]

    def save_image(self, index: int, image: Image.Image) -> None:
        path = self._image_path(index)
        partial = path.with_suffix(".tmp")
        image.save(partial, format="PNG")
        partial.replace(path)  # atomic: a crash never leaves half an image under the final name

    def load_image(self, index: int) -> Image.Image:
        with Image.open(self._image_path(index)) as image:
            return image.copy()

    def scores(self, key: str) -> np.ndarray | None:
        path = self.root / "scores" / f"{key}.npy"
        if not path.is_file():
            return None
        values = np.load(path, allow_pickle=False)
        return values if len(values) == self.count else None

    def scorer_metadata(self, key: str) -> dict[str, Any] | None:
        path = self.root / "scores" / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_scores(self, key: str, values: np.ndarray, metadata: dict[str, Any] | None = None) -> None:
        if metadata is not None:
            (self.root / "scores" / f"{key}.json").write_text(json.dumps(metadata, sort_keys=True, default=str))
        path = self.root / "scores" / f"{key}.npy"
        partial = path.with_name(path.stem + ".tmp.npy")
        np.save(partial, np.asarray(values, dtype=np.float64), allow_pickle=False)
        partial.replace(path)


class EvalStore:
    """The resume directory of one protocol (prompts, seeds, sampler, resolution)."""

    def __init__(self, directory: str | Path, protocol: dict[str, Any], count: int) -> None:
        self.root = Path(directory) / digest(protocol)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "protocol.json").write_text(json.dumps(protocol, indent=2, sort_keys=True, default=str))
        self.count = count

    def model(self, identity: dict[str, Any]) -> ModelSamples:
        root = self.root / digest(identity)
        root.mkdir(parents=True, exist_ok=True)
        (root / "model.json").write_text(json.dumps(identity, indent=2, sort_keys=True, default=str))
        return ModelSamples(root, self.count)
