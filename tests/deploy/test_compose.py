"""docker-compose checks, on the model the real Compose v2 binary resolves (no Docker engine).

What a reviewer checks by hand: the files validate, every service has a healthcheck, GPU
services reserve GPUs, grace periods exceed the services' drain time, start order waits for
health, and names, ports and flags agree between services. `make up` variables reach the flags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_GPU = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
GRPC_SERVICES = ("encoder", "decoder")


def flag(command: list[str], name: str) -> str:
    """Value of ``--name VALUE`` in a command list."""
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def seconds(duration: str) -> float:
    """A Go duration as Compose prints it ("45s", "1m30s", "2h0m0s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = (service.get("deploy") or {}).get("resources", {}).get("reservations") or {}
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def test_files_validate_and_a_broken_file_does_not(compose_run, tmp_path):
    for files in ([COMPOSE_GPU], [COMPOSE_GPU, COMPOSE_CPU]):
        proc = compose_run(files, ["config", "-q"], {})
        assert proc.returncode == 0, proc.stderr
    # The validator is real: a dependency on a missing service is refused.
    broken = tmp_path / "compose.yml"
    broken.write_text(
        "services:\n  a:\n    image: x:1\n    depends_on:\n      b:\n        condition: service_healthy\n"
    )
    assert compose_run([broken], ["config", "-q"], {}).returncode != 0


def test_every_service_has_a_healthcheck_on_its_own_port(compose_gpu, compose_cpu):
    for model in (compose_gpu, compose_cpu):
        assert set(model["services"]) == {"gateway", "decoder", "encoder"}
        for name, svc in model["services"].items():
            check = svc.get("healthcheck")
            assert check and not check.get("disable"), name
            test = check["test"]
            assert test[0] == "CMD", name
            port = flag(svc["command"], "--port")
            if name in GRPC_SERVICES:
                # gRPC health through the probe module shipped in the image.
                assert test[1:4] == ["python", "-m", "encoder_service.probe"], name
                assert flag(test, "--port") == port, name
            else:
                assert f"127.0.0.1:{port}/health" in test[-1]
            assert seconds(check["timeout"]) < seconds(check["interval"])
            assert check["retries"] >= 2


def test_gpu_services_reserve_gpus_and_the_cpu_profile_reserves_none(compose_gpu, compose_cpu):
    for name in GRPC_SERVICES:
        devices = gpu_devices(compose_gpu["services"][name])
        assert devices and devices[0]["driver"] == "nvidia", name
        assert devices[0].get("count") == -1 or devices[0].get("device_ids"), name  # -1 = all
    assert not gpu_devices(compose_gpu["services"]["gateway"])
    for name, svc in compose_cpu["services"].items():
        assert not gpu_devices(svc), name
    assert flag(compose_gpu["services"]["encoder"]["command"], "--device") == "cuda"
    assert flag(compose_cpu["services"]["encoder"]["command"], "--device") == "cpu"
    # GPU-only knobs are not passed on CPU.
    assert "--mem-fraction-static" not in compose_cpu["services"]["decoder"]["command"]
    assert flag(compose_cpu["services"]["decoder"]["command"], "--tp") == "1"


def test_cuda_ipc_needs_shared_ipc_namespace(compose_gpu, compose_cpu):
    # DESIGN §3: encoder -> decoder CUDA IPC (and POSIX shm on CPU) across containers needs the
    # host IPC namespace; the GPU file also shares PID for CUDA IPC.
    for name in GRPC_SERVICES:
        assert compose_gpu["services"][name]["ipc"] == "host"
        assert compose_gpu["services"][name]["pid"] == "host"
        assert compose_cpu["services"][name]["ipc"] == "host"
        assert "pid" not in compose_cpu["services"][name]
    assert "ipc" not in compose_gpu["services"]["gateway"]


def test_stop_grace_exceeds_the_drain_budget(compose_gpu, compose_cpu, chart_values):
    drain = chart_values["shutdown"]["drainSeconds"]
    for model in (compose_gpu, compose_cpu):
        for name, svc in model["services"].items():
            assert "stop_grace_period" in svc, name
            grace = seconds(svc["stop_grace_period"])
            assert grace > drain, name
            if "--shutdown-grace-s" in svc["command"]:
                own = float(flag(svc["command"], "--shutdown-grace-s"))
                own += float(
                    dict(zip(svc["command"], svc["command"][1:], strict=False)).get(
                        "--shutdown-drain-s", 0
                    )
                )
                assert own <= drain < grace, name


def test_start_order_waits_for_health(compose_gpu, compose_cpu):
    for model in (compose_gpu, compose_cpu):
        services = model["services"]
        assert set(services["gateway"]["depends_on"]) == {"decoder"}
        assert set(services["decoder"]["depends_on"]) == {"encoder"}
        assert "depends_on" not in services["encoder"]
        for name, svc in services.items():
            for dep, rule in svc.get("depends_on", {}).items():
                assert rule["condition"] == "service_healthy", (name, dep)
            assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_names_ports_and_flags_agree(compose_gpu, compose_cpu):
    for model in (compose_gpu, compose_cpu):
        s = model["services"]
        gw, dec, enc = (s[n]["command"] for n in ("gateway", "decoder", "encoder"))
        assert (gw[0], dec[0], enc[0]) == ("gateway", "decoder", "encoder")  # subcommands
        assert flag(gw, "--decoder-url") == f"decoder:{flag(dec, '--port')}"
        # One DNS name resolves to every encoder replica.
        assert flag(dec, "--encoder-urls") == f"encoder:{flag(enc, '--port')}"
        assert flag(dec, "--served-model-name") == flag(gw, "--served-model-name")
        assert flag(enc, "--model-path") == flag(dec, "--model-path") == "/models"
        for name in GRPC_SERVICES:
            mounts = {v["target"]: v for v in s[name]["volumes"]}
            assert mounts["/models"]["read_only"] is True
            assert flag(s[name]["command"], "--metrics-port") != flag(s[name]["command"], "--port")
        # Only the REST API is published; gRPC and metrics stay on the compose network.
        assert [p["target"] for p in s["gateway"]["ports"]] == [int(flag(gw, "--port"))]
        assert "ports" not in s["decoder"] and "ports" not in s["encoder"]
        assert s["encoder"]["image"] == s["decoder"]["image"] != s["gateway"]["image"]


def test_make_variables_reach_the_services(compose_gpu, compose_cpu, compose_env):
    s = compose_gpu["services"]
    assert flag(s["decoder"]["command"], "--tp") == compose_env["TP"]
    assert s["encoder"]["deploy"]["replicas"] == int(compose_env["ENCODERS"])
    assert compose_cpu["services"]["encoder"]["deploy"]["replicas"] == 2
    for name in GRPC_SERVICES:
        (mount,) = s[name]["volumes"]
        assert mount["source"] == compose_env["MODEL_DIR"]
    assert flag(s["gateway"]["command"], "--served-model-name") == compose_env["SERVED_MODEL"]


def test_defaults_serve_the_embedded_demo_model(compose_cpu):
    demo = Path(__file__).resolve().parents[2] / "models" / "glm4v" / "demo" / "checkpoint"
    for name in GRPC_SERVICES:
        (mount,) = compose_cpu["services"][name]["volumes"]
        assert Path(mount["source"]) == demo


def test_the_cpu_override_only_changes_device_settings(compose_gpu, compose_cpu):
    gpu_only = {"--mem-fraction-static"}
    for name in GRPC_SERVICES:
        g, c = compose_gpu["services"][name]["command"], compose_cpu["services"][name]["command"]
        g_flags = {a for a in g if a.startswith("--")}
        c_flags = {a for a in c if a.startswith("--")}
        assert c_flags == g_flags - gpu_only, name
        for f in c_flags - {"--device", "--tp", "--served-model-name"}:
            if not f.startswith("--enable"):
                assert flag(c, f) == flag(g, f), (name, f)


def test_images_are_built_from_the_deploy_dockerfiles(compose_gpu):
    for name, svc in compose_gpu["services"].items():
        build = svc["build"]
        context = Path(build["context"])
        assert (context / "pyproject.toml").exists(), name
        dockerfile = context / build["dockerfile"]
        expected = "Dockerfile.gateway" if name == "gateway" else "Dockerfile.gpu"
        assert dockerfile == DEPLOY / expected, name
        assert svc["image"].rsplit(":", 1)[1] == build["args"]["GLIMPSE_VERSION"]
