"""The committed locks (requirements/*.lock) agree with pyproject.toml and are what README, CI and the images install.

Offline and fast: reads files only, never resolves. When pyproject's dependencies change,
`python scripts/lock.py` refreshes the locks (see its docstring).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


lock = load_script("alignment_lock_script", REPO_ROOT / "scripts" / "lock.py")
NAMES = [lock.ALL, *lock.LOCKS]
# The target every lock is made for (scripts/lock.py): CPython 3.11 on Linux x86_64.
TARGET = {
    **default_environment(),
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
REFRESH = "run `python scripts/lock.py`"


def _extras(name: str) -> tuple[str, ...]:
    if name == lock.ALL:
        return tuple(lock.pyproject_sections()["optional-dependencies"])
    return lock.LOCKS[name][0]


def _direct_requirements(name: str) -> list[Requirement]:
    sections = lock.pyproject_sections()
    lines = list(sections["dependencies"]) + list(sections["build-system.requires"])
    for extra in _extras(name):
        lines += sections["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_every_lock_is_committed_and_made_from_this_pyproject():
    digest = lock.pyproject_digest()
    for name in NAMES:
        path = lock.lock_path(name)
        assert path.is_file(), f"{path} is missing: {REFRESH}"
        assert lock.recorded_digest(path) == digest, (
            f"{path.name} was made from another pyproject.toml (dependency sections changed): {REFRESH}"
        )
    assert lock.main(["--check"]) == 0


def test_the_digest_covers_dependencies_extras_and_build_requirements(tmp_path):
    original = (REPO_ROOT / "pyproject.toml").read_text()
    base = tmp_path / "pyproject.toml"
    base.write_text(original)
    digest = lock.pyproject_digest(base)
    base.write_text(original.replace('readme = "README.md"', 'readme = "README.md"  # a comment'))
    assert lock.pyproject_digest(base) == digest  # formatting and unrelated fields do not count
    for old, new in [
        ('"pandas>=2.2,<3"', '"pandas>=2.2,<2.4"'),
        ('"pytest>=8"', '"pytest>=9"'),
        ('browser = ["playwright>=1.50,<2"]', 'browser = ["playwright>=1.50,<2", "pillow"]'),
        ('"setuptools>=68"', '"setuptools>=70"'),
    ]:
        assert old in original, old
        base.write_text(original.replace(old, new))
        assert lock.pyproject_digest(base) != digest, new


@pytest.mark.parametrize("name", NAMES)
def test_every_direct_requirement_is_pinned_at_an_allowed_version(name: str):
    pins = lock.pins(lock.lock_path(name))
    for requirement in _direct_requirements(name):
        key = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET):
            continue
        if key in lock.UNLOCKED:
            assert key not in pins, f"{name}.lock pins {key}, which is installed from pyproject's pin"
            continue
        assert key in pins, f"{name}.lock has no pin for {requirement} (pyproject.toml): {REFRESH}"
        assert requirement.specifier.contains(pins[key], prereleases=True), (
            f"{name}.lock pins {key}=={pins[key]}, outside pyproject's {requirement}: {REFRESH}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_locks_hold_no_torch_or_cuda_package_and_hash_every_pin(name: str):
    text = lock.lock_path(name).read_text()
    pins = lock.pins(lock.lock_path(name))
    assert len(pins) > 100
    assert not [p for p in pins if lock.CUDA_ONLY.match(p)], "torch / CUDA-only packages must stay out of the locks"
    # Every `name==version` entry is followed by at least one --hash (pip --require-hashes needs them all).
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    pinned_entries = [e for e in entries if "==" in e.split("\n", 1)[0] and not e.startswith("#")]
    assert len(pinned_entries) == len(pins)
    for entry in pinned_entries:
        assert "--hash=sha256:" in entry, entry.split("\n", 1)[0]
    assert not re.search(r"^\s*(-e |--index-url|--extra-index-url|--find-links|file:)", text, re.M)


def test_every_lock_is_a_subset_of_the_joint_resolution():
    joint = lock.pins(lock.lock_path(lock.ALL))
    base = lock.pins(lock.lock_path("base"))
    for name in lock.LOCKS:
        pins = lock.pins(lock.lock_path(name))
        differ = {p: (v, joint.get(p)) for p, v in pins.items() if joint.get(p) != v}
        assert not differ, f"{name}.lock disagrees with all.lock: {differ}: {REFRESH}"
        assert set(base) <= set(pins), f"{name}.lock lacks base packages {sorted(set(base) - set(pins))}"


def test_readme_and_ci_install_from_the_locks():
    torch_pin = re.search(r'"torch==([0-9.]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    install = (
        "pip install --require-hashes --no-deps -r requirements/{lock}.lock && pip install torch=={torch}"
        " && pip install --no-deps --no-build-isolation -e ."
    )
    readme = (REPO_ROOT / "README.md").read_text()
    for lock_name, run in (("base", "python run.py"), ("test", "python -m pytest -q")):
        command = f"python3 -m venv .venv && . .venv/bin/activate && {install.format(lock=lock_name, torch=torch_pin)} && {run}"
        assert command in readme, f"README's {lock_name} command is not: {command}"
    assert "python scripts/lock.py" in readme
    ci = (REPO_ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    for step in install.format(lock="test", torch=torch_pin).split(" && "):
        assert f"python -m {step}" in ci, step
    assert "python -m pytest -q" in ci


def test_environment_names_the_lock_the_run_matches():
    from pipelines import runs

    test_pins = lock.pins(lock.lock_path("test"))
    env = runs.environment(installed={**test_pins, "torch": "2.13.0+cpu", "diffusion-alignment": "0.1.0"})
    assert env["lock_file"] == "requirements/test.lock" and env["matches_lock"] is True
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", env["lock"])
    import hashlib

    assert env["lock"] == "sha256:" + hashlib.sha256(lock.lock_path("test").read_bytes()).hexdigest()
    assert env["torch"] == "2.13.0+cpu" and env["python"] and env["platform"]
    assert "lock_mismatches" not in env

    drifted = dict(test_pins, numpy="0.0.1")
    env2 = runs.environment(installed=drifted)
    assert env2["lock_file"] == "requirements/base.lock" and env2["matches_lock"] is False
    assert env2["lock_mismatches"] == {"numpy": {"locked": test_pins["numpy"], "installed": "0.0.1"}}
    assert env2["packages"] != env["packages"]

    config = {"settings": {"docker": {"requirements": "requirements/k8s.lock"}}}
    env3 = runs.environment(config, installed=test_pins)
    assert env3["image_lock_file"] == "requirements/k8s.lock"
    assert env3["image_lock"] == "sha256:" + hashlib.sha256(lock.lock_path("k8s").read_bytes()).hexdigest()
