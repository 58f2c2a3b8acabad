"""scripts/build-image.sh without a container engine: the tag it makes is the one manifests/
deploy, and bad usage is one line per problem and exit 2. (tests/test_image.py builds.)"""

from __future__ import annotations

import os
import subprocess
import tomllib

import pytest
import yaml

from tests.conftest import REPO

SCRIPT = str(REPO / "scripts" / "build-image.sh")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "BUILDER", "BASE_IMAGE")}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60, env={**clean, **env})


@pytest.mark.parametrize("overlay", ["base", "examples"])
def test_default_tag_is_the_image_the_manifests_deploy(overlay):
    out = _script("--print-image")
    assert out.returncode == 0, out.stderr
    kustomization = yaml.safe_load((REPO / "manifests" / overlay / "kustomization.yaml").read_text())
    (image,) = [i for i in kustomization["images"] if i["name"] == "heteroscale"]
    assert out.stdout.strip() == f"{image['newName']}:{image['newTag']}"
    assert image["newTag"] == VERSION


def test_image_env_names_the_tag():
    out = _script("--print-image", IMAGE="registry.example.com/hs:dev")
    assert (out.returncode, out.stdout.strip()) == (0, "registry.example.com/hs:dev")


def test_bad_usage_is_one_line_per_problem_and_exit_2():
    out = _script("--bogus", BUILDER="nerdctl")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert "unknown argument '--bogus'" in lines[0] and "BUILDER must be buildah, podman or docker" in lines[1]
    out = _script("--print-image", "extra")
    assert out.returncode == 2 and out.stderr.strip() == "build-image: --print-image takes no argument"
