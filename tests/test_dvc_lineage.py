"""The DVC lineage is true: each stage lists the code it imports, and dvc.lock matches the tree.

``test_dvc_status_reports_nothing_changed`` fails after any edit to a file in
a stage's import closure (or to its data) until the stage is rebuilt
(``dvc repro``) or, when the outputs are known to be unaffected, recorded
again (``dvc commit -f <stage>``). That is the point: committed toy-world data
must never silently come from older code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from tests.script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    return load_script(name, REPO_ROOT / "scripts" / f"{name}.py")


dvc_deps = _script("dvc_deps")
compare_toy_outputs = _script("compare_toy_outputs")


# --------------------------------------------------------------------------------------------
# The repository's own lineage
# --------------------------------------------------------------------------------------------


def test_dvc_yaml_lists_each_stage_s_import_closure() -> None:
    stages = dvc_deps.stage_deps(REPO_ROOT / "dvc.yaml")
    assert {stage.name for stage in stages} >= {"toyworld_oracle", "toyworld_base_sdxl", "toyworld_reward_model"}
    messages = dvc_deps.check_messages(stages)
    assert not messages, "dvc.yaml is stale; run `python scripts/dvc_deps.py --write`:\n" + "\n".join(messages)


def test_writing_the_deps_of_the_committed_dvc_yaml_changes_nothing() -> None:
    text = (REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8")
    closures = {stage.name: stage.closure for stage in dvc_deps.stage_deps(REPO_ROOT / "dvc.yaml")}
    assert dvc_deps.rewrite_deps(text, closures) == text


def _is_git_checkout() -> bool:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return False
    return result.returncode == 0 and Path(result.stdout.strip()).resolve() == REPO_ROOT


def test_dvc_status_reports_nothing_changed() -> None:
    if not _is_git_checkout():
        pytest.skip(f"{REPO_ROOT} is not a git checkout, and dvc status needs one")
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    changed = json.loads(result.stdout or "{}")
    assert changed == {}, (
        "dvc.lock does not match the code and data (rebuild with `dvc repro`, or `dvc commit -f <stage>` "
        "if the outputs are unaffected):\n" + json.dumps(changed, indent=2)
    )


def test_committed_toy_world_json_holds_no_wall_clock_times() -> None:
    def keys(value: object, path: str = "") -> list[str]:
        if isinstance(value, dict):
            return [k for key, item in value.items() for k in [f"{path}/{key}", *keys(item, f"{path}/{key}")]]
        if isinstance(value, list):
            return [k for index, item in enumerate(value) for k in keys(item, f"{path}[{index}]")]
        return []

    found = [
        f"{file.relative_to(REPO_ROOT)}:{key}"
        for file in sorted((REPO_ROOT / "data" / "toyworld").rglob("*.json"))
        for key in keys(json.loads(file.read_text(encoding="utf-8")))
        if "seconds" in key.rsplit("/", 1)[-1]
    ]
    assert not found, f"timings belong in outputs/toyworld_timings, not in the tracked outputs: {found}"


# --------------------------------------------------------------------------------------------
# The import closure
# --------------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_import_closure_follows_every_kind_of_local_import(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/entry.py": (
                "from __future__ import annotations\n"
                "import json\n"
                "from typing import TYPE_CHECKING\n"
                "import pkg.plain\n"
                "from pkg import sub\n"  # a submodule named in a from-import
                "from pkg.models import Thing\n"  # a package: its __init__, which imports its parts
                "from .relative import value\n"
                "if TYPE_CHECKING:\n"
                "    from pkg import typing_only\n"
                "def later():\n"
                "    from pkg.lazy import helper\n"  # an import inside a function
                "    return helper\n"
                "REGISTRY = {'x': 'pkg.by_name', 'y': 'pkg.not_a_module', 'z': 'see pkg.unused'}\n"
            ),
            "pkg/plain.py": "import os\n",
            "pkg/sub.py": "",
            "pkg/models/__init__.py": "from pkg.models.part import Thing\n",
            "pkg/models/part.py": "from ..deep.leaf import x\nclass Thing: ...\n",
            "pkg/deep/__init__.py": "",
            "pkg/deep/leaf.py": "x = 1\n",
            "pkg/relative.py": "value = 1\n",
            "pkg/typing_only.py": "",
            "pkg/lazy.py": "import torch\nhelper = 1\n",
            "pkg/unused.py": "",
            "pkg/by_name.py": "",  # imported with importlib by a registry
            "other/__init__.py": "",
        },
    )
    closure = dvc_deps.import_closure("pkg.entry", tmp_path, packages=("pkg",))
    assert closure == [
        "pkg/__init__.py",
        "pkg/by_name.py",
        "pkg/deep/__init__.py",
        "pkg/deep/leaf.py",
        "pkg/entry.py",
        "pkg/lazy.py",
        "pkg/models/__init__.py",
        "pkg/models/part.py",
        "pkg/plain.py",
        "pkg/relative.py",
        "pkg/sub.py",
    ]


def test_import_closure_of_a_package_entry_point_and_of_a_missing_module(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/app/__init__.py": "from .gone import thing\n"})
    with pytest.raises(ValueError, match="gone"):
        dvc_deps.import_closure("pkg.app", tmp_path, packages=("pkg",))
    _write(tmp_path, {"pkg/app/__init__.py": "from pkg import attribute_not_module\n"})
    assert dvc_deps.import_closure("pkg.app", tmp_path, packages=("pkg",)) == ["pkg/__init__.py", "pkg/app/__init__.py"]


def test_stage_module_reads_python_dash_m_commands() -> None:
    assert dvc_deps.stage_module("python -m alignment.toyworld.oracle --out x") == "alignment.toyworld.oracle"
    assert dvc_deps.stage_module("python3 -m alignment.tinydata") == "alignment.tinydata"
    assert dvc_deps.stage_module("bash scripts/run.sh") is None


_DVC_YAML = """\
stages:
  # a comment above the stage
  build:
    cmd: python -m pkg.entry --out data/out
    deps:
      # the code, then the data
      - pkg/stale.py
      - pkg/entry.py
      # the input data
      - data/input
      - data/params.json:
          cache: false
    outs:
      - data/out:
          cache: false

  # no deps yet
  fresh:
    cmd: >-
      python -m pkg.entry
      --out data/fresh
    outs:
      - data/fresh
  shell:
    cmd: bash make.sh
    deps:
      - pkg/whatever.py
