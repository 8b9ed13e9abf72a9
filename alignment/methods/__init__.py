"""The training methods, one module each, found by name (``training.method``).

Every module of this package except ``base`` defines one ``PreferenceMethod``
subclass as ``METHOD``; dropping a module here registers the method. Modules
are imported on first use, so a step's cache key can cover the one method it
runs and not the others (``steps/caching.py``).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from alignment.methods.base import NoOptions, PreferenceMethod

__all__ = ["NoOptions", "PreferenceMethod", "get_method", "method_names", "method_module"]

_NOT_METHODS = {"base"}


@functools.cache
def method_names() -> tuple[str, ...]:
    """Registered methods, in a stable order."""
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in _NOT_METHODS]
    return tuple(sorted(found))


def method_module(name: str) -> str:
    """The module that defines method ``name`` (what a cache key must cover)."""
    if name not in method_names():
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}")
    return f"{__name__}.{name}"


@functools.cache
def get_method(name: str) -> type[PreferenceMethod]:
    module = importlib.import_module(method_module(name))
    method = getattr(module, "METHOD", None)
    if not (isinstance(method, type) and issubclass(method, PreferenceMethod)) or method.name != name:
        raise TypeError(f"{module.__name__} must define METHOD, a PreferenceMethod subclass named {name!r}")
    return method
