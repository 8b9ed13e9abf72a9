"""Cache keys computed from the code a step runs, never listed by hand.

ZenML hashes a step's own function source but not the modules it calls, so
editing ``alignment/encoding.py`` would otherwise reuse a stale encoding. A
step here declares its cache policy with :func:`cache_on`, which follows the
step module's imports through this repository (``alignment``, ``steps``;
function-level imports too, read statically with ``ast``) and puts the
content of every file it reaches into the key, plus the data files the step
loads (the toy oracle, the toy reward model, the toy base models).

Training methods are found by name at run time (``alignment.methods``), so no
static import reaches them: :func:`cache_on_method` adds the one method a run
trains with (and what its module imports), which keeps the cache when an
unrelated method's module is edited.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from zenml.config.cache_policy import CachePolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("alignment", "steps")
_MODULE_NAME = re.compile(r"(alignment|steps)(\.[A-Za-z_]\w*)+")

# What the steps load from disk besides code: the toy world's committed models.
TOY_BASE_MODELS = ("data/toyworld/base_sdxl", "data/toyworld/base_sd15")
TOY_ORACLE = ("data/toyworld/oracle",)
TOY_REWARD_MODEL = ("data/toyworld/reward_model",)


def _module_file(name: str) -> Path | None:
    """The source file of a module of this repository (``__init__.py`` for a package), or None."""
    parts = name.split(".")
    if parts[0] not in _PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(name: str, file: Path) -> set[str]:
    """Repository modules ``file`` imports anywhere (top level or in functions), or names as a string.

    A module name written as a string counts (registries import their modules
    by name with ``importlib``). Importing ``alignment.x.y`` also runs the
    ``__init__`` of ``alignment`` and ``alignment.x`` (registries live there);
    passing through ``steps/__init__`` does not count, or ``from steps.caching
    import cache_on`` would make every step part of every key.
    """
    found: set[str] = set()
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(file.read_text(), filename=str(file))
    # Imports for type annotations only (`if TYPE_CHECKING:`) never run.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if _module_file(submodule) is not None else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    for module in list(found):
        parts = module.split(".")
        if parts[0] == "alignment":
            found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return {module for module in found if _module_file(module) is not None}


@functools.cache
def module_closure(*roots: str) -> tuple[str, ...]:
    """Every repository module reachable by imports from ``roots`` (module names), sorted."""
    seen: set[str] = set()
    todo = [root for root in roots if _module_file(root) is not None]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imported_modules(name, _module_file(name)) - seen)
    return tuple(sorted(seen))


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
    code = {_relative(_module_file(name)) for name in module_closure(*modules)}
    return sorted(code) + data_files(data)


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
