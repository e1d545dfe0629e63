"""Submissions before batch work, in the rendered manifests (the dev stack's BATCH_NICE).

A busy pipeline must not slow the gateway down (issue 15): on a shared node the gateway's
pods outrank the consumers' for the scheduler (PriorityClass) and for the CPU (their cgroup
weight follows the CPU request; a CPU limit below the worker count throttles the workers).
"""

from __future__ import annotations

import pytest

from tests.system.ops.manifests import OVERLAYS, SERVICES, Resource, of_kind, render_overlay

CONSUMERS = tuple(name for name in SERVICES if name != "gateway")


def _cpu(quantity: str) -> float:
    """A Kubernetes CPU quantity in cores ("250m" -> 0.25, "2" -> 2.0)."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _pod(deployment: Resource) -> Resource:
    return dict(deployment["spec"]["template"]["spec"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_outranks_the_consumers(overlay: str) -> None:
    resources = render_overlay(overlay)
    classes = of_kind(resources, "PriorityClass")
    deployments = of_kind(resources, "Deployment")
    gateway_class = classes[_pod(deployments["gateway"])["priorityClassName"]]
    assert gateway_class.get("globalDefault", False) is False
    for name in CONSUMERS:
        batch = classes[_pod(deployments[name])["priorityClassName"]]
        assert batch["value"] < gateway_class["value"], name
        # batch work waits for room; it never evicts anything to start
        assert batch.get("preemptionPolicy") == "Never", name
        assert batch.get("globalDefault", False) is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_cpu_share_covers_its_workers(overlay: str) -> None:
    deployments = of_kind(render_overlay(overlay), "Deployment")
    (gateway,) = _pod(deployments["gateway"])["containers"]
    workers = int(next(e["value"] for e in gateway["env"] if e["name"] == "GATEWAY_WORKERS"))
    resources = gateway["resources"]
    # a limit below the worker count throttles the workers (CFS quota) exactly under load
    assert _cpu(resources["limits"]["cpu"]) >= workers
    # the CPU request is the pod's weight on a busy node: no consumer pod outweighs it
    for name in CONSUMERS:
        for container in _pod(deployments[name])["containers"]:
            assert _cpu(resources["requests"]["cpu"]) >= _cpu(container["resources"]["requests"]["cpu"]), name
