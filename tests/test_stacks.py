"""The stack files in stacks/: their shape, their placeholders, and a round trip
through ZenML's own `zenml stack import` / `zenml stack export` into the
isolated test store (remote components register offline; they are never run).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
STACKS = REPO_ROOT / "stacks"
EXPECTED = {"local", "k8s-staging", "k8s-production", "vertex-staging", "vertex-production"}


register = load_script("alignment_stack_register", STACKS / "register.py")
export_requirements = load_script("alignment_export_requirements", STACKS / "export_requirements.py")

# Values a user would pass; the EKS-style ARN checks that values need no YAML quoting.
TEST_VALUES = {
    "K8S_CONTEXT": "arn:aws:eks:eu-west-1:123456789012:cluster/alignment",
    "S3_BUCKET": "alignment-test-bucket",
    "REGISTRY_URI": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/alignment",
    "GCP_PROJECT": "alignment-test-project",
    "GCS_BUCKET": "alignment-test-bucket",
}


def _by_type(data: dict) -> dict:
    return {
        component_type: sorted(components, key=lambda c: c["name"])
        for component_type, components in data["components"].items()
    }


def test_the_documented_stacks_exist():
    assert set(register.stack_files()) == EXPECTED


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_stack_file_imports_into_a_store_and_exports_back_equal(stem: str):
    import zenml

    path = STACKS / f"{stem}.yaml"
    rendered = register.render(path, TEST_VALUES, use_environment=False)
    assert not register.placeholders(rendered)
    stack = register.register(rendered, name=f"roundtrip-{stem}")
    exported = register.export(stack.name)
    assert exported["stack_name"] == f"roundtrip-{stem}"
    assert exported["zenml_version"] == rendered["zenml_version"] == zenml.__version__
    # ZenML drops configuration keys its flavor does not know, so equality also
    # catches a misspelt option.
    assert _by_type(exported) == _by_type(rendered)


def test_placeholders_are_exactly_the_documented_ones():
    for stem, path in register.stack_files().items():
        data = register.load_stack_file(path)
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        names = register.placeholders(data)
        for name in names:
            assert re.search(rf"#\s+{name}\s", header), f"{path.name}: ${{{name}}} is not explained in the header"
            assert f"--var {name}=" in header, f"{path.name}: the register command does not pass {name}"
        if stem == "local":
            assert names == []
        elif stem.startswith("k8s"):
            assert names == ["K8S_CONTEXT", "REGISTRY_URI", "S3_BUCKET"]
        else:
            assert names == ["GCP_PROJECT", "GCS_BUCKET"]


def test_remote_stacks_have_every_component_a_gpu_run_needs():
    flavors = {
        "k8s": {"orchestrator": "kubernetes", "step_operator": "kubernetes", "artifact_store": "s3"},
        "vertex": {"orchestrator": "vertex", "step_operator": "vertex", "artifact_store": "gcp"},
    }
    for env in ("staging", "production"):
        for kind, expected in flavors.items():
            data = register.render(STACKS / f"{kind}-{env}.yaml", TEST_VALUES, use_environment=False)
            components = {t: c[0] for t, c in data["components"].items()}
            assert set(components) == {
                "orchestrator",
                "step_operator",
                "artifact_store",
                "container_registry",
                "image_builder",
                "experiment_tracker",
            }, (kind, env)
            for component_type, flavor in expected.items():
                assert components[component_type]["flavor"] == flavor, (kind, env, component_type)
            assert components["artifact_store"]["configuration"]["path"].endswith(f"/diffusion-alignment/{env}")
            tracker = components["experiment_tracker"]
            assert tracker["flavor"] == "wandb"
            # The remote key comes from a ZenML secret, never from the file.
            assert tracker["configuration"]["api_key"] == "{{wandb_alignment.api_key}}"
            if kind == "k8s":
                assert components["orchestrator"]["configuration"]["kubernetes_namespace"] == f"alignment-{env}"
                assert components["step_operator"]["configuration"]["kubernetes_namespace"] == f"alignment-{env}"
    staging = register.render(STACKS / "vertex-staging.yaml", TEST_VALUES, use_environment=False)
    production = register.render(STACKS / "vertex-production.yaml", TEST_VALUES, use_environment=False)
    assert _by_type(staging)["experiment_tracker"] != _by_type(production)["experiment_tracker"]


def test_local_stack_is_local_and_tracks_offline_without_a_key():
    data = register.load_stack_file(STACKS / "local.yaml")
    components = {t: c[0] for t, c in data["components"].items()}
    assert components["orchestrator"]["flavor"] == "local"
    assert components["artifact_store"] == {
        "name": "alignment_local",
        "type": "artifact_store",
        "flavor": "local",
        "configuration": {},
    }
    tracker = components["experiment_tracker"]
    assert tracker["flavor"] == "wandb" and "{{" not in tracker["configuration"]["api_key"]
    # Offline comes from WANDB_MODE (run.py's default), so a user's WANDB_MODE still wins.
    assert "mode" not in tracker["configuration"].get("init_kwargs", {})


@pytest.mark.parametrize("kind", ["k8s", "vertex"])
def test_remote_stack_integration_requirements_are_in_the_profile_image(kind: str):
    """install_stack_requirements is off in the profiles, so the pyproject extra must carry them."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from zenml.client import Client
    from zenml.integrations.registry import integration_registry
    from zenml.models import FlavorFilter

    exported = export_requirements.requirements(REPO_ROOT / "pyproject.toml", [kind])
    available = {canonicalize_name(Requirement(line).name) for line in exported}
    # The profile's image installs requirements/<kind>.lock (configs/profiles/<kind>.yaml): they are pinned there.
    lock_text = (REPO_ROOT / "requirements" / f"{kind}.lock").read_text()
    locked = {
        canonicalize_name(m) for m in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==", lock_text, re.M)
    }
    assert available - {"torch"} <= locked, sorted(available - locked)
    store = Client().zen_store
    for env in ("staging", "production"):
        data = register.render(STACKS / f"{kind}-{env}.yaml", TEST_VALUES, use_environment=False)
        for component_type, components in data["components"].items():
            for component in components:
                (flavor,) = store.list_flavors(FlavorFilter(name=component["flavor"], type=component_type)).items
                if not flavor.integration or flavor.integration == "built-in":
                    continue
                for line in integration_registry.integrations[flavor.integration].get_requirements():
                    name = canonicalize_name(Requirement(line).name)
                    if name == "weave":  # only for enable_weave, which we do not use
                        continue
                    assert name in available, f"{kind}-{env}: {component['name']} ({flavor.integration}) needs {line}"


