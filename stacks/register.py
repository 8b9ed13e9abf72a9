"""Register a stack from stacks/*.yaml into the active ZenML store.

    python stacks/register.py --list
    python stacks/register.py local --activate
    python stacks/register.py k8s-staging --var K8S_CONTEXT=gke_p_z_c --var S3_BUCKET=b --var REGISTRY_URI=r
    python stacks/register.py vertex-production --var GCP_PROJECT=p --var GCS_BUCKET=b --name my-vertex

The files are in the format of ``zenml stack export`` and the import itself is
ZenML's ``zenml stack import`` (called in-process). This script adds what that
command lacks: it fills the ``${NAME}`` placeholders of the remote stacks from
``--var NAME=value`` or the environment and refuses to register a stack with
one left open (ZenML would store the literal text), checks the file's shape
with errors that name the file and component, and fails instead of prompting
when a stack or a differently configured component of the same name exists.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import yaml

STACKS_DIR = Path(__file__).resolve().parent
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
REQUIRED_COMPONENTS = ("orchestrator", "artifact_store")


class StackFileError(ValueError):
    """A stack file is malformed, or cannot be registered as it stands."""


def stack_files() -> dict[str, Path]:
    """``{"local": stacks/local.yaml, ...}``: every stack definition shipped with the project."""
    return {path.stem: path for path in sorted(STACKS_DIR.glob("*.yaml"))}


def resolve_file(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise StackFileError(f"stack file {path} does not exist")
        return path
    files = stack_files()
    if str(name_or_path) not in files:
        raise StackFileError(f"unknown stack {str(name_or_path)!r}; available: {', '.join(files)}")
    return files[str(name_or_path)]


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _substitute(node: Any, values: Mapping[str, str]) -> Any:
    # Substituted in the parsed data, not the text: values such as EKS context
    # ARNs (``arn:aws:eks:...``) would otherwise need YAML quoting.
    if isinstance(node, str):
        return PLACEHOLDER.sub(lambda match: values[match.group(1)], node)
    if isinstance(node, Mapping):
        return {key: _substitute(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, values) for value in node]
    return node


def load_stack_file(path: Path) -> dict[str, Any]:
    """Parse a stack file and check it has the shape ``zenml stack import`` expects."""
    from zenml.enums import StackComponentType

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StackFileError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise StackFileError(f"{path}: expected a mapping with stack_name, zenml_version and components")
    for key in ("stack_name", "zenml_version", "components"):
        if key not in data:
            raise StackFileError(f"{path}: missing top-level key {key!r}")
    unknown = set(data) - {"stack_name", "zenml_version", "components"}
    if unknown:
        raise StackFileError(f"{path}: unknown top-level keys {sorted(unknown)}")
    if not isinstance(data["components"], dict):
        raise StackFileError(f"{path}: components must map a component type to a list of components")
    valid_types = {t.value for t in StackComponentType}
    for type_name, components in data["components"].items():
        where = f"{path}: components.{type_name}"
        if type_name not in valid_types:
            raise StackFileError(f"{where}: unknown component type; valid: {', '.join(sorted(valid_types))}")
        if not isinstance(components, list) or not components:
            raise StackFileError(f"{where}: expected a non-empty list of components")
        for index, component in enumerate(components):
            if not isinstance(component, dict):
                raise StackFileError(f"{where}[{index}]: expected a mapping")
            missing = {"name", "type", "flavor", "configuration"} - set(component)
            if missing:
                raise StackFileError(f"{where}[{index}]: missing {sorted(missing)}")
            if component["type"] != type_name:
                raise StackFileError(
                    f"{where}[{index}] ({component['name']}): type {component['type']!r} listed under {type_name!r}"
                )
            if not isinstance(component["configuration"], dict):
                raise StackFileError(f"{where}[{index}] ({component['name']}): configuration must be a mapping")
    for type_name in REQUIRED_COMPONENTS:
        if type_name not in data["components"]:
            raise StackFileError(f"{path}: a stack needs an {type_name}")
    return data


def placeholders(data: Mapping[str, Any]) -> list[str]:
    """The ``${NAME}`` variables a stack file leaves for the user to fill in."""
    return sorted({name for text in _strings(data) for name in PLACEHOLDER.findall(text)})


def render(path: Path, values: Mapping[str, str] | None = None, use_environment: bool = True) -> dict[str, Any]:
    """The stack file with every ``${NAME}`` filled from ``values``, then the environment."""
    data = load_stack_file(path)
    given = {**(os.environ if use_environment else {}), **(values or {})}
    missing = [name for name in placeholders(data) if not given.get(name)]
    if missing:
        flags = " ".join(f"--var {name}=..." for name in missing)
        raise StackFileError(
            f"{path.name} needs a value for {', '.join('${' + name + '}' for name in missing)} "
            f"(see the file's header): pass {flags} or set the environment variable(s)"
        )
    return _substitute(copy.deepcopy(data), given)


def _check_no_conflicts(client: Any, data: Mapping[str, Any], stack_name: str) -> None:
    """Fail where ``zenml stack import`` would stop and prompt for a new name."""
    from zenml.enums import StackComponentType

    if client.list_stacks(name=stack_name).total:
        raise StackFileError(
            f"a stack named {stack_name!r} is already registered; pass --name, or remove it with "
            f"`zenml stack delete {stack_name}`"
        )
    for type_name, components in data["components"].items():
        for component in components:
            existing = client.list_stack_components(type=StackComponentType(type_name), name=component["name"]).items
            for found in existing:
                if found.flavor_name != component["flavor"] or found.configuration != component["configuration"]:
                    raise StackFileError(
                        f"a component of type {type_name} named {component['name']!r} is already registered with a different "
                        f"flavor or configuration ({found.flavor_name}: {found.configuration}); "
                        f"rename it in the stack file or remove it with `zenml {type_name.replace('_', '-')} delete {component['name']}`"
                    )


def register(
    data: Mapping[str, Any], name: str | None = None, activate: bool = False, ignore_version_mismatch: bool = False
):
    """Import a rendered stack with ZenML's own ``zenml stack import``; returns the stack."""
    from zenml.cli.stack import import_stack
    from zenml.client import Client

    if placeholders(data):
        raise StackFileError(f"unfilled placeholders {placeholders(data)}; render the file first")
    client = Client()
    stack_name = name or data["stack_name"]
    _check_no_conflicts(client, data, stack_name)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / f"{stack_name}.yaml"
        rendered.write_text(yaml.safe_dump(dict(data), sort_keys=False))
        import_stack.callback(
            stack_name=stack_name, filename=str(rendered), ignore_version_mismatch=ignore_version_mismatch
        )
    stack = client.get_stack(stack_name, allow_name_prefix_match=False)
    if activate:
        client.activate_stack(stack.id)
    return stack


