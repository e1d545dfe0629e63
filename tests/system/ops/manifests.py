"""Rendering the kustomize overlays for tests: the pinned kustomize from .tools/bin.

``render(path)`` runs ``kustomize build`` and returns the resources as dicts. A missing
kustomize fails the calling test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from callingest import stages

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "deploy/k8s"
OVERLAYS = ("dev", "prod")
# The manifests are checked against the stage table: every service it names, on its port.
SERVICES = stages.SERVICES
PORTS = stages.SERVICE_PORTS
KEDA_COMPONENT = K8S / "components/keda-lag-scaling"

Resource = dict[str, Any]


def kustomize_binary() -> Path:
    """The kustomize that `make kustomize` installs (or $KUSTOMIZE); fails the test if absent."""
    path = Path(os.environ.get("KUSTOMIZE", REPO / ".tools/bin/kustomize"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"kustomize not found at {path}: run `make setup` (or `make kustomize`)")
    return path


def pinned_kustomize_version() -> str:
    """KUSTOMIZE_VERSION as pinned in mk/ops.mk."""
    match = re.search(r"^KUSTOMIZE_VERSION\s*\??=\s*(\S+)", (REPO / "mk/ops.mk").read_text(), re.M)
    assert match, "mk/ops.mk must pin KUSTOMIZE_VERSION"
    return match.group(1)


@cache
def _build(path: str) -> tuple[Resource, ...]:
    result = subprocess.run(
        [str(kustomize_binary()), "build", path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kustomize build {path} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(path: Path) -> list[Resource]:
    """`kustomize build path` as a list of resources (cached per path; callers get copies)."""
    return [yaml.safe_load(yaml.safe_dump(doc)) for doc in _build(str(path))]


def render_overlay(overlay: str) -> list[Resource]:
    """The rendered deploy/k8s/overlays/<overlay>."""
    return render(K8S / "overlays" / overlay)


@cache
def _build_with_keda(overlay: str) -> tuple[Resource, ...]:
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n"
            "kind: Kustomization\n"
            f"resources:\n  - {rel}/overlays/{overlay}\n"
            f"components:\n  - {rel}/components/keda-lag-scaling\n"
        )
        return _build(tmp)


def render_overlay_with_keda(overlay: str) -> list[Resource]:
    """The overlay with the optional KEDA lag-scaling component enabled."""
    return [yaml.safe_load(yaml.safe_dump(doc)) for doc in _build_with_keda(overlay)]


def of_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    """Resources of one kind by name."""
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def is_crd_kind(resource: Resource) -> bool:
    """True for custom resources (Prometheus Operator, KEDA): no schema in kubernetes-validate."""
    group = resource["apiVersion"].split("/")[0] if "/" in resource["apiVersion"] else ""
    return group in {"monitoring.coreos.com", "keda.sh"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """True if a matchLabels selector (the only kind the manifests use) selects ``labels``."""
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
