"""What the rendered overlays expose and let out: the API Ingress and the caller-URL egress.

The Ingress may route only the gateway's API paths (services/gateway/routes.py): the gateway
serves /metrics, /healthz and /readyz (callingest/http.py) on the same port. The workloads
that connect to caller-supplied URLs (their code opens callingest.ssrf.guarded_session) must
have egress policies that keep them off private and metadata ranges, and inside the cluster
reach only the ports of what their settings name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from pymongo import MongoClient

from callingest.http import add_ops_routes
from services.gateway.routes import setup_routes
from tests.system.ops.manifests import K8S, OVERLAYS, REPO, Resource, of_kind, render, render_overlay, selects

# What a caller-URL workload must never reach, whatever else its policies allow.
MUST_BLOCK = {
    "0.0.0.0/0": {"10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"},
    "::/0": {"::1/128", "fc00::/7", "fe80::/10"},
}
PUBLIC_PORTS = {80, 443}
DNS_PORT = 53


def _config(resources: list[Resource]) -> dict[str, str]:
    """The data of the generated ConfigMap callingest-config (its name carries a hash)."""
    (config,) = [c for n, c in of_kind(resources, "ConfigMap").items() if n.startswith("callingest-config")]
    return dict(config["data"])


def _paths(register: Any) -> list[str]:
    """Concrete request paths for the routes ``register(app)`` adds ({cuid} etc. filled in)."""
    app = web.Application()
    register(app)
    canonical = {resource.canonical for resource in app.router.resources()}
    return sorted(re.sub(r"\{[^}]*\}", "x", path) for path in canonical)


def _routed(path: str, ingress: Resource) -> list[dict[str, Any]]:
    """The backends the Ingress sends ``path`` to (Prefix and Exact matching, Kubernetes rules)."""
    assert "defaultBackend" not in ingress["spec"], "a default backend routes every path"
    backends = []
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            assert entry["pathType"] in {"Prefix", "Exact"}, "ImplementationSpecific matching is unknown"
            if entry["pathType"] == "Exact":
                hit = path == entry["path"]
            else:
                prefix = [p for p in entry["path"].split("/") if p]
                hit = [p for p in path.split("/") if p][: len(prefix)] == prefix
            if hit:
                backends.append(entry["backend"])
    return backends


def test_api_ingress_routes_only_the_api_paths() -> None:
    resources = render_overlay("prod")
    ingresses = list(of_kind(resources, "Ingress").values())
    assert ingresses, "prod ships an example Ingress for the API"
    service = of_kind(resources, "Service")["gateway"]
    api = _paths(setup_routes)
    ops = _paths(lambda app: add_ops_routes(app, ready=None))
    assert {"/metrics", "/healthz", "/readyz"} <= set(ops)
    assert "/api/2022-03-01/calls.json" in api and "/api/2022-03-01/openapi.json" in api
    for path in api:
        assert any(_routed(path, i) for i in ingresses), f"{path} is not routed"
    for path in ops:
        for hidden in (path, f"{path}/", f"{path}/x"):
            assert not any(_routed(hidden, i) for i in ingresses), f"{hidden} must not be public"
    host = urlsplit(_config(resources)["PUBLIC_BASE_URL"]).hostname
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            assert rule["host"] == host, "the Ingress serves PUBLIC_BASE_URL's host"
            for entry in rule["http"]["paths"]:
                backend = entry["backend"]["service"]
                assert backend["name"] == "gateway"
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
        assert [t["hosts"] for t in ingress["spec"]["tls"]] == [[host]]
        assert all(t["secretName"] for t in ingress["spec"]["tls"])


def _caller_url_services() -> set[str]:
    """Services whose code connects to caller-supplied URLs (through the SSRF-guarded session)."""
    return {
        path.relative_to(REPO / "services").parts[0]
        for path in (REPO / "services").rglob("*.py")
        if re.search(r"\bguarded_session\(", path.read_text())
    }


def _ports(rules: Iterable[dict[str, Any]]) -> set[int]:
    return {port["port"] for rule in rules for port in rule.get("ports", [])}


def _needed_ports(env: set[str], config: dict[str, str]) -> set[int]:
    """In-cluster ports of the servers the workload's settings name."""
    needed = set()
    if "KAFKA_BOOTSTRAP_SERVERS" in env:
        needed |= {int(server.rsplit(":", 1)[1]) for server in config["KAFKA_BOOTSTRAP_SERVERS"].split(",")}
    if "MONGODB_URI" in env:  # a Secret: the server's default port
        needed.add(MongoClient.PORT)
    if "S3_ENDPOINT_URL" in env and config["S3_ENDPOINT_URL"]:
        needed.add(urlsplit(config["S3_ENDPOINT_URL"]).port or 443)
    return needed


def _egress(resources: list[Resource], workload: str) -> tuple[dict[str, Any], set[str]]:
    """The egress rules of the policies selecting ``workload``'s pods, and its env names."""
    deployment = of_kind(resources, "Deployment")[workload]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    rules = {
        f"{p['metadata']['name']}[{i}]": rule
        for p in of_kind(resources, "NetworkPolicy").values()
        if "Egress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
        for i, rule in enumerate(p["spec"].get("egress", []))
    }
    env = {e["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    return rules, env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_caller_url_workload_has_a_narrow_egress_policy(overlay: str) -> None:
    resources = render_overlay(overlay)
    base_config = _config(render(K8S / "base"))
    config = _config(resources)
    workloads = _caller_url_services()
    assert {"fetcher", "webhooks"} <= workloads
    for workload in sorted(workloads):
        rules, env = _egress(resources, workload)
        assert rules, f"{workload} connects to caller URLs and has no egress policy"
        dns = [r for r in rules.values() if "to" not in r]
        assert _ports(dns) == {DNS_PORT}, f"{workload}: only DNS may go anywhere"
        public = [r for r in rules.values() if any("ipBlock" in peer for peer in r.get("to", []))]
        assert _ports(public) <= PUBLIC_PORTS
        for rule in public:
            for peer in rule["to"]:
                block = peer["ipBlock"]
                assert MUST_BLOCK[block["cidr"]] <= set(block.get("except", [])), f"{workload}: {block}"
        cluster = [r for r in rules.values() if "to" in r and r not in public]
        allowed = _ports(cluster)
        assert _needed_ports(env, config) <= allowed, f"{workload} cannot reach its servers in {overlay}"
        # Least: the base's servers, and S3 over TLS for S3 users; no port for another's servers.
        assert allowed <= _needed_ports(env, base_config) | ({443} if "S3_BUCKET" in env else set()), (
            f"{workload} may reach in-cluster ports its settings name no server on"
        )
    with_ranges = [
        p["metadata"]["name"]
        for p in of_kind(resources, "NetworkPolicy").values()
        if any("ipBlock" in peer for rule in p["spec"].get("egress", []) for peer in rule.get("to", []))
    ]
    assert len(with_ranges) == 1, f"the blocked ranges are written in one policy, not {with_ranges}"
