"""The Helm chart (deploy/helm/maas-mesh): lint, render, Kubernetes schemas and the mesh's invariants.

Needs the real helm from tools/install_k8s_tools.sh (`make k8s-tools`, which `make test` runs first).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from maas import ports
from services.console.config import ConsoleLimits
from services.shared.server import READINESS
from tests.unit import chart_render as cr
from tests.unit.chart_render import COMPONENTS, SCENARIOS, SERVICES, STATELESS, name

pytestmark = pytest.mark.skipif(
    not cr.HELM.exists(), reason=f"{cr.HELM} missing: run `make k8s-tools` (tools/install_k8s_tools.sh)"
)

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion); strict = unknown fields fail.
K8S_VERSION = "1.30.0"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "cert-manager.io/")
GPU_SCENARIOS = [None, "gpu-production-values.yaml"]
PORTS = {"router": ports.ROUTER, "registry": ports.REGISTRY, "tokenizer": ports.TOKENIZER, "vision": ports.VISION}
OIP_FAST_PORT = ports.ROUTER_OIP_FAST  # router.oipFastPath.port default
TLS_HEALTH_PORT = 8086  # tls.healthPort default
OPENAI_PORT = ports.OPENAI  # the OpenAI gateway's HTTP port
CONSOLE_PORT = ports.CONSOLE  # the web console's HTTP port, the chart's must be the service's
ids = [s or "defaults" for s in SCENARIOS]


# --- lint, render, schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_lint_strict(scenario):
    proc = cr.helm("lint", "--strict", str(cr.CHART), *cr.values_args(scenario))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_every_object_validates_against_kubernetes_schema(scenario):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = cr.render(scenario)
    assert docs
    errors = []
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema in kubernetes-validate; shapes are asserted below
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_recommended_labels_everywhere(scenario):
    for d in cr.render(scenario):
        labels = d["metadata"].get("labels", {})
        for key in ("name", "instance", "component", "version", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, (d["kind"], d["metadata"]["name"], key)
        assert labels["helm.sh/chart"].startswith("maas-mesh-")


# --- GPU placement --------------------------------------------------------------------------------


def _gpu_mentions(spec: dict) -> list[str]:
    text = json.dumps({k: spec.get(k) for k in ("containers", "nodeSelector", "tolerations")})
    return re.findall(r"nvidia\.com/[\w.-]+", text)


@pytest.mark.parametrize("scenario", GPU_SCENARIOS, ids=[s or "defaults" for s in GPU_SCENARIOS])
def test_gpus_only_on_triton(scenario):
    docs = cr.render(scenario)
    for workload, spec in cr.pods(docs):
        if workload != name("triton"):
            assert not _gpu_mentions(spec), workload
    spec = cr.pod_spec(docs, "triton")
    triton = cr.container(docs, "triton")
    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert "--allow-gpu-metrics=true" in triton["args"]


def test_cpu_only_has_no_gpu_anything():
    docs = cr.render("cpu-only-values.yaml")
    for workload, spec in cr.pods(docs):
        assert not _gpu_mentions(spec), workload
        assert "runtimeClassName" not in spec
    assert "--allow-gpu-metrics=false" in cr.container(docs, "triton")["args"]


def test_triton_image_args_and_ports():
    docs = cr.render()
    c = cr.container(docs, "triton")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", c["image"])
    args = c["args"]
    assert args[0] == "tritonserver"
    for flag in ("--model-control-mode=explicit", "--model-repository=/models", "--allow-metrics=true"):
        assert flag in args
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert not any(a.startswith("--trace-config") for a in args)  # no collector by default


@pytest.mark.parametrize("scenario", ["cpu-only-values.yaml", "podman-values.yaml"])
def test_cpu_profiles_use_the_cpu_triton_image_with_the_same_args(scenario):
    """The CPU Triton image (`make images`) takes the chart's args as NVIDIA's does: `tritonserver ...`."""
    docs = cr.render(scenario)
    c = cr.container(docs, "triton")
    assert re.fullmatch(r"(localhost/)?maas-triton-cpu:\d+\.\d+\.\d+", c["image"])
    assert c["args"][0] == "tritonserver" and "--model-repository=/models" in c["args"]


def test_triton_headless_and_normal_services():
    services = cr.by_name(cr.render(), "Service")
    headless, normal = services[name("triton") + "-headless"], services[name("triton")]
    assert headless["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in normal["spec"]
    for svc in (headless, normal):
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}


# --- autoscaling and disruption ---------------------------------------------------------------------


@pytest.mark.parametrize("scenario", [None, "gpu-production-values.yaml", "object-store-values.yaml"])
def test_hpa_per_stateless_component(scenario):
    docs = cr.render(scenario)
    hpas = {cr.component_of(h): h for h in cr.kind(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == set(STATELESS)  # never the registry
    assert not cr.kind(docs, "ScaledObject")
    metrics = {c: h["spec"]["metrics"] for c, h in hpas.items()}
    for c in ("tokenizer", "vision"):
        assert metrics[c][0]["resource"]["name"] == "cpu"
    assert metrics["router"][0]["pods"]["metric"]["name"] == "maas_router_inflight_requests"
    assert metrics["openai"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "maas_openai_inflight_streams"},
                "target": {"type": "AverageValue", "averageValue": "32"},
            },
        }
    ]
    assert metrics["triton"][0]["pods"]["metric"]["name"] == "triton_queue_time_per_request_us"
    for c, h in hpas.items():
        assert h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name(c)}
        assert {"scaleUp", "scaleDown"} <= set(h["spec"]["behavior"])
        assert "replicas" not in cr.deployment(docs, c)["spec"]  # the HPA owns it


def test_adapter_rules_serve_every_hpa_pods_metric():
    rules = yaml.safe_load((cr.CHART / "files" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in rules}
    wanted = {
        m["pods"]["metric"]["name"]
        for h in cr.kind(cr.render(), "HorizontalPodAutoscaler")
        for m in h["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert wanted and wanted <= served
    for r in rules:
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in r["metricsQuery"] and "<<.GroupBy>>" in r["metricsQuery"]


def test_keda_scaled_objects_replace_hpas():
    docs = cr.render("keda-values.yaml")
    assert not cr.kind(docs, "HorizontalPodAutoscaler")
    scaled = {cr.component_of(s): s for s in cr.kind(docs, "ScaledObject")}
    assert set(scaled) == set(STATELESS)
    for c, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == name(c)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert {"scaleUp", "scaleDown"} <= set(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
        assert spec["triggers"]
        for t in spec["triggers"]:
            assert t["type"] in ("cpu", "prometheus")
            if t["type"] == "prometheus":
                md = t["metadata"]
                assert md["serverAddress"].startswith("http")
                assert float(md["threshold"]) > 0
                assert "{{" not in md["query"] and 'namespace="ml"' in md["query"]
    assert [t["type"] for t in scaled["tokenizer"]["spec"]["triggers"]] == ["cpu"]
    assert "maas_router_inflight_requests" in scaled["router"]["spec"]["triggers"][0]["metadata"]["query"]
    assert 'pod=~"mesh-maas-mesh-openai-.*"' in scaled["openai"]["spec"]["triggers"][0]["metadata"]["query"]
    assert "nv_inference_queue_duration_us" in scaled["triton"]["spec"]["triggers"][0]["metadata"]["query"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_pdbs_only_for_multi_replica_components(scenario):
    docs = cr.render(scenario)
    pdbs = {cr.component_of(p) for p in cr.kind(docs, "PodDisruptionBudget")}
    assert "registry" not in pdbs
    for d in cr.kind(docs, "Deployment"):
        c = cr.component_of(d)
        if c not in STATELESS:
            continue
        hpa = [
            h
            for h in cr.kind(docs, "HorizontalPodAutoscaler") + cr.kind(docs, "ScaledObject")
            if cr.component_of(h) == c
        ]
        low = (
            (hpa[0]["spec"].get("minReplicas") or hpa[0]["spec"].get("minReplicaCount"))
            if hpa
            else d["spec"]["replicas"]
        )
        assert (c in pdbs) == (low > 1), (scenario, c, low)


# --- pods: probes, security, shutdown -------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_probes_on_every_container(scenario):
    docs = cr.render(scenario)
    for workload, spec in cr.pods(docs):
        for c in spec["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, (workload, c["name"])
    for svc in SERVICES:
        c = cr.container(docs, svc)
        tls = "MAAS_TLS_CERT" in cr.env(c)  # then kubelet probes the plaintext health-only port
        port = TLS_HEALTH_PORT if tls else PORTS[svc]
        # Startup and liveness ask "" (the process serves: a wrong Triton address must not restart it),
        # readiness asks the name that follows the readiness checks (Triton reachable).
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (svc, probe)
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": READINESS}, svc
        assert {"name": "grpc", "containerPort": PORTS[svc], "protocol": "TCP"} in c["ports"]
    triton = cr.container(docs, "triton")
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # Room to load models before liveness may kill the pod.
    budget = triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"]
    assert budget >= 300


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_security_context_on_every_pod_and_container(scenario):
    for workload, spec in cr.pods(cr.render(scenario)):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", workload
        assert psc["runAsUser"] == (1000 if workload == name("triton") else 10001), workload
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, workload
            assert csc["readOnlyRootFilesystem"] is True, workload
            assert csc["capabilities"]["drop"] == ["ALL"], workload
            assert csc["runAsNonRoot"] is True, workload
        if workload != name("otel-collector"):
            mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, workload


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_termination_grace_exceeds_drain(scenario):
    docs = cr.render(scenario)
    for svc in SERVICES:
        drain = float(cr.env(cr.container(docs, svc))["MAAS_DRAIN_GRACE_SECONDS"]["value"])
        assert cr.pod_spec(docs, svc)["terminationGracePeriodSeconds"] > drain, svc
    args = cr.container(docs, "triton")["args"]
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert cr.pod_spec(docs, "triton")["terminationGracePeriodSeconds"] > exit_timeout


def test_termination_grace_not_above_drain_fails():
    proc = cr.template(None, "router.drainGraceSeconds=30", "router.terminationGracePeriodSeconds=30")
    assert proc.returncode != 0
    assert "router.terminationGracePeriodSeconds" in proc.stderr


# --- env, peers, RBAC -----------------------------------------------------------------------------


def _names_read_by_services() -> set[str]:
    """MAAS_* names documented in docs/development.md or read by the services' code."""
    text = (cr.ROOT / "docs" / "development.md").read_text()
    text += "".join(p.read_text() for p in (cr.ROOT / "services").rglob("*.py"))
    return set(re.findall(r"\b(MAAS_[A-Z_]+[A-Z])\b", text))


