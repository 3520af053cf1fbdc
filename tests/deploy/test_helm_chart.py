"""Helm chart checks, rendered offline by the Helm library and validated against the Kubernetes
1.30 schemas (PyPI ``kubernetes-validate``, strict): probes, grace periods, GPU resources,
autoscaling, Services that select their pods, addresses and ports that agree with the flags, the
API key Secret, disruption budgets, monitoring, and values.yaml documented field by field.
"""

from __future__ import annotations

import base64
import copy
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "glimpse"
KUBE_VERSION = "1.30.0"
CRD_KINDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by hand below
COMPONENTS = ("encoder", "decoder", "gateway")


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize(
    "values", [None, "multi", "cpu"], ids=["default", "multi-encoder-gpu", "cpu"]
)
def test_helm_lint_is_clean(values, release_multi, release_cpu):
    overrides = {"multi": release_multi.values, "cpu": release_cpu.values}.get(values)
    report = helm.lint(str(CHART), overrides, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_bad_values_fail_to_render():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError, match="claimName"):
        chart.render({"model": {"source": "pvc"}}, name="x", namespace="y")
    with pytest.raises(helm.HelmError, match="tp"):
        chart.render({"decoder": {"tp": 0}}, name="x", namespace="y")


def test_manifests_pass_strict_kubernetes_validation(release):
    kinds = set()
    for doc in release.docs:
        kinds.add(doc["kind"])
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds


def test_strict_validation_rejects_an_unknown_field(release_default):
    doc = copy.deepcopy(release_default.workload("decoder"))
    doc["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_grpc_services_have_native_grpc_probes_on_their_port(release):
    for component in ("encoder", "decoder"):
        container = release.container(component)
        port = int(flag(release.args(component), "--port"))
        assert {"containerPort": port, "name": "grpc", "protocol": "TCP"} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (component, probe)
    gateway = release.container("gateway")
    port = int(flag(release.args("gateway"), "--port"))
    assert gateway["ports"] == [{"containerPort": port, "name": "http", "protocol": "TCP"}]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # A dead decoder makes /health fail; liveness must not restart every gateway for it.
    assert "httpGet" not in gateway["livenessProbe"]


def test_grace_periods_cover_drain_and_a_probe_period(release):
    drain = release.values["shutdown"]["drainSeconds"]
    for component in COMPONENTS:
        spec = release.pod_spec(component)
        container = release.container(component)
        pre_stop = 0
        if "lifecycle" in container:
            pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        period = container["readinessProbe"]["periodSeconds"]
        assert spec["terminationGracePeriodSeconds"] > drain + period + pre_stop, component
    args = release.args("encoder")
    readiness = release.container("encoder")["readinessProbe"]
    own_drain = float(flag(args, "--shutdown-drain-s"))
    # NOT_SERVING must be seen by readiness before the server stops accepting calls...
    assert own_drain >= readiness["periodSeconds"] * readiness["failureThreshold"]
    # ...and the whole shutdown fits the budget the grace period was sized for.
    assert own_drain + float(flag(args, "--shutdown-grace-s")) <= drain


def test_gpu_resources_follow_tp_and_replicas(release_default, release_multi):
    for rel in (release_default, release_multi):
        gpus = rel.values["gpu"]["resourceName"]
        decoder = rel.container("decoder")["resources"]["limits"]
        assert (
            decoder[gpus] == rel.values["decoder"]["tp"] == int(flag(rel.args("decoder"), "--tp"))
        )
        encoder = rel.container("encoder")["resources"]["limits"]
        assert encoder[gpus] == rel.values["encoder"]["gpusPerReplica"]
        assert gpus not in rel.container("gateway")["resources"].get("limits", {})
        assert flag(rel.args("encoder"), "--device") == "cuda"
        for component in ("encoder", "decoder"):
            requests = rel.container(component)["resources"]["requests"]
            assert "cpu" in requests and "memory" in requests  # HPA on CPU needs a request
    assert flag(release_multi.args("decoder"), "--ep") == "8"
    assert flag(release_multi.args("decoder"), "--max-model-len") == "65536"
    # Unset knobs are left to the service (the checkpoint's context length, no EP).
    assert "--ep" not in release_default.args("decoder")
    assert "--max-model-len" not in release_default.args("decoder")


def test_cpu_setting_uses_no_gpu(release_cpu):
    for component in COMPONENTS:
        resources = release_cpu.container(component)["resources"]
        assert not any("gpu" in k for k in resources.get("limits", {})), component
        assert "tolerations" not in release_cpu.pod_spec(component), component
    assert flag(release_cpu.args("encoder"), "--device") == "cpu"
    assert "--mem-fraction-static" not in release_cpu.args("decoder")


def test_gpu_pods_land_on_gpu_nodes(release_multi):
    selector = release_multi.values["gpu"]["nodeSelector"]
    for component in ("encoder", "decoder"):
        spec = release_multi.pod_spec(component)
        assert selects(selector, spec["nodeSelector"]), component
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), component
    gateway = release_multi.pod_spec("gateway")
    assert "nodeSelector" not in gateway and "tolerations" not in gateway


