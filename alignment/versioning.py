"""Dataset identity: which bytes a run trained on.

DVC already knows a tracked directory's content hash (``dvc.lock`` for stage
outputs, ``<path>.dvc`` for added data); we reuse it instead of re-hashing
gigabytes. Untracked directories fall back to hashing names, sizes and
modification times, which is cheap and changes whenever a file does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml


def _dvc_lock_md5(path: Path, repo_root: Path) -> str | None:
    lock = repo_root / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        relative = path.resolve().relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == relative and out.get("md5"):
                return str(out["md5"])
    return None


def _dvc_file_md5(path: Path) -> str | None:
    pointer = path.with_name(path.name + ".dvc")
    if not pointer.is_file():
        return None
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs", [])
    return str(outs[0]["md5"]) if outs and outs[0].get("md5") else None


def _stat_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def dataset_fingerprint(path: str | Path, repo_root: str | Path = ".") -> dict[str, str]:
    """``{"fingerprint": ..., "source": "dvc.lock" | "dvc" | "stat"}`` for a data directory."""
    path, repo_root = Path(path), Path(repo_root)
    if not path.is_absolute():
        path = repo_root / path
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    for source, md5 in (("dvc.lock", _dvc_lock_md5(path, repo_root)), ("dvc", _dvc_file_md5(path))):
        if md5:
            return {"fingerprint": f"md5:{md5}", "source": source}
    return {"fingerprint": f"stat:{_stat_digest(path)}", "source": "stat"}
