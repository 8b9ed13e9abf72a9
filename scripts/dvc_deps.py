"""Keep each DVC stage's code deps equal to the code its command actually imports.

For every stage in ``dvc.yaml`` whose ``cmd`` is ``python -m <module> ...``,
the stage's code deps must be the *import closure* of ``<module>`` within
this repository's packages (``alignment``): the module's file, every local
module it imports (at the top level or inside a function), recursively, and
the ``__init__.py`` of every package on the way (importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py``). The closure is computed
statically, with ``ast``, so nothing is imported:

- ``import alignment.x`` and ``from alignment.x import y`` need ``alignment/x.py``
  or, for a package, ``alignment/x/__init__.py``; ``y`` is added too when it
  is itself a submodule (``alignment/x/y.py`` or ``alignment/x/y/__init__.py``);
- relative imports (``from .y import z``) are resolved against the importing module;
- imports under ``if TYPE_CHECKING:`` never run and are left out;
- a string constant that is exactly the dotted name of a local module (as
  registries pass to ``importlib.import_module``) counts as an import of it:
  such modules are imported by name at run time, and counting them errs on
  the safe side (``steps/caching.py`` reads imports the same way for ZenML's
  cache keys). Names built at run time cannot be seen.

A stage's code deps are its deps under a local package directory
(``alignment/...``); every other dep (``data/toyworld/oracle``, ...) is data
and is kept as it is.

    python scripts/dvc_deps.py            # print each stage's closure
    python scripts/dvc_deps.py --check    # exit 1 and print the differences if dvc.yaml disagrees
    python scripts/dvc_deps.py --write    # rewrite the code deps in dvc.yaml (data deps and comments kept)

After ``--write``, ``dvc commit -f <stage>`` records the new deps in ``dvc.lock``
(without running the stage) when the outputs are known to be current, or
``dvc repro`` rebuilds them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from alignment.source_closure import LOCAL_PACKAGES, import_closure  # noqa: E402

_PYTHON_MODULE_CMD = re.compile(r"^\s*python3?\s+-m\s+([A-Za-z_][\w.]*)")


# --------------------------------------------------------------------------------------------
# dvc.yaml
# --------------------------------------------------------------------------------------------


def stage_module(cmd: Any) -> str | None:
    """The module of a ``python -m <module> ...`` command, None for any other command."""
    if isinstance(cmd, list):
        cmd = cmd[0] if len(cmd) == 1 else None
    if not isinstance(cmd, str):
        return None
    match = _PYTHON_MODULE_CMD.match(cmd)
    return match.group(1) if match else None


def _dep_path(dep: Any) -> str:
    if isinstance(dep, dict):
        (path,) = dep.keys()
        return str(path)
    return str(dep)


def is_code_dep(path: str, packages: Sequence[str] = LOCAL_PACKAGES) -> bool:
    """Whether a dep path lies in one of the local packages (the rest is data)."""
    return Path(path).parts[:1] in {(package,) for package in packages}


@dataclass
class StageDeps:
    name: str
    module: str
    listed: list[str]
    """Code deps as dvc.yaml lists them, in its order."""
    closure: list[str]

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.closure) - set(self.listed))

    @property
    def extra(self) -> list[str]:
        return sorted(set(self.listed) - set(self.closure))

    @property
    def agrees(self) -> bool:
        return not self.missing and not self.extra


def stage_deps(
    dvc_yaml: Path = REPO_ROOT / "dvc.yaml", root: Path | None = None, packages: Sequence[str] = LOCAL_PACKAGES
) -> list[StageDeps]:
    """Listed code deps and import closure of every ``python -m`` stage of ``dvc_yaml``."""
    dvc_yaml = Path(dvc_yaml)
    root = dvc_yaml.parent if root is None else Path(root)
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    result = []
    for name, stage in stages.items():
        module = stage_module(stage.get("cmd"))
        if module is None or module.split(".")[0] not in packages:
            continue
        listed = [_dep_path(dep) for dep in stage.get("deps") or [] if is_code_dep(_dep_path(dep), packages)]
        result.append(StageDeps(name, module, listed, import_closure(module, root, packages)))
    return result


def check_messages(stages: Iterable[StageDeps]) -> list[str]:
    """One line per difference between dvc.yaml and the closures (empty when they agree)."""
    lines = []
    for stage in stages:
        lines += [f"{stage.name}: imports {path}, not in its deps in dvc.yaml" for path in stage.missing]
        lines += [f"{stage.name}: lists {path} in its deps, but {stage.module} does not import it" for path in stage.extra]
    return lines


# --------------------------------------------------------------------------------------------
# Rewriting dvc.yaml as text (keeps comments, data deps and the layout of everything else)
# --------------------------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    """A line that carries YAML (not blank, not only a comment)."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _key_line(line: str, indent: int) -> str | None:
    """The key of a ``key:`` or ``key: value`` line at exactly ``indent``, else None."""
    if _indent(line) != indent or not _is_content(line) or line.lstrip().startswith("-"):
        return None
    match = re.match(r"\s*([^:#\s][^:#]*?)\s*:(\s|$)", line)
    return match.group(1) if match else None


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line of the block that starts at ``start`` (lines indented deeper than ``indent``).

    Trailing blank and comment lines are left outside the block (they belong to what follows).
    """
    end = start + 1
    last = start
    while end < len(lines) and (not _is_content(lines[end]) or _indent(lines[end]) > indent):
        if _is_content(lines[end]):
            last = end
        end += 1
    return last + 1


@dataclass
class _Item:
    prefix: list[str]
    """Blank and comment lines above the item."""
    body: list[str]
    """The item's own lines (``- path`` and any continuation)."""
    path: str