def test_missing_values_and_malformed_files_are_named(tmp_path):
    with pytest.raises(
        register.StackFileError, match=r"k8s-staging.yaml needs a value for \$\{REGISTRY_URI\}.*--var REGISTRY_URI="
    ):
        register.render(STACKS / "k8s-staging.yaml", {"K8S_CONTEXT": "c", "S3_BUCKET": "b"}, use_environment=False)
    bad = yaml.safe_load((STACKS / "local.yaml").read_text())
    bad["components"]["orchestrator"][0]["type"] = "artifact_store"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(register.StackFileError, match=r"bad.yaml: components.orchestrator\[0\] \(alignment_local\)"):
        register.load_stack_file(tmp_path / "bad.yaml")
    del bad["components"]["orchestrator"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(register.StackFileError, match="needs an orchestrator"):
        register.load_stack_file(tmp_path / "bad.yaml")
    with pytest.raises(register.StackFileError, match="unknown stack 'gke'; available: k8s-production"):
        register.resolve_file("gke")


def test_registering_over_an_existing_stack_or_component_fails_instead_of_prompting():
    data = register.render(STACKS / "k8s-staging.yaml", TEST_VALUES, use_environment=False)
    register.register(data, name="conflict-k8s")
    with pytest.raises(register.StackFileError, match="'conflict-k8s' is already registered"):
        register.register(data, name="conflict-k8s")
    changed = register.render(STACKS / "k8s-staging.yaml", {**TEST_VALUES, "S3_BUCKET": "other"}, use_environment=False)
    with pytest.raises(register.StackFileError, match="artifact_store named 's3_staging' is already registered"):
        register.register(changed, name="conflict-k8s-2")


def test_cli_lists_the_stacks_and_their_variables():
    result = CliRunner().invoke(register.main, ["--list"])
    assert result.exit_code == 0, result.output
    assert re.search(r"vertex-staging\s+alignment-vertex-staging\s+needs: GCP_PROJECT= GCS_BUCKET=", result.output)
    assert re.search(r"local\s+alignment-local\s+needs: -", result.output)
    result = CliRunner().invoke(register.main, ["vertex-staging", "--var", "GCP_PROJECT=p"], env={"GCS_BUCKET": ""})
    assert result.exit_code != 0 and "${GCS_BUCKET}" in result.output


def test_export_requirements_names_a_missing_group(tmp_path, capsys):
    export_requirements.main([str(REPO_ROOT / "pyproject.toml"), "--extra", "k8s"])
    assert "kubernetes>=21.7,<26" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit, match="no optional-dependencies group 'gpu'"):
        export_requirements.requirements(REPO_ROOT / "pyproject.toml", ["gpu"])
    with pytest.raises(SystemExit, match="no such file"):
        export_requirements.requirements(tmp_path / "pyproject.toml")
