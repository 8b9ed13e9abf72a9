"""Compare two versions of a toy-world output directory, file by file.

    python scripts/compare_toy_outputs.py OLD_DIR NEW_DIR

For confirming that a rebuild (``dvc repro``) reproduces the committed data:

- ``*.safetensors``: tensor names, shapes, dtypes, the largest absolute
  difference and whether each tensor is bitwise equal;
- ``*.parquet``: row count, columns and contents (binary cells, such as the
  PNG bytes of ``jpg_0``/``jpg_1``, are compared by their SHA-256);
- ``*.json``: key-wise differences (added, removed and changed values, with
  the numeric difference);
- anything else: byte equality.

Exits 0 when every file is identical, 1 otherwise (2 for a usage error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FileReport:
    """The comparison of one file present in both directories."""

    path: str
    kind: str
    equal: bool
    lines: list[str] = field(default_factory=list)


def _files(directory: Path) -> set[str]:
    """Relative paths of the regular files under ``directory`` (hidden entries skipped)."""
    return {
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _raw_bytes(tensor: Any) -> Any:
    """The tensor's bytes as a uint8 tensor: equal exactly when the two tensors are bitwise equal."""
    import torch

    return tensor.reshape(-1).contiguous().view(torch.uint8)


def compare_safetensors(old: Path, new: Path) -> tuple[bool, list[str]]:
    """Tensor-wise comparison; equal only if names, shapes, dtypes and every bit agree."""
    import torch
    from safetensors.torch import load_file

    old_tensors, new_tensors = load_file(str(old)), load_file(str(new))
    lines: list[str] = []
    equal = True
    for name in sorted(old_tensors.keys() - new_tensors.keys()):
        lines.append(f"only in old: {name}")
        equal = False
    for name in sorted(new_tensors.keys() - old_tensors.keys()):
        lines.append(f"only in new: {name}")
        equal = False
    unequal = 0
    worst = 0.0
    for name in sorted(old_tensors.keys() & new_tensors.keys()):
        a, b = old_tensors[name], new_tensors[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            lines.append(f"{name}: {a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}")
            equal = False
            continue
        if torch.equal(_raw_bytes(a), _raw_bytes(b)):
            continue
        difference = float((a.double() - b.double()).abs().max()) if a.is_floating_point() else math.nan
        worst = max(worst, difference) if not math.isnan(difference) else worst
        lines.append(f"{name}: {a.dtype}{list(a.shape)} differs, max |diff| {difference:.3g}")
        unequal += 1
        equal = False
    shared = len(old_tensors.keys() & new_tensors.keys())
    lines.insert(0, f"{shared} shared tensors, {shared - unequal} bitwise equal, max |diff| {worst:.3g}")
    return equal, lines


def _hashed(value: Any) -> Any:
    """Binary cells (also inside struct cells) replaced by their SHA-256, so frames compare cheaply."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + _sha256(bytes(value))
    if isinstance(value, dict):
        return {key: _hashed(item) for key, item in value.items()}
    return value


def compare_parquet(old: Path, new: Path) -> tuple[bool, list[str]]:
    """Row count, columns and contents; binary cells compared by hash."""
    import pandas as pd

    a, b = pd.read_parquet(old), pd.read_parquet(new)
    lines: list[str] = [f"rows {len(a)} -> {len(b)}" if len(a) != len(b) else f"{len(a)} rows"]
    equal = len(a) == len(b)
    if list(a.columns) != list(b.columns):
        equal = False
        removed = [column for column in a.columns if column not in b.columns]
        added = [column for column in b.columns if column not in a.columns]
        lines.append(f"columns differ: removed {removed}, added {added}" if removed or added else "column order differs")
    for column in [column for column in a.columns if column in b.columns]:
        if a[column].dtype != b[column].dtype:
            lines.append(f"{column}: dtype {a[column].dtype} -> {b[column].dtype}")
            equal = False
        if len(a) != len(b):
            continue
        left = [_hashed(value) for value in a[column].tolist()]
        right = [_hashed(value) for value in b[column].tolist()]
        differing = [i for i, (x, y) in enumerate(zip(left, right, strict=True)) if not _same_cell(x, y)]
        if differing:
            equal = False
            lines.append(f"{column}: {len(differing)} of {len(a)} rows differ (first at row {differing[0]})")
    return equal, lines


def _same_cell(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        same = x == y
    except (TypeError, ValueError):
        return repr(x) == repr(y)
    if isinstance(same, bool):
        return same
    try:  # numpy arrays (list cells) compare element-wise
        import numpy as np

        return bool(np.array_equal(np.asarray(x), np.asarray(y)))
    except (TypeError, ValueError):
        return repr(x) == repr(y)


def json_differences(old: Any, new: Any, path: str = "") -> Iterator[str]:
    """Key-wise differences of two JSON values, as ``path: old -> new`` lines."""
    where = path or "<root>"
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                yield f"{path}/{key}: removed (was {_short(old[key])})"
        for key in new:
            if key not in old:
                yield f"{path}/{key}: added ({_short(new[key])})"
            else:
                yield from json_differences(old[key], new[key], f"{path}/{key}")
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            yield f"{where}: list length {len(old)} -> {len(new)}"
        for index, (a, b) in enumerate(zip(old, new, strict=False)):
            yield from json_differences(a, b, f"{path}[{index}]")
    elif old != new or type(old) is not type(new):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
        suffix = f" (diff {new - old:+.3g})" if numbers else ""
        yield f"{where}: {_short(old)} -> {_short(new)}{suffix}"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare_json(old: Path, new: Path) -> tuple[bool, list[str]]:
    """Key-wise comparison of two JSON files (formatting differences alone are reported too)."""
    a, b = json.loads(old.read_text(encoding="utf-8")), json.loads(new.read_text(encoding="utf-8"))
    lines = list(json_differences(a, b))
    if not lines and old.read_bytes() != new.read_bytes():
        lines.append("same content, different formatting")
    return not lines, lines


def compare_bytes(old: Path, new: Path) -> tuple[bool, list[str]]:
    a, b = old.read_bytes(), new.read_bytes()
    if a == b:
        return True, []
    return False, [f"bytes differ: {len(a)} B sha256 {_sha256(a)[:12]} -> {len(b)} B sha256 {_sha256(b)[:12]}"]


_COMPARERS = {
    ".safetensors": ("safetensors", compare_safetensors),
    ".parquet": ("parquet", compare_parquet),
    ".json": ("json", compare_json),
}


def compare_file(old: Path, new: Path, name: str) -> FileReport:
    kind, comparer = _COMPARERS.get(Path(name).suffix, ("bytes", compare_bytes))
    if kind != "bytes" and old.read_bytes() == new.read_bytes():
        return FileReport(name, kind, True)
    equal, lines = comparer(old, new)
    return FileReport(name, kind, equal, lines)


def compare_directories(old_dir: Path, new_dir: Path) -> tuple[bool, list[str]]:
    """Every file of both directories compared; returns (identical, report lines)."""
    old_files, new_files = _files(old_dir), _files(new_dir)
    lines: list[str] = []
    identical = old_files == new_files
    lines += [f"only in {old_dir}: {name}" for name in sorted(old_files - new_files)]
    lines += [f"only in {new_dir}: {name}" for name in sorted(new_files - old_files)]
    for name in sorted(old_files & new_files):
        report = compare_file(old_dir / name, new_dir / name, name)
        identical &= report.equal
        lines.append(f"{'same' if report.equal else 'DIFF'}  {name} ({report.kind})")
        lines += [f"      {line}" for line in report.lines]
    lines.append("identical" if identical else "DIFFERENT")
    return identical, lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old_dir", type=Path)
    parser.add_argument("new_dir", type=Path)
    args = parser.parse_args(argv)
    for directory in (args.old_dir, args.new_dir):
        if not directory.is_dir():
            parser.error(f"not a directory: {directory}")
    identical, lines = compare_directories(args.old_dir, args.new_dir)
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
