"""Two real replicas behind Debian's nginx, configured by deploy/nginx/batchwise.conf: streams spread over
both, and a replica killed mid-run costs no new request (the balancer routes around it)."""

import asyncio
import re
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server_process import ROOT, free_port, main_command, running_server, spawn, wait_healthy

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")]
BODY = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 12, "temperature": 0, "stream": True}


def nginx_conf(ports: list[int], listen: int, folder) -> str:
    """The deploy file with these replicas and this port, inside a minimal main configuration."""
    site = (ROOT / "deploy" / "nginx" / "batchwise.conf").read_text()
    example_servers = re.findall(r"    server \S+:\d+ (.*);\n", site)
    assert example_servers, "the deploy file lists its replicas as `server HOST:PORT ...;` lines"
    site = re.sub(r"    server \S+:\d+ .*;\n", "", site)
    servers = "".join(f"    server 127.0.0.1:{port} {example_servers[0]};\n" for port in ports)
    site = site.replace("    keepalive", servers + "    keepalive", 1)
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    temp = " ".join(f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                       "scgi"))
    return (f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nevents {{}}\n"
            f"http {{\naccess_log {folder}/access.log;\n{temp}\n{site}\n}}\n")


async def stream(client: httpx.AsyncClient) -> str:
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=BODY) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                text.append(line)
    assert text
    return "".join(text)


async def streams(url: str, count: int) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(stream(client) for _ in range(count)), return_exceptions=True)


def served(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "batchwise_requests_total" and sample.labels["endpoint"] == "/v1/chat/completions")


def test_replicas_share_the_load_and_a_dead_one_is_routed_around(embedded_model_dir, tmp_path):
    port_b = free_port()
    replica_b = spawn(main_command(port_b), tmp_path / "replica-b.log")
    with running_server() as url_a:
        url_b = f"http://127.0.0.1:{port_b}"
        wait_healthy(url_b, replica_b, tmp_path / "replica-b.log")
        tmp_path.chmod(0o777)  # nginx's workers may run as nobody
        listen = free_port()
        (tmp_path / "nginx.conf").write_text(nginx_conf([int(url_a.rsplit(":", 1)[1]), port_b], listen, tmp_path))
        nginx = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-g",
                                  "daemon off;"], stderr=subprocess.PIPE)
        balancer = f"http://127.0.0.1:{listen}"
        try:
            for _ in range(50):
                try:
                    httpx.get(f"{balancer}/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            results = asyncio.run(streams(balancer, 16))
            assert all(isinstance(r, str) for r in results), results
            assert served(url_a) > 0 and served(url_b) > 0, "least_conn should use both replicas"

            async def kill_mid_run() -> list:
                in_flight = asyncio.ensure_future(streams(balancer, 8))
                await asyncio.sleep(1.0)
                replica_b.send_signal(signal.SIGKILL)
                replica_b.wait()
                after = await streams(balancer, 8)
                await in_flight  # those on the killed replica may fail: they were running there
                return after

            after_kill = asyncio.run(kill_mid_run())
            assert all(isinstance(r, str) for r in after_kill), after_kill
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=10)
            if replica_b.poll() is None:
                replica_b.kill()
