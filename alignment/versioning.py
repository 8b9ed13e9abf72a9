"""Dataset identity: which bytes a run trained on, as DVC names them.

A run records the **DVC hash** of its input data (``<md5>.dir`` for a
directory, the value DVC writes into ``dvc.lock`` / ``<path>.dvc``):

- data tracked by DVC (a ``dvc.yaml`` stage output or a ``dvc add``-ed path):
  DVC's API (``dvc.repo.Repo``) finds the output and its recorded hash, and
  checks the workspace against it, so data edited without ``dvc repro`` /
  ``dvc commit`` is reported as ``modified`` with the hash of what is really
  on disk (DVC's state database makes that check cheap when nothing changed);
- untracked data (e.g. ``run.py --data /my/copy``): the same DVC md5 is
  computed with ``dvc_data`` (what ``dvc add`` would record), so a byte-equal
  copy of a tracked dataset gets the tracked hash. Above ``max_hash_bytes`` we
  fall back to hashing names, sizes and mtimes, because re-reading hundreds of
  GB on every run is not acceptable; ``dvc add`` such data instead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Untracked data up to this size gets a real content hash; larger gets a stat digest.
DEFAULT_MAX_HASH_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class DataVersion:
    """What a run records about its input data (all JSON-serialisable)."""

    path: str
    """Absolute path of the data directory or file."""
    fingerprint: str
    """``md5:<dvc hash>`` or ``stat:<digest>``: what caching keys on."""
    source: str
    """``dvc.lock`` (stage output), ``dvc`` (``.dvc`` pointer), ``computed`` (untracked, hashed) or ``stat``."""
    dvc_md5: str | None = None
    """The DVC hash of the bytes on disk now (``<md5>.dir`` for directories)."""
    dvc_recorded_md5: str | None = None
    """The hash DVC has on record for tracked data (``dvc.lock`` / ``.dvc``)."""
    dvc_file: str | None = None
    """The DVC file that tracks the data, relative to the repository root."""
    dvc_stage: str | None = None
    """The ``dvc.yaml`` stage that produces it, if any."""
    status: str = "untracked"
    """``in_sync`` (workspace == DVC record), ``modified``, ``unlocked`` (stage never run) or ``untracked``."""
    size: int | None = None
    nfiles: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _inside(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def _tracked_version(path: Path, repo_root: Path) -> DataVersion | None:
    """The DVC output at ``path`` in the repository at ``repo_root``, or None if DVC does not track it."""
    relative = _inside(path, repo_root)
    if relative is None or not (repo_root / ".dvc").is_dir():
        return None
    from dvc.exceptions import NotDvcRepoError, OutputNotFoundError
    from dvc.repo import Repo

    try:
        repo = Repo(str(repo_root))
    except NotDvcRepoError:
        return None
    try:
        outs = repo.find_outs_by_path(str(path.resolve()))  # absolute: DVC resolves relative paths from the cwd
    except OutputNotFoundError:
        return None
    finally:
        repo.close()
    out = outs[0]
    recorded = out.hash_info.value if out.hash_info else None
    current = out.get_hash().value
    stage = out.stage
    pipeline_stage = not stage.is_data_source
    dvc_file = os.path.relpath(stage.dvcfile.path if hasattr(stage, "dvcfile") else stage.path, repo_root.resolve())
    if pipeline_stage:
        # The hash lives in the lock file next to dvc.yaml, not in dvc.yaml itself.
        dvc_file = str(Path(dvc_file).with_name("dvc.lock"))
    status = "unlocked" if not recorded else ("in_sync" if recorded == current else "modified")
    # DVC's meta (size, file count) is the recorded one; it only describes the disk when in sync.
    meta = out.meta if status == "in_sync" else None
    return DataVersion(
        path=str(path.resolve()),
        fingerprint=f"md5:{current}",
        source="dvc.lock" if pipeline_stage else "dvc",
        dvc_md5=current,
        dvc_recorded_md5=recorded,
        dvc_file=dvc_file,
        dvc_stage=getattr(stage, "name", None) if pipeline_stage else None,
        status=status,
        size=getattr(meta, "size", None),
        nfiles=getattr(meta, "nfiles", None),
    )


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def dvc_md5(path: str | Path) -> tuple[str, int | None, int | None]:
    """DVC's md5 of an arbitrary file or directory (what ``dvc add`` would record): (hash, size, nfiles)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="dvc-odb-") as scratch:
        # dry_run: hash only, copy nothing into the (throw-away) object store.
        _, meta, obj = build(LocalHashFileDB(fs, scratch), os.fspath(path), fs, "md5", dry_run=True)
    return obj.hash_info.value, meta.size, meta.nfiles


def _stat_digest(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        name = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def data_version(
    path: str | Path, repo_root: str | Path = ".", max_hash_bytes: int = DEFAULT_MAX_HASH_BYTES
) -> DataVersion:
    """Identify the data at ``path`` (relative paths are taken from ``repo_root``)."""
    path, repo_root = Path(path).expanduser(), Path(repo_root)
    if not path.is_absolute():
        path = repo_root / path
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    tracked = _tracked_version(path, repo_root)
    if tracked is not None:
        return tracked
    files = _files(path)
    total = sum(f.stat().st_size for f in files)
    if total <= max_hash_bytes:
        md5, size, nfiles = dvc_md5(path)
        return DataVersion(
            path=str(path.resolve()), fingerprint=f"md5:{md5}", source="computed", dvc_md5=md5, size=size, nfiles=nfiles
        )
    return DataVersion(
        path=str(path.resolve()),
        fingerprint=f"stat:{_stat_digest(files, path)}",
        source="stat",
        size=total,
        nfiles=len(files),
    )


def dataset_fingerprint(path: str | Path, repo_root: str | Path = ".") -> dict[str, str]:
    """``{"fingerprint": ..., "source": ...}`` for a data directory (see :func:`data_version`)."""
    version = data_version(path, repo_root)
    return {"fingerprint": version.fingerprint, "source": version.source}
