"""Refresh the committed lock files in requirements/ from pyproject.toml (the one command to run).

    pip install uv            # once; any recent uv (https://docs.astral.sh/uv/)
    python scripts/lock.py             # after editing pyproject's dependencies: keeps every pin it can
    python scripts/lock.py --upgrade   # move every package to the newest version pyproject allows
    python scripts/lock.py --check     # exit 1 if the locks were made from another pyproject.toml

One resolution, several exports. ``uv pip compile`` first resolves pyproject's
dependencies, all of its extras and its build requirements together into
``requirements/all.lock``; each per-use lock is then compiled with
``all.lock`` as a constraint, so a package has the same version in every
lock. All locks are for CPython 3.11 on Linux x86_64 (manylinux_2_28), with
the sha256 of every distribution of each pinned version (``--require-hashes``).

torch is resolved but not written to any lock: its build differs by machine
(the local CPU wheel on the dev/CI machines, the CUDA build of the same
version on a GPU machine or in the CUDA parent image of the cluster profiles).
It is installed from pyproject's exact pin ``torch==2.13.0``; the resolution
sees the CPU wheel (``--find-links``, default ``/opt/wheels``, or
``$TORCH_CPU_WHEELS``), so no CUDA-only package (nvidia-*, triton, cuda-*)
enters a lock; the script fails if one does.

Every lock starts with the digest of pyproject's dependency sections
(``pyproject-sha256``); ``tests/test_lock.py`` fails when pyproject.toml
and the locks disagree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO_ROOT / "requirements"
REFRESH_COMMAND = "python scripts/lock.py"

# lock name -> (extras, what it is for). "all" is the joint resolution the others are constrained by.
LOCKS: dict[str, tuple[tuple[str, ...], str]] = {
    "base": ((), "the project's dependencies: local runs, the gpu profile's image"),
    # The test extra includes playwright (the dashboard browser test runs in CI), so the
    # browser extra adds nothing and has no lock of its own.
    "test": (("test",), "+ extra test: CI and the README's commands"),
    "k8s": (("k8s",), "+ extra k8s: the k8s profile's image"),
    "vertex": (("vertex",), "+ extra vertex: the vertex profile's image"),
}
ALL = "all"
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
# Installed from pyproject's pin, never from a lock (see the module docstring).
UNLOCKED = ("torch",)
CUDA_ONLY = re.compile(r"^(nvidia-|triton\b|cuda-|torch\b)", re.IGNORECASE)
DIGEST_LINE = "# pyproject-sha256: "


def pyproject_sections(pyproject: Path = REPO_ROOT / "pyproject.toml") -> dict:
    """The parts of pyproject.toml a lock is made from."""
    data = tomllib.loads(Path(pyproject).read_text())
    project = data["project"]
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system.requires": data.get("build-system", {}).get("requires", []),
    }


def pyproject_digest(pyproject: Path = REPO_ROOT / "pyproject.toml") -> str:
    """sha256 of the dependency sections of pyproject.toml (comments and formatting do not count)."""
    canonical = json.dumps(pyproject_sections(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lock_path(name: str) -> Path:
    return LOCK_DIR / f"{name}.lock"


def recorded_digest(lock: Path) -> str | None:
    for line in Path(lock).read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE) :].strip()
    return None


def pins(lock: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a lock (extras dropped)."""
    found = {}
    for line in Path(lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return found


def _uv() -> list[str]:
    if shutil.which("uv"):
        return ["uv"]
    try:
        import uv  # noqa: F401

        return [sys.executable, "-m", "uv"]
    except ImportError:
        raise SystemExit("uv is needed to refresh the locks: pip install uv") from None


def _header(name: str, extras: tuple[str, ...], purpose: str, digest: str, uv_version: str) -> str:
    torch = next(r for r in pyproject_sections()["dependencies"] if re.match(r"torch\s*==", r)).replace(" ", "")
    install = (
        f"pip install --require-hashes --no-deps -r requirements/{name}.lock && pip install {torch}"
        " && pip install --no-deps --no-build-isolation -e ."
    )
    return "\n".join(
        [
            f"# requirements/{name}.lock: {purpose}.",
            f"# extras: {', '.join(extras) if extras else '(none)'}; CPython {PYTHON_VERSION}, {PYTHON_PLATFORM};"
            f" every package except {', '.join(UNLOCKED)} (installed from pyproject's pin).",
            f"# Do not edit: refresh all locks with `{REFRESH_COMMAND}` (made with {uv_version}).",
            f"# Install: {install}",
            f"{DIGEST_LINE}{digest}",
            "",
        ]
    )


def compile_lock(
    name: str,
    extras: tuple[str, ...],
    purpose: str,
    *,
    upgrade: bool,
    find_links: str | None,
    constraint: Path | None,
) -> None:
    uv = _uv()
    uv_version = subprocess.run([*uv, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    build_requires = "\n".join(pyproject_sections()["build-system.requires"]) + "\n"
    out = lock_path(name)
    command = [
        *uv, "pip", "compile", "pyproject.toml", "-",  # -: the build requirements (for -e . without isolation)
        "--output-file", str(out.relative_to(REPO_ROOT)),
        "--generate-hashes",
        "--python-version", PYTHON_VERSION,
        "--python-platform", PYTHON_PLATFORM,
        "--custom-compile-command", REFRESH_COMMAND,
        "--quiet",
    ]  # fmt: skip
    for extra in extras:
        command += ["--extra", extra]
    for package in UNLOCKED:
        command += ["--no-emit-package", package]
    if find_links:
        command += ["--find-links", find_links]
    if constraint is not None:
        command += ["--constraint", str(constraint.relative_to(REPO_ROOT))]
    if upgrade:
        command.append("--upgrade")
    subprocess.run(command, input=build_requires, text=True, check=True, cwd=REPO_ROOT)
    body = out.read_text()
    bad = sorted(p for p in pins(out) if CUDA_ONLY.match(p))
    if bad:
        raise SystemExit(
            f"{out}: CUDA-only packages in the lock: {', '.join(bad)}. Resolve with the CPU torch wheel visible "
            "(--find-links DIR or $TORCH_CPU_WHEELS)."
        )
    out.write_text(_header(name, extras, purpose, pyproject_digest(), uv_version) + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="ignore the current pins: newest allowed versions")
    parser.add_argument("--check", action="store_true", help="only check that the locks match pyproject.toml")
    parser.add_argument(
        "--find-links",
        default=os.environ.get("TORCH_CPU_WHEELS", "/opt/wheels"),
        help="directory holding the CPU torch wheel (default $TORCH_CPU_WHEELS or /opt/wheels)",
    )
    args = parser.parse_args(argv)
    digest = pyproject_digest()
    if args.check:
        stale = [str(lock_path(n)) for n in (ALL, *LOCKS) if recorded_digest(lock_path(n)) != digest]
        for path in stale:
            print(f"{path}: made from another pyproject.toml; run {REFRESH_COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    find_links = args.find_links if args.find_links and Path(args.find_links).is_dir() else None
    if find_links is None:
        print(
            "warning: no CPU torch wheel directory; torch resolves to the PyPI build and the CUDA check may fail",
            file=sys.stderr,
        )
    LOCK_DIR.mkdir(exist_ok=True)
    all_extras = tuple(pyproject_sections()["optional-dependencies"])
    compile_lock(
        ALL, all_extras, "the joint resolution every other lock is constrained by",
        upgrade=args.upgrade, find_links=find_links, constraint=None,
    )  # fmt: skip
    for name, (extras, purpose) in LOCKS.items():
        compile_lock(name, extras, purpose, upgrade=False, find_links=find_links, constraint=lock_path(ALL))
    for name in (ALL, *LOCKS):
        print(f"{lock_path(name).relative_to(REPO_ROOT)}: {len(pins(lock_path(name)))} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