def _deps_items(lines: list[str], key_index: int, key_indent: int) -> tuple[list[_Item], int]:
    """The items of the deps list whose ``deps:`` key is at ``key_index``; also the index after the list."""
    items: list[_Item] = []
    pending: list[str] = []
    index = key_index + 1
    end = key_index + 1
    item_indent: int | None = None
    while index < len(lines):
        line = lines[index]
        if not _is_content(line):
            pending.append(line)
            index += 1
            continue
        is_item = line.lstrip().startswith("-") and _indent(line) >= key_indent
        if not is_item or (item_indent is not None and _indent(line) != item_indent):
            break
        item_indent = _indent(line)
        item_end = index + 1
        while item_end < len(lines) and (not _is_content(lines[item_end]) or _indent(lines[item_end]) > item_indent):
            item_end += 1
        while item_end > index + 1 and not _is_content(lines[item_end - 1]):
            item_end -= 1  # trailing comments belong to the next item (or to what follows the list)
        body = lines[index:item_end]
        (value,) = yaml.safe_load("".join(line[item_indent:] for line in body))
        items.append(_Item(pending, body, _dep_path(value)))
        pending = []
        index = end = item_end
    return items, end


def rewrite_deps(text: str, closures: dict[str, list[str]], packages: Sequence[str] = LOCAL_PACKAGES) -> str:
    """``dvc.yaml`` text with each named stage's code deps replaced by ``closures[stage]``.

    Data deps keep their lines (and the comments above them) and their order,
    after the code deps; comments above the first dep stay on top; comments
    above a dropped code dep go with it. A stage without ``deps`` gets a list
    after its ``cmd``.
    """
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    stages_index = next((i for i, line in enumerate(lines) if _key_line(line, 0) == "stages"), None)
    if stages_index is None:
        raise ValueError("dvc.yaml has no top-level 'stages:'")
    stages_end = _block_end(lines, stages_index, 0)
    first = next((i for i in range(stages_index + 1, stages_end) if _is_content(lines[i])), None)
    if first is None:
        return text
    stage_indent = _indent(lines[first])

    output = lines[: stages_index + 1]
    index = stages_index + 1
    while index < stages_end:
        name = _key_line(lines[index], stage_indent)
        if name is None or name not in closures:
            output.append(lines[index])
            index += 1
            continue
        end = _block_end(lines, index, stage_indent)
        output += _rewrite_stage(lines[index:end], stage_indent, closures[name], packages)
        index = end
    output += lines[stages_end:]
    return "".join(output)


