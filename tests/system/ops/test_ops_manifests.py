"""The rendered kustomize overlays: strictly valid Kubernetes, and the operational contract.

Built-in kinds are validated offline against the schemas shipped by kubernetes-validate
(strict: unknown fields are errors) for the oldest supported and the newest known
Kubernetes. Custom resources (Prometheus Operator, KEDA) are checked by structure.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import kubernetes_validate
import pytest

from tests.system.ops.cli import cli_exists, cli_help, serve_subcommands, subcommands_in_help
from tests.system.ops.manifests import (
    K8S,
    OVERLAYS,
    PORTS,
    SERVICES,
    Resource,
    is_crd_kind,
    kustomize_binary,
    of_kind,
    pinned_kustomize_version,
    render_overlay,
    render_overlay_with_keda,
    selects,
)

# Oldest Kubernetes the manifests support (preStop sleep is on by default from 1.30;
# 1.32 is the oldest minor still maintained upstream when this was written) and the newest
# the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())

SECRET_ENV = {"MONGODB_URI", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "SECRET_KEYS",
              "SMTP_USERNAME", "SMTP_PASSWORD"}
CONFIG_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS",
    "MONGODB_DATABASE",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "S3_REGION",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_FROM",
    "SMTP_STARTTLS",
    "TOPIC_PREFIX",
    "ALLOW_LOOPBACK_RECORDINGS",
    "ALLOW_LOOPBACK_WEBHOOKS",
    "HTTP_HOST",
}
DRAIN_SECONDS = 10


def _containers(workload: Resource) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _validation_errors(resources: list[Resource], version: str) -> list[str]:
    errors = []
    for resource in resources:
        if is_crd_kind(resource):
            continue
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    return errors


def test_kustomize_is_the_pinned_version() -> None:
    out = subprocess.run(
        [str(kustomize_binary()), "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == pinned_kustomize_version(), f"kustomize {out}: run `make kustomize`"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_strictly_valid_kubernetes(overlay: str, version: str) -> None:
    resources = render_overlay(overlay)
    assert _validation_errors(resources, version) == []
    builtin = [r for r in resources if not is_crd_kind(r)]
    assert len(builtin) >= 20, "the overlay rendered suspiciously few resources"


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = of_kind(render_overlay("prod"), "Deployment")["gateway"]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    errors = _validation_errors([deployment], KUBERNETES_VERSIONS[-1])
    assert errors and "securityContxt" in errors[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_name_per_service(overlay: str) -> None:
    resources = render_overlay(overlay)
    deployments = of_kind(resources, "Deployment")
    services = of_kind(resources, "Service")
    assert set(deployments) == set(SERVICES)
    assert set(services) == set(SERVICES)
    for name in SERVICES:
        assert (K8S / "base" / name / "deployment.yaml").is_file()
        deployment = deployments[name]
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert template_labels["app.kubernetes.io/name"] == name
        assert template_labels["app.kubernetes.io/part-of"] == "callingest"
        assert services[name]["spec"]["selector"] == {"app.kubernetes.io/name": name}
        assert services[name]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "callingest"
        (container,) = _containers(deployment)
        assert container["name"] == name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_probe_listen_and_run_their_service(overlay: str) -> None:
    resources = render_overlay(overlay)
    services = of_kind(resources, "Service")
    for name, deployment in of_kind(resources, "Deployment").items():
        (container,) = _containers(deployment)
        assert container["command"] == ["callingest"]
        assert container["args"] == ["serve", name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": PORTS[name]}
        env = {e["name"]: e for e in container["env"]}
        assert env["HTTP_PORT"]["value"] == str(PORTS[name])
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        (service_port,) = services[name]["spec"]["ports"]
        assert service_port["port"] == PORTS[name]
        assert service_port["targetPort"] == "http"


def test_manifest_and_dockerfile_services_are_real_serve_subcommands() -> None:
    available = serve_subcommands()
    assert set(SERVICES) <= available
    for overlay in OVERLAYS:
        for deployment in of_kind(render_overlay(overlay), "Deployment").values():
            (container,) = _containers(deployment)
            assert container["args"][0] == "serve"
            assert container["args"][1] in available


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_admin_init_job(overlay: str) -> None:
    jobs = of_kind(render_overlay(overlay), "Job")
    (job,) = jobs.values()
    (container,) = _containers(job)
    assert container["command"] == ["callingest"]
    assert container["args"] == ["admin", "init"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    if cli_exists():
        assert "admin" in subcommands_in_help(cli_help())
        assert "init" in subcommands_in_help(cli_help("admin"))


def _workloads(resources: list[Resource]) -> list[Resource]:
    return [r for r in resources if r["kind"] in {"Deployment", "Job"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_restrictive_security_context(overlay: str) -> None:
    for workload in _workloads(render_overlay(overlay)):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc.get("privileged") is not True
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
            for mount in container["volumeMounts"]:
                assert "emptyDir" in volumes[mount["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_graceful_termination(overlay: str) -> None:
    for workload in _workloads(render_overlay(overlay)):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, workload[
                    "metadata"
                ]["name"]
        if workload["kind"] == "Deployment":
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            config = _config(render_overlay(overlay))
            drain = float(env.get("SHUTDOWN_GRACE_SECONDS") or config["SHUTDOWN_GRACE_SECONDS"])
            assert drain == DRAIN_SECONDS
            pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {})
            pre_stop_seconds = pre_stop.get("sleep", {}).get("seconds", 0)
            assert pod["terminationGracePeriodSeconds"] > drain + pre_stop_seconds


def _config(resources: list[Resource]) -> dict[str, str]:
    (config_map,) = of_kind(resources, "ConfigMap").values()
    return dict(config_map["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_from_configmap_and_secrets_by_reference_only(overlay: str) -> None:
    resources = render_overlay(overlay)
    (config_name,) = of_kind(resources, "ConfigMap")
    config = _config(resources)
    assert set(config) >= CONFIG_ENV
    assert not set(config) & SECRET_ENV, "secrets must not be in the ConfigMap"
    for workload in _workloads(resources):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            # Each setting by reference, only those it reads (tests/system/ops/test_ops_settings.py).
            assert "envFrom" not in container
            for env in container["env"]:
                config_ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if config_ref is not None:
                    assert config_ref == {"name": config_name, "key": env["name"]}
                elif env["name"] in SECRET_ENV:
                    assert set(env) == {"name", "valueFrom"}
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"].startswith("callingest-secrets")
                    assert ref["key"] == env["name"]
                else:
                    assert not re.search(r"(?i)secret|password|token", env["name"])
            names = {e["name"] for e in container["env"]}
            assert "MONGODB_URI" in names


def test_prod_has_no_secret_values_and_refuses_loopback_recordings() -> None:
    resources = render_overlay("prod")
    assert of_kind(resources, "Secret") == {}
    assert _config(resources)["ALLOW_LOOPBACK_RECORDINGS"] == "false"
    assert _config(resources)["ALLOW_LOOPBACK_WEBHOOKS"] == "false"
    for workload in _workloads(resources):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container["env"]:
                if "valueFrom" in env and "secretKeyRef" in env["valueFrom"]:
                    assert env["valueFrom"]["secretKeyRef"]["name"] == "callingest-secrets"
    image = _containers(of_kind(resources, "Deployment")["gateway"])[0]["image"]
    assert not image.endswith(":latest") and ":" in image


def test_prod_submits_mail_with_starttls_and_a_login_from_the_secret() -> None:
    resources = render_overlay("prod")
    config = _config(resources)
    assert (config["SMTP_PORT"], config["SMTP_STARTTLS"]) == ("587", "true")
    (container,) = _containers(of_kind(resources, "Deployment")["notifier"])
    env = {e["name"]: e for e in container["env"]}
    for name in ("SMTP_USERNAME", "SMTP_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "callingest-secrets", "key": name}


def test_dev_secret_holds_every_referenced_key() -> None:
    resources = render_overlay("dev")
    secrets = of_kind(resources, "Secret")
    assert len(secrets) == 1
    (secret,) = secrets.values()
    for workload in _workloads(resources):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container["env"]:
                if "secretKeyRef" in env.get("valueFrom", {}):
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_gateway_autoscaler(overlay: str) -> None:
    resources = render_overlay(overlay)
    deployments = of_kind(resources, "Deployment")
    budgets = of_kind(resources, "PodDisruptionBudget")
    assert set(budgets) == set(deployments)
    for name, budget in budgets.items():
        assert budget["spec"]["selector"] == deployments[name]["spec"]["selector"]
    hpas = of_kind(resources, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway"}
    target = hpas["gateway"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert "replicas" not in deployments["gateway"]["spec"], "the HPA owns gateway replicas"
    assert hpas["gateway"]["spec"]["minReplicas"] <= hpas["gateway"]["spec"]["maxReplicas"]
    if overlay == "prod":
        assert hpas["gateway"]["spec"]["minReplicas"] >= 2
        for name, deployment in deployments.items():
            if name != "gateway":
                assert deployment["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay: str) -> None:
    resources = render_overlay(overlay)
    policies = list(of_kind(resources, "NetworkPolicy").values())
    pods = {
        name: d["spec"]["template"]["metadata"]["labels"]
        for name, d in of_kind(resources, "Deployment").items()
    }

    def ingress_rules(labels: dict[str, str]) -> list[dict[str, Any]] | None:
        selecting = [
            p
            for p in policies
            if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
        ]
        if not selecting:
            return None
        return [rule for p in selecting for rule in p["spec"].get("ingress", [])]

    for name, labels in pods.items():
        rules = ingress_rules(labels)
        assert rules is not None, f"{name} has no ingress policy"
        open_rules = [r for r in rules if "from" not in r]
        if name == "gateway":
            assert open_rules == [{"ports": [{"protocol": "TCP", "port": "http"}]}]
        else:
            assert open_rules == [], f"{name} must not accept traffic from everywhere"
        assert any("from" in r for r in rules), f"{name} must be scrapable by Prometheus"


def _require(obj: dict[str, Any], *path: str) -> Any:
    for key in path:
        assert isinstance(obj, dict) and key in obj, f"missing {'.'.join(path)}"
        obj = obj[key]
    return obj


def check_service_monitor(monitor: Resource, services: dict[str, Resource]) -> None:
    """Structural check of a monitoring.coreos.com/v1 ServiceMonitor against the Services."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    _require(monitor, "metadata", "name")
    selector = _require(monitor, "spec", "selector")
    endpoints = _require(monitor, "spec", "endpoints")
    assert endpoints, "a ServiceMonitor needs endpoints"
    selected = {n for n, s in services.items() if selects(selector, s["metadata"]["labels"])}
    assert selected == set(SERVICES), "the ServiceMonitor must select every service"
    for endpoint in endpoints:
        assert set(endpoint) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "relabelings",
            "metricRelabelings",
            "honorLabels",
        }
        assert endpoint["path"] == "/metrics"
        for service in services.values():
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:
                assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[duration])