def test_chart_sets_only_env_the_services_read():
    known = _names_read_by_services()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME"}
    for scenario in SCENARIOS:
        docs = cr.render(scenario)
        deployed = cr.by_name(docs, "Deployment")
        gateways = tuple(g for g in (cr.GATEWAY, cr.CONSOLE) if name(g) in deployed)  # openai / console.enabled
        for svc in SERVICES + gateways:
            names = set(cr.env(cr.container(docs, svc)))
            maas = {n for n in names if n.startswith("MAAS_")}
            assert maas <= known, (svc, maas - known)
            assert names - maas <= otel, (svc, names - maas - otel)


def test_service_env_and_peer_addresses():
    docs = cr.render()
    services = cr.by_name(docs, "Service")
    for svc in SERVICES:
        e = cr.env(cr.container(docs, svc))
        assert e["MAAS_LISTEN"]["value"] == f"0.0.0.0:{PORTS[svc]}"
        assert e["MAAS_METRICS_PORT"]["value"] == "9090"
        assert e["MAAS_MODEL_REPOSITORY"]["value"] == "/models"
        for var, spec in e.items():
            if var.endswith("_ADDRESS"):
                host, port = spec["value"].rsplit(":", 1)
                peer = var.removeprefix("MAAS_").removesuffix("_ADDRESS").lower()
                assert host == name(peer), var
                assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, var
    router = cr.env(cr.container(docs, "router"))
    assert {f"MAAS_{p}_ADDRESS" for p in ("REGISTRY", "TOKENIZER", "VISION", "TRITON")} <= set(router)
    registry = cr.env(cr.container(docs, "registry"))
    assert registry["MAAS_TRITON_ADDRESS"]["value"] == f"{name('triton')}:8001"
    for svc in ("router", "registry"):  # every Triton replica, through the headless Service
        e = cr.env(cr.container(docs, svc))
        assert e["MAAS_TRITON_DISCOVERY"]["value"] == "endpointslices"
        assert services[e["MAAS_TRITON_SERVICE"]["value"]]["spec"]["clusterIP"] == "None"
    assert registry["MAAS_REGISTRY_DB"]["value"].startswith("/var/lib/maas/")


