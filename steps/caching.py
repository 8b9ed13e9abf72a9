"""Cache keys that follow the library code a step runs.

ZenML hashes a step's own source but not the modules it calls, so editing
``alignment/encoding.py`` would otherwise leave a stale cached encoding.
"""

from __future__ import annotations

from types import ModuleType

from zenml.config.cache_policy import CachePolicy


def cache_on(*modules: ModuleType) -> CachePolicy:
    """The default cache policy, plus the source code of ``modules``.

    Raises:
        ValueError: for a package: ZenML resolves it to ``<package>.__init__`` and then
            fails at run time, so name the package's modules instead.
    """
    packages = [module.__name__ for module in modules if hasattr(module, "__path__")]
    if packages:
        raise ValueError(f"cache_on takes modules, not packages: name the modules of {', '.join(packages)}")
    return CachePolicy(
        include_step_code=True,
        include_step_parameters=True,
        include_artifact_values=True,
        include_artifact_ids=True,
        source_dependencies=list(modules),
    )