def check_prometheus_rule(rule: Resource) -> None:
    """Structural check of a monitoring.coreos.com/v1 PrometheusRule."""
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    _require(rule, "metadata", "name")
    groups = _require(rule, "spec", "groups")
    assert groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        assert group["rules"]
        for r in group["rules"]:
            assert set(r) <= {
                "alert",
                "record",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            }
            assert ("alert" in r) != ("record" in r)
            assert isinstance(r["expr"], str) and r["expr"].strip()
            if "for" in r:
                assert re.fullmatch(r"\d+(ms|s|m|h)", r["for"])
            if "alert" in r:
                assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"])
                assert r["labels"]["severity"] in {"critical", "warning", "info"}
                assert r["annotations"]["summary"] and r["annotations"]["runbook_url"]
            for value in {**r.get("labels", {}), **r.get("annotations", {})}.values():
                assert isinstance(value, str)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_resources(overlay: str) -> None:
    resources = render_overlay(overlay)
    crds = [r for r in resources if is_crd_kind(r)]
    assert sorted(r["kind"] for r in crds) == ["PrometheusRule", "ServiceMonitor"]
    namespace = of_kind(resources, "Namespace")
    (ns,) = namespace
    for resource in resources:
        if resource["kind"] not in ("Namespace", "PriorityClass"):  # cluster-scoped
            assert resource["metadata"]["namespace"] == ns
    (monitor,) = of_kind(resources, "ServiceMonitor").values()
    check_service_monitor(monitor, of_kind(resources, "Service"))
    (rule,) = of_kind(resources, "PrometheusRule").values()
    check_prometheus_rule(rule)