def test_registry_single_writer():
    docs = cr.render()
    d = cr.deployment(docs, "registry")
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"] == {"type": "Recreate"}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    pvcs = cr.by_name(docs, "PersistentVolumeClaim")
    assert pvcs[claims["data"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvcs[claims["models"]]["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["name"]: m for m in cr.container(docs, "registry")["volumeMounts"]}
    assert mounts["models"]["readOnly"] is False
    triton_mounts = {m["name"]: m for m in cr.container(docs, "triton")["volumeMounts"]}
    assert triton_mounts["models"]["readOnly"] is True


def test_rbac_is_endpointslice_read_only_for_router_and_registry():
    docs = cr.render()
    (role,) = cr.kind(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    assert not cr.kind(docs, "ClusterRole") and not cr.kind(docs, "ClusterRoleBinding")
    (binding,) = cr.kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {s["name"] for s in binding["subjects"]} == {name("router"), name("registry")}
    for sa in cr.kind(docs, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for workload, spec in cr.pods(docs):
        assert spec["automountServiceAccountToken"] is (workload in (name("router"), name("registry"))), workload


def test_static_triton_discovery_needs_no_kubernetes_api():
    """triton.discovery.mode=static (the podman profile): the Triton list in MAAS_TRITON_ADDRESS, no
    EndpointSlice watch, no token, no Role; endpointslices stays the default (above)."""
    for docs, triton in (
        (cr.render("podman-values.yaml"), f"{name('triton')}:8001"),
        (
            cr.render(None, "triton.discovery.mode=static", "triton.discovery.addresses={t0:8001,t1:8001}"),
            "t0:8001,t1:8001",
        ),
    ):
        for svc in ("router", "registry"):
            e = cr.env(cr.container(docs, svc))
            assert e["MAAS_TRITON_DISCOVERY"]["value"] == "static" and "MAAS_TRITON_SERVICE" not in e
            assert e["MAAS_TRITON_ADDRESS"]["value"] == triton
        assert not cr.kind(docs, "Role") and not cr.kind(docs, "RoleBinding")
        assert not any(spec["automountServiceAccountToken"] for _, spec in cr.pods(docs))


def test_static_discovery_through_the_service_with_several_replicas_fails():
    proc = cr.template(None, "triton.discovery.mode=static")  # default: Triton autoscaled
    assert proc.returncode != 0 and "triton.discovery.addresses" in proc.stderr


# --- network policies ----------------------------------------------------------------------------


def _policies(docs) -> dict[str, dict]:
    return {cr.component_of(p): p for p in cr.kind(docs, "NetworkPolicy")}


def _rule_for(policy: dict, port: int) -> dict:
    (rule,) = [r for r in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
    return rule


def _components(rule: dict) -> set[str]:
    return {p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in rule["from"]}


def test_network_policies():
    policies = _policies(cr.render())
    assert set(policies) == set(COMPONENTS)
    for c in ("tokenizer", "vision"):
        assert _components(_rule_for(policies[c], PORTS[c])) == {"router"}
    assert _components(_rule_for(policies["triton"], 8001)) == {"router", "registry"}
    assert _components(_rule_for(policies["triton"], 8000)) == {"registry"}
    (peer,) = _rule_for(policies["registry"], 50052)["from"]
    assert peer["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "maas-mesh",
        "app.kubernetes.io/instance": cr.RELEASE,
    }
    assert "from" not in _rule_for(policies["router"], 50051)  # the entry point
    assert "from" not in _rule_for(policies["openai"], OPENAI_PORT)  # the other one
    for c, p in policies.items():
        assert p["spec"]["policyTypes"] == ["Ingress"]
        metrics = _rule_for(p, 8002 if c == "triton" else 9090)
        peer, *console = metrics["from"]  # the monitoring namespace; the router's also admits the console
        assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        assert _components({"from": console}) == ({"console"} if c == "router" else set())


def test_router_oip_fast_path_ports_and_env():
    docs = cr.render()
    router = cr.container(docs, "router")
    assert {"name": "oip-fast", "containerPort": OIP_FAST_PORT, "protocol": "TCP"} in router["ports"]
    assert cr.env(router)["MAAS_ROUTER_OIP_FAST_LISTEN"]["value"] == f"0.0.0.0:{OIP_FAST_PORT}"
    # Probes stay on the main port, which serves health and the same protocol.
    assert router["readinessProbe"]["grpc"] == {"port": PORTS["router"], "service": READINESS}
    ports = {p["name"]: p for p in cr.by_name(docs, "Service")[name("router")]["spec"]["ports"]}
    assert ports["oip-fast"] == {
        "name": "oip-fast",
        "port": OIP_FAST_PORT,
        "targetPort": "oip-fast",
        "protocol": "TCP",
        "appProtocol": "grpc",
    }
    assert ports["grpc"]["port"] == PORTS["router"]
    # Only the router has it.
    for svc in SERVICES[1:]:
        assert "MAAS_ROUTER_OIP_FAST_LISTEN" not in cr.env(cr.container(docs, svc)), svc
        assert "oip-fast" not in {p["name"] for p in cr.container(docs, svc)["ports"]}, svc
    # Admitted exactly like the gRPC port: the same rule (default: any source).
    policy = _policies(docs)["router"]
    assert _rule_for(policy, OIP_FAST_PORT) == _rule_for(policy, PORTS["router"])
    assert "from" not in _rule_for(policy, OIP_FAST_PORT)


def test_router_oip_fast_path_port_follows_values_and_router_ingress():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    docs = cr.render(
        None,
        "router.oipFastPath.port=8443",
        "networkPolicy.routerIngressFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=gateway",
    )
    router = cr.container(docs, "router")
    assert {"name": "oip-fast", "containerPort": 8443, "protocol": "TCP"} in router["ports"]
    assert cr.env(router)["MAAS_ROUTER_OIP_FAST_LISTEN"]["value"] == "0.0.0.0:8443"
    ports = {p["name"]: p["port"] for p in cr.by_name(docs, "Service")[name("router")]["spec"]["ports"]}
    assert ports["oip-fast"] == 8443
    policy = _policies(docs)["router"]
    gateways = [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "maas-mesh",
                    "app.kubernetes.io/instance": cr.RELEASE,
                    "app.kubernetes.io/component": c,
                }
            }
        }
        for c in ("openai", "console")
    ]
    for port in (PORTS["router"], 8443):
        assert _rule_for(policy, port)["from"] == [peer, *gateways], (
            port
        )  # the OpenAI gateway and console stay admitted
    assert not [r for r in policy["spec"]["ingress"] if {"port": OIP_FAST_PORT, "protocol": "TCP"} in r["ports"]]


def test_router_oip_fast_path_can_be_disabled():
    docs = cr.render(None, "router.oipFastPath.enabled=false")
    router = cr.container(docs, "router")
    assert cr.env(router)["MAAS_ROUTER_OIP_FAST_LISTEN"]["value"] == "off"
    assert {p["name"] for p in router["ports"]} == {"grpc", "metrics"}
    service = cr.by_name(docs, "Service")[name("router")]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    (grpc_rule,) = [
        r
        for r in _policies(docs)["router"]["spec"]["ingress"]
        if {"port": PORTS["router"], "protocol": "TCP"} in r["ports"]
    ]
    assert grpc_rule["ports"] == [{"port": PORTS["router"], "protocol": "TCP"}]
    assert str(OIP_FAST_PORT) not in json.dumps([d for d in docs if d["kind"] != "Secret"])  # random token


# --- auth: API keys and priority shedding (values auth) -------------------------------------------------


def _router_settings(env: dict, monkeypatch):
    """The router's AdmissionSettings from the env the chart gives it (plain values only)."""
    from services.router.config import load_config

    for var, spec in env.items():
        if var.startswith("MAAS_ROUTER_") and "value" in spec:
            monkeypatch.setenv(var, spec["value"])
    return load_config(["--triton", "triton:8001"]).admission


def test_router_gets_auth_and_shedding_off_by_default_and_always_the_admin_token(monkeypatch):
    docs = cr.render()
    router = cr.env(cr.container(docs, "router"))
    assert router["MAAS_ROUTER_AUTH"]["value"] == "off"
    for var in ("INFLIGHT", "QUEUE_MS"):
        for cls in ("SHEDDABLE", "STANDARD"):
            assert float(router[f"MAAS_ROUTER_SHED_{cls}_{var}"]["value"]) == 0, (cls, var)
    # The router sends the registry's admin token: tenant list, shadow and per-version reports.
    registry = cr.env(cr.container(docs, "registry"))
    assert router["MAAS_ADMIN_TOKEN"] == registry["MAAS_ADMIN_TOKEN"]
    assert (
        router["MAAS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
        == cr.kind(docs, "Secret")[0]["metadata"]["name"]
    )
    assert cr.env(cr.container(docs, "router"))["MAAS_ROUTER_OIP_FAST_LISTEN"]["value"] == f"0.0.0.0:{OIP_FAST_PORT}"
    settings = _router_settings(router, monkeypatch)
    assert not settings.auth and not settings.sheds_on_queue_time and settings.shed_sheddable_inflight == 0
    existing = cr.env(cr.container(cr.render("existing-secret-values.yaml"), "router"))
    assert existing["MAAS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "maas-admin", "key": "admin-token"}


def test_auth_block_reaches_the_router_and_keeps_the_fast_path_port(monkeypatch):
    docs = cr.render("auth-values.yaml")  # the other scenario tests (lint, schemas, env read) run on it too
    router = cr.container(docs, "router")
    e = cr.env(router)
    assert e["MAAS_ROUTER_AUTH"]["value"] == "on"
    settings = _router_settings(e, monkeypatch)  # what the router makes of them
    assert settings.auth
    assert (settings.shed_sheddable_inflight, settings.shed_standard_inflight) == (8, 32)
    assert (settings.shed_sheddable_queue_ms, settings.shed_standard_queue_ms) == (5.0, 20.5)
    assert (settings.queue_sample_interval, settings.shed_retry_after) == (0.5, 1.0)
    # The compiled fast path checks keys too: its port stays on the pod, the Service and the NetworkPolicy,
    # admitted like the gRPC port.
    assert e["MAAS_ROUTER_OIP_FAST_LISTEN"]["value"] == f"0.0.0.0:{OIP_FAST_PORT}"
    assert {"name": "oip-fast", "containerPort": OIP_FAST_PORT, "protocol": "TCP"} in router["ports"]
    service = cr.by_name(docs, "Service")[name("router")]
    assert "oip-fast" in {p["name"] for p in service["spec"]["ports"]}
    policy = _policies(docs)["router"]
    assert _rule_for(policy, OIP_FAST_PORT) == _rule_for(policy, PORTS["router"])
    for svc in SERVICES[1:]:  # only the router sheds
        assert not {v for v in cr.env(cr.container(docs, svc)) if v.startswith("MAAS_ROUTER_")}, svc
    # Shedding without auth: thresholds set, every call standard unless it asks for sheddable.
    e = cr.env(cr.container(cr.render(None, "auth.shedding.queueMs.sheddable=3"), "router"))
    assert e["MAAS_ROUTER_AUTH"]["value"] == "off" and e["MAAS_ROUTER_OIP_FAST_LISTEN"]["value"] != "off"
    assert _router_settings(e, monkeypatch).shed_sheddable_queue_ms == 3.0


@pytest.mark.parametrize(
    "sets, message",
    [
        (("auth.enabled=yes",), "/auth/enabled"),
        (("auth.shedding.queueMs.sheddable=-1",), "/auth/shedding/queueMs/sheddable"),
        (("auth.shedding.inflight.standard=1.5",), "/auth/shedding/inflight/standard"),
        (("auth.shedding.queueSampleIntervalSeconds=0",), "/auth/shedding/queueSampleIntervalSeconds"),
        (("auth.shedding.queueMs.critical=1",), "critical"),  # critical calls are never shed
        (
            ("auth.shedding.queueMs.standard=10",),
            "auth.shedding.queueMs.standard (10) needs auth.shedding.queueMs.sheddable",
        ),
        (
            ("auth.shedding.inflight.sheddable=20", "auth.shedding.inflight.standard=10"),
            "sheddable calls are refused first",
        ),
    ],
)
def test_invalid_auth_values_fail_naming_the_field(sets, message):
    proc = cr.template(None, *sets)
    assert proc.returncode != 0, sets
    assert message in proc.stderr, proc.stderr


def test_network_policies_can_be_disabled():
    assert not cr.kind(cr.render(None, "networkPolicy.enabled=false"), "NetworkPolicy")


# --- secrets and model repository ------------------------------------------------------------------


def test_generated_admin_token():
    docs = cr.render()
    (secret,) = cr.kind(docs, "Secret")
    ref = cr.env(cr.container(docs, "registry"))["MAAS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "token"}
    assert len(secret["data"]["token"]) >= 32


def test_existing_admin_token_secret():
    docs = cr.render("existing-secret-values.yaml")
    assert not cr.kind(docs, "Secret")
    ref = cr.env(cr.container(docs, "registry"))["MAAS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "maas-admin", "key": "admin-token"}


def test_object_store_model_repository():
    docs = cr.render("object-store-values.yaml")
    url = "s3://maas-models/repository"
    assert all("ReadWriteMany" not in p["spec"]["accessModes"] for p in cr.kind(docs, "PersistentVolumeClaim"))
    assert f"--model-repository={url}" in cr.container(docs, "triton")["args"]
    for c in SERVICES + ("triton",):
        spec = cr.pod_spec(docs, c)
        assert "models" not in {v["name"] for v in spec["volumes"]}, c
        assert cr.container(docs, c)["envFrom"] == [{"secretRef": {"name": "maas-model-store"}}], c
    assert cr.env(cr.container(docs, "registry"))["MAAS_MODEL_REPOSITORY"]["value"] == url


def test_object_store_needs_url():
    proc = cr.template(None, "modelRepository.type=objectStore", "modelRepository.objectStore.credentialsSecret=s")
    assert proc.returncode != 0 and "modelRepository.objectStore.url" in proc.stderr


# --- observability ----------------------------------------------------------------------------------


def test_scrape_annotations_point_at_metrics_port():
    docs = cr.render()
    for c in COMPONENTS:
        d = cr.deployment(docs, c)
        ann = d["spec"]["template"]["metadata"]["annotations"]
        ports = {p["name"]: p["containerPort"] for p in cr.container(docs, c)["ports"]}
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == ports["metrics"]


def test_service_monitor_and_tracing_in_production():
    docs = cr.render("gpu-production-values.yaml")
    (sm,) = cr.kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    selector = sm["spec"]["selector"]["matchLabels"]
    scraped = {
        cr.component_of(s) for s in cr.kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    }
    assert scraped == set(COMPONENTS)  # once each: not the headless Service
    assert sum(selector.items() <= s["metadata"]["labels"].items() for s in cr.kind(docs, "Service")) == len(COMPONENTS)

    collector = name("otel-collector")
    ports = {p["port"] for p in cr.by_name(docs, "Service")[collector]["spec"]["ports"]}
    assert ports == {4317, 4318}
    for svc in SERVICES:
        e = cr.env(cr.container(docs, svc))
        assert e["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{collector}:4317"
        assert e["OTEL_SERVICE_NAME"]["value"] == f"maas-{svc}"
    args = cr.container(docs, "triton")["args"]
    assert "--trace-config=mode=opentelemetry" in args
    assert f"--trace-config=opentelemetry,url=http://{collector}:4318/v1/traces" in args
    assert "--trace-config=rate=1000" in args
    config = yaml.safe_load(cr.by_name(docs, "ConfigMap")[collector]["data"]["config.yaml"])
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["otlp"]


def test_grafana_dashboard_configmap():
    (cm,) = [c for c in cr.kind(cr.render(), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["maas-mesh.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "maas_router_requests_total",
        "maas_rpc_server_duration_seconds_bucket",
        "maas_rpc_server_requests_total",
        "nv_inference_queue_duration_us",
        "nv_inference_request_success",
        "maas_router_inflight_requests",
    ):
        assert metric in exprs, metric


# --- values schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, field",
    [
        (("router.replicas=-1",), "/router/replicas"),
        (("tokenizer.unknownKey=1",), "unknownKey"),
        (("registry.replicas=2",), "/registry/replicas"),
        (("registry.autoscaling.enabled=true",), "/registry/autoscaling/enabled"),
        (("modelRepository.type=nfs",), "/modelRepository/type"),
        (("triton.image.pullPolicy=Sometimes",), "/triton/image/pullPolicy"),
        (("modelRepository.objectStore.url=http://bucket",), "/modelRepository/objectStore/url"),
        (("router.oipFastPath.port=0",), "/router/oipFastPath/port"),
        (("router.oipFastPath.port=70000",), "/router/oipFastPath/port"),
        (("router.oipFastPath.port=50051",), "/router/oipFastPath/port"),  # the router's gRPC port
        (("router.oipFastPath.port=9090",), "/router/oipFastPath/port"),  # its metrics port
        (("router.oipFastPath.enabled=yes",), "/router/oipFastPath/enabled"),
        (("router.oipFastPath.listen=0.0.0.0:1",), "listen"),
        (("openai.maxInflight=0",), "/openai/maxInflight"),
        (("openai.timeoutSeconds=0",), "/openai/timeoutSeconds"),
        (("openai.defaultChatModel=",), "/openai/defaultChatModel"),
        (("openai.port=80",), "port"),
        (("triton.generation.enabled=yes",), "/triton/generation/enabled"),
        (("triton.discovery.mode=dns",), "/triton/discovery/mode"),
        (("triton.discovery.addresses={triton}",), "/triton/discovery/addresses"),
    ],
)
def test_invalid_values_fail_naming_the_field(sets, field):
    proc = cr.template(None, *sets)
    assert proc.returncode != 0, sets
    assert field in proc.stderr, proc.stderr


# --- OpenAI gateway and the generation model ----------------------------------------------------------


def test_openai_gateway_deployment_service_and_probes():
    docs = cr.render()
    c = cr.container(docs, "openai")
    assert c["command"] == ["maas-openai"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": OPENAI_PORT, "metrics": 9090}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}  # follows the router
    e = cr.env(c)
    assert e["MAAS_LISTEN"]["value"] == f"0.0.0.0:{OPENAI_PORT}"
    assert e["MAAS_ROUTER_ADDRESS"]["value"] == f"{name('router')}:{PORTS['router']}"
    assert e["MAAS_REGISTRY_ADDRESS"]["value"] == f"{name('registry')}:{PORTS['registry']}"
    assert e["MAAS_OPENAI_DEFAULT_EMBEDDING_MODEL"]["value"] == "minilm"
    assert int(e["MAAS_OPENAI_MAX_INFLIGHT"]["value"]) > 0 and int(e["MAAS_OPENAI_MAX_REQUEST_BYTES"]["value"]) > 0
    spec = cr.pod_spec(docs, "openai")
    assert {v["name"] for v in spec["volumes"]} == {"tmp"}  # no model repository: it only calls the router
    assert spec["terminationGracePeriodSeconds"] > float(e["MAAS_DRAIN_GRACE_SECONDS"]["value"])
    service = cr.by_name(docs, "Service")[name("openai")]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": OPENAI_PORT, "metrics": 9090}
    assert {cr.component_of(p) for p in cr.kind(docs, "PodDisruptionBudget")} >= {"openai"}
    assert name("openai") in cr.by_name(docs, "ServiceAccount")


def test_openai_ingress_can_be_restricted():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    docs = cr.render(
        None, "networkPolicy.openaiIngressFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=ingress"
    )
    policies = _policies(docs)
    assert _rule_for(policies["openai"], OPENAI_PORT)["from"] == [peer]
    assert "from" not in _rule_for(policies["router"], PORTS["router"])


def test_openai_gateway_can_be_disabled():
    docs = cr.render(None, "openai.enabled=false")
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "openai"]
    restricted = cr.render(
        None,
        "openai.enabled=false",
        "console.enabled=false",
        "networkPolicy.routerIngressFrom[0].podSelector.matchLabels.a=b",
    )
    assert _rule_for(_policies(restricted)["router"], PORTS["router"])["from"] == [
        {"podSelector": {"matchLabels": {"a": "b"}}}
    ]


# --- web console -----------------------------------------------------------------------------------


def test_console_deployment_service_and_probes():
    docs = cr.render()
    c = cr.container(docs, "console")
    assert c["command"] == ["maas-console"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": CONSOLE_PORT, "metrics": 9090}
    assert c["startupProbe"]["httpGet"] == c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}  # router and registry answer
    e = cr.env(c)
    assert e["MAAS_LISTEN"]["value"] == f"0.0.0.0:{CONSOLE_PORT}"
    assert e["MAAS_ROUTER_ADDRESS"]["value"] == f"{name('router')}:{PORTS['router']}"
    assert e["MAAS_REGISTRY_ADDRESS"]["value"] == f"{name('registry')}:{PORTS['registry']}"
    assert e["MAAS_CONSOLE_ROUTER_METRICS"]["value"] == f"http://{name('router')}:9090/metrics"  # its charts
    assert int(e["MAAS_CONSOLE_MAX_UPLOAD_BYTES"]["value"]) == ConsoleLimits().max_upload_bytes
    spec = cr.pod_spec(docs, "console")
    assert {v["name"] for v in spec["volumes"]} == {"tmp"}  # no model repository, no token Secret
    assert not [x for x in c["env"] if "valueFrom" in x and "secretKeyRef" in x["valueFrom"]]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and spec["securityContext"]["runAsNonRoot"] is True
    service = cr.by_name(docs, "Service")[name("console")]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": CONSOLE_PORT, "metrics": 9090}
    policies = _policies(docs)
    assert _rule_for(policies["console"], CONSOLE_PORT).get("from") is None  # anyone, unless restricted
    assert "console" in _components(
        {"from": [p for p in _rule_for(policies["router"], 9090)["from"] if "podSelector" in p]}
    )  # it reads the router's /metrics
    assert not [p for p in _rule_for(policies["tokenizer"], 9090)["from"] if "podSelector" in p]
    assert name("console") in cr.by_name(docs, "ServiceAccount")


def test_console_ingress_can_be_restricted_and_console_disabled():
    docs = cr.render(None, "networkPolicy.consoleIngressFrom[0].podSelector.matchLabels.team=platform")
    assert _rule_for(_policies(docs)["console"], CONSOLE_PORT)["from"] == [
        {"podSelector": {"matchLabels": {"team": "platform"}}}
    ]
    off = cr.render(None, "console.enabled=false")
    assert not [d for d in off if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "console"]


def test_generation_needs_a_triton_image_with_onnxruntime_genai():
    proc = cr.template(None, "triton.generation.enabled=true")
    assert proc.returncode != 0 and "triton.generation.enabled" in proc.stderr and "Dockerfile.genai" in proc.stderr
    docs = cr.render(
        None, "triton.generation.enabled=true", "triton.image.repository=registry.example/maas-triton-genai"
    )
    assert cr.container(docs, "triton")["image"].startswith("registry.example/maas-triton-genai:")
    dockerfile = (cr.ROOT / "deploy" / "triton" / "Dockerfile.genai").read_text()
    assert "onnxruntime-genai" in dockerfile and "triton_backends/onnxruntime_genai" in dockerfile


# --- TLS (values tls) -----------------------------------------------------------------------------

TLS_DIR = "/etc/maas/tls"


def _tls_mount_and_volume(spec: dict, c: dict) -> tuple[dict, dict]:
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    return mount, volume


def _pod(docs, component: str) -> tuple[dict, dict]:
    for workload, spec in cr.pods(docs):
        if workload == name(component):
            (c,) = spec["containers"]
            return spec, c
    raise AssertionError(f"no pod for {component}")


def test_tls_is_on_in_production_with_a_cert_manager_certificate():
    docs = cr.render("gpu-production-values.yaml")
    (cert,) = cr.kind(docs, "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["spec"]["issuerRef"] == {"name": "maas-mesh-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert cert["spec"]["secretName"] == name("tls")
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    dns = set(cert["spec"]["dnsNames"])
    for component in ("router", "registry", "tokenizer", "vision", "openai", "console", "triton", "triton-headless"):
        assert {name(component), f"{name(component)}.{cr.NAMESPACE}.svc.cluster.local"} <= dns, component
    assert cr.FULLNAME in dns  # what MAAS_TLS_SERVER_NAME checks for peers reached by pod IP
    assert "127.0.0.1" in cert["spec"]["ipAddresses"]  # the fast path's fallback to its own router


@pytest.mark.parametrize(
    "scenario", [("gpu-production-values.yaml",), (None, "tls.enabled=true", "tls.existingSecret=my-certs")]
)
def test_tls_reaches_every_pod_and_probes_still_work(scenario):
    docs = cr.render(*scenario)
    secret = "my-certs" if scenario[0] is None else name("tls")
    if scenario[0] is None:
        assert not cr.kind(docs, "Certificate")  # an existing Secret: nothing issued
    for component in (*SERVICES, "openai", "console", "triton"):
        spec, c = _pod(docs, component)
        mount, volume = _tls_mount_and_volume(spec, c)
        assert mount["mountPath"] == TLS_DIR and mount["readOnly"]
        assert volume["secret"]["secretName"] == secret
    for svc in SERVICES:
        _, c = _pod(docs, svc)
        e = cr.env(c)
        assert {k: e[k]["value"] for k in ("MAAS_TLS_CERT", "MAAS_TLS_KEY", "MAAS_TLS_CA")} == {
            "MAAS_TLS_CERT": f"{TLS_DIR}/tls.crt",
            "MAAS_TLS_KEY": f"{TLS_DIR}/tls.key",
            "MAAS_TLS_CA": f"{TLS_DIR}/ca.crt",
        }
        assert e["MAAS_TLS_CLIENT_AUTH"]["value"] == "required"
        assert e["MAAS_TLS_SERVER_NAME"]["value"] == cr.FULLNAME
        assert e["MAAS_HEALTH_LISTEN"]["value"] == f"0.0.0.0:{TLS_HEALTH_PORT}"
        assert {"name": "health", "containerPort": TLS_HEALTH_PORT, "protocol": "TCP"} in c["ports"]
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": TLS_HEALTH_PORT}, (svc, probe)
        assert c["readinessProbe"]["grpc"] == {"port": TLS_HEALTH_PORT, "service": READINESS}, svc
    for http_service in ("openai", "console"):
        _, c = _pod(docs, http_service)
        assert cr.env(c)["MAAS_TLS_CLIENT_AUTH"]["value"] == "optional"  # HTTPS callers without certificates
        assert "MAAS_HEALTH_LISTEN" not in cr.env(c)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["scheme"] == "HTTPS", (http_service, probe)
    _, triton = _pod(docs, "triton")
    args = triton["args"]
    assert {
        "--grpc-use-ssl=true",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={TLS_DIR}/tls.crt",
        f"--grpc-server-key={TLS_DIR}/tls.key",
        f"--grpc-root-cert={TLS_DIR}/ca.crt",
    } <= set(args)
    assert triton["readinessProbe"]["httpGet"]["port"] == "http"  # Triton's HTTP port stays plain for probes


def test_triton_is_rolled_when_its_certificate_secret_is_renewed():
    """Triton reads its certificate at start only: its Deployment asks Stakater Reloader for a rollout on
    a change of the TLS Secret (cert-manager's renewal, or the Secret you manage)."""
    key = "secret.reloader.stakater.com/reload"
    docs = cr.render("gpu-production-values.yaml")
    assert cr.deployment(docs, "triton")["metadata"]["annotations"] == {key: name("tls")}
    docs = cr.render(None, "tls.enabled=true", "tls.existingSecret=my-certs")
    assert cr.deployment(docs, "triton")["metadata"]["annotations"] == {key: "my-certs"}
    for svc in SERVICES:  # the services re-read their files: no rollout
        assert key not in cr.deployment(docs, svc)["metadata"].get("annotations", {}), svc
    off = cr.render("gpu-production-values.yaml", "tls.restartTritonOnRenewal=false")
    assert "annotations" not in cr.deployment(off, "triton")["metadata"]
    assert "annotations" not in cr.deployment(cr.render(), "triton")["metadata"]  # no TLS


def test_router_callers_client_certificates_can_be_optional():
    docs = cr.render("gpu-production-values.yaml", "tls.clientAuth=optional")
    _, router = _pod(docs, "router")
    assert cr.env(router)["MAAS_TLS_CLIENT_AUTH"]["value"] == "optional"
    _, tokenizer = _pod(docs, "tokenizer")
    assert cr.env(tokenizer)["MAAS_TLS_CLIENT_AUTH"]["value"] == "required"


def test_tls_off_by_default_and_needs_a_certificate_source():
    docs = cr.render(None)
    assert not cr.kind(docs, "Certificate")
    _, router = _pod(docs, "router")
    assert "MAAS_TLS_CERT" not in cr.env(router) and not [m for m in router["volumeMounts"] if m["name"] == "tls"]
    proc = cr.template(None, "tls.enabled=true")
    assert (
        proc.returncode != 0 and "tls.certManager.issuerRef.name" in proc.stderr and "tls.existingSecret" in proc.stderr
    )


def test_triton_gets_the_services_malloc_arena_bound():
    """tritonserver cannot mallopt for us: the chart sets MALLOC_ARENA_MAX, the services' default."""
    from services.shared.config import DEFAULT_MALLOC_ARENA_MAX

    env = cr.env(cr.container(cr.render(), "triton"))
    assert env["MALLOC_ARENA_MAX"]["value"] == str(DEFAULT_MALLOC_ARENA_MAX)
    assert "MALLOC_ARENA_MAX" not in cr.env(cr.container(cr.render(None, "triton.mallocArenaMax=0"), "triton"))
