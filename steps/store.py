"""Shard directories in the artifact store: written by the fanned-out steps, read by streaming training.

Local stores are read in place; remote ones (GCS, S3) are copied file by file
through ZenML's ``fileio``, so the same steps run on every stack. Nothing of a
method here: this module is in the cache key of ``encode_shard``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from zenml.io import fileio

from alignment.encoding import META_FILE, EncodedPairs
from alignment.shards import LatentShard

T = TypeVar("T")


def upload_directory(local: Path, target: str) -> None:
    """Copy a local directory tree into the artifact store (local disk, GCS or S3 alike)."""
    fileio.makedirs(target)
    for name in os.listdir(local):
        source = local / name
        if source.is_dir():
            upload_directory(source, os.path.join(target, name))
        else:
            fileio.copy(str(source), os.path.join(target, name), overwrite=True)


def read_from_store(uri: str, load: Callable[[str], T]) -> T:
    """``load`` of a shard directory: in place when local, else copied to a temporary directory first."""
    if os.path.isdir(uri):
        return load(uri)
    with tempfile.TemporaryDirectory(prefix="shard_") as local:
        for name in fileio.listdir(uri):
            fileio.copy(os.path.join(uri, str(name)), os.path.join(local, str(name)), overwrite=True)
        return load(local)


def load_from_store(uri: str) -> EncodedPairs:
    """One latent shard from the artifact store."""
    return read_from_store(uri, EncodedPairs.load)


def latent_pair_ids(entry: LatentShard) -> list[str]:
    """A latent shard's pair ids, from its json sidecar in the artifact store (the latents are not read)."""
    with fileio.open(os.path.join(entry.uri, META_FILE), "r") as handle:
        return list(json.load(handle)["pair_ids"])