def test_structural_checks_catch_broken_custom_resources() -> None:
    resources = render_overlay("prod")
    (rule,) = of_kind(resources, "PrometheusRule").values()
    rule["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    with pytest.raises(AssertionError):
        check_prometheus_rule(rule)
    (monitor,) = of_kind(resources, "ServiceMonitor").values()
    monitor["spec"]["endpoints"][0]["port"] = "metrics"
    with pytest.raises(AssertionError):
        check_service_monitor(monitor, of_kind(resources, "Service"))


def check_scaled_object(scaled: Resource, deployments: dict[str, Resource]) -> None:
    """Structural check of a keda.sh/v1alpha1 ScaledObject with a prometheus trigger."""
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "triggers",
        "advanced",
        "fallback",
        "idleReplicaCount",
    }
    target = spec["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in deployments
    assert target["name"] == scaled["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert set(meta) >= {"serverAddress", "query", "threshold"}
        assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0
        assert f'service="{target["name"]}"' in meta["query"]


def test_keda_lag_scaling_component() -> None:
    resources = render_overlay_with_keda("prod")
    deployments = of_kind(resources, "Deployment")
    scaled = of_kind(resources, "ScaledObject")
    # The webhooks deliverer's work is due deliveries in MongoDB, not Kafka lag: fixed replicas.
    assert set(scaled) == set(SERVICES) - {"gateway", "webhooks"}
    config = _config(resources)
    for name, obj in scaled.items():
        check_scaled_object(obj, deployments)
        assert "replicas" not in deployments[name]["spec"], "KEDA owns consumer replicas"
        assert obj["spec"]["maxReplicaCount"] <= int(config["TOPIC_PARTITIONS"])
    assert _validation_errors(resources, KUBERNETES_VERSIONS[-1]) == []
