"""No drift between the deployment files and the services' command lines.

Every command that docker-compose (GPU file and CPU override) and the Helm chart (default,
multi-encoder GPU and CPU values) start is parsed by the real argparse parser of that
subcommand (``glimpse.cli.COMMANDS`` -> module ``add_arguments``): an unknown flag, a bad value
or a missing required flag fails here instead of in a crash-looping container. The shutdown
times the services are told to take must fit the grace budget the deployments were sized for.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from glimpse.cli import COMMANDS

SERVICES = ("encoder", "decoder", "gateway")
SOURCES = ("compose_gpu", "compose_cpu", "release_default", "release_multi", "release_cpu")


def service_parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"glimpse {name}", exit_on_error=False)
    module.add_arguments(parser)
    return parser


def argv(source, name: str) -> list[str]:
    if isinstance(source, dict):  # a resolved compose model
        return list(source["services"][name]["command"])
    return source.args(name)  # a rendered release, $(VAR) expanded


@pytest.mark.parametrize("name", SERVICES)
@pytest.mark.parametrize("source_name", SOURCES)
def test_deployed_flags_exist_and_parse(request, source_name, name):
    command = argv(request.getfixturevalue(source_name), name)
    assert command[0] == name  # the image's ENTRYPOINT is `glimpse`; this is the subcommand
    parser = service_parser(name)
    known = {opt for action in parser._actions for opt in action.option_strings}
    unknown = sorted({a.split("=")[0] for a in command[1:] if a.startswith("--")} - known)
    assert unknown == [], f"{source_name}: `glimpse {name}` has no flags {unknown}"
    try:
        parser.parse_args(command[1:])
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"{source_name}: `glimpse {name}` rejects {command[1:]}: {err}")


@pytest.mark.parametrize("name", SERVICES)
@pytest.mark.parametrize("source_name", SOURCES)
def test_shutdown_fits_the_grace_budget(request, source_name, name, chart_values):
    args = service_parser(name).parse_args(argv(request.getfixturevalue(source_name), name)[1:])
    budget = chart_values["shutdown"]["drainSeconds"]
    own = sum(
        float(value)
        for key, value in vars(args).items()
        if ("grace" in key or "drain" in key) and isinstance(value, int | float)
    )
    assert own <= budget, f"{source_name}: {name} may take {own}s to stop, budget {budget}s"


def test_the_healthcheck_probe_command_exists():
    proc = subprocess.run(
        [sys.executable, "-m", "encoder_service.probe", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--port" in proc.stdout