def export(stack_name: str) -> dict[str, Any]:
    """What ``zenml stack export`` writes for a registered stack, as a dict."""
    from zenml.cli.stack import export_stack

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export.yaml"
        export_stack.callback(stack_name_or_id=stack_name, filename=str(out))
        return yaml.safe_load(out.read_text())


def _parse_vars(assignments: tuple[str, ...]) -> dict[str, str]:
    values = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not PLACEHOLDER.fullmatch("${" + key + "}"):
            raise click.BadParameter(f"expected NAME=value, got {assignment!r}", param_hint="--var")
        values[key] = value
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("stack", required=False)
@click.option("--var", "assignments", multiple=True, metavar="NAME=VALUE", help="value for a ${NAME} placeholder")
@click.option("--name", help="register under this stack name instead of the file's stack_name")
@click.option("--activate", is_flag=True, help="make it the active stack")
@click.option("--ignore-version-mismatch", is_flag=True, help="as for `zenml stack import`")
@click.option("--list", "list_files", is_flag=True, help="list the stack files and the variables each needs")
def main(
    stack: str | None,
    assignments: tuple[str, ...],
    name: str | None,
    activate: bool,
    ignore_version_mismatch: bool,
    list_files: bool,
) -> None:
    """Register STACK (a name from stacks/, e.g. local, or a path to a stack YAML)."""
    if list_files or stack is None:
        for stem, path in stack_files().items():
            data = load_stack_file(path)
            needs = " ".join(f"{v}=" for v in placeholders(data)) or "-"
            click.echo(f"{stem:20s} {data['stack_name']:28s} needs: {needs}")
        return
    try:
        path = resolve_file(stack)
        data = render(path, _parse_vars(assignments))
        registered = register(data, name=name, activate=activate, ignore_version_mismatch=ignore_version_mismatch)
    except StackFileError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"registered stack {registered.name!r} from {path}" + (" (active)" if activate else ""))


if __name__ == "__main__":
    sys.exit(main())
