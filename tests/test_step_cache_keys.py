"""Step cache keys cover the code each step runs: computed from imports, never listed by hand.

The import closure is checked on the real tree; "editing a module changes the
key" is checked on a copy of the tree, edited, with the key computed the way
ZenML computes the file part of it (the content of ``file_dependencies``).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import steps
from steps import caching

REPO_ROOT = Path(__file__).resolve().parents[1]


def _all_steps():
    return steps.project_steps()


def _files(policy) -> set[str]:
    return set(policy.file_dependencies or [])


def test_every_step_module_is_found():
    assert {"load_preferences", "score_rewards", "train_alignment", "evaluate_alignment", "invert_pairs"} <= set(
        _all_steps()
    )


@pytest.mark.parametrize("name", sorted(_all_steps()))
def test_cache_dependencies_are_repository_files(name):
    policy = _all_steps()[name].configuration.cache_policy
    for path in policy.file_dependencies or []:
        assert not Path(path).is_absolute() and (REPO_ROOT / path).is_file(), (name, path)


def _policy(name: str):
    return _all_steps()[name].configuration.cache_policy


def test_keys_reach_what_the_steps_run_including_lazy_imports_and_data():
    from alignment.train_config import TrainConfig
    from steps.train_alignment import train_alignment_for

    smpo = _files(train_alignment_for(TrainConfig(method="smpo")).configuration.cache_policy)
    dpo = _files(train_alignment_for(TrainConfig(method="dpo")).configuration.cache_policy)
    # The trainer and what the launch workers import, for every method.
    for files in (smpo, dpo):
        assert {"alignment/train.py", "alignment/launch.py", "alignment/losses.py", "alignment/noise.py"} <= files
        assert "data/toyworld/base_sdxl/unet/config.json" in files
    # The method the run trains with, and only that one (online ReNoise inversion runs inside SmPO's training).
    assert {"alignment/methods/smpo.py", "alignment/inversion.py"} <= smpo
    assert "alignment/methods/dpo.py" in dpo and "alignment/methods/smpo.py" not in dpo
    assert "alignment/inversion.py" not in dpo
    # Smoothing covers the soft-label arithmetic; evaluation covers the oracle's code and weights.
    assert "alignment/rewards/soft_labels.py" in _files(_policy("smooth_preferences"))
    evaluate = _files(_policy("evaluate_alignment"))
    assert "alignment/toyworld/oracle.py" in evaluate
    assert any(path.startswith("data/toyworld/oracle/") for path in evaluate)
    # Scorers are imported by name from the rewards registry: the key still reaches them.
    score = _files(_policy("score_rewards"))
    assert {"alignment/rewards/hps.py", "alignment/toyworld/reward_model.py"} <= score
    assert any(path.startswith("data/toyworld/reward_model/") for path in score)
    assert not any(path.startswith("data/toyworld/oracle/") for path in score), "the oracle never feeds training"
    # Sharded: re-encoding Pick-a-Pic costs GPU-days, so encode_shard's key holds no method's code; the
    # per-shard inversion and streaming training cover SmPO's.
    encode = _files(_policy("encode_shard"))
    assert "alignment/shards.py" in encode and not any(path.startswith("alignment/methods/smpo") for path in encode)
    assert "alignment/inversion.py" not in encode
    for name in ("invert_shard", "train_streaming"):
        assert {"alignment/shard_inversion.py", "alignment/methods/smpo.py"} <= _files(_policy(name)), name


def test_invert_pairs_depends_on_the_inversion_settings_and_seed_only():
    import inspect

    parameters = inspect.signature(_all_steps()["invert_pairs"].entrypoint).parameters
    assert list(parameters) == ["encoded", "model", "inversion", "seed"]


@pytest.fixture
def tree_copy(tmp_path, monkeypatch):
    """A copy of the code and toy data the keys read, with the closure cache pointed at it."""
    for part in ("alignment", "steps"):
        shutil.copytree(REPO_ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("oracle", "reward_model"):
        shutil.copytree(REPO_ROOT / "data" / "toyworld" / part, tmp_path / "data" / "toyworld" / part)
    monkeypatch.setattr(caching, "REPO_ROOT", tmp_path)
    caching.code_files.cache_clear()
    yield tmp_path
    caching.code_files.cache_clear()


def _training_key(root: Path, method: str) -> str:
    """The file part of the training step's key for ``method``, as ZenML hashes it."""
    policy = caching.cache_on_method(caching.cache_on("steps.train_alignment", "alignment.launch"), method)
    digest = hashlib.sha256()
    for path in sorted(policy.file_dependencies):
        digest.update(path.encode() + (root / path).read_bytes())
    return digest.hexdigest()


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_editing_a_method_changes_its_key_and_keeps_the_others(tree_copy):
    before = {method: _training_key(tree_copy, method) for method in ("dpo", "smpo", "sft")}
    _append(tree_copy / "alignment" / "methods" / "smpo.py", "\n# an edit\n")
    after = {method: _training_key(tree_copy, method) for method in ("dpo", "smpo", "sft")}
    assert after["smpo"] != before["smpo"]
    assert after["dpo"] == before["dpo"] and after["sft"] == before["sft"]

    # What a method imports belongs to its key: inversion is SmPO's, not DPO's.
    _append(tree_copy / "alignment" / "inversion.py", "\n# an edit\n")
    again = {method: _training_key(tree_copy, method) for method in ("dpo", "smpo")}
    assert again["smpo"] != after["smpo"] and again["dpo"] == after["dpo"]

    # The shared recipe belongs to every method's key.
    _append(tree_copy / "alignment" / "train.py", "\n# an edit\n")
    last = {method: _training_key(tree_copy, method) for method in ("dpo", "smpo")}
    assert last["dpo"] != again["dpo"] and last["smpo"] != again["smpo"]


def test_function_level_and_by_name_imports_are_followed(tree_copy):
    (tree_copy / "alignment" / "probe.py").write_text(
        "import importlib\n\n"
        "def lazy():\n    from alignment import losses\n\n"
        "def registry():\n    return importlib.import_module('alignment.noise')\n"
    )
    closure = caching.code_files("alignment.probe")
    assert {"alignment/losses.py", "alignment/noise.py"} <= set(closure)


def test_type_checking_imports_and_passing_through_steps_init_do_not_count():
    closure = caching.code_files("alignment.methods.dpo")
    # methods/base imports the trainer only for annotations
    assert "alignment/train.py" not in closure
    # `from steps.caching import ...` in a step does not pull in every step through steps/__init__
    assert "steps/__init__.py" not in caching.code_files("steps.train_alignment")
