"""Which source files of this repository a module runs: its import closure, read statically.

Two things need it and must agree: DVC stages list the code their command
runs (``scripts/dvc_deps.py``), and ZenML steps put the code they run into
their cache keys (``steps/caching.py``). Nothing is imported; ``ast`` reads
the files:

- ``import alignment.x`` and ``from alignment.x import y`` need ``alignment/x.py``
  or, for a package, ``alignment/x/__init__.py``; ``y`` is added too when it
  is itself a submodule;
- imports inside functions count; imports under ``if TYPE_CHECKING:`` never
  run and are left out; relative imports are resolved;
- a string constant that is exactly the dotted name of a local module (as
  registries pass to ``importlib.import_module``) counts as an import of it.
  Names built at run time cannot be seen (the method registry's are added by
  ``steps/caching.cache_on_method``);
- importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``, so those
  count, except for the ``opaque`` packages, whose ``__init__`` only counts
  when the package itself is imported (``steps/__init__`` imports every step:
  passing through it must not make every step part of every key).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_PACKAGES = ("alignment",)
"""Top-level packages of this repository whose modules count as code deps."""

_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")




def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file that importing ``module`` executes: ``a/b.py`` or ``a/b/__init__.py``; None if neither exists."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom | ast.Constant]:
    """Import statements that can run and string constants, anywhere (``if TYPE_CHECKING:`` bodies skipped)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.Constant) and isinstance(node.value, str)
        ):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


@dataclass
class _Imports:
    required: set[str] = field(default_factory=set)
    """Modules that must exist (``import m``, the ``m`` of ``from m import x``)."""
    optional: set[str] = field(default_factory=set)
    """``m.x`` of ``from m import x`` (a module only if such a file exists, else an attribute), and
    string constants that look like dotted module names."""


def imported_modules(
    source: str, module: str, is_package: bool, filename: str = "<source>", opaque: Sequence[str] = ()
) -> _Imports:
    """The absolute names of the modules ``source`` (the code of ``module``) may import."""
    package = module if is_package else module.rpartition(".")[0]
    found = _Imports()
    for node in _import_nodes(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Constant):
            if _DOTTED_NAME.fullmatch(node.value):
                found.optional.add(node.value)
            continue
        if isinstance(node, ast.Import):
            found.required.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".") if package else []
            if node.level - 1 > len(parts):
                raise ValueError(f"{filename}:{node.lineno}: relative import beyond the top-level package")
            anchor = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        if base and base not in opaque:  # `from steps import tracking` runs steps/tracking.py, the rest is noise
            found.required.add(base)
        found.optional.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")
    return found


def _parents_and_self(module: str, opaque: Sequence[str] = ()) -> list[str]:
    parts = module.split(".")
    chain = [".".join(parts[:index]) for index in range(1, len(parts) + 1)]
    return [step for step in chain if step == module or step not in opaque]


def import_closure(
    module: str, root: Path = REPO_ROOT, packages: Sequence[str] = LOCAL_PACKAGES, opaque: Sequence[str] = ()
) -> list[str]:
    """Repo-relative paths (sorted, ``/``-separated) of the local files ``python -m module`` executes.

    Args:
        module: Dotted name of the entry module, e.g. ``alignment.toyworld.base_model``.
        root: Repository root (the directory holding the top-level packages).
        packages: Top-level package names that are local; imports of anything
            else (torch, diffusers, the standard library) are not followed.
        opaque: Packages whose ``__init__`` counts only when imported themselves.

    Raises:
        ValueError: If ``module`` or a module imported by a local file is a
            local module without a file (e.g. a deleted module still imported).
    """
    root = Path(root)
    local = set(packages)
    files: set[Path] = set()
    done: set[str] = set()
    pending: list[tuple[str, bool, str]] = [(module, True, "the stage's command")]
    while pending:
        name, required, importer = pending.pop()
        if name in done or name.split(".")[0] not in local:
            continue
        if module_file(name, root) is None:
            if required:
                raise ValueError(f"{importer} imports {name}, but {root} has no file for it")
            continue  # ``from package import attribute``: not a module
        for step in _parents_and_self(name, opaque):
            if step in done:
                continue
            done.add(step)
            path = module_file(step, root)
            if path is None:
                raise ValueError(f"{importer} imports {name}, but {root} has no file for its package {step}")
            files.add(path)
            relative = path.relative_to(root).as_posix()
            source = path.read_text(encoding="utf-8")
            found = imported_modules(source, step, path.name == "__init__.py", relative, opaque)
            pending.extend((child, True, relative) for child in sorted(found.required))
            pending.extend((child, False, relative) for child in sorted(found.optional))
    return sorted(path.relative_to(root).as_posix() for path in files)