def test_decoder_and_encoder_get_shared_memory(release):
    for component in ("encoder", "decoder"):
        spec = release.pod_spec(component)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [
            m for m in release.container(component)["volumeMounts"] if m["mountPath"] == "/dev/shm"
        ]
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
        assert (
            volumes[mount["name"]]["emptyDir"]["sizeLimit"] == release.values[component]["shmSize"]
        )


def test_encoders_autoscale_when_asked(release_default, release_multi):
    assert release_default.objects("HorizontalPodAutoscaler") == []
    assert release_default.workload("encoder")["spec"]["replicas"] == 1
    hpa = release_multi.one("HorizontalPodAutoscaler")
    encoder = release_multi.workload("encoder")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": encoder["metadata"]["name"],
    }
    assert "replicas" not in encoder["spec"]  # the HPA owns it
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 12)
    types = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert types["Resource"]["resource"]["name"] == "cpu"
    assert types["Pods"]["pods"]["metric"]["name"] == "vlm_encoder_num_requests_waiting"


def test_services_select_their_pods_and_ports_exist(release):
    for svc in release.objects("Service"):
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        matched = [
            c
            for c in COMPONENTS
            if selects(
                svc["spec"]["selector"],
                release.workload(c)["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert matched == [component], svc["metadata"]["name"]
        names = {p["name"] for p in release.container(component)["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
        # gRPC is balanced client-side over every pod: encoder and decoder Services are headless.
        assert (svc["spec"].get("clusterIP") == "None") == (component != "gateway")
    for component in COMPONENTS:
        workload = release.workload(component)
        assert selects(
            workload["spec"]["selector"]["matchLabels"],
            workload["spec"]["template"]["metadata"]["labels"],
        )


def test_addresses_in_flags_point_at_the_services(release):
    def address(component: str) -> str:
        svc = release.one("Service", component)
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        return f"{svc['metadata']['name']}.serving.svc.cluster.local:{port}"

    assert flag(release.args("decoder"), "--encoder-urls") == address("encoder")
    assert flag(release.args("gateway"), "--decoder-url") == address("decoder")
    assert address("encoder").endswith(":" + flag(release.args("encoder"), "--port"))
    assert address("decoder").endswith(":" + flag(release.args("decoder"), "--port"))
    statefulset = release.workload("decoder")
    assert (
        statefulset["spec"]["serviceName"] == release.one("Service", "decoder")["metadata"]["name"]
    )
    served = release.values["model"]["servedModelName"]
    assert flag(release.args("decoder"), "--served-model-name") == served
    assert flag(release.args("gateway"), "--served-model-name") == served
    assert flag(release.args("encoder"), "--model-path") == flag(
        release.args("decoder"), "--model-path"
    )


def test_model_comes_from_the_image_or_a_volume(release_default, release_multi):
    assert (
        flag(release_default.args("decoder"), "--model-path")
        == release_default.values["model"]["embeddedPath"]
    )
    assert all(v["name"] != "model" for v in release_default.pod_spec("decoder")["volumes"])
    path = flag(release_multi.args("decoder"), "--model-path")
    for component in ("encoder", "decoder"):
        (mount,) = [
            m for m in release_multi.container(component)["volumeMounts"] if m["name"] == "model"
        ]
        assert mount["mountPath"] == path and mount["readOnly"] is True
        volumes = {v["name"]: v for v in release_multi.pod_spec(component)["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "glm-weights"


def api_key_ref(release) -> dict[str, str]:
    env = {e["name"]: e for e in release.container("gateway").get("env", [])}
    return env["GLIMPSE_API_KEY"]["valueFrom"]["secretKeyRef"]


def test_api_key_comes_from_a_secret(release_default, release_multi, release_cpu):
    ref = api_key_ref(release_default)
    secret = release_default.one("Secret")
    assert secret["metadata"]["name"] == ref["name"]
    assert len(base64.b64decode(secret["data"][ref["key"]])) >= 32  # generated
    assert api_key_ref(release_multi) == {"name": "glimpse-key", "key": "token"}
    assert release_multi.objects("Secret") == []  # an existing Secret is used as is
    ref = api_key_ref(release_cpu)
    assert base64.b64decode(release_cpu.one("Secret")["data"][ref["key"]]) == b"sk-test-key"
    for component in ("encoder", "decoder"):  # only the gateway sees the key
        assert "GLIMPSE_API_KEY" not in {
            e["name"] for e in release_default.container(component).get("env", [])
        }


def test_disruption_budgets_cover_the_scaled_components(release):
    covered = set()
    for pdb in release.objects("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        covered |= {
            c
            for c in COMPONENTS
            if selects(selector, release.workload(c)["spec"]["template"]["metadata"]["labels"])
        }
    assert covered == {"encoder", "gateway"}


def test_service_monitor_scrapes_the_metrics_ports(release_default, release_multi):
    assert release_default.objects("ServiceMonitor") == []
    monitor = release_multi.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = {
        svc["metadata"]["labels"]["app.kubernetes.io/component"]
        for svc in release_multi.objects("Service")
        if selects(selector, svc["metadata"]["labels"])
        and {e["port"] for e in monitor["spec"]["endpoints"]}
        & {p["name"] for p in svc["spec"]["ports"]}
    }
    assert scraped == {"encoder", "decoder", "gateway"}
    # The gateway's /metrics needs the API key: the scrape sends the same Secret.
    (gateway,) = [e for e in monitor["spec"]["endpoints"] if e["port"] == "http"]
    assert gateway["authorization"]["credentials"] == api_key_ref(release_multi)
    for component in ("encoder", "decoder"):
        args = release_multi.args(component)
        port = int(flag(args, "--metrics-port"))
        svc = release_multi.one("Service", component)
        assert {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"} in svc[
            "spec"
        ]["ports"]
        assert "--enable-metrics" in args


def test_ingress_routes_to_the_gateway(release_default, release_multi):
    assert release_default.objects("Ingress") == []
    ingress = release_multi.one("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    gateway = release_multi.one("Service", "gateway")
    assert backend["name"] == gateway["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in gateway["spec"]["ports"]}


def test_pods_run_as_non_root(release):
    for component in COMPONENTS:
        spec = release.pod_spec(component)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        container = release.container(component)["securityContext"]
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"]["drop"] == ["ALL"]


def test_config_changes_roll_the_pods(release_default):
    changed = helm.Chart.load(str(CHART)).render(
        {"model": {"servedModelName": "other"}}, name="glimpse", namespace="serving"
    )
    new = yaml.safe_load(changed["glimpse/templates/encoder-deployment.yaml"])
    old = release_default.workload("encoder")
    key = "checksum/config"
    assert (
        new["spec"]["template"]["metadata"]["annotations"][key]
        != old["spec"]["template"]["metadata"]["annotations"][key]
    )


def undocumented(text: str) -> list[str]:
    """Paths of values that neither they nor their parent or grandparent carry a comment above."""
    lines = text.splitlines()

    def commented(node) -> bool:
        i = node.start_mark.line - 1
        return i >= 0 and lines[i].strip().startswith("#")

    missing: list[str] = []

    def walk(mapping, ancestors: list) -> None:
        for key, value in mapping.value:
            chain = [*ancestors, key]
            if isinstance(value, yaml.MappingNode) and value.value:
                walk(value, chain)
            elif not any(commented(k) for k in chain[-3:]):
                missing.append(".".join(k.value for k in chain))

    walk(yaml.compose(text), [])
    return missing


def test_values_are_documented_field_by_field():
    assert undocumented((CHART / "values.yaml").read_text()) == []
    assert undocumented("a:\n  b:\n    c:\n      d: 1\n") == ["a.b.c.d"]


def test_chart_and_images_share_the_project_version(release_default):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    for component in COMPONENTS:
        assert release_default.container(component)["image"].endswith(f":{version}")


def test_notes_tell_how_to_reach_the_api(release_default, release_multi):
    notes = release_default.manifests["glimpse/templates/NOTES.txt"]
    assert "port-forward svc/glimpse-gateway" in notes and "GLIMPSE_API_KEY" in notes
    assert "glimpse.example.com" in release_multi.manifests["glimpse/templates/NOTES.txt"]


def test_embedded_model_path_matches_the_image():
    dockerfile = (REPO / "deploy" / "Dockerfile.gpu").read_text()
    workdir = dockerfile.split("\nWORKDIR ", 1)[1].split()[0]
    embedded = yaml.safe_load((CHART / "values.yaml").read_text())["model"]["embeddedPath"]
    assert f"GLIMPSE_DEMO_MODEL={embedded}" in dockerfile
    # The image copies the repository's packages under WORKDIR, so the demo checkpoint sits at
    # the same relative path as the one compose mounts by default.
    relative = Path(embedded).relative_to(workdir)
    compose = (REPO / "deploy" / "docker-compose.yml").read_text()
    assert f"${{MODEL_DIR:-../{relative}}}" in compose
