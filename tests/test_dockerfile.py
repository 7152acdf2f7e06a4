"""Offline checks of k8s/Dockerfile (no container builder can pull bases here): each build variant's base image
provides the Python its stage names, that Python satisfies pyproject's requires-python and the Requires-Python
of the pinned torch/ray/transformers, the CUDA base matches the torch wheel index, every pip install uses
constraints.txt, and hadolint is clean with each ignore justified in place."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from cluster import k8s
from cluster.recipe import PROJECT_ROOT

DOCKERFILE = PROJECT_ROOT / "k8s" / "Dockerfile"
# The python3 each Ubuntu release ships (what `apt-get install pythonX.Y` can find there): a distro fact,
# stated here because no offline source gives it.
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
PINNED = ["torch", "deepspeed", "ray", "transformers"]  # what the image installs first / depends on most


def _instructions(text: str) -> list[tuple[str, str, list[str]]]:
    """(INSTRUCTION, arguments, comments just above it). A few lines of parsing: dockerfile-parse lives only
    in .venv-tools (checkov's), and FROM/ENV/RUN with backslash continuations is all this needs."""
    out, comments, buf = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and stripped.startswith("#"):
            comments.append(stripped)
            continue
        if not stripped and not buf:
            comments = []
            continue
        buf += (" " if buf else "") + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip(), comments))
        buf, comments = "", []
    return out


def _stages() -> dict[str, dict]:
    """Stage alias -> {"base", "env", "runs"} for every `FROM image AS alias`."""
    stages, current = {}, None
    for word, args, _ in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            current = {"base": m.group(1), "env": {}, "runs": []}
            stages[m.group(2) or f"final-{len(stages)}"] = current
        elif word == "ENV" and current is not None:
            current["env"].update(dict(re.findall(r"(\w+)=(\S+)", args)))
        elif word == "RUN" and current is not None:
            current["runs"].append(args)
    return stages


def _variants() -> dict[str, dict]:
    return {alias.removeprefix("base-"): s for alias, s in _stages().items() if alias.startswith("base-")}


def _pyproject() -> dict:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _base_python(base: str) -> str:
    """The Python minor version a base image provides."""
    repo, _, tag = base.partition(":")
    if repo in ("python", "docker.io/library/python"):
        return ".".join(tag.split("-")[0].split(".")[:2])
    ubuntu = re.search(r"ubuntu(\d+\.\d+)", tag)
    assert ubuntu and ubuntu.group(1) in UBUNTU_PYTHON, f"unknown base {base}: add its Python to UBUNTU_PYTHON"
    return UBUNTU_PYTHON[ubuntu.group(1)]


def test_both_variants_are_declared_and_the_default_exists():
    variants = _variants()
    assert set(variants) == {"cpu", "gpu"}
    default = re.search(r"^ARG VARIANT=(\w+)", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert default and default.group(1) in variants
    final = [s for alias, s in _stages().items() if not alias.startswith("base-")]
    assert [s["base"] for s in final] == ["base-${VARIANT}"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_variant_python_satisfies_pyproject_and_the_pins(variant):
    stage = _variants()[variant]
    python = stage["env"].get("PYTHON", "")
    assert re.fullmatch(r"python3\.\d+", python), f"base-{variant} must set ENV PYTHON=python3.X"
    version = python.removeprefix("python")
    assert _base_python(stage["base"]) == version, f"{stage['base']} does not provide {python}"
    if not stage["base"].startswith("python:"):  # a distro base: its Python must be installed, venv included
        assert any(f"{python}-venv" in run for run in stage["runs"]), f"base-{variant}: apt-get install {python}-venv"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(version) in requires, f"base-{variant}: Python {version} outside requires-python {requires}"
    pins = _pins()
    for name in PINNED:
        assert name in pins, f"constraints.txt must pin {name}"
        dist = importlib.metadata.distribution(name)
        if Version(dist.version).base_version != Version(pins[name]).base_version:
            continue  # this venv holds another version: its metadata says nothing about the pin
        needed = dist.metadata.get("Requires-Python")
        assert not needed or Version(version) in SpecifierSet(needed), f"{name}=={pins[name]} needs Python {needed}"


def test_pins_satisfy_pyproject_and_the_manifests():
    pins = _pins()
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert Version(pins[name]) in req.specifier, f"{name}=={pins[name]} outside pyproject's {req.specifier}"
    assert pins["ray"] == k8s.RAY_VERSION  # the image's Ray is the rayVersion the KubeRay manifests declare
    for tool in ("pip", "setuptools", "wheel"):  # the image upgrades these before building DeepSpeed
        assert tool in pins


def test_torch_index_matches_the_base():
    variants = _variants()
    assert variants["cpu"]["env"]["TORCH_INDEX"].endswith("/whl/cpu")
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", variants["gpu"]["base"])
    assert cuda, variants["gpu"]["base"]
    assert variants["gpu"]["env"]["TORCH_INDEX"].endswith(f"/whl/cu{cuda.group(1)}{cuda.group(2)}")


def test_every_pip_install_uses_the_constraints():
    for word, args, _ in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        for command in re.split(r"&&|;", args) if word == "RUN" else []:
            if re.search(r"\bpip install\b", command):
                assert "-c constraints.txt" in command, f"unpinned: {command.strip()}"


def test_hadolint_is_clean_and_every_ignore_is_justified():
    res = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "install-tools.sh")], check=False,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"scripts/install-tools.sh failed:\n{res.stderr[-3000:]}"
    lint = subprocess.run([str(PROJECT_ROOT / ".venv-tools" / "bin" / "hadolint"), "--no-color", str(DOCKERFILE)],
                          check=False, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for word, args, comments in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        pragmas = [c for c in comments if re.match(r"#\s*(hadolint ignore|checkov:skip)", c)]
        reasons = [c for c in comments if c not in pragmas]
        assert not pragmas or reasons, f"{word} {args[:40]}: {pragmas} without a comment saying why"
