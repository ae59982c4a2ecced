"""The CPU image really built from the Dockerfile, by buildah (daemonless, from Debian), then run: /health
answers 200, a chat request is answered, the image's own HEALTHCHECK passes, and the server runs as the
image's non-root user.

Docker Hub is out of reach here, so python:3.11-slim is stood in for by Debian bookworm (whose Python is 3.11)
made with debootstrap and committed under that name in buildah's local storage; download.pytorch.org is out of
reach too, so TORCH_INDEX_URL points at a local index serving the torch CPU wheel that lies on this machine.
Everything else comes from PyPI as in a user's build. RUN steps use buildah's chroot isolation (its default
OCI runtime cannot create containers in this sandbox)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import dockerfile
import openai
import pytest

from tests.helpers.server_process import ROOT, free_port, wait_healthy

pytestmark = pytest.mark.slow

BASE_IMAGE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/batchwise-ci:latest"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
STAND_IN_PACKAGES = ",".join(["python3.11", "python3.11-venv", "python3-distutils", "python3-pip-whl",
                              "python3-setuptools-whl", "ca-certificates"])
WHEELS = Path("/opt/wheels")
BUILD_SECONDS = 1800


def torch_cpu_wheel() -> Path | None:
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    return next(WHEELS.glob(f"torch-{pin.split('==')[1]}+cpu-cp311-*.whl"), None)


def system_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def buildah(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [tool for tool in ("buildah", "debootstrap") if not system_tool(tool)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install buildah debootstrap); "
                    ".ci/run installs them")
    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation and debootstrap need root here")
    if torch_cpu_wheel() is None:
        pytest.skip(f"no torch CPU wheel in {WHEELS} to serve as the build's torch index")


@pytest.fixture(scope="module")
def stand_in_base(tools, tmp_path_factory) -> None:
    if buildah("images", "--quiet", "--filter", f"reference={BASE_IMAGE}"):
        return
    rootfs = tmp_path_factory.mktemp("rootfs")
    subprocess.run([system_tool("debootstrap"), "--variant=minbase", f"--include={STAND_IN_PACKAGES}", "bookworm",
                    str(rootfs), DEBIAN_MIRROR], check=True, capture_output=True, timeout=BUILD_SECONDS)
    # this machine reaches PyPI through its own certificate authorities
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    container = buildah("from", "scratch")
    try:
        buildah("copy", container, f"{rootfs}/", "/")
        buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        buildah("rm", container)


@pytest.fixture(scope="module")
def torch_index(tools, tmp_path_factory) -> Iterator[str]:
    """A simple index with one project, torch, whose page lists the local CPU wheel."""
    folder = tmp_path_factory.mktemp("torch-index")
    (folder / "torch").mkdir()
    os.symlink(torch_cpu_wheel(), folder / "torch" / torch_cpu_wheel().name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def image(stand_in_base, torch_index) -> str:
    # VARIANT is passed although it is the default: buildah 1.28 resolves `FROM ${VARIANT}` to the stage only so
    buildah("bud", "--isolation", "chroot", "--layers", "--pull=never", "--build-arg", "VARIANT=cpu",
            "--build-arg", f"TORCH_INDEX_URL={torch_index}", "--tag", IMAGE, "--file", str(ROOT / "Dockerfile"),
            str(ROOT), timeout=BUILD_SECONDS)
    return IMAGE


@pytest.fixture(scope="module")
def container(image) -> Iterator[str]:
    name = buildah("from", "--pull=never", image)
    yield name
    buildah("rm", name)


def run_in(container: str, *command: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    settings = [arg for key, value in (env or {}).items() for arg in ("--env", f"{key}={value}")]
    return subprocess.Popen(["buildah", "run", "--isolation", "chroot", *settings, container, "--", *command],
                            **popen)


def test_the_built_image_serves_chat_as_a_non_root_user(container, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as output:
        server = run_in(container, "python", "main.py", env={"PORT": str(port)}, stdout=output,
                        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # serving, while the default's background compile of the decode step may still run beside it
        wait_healthy(f"http://127.0.0.1:{port}", server, log, settled=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content

        [check] = [c for c in dockerfile.parse_file(str(ROOT / "Dockerfile")) if c.cmd == "HEALTHCHECK"]
        healthcheck = run_in(container, *check.value[1:], env={"PORT": str(port)}, stdout=subprocess.DEVNULL)
        assert healthcheck.wait(timeout=60) == 0, "the image's HEALTHCHECK fails against its own server"
        user = subprocess.run(["buildah", "run", "--isolation", "chroot", container, "--", "id", "-u"],
                              capture_output=True, text=True, timeout=60)
        assert user.stdout.strip() == "10001"
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    assert "converting" in log.read_text() or "using the converted copy" in log.read_text()
    assert "built decode_attention.c" in log.read_text(), "the image has no C compiler for its attention kernel"
