"""Cache keys computed from the code a step runs, never listed by hand.

ZenML hashes a step's own function source but not the modules it calls, so
editing ``alignment/encoding.py`` would otherwise reuse a stale encoding. A
step here declares its cache policy with :func:`cache_on`, which follows the
step module's imports through this repository (``alignment``, ``steps``; see
``alignment/source_closure.py``, the same reading DVC's stage deps use) and
puts the content of every file it reaches into the key, plus the data files
the step loads (the toy oracle, the toy reward model, the toy base models).

Training methods are found by name at run time (``alignment.methods``), so no
static import reaches them: :func:`cache_on_method` adds the one method a run
trains with (and what its module imports), which keeps the cache when an
unrelated method's module is edited.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from zenml.config.cache_policy import CachePolicy

from alignment.source_closure import import_closure

REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("alignment", "steps")

# What the steps load from disk besides code: the toy world's committed models.
TOY_BASE_MODELS = ("data/toyworld/base_sdxl", "data/toyworld/base_sd15")
TOY_ORACLE = ("data/toyworld/oracle",)
TOY_REWARD_MODEL = ("data/toyworld/reward_model",)


@functools.cache
def code_files(*modules: str) -> tuple[str, ...]:
    """Repo-relative source files the given modules run (their import closures, joined), sorted."""
    files: set[str] = set()
    for module in modules:
        files.update(import_closure(module, REPO_ROOT, packages=_PACKAGES, opaque=("steps",)))
    return tuple(sorted(files))


def _relative(path: Path) -> str:
    return path.resolve().relative_to(REPO_ROOT).as_posix()


def data_files(paths: Iterable[str]) -> list[str]:
    """The given repository files, and every file under the given directories (those that exist), repo-relative."""
    files: list[str] = []
    for path in paths:
        root = REPO_ROOT / path
        if root.is_file():
            files.append(_relative(root))
        elif root.is_dir():
            files.extend(_relative(p) for p in sorted(root.rglob("*")) if p.is_file())
    return files


def dependency_files(*modules: str, data: Iterable[str] = ()) -> list[str]:
    """Repo-relative files whose content a step's cache key covers."""
    return [*code_files(*modules), *data_files(data)]


def _name(module: ModuleType | str) -> str:
    return module if isinstance(module, str) else module.__name__


def cache_on(*modules: ModuleType | str, data: Iterable[str] = ()) -> CachePolicy:
    """The default cache policy plus the content of ``modules``' import closure and of ``data``.

    Pass the step's own module (``cache_on(__name__)``); its imports are followed.
    """
    return CachePolicy(
        include_step_code=True,
        include_step_parameters=True,
        include_artifact_values=True,
        include_artifact_ids=True,
        file_dependencies=dependency_files(*(_name(m) for m in modules), data=tuple(data)),
    )


def cache_on_method(policy: CachePolicy, method: str) -> CachePolicy:
    """``policy`` plus the training method ``method``'s module and what it imports."""
    from alignment.methods import method_module

    extra = dependency_files(method_module(method))
    files = sorted(set(policy.file_dependencies or []) | set(extra))
    return policy.model_copy(update={"file_dependencies": files})