"""


def test_check_and_write_rewrite_only_the_code_deps(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/entry.py": "from pkg import helper\n", "pkg/helper.py": ""})
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(_DVC_YAML, encoding="utf-8")

    stages = dvc_deps.stage_deps(dvc_yaml, packages=("pkg",))
    assert [stage.name for stage in stages] == ["build", "fresh"]  # "shell" is not a python -m stage
    messages = dvc_deps.check_messages(stages)
    assert "build: imports pkg/helper.py, not in its deps in dvc.yaml" in messages
    assert "build: lists pkg/stale.py in its deps, but pkg.entry does not import it" in messages
    assert any(message.startswith("fresh: imports pkg/entry.py") for message in messages)

    dvc_deps.write_deps(dvc_yaml, packages=("pkg",))
    assert dvc_deps.check_messages(dvc_deps.stage_deps(dvc_yaml, packages=("pkg",))) == []
    assert dvc_yaml.read_text(encoding="utf-8") == _DVC_YAML.replace(
        "      - pkg/stale.py\n      - pkg/entry.py\n",
        "      - pkg/__init__.py\n      - pkg/entry.py\n      - pkg/helper.py\n",
    ).replace(
        "      --out data/fresh\n",
        "      --out data/fresh\n    deps:\n      - pkg/__init__.py\n      - pkg/entry.py\n      - pkg/helper.py\n",
    )
    before = dvc_yaml.read_text(encoding="utf-8")
    dvc_deps.write_deps(dvc_yaml, packages=("pkg",))
    assert dvc_yaml.read_text(encoding="utf-8") == before  # idempotent


def test_the_command_line_check_fails_on_a_stale_dvc_yaml(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/entry.py": ""})
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  s:\n    cmd: python -m pkg.entry\n    deps:\n      - pkg/entry.py\n")
    assert dvc_deps.main(["--check", "--dvc-yaml", str(dvc_yaml), "--packages", "pkg"]) == 1
    dvc_deps.main(["--write", "--dvc-yaml", str(dvc_yaml), "--packages", "pkg"])
    assert dvc_deps.main(["--check", "--dvc-yaml", str(dvc_yaml), "--packages", "pkg"]) == 0


# --------------------------------------------------------------------------------------------
# compare_toy_outputs.py
# --------------------------------------------------------------------------------------------


def _output_dir(directory: Path, *, weight: float = 1.0, image: bytes = b"\x89PNG-a", seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "unet").mkdir()
    save_file({"w": torch.full((2, 3), weight), "b": torch.zeros(3)}, str(directory / "unet" / "model.safetensors"))
    frame = pd.DataFrame({"caption": ["a", "b"], "jpg_0": [image, b"\x89PNG-b"], "label_0": [1.0, 0.5]})
    frame.to_parquet(directory / "train.parquet")
    (directory / "meta.json").write_text(json.dumps({"seed": seed, "nested": {"rate": 0.5}}))
    (directory / "README.md").write_text("notes\n")
    return directory


def test_compare_toy_outputs_finds_identical_directories_identical(tmp_path: Path, capsys) -> None:
    old, new = _output_dir(tmp_path / "old"), _output_dir(tmp_path / "new")
    assert compare_toy_outputs.main([str(old), str(new)]) == 0
    assert capsys.readouterr().out.strip().endswith("identical")


def test_compare_toy_outputs_reports_each_kind_of_difference(tmp_path: Path) -> None:
    old = _output_dir(tmp_path / "old")
    new = _output_dir(tmp_path / "new", weight=1.25, image=b"\x89PNG-c", seed=1)
    (new / "extra.txt").write_text("x")
    identical, lines = compare_toy_outputs.compare_directories(old, new)
    report = "\n".join(lines)
    assert not identical
    assert "1 bitwise equal, max |diff| 0.25" in report
    assert "w: torch.float32[2, 3] differs" in report
    assert "jpg_0: 1 of 2 rows differ (first at row 0)" in report
    assert "caption" not in report  # equal columns are not listed
    assert "/seed: 0 -> 1 (diff +1)" in report
    assert f"only in {new}: extra.txt" in report
    assert "same  README.md (bytes)" in report


def test_compare_toy_outputs_json_differences_name_the_key() -> None:
    old = {"a": 1, "b": {"c": [1, 2], "gone": True}}
    new = {"a": 1, "b": {"c": [1, 3], "new": "x"}}
    assert list(compare_toy_outputs.json_differences(old, new)) == [
        "/b/gone: removed (was true)",
        "/b/c[1]: 2 -> 3 (diff +1)",
        '/b/new: added ("x")',
    ]
