"""Each rendered workload gets exactly the settings its command reads (issue 11 point 3).

What a command reads comes from the code (:mod:`callingest.settings_usage`), not from a
list kept here. For every workload of both overlays (and of prod with IRSA instead of
static S3 keys):

* it gets no setting its command does not read (no envFrom of the whole ConfigMap);
* it gets every setting the overlay configures (ConfigMap key) that its command reads;
* it gets every setting its command reads that production requires (the S3 keys, or
  ``S3_USE_IAM_ROLE=true`` with an IAM role for the service account);
* every ConfigMap key is read by some workload.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from callingest.settings import REQUIRED_OUTSIDE_DEV, Settings
from callingest.settings_usage import env_names, reads
from tests.system.ops.manifests import K8S, Resource, of_kind, render, render_overlay

NOT_SETTINGS = {"PROMETHEUS_MULTIPROC_DIR"}  # read by prometheus-client, not a setting
S3_KEYS = {"S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"


def command_of(workload: Resource) -> str:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    return str(args[1]) if args[0] == "serve" else "-".join(args)


def workloads(resources: list[Resource]) -> list[Resource]:
    return [r for r in resources if r["kind"] in {"Deployment", "Job"}]


def env_of(workload: Resource) -> dict[str, dict[str, Any]]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in container, "envFrom gives a workload settings it does not read"
    return {e["name"]: e for e in container.get("env", [])}


def required(command: str, env: dict[str, dict[str, Any]]) -> set[str]:
    names = {n.upper() for n in REQUIRED_OUTSIDE_DEV} & env_names(command)
    if env.get("S3_USE_IAM_ROLE", {}).get("value") == "true":
        names -= S3_KEYS
    return names


def render_prod_with(component: str | None) -> list[Resource]:
    """The prod overlay with ``component`` in place of its S3 credentials component."""
    source = K8S / "overlays" / "prod"
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)
        for resource in source.glob("*.yaml"):
            if resource.name != "kustomization.yaml":
                Path(tmp, resource.name).write_text(resource.read_text())
        text = (source / "kustomization.yaml").read_text().replace("../../", f"{rel}/")
        text = re.sub(r"components:\n  - \S+/components/s3-static-keys\n",
                      f"components:\n  - {rel}/components/{component}\n" if component else "",
                      text)
        Path(tmp, "kustomization.yaml").write_text(text)
        return render(Path(tmp))


VARIANTS = {"dev": lambda: render_overlay("dev"), "prod": lambda: render_overlay("prod"),
            "prod-irsa": lambda: render_prod_with("s3-irsa")}


def settings_problems(resources: list[Resource]) -> list[str]:
    (config_map,) = of_kind(resources, "ConfigMap").values()
    config = set(config_map["data"])
    problems = []
    read_somewhere: set[str] = set()
    for workload in workloads(resources):
        name, command = workload["metadata"]["name"], command_of(workload)
        env = env_of(workload)
        reads = env_names(command)
        read_somewhere |= reads
        given = set(env) - NOT_SETTINGS
        if extra := given - reads:
            problems.append(f"{name}: gets {sorted(extra)}, which {command} does not read")
        if lacking := (reads & config) - given:
            problems.append(f"{name}: does not get configured {sorted(lacking)}")
        if lacking := required(command, env) - given:
            problems.append(f"{name}: lacks required {sorted(lacking)}")
        for var, entry in env.items():
            ref = entry.get("valueFrom", {}).get("configMapKeyRef")
            if ref is not None and (ref["key"] != var or ref["key"] not in config
                                    or ref["name"] != config_map["metadata"]["name"]):
                problems.append(f"{name}: {var} refers to {ref}")
    if unread := config - read_somewhere:
        problems.append(f"ConfigMap keys no workload reads: {sorted(unread)}")
    return problems


def s3_credential_problems(resources: list[Resource]) -> list[str]:
    """S3-using workloads with neither static keys from the Secret nor an IAM role."""
    accounts = of_kind(resources, "ServiceAccount")
    problems = []
    for workload in workloads(resources):
        if "S3_ACCESS_KEY_ID" not in env_names(command_of(workload)):
            continue
        env = env_of(workload)
        keys = all("secretKeyRef" in env.get(k, {}).get("valueFrom", {}) for k in S3_KEYS)
        account = accounts[workload["spec"]["template"]["spec"]["serviceAccountName"]]
        role = (env.get("S3_USE_IAM_ROLE", {}).get("value") == "true"
                and IRSA_ANNOTATION in account["metadata"].get("annotations", {}))
        if keys == role:  # neither, or both (the service refuses both)
            problems.append(f"{workload['metadata']['name']}: static keys {keys}, IAM role {role}")
    return problems


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_workload_gets_exactly_the_settings_it_reads(variant: str) -> None:
    resources = VARIANTS[variant]()
    commands = {command_of(w) for w in workloads(resources)}
    assert commands == {"gateway", "validator", "fetcher", "normalizer", "notifier", "webhooks",
                        "admin-init"}
    assert settings_problems(resources) == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_s3_workload_has_static_keys_or_an_iam_role(variant: str) -> None:
    resources = VARIANTS[variant]()
    s3_users = {w["metadata"]["name"] for w in workloads(resources)
                if "S3_BUCKET" in env_names(command_of(w))}
    assert s3_users == {"gateway", "fetcher", "normalizer", "callingest-admin-init"}
    assert s3_credential_problems(resources) == []


def test_prod_without_an_s3_credentials_component_is_caught() -> None:
    resources = render_prod_with(None)
    problems = s3_credential_problems(resources)
    assert len(problems) == 4, problems
    assert any("lacks required ['S3_ACCESS_KEY_ID', 'S3_SECRET_ACCESS_KEY']" in p
               for p in settings_problems(resources))


def test_a_workload_given_a_setting_it_does_not_read_is_caught() -> None:
    resources = render_overlay("prod")
    validator = of_kind(resources, "Deployment")["validator"]
    env_of(validator)  # no envFrom
    validator["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "SMTP_HOST", "value": "smtp"})
    assert settings_problems(resources) == [
        "validator: gets ['SMTP_HOST'], which validator does not read"]


def test_irsa_annotates_the_service_account_and_drops_the_keys() -> None:
    resources = render_prod_with("s3-irsa")
    (account,) = of_kind(resources, "ServiceAccount").values()
    assert account["metadata"]["annotations"][IRSA_ANNOTATION].startswith("arn:aws:iam::")
    for workload in workloads(resources):
        assert not S3_KEYS & set(env_of(workload))


#: Stand-ins for the prod overlay's Secret, created out of band (not rendered).
PROD_SECRETS = {"MONGODB_URI": "mongodb+srv://callingest:pw@cluster0.example.net/?authSource=admin",
                "S3_ACCESS_KEY_ID": "AKIAEXAMPLE", "S3_SECRET_ACCESS_KEY": "example-secret",
                "SECRET_KEYS": "k1:" + "A" * 43 + "=", "SMTP_USERNAME": "callingest",
                "SMTP_PASSWORD": "example-relay-password"}


def workload_environ(resources: list[Resource], workload: Resource) -> dict[str, str]:
    """The environment variables the workload's container gets (ConfigMap and Secret resolved)."""
    (config_map,) = of_kind(resources, "ConfigMap").values()
    secrets = {k: base64.b64decode(v).decode() for s in of_kind(resources, "Secret").values()
               for k, v in s.get("data", {}).items()} or PROD_SECRETS
    out = {}
    for var, entry in env_of(workload).items():
        ref = entry.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            out[var] = config_map["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            out[var] = secrets[ref["secretKeyRef"]["key"]]
        else:
            out[var] = entry["value"]
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_workload_starts_with_its_settings(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # What load_settings checks before anything connects: every value well-formed (dev-only
    # values only with CALLINGEST_ENV=dev, as the dev overlay sets) and nothing required missing.
    resources = VARIANTS[variant]()
    for key in [k for k in os.environ if k.upper().removesuffix("_FILE").lower() in Settings.model_fields]:
        monkeypatch.delenv(key)
    for workload in workloads(resources):
        command = command_of(workload)
        with monkeypatch.context() as env:
            for var, value in workload_environ(resources, workload).items():
                env.setenv(var, value)
            try:
                settings = Settings()
            except ValidationError as exc:
                pytest.fail(f"{variant} {command}: {exc}")
            assert settings.missing(reads(command)) == [], (variant, command)
