"""Every step's cache policy names source code ZenML can read when it computes the cache key.

A wrong entry (e.g. a package, which ZenML resolves to ``<package>.__init__``)
only fails when the step is about to run; this finds it without a pipeline run.
"""

from __future__ import annotations

import inspect
import types

import pytest

import steps
from steps.caching import cache_on


def _steps():
    from zenml.steps import BaseStep

    return {name: value for name, value in vars(steps).items() if isinstance(value, BaseStep)}


def test_steps_package_exports_steps():
    assert {"load_preferences", "score_rewards", "train_alignment", "evaluate_alignment"} <= set(_steps())


@pytest.mark.parametrize("name", sorted(_steps()))
def test_cache_dependencies_load_as_source_code(name):
    from zenml.utils import source_code_utils, source_utils

    policy = _steps()[name].configuration.cache_policy
    for dependency in policy.source_dependencies or []:
        loaded = source_utils.load(dependency)
        assert isinstance(loaded, types.ModuleType | type | types.FunctionType), (name, dependency)
        assert source_code_utils.get_source_code(loaded), (name, dependency)
        assert inspect.getsourcefile(loaded)


def test_cache_on_refuses_a_package():
    import alignment.rewards

    with pytest.raises(ValueError, match="alignment.rewards"):
        cache_on(alignment.rewards)
