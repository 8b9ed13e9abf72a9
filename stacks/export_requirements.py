"""Print the project's direct requirements from pyproject.toml, one per line.

The ranges pyproject.toml declares (``[project].dependencies`` plus the named
extras), not the pinned versions: the images of the gpu / k8s / vertex
profiles install the committed locks in requirements/ instead (made by
``python scripts/lock.py``). Used by the tests to check that the locks and the
stack integrations' requirements cover what pyproject declares. Reading them
needs only the standard library.

    python stacks/export_requirements.py pyproject.toml --extra k8s
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``[project].dependencies`` plus the named ``optional-dependencies`` groups, in order."""
    try:
        project = tomllib.loads(Path(pyproject).read_text())["project"]
    except FileNotFoundError as error:
        raise SystemExit(f"{pyproject}: no such file") from error
    except (tomllib.TOMLDecodeError, KeyError) as error:
        raise SystemExit(f"{pyproject}: not a pyproject.toml with a [project] table ({error})") from error
    lines = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(
                f"{pyproject}: no optional-dependencies group {extra!r}; available: {', '.join(sorted(optional))}"
            )
        lines.extend(optional[extra])
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="optional-dependencies group to add (repeatable)")
    args = parser.parse_args(argv)
    sys.stdout.write("\n".join(requirements(args.pyproject, args.extra)) + "\n")


if __name__ == "__main__":
    main()