def _rewrite_stage(lines: list[str], stage_indent: int, closure: list[str], packages: Sequence[str]) -> list[str]:
    key_indent = next(_indent(line) for line in lines[1:] if _is_content(line))
    deps_index = next((i for i, line in enumerate(lines) if i and _key_line(line, key_indent) == "deps"), None)
    if deps_index is None:
        cmd_index = next(i for i, line in enumerate(lines) if i and _key_line(line, key_indent) == "cmd")
        at = _block_end(lines, cmd_index, key_indent)
        item_prefix = " " * (key_indent + 2) + "- "
        new = [" " * key_indent + "deps:\n", *(f"{item_prefix}{path}\n" for path in closure)]
        return lines[:at] + new + lines[at:]
    items, end = _deps_items(lines, deps_index, key_indent)
    item_indent = _indent(items[0].body[0]) if items else key_indent + 2
    head = items[0].prefix if items and is_code_dep(items[0].path, packages) else []
    kept = [line for item in items if not is_code_dep(item.path, packages) for line in item.prefix + item.body]
    code = [f"{' ' * item_indent}- {path}\n" for path in closure]
    return lines[: deps_index + 1] + head + code + kept + lines[end:]


def write_deps(dvc_yaml: Path = REPO_ROOT / "dvc.yaml", packages: Sequence[str] = LOCAL_PACKAGES) -> list[StageDeps]:
    """Rewrite ``dvc_yaml`` so that every ``python -m`` stage lists its closure; returns the stages."""
    dvc_yaml = Path(dvc_yaml)
    stages = stage_deps(dvc_yaml, packages=packages)
    text = dvc_yaml.read_text(encoding="utf-8")
    new = rewrite_deps(text, {stage.name: stage.closure for stage in stages}, packages)
    _verify_rewrite(yaml.safe_load(text), yaml.safe_load(new), stages, packages)
    if new != text:
        dvc_yaml.write_text(new, encoding="utf-8")
    return stages


def _verify_rewrite(old: dict, new: dict, stages: list[StageDeps], packages: Sequence[str]) -> None:
    """The rewrite changed nothing but the code deps, and those are the closures."""
    expected = {stage.name: stage.closure for stage in stages}
    if old.keys() != new.keys() or old["stages"].keys() != new["stages"].keys():
        raise AssertionError("rewriting dvc.yaml changed its keys")
    for name, before in old["stages"].items():
        after = new["stages"][name]
        if {k: v for k, v in before.items() if k != "deps"} != {k: v for k, v in after.items() if k != "deps"}:
            raise AssertionError(f"rewriting dvc.yaml changed stage {name} beyond its deps")

        def data(deps: list | None) -> list:
            return [dep for dep in deps or [] if not is_code_dep(_dep_path(dep), packages)]

        if data(before.get("deps")) != data(after.get("deps")):
            raise AssertionError(f"rewriting dvc.yaml changed the data deps of {name}")
        code = [_dep_path(dep) for dep in after.get("deps") or [] if is_code_dep(_dep_path(dep), packages)]
        if name in expected and code != expected[name]:
            raise AssertionError(f"rewriting dvc.yaml gave {name} the code deps {code}, not {expected[name]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a stage's code deps differ from its closure")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    parser.add_argument("--dvc-yaml", type=Path, default=REPO_ROOT / "dvc.yaml")
    parser.add_argument(
        "--packages", nargs="+", default=list(LOCAL_PACKAGES), help="local top-level packages (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    if args.write:
        stages = write_deps(args.dvc_yaml, packages=args.packages)
        print(f"wrote the code deps of {len(stages)} stages to {args.dvc_yaml}")
        return 0
    stages = stage_deps(args.dvc_yaml, packages=args.packages)
    if args.check:
        messages = check_messages(stages)
        if messages:
            print("\n".join(messages))
            print("run `python scripts/dvc_deps.py --write`, then `dvc commit -f` or `dvc repro` for those stages")
            return 1
        print(f"the code deps of all {len(stages)} python stages match their import closures")
        return 0
    for stage in stages:
        print(f"{stage.name} ({stage.module}):")
        print("".join(f"  {path}\n" for path in stage.closure), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
